"""Prepare a fine-grained dataset into <root>/<dataset>/train.csv and test.csv: download it, or import files
the user has, then write and check the tables; `main` is data.py's command line."""
from collections import Counter
from pathlib import Path

from finegrained import cli
from finegrained.errors import UserError
from finegrained.prepare import DATASETS
from finegrained.prepare.fetch import DownloadError, extract, fetch_source, is_archive
from finegrained.prepare.resize import check_side, resize_copy
from finegrained.prepare.tables import split_notes, tables_exist, write_tables

def prepare(dataset, root, sources=(), remotes=None, workers=None, name=None, test_pct=None, seed=42, skip_bad=False):
    """Write `<root>/<dataset dir>/train.csv` and `test.csv`; return that folder.

    `sources`: folders or archives the user has; none means download. `remotes` overrides
    the dataset's download sources ({name: [Remote, ...]}), for mirrors and tests. For `folders`
    (a user's own class folders): `name` is the dataset folder's name, and `test_pct` splits one
    folder of class folders into train and test, stratified by class, fixed by `seed`. Unreadable images stop it,
    all named in one error; with `skip_bad` they are left out of the tables, each named."""
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


def main(argv=None):
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
    if args.resize is not None:
        check_side(args.resize)  # before a long download, not after
    dest = prepare(args.dataset, args.root, args.source, workers=args.workers, name=args.name, test_pct=args.test_pct,
                   seed=args.seed, skip_bad=args.skip_bad)
    if args.resize is not None:
        dest = resize_copy(dest, args.resize, args.workers)
        print(f"train on it with: python run.py --data {dest}")
