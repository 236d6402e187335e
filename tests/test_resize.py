"""`data.py --resize`: a copy whose box regions are shrunk to the asked size, boxes scaled with
their images, small images linked, resumable, and bad input named."""
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from finegrained.errors import UserError
from conftest import run_script, save_stored_as
from finegrained.data import get_dls
from finegrained.images import BOX_COLUMNS, BOX_MARGIN, box_region, open_image
from finegrained.prepare.dataset import prepare
from finegrained.prepare.resize import resize_copy


@pytest.fixture
def own_copy(prepared, tmp_path):
    """The prepared dataset's tables and image links in a folder this test may change."""
    return shutil.copytree(prepared, tmp_path / "cars", symlinks=True)


def rows(folder, split="train"):
    return pd.read_csv(folder / f"{split}.csv").itertuples()


def region_side(folder, row):
    with Image.open(folder / row.filename) as im:
        left, top, right, bottom = box_region(im.width, im.height, [getattr(row, c) for c in BOX_COLUMNS], BOX_MARGIN)
    return min(right - left, bottom - top)


def test_box_regions_are_shrunk_to_the_size_and_boxes_follow(own_copy):
    resized = resize_copy(own_copy, 40)
    assert resized == own_copy / "resized_40"
    differences = []
    for split in ("train", "test"):
        for before, after in zip(rows(own_copy, split), rows(resized, split)):
            assert (before.filename, before.class_id, before.class_name) == (after.filename, after.class_id, after.class_name)
            original = region_side(own_copy, before)
            if original <= 40:  # never enlarged: linked as it is
                assert (resized / after.filename).is_symlink() and region_side(resized, after) == original
                continue
            # image sides are rounded to whole px; boxes outwards, up to 1 px a side, then grown by the margin
            assert 40 - 1 <= region_side(resized, after) <= 40 + 2 * (1 + 2 * BOX_MARGIN)
            crops = [np.asarray(open_image(folder / r.filename, box=[getattr(r, c) for c in BOX_COLUMNS])
                                .resize((24, 24), Image.Resampling.BOX), dtype=float)
                     for folder, r in ((own_copy, before), (resized, after))]
            differences.append(np.abs(crops[0] - crops[1]).mean())
    # the box still holds the same car: a box left unscaled differs by 20-90 grey levels here
    assert len(differences) > 100 and np.mean(differences) < 10 and max(differences) < 18


def test_without_boxes_the_whole_image_is_shrunk_and_boxes_stay_empty(layouts, tmp_path):
    resized = resize_copy(prepare("cars", tmp_path, [layouts["class_folders"]]), 40)
    df = pd.read_csv(resized / "train.csv")
    assert df[BOX_COLUMNS].isna().all().all()
    assert {min(Image.open(resized / f).size) for f in df["filename"]} == {40}  # every source is at least 48 px


def test_cli_makes_a_copy_that_trains_and_a_second_run_keeps_it(layouts, tmp_path):
    result = run_script("data.py", "--root", tmp_path, "--source", layouts["original"], "--resize", 48, "--workers", 1)
    assert result.returncode == 0, result.stderr
    for label in ("checking images", "resizing to 48 px"):  # progress in a log: about a line per tenth, not per image
        lines = [line for line in result.stderr.splitlines() if line.startswith(label + ":")]
        assert 5 <= len(lines) <= 12 and lines[-1].startswith(f"{label}: 100%, 168 of 168"), result.stderr
    resized = tmp_path / "stanford_cars" / "resized_48"
    assert f"--data {resized}" in result.stdout
    x, _ = get_dls(resized / "train.csv", size=32, bs=8, crop_bbox=True, workers=0).one_batch()
    assert x.shape == (8, 3, 32, 32)
    kept = next(p for p in (resized / "train").iterdir() if not p.is_symlink())
    written = kept.stat().st_mtime_ns
    again = run_script("data.py", "--root", tmp_path, "--source", layouts["original"], "--resize", 48)
    assert again.returncode == 0 and "already made" in again.stdout and kept.stat().st_mtime_ns == written


def test_an_interrupted_copy_is_finished_without_redoing_what_is_there(own_copy):
    resized = resize_copy(own_copy, 40)
    images = sorted(p for p in (resized / "train").iterdir() if not p.is_symlink())
    lost, kept = images[0], images[1]
    written = kept.stat().st_mtime_ns
    lost.unlink()
    (resized / "train.csv").unlink()
    resize_copy(own_copy, 40)
    assert lost.exists() and kept.stat().st_mtime_ns == written and (resized / "train.csv").exists()


def test_an_unreadable_image_is_named(own_copy):
    first = next(rows(own_copy)).filename
    (own_copy / first).unlink()
    (own_copy / first).write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(UserError, match=rf"{first}: cannot be resized"):
        resize_copy(own_copy, 40)
    assert not (own_copy / "resized_40" / "train.csv").exists()


def test_a_filename_outside_the_folder_is_refused(own_copy):
    df = pd.read_csv(own_copy / "train.csv")
    df.loc[3, "filename"] = "../../elsewhere.jpg"
    df.to_csv(own_copy / "train.csv", index=False)
    with pytest.raises(UserError, match=r"train.csv: filename '../../elsewhere.jpg' points outside"):
        resize_copy(own_copy, 40)


def test_a_size_too_small_is_refused_before_any_download(tmp_path):
    result = run_script("data.py", "--root", tmp_path, "--resize", 10)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --resize 10: too small to train on (at least 32); give the shorter side in px, e.g. 320"]
    assert not any(tmp_path.iterdir())


def test_copies_are_written_upright_and_in_8_bits(photos, tmp_path):
    """The copy holds what training reads: phone photos turned upright (no orientation tag left to apply),
    16-bit images scaled rather than white, CMYK, palette, RGBA, WebP and TIFF as shown."""
    folder = tmp_path / "own"
    folder.mkdir()
    for path, _, _ in photos.values():
        shutil.copy(path, folder / path.name)
    table = pd.DataFrame({"filename": [path.name for path, _, _ in photos.values()], "class_id": 1, "class_name": "a"})
    for split in ("train", "test"):
        table.to_csv(folder / f"{split}.csv", index=False)
    resized = resize_copy(folder, 36)  # 96 x 72 as displayed -> 48 x 36
    wrong = {}
    for name, (path, expected, tolerance) in photos.items():
        with Image.open(resized / path.name) as im:  # plain PIL: nothing turned or scaled on reading
            got = np.asarray(im.convert("RGB"), dtype=float)
            tag = im.getexif().get(0x0112, 1)
        want = np.asarray(Image.fromarray(expected).resize((48, 36), Image.Resampling.LANCZOS), dtype=float)
        if got.shape != want.shape or tag != 1:
            wrong[name] = f"{got.shape[1]} x {got.shape[0]} px, orientation tag {tag}"
        elif np.abs(got - want).mean() > tolerance + 8:  # saved again: JPEG copies lose a little more
            wrong[name] = f"mean difference {np.abs(got - want).mean():.1f}"
    assert not wrong


def test_a_sideways_photo_keeps_its_box_on_the_upright_copy(tmp_path):
    folder = tmp_path / "own"
    folder.mkdir()
    x, y = np.meshgrid(np.linspace(0, 255, 192), np.linspace(0, 255, 144))
    upright = Image.fromarray(np.stack([x, y, 255 - x], axis=-1).astype(np.uint8))  # smooth: boxes rounded by a px agree
    save_stored_as(upright, folder / "car.jpg", 6, quality=95, subsampling=0)  # stored 144 x 192
    box = (25, 25, 168, 120)  # on the photo as displayed
    table = pd.DataFrame([{"filename": "car.jpg", **dict(zip(BOX_COLUMNS, box)), "class_id": 1, "class_name": "a"}])
    for split in ("train", "test"):
        table.to_csv(folder / f"{split}.csv", index=False)
    resized = resize_copy(folder, 40)
    row = next(rows(resized))
    with Image.open(resized / row.filename) as im:
        assert im.width > im.height and min(im.size) < 144  # upright, and shrunk
    crops = [np.asarray(open_image(path, box=b).resize((24, 24), Image.Resampling.BOX), dtype=float)
             for path, b in ((folder / "car.jpg", box), (resized / row.filename, [getattr(row, c) for c in BOX_COLUMNS]))]
    assert np.abs(crops[0] - crops[1]).mean() < 4
    expected = np.asarray(upright.crop((24, 24, 168, 120)).resize((24, 24), Image.Resampling.BOX), dtype=float)
    assert np.abs(crops[0] - expected).mean() < 2  # and that is the box on the upright photo
