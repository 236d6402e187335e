"""Exported models: a trained model as an ONNX file with a JSON beside it, and such a file run by onnxruntime.

    export_onnx(model, meta, path)   writes path (ONNX, opset OPSET, any batch size); torch's dynamo exporter
    describe(meta, ...)              the JSON written beside it (sidecar(path)): model.json's keys (classes, image size,
                                     resize, normalization, head), the preprocessing step by step, the outputs
    load_onnx(path)                  (OnnxModule, that JSON): what test.py and predictor.py score with

The ONNX graph takes `image`, a float32 (batch, 3, size, size) array prepared as the JSON's preprocessing says, and
gives `probabilities` (softmax over the classes, in the JSON's class order), `logits`, and for a localize model `box`.

Why the dynamo exporter (torch.onnx.export(dynamo=True), which needs onnxscript): with torch 2.14.1 the legacy
TorchScript exporter refuses the localize head, whose box head pools to a 4 x 4 grid (AdaptiveAvgPool2d) that a
feature map of 1, 2, 3, 5, 10 ... cells does not divide ("output size that are not factor of input size"); dynamo
exports it, and the other heads (concat, linear, bilinear) and timm backbones, within 1e-5 of PyTorch."""
import json
from pathlib import Path

import torch
from torch import nn

from finegrained.errors import UserError

OPSET = 18  # the dynamo exporter's own opset (lower ones go through a version converter); onnxruntime 1.32 runs it
INPUT = "image"
SIDECAR_SUFFIX = ".json"  # model.onnx -> model.onnx.json: never a run folder's model.json
MAX_BYTES = 2 ** 31 - 2 ** 26  # weights above ~2 GB would need ONNX external data: a second file, refused instead


def is_onnx(path):
    return Path(path).suffix.lower() == ".onnx"


def sidecar(path):
    """The JSON beside an ONNX file: model.onnx -> model.onnx.json."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def output_names(meta):
    return ["probabilities", "logits"] + (["box"] if meta.get("head") == "localize" else [])


class _Exported(nn.Module):
    """The model as exported: image -> (probabilities, logits[, box]), the softmax in the graph so that an application
    needs no code of its own to read class probabilities."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        out = self.model(image)
        logits, box = out if isinstance(out, tuple) else (out, None)
        probabilities = torch.softmax(logits.float(), dim=1)
        return (probabilities, logits) if box is None else (probabilities, logits, box)


def export_onnx(model, meta, path):
    """Write `model` (in eval mode, on the CPU, in fp32) to `path` as ONNX; the batch axis is dynamic."""
    model = model.float().cpu().eval()
    size = int(meta["image_size"])
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if weight_bytes > MAX_BYTES:
        raise UserError(f"the model's weights take {weight_bytes / 2 ** 30:.1f} GiB, more than one ONNX file holds (2 GiB); "
                        "train it with a smaller head (e.g. --bilinear-dim 512) to export it")
    example = torch.zeros(2, 3, size, size)
    names = output_names(meta)
    try:
        torch.onnx.export(_Exported(model).eval(), (example,), str(path), input_names=[INPUT], output_names=names,
                          opset_version=OPSET, dynamo=True, external_data=False, verbose=False,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    except ImportError as err:
        raise UserError(f"exporting to ONNX needs onnx and onnxscript ({err}): pip install -r requirements.txt")


# ---------------------------------------------------------------- the JSON beside the file

def preprocessing(meta):
    """How an image becomes the model's input, step by step, exactly as test.py prepares it (data.inference_dl, fastai's
    validation transforms), with the numbers of this model."""
    from finegrained.data import presize
    from finegrained.recipe import RESIZE
    size, crop_pct = int(meta["image_size"]), float(meta.get("crop_pct", 1.0))
    resize, localize = meta.get("resize", "crop"), meta.get("head") == "localize"
    base = presize(size, crop_pct)
    mean, std = meta["normalize"]["mean"], meta["normalize"]["std"]
    pad_mode = "zeros" if localize else "reflection"
    steps = ["decode as image viewers show it: the EXIF orientation applied (PIL.ImageOps.exif_transpose), 16-bit "
             "images scaled to 8 bits (value >> 8), then converted to RGB"]
    if not localize:
        steps.append(f"JPEG files only: decoded at the smallest DCT scale (PIL's Image.draft) that still leaves the image "
                     f"(or the box region) at least {base} px on each side")
    if meta.get("crop_bbox"):
        steps.append(f"with a box (x1, y1, x2, y2, 1-based pixels): crop to it grown by {float(meta.get('bbox_margin', 0)):g} "
                     "of its width and height on every side, clipped to the image; without one, the whole image")
    if resize == "squash":
        steps.append(f"resize the whole image to {base} x {base} px, aspect ratio ignored, with PIL's bilinear filter")
    else:
        pick = "min" if resize == "crop" else "max"
        steps.append(f"m = {pick}(W, H) / {base}; side = int(m * {base}); take the square of that side at left "
                     f"int((W - side) / 2), top int((H - side) / 2)"
                     + (f" (the part outside the image padded, {pad_mode} padding)" if resize == "pad" else "")
                     + f"; resize it to {base} x {base} px with PIL's bilinear filter")
    if base != size:
        steps.append(f"keep the centre {size} x {size} px: left = top = ({base} - {size}) // 2")
    steps += ["to float32, channels first (3, H, W), RGB, divided by 255",
              f"normalize each channel: (x - mean) / std, mean {mean}, std {std}",
              f"stack images into a (batch, 3, {size}, {size}) array: input {INPUT!r}"]
    return {"steps": steps, "resize": resize, "fastai_resize": RESIZE.get(resize, resize), "resize_to": base,
            "crop_to": size, "resample": "bilinear (PIL)", "pad_mode": pad_mode if resize == "pad" else None,
            "jpeg_draft": not localize, "scale": 1 / 255, "mean": mean, "std": std, "channels": "RGB", "layout": "NCHW"}


def outputs(meta):
    n = len(meta["classes"])
    found = [{"name": "probabilities", "shape": ["batch", n], "meaning": "softmax over the classes, in the order of classes"},
             {"name": "logits", "shape": ["batch", n], "meaning": "the class scores before the softmax"}]
    if meta.get("head") == "localize":
        found.append({"name": "box", "shape": ["batch", 4], "meaning": (
            "x1, y1, x2, y2 in the model input's frame: -1 the left (top) edge, 1 the right (bottom) edge of the resized "
            "image; undo the resize to put it on the image (predictor.Predictor gives it in the image's 1-based pixels)")})
    return found


def describe(meta, source, check=None):
    """The JSON beside an exported file: model.json's keys (what test.py reads), the input, the preprocessing, the
    outputs, where it came from and the export's self-check."""
    import onnx
    import onnxruntime
    size = int(meta["image_size"])
    return {**meta, "format": "onnx", "opset": OPSET, "exported_from": str(source),
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
            "input": {"name": INPUT, "shape": ["batch", 3, size, size], "dtype": "float32"},
            "preprocessing": preprocessing(meta), "outputs": outputs(meta), "check": check}


# ---------------------------------------------------------------- running an exported file

class OnnxModule(nn.Module):
    """An exported model behind torch's Module interface, run by onnxruntime on the CPU. forward returns what the
    PyTorch model returns (class logits, or (logits, box)), so test.py's loader and fastai's Learner feed and read it
    exactly as they do a run folder's model. No gradients: Grad-CAM needs the PyTorch model."""

    def __init__(self, session):
        super().__init__()
        self.onnx_session = session  # names no Learner attribute: fastai's Learner looks up unknown ones on its model
        # fastai's Learner finds the model's device from its first parameter: an empty one, which moves with .to()
        self.device_marker = nn.Parameter(torch.zeros(0), requires_grad=False)
        self.onnx_outputs = [o.name for o in session.get_outputs()]

    def infer(self, images):
        """{output name: numpy array} for a float32 (batch, 3, size, size) array or tensor."""
        if isinstance(images, torch.Tensor):
            images = images.as_subclass(torch.Tensor).detach().float().cpu().numpy()
        return dict(zip(self.onnx_outputs, self.onnx_session.run(None, {INPUT: images})))

    def forward(self, x):
        found = self.infer(x)
        logits = torch.from_numpy(found["logits"]).to(x.device)
        return (logits, torch.from_numpy(found["box"]).to(x.device)) if "box" in found else logits


def session(path):
    """An onnxruntime session for `path` on the CPU; a file it cannot load is one line."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError("running an .onnx file needs onnxruntime: pip install -r requirements.txt")
    try:
        return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:
        raise UserError(f"{path}: not an ONNX model onnxruntime can run ({type(err).__name__}: {str(err).splitlines()[0][:200]})")


def load_onnx(path):
    """(OnnxModule, metadata) for an exported file: the metadata is the JSON beside it, with model.json's keys."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such ONNX file (write one with export.py --model runs/NAME)")
    side = sidecar(path)
    if not side.is_file():
        raise UserError(f"{path}: {side.name} is missing beside it (export.py writes both): without it the image size, "
                        "preprocessing and class names are unknown")
    try:
        meta = json.loads(side.read_text())
        classes, size = meta["classes"], int(meta["image_size"])
        meta["normalize"]["mean"], meta["normalize"]["std"]
        if meta.get("format") != "onnx":
            raise ValueError(f"format is {meta.get('format')!r}, not 'onnx'")
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{side}: not the JSON export.py writes ({type(err).__name__}: {err})")
    module = OnnxModule(session(path))
    want = output_names(meta)
    if module.onnx_outputs != want:
        raise UserError(f"{path}: its outputs are {', '.join(module.onnx_outputs)}, but {side.name} describes {', '.join(want)}: "
                        "the two files are not from the same export")
    shape, inputs = module.onnx_session.get_outputs()[0].shape, module.onnx_session.get_inputs()[0].shape
    if isinstance(shape[-1], int) and shape[-1] != len(classes):
        raise UserError(f"{path}: gives {shape[-1]} class probabilities, but {side.name} names {len(classes)} classes")
    if list(inputs[1:]) != [3, size, size]:
        raise UserError(f"{path}: takes images of shape {inputs[1:]}, but {side.name} says 3 x {size} x {size}")
    return module, meta
