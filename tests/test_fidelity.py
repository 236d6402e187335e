"""Fidelity: what fastai really received, stage by stage, against what each recipe's write-up states.

Each recipe runs scaled down through run.py (in-process, on the `prepared` fixture) with a fastai callback added to
every fit (train.fit_stage is wrapped); the callback records the optimizer, its hyper-parameters at every training
batch and the schedule that drove them, which tensors train and which are decayed, the loss, the batch size, the
input size and the sampler. recipes/fidelity/<recipe>.csv lists, per stage, the value the write-up (or, where it is
silent, the code it links to) gives for each quantity; every row is compared and all differing rows are reported.

The table's columns: stage (a stage name of the recipe, or * for every stage), quantity (QUANTITIES below), expected,
source, deviation. `deviation` is empty where the recipe follows the row; otherwise it says why the recipe knowingly
differs, and then the row must differ (a recipe that comes to follow it drops the note). `expected` is a number or an arithmetic expression in `bs` (the batch the stage trained at, for rules such as
0.1 x batch / 256) and `C` (the number of classes), optionally `+- tolerance`; true/false; all / none / partial (some
but not all) / last N blocks, for the shares of tensors; or a word. Quantities the scaled-down run changes (image
size, epochs, and the batch size where a run passes --bs) are compared with the recipe file's own value, and the run
is checked to have trained at the scaled value."""
import ast
import csv
import math
import operator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from finegrained import recipe as recipes

TABLES = Path(recipes.RECIPES) / "fidelity"
GRID = np.linspace(0.0, 1.0, 2001)  # positions in a fit at which the schedule is read

QUANTITIES = {
    "optimizer": "fastai's optimizer by its steppers (train.optimizer_name): AdamW, Adam (L2), SGD, SGD (decoupled wd)",
    "optimizer_family": "Adam or SGD",
    "lr_groups": "parameter groups",
    "lr": "the head group's highest learning rate in the stage",
    "lr_div": "head group's rate / the group before it's, at that peak (1 with one group)",
    "schedule": "shape of the head's rate over the fit: flat, one_cycle, cosine, warmup_cosine (a linear rise, then cosine), "
                "step, flat_cos, decay",
    "pct_start": "where in the fit the rate peaks (0..1)",
    "div": "peak rate / rate at the start",
    "div_final": "peak rate / rate at the end",
    "lr_end_ratio": "rate at the end / peak rate",
    "step_every": "epochs at the first rate before it drops",
    "step_gamma": "factor of that drop",
    "mom": "momentum (Adam's beta1) at the first batch",
    "mom_max": "highest momentum in the fit",
    "mom_min": "lowest momentum in the fit",
    "sqr_mom": "Adam's beta2",
    "eps": "Adam's eps",
    "wd": "weight decay of the head group",
    "decayed_norm": "share of the trainable normalization tensors that are decayed",
    "decayed_bias": "share of the trainable bias tensors (outside normalization layers) that are decayed",
    "decayed_weight": "share of the other trainable tensors that are decayed",
    "trainable_body_norm": "share of the backbone's normalization tensors that train",
    "trainable_body_rest": "share of the backbone's other tensors that train",
    "trainable_head": "share of the head's tensors that train",
    "loss": "class loss: cross_entropy, label_smoothing, focal",
    "label_smoothing": "label smoothing eps (0 without)",
    "smoothing_target_true": "the probability the class loss pulls the true class towards (from its gradient)",
    "focal_gamma": "focal loss gamma (0 without)",
    "box_loss": "the box loss of a localize model",
    "box_weight": "box loss weight / class loss weight",
    "patience": "early stopping patience in epochs (0: none)",
    "bs": "training batch size",
    "size": "training input size in pixels",
    "epochs": "epochs of the stage",
    "balanced_sampler": "whether the training loader samples classes uniformly (fastai WeightedDL)",
    "drop_last": "whether the last incomplete training batch is skipped",
    "crop_bbox": "whether images are cropped to their box",
    "bbox_margin": "share of the box added on each side when cropping to it",
    "resize": "training resize: crop, squash, pad, none",
    "crop_ratio": "training crop size / the size images are resized to first",
    "train_crop": "training crop: random_resized_crop, pad<N>+random_crop, random_crop, none",
    "flip": "whether training images are flipped horizontally",
    "auto_augment": "torchvision's policy on training items alone (TrivialAugmentWide, RandAugment) or none",
    "mixup_alpha": "timm Mixup's mixup alpha (0: no mixup)",
    "cutmix_alpha": "timm Mixup's cutmix alpha (0: no cutmix)",
    "mixup_prob": "timm Mixup's share of training batches mixed (0 without Mixup)",
    "mixup_switch_prob": "timm Mixup's share of mixed batches that take cutmix when both are on",
    "mix_label_smoothing": "the label smoothing timm's Mixup folds into the mixed targets",
    "batch_loss": "the loss training batches are scored with: the class loss, or soft_target_cross_entropy",
    "ema_decay": "decay of the EMA of the weights (timm ModelEmaV3; 0: none)",
    "drop_path_rate": "the highest drop probability of the backbone's DropPath modules (0: no stochastic depth)",
}
# how each recipe runs scaled down: arch (a small timm model for the timm recipes), image size, epochs per stage;
# bs only where the write-up's rate follows the batch (the rule's result is compared). resnets_sgd trains 8 epochs
# so that its step decay, every 7 epochs, happens; the 448-of-512 recipes train at 28 px, 28 / 32 being 448 / 512
RUNS = {
    "fastai_resnext50": dict(arch="resnet18", size=32, epochs=1),
    "resnets_sgd": dict(arch="resnet18", size=32, epochs=8, bs=16),  # 8 epochs, so that the drop after 7 happens
    "resnet50_448_ls": dict(arch="resnet18", size=28, epochs=2, bs=32),
    "bcnn_aircraft": dict(arch="resnet18", size=28, epochs=1),
    "oversample_focal": dict(arch="resnet10t", size=32, epochs=1),
    "localize_effnet": dict(arch="resnet10t", size=32, epochs=1),
    "modern": dict(arch="convnext_atto", size=32, epochs=2, bs=16),  # ConvNeXt's smallest; 2 epochs for a warm-up and a decay
}


# ---------------------------------------------------------------- recording

def _num(v):
    return float(np.asarray(v, dtype=float).reshape(-1)[0]) if np.size(v) == 1 else np.asarray(v, dtype=float)


def _curve(f, n_groups):
    """A ParamScheduler schedule read at GRID: (len(GRID), n_groups)."""
    return np.stack([np.broadcast_to(np.asarray(f(float(p)), dtype=float), (n_groups,)) for p in GRID])


def _parts(learn):
    """{id(param): (region, kind)}: region body (model[0]) or head; kind norm, bias (outside norm layers), weight."""
    from fastai.torch_core import norm_types
    model = learn.model
    body = {id(p) for p in model[0].parameters()}
    norm = {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
    bias = {id(m.bias) for m in model.modules()
            if not isinstance(m, norm_types) and isinstance(getattr(m, "bias", None), torch.nn.Parameter)}
    return {id(p): ("body" if id(p) in body else "head", "norm" if id(p) in norm else "bias" if id(p) in bias else "weight")
            for p in model.parameters()}


def _resnet_blocks(body):
    """A torchvision ResNet body's residual blocks in order (its children after the stem are Sequential layers)."""
    layers = [m for m in body.children() if isinstance(m, torch.nn.Sequential)]
    return [block for layer in layers for block in layer] if layers and all(len(layer) for layer in layers) else []


def _tensor_counts(learn):
    """Tensors counted by region and kind: how many there are, train (requires_grad, in the optimizer) and are decayed
    (trainable, in a group with wd != 0, a decay stepper in the optimizer, and fastai's state do_wd not False)."""
    opt = learn.opt
    steppers = {getattr(cb, "__name__", getattr(getattr(cb, "func", None), "__name__", "")) for cb in opt.cbs}
    decays = bool(steppers & {"weight_decay", "l2_reg"})
    wd_of = {id(p): float(_num(h.get("wd", 0.0))) for group, h in zip(opt.param_lists, opt.hypers) for p in group}
    parts = _parts(learn)
    counts = {}
    trainable_body = set()
    for p in learn.model.parameters():
        region, kind = parts[id(p)]
        c = counts.setdefault((region, kind), {"n": 0, "trainable": 0, "decayed": 0})
        c["n"] += 1
        trains = p.requires_grad and id(p) in wd_of
        if trains:
            c["trainable"] += 1
            if region == "body":
                trainable_body.add(id(p))
            state = opt.state[p] if p in opt.state else {}
            if decays and wd_of[id(p)] != 0 and state.get("do_wd", True):
                c["decayed"] += 1
    blocks = _resnet_blocks(learn.model[0])
    rest = {id(p) for p in learn.model[0].parameters() if parts[id(p)][1] != "norm"}
    last = None
    for k in range(1, len(blocks)):
        in_last = {id(p) for b in blocks[-k:] for p in b.parameters() if parts[id(p)][1] != "norm"}
        if (trainable_body & rest) == in_last:
            last = k
    return counts, last


def _loss(loss_func, n_classes):
    """The class loss's kind and parameters, and the target its gradient pulls the softmax towards: at zero logits the
    gradient of cross entropy against a target t is 1/C - t."""
    out = {}
    cls = loss_func
    if hasattr(loss_func, "cls_loss") and hasattr(loss_func, "box_loss"):  # a localize model's class + box loss
        out.update(box_loss=str(loss_func.box_loss), box_weight=float(loss_func.lam))
        cls = loss_func.cls_loss
    func = getattr(cls, "func", cls)
    kind = {"CrossEntropyLoss": "cross_entropy", "LabelSmoothingCrossEntropy": "label_smoothing",
            "FocalLoss": "focal"}.get(type(func).__name__, type(func).__name__)
    out.update(loss=kind, label_smoothing=float(getattr(func, "eps", 0.0)) if kind == "label_smoothing" else 0.0,
               focal_gamma=float(getattr(func, "gamma", 0.0)) if kind == "focal" else 0.0)
    if kind in ("cross_entropy", "label_smoothing"):
        logits = torch.zeros(1, n_classes, requires_grad=True)
        cls(logits, torch.tensor([0])).backward()
        out["smoothing_target_true"] = float(1 / n_classes - logits.grad[0, 0])
    return out


def _reader(dls):
    """The object that reads an image for the training set (data.ImageReader), from fastai's pipeline of get_x."""
    for f in dls.train_ds.tls[0].tfms.fs:
        if hasattr(f, "crop_bbox"):
            return f
        for method in getattr(getattr(f, "encodes", None), "methods", []):
            for cell in getattr(getattr(method, "implementation", None), "__closure__", None) or ():
                if hasattr(cell.cell_contents, "crop_bbox"):
                    return cell.cell_contents
    return None


def _data(dls):
    """What the training loader does: batch size, sampler, last batch, box crop, resize, crop and flip."""
    from fastai.callback.data import WeightedDL
    from fastai.vision.all import CropPad, FlipItem, RandomCrop, RandomResizedCrop, Resize
    dl = dls.train
    items, batch = list(dl.after_item.fs), list(dl.after_batch.fs)
    out = {"balanced_sampler": isinstance(dl, WeightedDL), "drop_last": bool(dl.drop_last)}
    reader = _reader(dls)
    out["crop_bbox"] = bool(reader.crop_bbox) if reader is not None else "no image reader found"
    out["bbox_margin"] = float(reader.margin) if reader is not None and reader.crop_bbox else 0.0
    find = lambda kind: next((t for t in items if isinstance(t, kind)), None)  # noqa: E731
    resize, rrc, crop, pad = find(Resize), find(RandomResizedCrop), find(RandomCrop), find(CropPad)
    method = str(resize.method) if resize is not None else "none"
    out["resize"] = {"squish": "squash"}.get(method, method)
    if rrc is not None:
        out["train_crop"] = "random_resized_crop"
    elif crop is not None and pad is not None and resize is not None:
        out["train_crop"] = f"pad{(pad.size[0] - resize.size[0]) // 2}+random_crop"
    elif crop is not None or out["resize"] == "crop":  # fastai's Resize(method crop) crops at random in training
        out["train_crop"] = "random_crop"
    else:
        out["train_crop"] = "none"
    out["crop_ratio"] = crop.size[0] / resize.size[0] if crop is not None and resize is not None else 1.0
    flip_item = any(isinstance(t, FlipItem) and t.p > 0 for t in items)
    flip_batch = any(getattr(getattr(f, "func", None), "__name__", "") == "flip_mat" and f.keywords.get("p", 0) > 0
                     for t in batch for f in getattr(t, "aff_fs", None) or [])
    out["flip"] = flip_item or flip_batch
    policy = next((t for t in items if hasattr(t, "policy")), None)  # data.ItemAugment holds torchvision's policy
    out["auto_augment"] = ("none" if policy is None else type(policy.policy).__name__ if policy.split_idx == 0
                           else f"{type(policy.policy).__name__} on split {policy.split_idx}, not training alone")
    return out


def _regularization(learn):
    """What timm received: the Mixup's parameters, the EMA's decay, the DropPath modules' probabilities."""
    from timm.layers import DropPath
    mixer = next((cb.mixer for cb in learn.cbs if hasattr(cb, "mixer")), None)
    ema = next((cb.ema for cb in learn.cbs if getattr(cb, "ema", None) is not None), None)
    drops = [float(m.drop_prob) for m in learn.model.modules() if isinstance(m, DropPath)]
    return {"mixup_alpha": float(mixer.mixup_alpha) if mixer else 0.0,
            "cutmix_alpha": float(mixer.cutmix_alpha) if mixer else 0.0,
            "mixup_prob": float(mixer.mix_prob) if mixer else 0.0,
            "mixup_switch_prob": float(mixer.switch_prob) if mixer else "no Mixup",
            "ema_decay": float(ema.decay) if ema is not None else 0.0, "drop_path_rate": max(drops, default=0.0)}


_LOSS_NAMES = {"SoftTargetCrossEntropy": "soft_target_cross_entropy", "CrossEntropyLoss": "cross_entropy",
               "LabelSmoothingCrossEntropy": "label_smoothing", "FocalLoss": "focal"}


def fidelity_callback(stage_name, store):
    """A fastai callback recording what `stage_name`'s fit hands the optimizer into `store[stage_name]`."""
    from fastai.callback.core import Callback
    from fastai.callback.schedule import ParamScheduler
    from fastai.callback.tracker import EarlyStoppingCallback
    from finegrained import train

    class Fidelity(Callback):
        order = ParamScheduler.order + 1  # each batch, after the scheduler has set that batch's hyper-parameters
        run_valid = False

        def before_fit(self):
            learn = self.learn
            n_groups = len(learn.opt.param_lists)
            scheds = next((cb.scheds for cb in learn.cbs if isinstance(cb, ParamScheduler)), {})
            counts, last = _tensor_counts(learn)
            early = [cb for cb in learn.cbs if isinstance(cb, EarlyStoppingCallback)]
            self.scheds = scheds
            self.rec = store[stage_name] = {
                "optimizer": train.optimizer_name(learn.opt), "n_groups": n_groups, "n_epoch": learn.n_epoch,
                "curves": {k: _curve(f, n_groups) for k, f in scheds.items()},
                "tensors": counts, "last_blocks": last, "n_classes": learn.dls.c,
                "patience": early[0].patience if early else 0, "loss": _loss(learn.loss_func, learn.dls.c),
                "data": _data(learn.dls), "dl_bs": learn.dls.train.bs, "batches": [], "reg": _regularization(learn)}

        def before_batch(self):
            if not self.rec["batches"]:  # what the first training batch is scored with, mixed or not
                func = getattr(self.learn.loss_func, "func", self.learn.loss_func)
                mixer = next((cb.mixer for cb in self.learn.cbs if hasattr(cb, "mixer")), None)
                self.rec["reg"].update(batch_loss=_LOSS_NAMES.get(type(func).__name__, type(func).__name__),
                                       mix_label_smoothing=float(mixer.label_smoothing) if mixer else 0.0)
            x = self.xb[0]
            self.rec["batches"].append({
                "epoch": self.epoch, "pct": float(self.pct_train), "bs": int(x.shape[0]), "size": tuple(x.shape[-2:]),
                "hypers": [{k: _num(v) for k, v in h.items() if np.size(v) == 1} for h in self.opt.hypers],
                "scheduled": {k: np.broadcast_to(np.asarray(f(float(self.pct_train)), dtype=float),
                                                 (len(self.opt.hypers),)).copy() for k, f in self.scheds.items()}})

    return Fidelity()


def record_run(name, data, out, monkeypatch):
    """Train recipe `name` scaled down as RUNS says; returns ({stage name: record}, the recipe file resolved)."""
    from finegrained import runner as run
    from finegrained import train
    store = {}
    fit_stage = train.fit_stage

    def recorded_fit(learn, stage, first_epoch, cbs, *args, **kwargs):
        return fit_stage(learn, stage, first_epoch, [*cbs, fidelity_callback(stage.name, store)], *args, **kwargs)

    monkeypatch.setattr(train, "fit_stage", recorded_fit)
    resolved = recipes.resolve(recipes.load(name)[1])
    n = len(resolved["stages"])
    scaled = RUNS[name]
    flags = ["--recipe", name, "--data", str(data), "--out", str(out), "--no-pretrained", "--workers", "0",
             "--arch", scaled["arch"], "--sizes", ",".join([str(scaled["size"])] * n),
             "--epochs", ",".join([str(scaled["epochs"])] * n)]
    if "bs" in scaled:
        flags += ["--bs", ",".join([str(scaled["bs"])] * n)]
    run.main(flags)
    return store, resolved


# ---------------------------------------------------------------- what a record says

def _share(n, k, last=None):
    if n == 0:
        return "no such tensors"
    if k == n:
        return "all"
    if k == 0:
        return "none"
    return f"last {last} blocks" if last else f"{k} of {n}"


def _schedule(f, epochs):
    """The shape of a rate over a fit, read at GRID."""
    top = f.max()
    if top <= 0 or np.ptp(f) <= 1e-9 * top:
        return "flat"
    peak = int(np.argmax(f))
    if 0 < peak < len(f) - 1:  # a linear rise from f[0], then a cosine from the peak to f[-1]
        rise = f[0] + (top - f[0]) * GRID[:peak + 1] / GRID[peak]
        fall = f[-1] + (top - f[-1]) * (1 + np.cos(np.pi * (GRID[peak:] - GRID[peak]) / (1 - GRID[peak]))) / 2
        if np.abs(f[:peak + 1] - rise).max() <= 1e-6 * top and np.abs(f[peak:] - fall).max() <= 1e-6 * top:
            return "warmup_cosine"
    if f[0] < top * (1 - 1e-9):
        return "one_cycle" if f[-1] < top * (1 - 1e-9) else "warmup"
    if np.any(np.diff(f) > 1e-12 * top):
        return "other"
    if len(np.unique(np.round(f / top, 9))) <= max(epochs, 1):
        return "step"
    held = np.mean(f >= top * (1 - 1e-9))
    cosine = f[-1] + (f[0] - f[-1]) * (1 + np.cos(np.pi * GRID)) / 2
    if held < 0.01 and np.abs(f - cosine).max() <= 1e-6 * top:
        return "cosine"
    return "flat_cos" if held >= 0.05 else "decay"


def observed(rec):
    """{quantity: value} for one stage's record."""
    batches = rec["batches"]
    first = batches[0]
    head = lambda key, b=first: b["hypers"][-1].get(key, "n/a")  # noqa: E731
    n_groups = rec["n_groups"]
    lr = rec["curves"].get("lr")
    if lr is None:  # no scheduler: the rates the fit was given, for every batch
        lr = np.tile([h["lr"] for h in first["hypers"]], (len(GRID), 1))
    f = lr[:, -1]
    peak = int(np.argmax(f))
    mom = rec["curves"].get("mom")
    mom = mom[:, -1] if mom is not None else np.array([b["hypers"][-1].get("mom", np.nan) for b in batches])
    per_epoch = {}
    for b in batches:
        per_epoch.setdefault(b["epoch"], b["hypers"][-1]["lr"])
    levels = [per_epoch[e] for e in sorted(per_epoch)]
    drop = next((i for i, v in enumerate(levels) if v < levels[0] * (1 - 1e-9)), None)
    t = rec["tensors"]
    get = lambda region, kind, what: t.get((region, kind), {}).get(what, 0)  # noqa: E731
    kinds = lambda what, regions=("body", "head"): {  # noqa: E731
        k: sum(get(r, k, what) for r in regions) for k in ("norm", "bias", "weight")}
    trainable, decayed = kinds("trainable"), kinds("decayed")
    body_rest_n = get("body", "bias", "n") + get("body", "weight", "n")
    body_rest_t = get("body", "bias", "trainable") + get("body", "weight", "trainable")
    head_n = sum(get("head", k, "n") for k in ("norm", "bias", "weight"))
    head_t = sum(get("head", k, "trainable") for k in ("norm", "bias", "weight"))
    family = "Adam" if rec["optimizer"].startswith("Adam") else "SGD"
    values = {
        "optimizer": rec["optimizer"], "optimizer_family": family, "lr_groups": n_groups,
        "lr": float(f.max()), "lr_div": float(lr[peak, -1] / lr[peak, -2]) if n_groups > 1 else 1.0,
        "schedule": _schedule(f, rec["n_epoch"]), "pct_start": float(GRID[peak]),
        "div": float(f.max() / f[0]) if f[0] else math.inf, "div_final": float(f.max() / f[-1]) if f[-1] else math.inf,
        "lr_end_ratio": float(f[-1] / f.max()) if f.max() else math.nan,
        "step_every": drop if drop is not None else f"no drop in {len(levels)} epochs",
        "step_gamma": levels[drop] / levels[0] if drop is not None else f"no drop in {len(levels)} epochs",
        "mom": head("mom"), "mom_max": float(np.nanmax(mom)), "mom_min": float(np.nanmin(mom)),
        "sqr_mom": head("sqr_mom"), "eps": head("eps"), "wd": head("wd"),
        **{f"decayed_{k}": _share(trainable[k], decayed[k]) for k in ("norm", "bias", "weight")},
        "trainable_body_norm": _share(get("body", "norm", "n"), get("body", "norm", "trainable")),
        "trainable_body_rest": _share(body_rest_n, body_rest_t, rec["last_blocks"]),
        "trainable_head": _share(head_n, head_t),
        "smoothing_target_true": "n/a", "box_loss": "none", "box_weight": 0.0,
        **rec["loss"], **rec["data"],
        "patience": rec["patience"], "bs": first["bs"], "size": first["size"][0], "epochs": rec["n_epoch"],
        **rec["reg"],
    }
    return values


def consistency(rec):
    """What must hold whatever the write-up: the hyper-parameters each recorded batch trained with are the ones its
    schedule gives at that point, every batch is square at one size, and the first is of the loader's batch size.
    Returns the problems found."""
    problems = []
    for i, b in enumerate(rec["batches"]):
        for key, want in b["scheduled"].items():
            got = np.array([h[key] for h in b["hypers"]])
            if not np.allclose(got, want, rtol=1e-6, atol=0):
                problems.append(f"batch {i}: {key} {got.tolist()} but its schedule gives {want.tolist()}")
        if b["size"][0] != b["size"][1] or b["size"] != rec["batches"][0]["size"]:
            problems.append(f"batch {i}: input {b['size']}, not the square of the first batch")
    if rec["batches"][0]["bs"] != rec["dl_bs"]:
        problems.append(f"first batch of {rec['batches'][0]['bs']} images from a loader of bs {rec['dl_bs']}")
    return problems


# ---------------------------------------------------------------- the table and the comparison

def read_table(name):
    path = TABLES / f"{name}.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return path, rows


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow, ast.USub: operator.neg}


def _arith(text, names):
    """A number or an arithmetic expression in `names` (bs, C); None when `text` is not one."""
    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return float(node.value)
        if isinstance(node, ast.Name) and node.id in names:
            return float(names[node.id])
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(text)
    try:
        return ev(ast.parse(text.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError):
        return None


def matches(expected, got, names):
    """Whether the recorded value `got` is the table's `expected` (see the module's docstring)."""
    text = expected.strip()
    tol = None
    if "+-" in text:
        text, tol = (s.strip() for s in text.split("+-", 1))
        tol = _arith(tol, {})
    if text.lower() in ("true", "false"):
        return isinstance(got, (bool, np.bool_)) and bool(got) == (text.lower() == "true")
    if isinstance(got, str) and got.startswith("no such") and text.lower() in ("all", "none", "partial"):
        return True  # no tensor of that kind in the scaled-down model: nothing can be decayed or trained wrongly
    if text.lower() == "partial":
        return isinstance(got, str) and got not in ("all", "none") and not got.startswith("no such")
    number = _arith(text, names)
    if number is not None:
        if isinstance(got, (bool, np.bool_)) or not isinstance(got, (int, float, np.integer, np.floating)):
            return False
        return math.isclose(float(got), number, rel_tol=1e-4, abs_tol=tol if tol is not None else 1e-12)
    return isinstance(got, str) and got.lower() == text.lower()


def compare(rows, records, resolved, scaled):
    """[(row, what was found)] for every table row that differs. A quantity in `scaled` (changed by the scaled-down
    run) is read from the recipe file's own stage instead of the run."""
    stages = {s["name"]: s for s in resolved["stages"]}
    differ = []
    for row in rows:
        names = [row["stage"]] if row["stage"] != "*" else [s["name"] for s in resolved["stages"] if s["name"] in records]
        if row["stage"] != "*" and row["stage"] not in records:
            differ.append((row, f"stage {row['stage']!r} did not train (stages: {', '.join(records)})"))
            continue
        for stage in names:
            rec = records[stage]
            if row["quantity"] in scaled:
                got, where = stages[stage][row["quantity"]], "the recipe file (scaled in this run)"
            else:
                got, where = observed(rec)[row["quantity"]], "recorded"
            trained_bs = rec["batches"][0]["bs"]
            same = matches(row["expected"], got, {"bs": trained_bs, "C": rec["n_classes"]})
            if same == bool(row["deviation"].strip()):
                what = f"{stage}: {where} {got!r}" + (f" (bs {trained_bs})" if "bs" in row["expected"] else "")
                differ.append((row, what + (" although a deviation is noted" if same else "")))
    return differ


def report(path, differ):
    """One line per differing row: the write-up's value and source, then what each stage had."""
    found = {}
    for row, what in differ:
        found.setdefault(id(row), (row, []))[1].append(what)
    lines = [f"{path.name}: {len(found)} row(s) differ from what fastai received, or match though a deviation is noted"]
    lines += [f"  {row['stage']}, {row['quantity']}: expected {row['expected']} [{row['source']}]; got {'; '.join(whats)}"
              for row, whats in found.values()]
    return "\n".join(lines)


def test_every_recipe_has_a_table_of_known_quantities():
    """Each recipe has its table; every row names a quantity recorded here, a stage of the recipe (or *), an expected
    value, and a source naming the write-up's public repository."""
    assert sorted(RUNS) == recipes.available(), "RUNS must say how each recipe runs scaled down"
    for name in recipes.available():
        path, rows = read_table(name)
        assert rows and list(rows[0]) == ["stage", "quantity", "expected", "source", "deviation"], path
        stages = {s["name"] for s in recipes.resolve(recipes.load(name)[1])["stages"]}
        for i, row in enumerate(rows, 2):
            where = f"{path.name} line {i}"
            assert row["quantity"] in QUANTITIES, f"{where}: unknown quantity {row['quantity']!r}"
            assert row["stage"] == "*" or row["stage"] in stages, f"{where}: no stage {row['stage']!r} in {name}"
            assert "github.com/" in row["source"] or "wandb.ai/" in row["source"], f"{where}: cite the public repository"
            text = row["expected"].split("+-")[0].strip()
            assert text, f"{where}: no expected value"
        keys = [(r["stage"], r["quantity"]) for r in rows]
        assert len(keys) == len(set(keys)), f"{path.name}: a (stage, quantity) is listed twice"


def test_the_comparison_reads_each_kind_of_value():
    names = {"bs": 32, "C": 4}
    assert matches("0.1*bs/256", 0.0125, names) and not matches("0.1*bs/256", 0.025, names)
    assert matches("1-0.1", 0.9, names) and not matches("1-0.1", 0.925, names)
    assert matches("0 +- 1e-3", 4e-4, names) and not matches("0 +- 1e-3", 2e-3, names) and not matches("0", 4e-4, names)
    assert matches("true", True, names) and not matches("true", False, names) and not matches("1", True, names)
    assert matches("partial", "3 of 7", names) and matches("partial", "last 1 blocks", names)
    assert not matches("partial", "all", names) and not matches("none", "all", names)
    assert matches("all", "no such tensors", names) and not matches("3", "no such tensors", names)
    assert matches("AdamW", "AdamW", names) and not matches("AdamW", "Adam (L2)", names)
    assert not matches("0.9", "n/a", names)


# ---------------------------------------------------------------- the recipes, scaled down

@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUNS))
def test_what_fastai_received_is_what_the_write_up_states(name, prepared, tmp_path, monkeypatch, one_thread):
    path, rows = read_table(name)
    records, resolved = record_run(name, prepared, tmp_path / name, monkeypatch)
    live = [s["name"] for s in resolved["stages"] if s["epochs"] > 0]
    assert sorted(records) == sorted(live), f"stages recorded {sorted(records)}, recipe {live}"
    problems = [f"{stage}: {p}" for stage, rec in records.items() for p in consistency(rec)]
    assert not problems, "\n".join(problems)
    scaled = RUNS[name]
    for stage, rec in records.items():  # the run trained at the scaled values it was given
        assert (rec["batches"][0]["size"][0], rec["n_epoch"]) == (scaled["size"], scaled["epochs"]), stage
        if "bs" in scaled:
            assert rec["batches"][0]["bs"] == scaled["bs"], stage
    differ = compare(rows, records, resolved, {"size", "epochs", *(["bs"] if "bs" in scaled else [])})
    assert not differ, report(path, differ)


# ---------------------------------------------------------------- the balanced sampler

def test_the_balanced_sampler_draws_every_class_equally_after_the_validation_split(prepared):
    """balance=True with a validation split: the training loader's draws give each class 1/C of the samples (within 2
    points), on a set whose classes have 30, 20, 10 and 5 images."""
    from fastai.torch_core import set_seed
    from finegrained.data import get_dls
    from finegrained.prepare.tables import read_table as read_csv
    df = read_csv(prepared / "train.csv")
    keep = {1: 30, 2: 20, 3: 10, 4: 5}
    uneven = pd.concat([df[df["class_id"] == c].head(n) for c, n in keep.items()], ignore_index=True)
    uneven.attrs = df.attrs
    dls = get_dls(uneven, size=16, bs=8, valid_pct=0.2, seed=0, balance=True, augment="none", workers=0)
    classes = dls.train_ds.items["class_id"].to_numpy()
    assert len(classes) == len(uneven) - len(dls.valid_ds) and len(set(classes)) == 4
    assert np.bincount(classes)[1:].tolist() != [len(classes) // 4] * 4  # the training split itself is uneven
    set_seed(0)
    drawn = np.concatenate([classes[np.asarray(dls.train.get_idxs())] for _ in range(200)])
    assert len(drawn) >= 8000
    share = np.bincount(drawn, minlength=5)[1:] / len(drawn)
    assert np.abs(share - 0.25).max() <= 0.02, f"class shares {np.round(share, 3).tolist()}, each should be 0.25"
