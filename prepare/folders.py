"""Your own data in class folders: `DIR/train/<class>/*` and `DIR/test/<class>/*` (the layout of seeds/003
and /004), or one folder of class folders that is split here, stratified by class and fixed by a seed.

Class ids follow the sorted class-folder names (1..N); class names are the folder names as they are,
spaces and punctuation kept. Symbolic links are followed. An empty class folder, a class found only in
test, or a file that is not an image ends in one clear line."""
import random
from pathlib import Path

from cli import UserError

from .tables import Record
from .walk import rglob

DIRNAME = None   # the user's --name
SOURCES = {}     # nothing to download
HOW_TO_GET = "pass the folder with --source DIR: DIR/train/<class>/ and DIR/test/<class>/, or DIR/<class>/ with --test-pct"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def _class_dirs(folder):
    return sorted((d for d in Path(folder).iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)


def _images(class_dir):
    """The class's image files (following links), refusing an empty class folder or a stray non-image file."""
    files = [p for p in rglob(class_dir) if p.is_file() and not p.name.startswith(".")]
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
        n_test = round(len(files) * test_pct)
        if test_pct > 0 and len(files) >= 2:
            n_test = min(max(n_test, 1), len(files) - 1)  # every class in both splits
        for k, path in enumerate(files):
            split = "test" if k < n_test else "train"
            records.append(Record(split, path, path.relative_to(root).as_posix(), cid, folder.name))
    return records
