"""The plumbing every script leans on: atomic writes under a per-process temporary name, a full disk as one line
with nothing half-written, a run folder held by one process at a time (a killed holder's lock is taken over),
and each error's exit status."""
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finegrained import cli
from finegrained.errors import RunFailed, UserError
from finegrained.files import atomic, folder_lock
from conftest import ROOT


def test_atomic_writes_under_a_name_of_this_process_and_renames_when_whole(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with atomic(target) as tmp:
        assert str(os.getpid()) in tmp.name and tmp.parent == tmp_path and tmp.suffix == ".json"
        tmp.write_text("new")
        assert target.read_text() == "old"  # nothing under the final name until the block completes
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_full_disk_is_one_line_naming_the_folder_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pth"
    target.write_bytes(b"the last good checkpoint")

    def full(self, data):
        Path.write_text(self, "half")  # something was written before the disk filled up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(UserError) as caught:
        with atomic(target) as tmp:
            tmp.write_bytes(b"x" * 100)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path}: no space left on device (") and "MiB free" in message
    assert "checkpoint.pth was left as it was" in message and "\n" not in message
    monkeypatch.undo()
    assert target.read_bytes() == b"the last good checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]  # no half-written temporary


def test_a_checkpoint_write_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    import torch
    from finegrained import train
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))))
    with pytest.raises(UserError, match="no space left on device"):
        train._atomic_save({"model": {"w": torch.zeros(3)}}, tmp_path / "checkpoint.pth")
    assert not list(tmp_path.iterdir())


def hold(folder):
    """A separate process holding `folder`'s lock until it is killed; returns it once the lock is taken."""
    code = f"import time\nfrom finegrained import files\nwith files.folder_lock({str(folder)!r}):\n    print('held', flush=True)\n    time.sleep(60)\n"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_run_folder_is_held_by_one_process_and_a_killed_holders_lock_is_taken_over(tmp_path):
    proc = hold(tmp_path / "run")
    try:
        with pytest.raises(UserError, match=rf"{tmp_path / 'run'}: in use by another run \(process {proc.pid}\)"):
            with folder_lock(tmp_path / "run"):
                pass
    finally:
        proc.kill()
        proc.wait()
    assert (tmp_path / "run" / ".lock").exists()  # a SIGKILL leaves the file behind ...
    with folder_lock(tmp_path / "run"):  # ... but not the lock
        assert (tmp_path / "run" / ".lock").read_text() == str(os.getpid())
    assert not (tmp_path / "run" / ".lock").exists()


def test_each_error_has_its_exit_status(capsys):
    def fails(error):
        def main():
            raise error
        return main
    for error, status in ((UserError("bad value"), 2), (RunFailed("diverged"), 1),
                          (OSError(errno.ENOSPC, "No space left on device", "/tmp/x/file"), 2)):
        with pytest.raises(SystemExit) as caught:
            cli.run(fails(error))
        assert caught.value.code == status
        line = capsys.readouterr().err.strip()
        assert line.startswith("error: ") and "\n" not in line
    with pytest.raises(OSError):  # any other OSError is not ours to hide
        cli.run(fails(OSError(errno.EACCES, "Permission denied")))


def test_no_tracked_file_points_outside_the_repository():
    """A user who clones the project has only the project: docs and comments cite public sources, never a path
    outside it (the team's notes, the write-ups' copies)."""
    import re
    root = ROOT
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True).stdout.split()
    assert "README.md" in tracked, "run from a git checkout: the tracked files are what a user clones"
    outside = re.compile(r"\.\./shared|\bseeds/\d|REFERENCE\.md")
    found = [f"{name}:{n}" for name in tracked if name.endswith((".md", ".py", ".toml", ".csv", ".txt", ".ini"))
             and (root / name).is_file() and name != "tests/test_cli.py"
             for n, line in enumerate((root / name).read_text(errors="replace").splitlines(), 1) if outside.search(line)]
    assert not found


def test_the_quick_tier_leaves_out_what_trains_or_starts_a_process():
    """conftest.py marks slow, by what they call, the tests that train, run a script or need a trained model."""
    listed = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "not slow", "-p",
                             "no:cacheprovider", "tests/test_run.py", "tests/test_progress.py", "tests/test_evaluate.py"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300).stdout
    quick = {line.split("::")[1].split("[")[0] for line in listed.splitlines() if "::" in line}
    assert {"test_top_k_counts_ties_inside_k_and_agrees_with_the_predicted_class",   # in-process, nothing trained
            "test_confusion_keeps_a_row_and_column_for_every_class"} <= quick
    for slow in ("test_train_py_trains_the_stages_and_scores_nothing_on_the_test_set",   # run.main in the test
                 "test_a_log_file_gets_a_line_per_interval_with_loss_lr_images_per_s_and_the_etas",  # in its fixture
                 "test_lr_find_plots_and_prints_suggestions"):                       # lr_find.main
        assert slow not in quick, slow
    assert "test_without_bars_fit_after_fit_prints_nothing_yet_records" not in quick   # fastai's fit on a tiny learner
