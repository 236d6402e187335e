"""The command lines' shared parts: the flags spelled the same way in every script, and `run`, which ends a script
with one `error:` line and its exit status instead of a traceback."""
import argparse
import errno
import sys
import warnings
from pathlib import Path

from finegrained.errors import UserError
from finegrained.files import disk_full
from finegrained.ranks import is_main


def run(main):
    """Call `main()`, turning a UserError into `error: ...` on stderr and a non-zero exit."""
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)  # raised by fastai's import
    warnings.filterwarnings("ignore", message="Your generator is empty")  # fastprogress, on an empty validation set
    try:
        main()
    except UserError as err:
        if is_main():  # data-parallel: every process stops alike; one says why
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


def add_recipe(p, resume=True):
    own = "; with --resume, the run's own" if resume else ""
    p.add_argument("--recipe", default=None,
                   help="a recipe under recipes/ by name, a .toml file, or a run's config.json to run it again "
                        f"(default: fastai_resnext50, the published recipe{own})")


def add_weights(p):
    p.add_argument("--weights", default=None,
                   help="local backbone weights file (.pth or .safetensors) to use instead of downloading")


def add_workers(p):
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes (default: the CPU cores this process may use, at most 16)")


def add_device(p, refuses=False):
    """--device, the same in every script that runs a model (devices.choose reads it)."""
    cost = (" and refuses a run estimated to take over an hour there (the estimate is printed; --device cpu runs it "
            "anyway)") if refuses else ""
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help=f"where the model runs: auto uses the GPU when CUDA is usable, else the CPU{cost}; cuda stops "
                        "in one line saying why when CUDA is not usable; cpu uses the CPU even on a GPU machine")
