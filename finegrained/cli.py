"""The command lines' shared parts: the flags spelled the same way in every script, and `run`, which ends a script
with one `error:` line and its exit status instead of a traceback."""
import argparse
import errno
import os
import sys
import warnings
from pathlib import Path

from finegrained.errors import UserError
from finegrained.files import disk_full


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


def add_regularization(p):
    p.add_argument("--mixup-alpha", type=float, default=None, metavar="A",
                   help=f"mixup on training batches, Beta(A, A); 0 turns it off (default: {FROM_RECIPE}, 0)")
    p.add_argument("--cutmix-alpha", type=float, default=None, metavar="A",
                   help=f"cutmix on training batches, Beta(A, A); 0 turns it off (default: {FROM_RECIPE}, 0)")
    p.add_argument("--ema-decay", type=float, default=None, metavar="D",
                   help="validate, score and save an exponential moving average of the weights (ema = D x ema + "
                        f"(1 - D) x weights each step); 0 turns it off (default: {FROM_RECIPE}, 0)")
    p.add_argument("--auto-augment", choices=["none", "trivialaugment", "randaugment"], default=None,
                   help=f"torchvision's TrivialAugmentWide or RandAugment on training images (default: {FROM_RECIPE}, none)")
    p.add_argument("--drop-path-rate", type=float, default=None, metavar="P",
                   help=f"stochastic depth of a timm backbone (default: {FROM_RECIPE}, 0)")


def add_device(p, refuses=False):
    """--device, the same in every script that runs a model (devices.choose reads it)."""
    cost = (" and refuses a run estimated to take over an hour there (the estimate is printed; --device cpu runs it "
            "anyway)") if refuses else ""
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help=f"where the model runs: auto uses the GPU when CUDA is usable, else the CPU{cost}; cuda stops "
                        "in one line saying why when CUDA is not usable; cpu uses the CPU even on a GPU machine")
