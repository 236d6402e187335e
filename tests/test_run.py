"""run.py end to end on a generated Stanford-Cars-format set: all three stages, every output,
accuracy well above chance, resume after a kill without repeating epochs, and clear errors."""
import importlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from finegrained import runner as run
from finegrained.errors import UserError
from conftest import N_CLASSES, ROOT, run_script


def test_recipe_writes_every_output(trained):
    for name in ("model.safetensors", "model.json", "history.csv", "metrics.json", "config.json", "checkpoint.pth"):
        assert (trained / name).is_file(), name
    meta = json.loads((trained / "model.json").read_text())
    assert meta["arch"] == "resnet18" and meta["image_size"] == 64
    assert [c["id"] for c in meta["classes"]] == list(range(1, N_CLASSES + 1))
    weights = load_file(trained / "model.safetensors")
    checkpoint = torch.load(trained / "checkpoint.pth", weights_only=True)
    assert set(weights) == set(checkpoint["model"]) and len(weights) > 100  # resnet18's tensors, BatchNorm's included
    for name, tensor in checkpoint["model"].items():  # the saved model is the last epoch's
        assert torch.equal(weights[name], tensor.float() if tensor.is_floating_point() else tensor), name
    assert checkpoint["record"]["stage"] == 2 and checkpoint["record"]["epoch"] == 2
    assert [(r["stage"], r["epoch"]) for r in checkpoint["record"]["history"]] == list(
        zip(*pd.read_csv(trained / "history.csv")[["stage", "epoch"]].values.T))


def test_history_follows_the_recipe(trained):
    history = pd.read_csv(trained / "history.csv")
    assert history["stage"].tolist() == ["frozen"] * 2 + ["unfrozen"] * 4 + ["resized"] * 2
    assert history["size"].tolist() == [48] * 6 + [64] * 2
    assert history["lrs"].tolist() == ["0.00111;0.00333;0.01"] * 2 + ["0.000333;0.001;0.003"] * 6
    assert history["train_loss"].notna().all()


def test_scores_every_test_image_well_above_chance(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["test_images"] == N_CLASSES * 12
    assert metrics["test_top1"] > 2 / N_CLASSES, metrics  # chance is 1/N_CLASSES
    assert set(metrics["seconds_per_stage"]) == {"frozen", "unfrozen", "resized"}


def test_existing_run_is_not_overwritten(trained, prepared):
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        run.main(["--data", str(prepared), "--arch", "resnet18", "--no-pretrained", "--out", str(trained)])


def kill_when(args, out, reached):
    """Start run.py with `args`, SIGKILL it as soon as progress.json satisfies `reached`; return that progress."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, progress = time.time() + 300, {}
    while time.time() < deadline and proc.poll() is None:
        try:
            progress = json.loads((out / "progress.json").read_text())
        except (FileNotFoundError, ValueError):
            progress = {}
        if progress and reached(progress):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return progress


EPOCHS = (2, 3, 2)
UNINTERRUPTED = [("frozen", 1), ("frozen", 2), ("unfrozen", 1), ("unfrozen", 2), ("unfrozen", 3), ("resized", 1),
                 ("resized", 2)]


@pytest.mark.parametrize("stage", [1])  # tests/test_resume.py kills in-process at every write of the epochs around it
def test_resume_after_a_kill_in_any_stage_continues_there(prepared, tmp_path, stage):
    out = tmp_path / "killed"
    args = ["--data", prepared, "--arch", "resnet18", "--no-pretrained", "--epochs", ",".join(map(str, EPOCHS)),
            "--sizes", "32,40", "--bs", "16,16", "--workers", "0", "--out", out]
    progress = kill_when(args, out, lambda p: p["stage"] == stage and p["epoch"] < EPOCHS[stage])
    assert progress["stage"] == stage and not (out / "metrics.json").exists(), progress
    before = pd.read_csv(out / "history.csv")
    run.main([str(a) for a in args] + ["--resume"])
    history = pd.read_csv(out / "history.csv")
    assert list(zip(history["stage"], history["epoch"])) == UNINTERRUPTED  # nothing trained twice, nothing skipped
    pd.testing.assert_frame_equal(history.head(len(before)), before)  # the rows before the kill, seconds and all
    assert (out / "metrics.json").exists()


def test_checkpoint_with_pickled_code_is_refused_on_resume(trained, tmp_path, monkeypatch):
    import pickle
    from conftest import PickleBomb
    copy = shutil.copytree(trained, tmp_path / "copy")
    (copy / "progress.json").write_text(json.dumps({"stage": 1, "epoch": 1}))
    with open(copy / "checkpoint.pth", "wb") as f:
        pickle.dump({"model": PickleBomb()}, f)
    monkeypatch.chdir(tmp_path)
    result = run_script("run.py", "--out", copy, "--resume", "--workers", 0, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: {copy / 'checkpoint.pth'}: not a checkpoint of this run that can be loaded safely")
    assert len([l for l in lines if l.startswith("error")]) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "PWNED").exists()


def test_bad_inputs_give_one_clear_line(prepared, tmp_path):
    with pytest.raises(UserError, match="no such data folder"):
        run.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o1")])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.csv").write_text("image,label\na.jpg,1\n")
    (bad / "test.csv").write_text("image,label\na.jpg,1\n")
    with pytest.raises(UserError, match=r"train\.csv: missing column\(s\) filename, class_id"):
        run.main(["--data", str(bad), "--out", str(tmp_path / "o2")])
    result = run_script("run.py", "--data", prepared, "--arch", "resnet19", "--out", tmp_path / "o3")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: unknown architecture 'resnet19'")
    assert len([l for l in result.stderr.splitlines() if l.strip()]) == 1


def test_validation_split_keeps_the_best_model(prepared, tmp_path):
    out = tmp_path / "valid"
    run.main(["--data", str(prepared), "--arch", "resnet18", "--no-pretrained", "--epochs", "1,2,0", "--sizes", "32,32",
              "--bs", "16,16", "--valid-pct", "0.25", "--workers", "0", "--out", str(out), "--loss", "smooth",
              "--crop-bbox", "--balance"])
    history = pd.read_csv(out / "history.csv")
    assert len(history) == 3 and history["accuracy"].notna().all() and history["valid_loss"].notna().all()
    progress = json.loads((out / "progress.json").read_text())
    assert progress["best_accuracy"] == pytest.approx(history["accuracy"].max())
    assert set(torch.load(out / "best.pth", weights_only=True)) == set(load_file(out / "model.safetensors"))
    meta = json.loads((out / "model.json").read_text())
    assert meta["image_size"] == 32 and meta["crop_bbox"] is True  # no resized stage; test.py will crop too


def resolved_by_run_py(command):
    """The recipe and data folder run.py trains with on the command line lr_find printed."""
    import shlex
    argv = shlex.split(command)
    assert argv[:2] == ["python", "run.py"]
    recipe, data, _, _ = run.resolve(run.parse_args(argv[2:]))
    return recipe, data


def test_lr_find_plots_and_prints_suggestions(prepared, tmp_path, capsys):
    import lr_find
    from finegrained.recipe import trained_lr
    lr_find.main(["--data", str(prepared), "--arch", "resnet18", "--no-pretrained", "--stage", "unfrozen",
                  "--sizes", "32,40", "--bs", "8,8", "--num-it", "30", "--workers", "0", "--out", str(tmp_path)])
    import numpy as np
    suggestions = json.loads((tmp_path / "lr_find_unfrozen.json").read_text())
    assert set(suggestions) == {"minimum", "steep", "valley", "slide", "curve", "used", "stage", "run"}
    lrs, losses = np.array(suggestions["curve"]["lr"]), np.array(suggestions["curve"]["loss"])
    assert len(lrs) >= 20 and (np.diff(lrs) > 0).all()  # the sweep of 30, less the ends fastai leaves out
    # fastai's minimum and steep, worked out again from the curve: a tenth of the lr at the lowest loss, and the lr
    # where the loss falls fastest per decade
    assert suggestions["minimum"] == pytest.approx(lrs[losses.argmin()] / 10)
    assert suggestions["steep"] == pytest.approx(lrs[(np.diff(losses) / np.diff(np.log(lrs))).argmin()])
    assert lrs[0] <= suggestions["valley"] <= lrs[-1] and lrs[0] <= suggestions["slide"] <= lrs[-1]
    assert (tmp_path / "loss_plot_unfrozen.png").stat().st_size > 5000
    printed = capsys.readouterr().out
    valley = suggestions["valley"]
    assert f"  valley: {valley:.3g}  " in printed
    (use,) = [line[len("use: "):] for line in printed.splitlines() if line.startswith("use: ")]
    assert use == suggestions["run"]
    recipe, data = resolved_by_run_py(use)   # run.py takes the printed line as it is
    assert data == prepared and recipe["arch"] == "resnet18" and recipe["pretrained"] is False
    assert [(s["size"], s["bs"]) for s in recipe["stages"]] == [(32, 8), (32, 8), (40, 8)]  # --sizes, --bs as run.py's
    # the unfrozen stages (2 and 3 share their lr in the recipe) train at the suggestion; the frozen one as before
    assert [trained_lr(s) for s in recipe["stages"]] == pytest.approx([1e-2, valley, valley], rel=5e-3)


@pytest.mark.parametrize("name, stage, lr_text, targets", [
    (None, "unfrozen", "0.01,0.00123", [1, 2]),             # stages 2-3 share their lr: one value for the two
    (None, "frozen", "0.00123,0.003", [0]),
    ("bcnn_aircraft", "frozen", "0.00123,0.025,0.025", [0]),  # one lr for all three: the later two keep theirs, per stage
    ("resnet50_448_ls", "unfrozen", "0.00492", [0]),        # lr_rule linear: the recipe's lr is for 256 images, batch 64
])
def test_lr_find_flag_resolves_in_run_py_to_the_suggested_lr(name, stage, lr_text, targets):
    import lr_find
    from finegrained.recipe import trained_lr
    args = lr_find.parse_args([*(["--recipe", name] if name else []), "--stage", stage, "--data", "elsewhere/cars",
                               "--arch", "resnet18", "--no-pretrained", "--seed", "7", "--valid-pct", "0.1"])
    recipe, given, index = lr_find.measured(args)
    command, found = lr_find.run_command(args, recipe, given, index, 0.00123)
    assert found == targets and command.endswith(f" --lr {lr_text}")
    got, data = resolved_by_run_py(command)
    assert str(data) == "elsewhere/cars"
    for i, (s, before) in enumerate(zip(got["stages"], recipe["stages"])):
        want = 0.00123 if i in targets else trained_lr(before, recipe["lr_rule"])
        assert trained_lr(s, got["lr_rule"]) == pytest.approx(want, rel=2e-3), i
    no_lr = lambda r: {**r, "stages": [{**s, "lr": None} for s in r["stages"]]}   # noqa: E731
    assert no_lr(got) == no_lr(recipe)   # the same recipe, arch, seed and split; only the lr differs


def test_unreadable_training_image_is_named_before_training(prepared, tmp_path):
    import shutil
    data = shutil.copytree(prepared, tmp_path / "data", symlinks=False)
    train = pd.read_csv(data / "train.csv")
    (data / train["filename"][6]).write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match=rf"train\.csv, row 7: .*{train['filename'][6]}: cannot be read as an image"):
        run.main(["--data", str(data), "--arch", "resnet18", "--no-pretrained", "--epochs", "1,1,0", "--sizes", "32,32",
                  "--out", str(tmp_path / "o")])  # a short run: --device auto refuses a long one on the CPU first


def test_every_run_folder_has_its_curves_and_a_self_contained_report(trained):
    from html.parser import HTMLParser
    import numpy as np
    from PIL import Image
    with Image.open(trained / "training_curves.png") as im:
        assert np.asarray(im.convert("L"), dtype=float).std() > 10  # drawn, not blank
    page = (trained / "report.html").read_text()
    images = []

    class Collect(HTMLParser):
        def handle_starttag(self, tag, attrs):
            if tag == "img":
                images.append(dict(attrs)["src"])
    Collect().feed(page)
    assert images and all(src.startswith("data:image/png;base64,") for src in images)  # nothing to fetch
    metrics = json.loads((trained / "metrics.json").read_text())
    assert f"{metrics['test_top1']:.6g}" in page and "fastai_resnext50" in page
    from test_report import parse
    report = parse(trained / "report.html")
    dataset = json.loads((trained / "config.json").read_text())["run"]["data"]
    assert report.title == report.h1 == f"resnet18 · fastai_resnext50 · {Path(dataset).name}"
    # the test set's accuracy per class: every test.csv class with its images, adding up to the test accuracy
    test = pd.read_csv(Path(dataset) / "test.csv")
    per_class = [t for t in report.tables if t[0] == ["class_id", "class_name", "images", "correct", "accuracy"]][-1]
    assert sorted((int(r[0]), int(r[2])) for r in per_class[1:]) == sorted(test["class_id"].value_counts().items())
    assert sum(int(r[3]) for r in per_class[1:]) / len(test) == pytest.approx(metrics["test_top1"])
    import base64
    assert (trained / "augmented_batch.png").read_bytes() in [base64.b64decode(s.split(",", 1)[1]) for s in report.images]


@pytest.mark.parametrize("lr, status", [("1e-2,3e-3", 0), ("0,0", 1)])
def test_sanity_checks_pass_on_learnable_data_and_fail_when_nothing_can_learn(prepared, tmp_path, lr, status):
    result = run_script("run.py", "--data", prepared, "--arch", "resnet18", "--no-pretrained", "--sizes", "32,32",
                        "--lr", lr, "--workers", 0, "--sanity", "--out", tmp_path / "s")
    assert result.returncode == status, result.stdout + result.stderr[-2000:]
    lines = [l for l in result.stdout.splitlines() if l.startswith(("PASS", "FAIL"))]
    assert len(lines) == 2 and lines[0].startswith("PASS  untrained loss ~ ln(classes)")
    assert lines[1].startswith("PASS  overfits 20 images" if status == 0 else "FAIL  overfits 20 images")
    assert not (tmp_path / "s").exists()  # checks only: no run folder


def test_tensorboard_tracker_logs_one_scalar_per_epoch(prepared, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "tb"
    run.main(["--data", str(prepared), "--arch", "resnet18", "--no-pretrained", "--epochs", "1,2,0", "--sizes", "32,32",
              "--bs", "16,16", "--workers", "0", "--tracker", "tensorboard", "--out", str(out)])
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    losses = events.Scalars(next(t for t in events.Tags()["scalars"] if "train_loss" in t))
    assert [e.step for e in losses] == [1, 2, 3]
    history = pd.read_csv(out / "history.csv")
    assert [e.value for e in losses] == pytest.approx(history["train_loss"].tolist(), rel=1e-5)


def test_two_runs_with_default_names_do_not_collide(prepared, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = ["--data", str(prepared), "--arch", "resnet18", "--no-pretrained", "--epochs", "1,0,0", "--sizes", "32,32",
             "--bs", "16,16", "--workers", "0"]
    run.main(flags)
    run.main(flags)
    base = f"fastai_resnext50-resnet18-{prepared.name}"  # the recipe, the architecture and the dataset
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [base, f"{base}-2"]
    for name in (base, f"{base}-2"):
        assert json.loads((tmp_path / "runs" / name / "metrics.json").read_text())["test_images"] == N_CLASSES * 12
    assert not list(tmp_path.glob("runs/*/.lock"))


def test_every_file_of_a_run_is_written_with_the_same_permissions(trained):
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in trained.iterdir() if p.is_file()}
    assert modes and set(modes.values()) == {0o666 & ~umask}, modes


def test_a_default_folder_refused_before_its_first_write_is_not_left_behind(tmp_path, monkeypatch):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.csv").write_text("image,label\na.jpg,1\n")
    (bad / "test.csv").write_text("image,label\na.jpg,1\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="missing column"):
        run.main(["--data", str(bad)])
    assert not (tmp_path / "runs" / "fastai_resnext50-resnext50_32x4d-bad").exists()


def test_train_py_trains_the_stages_and_scores_nothing_on_the_test_set(prepared, tmp_path, capsys, monkeypatch):
    """train.py: run.py's run without the test set's score. The model it saves is the one test.py then scores."""
    train_script = importlib.import_module("train")  # the top-level script, not finegrained.train
    from finegrained import holdout
    scored = []
    monkeypatch.setattr(run, "score", lambda *a, **k: scored.append(a) or {})
    out = tmp_path / "t"
    train_script.main(["--data", prepared, "--arch", "resnet18", "--no-pretrained", "--epochs", "0,1,0", "--sizes", "32,32",
                       "--bs", "16,16", "--workers", "0", "--out", out])
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert scored == [] and not any(k.startswith("test_") for k in metrics)
    assert f"python test.py --model {out}" in printed and "test accuracy" not in printed
    assert len(pd.read_csv(out / "history.csv")) == 1 and (out / "model.safetensors").is_file()
    holdout.main([str(a) for a in ("--model", out, "--folder", prepared, "--csv", prepared / "test.csv",
                                   "--out", tmp_path / "p.csv", "--workers", 0)])
    preds = pd.read_csv(tmp_path / "p.csv")
    assert len(preds) == len(pd.read_csv(prepared / "test.csv"))


def test_lr_find_command_gives_run_py_every_value_exactly():
    """The run.py line lr_find prints carries the flags it was given digit for digit (floats, lists, bools)."""
    import lr_find
    flags = ["--wd", "0.0123456789", "--box-lambda", "1.23456789", "--sizes", "64,96", "--bs", "16,8", "--no-pretrained",
             "--arch", "resnet18", "--label-smoothing", "0.15"]
    args = lr_find.parse_args(["--stage", "unfrozen", *flags])
    recipe, given, index = lr_find.measured(args)
    command, _ = lr_find.run_command(args, recipe, given, index, 0.00123)
    got, _ = resolved_by_run_py(command)
    no_lr = lambda r: {**r, "stages": [{**s, "lr": None} for s in r["stages"]]}   # noqa: E731
    assert no_lr(got) == no_lr(recipe) and got["stages"][0]["wd"] == 0.0123456789 and got["box_lambda"] == 1.23456789


@pytest.mark.parametrize("text", ["{oops", "[1]"])
def test_lr_find_with_a_broken_model_json_is_one_line(tmp_path, text):
    import lr_find
    (tmp_path / "model.json").write_text(text)
    with pytest.raises(UserError, match=r"model.json: not a readable model description"):
        lr_find.measured(lr_find.parse_args(["--model", str(tmp_path)]))


def test_lr_find_keeps_the_other_stages_lrs_exactly(tmp_path):
    """Only the measured stage gets the (rounded) suggestion; the others keep the recipe's lr digit for digit."""
    import lr_find
    toml = tmp_path / "r.toml"
    toml.write_text('[[stages]]\nname = "frozen"\ntrain = "frozen"\nlr = 0.0123456789\n'
                    '[[stages]]\nname = "all"\nlr = 0.001\nsize = 299\n')
    args = lr_find.parse_args(["--recipe", str(toml), "--stage", "unfrozen"])
    recipe, given, index = lr_find.measured(args)
    command, targets = lr_find.run_command(args, recipe, given, index, 0.00123)
    assert targets == [1] and command.endswith("--lr 0.0123456789,0.00123")
