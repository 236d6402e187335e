"""Training curves: one PNG of a run's history.csv (losses, accuracy, stage and image-size changes,
learning rate per parameter group), rewritten atomically after each epoch.

    training_curves("runs/NAME/history.csv", "runs/NAME/training_curves.png")

matplotlib draws it through its object API (matplotlib.figure.Figure), so that nothing here
touches pyplot's global state or backend; pandas reads the CSV. What is hand-written is only the
layout: fastai's Recorder.plot_loss plots one fit's per-batch loss, not a history spanning stages
(and resumed processes) with its stage, size and per-group learning-rate context."""
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from finegrained.errors import UserError

from finegrained.files import save_png

CURVES_INCHES, CURVES_DPI = (10, 7.5), 100   # 1000 x 750 px
# learning-rate columns: "a;b;c", one value per parameter group, earliest first
LR_COLUMNS = {"lrs": "max lr", "lrs_end": "lr at epoch end", "lr": "lr"}
LOSSES = {"train_loss": ("train loss", "C0", "-"), "valid_loss": ("valid loss", "C1", "--")}
SCORES = {"accuracy": ("valid accuracy", "C2", "-"), "top5_accuracy": ("valid top-5 accuracy", "C3", ":"),
          "mean_iou": ("valid mean box IoU", "C8", "-."), "iou50": ("valid boxes IoU >= 0.5", "C9", "-.")}
MARKERS_UP_TO = 40                           # epochs; past that, markers clutter the lines


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
    note = "" if "valid_loss" in series else " (no validation split: training loss only)"
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
