"""Unreadable images while preparing: all named in one error (exit 2, no table written), or with --skip-bad
left out of the tables, each named in the summary; run.py's table check names every bad row too."""
import shutil

import pandas as pd
import pytest
from PIL import Image

from finegrained.errors import UserError
from conftest import run_script
from finegrained.prepare.tables import check_table_images
from finegrained.prepare.tables import SHOWN, problems_error

# (dataset, generated layout, extra flags, where each split's images are in that layout)
CASES = {"cars": ("cars", "original", [], {"train": "cars_train/*.jpg", "test": "cars_test/*.jpg"}),
         "folders": ("folders", "class_folders", ["--name", "mine"], {"train": "train/*/*.jpg", "test": "test/*/*.jpg"})}


def corrupted_source(layouts, layout, patterns, tmp_path):
    """A copy of a generated layout with three images broken three ways; (source, {split: readable paths}, {bad path: why})."""
    src = shutil.copytree(layouts[layout], tmp_path / "src")
    listing = {split: sorted(src.glob(pattern)) for split, pattern in patterns.items()}
    empty, truncated, not_image = listing["train"][3], listing["train"][10], listing["test"][5]
    empty.write_bytes(b"")
    truncated.write_bytes(truncated.read_bytes()[:300])
    not_image.write_text("<html><body>403 Forbidden</body></html>")  # what a scraper saves under .jpg
    bad = {empty: "file is empty (0 bytes)", truncated: "cannot be read as an image", not_image: "cannot be read as an image"}
    return src, {split: [p for p in paths if p not in bad] for split, paths in listing.items()}, bad


@pytest.mark.parametrize("case", CASES)
def test_unreadable_images_are_all_named_in_one_error_and_nothing_is_written(case, layouts, tmp_path):
    dataset, layout, flags, patterns = CASES[case]
    src, _, bad = corrupted_source(layouts, layout, patterns, tmp_path)
    result = run_script("data.py", "--dataset", dataset, "--root", tmp_path / "out", "--source", src, *flags)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("error: ")):]  # after the progress lines
    named = [line.removeprefix("error: ") for line in lines[:-1]]
    for path, why in bad.items():
        assert sum(line.startswith(f"{path}: {why}") for line in named) == 1, (path, result.stderr)
    assert len(named) == 3
    assert lines[-1] == "3 images cannot be read: fix or remove them, or pass --skip-bad to leave them out"
    assert not list((tmp_path / "out").rglob("*.csv"))


@pytest.mark.parametrize("case", CASES)
def test_skip_bad_leaves_out_exactly_the_unreadable_images_and_names_each(case, layouts, tmp_path):
    dataset, layout, flags, patterns = CASES[case]
    src, readable, bad = corrupted_source(layouts, layout, patterns, tmp_path)
    result = run_script("data.py", "--dataset", dataset, "--root", tmp_path / "out", "--source", src, *flags, "--skip-bad")
    assert result.returncode == 0, result.stderr
    dest = tmp_path / "out" / ("mine" if dataset == "folders" else "stanford_cars")
    for split, paths in readable.items():
        listed = [(dest / f).resolve() for f in pd.read_csv(dest / f"{split}.csv")["filename"]]
        assert sorted(listed) == sorted(p.resolve() for p in paths)
    lines = result.stdout.strip().splitlines()
    skipped = [line for line in lines if line.startswith("skipped: ")]
    assert len(skipped) == 3
    for path, why in bad.items():
        assert sum(line.startswith(f"skipped: {path}: {why}") for line in skipped) == 1, (path, result.stdout)
    assert f"{len(readable['train'])} train and {len(readable['test'])} test images" in result.stdout
    assert lines[-1] == "skipped 3 unreadable images (listed above)"


def test_past_the_limit_the_error_counts_the_rest():
    lines = [f"img{i}.jpg: cannot be read as an image" for i in range(SHOWN + 3)]
    message = str(problems_error(lines, "fix or remove {them}")).splitlines()
    assert message == [*lines[:SHOWN], "... and 3 more", f"{SHOWN + 3} images cannot be read: fix or remove them"]
    assert str(problems_error(lines[:1], "fix or remove {them}")).splitlines()[-1] == "1 image cannot be read: fix or remove it"


def test_the_training_table_check_names_every_bad_row(tmp_path):
    Image.new("RGB", (32, 24), (200, 10, 10)).save(tmp_path / "good.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not a jpeg")
    df = pd.DataFrame({"filename": ["good.jpg", "empty.jpg", "good.jpg", "text.jpg"]})
    df.attrs["folder"] = str(tmp_path)
    with pytest.raises(UserError) as err:
        check_table_images(df, tmp_path / "train.csv")
    first, second, last = str(err.value).splitlines()
    assert first == f"{tmp_path / 'train.csv'}, row 2: {tmp_path / 'empty.jpg'}: file is empty (0 bytes)"
    assert second.startswith(f"{tmp_path / 'train.csv'}, row 4: {tmp_path / 'text.jpg'}: cannot be read as an image (")
    assert last == f"2 images cannot be read: fix them, or remove their rows from {tmp_path / 'train.csv'}"
