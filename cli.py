"""Plumbing shared by every script: the flags spelled the same way everywhere, the one error
type that ends a run with a single clear line instead of a traceback, and atomic file writes."""
import argparse
import contextlib
import errno
import fcntl
import os
import shutil
import sys
import warnings
from pathlib import Path


class UserError(Exception):
    """Bad input from the user (a path, a file, a value): printed as one line, exit status 2."""
    status = 2

    def __init__(self, message):
        super().__init__(message)
        self.message = str(message)

    def __str__(self):  # the line as raised, even after fastai prefixes the args of an error inside a callback
        return self.message


class RunFailed(UserError):
    """The run itself went wrong (training diverged): printed as one line, exit status 1."""
    status = 1


def disk_full(folder):
    """The one line for ENOSPC: which folder, and how much room is left there."""
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free"
    except OSError:
        free = "free space unknown"
    return f"{folder}: no space left on device ({free}); free some space and run again (--resume continues a run)"


@contextlib.contextmanager
def atomic(path):
    """Yield a temporary path beside `path` to write to; it becomes `path` only if the block completes,
    so a file under its final name is always whole and nothing there is lost to a crash. The temporary
    name holds the process id, so two processes never write into each other's file; a full disk is one line."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise UserError(f"{disk_full(path.parent)}; {path.name} was left as it was") from None
        raise
    finally:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()


@contextlib.contextmanager
def folder_lock(folder):
    """Hold `folder` for this process alone while the block runs; another process gets one line naming the holder.
    An flock is released by the kernel when its process dies, so a killed run leaves no stale lock to clear by hand
    (a bare O_EXCL file would); the PID is written into the file only to name the holder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise UserError(f"{folder}: in use by another run (process {holder}); wait for it to end, "
                            "or choose another --out")
        try:
            same = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its last holder unlinked while we waited to lock it
            break
        f.close()
    try:
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield
    finally:
        path.unlink(missing_ok=True)
        f.close()


def run(main):
    """Call `main()`, turning a UserError into `error: ...` on stderr and a non-zero exit."""
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)  # raised by fastai's import
    warnings.filterwarnings("ignore", message="Your generator is empty")  # fastprogress, on an empty validation set
    try:
        main()
    except UserError as err:
        if os.environ.get("RANK", "0") == "0":  # data-parallel: every process stops alike; one says why
            print(f"error: {err}", file=sys.stderr)
        sys.exit(err.status)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        print(f"error: {disk_full(Path(err.filename).parent if err.filename else Path.cwd())}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def int_list(text):
    """'20,40,40' -> [20, 40, 40] for argparse."""
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def float_list(text):
    """'1e-2,3e-3' -> [0.01, 0.003] for argparse."""
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the docstring's layout and shows each default that says something."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def parser(description):
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)


def add_data(p, default="data/stanford_cars"):
    p.add_argument("--data", default=default,
                   help="prepared dataset folder holding train.csv and test.csv (see data.py)")


FROM_RECIPE = "from the recipe"


def add_recipe(p):
    p.add_argument("--recipe", default=None,
                   help="a recipe under recipes/ by name, a .toml file, or a run's config.json to run it again "
                        "(default: fastai_resnext50, the published recipe; with --resume, the run's own)")


def add_model_choice(p):
    p.add_argument("--arch", default=None,
                   help=f"backbone: a torchvision ResNet/ResNeXt name or any timm model name (default: {FROM_RECIPE})")
    p.add_argument("--head", default=None,
                   help="concat (fastai's: avg+max pool, two linear layers), linear (torchvision's: average pool, one "
                        "linear layer), bilinear (B-CNN: outer product pooling) or localize (concat plus a box head "
                        f"trained jointly; needs boxes) (default: {FROM_RECIPE})")
    p.add_argument("--bilinear-dim", type=int, default=None, metavar="CH",
                   help="--head bilinear: channels of the 1x1 reduction before the outer product; 0 for none "
                        f"(default: {FROM_RECIPE}, 512)")
    p.add_argument("--box-loss", choices=["smoothl1", "giou"], default=None,
                   help=f"--head localize: the box loss, on boxes in the input frame (default: {FROM_RECIPE}, smoothl1)")
    p.add_argument("--box-lambda", type=float, default=None, metavar="L",
                   help=f"--head localize: loss = class loss + L x box loss (default: {FROM_RECIPE}, 1.0)")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                   help=f"start from ImageNet weights, or (--no-pretrained) from random weights (default: {FROM_RECIPE})")
    p.add_argument("--weights", default=None,
                   help="local backbone weights file (.pth or .safetensors) to use instead of downloading")


def add_common_training(p):
    p.add_argument("--valid-pct", type=float, default=None,
                   help=f"fraction of train held out for validation; 0 trains on all of train (default: {FROM_RECIPE})")
    p.add_argument("--seed", type=int, default=None, help=f"random seed for the split and the run (default: {FROM_RECIPE})")
    p.add_argument("--crop-bbox", action=argparse.BooleanOptionalAction, default=None,
                   help=f"crop every image to its bounding box (with a margin) before resizing (default: {FROM_RECIPE})")
    p.add_argument("--balance", action=argparse.BooleanOptionalAction, default=None,
                   help=f"sample training classes evenly, oversampling rare ones (default: {FROM_RECIPE})")
    p.add_argument("--loss", choices=["ce", "smooth", "focal"], default=None,
                   help=f"cross-entropy, label-smoothing cross-entropy (0.1) or focal loss (gamma 2) (default: {FROM_RECIPE})")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes (default: all CPU cores, at most 16)")
