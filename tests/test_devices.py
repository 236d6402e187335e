"""--device auto|cuda|cpu in every script that runs a model: `cuda` where CUDA is not usable is one line saying why (with
the driver the pinned torch needs when a GPU seems present); `auto` on the CPU refuses a recipe estimated to take over
an hour there, with the estimate and the flag that runs it anyway; the estimate's arithmetic."""
import re

import pandas as pd
import pytest
import torch

from finegrained import devices
from finegrained.errors import UserError
from conftest import ROOT, run_script

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is usable here")


@no_cuda
def test_cuda_asked_where_it_is_not_usable_is_one_line_and_a_non_zero_exit(prepared, tmp_path):
    result = run_script("run.py", "--data", prepared, "--arch", "resnet18", "--no-pretrained", "--epochs", "1,0,0",
                        "--sizes", "32,32", "--workers", 0, "--device", "cuda", "--out", tmp_path / "run")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --device cuda: CUDA is not usable here: "), result.stderr
    assert not (tmp_path / "run").exists()


@no_cuda
def test_every_script_that_runs_a_model_takes_device_and_names_the_driver_when_a_gpu_seems_present(
        prepared, tmp_path, monkeypatch):
    import lr_find
    from finegrained import runner as run
    from finegrained import holdout
    monkeypatch.setattr(devices, "gpu_evidence", lambda: "/dev/nvidia0")
    major = torch.version.cuda.split(".")[0] if torch.version.cuda else None
    for main, args in ((run.main, ["--data", str(prepared), "--out", str(tmp_path / "run")]),
                       (lr_find.main, ["--data", str(prepared), "--out", str(tmp_path / "lr")]),
                       (holdout.main, ["--model", str(tmp_path / "none"), "--folder", str(tmp_path)])):
        with pytest.raises(UserError) as caught:
            main([*args, "--device", "cuda"])
        message = str(caught.value)
        assert message.startswith("--device cuda: CUDA is not usable here: ") and "\n" not in message
        if major in devices.MIN_DRIVER:  # the CUDA build of torch: a GPU present means a driver too old for it
            assert "a GPU seems present (/dev/nvidia0)" in message and "driver is likely older" in message
            assert f">= {devices.MIN_DRIVER[major]} on Linux" in message
            section = re.search(r"section '([^']+)'", message).group(1)
            assert f"## {section}" in (ROOT / "README.md").read_text()  # the README section it points to exists


@no_cuda
def test_auto_falls_back_to_the_cpu_and_says_why_when_a_gpu_seems_present(monkeypatch, capsys):
    monkeypatch.setattr(devices, "gpu_evidence", lambda: "nvidia-smi on PATH")
    assert devices.choose("auto") == "cpu"
    err = capsys.readouterr().err
    assert err.startswith("warning: CUDA is not usable, so the CPU is used: ") and "nvidia-smi on PATH" in err
    monkeypatch.setattr(devices, "gpu_evidence", lambda: "")
    assert devices.choose("auto") == "cpu" and capsys.readouterr().err == ""  # no GPU at all: nothing to warn about
    assert devices.choose("cpu") == "cpu"


def realistic(prepared, folder, n_train=8144, n_test=8041):
    """The prepared set's tables stretched to Stanford Cars' size, rows repeating the same few images."""
    folder.mkdir()
    for name, n in (("train.csv", n_train), ("test.csv", n_test)):
        table = pd.read_csv(prepared / name)
        big = table.iloc[[i % len(table) for i in range(n)]]
        big.assign(filename=[str((prepared / f).resolve()) for f in big["filename"]]).to_csv(folder / name, index=False)
    return folder


@no_cuda
@pytest.mark.slow  # measures a ResNeXt50 training step at 224 px: seconds on an idle CPU
def test_auto_refuses_the_default_recipe_on_a_cars_sized_set_with_its_estimate(prepared, tmp_path):
    from finegrained import runner as run
    data = realistic(prepared, tmp_path / "cars_sized")
    out = tmp_path / "run"
    with pytest.raises(UserError) as caught:
        run.main(["--data", str(data), "--no-pretrained", "--out", str(out)])  # the default recipe: ResNeXt50, 100 epochs
    message = str(caught.value)
    found = re.search(r"on this CPU the run would take about ([0-9.]+) h \(8144 training images x 100 epochs at "
                      r"224-299 px with resnext50_32x4d, ([0-9.e-]+) s per image measured at 224 px\)", message)
    assert found, message
    hours, per_image = float(found.group(1)), float(found.group(2))
    # the run's own arithmetic, independently: 60 epochs at 224 px and 40 at 299 px of the measured step, a pass over
    # the test images, so at least the training steps alone: 8144 x (60 + 40 x (299/224)^2) x per_image
    assert hours > 1 and hours * 3600 >= 0.95 * 8144 * (60 + 40 * (299 / 224) ** 2) * per_image
    assert "pass --device cpu to train on the CPU anyway" in message and "\n" not in message
    assert not out.exists()  # refused before anything was written, and before 16,185 images were read


def test_an_explicit_cpu_is_never_refused_nor_measured():
    def never(*args, **kwargs):
        raise AssertionError("measured")
    recipe = {"arch": "resnext50_32x4d", "valid_pct": 0.0}
    assert devices.check_cpu_time("cpu", "cpu", recipe, [(100, 299)], 8144, 8041, 196, measure=never) == ""
    assert devices.check_cpu_time("auto", "cuda", recipe, [(100, 299)], 8144, 8041, 196, measure=never) == ""


def test_the_cpu_estimate_scales_by_pixels_and_counts_the_pipeline_validation_and_scoring():
    # 2 epochs at 100 px and 1 at 200 px (4x the pixels) of 10 images, 0.5 s per image at 100 px, then 6 test images
    expected = (2 * 10 * 0.5 + 1 * 10 * 0.5 * 4) / devices.PIPELINE_SHARE + 6 * 0.5 * 4 / 3
    assert devices.cpu_seconds([(2, 100), (1, 200)], 10, 6, 0.0, 0.5, 100) == pytest.approx(expected)
    # a fifth held out: those images are only scored (a third of a step) every epoch
    held = devices.cpu_seconds([(1, 100)], 10, 0, 0.2, 0.5, 100)
    assert held == pytest.approx(8 * 0.5 / devices.PIPELINE_SHARE + 2 * 0.5 / 3)
    assert devices.duration(45) == "45 s" and devices.duration(600) == "10 min" and devices.duration(5 * 3600) == "5.0 h"
    assert devices.duration(1108.4 * 3600) == "1108 h"
