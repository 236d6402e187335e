"""Stanford Cars (196 classes): where it can be downloaded today, and its four layouts in the wild.

Layouts (found without the user naming one):
- original / torchvision: cars_train/, cars_test/, devkit/*.mat, cars_test_annos_withlabels.mat
- Kaggle: the same with nested cars_train/cars_train/ and cars_test/cars_test/
- all-in-one: car_ims/ with cars_annos.mat (a `test` flag per image)
- class folders: train/<class name>/*.jpg and test/<class name>/*.jpg (no boxes)
Train and test images are numbered independently, so an image is never looked up by bare name across splits."""
import re
from pathlib import Path

from finegrained.errors import UserError
from finegrained.images import BOX_COLUMNS, IMAGE_SUFFIXES

from .fetch import Remote
from .mat import load_struct
from .tables import Record
from .walk import rglob

DIRNAME = "stanford_cars"
N_CLASSES = 196

# Tried in order. The Stanford links answer 404 since 2023 but are kept first in case they return.
SOURCES = {
    "stanford.edu (original)": [
        Remote("https://ai.stanford.edu/~jkrause/cars/car_devkit.tgz", "car_devkit.tgz", md5="c3b158d763b6e2245038c8ad08e45376"),
        Remote("https://ai.stanford.edu/~jkrause/car196/cars_train.tgz", "cars_train.tgz", md5="065e5b463ae28d29e77c1b4b166cfe61"),
        Remote("https://ai.stanford.edu/~jkrause/car196/cars_test.tgz", "cars_test.tgz", md5="4ce7ebf6a94d07f1952d94dd34c4d501"),
        Remote("https://ai.stanford.edu/~jkrause/car196/cars_test_annos_withlabels.mat", "cars_test_annos_withlabels.mat",
               md5="b0a2b23655a3edd16d84508592a98d10"),
    ],
    "imagenet.stanford.edu (all-in-one)": [
        Remote("http://imagenet.stanford.edu/internal/car196/car_ims.tgz", "car_ims.tgz"),
        Remote("http://imagenet.stanford.edu/internal/car196/cars_annos.mat", "cars_annos.mat"),
    ],
    "GitHub cyizhuo/Stanford-Cars-dataset (class folders)": [
        Remote("https://github.com/cyizhuo/Stanford-Cars-dataset/archive/refs/heads/main.zip", "Stanford-Cars-dataset-main.zip"),
    ],
}

HOW_TO_GET = """Stanford Cars can no longer be downloaded from Stanford. Get a copy by hand and pass it with --source:
  - Kaggle: kaggle datasets download jessicali9530/stanford-cars-dataset (images), plus the devkit
    car_devkit.tgz attached to github.com/pytorch/vision/issues/7545 and cars_test_annos_withlabels.mat;
  - Kaggle or GitHub: cyizhuo/stanford-cars-by-classes-folder (class folders, no boxes);
  - any folder or archives in the original, torchvision, Kaggle, all-in-one or class-folder layout."""


def class_names_builtin():
    return (Path(__file__).with_name("cars_classes.txt")).read_text().splitlines()


def _key(name):
    """Compare class names as folder names mangle them: 'Ram C/V' may be 'Ram C-V' or 'Ram CV'."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _find(roots, name, want_dir=False):
    found = []
    for root in roots:
        if root.name == name and root.is_dir() == want_dir:
            found.append(root)
        found += [p for p in rglob(root, name) if p.is_dir() == want_dir]
    return sorted(found, key=lambda p: len(p.parts))


def _one(roots, name, want_dir=False):
    found = _find(roots, name, want_dir)
    return found[0] if found else None


def _images_dir(roots, dirname, first_fname):
    """The folder named `dirname` that holds `first_fname` (handles Kaggle's cars_train/cars_train)."""
    candidates = _find(roots, dirname, want_dir=True)
    for d in candidates:
        if (d / first_fname).exists():
            return d
    if candidates:
        raise UserError(f"{candidates[0]}: image {first_fname} named in the annotations is missing")
    raise UserError(f"no '{dirname}' folder was found next to the annotations")


def _box(ann, i):
    return tuple(int(ann[f][i]) for f in BOX_COLUMNS)


def _class_names(roots):
    meta = _one(roots, "cars_meta.mat")
    if meta is None:
        return class_names_builtin()
    return [str(n) for n in load_struct(meta, "class_names", [])]


def _check_class(path, i, class_id):
    if not 1 <= class_id <= N_CLASSES:
        raise UserError(f"{path}: annotation {i + 1} has class {class_id}, expected 1..{N_CLASSES}")
    return class_id


def _devkit_records(roots, train_annos):
    names = _class_names(roots)
    test_annos = _one(roots, "cars_test_annos_withlabels.mat")
    if test_annos is None:
        raise UserError("found the devkit but not cars_test_annos_withlabels.mat (the test labels); "
                        "add it to --source (it is in torchvision's layout and on Kaggle)")
    records = []
    for split, mat, dirname in (("train", train_annos, "cars_train"), ("test", test_annos, "cars_test")):
        ann = load_struct(mat, "annotations", BOX_COLUMNS + ["class", "fname"])
        folder = _images_dir(roots, dirname, str(ann["fname"][0]))
        for i, fname in enumerate(ann["fname"]):
            cid = _check_class(mat, i, int(ann["class"][i]))
            records.append(Record(split, folder / str(fname), str(fname), cid, names[cid - 1], _box(ann, i)))
    return records


def _all_in_one_records(roots, annos):
    ann = load_struct(annos, "annotations", BOX_COLUMNS + ["class", "relative_im_path", "test"])
    names = [str(n) for n in load_struct(annos, "class_names", [])]
    car_ims = _one(roots, "car_ims", want_dir=True)
    records = []
    for i, rel in enumerate(ann["relative_im_path"]):
        cid = _check_class(annos, i, int(ann["class"][i]))
        split = "test" if int(ann["test"][i]) else "train"
        path = car_ims.parent / str(rel)
        records.append(Record(split, path, Path(str(rel)).name, cid, names[cid - 1], _box(ann, i)))
    return records


def _class_folder_records(roots, split_dirs):
    names = _class_names(roots)
    ids = {_key(n): i + 1 for i, n in enumerate(names)}
    records = []
    for split, folder in split_dirs.items():
        for class_dir in sorted(d for d in folder.iterdir() if d.is_dir()):
            key = _key(class_dir.name)
            cid = ids.get(key) or ids.get(_key(re.sub(r"^\d+[ ._-]+", "", class_dir.name)))
            if cid is None:
                raise UserError(f"{class_dir}: folder name is not a Stanford Cars class")
            for img in sorted(class_dir.iterdir()):
                if img.suffix.lower() in IMAGE_SUFFIXES:
                    records.append(Record(split, img, f"{class_dir.name}/{img.name}", cid, names[cid - 1]))
    return records


def _class_folder_splits(roots):
    """{'train': dir, 'test': dir} where both hold class subfolders of images, else None."""
    for root in roots:
        for parent in [root, *[p for p in rglob(root) if p.is_dir() and len(p.relative_to(root).parts) <= 2]]:
            dirs = {s: parent / s for s in ("train", "test")}
            if all(d.is_dir() and any(c.is_dir() for c in d.iterdir()) for d in dirs.values()):
                return dirs
    return None


def find_records(roots):
    """Detect the layout under `roots` (folders) and return its Records."""
    roots = [Path(r) for r in roots]
    annos = _one(roots, "cars_annos.mat")
    if annos is not None and _one(roots, "car_ims", want_dir=True) is not None:
        return _all_in_one_records(roots, annos)
    train_annos = _one(roots, "cars_train_annos.mat")
    if train_annos is not None:
        return _devkit_records(roots, train_annos)
    splits = _class_folder_splits(roots)
    if splits is not None:
        return _class_folder_records(roots, splits)
    if annos is not None:
        raise UserError(f"{annos}: found cars_annos.mat but neither its car_ims/ folder nor the devkit's cars_train_annos.mat")
    raise UserError(f"{', '.join(map(str, roots))}: no Stanford Cars layout found (looked for cars_annos.mat, "
                    "devkit/cars_train_annos.mat, or train/ and test/ class folders)\n" + HOW_TO_GET)
