"""Training stages over a fastai Learner, as a recipe lists them (recipe.py): each stage sets what trains
(the body frozen with BatchNorm training, the whole network, or the last blocks re-initialized), the
optimizer, the image and batch size, and the schedule; with a checkpoint after every epoch, a CSV
history, and resuming a killed run from its last completed epoch.

fastai does the training: fit_one_cycle, fit_flat_cos and fit, ParamScheduler with SchedCos, freeze and
unfreeze, discriminative learning rates, EarlyStoppingCallback, AMP. Written here: the checkpoint and
history callbacks, because fastai's SaveModelCallback and CSVLogger neither write atomically nor record
the stage, image size and learning rates of each epoch; and the step-decay schedule, which fastai lacks. What a person
reads while it trains (the stage and run epoch, images/s, the ETA, a training accuracy) is train_progress.py's."""
import csv
import io
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fastai.callback.core import Callback, CancelValidException
from fastai.callback.progress import ProgressCallback
from fastai.callback.schedule import ParamScheduler, SchedCos, SchedLin, combine_scheds
from fastai.callback.tracker import EarlyStoppingCallback
from fastai.learner import AvgLoss
from fastcore.basics import noop
from fastcore.foundation import L

from finegrained import distributed, recipe
from finegrained.errors import RunFailed, UserError
from finegrained.files import atomic, write_json
from finegrained.models import body_blocks, make_opt, reinit_last_blocks
from finegrained.plots import training_curves
from finegrained.train_progress import RunPlan, RunProgress, RunProgressBar, TrainAccuracy

CHECKPOINT, PROGRESS, HISTORY, BEST = "checkpoint.pth", "progress.json", "history.csv", "best.pth"
CURVES = "training_curves.png"
METRICS = ["accuracy", "top5_accuracy", "mean_iou", "iou50"]  # the last two only for a model with a box head
# train_accuracy: over the epoch's training batches, in train mode (train_progress.TrainAccuracy); the rest from validation
HISTORY_COLUMNS = ["stage", "epoch", "size", "bs", "opt", "lrs", "lrs_end", "train_loss", "train_accuracy", "valid_loss",
                   *METRICS, "seconds"]


@dataclass
class Stage(recipe.Stage):
    """One fit of a recipe: a resolved recipe's stage (recipe.Stage declares each key), with the run-wide lr_rule it
    trains under: `Stage(**stage, lr_rule=recipe["lr_rule"])`."""
    lr_rule: str = recipe.Recipe.lr_rule

    @property
    def peak_lr(self):
        """The head's peak learning rate this stage trains at (recipe.trained_lr)."""
        return recipe.trained_lr(vars(self), self.lr_rule)

    @property
    def optimizer(self):
        """What makes this stage's optimizer: a stage naming another one starts a new optimizer, without state."""
        return (self.opt, self.mom, self.sqr_mom, self.eps)


def group_lrs(lr, n_groups=3, div=3.0):
    """Discriminative rates, earliest group first: divided by `div` for each earlier group."""
    return [lr / div ** (n_groups - 1 - k) for k in range(n_groups)]


def n_groups(learn):
    return len(learn.splitter(learn.model))


def _atomic_save(obj, path):
    buffer = io.BytesIO()
    torch.save(obj, buffer)  # serialized first, then written by Python: a full disk raises ENOSPC, not a zip error
    with atomic(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


class SkipValidation(Callback):
    """Train on everything: no validation pass when there is no validation set."""
    def before_validate(self):
        raise CancelValidException()


class EpochMeanLoss(AvgLoss):
    """The epoch's mean training loss, in place of the Recorder's smoothed loss that carries over from earlier
    epochs of the same fit: history.csv then records each epoch on its own, and a resumed run the same values."""
    def accumulate(self, learn):
        if learn.training:
            super().accumulate(learn)


def rng_state(learn):
    """Every random state the next epoch draws from: Python's, numpy's, torch's and the training loader's shuffle."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
             "loader": _shuffler(learn).getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(learn, state):
    random.setstate(_tuples(state["python"]))
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    _shuffler(learn).setstate(_tuples(state["loader"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _shuffler(learn):
    """The random generator the training loader shuffles with (under data-parallel training, the wrapped loader's)."""
    loader = learn.dls.train
    return getattr(loader, "dl", loader).rng


def _tuples(obj):
    """random.setstate wants the tuples it gave, which a checkpoint may hand back as lists."""
    return tuple(_tuples(v) for v in obj) if isinstance(obj, (list, tuple)) else obj


class EpochRecord(Callback):
    """After each epoch, in this order: an atomic checkpoint that holds the model, the optimizer, the random state and
    the run's record (stage, epoch, history rows, best accuracy); then progress.json, history.csv and
    training_curves.png, which are views of that record and are rewritten from it on resume, so a kill between any
    two writes loses no history row and trains no epoch twice. Also the best model by validation accuracy when there
    is a validation set. A non-finite loss ends the run in one line (RunFailed, exit 1) before anything is written, so
    the last good checkpoint stays."""
    order = 55  # after the Recorder (50) has the epoch's losses and metrics; before early stopping (63) ends the fit

    def __init__(self, out, stage_index, stage, record):
        self.out, self.stage_index, self.stage, self.record = Path(out), stage_index, stage, record

    def before_epoch(self):
        self.started, self.trained = time.time(), False

    def before_train(self):
        self.trained = True
        self.learn.recorder.smooth_loss.reset()

    def after_epoch(self):
        if not self.trained:  # an epoch skipped on resume
            return
        rec = self.learn.recorder
        values = dict(zip(rec.metric_names, rec.log))
        lrs = group_lrs(self.stage.peak_lr, len(self.opt.param_lists), self.stage.lr_div)
        self._check_finite(values, lrs)
        if not distributed.is_main():  # every process checks its loss; one writes
            return
        has_valid = len(self.dls.valid_ds) > 0
        row = {"stage": self.stage.name, "epoch": self.epoch + 1, "size": self.stage.size, "bs": self.stage.bs,
               "opt": optimizer_name(self.opt),
               "lrs": ";".join(f"{lr:.3g}" for lr in lrs),
               "lrs_end": ";".join(f"{h['lr']:.4g}" for h in self.opt.hypers),  # as the schedule left them
               "train_loss": _num(values.get("train_loss")),
               "train_accuracy": _num(getattr(self.learn, "train_accuracy", None)),
               "valid_loss": _num(values.get("valid_loss")) if has_valid else "",
               **{m: _num(values.get(m)) if has_valid else "" for m in METRICS},
               "seconds": round(time.time() - self.started, 2)}
        model = distributed.unwrap(self.learn.model)  # under DDP, without its 'module.' prefix
        record = self.record
        record.update(stage=self.stage_index, epoch=self.epoch + 1, history=[*record.get("history", []), row])
        if has_valid and row["accuracy"] != "" and row["accuracy"] > record.get("best_accuracy", -1):
            _atomic_save(scored_weights(self.learn, model), self.out / BEST)
            record["best_accuracy"] = row["accuracy"]
        save_checkpoint(self.learn, self.out, record)
        write_views(self.out, record)

    def _check_finite(self, values, lrs):
        for key in ("train_loss", "valid_loss"):
            value = _num(values.get(key))
            if value != "" and not math.isfinite(value):
                last = self.record.get("history", [])[-1:]
                kept = (f"the checkpoint of stage {last[0]['stage']!r} epoch {last[0]['epoch']} is kept" if last
                        else "no epoch had finished, so there is no checkpoint")
                raise RunFailed(f"stage {self.stage.name!r}, epoch {self.epoch + 1}: {key.replace('_', ' ')} is {value} "
                                f"at lr {lrs[-1]:g} on the head: training diverged; {kept}. Lower the learning rate "
                                "(--lr) and start a new run")


def scored_weights(learn, model):
    """The weights validation scored in this fit, for best.pth: a callback's that scores others (regularize.EmaWeights:
    the EMA's), else `model`'s."""
    for cb in learn.cbs:
        state = cb.scored_state() if hasattr(cb, "scored_state") else None
        if state is not None:
            return state
    return model.state_dict()


def save_checkpoint(learn, out, record):
    """checkpoint.pth: model, optimizer, random state and the run's record, in one atomic write."""
    opt = learn.opt.state_dict()
    state = {"model": distributed.unwrap(learn.model).state_dict(),
             "opt": _plain({"state": list(opt["state"]), "hypers": [dict(h) for h in learn.opt.hypers]}),
             "record": _plain(record), "rng": rng_state(learn)}
    for cb in learn.cbs:  # what callbacks keep besides (regularize.EmaWeights: the EMA weights)
        state.update(cb.checkpoint_state() if hasattr(cb, "checkpoint_state") else {})
    _atomic_save(state, Path(out) / CHECKPOINT)


def _progress(record):
    return {k: record[k] for k in ("stage", "epoch", "best_accuracy", "stage_done") if k in record}


def write_views(out, record):
    """progress.json, history.csv and training_curves.png from the record a checkpoint holds."""
    out = Path(out)
    write_json(out / PROGRESS, _progress(record))
    with atomic(out / HISTORY) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS)
        writer.writeheader()
        writer.writerows(record["history"])
    training_curves(out / HISTORY, out / CURVES)


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


def _read_history(out):
    path = Path(out) / HISTORY
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: _num(v) if k in NUMERIC else v for k, v in row.items()} for row in csv.DictReader(f)]


NUMERIC = {"epoch", "size", "bs", "train_loss", "train_accuracy", "valid_loss", *METRICS, "seconds"}


def show_bars(learn, bars):
    """fastprogress bars on a terminal; in a log file they pile up, so train_progress.RunProgress prints lines instead.

    Without bars, what fastai's `with learn.no_bar(), learn.no_logging():` does, kept rather than undone at the end:
    the progress callback removed (no_bar) and the logger fastcore's noop (no_logging; else the Recorder prints raw
    lists). Not those context managers themselves: a learner here fits several stages in turn (run_stages) or is
    handed on and fitted later (run.py --sanity's make_learner), and no_bar puts a ProgressCallback back on exit."""
    if not bars and any(isinstance(cb, ProgressCallback) for cb in learn.cbs):
        learn.remove_cb(ProgressCallback)
        learn.logger = noop


def load_checkpoint(out):
    """checkpoint.pth's content, weights only: pickled code is refused in one line."""
    path = Path(out) / CHECKPOINT
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not {"model", "opt"} <= set(state):
            raise KeyError("model and opt")
        return state
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, KeyError... for files it will not load
        raise UserError(f"{path}: not a checkpoint of this run that can be loaded safely "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:200]})")


def restore_checkpoint(learn, out, state):
    """Put a checkpoint's model and optimizer state into `learn`."""
    try:
        learn.model.load_state_dict(state["model"])
        if learn.opt is None:
            learn.create_opt()
        learn.opt.load_state_dict({"state": state["opt"]["state"], "hypers": L(state["opt"]["hypers"])})
    except Exception as err:
        raise UserError(f"{Path(out) / CHECKPOINT}: not a checkpoint of this run "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:200]})")


def warmup_cosine(lrs, warmup_pct=0.0):
    """A ParamScheduler schedule: linear from 0 to `lrs` over the first `warmup_pct` of the fit, then cosine to 0 (as
    torchvision's --lr-warmup-method linear before cosineannealinglr, and the ConvNeXt recipe's warm-up)."""
    lrs = np.asarray(lrs, dtype=float)
    if not warmup_pct:
        return SchedCos(lrs, 0.0)
    return combine_scheds([warmup_pct, 1 - warmup_pct], [SchedLin(0.0 * lrs, lrs), SchedCos(lrs, 0.0)])


def step_decay(lrs, n_epoch, every, gamma):
    """A ParamScheduler schedule: `lrs` multiplied by `gamma` every `every` epochs (fastai has cosine, linear and
    exponential annealers, but no step decay); `pos` is the fraction of the fit done."""
    lrs = np.asarray(lrs, dtype=float)
    return lambda pos: lrs * gamma ** (int(pos * n_epoch + 1e-6) // every)


def fit_stage(learn, stage, first_epoch, cbs):
    """One stage's fit under its schedule, through fastai's fit methods and ParamScheduler."""
    lrs = group_lrs(stage.peak_lr, n_groups(learn), stage.lr_div)
    kw = dict(wd=stage.wd, start_epoch=first_epoch)
    if stage.schedule == "one_cycle":
        learn.fit_one_cycle(stage.epochs, lrs, cbs=cbs, pct_start=stage.pct_start, div=stage.div,
                            div_final=stage.div_final, **kw)
    elif stage.schedule == "flat_cos":
        learn.fit_flat_cos(stage.epochs, lrs, cbs=cbs, **kw)
    elif stage.schedule == "flat":
        learn.fit(stage.epochs, lrs, cbs=cbs, **kw)
    else:
        sched = (warmup_cosine(lrs, stage.warmup_pct) if stage.schedule == "cosine"
                 else step_decay(lrs, stage.epochs, stage.step_every, stage.step_gamma))
        learn.fit(stage.epochs, lrs, cbs=[*cbs, ParamScheduler({"lr": sched})], **kw)


def set_trainable(learn, stage, starting):
    """What trains in `stage`: the body frozen (BatchNorm still trains), everything, or the last blocks re-initialized
    (when the stage starts, not when it resumes) and trained with the head while the rest stays frozen."""
    # Learner.freeze_to also clears the optimizer's state: as it should when a stage starts, but a resumed stage
    # continues with the state its checkpoint restored, so there only the optimizer's freeze_to is called
    freeze_to = learn.freeze_to if starting else learn.opt.freeze_to
    if stage.train == "all":
        freeze_to(0)
        return
    freeze_to(-1)
    if stage.train == "reinit":
        if starting:
            reinit_last_blocks(learn.model, stage.blocks)
        for block in body_blocks(learn.model)[-stage.blocks:]:
            for module in block:
                module.requires_grad_(True)


def plan(stages, progress):
    """[(index, stage, first epoch)] still to train, given the last completed (stage, epoch)."""
    todo = []
    for i, stage in enumerate(stages):
        if stage.epochs == 0 or (progress and (i < progress["stage"] or
                                               (i == progress["stage"] and progress["epoch"] >= stage.epochs))):
            continue
        todo.append((i, stage, progress["epoch"] if progress and i == progress["stage"] else 0))
    return todo


def _done(record, stages):
    """The last completed (stage, epoch) for `plan`: a stage that early stopping ended counts as done."""
    if "stage" not in record:
        return {}
    if record.get("stage_done") == [record["stage"], record["epoch"]]:
        return {"stage": record["stage"], "epoch": stages[record["stage"]].epochs}
    return {"stage": record["stage"], "epoch": record["epoch"]}


def _previous_live(stages, i):
    return next((s for s in reversed(stages[:i]) if s.epochs), None)


def epochs_left(stages, out):
    """[(epochs, size)] of what a run in `out` still trains, by its progress.json (everything when it has none):
    for the CPU-time estimate, before the checkpoint is read."""
    return [(stage.epochs - first, stage.size) for _, stage, first in plan(stages, _done(_read_progress(out), stages))]


def run_stages(learn, stages, make_dls, out, resume=False, bars=None, extra_cbs=(), log_every=60.0):
    """Fit each stage in turn, re-making the DataLoaders when the size or batch size changes and the optimizer
    when a stage names another one. On a terminal fastai's progress bars say the stage and the run's epoch; otherwise
    a line every `log_every` seconds and at each epoch's end (train_progress.py).

    With `resume`, the model, optimizer and record continue from the checkpoint (every process of a data-parallel run
    loads it, and only the main one writes); on a single process the random state too, at the point the
    uninterrupted run would have reached, so the resumed epochs are the ones it would have trained. Returns seconds
    spent per stage in this process."""
    out = Path(out)
    if distributed.is_main():  # the other processes of a data-parallel run only read (a checkpoint, on resume)
        out.mkdir(parents=True, exist_ok=True)
    bars = sys.stdout.isatty() if bars is None else bars
    show_bars(learn, bars)
    live = [i for i, s in enumerate(stages) if s.epochs]
    run_plan = RunPlan([(stages[i].name, stages[i].epochs, stages[i].size) for i in live])
    if bars and any(type(cb) is ProgressCallback for cb in learn.cbs):
        learn.remove_cb(ProgressCallback)
        learn.add_cb(RunProgressBar(run_plan))
    learn.recorder.smooth_loss = EpochMeanLoss()
    record, saved_rng, current, optimizer = {}, None, None, None
    if resume and (out / CHECKPOINT).exists():
        state, progress = load_checkpoint(out), _read_progress(out)
        # a checkpoint from before records were kept in it: its views are all there is
        record = state.get("record") or {**progress, "history": _read_history(out)}
        saved_rng = state.get("rng")
        saved = stages[record["stage"]]  # the optimizer of the stage that wrote it
        learn.opt_func, learn.opt = make_opt(*saved.optimizer), None
        optimizer = saved.optimizer
        restore_checkpoint(learn, out, state)
        if progress.get("stage_done") == [record["stage"], record["epoch"]]:  # early stopping ended that stage
            record["stage_done"] = progress["stage_done"]
        if distributed.is_main():
            write_views(out, record)  # repairs a view a kill left one epoch behind the checkpoint
    todo = plan(stages, _done(record, stages))
    seconds = {}
    for n, (i, stage, first_epoch) in enumerate(todo):
        if stage.optimizer != optimizer:  # a new optimizer starts with no state; the same one keeps its state
            learn.opt_func, learn.opt = make_opt(*stage.optimizer), None
            learn.create_opt()
            optimizer = stage.optimizer
        if (stage.size, stage.bs) != current:
            learn.dls = make_dls(stage.size, stage.bs)
            current = (stage.size, stage.bs)
        previous = _previous_live(stages, i)
        same_loaders = first_epoch > 0 or (previous is not None and (previous.size, previous.bs) == current)
        if n == 0 and saved_rng is not None and same_loaders and distributed.world_size() == 1:
            set_rng_state(learn, saved_rng)  # the uninterrupted run drew on from here, with the loaders it had
        set_trainable(learn, stage, starting=first_epoch == 0)
        run_plan.current = live.index(i)
        cbs = [TrainAccuracy(), EpochRecord(out, i, stage, record=record),
               RunProgress(run_plan, lines=not bars, log_every=log_every, main=distributed.is_main()), *extra_cbs]
        if len(learn.dls.valid_ds) == 0:
            cbs.append(SkipValidation())
        elif stage.patience:
            cbs.append(EarlyStoppingCallback(monitor="valid_loss", patience=stage.patience))
        started = time.time()
        fit_stage(learn, stage, first_epoch, cbs)
        seconds[stage.name] = round(time.time() - started, 2)
        if record.get("stage") == i and record["epoch"] < stage.epochs:  # early stopping: done, with epochs left
            record["stage_done"] = [i, record["epoch"]]
            if distributed.is_main():
                write_json(out / PROGRESS, _progress(record))
    return seconds
