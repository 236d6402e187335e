"""FGVC-Aircraft 2013b at variant level (100 classes), official trainval/test split.

Every image carries a ~20 px copyright banner at the bottom; it is cropped off here, once,
when the image is placed in the dataset folder, so training and scoring never see it."""
from finegrained.errors import UserError

from .fetch import Remote
from .tables import Record, locate

DIRNAME = "fgvc_aircraft"
BANNER_PX = 20

SOURCES = {
    "robots.ox.ac.uk (original)": [
        Remote("https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",
               "fgvc-aircraft-2013b.tar.gz", md5="d4acdd33327262359767eeaa97a4f732"),
    ],
}

HOW_TO_GET = ("Download fgvc-aircraft-2013b.tar.gz from the FGVC-Aircraft page of the Oxford VGG group "
              "and pass it (or the folder it unpacks to) with --source.")


def _lines(path):
    """'ID rest of line' pairs of an Aircraft annotation file (names may contain spaces)."""
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            parts = line.split(" ", 1)
            if len(parts) != 2:
                raise UserError(f"{path}, line {n}: expected 'IMAGE_ID VALUE', got {line!r}")
            pairs.append((parts[0], parts[1].strip()))
    return pairs


def find_records(roots):
    data = locate(roots, "images_variant_trainval.txt", ("variants.txt", "images_variant_test.txt", "images_box.txt"),
                  "FGVC-Aircraft", HOW_TO_GET)
    variants = [v for v in (data / "variants.txt").read_text().splitlines() if v.strip()]
    ids = {v: i + 1 for i, v in enumerate(variants)}
    boxes = {}
    for image_id, rest in _lines(data / "images_box.txt"):
        boxes[image_id] = tuple(int(float(v)) for v in rest.split())
    records = []
    for split, listing in (("train", "images_variant_trainval.txt"), ("test", "images_variant_test.txt")):
        for image_id, variant in _lines(data / listing):
            if variant not in ids:
                raise UserError(f"{data / listing}: variant {variant!r} of image {image_id} is not in variants.txt")
            box = boxes.get(image_id)
            records.append(Record(split, data / "images" / f"{image_id}.jpg", f"{image_id}.jpg", ids[variant], variant,
                                  box, crop_bottom=BANNER_PX))
    return records
