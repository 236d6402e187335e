"""run.py --sanity's checks (seeds/001): on a generated learnable set a resnet18 from scratch starts
near ln(classes) and overfits 20 images; with learning rate 0, or logits blown up, a check fails."""
import math

import pytest
import torch
from fastai.callback.progress import ProgressCallback
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat

import sanity
from conftest import N_CLASSES
from data import get_dls, read_table
from models import build_model

SIZE, BS, EPOCHS, LR = 32, 10, 20, 1e-2   # about 5 s for the overfit check on 2 CPU cores


class Scaled(torch.nn.Module):
    """A model whose logits are multiplied: confidently wrong from the start."""

    def __init__(self, model, factor):
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, x):
        return self.model(x) * self.factor


def learner_factory(scale=None, frozen_bn_stats=False):
    def make_learner(df, size, bs):
        dls = get_dls(df, size, bs, workers=0)
        model = build_model("resnet18", dls.c, pretrained=False)
        if frozen_bn_stats:  # running statistics that training never updates: stale in the extreme
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.momentum = 0.0
        learn = Learner(dls, Scaled(model, scale) if scale else model, loss_func=CrossEntropyLossFlat())
        learn.remove_cb(ProgressCallback)
        learn.logger = lambda *a: None
        return learn
    return make_learner


@pytest.fixture(scope="module")
def train_df(prepared):
    return read_table(prepared / "train.csv")


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


def test_subsets(train_df):
    loss_rows = sanity.loss_sample(train_df, limit=40)
    assert loss_rows["class_id"].value_counts().to_dict() == {c: 10 for c in range(1, N_CLASSES + 1)}
    overfit = sanity.overfit_sample(train_df)
    assert overfit["class_id"].tolist() == [1] * 10 + [2] * 10
    assert overfit.attrs["folder"] == train_df.attrs["folder"]
