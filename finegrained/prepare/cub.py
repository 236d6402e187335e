"""CUB-200-2011 (200 bird species), official train/test split, boxes from bounding_boxes.txt.

CUB boxes are (x, y, width, height) in 0-based pixels; they are stored as the devkit's
1-based inclusive (x1, y1, x2, y2) like every other dataset here."""
from finegrained.errors import UserError

from .fetch import Remote
from .tables import Record, locate

DIRNAME = "cub_200_2011"

SOURCES = {
    "data.caltech.edu (original)": [
        Remote("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz", "CUB_200_2011.tgz",
               md5="97eceeb196236b17998738112f37df78"),
    ],
}

HOW_TO_GET = ("Download CUB_200_2011.tgz from CaltechDATA (record 65de6-vp158) "
              "and pass it (or the folder it unpacks to) with --source.")
FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt", "classes.txt")


def _table(path, width):
    rows = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            parts = line.split(maxsplit=width - 1)
            if len(parts) != width:
                raise UserError(f"{path}, line {n}: expected {width} fields, got {line!r}")
            rows[parts[0]] = parts[1:]
    return rows


def _pretty(folder_name):
    """'001.Black_footed_Albatross' -> 'Black footed Albatross'."""
    return folder_name.split(".", 1)[-1].replace("_", " ")


def find_records(roots):
    base = locate(roots, "image_class_labels.txt", FILES, "CUB-200-2011", HOW_TO_GET)
    images = _table(base / "images.txt", 2)
    labels = _table(base / "image_class_labels.txt", 2)
    is_train = _table(base / "train_test_split.txt", 2)
    boxes = _table(base / "bounding_boxes.txt", 5)
    classes = {k: _pretty(v[0]) for k, v in _table(base / "classes.txt", 2).items()}
    records = []
    for image_id, (rel,) in images.items():
        try:
            cid = int(labels[image_id][0])
            split = "train" if is_train[image_id][0] == "1" else "test"
            x, y, w, h = (float(v) for v in boxes[image_id])
        except KeyError as err:
            raise UserError(f"{base}: image {image_id} ({rel}) has no entry in one of {', '.join(FILES[1:4])} ({err})")
        box = (int(x) + 1, int(y) + 1, int(x + w), int(y + h))
        records.append(Record(split, base / "images" / rel, rel, cid, classes[str(cid)], box))
    return records
