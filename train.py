"""Training stages over a fastai Learner, as a recipe lists them (recipe.py): each stage sets what trains
(the body frozen with BatchNorm training, the whole network, or the last blocks re-initialized), the
optimizer, the image and batch size, and the schedule; with a checkpoint after every epoch, a CSV
history, and resuming a killed run from its last completed epoch.

fastai does the training: fit_one_cycle, fit_flat_cos and fit, ParamScheduler with SchedCos, freeze and
unfreeze, discriminative learning rates, EarlyStoppingCallback, AMP. Written here: the checkpoint and
history callbacks, because fastai's SaveModelCallback and CSVLogger neither write atomically nor record
the stage, image size and learning rates of each epoch; and the step-decay schedule, which fastai lacks."""
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

from cli import UserError, atomic

CHECKPOINT, PROGRESS, HISTORY, BEST = "checkpoint.pth", "progress.json", "history.csv", "best.pth"
CURVES = "training_curves.png"
METRICS = ["accuracy", "top5_accuracy", "mean_iou", "iou50"]  # the last two only for a model with a box head
HISTORY_COLUMNS = ["stage", "epoch", "size", "bs", "opt", "lrs", "lrs_end", "train_loss", "valid_loss", *METRICS, "seconds"]


@dataclass
class Stage:
    """One fit of a recipe (recipes/README.md explains each field)."""
    name: str
    epochs: int
    size: int
    bs: int
    lr: float               # max learning rate of the head; each earlier parameter group gets lr / lr_div more
    lr_div: float = 1.0
    opt: str = "adam"
    mom: float = 0.9
    wd: float = 0.0
    schedule: str = "one_cycle"
    step_every: int = 1
    step_gamma: float = 0.1
    train: str = "all"      # frozen | all | reinit
    blocks: int = 0
    patience: int = 0


def group_lrs(lr, n_groups=3, div=3.0):
    """Discriminative rates, earliest group first: divided by `div` for each earlier group."""
    return [lr / div ** (n_groups - 1 - k) for k in range(n_groups)]


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
    """After each epoch: a history.csv row and training_curves.png, an atomic checkpoint (model + optimizer), progress.json,
    the best model by validation accuracy when there is a validation set, and one printed line
    when no progress bar is shown (a log file or CI)."""
    order = 55  # after the Recorder (50) has the epoch's losses and metrics; before early stopping (63) ends the fit

    def __init__(self, out, stage_index, stage, print_lines):
        self.out, self.stage_index, self.stage, self.print_lines = Path(out), stage_index, stage, print_lines

    def before_epoch(self):
        self.started, self.trained = time.time(), False

    def before_train(self):
        self.trained = True

    def after_epoch(self):
        import distributed
        if not self.trained or not distributed.is_main():  # an epoch skipped on resume; or not the process that writes
            return
        rec = self.learn.recorder
        values = dict(zip(rec.metric_names, rec.log))
        has_valid = len(self.dls.valid_ds) > 0
        lrs = group_lrs(self.stage.lr, len(self.opt.param_lists), self.stage.lr_div)
        row = {"stage": self.stage.name, "epoch": self.epoch + 1, "size": self.stage.size, "bs": self.stage.bs,
               "opt": optimizer_name(self.opt),
               "lrs": ";".join(f"{lr:.3g}" for lr in lrs),
               "lrs_end": ";".join(f"{h['lr']:.4g}" for h in self.opt.hypers),  # as the schedule left them
               "train_loss": _num(values.get("train_loss")),
               "valid_loss": _num(values.get("valid_loss")) if has_valid else "",
               **{m: _num(values.get(m)) if has_valid else "" for m in METRICS},
               "seconds": round(time.time() - self.started, 2)}
        model = distributed.unwrap(self.learn.model)  # under DDP, without its 'module.' prefix
        state = {"model": model.state_dict(),
                 "opt": _plain({"state": list(self.opt.state_dict()["state"]), "hypers": [dict(h) for h in self.opt.hypers]})}
        _atomic_save(state, self.out / CHECKPOINT)
        progress = _read_progress(self.out)
        if has_valid and row["accuracy"] != "" and row["accuracy"] > progress.get("best_accuracy", -1):
            _atomic_save(model.state_dict(), self.out / BEST)
            progress["best_accuracy"] = row["accuracy"]
        progress.update(stage=self.stage_index, epoch=self.epoch + 1)
        _atomic_json(self.out / PROGRESS, progress)
        self._append_history(row)  # last, so a run killed mid-way never logs an epoch it will redo
        from plots import training_curves
        training_curves(self.out / HISTORY, self.out / CURVES)
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


def optimizer_name(opt):
    """What the fastai optimizer really is, read off its step functions: AdamW, Adam (L2), SGD or SGD (decoupled wd)."""
    steps = {getattr(cb, "__name__", getattr(getattr(cb, "func", None), "__name__", "")) for cb in opt.cbs}
    kind = "Adam" if "adam_step" in steps else "SGD"
    decoupled = "weight_decay" in steps
    return {("Adam", True): "AdamW", ("Adam", False): "Adam (L2)", ("SGD", False): "SGD", ("SGD", True): "SGD (decoupled wd)"}[kind, decoupled]


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
    """Load the model and optimizer state of the last completed epoch (weights only: pickled code is refused)."""
    path = Path(out) / CHECKPOINT
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        learn.model.load_state_dict(state["model"])
        if learn.opt is None:
            learn.create_opt()
        learn.opt.load_state_dict({"state": state["opt"]["state"], "hypers": L(state["opt"]["hypers"])})
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, KeyError... for files it will not load
        raise UserError(f"{path}: not a checkpoint of this run that can be loaded safely "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:200]})")


def step_decay(lrs, n_epoch, every, gamma):
    """A ParamScheduler schedule: `lrs` multiplied by `gamma` every `every` epochs (fastai has cosine, linear and
    exponential annealers, but no step decay); `pos` is the fraction of the fit done."""
    lrs = np.asarray(lrs, dtype=float)
    return lambda pos: lrs * gamma ** (int(pos * n_epoch + 1e-6) // every)


def fit_stage(learn, stage, first_epoch, cbs):
    """One stage's fit under its schedule, through fastai's fit methods and ParamScheduler."""
    from fastai.callback.schedule import ParamScheduler, SchedCos
    lrs = group_lrs(stage.lr, n_groups(learn), stage.lr_div)
    kw = dict(wd=stage.wd, start_epoch=first_epoch)
    if stage.schedule == "one_cycle":
        learn.fit_one_cycle(stage.epochs, lrs, cbs=cbs, **kw)
    elif stage.schedule == "flat_cos":
        learn.fit_flat_cos(stage.epochs, lrs, cbs=cbs, **kw)
    elif stage.schedule == "flat":
        learn.fit(stage.epochs, lrs, cbs=cbs, **kw)
    else:
        sched = (SchedCos(np.array(lrs), 0.0) if stage.schedule == "cosine"
                 else step_decay(lrs, stage.epochs, stage.step_every, stage.step_gamma))
        learn.fit(stage.epochs, lrs, cbs=[*cbs, ParamScheduler({"lr": sched})], **kw)


def set_trainable(learn, stage, starting):
    """What trains in `stage`: the body frozen (BatchNorm still trains), everything, or the last blocks re-initialized
    (when the stage starts, not when it resumes) and trained with the head while the rest stays frozen."""
    from models import body_blocks, reinit_last_blocks
    if stage.train == "all":
        learn.unfreeze()
        return
    learn.freeze()
    if stage.train == "reinit":
        if starting:
            reinit_last_blocks(learn.model, stage.blocks)
        for block in body_blocks(learn.model)[-stage.blocks:]:
            for module in block:
                module.requires_grad_(True)


def plan(stages, progress):
    """[(index, stage, first epoch)] still to train, given progress.json's last completed (stage, epoch)."""
    todo = []
    for i, stage in enumerate(stages):
        if stage.epochs == 0 or (progress and (i < progress["stage"] or
                                               (i == progress["stage"] and progress["epoch"] >= stage.epochs))):
            continue
        todo.append((i, stage, progress["epoch"] if progress and i == progress["stage"] else 0))
    return todo


def run_stages(learn, stages, make_dls, out, resume=False, bars=None, extra_cbs=()):
    """Fit each stage in turn, re-making the DataLoaders when the size or batch size changes and the optimizer
    when a stage names another one.

    With `resume`, stages and epochs recorded as done in `out/progress.json` are skipped and the
    model and optimizer continue from the checkpoint; every process of a data-parallel run loads it, and only
    the main one writes. Returns seconds spent per stage."""
    from fastai.callback.tracker import EarlyStoppingCallback
    import distributed
    from models import make_opt
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bars = sys.stdout.isatty() if bars is None else bars
    show_bars(learn, bars)
    progress = _read_progress(out) if resume else {}
    todo = plan(stages, progress)
    seconds, current, optimizer = {}, None, None
    if resume and (out / CHECKPOINT).exists():  # with the optimizer of the stage that wrote it
        saved = stages[progress["stage"]]
        learn.opt_func, learn.opt = make_opt(saved.opt, saved.mom), None
        optimizer = (saved.opt, saved.mom)
        restore_checkpoint(learn, out)
    for i, stage, first_epoch in todo:
        if (stage.opt, stage.mom) != optimizer:  # a new optimizer starts with no state; the same one keeps its state
            learn.opt_func, learn.opt = make_opt(stage.opt, stage.mom), None
            learn.create_opt()
            optimizer = (stage.opt, stage.mom)
        if (stage.size, stage.bs) != current:
            learn.dls = make_dls(stage.size, stage.bs)
            current = (stage.size, stage.bs)
        set_trainable(learn, stage, starting=first_epoch == 0)
        cbs = [EpochRecord(out, i, stage, print_lines=not bars), *extra_cbs]
        if len(learn.dls.valid_ds) == 0:
            cbs.append(SkipValidation())
        elif stage.patience:
            cbs.append(EarlyStoppingCallback(monitor="valid_loss", patience=stage.patience))
        started = time.time()
        fit_stage(learn, stage, first_epoch, cbs)
        seconds[stage.name] = round(time.time() - started, 2)
        if distributed.is_main():
            progress = _read_progress(out)
            progress.update(stage=i, epoch=stage.epochs)  # done, even when early stopping ended it sooner
            _atomic_json(out / PROGRESS, progress)
    return seconds
