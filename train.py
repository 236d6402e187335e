"""Training stages over a fastai Learner: frozen, unfrozen with discriminative learning rates,
and progressive resizing, each a one-cycle fit; with a checkpoint after every epoch, a CSV
history and resuming a killed run from its last completed epoch.

fastai does the training (fit_one_cycle, freeze/unfreeze, slice learning rates, AMP). Written
here: the checkpoint and history callbacks, because fastai's SaveModelCallback and CSVLogger
neither write atomically nor record the stage, image size and learning rates of each epoch."""
import csv
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fastai.callback.core import Callback, CancelValidException
from fastai.callback.progress import ProgressCallback
from fastcore.foundation import L

from cli import atomic

CHECKPOINT, PROGRESS, HISTORY, BEST = "checkpoint.pth", "progress.json", "history.csv", "best.pth"
HISTORY_COLUMNS = ["stage", "epoch", "size", "bs", "lrs", "train_loss", "valid_loss", "accuracy", "top5_accuracy", "seconds"]


@dataclass
class Stage:
    """One one-cycle fit of the recipe."""
    name: str
    epochs: int
    size: int
    bs: int
    lr: float          # max learning rate of the head; earlier groups get lr/3, lr/9
    frozen: bool


def group_lrs(lr, n_groups=3):
    """The recipe's discriminative rates, earliest group first: divided by 3 for each earlier group."""
    return [lr / 3 ** (n_groups - 1 - k) for k in range(n_groups)]


def n_groups(learn):
    return len(learn.splitter(learn.model))


def _atomic_json(path, obj):
    with atomic(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2))


def _atomic_save(obj, path):
    with atomic(path) as tmp:
        torch.save(obj, tmp)


class SkipValidation(Callback):
    """Train on everything: no validation pass when there is no validation set."""
    def before_validate(self):
        raise CancelValidException()


class EpochRecord(Callback):
    """After each epoch: a history.csv row, an atomic checkpoint (model + optimizer), progress.json,
    the best model by validation accuracy when there is a validation set, and one printed line
    when no progress bar is shown (a log file or CI)."""
    order = 60  # after the Recorder (50) has the epoch's losses and metrics

    def __init__(self, out, stage_index, stage, print_lines):
        self.out, self.stage_index, self.stage, self.print_lines = Path(out), stage_index, stage, print_lines

    def before_epoch(self):
        self.started, self.trained = time.time(), False

    def before_train(self):
        self.trained = True

    def after_epoch(self):
        if not self.trained:  # an epoch skipped on resume: fastai still calls after_epoch
            return
        rec = self.learn.recorder
        values = dict(zip(rec.metric_names, rec.log))
        has_valid = len(self.dls.valid_ds) > 0
        lrs = group_lrs(self.stage.lr, len(self.opt.param_lists))
        row = {"stage": self.stage.name, "epoch": self.epoch + 1, "size": self.stage.size, "bs": self.stage.bs,
               "lrs": ";".join(f"{lr:.3g}" for lr in lrs), "train_loss": _num(values.get("train_loss")),
               "valid_loss": _num(values.get("valid_loss")) if has_valid else "",
               "accuracy": _num(values.get("accuracy")) if has_valid else "",
               "top5_accuracy": _num(values.get("top5_accuracy")) if has_valid else "",
               "seconds": round(time.time() - self.started, 2)}
        state = {"model": self.learn.model.state_dict(),
                 "opt": _plain({"state": list(self.opt.state_dict()["state"]), "hypers": [dict(h) for h in self.opt.hypers]})}
        _atomic_save(state, self.out / CHECKPOINT)
        progress = _read_progress(self.out)
        if has_valid and row["accuracy"] != "" and row["accuracy"] > progress.get("best_accuracy", -1):
            _atomic_save(self.learn.model.state_dict(), self.out / BEST)
            progress["best_accuracy"] = row["accuracy"]
        progress.update(stage=self.stage_index, epoch=self.epoch + 1)
        _atomic_json(self.out / PROGRESS, progress)
        self._append_history(row)  # last, so a run killed mid-way never logs an epoch it will redo
        if self.print_lines:
            extra = f" valid_loss {row['valid_loss']:.4f} accuracy {row['accuracy']:.4f}" if has_valid else ""
            print(f"{self.stage.name} epoch {self.epoch + 1}/{self.n_epoch} size {self.stage.size}: "
                  f"train_loss {row['train_loss']:.4f}{extra} ({row['seconds']:.1f}s)", flush=True)

    def _append_history(self, row):
        path = self.out / HISTORY
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow(row)


def _plain(obj):
    """numpy scalars and arrays (fastai keeps learning rates as numpy) as Python values and tensors,
    so that the checkpoint loads with weights_only=True."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _num(value):
    try:
        return round(float(value), 6)
    except (TypeError, ValueError):
        return ""


def _read_progress(out):
    path = Path(out) / PROGRESS
    return json.loads(path.read_text()) if path.exists() else {}


def use_device(learn):
    """bf16 (or fp16) mixed precision and channels-last on a GPU; plain fp32 on the CPU. Returns a description."""
    if torch.cuda.is_available():
        from fastai.torch_core import setup_cuda
        setup_cuda(benchmark=True)  # cuDNN picks the fastest kernels for the recipe's fixed image sizes
        bf16 = torch.cuda.is_bf16_supported()
        learn.to_channelslast(amp_mode="bf16" if bf16 else "fp16")
        return f"GPU {torch.cuda.get_device_name()}, {'bf16' if bf16 else 'fp16'} mixed precision, channels-last"
    return "CPU, fp32 (no GPU found: this will be slow for real datasets)"


def show_bars(learn, bars):
    """fastprogress bars on a terminal; in a log file they pile up, so EpochRecord prints lines instead."""
    if not bars and any(isinstance(cb, ProgressCallback) for cb in learn.cbs):
        learn.remove_cb(ProgressCallback)
        learn.logger = lambda *args: None  # the Recorder would print raw lists


def restore_checkpoint(learn, out):
    """Load the model and optimizer state of the last completed epoch (weights only, no pickled code)."""
    state = torch.load(Path(out) / CHECKPOINT, map_location="cpu", weights_only=True)
    learn.model.load_state_dict(state["model"])
    if learn.opt is None:
        learn.create_opt()
    learn.opt.load_state_dict({"state": state["opt"]["state"], "hypers": L(state["opt"]["hypers"])})


def run_stages(learn, stages, make_dls, out, resume=False, bars=None):
    """Fit each stage in turn, re-making the DataLoaders when the size or batch size changes.

    With `resume`, stages and epochs recorded as done in `out/progress.json` are skipped and the
    model and optimizer continue from the checkpoint. Returns seconds spent per stage."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bars = sys.stdout.isatty() if bars is None else bars
    show_bars(learn, bars)
    done = _read_progress(out) if resume else {}
    if resume and (out / CHECKPOINT).exists():
        restore_checkpoint(learn, out)
    seconds = {}
    current = None
    for i, stage in enumerate(stages):
        first_epoch = 0
        if done:
            if i < done["stage"] or (i == done["stage"] and done["epoch"] >= stage.epochs):
                continue
            first_epoch = done["epoch"] if i == done["stage"] else 0
        if (stage.size, stage.bs) != current:
            learn.dls = make_dls(stage.size, stage.bs)
            current = (stage.size, stage.bs)
        learn.freeze() if stage.frozen else learn.unfreeze()
        cbs = [EpochRecord(out, i, stage, print_lines=not bars)]
        if len(learn.dls.valid_ds) == 0:
            cbs.append(SkipValidation())
        started = time.time()
        learn.fit_one_cycle(stage.epochs, group_lrs(stage.lr, n_groups(learn)), start_epoch=first_epoch, cbs=cbs)
        seconds[stage.name] = round(time.time() - started, 2)
    return seconds
