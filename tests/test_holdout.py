"""test.py on a model trained in the test: the printed accuracy is the predictions CSV's, the
same hold-out in three CSV formats scores the same, bad input gives its message, and a model
file carrying pickled code is refused without running it."""
import importlib.util
import json
import pickle
import re
import shutil

import pandas as pd
import pytest

from cli import UserError
from conftest import PickleBomb, ROOT

spec = importlib.util.spec_from_file_location("holdout", ROOT / "test.py")  # `import test` would be the stdlib's
holdout = importlib.util.module_from_spec(spec)
spec.loader.exec_module(holdout)


def score(capsys, *args):
    holdout.main([str(a) for a in args])
    out = capsys.readouterr().out
    match = re.search(r"^accuracy: ([0-9.]+)$", out, re.M)
    return float(match.group(1)) if match else None, out


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
