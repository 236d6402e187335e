"""Your own data in class folders: `DIR/train/<class>/*` and `DIR/test/<class>/*`, or one folder of class
folders that is split here, stratified by class and fixed by a seed (a class with one image stays in train).

Class ids follow the sorted class-folder names (1..N); class names are the folder names as they are,
spaces and punctuation kept. Symbolic links are followed. An empty class folder, a class found only in
test, a file that is not an image, a broken link or a link back to a folder above it ends in one clear line."""
import os
import random
from pathlib import Path

from finegrained.errors import UserError
from finegrained.images import IMAGE_SUFFIXES

from .tables import Record
from .walk import refuse_broken, refuse_loop, rglob

DIRNAME = None   # the user's --name
SOURCES = {}     # nothing to download
HOW_TO_GET = "pass the folder with --source DIR: DIR/train/<class>/ and DIR/test/<class>/, or DIR/<class>/ with --test-pct"


def _class_dirs(folder):
    entries = sorted((d for d in Path(folder).iterdir() if not d.name.startswith(".")), key=lambda d: d.name)
    for d in entries:
        refuse_broken(d)
        refuse_loop(d, [os.path.realpath(folder)])
    return [d for d in entries if d.is_dir()]


def _images(class_dir):
    """The class's image files (following links), refusing an empty class folder, a stray non-image file
    or a broken link. Not fastai's get_image_files: it would skip the stray file and keep the broken link without a
    word, and walk a link loop (walk.py says more)."""
    entries = [p for p in rglob(class_dir) if not p.name.startswith(".")]
    for p in entries:
        refuse_broken(p)
    files = [p for p in entries if p.is_file()]
    others = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if others:
        raise UserError(f"{others[0]}: not an image file (expected {', '.join(sorted(IMAGE_SUFFIXES))}); "
                        "move it out of the class folder")
    if not files:
        raise UserError(f"{class_dir}: empty class folder (no images)")
    return files


def find_records(roots, test_pct=None, seed=42):
    if len(roots) != 1:
        raise UserError("--dataset folders takes exactly one --source folder")
    root = Path(roots[0])
    split_dirs = {s: root / s for s in ("train", "test")}
    if all(d.is_dir() for d in split_dirs.values()):
        if test_pct is not None:
            raise UserError(f"{root}: already split into train/ and test/; drop --test-pct")
        classes = {s: {d.name: d for d in _class_dirs(d)} for s, d in split_dirs.items()}
        only_test = sorted(set(classes["test"]) - set(classes["train"]))
        if only_test:
            raise UserError(f"{split_dirs['test'] / only_test[0]}: class {only_test[0]!r} is in test but not in train")
        ids = {name: i + 1 for i, name in enumerate(sorted(classes["train"]))}
        return [Record(split, path, path.relative_to(folder.parent).as_posix(), ids[name], name)
                for split in ("train", "test") for name, folder in classes[split].items() for path in _images(folder)]
    dirs = _class_dirs(root)
    if not dirs:
        raise UserError(f"{root}: no class folders found ({HOW_TO_GET})")
    if test_pct is None:
        raise UserError(f"{root}: one folder of class folders; pass --test-pct (for example 0.2) to split it into "
                        "train and test, or give it train/ and test/ folders")
    rng = random.Random(seed)
    records = []
    for cid, folder in enumerate(dirs, 1):
        files = _images(folder)
        rng.shuffle(files)
        # every class with 2 or more images in both splits; one image stays in train (data.py names the class)
        n_test = min(max(round(len(files) * test_pct), 1), len(files) - 1)
        for k, path in enumerate(files):
            split = "test" if k < n_test else "train"
            records.append(Record(split, path, path.relative_to(root).as_posix(), cid, folder.name))
    return records
