"""--tracker tensorboard|wandb|mlflow: one value per epoch and metric, at steps that go on across
stages (fits) and resumed runs, the recipe logged, everything offline under the run folder.
Each test skips only when its package is absent (`make trackers` installs them)."""
import json
import subprocess
import sys

import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
import fastai.callback.schedule  # noqa: F401  (adds Learner.fit_one_cycle)
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.metrics import accuracy
from torch.utils.data import TensorDataset

from finegrained import trackers
from finegrained.errors import UserError
from finegrained.train import SkipValidation
from conftest import ROOT

RECIPE = {"arch": "resnet18", "epochs": [2, 1, 0], "lr": [0.01, 0.003], "stages": [{"name": "frozen", "epochs": 2}]}


class Expected(Callback):
    """What fastai itself recorded per trained epoch: the Recorder's values and, for the lr of each
    group at the epoch's last batch, the optimizer's hypers read at every batch."""
    order = 70

    def __init__(self):
        self.epochs, self.batch_lrs, self.trained = [], [], False

    def before_epoch(self):
        self.trained = False

    def before_train(self):
        self.trained = True

    def after_batch(self):
        if self.training:
            self.batch_lrs = [float(h["lr"]) for h in self.opt.hypers]

    def after_epoch(self):
        if self.trained:
                self.epochs.append({"train_loss": float(self.recorder.log[1]), "lrs": self.batch_lrs,
                                "valid": [float(v) for v in self.recorder.log[2:-1]]})


def tiny_learner():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    y = (x[:, 0] > 0).long()
    dls = DataLoaders(DataLoader(TensorDataset(x, y), bs=16, shuffle=True), DataLoader(TensorDataset(x[:32], y[:32]), bs=16))
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    learn = Learner(dls, model, loss_func=torch.nn.CrossEntropyLoss(), metrics=accuracy,
                    splitter=lambda m: [list(m[0].parameters()), list(m[2].parameters())])
    learn.remove_cb(ProgressCallback)
    learn.logger = lambda *a: None
    return learn


def train_two_stages(name, run, valid=True, first_step=None):
    """Two fits (2 epochs then 1), as run_stages does, then get_preds as scoring does; returns what fastai recorded."""
    learn, expected = tiny_learner(), Expected()
    cbs = trackers.tracker_callbacks(name, run, RECIPE, first_step)
    learn.add_cbs(cbs + [expected])
    fit_cbs = [] if valid else [SkipValidation()]   # as run_stages does with no validation split
    learn.fit_one_cycle(2, [1e-3, 1e-2], cbs=fit_cbs)
    learn.fit_one_cycle(1, [3e-4, 3e-3], cbs=fit_cbs)
    learn.get_preds(dl=learn.dls.valid)   # sends epoch events too: must log nothing
    trackers.close_trackers(cbs)
    return expected.epochs


# ---------------------------------------------------------------- TensorBoard

def tensorboard_scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def test_tensorboard_one_scalar_per_epoch_and_metric(tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    epochs = train_two_stages("tensorboard", run)
    scalars, acc = tensorboard_scalars(run)
    assert set(scalars) == {"train_loss", "valid_loss", "accuracy", "lr/group1", "lr/group2"}
    assert [s for s, _ in scalars["train_loss"]] == [1, 2, 3]      # steps go on across the two fits
    assert [v for _, v in scalars["train_loss"]] == pytest.approx([e["train_loss"] for e in epochs], rel=1e-6)
    assert [v for _, v in scalars["valid_loss"]] == pytest.approx([e["valid"][0] for e in epochs], rel=1e-6)
    assert [v for _, v in scalars["accuracy"]] == pytest.approx([e["valid"][1] for e in epochs], rel=1e-6)
    for g in (1, 2):
        assert [v for _, v in scalars[f"lr/group{g}"]] == pytest.approx([e["lrs"][g - 1] for e in epochs], rel=1e-6)
    assert any(tag.startswith("recipe") for tag in acc.Tags()["tensors"])


def test_tensorboard_without_validation_and_resumed(tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    run.mkdir()
    (run / "history.csv").write_text("stage,epoch,train_loss\nfrozen,1,0.9\nfrozen,2,0.8\n")  # 2 epochs done before
    epochs = train_two_stages("tensorboard", run, valid=False)
    scalars, _ = tensorboard_scalars(run)
    assert set(scalars) == {"train_loss", "lr/group1", "lr/group2"}  # nothing misfiled under valid_loss
    assert scalars["train_loss"] == [(s, pytest.approx(e["train_loss"], rel=1e-6)) for s, e in zip((3, 4, 5), epochs)]


# ---------------------------------------------------------------- Weights & Biases

def test_wandb_offline_run_in_the_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "")      # no credentials: anything online would fail
    run = tmp_path / "run"
    epochs = train_two_stages("wandb", run)
    import os
    assert os.environ["WANDB_MODE"] == "offline"
    run_id = json.loads((run / "trackers.json").read_text())["wandb"]
    folders = list((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(folders) == 1, list((run / "wandb").iterdir())
    data = (folders[0] / f"run-{run_id}.wandb").read_bytes()
    # the run file (protobuf records) holds every epoch's values as JSON text, and the recipe
    for e in epochs:
        assert json.dumps(e["train_loss"]).encode() in data
        assert json.dumps(e["valid"][0]).encode() in data
    assert b"lr/group2" in data
    assert b"arch" in data and b"resnet18" in data and b"stages" in data


# ---------------------------------------------------------------- MLflow

def test_mlflow_file_store_holds_the_metrics_and_recipe(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    run = tmp_path / "run"
    epochs = train_two_stages("mlflow", run)
    run_id = json.loads((run / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    history = client.get_metric_history(run_id, "train_loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == pytest.approx([e["train_loss"] for e in epochs], rel=1e-6)
    assert [m.value for m in client.get_metric_history(run_id, "accuracy")] == pytest.approx([e["valid"][1] for e in epochs])
    assert [m.value for m in client.get_metric_history(run_id, "lr/group1")] == pytest.approx([e["lrs"][0] for e in epochs])
    info = client.get_run(run_id)
    assert info.data.params["arch"] == "resnet18" and json.loads(info.data.params["epochs"]) == [2, 1, 0]
    assert info.info.status == "FINISHED"
    assert json.loads((run / "mlruns" / info.info.experiment_id / run_id / "artifacts" / "recipe.json").read_text()) == RECIPE


# ---------------------------------------------------------------- choosing one

def test_none_unknown_and_missing_packages(tmp_path, monkeypatch):
    assert trackers.tracker_callbacks("none", tmp_path, RECIPE) == [] and trackers.tracker_callbacks(None, tmp_path, {}) == []
    with pytest.raises(UserError, match="unknown tracker"):
        trackers.tracker_callbacks("comet", tmp_path, RECIPE)
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match=r"--tracker wandb: the wandb package is not installed; .*make trackers"):
        trackers.tracker_callbacks("wandb", tmp_path, RECIPE)


def test_importing_trackers_imports_no_tracker():
    code = "import sys; from finegrained import trackers; print(sorted(m for m in ('wandb', 'mlflow', 'tensorboard') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
