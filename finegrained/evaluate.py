"""A model's scores on labelled images, computed one way for run.py's final test score (runner.score, metrics.json)
and for test.py (holdout: its printed lines, the predictions CSV, the per-class CSV, the confusion picture, the
report): top-k accuracy by timm, the confusion matrix and the per-class counts by scikit-learn, and a localize
model's box metrics by boxes.box_scores, put together in one dict by model_scores.

    confidences, classes = ranked(probs)           # each row's 5 most likely classes, best first
    scores = model_scores(probs, targets, boxes=devkit_boxes, table=df, prefix="test_")
    matrix = confusion(true, predicted, n)         # rows: true class, columns: predicted
    images, correct = per_class_counts(true, predicted, n)

torch, timm, scikit-learn and the box code are imported inside the functions, as the scripts load the layers below
them: test.py imports this module (holdout.py, report.py) before its --help answers."""
import numpy as np

TOP_K = (1, 5)


def ranked(probs, k=max(TOP_K)):
    """(confidences, class indices) of each row's k most likely classes (k capped at the number of classes), best
    first; the first is the row's predicted class. The same torch.topk that timm's accuracy ranks with, so a tie
    between equal probabilities is broken the same way in the predicted class as in the top-1 accuracy (argmax may
    break it the other way)."""
    return probs.topk(min(k, probs.shape[1]), dim=1)


def predicted(probs):
    """Each row's predicted class (model output index), as a numpy array: ranked's first. Ranked over the top 5 as
    timm's accuracy ranks: torch.topk with k 1 breaks ties otherwise."""
    return ranked(probs)[1][:, 0].cpu().numpy()


def top_k(probs, targets, ks=TOP_K):
    """{k: the fraction of rows whose target (model output index) is among their k most likely classes} for each k
    in `ks`; a k above the number of classes counts every class (timm caps it), so that row scores 1.0."""
    import torch
    from timm.utils import accuracy
    found = accuracy(probs, torch.as_tensor(targets, device=probs.device), topk=tuple(ks))  # percentages
    return {k: float(percent) / 100 for k, percent in zip(ks, found)}


def confusion(true, pred, n):
    """n x n counts: row = true class, column = predicted class (model output indices 0..n-1); every class keeps its
    row and column, one absent from both too."""
    from sklearn.metrics import confusion_matrix
    return confusion_matrix(np.asarray(true), np.asarray(pred), labels=np.arange(n))


def per_class_counts(true, pred, n):
    """(images, correct), each an array over the class indices 0..n-1: how many rows have that true class, and how
    many of those are predicted as it (the confusion matrix's row sums and diagonal)."""
    matrix = confusion(true, pred, n)
    return matrix.sum(axis=1), np.diag(matrix).copy()


def model_scores(probs, targets=None, boxes=None, table=None, prefix=""):
    """The one metrics dict of a model's predictions `probs` (one row per image): {prefix}top1 and {prefix}top5 when
    there are `targets` (model output indices), {prefix}images (every row), then, for devkit `boxes` predicted for
    the rows of `table` (its bbox_x1..bbox_y2 the true boxes), boxes.box_scores' mean_iou, iou50 and box_images
    over the rows that have a true box (nothing when none has)."""
    scores = {}
    if targets is not None:
        scores.update({f"{prefix}top{k}": v for k, v in top_k(probs, targets).items()})
    scores[f"{prefix}images"] = len(probs)
    if boxes is not None and table is not None:
        from finegrained.boxes import box_scores
        scores.update(box_scores(boxes, table, prefix=prefix))
    return scores
