"""Where a script runs its model, chosen in one place for every script (`--device auto|cuda|cpu`, cli.add_device):
why CUDA is not usable when it is not, the precision training really uses, and what a recipe would cost on the CPU
before `auto` lets it start there.

    device = devices.choose(args.device)               # "cuda" or "cpu"; fastai's default device follows it
    devices.check_cpu_time(args.device, device, recipe, n_train, n_test)   # auto: refused past an hour on the CPU
    description, precision = devices.prepare(learn, device)               # bf16/fp16 + channels-last on a GPU

fastai picks the device through `fastai.torch_core.default_device`; choose() sets it, so the DataLoaders, the batch
transforms and the Learner (its TrainEvalCallback moves the model to the DataLoaders' device) all follow."""
import os
import shutil
import sys
import time
from pathlib import Path

from finegrained.errors import UserError

DEVICES = ("auto", "cuda", "cpu")
CPU_LIMIT_SECONDS = 3600         # `--device auto` refuses a recipe estimated to take longer than this on the CPU
# The project's training ran at 0.83 of the model-alone speed on the CPU (data loading and fastai's batch augmentation
# share its cores; benchmarks/README.md, resnet18 at 128 px on 2 cores): the measured model step is divided by it.
PIPELINE_SHARE = 0.83
README_DRIVER = "README.md, section 'GPU: the NVIDIA driver the pinned torch needs'"
MIN_DRIVER = {"13": 580, "12": 525, "11": 450}   # Linux driver for each CUDA major version (NVIDIA's compatibility table)


def gpu_evidence():
    """What suggests an NVIDIA GPU is installed even when torch cannot use it ('' for nothing): its device file
    or the driver's nvidia-smi on PATH."""
    found = [p for p in ("/dev/nvidia0",) if Path(p).exists()]
    if shutil.which("nvidia-smi"):
        found.append("nvidia-smi on PATH")
    return " and ".join(found)


def cuda_problem():
    """None when CUDA is usable; otherwise why not, in a sentence: torch's own reason (a build without CUDA, no driver,
    a driver too old, GPUs hidden by CUDA_VISIBLE_DEVICES), and when a GPU seems present, the likely fix."""
    import torch
    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={hidden!r} hides every GPU"
    try:  # is_available() only says no; initializing says why
        torch.cuda.init()
        why = "torch.cuda.is_available() is False"
    except Exception as err:  # torch raises RuntimeError or AssertionError with the driver's reason
        text = str(err).strip()
        why = text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(err).__name__  # its first sentence
    evidence = gpu_evidence()
    if evidence:
        major = torch.version.cuda.split(".")[0]
        need = f" (>= {MIN_DRIVER[major]} on Linux)" if major in MIN_DRIVER else ""
        why += (f"; a GPU seems present ({evidence}), so the NVIDIA driver is likely older than the CUDA "
                f"{torch.version.cuda} build of torch {torch.__version__} needs{need}: update the driver or install a "
                f"torch build for yours ({README_DRIVER})")
    return why


def choose(requested="auto", say=print):
    """'cuda' or 'cpu' for `--device requested`, made fastai's default device. `cuda` where CUDA is not usable is one
    line (UserError) saying why; `auto` then falls back to the CPU, and says why when a GPU seems present."""
    from fastai.torch_core import default_device
    if requested not in DEVICES:
        raise UserError(f"--device {requested}: choose one of {', '.join(DEVICES)}")
    problem = None if requested == "cpu" else cuda_problem()
    if requested == "cuda" and problem:
        raise UserError(f"--device cuda: CUDA is not usable here: {problem}")
    if requested == "auto" and problem and gpu_evidence():
        say(f"warning: CUDA is not usable, so the CPU is used: {problem}", file=sys.stderr)
    device = "cuda" if requested != "cpu" and not problem else "cpu"
    default_device(device == "cuda")  # sets fastai's defaults.use_cuda: False keeps even a GPU machine on the CPU
    return device


def precision(device):
    """The floating-point format training uses on `device`: bf16 or fp16 mixed precision on a GPU, fp32 on the CPU."""
    import torch
    if device != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def prepare(learn, device):
    """Set `learn` up for `device`: on a GPU cuDNN's autotuner, bf16 (fp16 where bf16 is missing) mixed precision and
    channels-last; on the CPU plain fp32. Returns (a description for the run's first line, the precision)."""
    import torch
    used = precision(device)
    if device == "cuda":
        from fastai.torch_core import setup_cuda
        setup_cuda(benchmark=True)  # cuDNN picks the fastest kernels for the recipe's fixed image sizes
        learn.to_channelslast(amp_mode=used)
        return f"GPU {torch.cuda.get_device_name()}, {used} mixed precision, channels-last", used
    return "CPU, fp32", used


def duration(seconds):
    """'45 s', '12 min', '3.4 h', '1108 h': a time as a person reads it."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    hours = seconds / 3600
    return f"{hours:.1f} h" if hours < 10 else f"{hours:.0f} h"


def measure_step_seconds(recipe, n_classes, size, bs=32, repeats=2):
    """Seconds per image of a training step of the recipe's model on this CPU, measured rather than looked up so that
    any architecture and any CPU get their own figure: forward and backward on random images at `size`, as many as
    hold the pixels of two 224 px images (2 at 224 px, more at small sizes, where one call's overhead would otherwise
    count as the images' cost; at most a batch of `bs`), plus an AdamW step shared by a batch of `bs` (the optimizer's
    cost is per step, not per image); after a warm-up step, the fastest of `repeats` (other work on a shared machine
    only slows a step). Random weights cost what ImageNet's do; torch's random state is left as it was."""
    import torch
    from finegrained.models import build_model, head_options
    images = max(2, min(bs, round(2 * (224 / size) ** 2)))
    with torch.random.fork_rng(devices=[]):
        model = build_model(recipe["arch"], n_classes, pretrained=False, head=recipe["head"],
                            head_options=head_options(recipe)).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(images, 3, size, size)

        def step():
            started = time.perf_counter()
            out = model(x)
            loss = sum(o.float().mean() for o in (out if isinstance(out, (tuple, list)) else (out,)))
            opt.zero_grad()
            loss.backward()
            passes = time.perf_counter()
            opt.step()
            return (passes - started) / images + (time.perf_counter() - passes) / bs
        step()
        return min(step() for _ in range(repeats))


def cpu_seconds(stages, n_train, n_test, valid_pct, per_image, measured_at):
    """The estimated CPU time of training `stages` [(epochs, size)] on n_train images, then scoring n_test.

    The model: a training step costs `per_image` seconds at `measured_at` px, scaled by pixel count (size²) for
    other sizes and divided by PIPELINE_SHARE for data loading and augmentation; validation and scoring images cost a
    third (a forward pass alone). Frozen stages are counted at the full cost, an overestimate for them."""
    def cost(size):
        return per_image * (size / measured_at) ** 2
    fit, held = n_train * (1 - valid_pct), n_train * valid_pct
    train = sum(epochs * (fit * cost(size) / PIPELINE_SHARE + held * cost(size) / 3) for epochs, size in stages)
    return train + n_test * cost(stages[-1][1]) / 3 if stages else 0.0


def check_cpu_time(requested, device, recipe, stages, n_train, n_test, n_classes, measure=measure_step_seconds):
    """On the CPU under `--device auto`: the recipe's estimated time (cpu_seconds, with a step measured here), refused
    in one line past CPU_LIMIT_SECONDS; returns it as a short phrase for the run's first line ('' on a GPU or under an
    explicit --device cpu, where nothing is measured). `stages`: [(epochs, size)] still to train."""
    if device != "cpu" or requested != "auto" or not stages:
        return ""
    at = min(size for _, size in stages)
    per_image = measure(recipe, n_classes, at, bs=min(s["bs"] for s in recipe["stages"]))
    seconds = cpu_seconds(stages, n_train, n_test, recipe["valid_pct"], per_image, at)
    epochs, sizes = sum(e for e, _ in stages), sorted({s for _, s in stages})
    what = (f"{n_train} training images x {epochs} epochs at {'-'.join(map(str, sizes))} px with {recipe['arch']}, "
            f"{per_image:.3g} s per image measured at {at} px")
    if seconds > CPU_LIMIT_SECONDS:
        raise UserError(f"--device auto: no usable GPU ({cuda_problem() or 'none found'}), and on this CPU the run would "
                        f"take about {duration(seconds)} ({what}), more than the {CPU_LIMIT_SECONDS // 60} min "
                        "--device auto allows there; pass --device cpu to train on the CPU anyway, or make the run "
                        "shorter (--epochs, --sizes, a smaller --arch)")
    return f"estimated {duration(seconds)} on this CPU ({what})"
