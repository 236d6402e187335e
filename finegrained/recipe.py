"""Recipes: a write-up's training system as data.

A recipe is a TOML file under recipes/ (or the `recipe` of a run's config.json): run-wide settings
and a list of stages. `load` reads one by name or path; `resolve` fills in the defaults, applies
the command line's overrides and checks every value, so that run.py and lr_find.py only read a
recipe and adding a write-up's system means adding a file. Keys are documented in recipes/README.md."""
import copy
import json
import math
import tomllib
from pathlib import Path

from finegrained.errors import UserError

RECIPES = Path(__file__).resolve().parent.parent / "recipes"  # the checkout's recipes/, beside the scripts
DEFAULT = "fastai_resnext50"

RUN_DEFAULTS = {
    "arch": "resnext50_32x4d", "head": "concat", "pretrained": True, "loss": "ce", "valid_pct": 0.0, "seed": 42,
    "resize": "crop", "crop_pct": 1.0, "crop_bbox": False, "balance": False, "augment": "fastai",
    "bilinear_dim": 512,       # head bilinear: channels of the 1x1 reduction before the outer product (0: none)
    "box_loss": "smoothl1",    # head localize: smoothl1 or giou, on boxes in the input frame (-1..1)
    "box_lambda": 1.0,         # head localize: loss = class loss + box_lambda x box loss
    "bbox_margin": 0.16,       # crop_bbox: each box grown by this share of its size on every side (0: the tight box)
    "wd_bn_bias": False,       # weight decay on BatchNorm and bias tensors too (fastai v2 exempts them; torch and fastai v1 do not)
    "train_bn": True,          # BatchNorm trains (weights and running statistics) inside a frozen body
    "lr_rule": "none",         # linear: each stage trains at lr x bs / 256 (the recipe's lr is the rate for 256 images)
    # regularization from timm's and torchvision's ImageNet recipes (regularize.py), each off by default
    "mixup_alpha": 0.0,        # mixup's Beta(alpha, alpha) on training batches (0: off)
    "cutmix_alpha": 0.0,       # cutmix's Beta(alpha, alpha) (0: off); with both on, each batch takes one of them
    "mixup_prob": 1.0,         # the share of training batches mixed at all (timm's prob)
    "mixup_switch_prob": 0.5,  # with both on: the share of mixed batches that take cutmix (timm's switch_prob)
    "ema_decay": 0.0,          # an exponential moving average of the weights, validated, scored and saved (0: off)
    "auto_augment": "none",    # trivialaugment or randaugment (torchvision's) on training items
    "drop_path_rate": 0.0,     # stochastic depth of a timm backbone (timm.create_model's drop_path_rate)
}
STAGE_DEFAULTS = {
    "name": None, "epochs": 1, "size": 224, "bs": 32, "lr": 1e-3, "lr_div": 1.0, "opt": "adam", "mom": 0.9,
    "wd": 0.0, "schedule": "one_cycle", "step_every": 1, "step_gamma": 0.1, "train": "all", "blocks": 0, "patience": 0,
    "pct_start": 0.25, "div": 25.0, "div_final": 1e5,   # one_cycle's shape (fastai): peak at pct_start, from lr/div to lr/div_final
    "sqr_mom": 0.99, "eps": 1e-5,                      # adam: beta2 and eps (fastai's defaults; torch's are 0.999 and 1e-8)
    "warmup_pct": 0.0,                                 # cosine: the share of the stage the rate rises linearly from 0
}
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

# the recipes' resize names -> fastai's ResizeMethod values: the one resize vocabulary. fastai spells squash "squish",
# and takes any other string as a crop without a word: Resize(method="squash") silently centre-cropped until this mapping
RESIZE = {"crop": "crop", "squash": "squish", "pad": "pad"}
CHOICES = {
    "loss": ("ce", "smooth", "focal"), "resize": tuple(RESIZE),
    "augment": ("fastai", "flip_crop", "rrc_flip", "none"), "lr_rule": ("none", "linear"),
    "opt": ("adam", "sgd"), "schedule": ("one_cycle", "step", "cosine", "flat", "flat_cos"),
    "train": ("frozen", "all", "reinit"), "box_loss": ("smoothl1", "giou"),
    "auto_augment": ("none", "trivialaugment", "randaugment"),
}
# bounds beyond "not negative": (low, high, how to say it); OPEN_* says which bounds exclude their value
RANGES = {"mom": (0, 1, "in [0, 1) (0: no momentum)"), "step_gamma": (0, 1, "in (0, 1] (the factor each drop multiplies by)"),
          "lr_div": (0, None, "above 0 (earlier groups get lr / lr_div)"), "bs": (1, None, "at least 1"),
          "size": (8, None, "at least 8 (pixels)"), "valid_pct": (0, 1, "in [0, 1)"),
          "crop_pct": (0.1, 1, "in [0.1, 1] (the share of the resized image the crop keeps)"),
          "pct_start": (0, 1, "in (0, 1) (the share of the stage before the peak)"), "div": (0, None, "above 0"),
          "div_final": (0, None, "above 0"), "sqr_mom": (0, 1, "in [0, 1)"), "eps": (0, None, "above 0"),
          "bbox_margin": (0, 1, "in [0, 1] (the share of the box added on each side)"),
          "mixup_prob": (0, 1, "in [0, 1] (the share of training batches mixed)"),
          "mixup_switch_prob": (0, 1, "in [0, 1] (the share of mixed batches that take cutmix)"),
          "ema_decay": (0, 1, "in [0, 1) (0: no EMA of the weights)"),
          "drop_path_rate": (0, 1, "in [0, 1) (0: no stochastic depth)"),
          "warmup_pct": (0, 1, "in [0, 1) (the share of the stage spent warming up)")}
OPEN_BELOW = {"step_gamma", "lr_div", "pct_start", "div", "div_final", "eps"}
OPEN_ABOVE = {"mom", "valid_pct", "pct_start", "sqr_mom", "ema_decay", "drop_path_rate", "warmup_pct"}
LIST_FLAGS = {"epochs": "epochs", "sizes": "size", "bs": "bs", "lr": "lr"}   # flag -> stage key
RUN_FLAGS = ("arch", "head", "pretrained", "loss", "valid_pct", "seed", "crop_bbox", "balance", "bilinear_dim", "box_loss",
             "box_lambda", "bbox_margin", "wd_bn_bias", "train_bn", "lr_rule", "mixup_alpha", "cutmix_alpha", "ema_decay",
             "auto_augment", "drop_path_rate")


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


def _check(where, key, value, default):
    if key in CHOICES and value not in CHOICES[key]:
        raise UserError(f"{where}: {key} {value!r} is not one of {', '.join(CHOICES[key])}")
    if default is None or isinstance(default, str):
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UserError(f"{where}: {key} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{where}: {key} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise UserError(f"{where}: {key} must be a finite number, got {value!r}")
    if isinstance(default, int) and value != int(value):
        raise UserError(f"{where}: {key} must be a whole number, got {value!r}")
    if value < 0:
        raise UserError(f"{where}: {key} must not be negative, got {value!r}")
    if not _in_range(key, value):
        raise UserError(f"{where}: {key} must be {RANGES[key][2]}, got {value!r}")
    return type(default)(value)


def _in_range(key, value):
    if key not in RANGES:
        return True
    low, high, _ = RANGES[key]
    above = low is None or (value > low if key in OPEN_BELOW else value >= low)
    below = high is None or (value < high if key in OPEN_ABOVE else value <= high)
    return above and below


def _fill(raw, where):
    """Defaults filled in and every value checked; stage keys at the top level are defaults for every stage."""
    known = set(RUN_DEFAULTS) | set(STAGE_DEFAULTS) | {"name", "stages"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r} (run-wide keys: {', '.join(RUN_DEFAULTS)}; "
                        f"stage keys: {', '.join(STAGE_DEFAULTS)})")
    stages = raw.get("stages")
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
        raise UserError(f"{where}: a recipe needs at least one [[stages]] table")
    recipe = {"name": str(raw.get("name", "recipe"))}
    for key, default in RUN_DEFAULTS.items():
        recipe[key] = _check(where, key, raw.get(key, default), default)
    shared = {k: raw[k] for k in STAGE_DEFAULTS if k in raw}
    recipe["stages"] = []
    for i, stage in enumerate(stages, 1):
        bad = sorted(set(stage) - set(STAGE_DEFAULTS))
        if bad:
            raise UserError(f"{where}: stage {i}: unknown key {bad[0]!r} (stage keys: {', '.join(STAGE_DEFAULTS)})")
        merged = {**STAGE_DEFAULTS, **shared, **stage}
        filled = {k: _check(f"{where}: stage {i}", k, merged[k], d) for k, d in STAGE_DEFAULTS.items()}
        filled["name"] = str(filled["name"] or f"stage{i}")
        recipe["stages"].append(filled)
    return recipe


def _runs(values):
    """[[0, 1], [2]] for [224, 224, 299]: the runs of consecutive stages that share a value."""
    runs = []
    for i, v in enumerate(values):
        if runs and values[runs[-1][0]] == v:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _spread(flag, given, stages, key):
    """A list flag's values onto the stages: one per stage, or one per run of stages sharing a value in the recipe
    (so `--sizes 224,299` keeps its meaning for the three-stage recipe whose sizes are 224, 224, 299)."""
    values = [s[key] for s in stages]
    runs = _runs(values) if key != "epochs" else [[i] for i in range(len(stages))]  # epochs are always per stage
    if len(given) == len(stages):
        groups = [[i] for i in range(len(stages))]
    elif len(given) == len(runs):
        groups = runs
    else:
        shown = ", ".join(f"{r[0] + 1}-{r[-1] + 1}" if len(r) > 1 else f"{r[0] + 1}" for r in runs)
        runs_text = f" or {len(runs)} (one per run of stages sharing a value: {shown})" if len(runs) != len(stages) else ""
        raise UserError(f"--{flag} takes {len(stages)} comma-separated values (one per stage){runs_text}, "
                        f"got {len(given)}: {','.join(map(str, given))}")
    for value, group in zip(given, groups):
        value = _check(f"--{flag}", key, value, STAGE_DEFAULTS[key])  # the checks a recipe file's values get
        for i in group:
            stages[i][key] = value


def overrides(args):
    """{key: value} of the recipe settings the command line gives (flags left at None give nothing)."""
    given = {k: getattr(args, k) for k in RUN_FLAGS if getattr(args, k, None) is not None}
    given.update({f: getattr(args, f) for f in LIST_FLAGS if isinstance(getattr(args, f, None), list)})
    if getattr(args, "wd", None) is not None:
        given["wd"] = args.wd
    return given


def resolve(raw, given=None, where="recipe"):
    """The fully resolved recipe: `raw` with defaults, then the overrides `given` (from `overrides`), checked."""
    recipe = _fill(copy.deepcopy(raw), where)
    for key, value in (given or {}).items():
        if key in RUN_DEFAULTS:
            recipe[key] = _check(f"--{key.replace('_', '-')}", key, value, RUN_DEFAULTS[key])
            if key == "head":
                _check_head(value, "--head")
        elif key == "wd":
            for stage in recipe["stages"]:
                stage["wd"] = _check("--wd", "wd", value, 0.0)
        else:
            _spread(key, value, recipe["stages"], LIST_FLAGS[key])
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
    for key, value in given.items():
        alone = resolve(source, {**run_given, key: value}, "the command line")
        if alone != run_recipe:
            if key in LIST_FLAGS or key == "wd":
                field = LIST_FLAGS.get(key, "wd")
                was = ",".join(f"{s[field]:g}" for s in run_recipe["stages"])
                now = ",".join(f"{s[field]:g}" for s in alone["stages"])
            else:
                was, now = run_recipe[key], alone[key]
            return f"--{key.replace('_', '-')} {now} differs from the run's {was}"
    return None


def describe(recipe):
    """The resolved recipe as a table a person can check against its write-up."""
    lines = [f"recipe {recipe['name']}"]
    width = max(map(len, RUN_DEFAULTS))
    lines += [f"  {k:<{width}} {recipe[k]}" for k in RUN_DEFAULTS]
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
    return "\n".join(lines)
