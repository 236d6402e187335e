"""export.py, test.py --model FILE.onnx and predictor.Predictor on tiny models trained here (resnet18 from scratch):
the concat head (conftest's run), the bilinear head and the localize head (both outputs).

- onnxruntime on the exported file gives test.py's probabilities (within 1e-4) and top-1 on every hold-out image, and
  a localize model's boxes;
- the JSON beside the file is enough to prepare images: its steps, written here with PIL and numpy alone, give the
  same model input as test.py's fastai loader (crop with JPEG draft decoding, pad with a centre crop, squash);
- test.py scores the .onnx file with the accuracy (and box scores) of the run folder;
- the export's self-check stops with exit status 1, naming the difference, and writes nothing when the file differs;
- Predictor on a folder, a list, one image and a PIL image gives test.py's top-5, probabilities and boxes;
- the README's Python lines run as written."""
import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

from finegrained import cli
import export
from finegrained import onnx_model
from finegrained.errors import UserError
from conftest import localize_recipe, ROOT, holdout_scores

from finegrained import holdout

PRED = ["pred_x1", "pred_y1", "pred_x2", "pred_y2"]
@pytest.fixture(scope="module")
def runs(trained, prepared, tmp_path_factory):
    """{head: run folder}: conftest's concat run (crop), a bilinear run and a localize run (squash), one epoch at 32 px.
    The bilinear run's model.json then says resize pad and crop_pct 0.75, as a recipe can (the weights do not care), so
    that every resize path is exported and checked."""
    from finegrained import runner as run
    base = tmp_path_factory.mktemp("export_runs")
    tiny = ["--data", str(prepared), "--no-pretrained", "--workers", "0"]
    run.main([*tiny, "--arch", "resnet18", "--head", "bilinear", "--bilinear-dim", "16", "--epochs", "0,1,0",
              "--sizes", "32,32", "--bs", "16,16", "--out", str(base / "bilinear")])
    meta = json.loads((base / "bilinear" / "model.json").read_text())
    (base / "bilinear" / "model.json").write_text(json.dumps({**meta, "resize": "pad", "crop_pct": 0.75}))
    (base / "loc.toml").write_text(localize_recipe(1, 32))
    run.main([*tiny, "--recipe", str(base / "loc.toml"), "--out", str(base / "localize")])
    return {"concat": trained, "bilinear": base / "bilinear", "localize": base / "localize"}


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    """{head: the .onnx file export.py wrote for that run}."""
    base = tmp_path_factory.mktemp("onnx")
    for head, folder in runs.items():
        export.main(["--model", str(folder), "--out", str(base / f"{head}.onnx"), "--check-images", "4"])
    return {head: base / f"{head}.onnx" for head in runs}


def holdout_predictions(model_path, prepared):
    """test.py's own prediction of test.csv: probabilities (and model-frame boxes) for every row, in order."""
    model, meta = holdout.load_model(model_path)
    df = holdout.read_holdout(prepared / "test.csv", prepared)
    found = holdout.predict(model, meta, df, prepared, 16, workers=0)
    return found if isinstance(found, tuple) else (found, None)


@pytest.mark.parametrize("head", ["concat", "bilinear", "localize"])
def test_onnx_gives_test_pys_probabilities_and_top1_on_every_image(head, runs, exported, prepared):
    probs, boxes = holdout_predictions(runs[head], prepared)
    onnx_probs, onnx_boxes = holdout_predictions(exported[head], prepared)
    assert isinstance(holdout.load_model(exported[head])[0], onnx_model.OnnxModule)  # onnxruntime, not the run's torch model
    assert len(probs) == len(pd.read_csv(prepared / "test.csv"))
    assert (onnx_probs.argmax(1) == probs.argmax(1)).all()
    assert float((onnx_probs - probs).abs().max()) <= 1e-4
    assert float((probs.max(1).values - probs.min(1).values).min()) > 1e-3  # the model tells classes apart: a real check
    if head == "concat":
        assert len(set(probs.argmax(1).tolist())) > 1  # trained: not one class for every image
    assert (boxes is None) == (onnx_boxes is None) == (head != "localize")
    if boxes is not None:
        assert float((onnx_boxes - boxes).abs().max()) <= 1e-4


def prepare_from_json(path, pre):
    """The model input for one image, from the JSON's preprocessing alone (PIL and numpy, none of the project's code)."""
    base, size = pre["resize_to"], pre["crop_to"]
    im = Image.open(path)
    if pre["jpeg_draft"] and im.format == "JPEG":
        im.draft(im.mode, (base, base))  # the smallest DCT scale leaving at least `base` px on each side
    im = ImageOps.exif_transpose(im).convert("RGB")
    width, height = im.size
    if pre["resize"] == "squash":
        im = im.resize((base, base), Image.BILINEAR)
    else:
        m = (min if pre["resize"] == "crop" else max)(width, height) / base
        side = int(m * base)
        left, top = int((width - side) / 2), int((height - side) / 2)
        a = np.asarray(im)[max(top, 0):min(top + side, height), max(left, 0):min(left + side, width)]
        if pre["resize"] == "pad":
            pads = ((max(-top, 0), max(top + side - height, 0)), (max(-left, 0), max(left + side - width, 0)), (0, 0))
            a = np.pad(a, pads, mode={"reflection": "reflect", "zeros": "constant"}[pre["pad_mode"]])
        im = Image.fromarray(a).resize((base, base), Image.BILINEAR)
    if base != size:
        offset = (base - size) // 2
        im = im.crop((offset, offset, offset + size, offset + size))
    x = np.asarray(im, dtype=np.float32) / np.float32(255)
    x = (x - np.array(pre["mean"], np.float32)) / np.array(pre["std"], np.float32)
    return x.transpose(2, 0, 1)


@pytest.mark.parametrize("head, resize", [("concat", "crop"), ("bilinear", "pad"), ("localize", "squash")])
def test_the_json_alone_prepares_images_as_test_py_does(head, resize, runs, exported, prepared):
    import onnxruntime
    info = json.loads(onnx_model.sidecar(exported[head]).read_text())
    pre = info["preprocessing"]
    assert pre["resize"] == resize and pre["jpeg_draft"] == (head != "localize")
    assert (pre["resize_to"], pre["crop_to"]) == ((43, 32) if head == "bilinear" else (info["image_size"],) * 2)  # 32 / 0.75
    assert [c["name"] for c in info["classes"]] == [c["name"] for c in json.loads((runs[head] / "model.json").read_text())["classes"]]
    test = pd.read_csv(prepared / "test.csv")
    batch = np.stack([prepare_from_json(prepared / f, pre) for f in test["filename"]])
    session = onnxruntime.InferenceSession(str(exported[head]), providers=["CPUExecutionProvider"])
    names = [o["name"] for o in info["outputs"]]
    found = dict(zip(names, session.run(names, {info["input"]["name"]: batch})))
    probs, boxes = holdout_predictions(runs[head], prepared)
    assert (found["probabilities"].argmax(1) == probs.argmax(1).numpy()).all()
    assert np.abs(found["probabilities"] - probs.numpy()).max() <= 1e-4
    if boxes is not None:
        assert np.abs(found["box"] - boxes.numpy()).max() <= 1e-4


@pytest.mark.parametrize("head", ["concat", "localize"])
def test_test_py_scores_the_onnx_file_as_it_scores_the_run(head, runs, exported, prepared, tmp_path, capsys):
    common = ["--folder", prepared, "--csv", prepared / "test.csv", "--workers", 0]
    run_scores, _ = holdout_scores(capsys, "--model", runs[head], *common, "--out", tmp_path / "run.csv")
    onnx_scores, _ = holdout_scores(capsys, "--model", exported[head], *common, "--out", tmp_path / "onnx.csv")
    assert set(run_scores) == set(onnx_scores) == ({"accuracy", "top5", "mean_iou", "iou50"} if head == "localize"
                                                   else {"accuracy", "top5"})
    assert onnx_scores == run_scores
    a, b = pd.read_csv(tmp_path / "run.csv"), pd.read_csv(tmp_path / "onnx.csv")
    assert a["pred_id"].tolist() == b["pred_id"].tolist() and a["top5_ids"].tolist() == b["top5_ids"].tolist()
    assert np.abs(a["confidence"] - b["confidence"]).max() <= 1e-4
    if head == "localize":
        assert (a[PRED].to_numpy() == b[PRED].to_numpy()).all()  # the boxes, in the images' pixels


@pytest.mark.parametrize("head, output", [("bilinear", "probabilities"), ("localize", "box")])
def test_the_export_stops_and_writes_nothing_when_the_onnx_file_differs(head, output, runs, tmp_path, monkeypatch, capsys):
    forward = onnx_model._Exported.forward

    def perturbed(self, image):  # the graph exported differs from the model by 1e-3 in one output
        outs = list(forward(self, image))
        outs[0 if output == "probabilities" else 2] = outs[0 if output == "probabilities" else 2] + 1e-3
        return tuple(outs)

    monkeypatch.setattr(onnx_model._Exported, "forward", perturbed)
    out = tmp_path / "m.onnx"
    with pytest.raises(SystemExit) as stopped:
        cli.run(lambda: export.main(["--model", str(runs[head]), "--out", str(out), "--check-images", "2"]))
    assert stopped.value.code == 1
    message = capsys.readouterr().err.strip()
    name = "probability" if output == "probabilities" else "box"
    assert re.search(rf"max {name} difference 0\.001 \(allowed 1e-4\)", message), message
    assert message.count("\n") == 0 and "nothing was written" in message
    assert list(tmp_path.iterdir()) == []  # neither the file, nor its JSON, nor a temporary


def test_predictor_gives_test_pys_top5_probabilities_and_boxes(runs, exported, prepared, tmp_path, capsys):
    from finegrained.predictor import Predictor
    folder = prepared / "test"
    for head in ("concat", "localize"):
        holdout_scores(capsys, "--model", runs[head], "--folder", folder, "--predict-only", "--out", tmp_path / f"{head}.csv",
              "--workers", 0)
        expected = pd.read_csv(tmp_path / f"{head}.csv").set_index("filename")
        for source in (runs[head], exported[head]):
            model = Predictor.load(source)
            assert model.has_boxes == (head == "localize") and len(model.classes) == 4
            found = model.predict(folder, k=5)
            assert [p.image for p in found] == [str(folder / f) for f in expected.index]
            for p in found:
                row = expected.loc[p.image[len(str(folder)) + 1:]]
                assert ";".join(map(str, p.ids)) == row["top5_ids"] and p.classes[0] == row["pred_name"]
                assert p.probabilities == sorted(p.probabilities, reverse=True)
                assert abs(p.probabilities[0] - row["confidence"]) <= 1e-4
                assert (p.box is None) == (head != "localize")
                if p.box is not None:
                    assert list(p.box) == row[PRED].tolist()
            chosen = [folder / f for f in expected.index[[3, 0, 5]]]
            listed = model.predict(chosen, k=2)
            assert [(p.image, p.ids) for p in listed] == [(str(f), [int(i) for i in expected.loc[f.name, "top5_ids"].split(";")[:2]])
                                                          for f in chosen]
            one = model.predict(chosen[0], k=3)
            assert one.ids == listed[0].ids + one.ids[2:] and len(one.ids) == 3
    png = tmp_path / "photo.png"  # an in-memory image is read as the same pixels in a file
    Image.open(folder / expected.index[0]).convert("RGB").save(png)
    model = Predictor.load(runs["concat"])
    from_file, from_memory = model.predict(png), model.predict(Image.open(png))
    assert from_memory.image == "<image 0>" and from_memory.ids == from_file.ids
    assert np.allclose(from_memory.probabilities, from_file.probabilities, atol=1e-6)
    with pytest.raises(UserError, match="nope.jpg: no such image or folder"):
        model.predict(tmp_path / "nope.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(UserError, match="broken.jpg: "):
        model.predict([png, tmp_path / "broken.jpg"])


def readme_block(marker):
    """The ```python block that follows `marker` in README.md."""
    text = (ROOT / "README.md").read_text()
    found = re.search(re.escape(marker) + r"\s*```python\n(.*?)```", text, re.S)
    assert found, f"README.md has no python block after {marker}"
    return found.group(1)


def test_the_readme_python_lines_run(runs, prepared, tmp_path, monkeypatch, capsys):
    code = readme_block("<!-- the Python API: tests/test_export.py runs this block -->")
    assert len(code.strip().splitlines()) == 5
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "cars").symlink_to(runs["localize"], target_is_directory=True)
    images = sorted((prepared / "test").glob("*.jpg"))[:3]
    shutil.copy(images[0], tmp_path / "photo.jpg")
    (tmp_path / "photos").mkdir()
    for image in images:
        shutil.copy(image, tmp_path / "photos" / image.name)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out.strip().splitlines()
    holdout_scores(capsys, "--model", runs["localize"], "--folder", tmp_path / "photos", "--predict-only", "--out", tmp_path / "p.csv",
          "--workers", 0)
    expected = pd.read_csv(tmp_path / "p.csv")
    top = namespace["top"]
    assert top.ids == [int(i) for i in expected["top5_ids"][0].split(";")[:3]]
    assert list(top.box) == expected[PRED].iloc[0].tolist()
    assert printed[0].startswith(str(top.classes))
    assert len(printed) == 1 + len(images)
    for line, (_, row) in zip(printed[1:], expected.iterrows()):
        assert row["filename"] in line and row["pred_name"] in line


def test_bad_exported_files_and_flags_stop_with_one_line(runs, exported, prepared, tmp_path):
    lone = tmp_path / "lone.onnx"
    shutil.copy(exported["bilinear"], lone)
    with pytest.raises(UserError, match=r"lone.onnx.json is missing beside it"):
        holdout.main(["--model", str(lone), "--folder", str(prepared / "test")])
    onnx_model.sidecar(lone).write_text(json.dumps({"classes": []}))
    with pytest.raises(UserError, match=r"not the JSON export.py writes"):
        holdout.main(["--model", str(lone), "--folder", str(prepared / "test")])
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not onnx")
    shutil.copy(onnx_model.sidecar(exported["bilinear"]), onnx_model.sidecar(junk))
    with pytest.raises(UserError, match=r"junk.onnx: not an ONNX model onnxruntime can run"):
        holdout.main(["--model", str(junk), "--folder", str(prepared / "test")])
    other = tmp_path / "other.onnx"  # a localize model's file with a classifier's JSON
    shutil.copy(exported["localize"], other)
    shutil.copy(onnx_model.sidecar(exported["bilinear"]), onnx_model.sidecar(other))
    with pytest.raises(UserError, match=r"not from the same export"):
        holdout.main(["--model", str(other), "--folder", str(prepared / "test")])
    with pytest.raises(UserError, match=r"--heatmaps needs the PyTorch model"):
        holdout.main(["--model", str(exported["bilinear"]), "--folder", str(prepared / "test"), "--heatmaps", "2"])
    with pytest.raises(UserError, match=r"already exists; pass --overwrite"):
        export.main(["--model", str(runs["bilinear"]), "--out", str(exported["bilinear"])])
    with pytest.raises(UserError, match=r"already an exported file"):
        export.main(["--model", str(exported["bilinear"])])
    with pytest.raises(UserError, match=r"ends in .onnx"):
        export.main(["--model", str(runs["bilinear"]), "--out", str(tmp_path / "m.pt")])


def test_the_check_images_are_the_runs_test_images_or_generated_ones(prepared, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"run": {"data": str(prepared)}}))
    df, folder, where = export.check_images(run_dir, {"image_size": 32}, 5, tmp_path)
    assert folder == prepared and df["filename"].tolist() == pd.read_csv(prepared / "test.csv")["filename"].head(5).tolist()
    assert list(df.columns) == ["filename", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"]  # boxes for --crop-bbox models
    (run_dir / "config.json").write_text(json.dumps({"run": {"data": str(tmp_path / "moved")}}))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    df, folder, where = export.check_images(run_dir, {"image_size": 32}, 3, scratch)
    assert folder == scratch and "generated" in where and len(df) == 3
    sizes = [Image.open(scratch / f).size for f in df["filename"]]
    assert len(set(sizes)) == 3 and min(min(s) for s in sizes) >= 25  # varied shapes, none far below the model's size
