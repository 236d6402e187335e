"""fastai DataLoaders from a prepared dataset's train.csv (what fastai v1 called a DataBunch): the image
reader, the item and batch transforms each recipe asks for, the validation split and class balancing, and
the loaders that score a table in order without augmentation. data.py's command line prepares the tables
(finegrained/prepare)."""
from pathlib import Path

import fastai.callback.data  # noqa: F401  (adds DataBlock.weighted_dataloaders)
import pandas as pd
from fastai.vision.all import (CategoryBlock, ColReader, CropPad, DataBlock, FlipItem, ImageBlock, IndexSplitter,
                               Normalize, PadMode, RandomCrop, RandomResizedCrop, RandomSplitter, Resize, aug_transforms)
from fastai.data.transforms import Transform
from fastai.vision.core import PILImage
from torchvision.transforms import v2

from finegrained.boxes import localize_block, one_box_per_image, require_boxes
from finegrained.errors import UserError
from finegrained.images import BOX_COLUMNS, BOX_MARGIN, default_workers, open_image
from finegrained.prepare.tables import read_table
from finegrained.recipe import RESIZE, Recipe, Stage

IMAGENET_STATS = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


class ImageReader:
    """fastai `get_x`: a CSV row to an RGB PILImage, cropped to its box when asked."""

    def __init__(self, folder, size=None, crop_bbox=False, margin=BOX_MARGIN):
        self.folder, self.size, self.crop_bbox, self.margin = Path(folder), size, crop_bbox, margin

    def __call__(self, row):
        box = tuple(row[c] for c in BOX_COLUMNS) if self.crop_bbox and BOX_COLUMNS[0] in row.index else None
        return PILImage(open_image(self.folder / row["filename"], self.size, box, self.margin))


AUTO_AUGMENTS = {"trivialaugment": "TrivialAugmentWide", "randaugment": "RandAugment"}  # torchvision defaults


class ItemAugment(Transform):
    """torchvision's TrivialAugmentWide or RandAugment (num_ops 2, magnitude 9) on a training image, after the resize,
    crop and flip and before ToTensor (fastai's order 5); never on validation, test or scoring images (split_idx 0)."""
    split_idx, order = 0, 4

    def __init__(self, name):
        if name not in AUTO_AUGMENTS:
            raise UserError(f"unknown auto_augment {name!r}: use one of none, {', '.join(AUTO_AUGMENTS)}")
        super().__init__()
        self.policy_name, self.policy = name, getattr(v2, AUTO_AUGMENTS[name])()

    def encodes(self, im: PILImage):
        return PILImage(self.policy(im))  # torchvision returns a plain PIL image


# ---------------------------------------------------------------- DataLoaders

CROP_PAD = 8  # augment = "flip_crop": px of zero padding around the image before the random crop (the ResNet50-448 write-up)


def presize(size, crop_pct=1.0):
    """The size images are resized to before a crop of `size` keeps `crop_pct` of each side (timm's crop_pct)."""
    return round(size / crop_pct)


def fastai_resize(resize):
    """fastai's ResizeMethod value for a recipe's `resize` (crop, squash or pad)."""
    if resize not in RESIZE:
        raise UserError(f"unknown resize {resize!r}: use one of {', '.join(RESIZE)}")
    return RESIZE[resize]


def item_transforms(size, resize="crop", crop_pct=1.0, augment="fastai", auto_augment="none"):
    """fastai item transforms: resize to size / crop_pct by `resize` (fastai's crop, squash or pad), then, with
    crop_pct < 1 or the flip_crop augmentation, a crop to `size`: random in training, the centre when scoring
    (fastai's RandomCrop). flip_crop pads CROP_PAD px first and flips half the training images. `auto_augment`
    (trivialaugment, randaugment): torchvision's policy on each training image after the crop (ItemAugment)."""
    tfms = _item_transforms(size, resize, crop_pct, augment)
    if auto_augment != "none":
        tfms.append(ItemAugment(auto_augment))
    return tfms


def _item_transforms(size, resize, crop_pct, augment):
    base = presize(size, crop_pct)
    tfms = [Resize(base, method=fastai_resize(resize))]
    if augment == "flip_crop":  # explicit orders: fastai sorts item transforms by order, and CropPad's is 0
        tfms += [CropPad(base + 2 * CROP_PAD, order=2), RandomCrop(size, order=3), FlipItem(0.5)]
    elif augment == "rrc_flip":  # torchvision's RandomResizedCrop(size) + flip in training; scoring as without it
        scoring = tfms + ([RandomCrop(size, order=3)] if base != size else [])
        training = [RandomResizedCrop(size, min_scale=0.08, ratio=(3 / 4, 4 / 3)), FlipItem(0.5)]
        for split, group in ((1, scoring), (0, training)):  # fastai applies a transform to its split_idx alone
            for tfm in group:
                tfm.split_idx = split
        return scoring + training
    elif base != size:
        tfms.append(RandomCrop(size, order=3))
    return tfms


def batch_transforms(augment, stats=IMAGENET_STATS):
    return [*(aug_transforms() if augment == "fastai" else []), Normalize.from_stats(*stats)]


def get_dls(train_csv, size=Stage.size, bs=Stage.bs, valid_pct=Recipe.valid_pct, seed=Recipe.seed,
            crop_bbox=Recipe.crop_bbox, margin=Recipe.bbox_margin, balance=Recipe.balance, augment=Recipe.augment,
            workers=None, device=None, stats=IMAGENET_STATS, draft=True, resize=Recipe.resize, crop_pct=Recipe.crop_pct,
            head=Recipe.head, auto_augment=Recipe.auto_augment):
    """fastai DataLoaders for a prepared train.csv.

    Labels are the class ids, so the model's classes are in class-id order. `augment`: "fastai" is fastai's
    default (flip, rotate 10°, zoom 1.1, lighting 0.2, warp 0.2) run on the batch, on the GPU when there is one;
    "flip_crop" a horizontal flip and a padded random crop; "none" (or False) nothing. Then ImageNet normalization.
    `valid_pct=0` trains on all rows. `draft=False` decodes every JPEG at full size (only to measure what draft
    decoding saves).

    `head="localize"`: batches are (image, box, class), the box moving with the image through the resize and
    the augmentation (fastai's BBoxBlock; boxes.localize_block). Every row needs a box, and the whole image is read
    at full size (a box crop or draft decoding would put the boxes in another frame). `auto_augment`: torchvision's
    TrivialAugmentWide or RandAugment on training items (ItemAugment); not with boxes."""

    augment = {True: "fastai", False: "none"}.get(augment, augment)
    df = train_csv if isinstance(train_csv, pd.DataFrame) else read_table(train_csv)
    check_settings(df, crop_bbox, head, resize, crop_pct, augment)
    splitter = RandomSplitter(valid_pct, seed) if valid_pct else IndexSplitter([])
    kwargs = dict(bs=bs, num_workers=default_workers() if workers is None else workers, device=device)
    if head == "localize":
        if auto_augment != "none":
            raise UserError(f"--head localize cannot train with auto_augment {auto_augment}: its boxes would not follow")
        block = localize_block(ImageReader(df.attrs["folder"]), size, batch_transforms(augment, stats), splitter,
                               method=fastai_resize(resize))
        # weighted_dataloaders drops the block's dls_kwargs, so the single-box collation is passed to it by hand
        kwargs["before_batch"] = one_box_per_image
    else:
        block = DataBlock(blocks=(ImageBlock, CategoryBlock),
                          get_x=ImageReader(df.attrs["folder"], presize(size, crop_pct) if draft else None, crop_bbox, margin),
                          get_y=ColReader("class_id"), splitter=splitter,
                          item_tfms=item_transforms(size, resize, crop_pct, augment, auto_augment),
                          batch_tfms=batch_transforms(augment, stats))
    if balance:  # each class drawn equally often: weights from the class counts of the training part alone
        train_classes = df["class_id"].iloc[list(splitter(df)[0])]
        counts = df["class_id"].map(train_classes.value_counts()).fillna(1.0)  # a class only in validation: unused
        return block.weighted_dataloaders(df, wgts=(1.0 / counts).to_numpy(), **kwargs)
    return block.dataloaders(df, **kwargs)


def check_settings(df, crop_bbox=False, head="concat", resize="crop", crop_pct=1.0, augment="fastai", **_):
    """What get_dls refuses about a table and its settings, without reading an image: boxes for --crop-bbox and
    --head localize, and the localize head's frame (check_localize). run.py asks before it estimates the run's cost:
    `check_settings(table, **dls_args(recipe))`."""
    augment = {True: "fastai", False: "none"}.get(augment, augment)
    if crop_bbox and (not set(BOX_COLUMNS) <= set(df.columns) or df[BOX_COLUMNS].isna().all().all()):
        raise UserError(f"{df.attrs.get('folder', 'train.csv')}: --crop-bbox needs bounding boxes, and this dataset has none")
    if head == "localize":
        check_localize(crop_bbox, resize, crop_pct, augment)
        require_boxes(df, str(Path(df.attrs.get("folder", ".")) / "train.csv"))


def dls_args(recipe):
    """get_dls's keywords from a resolved recipe: `get_dls(table, size, bs, **dls_args(recipe))`."""
    return {"valid_pct": recipe["valid_pct"], "seed": recipe["seed"], "crop_bbox": recipe["crop_bbox"],
            "margin": recipe["bbox_margin"], "balance": recipe["balance"], "augment": recipe["augment"],
            "resize": recipe["resize"], "crop_pct": recipe["crop_pct"], "head": recipe["head"],
            "auto_augment": recipe["auto_augment"]}


def check_localize(crop_bbox=False, resize="crop", crop_pct=1.0, augment="fastai"):
    """What --head localize cannot be combined with, each as one line."""
    if crop_bbox:
        raise UserError("--head localize predicts the box on whole images: it cannot train on --crop-bbox crops "
                        "(train the localizer without --crop-bbox, then score a --crop-bbox model with test.py --localizer)")
    if crop_pct != 1 or augment in ("flip_crop", "rrc_flip"):
        what = f"crop_pct {crop_pct:g}" if crop_pct != 1 else f"augment {augment}"
        raise UserError(f"--head localize takes resize crop, squash or pad with crop_pct 1 and augment fastai or none, "
                        f"not {what}: its predicted boxes are mapped back to the image through the resize alone")
    fastai_resize(resize)


def dls_frame(dls):
    """(size, fastai resize method) of the validation Resize of `dls`: the frame its boxes are predicted in."""
    resize = next(t for t in dls.valid.after_item.fs if isinstance(t, Resize))
    return int(resize.size[0]), str(resize.method)


def inference_dl(df, folder, size, bs=64, stats=IMAGENET_STATS, crop_bbox=False, margin=BOX_MARGIN, workers=None,
                 device=None, resize="crop", crop_pct=1.0, localize=False):
    """(DataLoaders, loader): the loader goes over every row of `df` (`filename` relative to `folder`), in order, once,
    resized as validation images are (`resize` to size / crop_pct, then the centre `size`) and normalized,
    with no labels.

    `localize`: as a localize model was trained (data.get_dls(head="localize")): every image decoded at full size
    (no draft), padding with zeros, so that the predicted box maps back through boxes.frame_to_devkit.
    fastai's default augmentation is attached too but applies only under test-time augmentation."""
    if localize:
        check_localize(crop_bbox, resize, crop_pct, "none")
        get_x, item_tfms = ImageReader(folder), [Resize(size, method=fastai_resize(resize), pad_mode=PadMode.Zeros)]
    else:
        get_x, item_tfms = ImageReader(folder, presize(size, crop_pct), crop_bbox, margin), item_transforms(size, resize, crop_pct, "none")
    block = DataBlock(blocks=(ImageBlock,), get_x=get_x, splitter=IndexSplitter([]), item_tfms=item_tfms,
                      batch_tfms=batch_transforms("fastai", stats))
    dls = block.dataloaders(df, bs=bs, num_workers=default_workers() if workers is None else workers, device=device)
    return dls, dls.test_dl(df, bs=bs, shuffle=False, drop_last=False)


def eval_dl(dls, df, bs=None):
    """A loader over every row of `df`, in order, once, with no augmentation (validation transforms); with labels,
    and for a localize `dls` with boxes too (every row then needs one)."""
    return dls.test_dl(df, with_labels=True, bs=bs or dls.bs, shuffle=False, drop_last=False)
