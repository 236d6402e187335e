"""Why the model said what it said: Grad-CAM heatmaps of chosen images and the images with the
highest loss, each as one PNG grid with the true and predicted class and the probability.

    rows = select_examples(probs, true, n)                      # highest-loss mistakes, then correct, across classes
    maps = gradcam_maps(model, images, classes)                 # images: normalized model inputs
    heatmap_grid(denormalize(images, stats), maps, captions, "out_heatmaps.png")
    write_heatmaps(...) / write_top_losses(...) do all of it from probabilities and a loader of rows.

The maps come from torchcam (pinned in requirements.txt): small, pure PyTorch, no OpenCV, and
maintained, where pytorch-grad-cam pulls in OpenCV and fastai has no Grad-CAM of its own. Written
here: choosing the layer for this project's two model shapes, choosing the rows, and the grids.
Top losses are taken from the probabilities already computed (the cross-entropy of the true
class) rather than through fastai's ClassificationInterpretation, whose from_learner runs
inference again over a labelled loader of the training DataBlock: test.py's hold-out loader has
no labels (they are matched to the model's classes by id or name) and may be TTA-averaged."""
import itertools
import math

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import nn
from torchcam.methods import GradCAM
from torchcam.utils import overlay_mask

from finegrained.errors import UserError
from finegrained.files import save_png

# Sized so that the report (report.CONTENT_PX wide) shows a grid at its own size: 4 cells of 290 px to a row,
# captions in 9 pt at 100 dpi (12.5 px), never scaled down. A cell: the image, then up to four caption lines.
GRID_DPI, CELL_INCHES, CAPTION_INCHES, TITLE_INCHES = 100, 2.9, 0.72, 0.4
CAPTION_PT, TITLE_PT = 9, 11
HEATMAP_COLUMNS, TOP_LOSS_COLUMNS = 2, 4    # examples per row (a heatmap example is two cells: image, map)


# ---------------------------------------------------------------- Grad-CAM

def cam_target_layer(model):
    """The layer Grad-CAM reads: the last feature stage of the body.

    models.build_model gives nn.Sequential(body, head). A torchvision body is fastai's create_body
    cut of a ResNet (stem, layer1..layer4), so the last conv block is model[0][-1]; a timm body is
    fastai's TimmBody, whose .model lists its stages in timm's feature_info."""
    body = model[0] if isinstance(model, nn.Sequential) and len(model) > 0 else None
    timm_model = getattr(body, "model", None)
    if timm_model is not None and getattr(timm_model, "feature_info", None):
        name = timm_model.feature_info[-1]["module"]
        try:
            return timm_model.get_submodule(name)
        except AttributeError:
            pass
    elif isinstance(body, nn.Sequential) and len(body) and any(isinstance(m, nn.Conv2d) for m in body[-1].modules()):
        return body[-1]
    raise UserError(f"cannot choose a Grad-CAM layer for this model ({type(model).__name__}); pass target_layer")


def gradcam_maps(model, images, class_indices, target_layer=None, bs=16):
    """Grad-CAM of class `class_indices[i]` for `images[i]` (normalized model inputs, N x 3 x H x W), as
    N x H x W maps in [0, 1]: torchcam's maps (per image, ReLU then min-max normalized) at the layer's
    resolution, upsampled bilinearly to the image size as torchcam's fuse_cams does. For a model with
    a box head, of its class logits. The model is left in the mode it was in."""
    layer = cam_target_layer(model) if target_layer is None else target_layer
    classes = [int(c) for c in (class_indices.tolist() if torch.is_tensor(class_indices) else class_indices)]
    if len(classes) != len(images):
        raise ValueError(f"{len(images)} images but {len(classes)} class indices")
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    maps = []
    try:
        with GradCAM(model, target_layer=layer) as cam, torch.enable_grad():
            for start in range(0, len(images), bs):
                x = images[start:start + bs].to(device, torch.float32).detach().requires_grad_(True)  # a graph even if frozen
                scores = model(x)
                if isinstance(scores, (tuple, list)):   # a localize head returns (class logits, box)
                    scores = scores[0]
                small = cam(class_idx=classes[start:start + bs], scores=scores)[0]
                maps.append(nn.functional.interpolate(small[:, None].float(), size=x.shape[-2:], mode="bilinear",
                                                      align_corners=False)[:, 0].cpu())
    finally:
        model.train(was_training)
    return torch.cat(maps) if maps else torch.zeros(0, *images.shape[-2:])


# ---------------------------------------------------------------- which rows to show

def across_classes(rows, key, true, n):
    """Up to `n` of `rows`, taken a class at a time: each true class's rows by `key` (highest first, ties by row),
    the classes in the order of their best row; round k takes every class's k-th row. So n examples come from
    min(n, classes) classes, where the n best overall may all be of one class. (Hand-written: itertools has no
    round-robin, and this is its four-line recipe.)"""
    rows = np.sort(np.asarray(rows, dtype=int))
    by_class = {}   # dicts keep insertion order: the classes by their best row
    for r in rows[np.argsort(-np.asarray(key)[rows], kind="stable")]:
        by_class.setdefault(int(true[r]), []).append(int(r))
    picked = [r for round_ in itertools.zip_longest(*by_class.values()) for r in round_ if r is not None]
    return np.array(picked[:n], dtype=int)


def select_examples(probs, true, n):
    """(mistakes, correct): row indices of up to `n` wrong predictions, highest loss (-log p of the true class)
    first, and up to `n` right ones, most confident first, each spread over the true classes (across_classes)."""
    probs, true = torch.as_tensor(probs).float(), np.asarray(true).astype(int)
    conf, pred = probs.max(1)
    loss = -probs.gather(1, torch.as_tensor(true)[:, None])[:, 0].clamp_min(1e-12).log()
    wrong = pred.numpy() != true
    return (across_classes(np.flatnonzero(wrong), loss.numpy(), true, n),
            across_classes(np.flatnonzero(~wrong), conf.numpy(), true, n))


def heatmaps_title(probs, true, mistakes, correct):
    """What a heatmap grid shows, true also when there are no mistakes (or nothing correct) to show."""
    true = np.asarray(true).astype(int)
    wrong_total = int((torch.as_tensor(probs).argmax(1).numpy() != true).sum())
    classes = len(set(true[np.concatenate([mistakes, correct]).astype(int)].tolist()))
    across = f", from {classes} class{'es' if classes != 1 else ''}"
    if not len(mistakes):
        return f"no mistakes among the {len(true)} images; {len(correct)} correct (green){across}"
    shown = f"{len(mistakes)} highest-loss mistake{'s' if len(mistakes) != 1 else ''} (red, of {wrong_total})"
    if not len(correct):
        return f"{shown}{across}; no image was classified correctly"
    return f"{shown}, {len(correct)} correct (green){across}"


def top_losses(probs, true, n):
    """(losses, row indices) of the `n` rows with the highest cross-entropy -log p(true class)."""
    probs, true = torch.as_tensor(probs).float(), torch.as_tensor(np.asarray(true)).long()
    losses = -probs.gather(1, true[:, None])[:, 0].clamp_min(1e-12).log()
    values, idx = losses.topk(min(n, len(losses)))
    return values.numpy(), idx.numpy()


def denormalize(images, stats):
    """Model inputs back to displayable [0, 1] RGB (N x 3 x H x W) with the (mean, std) they were normalized by."""
    mean, std = (torch.tensor(s, dtype=torch.float32).view(1, -1, 1, 1) for s in stats)
    return (images.detach().float().cpu() * std + mean).clamp(0, 1)


# ---------------------------------------------------------------- grids

def grid_pixels(n_cells, columns):
    """(width, height) in pixels of a grid of `n_cells` cells, `columns` to a row."""
    cols, rows = min(n_cells, columns), math.ceil(n_cells / columns)
    return round(cols * CELL_INCHES * GRID_DPI), round((TITLE_INCHES + rows * (CELL_INCHES + CAPTION_INCHES)) * GRID_DPI)


def _grid(cells, columns, path, title):
    """cells: [(HxWx3 array in [0, 1], caption, caption colour)]; one PNG, written atomically; returns its size.
    Laid out here because fastai's show_images and plot_top_losses draw into pyplot's current figure,
    sized by the number of images, with no caption colour and nothing to save it atomically."""
    if not cells:
        raise UserError(f"{path}: nothing to show")
    width, height = grid_pixels(len(cells), columns)
    w_in, h_in = width / GRID_DPI, height / GRID_DPI
    fig = Figure(figsize=(w_in, h_in), dpi=GRID_DPI)
    pad = 0.05   # inches between neighbouring images
    for k, (image, caption, colour) in enumerate(cells):
        row, col = divmod(k, columns)
        top = h_in - TITLE_INCHES - row * (CELL_INCHES + CAPTION_INCHES)
        ax = fig.add_axes([(col * CELL_INCHES + pad) / w_in, (top - CELL_INCHES + pad) / h_in,
                           (CELL_INCHES - 2 * pad) / w_in, (CELL_INCHES - 2 * pad) / h_in])
        ax.axis("off")
        ax.imshow(image, interpolation="bilinear")
        ax.text(0.5, -0.02, caption, transform=ax.transAxes, fontsize=CAPTION_PT, color=colour, ha="center", va="top",
                linespacing=1.15)
    fig.text(0.5, 1 - 0.08 / h_in, title, fontsize=TITLE_PT, ha="center", va="top")
    save_png(fig, path)
    return width, height


def _hwc(image):
    return image.permute(1, 2, 0).numpy() if torch.is_tensor(image) else np.asarray(image)


def overlay(image, cam):
    """torchcam's overlay: the map in the jet colour map blended over the image (half each), as HxWx3 in [0, 1]."""
    rgb = Image.fromarray((_hwc(image) * 255).round().astype(np.uint8))
    mask = Image.fromarray(cam.detach().float().cpu().numpy())   # float32: mode "F", as torchcam expects
    return np.asarray(overlay_mask(rgb, mask, alpha=0.5)) / 255.0


def heatmap_grid(images, maps, captions, path, colours=None, title="Grad-CAM: where the model looked"):
    """A PNG of image / Grad-CAM overlay pairs, HEATMAP_COLUMNS pairs to a row; `images` in [0, 1]."""
    colours = colours or ["black"] * len(captions)
    cells = []
    for image, cam, caption, colour in zip(images, maps, captions, colours):
        cells += [(_hwc(image), caption, colour), (overlay(image, cam), "Grad-CAM of the\npredicted class", "0.3")]
    return _grid(cells, 2 * HEATMAP_COLUMNS, path, title)


def top_losses_grid(images, captions, path, title="Highest loss: the lowest probability of the true class"):
    """A PNG of the images, TOP_LOSS_COLUMNS to a row, each with its caption; `images` in [0, 1]."""
    return _grid([(_hwc(im), c, "black") for im, c in zip(images, captions)], TOP_LOSS_COLUMNS, path, title)


def caption(name_true, name_pred, prob, loss=None, width=30, file=None):
    """Three lines: true class, predicted class (long names shortened), probability and the loss when given;
    over them, the image's file name (its end) when given."""
    short = lambda s: str(s) if len(str(s)) <= width else str(s)[:width - 1] + "…"  # noqa: E731
    text = f"true: {short(name_true)}\npred: {short(name_pred)}\np = {prob:.3f}"
    text = (f"{file if len(str(file)) <= width else '…' + str(file)[1 - width:]}\n" if file is not None else "") + text
    return text + (f", loss {loss:.2f}" if loss is not None else "")


# ---------------------------------------------------------------- all of it, for test.py and run.py

def write_heatmaps(model, load_images, probs, true, class_names, n, path, stats, target_layer=None, files=None):
    """`<out>_heatmaps.png`: up to n mistakes, highest loss first (red captions), then up to n correct, most
    confident first (green), both spread over the true classes (select_examples), each with the Grad-CAM of its
    predicted class. `load_images(row_indices)` returns the normalized model inputs of those rows; `files`, the
    file name of each row, captions them. Returns the rows shown, or None when there is nothing."""
    mistakes, correct = select_examples(probs, true, n)
    rows = np.concatenate([mistakes, correct]).astype(int)
    if not len(rows):
        return None
    probs = torch.as_tensor(probs).float()
    pred = probs.argmax(1).numpy()
    x = load_images(rows)
    maps = gradcam_maps(model, x, pred[rows], target_layer)
    captions = [caption(class_names[true[r]], class_names[pred[r]], float(probs[r, pred[r]]),
                        file=None if files is None else files[r]) for r in rows]
    colours = ["#b00020"] * len(mistakes) + ["#1b7a1b"] * len(correct)
    heatmap_grid(denormalize(x, stats), maps, captions, path, colours,
                 title=f"Grad-CAM: {heatmaps_title(probs, true, mistakes, correct)}")
    return rows


def write_top_losses(load_images, probs, true, class_names, n, path, stats, files=None):
    """`<out>_top_losses.png`: the n rows with the highest loss, captioned as write_heatmaps'. Returns those rows."""
    losses, rows = top_losses(probs, true, n)
    if not len(rows):
        return None
    probs = torch.as_tensor(probs).float()
    pred = probs.argmax(1).numpy()
    captions = [caption(class_names[true[r]], class_names[pred[r]], float(probs[r, pred[r]]), float(l),
                        file=None if files is None else files[r]) for r, l in zip(rows, losses)]
    wrong = int((pred[rows] != np.asarray(true)[rows]).sum())
    top_losses_grid(denormalize(load_images(rows), stats), captions, path,
                    title=f"Highest loss: the {len(rows)} images with the lowest probability of their true class "
                          f"({wrong} of them misclassified)")
    return rows
