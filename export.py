"""Export a trained model for use without PyTorch: an ONNX file, and beside it a JSON saying how to prepare images
and read the outputs.

    python export.py --model runs/NAME                      # runs/NAME/model.onnx + runs/NAME/model.onnx.json
    python export.py --model runs/NAME --out cars.onnx      # cars.onnx + cars.onnx.json
    python test.py --model cars.onnx --folder DIR --csv labels.csv   # the exported file scored as test.py scores the run

The ONNX file (opset 18, any batch size) takes `image`, float32 (batch, 3, size, size), and gives `probabilities`
(softmax over the classes), `logits` and, for a model trained with --head localize, `box`. The JSON holds model.json's
keys (classes in output order, image size, resize method, normalization), the preprocessing step by step with this
model's numbers, and the outputs' meaning.

Before either file takes its name, the export checks itself on --check-images images (the first of the run's test.csv
when its data folder is still there, else generated ones): onnxruntime's probabilities (and boxes) must equal
PyTorch's within 1e-4 and the top-1 class must agree (unless PyTorch's two best are within 1e-4: a tie); otherwise it
stops with exit status 1, naming the largest difference, and writes nothing."""
import json
from pathlib import Path

import numpy as np
import pandas as pd

from finegrained import cli
from finegrained.errors import RunFailed, UserError
from finegrained.files import atomic

TOLERANCE = 1e-4  # on probabilities (0..1) and boxes (the -1..1 input frame)


def parse_args(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--model", required=True, help="trained model folder (model.safetensors + model.json, from run.py)")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="file format to write (ONNX, run by onnxruntime)")
    p.add_argument("--out", default=None,
                   help="file to write (default: <model>/model.onnx); the JSON goes beside it as <out>.json")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    p.add_argument("--check-images", type=int, default=8, metavar="N",
                   help="images the export is checked on, onnxruntime against PyTorch")
    args = p.parse_args(argv)
    if args.check_images < 1:
        raise UserError(f"--check-images takes 1 or more, got {args.check_images}")
    return args


def check_images(model_dir, meta, n, scratch):
    """(DataFrame with `filename` (and boxes where the CSV has them), folder, where they come from): the first `n`
    images of the run's test.csv (else train.csv) when its data folder is still there, else `n` generated ones,
    noise of varied sizes and shapes as JPEG and PNG."""
    from finegrained.images import BOX_COLUMNS
    try:
        data = Path(json.loads((Path(model_dir) / "config.json").read_text())["run"]["data"])
    except (OSError, ValueError, KeyError, TypeError):
        data = None
    for name in ("test.csv", "train.csv"):
        if data is None or not (data / name).is_file():
            continue
        try:
            table = pd.read_csv(data / name)
        except Exception:
            continue
        if "filename" not in table.columns:
            continue
        table = table[[(data / f).is_file() for f in table["filename"].astype(str)]].head(n)
        if len(table):
            keep = ["filename"] + [c for c in BOX_COLUMNS if c in table.columns]
            return table[keep].reset_index(drop=True), data, f"the first {len(table)} of {data / name}"
    from PIL import Image
    rng = np.random.default_rng(0)
    size = int(meta["image_size"])
    files = []
    for i in range(n):
        w, h = (int(size * s) for s in rng.uniform(0.8, 2.5, 2))
        name = f"generated_{i}.{'jpg' if i % 2 == 0 else 'png'}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(Path(scratch) / name)
        files.append(name)
    return pd.DataFrame({"filename": files}), Path(scratch), f"{n} generated images (the run's data folder is not there)"


def model_inputs(meta, df, folder):
    """The float32 (N, 3, size, size) batch test.py feeds the model for the rows of `df` (data.inference_dl)."""
    import torch
    from finegrained.data import inference_dl
    from finegrained.images import BOX_COLUMNS, BOX_MARGIN
    stats = (meta["normalize"]["mean"], meta["normalize"]["std"])
    crop = bool(meta.get("crop_bbox")) and all(c in df.columns for c in BOX_COLUMNS)
    _, dl = inference_dl(df, folder, int(meta["image_size"]), len(df), stats, crop, meta.get("bbox_margin", BOX_MARGIN), 0,
                         resize=meta.get("resize", "crop"), crop_pct=float(meta.get("crop_pct", 1.0)),
                         localize=meta.get("head") == "localize")
    return torch.cat([b[0] for b in dl]).as_subclass(torch.Tensor).float().cpu()


def self_check(model, path, images):
    """Compare onnxruntime on the file at `path` with PyTorch's `model` on `images`, as a whole batch and the first image
    alone (the batch axis is dynamic): {the differences found}; a difference above TOLERANCE raises RunFailed."""
    import torch
    from finegrained.onnx_model import OnnxModule, session
    with torch.no_grad():
        out = model(images)
    logits, box = out if isinstance(out, tuple) else (out, None)
    probs = torch.softmax(logits.float(), 1).numpy()
    runner = OnnxModule(session(path))
    found, alone = runner.infer(images), runner.infer(images[:1])
    prob_diff = max(float(np.abs(found["probabilities"] - probs).max()),
                    float(np.abs(alone["probabilities"] - probs[:1]).max()))
    box_diff = None if box is None else max(float(np.abs(found["box"] - box.numpy()).max()),
                                            float(np.abs(alone["box"] - box[:1].numpy()).max()))
    ranked = np.sort(probs, 1)[:, ::-1]
    tie = ranked[:, 0] - ranked[:, min(1, probs.shape[1] - 1)] <= TOLERANCE if probs.shape[1] > 1 else np.zeros(len(probs), bool)
    differ = int(((found["probabilities"].argmax(1) != probs.argmax(1)) & ~tie).sum())
    check = {"images": len(images), "max_probability_difference": prob_diff, "top1_differs": differ}
    if box_diff is not None:
        check["max_box_difference"] = box_diff
    problems = [f"max probability difference {prob_diff:.3g}" + (" (allowed 1e-4)" if prob_diff > TOLERANCE else "")]
    if box_diff is not None:
        problems.append(f"max box difference {box_diff:.3g}" + (" (allowed 1e-4)" if box_diff > TOLERANCE else ""))
    if differ:
        problems.append(f"top-1 class differs on {differ} of {len(images)} images")
    if prob_diff > TOLERANCE or (box_diff or 0) > TOLERANCE or differ:
        raise RunFailed(f"the ONNX export does not match PyTorch on {len(images)} images: {', '.join(problems)}; "
                        "nothing was written")
    return check


def main(argv=None):
    import tempfile
    from finegrained.models import load_trained
    from finegrained.onnx_model import describe, export_onnx, is_onnx, sidecar
    args = parse_args(argv)
    if is_onnx(args.model):
        raise UserError(f"--model {args.model} is already an exported file; export.py takes a run folder (from run.py)")
    model, meta = load_trained(args.model)
    out = Path(args.out) if args.out else Path(args.model) / "model.onnx"
    if not is_onnx(out):
        raise UserError(f"--out {out}: an ONNX file's name ends in .onnx")
    for path in (out, sidecar(out)):
        if path.is_dir():
            raise UserError(f"{path} is a folder; --out names the ONNX file to write, e.g. {path / 'model.onnx'}")
        if path.exists() and not args.overwrite:
            raise UserError(f"{path}: already exists; pass --overwrite or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch, atomic(out) as tmp:
        export_onnx(model, meta, tmp)
        df, folder, where = check_images(args.model, meta, args.check_images, scratch)
        check = self_check(model, tmp, model_inputs(meta, df, folder))
        check["on"] = where
        with atomic(sidecar(out)) as tmp_json:
            tmp_json.write_text(json.dumps(describe(meta, Path(args.model).resolve(), check), indent=2))
    print(f"exported {args.model} to {out} ({out.stat().st_size / 2 ** 20:.1f} MiB) and {sidecar(out)}")
    line = f"checked on {where}: max probability difference {check['max_probability_difference']:.2g}"
    if "max_box_difference" in check:
        line += f", max box difference {check['max_box_difference']:.2g}"
    print(f"{line}, top-1 agrees on all {check['images']} (onnxruntime against PyTorch, allowed 1e-4)")
    print(f"score it: python test.py --model {out} --folder DIR --csv labels.csv")


if __name__ == "__main__":
    cli.run(main)
