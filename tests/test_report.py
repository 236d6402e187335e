"""Training curves, Grad-CAM heatmaps, top-loss grids and the HTML report: figures of the chosen
size that are not blank, maps equal to a Grad-CAM computed here by hand, the report self-contained."""
import base64
import json
import html.parser
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from finegrained import explain
from finegrained import plots
from finegrained import report
from finegrained.errors import UserError
from finegrained.models import build_model

STATS = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
RECIPE = [("frozen", 20, 224, "0.00111;0.00333;0.01"), ("unfrozen", 40, 224, "0.000333;0.001;0.003"),
          ("resized", 40, 299, "0.000333;0.001;0.003")]


def history(epochs=(20, 40, 40), valid=True):
    rows, k = [], 0
    for (stage, _, size, lrs), n in zip(RECIPE, epochs):
        for e in range(1, n + 1):
            k += 1
            rows.append({"stage": stage, "epoch": e, "size": size, "bs": 32, "lrs": lrs,
                         "train_loss": 5 * math.exp(-k / 20) + 0.1,
                         "valid_loss": 5 * math.exp(-k / 25) + 0.3 if valid else "",
                         "accuracy": 0.9 * (1 - math.exp(-k / 20)) if valid else "",
                         "top5_accuracy": 0.98 * (1 - math.exp(-k / 10)) if valid else "", "seconds": 3.0, "note": "x"})
    return pd.DataFrame(rows)


def png_pixels(path):
    with Image.open(path) as im:
        return im.size, np.asarray(im.convert("RGB"), dtype=np.float32)


def assert_png(path, size):
    got, pixels = png_pixels(path)
    assert got == size, (path, got)
    assert pixels.std() > 20, f"{path} looks blank (pixel std {pixels.std():.1f})"
    assert not list(path.parent.glob(".*.tmp*")), "a temporary file was left behind"


# ---------------------------------------------------------------- training curves

@pytest.mark.parametrize("epochs", [(20, 40, 40), (1, 1, 1)])
def test_training_curves_mark_stages_sizes_and_group_lrs(tmp_path, epochs):
    csv = tmp_path / "history.csv"
    history(epochs).to_csv(csv, index=False)
    data = plots.training_curves(csv, tmp_path / "training_curves.png")
    assert_png(tmp_path / "training_curves.png", (1000, 750))
    n1, n2, n3 = epochs
    assert list(data["x"]) == list(range(1, n1 + n2 + n3 + 1))
    assert data["stages"] == [("frozen", 1, n1), ("unfrozen", n1 + 1, n1 + n2), ("resized", n1 + n2 + 1, n1 + n2 + n3)]
    assert [(b, float(s)) for b, s in data["sizes"]] == [(0.5, 224.0), (n1 + n2 + 0.5, 299.0)]
    head = data["lrs"]["lrs"][3]  # the last group, the head: the stage's max lr
    assert list(head) == [0.01] * n1 + [0.003] * (n2 + n3)
    assert np.allclose(data["lrs"]["lrs"][1], np.array(head) / 9, rtol=0.01)
    assert set(data["series"]) == {"train_loss", "valid_loss", "accuracy", "top5_accuracy"}
    assert np.allclose(data["series"]["valid_loss"], pd.read_csv(csv)["valid_loss"])


def test_training_curves_without_validation_and_with_extra_columns(tmp_path):
    df = history((2, 3, 0), valid=False)
    df["lr"] = ["1e-3;2e-3"] * len(df)   # a future per-epoch column, two groups
    df["lrs_end"] = [f"{k}e-4;{k}e-3" for k in range(1, len(df) + 1)]   # the rate the schedule left
    df.to_csv(tmp_path / "h.csv", index=False)
    data = plots.training_curves(tmp_path / "h.csv", tmp_path / "c.png")
    assert_png(tmp_path / "c.png", (1000, 750))
    assert set(data["series"]) == {"train_loss"}       # the empty valid columns are left out
    assert list(data["lrs"]["lr"][2]) == [2e-3] * 5
    assert np.allclose(data["lrs"]["lrs_end"][1], [k * 1e-4 for k in range(1, 6)])
    assert [s[0] for s in data["stages"]] == ["frozen", "unfrozen"] and len(data["sizes"]) == 1
    before = (tmp_path / "c.png").read_bytes()
    plots.training_curves(df.iloc[:3], tmp_path / "c.png")   # rewritten after the next epoch
    assert (tmp_path / "c.png").read_bytes() != before


def test_training_curves_legend_names_the_column_each_line_plots(tmp_path, monkeypatch):
    from matplotlib.colors import to_rgba
    from matplotlib.figure import Figure
    saved, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (saved.append(fig), savefig(fig, *a, **k))[1])
    df = history((3, 4, 2))
    plots.training_curves(df, tmp_path / "c.png")
    (fig,) = saved
    columns = {"train loss": "train_loss", "valid loss": "valid_loss", "valid accuracy": "accuracy",
               "valid top-5 accuracy": "top5_accuracy"}   # what each legend entry must plot, from history.csv
    lines = [ln for ax in fig.axes for ln in ax.get_lines() if not ln.get_label().startswith("_")]
    for line in lines:
        assert np.allclose(line.get_ydata(), df[columns[line.get_label()]].astype(float)), line.get_label()
        assert list(line.get_xdata()) == list(range(1, len(df) + 1))
    legend = next(ax.get_legend() for ax in fig.axes if ax.get_legend() and "train loss" in
                  [t.get_text() for t in ax.get_legend().get_texts()])
    entries = list(zip([t.get_text() for t in legend.get_texts()], legend.legend_handles))
    assert sorted(label for label, _ in entries) == sorted(columns)
    for label, handle in entries:   # the entry's swatch is drawn like the line of that label's column
        (line,) = [ln for ln in lines if np.allclose(ln.get_ydata(), df[columns[label]].astype(float))]
        assert (to_rgba(handle.get_color()), handle.get_linestyle()) == (to_rgba(line.get_color()), line.get_linestyle()), label


def test_training_curves_bad_history(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(UserError, match="empty"):
        plots.training_curves(tmp_path / "empty.csv", tmp_path / "c.png")
    with pytest.raises(UserError, match="no train_loss"):
        plots.training_curves(pd.DataFrame({"epoch": [1]}), tmp_path / "c.png")
    with pytest.raises(UserError, match="no epochs"):
        plots.training_curves(history().iloc[:0], tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


# ---------------------------------------------------------------- Grad-CAM

def gradcam_by_hand(model, layer, x, classes):
    """ReLU(sum_k mean(dY_c/dA_k) A_k), min-max normalized per image, upsampled bilinearly to the input."""
    store = {}
    handle = layer.register_forward_hook(lambda m, i, out: store.update(a=out))
    try:
        maps = []
        for i, c in enumerate(classes):
            scores = model(x[i:i + 1])
            scores = scores[0] if isinstance(scores, tuple) else scores   # (class logits, box) of a localize head
            a = store["a"]
            (grad,) = torch.autograd.grad(scores[0, c], a)
            cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * a).sum(1))[0].detach()
            cam = (cam - cam.min()) / (cam.max() - cam.min() + 1e-8)
            maps.append(torch.nn.functional.interpolate(cam[None, None], size=x.shape[-2:], mode="bilinear",
                                                        align_corners=False)[0, 0])
        return torch.stack(maps)
    finally:
        handle.remove()


@pytest.mark.parametrize("arch, head, seed", [("resnet18", "concat", 0), ("resnet10t", "concat", 2),
                                              ("resnet18", "localize", 2)])
def test_gradcam_is_for_the_class_asked_on_the_last_stage(arch, head, seed):
    torch.manual_seed(seed)  # seeds where no map of these random weights is all zero (ReLU), checked below
    model = build_model(arch, 4, head=head).eval()
    layer = explain.cam_target_layer(model)
    expected_layer = model[0][-1] if arch == "resnet18" else model[0].model.layer4
    assert layer is expected_layer
    x = torch.randn(3, 3, 96, 96)
    classes = [2, 0, 3]
    maps = explain.gradcam_maps(model, x, classes)
    assert maps.shape == (3, 96, 96) and float(maps.min()) >= 0 and float(maps.max()) <= 1
    expected = gradcam_by_hand(model, expected_layer, x, classes)
    assert all(float(m.max()) > 0.5 for m in expected), "a degenerate (all-zero) map proves nothing"
    assert torch.allclose(maps, expected, atol=1e-4)
    other = gradcam_by_hand(model, expected_layer, x, [1, 1, 1])  # another class gives another map
    assert not torch.allclose(maps, other, atol=1e-2)
    earlier = model[0][-2] if arch == "resnet18" else model[0].model.layer3
    assert not torch.allclose(maps, gradcam_by_hand(model, earlier, x, classes), atol=1e-2)
    assert not model.training   # left in the mode it was in


def test_unknown_model_needs_a_layer():
    with pytest.raises(UserError, match="target_layer"):
        explain.cam_target_layer(torch.nn.Linear(3, 2))


def test_select_examples_and_top_losses():
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8],
                          [0.3, 0.25, 0.45], [0.05, 0.95, 0.0]])
    true = np.array([0, 0, 1, 2, 1, 1])
    mistakes, correct = explain.select_examples(probs, true, 2)
    # wrong: rows 1 (class 0, p(true) 0.2), 4 (class 1, 0.25), 2 (class 1, 0.3): highest loss first, a class at a time
    assert list(mistakes) == [1, 4] and list(correct) == [5, 0]
    losses, rows = explain.top_losses(probs, true, 3)
    ce = torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), torch.tensor(true), reduction="none")
    assert list(rows) == list(ce.argsort(descending=True)[:3].numpy())
    assert np.allclose(losses, ce[rows].numpy(), atol=1e-6)


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    """Heatmap and top-loss grids from an untrained resnet18 on 8 random images of 3 classes."""
    out = tmp_path_factory.mktemp("figures")
    torch.manual_seed(1)
    model = build_model("resnet18", 3).eval()
    x = torch.rand(8, 3, 64, 64)
    inputs = (x - torch.tensor(STATS[0]).view(1, 3, 1, 1)) / torch.tensor(STATS[1]).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = model(inputs).softmax(1)
    true = probs.argmax(1).numpy().copy()
    true[:4] = (true[:4] + 1) % 3        # four mistakes, four correct
    names = ["1: <b>AM General</b> Hummer SUV 2000", "2: Acura RL Sedan 2012", "3: Audi S4 Sedan 2007"]
    shown = explain.write_heatmaps(model, lambda rows: inputs[torch.as_tensor(rows)], probs, true, names, 3,
                                   out / "p_heatmaps.png", STATS)
    top = explain.write_top_losses(lambda rows: inputs[torch.as_tensor(rows)], probs, true, names, 5,
                                   out / "p_top_losses.png", STATS)
    return {"out": out, "probs": probs, "true": true, "shown": shown, "top": top}


def test_heatmap_and_top_loss_grids(figures):
    out, probs, true = figures["out"], figures["probs"], figures["true"]
    conf = probs.max(1).values.numpy()
    wrong = [i for i in np.argsort(-conf, kind="stable") if probs[i].argmax() != true[i]][:3]
    right = [i for i in np.argsort(-conf, kind="stable") if probs[i].argmax() == true[i]][:3]
    assert sorted(figures["shown"][:3]) == sorted(wrong) and sorted(figures["shown"][3:]) == sorted(right)
    # 6 examples x (image, map) = 12 cells, 4 to a row: 3 rows of 290 px images with 72 px of caption, a 40 px title
    assert_png(out / "p_heatmaps.png", (1160, 40 + 3 * 362))
    # 5 images, 4 to a row: two rows
    assert_png(out / "p_top_losses.png", (1160, 40 + 2 * 362))
    assert explain.grid_pixels(12, 4) == (1160, 1126)


def test_overlay_shows_the_map():
    image = torch.full((3, 32, 32), 0.5)
    cam = torch.zeros(32, 32)
    cam[:, 16:] = 1.0
    shown = explain.overlay(image, cam)
    left, right = shown[:, :8].mean((0, 1)), shown[:, -8:].mean((0, 1))
    assert right[0] > left[0] + 0.2 and left[2] > right[2] + 0.2   # jet: hot (red) where the map is high, blue where low


# ---------------------------------------------------------------- HTML report

class Page(html.parser.HTMLParser):
    """Tags, image sources, h2 headings and tables (rows of cell texts) of a page."""

    def __init__(self):
        super().__init__()
        self.tags, self.images, self.headings, self.tables, self.text = [], [], [], [], ""
        self.captions, self.details, self.title, self.h1 = [], [], "", ""   # figcaptions, <details> summaries
        self._heading = self._cell = self._other = None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag == "h2":
            self._heading = []
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag in ("figcaption", "summary", "title", "h1"):
            self._other = []

    def handle_endtag(self, tag):
        if tag == "h2":
            self.headings.append("".join(self._heading))
            self._heading = None
        elif tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag in ("figcaption", "summary", "title", "h1"):
            text = "".join(self._other)
            if tag in ("title", "h1"):
                setattr(self, tag, text)
            else:
                (self.captions if tag == "figcaption" else self.details).append(text)
            self._other = None

    def handle_data(self, data):
        self.text += data
        for part in (self._heading, self._cell, self._other):
            if part is not None:
                part.append(data)


def parse(path):
    page = Page()
    page.feed(Path(path).read_text())
    page.close()
    return page


def test_report_is_self_contained_and_escaped(figures, tmp_path):
    out = figures["out"]
    plots.training_curves(history((2, 2, 1)), out / "training_curves.png")
    Image.new("RGB", (60, 40), (200, 30, 30)).save(out / "p_confusion.png")
    rng = np.random.default_rng(0)
    per_class = pd.DataFrame({"class_id": range(1, 31), "class_name": [f"Car <script>alert({i})</script> & co" for i in range(30)],
                              "images": rng.integers(5, 20, 30)})
    per_class["correct"] = (per_class["images"] * rng.uniform(0, 1, 30)).astype(int)
    per_class["accuracy"] = (per_class["correct"] / per_class["images"]).round(4)
    metrics = {"test_top1": 0.9123, "test_top5": 0.99, "test_images": 8041}
    recipe = {"arch": "resnext50_32x4d", "stages": [{"name": "frozen", "epochs": 20}], "note": "<i>not italic</i>"}
    sections = report.report_sections(metrics=metrics, recipe=recipe, curves=out / "training_curves.png",
                                      per_class=per_class, confusion=out / "p_confusion.png",
                                      heatmaps=out / "p_heatmaps.png", top_losses=out / "missing_top_losses.png")
    sections.append(("Notes <em>", "trained on <script>alert('x')</script> & more"))
    path = report.write_report(tmp_path / "report.html", "Run <tiny> & co", sections)
    text = path.read_text()
    page = Page()
    page.feed(text)
    page.close()
    assert page.headings == ["Metrics", "Recipe", "Training curves", "Worst 20 classes", "Confusion", "Grad-CAM heatmaps",
                             "Notes <em>"]
    assert not {"script", "i", "b", "em"} & set(page.tags)   # all text escaped
    assert "trained on <script>alert('x')</script> & more" in page.text
    assert "<title>Run &lt;tiny&gt; &amp; co</title>" in text
    embedded = [base64.b64decode(src.split(",", 1)[1]) for src in page.images]
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    assert embedded == [(out / name).read_bytes() for name in ("training_curves.png", "p_confusion.png", "p_heatmaps.png")]
    assert "src=\"http" not in text and "href=" not in text       # nothing to fetch: opens offline
    # the worst 20 classes, worst first, computed here another way
    rows = sorted(per_class.itertuples(), key=lambda r: (r.accuracy, -r.images, r.class_id))[:20]
    metrics_table, recipe_table, stages_table, worst_table, all_classes = page.tables
    assert stages_table == [["name", "epochs"], ["frozen", "20"]]
    assert all_classes[0] == worst_table[0] and len(all_classes) == 31   # every class, folded under the worst 20
    assert page.details == ["all 30 classes, worst first"]
    assert worst_table[0] == ["class_id", "class_name", "images", "correct", "accuracy"]
    assert [int(row[0]) for row in worst_table[1:]] == [r.class_id for r in rows]
    assert [row[1] for row in worst_table[1:]] == [r.class_name for r in rows]   # escaped in the file, text here
    assert ["test_top1", "0.9123"] in metrics_table
    assert recipe_table[0] == ["arch", "resnext50_32x4d"] and ["note", "<i>not italic</i>"] in recipe_table


def test_worst_classes_needs_its_columns():
    with pytest.raises(UserError, match="accuracy"):
        report.worst_classes(pd.DataFrame({"class_id": [1], "class_name": ["a"], "images": [1], "correct": [1]}))


# ---------------------------------------------------------------- which examples, titled truthfully, readable

def probabilities(rows, n_classes=3):
    """(probs, true) from rows (true class, predicted class, p of the predicted class); the rest shared evenly."""
    probs = np.zeros((len(rows), n_classes), dtype=np.float32)
    for i, (_, pred, p) in enumerate(rows):
        probs[i] = (1 - p) / (n_classes - 1)
        probs[i, pred] = p
    return torch.tensor(probs), np.array([t for t, _, _ in rows])


def test_examples_are_drawn_across_classes():
    # class 0 holds the four most confident correct images and the two mistakes with the highest loss
    probs, true = probabilities([(0, 0, 0.99), (0, 0, 0.98), (0, 0, 0.97), (0, 0, 0.96), (1, 1, 0.7), (2, 2, 0.6),
                                 (0, 1, 0.99), (0, 2, 0.98), (1, 0, 0.9), (2, 0, 0.8)])
    mistakes, correct = explain.select_examples(probs, true, 3)
    # losses -log p(true): row 6 5.3, row 7 4.6, row 8 3.0, row 9 2.3; one per class a round, best class first
    assert list(mistakes) == [6, 8, 9] and list(correct) == [0, 4, 5]
    assert set(true[mistakes]) == set(true[correct]) == {0, 1, 2}
    mistakes, correct = explain.select_examples(probs, true, 6)
    assert list(mistakes) == [6, 8, 9, 7] and list(correct) == [0, 4, 5, 1, 2, 3]   # then the next round


@pytest.fixture
def drawn(monkeypatch):
    """{file name: (cells, title)} of every grid explain draws, with Grad-CAM stubbed (only the layout is tested)."""
    found, grid = {}, explain._grid
    monkeypatch.setattr(explain, "gradcam_maps", lambda model, x, classes, layer=None: torch.zeros(len(x), *x.shape[-2:]))
    monkeypatch.setattr(explain, "_grid", lambda cells, columns, path, title: (found.__setitem__(Path(path).name, (cells, title)),
                                                                              grid(cells, columns, path, title))[1])
    return found


@pytest.mark.parametrize("case", ["no mistakes", "all wrong", "both"])
def test_heatmap_and_top_loss_titles_are_true(tmp_path, drawn, case):
    rows = {"no mistakes": [(0, 0, 0.9), (1, 1, 0.8), (2, 2, 0.7), (0, 0, 0.6)],
            "all wrong": [(0, 1, 0.9), (1, 2, 0.8), (2, 0, 0.7), (0, 2, 0.6)],
            "both": [(0, 0, 0.9), (1, 1, 0.8), (2, 0, 0.7), (0, 2, 0.6), (1, 0, 0.5)]}[case]
    probs, true = probabilities(rows)
    load = lambda r: torch.rand(len(r), 3, 32, 32)   # noqa: E731
    names = ["a", "b", "c"]
    explain.write_heatmaps(None, load, probs, true, names, 2, tmp_path / "h.png", STATS)
    explain.write_top_losses(load, probs, true, names, 4, tmp_path / "t.png", STATS)
    (heat_cells, heat), (_, top) = drawn["h.png"], drawn["t.png"]
    red = [c for _, _, c in heat_cells[0::2] if c == "#b00020"]
    if case == "no mistakes":
        assert heat == "Grad-CAM: no mistakes among the 4 images; 2 correct (green), from 2 classes" and not red
        assert top.endswith("(0 of them misclassified)")
    elif case == "all wrong":
        assert heat == "Grad-CAM: 2 highest-loss mistakes (red, of 4), from 2 classes; no image was classified correctly"
        assert len(red) == 2 and top.endswith("(4 of them misclassified)")
    else:
        assert heat == "Grad-CAM: 2 highest-loss mistakes (red, of 3), 2 correct (green), from 3 classes" and len(red) == 2
        assert top.endswith("(3 of them misclassified)")


@pytest.mark.parametrize("columns, cells", [(2 * explain.HEATMAP_COLUMNS, 12), (explain.TOP_LOSS_COLUMNS, 7)])
def test_grid_captions_are_readable_in_the_report(tmp_path, monkeypatch, columns, cells):
    """Captions at least 11 px high as the report shows the PNG (scaled down only past its content width), and each no
    wider than its cell, with Stanford Cars' longest class names (cut to caption()'s 30 characters) and a long path."""
    from matplotlib.figure import Figure
    figures, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), savefig(fig, *a, **k))[1])
    text = explain.caption("184: Rolls-Royce Phantom Drophead Coupe Convertible 2012",
                           "117: Mercedes-Benz Sprinter Van 2012 Extended", 0.123, 4.56, file="stanford_cars/cars_test/08041.jpg")
    width, height = explain._grid([(np.random.rand(40, 60, 3), text, "black")] * cells, columns, tmp_path / "g.png", "T" * 60)
    (fig,) = figures
    assert (width, height) == png_pixels(tmp_path / "g.png")[0]
    shown = min(1.0, report.CONTENT_PX / width)           # the report's img{max-width:100%} scales a wider one down
    assert f"max-width:{report.CONTENT_PX}px" in report.STYLE and "figure{margin:1em 0}" in report.STYLE
    texts = [t for ax in fig.axes for t in ax.texts]
    assert len(texts) == cells and len(fig.texts) == 1
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    renderer = FigureCanvasAgg(fig).get_renderer()   # the one savefig drew the PNG with
    for t in texts + fig.texts:
        assert t.get_fontsize() * fig.dpi / 72 * shown >= 11, t.get_text()
    for t in texts:
        assert t.get_window_extent(renderer).width <= explain.CELL_INCHES * fig.dpi, t.get_text()
    assert fig.texts[0].get_window_extent(renderer).width <= width


# ---------------------------------------------------------------- the LR range test's plot

def test_lr_find_plot_marks_each_suggestion_at_the_value_printed(tmp_path, monkeypatch):
    from fastai.callback.schedule import minimum, slide, steep, valley
    from matplotlib.figure import Figure
    figures, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), savefig(fig, *a, **k))[1])
    lrs = np.geomspace(1e-7, 10, 100)
    losses = 2.5 - 1.5 / (1 + np.exp(-(np.log10(lrs) + 4) * 2)) + np.exp((np.log10(lrs) - 0.2) * 3)   # falls, then blows up
    window = torch.tensor(lrs[10:-5]), torch.tensor(losses[10:-5])   # what fastai's lr_find hands its functions
    found = {f.__name__: float(f(*window, 100)[0]) for f in (valley, steep, minimum, slide)}
    dots = plots.lr_find_plot(lrs, losses, found, "valley", tmp_path / "p.png", "LR range test")
    (fig,) = figures
    ax = fig.axes[0]
    marks = {ln.get_label(): (float(ln.get_xdata()[0]), float(ln.get_ydata()[0])) for ln in ax.get_lines()
             if len(ln.get_xdata()) == 1 and not ln.get_label().startswith("_")}
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    for name, lr in found.items():   # each dot sits at the very lr printed, on the curve, its label saying what it marks
        (label,) = [k for k in marks if k.startswith(f"{name} {lr:.3g}: ")]
        assert marks[label][0] == pytest.approx(lr) and label in legend and plots.SUGGESTIONS[name] in label
        assert marks[label][1] == pytest.approx(np.interp(np.log(lr), np.log(lrs[:-5]), losses[:-5])) == dots[name][1]
    (low,) = [k for k in marks if k.startswith("lowest loss")]
    assert marks[low][0] == pytest.approx(10 * found["minimum"])        # fastai's minimum: a tenth of the lowest loss's lr
    assert window[0][window[1].argmin()].item() == pytest.approx(10 * found["minimum"])
    assert [k for k in legend if "printed as the run.py flag" in k] == [f"valley {found['valley']:.3g}: {plots.SUGGESTIONS['valley']}"
                                                                      " — printed as the run.py flag (dashed line)"]
    (dashed,) = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert float(dashed.get_xdata()[0]) == pytest.approx(found["valley"])


# ---------------------------------------------------------------- the run's report

def test_batch_grid_shows_one_augmented_batch_without_touching_the_run(prepared, tmp_path, monkeypatch):
    from matplotlib.figure import Figure
    from finegrained.data import get_dls
    from finegrained.prepare.tables import class_names, read_table
    figures, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), savefig(fig, *a, **k))[1])
    df = read_table(prepared / "train.csv")
    dls = get_dls(df, size=32, bs=6, workers=0)
    states = torch.get_rng_state(), dls.train.rng.getstate(), np.random.get_state()[1].copy()
    count, size = plots.batch_grid(dls.train, tmp_path / plots.BATCH_PNG, class_names(df))
    assert count == 6 and size == (4 * 240, 2 * 240 + 55)   # 6 images of the batch, 4 to a row, 240 px each, a title
    assert_png(tmp_path / plots.BATCH_PNG, size)
    after = torch.get_rng_state(), dls.train.rng.getstate(), np.random.get_state()[1]
    assert torch.equal(states[0], after[0]) and states[1] == after[1] and (states[2] == after[2]).all()   # the run trains as before
    (fig,) = figures
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 6 and len(fig.axes) == 8
    names = class_names(df)
    for ax in shown:   # 32 px images, augmented as they train, each titled by its class id and name
        assert ax.images[0].get_array().shape[:2] == (32, 32)
        cid, name = ax.get_title().split(": ", 1)
        assert names[int(cid)] == name or (name.endswith("…") and names[int(cid)].startswith(name[:-1]))   # long ones cut
    assert "6 training images at 32 px, augmented" in fig.texts[0].get_text()


def test_run_report_names_the_run_and_shows_recipe_data_classes_and_results(tmp_path):
    import collections
    from finegrained import recipe as recipes
    from finegrained import runner as run
    out = tmp_path / "run"
    out.mkdir()
    plots.training_curves(history((2, 2, 1)), out / "training_curves.png")
    Image.new("RGB", (96, 64), (20, 150, 40)).save(out / plots.BATCH_PNG)   # batch_grid's own test draws the real one
    Image.new("RGB", (80, 60), (150, 20, 40)).save(out / plots.LR_FIND_PNG.format(stage="frozen"))
    command = "python run.py --arch resnet18 --lr 0.002,0.004"
    (out / plots.LR_FIND_JSON.format(stage="frozen")).write_text(json.dumps({"valley": 0.002, "used": "valley", "run": command}))
    recipe = recipes.resolve(recipes.load()[1], {"arch": "resnet18", "lr": [0.02, 0.004]})
    rng = np.random.default_rng(3)
    classes = [{"id": 10 + i, "name": f"Car <{i}> & co"} for i in range(25)]
    train = pd.DataFrame({"class_id": rng.choice([c["id"] for c in classes], 200)})
    test = pd.DataFrame({"class_id": rng.choice([c["id"] for c in classes], 120)})
    true = test["class_id"].to_numpy() - 10                       # model output indices
    pred = np.where(rng.uniform(size=120) < 0.6, true, rng.integers(0, 25, 120))
    metrics = {"test_top1": float((true == pred).mean())}
    run.write_run_report(out, recipe, metrics, tmp_path / "my_cars", train, test, classes, (true, pred))
    page = parse(out / "report.html")
    assert page.title == page.h1 == "resnet18 · fastai_resnext50 · my_cars"
    assert page.headings == ["Metrics", "Data", "Recipe", "Training curves", "What the model sees: augmented training images",
                             "LR range test", "Worst 20 classes"]
    tables = {tuple(t[0]): t for t in page.tables}
    stages = next(t for header, t in tables.items() if header[:2] == ("name", "epochs"))
    head = stages[0]
    assert [r[0] for r in stages[1:]] == ["frozen", "unfrozen", "resized"]
    assert [float(r[head.index("lr")]) for r in stages[1:]] == [0.02, 0.004, 0.004]
    assert [float(r[head.index("trained_lr")]) for r in stages[1:]] == [0.02, 0.004, 0.004]
    assert [int(r[head.index("size")]) for r in stages[1:]] == [224, 224, 299]
    assert ["arch", "resnet18"] in next(t for t in page.tables if ["name", "fastai_resnext50"] in t)
    assert ["data folder", str((tmp_path / "my_cars").resolve())] in next(t for t in page.tables if t[0][0] == "data folder")
    listed = tables[("class_id", "class_name", "train images", "test images")]
    train_counts, test_counts = collections.Counter(train["class_id"]), collections.Counter(test["class_id"])
    assert [(int(r[0]), r[1], int(r[2]), int(r[3])) for r in listed[1:]] == [
        (c["id"], c["name"], train_counts[c["id"]], test_counts[c["id"]]) for c in classes]
    assert "the 25 classes" in page.details and "all 25 classes, worst first" in page.details   # folded: longer than 20
    every = [t for t in page.tables if t[0] == ["class_id", "class_name", "images", "correct", "accuracy"]][-1]
    assert len(every) == 26
    for cid, name, images, correct, accuracy in every[1:]:   # counted here from the predictions
        k = int(cid) - 10
        assert name == classes[k]["name"] and int(images) == (true == k).sum() == test_counts[int(cid)]
        assert int(correct) == ((true == k) & (pred == k)).sum() and float(accuracy) == pytest.approx(int(correct) / int(images), abs=1e-4)
    embedded = [base64.b64decode(src.split(",", 1)[1]) for src in page.images]
    assert embedded == [(out / n).read_bytes() for n in ("training_curves.png", plots.BATCH_PNG, "loss_plot_frozen.png")]
    assert f"frozen: suggested valley 0.002; {command}" in page.captions
    (out / "loss_plot_frozen.png").unlink()   # no LR range test here: no section
    run.write_run_report(out, recipe, metrics, tmp_path / "my_cars", train, test, classes, (true, pred))
    assert "LR range test" not in parse(out / "report.html").headings
