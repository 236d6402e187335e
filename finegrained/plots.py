"""The run's pictures: its training curves (history.csv: losses, accuracy, stage and image-size changes,
learning rate per parameter group), rewritten atomically after each epoch; a grid of augmented training
images, what the model sees; and the LR range test with its suggestions explained.

    training_curves("runs/NAME/history.csv", "runs/NAME/training_curves.png")
    batch_grid(dls.train, "runs/NAME/augmented_batch.png", {class_id: name})
    lr_find_plot(lrs, losses, {"valley": 1.2e-3, ...}, "valley", "loss_plot_frozen.png", title)

matplotlib draws it through its object API (matplotlib.figure.Figure), so that nothing here
touches pyplot's global state or backend; pandas reads the CSV. What is hand-written is only the
layout: fastai's Recorder.plot_loss plots one fit's per-batch loss, not a history spanning stages
(and resumed processes) with its stage, size and per-group learning-rate context."""
import math
from pathlib import Path

import numpy as np
import pandas as pd
from fastai.torch_core import no_random
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from finegrained.errors import UserError
from finegrained.files import save_png

CURVES_INCHES, CURVES_DPI = (10, 7.5), 100   # 1000 x 750 px
# learning-rate columns: "a;b;c", one value per parameter group, earliest first
LR_COLUMNS = {"lrs": "max lr", "lrs_end": "lr at epoch end", "lr": "lr"}
LOSSES = {"train_loss": ("train loss", "C0", "-"), "valid_loss": ("valid loss", "C1", "--")}
SCORES = {"train_accuracy": ("train accuracy (training batches)", "C4", "-."),
          "accuracy": ("valid accuracy", "C2", "-"), "top5_accuracy": ("valid top-5 accuracy", "C3", ":"),
          "mean_iou": ("valid mean box IoU", "C8", "-."), "iou50": ("valid boxes IoU >= 0.5", "C9", "-.")}
MARKERS_UP_TO = 40                           # epochs; past that, markers clutter the lines
BATCH_PNG, BATCH_IMAGES, BATCH_COLUMNS = "augmented_batch.png", 16, 4
BATCH_CELL_INCHES, BATCH_TITLE_INCHES, BATCH_DPI = 2.4, 0.55, 100   # 240 px an image, 4 to a row: 960 px wide
# fastai's suggestion functions (fastai.callback.schedule), what each marks, in a legend's words
SUGGESTIONS = {"valley": "the middle of the longest stretch where the loss keeps falling",
               "steep": "where the loss falls fastest",
               "minimum": "a tenth of the lr at the lowest loss (x)",
               "slide": "where the loss stops falling, sliding back from the end"}
LR_FIND_PNG, LR_FIND_JSON = "loss_plot_{stage}.png", "lr_find_{stage}.json"  # lr_find.py writes them into --out


def read_history(history):
    """history.csv (a path) or its DataFrame, checked: at least one epoch and a train_loss column."""
    if isinstance(history, pd.DataFrame):
        df = history.copy()
    else:
        path = Path(history)
        if not path.is_file():
            raise UserError(f"{path}: no such history file")
        try:
            df = pd.read_csv(path)
        except pd.errors.EmptyDataError:
            raise UserError(f"{path}: the history file is empty")
        except Exception as err:
            raise UserError(f"{path}: not a readable CSV ({err})")
    if "train_loss" not in df.columns:
        raise UserError(f"history: no train_loss column (columns: {', '.join(map(str, df.columns))})")
    if df.empty:
        raise UserError("history: no epochs recorded yet")
    return df.reset_index(drop=True)


def _numbers(df, column):
    """A column as floats (NaN where empty), or None when absent or wholly empty."""
    if column not in df.columns:
        return None
    values = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=float)
    return None if np.isnan(values).all() else values


def _group_lrs(df, column):
    """{group number (1-based): lr per epoch} from "a;b;c" cells (a single number is one group)."""
    cells = [[float(v) for v in str(c).split(";") if v.strip()] if pd.notna(c) and str(c).strip() else [] for c in df[column]]
    n = max((len(c) for c in cells), default=0)
    return {g + 1: np.array([c[g] if len(c) == n else np.nan for c in cells]) for g in range(n)}


def curve_data(history):
    """What the figure shows, as plain values: x (global epoch, 1..N), the series, the stage spans,
    the size changes (x of the boundary, new size) and the learning rates per group and column."""
    df = read_history(history)
    x = np.arange(1, len(df) + 1)
    series = {name: values for name in (*LOSSES, *SCORES) if (values := _numbers(df, name)) is not None}
    stages = []  # (name, first x, last x)
    if "stage" in df.columns:
        names = df["stage"].astype(str).tolist()
        start = 0
        for i in range(1, len(names) + 1):
            if i == len(names) or names[i] != names[start]:
                stages.append((names[start], start + 1, i))
                start = i
    sizes = []  # (x of the boundary, size from there on)
    size = _numbers(df, "size")
    if size is not None:
        sizes.append((0.5, size[0]))
        sizes += [(i + 0.5, size[i]) for i in range(1, len(size)) if size[i] != size[i - 1]]
    lrs = {column: _group_lrs(df, column) for column in LR_COLUMNS if column in df.columns}
    return {"x": x, "series": series, "stages": stages, "sizes": sizes, "lrs": {c: g for c, g in lrs.items() if g}}


def training_curves(history, path):
    """Draw history.csv (a path or DataFrame) to the PNG `path`, atomically; returns curve_data()."""
    data = curve_data(history)
    x, series, n = data["x"], data["series"], len(data["x"])
    marker = "o" if n <= MARKERS_UP_TO else None
    fig = Figure(figsize=CURVES_INCHES, dpi=CURVES_DPI)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2.2, 1]})
    lines = []
    for name, (label, colour, style) in LOSSES.items():
        if name in series:
            lines += top.plot(x, series[name], style, color=colour, marker=marker, ms=3, label=label)
    top.set_ylabel("loss")
    top.set_ylim(bottom=0)
    score_axis = top.twinx()
    for name, (label, colour, style) in SCORES.items():
        if name in series:
            lines += score_axis.plot(x, series[name], style, color=colour, marker=marker, ms=3, label=label)
    score_axis.set_ylim(0, 1.02)
    score_axis.set_ylabel("accuracy")
    # on the twin axis, which is drawn last, so that no line crosses the legend
    score_axis.legend(lines, [ln.get_label() for ln in lines], loc="best", fontsize=8, framealpha=0.8)
    top.grid(alpha=0.3)
    for ax in (top, bottom):
        _mark_stages(ax, data, label=ax is top)
    for column, groups in data["lrs"].items():
        last = max(groups)
        for g, values in groups.items():
            what = "head" if g == last and last > 1 else ("earliest layers" if g == 1 and last > 1 else "")
            label = f"{LR_COLUMNS[column]}, group {g}{f' ({what})' if what else ''}"
            if column == "lrs":  # each stage's max rate spans its whole epochs, [x - 0.5, x + 0.5]
                bottom.stairs(values, np.arange(n + 1) + 0.5, baseline=None, color=f"C{g + 3}", lw=1.5, label=label)
            else:  # one line per stage: a new stage's schedule starts afresh
                spans = data["stages"] or [("", 1, n)]
                for k, (_, first, end) in enumerate(spans):
                    bottom.plot(x[first - 1:end], values[first - 1:end], "--", color=f"C{g + 3}", marker=marker, ms=2.5,
                                lw=1, label=label if k == 0 else None)
    if data["lrs"]:
        bottom.set_yscale("log")
        bottom.legend(fontsize=7, loc="best", ncol=2, framealpha=0.8)
    else:
        bottom.text(0.5, 0.5, "no learning rates recorded", transform=bottom.transAxes, ha="center", va="center")
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("epoch (all stages)")
    bottom.grid(alpha=0.3, which="both")
    bottom.set_xlim(0.5, n + 0.5)
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(n, 20)))
    note = "" if "valid_loss" in series else " (no validation split: training loss and accuracy only)"
    fig.suptitle(f"Training curves: {n} epoch{'s' if n != 1 else ''}{note}", fontsize=11)
    fig.tight_layout()
    save_png(fig, path)
    return data


def _mark_stages(ax, data, label):
    """Stage boundaries as grey lines with the stage's name above its span; size changes as orange
    dotted lines with the new size."""
    transform = ax.get_xaxis_transform()  # x in data units, y in axes fraction
    for name, first, last in data["stages"]:
        if first > 1:
            ax.axvline(first - 0.5, color="0.35", lw=1.2)
        if label:
            ax.text((first + last) / 2, 1.01, name, transform=transform, ha="center", va="bottom", fontsize=8,
                    color="0.25")
    for i, (boundary, size) in enumerate(data["sizes"]):
        if i:
            ax.axvline(boundary, color="C1", lw=1.2, ls=":")
        if label:
            ax.text(boundary + 0.1, 0.03, f"{size:g} px", transform=transform, ha="left", va="bottom",
                    fontsize=8, color="C1")


def batch_grid(dl, path, names=None, n=BATCH_IMAGES, columns=BATCH_COLUMNS):
    """fastai's show_batch of a training loader, into a PNG at `path` (atomically): up to `n` images of one batch,
    resized, cropped and augmented as they train, `columns` to a row, each titled with its class (`names`:
    {class id: name}). Drawn from a copy of the loader, under fastai's no_random, so that the run's shuffling and
    augmentations are the same as without it. Returns (images drawn, (width, height) in pixels)."""
    with no_random():
        copy = dl.new(shuffle=True, drop_last=False)   # one batch even from fewer images than a batch
        batch = copy.one_batch()
    count = min(n, len(batch[0]))
    cols, rows = min(columns, count), math.ceil(count / columns)
    size = (cols * BATCH_CELL_INCHES, rows * BATCH_CELL_INCHES + BATCH_TITLE_INCHES)
    fig = Figure(figsize=size, dpi=BATCH_DPI)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - BATCH_TITLE_INCHES / size[1], wspace=0.05, hspace=0.18)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.axis("off")
    copy.show_batch(b=batch, max_n=count, ctxs=list(axes[:count]))
    for ax in axes[:count]:
        label = ax.get_title()
        name = (names or {}).get(int(label)) if label.strip().lstrip("-").isdigit() else None
        text = f"{label}: {name}" if name is not None else label
        ax.set_title(text if len(text) <= 28 else text[:27] + "…", fontsize=9)
    fig.suptitle(f"What the model sees: {count} training images at {batch[0].shape[-1]} px, augmented", fontsize=11,
                 y=1 - 0.08 / size[1], va="top")
    save_png(fig, path)
    return count, (round(size[0] * BATCH_DPI), round(size[1] * BATCH_DPI))


def lr_find_plot(lrs, losses, suggestions, used, path, title, skip_end=5):
    """The LR range test's loss against learning rate (as fastai plots it: the last `skip_end` points left out), each
    of fastai's `suggestions` {name: lr} marked at the very lr it returns (printed beside it in the legend, with
    what it marks), `minimum`'s lowest loss too (x), and the one `used` as a dashed line. Drawn here because
    fastai's plot_lr_find marks `minimum` at the lowest loss, ten times the value it returns, names the functions
    only, and draws into pyplot's current figure. Returns {name: (lr, loss) of its dot}."""
    lrs, losses = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    if skip_end:
        lrs, losses = lrs[:-skip_end], losses[:-skip_end]
    keep = np.isfinite(losses)
    lrs, losses = lrs[keep], losses[keep]
    if len(lrs) < 2:
        raise UserError(f"{path}: the LR range test recorded too few finite losses to plot")
    fig = Figure(figsize=(8, 6.4), dpi=120)
    ax = fig.subplots()
    ax.plot(lrs, losses, color="C0", label="loss (smoothed) at each learning rate")
    dots = {}
    for k, (name, lr) in enumerate(suggestions.items()):
        loss = float(np.interp(np.log(lr), np.log(lrs), losses))
        dots[name] = (float(lr), loss)
        what = SUGGESTIONS.get(name, "")
        chosen = " — printed as the run.py flag (dashed line)" if name == used else ""
        ax.plot(lr, loss, "o", ms=7, color=f"C{k + 1}", label=f"{name} {lr:.3g}: {what}{chosen}", zorder=3)
        if name == "minimum":   # fastai's minimum is the lr of the lowest loss over its window, divided by 10
            low = 10 * float(lr)
            ax.plot(low, float(np.interp(np.log(low), np.log(lrs), losses)), "x", ms=8, mew=2, color=f"C{k + 1}",
                    label=f"lowest loss, at {low:.3g} = 10 x minimum", zorder=3)
    if used in suggestions:
        ax.axvline(suggestions[used], color="0.4", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1, frameon=False)   # below: off the curve
    fig.tight_layout()
    save_png(fig, path)
    return dots
