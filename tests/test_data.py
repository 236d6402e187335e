"""data.py's DataLoaders: batch shapes, the validation split, balanced sampling, box crops,
grayscale as RGB, and a test loader that scores every row once, in order, without augmentation."""
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cli import UserError
from data import eval_dl, get_dls, open_image, read_table


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
    from data import prepare
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
