"""data.py's preparation: every Stanford Cars layout gives the same tables; Aircraft and CUB;
bad input ends in one clear error naming the file."""
import hashlib
import shutil
import tarfile

import numpy as np
import pandas as pd
import pytest
import scipy.io
from PIL import Image

from finegrained.errors import UserError
from conftest import N_CLASSES, run_script
from finegrained.prepare.dataset import prepare


def content(dest, with_boxes=True):
    """Each split's rows as (image md5, box, class id, class name), sorted: layout-independent."""
    result = {}
    for split in ("train", "test"):
        df = pd.read_csv(dest / f"{split}.csv", keep_default_na=False)
        rows = []
        for r in df.itertuples():
            digest = hashlib.md5((dest / r.filename).read_bytes()).hexdigest()
            box = (r.bbox_x1, r.bbox_y1, r.bbox_x2, r.bbox_y2) if with_boxes else ()
            rows.append((digest, box, r.class_id, r.class_name))
        result[split] = sorted(rows)
    return result


@pytest.mark.parametrize("layout", ["kaggle", "all_in_one", "class_folders"])
def test_every_layout_imports_to_the_same_tables(layout, layouts, prepared, tmp_path):
    dest = prepare("cars", tmp_path, [layouts[layout]])
    boxes = layout != "class_folders"
    assert content(dest, boxes) == content(prepared, boxes)
    assert len(content(dest)["train"]) == N_CLASSES * 30


def test_images_are_linked_not_copied(prepared, layouts):
    first = pd.read_csv(prepared / "train.csv")["filename"][0]
    assert (prepared / first).is_symlink()
    assert (prepared / first).resolve().is_relative_to(layouts["original"].resolve())


def test_archive_source_is_unpacked_inside_the_dataset_folder(layouts, prepared, tmp_path, capsys):
    archive = tmp_path / "cars.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(layouts["kaggle"], arcname="stanford-cars-dataset")
    dest = prepare("cars", tmp_path / "root", [archive])
    err = capsys.readouterr().err  # not a terminal: progress as lines, about one per tenth
    for label, last in (("extracting cars.tar.gz", "100%"), ("checking images", "100%, 168 of 168")):
        lines = [line for line in err.splitlines() if line.startswith(label + ":")]
        assert 1 <= len(lines) <= 12 and lines[-1].startswith(f"{label}: {last}"), err
    assert content(dest) == content(prepared)
    assert not (dest / pd.read_csv(dest / "train.csv")["filename"][0]).is_symlink()


def test_second_run_does_nothing(layouts, tmp_path):
    dest = prepare("cars", tmp_path, [layouts["original"]])
    stamp = (dest / "train.csv").stat().st_mtime_ns
    assert prepare("cars", tmp_path, [tmp_path / "not-even-there"]) == dest
    assert (dest / "train.csv").stat().st_mtime_ns == stamp


def test_unknown_layout(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "readme.txt").write_text("hello")
    with pytest.raises(UserError, match="no Stanford Cars layout found"):
        prepare("cars", tmp_path / "out", [tmp_path / "src"])


def test_missing_image_is_named(layouts, tmp_path):
    src = shutil.copytree(layouts["original"], tmp_path / "src")
    (src / "cars_train" / "00003.jpg").unlink()
    with pytest.raises(UserError, match=r"00003\.jpg: file is missing"):
        prepare("cars", tmp_path / "out", [src])
    assert not (tmp_path / "out" / "stanford_cars" / "train.csv").exists()


def test_truncated_image_is_named(layouts, tmp_path):
    src = shutil.copytree(layouts["original"], tmp_path / "src")
    bad = src / "cars_test" / "00002.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    with pytest.raises(UserError, match=r"cars_test/00002\.jpg: cannot be read as an image"):
        prepare("cars", tmp_path / "out", [src])


def test_mat_without_expected_field_is_named(layouts, tmp_path):
    src = shutil.copytree(layouts["original"], tmp_path / "src")
    mat = src / "devkit" / "cars_train_annos.mat"
    ann = scipy.io.loadmat(mat)["annotations"]
    kept = [n for n in ann.dtype.names if n != "class"]
    stripped = np.zeros(ann.shape, dtype=[(n, "O") for n in kept])
    for n in kept:
        stripped[n] = ann[n]
    scipy.io.savemat(mat, {"annotations": stripped})
    with pytest.raises(UserError, match=r"cars_train_annos\.mat: 'annotations' has no field 'class'"):
        prepare("cars", tmp_path / "out", [src])


def test_cli_error_is_one_line(tmp_path):
    result = run_script("data.py", "--root", tmp_path, "--source", tmp_path / "nowhere")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nowhere'}: no such file or folder"]


def _jpeg(path, size=(120, 90), colour=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, "JPEG")


def test_aircraft_variants_split_and_banner(tmp_path):
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    variants = ["707-320", "F/A-18", "A340-300"]
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    lines = {"trainval": [], "test": []}
    boxes = []
    for i in range(9):
        image_id = f"{1000000 + i:07d}"
        _jpeg(data / "images" / f"{image_id}.jpg", (120, 100))
        lines["trainval" if i < 6 else "test"].append(f"{image_id} {variants[i % 3]}")
        boxes.append(f"{image_id} 5 6 110 95")
    for split, rows in lines.items():
        (data / f"images_variant_{split}.txt").write_text("\n".join(rows) + "\n")
    (data / "images_box.txt").write_text("\n".join(boxes) + "\n")
    dest = prepare("aircraft", tmp_path / "out", [tmp_path / "fgvc-aircraft-2013b"])
    train, test = pd.read_csv(dest / "train.csv"), pd.read_csv(dest / "test.csv")
    assert (len(train), len(test)) == (6, 3)
    assert sorted(train["class_name"].unique()) == sorted(variants)
    assert train.loc[train["class_name"] == "F/A-18", "class_id"].unique().tolist() == [2]
    with Image.open(dest / train["filename"][0]) as im:
        assert im.size == (120, 80)  # the 20 px banner is gone


def test_cub_split_and_boxes(tmp_path):
    base = tmp_path / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    images, labels, split, boxes = [], [], [], []
    for i in range(1, 7):
        rel = f"{classes[i % 2]}/bird_{i}.jpg"
        _jpeg(base / "images" / rel)
        images.append(f"{i} {rel}")
        labels.append(f"{i} {i % 2 + 1}")
        split.append(f"{i} {int(i <= 4)}")
        boxes.append(f"{i} 10.0 20.0 50.0 30.0")
    for name, rows in (("images", images), ("image_class_labels", labels), ("train_test_split", split),
                       ("bounding_boxes", boxes), ("classes", [f"{k + 1} {c}" for k, c in enumerate(classes)])):
        (base / f"{name}.txt").write_text("\n".join(rows) + "\n")
    dest = prepare("cub", tmp_path / "out", [tmp_path])
    train = pd.read_csv(dest / "train.csv")
    assert len(train) == 4 and len(pd.read_csv(dest / "test.csv")) == 2
    assert set(train["class_name"]) == {"Black footed Albatross", "Laysan Albatross"}
    assert tuple(train.iloc[0][["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"]]) == (11, 21, 60, 50)


def test_damaged_archive_is_named(layouts, tmp_path):
    archive = tmp_path / "cars.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(layouts["original"], arcname="cars")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(UserError, match=r"cars\.tar\.gz: cannot be unpacked, the archive is damaged or incomplete"):
        prepare("cars", tmp_path / "out", [archive])


def test_kaggle_copy_with_a_stray_cars_annos_uses_the_devkit(layouts, prepared, tmp_path):
    src = shutil.copytree(layouts["kaggle"], tmp_path / "src")
    shutil.copy(layouts["all_in_one"] / "cars_annos.mat", src / "cars_annos.mat")  # no car_ims/ beside it
    assert content(prepare("cars", tmp_path / "out", [src])) == content(prepared)


def test_the_image_check_reads_photos_as_cameras_save_them(photos):
    from finegrained.prepare.tables import check_image, image_problems
    assert {name: check_image(path) for name, (path, _, _) in photos.items()} == {name: None for name in photos}
    assert image_problems([path for path, _, _ in photos.values()], workers=1, label="checking") == [None] * len(photos)
