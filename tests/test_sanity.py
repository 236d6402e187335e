"""run.py --sanity's checks (Karpathy's "verify loss @ init" and "overfit one batch"): on generated learnable sets
a resnet18 from scratch starts near ln(classes) at any size and class count and overfits 20 images; with learning
rate 0, nothing trainable, labels not tied to the images, or logits blown up, a check fails (labels shuffled once
are, as the checks cannot tell, still memorized)."""
import math

import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat

from finegrained import sanity
import synth
from conftest import N_CLASSES
from finegrained.data import get_dls
from finegrained.prepare.dataset import prepare
from finegrained.prepare.tables import read_table
from finegrained.models import build_model

SIZE, BS, EPOCHS, LR = 32, 10, 20, 1e-2   # about 5 s for the overfit check on 2 CPU cores


class Scaled(torch.nn.Module):
    """A model whose logits are multiplied: confidently wrong from the start."""

    def __init__(self, model, factor):
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, x):
        return self.model(x) * self.factor


class RandomLabels(Callback):
    """Every training batch gets fresh random labels: images and labels not tied together (a loader that shuffles them
    apart), which no model can memorize. Predictions (get_preds) still see the table's labels."""

    def before_batch(self):
        if self.training:
            self.learn.yb = (torch.randint(0, self.dls.c, self.yb[0].shape, device=self.yb[0].device),)


def learner_factory(scale=None, frozen_bn_stats=False, stale_bn_stats=False, frozen=False, zero_last_layer=False,
                    random_labels=False, built=None):
    def make_learner(df, size, bs):
        dls = get_dls(df, size, bs, workers=0)
        model = build_model("resnet18", dls.c, pretrained=False)
        bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if frozen_bn_stats:  # running statistics that training never updates: stale in the extreme
            for m in bns:
                m.momentum = 0.0
        if stale_bn_stats:   # running statistics of no data at all: every layer multiplies its input by 100
            for m in bns:
                m.running_var.fill_(1e-4)
        if frozen:
            model.requires_grad_(False)
        if zero_last_layer:  # Karpathy's "init well": the last layer starts at zero, every image at the uniform softmax
            torch.nn.init.zeros_(model[-1][-1].weight)   # fastai's last layer has no bias
        learn = Learner(dls, Scaled(model, scale) if scale else model, loss_func=CrossEntropyLossFlat(),
                        cbs=[RandomLabels()] if random_labels else None)
        learn.remove_cb(ProgressCallback)
        learn.logger = lambda *a: None
        if built is not None:
            built.append(learn)
        return learn
    return make_learner


@pytest.fixture(autouse=True)
def seeded():
    """Every test draws the same weights and batches, whichever tests ran before it (run_checks seeds itself too)."""
    from fastai.torch_core import set_seed
    set_seed(42)


@pytest.fixture(scope="module")
def train_df(prepared):
    return read_table(prepared / "train.csv")


@pytest.fixture(scope="module")
def clean_set(tmp_path_factory):
    """clean_set(classes, per_class): train.csv's rows of a generated clean set, prepared once per shape."""
    made = {}

    def make(classes, per_class):
        if (classes, per_class) not in made:
            root = tmp_path_factory.mktemp(f"clean{classes}")
            samples = synth.make_samples(classes, train_per_class=per_class, test_per_class=1, min_size=64, max_size=96,
                                         seed=classes)
            folder = prepare("cars", root / "prepared", [synth.write_layout(samples, root / "raw", "original", classes)])
            made[classes, per_class] = read_table(folder / "train.csv")
        return made[classes, per_class]
    return make


def test_checks_pass_on_a_learnable_set(train_df):
    results = sanity.run_checks(learner_factory(), train_df, size=SIZE, bs=BS, epochs=EPOCHS, lr=LR)
    text = sanity.format_results(results)
    assert [ok for _, ok, _ in results] == [True, True], text
    assert sanity.all_passed(results)
    assert f"ln({N_CLASSES}) = {math.log(N_CLASSES):.3f}" in results[0][2]
    assert "training accuracy 1.000" in results[1][2] and "on 20 images of 2 classes" in results[1][2]
    assert text.splitlines()[1].startswith("PASS  overfits 20 images")


def test_learning_rate_zero_cannot_overfit(train_df):
    results = sanity.run_checks(learner_factory(), train_df, size=SIZE, bs=BS, epochs=3, lr=0.0)
    assert [ok for _, ok, _ in results] == [True, False], sanity.format_results(results)
    assert not sanity.all_passed(results)
    assert sanity.format_results(results).splitlines()[1].startswith("FAIL  overfits 20 images")


def test_overfit_is_measured_with_batchnorm_statistics_of_the_data(train_df):
    """Stale running statistics must not fail the check: they are recomputed over the 20 images first."""
    name, ok, detail = sanity.check_overfit(learner_factory(frozen_bn_stats=True), train_df, SIZE, BS, EPOCHS, LR)
    assert ok, detail


def test_initial_loss_far_above_ln_classes_fails(train_df):
    name, ok, detail = sanity.check_initial_loss(learner_factory(scale=30.0), train_df, SIZE, BS)
    assert not ok, detail


@pytest.mark.parametrize("size, classes, per_class", [  # the recipe's 224 px costs seconds: in the full suite alone
    (32, 2, 40), pytest.param(224, 2, 15, marks=pytest.mark.slow), (96, 6, 6),
    pytest.param(224, 6, 5, marks=pytest.mark.slow), (32, 20, 3)])
def test_initial_loss_passes_on_clean_data_of_any_size_and_class_count(clean_set, size, classes, per_class):
    """The loss as training starts (BatchNorm on batch statistics), not in eval mode, where an untrained network's
    BatchNorm has no statistics of any data and its logits grow with the image size (3.17 vs ln(6) at 224 px, issue 21)."""
    name, ok, detail = sanity.check_initial_loss(learner_factory(), clean_set(classes, per_class), size, BS)
    assert ok, detail
    assert f"on {classes * per_class} images vs ln({classes}) = {math.log(classes):.3f}" in detail


def test_initial_loss_is_measured_on_batch_statistics_and_leaves_running_ones_alone(train_df):
    """Running statistics of no data (an untrained network's, here made extreme) play no part in the initial loss, as
    they play none in training's first steps; the check leaves them as it found them."""
    built = []
    name, ok, detail = sanity.check_initial_loss(learner_factory(stale_bn_stats=True, built=built), train_df, SIZE, BS)
    assert ok, detail
    assert all(float(m.running_var.max()) == pytest.approx(1e-4) for m in built[0].model.modules()
               if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))


def test_detail_says_when_the_head_starts_far_from_uniform(train_df):
    """fastai's head (kaiming-normal last layer) starts well above ln(C), and the line says so; a zeroed last layer
    starts at the uniform softmax, ln(C) exactly, and the line does not."""
    _, ok, detail = sanity.check_initial_loss(learner_factory(), train_df, SIZE, BS)
    assert ok and "the head starts far from uniform" in detail, detail
    _, ok, detail = sanity.check_initial_loss(learner_factory(zero_last_layer=True), train_df, SIZE, BS)
    assert ok and "far from uniform" not in detail, detail
    assert f"cross-entropy {math.log(N_CLASSES):.3f}" in detail and "(ratio 1.00," in detail and "spread 0.00" in detail


def test_a_model_with_nothing_trainable_fails_the_overfit_check_in_one_line(train_df):
    """Every parameter frozen: the start is as good as ever (check 1 passes), and check 2 fails saying why, where
    fastai's fit would stop with a traceback (no tensor requires a gradient)."""
    results = sanity.run_checks(learner_factory(frozen=True), train_df, size=SIZE, bs=BS, epochs=EPOCHS, lr=LR)
    assert [ok for _, ok, _ in results] == [True, False], sanity.format_results(results)
    assert results[1][2] == "the model has no trainable parameters (all frozen): nothing can learn"


def test_labels_not_tied_to_the_images_cannot_be_overfit(train_df):
    """Fresh random labels every batch (a loader that shuffles images and labels apart): nothing can be memorized, so
    the overfit check fails; the initial loss passes, since the untrained model knows no labels either way."""
    results = sanity.run_checks(learner_factory(random_labels=True), train_df, size=SIZE, bs=BS, epochs=EPOCHS, lr=LR)
    assert [ok for _, ok, _ in results] == [True, False], sanity.format_results(results)


def test_labels_shuffled_once_are_still_memorized(train_df):
    """What the checks cannot see: the table's labels shuffled once, a fixed wrong labelling. The untrained model knows
    no labels (check 1 passes either way), and 20 images with random labels are still memorizable (Zhang et al., 2017,
    "Understanding deep learning requires rethinking generalization"), so check 2 passes too: it tests that the
    pipeline can fit what it is given, not that the labels are right. Only accuracy on images not trained on, a run's
    validation or test score at chance, shows wrong labels."""
    shuffled = train_df.copy()
    shuffled["class_id"] = train_df["class_id"].sample(frac=1, random_state=0).to_numpy()
    shuffled.attrs = dict(train_df.attrs)
    sample = sanity.overfit_sample(shuffled)
    true_class = dict(zip(train_df["filename"], train_df["class_id"]))
    assert (sample["filename"].map(true_class) != sample["class_id"]).sum() >= 8   # most of the 20 labels are wrong
    results = sanity.run_checks(learner_factory(), shuffled, size=SIZE, bs=BS, epochs=EPOCHS, lr=LR)
    assert [ok for _, ok, _ in results] == [True, True], sanity.format_results(results)


def test_subsets(train_df):
    loss_rows = sanity.loss_sample(train_df, limit=40)
    assert loss_rows["class_id"].value_counts().to_dict() == {c: 10 for c in range(1, N_CLASSES + 1)}
    overfit = sanity.overfit_sample(train_df)
    assert overfit["class_id"].tolist() == [1] * 10 + [2] * 10
    assert overfit.attrs["folder"] == train_df.attrs["folder"]
