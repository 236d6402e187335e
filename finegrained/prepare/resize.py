"""A resized copy of a prepared dataset, made once, so that training does not decode full-size
JPEGs every epoch.

Each image is shrunk (never enlarged) so that the part training can read is `short_side` px on
its shorter side: the bounding box grown by the --crop-bbox margin, clipped to the image, or the
whole image when there is no box. Whole-image and --crop-bbox training therefore both still see
at least `short_side` px. Boxes are scaled with their images; images that need no shrinking are
linked, not copied. Shrunk copies are written upright (a phone photo's EXIF orientation applied, as
training applies it to every image it reads); boxes are in that upright frame throughout. The copy
is a prepared folder like any other (train.csv, test.csv)."""
import math
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
from PIL import Image

from finegrained.errors import UserError

from finegrained.files import atomic
from finegrained.images import BOX_COLUMNS, BOX_MARGIN, box_region, default_workers, load_image, upright_size

from .progress import track
from .tables import SPLITS, read_table, tables_exist

MIN_SIDE = 32
SAVE_FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "WEBP": "WEBP", "BMP": "BMP", "TIFF": "TIFF"}


def check_side(short_side):
    if short_side < MIN_SIDE:
        raise UserError(f"--resize {short_side}: too small to train on (at least {MIN_SIDE}); give the shorter side in px, e.g. 320")


def folder_name(short_side):
    return f"resized_{short_side}"


def scaled_box(box, scale, width, height):
    """A 1-based inclusive (x1, y1, x2, y2) box on an image scaled by `scale` to width x height, still covering it."""
    x1, y1, x2, y2 = box
    return (math.floor((x1 - 1) * scale) + 1, math.floor((y1 - 1) * scale) + 1,
            min(width, math.ceil(x2 * scale)), min(height, math.ceil(y2 * scale)))


def shrink_one(job):
    """Write one image's shrunk copy (or a link to it) at `target`.

    The copy is written upright (the EXIF orientation applied, no orientation tag) and in RGB or L,
    as training reads it (data.load_image); boxes are in that upright frame before and after. An
    image that needs no shrinking is linked as it is, tag and all: every reader applies the tag.
    Returns (shrunk, box): whether it was shrunk, and its box on the copy (None when it has none);
    or a one-line error."""
    source, target, box, short_side = job
    has_box = box is not None and not any(pd.isna(v) for v in box)
    try:
        with Image.open(source) as im:
            fmt = SAVE_FORMATS.get(im.format, "PNG")
            width, height = upright_size(im)
        left, top, right, bottom = box_region(width, height, box if has_box else None, BOX_MARGIN)
        scale = min(1.0, short_side / max(1.0, min(right - left, bottom - top)))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        if scale < 1 and not target.exists():
            im, _ = load_image(source, draft=lambda w, h: size)  # JPEG: decoded at the smallest DCT scale still >= size
            im = im if im.mode in ("RGB", "L") else im.convert("RGB")
            small = im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
            with atomic(target) as tmp:
                small.save(tmp, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))  # WebP: 80 by default
    except Exception as err:  # PIL raises many types for bad files
        return f"{source}: cannot be resized ({err})"
    if scale == 1 and not target.exists():
        with atomic(target) as tmp:
            try:
                os.symlink(Path(source).resolve(), tmp)
            except OSError:
                shutil.copy2(source, tmp)
    return scale < 1, (scaled_box(box, scale, *size) if has_box else None)


def resize_copy(folder, short_side, workers=None):
    """Write `<folder>/resized_<short_side>/` with train.csv, test.csv and the shrunk images; return that folder.

    Interrupted runs resume: images already written are kept, and the CSVs are written last."""
    folder = Path(folder)
    dest = folder / folder_name(short_side)
    if tables_exist(dest):
        print(f"{dest}: already made (delete its train.csv and test.csv to make it again)")
        return dest
    check_side(short_side)
    tables = {split: read_table(folder / f"{split}.csv") for split in SPLITS}
    jobs = []
    for split, df in tables.items():
        boxes = df[BOX_COLUMNS].itertuples(index=False, name=None) if set(BOX_COLUMNS) <= set(df.columns) else [None] * len(df)
        for name, box in zip(df["filename"], boxes):
            target = Path(os.path.normpath(dest / name))  # not resolve(): a linked image points elsewhere by design
            if not target.is_relative_to(dest):
                raise UserError(f"{folder / f'{split}.csv'}: filename {name!r} points outside the dataset folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            jobs.append((folder / name, target, box, short_side))
    workers = workers or default_workers()
    label = f"resizing to {short_side} px"
    if workers > 1 and len(jobs) > 100:
        with ProcessPoolExecutor(workers) as pool:
            results = list(track(pool.map(shrink_one, jobs, chunksize=32), len(jobs), label))
    else:
        results = list(track(map(shrink_one, jobs), len(jobs), label))
    for result in results:
        if isinstance(result, str):
            raise UserError(result)
    start = 0
    for split, df in tables.items():
        done, start = results[start:start + len(df)], start + len(df)
        if set(BOX_COLUMNS) <= set(df.columns):
            boxes = [box or (None,) * 4 for _, box in done]
            df[BOX_COLUMNS] = pd.DataFrame(boxes, index=df.index, dtype="Int64")  # whole px; empty where none
        with atomic(dest / f"{split}.csv") as tmp:
            df.to_csv(tmp, index=False)
    shrunk = sum(shrunk for shrunk, _ in results)
    print(f"{dest}: {len(results)} images, {shrunk} shrunk so the box region is {short_side} px on its shorter side, "
          f"{len(results) - shrunk} linked (already that small)")
    return dest
