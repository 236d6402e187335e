"""Training curves, Grad-CAM heatmaps, top-loss grids and the HTML report: figures of the chosen
size that are not blank, maps equal to a Grad-CAM computed here by hand, the report self-contained."""
import base64
import html.parser
import math

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
    assert list(mistakes) == [1, 2] and list(correct) == [5, 0]   # wrong: rows 1 (0.7), 2 (0.6), 4 (0.45)
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
    assert list(figures["shown"]) == wrong + right
    # 6 examples x (image, map) = 12 cells, 8 to a row: 2 rows of 200 x 255 px cells
    assert_png(out / "p_heatmaps.png", (1600, 510))
    # 5 images, 6 to a row: one row
    assert_png(out / "p_top_losses.png", (1000, 255))
    assert explain.grid_pixels(12, 8) == (1600, 510)


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
        self._heading = self._cell = None

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

    def handle_endtag(self, tag):
        if tag == "h2":
            self.headings.append("".join(self._heading))
            self._heading = None
        elif tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        self.text += data
        for part in (self._heading, self._cell):
            if part is not None:
                part.append(data)


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
    metrics_table, recipe_table, worst_table = page.tables
    assert worst_table[0] == ["class_id", "class_name", "images", "correct", "accuracy"]
    assert [int(row[0]) for row in worst_table[1:]] == [r.class_id for r in rows]
    assert [row[1] for row in worst_table[1:]] == [r.class_name for r in rows]   # escaped in the file, text here
    assert ["test_top1", "0.9123"] in metrics_table
    assert recipe_table[1][0] == "stages" and '"epochs": 20' in recipe_table[1][1]


def test_worst_classes_needs_its_columns():
    with pytest.raises(UserError, match="accuracy"):
        report.worst_classes(pd.DataFrame({"class_id": [1], "class_name": ["a"], "images": [1], "correct": [1]}))
