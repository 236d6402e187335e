"""Models: a fastai Learner for a backbone named on the command line, and saving/loading trained
models as safetensors weights plus a JSON of metadata (nothing is ever unpickled).

Backbones: torchvision's ResNets and ResNeXts (cut before the pool, the recipe's three parameter groups),
or any timm model by name. Names from the unmaintained `pretrainedmodels` package map to timm's ports of
the same weights. Heads (heads.py, `--head`): concat (fastai's, the default), linear, bilinear, localize;
model.json records the head and its options, so a trained model is rebuilt from safetensors + JSON alone."""
import json
from functools import partial
from pathlib import Path

import fastai.losses as losses
import timm
import torch
import torchvision
from fastai.callback.training import BnFreeze
from fastai.learner import Learner
from fastai.metrics import accuracy, top_k_accuracy
from fastai.optimizer import SGD, Adam
from fastai.torch_core import params
from fastai.vision.learner import create_body, default_split, TimmBody
from fastcore.foundation import L
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from timm.models import group_modules
from torch import nn

from finegrained.boxes import LocalizeLoss, localize_metrics
from finegrained.data import dls_args, get_dls
from finegrained.errors import UserError
from finegrained.files import atomic, write_json
from finegrained.heads import HEADS, make_head, OPTIONS
from finegrained.recipe import ALIASES, TORCHVISION_ARCHS, Recipe, Stage

WEIGHTS_FILE, META_FILE = "model.safetensors", "model.json"
LEGACY_HEAD_OPTIONS = {"reduce_ch": "bilinear_dim"}  # model.json written before the head took the recipe's name


def resolve_arch(arch):
    """('torchvision' | 'timm', canonical name) for a user's architecture name."""
    name = ALIASES.get(arch, arch)
    if name in TORCHVISION_ARCHS:
        return "torchvision", name
    if timm.is_model(name):
        return "timm", name
    raise UserError(f"unknown architecture {arch!r}: use a torchvision ResNet/ResNeXt "
                    f"({', '.join(sorted(TORCHVISION_ARCHS))}) or a timm model name (timm.list_models())")


def recipe_splitter(model):
    """The recipe's three parameter groups for a ResNet body: stem to layer2, layer3-4, head."""
    return L(model[0][:6], model[0][6:], model[1:]).map(params)


def splitter_for(arch):
    """torchvision ResNets: the recipe's three groups; timm bodies: fastai's body/head split."""
    return recipe_splitter if resolve_arch(arch)[0] == "torchvision" else default_split


def build_body(arch, pretrained=False, drop_path_rate=0.0):
    """The backbone cut before its pooling: a torchvision ResNet's children, or fastai's TimmBody. `drop_path_rate`:
    a timm backbone's stochastic depth (timm.create_model's; torchvision's ResNets have none, and refuse it)."""
    kind, name = resolve_arch(arch)
    if drop_path_rate and kind == "torchvision":
        raise UserError(f"drop_path_rate {drop_path_rate:g} needs a timm backbone; torchvision's {name} has no "
                        f"stochastic depth (timm's port of it has: --arch {name}.tv_in1k)")
    try:
        if kind == "torchvision":  # fastai's model_meta lacks the ResNeXts, so the cut is set here
            return create_body(getattr(torchvision.models, name)(weights="DEFAULT" if pretrained else None), cut=-2)
        extra = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
        try:
            model = timm.create_model(name, pretrained=pretrained, num_classes=0, **extra)
        except TypeError as err:
            if not extra:
                raise
            raise UserError(f"timm's {name} takes no drop_path_rate ({err}); set drop_path_rate = 0 for it")
        return TimmBody(model, pretrained)
    except UserError:
        raise
    except Exception as err:
        if not pretrained:
            raise
        raise UserError(f"could not fetch ImageNet weights for {arch} ({type(err).__name__}: {str(err)[:200]}); "
                        "pass a local file with --weights PATH, or train from scratch with --no-pretrained")


def build_model(arch, n_out, pretrained=False, head="concat", head_options=None, drop_path_rate=0.0):
    """nn.Sequential(body, head) (heads.make_head): model[0] is the backbone, model[1:] the head, as fastai's
    splitters expect, so the head is always the last parameter group."""
    if head not in HEADS:  # before building a backbone (and fetching its weights) for nothing
        raise UserError(f"unknown head {head!r}: choose one of {', '.join(HEADS)}")
    return make_head(head, build_body(arch, pretrained, drop_path_rate), n_out, **(head_options or {}))


def head_options(recipe):
    """model.json's head_options for a resolved recipe: every option its head takes (heads.OPTIONS), its defaults
    written out so that a later change of default cannot change how a saved model is rebuilt."""
    options = dict(OPTIONS.get(recipe["head"], {}))
    if recipe["head"] == "bilinear":
        options["bilinear_dim"] = int(recipe["bilinear_dim"]) or None  # bilinear_dim 0: no 1x1 reduction
    return options


def head_args(recipe, boxes=True):
    """create_learner's head keywords for a resolved recipe: `create_learner(dls, ..., **head_args(recipe))`, with
    get_dls(..., head=recipe["head"]). `boxes=False`: a localize recipe's classification part alone (fastai's concat
    head, DataLoaders without boxes), for checks about classes only (run.py --sanity)."""
    if recipe["head"] == "localize" and not boxes:
        return {"head": "concat", "head_options": {}}
    return {"head": recipe["head"], "head_options": head_options(recipe), "box_loss": recipe["box_loss"],
            "box_lambda": recipe["box_lambda"]}


def body_blocks(model):
    """The backbone's blocks in order, each a list of modules: a torchvision ResNet's residual blocks,
    or timm's own grouping of its model into blocks (`group_matcher`)."""
    body = model[0]
    if hasattr(body, "model"):  # fastai's TimmBody
        named = dict(body.model.named_modules())
        groups = group_modules(body.model, body.model.group_matcher(coarse=False))
        return [[named[n] for n in names if n in named] for names in groups.values()]
    return [[block] for layer in body[4:] for block in layer]


def reinit_last_blocks(model, n):
    """Re-initialize the backbone's last `n` blocks (the FGVC-Aircraft write-up's later phases); returns their parameters."""
    blocks = body_blocks(model)
    if not 1 <= n <= len(blocks):
        raise UserError(f"blocks = {n}: this backbone has {len(blocks)} blocks to re-initialize")
    modules = [m for block in blocks[-n:] for top in block for m in top.modules()]
    for m in modules:
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return [p for m in modules for p in m.parameters(recurse=False)]


def read_state_dict(path):
    """Tensors from a .safetensors file or a torch file, never running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such weights file")
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"{path}: not a weights file that can be loaded safely ({type(err).__name__}: {str(err)[:200]})")
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: does not hold a state dict of tensors")
    return state


def load_backbone_weights(model, arch, path):
    """Load ImageNet-style backbone weights (a full torchvision or timm state dict) into `model[0]`."""
    kind, name = resolve_arch(arch)
    state = read_state_dict(path)
    if kind == "torchvision":
        full = getattr(torchvision.models, name)(weights=None)
        try:
            full.load_state_dict(state)
        except RuntimeError as err:
            raise UserError(f"{path}: these weights do not fit {name} ({str(err).splitlines()[0]})")
        model[0].load_state_dict(nn.Sequential(*list(full.children())[:-2]).state_dict())
    else:
        missing, _ = model[0].model.load_state_dict(state, strict=False)
        if missing:
            raise UserError(f"{path}: these weights do not fit {name} (missing {len(missing)} tensors, e.g. {missing[0]})")


def top5_accuracy(inp, targ):
    return top_k_accuracy(inp, targ, k=min(5, inp.shape[-1]))


LOSSES = {"ce": "CrossEntropyLossFlat", "smooth": "LabelSmoothingCrossEntropyFlat", "focal": "FocalLossFlat"}


def make_loss(name, label_smoothing=Recipe.label_smoothing):
    kwargs = {"smooth": dict(eps=label_smoothing), "focal": dict(gamma=2.0)}.get(name, {})
    return getattr(losses, LOSSES[name])(**kwargs)


def make_opt(name="adam", mom=0.9, sqr_mom=0.99, eps=1e-5):
    """fastai's optimizers: `adam` is AdamW (decoupled weight decay; beta1 `mom`, beta2 `sqr_mom`, `eps`); `sgd` is SGD
    with momentum and L2 weight decay, as torch.optim.SGD and the write-ups that use it."""
    if name == "sgd":
        return partial(SGD, mom=mom, decouple_wd=False)
    return partial(Adam, mom=mom, sqr_mom=sqr_mom, eps=eps)


def learner_args(recipe, stage, boxes=True):
    """create_learner's keywords from a resolved recipe and the stage it starts with:
    `create_learner(dls, **learner_args(recipe, stage))`; `boxes=False` as for head_args."""
    return {"arch": recipe["arch"], "pretrained": recipe["pretrained"], "loss": recipe["loss"],
            "label_smoothing": recipe["label_smoothing"], "wd": stage["wd"],
            "opt": stage["opt"], "mom": stage["mom"], "sqr_mom": stage["sqr_mom"], "eps": stage["eps"],
            "wd_bn_bias": recipe["wd_bn_bias"], "train_bn": recipe["train_bn"], "drop_path_rate": recipe["drop_path_rate"],
            **head_args(recipe, boxes)}


def recipe_dls(recipe, table, size, bs, workers=None, **data_changes):
    """data.get_dls for the rows of `table` with a resolved recipe's data keys (`data_changes` replacing some)."""
    return get_dls(table, size, bs, **{**dls_args(recipe), **data_changes}, workers=workers)


def build_learner(recipe, table, stage, size=None, bs=None, workers=None, weights=None, path=".", pretrained=None,
                  boxes=True, **data_changes):
    """The one path from a resolved recipe to a Learner, for training, run.py --sanity and lr_find.py: DataLoaders
    for the rows of `table` (data.get_dls with the recipe's data keys, at `size` and `bs`, by default the stage's;
    `data_changes` replace some of those keys), then create_learner with the recipe's model and `stage`'s optimizer.
    `pretrained`: False starts from random weights whatever the recipe says (a trained model is loaded next);
    `boxes=False` as for head_args."""
    if not boxes:
        data_changes = {**data_changes, "head": "concat"}
    dls = recipe_dls(recipe, table, size or stage["size"], bs or stage["bs"], workers, **data_changes)
    keys = learner_args(recipe, stage, boxes)
    if pretrained is not None:
        keys["pretrained"] = keys["pretrained"] and pretrained
    return create_learner(dls, weights=weights, path=path, **keys)


def is_localize_dls(dls):
    """Whether `dls` yields (image, box, class), as data.get_dls(head="localize") builds them."""
    return len(getattr(dls.train_ds, "tls", ())) == 3 and dls.n_inp == 1


def create_learner(dls, arch=Recipe.arch, pretrained=Recipe.pretrained, weights=None, loss=Recipe.loss, wd=Stage.wd,
                   path=".", head=Recipe.head, opt=Stage.opt, mom=Stage.mom, head_options=None, box_loss=Recipe.box_loss,
                   box_lambda=Recipe.box_lambda, sqr_mom=Stage.sqr_mom, eps=Stage.eps, wd_bn_bias=Recipe.wd_bn_bias,
                   train_bn=Recipe.train_bn, drop_path_rate=Recipe.drop_path_rate,
                   label_smoothing=Recipe.label_smoothing):
    """A fastai Learner: the backbone and head, the loss, the optimizer (AdamW by default; one-cycle cycles its beta1),
    BatchNorm trained even when frozen (unless `train_bn=False`: then a frozen BatchNorm keeps its weights and, through
    fastai's BnFreeze, its running statistics), weight decay on BatchNorm and biases only with `wd_bn_bias`, and the
    body frozen when it starts from ImageNet weights; `drop_path_rate`: a timm backbone's stochastic depth. The
    defaults are the recipe keys' (recipe.Recipe and recipe.Stage).

    head "localize" needs DataLoaders from data.get_dls(..., head="localize"); its loss is the class loss plus
    box_lambda x the box loss (boxes.LocalizeLoss), and it logs accuracy, top-5, mean_iou and iou50 every epoch."""
    if (head == "localize") != is_localize_dls(dls):
        raise UserError("--head localize needs DataLoaders with boxes: data.get_dls(..., head='localize')" if head == "localize"
                        else f"head {head!r} classifies only, but these DataLoaders carry boxes (built for --head localize)")
    model = build_model(arch, dls.c, pretrained=pretrained and weights is None, head=head, head_options=head_options,
                        drop_path_rate=drop_path_rate)
    if weights is not None:
        load_backbone_weights(model, arch, weights)
    if head == "localize":
        loss_func, metrics = LocalizeLoss(make_loss(loss, label_smoothing), box_loss, box_lambda), localize_metrics(top5_accuracy)
    else:
        loss_func, metrics = make_loss(loss, label_smoothing), [accuracy, top5_accuracy]
    learn = Learner(dls, model, loss_func=loss_func, opt_func=make_opt(opt, mom, sqr_mom, eps), wd=wd, path=path,
                    wd_bn_bias=wd_bn_bias, train_bn=train_bn, splitter=splitter_for(arch), metrics=metrics,
                    cbs=[] if train_bn else [BnFreeze()])
    if pretrained or weights is not None:
        learn.freeze()
    return learn


# ---------------------------------------------------------------- trained models on disk

def save_trained(model, folder, meta):
    """Write model.safetensors and model.json into `folder`, each under a temporary name first."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    with atomic(folder / WEIGHTS_FILE) as tmp:
        tmp.write_bytes(save(state))  # through Python's write, so a full disk raises ENOSPC (files.atomic's one line)
    write_json(folder / META_FILE, meta)


def saved_head_options(meta, where):
    """A model.json's head_options (`meta` read from the file `where`), their legacy names (LEGACY_HEAD_OPTIONS) under
    today's: the one place they are read, so a run folder from before a rename still loads."""
    options = meta.get("head_options") or {}
    if not isinstance(options, dict):
        raise UserError(f"{where}: head_options must be a JSON object, got {options!r}")
    return {LEGACY_HEAD_OPTIONS.get(k, k): v for k, v in options.items()}


def load_trained(folder):
    """(model in eval mode, metadata) from a folder written by save_trained."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such model folder (train one with run.py)")
    for name in (META_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise UserError(f"{folder}: incomplete model folder, {name} is missing")
    try:
        meta = json.loads((folder / META_FILE).read_text())
        arch, classes = meta["arch"], meta["classes"]
        int(meta["image_size"])  # present and a number, or the model cannot be used
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{folder / META_FILE}: not a valid model description ({err})")
    try:
        state = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{folder / WEIGHTS_FILE}: not a safetensors file, refusing to load it ({err})")
    model = build_model(arch, len(classes), pretrained=False, head=meta.get("head", "concat"),
                        head_options=saved_head_options(meta, folder / META_FILE))
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"{folder / WEIGHTS_FILE}: weights do not fit {arch} ({str(err).splitlines()[0]})")
    return model.eval(), meta


def describe_model(recipe, n_classes):
    """models.py's lines: the backbone a recipe resolves to, its head, the parameters of each parameter group (the
    groups the discriminative learning rates split), and what each stage trains. Built without ImageNet weights:
    the shapes are the same, and nothing is downloaded."""
    kind, name = resolve_arch(recipe["arch"])
    model = build_model(recipe["arch"], n_classes, pretrained=False, head=recipe["head"],
                        head_options=head_options(recipe))
    groups = splitter_for(recipe["arch"])(model)
    counts = [sum(p.numel() for p in group) for group in groups]
    bn = sum(p.numel() for m in model[0].modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             for p in m.parameters())
    lines = [f"{name} ({kind}), head {recipe['head']}, {n_classes} classes: {sum(counts) / 1e6:.2f} M parameters "
             f"in {len(groups)} groups (the last is the head)"]
    lines += [f"  group {i}: {n / 1e6:.2f} M" for i, n in enumerate(counts)]
    what = {"all": lambda s: f"every group ({sum(counts) / 1e6:.2f} M)",
            "frozen": lambda s: (f"the head and the body's BatchNorm ({(counts[-1] + bn) / 1e6:.2f} M)" if recipe["train_bn"]
                                 else f"the head alone ({counts[-1] / 1e6:.2f} M)"),
            "reinit": lambda s: f"the head and the body's last {s['blocks']} blocks, re-initialized"}
    for stage in recipe["stages"]:
        if stage["epochs"]:
            lines.append(f"stage {stage['name']}: {stage['epochs']} epochs at {stage['size']} px, trains "
                         f"{what[stage['train']](stage)}")
    return lines
