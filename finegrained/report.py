"""One self-contained HTML report of a run or a scoring: metrics, the recipe, the figures embedded
as base64 data URIs (so the file opens offline, alone), the worst classes; all text escaped.

    sections = report_sections(metrics=..., recipe=..., curves=PNG, per_class=DataFrame, confusion=PNG,
                               boxes=PNG, heatmaps=PNG, top_losses=PNG)
    write_report("runs/NAME/report.html", "Run NAME", sections)

Hand-written because none of the project's libraries writes such a page: pandas renders the tables
(DataFrame.to_html, which escapes), html.escape the rest; no template engine is needed for one page."""
import base64
import html
import json
from pathlib import Path

import pandas as pd

from finegrained.errors import UserError

from finegrained.files import write_text

WORST_CLASSES = 20
PER_CLASS_COLUMNS = ["class_id", "class_name", "images", "correct", "accuracy"]
STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f4f4f4}img{max-width:100%;height:auto;border:1px solid #eee}pre{background:#f7f7f7;padding:.6em;overflow:auto}
.note{color:#666;font-size:.9em}"""


class Png:
    """A PNG to embed; `caption` is shown under it."""

    def __init__(self, path, caption=""):
        self.path, self.caption = Path(path), caption


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
                    top_losses=None, worst=WORST_CLASSES, boxes=None, boxes_caption="true box green, predicted red"):
    """The standard sections, in order, leaving out each one that is None or whose file does not exist.
    `per_class`: a DataFrame or CSV path; the PNGs: paths (`boxes`: test.py --draw-boxes' picture, `boxes_caption`
    saying what it shows)."""
    def png(path, caption):
        return Png(path, caption) if path is not None and Path(path).is_file() else None
    worst_table = None
    if isinstance(per_class, pd.DataFrame) or (per_class is not None and Path(per_class).is_file()):
        worst_table = worst_classes(per_class, worst)
    sections = [("Metrics", metrics), ("Recipe", recipe),
                ("Training curves", png(curves, "losses and accuracy per epoch; learning rate per parameter group")),
                (f"Worst {worst} classes" if worst_table is not None and len(worst_table) >= worst else "Classes by accuracy",
                 worst_table),
                ("Confusion", png(confusion, "the classes with the most errors")),
                ("Boxes", png(boxes, boxes_caption)),
                ("Grad-CAM heatmaps", png(heatmaps, "most confident mistakes, then correct predictions")),
                ("Top losses", png(top_losses, "the images with the highest loss"))]
    return [(heading, body) for heading, body in sections if body is not None]


def render(body):
    """HTML for one section body: str → paragraph, dict → key/value table, DataFrame → table, Png → <img>,
    a list → each in turn."""
    if isinstance(body, Png):
        if not body.path.is_file():
            raise UserError(f"{body.path}: no such image to put in the report")
        data = base64.b64encode(body.path.read_bytes()).decode("ascii")
        cap = f'<figcaption class="note">{html.escape(body.caption)}</figcaption>' if body.caption else ""
        return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(body.path.name, quote=True)}">'
                f"{cap}</figure>")
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
