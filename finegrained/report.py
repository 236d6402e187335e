"""One self-contained HTML report of a run or a scoring: metrics, the data and its classes, the recipe as
tables, the figures embedded as base64 data URIs (so the file opens offline, alone), the classes by accuracy;
all text escaped.

    sections = report_sections(metrics=..., data=..., classes=DataFrame, recipe=..., curves=PNG, batch=PNG,
                               lr_find=[Png], per_class=DataFrame, confusion=PNG, boxes=PNG, heatmaps=PNG,
                               top_losses=PNG)
    write_report("runs/NAME/report.html", "resnext50_32x4d · fastai_resnext50 · stanford_cars", sections)

Hand-written because none of the project's libraries writes such a page: pandas renders the tables
(DataFrame.to_html, which escapes), html.escape the rest; no template engine is needed for one page."""
import base64
import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from finegrained.errors import UserError
from finegrained.evaluate import per_class_counts
from finegrained.files import write_text
from finegrained.recipe import trained_lr

WORST_CLASSES = 20
COLLAPSE_OVER = 20     # rows; a longer table (the class list, every class's accuracy) is folded in a <details>
CONTENT_PX = 1200      # the page's content width: a figure up to this wide is shown at its own size, never scaled
PER_CLASS_COLUMNS = ["class_id", "class_name", "images", "correct", "accuracy"]
STYLE = f"""body{{font-family:system-ui,sans-serif;margin:2em auto;max-width:{CONTENT_PX}px;color:#222;padding:0 1em}}
h1{{font-size:1.5em}}h2{{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}}
table{{border-collapse:collapse;font-size:.9em;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:left}}
th{{background:#f4f4f4}}img{{max-width:100%;height:auto;border:1px solid #eee}}pre{{background:#f7f7f7;padding:.6em;overflow:auto}}
figure{{margin:1em 0}}.wide{{overflow-x:auto}}summary{{cursor:pointer;margin:.5em 0}}.note{{color:#666;font-size:.9em}}"""


class Png:
    """A PNG to embed; `caption` is shown under it."""

    def __init__(self, path, caption=""):
        self.path, self.caption = Path(path), caption


class Details:
    """A body folded under a one-line `summary` (<details>), opened by a click."""

    def __init__(self, summary, body):
        self.summary, self.body = summary, body


class Wide:
    """A table that may be wider than the page: it scrolls sideways instead of overflowing."""

    def __init__(self, body):
        self.body = body


def collapsible(table, summary):
    """`table` as it is when it is short, folded under `summary` when it has more than COLLAPSE_OVER rows."""
    return Details(summary, table) if len(table) > COLLAPSE_OVER else table


def per_class_table(true, pred, classes):
    """One row per true class present: class_id, class_name, images (of that true class), correct, accuracy;
    worst first (ties by class id). `true`, `pred`: model output indices; `classes`: [{"id", "name"}] in that order
    (model.json's); the counts are evaluate.per_class_counts'. test.py writes it as <out>_per_class.csv; run.py puts
    the test set's into its report."""
    images, correct = per_class_counts(true, pred, len(classes))
    table = pd.DataFrame({"class_id": [int(c["id"]) for c in classes], "class_name": [str(c["name"]) for c in classes],
                          "images": images, "correct": correct})[images > 0]
    table["accuracy"] = (table["correct"] / table["images"]).round(4)
    return table.sort_values(["accuracy", "class_id"], ignore_index=True)


def class_table(classes, train_ids, test_ids=None):
    """The class list: class_id, class_name and how many train (and test) images each has, from the class ids of
    the rows; `classes`: [{"id", "name"}]."""
    table = pd.DataFrame({"class_id": [int(c["id"]) for c in classes], "class_name": [str(c["name"]) for c in classes]})
    for column, ids in (("train images", train_ids), ("test images", test_ids)):
        if ids is not None:
            counts = pd.Series(np.asarray(ids, dtype=int)).value_counts()
            table[column] = table["class_id"].map(counts).fillna(0).astype(int)
    return table


def recipe_tables(recipe):
    """A resolved recipe (recipe.resolve's) as two tables: its run-wide keys (key, value), then its stages, one row
    per stage and one column per key, with `trained_lr`, the head's peak rate the stage really trains at, after lr.
    A dict without stages (a model's summary) stays one key/value table."""
    if not isinstance(recipe, dict) or not isinstance(recipe.get("stages"), list):
        return recipe
    run = {k: v for k, v in recipe.items() if k != "stages"}
    rows = []
    for stage in recipe["stages"]:
        row = {}
        for k, v in stage.items():
            row[k] = v
            if k == "lr":
                row["trained_lr"] = trained_lr(stage, recipe.get("lr_rule", "none"))
        rows.append(row)
    return [run, Wide(pd.DataFrame(rows))]


def worst_classes(per_class, n=WORST_CLASSES):
    """The `n` classes with the lowest accuracy (ties: more images first, then class id) from a
    per-class DataFrame or CSV with columns class_id, class_name, images, correct, accuracy
    (test.py's per_class_table, <out>_per_class.csv)."""
    df = per_class if isinstance(per_class, pd.DataFrame) else pd.read_csv(per_class)
    missing = [c for c in PER_CLASS_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"per-class table: missing column(s) {', '.join(missing)}")
    df = df.assign(accuracy=pd.to_numeric(df["accuracy"], errors="coerce"))
    return df.sort_values(["accuracy", "images", "class_id"], ascending=[True, False, True], kind="stable") \
             .head(n)[PER_CLASS_COLUMNS].reset_index(drop=True)


def report_sections(metrics=None, recipe=None, curves=None, per_class=None, confusion=None, heatmaps=None,
                    top_losses=None, worst=WORST_CLASSES, boxes=None, boxes_caption="true box green, predicted red",
                    data=None, classes=None, batch=None, lr_find=None,
                    heatmaps_caption="highest-loss mistakes, then correct predictions, across classes",
                    top_losses_caption="the images with the highest loss"):
    """The standard sections, in order, leaving out each one that is None or whose file does not exist.
    `per_class`: a DataFrame or CSV path (the worst classes are shown, every class folded under them);
    `data`: a dict (the data folder, image counts); `classes`: the class list (class_table), folded when long;
    `recipe`: a resolved recipe (shown as tables, recipe_tables) or a dict; `lr_find`: [Png] of the LR range
    tests; the PNGs: paths (`batch`: augmented training images; `boxes`: test.py --draw-boxes' picture,
    `boxes_caption` saying what it shows; `heatmaps_caption`, `top_losses_caption` likewise)."""
    def png(path, caption):
        return Png(path, caption) if path is not None and Path(path).is_file() else None
    worst_table = every_class = None
    if isinstance(per_class, pd.DataFrame) or (per_class is not None and Path(per_class).is_file()):
        worst_table = worst_classes(per_class, worst)
        table = per_class if isinstance(per_class, pd.DataFrame) else pd.read_csv(per_class)
        if len(table) > len(worst_table):
            every_class = Details(f"all {len(table)} classes, worst first", table[PER_CLASS_COLUMNS])
    if data is not None and classes is not None:
        data = [data, collapsible(classes, f"the {len(classes)} classes")]
    lr_plots = [p for p in (lr_find or []) if p.path.is_file()] or None
    sections = [("Metrics", metrics), ("Data", data), ("Recipe", recipe_tables(recipe)),
                ("Training curves", png(curves, "losses and accuracy per epoch; learning rate per parameter group")),
                ("What the model sees: augmented training images",
                 png(batch, "one batch of the first stage as it trains: resized, cropped and augmented")),
                ("LR range test", lr_plots),
                (f"Worst {worst} classes" if worst_table is not None and len(worst_table) >= worst else "Classes by accuracy",
                 worst_table if every_class is None else [worst_table, every_class]),
                ("Confusion", png(confusion, "the classes with the most errors")),
                ("Boxes", png(boxes, boxes_caption)),
                ("Grad-CAM heatmaps", png(heatmaps, heatmaps_caption)),
                ("Top losses", png(top_losses, top_losses_caption))]
    return [(heading, body) for heading, body in sections if body is not None]


def render(body):
    """HTML for one section body: str → paragraph, dict → key/value table, DataFrame → table, Png → <img>,
    Details → a folded body, Wide → a body that scrolls sideways, a list → each in turn."""
    if isinstance(body, Png):
        if not body.path.is_file():
            raise UserError(f"{body.path}: no such image to put in the report")
        data = base64.b64encode(body.path.read_bytes()).decode("ascii")
        cap = f'<figcaption class="note">{html.escape(body.caption)}</figcaption>' if body.caption else ""
        return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(body.path.name, quote=True)}">'
                f"{cap}</figure>")
    if isinstance(body, Details):
        return f"<details><summary>{html.escape(str(body.summary))}</summary>{render(body.body)}</details>"
    if isinstance(body, Wide):
        return f'<div class="wide">{render(body.body)}</div>'
    if isinstance(body, pd.DataFrame):
        return body.to_html(index=False, escape=True, border=0, float_format=lambda v: f"{v:.4g}", na_rep="")
    if isinstance(body, dict):
        rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_value(v)}</td></tr>" for k, v in body.items())
        return f"<table>{rows}</table>"
    if isinstance(body, (list, tuple)):
        return "".join(render(b) for b in body)
    return f"<p>{html.escape(str(body))}</p>"


def _value(v):
    if isinstance(v, (dict, list, tuple)):
        text = json.dumps(v, default=str)
        return f"<pre>{html.escape(text if len(text) <= 80 else json.dumps(v, indent=1, default=str))}</pre>"
    if isinstance(v, float):
        return html.escape(f"{v:.6g}")
    return html.escape(str(v))


def write_report(path, title, sections):
    """Write `sections` [(heading, body)] as one HTML file at `path`, atomically; returns the path."""
    parts = [f"<h2>{html.escape(str(heading))}</h2>\n{render(body)}" for heading, body in sections]
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(str(title))}</title>'
            f"<style>{STYLE}</style></head>\n<body><h1>{html.escape(str(title))}</h1>\n" + "\n".join(parts) +
            "\n</body></html>\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, page)
    return path
