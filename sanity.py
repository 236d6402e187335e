"""run.py --sanity: the checks of seeds/001 on the configured data and model, each with its numbers.

  1. the untrained model's loss is about ln(classes): softmax over C classes starts near uniform, so a
     loss far above it means broken labels, inputs or initialization;
  2. the model can overfit a tiny subset (2 classes, 20 images) to 100 % training accuracy: if it
     cannot, something between the data and the optimizer is broken, and a full run would only hide it.
     By default it trains without augmentation (the validation transforms: the same 20 inputs every
     epoch), as in the usual "overfit one batch" check: memorizing is then quick and a failure is
     the pipeline's, not the augmentation's.

    results = run_checks(make_learner, train_df)      # make_learner(df, size, bs) -> fastai Learner
    print(format_results(results)); sys.exit(0 if all_passed(results) else 1)

fastai does the training and the predictions; written here are only the subsets and the verdicts."""
import math

LOSS_TOLERANCE = 0.5        # the initial loss may lie within ln(C) x (1 +- this)
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


def _eval_probs(learn, df):
    """Softmax outputs and targets over every row of `df`, once, without augmentation (for a localize
    model, whose batches are (image, box, class), its class probabilities and classes)."""
    probs, targets = learn.get_preds(dl=_plain_dl(learn, df))
    if isinstance(probs, (tuple, list)):
        probs, targets = probs[0], targets[-1]
    return probs.float(), targets.long()


def _cross_entropy(probs, targets):
    # plain cross-entropy from the probabilities, whatever loss the learner trains with (smooth, focal)
    return float(-probs.gather(1, targets[:, None]).clamp_min(1e-12).log().mean())


def check_initial_loss(make_learner, train_df, size, bs, tolerance=LOSS_TOLERANCE):
    sample = loss_sample(train_df)
    learn = make_learner(sample, size, bs)
    probs, targets = _eval_probs(learn, sample)
    n = probs.shape[1]
    loss, expected = _cross_entropy(probs, targets), math.log(n)
    ratio = loss / expected
    passed = abs(ratio - 1) <= tolerance
    detail = (f"cross-entropy {loss:.3f} on {len(sample)} images vs ln({n}) = {expected:.3f} "
              f"(ratio {ratio:.2f}, pass within {1 - tolerance:.2f}-{1 + tolerance:.2f})")
    return "untrained loss ~ ln(classes)", passed, detail


def check_overfit(make_learner, train_df, size, bs, epochs, lr, n_classes=2, per_class=10, augment=False):
    """Accuracy on the 20 training images after fitting them, in evaluation mode (no dropout), once
    BatchNorm's running statistics are recomputed over those images (torch's swa_utils.update_bn):
    a few dozen steps from scratch leave the running averages far from the data, which is no fault
    of the pipeline, and train-mode accuracy would be blurred by the head's dropout."""
    from fastai.data.core import DataLoaders
    from torch.optim.swa_utils import update_bn
    sample = overfit_sample(train_df, n_classes, per_class)
    learn = make_learner(sample, size, bs)
    if not augment:
        dls = learn.dls
        learn.dls = DataLoaders(_plain_dl(learn, sample, shuffle=True), dls.valid, path=dls.path, device=dls.device)
    learn.fit_one_cycle(epochs, lr)
    update_bn(_plain_dl(learn, sample), learn.model)
    probs, targets = _eval_probs(learn, sample)
    accuracy = float((probs.argmax(1) == targets).float().mean())
    detail = (f"training accuracy {accuracy:.3f} (cross-entropy {_cross_entropy(probs, targets):.3f}) on {len(sample)} "
              f"images of {sample['class_id'].nunique()} classes after {epochs} epochs at lr {lr:g}"
              f"{'' if augment else ', no augmentation'}; needs 1.000")
    return f"overfits {len(sample)} images", accuracy == 1.0, detail


def run_checks(make_learner, train_df, size=224, bs=10, epochs=20, lr=1e-2, n_classes=2, per_class=10, augment=False,
               seed=42):
    """[(name, passed, detail)] of both checks. `make_learner(df, size, bs)` builds a fresh fastai
    Learner on those rows as the run would (same architecture, weights, loss, freezing; no validation
    split; train.csv's folder in df.attrs["folder"]). The overfit check trains it with one-cycle for
    `epochs` at max learning rate `lr`."""
    from fastai.torch_core import set_seed
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
