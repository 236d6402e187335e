"""data.py's DataLoaders: batch shapes, the validation split, balanced sampling, box crops
(in pixels: the box grown by the margin), grayscale as RGB, images read as they are displayed (EXIF
orientation, 16-bit, CMYK, palette...), bad table cells named by row, and a test loader that scores
every row once, in order, without augmentation."""
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageFilter

from finegrained.errors import UserError
from conftest import run_script, save_stored_as, upright_photo
from finegrained.data import IMAGENET_STATS, eval_dl, get_dls
from finegrained.images import BOX_MARGIN, open_image
from finegrained.prepare.tables import read_table


def test_batches_have_the_requested_shape(prepared):
    dls = get_dls(prepared / "train.csv", size=40, bs=8, workers=0)
    x, y = dls.one_batch()
    assert x.shape == (8, 3, 40, 40) and y.shape == (8,)
    assert dls.c == 4 and list(dls.vocab) == [1, 2, 3, 4]
    assert abs(float(x.mean())) < 1.5  # ImageNet-normalized, not 0..1


def test_validation_split_is_fixed_by_seed(prepared):
    df = read_table(prepared / "train.csv")
    def valid_files(seed):
        return sorted(get_dls(df, size=32, bs=8, valid_pct=0.25, seed=seed, workers=0).valid_ds.items["filename"])
    dls = get_dls(df, size=32, bs=8, valid_pct=0.25, seed=3, workers=0)
    assert len(dls.valid_ds) == int(len(df) * 0.25) and len(dls.train_ds) + len(dls.valid_ds) == len(df)
    assert valid_files(3) == valid_files(3) != valid_files(4)
    assert len(get_dls(df, size=32, bs=8, workers=0).valid_ds) == 0


def test_balanced_sampling_draws_rare_classes_as_often(prepared):
    df = read_table(prepared / "train.csv")
    rare = pd.concat([df[df.class_id != 4], df[df.class_id == 4].head(3)], ignore_index=True)
    rare.attrs = df.attrs
    dls = get_dls(rare, size=16, bs=32, balance=True, workers=0, augment=False)
    assert type(dls.train).__name__ == "WeightedDL"
    torch.manual_seed(0)
    drawn = torch.cat([y for _, y in dls.train]).numpy()
    counts = np.bincount(drawn, minlength=4)
    assert counts[3] > 0.15 * counts.sum()  # 3 of 93 images, yet about a quarter of the draws


def test_default_workers_follow_the_cpu_affinity_up_to_16(monkeypatch):
    import os
    from finegrained.images import default_workers
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the machine's cores: not what a pinned job may use
    for allowed, want in [(3, 3), (16, 16), (40, 16)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=allowed: set(range(n)), raising=False)
        assert default_workers() == want
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS, Windows: no affinity, the core count
    assert default_workers() == 16
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # the count unknown: one worker
    assert default_workers() == 1


def test_open_image_crops_to_box_and_makes_rgb(tmp_path):
    im = Image.new("L", (200, 100), 0)
    im.paste(255, (50, 20, 150, 80))
    im.save(tmp_path / "g.jpg", quality=95)
    crop = open_image(tmp_path / "g.jpg", box=(51, 21, 150, 80), margin=0.0)
    assert crop.mode == "RGB" and crop.size == (100, 60)
    assert np.asarray(crop).mean() > 240
    assert open_image(tmp_path / "g.jpg", box=(51, 21, 150, 80), margin=0.1).size == (120, 72)


def test_draft_decoding_keeps_enough_pixels(tmp_path):
    Image.new("RGB", (1600, 1000), (10, 20, 30)).save(tmp_path / "big.jpg")
    small = open_image(tmp_path / "big.jpg", size=224)
    assert min(small.size) >= 224 and small.size[0] < 1600


def test_crop_bbox_needs_boxes(layouts, tmp_path):
    from finegrained.prepare.dataset import prepare
    dest = prepare("cars", tmp_path, [layouts["class_folders"]])
    with pytest.raises(UserError, match="needs bounding boxes"):
        get_dls(dest / "train.csv", size=32, bs=4, crop_bbox=True, workers=0)


def test_test_loader_covers_every_row_once_in_order(prepared):
    dls = get_dls(prepared / "train.csv", size=32, bs=8, workers=0)
    test = read_table(prepared / "test.csv")
    dl = eval_dl(dls, test, bs=7)  # 48 rows: the last batch is partial
    ys = torch.cat([b[1] for b in dl])
    assert len(ys) == len(test)
    assert [dls.vocab[int(i)] for i in ys] == test["class_id"].tolist()
    first = next(iter(dl))[0]
    again = next(iter(eval_dl(dls, test, bs=7)))[0]
    assert torch.equal(first, again)  # no random augmentation


def test_bad_tables(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(UserError, match="empty"):
        read_table(tmp_path / "empty.csv")
    (tmp_path / "cols.csv").write_text("file,label\na.jpg,1\n")
    with pytest.raises(UserError, match="missing column.*filename"):
        read_table(tmp_path / "cols.csv")
    (tmp_path / "ids.csv").write_text("filename,class_id\na.jpg,1\nb.jpg,seven\n")
    with pytest.raises(UserError, match="row 2: class_id 'seven' is not a number"):
        read_table(tmp_path / "ids.csv")
    (tmp_path / "gap.csv").write_text("filename,class_id\na.jpg,1\nb.jpg,2\nc.jpg,\nd.jpg,4\n")
    with pytest.raises(UserError, match=r"gap\.csv, row 3: class_id is empty$"):
        read_table(tmp_path / "gap.csv")
    (tmp_path / "half.csv").write_text("filename,class_id\na.jpg,1\nb.jpg,2.5\n")
    with pytest.raises(UserError, match=r"row 2: class_id '2.5' is not a whole number"):  # not silently class 2
        read_table(tmp_path / "half.csv")
    (tmp_path / "box.csv").write_text("filename,bbox_x1,bbox_y1,bbox_x2,bbox_y2,class_id\n"
                                      "a.jpg,1,2,30,40,1\nb.jpg,,,,,2\nc.jpg,1,,30,40,2\n")
    with pytest.raises(UserError, match=r"row 3: a box needs four numbers or four empty cells"):
        read_table(tmp_path / "box.csv")  # not silently the whole image


def test_empty_class_id_cell_is_one_line_naming_the_row(prepared, tmp_path):
    copy = tmp_path / "stanford_cars"
    copy.mkdir()
    (copy / "test.csv").write_text((prepared / "test.csv").read_text())
    train = pd.read_csv(prepared / "train.csv", dtype=str, keep_default_na=False)
    train.loc[2, "class_id"] = ""  # the third row
    train.to_csv(copy / "train.csv", index=False)
    result = run_script("data.py", "--root", tmp_path, "--resize", 48)  # reads the prepared tables
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {copy / 'train.csv'}, row 3: class_id is empty"]


def denormalized(x, stats=IMAGENET_STATS):
    """A normalized batch back to 0..255 pixels, as (n, height, width, 3)."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in stats)
    return ((x.cpu().float() * std + mean) * 255).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("orientation", [1, 6])
def test_crop_bbox_batch_is_the_box_grown_by_the_margin(tmp_path, orientation):
    """The training batch in pixels: the box grown by BOX_MARGIN on every side, resized; not the bare box,
    not the whole image. The box is on the photo as displayed, also when stored sideways with an EXIF tag."""
    upright = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8))
    if orientation == 1:
        upright.save(tmp_path / "car.png")
    else:
        save_stored_as(upright, tmp_path / "car.png", orientation)
    pd.DataFrame([{"filename": "car.png", "bbox_x1": 41, "bbox_y1": 31, "bbox_x2": 90, "bbox_y2": 80,  # 50 x 50 px
                   "class_id": 1, "class_name": "a"}]).to_csv(tmp_path / "train.csv", index=False)
    dls = get_dls(tmp_path / "train.csv", size=33, bs=1, crop_bbox=True, augment=False, workers=0)
    got = denormalized(dls.one_batch()[0])[0]

    def resized(region):
        return np.asarray(upright.crop(region).resize((33, 33), Image.Resampling.BILINEAR), dtype=float)
    assert BOX_MARGIN * 50 == 8  # whole pixels, so the region below is exact: 66 x 66 px
    assert np.abs(got - resized((40 - 8, 30 - 8, 90 + 8, 80 + 8))).mean() < 1
    assert np.abs(got - resized((40, 30, 90, 80))).mean() > 20  # the bare box
    assert np.abs(got - resized((20, 0, 140, 120))).mean() > 20  # the whole image (centre square)


def test_every_image_is_read_as_displayed(photos):
    """EXIF orientations applied, 16-bit scaled (not clipped to white), CMYK, palette, RGBA, WebP, TIFF as shown."""
    wrong = {}
    for name, (path, expected, tolerance) in photos.items():
        got = np.asarray(open_image(path), dtype=float)
        if got.shape != expected.shape:
            wrong[name] = f"{got.shape[1]} x {got.shape[0]} px, expected {expected.shape[1]} x {expected.shape[0]}"
        elif np.abs(got - expected).mean() > tolerance + 0.5:
            wrong[name] = f"mean difference {np.abs(got - expected).mean():.1f}"
    assert not wrong


def test_draft_decoding_of_a_sideways_photo_keeps_the_region(tmp_path):
    upright = upright_photo(800, 200)
    save_stored_as(upright, tmp_path / "wide.jpg", 6, quality=95, subsampling=0)  # stored 200 x 800
    crop = open_image(tmp_path / "wide.jpg", size=100, box=(1, 51, 800, 150))  # all the width, the middle half
    assert min(crop.size) >= 100  # enough pixels for size 100 (a draft asked in the stored frame gives 50)
    expected = upright.crop((0, 50, 800, 150)).resize(crop.size, Image.Resampling.BOX)
    assert np.abs(np.asarray(crop, dtype=float) - np.asarray(expected, dtype=float)).mean() < 3


def test_rrc_flip_scores_as_torchvisions_resize_and_centre_crop_and_trains_on_random_crops(tmp_path):
    """augment rrc_flip (resnets_sgd): scoring is torchvision's Resize(size / crop_pct) + CenterCrop(size), worked out
    here by torchvision itself; training draws a new random resized crop of the whole image each time."""
    from torchvision import transforms
    photo = Image.fromarray(np.asarray(upright_photo(240, 160).resize((240, 160), Image.Resampling.BILINEAR)))
    photo = photo.filter(ImageFilter.GaussianBlur(6))  # smooth, so that two resamplings agree
    photo.save(tmp_path / "a.png")
    photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "b.png")
    (tmp_path / "train.csv").write_text("filename,class_id\na.png,1\nb.png,2\n")
    table = read_table(tmp_path / "train.csv")
    dls = get_dls(table, size=56, bs=2, augment="rrc_flip", crop_pct=0.875, workers=0, draft=False)
    expected = transforms.Compose([transforms.Resize(64), transforms.CenterCrop(56)])(photo)
    scored = dls.test_dl(table.head(1)).one_batch()[0][0]
    scored = dls.after_batch.decode((scored[None],))[0][0].permute(1, 2, 0).numpy().astype(float)
    assert scored.shape == (56, 56, 3)
    assert np.abs(scored - np.asarray(expected, dtype=float)).mean() < 3  # grey levels of 255
    torch.manual_seed(0)
    first, second = (dls.train.one_batch()[0] for _ in range(2))
    assert first.shape == (2, 3, 56, 56) and not torch.allclose(first, second)
