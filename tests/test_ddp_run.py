"""run.py data-parallel under `torchrun --nproc_per_node 2` on the CPU (gloo): both ranks train disjoint halves of every
epoch and end with the same weights (recorded on each rank by tests/ddp_record.py, not taken from the launcher); the
outputs exist once and whole; the printed accuracy is test.py's on the saved model; a kill after the first epoch
resumes with 2 processes without repeating it; a batch size that does not share out is one clear line."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "ACCELERATE_USE_CPU", "ACCELERATE_DYNAMO_BACKEND")


def launch(args, record, wait=True):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(DDP_RECORD=str(record), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [*TORCHRUN, str(ROOT / "tests" / "ddp_record.py"), *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # its own process group: the kill reaches every worker
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)


def run_args(prepared, out, epochs="1,2,0", bs="16,16"):
    return ["--data", prepared, "--arch", "resnet18", "--no-pretrained", "--epochs", epochs, "--sizes", "32,32",
            "--bs", bs, "--workers", "0", "--out", out]


def ranks(record):
    return [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def ddp_run(prepared, tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    result = launch([*run_args(prepared, base / "run"), "--keep-checkpoint"], base / "record")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return base, result


def test_two_ranks_train_disjoint_halves_and_end_with_the_same_weights(ddp_run, prepared):
    base, result = ddp_run
    assert "2 processes (data-parallel)" in result.stdout + result.stderr
    rank0, rank1 = ranks(base / "record")
    assert rank0["world"] == rank1["world"] == "2"
    train = set(pd.read_csv(prepared / "train.csv")["filename"])
    assert len(rank0["epochs"]) == len(rank1["epochs"]) == 3  # 1 frozen + 2 unfrozen epochs
    for a, b in zip(rank0["epochs"], rank1["epochs"]):
        assert not set(a) & set(b), "the two ranks trained the same images"
        assert len(a) == len(b) == 56 and set(a) | set(b) <= train  # 120 images: 60 a rank, 7 batches of 8
    assert rank0["hashes"] == rank1["hashes"] and len(rank0["hashes"]) == 2  # one per stage's fit


def test_outputs_exist_once_whole_and_the_accuracy_is_test_pys(ddp_run, prepared):
    base, result = ddp_run
    out = base / "run"
    history = pd.read_csv(out / "history.csv")
    assert list(zip(history["stage"], history["epoch"])) == [("frozen", 1), ("unfrozen", 1), ("unfrozen", 2)]
    assert json.loads((out / "config.json").read_text())["run"]["world_size"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["test_images"] == len(pd.read_csv(prepared / "test.csv"))
    weights, checkpoint = load_file(out / "model.safetensors"), torch.load(out / "checkpoint.pth", weights_only=True)
    assert set(weights) == set(checkpoint["model"])  # saved once, without DDP's "module." prefix
    assert all(torch.equal(weights[k], v.float() if v.is_floating_point() else v) for k, v in checkpoint["model"].items())
    assert not list(out.glob(".*tmp*"))
    printed = re.findall(r"test accuracy: ([0-9.]+)", result.stdout)
    assert len(printed) == 1  # scored once, by one process
    holdout = subprocess.run([sys.executable, str(ROOT / "test.py"), "--model", out, "--folder", prepared, "--csv",
                              prepared / "test.csv", "--out", base / "p.csv", "--workers", "0"],
                             capture_output=True, text=True, timeout=300)
    assert re.search(r"^accuracy: ([0-9.]+)$", holdout.stdout, re.M).group(1) == printed[0]


def test_a_kill_after_the_first_epoch_resumes_with_two_processes(prepared, tmp_path):
    out = tmp_path / "run"
    args = run_args(prepared, out, epochs="1,2,0")
    proc = launch(args, tmp_path / "record1", wait=False)
    deadline = time.time() + 300
    while not (out / "progress.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    subprocess.run(["pkill", "-9", "-f", str(out)], check=False)  # torchrun starts each worker in a session of its own
    proc.wait()
    time.sleep(0.5)
    done = len(pd.read_csv(out / "history.csv"))
    assert 1 <= done < 3 and not (out / "metrics.json").exists()
    result = launch([*args, "--resume"], tmp_path / "record2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    history = pd.read_csv(out / "history.csv")
    assert list(zip(history["stage"], history["epoch"])) == [("frozen", 1), ("unfrozen", 1), ("unfrozen", 2)]
    rank0, rank1 = ranks(tmp_path / "record2")
    assert len(rank0["epochs"]) == len(rank1["epochs"]) == 3 - done  # only what the kill left undone
    assert rank0["hashes"] == rank1["hashes"]


def test_a_batch_size_that_does_not_share_out_is_one_line(prepared, tmp_path):
    result = launch(run_args(prepared, tmp_path / "run", bs="15,15"), tmp_path / "record")
    assert result.returncode != 0
    ours = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]
    assert ours == ["error: --bs 15 does not divide by 2 processes; the batch size is the global batch, shared out "
                    "among the processes: pass a multiple of 2"]
    assert not (tmp_path / "run").exists()
