"""Score a trained model on a hold-out folder of images with a CSV of labels or of class folders, or predict a folder.

    python test.py --model runs/NAME --folder DIR --csv labels.csv [--label-col COL] [--fname-col COL]
    python test.py --model runs/NAME --folder DIR          # DIR/<class name>/*.jpg: scored; images alone: predicted
    python test.py --model runs/NAME --folder photo.jpg    # one image
    python test.py --model runs/NAME --folder DIR --csv files.csv --predict-only   # predictions only
    python test.py --model runs/CROP --localizer runs/LOC --folder DIR --csv labels.csv   # crops from LOC's boxes
    python test.py --model runs/NAME/model.onnx --folder DIR --csv labels.csv   # an exported file (export.py), by onnxruntime

Every row is scored once, in the CSV's order, at the model's image size, without augmentation
(unless --tta). Labels may be class ids or class names, matched to the model's classes by value, never
by position: a class name first, a class id where no class name is a number or the column is named like
class_id; --labels id|name says which where class names are numbers (folders 1, 2, 10) and the column's
name does not. Class folders are matched by name. With no labels found the CSV must clearly have none (only file
names and boxes), or --predict-only asks for predictions; the last line then says that nothing was scored. Written:
the predictions CSV (--out, by default <model>/predictions/<CSV or folder name>.csv), <out>_per_class.csv and
<out>_confusion.png.

A model trained with --head localize also predicts each image's box: written as pred_x1..pred_y2 (original
pixels, 1-based like the devkit), scored (mean IoU, IoU >= 0.5) when the CSV has boxes (bbox_x1..bbox_y2, or in a
headerless devkit CSV the four columns beside the file and label columns), and drawn with --draw-boxes N into
<out>_boxes.png. A model trained with --crop-bbox is scored on the CSV's boxes, or,
with --localizer LOC, on the boxes LOC predicts, grown by the model's own margin.

An exported .onnx file (export.py) is scored by onnxruntime through the same loader, prepared as the JSON beside it
says (model.json's keys), with the same outputs, boxes included; Grad-CAM (--heatmaps) needs the run folder."""
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from finegrained import cli
from finegrained.errors import UserError
from finegrained.evaluate import confusion, model_scores, ranked
from finegrained.files import save_png, write_csv
from finegrained.images import BOX_COLUMNS, BOX_MARGIN, IMAGE_SUFFIXES
from finegrained.report import per_class_table   # shared with run.py's report

FNAME_NAMES = ("filename", "fname", "file", "image", "path", "relative_im_path")
PRED_BOX_COLUMNS = ["pred_x1", "pred_y1", "pred_x2", "pred_y2"]
LABEL_NAMES = ("class_id", "class_name", "label", "class", "labels", "category", "target")
HANDFUL = 5  # more predictions than this are only in the CSV, not printed one a line
ID_HEADER = re.compile(r"(class|label|category|target)?[ _-]?id")       # a label column of class ids, by its header
NAME_HEADER = re.compile(r"(class|label|category|target)?[ _-]?name")   # ... of class names


def parse_args(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--model", required=True,
                   help="trained model folder (model.safetensors + model.json, from run.py), or an exported .onnx file "
                        "(export.py; run by onnxruntime, the JSON beside it read for the preprocessing and classes)")
    p.add_argument("--folder", required=True,
                   help="folder of hold-out images (CSV file names are relative to it), of class folders "
                        "(DIR/<class name>/*.jpg, scored without --csv), or one image")
    p.add_argument("--csv", default=None, help="CSV naming the images and their labels; without it every image in --folder is predicted")
    p.add_argument("--fname-col", default=None, help="column of file names: a name or a 0-based index (default: 'filename' or the first)")
    p.add_argument("--label-col", default=None,
                   help="column of labels (class ids or names): a name, a 0-based index, or 'none' (default: found by name)")
    p.add_argument("--labels", choices=["auto", "id", "name"], default="auto",
                   help="read the labels as class ids, as class names, or (auto) a class name first and a class id where no "
                        "class name is a number or the column is named like class_id; where class names are numbers and "
                        "the column's name says neither, the one reading that fits every row (both fitting but "
                        "disagreeing is refused)")
    p.add_argument("--predict-only", action="store_true", help="predict every image, score no labels")
    p.add_argument("--out", default=None,
                   help="predictions CSV (default: <model>/predictions/<CSV or folder name>.csv); per-class CSV and "
                        "confusion PNG are written beside it")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    p.add_argument("--tta", action="store_true", help="test-time augmentation (fastai's tta: flips, crops and the training transforms)")
    p.add_argument("--bs", type=int, default=64, help="batch size of the scoring (one number: scoring has no stages, unlike run.py's per-stage --bs)")
    p.add_argument("--skip-bad", action="store_true", help="skip rows whose image is missing or unreadable (each is reported) instead of stopping")
    cli.add_workers(p)
    cli.add_device(p)
    p.add_argument("--localizer", default=None, metavar="LOC",
                   help="for a model trained with --crop-bbox: crop each image to the box that LOC (a model trained with "
                        "--head localize on the same classes) predicts, grown by the model's margin, instead of the CSV's boxes")
    p.add_argument("--heatmaps", type=int, default=0, metavar="N",
                   help="with labels: <out>_heatmaps.png, Grad-CAM of the N highest-loss mistakes and the N most confident "
                        "correct images, each spread over the true classes")
    p.add_argument("--top-losses", type=int, default=0, metavar="N",
                   help="with labels: <out>_top_losses.png, the N images with the highest loss")
    p.add_argument("--draw-boxes", type=int, default=0, metavar="N",
                   help="save <out>_boxes.png: the first N images with their true (green) and predicted (red) boxes; "
                        "needs a localize model or --localizer")
    args = p.parse_args(argv)
    if args.predict_only and args.label_col is not None:
        raise UserError("--predict-only scores no labels: drop --label-col, or drop --predict-only to score")
    for flag, least in (("bs", 1), ("workers", 0), ("heatmaps", 0), ("top_losses", 0), ("draw_boxes", 0)):
        value = getattr(args, flag)
        if value is not None and value < least:
            raise UserError(f"--{flag.replace('_', '-')} takes {least} or more, got {value}")
    return args


# ---------------------------------------------------------------- reading the hold-out set

def _column(df, spec, what, csv):
    """A column name from a name or a 0-based index given on the command line."""
    if spec in df.columns:
        return spec
    if str(spec).lstrip("-").isdigit():
        i = int(spec)
        if 0 <= i < len(df.columns):
            return df.columns[i]
        raise UserError(f"{csv}: --{what}-col {spec} is out of range (the CSV has {len(df.columns)} columns, 0..{len(df.columns) - 1})")
    raise UserError(f"{csv}: --{what}-col {spec!r} is not a column (columns: {', '.join(map(str, df.columns))})")


def _reads_as_boxes(frame):
    """Whether four columns read as devkit boxes x1, y1, x2, y2: numbers, x1 <= x2 and y1 <= y2 on every row."""
    values = frame.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    return not np.isnan(values).any() and (values[:, 0] <= values[:, 2]).all() and (values[:, 1] <= values[:, 3]).all()


def read_holdout(csv, folder, fname_col=None, label_col=None):
    """(DataFrame with `filename`, maybe `label`, maybe bbox_x1..bbox_y2) from a CSV with or without a header row.

    The first row is a header unless its file-name cell names an image: a file in `folder`, or a
    name with an image suffix (a missing first image is then reported, not taken for a header).
    A headerless CSV's boxes are the four columns beside the file and label columns, in order, when they read as
    boxes: the devkit's columns (file, x1, y1, x2, y2, class, or x1..y2, class, file).
    No label column found, when asked for none (label_col "none") or when the CSV has only file names and boxes:
    attrs["unlabelled"] says why; with other columns that might hold the labels: refused."""
    csv, folder = Path(csv), Path(folder)
    if not csv.is_file():
        raise UserError(f"{csv}: no such CSV file")
    try:
        first = pd.read_csv(csv, header=None, nrows=1, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise UserError(f"{csv}: the CSV is empty")
    fname_index = int(fname_col) if fname_col is not None and str(fname_col).isdigit() else 0
    cell = str(first.iloc[0, fname_index]) if fname_index < first.shape[1] else ""
    headerless = (folder / cell).is_file() or Path(cell).suffix.lower() in IMAGE_SUFFIXES
    try:
        # every cell as written (class name "007" stays "007"); the box columns are made numbers below
        df = pd.read_csv(csv, header=None if headerless else 0, keep_default_na=False, na_values=[""], dtype=str)
    except Exception as err:
        raise UserError(f"{csv}: not a readable CSV ({err})")
    if df.empty:
        raise UserError(f"{csv}: the CSV has no rows")
    if fname_col is None:
        fname_col = next((c for c in df.columns if str(c).lower() in FNAME_NAMES), df.columns[0])
    fname_col = _column(df, fname_col, "fname", csv)
    asked = label_col is not None and str(label_col).lower() == "none"
    if label_col is None:
        label_col = next((c for name in LABEL_NAMES for c in df.columns if str(c).lower() == name), None)
    else:
        label_col = None if asked else _column(df, label_col, "label", csv)
    rest = [c for c in df.columns if c not in (fname_col, label_col)]
    positional = headerless and len(rest) == 4 and _reads_as_boxes(df[rest])
    boxes = dict(zip(BOX_COLUMNS, rest)) if positional else {c: c for c in BOX_COLUMNS if c in df.columns}
    out = pd.DataFrame({"filename": df[fname_col].astype(str)})
    if label_col is not None:
        out["label"] = df[label_col]
        out.attrs["label_col"] = label_col
    elif asked:
        out.attrs["unlabelled"] = "as --label-col none asks; name the label column to score"
    elif set(rest) - set(boxes.values()):
        how = (f"the CSV has no header row to name it; pass --label-col N (a 0-based index, 0..{len(df.columns) - 1})"
               if headerless else f"none of its columns ({', '.join(map(str, df.columns))}) is named "
                                  f"{', '.join(LABEL_NAMES)}; pass --label-col NAME or N (a 0-based index)")
        raise UserError(f"{csv}: no label column found: {how} to score, or --predict-only to predict only")
    else:
        out.attrs["unlabelled"] = (f"{csv} has no label column (only file names{' and boxes' if boxes else ''}); add a "
                                   "class_id or class_name column to score")
    for name, col in boxes.items():  # the true boxes: crops of --crop-bbox models, box scores, --draw-boxes
        try:
            out[name] = pd.to_numeric(df[col])
        except ValueError as err:
            raise UserError(f"{csv}: column {col!r} holds the boxes' {name}, but {err}")
    out.attrs["boxes"] = ("bbox_x1..bbox_y2" if not positional else
                          f"columns {', '.join(map(str, rest))} as x1, y1, x2, y2") if len(boxes) == 4 else None
    return out


def list_images(folder, labels=True):
    """(DataFrame of every image in `folder` (recursively), or of the one image `folder` names; its folder).
    With `labels`, a folder of class folders (every image in a subfolder, as data.py's folders layout) gives each
    image's class folder name as its `label`; otherwise attrs["unlabelled"] says why there are no labels."""
    folder = Path(folder)
    none = (f"no --csv gives labels and {folder} is not a folder of class folders; pass --csv FILE with a label "
            "column, or a folder of class folders (DIR/<class name>/*.jpg), to score")
    if folder.is_file():
        df = pd.DataFrame({"filename": [folder.name]})
        df.attrs["unlabelled"] = none
        return df, folder.parent
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder or image")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{folder}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    df = pd.DataFrame({"filename": files})
    if labels and all("/" in f for f in files):
        df["label"] = [f.split("/", 1)[0] for f in files]
        df.attrs["class_folders"] = True
    elif labels:
        df.attrs["unlabelled"] = none
    return df, folder


def class_folder_labels(names, classes, folder):
    """Model output index for each image's class folder name, matched to the model's class names (a folder named
    like a number is a name, as data.py reads it); the unknown folders, all of them, in one line."""
    known = {str(c["name"]).strip().lower() for c in classes}
    unknown = sorted({n for n in names if n.strip().lower() not in known})
    if unknown:
        raise UserError(f"{folder}: {'folders' if len(unknown) > 1 else 'folder'} {_listed([repr(n) for n in unknown])} "
                        f"{'are not class names' if len(unknown) > 1 else 'is not a class name'} of this model (names "
                        f"{_listed([str(c['name']) for c in classes])}); name each class folder as its class, "
                        "or pass --predict-only to predict every image")
    return match_labels(names, classes, folder, "name")


def _integer(text):
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if number.is_integer() else None


def _listed(values):
    return ", ".join(map(str, values)) if len(values) <= 12 else f"{values[0]}, ..., {values[-1]}"


def match_labels(labels, classes, csv, reading="auto", column=None):
    """Model output index for each label, matched by class name or class id, never by position.

    reading "id" or "name" reads every label one way. "auto": a class name first, and a class id where no class
    name is a number or `column` (the label column's header) names class ids (class_id). Where class names are
    numbers (data.py numbers folders 1, 2, 10 as ids 1, 3, 2), a column named like class_name holds names, one named
    like class_id ids, and any other the one reading that fits every row; both fitting and disagreeing is refused."""
    texts = []
    for row, value in enumerate(labels):
        if pd.isna(value) or not str(value).strip():
            raise UserError(f"{csv}, row {row + 1}: the label is empty")
        texts.append(str(value).strip())
    by_id = {int(c["id"]): i for i, c in enumerate(classes)}
    by_name = {str(c["name"]).strip().lower(): i for i, c in enumerate(classes)}
    as_id = [by_id.get(_integer(t)) for t in texts]
    as_name = [by_name.get(t.lower()) for t in texts]
    header = str(column).strip().lower() if isinstance(column, str) else ""
    where = f"column {column!r}" if header else "the label column"
    hint = ""
    if reading == "auto":
        if not any(_integer(name) is not None for name in by_name):
            reading = "either"  # a number can only be an id
        elif ID_HEADER.fullmatch(header) or NAME_HEADER.fullmatch(header):
            reading = "id" if ID_HEADER.fullmatch(header) else "name"
        elif None not in as_name and None not in as_id and as_name != as_id:
            row = next(r for r, (a, b) in enumerate(zip(as_name, as_id)) if a != b)
            raise UserError(f"{csv}, row {row + 1}: label {texts[row]!r} is the class named {texts[row]!r} (id "
                            f"{classes[as_name[row]]['id']}) or class id {texts[row]} (named {classes[as_id[row]]['name']!r}), "
                            f"and {where} does not say which: pass --labels name or --labels id")
        else:
            reading = "id" if None in as_name and None not in as_id else "name"
        if reading != "either":
            other = {"id": "name", "name": "id"}[reading]
            hint = f"; {where} is read as class {reading}s, --labels {other} reads class {other}s"
    found = {"id": as_id, "name": as_name, "either": [n if n is not None else i for n, i in zip(as_name, as_id)]}[reading]
    for row, index in enumerate(found):
        if index is None:
            ids, names = f"ids {_listed(sorted(by_id))}", f"names {_listed([c['name'] for c in classes])}"
            known = {"id": ids, "name": names, "either": f"{ids}, or a class name"}[reading]
            raise UserError(f"{csv}, row {row + 1}: label {texts[row]!r} is not a class {'' if reading == 'either' else reading + ' '}"
                            f"of this model ({known}){hint}")
    return np.array(found)


def bad_images(df, folder, skip_bad, where):
    """Row positions whose image is missing or does not decode: an error at the first, or under
    --skip-bad each reported and returned for dropping."""
    from finegrained.prepare.tables import image_problems
    paths = [Path(folder) / f for f in df["filename"]]
    reasons = image_problems(paths)
    bad = [i for i, r in enumerate(reasons) if r]
    for i in bad:
        message = f"{where}, row {i + 1}: {paths[i]}: {reasons[i]}"
        if not skip_bad:
            raise UserError(message + " (pass --skip-bad to skip such rows)")
        print(f"skipped: {message}", file=sys.stderr)
    return bad


# ---------------------------------------------------------------- predicting and reporting

def predict(model, meta, df, folder, bs, tta=False, workers=None):
    """Class probabilities for every row of `df`, in order; for a localize model (probabilities, boxes), each box
    in the model's input frame (-1..1: boxes.frame_to_devkit maps it back)."""
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from finegrained.boxes import LocalizeLoss
    from finegrained.data import inference_dl
    from finegrained.train import show_bars
    stats = (meta["normalize"]["mean"], meta["normalize"]["std"])
    localize = is_localizer(meta)
    crop = bool(meta.get("crop_bbox")) and all(c in df.columns for c in BOX_COLUMNS)
    if meta.get("crop_bbox") and not crop:
        print("note: the model was trained on box crops, but the CSV has no bbox_x1..bbox_y2 columns: scoring whole images",
              file=sys.stderr)
    dls, dl = inference_dl(df, folder, int(meta["image_size"]), bs, stats, crop, meta.get("bbox_margin", BOX_MARGIN), workers,
                           resize=meta.get("resize", "crop"), crop_pct=float(meta.get("crop_pct", 1.0)), localize=localize)
    # a localize model's loss applies softmax to the logits only, so get_preds gives (probabilities, boxes)
    learn = Learner(dls, model.to(dls.device), loss_func=LocalizeLoss(CrossEntropyLossFlat()) if localize else CrossEntropyLossFlat())
    show_bars(learn, sys.stdout.isatty())
    if localize:
        probs, boxes = learn.get_preds(dl=dl)[0]
        return probs.float(), boxes.float()
    probs = learn.tta(dl=dl)[0] if tta else learn.get_preds(dl=dl)[0]
    return probs.float()


def load_model(path):
    """(model, metadata): a run folder's PyTorch model (models.load_trained), or an exported .onnx file's, run by
    onnxruntime behind the same interface (onnx_model.load_onnx; its metadata is the JSON beside it)."""
    from finegrained.onnx_model import is_onnx, load_onnx
    if is_onnx(path):
        return load_onnx(path)
    from finegrained.models import load_trained
    return load_trained(path)


def is_localizer(meta):
    return meta.get("head") == "localize"


def load_localizer(path, model_path, meta):
    """(model, metadata) of --localizer: a localize model trained on the same classes as the model it crops for."""
    if not meta.get("crop_bbox"):
        raise UserError(f"--localizer gives the box crops of a model trained with --crop-bbox; {model_path} was trained "
                        "on whole images and needs no boxes")
    loc, loc_meta = load_model(path)
    if not is_localizer(loc_meta):
        raise UserError(f"--localizer {path}: this model has no box head (head {loc_meta.get('head', 'concat')!r}); "
                        "train one with run.py --head localize")
    ids = [int(c["id"]) for c in meta["classes"]]
    loc_ids = [int(c["id"]) for c in loc_meta["classes"]]
    if loc_ids != ids:
        other = sorted(set(loc_ids) ^ set(ids))
        raise UserError(f"--localizer {path}: its classes differ from {model_path}'s ({len(loc_ids)} vs {len(ids)} classes"
                        + (f", e.g. class id {other[0]}" if other else ", in another order") + "); a localizer must be "
                        "trained on the same dataset")
    return loc, loc_meta


def devkit_boxes(boxes, df, folder, meta):
    """A localize model's boxes (model frame) as devkit boxes on each original image of `df`."""
    from finegrained.boxes import predicted_devkit
    from finegrained.data import fastai_resize
    paths = [Path(folder) / f for f in df["filename"]]
    return predicted_devkit(boxes, paths, int(meta["image_size"]), fastai_resize(meta.get("resize", "crop")))


def print_box_scores(scores, what):
    """Print the mean IoU of the predicted boxes with the CSV's, when it has some (`scores`: report's)."""
    if "mean_iou" in scores:
        where = "" if scores["box_images"] == scores["images"] else \
            f" (the {scores['box_images']} of {scores['images']} images with a box)"
        print(f"{what}mean IoU: {scores['mean_iou']:.4f}{where}")
        print(f"{what}IoU >= 0.5: {scores['iou50']:.4f}")


def draw_boxes(df, folder, pred, n, path, title):
    """A PNG grid of the first `n` images of `df`, upright, each with its true box (green, when the CSV has one) and
    the predicted box `pred` (red, devkit)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from finegrained.boxes import devkit_iou
    from finegrained.images import load_image
    n = min(n, len(df))
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.7 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    has_true = all(c in df.columns for c in BOX_COLUMNS)
    for i, ax in enumerate(axes.flat[:n]):
        im, _ = load_image(Path(folder) / df["filename"].iloc[i])
        ax.imshow(im.convert("RGB"))
        caption = str(df["filename"].iloc[i])[-28:]
        boxes = [(pred[i], "red")]
        if has_true and df[BOX_COLUMNS].iloc[i].notna().all():
            true = df[BOX_COLUMNS].iloc[i].to_numpy(dtype=float)
            boxes.insert(0, (true, "lime"))
            caption += f"\nIoU {devkit_iou([pred[i]], [true]).item():.2f}"
        for (x1, y1, x2, y2), colour in boxes:  # devkit boxes are 1-based inclusive: pixel edges x1 - 1 .. x2
            ax.add_patch(Rectangle((x1 - 1, y1 - 1), x2 - x1 + 1, y2 - y1 + 1, fill=False, edgecolor=colour, linewidth=2))
        ax.set_title(caption, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_png(fig, path, dpi=100)
    plt.close(fig)


def confusion_png(true, pred, classes, path, most=20):
    """The confusion matrix (rows: true class, columns: predicted; evaluate.confusion) over the `most`
    classes involved in the most errors, labelled, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(classes)
    matrix = confusion(true, pred, n)
    errors = matrix.sum(0) + matrix.sum(1) - 2 * np.diag(matrix)
    keep = np.sort(np.argsort(-errors, kind="stable")[: min(most, n)])
    sub = matrix[np.ix_(keep, keep)]
    names = [f"{classes[i]['id']}: {str(classes[i]['name'])[:28]}" for i in keep]
    size = 3 + 0.32 * len(keep)
    fig, ax = plt.subplots(figsize=(size + 2, size))
    ax.imshow(sub, cmap="Blues")
    ax.set_xticks(range(len(keep)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(keep)), names, fontsize=7)
    for (r, c), v in np.ndenumerate(sub):
        if v:
            ax.text(c, r, str(v), ha="center", va="center", fontsize=6, color="white" if v > sub.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix, {n} classes" if len(keep) == n else
                 f"Confusion among the {len(keep)} classes with the most errors (of {n})")
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)


def report(df, probs, classes, true, out, boxes=None):
    """Write the predictions (and, with labels, per-class accuracy and the confusion PNG); print the scores; return
    them (evaluate.model_scores: top1, top5 with labels, images, and the box metrics against the CSV's boxes).
    `boxes`: devkit boxes predicted for each row, written as pred_x1..pred_y2."""
    scores = model_scores(probs, true, boxes, df)
    conf, top = ranked(probs)
    top = top.numpy()
    ids = np.array([int(c["id"]) for c in classes])
    names = np.array([str(c["name"]) for c in classes])
    preds = pd.DataFrame({"filename": df["filename"]})
    if true is not None:
        preds["true_id"], preds["true_name"] = ids[true], names[true]
    preds["pred_id"], preds["pred_name"] = ids[top[:, 0]], names[top[:, 0]]
    preds["confidence"] = conf[:, 0].numpy().round(6)
    preds["top5_ids"] = [";".join(map(str, ids[row])) for row in top]
    if boxes is not None:
        for k, col in enumerate(PRED_BOX_COLUMNS):
            preds[col] = np.asarray(boxes)[:, k]
    if true is not None:
        preds["correct"] = top[:, 0] == true
    write_csv(preds, out)
    print(f"images: {len(df)}")
    if true is None:
        for _, r in (preds if len(preds) <= HANDFUL else preds.iloc[:0]).iterrows():
            print(f"{r['filename']}: {r['pred_id']} {r['pred_name']} ({r['confidence']:.3f})")
        print(f"predictions: {out}")
        return scores
    print(f"accuracy: {scores['top1']:.4f}")
    print(f"top-5 accuracy: {scores['top5']:.4f}")
    stem = Path(out).with_suffix("")
    write_csv(per_class_table(true, top[:, 0], classes), f"{stem}_per_class.csv")
    confusion_png(true, top[:, 0], classes, f"{stem}_confusion.png")
    wrong = preds[~preds["correct"]]   # by hand: no library lists a confusion's largest pairs, named as printed
    pairs = wrong.groupby(["true_name", "pred_name"]).size().sort_values(ascending=False).head(5)
    if len(pairs):
        print("most confused (true -> predicted: images):")
        for (t, p), n in pairs.items():
            print(f"  {t} -> {p}: {n}")
    print(f"predictions: {out}; per class: {stem}_per_class.csv; confusion: {stem}_confusion.png")
    return scores


def explain_and_report(args, model, meta, df, folder, probs, true, out, scores, boxes_caption=None):
    """<out>_heatmaps.png and <out>_top_losses.png (with labels), then <out>_report.html of this scoring (`scores`:
    report's), with the model's training curves when its run folder has them, and <out>_boxes.png (already drawn)
    under `boxes_caption`."""
    import torch
    from finegrained import explain
    from finegrained.data import inference_dl
    from finegrained.report import report_sections, write_report
    stem = Path(out).with_suffix("")
    stats = (meta["normalize"]["mean"], meta["normalize"]["std"])
    labels = [f"{c['id']}: {c['name']}" for c in meta["classes"]]
    crop = bool(meta.get("crop_bbox")) and all(c in df.columns for c in BOX_COLUMNS)

    def load_images(rows):
        sub = df.iloc[list(rows)].reset_index(drop=True)
        _, dl = inference_dl(sub, folder, int(meta["image_size"]), len(sub), stats, crop, meta.get("bbox_margin", BOX_MARGIN),
                             0, resize=meta.get("resize", "crop"), crop_pct=float(meta.get("crop_pct", 1.0)),
                             localize=is_localizer(meta))
        return torch.cat([b[0] for b in dl]).cpu()

    captions = {}
    if args.heatmaps:
        shown = explain.write_heatmaps(model.cpu(), load_images, probs, true, labels, args.heatmaps, f"{stem}_heatmaps.png",
                                       stats, files=list(df["filename"]))
        if shown is not None:   # what the grid's title says, also when there are no mistakes to show
            mistakes = [r for r in shown if probs[r].argmax() != true[r]]
            captions["heatmaps_caption"] = (explain.heatmaps_title(probs, true, mistakes, [r for r in shown if r not in mistakes])
                                            + "; beside each image, the Grad-CAM of its predicted class")
        print(f"heatmaps: {stem}_heatmaps.png")
    if args.top_losses:
        explain.write_top_losses(load_images, probs, true, labels, args.top_losses, f"{stem}_top_losses.png", stats,
                                 files=list(df["filename"]))
        print(f"top losses: {stem}_top_losses.png")
    metrics = {"model": str(args.model), "images": scores["images"]}
    if "top1" in scores:   # the names test.py's report has always shown
        metrics.update(accuracy=round(scores["top1"], 4), top5_accuracy=round(scores["top5"], 4))
    write_report(f"{stem}_report.html", f"Scoring {args.model} on {args.csv or args.folder}", report_sections(
        metrics=metrics, recipe={k: meta[k] for k in ("recipe", "arch", "head", "image_size") if k in meta},
        curves=Path(args.model) / "training_curves.png",
        per_class=f"{stem}_per_class.csv" if true is not None else None,
        confusion=f"{stem}_confusion.png" if true is not None else None,
        boxes=f"{stem}_boxes.png" if args.draw_boxes else None, boxes_caption=boxes_caption,
        heatmaps=f"{stem}_heatmaps.png" if args.heatmaps else None, **captions,
        top_losses=f"{stem}_top_losses.png" if args.top_losses else None))
    print(f"report: {stem}_report.html")


def main(argv=None):
    args = parse_args(argv)
    from finegrained.devices import choose
    choose(args.device)  # fastai's default device: the DataLoaders, and so the model, follow it
    from finegrained.onnx_model import is_onnx
    if args.heatmaps and is_onnx(args.model):
        raise UserError(f"--heatmaps needs the PyTorch model (Grad-CAM follows gradients, which {args.model} does not "
                        "give): score its run folder for heatmaps")
    model, meta = load_model(args.model)
    localize = is_localizer(meta)
    if localize and args.tta:
        raise UserError("--tta is for classification models: fastai's test-time augmentation would average boxes from "
                        "flipped and cropped images without moving them back")
    loc = load_localizer(args.localizer, args.model, meta) if args.localizer else None
    if args.draw_boxes and not (localize or loc):
        raise UserError(f"--draw-boxes needs predicted boxes: {args.model} has no box head (train one with --head "
                        "localize), and no --localizer is given")
    out = Path(args.out) if args.out else default_out(args)
    stem = out.with_suffix("")
    outputs = [out, Path(f"{stem}_per_class.csv"), Path(f"{stem}_confusion.png")]
    outputs += [Path(f"{stem}_boxes.png")] if args.draw_boxes else []
    outputs += [Path(f"{stem}_heatmaps.png")] if args.heatmaps else []
    outputs += [Path(f"{stem}_top_losses.png")] if args.top_losses else []
    outputs += [Path(f"{stem}_report.html")]
    for path in outputs:
        if path.is_dir():
            raise UserError(f"--out {out} is a folder; --out names the predictions CSV file, e.g. {out / 'predictions.csv'}"
                            if path == out else f"{path} is a folder, and test.py writes that file for --out {out}; "
                            "choose another --out")
        if path.exists() and not args.overwrite:
            raise UserError(f"{path}: already exists; pass --overwrite or choose another --out")
    if args.csv:
        if not Path(args.folder).is_dir():
            raise UserError(f"{args.folder}: no such folder")
        df = read_holdout(args.csv, args.folder, args.fname_col, "none" if args.predict_only else args.label_col)
        folder = Path(args.folder)
    else:
        df, folder = list_images(args.folder, labels=not args.predict_only)
    where = args.csv or str(folder)
    unlabelled = "as --predict-only asks; drop it to score" if args.predict_only else df.attrs.get("unlabelled")
    true_boxes = df.attrs.get("boxes")
    if df.attrs.get("class_folders"):
        true = class_folder_labels(df["label"], meta["classes"], folder)
    else:
        true = match_labels(df["label"], meta["classes"], where, args.labels, df.attrs.get("label_col")) if "label" in df else None
    if (args.heatmaps or args.top_losses) and true is None:
        raise UserError("--heatmaps and --top-losses need labels: pass --csv with a label column, or a folder of class folders")
    bad = bad_images(df, folder, args.skip_bad, where)
    if len(bad) == len(df):
        raise UserError(f"{where}: no readable images left to score")
    if bad:
        df = df.drop(index=df.index[bad]).reset_index(drop=True)
        true = None if true is None else np.delete(true, bad)
    out.parent.mkdir(parents=True, exist_ok=True)
    boxes, margin = None, float(meta.get("bbox_margin", BOX_MARGIN))
    crops = df
    if localize:
        probs, frame_boxes = predict(model, meta, df, folder, args.bs, workers=args.workers)
        boxes = devkit_boxes(frame_boxes, df, folder, meta)
    elif loc:
        _, frame_boxes = predict(loc[0], loc[1], df, folder, args.bs, workers=args.workers)
        boxes = devkit_boxes(frame_boxes, df, folder, loc[1])
        print(f"boxes: predicted by the localizer {args.localizer}, grown by {margin:.0%} on every side"
              + (" (the CSV's own boxes are only compared with them)" if all(c in df.columns for c in BOX_COLUMNS) else ""))
        crops = df.drop(columns=[c for c in BOX_COLUMNS if c in df.columns]).assign(**dict(zip(BOX_COLUMNS, boxes.T)))
        probs = predict(model, meta, crops, folder, args.bs, args.tta, args.workers)
    else:
        if meta.get("crop_bbox") and all(c in df.columns for c in BOX_COLUMNS):
            print(f"boxes: the CSV's {true_boxes}, grown by {margin:.0%} on every side")
        probs = predict(model, meta, df, folder, args.bs, args.tta, args.workers)
    scores = report(df, probs, meta["classes"], true, out, boxes)
    if boxes is not None:
        print_box_scores(scores, "localizer " if loc else "")
        print(f"predicted boxes: {out} (pred_x1..pred_y2, original pixels, 1-based)")
    caption = None
    if args.draw_boxes:
        caption = "true box green, predicted red" if true_boxes else "predicted box red; the CSV gives no true boxes"
        if not true_boxes:
            print(f"boxes: {'no --csv gives' if not args.csv else args.csv + ' has'} no true boxes (bbox_x1..bbox_y2, or "
                  "four box columns beside the file and label columns of a headerless CSV): drawing the predicted ones alone")
        draw_boxes(df, folder, boxes, args.draw_boxes, f"{stem}_boxes.png",
                   f"{'localizer ' + str(args.localizer) if loc else args.model}: {caption}")
        print(f"boxes drawn: {stem}_boxes.png")
    explain_and_report(args, model, meta, crops, folder, probs, true, out, scores, caption)
    if bad:
        print(f"skipped {len(bad)} unreadable or missing image(s)", file=sys.stderr)
    if true is None:  # last, where it is seen: nothing was scored
        print(f"predicted {len(df)} image{'s' if len(df) != 1 else ''}, no labels scored: {unlabelled}")


def default_out(args):
    """<model>/predictions/<CSV or folder name>.csv: beside the model it scored, never in the current folder; for an
    exported file, <its folder>/predictions/<its name>_<CSV or folder name>.csv."""
    from finegrained.onnx_model import is_onnx
    source = Path(args.csv or args.folder).resolve()
    name = f"{source.stem if args.csv or source.is_file() else source.name}.csv"
    if is_onnx(args.model):
        return Path(args.model).parent / "predictions" / f"{Path(args.model).stem}_{name}"
    return Path(args.model) / "predictions" / name

