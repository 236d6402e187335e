"""Recipes: a write-up's training system as data.

`Recipe` (run-wide keys) and `Stage` (one fit) below are the one place a recipe key is declared: its type, default,
choices or interval, what it does, and whether run.py, train.py, lr_find.py and models.py take it as a flag
(`add_flags` makes those flags; recipes/README.md's key tables are `key_tables()`). A recipe is a TOML file under
recipes/ (or the `recipe` of a run's config.json) that fills them: run-wide keys and a list of [[stages]]. `load`
reads one by name or path; `resolve` fills in the defaults, applies the command line's overrides and checks every
value, and returns the recipe as config.json holds it (`dataclasses.asdict` of a Recipe), so that the scripts only
read a recipe and adding a write-up's system means adding a file.

This module imports neither torch nor fastai: every script's --help is built from it."""
import argparse
import copy
import dataclasses
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from finegrained.cli import float_list, int_list
from finegrained.errors import UserError

RECIPES = Path(__file__).resolve().parent.parent / "recipes"  # the checkout's recipes/, beside the scripts
DEFAULT = "fastai_resnext50"
# the recipes' resize names -> fastai's ResizeMethod values: the one resize vocabulary. fastai spells squash "squish",
# and takes any other string as a crop without a word: Resize(method="squash") silently centre-cropped until this mapping
RESIZE = {"crop": "crop", "squash": "squish", "pad": "pad"}
# the torchvision backbones by name (models.py cuts them itself); any other name is timm's
TORCHVISION_ARCHS = {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                     "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"}
ALIASES = {
    "resnext50": "resnext50_32x4d", "resnext101": "resnext101_32x8d",
    # pretrainedmodels (Cadene) names -> timm ports of those weights
    "se_resnet50": "legacy_seresnet50", "se_resnet101": "legacy_seresnet101", "se_resnet152": "legacy_seresnet152",
    "se_resnext50_32x4d": "legacy_seresnext50_32x4d", "se_resnext101_32x4d": "legacy_seresnext101_32x4d",
    "senet154": "legacy_senet154", "xception": "legacy_xception", "inceptionv4": "inception_v4",
    "inceptionresnetv2": "inception_resnet_v2",
}


def key(default, doc, *, choices=(), within=None, flag=False, metavar=None):
    """A recipe key's declaration. `doc`: what it does (markdown: recipes/README.md and --help); `within`: an interval
    such as "[0, 1)" or "(0, inf)" (every number is also at least 0); `flag`: True gives run-wide keys a flag of their
    own name, and a stage key the name of its flag ("sizes"); a stage flag takes one value per stage (or per run of
    stages sharing one), except --wd, whose one value sets every stage."""
    return field(default=default, metadata={"doc": doc, "choices": tuple(choices), "within": within, "flag": flag,
                                            "metavar": metavar})


@dataclass
class Stage:
    """One fit of a recipe: a [[stages]] table (a stage key at the recipe's top level is the default of every stage)."""
    name: str = key(None, "shown in history.csv and the logs (default: `stage<N>`)")
    epochs: int = key(1, "epochs (0 skips the stage)", flag="epochs")
    size: int = key(224, "image size (pixels)", within="[8, inf)", flag="sizes")
    bs: int = key(32, "batch size (the global batch under data-parallel training)", within="[1, inf)", flag="bs")
    lr: float = key(1e-3, "max learning rate of the head (for 256 images under `lr_rule = \"linear\"`; `run.py --show` "
                          "prints the rate trained at); each earlier parameter group gets it / `lr_div`", flag="lr")
    lr_div: float = key(1.0, "each earlier parameter group gets the next group's rate divided by this (3 in "
                             "`fastai_resnext50`)", within="(0, inf)")
    opt: str = key("adam", "`adam` (fastai's Adam with decoupled weight decay: AdamW) or `sgd` (momentum, L2 weight "
                           "decay as `torch.optim.SGD`)", choices=("adam", "sgd"))
    mom: float = key(0.9, "momentum (Adam's beta1; one-cycle cycles it)", within="[0, 1)")
    sqr_mom: float = key(0.99, "Adam's beta2 (fastai's default; torch's is 0.999)", within="[0, 1)")
    eps: float = key(1e-5, "Adam's eps (fastai's default; torch's is 1e-8, Keras's 1e-7)", within="(0, inf)")
    wd: float = key(0.0, "weight decay", flag="wd")
    schedule: str = key("one_cycle", "`one_cycle`, `step` (x `step_gamma` every `step_every` epochs), `cosine` (to 0 "
                                     "over the stage), `flat`, `flat_cos`",
                        choices=("one_cycle", "step", "cosine", "flat", "flat_cos"))
    warmup_pct: float = key(0.0, "`cosine` only: the share of the stage over which the rate first rises linearly from "
                                 "0 to `lr`; the cosine then runs over the rest", within="[0, 1)")
    pct_start: float = key(0.25, "one-cycle (fastai's `fit_one_cycle`): the share of the stage before the peak",
                           within="(0, 1)")
    div: float = key(25.0, "one-cycle: it starts at lr / `div`", within="(0, inf)")
    div_final: float = key(1e5, "one-cycle: it ends at lr / `div_final`", within="(0, inf)")
    step_every: int = key(1, "`step`: epochs between drops")
    step_gamma: float = key(0.1, "`step`: the factor each drop multiplies the rate by", within="(0, 1]")
    train: str = key("all", "`frozen` (body frozen; BatchNorm trains unless `train_bn = false`), `all`, `reinit` "
                            "(re-initialize the backbone's last `blocks` blocks when the stage starts and train them "
                            "with the head, the rest frozen)", choices=("frozen", "all", "reinit"))
    blocks: int = key(0, "for `train = \"reinit\"`: how many of the backbone's last blocks")
    patience: int = key(0, "early stopping: end the stage after this many epochs without a better validation loss; "
                           "needs `valid_pct`")


@dataclass
class Recipe:
    """A recipe's run-wide keys and its stages."""
    name: str = key("recipe", "the recipe's name (default: its file's)")
    arch: str = key("resnext50_32x4d", "backbone: a torchvision ResNet/ResNeXt name or any timm model name", flag=True)
    pretrained: bool = key(True, "start from ImageNet weights, or (`--no-pretrained`) from random weights", flag=True)
    head: str = key("concat", "`concat` (fastai's: avg+max pool, two linear layers), `linear` (torchvision's: average "
                              "pool, one linear layer), `bilinear` (B-CNN: outer product pooling) or `localize` "
                              "(concat plus a box head trained jointly; needs boxes)", flag=True)
    bilinear_dim: int = key(512, "`head = \"bilinear\"`: channels of the 1x1 reduction before the outer product; 0 for "
                                 "none", flag=True, metavar="CH")
    box_loss: str = key("smoothl1", "`head = \"localize\"`: the box loss, on boxes in the input frame",
                        choices=("smoothl1", "giou"), flag=True)
    box_lambda: float = key(1.0, "`head = \"localize\"`: loss = class loss + box_lambda x box loss", flag=True,
                            metavar="L")
    loss: str = key("ce", "`ce` (cross-entropy), `smooth` (label smoothing: `label_smoothing`) or `focal` (gamma 2)",
                    choices=("ce", "smooth", "focal"), flag=True)
    label_smoothing: float = key(0.1, "`loss = \"smooth\"`: the share of each target spread evenly over the classes "
                                      "(fastai's `LabelSmoothingCrossEntropy` eps; mixup's soft targets follow it)",
                                 within="[0, 1)", flag=True, metavar="EPS")
    valid_pct: float = key(0.0, "the share of train held out for validation (needed by early stopping); 0 trains on "
                                "all of train", within="[0, 1)", flag=True)
    seed: int = key(42, "random seed of the validation split and the run", flag=True)
    resize: str = key("crop", "fastai's `Resize` method: `crop` (random crop in training, centre when scoring), "
                              "`squash` (the whole image, stretched: fastai's `squish`), `pad`", choices=tuple(RESIZE))
    crop_pct: float = key(1.0, "below 1: resize to size / crop_pct, then crop `size`: random in training, the centre "
                               "when scoring (timm's convention; `resnet50_448_ls`: 0.875 = 448 of 512)", within="[0.1, 1]")
    crop_bbox: bool = key(False, "crop every image to its bounding box grown by `bbox_margin` before resizing",
                          flag=True)
    bbox_margin: float = key(0.16, "`crop_bbox`: the share of the box's size added on every side; 0 crops to the "
                                   "tight box", within="[0, 1]", flag=True)
    balance: bool = key(False, "sample a class uniformly, then an image of it (fastai's `WeightedDL`)", flag=True)
    augment: str = key("fastai", "`fastai` (`aug_transforms()`), `flip_crop` (horizontal flip + a random crop of an "
                                 "8 px padded image), `rrc_flip` (torchvision's `RandomResizedCrop(size)`, scale "
                                 "0.08-1, + horizontal flip), `none`", choices=("fastai", "flip_crop", "rrc_flip", "none"))
    wd_bn_bias: bool = key(False, "weight decay on BatchNorm and bias tensors too (fastai v2 exempts them; "
                                  "`torch.optim` and fastai v1 do not)", flag=True)
    train_bn: bool = key(True, "BatchNorm trains (weights and running statistics) inside a frozen body; false keeps "
                               "them fixed (fastai's `BnFreeze`)", flag=True)
    lr_rule: str = key("none", "`linear`: every stage trains at `lr` x `bs` / 256, so `lr` is the rate for 256 images",
                       choices=("none", "linear"), flag=True)
    mixup_alpha: float = key(0.0, "mixup's Beta(alpha, alpha) on training batches (timm's `Mixup`, batch mode: each "
                                  "batch mixed with itself reversed), trained on soft targets with timm's "
                                  "`SoftTargetCrossEntropy` (the `smooth` loss's `label_smoothing` folded in); needs `loss` `ce` or "
                                  "`smooth`, an even `bs` and a classifying head; validation is untouched; 0 turns it off",
                             flag=True, metavar="A")
    cutmix_alpha: float = key(0.0, "cutmix's Beta(alpha, alpha) on training batches; 0 turns it off; with mixup on "
                                   "too, each mixed batch takes one of them", flag=True, metavar="A")
    mixup_prob: float = key(1.0, "the share of training batches mixed at all (timm's `prob`)", within="[0, 1]")
    mixup_switch_prob: float = key(0.5, "with mixup and cutmix on: the share of mixed batches that take cutmix "
                                        "(timm's `switch_prob`)", within="[0, 1]")
    ema_decay: float = key(0.0, "validate, score and save an exponential moving average of the weights (timm's "
                                "`ModelEmaV3`: ema = D x ema + (1 - D) x weights after every step, BatchNorm statistics "
                                "too, through every stage): the model validated, scored, saved and kept in "
                                "`checkpoint.pth` for `--resume`; 0 turns it off",
                           within="[0, 1)", flag=True, metavar="D")
    auto_augment: str = key("none", "torchvision's `TrivialAugmentWide` (`trivialaugment`) or `RandAugment` "
                                    "(`randaugment`, 2 ops at magnitude 9) on each training image after the crop and flip; "
                                    "never on validation, test or scoring images; not with `head = \"localize\"`",
                            choices=("none", "trivialaugment", "randaugment"), flag=True)
    drop_path_rate: float = key(0.0, "stochastic depth of a timm backbone (`timm.create_model`'s `drop_path_rate`); "
                                     "torchvision's ResNets have none and refuse it (timm's ports, such as "
                                     "`resnet50.tv_in1k`, take it)",
                                within="[0, 1)", flag=True, metavar="P")
    stages: list = field(default_factory=list)


RUN_KEYS = {f.name: f for f in dataclasses.fields(Recipe) if f.name not in ("name", "stages")}
STAGE_KEYS = {f.name: f for f in dataclasses.fields(Stage)}
CHOICES = {name: f.metadata["choices"] for name, f in {**RUN_KEYS, **STAGE_KEYS}.items() if f.metadata["choices"]}
STAGE_FLAGS = {f.metadata["flag"]: name for name, f in STAGE_KEYS.items() if f.metadata["flag"]}  # sizes -> size
RUN_FLAGS = tuple(name for name, f in RUN_KEYS.items() if f.metadata["flag"])


def available():
    return sorted(p.stem for p in RECIPES.glob("*.toml"))


def load(spec=None):
    """(name, raw recipe dict) for a recipe name under recipes/, a .toml path, or a run's config.json."""
    spec = spec or DEFAULT
    path = Path(spec)
    if not path.suffix:
        path = RECIPES / f"{spec}.toml"
        if not path.is_file():
            raise UserError(f"unknown recipe {spec!r}: use one of {', '.join(available())}, or a .toml or config.json path")
    if not path.is_file():
        raise UserError(f"{path}: no such recipe file")
    try:
        if path.suffix == ".json":
            raw = json.loads(path.read_text()).get("recipe")
            if not isinstance(raw, dict):
                raise UserError(f"{path}: no 'recipe' in this JSON (pass a run's config.json)")
        else:
            raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a readable recipe ({err})")
    raw.setdefault("name", path.parent.name if path.name == "config.json" else path.stem)
    return str(path), raw


def _interval(within):
    """"[0, 1)" -> (0.0, 1.0, closed below, closed above); "(0, inf)" -> (0.0, inf, False, False)."""
    low_mark, low, high, high_mark = re.fullmatch(r"([\[(])([^,]+), *([^\])]+)([\])])", within).groups()
    return float(low), float(high), low_mark == "[", high_mark == "]"


def _interval_text(within):
    low, high, closed_low, _ = _interval(within)
    if math.isinf(high):
        return f"at least {low:g}" if closed_low else f"above {low:g}"
    return f"in {within}"


def _check(where, name, value, declared):
    """`value` for the key `declared` (a dataclass field), checked against its type, choices and interval."""
    meta, kind = declared.metadata, declared.type
    if meta["choices"] and value not in meta["choices"]:
        raise UserError(f"{where}: {name} {value!r} is not one of {', '.join(meta['choices'])}")
    if kind is str:
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: {name} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{where}: {name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise UserError(f"{where}: {name} must be a finite number, got {value!r}")
    if kind is int and value != int(value):
        raise UserError(f"{where}: {name} must be a whole number, got {value!r}")
    if value < 0:
        raise UserError(f"{where}: {name} must not be negative, got {value!r}")
    if meta["within"]:
        low, high, closed_low, closed_high = _interval(meta["within"])
        if not ((value >= low if closed_low else value > low) and (value <= high if closed_high else value < high)):
            raise UserError(f"{where}: {name} must be {_interval_text(meta['within'])}, got {value!r}")
    return kind(value)


def _fill(raw, where):
    """Defaults filled in and every value checked; stage keys at the top level are defaults for every stage."""
    unknown = sorted(set(raw) - set(RUN_KEYS) - set(STAGE_KEYS) - {"name", "stages"})
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r} (run-wide keys: {', '.join(RUN_KEYS)}; "
                        f"stage keys: {', '.join(STAGE_KEYS)})")
    stages = raw.get("stages")
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
        raise UserError(f"{where}: a recipe needs at least one [[stages]] table")
    shared = {k: raw[k] for k in STAGE_KEYS if k in raw and k != "name"}  # the recipe's name is not each stage's
    filled = []
    for i, stage in enumerate(stages, 1):
        bad = sorted(set(stage) - set(STAGE_KEYS))
        if bad:
            raise UserError(f"{where}: stage {i}: unknown key {bad[0]!r} (stage keys: {', '.join(STAGE_KEYS)})")
        merged = {**shared, **stage}
        values = {k: _check(f"{where}: stage {i}", k, merged.get(k, f.default), f) for k, f in STAGE_KEYS.items()}
        filled.append(Stage(**{**values, "name": str(values["name"] or f"stage{i}")}))
    run = {k: _check(where, k, raw.get(k, f.default), f) for k, f in RUN_KEYS.items()}
    return dataclasses.asdict(Recipe(name=str(raw.get("name", Recipe.name)), **run, stages=filled))


def _runs(values):
    """[[0, 1], [2]] for [224, 224, 299]: the runs of consecutive stages that share a value."""
    runs = []
    for i, v in enumerate(values):
        if runs and values[runs[-1][0]] == v:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _groups(flag, stages, count):
    """The stages each of a list flag's `count` values sets: one value per stage, or one per run of stages sharing
    a value in the recipe (so `--sizes 224,299` keeps its meaning for the stages of sizes 224, 224, 299). Epochs are
    always per stage."""
    runs = _flag_runs(flag, stages)
    if count == len(stages):
        return [[i] for i in range(len(stages))]
    if count == len(runs):
        return runs
    raise UserError(f"--{flag} takes {len(stages)} comma-separated values (one per stage){_runs_text(runs, stages)}, "
                    f"got {count}")


def _flag_runs(flag, stages):
    """The runs of stages one value of a shorter stage flag sets (epochs: each stage alone)."""
    name = STAGE_FLAGS[flag]
    return _runs([s[name] for s in stages]) if name != "epochs" else [[i] for i in range(len(stages))]


def _runs_text(runs, stages):
    shown = ", ".join(f"{r[0] + 1}-{r[-1] + 1}" if len(r) > 1 else f"{r[0] + 1}" for r in runs)
    return f" or {len(runs)} (one per run of stages sharing a value: {shown})" if len(runs) != len(stages) else ""


def _spread(flag, given, stages):
    """A stage flag's values onto the stages (`_groups`); --wd's one value onto every stage."""
    name = STAGE_FLAGS[flag]
    if not isinstance(given, list):
        given, groups = [given], [list(range(len(stages)))]
    else:
        try:
            groups = _groups(flag, stages, len(given))
        except UserError as err:
            raise UserError(f"{err}: {','.join(map(str, given))}")
    for value, group in zip(given, groups):
        value = _check(f"--{flag}", name, value, STAGE_KEYS[name])  # the checks a recipe file's values get
        for i in group:
            stages[i][name] = value


def _shown(value):
    return str(value).lower() if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)


def add_flags(parser, skip=()):
    """The recipe's flags, generated from Recipe's and Stage's keys, in a group of their own: each overrides its key
    in the recipe, and one left out gives nothing (None). --sizes, --bs and --lr take one value per stage or per run
    of stages sharing a value, --epochs one per stage, --wd one value for every stage. Each flag's help shows the
    published recipe's value (DEFAULT, resolved)."""
    group = parser.add_argument_group("recipe settings (each overrides the recipe's value)")
    published = _fill(load(DEFAULT)[1], DEFAULT)
    for name in RUN_FLAGS:
        if name in skip:
            continue
        declared = RUN_KEYS[name]
        flag, meta = f"--{name.replace('_', '-')}", declared.metadata
        kind = {"action": argparse.BooleanOptionalAction} if declared.type is bool else {
            "type": declared.type, "choices": meta["choices"] or None, "metavar": meta["metavar"]}
        group.add_argument(flag, default=None, **kind, help=f"{meta['doc'].replace('`', '')} (default: from the "
                                                            f"recipe; {DEFAULT}: {_shown(published[name])})")
    for flag, name in STAGE_FLAGS.items():
        if flag in skip:
            continue
        declared = STAGE_KEYS[name]
        shown = ",".join(_shown(s[name]) for s in published["stages"][:1 if flag == "wd" else None])
        rule = ("one value for every stage" if flag == "wd" else "one value per stage" if flag == "epochs"
                else "per stage or per run of stages sharing one")
        group.add_argument(f"--{flag}", default=None, help=f"{declared.metadata['doc'].replace('`', '')}, {rule} "
                                                           f"(default: from the recipe; {DEFAULT}: {shown})",
                           type=float if flag == "wd" else int_list if declared.type is int else float_list)


def overrides(args):
    """{key or stage flag: value} of the recipe settings the command line gives (flags left at None give nothing)."""
    names = [*RUN_FLAGS, *STAGE_FLAGS]
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


def resolve(raw, given=None, where="recipe"):
    """The fully resolved recipe: `raw` with defaults, then the overrides `given` (from `overrides`), checked."""
    recipe = _fill(copy.deepcopy(raw), where)
    for name, value in (given or {}).items():
        if name in RUN_KEYS:
            recipe[name] = _check(f"--{name.replace('_', '-')}", name, value, RUN_KEYS[name])
            if name == "head":
                _check_head(value, "--head")
        else:
            _spread(name, value, recipe["stages"])
    return check(recipe, where)


def _check_head(head, where):
    from finegrained.heads import HEADS
    if head not in HEADS:
        raise UserError(f"{where}: unknown head {head!r}: use one of {', '.join(HEADS)}")


def check(recipe, where):
    """What a recipe may not ask for, whatever its values one by one."""
    _check_head(recipe["head"], where)
    _check_regularization(recipe, where)
    live = [s for s in recipe["stages"] if s["epochs"] > 0]
    if not live:
        raise UserError(f"{where}: every stage has 0 epochs; nothing to train")
    for i, s in enumerate(recipe["stages"], 1):
        label = f"{where}: stage {i} ({s['name']})"
        if s["patience"] and not recipe["valid_pct"]:
            raise UserError(f"{label}: early stopping (patience {s['patience']}) needs a validation split; "
                            "set valid_pct (or --valid-pct), since the test set is never used to stop")
        if s["train"] == "reinit" and s["blocks"] < 1:
            raise UserError(f"{label}: train = 'reinit' needs blocks >= 1 (how many of the last blocks to re-initialize)")
        if s["train"] != "reinit" and s["blocks"]:
            raise UserError(f"{label}: blocks is only for train = 'reinit'")
        if s["schedule"] == "step" and s["step_every"] < 1:
            raise UserError(f"{label}: schedule 'step' needs step_every >= 1 (epochs between drops)")
        if s["warmup_pct"] and s["schedule"] != "cosine":
            raise UserError(f"{label}: warmup_pct is for schedule 'cosine' (one_cycle warms up by pct_start and div; "
                            f"this stage's schedule is {s['schedule']!r})")
        if mixes(recipe) and s["epochs"] and s["bs"] % 2:
            raise UserError(f"{label}: mixup/cutmix need an even bs (timm's Mixup mixes each image with the batch "
                            f"reversed), got {s['bs']}")
    return recipe


def mixes(recipe):
    """Whether a resolved recipe mixes its training batches (mixup or cutmix on)."""
    return recipe["mixup_alpha"] > 0 or recipe["cutmix_alpha"] > 0


def _check_regularization(recipe, where):
    """The combinations regularize.py cannot train, each as one line."""
    if mixes(recipe) and recipe["loss"] == "focal":
        raise UserError(f"{where}: mixup/cutmix train on mixed (soft) targets, which focal loss does not take: "
                        "use loss ce or smooth")
    if recipe["head"] == "localize" and (mixes(recipe) or recipe["auto_augment"] != "none"):
        what = "mixup/cutmix" if mixes(recipe) else f"auto_augment {recipe['auto_augment']}"
        raise UserError(f"{where}: head localize cannot train with {what}: its boxes would not follow the mixed "
                        "or transformed images")
    arch = ALIASES.get(recipe["arch"], recipe["arch"])
    if recipe["drop_path_rate"] and arch in TORCHVISION_ARCHS:
        raise UserError(f"{where}: drop_path_rate {recipe['drop_path_rate']:g} needs a timm backbone; torchvision's "
                        f"{arch} has no stochastic depth (timm's port of it has: --arch {arch}.tv_in1k)")


def trained_lr(stage, lr_rule="none"):
    """The head's peak learning rate a stage really trains at: its lr, scaled by bs / 256 under lr_rule "linear"."""
    return stage["lr"] * stage["bs"] / 256 if lr_rule == "linear" else stage["lr"]


def final_size(recipe):
    """The image size the finished model was last trained at: scoring and test.py use it."""
    return [s for s in recipe["stages"] if s["epochs"] > 0][-1]["size"]


def differences(run_recipe, source, run_given, given):
    """For --resume: the first command-line setting that differs from the run's recipe, as one line; else None.
    Each flag is applied as the run's own were, to the recipe file the run started from (`source`)."""
    for name, value in given.items():
        alone = resolve(source, {**run_given, name: value}, "the command line")
        if alone != run_recipe:
            if name in STAGE_FLAGS:
                key_name = STAGE_FLAGS[name]
                was = ",".join(f"{s[key_name]:g}" for s in run_recipe["stages"])
                now = ",".join(f"{s[key_name]:g}" for s in alone["stages"])
            else:
                was, now = run_recipe[name], alone[name]
            return f"--{name.replace('_', '-')} {now} differs from the run's {was}"
    return None


def describe(recipe):
    """The resolved recipe as a table a person can check against its write-up, and how the stage flags share out."""
    lines = [f"recipe {recipe['name']}"]
    width = max(map(len, RUN_KEYS))
    lines += [f"  {k:<{width}} {recipe[k]}" for k in RUN_KEYS]
    cols = ["name", "epochs", "size", "bs", "lr", "trained_lr", "lr_div", "opt", "mom", "wd", "schedule", "train", "blocks",
            "patience"]
    rows = [[str(c) for c in cols]]
    for s in recipe["stages"]:
        shown = {**s, "trained_lr": trained_lr(s, recipe["lr_rule"])}
        cells = [f"{shown[c]:g}" if isinstance(shown[c], float) else str(shown[c]) for c in cols]
        if s["schedule"] == "step":
            cells[cols.index("schedule")] = f"step/{s['step_every']}x{s['step_gamma']:g}"
        if s["schedule"] == "one_cycle":
            cells[cols.index("schedule")] = f"one_cycle(pct_start {s['pct_start']:g}, div {s['div']:g}, div_final {s['div_final']:g})"
        if s["warmup_pct"]:
            cells[cols.index("schedule")] = f"{s['schedule']}(linear warm-up {s['warmup_pct']:g})"
        if s["opt"] == "adam":
            cells[cols.index("opt")] = f"adam(sqr_mom {s['sqr_mom']:g}, eps {s['eps']:g})"
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines.append("stages:" + ("  (stages with 0 epochs are skipped)" if any(s["epochs"] == 0 for s in recipe["stages"]) else ""))
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append("stage flags: " + "; ".join(_flag_rule(flag, recipe["stages"]) for flag in STAGE_FLAGS if flag != "wd")
                 + "; --wd takes one value for every stage")
    return "\n".join(lines)


def _flag_rule(flag, stages):
    """How many values --flag takes for these stages: "--sizes 3 values (one per stage) or 2 (stages 1-2, 3)"."""
    runs = _flag_runs(flag, stages)
    return f"--{flag} {len(stages)} value{'s' if len(stages) > 1 else ''}{_runs_text(runs, stages)}"


def key_tables():
    """recipes/README.md's tables of keys, from Recipe and Stage (a test keeps the README equal to them)."""
    def table(keys):
        rows = ["| key | default | what it does |", "| --- | --- | --- |"]
        for name, declared in keys.items():
            default = json.dumps(declared.default) if declared.default is not None else "-"
            choices = f" (one of: {', '.join(f'`{c}`' for c in declared.metadata['choices'])})" if declared.metadata["choices"] else ""
            within = f" (in {declared.metadata['within']})" if declared.metadata["within"] else ""
            flag = declared.metadata["flag"]
            spelled = name.replace("_", "-") if flag is True else flag
            flag = (f"; flags `--{spelled}`, `--no-{spelled}`" if declared.type is bool else f"; flag `--{spelled}`") if flag else ""
            rows.append(f"| `{name}` | `{default}` | {declared.metadata['doc']}{choices}{within}{flag} |")
        return "\n".join(rows)
    return f"## Run-wide keys\n\n{table(RUN_KEYS)}\n\n## Stage keys\n\n{table(STAGE_KEYS)}\n"


if __name__ == "__main__":  # python -m finegrained.recipe: the tables recipes/README.md holds
    print(key_tables())
