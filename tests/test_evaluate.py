"""The one scoring path (finegrained/evaluate.py) against counts made here by hand: top-1 and top-5 with tied
probabilities and with fewer classes than k, the confusion matrix and per-class counts with a class that is never
predicted and one that never occurs, and the metrics dict run.py and test.py both write, keys and box metrics."""
import numpy as np
import pandas as pd
import torch
from pytest import approx

from finegrained import evaluate
from finegrained.report import per_class_table

# 7 classes, 5 rows: where the target ranks, by hand
PROBS = torch.tensor([[.50, .20, .10, .10, .04, .03, .03],    # target 0: first                    -> top-1, top-5
                      [.30, .25, .25, .10, .04, .03, .03],    # target 2: tied 2nd/3rd with 1      -> top-5 only
                      [.40, .10, .10, .10, .10, .10, .10],    # target 6: tied 2nd..7th, 4 of 6 are in the top 5
                      [.03, .03, .10, .10, .20, .24, .30],    # target 0: tied 6th/7th with 1      -> neither
                      [.10, .55, .10, .10, .05, .05, .05]])   # target 1: first                    -> top-1, top-5
TARGETS = [0, 2, 6, 0, 1]


def test_top_k_counts_ties_inside_k_and_agrees_with_the_predicted_class():
    found = evaluate.top_k(PROBS[[0, 1, 3, 4]], [0, 2, 0, 1])   # rows without an order-dependent tie at the k boundary
    assert found == {1: 2 / 4, 5: 3 / 4}
    # row 2's target ties for places 2..6: torch.topk decides whether it is in the top 5, and the predicted class
    # (the first of the same ranking) is what the top-1 counts
    ranked = evaluate.ranked(PROBS)[1]
    in_top5 = bool((ranked[2] == 6).any())
    assert evaluate.top_k(PROBS, TARGETS) == {1: 2 / 5, 5: (3 + in_top5) / 5}
    assert evaluate.top_k(PROBS, TARGETS)[1] == float((evaluate.predicted(PROBS) == np.array(TARGETS)).mean())


def test_top_k_with_fewer_classes_than_k_counts_every_class():
    probs = torch.tensor([[.7, .2, .1], [.1, .1, .8], [.3, .6, .1]])
    assert evaluate.top_k(probs, np.array([2, 2, 0]), ks=(1, 2, 5)) == {1: approx(1 / 3), 2: approx(2 / 3), 5: 1.0}
    assert evaluate.ranked(probs)[1].shape == (3, 3)


def test_a_tie_for_first_is_broken_as_the_top_1_breaks_it():
    probs = torch.full((200, 8), 0.1)
    probs[:, [0, 1]] = 0.3       # two classes tied for first on every row: argmax takes 0, torch.topk here 1
    targets = np.zeros(200, dtype=int)
    assert evaluate.top_k(probs, targets)[1] == float((evaluate.predicted(probs) == targets).mean())


# True classes 0..4; class 3 is never predicted, class 4 never occurs (neither true nor predicted).
TRUE = [0, 0, 0, 1, 1, 2, 3, 3]
PRED = [0, 1, 0, 1, 1, 2, 2, 0]
CONFUSION = [[2, 1, 0, 0, 0],   # rows: true 0..4; columns: predicted 0..4
             [0, 2, 0, 0, 0],
             [0, 0, 1, 0, 0],
             [1, 0, 1, 0, 0],
             [0, 0, 0, 0, 0]]


def test_confusion_keeps_a_row_and_column_for_every_class():
    assert evaluate.confusion(TRUE, PRED, 5).tolist() == CONFUSION
    images, correct = evaluate.per_class_counts(TRUE, PRED, 5)
    assert (images.tolist(), correct.tolist()) == ([3, 2, 1, 2, 0], [2, 2, 1, 0, 0])


def test_per_class_table_lists_each_true_class_worst_first():
    classes = [{"id": i, "name": n} for i, n in [(11, "a"), (12, "b"), (13, "c"), (14, "never predicted"), (15, "absent")]]
    table = per_class_table(TRUE, PRED, classes)
    assert list(table.itertuples(index=False, name=None)) == [
        (14, "never predicted", 2, 0, 0.0), (11, "a", 3, 2, 0.6667), (12, "b", 2, 2, 1.0), (13, "c", 1, 1, 1.0)]


def test_model_scores_is_the_one_metrics_dict():
    boxes = np.array([[1, 1, 10, 10], [1, 1, 10, 10], [1, 1, 10, 10], [1, 1, 10, 10], [5, 5, 14, 14]], dtype=float)
    table = pd.DataFrame({"bbox_x1": [1, 1, 6, None, 5], "bbox_y1": [1, 1, 1, None, 5],
                          "bbox_x2": [10, 10, 15, None, 14], "bbox_y2": [10, 10, 10, None, 14]})
    scores = evaluate.model_scores(PROBS[[0, 1, 3, 4, 4]], [0, 2, 0, 1, 1], boxes, table, prefix="test_")
    # devkit boxes are 1-based inclusive: [1, 10] x [1, 10] and [6, 15] x [1, 10] overlap on 5 x 10 of 150 pixels
    assert list(scores) == ["test_top1", "test_top5", "test_images", "test_mean_iou", "test_iou50", "test_box_images"]
    assert scores["test_top1"] == 3 / 5 and scores["test_top5"] == 4 / 5 and scores["test_images"] == 5
    assert abs(scores["test_mean_iou"] - (1 + 1 + 50 / 150 + 1) / 4) < 1e-6
    assert scores["test_iou50"] == 3 / 4 and scores["test_box_images"] == 4
    assert evaluate.model_scores(PROBS, boxes=boxes[:5], table=table) == {
        "images": 5, "mean_iou": scores["test_mean_iou"], "iou50": 0.75, "box_images": 4}
