"""A resumed run is the run it continues: the same data (checked by checksum, from any directory), the same
trajectory (model, optimizer, schedule, BatchNorm statistics and random state), whatever write of an epoch a kill
interrupted; one process per run folder; a diverged run ends in one line with its last good checkpoint kept; and a
finished run's checkpoint is removed (unless --keep-checkpoint) and its resume scores model.safetensors again."""
import contextlib
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from finegrained import plots
from finegrained import runner as run
from finegrained import train
from finegrained.errors import RunFailed, UserError
from conftest import run_script
from test_cli import hold

EPOCHS = "1,2,1"
UNINTERRUPTED = [("frozen", 1), ("unfrozen", 1), ("unfrozen", 2), ("resized", 1)]


def tiny(prepared, out, *extra):
    return ["--data", str(prepared), "--arch", "resnet18", "--no-pretrained", "--epochs", EPOCHS, "--sizes", "32,40",
            "--bs", "16,16", "--workers", "0", "--out", str(out), *extra]


class Killed(BaseException):
    """Stands for SIGKILL in-process: nothing in fastai or the project catches it, and nothing after it runs."""


def count_writes(monkeypatch, kill_at=None):
    """Record the name of every file the epoch callbacks write, in order; with `kill_at`, die before that write.
    The epoch's writes: checkpoint.pth and history.csv (train's atomic), progress.json (train's write_json) and the
    curves (plots' save_png)."""
    log = []
    epoch_files = {"checkpoint.pth", "progress.json", "history.csv", "training_curves.png"}

    def before(path):
        if Path(path).name not in epoch_files:  # written once per run (augmented_batch.png), not by an epoch
            return
        if len(log) == kill_at:
            raise Killed(Path(path).name)
        log.append(Path(path).name)

    real_atomic = train.atomic

    @contextlib.contextmanager
    def counted(path):
        before(path)
        with real_atomic(path) as tmp:
            yield tmp
    monkeypatch.setattr(train, "atomic", counted)
    for module, name, path_arg in ((train, "write_json", 0), (plots, "save_png", 1)):
        def wrapped(*args, real=getattr(module, name), path_arg=path_arg, **kwargs):
            before(args[path_arg])
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapped)
    return log


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory):
    """An uninterrupted run: its history and the order of its writes."""
    with pytest.MonkeyPatch.context() as mp:
        out = tmp_path_factory.mktemp("uninterrupted") / "run"
        log = count_writes(mp)
        run.main(tiny(prepared, out))
    return pd.read_csv(out / "history.csv"), log


@pytest.mark.slow
def test_a_kill_before_any_write_of_an_epoch_loses_nothing_and_trains_nothing_twice(prepared, reference, tmp_path,
                                                                                     monkeypatch):
    history, log = reference
    per_epoch = log.index("checkpoint.pth", 1) - log.index("checkpoint.pth")  # checkpoint, progress, history, curves
    assert log[:per_epoch] == ["checkpoint.pth", "progress.json", "history.csv", "training_curves.png"]
    second = per_epoch  # the writes of unfrozen epoch 1, the first epoch of the second stage, and the kill after them
    for k in range(second, second + per_epoch + 1):
        out = tmp_path / f"killed_{k}"
        count_writes(monkeypatch, kill_at=k)
        with pytest.raises(Killed):
            run.main(tiny(prepared, out))
        monkeypatch.undo()
        run.main(tiny(prepared, out, "--resume"))
        resumed = pd.read_csv(out / "history.csv")
        assert list(zip(resumed["stage"], resumed["epoch"])) == UNINTERRUPTED, k
        assert resumed["train_loss"].tolist() == pytest.approx(history["train_loss"].tolist(), rel=1e-4), k
        assert resumed["lrs_end"].tolist() == history["lrs_end"].tolist()
        assert json.loads((out / "progress.json").read_text()) == {"stage": 2, "epoch": 1}  # the last stage's last epoch


def test_a_resume_trains_on_the_runs_own_data_from_any_directory(prepared, tmp_path, monkeypatch, capsys):
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    shutil.copytree(prepared, start / "data" / "stanford_cars", symlinks=True)
    other = shutil.copytree(prepared, elsewhere / "data" / "stanford_cars", symlinks=True)
    table = pd.read_csv(other / "test.csv")
    table.head(6).to_csv(other / "test.csv", index=False)  # another data set under the same relative name
    monkeypatch.chdir(start)
    out = tmp_path / "run"
    run.main(["--data", "data/stanford_cars", "--arch", "resnet18", "--no-pretrained", "--epochs", "1,1,0",
              "--sizes", "32,32", "--bs", "16,16", "--workers", "0", "--out", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert config["run"]["data"] == str((start / "data" / "stanford_cars").resolve())
    metrics = json.loads((out / "metrics.json").read_text())
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    run.main(["--out", str(out), "--resume", "--workers", "0"])
    assert f"test accuracy: {metrics['test_top1']:.4f}" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["test_images"] == metrics["test_images"] == len(table)
    with pytest.raises(UserError, match=r"test\.csv: not the table the run started with"):
        run.main(["--out", str(out), "--resume", "--data", str(other)])
    moved = shutil.move(start / "data" / "stanford_cars", tmp_path / "moved")
    with pytest.raises(UserError, match="pass --data with the folder they were moved to"):
        run.main(["--out", str(out), "--resume"])
    run.main(["--out", str(out), "--resume", "--workers", "0", "--data", str(moved)])  # the same tables, moved
    # a run folder from before checksums were kept: its relative path cannot be trusted
    del config["run"]["data_sha256"]
    config["run"]["data"] = "data/stanford_cars"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="started before runs recorded their data's checksums.*pass --data"):
        run.main(["--out", str(out), "--resume"])


def test_a_second_run_into_a_held_folder_is_one_line_naming_the_holder(prepared, tmp_path):
    proc = hold(tmp_path / "run")
    try:
        result = run_script("run.py", *tiny(prepared, tmp_path / "run"))
    finally:
        proc.kill()
        proc.wait()
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'run'}: in use by another run (process {proc.pid}); wait for it to end, or choose another --out"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]  # nothing of a run was written


def test_a_diverged_run_stops_in_one_line_and_keeps_the_last_good_checkpoint(prepared, tmp_path, monkeypatch):
    from finegrained import models
    real = models.create_learner

    def diverging(*args, **kwargs):  # the loss turns non-finite in the second epoch, as a too-high lr makes it
        learn = real(*args, **kwargs)
        loss, calls = learn.loss_func, []

        def poisoned(*a, **k):
            calls.append(1)
            value = loss(*a, **k)
            return value * float("nan") if learn.training and learn.epoch == 1 else value
        learn.loss_func = poisoned
        return learn
    monkeypatch.setattr(models, "create_learner", diverging)
    out = tmp_path / "run"
    with pytest.raises(RunFailed) as caught:
        run.main(tiny(prepared, out))
    assert caught.value.status == 1
    assert str(caught.value).startswith("stage 'unfrozen', epoch 2: train loss is nan at lr 0.003 on the head: "
                                        "training diverged; the checkpoint of stage 'unfrozen' epoch 1 is kept")
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["record"]["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values()
                                                 if v.is_floating_point())
    assert len(pd.read_csv(out / "history.csv")) == 2 and not (out / "model.safetensors").exists()


def test_a_finished_run_removes_its_checkpoint_unless_kept_and_resumes_from_its_model(prepared, tmp_path, capsys):
    from safetensors.torch import load_file
    one_epoch = ["--epochs", "1,0,0", "--sizes", "32,32"]  # given last, they override tiny()'s
    out, kept = tmp_path / "run", tmp_path / "kept"
    run.main(tiny(prepared, out, *one_epoch))
    printed = capsys.readouterr().out
    assert not (out / "checkpoint.pth").exists() and "checkpoint.pth removed now that the run has finished" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    history = (out / "history.csv").read_text()
    run.main(["--out", str(out), "--resume", "--workers", "0"])  # scored again from model.safetensors
    printed = capsys.readouterr().out
    assert "scoring its model.safetensors again" in printed and f"test accuracy: {metrics['test_top1']:.4f}" in printed
    assert "█" not in printed   # stdout is no terminal here: no progress bar, as while training
    assert (out / "history.csv").read_text() == history  # nothing trained
    run.main(tiny(prepared, kept, *one_epoch, "--keep-checkpoint"))
    state = torch.load(kept / "checkpoint.pth", weights_only=True)
    weights = load_file(kept / "model.safetensors")
    assert all(torch.equal(weights[k], v.float() if v.is_floating_point() else v) for k, v in state["model"].items())
