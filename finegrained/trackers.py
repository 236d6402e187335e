"""Experiment tracking for run.py --tracker tensorboard|wandb|mlflow: fastai callbacks that log each
epoch's losses, metrics and learning rates, and the resolved recipe once, all offline, under the run folder.

    cbs = tracker_callbacks("tensorboard", run_folder, recipe)   # [] for "none"
    learn.add_cbs(cbs); ...train every stage...; close_trackers(cbs)

    tensorboard  event files in <run>/tensorboard             (tensorboard --logdir <run>/tensorboard)
    wandb        an offline run in <run>/wandb/offline-run-*   (wandb sync <that folder> to upload it later)
    mlflow       a local file store in <run>/mlruns            (mlflow ui --backend-store-uri <run>/mlruns)

The packages are optional (requirements-trackers.txt, `make trackers`) and imported only when named.
Each library logs through its own API (SummaryWriter.add_scalar, wandb's Run.log, MlflowClient.log_batch).
fastai's TensorBoardCallback and WandbCallback are not used, and one small callback is written here,
because with this project's training they log wrong or fail: TensorBoardCallback counts steps from 0
again at every fit (each stage of the recipe, and --resume, would overwrite the last one's curves)
and logs no per-epoch train loss; with no validation split (the recipe's default) WandbCallback
files the epoch's time under valid_loss, and the prediction logging of both needs a validation
batch. MLflow has no fastai callback at all."""
import atexit
import importlib.util
import json
import math
import os
import time
import uuid
from pathlib import Path

from fastai.callback.core import Callback
from fastai.learner import Recorder

from finegrained.errors import UserError

from finegrained.files import write_json
from finegrained.ranks import is_main

TRACKERS = ("none", "tensorboard", "wandb", "mlflow")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
INSTALL = "install the optional trackers with `make trackers` (or .venv/bin/pip install -r requirements-trackers.txt)"
IDS_FILE = "trackers.json"      # run ids, so that --resume continues the same W&B / MLflow run
PROJECT = "fine-grained"        # W&B project and MLflow experiment name


def tracker_callbacks(name, run_folder, recipe, first_step=None):
    """The callbacks for tracker `name` ('none' or None gives []). `recipe` is a JSON-able dict logged
    once; `first_step` is the number of epochs already done (default: the rows of <run>/history.csv,
    so that a resumed run goes on where it stopped)."""
    if name in (None, "", "none"):
        return []
    if name not in PACKAGES:
        raise UserError(f"--tracker {name}: unknown tracker (choose from {', '.join(TRACKERS)})")
    if importlib.util.find_spec(PACKAGES[name]) is None:
        raise UserError(f"--tracker {name}: the {PACKAGES[name]} package is not installed; {INSTALL}")
    cls = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}[name]
    run_folder = Path(run_folder)
    return [cls(run_folder, recipe, _epochs_done(run_folder) if first_step is None else first_step)]


def close_trackers(callbacks):
    """End the tracked runs (also done at interpreter exit; calling it twice is harmless)."""
    for cb in callbacks:
        if isinstance(cb, EpochTracker):
            cb.close()


def _epochs_done(run_folder):
    path = Path(run_folder) / "history.csv"
    if not path.is_file():
        return 0
    return max(sum(1 for line in path.read_text().splitlines() if line.strip()) - 1, 0)


def flatten(d, prefix=""):
    """{'a': {'b': 1}} → {'a.b': 1}: nested recipe values as flat parameters."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class EpochTracker(Callback):
    """Logs one record per trained epoch, at step = epochs done in the whole run (all stages, all
    resumed processes): train_loss, and when validated valid_loss and the metrics, plus lr/groupN,
    each parameter group's learning rate at the epoch's last batch; under run.py also train_accuracy and
    progress/images_per_s, progress/eta_stage_s, progress/eta_run_s. Subclasses say where it goes."""
    order = Recorder.order + 1  # after the Recorder has the epoch's values

    def __init__(self, run_folder, recipe, first_step=0):
        self.run_folder, self.recipe, self.global_step = Path(run_folder), recipe, first_step
        self.started = self.closed = False
        self.trained = False

    # fastai events
    def before_fit(self):
        # not for lr_find, nor on the other processes of a data-parallel run: the main one logs
        if hasattr(self.learn, "lr_finder") or hasattr(self, "gather_preds") or self.started or not is_main():
            return
        self.run_folder.mkdir(parents=True, exist_ok=True)
        self.start()
        self.started = True
        atexit.register(self.close)

    def before_epoch(self):
        self.trained = False

    def before_train(self):
        self.trained = True

    def after_epoch(self):
        # get_preds and epochs skipped on resume also send after_epoch, with no training before it
        if not self.trained or not self.started or self.closed:
            return
        self.global_step += 1
        self.log(self.epoch_metrics(), self.global_step)

    def epoch_metrics(self):
        rec = self.learn.recorder
        values = list(rec.log[1:])                       # log: epoch, train values, valid values, [time]
        names = [n for n in rec.metric_names[1:] if n != "time"]
        if rec.add_time:
            values = values[:-1]
        metrics = {}
        for name, value in zip(names, values):           # valid values are missing when validation was skipped
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(value):
                metrics[name] = value
        for i, hypers in enumerate(self.learn.opt.hypers):
            metrics[f"lr/group{i + 1}"] = float(hypers["lr"])
        # run.py's training adds what its log lines say (train_progress.py): the training accuracy, images/s and the ETAs
        if getattr(self.learn, "train_accuracy", None) is not None:
            metrics["train_accuracy"] = float(self.learn.train_accuracy)
        for name, value in getattr(self.learn, "run_figures", {}).items():
            if name != "epoch_seconds":
                metrics[f"progress/{name}"] = float(value)
        return metrics

    def close(self):
        if self.started and not self.closed:
            self.closed = True
            self.finish()

    # what a tracker does
    def start(self):
        raise NotImplementedError

    def log(self, metrics, step):
        raise NotImplementedError

    def finish(self):
        pass

    def _ids(self):
        path = self.run_folder / IDS_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def _save_id(self, key, value):
        ids = {**self._ids(), key: value}
        write_json(self.run_folder / IDS_FILE, ids)


class TensorBoardTracker(EpochTracker):
    """Event files in <run>/tensorboard; the recipe as text; flushed every epoch."""

    def start(self):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(self.run_folder / "tensorboard"))
        self.writer.add_text("recipe", "```\n" + json.dumps(self.recipe, indent=2, default=str) + "\n```", self.global_step)
        self.writer.flush()

    def log(self, metrics, step):
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def finish(self):
        self.writer.close()


class WandbTracker(EpochTracker):
    """An offline W&B run under <run>/wandb (never the network: WANDB_MODE=offline is set here);
    the recipe is its config; no system stats, git or code capture."""

    def start(self):
        os.environ["WANDB_MODE"] = "offline"      # also for anything else in this process that calls wandb
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb
        run_id = self._ids().get("wandb")
        if run_id is None:
            run_id = uuid.uuid4().hex[:12]
            self._save_id("wandb", run_id)
        settings = wandb.Settings(mode="offline", console="off", save_code=False, disable_git=True, silent=True,
                                  x_disable_stats=True, x_disable_machine_info=True)
        self.wb = wandb.init(project=PROJECT, name=self.run_folder.name, dir=str(self.run_folder), id=run_id,
                             resume="allow", config=flatten(self.recipe), settings=settings, reinit="create_new")

    def log(self, metrics, step):
        self.wb.log({**metrics, "epoch": step}, step=step)

    def finish(self):
        import wandb
        self.wb.finish()
        wandb.teardown()   # stops wandb's service process, which writes the run file: complete on return


class MlflowTracker(EpochTracker):
    """An MLflow run in the local file store <run>/mlruns, through an explicit MlflowClient (no
    global tracking URI is set); the recipe as parameters and as recipe.json. No telemetry.

    MLflow 3 keeps the file store in "maintenance mode" and refuses it unless MLFLOW_ALLOW_FILE_STORE
    is set; it is used anyway because its alternative, SQLite, needs the full mlflow package
    (SQLAlchemy, Alembic, Flask, pyarrow) where mlflow-skinny suffices for a folder of files."""

    def start(self):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        os.environ.setdefault("DO_NOT_TRACK", "true")
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        from mlflow.tracking import MlflowClient
        self.uri = (self.run_folder / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        self.run_id = self._ids().get("mlflow")
        if self.run_id is None:
            experiment = self.client.get_experiment_by_name(PROJECT)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(PROJECT)
            self.run_id = self.client.create_run(experiment_id, run_name=self.run_folder.name).info.run_id
            self._save_id("mlflow", self.run_id)
            from mlflow.entities import Param
            params = [Param(k, json.dumps(v, default=str) if not isinstance(v, str) else v)
                      for k, v in flatten(self.recipe).items()]
            for i in range(0, len(params), 100):    # MLflow takes at most 100 parameters per batch
                self.client.log_batch(self.run_id, params=params[i:i + 100])
            self.client.log_dict(self.run_id, self.recipe, "recipe.json")
        else:
            self.client.update_run(self.run_id, status="RUNNING")

    def log(self, metrics, step):
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def finish(self):
        self.client.set_terminated(self.run_id)
