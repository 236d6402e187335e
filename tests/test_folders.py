"""`data.py --dataset folders`: a user's own class folders, split into train/ and test/ or split here (stratified,
reproducible), class ids in sorted folder order, names kept as they are, symbolic links followed, and each bad
input one clear line."""
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from finegrained.errors import UserError
from conftest import run_script
from finegrained.prepare.dataset import prepare

CLASSES = ["Zephyr (2019)", "alpha & omega", "Mid/Size? no", "beta 2"]  # spaces, punctuation, mixed case


def make_folders(root, per_class=(5, 2), split=True, blue=90):
    for k, name in enumerate(CLASSES):
        safe = name.replace("/", "-")
        for split_name, n in zip(("train", "test"), per_class):
            folder = root / split_name / safe if split else root / safe
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (40 + i, 30), (40 * k, 20 * i, blue)).save(folder / f"{split_name}_{i}.jpg")
    return root


def real_files(dest, split):
    """{real path of each row's image: class name} of a prepared split."""
    df = pd.read_csv(dest / f"{split}.csv")
    return {os.path.realpath(dest / f): name for f, name in zip(df["filename"], df["class_name"])}


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
    for name, n in zip(CLASSES, (10, 7, 5, 2)):  # classes of different sizes
        for extra in sorted((src / name.replace("/", "-")).iterdir())[n:]:
            extra.unlink()
    source = {os.path.realpath(p): p.parent.name for p in src.glob("*/*")}  # listed here, not by prepare/walk.py
    assert len(source) == 24

    def split(root, seed):
        dest = prepare("folders", root, [src], name="x", test_pct=0.3, seed=seed)
        return real_files(dest, "train"), real_files(dest, "test")

    train, test = split(tmp_path / "a", 1)
    assert not set(train) & set(test)  # no image in both splits
    assert {**train, **test} == source  # every source image once, under its own class
    # 30 % of each class, rounded, and at least one image on each side: 10 -> 3, 7 -> 2, 5 -> 2 (1.5), 2 -> 1
    assert Counter(test.values()) == {n.replace("/", "-"): k for n, k in zip(CLASSES, (3, 2, 2, 1))}
    again, other = split(tmp_path / "b", 1), split(tmp_path / "c", 2)
    assert again == (train, test) and set(other[1]) != set(test)


def test_preparing_again_from_a_new_source_links_the_new_images(tmp_path):
    s1, s2 = make_folders(tmp_path / "s1", blue=0), make_folders(tmp_path / "s2", blue=250)  # same names, other pixels
    dest = prepare("folders", tmp_path / "data", [s1], name="X")
    for split in ("train", "test"):
        (dest / f"{split}.csv").unlink()  # the documented way to prepare again
    assert prepare("folders", tmp_path / "data", [s2], name="X") == dest
    for split in ("train", "test"):
        rows = pd.read_csv(dest / f"{split}.csv")
        assert len(rows) == 4 * (5 if split == "train" else 2)
        for f in rows["filename"]:
            real = Path(os.path.realpath(dest / f))
            assert real.is_relative_to(s2.resolve())
            with Image.open(dest / f) as im, Image.open(s2 / f) as want:
                assert np.array_equal(np.asarray(im), np.asarray(want))


def test_link_loops_in_a_class_folder_are_refused(tmp_path):
    src = make_folders(tmp_path / "src", per_class=(3, 0), split=False)
    assert len(pd.read_csv(prepare("folders", tmp_path / "ok", [src], name="n", test_pct=0.4) / "train.csv")) == 8
    loop = src / "beta 2" / "loop"
    os.symlink("..", loop)  # leads to the source folder: the other classes' images under "beta 2"
    with pytest.raises(UserError, match="^" + re.escape(f"{loop}: a symbolic link to {src.resolve()}, which holds "
                                                        "the link itself (a loop)")):
        prepare("folders", tmp_path / "o1", [src], name="n", test_pct=0.4)
    loop.unlink()
    os.symlink(".", src / "beta 2" / "self")  # the class folder itself
    with pytest.raises(UserError, match=r"beta 2/self: a symbolic link to .* \(a loop\)"):
        prepare("folders", tmp_path / "o2", [src], name="n", test_pct=0.4)
    (src / "beta 2" / "self").unlink()
    os.symlink(src, src / "everything")  # a class folder that is the source folder again
    with pytest.raises(UserError, match=r"src/everything: a symbolic link to .* \(a loop\)"):
        prepare("folders", tmp_path / "o3", [src], name="n", test_pct=0.4)
    (src / "everything").unlink()
    os.symlink(src / "beta 2", src / "alpha & omega" / "more")  # another real folder, not a loop: followed,
    os.symlink(src / "beta 2", src / "alpha & omega" / "again")  # and entered once
    train = pd.read_csv(prepare("folders", tmp_path / "ok2", [src], name="n", test_pct=0.4) / "train.csv")
    assert (train["class_name"] == "alpha & omega").sum() == 4  # 6 images, 2 of them in test


def test_broken_link_in_a_class_folder_is_named(tmp_path):
    src = make_folders(tmp_path / "src")
    os.symlink(tmp_path / "gone.jpg", src / "train" / "beta 2" / "x.jpg")
    result = run_script("data.py", "--dataset", "folders", "--source", src, "--name", "n", "--root", tmp_path / "o")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {src / 'train' / 'beta 2' / 'x.jpg'}: a broken symbolic link (it points to {tmp_path / 'gone.jpg'}, "
        "which does not exist)"]


@pytest.mark.parametrize("pct", ["0.2", "0.6"])  # 0.6 of 1 image once rounded to a class in test only
def test_a_class_left_out_of_a_split_is_named_in_the_summary(tmp_path, capsys, pct):
    from finegrained.prepare import dataset
    src = make_folders(tmp_path / "src", per_class=(4, 0), split=False)
    for extra in sorted((src / "beta 2").iterdir())[1:]:
        extra.unlink()  # "beta 2" has 1 image left
    dataset.main(["--dataset", "folders", "--source", str(src), "--name", "n", "--root", str(tmp_path), "--test-pct", pct])
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == ["note: 1 class has no test images and is in train only: 'beta 2' (1 image)"]
    train, test = pd.read_csv(tmp_path / "n" / "train.csv"), pd.read_csv(tmp_path / "n" / "test.csv")
    assert (train["class_name"] == "beta 2").sum() == 1 and "beta 2" not in set(test["class_name"])
    assert test["class_name"].nunique() == 3


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
    from finegrained import runner as run
    src = make_folders(tmp_path / "src", per_class=(8, 3))
    dest = prepare("folders", tmp_path / "data", [src], name="mine")
    run.main(["--data", str(dest), "--recipe", "resnets_sgd", "--arch", "resnet18", "--no-pretrained", "--epochs", "1",
              "--sizes", "32", "--bs", "8", "--workers", "0", "--out", str(tmp_path / "run")])
    import json
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert [c["name"] for c in meta["classes"]] == sorted(n.replace("/", "-") for n in CLASSES)
