"""--head concat|linear|bilinear|localize end to end: each head trains from scratch through run.py, is rebuilt by test.py from
safetensors + JSON and scores as run.py did; a localize model's boxes, mapped back to the original pixels, beat a fixed
centred box by far; test.py --localizer crops a --crop-bbox model's images with the boxes a localizer predicts; bad
combinations stop with one line; the two new recipes run scaled down. Box scores are recomputed here with numpy."""
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from finegrained import runner as run
from finegrained.errors import UserError
from conftest import localize_recipe, TINY, holdout_scores as score, run_script

from finegrained import holdout

BOX = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"]
PRED = ["pred_x1", "pred_y1", "pred_x2", "pred_y2"]
COLOURS = [(250, 250, 250), (250, 220, 40), (60, 220, 250)]


def train(data, out, *flags):
    run.main(["--data", str(data), *TINY, "--out", str(out), *map(str, flags)])
    return json.loads((out / "metrics.json").read_text()), json.loads((out / "model.json").read_text())


def numpy_iou(a, b):
    """IoU of devkit boxes (1-based inclusive, N x 4) row by row, by hand."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    w = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]) + 1, 0, None)
    h = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]) + 1, 0, None)
    area = lambda x: (x[:, 2] - x[:, 0] + 1) * (x[:, 3] - x[:, 1] + 1)  # noqa: E731
    return w * h / (area(a) + area(b) - w * h)


def box_dataset(folder, n_train=120, n_test=48, seed=0):
    """A prepared dataset (train.csv, test.csv) of JPEGs: dark noise with one bright rectangle whose colour is the class,
    25-55 % of each side, anywhere; 130-250 px wide and of varied aspect, so that at 64 px draft decoding would shrink
    them (the boxes would then land in the wrong place: localize must read them whole)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        (folder / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(n):
            cid = i % len(COLOURS) + 1
            w = int(rng.integers(130, 251))
            h = int(w * rng.uniform(0.6, 1.3))
            bw, bh = int(w * rng.uniform(0.25, 0.55)), int(h * rng.uniform(0.25, 0.55))
            x1, y1 = int(rng.integers(1, w - bw + 2)), int(rng.integers(1, h - bh + 2))
            x2, y2 = x1 + bw - 1, y1 + bh - 1
            a = rng.integers(0, 70, (h, w, 3), dtype=np.uint8)
            a[y1 - 1:y2, x1 - 1:x2] = COLOURS[cid - 1]
            name = f"{split}/{i:04d}.jpg"
            Image.fromarray(a).save(folder / name, quality=95)
            rows.append(dict(filename=name, bbox_x1=x1, bbox_y1=y1, bbox_x2=x2, bbox_y2=y2, class_id=cid,
                             class_name=f"colour {cid}"))
        pd.DataFrame(rows).to_csv(folder / f"{split}.csv", index=False)
    return folder


def centred_box_iou(data):
    """Mean IoU on test.csv of a fixed box: train's mean box size (relative to the image), centred, in every image."""
    def table(split):
        df = pd.read_csv(data / f"{split}.csv")
        sizes = np.array([Image.open(data / f).size for f in df["filename"]], dtype=float)
        return df[BOX].to_numpy(float), sizes
    train_boxes, train_sizes = table("train")
    rel_w = ((train_boxes[:, 2] - train_boxes[:, 0] + 1) / train_sizes[:, 0]).mean()
    rel_h = ((train_boxes[:, 3] - train_boxes[:, 1] + 1) / train_sizes[:, 1]).mean()
    test_boxes, (w, h) = table("test")[0], table("test")[1].T
    fixed = np.stack([(1 - rel_w) / 2 * w + 1, (1 - rel_h) / 2 * h + 1, (1 + rel_w) / 2 * w, (1 + rel_h) / 2 * h], 1)
    return float(numpy_iou(fixed.round(), test_boxes).mean())


@pytest.fixture(scope="module")
def boxes_data(tmp_path_factory):
    return box_dataset(tmp_path_factory.mktemp("boxes"))


@pytest.fixture(scope="module")
def localizer(boxes_data, tmp_path_factory):
    """A localize model trained on boxes_data: resnet18 from scratch, 64 px, 6 epochs of one-cycle."""
    folder = tmp_path_factory.mktemp("loc")
    (folder / "loc.toml").write_text(localize_recipe(6, 64))
    train(boxes_data, folder / "run", "--recipe", folder / "loc.toml")
    return folder / "run"


# ---------------------------------------------------------------- every head, trained, saved, reloaded, scored

@pytest.mark.parametrize("head", ["concat", "linear", "bilinear", "localize"])
def test_each_head_trains_reloads_through_test_py_and_scores_above_chance(head, prepared, tmp_path, capsys):
    metrics, meta = train(prepared, tmp_path / head, "--arch", "resnet18", "--head", head, "--bilinear-dim", 32,
                          "--epochs", "0,4,0", "--sizes", "48,48", "--bs", "16,16")
    assert meta["head"] == head
    assert meta["head_options"] == {"bilinear": {"bilinear_dim": 32, "dropout": 0.5},
                                    "localize": {"box_dropout": 0.1, "box_grid": 4}}.get(head, {})
    found, printed = score(capsys, "--model", tmp_path / head, "--folder", prepared, "--csv", prepared / "test.csv",
                           "--out", tmp_path / "p.csv", "--workers", 0)
    # test.py rebuilt the model from model.json + safetensors alone and scored through its own loader: as run.py did
    assert found["accuracy"] == pytest.approx(metrics["test_top1"], abs=1e-4)
    assert found["accuracy"] > 0.25 + 0.15  # 4 classes
    predictions = pd.read_csv(tmp_path / "p.csv")
    assert (set(PRED) <= set(predictions.columns)) == (head == "localize")
    if head == "localize":
        assert found["mean_iou"] == pytest.approx(metrics["test_mean_iou"], abs=1e-4)
        assert found["iou50"] == pytest.approx(metrics["test_iou50"], abs=1e-4)
        truth = pd.read_csv(prepared / "test.csv")
        by_hand = numpy_iou(predictions[PRED], truth[BOX])
        assert found["mean_iou"] == pytest.approx(by_hand.mean(), abs=1e-4)
        assert found["iou50"] == pytest.approx((by_hand >= 0.5).mean(), abs=1e-4)
        history = pd.read_csv(tmp_path / head / "history.csv")
        assert history["train_loss"].notna().all()


def test_the_bilinear_head_is_the_last_parameter_group_and_its_sizes(prepared):
    from finegrained.data import get_dls
    from finegrained.models import create_learner
    from finegrained.heads import BilinearPool
    learn = create_learner(get_dls(prepared / "train.csv", size=32, bs=8, workers=0), "resnet18", pretrained=False,
                           head="bilinear", head_options={"bilinear_dim": 16})
    groups = learn.splitter(learn.model)
    assert len(groups) == 3
    assert {id(p) for p in groups[-1]} == {id(p) for p in learn.model[1].parameters()}
    pool, linear = learn.model[1][0], learn.model[1][-1]
    assert isinstance(pool, BilinearPool) and pool.reduce[0].in_channels == 512 and pool.reduce[0].out_channels == 16
    assert (linear.in_features, linear.out_features) == (16 * 16, 4)


# ---------------------------------------------------------------- boxes: far above a fixed box, written, drawn

def test_localize_boxes_beat_a_fixed_centred_box_by_far(localizer, boxes_data, tmp_path, capsys):
    metrics = json.loads((localizer / "metrics.json").read_text())
    found, printed = score(capsys, "--model", localizer, "--folder", boxes_data, "--csv", boxes_data / "test.csv",
                           "--out", tmp_path / "p.csv", "--draw-boxes", 6, "--workers", 0)
    fixed = centred_box_iou(boxes_data)
    print(f"localize mean IoU {found['mean_iou']:.4f} (IoU >= 0.5: {found['iou50']:.4f}), a fixed centred box "
          f"{fixed:.4f}; accuracy {found['accuracy']:.4f}")
    assert found["mean_iou"] > fixed + 0.2  # measured: 0.56 against 0.22
    assert found["mean_iou"] == pytest.approx(metrics["test_mean_iou"], abs=1e-4)
    predictions, truth = pd.read_csv(tmp_path / "p.csv"), pd.read_csv(boxes_data / "test.csv")
    assert found["mean_iou"] == pytest.approx(numpy_iou(predictions[PRED], truth[BOX]).mean(), abs=1e-4)
    sizes = np.array([Image.open(boxes_data / f).size for f in truth["filename"]])
    pred = predictions[PRED].to_numpy()
    assert (pred[:, :2] >= 1).all() and (pred[:, 2] <= sizes[:, 0]).all() and (pred[:, 3] <= sizes[:, 1]).all()
    assert (pred[:, 2:] >= pred[:, :2]).all()
    png = np.asarray(Image.open(tmp_path / "p_boxes.png").convert("RGB")).astype(int)
    red = (png[..., 0] > 200) & (png[..., 1] < 60) & (png[..., 2] < 60)
    green = (png[..., 1] > 200) & (png[..., 0] < 60) & (png[..., 2] < 60)
    assert red.sum() > 100 and green.sum() > 100, "predicted (red) and true (green) boxes drawn"
    assert "boxes drawn" in printed


def test_predicting_a_folder_writes_boxes_in_the_images_pixels(localizer, boxes_data, tmp_path, capsys):
    """No CSV, no boxes to compare with: the boxes are written all the same; one image alone gives its row's box."""
    found, printed = score(capsys, "--model", localizer, "--folder", boxes_data / "test", "--out", tmp_path / "all.csv",
                           "--workers", 0)
    assert "mean IoU" not in printed
    every = pd.read_csv(tmp_path / "all.csv").set_index("filename")
    score(capsys, "--model", localizer, "--folder", boxes_data / "test" / "0005.jpg", "--out", tmp_path / "one.csv",
          "--workers", 0)
    one = pd.read_csv(tmp_path / "one.csv")
    assert one[PRED].iloc[0].tolist() == every.loc["0005.jpg", PRED].tolist()


@pytest.mark.parametrize("layout", ["file, box, class", "box, class, file", "no boxes"])
def test_draw_boxes_draws_the_csvs_true_boxes_and_the_report_shows_them(layout, boxes_data, tmp_path, monkeypatch, capsys):
    """A headerless devkit CSV's boxes are the four columns beside the file and label columns: drawn green where the
    CSV puts them, the picture titled as it is and put in the scoring report; a CSV without boxes says so."""
    import base64
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    patches, titles, add_patch, suptitle = [], [], Axes.add_patch, Figure.suptitle

    def patch_spy(self, patch):
        patches.append((tuple(patch.get_edgecolor()), *patch.get_xy(), patch.get_width(), patch.get_height()))
        return add_patch(self, patch)

    def title_spy(self, text, **kwargs):
        titles.append(text)
        return suptitle(self, text, **kwargs)
    monkeypatch.setattr(Axes, "add_patch", patch_spy)
    monkeypatch.setattr(Figure, "suptitle", title_spy)
    model = hand_made(tmp_path / "loc", "localize", [1, 2, 3])
    truth = pd.read_csv(boxes_data / "test.csv").head(6)
    columns, flags = {"file, box, class": (["filename", *BOX, "class_id"], ["--label-col", 5]),
                      "box, class, file": ([*BOX, "class_id", "filename"], ["--fname-col", 5, "--label-col", 4]),
                      "no boxes": (["filename", "class_id"], [])}[layout]
    truth[columns].to_csv(tmp_path / "h.csv", header=layout == "no boxes", index=False)
    _, printed = score(capsys, "--model", model, "--folder", boxes_data, "--csv", tmp_path / "h.csv", *flags,
                       "--draw-boxes", 4, "--out", tmp_path / "p.csv", "--workers", 0)
    green = [box for colour, *box in patches if colour == (0.0, 1.0, 0.0, 1.0)]   # lime
    red = [box for colour, *box in patches if colour == (1.0, 0.0, 0.0, 1.0)]
    page = (tmp_path / "p_report.html").read_text()
    assert len(red) == 4 and base64.b64encode((tmp_path / "p_boxes.png").read_bytes()).decode() in page
    if layout == "no boxes":
        assert green == [] and titles[-1].endswith(": predicted box red; the CSV gives no true boxes")
        assert f"boxes: {tmp_path / 'h.csv'} has no true boxes" in printed and "mean IoU" not in printed
        return
    # devkit boxes are 1-based inclusive: the rectangle spans pixel edges x1 - 1 .. x2
    assert green == [[x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1] for x1, y1, x2, y2 in truth[BOX].to_numpy()[:4]]
    assert titles[-1].endswith(": true box green, predicted red") and "true box green, predicted red" in page
    assert re.search(r"^mean IoU: ([0-9.]+)$", printed, re.M)   # scored against the same boxes


# ---------------------------------------------------------------- test.py --localizer

def test_localizer_boxes_crop_for_a_crop_bbox_model(localizer, boxes_data, tmp_path, scoring_batches, capsys):
    from finegrained.data import inference_dl
    crop_run = tmp_path / "crop"
    train(boxes_data, crop_run, "--arch", "resnet18", "--crop-bbox", "--epochs", "0,2,0", "--sizes", "32,32", "--bs", "16,16")
    meta = json.loads((crop_run / "model.json").read_text())
    meta["bbox_margin"] = 0.3  # not the default: the crop must take the model's own margin
    (crop_run / "model.json").write_text(json.dumps(meta))
    truth = pd.read_csv(boxes_data / "test.csv")
    truth[["filename", "class_id"]].to_csv(tmp_path / "no_boxes.csv", index=False)
    found, printed = score(capsys, "--model", crop_run, "--localizer", localizer, "--folder", boxes_data,
                           "--csv", tmp_path / "no_boxes.csv", "--out", tmp_path / "p.csv", "--workers", 0)
    assert f"boxes: predicted by the localizer {localizer}, grown by 30% on every side" in printed
    assert found["accuracy"] > 1 / 3
    assert "mean IoU" not in printed  # the CSV has no boxes to compare with
    (loc_args, loc_kwargs, _), (args, kwargs, used) = scoring_batches
    assert loc_kwargs["localize"] and not kwargs["localize"]
    pred = pd.read_csv(tmp_path / "p.csv")[PRED].to_numpy()

    def first_batch(boxes, margin):
        df = truth[["filename"]].iloc[:8].assign(**dict(zip(BOX, np.asarray(boxes)[:8].T)))
        _, dl = inference_dl(df, boxes_data, 32, 8, crop_bbox=True, margin=margin, workers=0)
        return dl.one_batch()[0]
    got = used.one_batch()[0][:8]
    assert torch.allclose(got, first_batch(pred, 0.3), atol=1e-5)             # the localizer's boxes, the model's margin
    assert not torch.allclose(got, first_batch(pred, 0.16), atol=1e-2)         # not the default margin
    assert not torch.allclose(got, first_batch(truth[BOX].to_numpy(), 0.3), atol=1e-2)  # nor the true boxes
    # with the true boxes in the CSV as well: the localizer's boxes are still the ones used, and compared with them
    found, printed = score(capsys, "--model", crop_run, "--localizer", localizer, "--folder", boxes_data,
                           "--csv", boxes_data / "test.csv", "--out", tmp_path / "q.csv", "--workers", 0)
    assert "the CSV's own boxes are only compared with them" in printed
    assert re.search(r"^localizer mean IoU: ([0-9.]+)", printed, re.M)
    assert torch.allclose(scoring_batches[-1][2].one_batch()[0][:8], got, atol=1e-5)


def hand_made(folder, head, class_ids, **meta):
    """A model folder as run.py writes it, not trained."""
    from finegrained.models import build_model, save_trained
    save_trained(build_model("resnet18", len(class_ids), head=head), folder,
                 {"arch": "resnet18", "head": head, "classes": [{"id": i, "name": f"c{i}"} for i in class_ids],
                  "image_size": 32, "normalize": {"mean": [0.0] * 3, "std": [1.0] * 3}, **meta})
    return folder


def test_wrong_localizers_and_box_options_stop_with_one_line(boxes_data, tmp_path):
    crop = hand_made(tmp_path / "crop", "concat", [1, 2, 3], crop_bbox=True)
    whole = hand_made(tmp_path / "whole", "concat", [1, 2, 3])
    loc = hand_made(tmp_path / "loc", "localize", [1, 2, 3])
    common = ["--folder", boxes_data, "--csv", boxes_data / "test.csv", "--out", tmp_path / "p.csv", "--workers", 0]
    cases = [
        (["--model", crop, "--localizer", whole], r"--localizer .*whole: this model has no box head \(head 'concat'\)"),
        (["--model", crop, "--localizer", hand_made(tmp_path / "other", "localize", [1, 2, 4])],
         r"its classes differ from .*crop's \(3 vs 3 classes, e.g. class id 3\)"),
        (["--model", crop, "--localizer", hand_made(tmp_path / "order", "localize", [3, 2, 1])], r"in another order"),
        (["--model", whole, "--localizer", loc], r"--localizer gives the box crops of a model trained with --crop-bbox"),
        (["--model", loc, "--tta"], r"--tta is for classification models"),
        (["--model", whole, "--draw-boxes", 3], r"--draw-boxes needs predicted boxes"),
    ]
    for args, message in cases:
        with pytest.raises(UserError, match=message):
            holdout.main([str(a) for a in args + common])
    result = run_script("test.py", "--model", crop, "--localizer", whole, *common)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: --localizer ")


def test_localize_needs_boxes_and_whole_images(prepared, tmp_path):
    no_boxes = tmp_path / "no_boxes"
    no_boxes.mkdir()
    for split in ("train", "test"):
        df = pd.read_csv(prepared / f"{split}.csv")
        df["filename"] = [str(prepared / f) for f in df["filename"]]
        df.drop(columns=BOX).to_csv(no_boxes / f"{split}.csv", index=False)
    result = run_script("run.py", "--data", no_boxes, "--head", "localize", *TINY, "--out", tmp_path / "r")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {no_boxes / 'train.csv'}: --head localize needs bounding boxes (bbox_x1..bbox_y2), and this dataset has none"]
    with pytest.raises(UserError, match="cannot train on --crop-bbox crops"):
        run.main(["--data", str(prepared), "--head", "localize", "--crop-bbox", *TINY, "--out", str(tmp_path / "c")])
    with pytest.raises(UserError, match="not crop_pct 0.875"):
        run.main(["--data", str(prepared), "--recipe", "resnet50_448_ls", "--head", "localize", *TINY,
                  "--out", str(tmp_path / "p")])
    with pytest.raises(UserError, match="unknown head 'bilnear'"):
        run.main(["--data", str(prepared), "--head", "bilnear", *TINY, "--out", str(tmp_path / "b")])
    assert not (tmp_path / "c").exists() and not (tmp_path / "p").exists()  # refused before anything was written


def test_head_flags_reach_the_learner_and_model_json(prepared):
    """--head/--bilinear-dim/--box-loss/--box-lambda: recipe keys, then models.head_args, then the Learner."""
    from finegrained import recipe as recipes
    from finegrained.boxes import LocalizeLoss
    from finegrained.data import get_dls
    from finegrained.models import create_learner, head_args
    args = run.parse_args(["--head", "localize", "--box-loss", "giou", "--box-lambda", "2.5", "--bilinear-dim", "0"])
    resolved = recipes.resolve(recipes.load()[1], recipes.overrides(args))
    assert (resolved["head"], resolved["box_loss"], resolved["box_lambda"], resolved["bilinear_dim"]) == ("localize", "giou", 2.5, 0)
    dls = get_dls(prepared / "train.csv", size=32, bs=8, workers=0, head="localize")
    learn = create_learner(dls, "resnet18", pretrained=False, **head_args(resolved))
    assert isinstance(learn.loss_func, LocalizeLoss) and (learn.loss_func.box_loss, learn.loss_func.lam) == ("giou", 2.5)
    assert [m.name for m in learn.metrics] == ["accuracy", "top5_accuracy", "mean_iou", "iou50"]
    assert head_args({**resolved, "head": "bilinear"})["head_options"] == {"bilinear_dim": None, "dropout": 0.5}
    assert head_args(resolved, boxes=False) == {"head": "concat", "head_options": {}}
    with pytest.raises(UserError, match="--head localize needs DataLoaders with boxes"):
        create_learner(get_dls(prepared / "train.csv", size=32, bs=8, workers=0), "resnet18", pretrained=False,
                       **head_args(resolved))


# ---------------------------------------------------------------- the DataLoaders of a localize model

def test_balanced_localize_batches_sample_classes_evenly_with_their_boxes(prepared):
    """--balance for localize: fastai's weighted_dataloaders drops BBoxBlock's collation, get_dls passes ours. The
    box of every sampled image is where the squash resize puts it, computed here by hand."""
    from finegrained.data import get_dls
    from finegrained.prepare.tables import read_table
    from fastai.torch_core import set_seed
    df = read_table(prepared / "train.csv")
    keep = df[df["class_id"] != 1].index.tolist() + df[df["class_id"] == 1].index[:5].tolist()  # class 1: 5 of 35
    small = df.loc[sorted(keep)].reset_index(drop=True)
    small.attrs = df.attrs
    dls = get_dls(small, 40, 16, balance=True, augment="none", resize="squash", head="localize", workers=0)
    set_seed(0)
    counts = np.zeros(4)
    sizes = {f: Image.open(prepared / f).size for f in small["filename"]}
    for _ in range(6):
        idxs = dls.train.get_idxs()
        counts += np.bincount(small["class_id"].to_numpy()[idxs] - 1, minlength=4)
    assert counts[0] / counts.sum() > 0.15  # 5 of 95 images (0.05) without balancing, 0.25 balanced
    images, boxes, classes = dls.train.one_batch()
    assert boxes.shape == (16, 1, 4) and classes.shape == (16,)
    w, h = np.array([sizes[f] for f in small["filename"]]).T
    frame = np.stack([(small["bbox_x1"] - 1) / w, (small["bbox_y1"] - 1) / h, small["bbox_x2"] / w, small["bbox_y2"] / h],
                     1) * 2 - 1
    for box, cls in zip(boxes[:, 0].numpy(), classes.numpy()):  # the sampled rows are random: each is matched by value
        candidates = frame[small["class_id"].to_numpy() == dls.vocab[cls]]
        assert np.abs(candidates - box).max(1).min() < 1e-4


def test_squash_resizes_the_whole_image(tmp_path):
    """resize = "squash" (recipes resnets_sgd, resnet50_448_ls, bcnn_aircraft) is fastai's "squish": the whole image
    squeezed to the square. fastai takes any other name for a centre crop, which it did before data.fastai_resize."""
    from finegrained.data import inference_dl
    a = np.zeros((40, 80, 3), np.uint8)
    a[:, :20] = 255  # the left quarter white: a centre square crop would show none of it
    Image.fromarray(a).save(tmp_path / "wide.png")
    df = pd.DataFrame({"filename": ["wide.png"]})
    _, dl = inference_dl(df, tmp_path, 20, 1, stats=([0.0] * 3, [1.0] * 3), resize="squash", workers=0)
    got = dl.one_batch()[0][0, 0].cpu().numpy()
    want = np.asarray(Image.fromarray(a).resize((20, 20), Image.Resampling.BILINEAR), dtype=float)[..., 0] / 255
    assert np.abs(got - want).max() < 0.02 and got[:, :4].mean() > 0.9


# ---------------------------------------------------------------- the two recipes, scaled down

def test_bcnn_aircraft_runs_scaled_down(prepared, tmp_path, capsys):
    out = tmp_path / "bcnn"
    metrics, meta = train(prepared, out, "--recipe", "bcnn_aircraft", "--arch", "resnet18", "--epochs", "1,1,1",
                          "--sizes", 32, "--bs", 16, "--bilinear-dim", 64)
    assert (meta["head"], meta["head_options"]["bilinear_dim"], meta["crop_bbox"], meta["resize"], meta["crop_pct"]) == \
        ("bilinear", 64, True, "squash", 0.875)
    history = pd.read_csv(out / "history.csv")
    assert history["stage"].tolist() == ["phase1", "phase2", "phase3"]
    assert set(history["opt"]) == {"SGD"} and history["valid_loss"].notna().all()
    assert all(v.split(";")[-1] == "0.025" for v in history["lrs"])
    config = json.loads((out / "config.json").read_text())
    assert [(s["train"], s["blocks"], s["patience"]) for s in config["recipe"]["stages"]] == \
        [("frozen", 0, 3), ("reinit", 1, 3), ("reinit", 2, 3)]
    found, _ = score(capsys, "--model", out, "--folder", prepared, "--csv", prepared / "test.csv", "--out", tmp_path / "p.csv",
                     "--workers", 0)
    assert found["accuracy"] == pytest.approx(metrics["test_top1"], abs=1e-4)


def test_localize_effnet_runs_scaled_down_with_a_timm_body(prepared, tmp_path):
    out = tmp_path / "loc"
    metrics, meta = train(prepared, out, "--recipe", "localize_effnet", "--arch", "resnet10t", "--epochs", "1,1",
                          "--sizes", 32, "--bs", 16, "--box-loss", "giou", "--box-lambda", 2)
    assert (meta["arch"], meta["head"], meta["box_loss"], meta["box_lambda"], meta["resize"]) == \
        ("resnet10t", "localize", "giou", 2.0, "squash")
    history = pd.read_csv(out / "history.csv")
    assert history["stage"].tolist() == ["head", "all"]
    for column in ("accuracy", "top5_accuracy", "mean_iou", "iou50"):
        assert history[column].between(0, 1).all(), column
    assert 0 < metrics["test_mean_iou"] <= 1 and metrics["test_box_images"] == metrics["test_images"]
    config = json.loads((out / "config.json").read_text())
    assert (config["recipe"]["box_loss"], config["recipe"]["balance"], config["recipe"]["loss"]) == ("giou", True, "focal")
