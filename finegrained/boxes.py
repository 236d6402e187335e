"""Boxes: the geometry, loss, metrics and data pieces of `--head localize`.

Three frames, one box each (x1, y1, x2, y2):
  devkit   1-based inclusive pixels, as the CSVs and the Stanford Cars devkit write them: (1, 1, W, H) is the whole image;
  pixels   0-based pixel edges, what the box getter gives fastai: devkit (x1, y1, x2, y2) -> (x1 - 1, y1 - 1, x2, y2);
  frame    fastai's normalized frame of the model input: PointScaler maps pixel edge p to 2p/W - 1, then Resize
           (and at training the augmentation) moves it with the image; the model predicts boxes in this frame.

IoU and GIoU come from torchvision.ops; augmentation moves boxes through fastai's own TensorBBox support.
Written here: the single-box collation, the loss that adds a box term to any class loss, the metrics, and the
inverse of fastai's validation Resize (fastai has none) to put a prediction back on the original image."""
import functools

import numpy as np
import torch
import torch.nn.functional as F
from fastai.metrics import accuracy
from fastai.vision.all import (BBoxBlock, CategoryBlock, ColReader, DataBlock, ImageBlock, IndexSplitter, PadMode,
                               Resize)
from torchvision.ops import box_iou, generalized_box_iou_loss

from finegrained.errors import UserError
from finegrained.images import BOX_COLUMNS, image_sizes
from finegrained.recipe import CHOICES, RESIZE

BOX_LOSSES = CHOICES["box_loss"]
RESIZE_METHODS = tuple(RESIZE.values())  # fastai's names: the frames follow fastai's Resize


# ---------------------------------------------------------------- IoU and GIoU (torchvision.ops)

def _plain(t):
    """A float32 (N, 4) tensor without fastai's type (TensorBBox and TensorImage do not mix in one op)."""
    return t.as_subclass(torch.Tensor).float().reshape(-1, 4)


def iou(a, b):
    """IoU of each box in `a` with the box at the same index of `b` ((N, 4) each)."""
    return box_iou(_plain(a), _plain(b)).diagonal()  # torchvision has only the pairwise form; N is a batch, so N*N is small


def giou(a, b):
    """Generalized IoU (Rezatofighi et al. 2019) of each pair of boxes: IoU minus the share of the smallest
    enclosing box that neither covers; 1 for identical boxes, towards -1 for distant ones."""
    return 1 - generalized_box_iou_loss(_plain(a), _plain(b))


def in_frame(box):
    """The part of a target box inside the model's input (augmentation can push corners out of -1..1)."""
    return _plain(box).clamp(-1, 1)


# ---------------------------------------------------------------- loss and metrics for (logits, box) predictions

class LocalizeLoss:
    """fastai loss_func for a localize model: cls_loss(logits, class) + lam * box loss(box, target box).

    fastai calls it as loss_func(preds, *targets) = ((logits, box), target_box, target_class) for
    DataBlock(blocks=(ImageBlock, BBoxBlock, CategoryBlock), n_inp=1). `box_loss`: 'smoothl1' (beta 0.1 in the
    -1..1 frame: quadratic below 5 % of the image, linear above) or 'giou' (1 - GIoU). `activation` and `decodes`
    apply to the logits only, so get_preds returns (class probabilities, box)."""

    def __init__(self, cls_loss, box_loss="smoothl1", lam=1.0, beta=0.1):
        if box_loss not in BOX_LOSSES:
            raise UserError(f"unknown box loss {box_loss!r}: choose {' or '.join(BOX_LOSSES)}")
        if not lam >= 0:
            raise UserError(f"the box loss weight must be 0 or more, got {lam}")
        self.cls_loss, self.box_loss, self.lam, self.beta = cls_loss, box_loss, float(lam), beta

    @property
    def reduction(self):
        return self.cls_loss.reduction

    @reduction.setter
    def reduction(self, value):  # fastai sets 'none' to get one loss per image (get_preds(with_loss=True))
        self.cls_loss.reduction = value

    def box_term(self, box, target):
        """One box loss per image."""
        box, target = _plain(box), in_frame(target)
        if self.box_loss == "giou":
            return 1 - giou(box, target)
        return F.smooth_l1_loss(box, target, beta=self.beta, reduction="none").mean(1)

    def __call__(self, preds, target_box, target_cls):
        logits, box = preds
        per_image = self.box_term(box, target_box)
        box_part = per_image if self.reduction == "none" else per_image.sum() if self.reduction == "sum" else per_image.mean()
        return self.cls_loss(logits, target_cls) + self.lam * box_part

    def activation(self, preds):
        logits, box = preds
        return getattr(self.cls_loss, "activation", lambda x: x)(logits), box

    def decodes(self, preds):
        probs, box = preds
        return getattr(self.cls_loss, "decodes", lambda x: x)(probs), box


def on_logits(metric):
    """A class metric(logits, class) as a localize metric(preds, box, class), keeping its name, so that
    history columns read 'accuracy' and 'top5_accuracy' whatever the head."""
    @functools.wraps(metric)
    def wrapped(preds, target_box, target_cls):
        return metric(preds[0], target_cls)
    return wrapped


def _accuracy(inp, targ):
    return accuracy(inp, targ)


_accuracy.__name__ = "accuracy"
accuracy_loc = on_logits(_accuracy)


def mean_iou(preds, target_box, target_cls):
    """Mean IoU of the predicted box (clipped to the frame) with the visible part of the true box."""
    return iou(in_frame(preds[1]), in_frame(target_box)).mean()


def iou50(preds, target_box, target_cls):
    """Share of images whose predicted box has IoU >= 0.5 with the true box (the Cars classification-and-localization write-up's 'localizer accuracy')."""
    return (iou(in_frame(preds[1]), in_frame(target_box)) >= 0.5).float().mean()


def localize_metrics(top5=None):
    """fastai metrics for a localize Learner: accuracy, top-5 accuracy when given, mean_iou, iou50."""
    return [accuracy_loc, *([on_logits(top5)] if top5 else []), mean_iou, iou50]


# ---------------------------------------------------------------- frames

def devkit_to_pixels(box):
    """Devkit box (1-based inclusive) -> pixel edges (0-based): the box fastai's PointScaler expects."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1 - 1, y1 - 1, x2, y2]


def resize_window(width, height, size, method="crop"):
    """(left, top, w, h): the region of a width x height image that fills the model's input after fastai's
    Resize(size, method) at validation and inference (pcts 0.5: centred). Negative left/top: padding.

    The same arithmetic as fastai.vision.augment.Resize.encodes, int truncations included."""
    if method not in RESIZE_METHODS:
        raise UserError(f"unknown resize method {method!r}: choose one of {', '.join(RESIZE_METHODS)}")
    if method == "squish":
        return 0, 0, width, height
    pick = min if method == "crop" else max  # crop: the largest centred square inside; pad: the smallest around
    m = pick(width / size, height / size)
    w, h = int(m * size), int(m * size)
    return int(0.5 * (width - w)), int(0.5 * (height - h)), w, h


def frame_to_pixels(box, width, height, size, method="crop"):
    """A box in the model's frame (-1..1, clipped to it) -> pixel edges on the original width x height image."""
    left, top, w, h = resize_window(width, height, size, method)
    b = _plain(torch.as_tensor(box)).clamp(-1, 1)
    scale = torch.tensor([w, h, w, h], dtype=torch.float32) / 2
    offset = torch.tensor([left, top, left, top], dtype=torch.float32)
    px = offset + (b + 1) * scale
    return torch.minimum(px.clamp(min=0), torch.tensor([width, height, width, height], dtype=torch.float32))


def pixels_to_devkit(box, width, height):
    """Pixel edges -> devkit box (1-based inclusive integers, inside the image, x1 <= x2, y1 <= y2)."""
    x1, y1, x2, y2 = (float(v) for v in _plain(torch.as_tensor(box))[0])
    x1, y1 = min(max(round(x1) + 1, 1), width), min(max(round(y1) + 1, 1), height)
    return [x1, y1, min(max(round(x2), x1), width), min(max(round(y2), y1), height)]


def frame_to_devkit(box, width, height, size, method="crop"):
    """A predicted box (model frame) -> devkit box on the original image: what test.py writes."""
    return pixels_to_devkit(frame_to_pixels(box, width, height, size, method), width, height)


def devkit_iou(pred, true):
    """IoU of two lists of devkit boxes ((N, 4), 1-based inclusive), row by row, as pixel areas on the original image."""
    def edges(boxes):
        return torch.tensor([devkit_to_pixels(b) for b in boxes], dtype=torch.float32).reshape(-1, 4)
    return iou(edges(pred), edges(true))


def predicted_devkit(boxes, paths, size, method="crop"):
    """The boxes a localize model predicted (model frame, one per image of `paths`) as devkit boxes on the original
    images, an (N, 4) integer array: frame_to_devkit with each image's own upright size."""
    rows = [frame_to_devkit(b, w, h, size, method) for b, (w, h) in zip(boxes, image_sizes(paths))]
    return np.array(rows, dtype=np.int64).reshape(-1, 4)


def box_scores(pred, df, prefix=""):
    """{mean_iou, iou50, box_images} of devkit boxes `pred` against the rows of `df` that have a box (all four
    bbox columns); {} when none has one."""
    if not set(BOX_COLUMNS) <= set(df.columns):
        return {}
    has = df[BOX_COLUMNS].notna().all(axis=1).to_numpy()
    if not has.any():
        return {}
    overlap = devkit_iou(np.asarray(pred)[has], df[BOX_COLUMNS].to_numpy(dtype=float)[has])
    return {f"{prefix}mean_iou": float(overlap.mean()), f"{prefix}iou50": float((overlap >= 0.5).float().mean()),
            f"{prefix}box_images": int(has.sum())}


# ---------------------------------------------------------------- data

def require_boxes(df, name="train.csv"):
    """Stop with one line when a table lacks a box for some row (localize trains on every row's box)."""
    if not set(BOX_COLUMNS) <= set(df.columns):
        raise UserError(f"{name}: --head localize needs bounding boxes (bbox_x1..bbox_y2), and this dataset has none")
    missing = df[BOX_COLUMNS].isna().any(axis=1)
    if missing.any():
        row = int(missing.to_numpy().argmax())
        raise UserError(f"{name}, row {row + 1} ({df['filename'].iloc[row]}): no bounding box; --head localize needs one for every image")


class BoxGetter:
    """fastai get_y for BBoxBlock: a CSV row -> [[x1, y1, x2, y2]] in pixel edges (one box per image)."""

    def __call__(self, row):
        return [devkit_to_pixels([row[c] for c in BOX_COLUMNS])]


def one_box_per_image(samples):
    """before_batch for (image, box, class) samples: leave them as they are.

    Replaces BBoxBlock's bb_pad, which is meant for BBoxLblBlock's per-box labels: with a CategoryBlock class
    it fails (a 0-d label cannot be indexed), and it would drop a box pushed out of the frame and relabel its
    image as class 0. Each image has exactly one box here, so the default collation stacks them as (bs, 1, 4)."""
    return samples


def localize_block(get_x, size, batch_tfms, splitter=None, method="crop"):
    """DataBlock for localize training: (image, box, class) with n_inp=1, so targets are (box, class).

    `get_x` must return the image at its original pixel size and whole (data.ImageReader(folder) without size,
    no crop_bbox): the box getter gives original pixels, and PointScaler divides by the size of the image read.
    Boxes then move with the image through Resize(size, method) and `batch_tfms` (aug_transforms)."""
    if getattr(get_x, "size", None) or getattr(get_x, "crop_bbox", False):
        raise ValueError("localize_block: get_x must read whole images at full size (no draft size, no crop_bbox), "
                         "or the boxes would not match the image")
    if method not in RESIZE_METHODS:
        raise UserError(f"unknown resize method {method!r}: choose one of {', '.join(RESIZE_METHODS)}")
    block = DataBlock(blocks=(ImageBlock, BBoxBlock, CategoryBlock), n_inp=1, get_x=get_x,
                      get_y=[BoxGetter(), ColReader("class_id")], splitter=splitter or IndexSplitter([]),
                      item_tfms=Resize(size, method=method, pad_mode=PadMode.Zeros), batch_tfms=batch_tfms)
    block.dls_kwargs = {**block.dls_kwargs, "before_batch": one_box_per_image}
    return block
