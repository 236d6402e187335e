"""Prepare a fine-grained dataset into train.csv and test.csv (download it, or import files you have):

    python data.py --dataset cars --root data                  # download (tries every known source)
    python data.py --dataset cars --root data --source DIR     # files you already have, any layout
    python data.py --dataset cars --root data --resize 320     # also a copy shrunk for fast training
    python data.py --dataset folders --source DIR --name NAME [--test-pct 0.2]   # your own class folders
    python data.py ... --skip-bad                              # leave unreadable images out, each named

The CSVs have the columns `filename` (relative to the CSV's folder), `bbox_x1..bbox_y2` (1-based, empty
when the layout has no boxes; in pixels of the image as viewers show it, its EXIF orientation applied),
`class_id` and `class_name`. The DataLoaders built from them are finegrained/data.py's; the preparation
is finegrained/prepare/."""
from finegrained import cli
from finegrained.prepare.dataset import main

if __name__ == "__main__":
    cli.run(main)
