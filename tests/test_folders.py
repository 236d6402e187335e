"""`data.py --dataset folders`: a user's own class folders, split into train/ and test/ or split here (stratified,
reproducible), class ids in sorted folder order, names kept as they are, symbolic links followed, and each bad
input one clear line."""
import os
import shutil

import pandas as pd
import pytest
from PIL import Image

from cli import UserError
from conftest import run_script
from data import prepare

CLASSES = ["Zephyr (2019)", "alpha & omega", "Mid/Size? no", "beta 2"]  # spaces, punctuation, mixed case


def make_folders(root, per_class=(5, 2), split=True):
    for k, name in enumerate(CLASSES):
        safe = name.replace("/", "-")
        for split_name, n in zip(("train", "test"), per_class):
            folder = root / split_name / safe if split else root / safe
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (40 + i, 30), (40 * k, 20 * i, 90)).save(folder / f"{split_name}_{i}.jpg")
    return root


def test_train_and_test_folders_keep_names_and_sorted_ids(tmp_path):
    src = make_folders(tmp_path / "src")
    dest = prepare("folders", tmp_path / "data", [src], name="mine")
    assert dest == tmp_path / "data" / "mine"
    train, test = pd.read_csv(dest / "train.csv"), pd.read_csv(dest / "test.csv")
    names = sorted(n.replace("/", "-") for n in CLASSES)
    assert dict(zip(train["class_name"], train["class_id"])) == {n: i + 1 for i, n in enumerate(names)}
    assert (len(train), len(test)) == (5 * 4, 2 * 4)
    for row in test.itertuples():  # every row is the image of its own class folder
        assert (dest / row.filename).resolve() == (src / "test" / row.class_name / row.filename.split("/")[-1]).resolve()
    assert train[["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"]].isna().all().all()


def test_one_folder_is_split_stratified_and_reproducibly(tmp_path):
    src = make_folders(tmp_path / "src", per_class=(10, 0), split=False)
    dest = prepare("folders", tmp_path / "a", [src], name="x", test_pct=0.3, seed=1)
    test = pd.read_csv(dest / "test.csv")
    assert test["class_id"].value_counts().to_dict() == {1: 3, 2: 3, 3: 3, 4: 3}  # 30 % of each class
    train = pd.read_csv(dest / "train.csv")
    assert not set(train["filename"]) & set(test["filename"]) and len(train) + len(test) == 40
    again = pd.read_csv(prepare("folders", tmp_path / "b", [src], name="x", test_pct=0.3, seed=1) / "test.csv")
    other = pd.read_csv(prepare("folders", tmp_path / "c", [src], name="x", test_pct=0.3, seed=2) / "test.csv")
    assert again["filename"].tolist() == test["filename"].tolist() != other["filename"].tolist()


def test_symlinked_folders_are_followed(tmp_path, layouts, prepared):
    real = make_folders(tmp_path / "real")
    src = tmp_path / "src"
    src.mkdir()
    os.symlink(real / "train", src / "train")
    os.symlink(real / "test", src / "test")
    assert len(pd.read_csv(prepare("folders", tmp_path / "d", [src], name="n") / "train.csv")) == 20
    cars = shutil.copytree(layouts["original"], tmp_path / "cars", ignore=shutil.ignore_patterns("devkit"))
    os.symlink(layouts["original"] / "devkit", cars / "devkit")  # a devkit folder that is a link
    dest = prepare("cars", tmp_path / "e", [cars])
    assert len(pd.read_csv(dest / "train.csv")) == len(pd.read_csv(prepared / "train.csv"))


def test_bad_inputs_are_one_clear_line_each(tmp_path):
    src = make_folders(tmp_path / "src")
    (src / "test" / "only in test").mkdir()
    Image.new("RGB", (9, 9)).save(src / "test" / "only in test" / "a.jpg")
    with pytest.raises(UserError, match="class 'only in test' is in test but not in train"):
        prepare("folders", tmp_path / "o1", [src], name="n")
    shutil.rmtree(src / "test" / "only in test")
    (src / "train" / "empty").mkdir()
    (src / "test" / "empty").mkdir()
    with pytest.raises(UserError, match=r"train/empty: empty class folder"):
        prepare("folders", tmp_path / "o2", [src], name="n")
    (src / "train" / "empty").rmdir()
    (src / "test" / "empty").rmdir()
    (src / "train" / "beta 2" / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match=r"notes\.txt: not an image file"):
        prepare("folders", tmp_path / "o3", [src], name="n")
    (src / "train" / "beta 2" / "notes.txt").unlink()
    (src / "train" / "beta 2" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(UserError, match=r"broken\.jpg: cannot be read as an image"):
        prepare("folders", tmp_path / "o4", [src], name="n")
    with pytest.raises(UserError, match="needs --name"):
        prepare("folders", tmp_path / "o5", [src])
    result = run_script("data.py", "--dataset", "folders", "--source", src / "train", "--name", "n", "--root", tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {src / 'train'}: one folder of class folders; pass --test-pct (for example 0.2) to split it into "
        "train and test, or give it train/ and test/ folders"]


def test_imported_folders_train(tmp_path):
    import run
    src = make_folders(tmp_path / "src", per_class=(8, 3))
    dest = prepare("folders", tmp_path / "data", [src], name="mine")
    run.main(["--data", str(dest), "--recipe", "resnets_sgd", "--arch", "resnet18", "--no-pretrained", "--epochs", "1",
              "--sizes", "32", "--bs", "8", "--workers", "0", "--out", str(tmp_path / "run")])
    import json
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert [c["name"] for c in meta["classes"]] == sorted(n.replace("/", "-") for n in CLASSES)
