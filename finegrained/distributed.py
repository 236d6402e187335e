"""Data-parallel training over several processes: the one place that knows what `torchrun` and
`accelerate launch` put in the environment, and what fastai's `learn.distrib_ctx` (PyTorch DDP through
accelerate) needs from us to run on GPUs (nccl) and on the CPU (gloo) with nothing for the user to set.

Importing this module does nothing; `setup()` is the only call that changes anything.

    world = distributed.setup()                      # first thing, before any DataLoaders, Learner or Accelerator
    bs = distributed.per_process_bs(args.bs, world)  # the recipe's batch is the global batch
    ...build DataLoaders (with bs) and the Learner on every rank...
    distributed.seed_per_rank(seed)                  # each process its own augmentations
    with distributed.context(learn):                 # DDP while inside; nothing at all in one process
        learn.fit_one_cycle(...)                     # every rank; files written only where is_main(),
                                                     # from distributed.unwrap(learn.model).state_dict()
    if distributed.is_main():
        with distributed.local():                    # fastai on this rank alone: no gathering across ranks
            preds, targets = learn.get_preds(dl=...)
    distributed.barrier()

What the launchers set (read from their source, accelerate 1.15, torch 2.14):
- torchrun, and `accelerate launch --multi_gpu` (which runs torchrun's code; with setup() it works on the CPU too):
  WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT (OMP_NUM_THREADS=1 for several per node).
- `accelerate launch` without --multi_gpu (so with --cpu, or on a machine without GPUs) runs its "simple
  launcher": ONE process, with ACCELERATE_USE_CPU, ACCELERATE_MIXED_PRECISION, ACCELERATE_DYNAMO_BACKEND ...,
  and MASTER_ADDR/MASTER_PORT only when --num_processes > 1 or --num_machines > 1, but never WORLD_SIZE or RANK.
  It goes multi-process only under mpirun (--mpirun_hostfile), which sets PMI_*/OMPI_COMM_WORLD_*/MV2_* instead.
  That one process would train alone and exit 0: `setup()` stops it with one line saying what works instead.

What fastai 2.8.12 does and what is fixed here:
- `num_distrib()`/`rank_distrib()` read only WORLD_SIZE/RANK; `distrib_ctx` wraps the learner only when
  WORLD_SIZE is set, and makes its Accelerator() on entering. Without ACCELERATE_USE_CPU, accelerate on a
  machine without CUDA stays single-process and fastai fails with "'Sequential' object has no attribute 'device'".
- `DistributedDL._broadcast` moves the epoch's indices to `.cuda()` (fails without a GPU): replaced by a version
  that uses the process group's device (CPU for gloo, the current GPU for nccl).
- `DistributedDL.__len__` counts ceil(batches/N) for the whole set, which can be one more than the batches a rank
  really yields (each rank batches its own 1/N share, dropping its own remainder): replaced by the exact count, so
  one-cycle schedules end where they should.
- SyncBatchNorm only works on GPU modules, and fastai's conversion (torch's) breaks timm's BatchNormAct2d:
  `context()` converts with timm's converter, on CUDA only.
"""
import contextlib
import math
import os
import sys
from pathlib import Path

import fastai.distributed  # noqa: F401  (adds Learner.distrib_ctx)
import torch
import torch.distributed as dist
from accelerate.state import PartialState
from fastai.distributed import DistributedDL
from fastai.torch_core import defaults, set_seed
from timm.layers import convert_sync_batchnorm

from finegrained.errors import UserError
from finegrained.ranks import (LOCAL_RANK_VARS, LOCAL_SIZE_VARS, RANK_VARS, SIZE_VARS,  # noqa: F401  (re-exported)
                               is_main, local_rank, local_world_size, rank, world_size)

# Set by accelerate's simple launcher (one process) and never by torchrun.
SIMPLE_LAUNCHER_VARS = ("ACCELERATE_USE_CPU", "ACCELERATE_DYNAMO_BACKEND")

_installed = False


def launched_alone():
    """True when `accelerate launch` was asked for several processes but started only this one: its simple launcher
    (--cpu, or no --multi_gpu) exports MASTER_ADDR/MASTER_PORT for --num_processes > 1 but no WORLD_SIZE or RANK."""
    env = os.environ
    return (all(name in env for name in SIMPLE_LAUNCHER_VARS) and "MASTER_PORT" in env
            and not any(env.get(name, "").strip() for name in SIZE_VARS))


def _cuda():
    """Whether this process trains on a GPU: CUDA usable, and not turned off by --device cpu (devices.choose sets
    fastai's default device before setup() runs)."""
    return torch.cuda.is_available() and defaults.use_cuda is not False


def setup():
    """Prepare this process for data-parallel training; call it once, first, before any DataLoaders, Learner or
    Accelerator is made. Returns the number of processes (1: nothing was changed).

    With several processes: makes the MPI names visible under torch's (fastai reads only WORLD_SIZE/RANK), selects
    this process's GPU (so fastai's default device, hence the DataLoaders and batch transforms, are on it), or on a
    machine without CUDA sets ACCELERATE_USE_CPU=1 (gloo; accelerate reads it when the first Accelerator is made, so
    it cannot be passed later), and installs the device-aware fixes to fastai's DistributedDL.
    Raises UserError for an `accelerate launch` that asked for several processes but started one."""
    global _installed
    world = world_size()
    if world == 1:
        if launched_alone():
            script = Path(sys.argv[0]).name or "run.py"
            raise UserError(
                "accelerate launch started 1 process, not the several asked for (without --multi_gpu, e.g. with --cpu, it "
                "starts one), so this would train alone; use `torchrun --nproc_per_node N "
                f"{script} ...` or `accelerate launch --multi_gpu --num_processes N {script} ...` (both work on the CPU "
                "too), or unset MASTER_PORT to train in one process")
        return 1
    for names, value in ((SIZE_VARS, world), (RANK_VARS, rank()), (LOCAL_RANK_VARS, local_rank()),
                         (LOCAL_SIZE_VARS, local_world_size())):
        os.environ.setdefault(names[0], str(value))
    if PartialState._shared_state and not _installed:
        raise RuntimeError("distributed.setup() must run before the first Accelerator() is made")
    if _cuda():
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
    else:
        os.environ["ACCELERATE_USE_CPU"] = "1"
    _install_fixes()
    _installed = True
    return world


def per_process_bs(bs, world=None):
    """The batch size each process loads for a recipe's batch size `bs`, which is the GLOBAL batch: each of the N
    processes takes bs/N, so that one optimizer step still averages over `bs` images and the recipe's learning rates
    (and its number of steps per epoch) mean the same on 1 GPU or 8. (fastai's DistributedDL does not divide: each
    process would load a whole `bs`.) Raises UserError when `bs` does not divide by the number of processes."""
    world = world_size() if world is None else world
    if bs % world:
        raise UserError(f"--bs {bs} does not divide by {world} processes; the batch size is the global batch, shared "
                        f"out among the processes: pass a multiple of {world}")
    return bs // world


@contextlib.contextmanager
def context(learn, sync_bn=False):
    """While inside, `learn` trains data-parallel: fastai's `learn.distrib_ctx` (DDP through accelerate; every fit
    wraps the model and the DataLoaders, each process takes its 1/N share of every epoch, gradients are averaged,
    losses and metrics gathered); a null context in one process.

    `sync_bn=True` computes BatchNorm statistics over the global batch, as one GPU would with the whole batch (worth
    it when the per-process batch is small, at the cost of one all-reduce per BatchNorm layer); CUDA only, it does not
    exist on the CPU. The model is converted here with timm's converter, not by fastai: fastai uses torch's, which
    turns timm's BatchNormAct2d (EfficientNet, ...) into a plain SyncBatchNorm that silently drops its activation.
    The optimizer is made first, since fastai finds the BatchNorm layers that train in frozen stages by their type."""
    if world_size() <= 1:
        yield learn
        return
    if not _installed:
        raise RuntimeError("call distributed.setup() at the start of the script, before the DataLoaders and the Learner")
    if sync_bn and _cuda():
        sync_batchnorm(learn)
    with learn.distrib_ctx(sync_bn=False):
        yield learn


def sync_batchnorm(learn):
    """Turn every BatchNorm of `learn.model` into its synchronized variant, in place, keeping the same parameters (the
    optimizer's state stays valid); the same model in eval mode and in one process."""
    if learn.opt is None:
        learn.create_opt()  # while the BatchNorm layers still have the types fastai recognises (train_bn)
    learn.model = convert_sync_batchnorm(learn.model)
    return learn


@contextlib.contextmanager
def local():
    """fastai on this process alone while inside: outside `context()` fastai still gathers every prediction and loss
    across processes whenever WORLD_SIZE > 1 (`to_detach` -> `maybe_gather` -> all_gather), so `learn.get_preds` on
    rank 0 alone would wait forever for the others. Use it for work only the main process does (scoring the test set)."""
    saved = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("WORLD_SIZE", None)
        else:
            os.environ["WORLD_SIZE"] = saved


def _group():
    """torch.distributed when a process group is up, else None."""
    return dist if dist.is_available() and dist.is_initialized() else None


def barrier():
    """Wait until every process gets here (e.g. rank 0 has written a file the others read); nothing in one process."""
    dist = _group()
    if world_size() > 1 and dist is not None:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def teardown():
    """Close the process group at the end of a script (torch warns when a process exits with one open)."""
    dist = _group()
    if dist is not None:
        dist.destroy_process_group()


def seed_per_rank(seed):
    """Seed `random`, numpy and torch with `seed` + rank, so that each process draws its own augmentations (with one
    seed for all, rank r's k-th image of every batch gets the same flip, rotation, crop... as rank 0's). Call it after
    the DataLoaders are made (fastai's RandomSplitter re-seeds torch with the split seed) and before fitting; the
    models need not start equal, DDP copies rank 0's weights to every process at the start of every fit.
    Nothing in one process."""
    if world_size() > 1:
        set_seed(seed + 1_000_003 * rank())


def unwrap(model):
    """The model itself, also while `context()` has it wrapped in DistributedDataParallel (whose state_dict keys start
    with 'module.'): save `unwrap(learn.model).state_dict()` in callbacks that run during a fit."""
    return getattr(model, "module", model)


def _collective_device(fallback=None):
    """Where a tensor must be for a collective: CPU for gloo and mpi, the current GPU for nccl."""
    dist = _group()
    backend = str(dist.get_backend()) if dist is not None else "gloo"
    if backend in ("gloo", "mpi") or "cpu:gloo" in backend:
        return torch.device("cpu")
    if backend == "nccl" or torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return fallback if fallback is not None else torch.device("cpu")


def _broadcast(self, t, rank):
    "Broadcasts list `t` from rank `rank` to all ranks on the process group's device; returns it as a list on every rank."
    tensor = torch.tensor(list(t), dtype=torch.long, device=_collective_device(getattr(self, "device", None)))
    _group().broadcast(tensor, rank)
    return tensor.cpu().tolist()


def _len(self):
    "Batches this rank really yields: its ceil(n/N) share of the (padded) epoch, batched with the loader's drop_last."
    n = self.dl.n
    if n is None:
        raise TypeError("a DistributedDL needs a dataset of known length")
    share = math.ceil(n / self.world_size)
    if not self.bs:
        return share
    return share // self.bs if self.drop_last else math.ceil(share / self.bs)


def _install_fixes():
    DistributedDL._broadcast = _broadcast
    DistributedDL.__len__ = _len
