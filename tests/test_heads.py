"""heads.py and boxes.py: the three heads on torchvision and timm bodies, bilinear pooling, IoU/GIoU, the
localize loss and metrics, boxes moving with their images through fastai's pipeline, and the way back to
the original image's pixels. Images are generated: a bright rectangle on dark noise, its box known."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from finegrained.boxes import (LocalizeLoss, frame_to_devkit, giou, iou, localize_block, localize_metrics, require_boxes,
                   resize_window)
from finegrained.errors import UserError
from finegrained.heads import BilinearPool, bilinear_head, make_head

N_CLASSES = 2
COLOURS = [(255, 255, 255), (255, 255, 0)]  # class 1 white, class 2 yellow: learnable, and bright on the noise


def tv_body():
    import torchvision
    from fastai.vision.learner import create_body
    return create_body(torchvision.models.resnet18(weights=None), cut=-2)


def timm_body():
    from fastai.vision.learner import create_timm_model
    return create_timm_model("resnet10t", N_CLASSES, pretrained=False)[0][0]  # fastai's TimmBody


BODIES = {"torchvision": tv_body, "timm": timm_body}


class Reader:
    """get_x: a CSV row to the whole image at full size, as localize_block requires."""
    def __init__(self, folder):
        self.folder = folder

    def __call__(self, row):
        from fastai.vision.core import PILImage
        return PILImage.create(self.folder / row["filename"])


def write_images(folder, specs, seed=0):
    """specs: [(width, height, devkit box, class_id)] -> a prepared-CSV-like table of PNGs (lossless)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, (w, h, (x1, y1, x2, y2), cid) in enumerate(specs):
        a = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        a[y1 - 1:y2, x1 - 1:x2] = COLOURS[cid - 1]  # devkit boxes are 1-based inclusive
        Image.fromarray(a).save(folder / f"{i}.png")
        rows.append(dict(filename=f"{i}.png", bbox_x1=x1, bbox_y1=y1, bbox_x2=x2, bbox_y2=y2, class_id=cid))
    return pd.DataFrame(rows)


def random_specs(n, rng):
    specs = []
    for i in range(n):
        w, h = int(rng.integers(50, 90)), int(rng.integers(40, 70))
        bw, bh = int(rng.integers(w // 3, 2 * w // 3)), int(rng.integers(h // 3, 2 * h // 3))
        x1, y1 = int(rng.integers(1, w - bw)), int(rng.integers(1, h - bh))
        specs.append((w, h, (x1, y1, x1 + bw - 1, y1 + bh - 1), i % N_CLASSES + 1))
    return specs


def bright_box(img):
    """The extent of the bright rectangle in a (3, S, S) image in 0..1, as a box in the -1..1 frame (pixel edges)."""
    mask = img[:2].min(0).values > 0.5  # noise is below 60/255; both colours are 255 in red and green
    rows, cols = torch.where(mask.any(1))[0], torch.where(mask.any(0))[0]
    s = img.shape[-1]
    return torch.tensor([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=torch.float32) * 2 / s - 1


# ---------------------------------------------------------------- IoU and GIoU

@pytest.mark.parametrize("a, b, want_iou, want_giou", [
    ((0, 0, 2, 2), (0, 0, 2, 2), 1.0, 1.0),                    # identical
    ((0, 0, 2, 2), (1, 1, 3, 3), 1 / 7, 1 / 7 - 2 / 9),        # overlap 1, union 7, enclosing 3x3
    ((0, 0, 4, 4), (1, 1, 3, 3), 0.25, 0.25),                  # nested: the enclosing box is the outer one
    ((0, 0, 1, 1), (2, 0, 3, 1), 0.0, -1 / 3),                 # disjoint, side by side: union 2, enclosing 3
    ((0, 0, 1, 1), (9, 9, 10, 10), 0.0, -98 / 100),            # disjoint, far: union 2, enclosing 100
    ((-1, -1, 0, 1), (-0.5, -1, 0.5, 1), 1 / 3, 1 / 3),        # in the -1..1 frame: negative corners are fine
])
def test_iou_and_giou_against_hand_computed(a, b, want_iou, want_giou):
    a, b = torch.tensor([a], dtype=torch.float32), torch.tensor([b], dtype=torch.float32)
    assert iou(a, b).item() == pytest.approx(want_iou, abs=1e-6)
    assert giou(a, b).item() == pytest.approx(want_giou, abs=1e-6)
    assert giou(b, a).item() == pytest.approx(want_giou, abs=1e-6)


def test_iou_is_elementwise():
    a = torch.tensor([[0, 0, 2, 2], [0, 0, 1, 1.]])
    b = torch.tensor([[0, 0, 2, 2], [2, 0, 3, 1.]])
    assert iou(a, b).tolist() == [1.0, 0.0]


# ---------------------------------------------------------------- heads

@pytest.mark.parametrize("backbone", BODIES)
@pytest.mark.parametrize("kind", ["concat", "linear", "bilinear", "localize"])
def test_each_head_builds_on_torchvision_and_timm(kind, backbone):
    from fastai.vision.learner import default_split
    model = make_head(kind, BODIES[backbone](), 3, **({"bilinear_dim": 32} if kind == "bilinear" else {})).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    if kind == "localize":
        logits, box = out
        assert logits.shape == (2, 3) and box.shape == (2, 4)
        assert (box[:, 2:] >= box[:, :2]).all() and box.abs().max() <= 1.1
    else:
        assert out.shape == (2, 3)
    body_group, head_group = default_split(model)
    assert {id(p) for p in head_group} == {id(p) for p in model[1].parameters()}  # the head is the last group
    assert len(body_group) + len(head_group) == len(list(model.parameters()))


def test_predicted_box_corners_are_ordered():
    class Reversed(torch.nn.Module):  # a box head whose raw corners come out swapped: x1 > x2, y1 > y2
        def forward(self, x):
            return torch.tensor([[0.9, 0.8, -0.9, -0.7]]).expand(len(x), 4)
    model = make_head("localize", tv_body(), 3).eval()
    model[1].box = Reversed()
    with torch.no_grad():
        _, box = model(torch.randn(2, 3, 32, 32))
    assert torch.equal(box, torch.tensor([[-0.9, -0.7, 0.9, 0.8]] * 2))


@pytest.mark.parametrize("backbone", BODIES)
def test_box_head_starts_at_the_prior_and_sees_where_things_are(backbone):
    """An untrained box head predicts BOX_PRIOR for any image (the last layer starts at zero weights); its pooled grid
    keeps the layout, so a feature map and its mirror image give different boxes, where a global pool could not."""
    from finegrained.heads import BOX_PRIOR
    torch.manual_seed(0)
    model = make_head("localize", BODIES[backbone](), 3).eval()
    with torch.no_grad():
        _, box = model(torch.randn(4, 3, 64, 64) * 3)
    assert torch.allclose(box, torch.tensor([BOX_PRIOR] * 4))
    torch.nn.init.normal_(model[1].box[-1].weight)  # as if trained
    features = torch.randn(2, n_features_of(model), 4, 4)
    with torch.no_grad():
        plain, mirrored = model[1].box(features), model[1].box(features.flip(-1))
        pooled = torch.nn.AdaptiveAvgPool2d(1)
        assert torch.allclose(pooled(features), pooled(features.flip(-1)), atol=1e-6)  # what a global pool sees
    assert (plain - mirrored).abs().max() > 0.1


def n_features_of(model):
    return model[1].box[0][0].in_channels


@pytest.mark.parametrize("backbone", BODIES)
def test_concat_is_fastais_head(backbone):
    """The default stays today's model: the same tensors, names and shapes as fastai builds them."""
    import torchvision
    from fastai.vision.learner import add_head, create_body, create_timm_model
    if backbone == "timm":
        want = create_timm_model("resnet10t", 5, pretrained=False)[0]
    else:
        want = add_head(create_body(torchvision.models.resnet18(weights=None), cut=-2), 512, 5)
    got = make_head("concat", BODIES[backbone](), 5)
    assert {k: v.shape for k, v in got.state_dict().items()} == {k: v.shape for k, v in want.state_dict().items()}
    assert str(got[1]) == str(want[1])
    linear = make_head("linear", BODIES[backbone](), 5)[1]  # torchvision's head: average pool, one Linear
    assert [type(m).__name__ for m in linear] == ["AdaptiveAvgPool2d", "Flatten", "Linear"]


def test_bilinear_features_are_normalized_outer_products():
    torch.manual_seed(0)
    pool = BilinearPool(8, bilinear_dim=None).eval()
    x = torch.randn(3, 8, 5, 4)
    got = pool(x)
    # another way: each pair of channels (i, j) multiplied location by location, averaged over the 20 locations
    want = torch.stack([torch.stack([(x[:, i] * x[:, j]).mean((1, 2)) for j in range(8)], 1) for i in range(8)], 1)
    want = want.flatten(1)
    want = want.sign() * (want.abs() + 1e-5).sqrt()
    want = want / want.norm(dim=1, keepdim=True)
    assert got.shape == (3, 64)
    assert torch.allclose(got.norm(dim=1), torch.ones(3), atol=1e-6)
    assert torch.allclose(got, want, atol=1e-6)


def test_bilinear_reduction_and_classifier_sizes():
    """A 1x1 reduction to 512 channels before the outer product, then a 512*512 -> n_out classifier."""
    with torch.device("meta"):  # shapes only: the unreduced classifier alone would take 3.3 GB
        reduced, full = bilinear_head(2048, 196, 512), bilinear_head(2048, 196, None)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(reduced) == (2048 * 512 + 2 * 512) + (512 * 512 * 196 + 196) == 52_430_020
    assert count(full) == 2048 * 2048 * 196 + 196 == 822_083_780
    assert reduced[0].reduce[0].kernel_size == (1, 1)


def test_bilinear_under_bf16_autocast_is_finite_and_pooled_in_fp32():
    torch.manual_seed(0)
    model = make_head("bilinear", tv_body(), 4, bilinear_dim=64).eval()
    x = torch.randn(2, 3, 64, 64) * 50  # large activations: bf16 products would lose most digits
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats = model[0](x)
            pooled = model[1][0](feats)
            out = model(x)
    assert feats.dtype == torch.bfloat16 and pooled.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert torch.allclose(pooled.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(out.float(), ref, atol=0.05 * ref.abs().max().item())


def test_bad_head_choices_stop_with_one_line():
    from fastai.vision.learner import create_timm_model
    with pytest.raises(UserError, match="unknown head 'bilnear'"):
        make_head("bilnear", tv_body(), 3)
    with pytest.raises(UserError, match="head 'concat' takes no option 'bilinear_dim'"):
        make_head("concat", tv_body(), 3, bilinear_dim=8)
    with pytest.raises(UserError, match="positive number of channels"):
        make_head("bilinear", tv_body(), 3, bilinear_dim=0)
    vit = create_timm_model("vit_tiny_patch16_224", 3, pretrained=False, img_size=32)[0][0]
    with pytest.raises(UserError, match="needs a .batch, channels, height, width. feature map.*pooled features"):
        make_head("localize", vit, 3)


def test_a_model_json_from_before_the_rename_loads_its_bilinear_dim(tmp_path):
    """model.json once stored the bilinear width as `reduce_ch`: load_trained and lr_find.py --model read it as
    bilinear_dim (16 here, not the default 512, whose weights would not fit)."""
    import json
    import lr_find
    from finegrained.models import build_model, load_trained, save_trained
    torch.manual_seed(0)
    model = build_model("resnet18", 3, head="bilinear", head_options={"bilinear_dim": 16}).eval()
    save_trained(model, tmp_path, {"arch": "resnet18", "head": "bilinear", "head_options": {"reduce_ch": 16, "dropout": 0.5},
                                   "classes": [{"id": i, "name": f"c{i}"} for i in range(3)], "image_size": 32})
    again, meta = load_trained(tmp_path)
    assert json.loads((tmp_path / "model.json").read_text())["head_options"] == {"reduce_ch": 16, "dropout": 0.5}
    assert again[1][0].channels == 16 and again[1][-1].in_features == 16 * 16
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    recipe, given, _ = lr_find.measured(lr_find.parse_args(["--model", str(tmp_path), "--stage", "unfrozen"]))
    assert recipe["bilinear_dim"] == given["bilinear_dim"] == 16


@pytest.mark.parametrize("kind", ["concat", "bilinear", "localize"])
def test_weights_round_trip_through_safetensors(kind, tmp_path):
    from safetensors.torch import load_file, save_file
    torch.manual_seed(0)
    opts = {"bilinear_dim": 16} if kind == "bilinear" else {}
    model = make_head(kind, timm_body(), 3, **opts).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    again = make_head(kind, timm_body(), 3, **opts)
    again.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        a, b = model(x), again.eval()(x)
    for u, v in zip(*(t if isinstance(t, tuple) else (t,) for t in (a, b))):
        assert torch.equal(u, v)


# ---------------------------------------------------------------- loss

@pytest.mark.parametrize("cls_name", ["CrossEntropyLossFlat", "LabelSmoothingCrossEntropyFlat", "FocalLossFlat"])
@pytest.mark.parametrize("box_loss", ["smoothl1", "giou"])
def test_localize_loss_adds_weighted_box_loss(cls_name, box_loss):
    import fastai.losses
    cls_loss = getattr(fastai.losses, cls_name)()
    logits, cls = torch.tensor([[2.0, -1.0], [0.5, 0.3]]), torch.tensor([0, 1])
    box = torch.tensor([[-0.5, -0.5, 0.5, 0.5], [0.0, 0.0, 0.4, 0.2]])
    target = torch.tensor([[[-0.5, -0.5, 0.5, 0.5]], [[0.0, 0.0, 0.2, 0.2]]])  # (bs, 1, 4) as BBoxBlock batches them
    loss = LocalizeLoss(cls_loss, box_loss, lam=2.0)((logits, box), target, cls)
    if box_loss == "smoothl1":  # beta 0.1: the one error of 0.2 is linear, 0.2 - 0.05; mean over 4 coordinates, 2 images
        box_part = (0 + (0.2 - 0.05) / 4) / 2
    else:  # second pair: IoU 0.04/0.08 = 0.5 and the enclosing box is the predicted one: 1 - GIoU = 0.5
        box_part = (0 + 0.5) / 2
    assert loss.item() == pytest.approx(cls_loss(logits, cls).item() + 2.0 * box_part, rel=1e-5)
    fn = LocalizeLoss(cls_loss, box_loss, lam=2.0)
    fn.reduction = "none"  # as fastai's get_preds(with_loss=True) sets it: one loss per image
    per_image = fn((logits, box), target, cls)
    assert per_image.shape == (2,) and per_image.mean().item() == pytest.approx(loss.item(), rel=1e-5)


def test_localize_metrics_on_hand_made_boxes():
    from finegrained.boxes import accuracy_loc, iou50, mean_iou
    target = torch.tensor([[[-1.0, -1.0, 0.0, 0.0]]] * 5)  # (bs, 1, 4), area 1
    box = torch.tensor([[-1.08, -1.0, 0.0, 0.0],  # past the frame: clipped, IoU 1
                        [-1.0, -1.0, 0.0, 0.0],   # identical: 1
                        [-1.0, -1.0, 0.0, -0.5],  # half of it: 0.5
                        [-1.0, -1.0, -0.5, -0.5], # a quarter: 0.25
                        [0.5, 0.5, 1.0, 1.0]])    # disjoint: 0
    logits, classes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 1, 0, 0, 1])
    preds = (logits, box)
    assert mean_iou(preds, target, classes).item() == pytest.approx((1 + 1 + 0.5 + 0.25 + 0) / 5)
    assert iou50(preds, target, classes).item() == pytest.approx(3 / 5)
    assert accuracy_loc(preds, target, classes).item() == pytest.approx(3 / 5)
    assert [m.__name__ for m in localize_metrics(top5=lambda inp, targ: 1.0)] == ["accuracy", "<lambda>", "mean_iou", "iou50"]


def test_localize_loss_refuses_bad_settings():
    from fastai.losses import CrossEntropyLossFlat
    with pytest.raises(UserError, match="unknown box loss 'l2'"):
        LocalizeLoss(CrossEntropyLossFlat(), "l2")
    with pytest.raises(UserError, match="weight must be 0 or more"):
        LocalizeLoss(CrossEntropyLossFlat(), lam=-1)


# ---------------------------------------------------------------- boxes through fastai's pipeline

def test_flip_and_resize_move_the_box_with_the_image(tmp_path):
    """A 100 px square image, resized to 50 (scale 1/2, nothing cropped) and always flipped left-right."""
    from fastai.vision.augment import Flip
    df = write_images(tmp_path, [(100, 100, (21, 31, 60, 70), 1)])  # pixel edges 20..60, 30..70
    dls = localize_block(Reader(tmp_path), 50, [Flip(p=1.0)]).dataloaders(df, bs=1, num_workers=0)
    img, box, cls = dls.train.one_batch()
    # at 50 px: x 10..30 flipped to 50-30..50-10 = 20..40, y 15..35; in the frame 2p/50 - 1
    want = torch.tensor([20, 15, 40, 35]) * 2 / 50 - 1
    assert box.shape == (1, 1, 4) and cls.shape == (1,)
    assert torch.allclose(box[0, 0], want, atol=1e-5)
    assert torch.allclose(bright_box(img[0]), want, atol=1e-5)


@pytest.mark.parametrize("method", ["crop", "squish", "pad"])
def test_validation_resize_and_its_inverse(tmp_path, method):
    """Validation images are resized centred; the box lands where resize_window says, and frame_to_devkit
    brings it back to the original devkit box."""
    specs = [(123, 77, (41, 12, 90, 60), 1), (64, 103, (10, 30, 50, 80), 2), (80, 80, (1, 1, 80, 80), 1)]
    df = write_images(tmp_path, specs + [(50, 50, (1, 1, 9, 9), c) for c in (1, 2)])  # a training set with both classes
    from fastai.vision.all import IndexSplitter
    dls = localize_block(Reader(tmp_path), 40, [], IndexSplitter([0, 1, 2]), method).dataloaders(df, bs=3, num_workers=0)
    _, boxes, classes = dls.valid.one_batch()
    assert classes.tolist() == [0, 1, 0]
    for (w, h, devkit, _), box in zip(specs, boxes[:, 0]):
        left, top, cw, ch = resize_window(w, h, 40, method)
        x1, y1, x2, y2 = devkit[0] - 1, devkit[1] - 1, devkit[2], devkit[3]
        want = torch.tensor([(x1 - left) / cw, (y1 - top) / ch, (x2 - left) / cw, (y2 - top) / ch]) * 2 - 1
        assert torch.allclose(box, want, atol=1e-5)
        assert frame_to_devkit(box, w, h, 40, method) == list(devkit)
    # by hand: crop keeps the centred 77 x 77 square from x = 23; pad adds 23 rows above; fastai truncates 19.5 to 19
    assert resize_window(123, 77, 40, "crop") == (23, 0, 77, 77)
    assert resize_window(123, 77, 40, "pad") == (0, -23, 123, 123)
    assert resize_window(64, 103, 40, "crop") == (0, 19, 64, 64)
    assert resize_window(64, 103, 40, "pad") == (-19, 0, 103, 103)


def test_frame_to_devkit_clips_to_the_image():
    assert frame_to_devkit(torch.tensor([-1.2, -1.0, 1.3, 1.0]), 120, 80, 40, "crop") == [21, 1, 100, 80]
    assert frame_to_devkit(torch.tensor([-1.0, -1.0, 1.0, 1.0]), 120, 80, 40, "squish") == [1, 1, 120, 80]


def test_augmentation_keeps_the_box_on_the_rectangle(tmp_path):
    """fastai's random crop, zoom and flip (no rotation or warp, which make a box loose): after them the
    bright rectangle still fills the box."""
    from fastai.vision.all import aug_transforms
    from fastai.torch_core import set_seed
    set_seed(3)
    df = write_images(tmp_path, random_specs(16, np.random.default_rng(3)))
    tfms = aug_transforms(max_rotate=0, max_warp=0, max_lighting=0, max_zoom=1.4, p_affine=1.0)
    dls = localize_block(Reader(tmp_path), 48, tfms).dataloaders(df, bs=16, num_workers=0)
    imgs, boxes, _ = dls.train.one_batch()
    from finegrained.boxes import in_frame
    overlap = iou(torch.stack([bright_box(im) for im in imgs]), in_frame(boxes))
    assert overlap.min() > 0.85, overlap
    assert (boxes[:, 0, 0] > boxes[:, 0, 2]).sum() == 0


def test_require_boxes():
    df = pd.DataFrame(dict(filename=["a.jpg", "b.jpg"], bbox_x1=[1, None], bbox_y1=[1, 2], bbox_x2=[5, 6],
                           bbox_y2=[5, 6], class_id=[1, 2]))
    require_boxes(df.iloc[:1])
    with pytest.raises(UserError, match=r"row 2 \(b.jpg\): no bounding box"):
        require_boxes(df)
    with pytest.raises(UserError, match="needs bounding boxes"):
        require_boxes(df[["filename", "class_id"]])


# ---------------------------------------------------------------- a tiny localize learner

def test_localize_learner_fits_and_logs_box_metrics(tmp_path):
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.torch_core import set_seed
    from fastai.vision.all import IndexSplitter, aug_transforms
    set_seed(0)
    df = write_images(tmp_path, random_specs(24, np.random.default_rng(0)))
    block = localize_block(Reader(tmp_path), 32, aug_transforms(), IndexSplitter(range(16, 24)))
    dls = block.dataloaders(df, bs=8, num_workers=0)
    assert dls.c == N_CLASSES
    learn = Learner(dls, make_head("localize", tv_body(), dls.c), loss_func=LocalizeLoss(CrossEntropyLossFlat(), "giou"),
                    metrics=localize_metrics())
    learn.fit_one_cycle(1, 1e-3)
    names = list(learn.recorder.metric_names)
    assert names[:6] == ["epoch", "train_loss", "valid_loss", "accuracy", "mean_iou", "iou50"]
    logged = dict(zip(names[1:], learn.recorder.values[-1]))
    assert all(math.isfinite(v) for v in logged.values())
    # the logged metrics, recomputed another way from get_preds: probabilities, boxes, and IoU by hand
    (probs, boxes), (true_boxes, classes) = learn.get_preds(dl=dls.valid)[:2]
    assert torch.allclose(probs.sum(1), torch.ones(len(probs)), atol=1e-5)
    p, t = boxes.clamp(-1, 1).numpy(), true_boxes[:, 0].clamp(-1, 1).numpy()
    inter = (np.clip(np.minimum(p[:, 2], t[:, 2]) - np.maximum(p[:, 0], t[:, 0]), 0, None)
             * np.clip(np.minimum(p[:, 3], t[:, 3]) - np.maximum(p[:, 1], t[:, 1]), 0, None))
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    by_hand = inter / (area(p) + area(t) - inter)
    assert logged["mean_iou"] == pytest.approx(by_hand.mean(), abs=1e-5)
    assert logged["iou50"] == pytest.approx((by_hand >= 0.5).mean(), abs=1e-6)
    assert logged["accuracy"] == pytest.approx((probs.argmax(1) == classes).float().mean().item(), abs=1e-6)
    # scoring images without labels: test_dl keeps the image only, and predictions are still (probs, boxes)
    test_probs, test_boxes = learn.get_preds(dl=dls.test_dl(df.iloc[16:], bs=8))[0]
    assert torch.allclose(test_probs, probs) and torch.allclose(test_boxes, boxes)
