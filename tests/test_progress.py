"""What a person reads while a run trains: in a log file, lines with the stage, the run's epoch, loss, lr, images/s and
the ETA of the stage and the run, and the estimate after the first epoch; on a terminal, fastai's bars and table told the
stage and the run's epoch; a training accuracy per epoch in history.csv that is the share of training predictions that
were right, and the same figures in the tracker."""
import contextlib
import io
import re
import sys

import pandas as pd
import pytest
from fastai.callback.core import Callback

from finegrained import runner as run
from finegrained import trackers

TINY = ["--arch", "resnet18", "--no-pretrained", "--sizes", "32,32", "--bs", "16,16", "--workers", "0"]
BATCHES = 7  # 120 training images in batches of 16, the last one dropped


class CountCorrect(Callback):
    """An independent training accuracy: argmax of each training batch's predictions against its labels, per epoch."""
    order = 90

    def __init__(self):
        self.epochs = []

    def before_train(self):
        self.correct = self.seen = 0

    def after_batch(self):
        if self.training:
            self.correct += int((self.pred.argmax(dim=1) == self.yb[0]).sum())
            self.seen += len(self.yb[0])

    def after_train(self):
        self.epochs.append(self.correct / self.seen)


@pytest.fixture(scope="module")
def logged(prepared, tmp_path_factory):
    """A tiny run with stdout not a terminal, a line after every batch, TensorBoard, and the predictions counted."""
    pytest.importorskip("tensorboard")
    out = tmp_path_factory.mktemp("progress") / "run"
    counter, real, log = CountCorrect(), trackers.tracker_callbacks, io.StringIO()  # a StringIO is no terminal
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(log):
        mp.setattr(trackers, "tracker_callbacks", lambda *a, **k: [*real(*a, **k), counter])
        run.main(["--data", str(prepared), *TINY, "--epochs", "1,2,0", "--out", str(out), "--tracker", "tensorboard",
                  "--log-every", "0"])  # two epochs in one stage: the accuracy starts afresh each epoch, not each stage
    return out, log.getvalue().splitlines(), counter.epochs


def test_a_log_file_gets_a_line_per_interval_with_loss_lr_images_per_s_and_the_etas(logged):
    out, printed, _ = logged
    number, text = r"[0-9.]+(?:e-?[0-9]+)?", r"[0-9.]+ (?:s|min|h)"
    batch = re.compile(rf"^stage (frozen|unfrozen) \(([12])/2\), epoch ([123])/3, batch ([0-9]+)/{BATCHES}: "
                       rf"loss ({number}) lr ({number}) \| ({number}) images/s, ETA stage ({text}), run ({text})$")
    lines = [m.groups() for line in printed if (m := batch.match(line))]
    # every batch of every epoch, in order, each epoch counted over the whole run (the second stage goes on at 2/3)
    assert [(g[0], g[2], g[3]) for g in lines] == [(s, e, str(b)) for s, e in (("frozen", "1"), ("unfrozen", "2"),
                                                                               ("unfrozen", "3"))
                                                   for b in range(1, BATCHES + 1)]
    assert all(float(g[6]) > 0 for g in lines)
    epoch_end = [line for line in printed if re.match(r"^stage \w+ \([12]/2\), epoch [123]/3, size 32: train_loss", line)]
    history = pd.read_csv(out / "history.csv")
    assert len(epoch_end) == len(history) == 3
    for line, (_, row) in zip(epoch_end, history.iterrows()):
        assert f"train_loss {row['train_loss']:.4f} train_accuracy {row['train_accuracy']:.4f}" in line
        speed = float(re.search(rf"\| ({number}) images/s", line).group(1))
        # images/s over the epoch's training part: at least the 112 images over the whole epoch's seconds
        assert speed >= 0.9 * BATCHES * 16 / row["seconds"]
    assert epoch_end[-1].endswith("ETA stage 0 s, run 0 s")  # nothing left after the last epoch
    first = [line for line in printed if line.startswith("after its first epoch")]
    assert len(first) == 1 and "the run's 2 remaining epochs should take about" in first[0]


def test_history_records_the_training_accuracy_the_predictions_had(logged):
    out, _, counted = logged
    history = pd.read_csv(out / "history.csv")
    assert history["train_accuracy"].tolist() == pytest.approx(counted, abs=1e-6)
    assert history["valid_loss"].isna().all()  # no validation split (the default): this is the only accuracy


def test_the_tracker_gets_the_same_figures(logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, printed, _ = logged
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    tags = events.Tags()["scalars"]
    for tag in ("train_accuracy", "progress/images_per_s", "progress/eta_stage_s", "progress/eta_run_s"):
        assert tag in tags, tags
        assert [e.step for e in events.Scalars(tag)] == [1, 2, 3]
    history = pd.read_csv(out / "history.csv")
    assert [e.value for e in events.Scalars("train_accuracy")] == pytest.approx(history["train_accuracy"], abs=1e-6)
    shown = [float(re.search(r"\| ([0-9.]+) images/s", line).group(1)) for line in printed
             if re.match(r"^stage \w+ \([12]/2\), epoch [123]/3, size", line)]
    assert [e.value for e in events.Scalars("progress/images_per_s")] == pytest.approx(shown, abs=0.06)
    assert events.Scalars("progress/eta_run_s")[-1].value == pytest.approx(0.0, abs=1e-6)


def test_a_terminal_shows_the_stage_and_the_runs_epoch_in_fastais_bars_and_table(prepared, tmp_path, monkeypatch,
                                                                               capsys):
    import fastprogress.fastprogress as fp
    monkeypatch.setattr(fp, "printing", lambda: True)  # fastprogress draws only on a terminal
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    run.main(["--data", str(prepared), *TINY, "--epochs", "1,1,0", "--out", str(tmp_path / "run")])
    shown = capsys.readouterr().out.replace("\r", "\n")
    assert "stage frozen (1/2), epoch 1/2 :" in shown and "stage unfrozen (2/2), epoch 2/2 :" in shown
    assert not re.search(r"Epoch \d+/\d+ :", shown)  # fastai's own counter, which restarts every stage
    header = [line.split() for line in shown.splitlines() if line.startswith("stage ") and "train_accuracy" in line]
    assert header and header[0] == ["stage", "epoch", "train_loss", "train_accuracy", "images/s", "run", "ETA", "time"]
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    rows = [line.split() for line in shown.splitlines() if re.match(r"^(frozen|unfrozen) +[12]/2 ", line)]
    assert [r[:2] for r in rows] == [["frozen", "1/2"], ["unfrozen", "2/2"]]
    assert [float(r[3]) for r in rows] == pytest.approx(history["train_accuracy"].tolist(), abs=1e-6)
    assert "after its first epoch" in shown


def test_without_bars_fit_after_fit_prints_nothing_yet_records(monkeypatch, capsys):
    """show_bars(learn, False): what fastai's no_bar and no_logging do, for every later fit; with bars, fastai's."""
    import fastprogress.fastprogress as fp
    from fastai.callback.progress import ProgressCallback
    from fastai.test_utils import synth_learner
    from finegrained.train import show_bars
    monkeypatch.setattr(fp, "printing", lambda: True)  # as on a terminal
    shown = synth_learner()
    show_bars(shown, True)
    shown.fit(1)
    assert "train_loss" in capsys.readouterr().out  # fastai's bar and table
    quiet = synth_learner()
    show_bars(quiet, False)
    quiet.fit(1)
    quiet.fit(1)
    assert capsys.readouterr().out == ""  # no bar, and not the Recorder's raw lists
    assert not any(isinstance(cb, ProgressCallback) for cb in quiet.cbs)
    assert len(quiet.recorder.values) == 1 and len(quiet.recorder.values[0]) == 2  # still recorded: train, valid loss
