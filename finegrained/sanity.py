"""run.py --sanity: two checks from Andrej Karpathy's "A Recipe for Training Neural Networks" on the configured
data and model, each with its numbers.

  1. the untrained model's loss, as training starts (BatchNorm on batch statistics), is about ln(classes):
     softmax over C classes starts near uniform, so a loss far above it means logits blown up (broken
     initialization or outputs); the line says how far from uniform the head starts;
  2. the model can overfit a tiny subset (2 classes, 20 images) to 100 % training accuracy: if it
     cannot, something between the data and the optimizer is broken, and a full run would only hide it.
     By default it trains without augmentation (the validation transforms: the same 20 inputs every
     epoch), as in the usual "overfit one batch" check: memorizing is then quick and a failure is
     the pipeline's, not the augmentation's.

    results = run_checks(make_learner, train_df)      # make_learner(df, size, bs) -> fastai Learner
    print(format_results(results)); sys.exit(0 if all_passed(results) else 1)

fastai does the training and the predictions; written here are only the subsets and the verdicts."""
import math

import torch
import torch.nn.functional as F
from fastai.callback.core import Callback, TrainEvalCallback
from fastai.data.core import DataLoaders
from fastai.torch_core import noop, set_seed
from torch.optim.swa_utils import update_bn

LOSS_BOUNDS = (0.5, 2.0)    # the initial loss passes within ln(C) x these: fastai's head starts at 1.2-1.8 x ln(C)
FAR_FROM_UNIFORM = 1.1      # above ln(C) x this, the detail line says the head starts far from uniform
LOSS_SAMPLE = 512           # at most this many images measure the initial loss (all classes present)


def _subset(train_df, rows):
    sub = train_df.loc[rows].reset_index(drop=True)
    sub.attrs = dict(train_df.attrs)   # the image folder travels in attrs (data.read_table)
    return sub


def loss_sample(train_df, limit=LOSS_SAMPLE, seed=0):
    """Rows for the initial-loss check: the same number from every class (at least one), at most `limit` in all."""
    per_class = max(1, limit // train_df["class_id"].nunique())
    rows = (train_df.sample(frac=1, random_state=seed).groupby("class_id", sort=True).head(per_class).index)
    return _subset(train_df, sorted(rows))


def overfit_sample(train_df, n_classes=2, per_class=10):
    """The first `per_class` rows of each of the first `n_classes` classes (by class id) that have that many."""
    counts = train_df["class_id"].value_counts()
    classes = sorted(c for c, k in counts.items() if k >= per_class)[:n_classes]
    if len(classes) < n_classes:
        classes = sorted(counts.index)[:n_classes]
    rows = [i for c in classes for i in train_df.index[train_df["class_id"] == c][:per_class]]
    return _subset(train_df, rows)


def _plain_dl(learn, df, shuffle=False):
    """A loader over every row of `df` with the validation transforms (no augmentation)."""
    return learn.dls.test_dl(df, with_labels=True, shuffle=shuffle, drop_last=False)


def _batch_norm_modules(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def _logits(learn, df, batch_statistics=False):
    """The model's raw class outputs and the targets over every row of `df`, once, without augmentation (for a
    localize model, whose batches are (image, box, class), its class outputs and classes).

    batch_statistics: BatchNorm normalizes each batch by its own statistics, as in training, and dropout is off:
    the model as its first training steps see it, less dropout's noise. The running statistics are left as they were."""

    class BatchStatistics(Callback):
        order = TrainEvalCallback.order + 1   # after TrainEvalCallback has put the whole model in eval mode

        def before_validate(self):
            for m in _batch_norm_modules(self.model):
                m.train()

    saved = [(b, b.detach().clone()) for m in _batch_norm_modules(learn.model) for b in m.buffers()]
    try:
        logits, targets = learn.get_preds(dl=_plain_dl(learn, df), act=noop,
                                          cbs=[BatchStatistics()] if batch_statistics else None)
    finally:
        for buffer, value in saved:
            buffer.copy_(value)
    if isinstance(logits, (tuple, list)):
        logits, targets = logits[0], targets[-1]
    return logits.float(), targets.long()


def _cross_entropy(logits, targets):
    # plain cross-entropy of the outputs, whatever loss the learner trains with (smooth, focal)
    return float(F.cross_entropy(logits, targets))


def check_initial_loss(make_learner, train_df, size, bs, bounds=LOSS_BOUNDS):
    """The loss of the untrained model as training starts (Karpathy's "verify loss @ init"): BatchNorm on the
    statistics of each batch of `bs`, as the first training steps normalize, and no dropout.

    Not in evaluation mode: an untrained network's running statistics are BatchNorm's defaults (mean 0, variance 1),
    no statistics of any data, so every BatchNorm layer passes its input through unnormalized and the logits grow with
    the image size (a resnet18 from scratch on 6 clean classes: 1.82 at 32 px, 3.58 at 224 px, against ln(6) = 1.79);
    training never sees the model that way.

    The detail line gives the spread of the logits (their standard deviation over the classes of an image; a uniform
    start has 0): fastai's head draws its last layer kaiming-normal on BatchNorm'd features, so its logits start with a
    spread near 1.4 and its loss at 1.2-1.8 x ln(C), more for fewer classes, rather than at ln(C) exactly. Hence the
    bound of 2 x ln(C): a start above it is no such head but logits blown up (a spread above about 3 for up to 20
    classes), and the line says how far from uniform a head that passes starts."""
    name = "untrained loss ~ ln(classes)"
    sample = loss_sample(train_df)
    learn = make_learner(sample, size, bs)
    if len(sample) % _plain_dl(learn, sample).bs == 1:   # a last batch of one image has no batch statistics
        sample = _subset(sample, sample.index[:-1])
    logits, targets = _logits(learn, sample, batch_statistics=True)
    n = logits.shape[1]
    if n < 2:
        return name, False, f"the model has {n} output: the check needs at least 2 classes (ln(1) = 0)"
    loss, expected = _cross_entropy(logits, targets), math.log(n)
    spread = float(logits.std(dim=1).pow(2).mean().sqrt())
    ratio = loss / expected
    low, high = bounds
    passed = low <= ratio <= high
    detail = (f"cross-entropy {loss:.3f} on {len(targets)} images vs ln({n}) = {expected:.3f} "
              f"(ratio {ratio:.2f}, pass within {low:.2f}-{high:.2f}) as training starts (BatchNorm on batch "
              f"statistics, no dropout); logits spread {spread:.2f} over the classes")
    if ratio > FAR_FROM_UNIFORM:
        top = float(logits.softmax(1).max(1).values.mean())
        detail += (f": the head starts far from uniform (mean top probability {top:.2f} vs 1/{n} = {1 / n:.2f}), "
                   "its last layer's initialization spreads the logits")
    return name, passed, detail


def check_overfit(make_learner, train_df, size, bs, epochs, lr, n_classes=2, per_class=10, augment=False):
    """Accuracy on the 20 training images after fitting them, in evaluation mode (no dropout), once
    BatchNorm's running statistics are recomputed over those images (torch's swa_utils.update_bn):
    a few dozen steps from scratch leave the running averages far from the data, which is no fault
    of the pipeline, and train-mode accuracy would be blurred by the head's dropout.

    A model with nothing to train (every parameter frozen) fails at once, saying so."""
    sample = overfit_sample(train_df, n_classes, per_class)
    learn = make_learner(sample, size, bs)
    name = f"overfits {len(sample)} images"
    trainable = sum(p.numel() for p in learn.model.parameters() if p.requires_grad)
    if not trainable:
        return name, False, "the model has no trainable parameters (all frozen): nothing can learn"
    if not augment:
        dls = learn.dls
        learn.dls = DataLoaders(_plain_dl(learn, sample, shuffle=True), dls.valid, path=dls.path, device=dls.device)
    learn.fit_one_cycle(epochs, lr)
    update_bn(_plain_dl(learn, sample), learn.model)
    logits, targets = _logits(learn, sample)
    accuracy = float((logits.argmax(1) == targets).float().mean())
    detail = (f"training accuracy {accuracy:.3f} (cross-entropy {_cross_entropy(logits, targets):.3f}) on {len(sample)} "
              f"images of {sample['class_id'].nunique()} classes after {epochs} epochs at lr {lr:g}"
              f"{'' if augment else ', no augmentation'}; needs 1.000")
    return name, accuracy == 1.0, detail


def run_checks(make_learner, train_df, size=224, bs=10, epochs=20, lr=1e-2, n_classes=2, per_class=10, augment=False,
               seed=42):
    """[(name, passed, detail)] of both checks. `make_learner(df, size, bs)` builds a fresh fastai
    Learner on those rows as the run would (same architecture, weights, loss, freezing; no validation
    split; train.csv's folder in df.attrs["folder"]). The overfit check trains it with one-cycle for
    `epochs` at max learning rate `lr`."""
    set_seed(seed)
    results = [check_initial_loss(make_learner, train_df, size, bs)]
    set_seed(seed)
    results.append(check_overfit(make_learner, train_df, size, bs, epochs, lr, n_classes, per_class, augment))
    return results


def format_results(results):
    """One line per check: PASS/FAIL, its name, its numbers."""
    return "\n".join(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}" for name, ok, detail in results)


def all_passed(results):
    return bool(results) and all(bool(ok) for _, ok, _ in results)
