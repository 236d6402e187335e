"""Generate small Stanford-Cars-format datasets for tests, the demo and the benchmark.

Each image is a toy car on a noisy background: body colour, size and position are random; the
class is told only by small details (roof shape and window tint, wheel colour, a side stripe), so the set is
fine-grained but learnable. Files are real: JPEGs of varied sizes (some grayscale), `.mat`
annotations written with scipy.io.savemat, in each layout the data section of README.md lists.

    python tools/synth.py --out DIR [--layout original|kaggle|all_in_one|class_folders] [--classes 6]"""
import argparse
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image, ImageDraw

LAYOUTS = ("original", "kaggle", "all_in_one", "class_folders")
WHEEL_COLOURS = [(20, 20, 20), (230, 230, 230), (220, 180, 30), (200, 30, 30)]


@dataclass
class Sample:
    """One generated image, drawn when written (so that large sets need not fit in memory)."""
    split: str
    number: int          # per-split number, as in the devkit (train and test numbered independently)
    class_id: int        # 1-based
    width: int
    height: int
    grayscale: bool
    seed: tuple

    def draw(self):
        """(image, bbox): the same every time; bbox is 1-based inclusive x1, y1, x2, y2."""
        return draw_car(np.random.default_rng(self.seed), self.class_id, self.width, self.height, self.grayscale)


def class_names(n):
    names = (Path(__file__).resolve().parent.parent / "finegrained" / "prepare" / "cars_classes.txt").read_text().splitlines()
    return names[:n]


def draw_car(rng, class_id, width, height, grayscale=False):
    """One toy car of class `class_id` (1-based); returns the image and its bounding box."""
    k = class_id - 1
    noise = rng.integers(115, 175, size=(height, width, 3), dtype=np.uint8)
    im = Image.fromarray(noise)
    d = ImageDraw.Draw(im)
    bw, bh = int(width * rng.uniform(0.5, 0.7)), int(height * rng.uniform(0.3, 0.4))
    margin = int(0.08 * width)
    x1 = int(rng.integers(margin, width - bw - margin)); y1 = int(rng.integers(bh // 2 + 2, height - bh - bh // 2))
    body = tuple(int(c) for c in rng.integers(60, 200, 3))  # never as dark, light or saturated as a wheel
    d.rectangle([x1, y1, x1 + bw, y1 + bh], fill=body)
    roof_h = bh // 2
    if k % 2 == 0:   # sedan roof: a trapezoid; otherwise a boxy van roof
        d.polygon([(x1 + bw // 4, y1), (x1 + bw // 3, y1 - roof_h), (x1 + 2 * bw // 3, y1 - roof_h), (x1 + 3 * bw // 4, y1)], fill=body)
    else:
        d.rectangle([x1 + bw // 8, y1 - roof_h, x1 + 7 * bw // 8, y1], fill=body)
    window = (170, 225, 255) if k % 2 == 0 else (45, 45, 70)  # clear or tinted glass, with the roof
    d.rectangle([x1 + 3 * bw // 8, y1 - roof_h * 3 // 4, x1 + 5 * bw // 8, y1 - 1], fill=window)
    wheel = WHEEL_COLOURS[(k // 2) % len(WHEEL_COLOURS)]
    r = max(int(bh / 2.4), 2)
    for cx in (x1 + bw // 5, x1 + 4 * bw // 5):
        d.ellipse([cx - r, y1 + bh - r, cx + r, y1 + bh + r], fill=wheel)
    if (k // 8) % 2:  # a side stripe tells the next eight classes apart
        d.rectangle([x1, y1 + bh // 2 - 1, x1 + bw, y1 + bh // 2 + 1], fill=(255 - body[0], 255 - body[1], 255 - body[2]))
    box = (x1 + 1, y1 - roof_h + 1, min(x1 + bw + 1, width), min(y1 + bh + r + 1, height))
    return (im.convert("L") if grayscale else im), box


def make_samples(n_classes=6, train_per_class=20, test_per_class=10, min_size=64, max_size=160, seed=0, totals=None):
    """`per_class` images of each class in each split, or, with `totals` = (train, test), that many spread over the classes."""
    rng = np.random.default_rng(seed)
    samples = []
    counts = totals or (train_per_class * n_classes, test_per_class * n_classes)
    for split, total in zip(("train", "test"), counts):
        ids = sorted(i % n_classes + 1 for i in range(total))
        random.Random(seed + len(split)).shuffle(ids)
        for number, cid in enumerate(ids, 1):
            w = int(rng.integers(min_size, max_size + 1)); h = int(w * rng.uniform(0.75, 0.95))
            samples.append(Sample(split, number, cid, w, max(h, 48), number % 7 == 0, (seed, len(split), number)))
    return samples


def _struct(rows, fields):
    arr = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for i, row in enumerate(rows):
        arr[0, i] = tuple(row)
    return arr


def _cells(names):
    cells = np.empty((1, len(names)), dtype=object)
    cells[0, :] = names
    return cells


def _save(im, path, quality=90):
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format="JPEG", quality=quality)


def write_layout(samples, out, layout="original", n_classes=None):
    """Write `samples` under `out` in one of LAYOUTS; returns `out`."""
    out = Path(out)
    n_classes = n_classes or max(s.class_id for s in samples)
    names = class_names(n_classes)
    box_fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"]
    if layout == "all_in_one":
        rows = []
        for i, s in enumerate(samples, 1):
            rel = f"car_ims/{i:06d}.jpg"
            image, box = s.draw()
            _save(image, out / rel)
            rows.append([rel, *box, s.class_id, int(s.split == "test")])
        scipy.io.savemat(out / "cars_annos.mat", {
            "annotations": _struct(rows, ["relative_im_path", *box_fields, "class", "test"]),
            "class_names": _cells(names)})
        return out
    if layout == "class_folders":
        for s in samples:
            folder = names[s.class_id - 1].replace("/", "-")
            _save(s.draw()[0], out / s.split / folder / f"{s.number:05d}.jpg")
        return out
    nested = layout == "kaggle"
    devkit = out / ("car_devkit/devkit" if nested else "devkit")
    devkit.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        folder = out / f"cars_{split}" / (f"cars_{split}" if nested else "")
        rows = []
        for s in (s for s in samples if s.split == split):
            fname = f"{s.number:05d}.jpg"
            image, box = s.draw()
            _save(image, folder / fname)
            rows.append([*box, s.class_id, fname])
        with_class = _struct(rows, [*box_fields, "class", "fname"])
        if split == "train":
            scipy.io.savemat(devkit / "cars_train_annos.mat", {"annotations": with_class})
        else:
            scipy.io.savemat(devkit / "cars_test_annos.mat",
                             {"annotations": _struct([r[:4] + r[5:] for r in rows], [*box_fields, "fname"])})
            scipy.io.savemat(out / "cars_test_annos_withlabels.mat", {"annotations": with_class})
    scipy.io.savemat(devkit / "cars_meta.mat", {"class_names": _cells(names)})
    # the hold-out CSV of the original test.py: devkit columns, no header, the label in column 5
    lines = [f"{fname},{','.join(map(str, box))},{class_id}" for *box, class_id, fname in rows]
    (out / "cars_test_labels.csv").write_text("\n".join(lines) + "\n")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--layout", choices=LAYOUTS, default="original")
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--train-per-class", type=int, default=40)
    p.add_argument("--test-per-class", type=int, default=20)
    p.add_argument("--train-images", type=int, default=None, help="this many train images in all, instead of per class")
    p.add_argument("--test-images", type=int, default=None, help="this many test images in all, instead of per class")
    p.add_argument("--min-size", type=int, default=96)
    p.add_argument("--max-size", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    totals = (a.train_images or a.train_per_class * a.classes, a.test_images or a.test_per_class * a.classes)
    samples = make_samples(a.classes, a.train_per_class, a.test_per_class, a.min_size, a.max_size, a.seed, totals)
    write_layout(samples, a.out, a.layout, a.classes)
    print(f"{a.out}: {len(samples)} images, {a.classes} classes, {a.layout} layout")


if __name__ == "__main__":
    main()
