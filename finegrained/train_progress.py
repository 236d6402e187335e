"""What a person reads while run.py trains: where the run is (the stage, and the epoch counted over the whole run),
how fast it goes (images/s) and how long it still has (the ETA of the stage and of the run), and a training accuracy,
which is all there is to watch without a validation split. fastai callbacks, added by train.run_stages:

  on a terminal  fastai's progress bars (RunProgressBar), labelled "stage unfrozen (2/3), epoch 23/100", and its
                 table with the stage, the run's epoch, train_accuracy, images/s and the run's ETA
  in a log file  a line every `log_every` seconds during an epoch and one at its end (RunProgress)
  trackers       the same figures each epoch, through learn.run_figures and learn.train_accuracy (trackers.py)

The ETA model, kept simple so that it can be said in one line: the current epoch's measured seconds (during an epoch,
the time per batch so far times the batches of an epoch), times the epochs left, each later stage's epochs scaled by its
pixel count (size²) over this stage's. Frozen and unfrozen epochs are counted alike, so after a frozen stage the
estimate grows once the next stage's first epoch is measured; every line gives the estimate revised."""
import copy
import time
from dataclasses import dataclass, field

from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastai.learner import Recorder
from fastai.torch_core import find_bs
from fastprogress.fastprogress import progress_bar

from finegrained.devices import duration


@dataclass
class RunPlan:
    """The run's stages that train, [(name, epochs, size)], and which one is fitting now (`current`, an index into
    them); shared by the callbacks of every stage."""
    stages: list
    current: int = 0
    estimated: bool = field(default=False)  # the after-the-first-epoch estimate has been printed

    @property
    def total(self):
        return sum(epochs for _, epochs, _ in self.stages)

    def run_epoch(self, epoch):
        """The run's epoch number (1-based) of epoch `epoch` (0-based) of the current stage."""
        return sum(epochs for _, epochs, _ in self.stages[:self.current]) + epoch + 1

    def label(self, epoch):
        name = self.stages[self.current][0]
        return f"stage {name} ({self.current + 1}/{len(self.stages)}), epoch {self.run_epoch(epoch)}/{self.total}"

    def later_seconds(self, epoch_seconds):
        """The stages after the current one, at `epoch_seconds` per epoch of the current one scaled by pixel count."""
        size = self.stages[self.current][2]
        return sum(epochs * epoch_seconds * (s / size) ** 2 for _, epochs, s in self.stages[self.current + 1:])


class TrainAccuracy(Callback):
    """The epoch's top-1 accuracy over its training batches, as the model scored them while it trained (train mode,
    augmented images, weights moving within the epoch), the figure Keras reports as `accuracy` during fit: the
    Learner's own accuracy metric, accumulated over training batches only. fastai's Recorder(train_metrics=True)
    would do it too, but renames every column (train_/valid_) that history.csv and the trackers read."""
    order = Recorder.order - 1

    def before_fit(self):
        found = [m for m in self.learn.metrics if getattr(m, "name", "") == "accuracy"]
        self.metric = copy.copy(found[0]) if found else None  # a copy: the original accumulates validation batches

    def before_train(self):
        # set, so that the Learner's attribute lookup never falls through to this callback (fastai finds callbacks by
        # name): None for an epoch with nothing to score (every batch mixed, or no accuracy metric)
        self.learn.train_accuracy = None
        if self.metric is not None:
            self.metric.reset()

    def after_batch(self):
        if self.metric is not None and self.training and len(self.yb) and not self._mixed():
            self.metric.accumulate(self.learn)

    def _mixed(self):
        """Whether the batch's targets are mixed (mixup/cutmix's soft targets): no true class to score against."""
        target = self.yb[-1]
        return target.ndim > 1 and target.is_floating_point()

    def after_train(self):
        if self.metric is not None and self.metric.count:
            self.learn.train_accuracy = float(self.metric.value)


class RunProgress(Callback):
    """Per trained epoch: images/s, the ETA of the stage and of the run (learn.run_figures, for the table, the trackers
    and the lines), the estimate after the run's first epoch (printed once), and with `lines` (stdout is not a
    terminal) a line every `log_every` seconds of training and one at the epoch's end."""
    order = 56  # after the Recorder (50) has the batch's loss and EpochRecord (55) has written the epoch

    def __init__(self, plan, lines, log_every=60.0, write=print, main=True):
        self.plan, self.lines, self.log_every, self.write, self.main = plan, lines, log_every, write, main
        self.valid_seconds = 0.0

    def before_epoch(self):
        self.trained, self.images, self.epoch_started = False, 0, time.time()

    def before_train(self):
        self.trained, self.train_started = True, time.time()
        self.last_line = self.train_started

    def after_batch(self):
        if not self.training:
            return
        self.images += find_bs(self.yb)
        now = time.time()
        if self.lines and self.main and now - self.last_line >= self.log_every:
            self.last_line = now
            done = self.iter + 1
            epoch_seconds = (now - self.train_started) / done * self.n_iter + self.valid_seconds
            figures = self._figures(now - self.train_started, epoch_seconds, epoch_seconds - (now - self.epoch_started))
            self.write(f"{self.plan.label(self.epoch)}, batch {done}/{self.n_iter}: loss {float(self.smooth_loss):.4f} "
                       f"lr {self.opt.hypers[-1]['lr']:.3g} | {self._speed(figures)}", flush=True)

    def after_train(self):
        self.train_seconds = time.time() - self.train_started

    def after_validate(self):
        if not self.trained:
            return
        now = time.time()
        self.valid_seconds = now - self.epoch_started - self.train_seconds
        self.learn.run_figures = self._figures(self.train_seconds, now - self.epoch_started, 0.0)

    def after_epoch(self):
        if not self.trained or not self.main:
            return
        figures = self.learn.run_figures
        if self.lines:
            values = dict(zip(self.recorder.metric_names[1:], self.recorder.log[1:]))
            shown = [f"train_loss {float(values['train_loss']):.4f}"]
            if getattr(self.learn, "train_accuracy", None) is not None:
                shown.append(f"train_accuracy {self.learn.train_accuracy:.4f}")
            if len(self.dls.valid_ds):
                shown += [f"{k} {float(values[k]):.4f}" for k in ("valid_loss", "accuracy") if k in values]
            self.write(f"{self.plan.label(self.epoch)}, size {self.plan.stages[self.plan.current][2]}: "
                       f"{' '.join(shown)} lr {self.opt.hypers[-1]['lr']:.3g} ({figures['epoch_seconds']:.1f} s) | "
                       f"{self._speed(figures)}", flush=True)
        left = self.plan.total - self.plan.run_epoch(self.epoch)
        if not self.plan.estimated and left:
            self.plan.estimated = True
            self.write(f"after its first epoch ({figures['epoch_seconds']:.1f} s, {figures['images_per_s']:.1f} images/s) "
                       f"the run's {left} remaining epoch{'s' if left != 1 else ''} should take about "
                       f"{duration(figures['eta_run_s'])} (an estimate: each stage's epochs scaled by image size; "
                       "revised as it goes)", flush=True)

    def _figures(self, train_seconds, epoch_seconds, rest_of_epoch):
        stage = rest_of_epoch + epoch_seconds * (self.n_epoch - self.epoch - 1)
        return {"images_per_s": self.images / max(train_seconds, 1e-9), "epoch_seconds": epoch_seconds,
                "eta_stage_s": max(stage, 0.0), "eta_run_s": max(stage, 0.0) + self.plan.later_seconds(epoch_seconds)}

    @staticmethod
    def _speed(figures):
        return (f"{figures['images_per_s']:.1f} images/s, ETA stage {duration(figures['eta_stage_s'])}, "
                f"run {duration(figures['eta_run_s'])}")


class RunProgressBar(ProgressCallback):
    """fastai's progress bars, told where the run is: the batch bar is labelled with the stage and the run's epoch
    (fastai's counts the epochs of one fit, which restart every stage), and the epoch table has the stage, the run's
    epoch, train_accuracy, images/s and the run's ETA, and the validation columns only when there is validation."""

    def __init__(self, plan):
        self.plan = plan

    def _launch_pbar(self):
        self.pbar = progress_bar(self.dl, parent=getattr(self, "mbar", None), leave=False)
        if getattr(self, "mbar", False):  # fastai's own prefix counts the epochs of this fit only
            self.pbar.prefix = f"{self.plan.label(self.epoch)}{'' if self.training else ', validation'} :"
        self.pbar.update(0)

    def _write_stats(self, log):
        names = list(self.recorder.metric_names)
        validating = len(self.dls.valid_ds) > 0
        timed = self.recorder.add_time
        if log is self.recorder.metric_names:  # the header, written by before_fit
            valid_names = (names[2:-1] if timed else names[2:]) if validating else []
            row = ["stage", "epoch", "train_loss", "train_accuracy", *valid_names, "images/s", "run ETA",
                   *(["time"] if timed else [])]
        else:
            log = list(log)
            valid = log[2:-1] if timed else log[2:]
            figures = getattr(self.learn, "run_figures", {})
            accuracy = getattr(self.learn, "train_accuracy", None)
            row = [self.plan.stages[self.plan.current][0], f"{self.plan.run_epoch(log[0])}/{self.plan.total}", log[1],
                   "" if accuracy is None else accuracy, *(valid if validating else []),
                   f"{figures['images_per_s']:.1f}" if figures else "",
                   duration(figures["eta_run_s"]) if figures else "", *(log[-1:] if timed else [])]
        super()._write_stats(row)
