"""Data: prepare a fine-grained dataset into train.csv/test.csv, and build fastai DataLoaders from them.

    python data.py --dataset cars --root data                  # download (tries every known source)
    python data.py --dataset cars --root data --source DIR     # files you already have, any layout
    python data.py --dataset cars --root data --resize 320     # also a copy shrunk for fast training
    python data.py --dataset folders --source DIR --name NAME [--test-pct 0.2]   # your own class folders
    python data.py ... --skip-bad                              # leave unreadable images out, each named

The CSVs have the columns `filename` (relative to the CSV's folder), `bbox_x1..bbox_y2`
(1-based, empty when the layout has no boxes; in pixels of the image as viewers show it, its EXIF
orientation applied), `class_id` and `class_name`. Every image is read through `load_image`."""
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import ExifTags, Image, ImageOps

import cli
from cli import UserError

IMAGENET_STATS = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
REQUIRED_COLUMNS = ["filename", "class_id"]
BOX_COLUMNS = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"]
BOX_MARGIN = 0.16  # --crop-bbox grows each box by this fraction of its size on every side


# ---------------------------------------------------------------- preparation

def prepare(dataset, root, sources=(), remotes=None, workers=None, name=None, test_pct=None, seed=42, skip_bad=False):
    """Write `<root>/<dataset dir>/train.csv` and `test.csv`; return that folder.

    `sources`: folders or archives the user has; none means download. `remotes` overrides
    the dataset's download sources ({name: [Remote, ...]}), for mirrors and tests. For `folders`
    (a user's own class folders): `name` is the dataset folder's name, and `test_pct` splits one
    folder of class folders into train and test, stratified by class, fixed by `seed`. Unreadable images stop it,
    all named in one error; with `skip_bad` they are left out of the tables, each named."""
    from prepare import DATASETS
    from prepare.fetch import DownloadError, extract, fetch_source, is_archive
    from prepare.tables import split_notes, tables_exist, write_tables

    module = DATASETS[dataset]
    if dataset == "folders":
        if not name or Path(name).name != name or name in (".", ".."):
            raise UserError("--dataset folders needs --name NAME, a plain folder name for the prepared dataset")
        if not sources:
            raise UserError("--dataset folders needs --source DIR, your folder of class folders")
        if test_pct is not None and not 0 < test_pct < 1:
            raise UserError(f"--test-pct must be between 0 and 1, got {test_pct}")
    elif name or test_pct is not None:
        raise UserError("--name and --test-pct are for --dataset folders")
    dest = Path(root) / (name if dataset == "folders" else module.DIRNAME)
    if tables_exist(dest):
        print(f"{dest}: already prepared (delete train.csv and test.csv to prepare again)")
        return dest
    roots = []
    for source in map(Path, sources):
        if source.is_dir():
            roots.append(source)
        elif is_archive(source):
            raw = dest / "raw" / source.name
            extract(source, raw)
            roots.append(raw)
        elif source.exists():
            raise UserError(f"{source}: --source must be a folder or a .tar/.tgz/.zip archive")
        else:
            raise UserError(f"{source}: no such file or folder")
    if not roots:
        failures = []
        for name, files in (remotes or module.SOURCES).items():
            raw = dest / "raw" / _slug(name)
            try:
                fetch_source(files, Path(root) / "downloads", raw)
                roots = [raw]
                break
            except DownloadError as err:
                failures.append(f"  - {name}: {err}")
        else:
            raise UserError("could not download the dataset; tried:\n" + "\n".join(failures) + "\n" + module.HOW_TO_GET)
    records = module.find_records(roots, test_pct, seed) if dataset == "folders" else module.find_records(roots)
    kept = write_tables(records, dest, workers, skip_bad)
    counts = Counter(r.split for r in kept)
    print(f"{dest}: {counts['train']} train and {counts['test']} test images, "
          f"{len({r.class_id for r in kept})} classes")
    for note in split_notes(kept):
        print(note)
    if len(kept) < len(records):
        skipped = len(records) - len(kept)
        print(f"skipped {skipped} unreadable image{'s' if skipped > 1 else ''} (listed above)")
    return dest


def _slug(text):
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")[:40]


# ---------------------------------------------------------------- reading tables

def read_table(path):
    """Read a prepared CSV, checking its columns, with one clear error for each kind of bad file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file (prepare the data first: python data.py --help)")
    try:
        df = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"class_id": str})
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: the CSV is empty")
    except Exception as err:
        raise UserError(f"{path}: not a readable CSV ({err})")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(map(str, df.columns))})")
    if df.empty:
        raise UserError(f"{path}: the CSV has no rows")
    _check_cells(df, path)
    df["class_id"] = pd.to_numeric(df["class_id"]).astype(int)
    if "class_name" not in df.columns:
        df["class_name"] = df["class_id"].astype(str)
    df["filename"] = df["filename"].astype(str)
    df.attrs["folder"] = str(path.parent)
    return df


def _check_cells(df, path):
    """Stop at the first row (1-based, after the header) whose class_id is empty or not a whole number,
    or whose box is partly filled or not numbers."""
    ids = pd.to_numeric(df["class_id"], errors="coerce")
    bad = df["class_id"].isna() | ids.isna() | (ids % 1 != 0)
    if bad.any():
        i = int(bad.to_numpy().argmax())
        value = df["class_id"].iloc[i]
        problem = ("is empty" if pd.isna(value) else f"{value!r} is not a number" if pd.isna(ids.iloc[i])
                   else f"{value!r} is not a whole number")
        raise UserError(f"{path}, row {i + 1}: class_id {problem}")
    boxes = [c for c in BOX_COLUMNS if c in df.columns]
    if not boxes:
        return
    if len(boxes) < len(BOX_COLUMNS):
        raise UserError(f"{path}: has {', '.join(boxes)} but not all of {', '.join(BOX_COLUMNS)}")
    numbers = df[BOX_COLUMNS].apply(pd.to_numeric, errors="coerce")
    empty = df[BOX_COLUMNS].isna()
    bad = (numbers.isna() & ~empty).any(axis=1) | (empty.any(axis=1) & ~empty.all(axis=1))
    if bad.any():
        i = int(bad.to_numpy().argmax())
        cells = ", ".join(f"{c}={'' if pd.isna(v) else v}" for c, v in df[BOX_COLUMNS].iloc[i].items())
        raise UserError(f"{path}, row {i + 1}: a box needs four numbers or four empty cells ({cells})")


def check_table_images(df, name):
    """Stop, naming the row and file of every image in `df` that is missing or does not decode."""
    from prepare.tables import image_problems, problems_error
    paths = [Path(df.attrs["folder"]) / f for f in df["filename"]]
    bad = [f"{name}, row {row}: {path}: {problem}"
           for row, (path, problem) in enumerate(zip(paths, image_problems(paths)), 1) if problem]
    if bad:
        raise problems_error(bad, "fix {them}, or remove {their} row{s} from {table}", table=name)


def class_names(df):
    """{class_id: class_name} in order of class id."""
    pairs = df[["class_id", "class_name"]].drop_duplicates().sort_values("class_id")
    return {int(k): str(v) for k, v in zip(pairs["class_id"], pairs["class_name"])}


# ---------------------------------------------------------------- images

def load_image(path, draft=None):
    """(image, (width, height)): the image at `path` decoded as viewers show it, and its full size.

    Every image the project reads goes through here (training, scoring, the preparation check, the
    `--resize` copy, Aircraft's banner crop), so all of them see the same pixels:
    - the EXIF orientation is applied (PIL.ImageOps.exif_transpose): a phone photo stored sideways
      with the tag 'rotate 90°' comes out upright, and (width, height) is the upright size.
      Bounding boxes are in this upright frame, the image as viewers display it; the datasets'
      own images carry no orientation tag, so for them both frames are the same;
    - 16-bit images (mode 'I;16*', or 'I' holding values above 255, as 16-bit PNG, TIFF and PGM
      open) are scaled to 8 bits (>> 8), not clipped to white; 'I' images with values up to 255
      are taken as they are;
    - `draft(width, height) -> (w, h)`, given the upright full size, lets a JPEG be decoded at the
      smallest DCT scale that still gives at least w x h pixels of the upright image (PIL's
      draft mode); other formats are decoded at full size.
    Any other mode is left as stored (L, RGB, RGBA, P, CMYK, ...): `.convert("RGB")` maps each faithfully."""
    im = Image.open(path)
    try:
        if draft is not None and im.format == "JPEG":
            full = upright_size(im)
            want = tuple(draft(*full))
            im.draft(im.mode, want[::-1] if _turned(im) else want)
        else:
            full = None
        ImageOps.exif_transpose(im, in_place=True)  # also loads the pixels
    except BaseException:
        im.close()
        raise
    if full is None:
        full = im.size
    if im.mode.startswith("I;16") or (im.mode == "I" and im.getextrema()[1] > 255):
        im = Image.fromarray((np.asarray(im).clip(0, 65535) >> 8).astype(np.uint8), "L")
    elif im.mode == "I":
        im = im.convert("L")
    return im, full


def _turned(im):
    """Whether the image's EXIF orientation turns it a quarter (5-8), swapping width and height."""
    return im.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)


def upright_size(im):
    """(width, height) of an opened image as viewers show it (its EXIF orientation applied), from the
    header alone: the pixels are not decoded."""
    return im.size[::-1] if _turned(im) else im.size


def open_image(path, size=None, box=None, margin=0.0):
    """Open an image as RGB, upright (see load_image), optionally cropped to `box` (1-based x1,y1,x2,y2)
    grown by `margin` on every side, the box being in the upright frame.

    With `size`, JPEGs are decoded at the smallest DCT scale that still leaves the region at
    least `size` pixels on each side (PIL's draft mode): the DataLoader workers ran 1.5-2.2x faster
    on 300-1000 px images at 299-128 px (benchmarks/README.md), and the pixels after the resize
    that follows are nearly the same."""
    def draft(width, height):
        left, top, right, bottom = box_region(width, height, box, margin)
        rw, rh = max(right - left, 1), max(bottom - top, 1)
        return math.ceil(size * width / rw), math.ceil(size * height / rh)

    im, (width, height) = load_image(path, draft if size else None)
    region = box_region(width, height, box, margin)
    if region != (0, 0, width, height):
        sx, sy = im.size[0] / width, im.size[1] / height
        im = im.crop((int(region[0] * sx), int(region[1] * sy), math.ceil(region[2] * sx), math.ceil(region[3] * sy)))
    return im.convert("RGB")


def box_region(width, height, box=None, margin=0.0):
    """The pixel region (left, top, right, bottom) that `box` (1-based x1,y1,x2,y2) grown by `margin` covers,
    clipped to the image; the whole image when there is no box."""
    if box is None or any(pd.isna(v) for v in box):
        return (0, 0, width, height)
    x1, y1, x2, y2 = box
    mx, my = margin * (x2 - x1 + 1), margin * (y2 - y1 + 1)
    return (max(0, x1 - 1 - mx), max(0, y1 - 1 - my), min(width, x2 + mx), min(height, y2 + my))


class ImageReader:
    """fastai `get_x`: a CSV row to an RGB PILImage, cropped to its box when asked."""

    def __init__(self, folder, size=None, crop_bbox=False, margin=BOX_MARGIN):
        self.folder, self.size, self.crop_bbox, self.margin = Path(folder), size, crop_bbox, margin

    def __call__(self, row):
        from fastai.vision.core import PILImage
        box = tuple(row[c] for c in BOX_COLUMNS) if self.crop_bbox and BOX_COLUMNS[0] in row.index else None
        return PILImage(open_image(self.folder / row["filename"], self.size, box, self.margin))


# ---------------------------------------------------------------- DataLoaders

def default_workers():
    return min(os.cpu_count() or 1, 16)


CROP_PAD = 8  # augment = "flip_crop": px of zero padding around the image before the random crop (the ResNet50-448 write-up)


def presize(size, crop_pct=1.0):
    """The size images are resized to before a crop of `size` keeps `crop_pct` of each side (timm's crop_pct)."""
    return round(size / crop_pct)


# the recipes' resize names -> fastai's ResizeMethod values. fastai spells squash "squish", and takes any other
# string as a crop without a word: Resize(method="squash") silently centre-cropped until this mapping
FASTAI_RESIZE = {"crop": "crop", "squash": "squish", "pad": "pad"}


def fastai_resize(resize):
    """fastai's ResizeMethod value for a recipe's `resize` (crop, squash or pad)."""
    if resize not in FASTAI_RESIZE:
        raise UserError(f"unknown resize {resize!r}: use one of {', '.join(FASTAI_RESIZE)}")
    return FASTAI_RESIZE[resize]


def item_transforms(size, resize="crop", crop_pct=1.0, augment="fastai"):
    """fastai item transforms: resize to size / crop_pct by `resize` (fastai's crop, squash or pad), then, with
    crop_pct < 1 or the flip_crop augmentation, a crop to `size`: random in training, the centre when scoring
    (fastai's RandomCrop). flip_crop pads CROP_PAD px first and flips half the training images."""
    from fastai.vision.all import CropPad, FlipItem, RandomCrop, RandomResizedCrop, Resize
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
    from fastai.vision.all import Normalize, aug_transforms
    return [*(aug_transforms() if augment == "fastai" else []), Normalize.from_stats(*stats)]


def get_dls(train_csv, size=224, bs=32, valid_pct=0.0, seed=42, crop_bbox=False, margin=BOX_MARGIN,
            balance=False, augment="fastai", workers=None, device=None, stats=IMAGENET_STATS, draft=True,
            resize="crop", crop_pct=1.0, head="concat"):
    """fastai DataLoaders for a prepared train.csv.

    Labels are the class ids, so the model's classes are in class-id order. `augment`: "fastai" is fastai's
    default (flip, rotate 10°, zoom 1.1, lighting 0.2, warp 0.2) run on the batch, on the GPU when there is one;
    "flip_crop" a horizontal flip and a padded random crop; "none" (or False) nothing. Then ImageNet normalization.
    `valid_pct=0` trains on all rows. `draft=False` decodes every JPEG at full size (only to measure what draft
    decoding saves).

    `head="localize"`: batches are (image, box, class), the box moving with the image through the resize and
    the augmentation (fastai's BBoxBlock; boxes.localize_block). Every row needs a box, and the whole image is read
    at full size (a box crop or draft decoding would put the boxes in another frame)."""
    from fastai.vision.all import CategoryBlock, ColReader, DataBlock, ImageBlock, IndexSplitter, RandomSplitter
    import fastai.callback.data  # noqa: F401  (adds DataBlock.weighted_dataloaders)

    augment = {True: "fastai", False: "none"}.get(augment, augment)
    df = train_csv if isinstance(train_csv, pd.DataFrame) else read_table(train_csv)
    name = str(Path(df.attrs.get("folder", ".")) / "train.csv")
    if crop_bbox and (not set(BOX_COLUMNS) <= set(df.columns) or df[BOX_COLUMNS].isna().all().all()):
        raise UserError(f"{df.attrs.get('folder', 'train.csv')}: --crop-bbox needs bounding boxes, and this dataset has none")
    splitter = RandomSplitter(valid_pct, seed) if valid_pct else IndexSplitter([])
    kwargs = dict(bs=bs, num_workers=default_workers() if workers is None else workers, device=device)
    if head == "localize":
        from boxes import localize_block, one_box_per_image, require_boxes
        check_localize(crop_bbox, resize, crop_pct, augment)
        require_boxes(df, name)
        block = localize_block(ImageReader(df.attrs["folder"]), size, batch_transforms(augment, stats), splitter,
                               method=fastai_resize(resize))
        # weighted_dataloaders drops the block's dls_kwargs, so the single-box collation is passed to it by hand
        kwargs["before_batch"] = one_box_per_image
    else:
        block = DataBlock(blocks=(ImageBlock, CategoryBlock),
                          get_x=ImageReader(df.attrs["folder"], presize(size, crop_pct) if draft else None, crop_bbox, margin),
                          get_y=ColReader("class_id"), splitter=splitter,
                          item_tfms=item_transforms(size, resize, crop_pct, augment),
                          batch_tfms=batch_transforms(augment, stats))
    if balance:  # each class drawn equally often: weights from the class counts of the training part alone
        train_classes = df["class_id"].iloc[list(splitter(df)[0])]
        counts = df["class_id"].map(train_classes.value_counts()).fillna(1.0)  # a class only in validation: unused
        return block.weighted_dataloaders(df, wgts=(1.0 / counts).to_numpy(), **kwargs)
    return block.dataloaders(df, **kwargs)


def dls_args(recipe):
    """get_dls's keywords from a resolved recipe: `get_dls(table, size, bs, **dls_args(recipe))`."""
    return {"valid_pct": recipe["valid_pct"], "seed": recipe["seed"], "crop_bbox": recipe["crop_bbox"],
            "margin": recipe["bbox_margin"], "balance": recipe["balance"], "augment": recipe["augment"],
            "resize": recipe["resize"], "crop_pct": recipe["crop_pct"], "head": recipe["head"]}


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
    from fastai.vision.all import Resize
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
    from fastai.vision.all import DataBlock, ImageBlock, IndexSplitter, PadMode, Resize
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


# ---------------------------------------------------------------- command line

def main(argv=None):
    from prepare import DATASETS
    p = cli.parser("Prepare a fine-grained dataset: download it, or import files you have, into train.csv and test.csv.")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="cars",
                   help="cars: Stanford Cars (196); aircraft: FGVC-Aircraft variants (100); cub: CUB-200-2011 (200); "
                        "folders: your own class folders (--source DIR --name NAME)")
    p.add_argument("--root", default="data", help="folder under which the dataset folder is made")
    p.add_argument("--source", action="append", default=[],
                   help="a folder or archive you already have (repeatable); without it the data is downloaded")
    p.add_argument("--name", default=None, help="--dataset folders: the prepared dataset's folder name under --root")
    p.add_argument("--test-pct", type=float, default=None,
                   help="--dataset folders, one folder of class folders: the share of each class held out as test")
    p.add_argument("--seed", type=int, default=42, help="--dataset folders: the seed of the --test-pct split")
    p.add_argument("--resize", type=int, default=None, metavar="PX",
                   help="also write <dataset>/resized_PX/, a copy whose images are shrunk once so that their box region "
                        "(the whole image without boxes) is PX on its shorter side; train on it with --data for speed "
                        "(320 suits the recipe's 299 px)")
    p.add_argument("--workers", type=int, default=None, help="processes used to check and resize the images")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave unreadable images (missing, empty, truncated, not an image) out of the tables, each named, "
                        "instead of stopping")
    args = p.parse_args(argv)
    from prepare.resize import check_side, resize_copy
    if args.resize is not None:
        check_side(args.resize)  # before a long download, not after
    dest = prepare(args.dataset, args.root, args.source, workers=args.workers, name=args.name, test_pct=args.test_pct,
                   seed=args.seed, skip_bad=args.skip_bad)
    if args.resize is not None:
        dest = resize_copy(dest, args.resize, args.workers)
        print(f"train on it with: python run.py --data {dest}")


if __name__ == "__main__":
    cli.run(main)
