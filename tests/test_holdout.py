"""test.py on a model trained in the test: the printed accuracy is the predictions CSV's, the
same hold-out in three CSV formats scores the same, bad input gives its message, and a model
file carrying pickled code is refused without running it.
Models built by hand (no training) pin what the scores are about: labels matched by class id or name
for ids that are not 1..N, per-class accuracy and the confusion matrix by true class, and box crops
with the model's own margin on photos as displayed."""
import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from finegrained.errors import UserError
from conftest import PickleBomb, holdout_accuracy as score, run_script

from finegrained import evaluate, holdout
from finegrained.report import per_class_table


def test_printed_accuracy_is_the_predictions_csv(trained, prepared, tmp_path, capsys):
    acc, out = score(capsys, "--model", trained, "--folder", prepared, "--csv", prepared / "test.csv",
                     "--out", tmp_path / "p.csv", "--workers", 0)
    preds = pd.read_csv(tmp_path / "p.csv")
    assert len(preds) == len(pd.read_csv(prepared / "test.csv"))
    assert acc == round(float((preds["pred_id"] == preds["true_id"]).mean()), 4)
    assert acc == round(json.loads((trained / "metrics.json").read_text())["test_top1"], 4)  # as run.py scored it
    assert "top-5 accuracy:" in out and (tmp_path / "p_confusion.png").stat().st_size > 1000
    per_class = pd.read_csv(tmp_path / "p_per_class.csv")
    assert per_class["images"].sum() == len(preds)


def test_three_csv_formats_score_the_same(trained, prepared, layouts, tmp_path, capsys):
    test = pd.read_csv(prepared / "test.csv")
    folder = layouts["original"] / "cars_test"
    test["fname"] = test["filename"].str.replace("test/", "", regex=False)
    devkit = test[["fname", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class_id"]]
    devkit.to_csv(tmp_path / "devkit.csv", header=False, index=False)
    test[["fname", "class_name"]].rename(columns={"class_name": "label"}).to_csv(tmp_path / "names.csv", index=False)
    test[["fname", "class_id"]].sample(frac=1, random_state=0).to_csv(tmp_path / "shuffled.csv", index=False)
    scores = [score(capsys, "--model", trained, "--folder", folder, "--csv", tmp_path / "devkit.csv",
                    "--label-col", 5, "--out", tmp_path / "a.csv", "--workers", 0)[0],
              score(capsys, "--model", trained, "--folder", folder, "--csv", tmp_path / "names.csv",
                    "--out", tmp_path / "b.csv", "--workers", 0)[0],
              score(capsys, "--model", trained, "--folder", folder, "--csv", tmp_path / "shuffled.csv",
                    "--out", tmp_path / "c.csv", "--workers", 0)[0]]
    assert None not in scores and len(set(scores)) == 1
    assert len(pd.read_csv(tmp_path / "a.csv")) == len(test)  # no header row lost or invented
    shuffled = pd.read_csv(tmp_path / "shuffled.csv")
    assert pd.read_csv(tmp_path / "c.csv")["filename"].tolist() == shuffled["fname"].tolist()  # the CSV's order


def test_folder_and_single_image_predictions(trained, layouts, tmp_path, capsys):
    folder = layouts["original"] / "cars_test"
    acc, out = score(capsys, "--model", trained, "--folder", folder, "--out", tmp_path / "f.csv", "--workers", 0)
    assert acc is None and len(pd.read_csv(tmp_path / "f.csv")) == len(list(folder.glob("*.jpg")))
    acc, out = score(capsys, "--model", trained, "--folder", folder / "00001.jpg", "--out", tmp_path / "one.csv")
    assert "00001.jpg:" in out and len(pd.read_csv(tmp_path / "one.csv")) == 1


@pytest.fixture
def holdout_copy(layouts, prepared, tmp_path):
    folder = shutil.copytree(layouts["original"] / "cars_test", tmp_path / "imgs")
    test = pd.read_csv(prepared / "test.csv").head(10)
    test["filename"] = test["filename"].str.replace("test/", "", regex=False)
    test.to_csv(tmp_path / "h.csv", index=False)
    return folder, tmp_path / "h.csv"


def run_bad(trained, folder, csv, tmp_path, *extra):
    return holdout.main(["--model", str(trained), "--folder", str(folder), "--csv", str(csv),
                         "--out", str(tmp_path / "bad.csv"), "--workers", "0", *map(str, extra)])


def test_bad_rows_and_columns(trained, holdout_copy, tmp_path, capsys):
    folder, csv = holdout_copy
    df = pd.read_csv(csv)
    (folder / df["filename"][2]).unlink()
    with pytest.raises(UserError, match=rf"row 3: .*{df['filename'][2]}: file is missing"):
        run_bad(trained, folder, csv, tmp_path)
    bad = folder / df["filename"][4]
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(UserError, match=r"row 3: .*file is missing"):
        run_bad(trained, folder, csv, tmp_path)
    run_bad(trained, folder, csv, tmp_path, "--skip-bad")
    err = capsys.readouterr().err
    assert "row 5:" in err and "cannot be read as an image" in err and "skipped 2" in err
    assert len(pd.read_csv(tmp_path / "bad.csv")) == 8
    with pytest.raises(UserError, match="--label-col 'species' is not a column"):
        run_bad(trained, folder, csv, tmp_path, "--label-col", "species", "--overwrite")
    with pytest.raises(UserError, match="--label-col 9 is out of range"):
        run_bad(trained, folder, csv, tmp_path, "--label-col", "9", "--overwrite")
    df.loc[6, "class_id"] = 99
    df.to_csv(csv, index=False)
    with pytest.raises(UserError, match="row 7: label '99' is not a class of this model"):
        run_bad(trained, folder, csv, tmp_path, "--overwrite")
    csv.write_text("")
    with pytest.raises(UserError, match="the CSV is empty"):
        run_bad(trained, folder, csv, tmp_path, "--overwrite")


def test_existing_outputs_are_kept(trained, holdout_copy, tmp_path):
    folder, csv = holdout_copy
    (tmp_path / "bad.csv").write_text("mine")
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        run_bad(trained, folder, csv, tmp_path)
    assert (tmp_path / "bad.csv").read_text() == "mine"


def test_missing_or_incomplete_model(trained, holdout_copy, tmp_path):
    folder, csv = holdout_copy
    with pytest.raises(UserError, match="no such model folder"):
        run_bad(tmp_path / "nowhere", folder, csv, tmp_path)
    partial = shutil.copytree(trained, tmp_path / "partial")
    (partial / "model.json").unlink()
    with pytest.raises(UserError, match="incomplete model folder, model.json is missing"):
        run_bad(partial, folder, csv, tmp_path)


def test_model_file_with_pickled_code_is_refused(trained, holdout_copy, tmp_path, monkeypatch):
    folder, csv = holdout_copy
    tampered = shutil.copytree(trained, tmp_path / "tampered")
    with open(tampered / "model.safetensors", "wb") as f:
        pickle.dump({"weights": PickleBomb()}, f)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="not a safetensors file, refusing to load it"):
        run_bad(tampered, folder, csv, tmp_path)
    assert not (tmp_path / "PWNED").exists()


def test_tta_scores_every_row(trained, prepared, tmp_path, capsys):
    acc, _ = score(capsys, "--model", trained, "--folder", prepared, "--csv", prepared / "test.csv", "--tta",
                   "--out", tmp_path / "t.csv", "--workers", 0)
    preds = pd.read_csv(tmp_path / "t.csv")
    assert len(preds) == len(pd.read_csv(prepared / "test.csv")) and 0 <= acc <= 1
    assert acc == round(float(preds["correct"].mean()), 4)


def test_headerless_csv_with_missing_first_image_is_not_taken_for_a_header(trained, holdout_copy, tmp_path):
    folder, csv = holdout_copy
    df = pd.read_csv(csv)
    df[["filename", "class_id"]].to_csv(csv, header=False, index=False)
    (folder / df["filename"][0]).unlink()
    with pytest.raises(UserError, match=rf"row 1: .*{df['filename'][0]}: file is missing"):
        run_bad(trained, folder, csv, tmp_path, "--label-col", "1")


# ---------------------------------------------------------------- models built by hand, no training

def model_folder(folder, classes, size=32, favourite=None, **meta):
    """A model folder as run.py writes it, for `classes` [(id, name), ...]; with `favourite`, the model
    predicts that output index for every image (its last layer's weights zeroed, its bias pointing there)."""
    import torch
    from finegrained.models import build_model, save_trained
    torch.manual_seed(0)
    model = build_model("resnet18", len(classes))
    if favourite is not None:  # the head ends BatchNorm1d, Dropout, Linear (no bias): make the first give ones
        norm = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)][-1]
        last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            norm.weight.zero_()
            norm.bias.fill_(1.0)
            last.weight.zero_()
            last.weight[favourite] = 1.0
    save_trained(model, folder, {"arch": "resnet18", "classes": [{"id": i, "name": n} for i, n in classes],
                                 "image_size": size, "normalize": {"mean": [0.0] * 3, "std": [1.0] * 3}, **meta})
    return folder


SPARSE = [(3, "Alfa"), (7, "Bravo"), (10, "Charlie"), (12, "Delta")]  # class ids not 1..N, as a filtered dataset gives


def test_labels_are_matched_by_id_or_name_never_by_position():
    classes = [{"id": i, "name": n} for i, n in SPARSE]
    assert holdout.match_labels([12, 3, 7, 10], classes, "h.csv").tolist() == [3, 0, 1, 2]
    assert holdout.match_labels(["Delta", " alfa", "BRAVO", "10.0"], classes, "h.csv").tolist() == [3, 0, 1, 2]
    with pytest.raises(UserError, match=r"h.csv, row 2: label '2' is not a class of this model \(ids 3, 7, 10, 12"):
        holdout.match_labels([3, 2], classes, "h.csv")  # 2 is a position here, not a class
    with pytest.raises(UserError, match=r"h.csv, row 1: the label is empty"):
        holdout.match_labels([float("nan")], classes, "h.csv")


@pytest.mark.parametrize("column", ["class_id", "class_name"])
def test_sparse_class_ids_score_by_id_and_by_name(column, tmp_path, capsys):
    model = model_folder(tmp_path / "model", SPARSE, favourite=1)  # always says 7, Bravo
    labels = [12, 7, 3, 7, 10, 12]
    names = dict(SPARSE)
    for i in range(len(labels)):
        Image.new("RGB", (40, 40), (40 * i, 90, 160)).save(tmp_path / f"{i}.png")
    csv = pd.DataFrame({"filename": [f"{i}.png" for i in range(len(labels))], "class_id": labels,
                        "class_name": [names[i] for i in labels]})
    csv[["filename", column]].to_csv(tmp_path / "h.csv", index=False)
    acc, out = score(capsys, "--model", model, "--folder", tmp_path, "--csv", tmp_path / "h.csv",
                     "--out", tmp_path / "p.csv", "--workers", 0)
    assert acc == round(2 / 6, 4)  # the two images of class 7
    preds = pd.read_csv(tmp_path / "p.csv")
    assert preds["true_id"].tolist() == labels and preds["true_name"].tolist() == csv["class_name"].tolist()
    assert set(preds["pred_id"]) == {7} and set(preds["pred_name"]) == {"Bravo"}
    per_class = pd.read_csv(tmp_path / "p_per_class.csv").set_index("class_id")
    assert per_class["images"].to_dict() == {3: 1, 10: 1, 12: 2, 7: 2}
    assert per_class["accuracy"].to_dict() == {3: 0.0, 10: 0.0, 12: 0.0, 7: 1.0}


# A (id 3) is often predicted as B (id 7), B never as A; one C (id 10) as D (id 12).
TRUE = [0, 0, 0, 0, 1, 1, 2, 2, 2, 3]
PRED = [1, 1, 1, 0, 1, 1, 2, 2, 3, 3]
CONFUSION = [[1, 3, 0, 0],   # rows: true A, B, C, D; columns: predicted A, B, C, D
             [0, 2, 0, 0],
             [0, 0, 2, 1],
             [0, 0, 0, 1]]
PER_CLASS = [(3, "Alfa", 4, 1, 0.25), (10, "Charlie", 3, 2, 0.6667), (7, "Bravo", 2, 2, 1.0), (12, "Delta", 1, 1, 1.0)]


def test_confusion_matrix_and_per_class_table_are_about_the_true_class():
    classes = [{"id": i, "name": n} for i, n in SPARSE]
    assert evaluate.confusion(TRUE, PRED, 4).tolist() == CONFUSION
    table = per_class_table(TRUE, PRED, classes)
    assert list(table.columns) == ["class_id", "class_name", "images", "correct", "accuracy"]
    assert list(table.itertuples(index=False, name=None)) == PER_CLASS


@pytest.fixture
def drawn(monkeypatch):
    """Every (axes, matrix) the confusion PNG draws with imshow."""
    from matplotlib.axes import Axes
    seen, imshow = [], Axes.imshow

    def spy(self, matrix, *args, **kwargs):
        seen.append((self, np.asarray(matrix).copy()))
        return imshow(self, matrix, *args, **kwargs)
    monkeypatch.setattr(Axes, "imshow", spy)
    return seen


def test_written_per_class_csv_and_confusion_png_hold_the_hand_counts(tmp_path, drawn, capsys):
    import torch
    classes = [{"id": i, "name": n} for i, n in SPARSE]
    probs = torch.full((len(TRUE), 4), 0.1)
    probs[torch.arange(len(TRUE)), torch.tensor(PRED)] = 0.7
    df = pd.DataFrame({"filename": [f"{i}.png" for i in range(len(TRUE))]})
    scores = holdout.report(df, probs, classes, np.array(TRUE), tmp_path / "p.csv")
    assert (scores["top1"], scores["images"]) == (6 / 10, 10)
    assert "Alfa -> Bravo: 3" in capsys.readouterr().out  # the most confused pair, true -> predicted
    written = pd.read_csv(tmp_path / "p_per_class.csv")
    assert list(written.itertuples(index=False, name=None)) == PER_CLASS
    assert (tmp_path / "p_confusion.png").stat().st_size > 1000
    (ax, matrix), = drawn
    assert matrix.tolist() == CONFUSION
    assert (ax.get_ylabel(), ax.get_xlabel()) == ("true", "predicted")
    rows = [t.get_text() for t in ax.get_yticklabels()]
    assert rows == [f"{i}: {n}" for i, n in SPARSE] == [t.get_text() for t in ax.get_xticklabels()]
    # only the classes with the most errors: A (3 as true) and B (3 as predicted)
    holdout.confusion_png(np.array(TRUE), np.array(PRED), classes, tmp_path / "two.png", most=2)
    assert drawn[-1][1].tolist() == [[1, 3], [0, 2]]
    assert [t.get_text() for t in drawn[-1][0].get_yticklabels()] == ["3: Alfa", "7: Bravo"]


def test_box_crop_model_is_scored_on_its_own_margin_and_upright(tmp_path, scoring_batches, capsys):
    """test.py crops as the model was trained (model.json's bbox_margin, not the default), on the photo as
    displayed: here stored sideways with an EXIF orientation tag, the box given on the upright photo."""
    from conftest import save_stored_as
    upright = Image.fromarray(np.random.default_rng(1).integers(0, 256, (120, 160, 3), dtype=np.uint8))
    save_stored_as(upright, tmp_path / "car.png", 6)
    pd.DataFrame([{"filename": "car.png", "bbox_x1": 41, "bbox_y1": 31, "bbox_x2": 90, "bbox_y2": 80,
                   "class_id": 7}]).to_csv(tmp_path / "h.csv", index=False)
    model = model_folder(tmp_path / "model", SPARSE, size=40, crop_bbox=True, bbox_margin=0.3)
    score(capsys, "--model", model, "--folder", tmp_path, "--csv", tmp_path / "h.csv", "--out", tmp_path / "p.csv",
          "--workers", 0)
    ((_, _, dl),) = scoring_batches
    got = (dl.one_batch()[0][0].permute(1, 2, 0).cpu().numpy() * 255)  # normalize: mean 0, std 1

    def resized(region):
        return np.asarray(upright.crop(region).resize((40, 40), Image.Resampling.BILINEAR), dtype=float)
    assert np.abs(got - resized((40 - 15, 30 - 15, 90 + 15, 80 + 15))).mean() < 1  # 0.3 x 50 px on every side
    assert np.abs(got - resized((40 - 8, 30 - 8, 90 + 8, 80 + 8))).mean() > 10  # not the default margin 0.16


def test_heatmaps_top_losses_and_the_scoring_report(trained, prepared, tmp_path, capsys):
    from html.parser import HTMLParser
    import numpy as np
    from PIL import Image
    score(capsys, "--model", trained, "--folder", prepared, "--csv", prepared / "test.csv", "--heatmaps", 2,
          "--top-losses", 4, "--out", tmp_path / "p.csv", "--workers", 0)
    for name in ("p_heatmaps.png", "p_top_losses.png"):
        with Image.open(tmp_path / name) as im:
            assert np.asarray(im.convert("L"), dtype=float).std() > 10, name
    page = (tmp_path / "p_report.html").read_text()
    images = []

    class Collect(HTMLParser):
        def handle_starttag(self, tag, attrs):
            if tag == "img":
                images.append(dict(attrs))
    Collect().feed(page)
    import base64
    embedded = {a["alt"]: base64.b64decode(a["src"].split(",", 1)[1]) for a in images}
    for name in ("p_heatmaps.png", "p_top_losses.png", "p_confusion.png"):
        assert embedded[name] == (tmp_path / name).read_bytes(), name
    assert embedded["training_curves.png"] == (trained / "training_curves.png").read_bytes()
    with pytest.raises(UserError, match="--heatmaps and --top-losses need labels"):
        holdout.main(["--model", str(trained), "--folder", str(prepared / "test"), "--heatmaps", "2",
                      "--out", str(tmp_path / "q.csv")])


# classes named like numbers: data.py numbers class folders by sorted name, so folder 10 is id 2 and folder 2 id 3
NUMERIC = [(i + 1, name) for i, name in enumerate(sorted(["1", "2", "10"]))]
NUMERIC_TRUE = [2, 0, 2, 1, 2, 2]   # output indices: the folders 2, 1, 2, 10, 2, 2; the model always says folder 2


@pytest.fixture
def numeric_classes(tmp_path):
    assert NUMERIC == [(1, "1"), (2, "10"), (3, "2")]
    for i in range(len(NUMERIC_TRUE)):
        Image.new("RGB", (40, 40), (30 * i, 90, 160)).save(tmp_path / f"{i}.png")
    labels = pd.DataFrame({"filename": [f"{i}.png" for i in range(len(NUMERIC_TRUE))],
                           "class_id": [NUMERIC[t][0] for t in NUMERIC_TRUE],
                           "class_name": [NUMERIC[t][1] for t in NUMERIC_TRUE]})
    return model_folder(tmp_path / "model", NUMERIC, favourite=2), labels


@pytest.mark.parametrize("column, header, extra", [("class_name", "class_name", []), ("class_id", "class_id", []),
                                                   ("class_name", "label", ["--labels", "name"]),
                                                   ("class_id", "label", ["--labels", "id"]),
                                                   ("class_id", None, ["--label-col", 1, "--labels", "id"])])
def test_class_names_that_look_like_ids_are_read_as_the_column_says(numeric_classes, column, header, extra, tmp_path,
                                                                    capsys):
    model, labels = numeric_classes
    csv = labels[["filename", column]].rename(columns={column: header})
    csv.to_csv(tmp_path / "h.csv", index=False, header=header is not None)
    acc, _ = score(capsys, "--model", model, "--folder", tmp_path, "--csv", tmp_path / "h.csv", *extra,
                   "--out", tmp_path / "p.csv", "--workers", 0)
    assert acc == round(4 / 6, 4)   # the four images of folder 2 (id 3), by hand
    preds = pd.read_csv(tmp_path / "p.csv", dtype={"true_name": str})
    assert preds["true_id"].tolist() == labels["class_id"].tolist()
    assert preds["true_name"].tolist() == labels["class_name"].tolist()


def test_labels_that_read_both_ways_are_refused(numeric_classes, tmp_path, capsys):
    model, labels = numeric_classes
    both = labels.assign(label=["2", "1", "2", "2", "1", "2"])[["filename", "label"]]  # folder names, and class ids too
    both.to_csv(tmp_path / "label.csv", index=False)
    both.to_csv(tmp_path / "devkit.csv", index=False, header=False)
    message = r"row 1: label '2' is the class named '2' \(id 3\) or class id 2 \(named '10'\), and {} does not say which: " \
              r"pass --labels name or --labels id"
    with pytest.raises(UserError, match=message.format("column 'label'")):
        holdout.main(["--model", str(model), "--folder", str(tmp_path), "--csv", str(tmp_path / "label.csv"),
                      "--out", str(tmp_path / "p.csv")])
    with pytest.raises(UserError, match=message.format("the label column")):
        holdout.main(["--model", str(model), "--folder", str(tmp_path), "--csv", str(tmp_path / "devkit.csv"),
                      "--label-col", "1", "--out", str(tmp_path / "p.csv")])
    classes = [{"id": i, "name": n} for i, n in NUMERIC]
    with pytest.raises(UserError, match=r"row 2: label '3' is not a class name of this model \(names 1, 10, 2\); "
                                        r"column 'class_name' is read as class names, --labels id reads class ids"):
        holdout.match_labels(["2", "3"], classes, "h.csv", column="class_name")
    assert holdout.match_labels(["2", "3"], classes, "h.csv", column="label").tolist() == [1, 2]   # only ids fit
    assert holdout.match_labels(["2", "10"], classes, "h.csv", column="label").tolist() == [2, 1]  # only names fit


def test_labels_are_read_as_written(tmp_path):
    (tmp_path / "h.csv").write_text("filename,class_name\na.png,007\nb.png,7\n")
    df = holdout.read_holdout(tmp_path / "h.csv", tmp_path)
    assert df["label"].tolist() == ["007", "7"]
    classes = [{"id": 1, "name": "007"}, {"id": 2, "name": "7"}]
    assert holdout.match_labels(df["label"], classes, "h.csv", column=df.attrs["label_col"]).tolist() == [0, 1]


@pytest.mark.parametrize("args, message", [
    (["--bs", 0], r"^--bs takes 1 or more, got 0$"), (["--workers", -1], r"^--workers takes 0 or more, got -1$"),
    (["--heatmaps", -3], r"^--heatmaps takes 0 or more, got -3$"),
    (["--top-losses", -1], r"^--top-losses takes 0 or more, got -1$"),
    (["--draw-boxes", -2], r"^--draw-boxes takes 0 or more, got -2$")])
def test_bad_numbers_stop_with_one_line(args, message, tmp_path):
    with pytest.raises(UserError, match=message):
        holdout.main(["--model", str(tmp_path), "--folder", str(tmp_path), *map(str, args)])


def test_out_that_is_a_folder_stops_with_one_line(numeric_classes, tmp_path):
    model, labels = numeric_classes
    labels.to_csv(tmp_path / "h.csv", index=False)
    (tmp_path / "scores").mkdir()
    result = run_script("test.py", "--model", model, "--folder", tmp_path, "--csv", tmp_path / "h.csv",
                        "--out", tmp_path / "scores", "--overwrite", "--workers", 0)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --out {tmp_path / 'scores'} is a folder; --out names the predictions CSV file, "
        f"e.g. {tmp_path / 'scores' / 'predictions.csv'}"]
    assert list((tmp_path / "scores").iterdir()) == []


def test_heatmap_and_top_loss_panels_show_the_rows_their_captions_name(tmp_path, monkeypatch, capsys):
    """Each image is one solid colour: a panel's pixels say which row it shows, its caption which row it names."""
    from finegrained import explain
    drawn, grid = {}, explain._grid

    def spy(cells, columns, path, title):
        drawn[Path(path).name] = cells
        return grid(cells, columns, path, title)
    monkeypatch.setattr(explain, "_grid", spy)
    given, heatmaps = {}, explain.write_heatmaps   # the probabilities test.py computed, to choose the rows again here
    monkeypatch.setattr(explain, "write_heatmaps", lambda model, load, probs, true, *a, **k: (
        given.update(probs=np.asarray(probs), true=np.asarray(true)), heatmaps(model, load, probs, true, *a, **k))[1])
    folder = tmp_path / "imgs"
    folder.mkdir()
    colours = {f"{i:02d}.png": (20 * i, 250 - 20 * i, (70 * i) % 256) for i in range(12)}
    for name, colour in colours.items():
        Image.new("RGB", (40, 40), colour).save(folder / name)
    model = model_folder(tmp_path / "model", SPARSE)   # untrained: its predictions differ from colour to colour
    score(capsys, "--model", model, "--folder", folder, "--out", tmp_path / "first.csv", "--workers", 0)
    first = pd.read_csv(tmp_path / "first.csv")
    ids = [i for i, _ in SPARSE]
    labels = [p if k % 2 else ids[(ids.index(p) + 1) % 4] for k, p in enumerate(first["pred_id"])]  # half of them wrong
    pd.DataFrame({"filename": first["filename"], "class_id": labels}).to_csv(tmp_path / "h.csv", index=False)
    score(capsys, "--model", model, "--folder", folder, "--csv", tmp_path / "h.csv", "--heatmaps", 3, "--top-losses", 12,
          "--out", tmp_path / "p.csv", "--workers", 0)
    preds = pd.read_csv(tmp_path / "p.csv").set_index("filename")

    def panels(cells):
        """(file named by the caption, the rest of the caption, the panel's colour) of each image cell."""
        found = []
        for image, text, _ in cells:
            name, rest = text.split("\n", 1)
            assert np.abs(image - image.mean((0, 1))).max() < 0.01   # one solid colour
            found.append((name, rest, tuple(np.round(image.mean((0, 1)) * 255).astype(int))))
        return found
    heat = panels(drawn["p_heatmaps.png"][0::2])   # image, then its Grad-CAM overlay
    top = panels(drawn["p_top_losses.png"])
    for name, rest, colour in heat + top:
        assert colour == colours[name], name
        row = preds.loc[name]
        assert rest.startswith(f"true: {row['true_id']}: {dict(SPARSE)[row['true_id']]}\n"
                               f"pred: {row['pred_id']}: {dict(SPARSE)[row['pred_id']]}\np = {row['confidence']:.3f}"), name
    # mistakes by loss, correct ones by confidence, each taken a true class at a time (the best class first)
    preds["loss"] = -np.log(given["probs"][np.arange(len(preds)), given["true"]])   # rows in the CSV's order
    wrong = preds[~preds["correct"]].sort_values("loss", ascending=False, kind="stable")
    right = preds[preds["correct"]].sort_values("confidence", ascending=False, kind="stable")
    spread = [df.assign(round=df.groupby("true_id").cumcount(),
                        first=df["true_id"].map({c: k for k, c in enumerate(df["true_id"].drop_duplicates())}))
              .sort_values(["round", "first"], kind="stable").index[:3].tolist() for df in (wrong, right)]
    assert [name for name, _, _ in heat] == spread[0] + spread[1]
    assert len(set(preds.loc[spread[1], "true_id"])) == min(3, right["true_id"].nunique())   # across classes
    page = (tmp_path / "p_report.html").read_text()
    assert f"3 highest-loss mistakes (red, of {len(wrong)}), 3 correct (green)" in page   # the figure's title, as its caption
    assert sorted(name for name, _, _ in top) == sorted(colours)   # all 12 rows, by loss
    losses = [float(rest.rsplit("loss ", 1)[1]) for _, rest, _ in top]
    assert losses == sorted(losses, reverse=True)
    for name, rest, _ in top:
        if preds.loc[name, "correct"]:   # the true class is the predicted one: loss = -log(confidence)
            assert float(rest.rsplit("loss ", 1)[1]) == pytest.approx(-np.log(preds.loc[name, "confidence"]), abs=0.006)


# ---------------------------------------------------------------- class folders, predictions only, where outputs go

def class_folders(folder, counts):
    """folder/<name>/<k>.png for each name and count, every image of its own colour."""
    for j, (name, n) in enumerate(counts.items()):
        (folder / name).mkdir(parents=True)
        for k in range(n):
            Image.new("RGB", (40, 40), (40 * k, 50 * j, 160)).save(folder / name / f"{k}.png")
    return folder


def test_class_folders_are_scored_by_their_names(tmp_path, capsys):
    model = model_folder(tmp_path / "model", SPARSE, favourite=1)  # always says 7, Bravo
    folder = class_folders(tmp_path / "holdout", {"Alfa": 2, "bravo": 3, "Delta": 1})
    acc, out = score(capsys, "--model", model, "--folder", folder, "--out", tmp_path / "p.csv", "--workers", 0)
    assert acc == round(3 / 6, 4)   # the three images in bravo/, by hand
    preds = pd.read_csv(tmp_path / "p.csv")
    ids = {"alfa": 3, "bravo": 7, "delta": 12}
    assert preds["true_id"].tolist() == [ids[f.split("/")[0].lower()] for f in preds["filename"]]
    assert sorted(preds["true_id"]) == [3, 3, 7, 7, 7, 12] and "no labels scored" not in out


def test_class_folders_named_like_numbers_are_names(tmp_path, capsys):
    model = model_folder(tmp_path / "model", NUMERIC, favourite=2)  # always says folder 2 (id 3)
    folder = class_folders(tmp_path / "holdout", {"2": 3, "1": 2})   # both read as ids too: id 2 is folder 10
    acc, _ = score(capsys, "--model", model, "--folder", folder, "--out", tmp_path / "p.csv", "--workers", 0)
    assert acc == round(3 / 5, 4)   # the three images in 2/, by hand; read as ids, none would be right
    preds = pd.read_csv(tmp_path / "p.csv", dtype={"true_name": str})
    assert preds["true_name"].tolist() == [f.split("/")[0] for f in preds["filename"]]


def test_unknown_class_folders_stop_with_one_line(tmp_path, capsys):
    model = model_folder(tmp_path / "model", SPARSE)
    folder = class_folders(tmp_path / "holdout", {"Alfa": 1, "Echo": 1, "Foxtrot": 2})
    result = run_script("test.py", "--model", model, "--folder", folder, "--out", tmp_path / "p.csv", "--workers", 0)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {folder}: folders 'Echo', 'Foxtrot' are not class names of this model (names Alfa, Bravo, Charlie, "
        "Delta); name each class folder as its class, or pass --predict-only to predict every image"]
    assert not (tmp_path / "p.csv").exists()
    _, out = score(capsys, "--model", model, "--folder", folder, "--predict-only", "--out", tmp_path / "p.csv",
                   "--workers", 0)
    assert out.strip().splitlines()[-1] == "predicted 4 images, no labels scored: as --predict-only asks; drop it to score"


@pytest.fixture
def twelve_images(tmp_path):
    """(a model of SPARSE, a folder of 12 images, their devkit rows: file, x1, y1, x2, y2, class id)."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(12):
        Image.new("RGB", (40, 40), (20 * i, 250 - 20 * i, 90)).save(folder / f"{i:02d}.png")
    rows = pd.DataFrame({"filename": [f"{i:02d}.png" for i in range(12)], "x1": 3, "y1": 4, "x2": 30, "y2": 35,
                         "class_id": [SPARSE[i % 4][0] for i in range(12)]})
    return model_folder(tmp_path / "model", SPARSE), folder, rows


def test_predictions_only_when_asked_or_without_a_label_column_and_the_last_line_says_so(twelve_images, tmp_path, capsys):
    model, folder, rows = twelve_images
    rows.to_csv(tmp_path / "devkit.csv", header=False, index=False)
    common = ["--model", model, "--folder", folder, "--csv", tmp_path / "devkit.csv", "--workers", 0]
    with pytest.raises(UserError, match=r"devkit.csv: no label column found: the CSV has no header row to name it; "
                                        r"pass --label-col N \(a 0-based index, 0..5\) to score, or --predict-only"):
        score(capsys, *common, "--out", tmp_path / "p.csv")
    _, out = score(capsys, *common, "--predict-only", "--out", tmp_path / "p.csv")
    lines = out.strip().splitlines()
    assert lines[-1] == "predicted 12 images, no labels scored: as --predict-only asks; drop it to score"
    assert not [line for line in lines if re.match(r"\d\d\.png: ", line)]   # 12 are in the CSV, not one a line
    assert pd.read_csv(tmp_path / "p.csv")["filename"].tolist() == rows["filename"].tolist()
    rows[["filename"]].to_csv(tmp_path / "files.csv", index=False)   # only file names: clearly no labels
    _, out = score(capsys, "--model", model, "--folder", folder, "--csv", tmp_path / "files.csv", "--out", tmp_path / "q.csv",
                   "--workers", 0)
    assert out.strip().splitlines()[-1] == (f"predicted 12 images, no labels scored: {tmp_path / 'files.csv'} has no label "
                                            "column (only file names); add a class_id or class_name column to score")
    acc, out = score(capsys, *common, "--label-col", 5, "--out", tmp_path / "r.csv")
    assert acc is not None and "no labels scored" not in out


def test_the_default_out_lands_beside_the_model(twelve_images, tmp_path, monkeypatch, capsys):
    model, folder, rows = twelve_images
    rows[["filename", "class_id"]].to_csv(tmp_path / "h.csv", index=False)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    _, out = score(capsys, "--model", model, "--folder", folder, "--workers", 0)
    assert len(pd.read_csv(model / "predictions" / "imgs.csv")) == 12 and (model / "predictions" / "imgs_report.html").is_file()
    acc, out = score(capsys, "--model", model, "--folder", folder, "--csv", tmp_path / "h.csv", "--workers", 0)
    written = model / "predictions" / "h.csv"
    assert f"predictions: {written};" in out and len(pd.read_csv(written)) == 12
    with pytest.raises(UserError, match=rf"^{re.escape(str(written))}: already exists; pass --overwrite or choose another --out$"):
        score(capsys, "--model", model, "--folder", folder, "--csv", tmp_path / "h.csv", "--workers", 0)
    assert score(capsys, "--model", model, "--folder", folder, "--csv", tmp_path / "h.csv", "--overwrite", "--workers", 0)[0] == acc
    assert list(here.iterdir()) == []


def test_a_box_cell_that_is_not_a_number_is_one_line_and_labels_stay_as_written(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "labels.csv").write_text("filename,class_name,bbox_x1,bbox_y1,bbox_x2,bbox_y2\n"
                                         "a.jpg,007,1,2,30,40\nb.jpg,7,1,2,x3,40\n")
    with pytest.raises(UserError, match=r"labels\.csv: column 'bbox_x2' holds the boxes' bbox_x2, but .*x3"):
        holdout.read_holdout(tmp_path / "labels.csv", tmp_path)
    (tmp_path / "labels.csv").write_text("filename,class_name,bbox_x1,bbox_y1,bbox_x2,bbox_y2\n"
                                         "a.jpg,007,1,2,30,40\nb.jpg,7,1,2,,40\n")
    table = holdout.read_holdout(tmp_path / "labels.csv", tmp_path)
    assert table["label"].tolist() == ["007", "7"] and table["bbox_x2"].tolist()[0] == 30
    assert pd.isna(table["bbox_x2"][1]) and pd.api.types.is_numeric_dtype(table["bbox_x1"])
