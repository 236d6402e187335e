"""Turn a list of annotated images into `train.csv` and `test.csv` under the dataset folder
(and find a dataset's folder by the files it must hold).

Every image is decoded once (at reduced JPEG scale, so this is quick) so that a missing,
truncated or unreadable file is reported here, by name, rather than in the middle of training."""
import contextlib
import csv
import os
import shutil
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from finegrained.errors import UserError

from finegrained.files import atomic
from finegrained.images import BOX_COLUMNS, load_image

from .progress import track

COLUMNS = ["filename", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class_id", "class_name"]
SPLITS = ("train", "test")


@dataclass
class Record:
    """One image as a layout describes it.

    `source` is where the image is now; `name` is its path under `<dest>/<split>/` when it
    has to be linked or copied in; `bbox` is (x1, y1, x2, y2), 1-based inclusive as in the
    Stanford devkit, or None; `crop_bottom` pixels are cut off the bottom (Aircraft's banner)."""
    split: str
    source: Path
    name: str
    class_id: int
    class_name: str
    bbox: tuple | None = None
    crop_bottom: int = 0


def locate(roots, marker, siblings, dataset, hint):
    """The folder under `roots` holding `marker` and every file in `siblings`, or a clear error."""
    from .walk import rglob
    found = [p for r in map(Path, roots) for p in rglob(r, marker)]
    if not found:
        raise UserError(f"{', '.join(map(str, roots))}: no {dataset} layout found (looked for {marker})\n{hint}")
    folder = found[0].parent
    for name in siblings:
        if not (folder / name).exists():
            raise UserError(f"{folder / name}: missing from the {dataset} folder")
    return folder


def tables_exist(dest):
    return all((Path(dest) / f"{split}.csv").exists() for split in SPLITS)


def check_image(path):
    """Return None if `path` decodes as an image the way training and scoring read it (data.load_image:
    upright, 16-bit scaled, JPEGs at a reduced DCT scale so this is quick), else a one-line reason."""
    try:
        if os.path.getsize(path) == 0:
            return "file is empty (0 bytes)"
        im, _ = load_image(path, draft=lambda width, height: (64, 64))
        im.convert("RGB")
        im.close()
        return None
    except FileNotFoundError:
        return "file is missing"
    except Exception as err:  # PIL raises many types for bad files
        return f"cannot be read as an image ({err})"


def image_problems(paths, workers=None, label=None):
    """For each path, None if it decodes as an image, else a one-line reason (checked in parallel).

    With `label`, progress is shown (how many of how many; see progress.py)."""
    workers = workers or min(os.cpu_count() or 1, 8)
    paths = list(paths)
    with contextlib.ExitStack() as stack:
        if workers > 1 and len(paths) > 200:
            pool = stack.enter_context(ProcessPoolExecutor(workers))
            results = pool.map(check_image, paths, chunksize=64)
        else:
            results = map(check_image, paths)
        return list(track(results, len(paths), label) if label else results)


SHOWN = 20  # an error lists this many unreadable images, then counts the rest


def problems_error(lines, advice, **values):
    """One UserError for all unreadable images at once (scraped data can hold many, and one rerun per file is
    tedious): each `path: why` line up to SHOWN, then a final line with the count and `advice`, a format string
    of `values` whose {them}, {their} and {s} fit the count."""
    one = len(lines) == 1
    more = [f"... and {len(lines) - SHOWN} more"] if len(lines) > SHOWN else []
    advice = advice.format(them="it" if one else "them", their="its" if one else "their", s="" if one else "s", **values)
    count = f"{len(lines)} image{'' if one else 's'} cannot be read"
    return UserError("\n".join([*lines[:SHOWN], *more, f"{count}: {advice}"]))


def _place(record, dest):
    """Put the record's image under `dest` (a link where possible) and return its relative name.

    Only a link already there to this very image is kept: anything else under that name (a link into an
    earlier source, a copy, an earlier crop) is replaced, the new one made under a temporary name first."""
    dest = Path(dest).resolve()
    source = Path(record.source).resolve()
    if not record.crop_bottom and source.is_relative_to(dest):
        return source.relative_to(dest).as_posix()
    target = dest / record.split / record.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if record.crop_bottom or not target.is_symlink() or target.resolve() != source:
        with atomic(target) as tmp:
            tmp.unlink(missing_ok=True)  # left by a killed run: writing through it would change what it points to
            if record.crop_bottom:
                im, _ = load_image(source)
                im = im.convert("RGB") if im.mode not in ("RGB", "L") else im
                im.crop((0, 0, im.width, im.height - record.crop_bottom)).save(tmp, format="JPEG", quality=95)
            else:
                try:
                    os.symlink(source, tmp)
                except OSError:
                    shutil.copy2(source, tmp)
    return target.relative_to(dest).as_posix()


def write_tables(records, dest, workers=None, skip_bad=False):
    """Check every image, place it under `dest`, and write train.csv and test.csv atomically; return the
    records written. Unreadable images stop it, all named in one error, or with `skip_bad` are left out,
    each named on its own line."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        if not any(r.split == split for r in records):
            raise UserError(f"no {split} images were found in the source")
    problems = image_problems([r.source for r in records], workers, "checking images")
    bad = [f"{r.source}: {problem}" for r, problem in zip(records, problems) if problem]
    if bad and not skip_bad:
        raise problems_error(bad, "fix or remove {them}, or pass --skip-bad to leave {them} out")
    for line in bad:
        print(f"skipped: {line}")
    records = [r for r, problem in zip(records, problems) if not problem]
    for split in SPLITS:
        if not any(r.split == split for r in records):
            raise UserError(f"no readable {split} images are left ({len(bad)} skipped)")
    rows = {split: [] for split in SPLITS}
    writes = any(r.crop_bottom for r in records)  # Aircraft: every image is cropped and written, which takes a while
    for r in track(records, len(records), "writing images") if writes else records:
        box = list(r.bbox) if r.bbox is not None else ["", "", "", ""]
        rows[r.split].append([_place(r, dest), *box, r.class_id, r.class_name])
    for split in SPLITS:
        with atomic(dest / f"{split}.csv") as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            writer.writerows(rows[split])
    return records


def split_notes(records):
    """One line for each split that some classes have no images in, naming them with their image counts."""
    names = {r.class_id: r.class_name for r in records}
    totals = Counter(r.class_id for r in records)
    present = {(r.class_id, r.split) for r in records}
    notes = []
    for split, other in (("test", "train"), ("train", "test")):
        left = [c for c in sorted(names) if (c, split) not in present]
        if left:
            listed = ", ".join(f"{names[c]!r} ({totals[c]} image{'s' if totals[c] > 1 else ''})" for c in left)
            one = len(left) == 1
            notes.append(f"note: {len(left)} class{'' if one else 'es'} {'has' if one else 'have'} no {split} images "
                         f"and {'is' if one else 'are'} in {other} only: {listed}")
    return notes


REQUIRED_COLUMNS = ["filename", "class_id"]


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
    paths = [Path(df.attrs["folder"]) / f for f in df["filename"]]
    bad = [f"{name}, row {row}: {path}: {problem}"
           for row, (path, problem) in enumerate(zip(paths, image_problems(paths)), 1) if problem]
    if bad:
        raise problems_error(bad, "fix {them}, or remove {their} row{s} from {table}", table=name)


def class_names(df):
    """{class_id: class_name} in order of class id."""
    pairs = df[["class_id", "class_name"]].drop_duplicates().sort_values("class_id")
    return {int(k): str(v) for k, v in zip(pairs["class_id"], pairs["class_name"])}
