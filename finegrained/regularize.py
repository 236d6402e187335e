"""Regularization from the ImageNet training recipes of timm and torchvision, on fastai's machinery. Each is off
unless a recipe turns it on (recipes/README.md has the keys):

    mixup / cutmix     timm's `Mixup` on training batches (alphas, the share of batches mixed, the switch between
                       the two), trained with timm's `SoftTargetCrossEntropy`; validation and scoring are untouched
    EMA of the weights timm's `ModelEmaV3`, updated after every optimizer step; validation runs on the EMA weights,
                       and they are the ones scored and saved (`use_ema_weights`), and kept in checkpoint.pth
    linear warm-up     before a cosine stage's decay: fastai's `combine_scheds` of `SchedLin` and `SchedCos`
    auto augment       torchvision's TrivialAugmentWide or RandAugment on training items (PIL images), as a fastai
                       item transform that runs in training only (split_idx 0)
    stochastic depth   timm.create_model's drop_path_rate (models.build_body)

Written here: the two callbacks and the item transform that put timm's and torchvision's classes into a fastai fit,
because fastai has no EMA callback, its MixUp and CutMix callbacks cannot switch between each other per batch, and
it wraps no torchvision policy. Importing this module changes nothing."""
from pathlib import Path

import torch
from fastai.callback.core import Callback
from fastai.losses import LabelSmoothingCrossEntropy
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3

from finegrained import distributed
from finegrained import recipe as recipes
from finegrained.errors import UserError
from finegrained.train import load_checkpoint

EMA_KEY = "ema"  # checkpoint.pth's entry for the EMA weights


# ---------------------------------------------------------------- mixup and cutmix

class MixupCutmix(Callback):
    """timm's Mixup on each training batch, in its 'batch' mode: with probability `prob` the batch is mixed with itself
    reversed, by mixup or (with probability `switch_prob` when both alphas are on) cutmix, and its targets become the
    mixed one-hot vectors, label-smoothed as the learner's loss smooths (fastai's LabelSmoothingCrossEntropy(eps) pulls
    towards the same target as timm's smoothing eps). Training batches are scored by timm's SoftTargetCrossEntropy, as
    timm's train.py does; validation batches keep their images, labels and the recipe's loss (run_valid False, and the
    loss is put back after each training phase)."""
    run_valid = False

    def __init__(self, n_classes, mixup_alpha=0.0, cutmix_alpha=0.0, prob=1.0, switch_prob=0.5):
        self.mixer = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob,
                           mode="batch", label_smoothing=0.0, num_classes=n_classes)
        self.kept_loss = None

    def before_train(self):
        self.mixer.label_smoothing = _smoothing(self.learn.loss_func)
        self.kept_loss, self.learn.loss_func = self.learn.loss_func, SoftTargetCrossEntropy()

    def before_batch(self):
        x, y = self.xb[0], self.yb[0]
        if len(x) % 2:
            raise UserError(f"mixup/cutmix need an even batch on every process (timm's Mixup mixes each image with the "
                            f"batch reversed), got {len(x)}: choose a bs that divides into even shares")
        x, target = self.mixer(x, y)  # x is mixed in place; target: (bs, classes), each row summing to 1
        self.learn.xb, self.learn.yb = (x,), (target,)

    def after_train(self):
        if self.kept_loss is not None:
            self.learn.loss_func, self.kept_loss = self.kept_loss, None

    after_cancel_train = after_cancel_fit = after_train


def _smoothing(loss_func):
    """The label smoothing of the learner's class loss (fastai's flattened cross entropy, with or without smoothing)."""
    func = getattr(loss_func, "func", loss_func)
    if isinstance(func, LabelSmoothingCrossEntropy):
        return float(func.eps)
    if isinstance(func, torch.nn.CrossEntropyLoss):
        return 0.0
    raise UserError(f"mixup/cutmix train on soft targets with cross entropy; the loss {type(func).__name__} takes "
                    "none: use loss ce or smooth")


# ---------------------------------------------------------------- EMA of the weights

def _unwrap(model):
    return distributed.unwrap(model)


class EmaWeights(Callback):
    """An exponential moving average of every float tensor of the model (weights and BatchNorm statistics), timm's
    ModelEmaV3 with a constant `decay` (ema = decay x ema + (1 - decay) x weights after every optimizer step), made at
    the first fit and carried through every stage. Validation runs on the EMA weights (the live ones are put back
    after it); checkpoint.pth keeps them (`checkpoint_extras`), and a resumed run (`resume_from`, the run folder)
    continues from them."""
    order = -5  # its before_fit makes the EMA before other callbacks' before_fit read the learner

    def __init__(self, decay, resume_from=None):
        self.decay, self.resume_from = decay, resume_from
        self.ema, self.live = None, None

    def before_fit(self):
        if self.ema is not None:
            return
        self.ema = ModelEmaV3(_unwrap(self.learn.model), decay=self.decay)
        saved = self._saved()
        if saved is not None:
            self.ema.module.load_state_dict(saved)

    def _saved(self):
        """The EMA weights of the checkpoint being resumed, or None."""
        if self.resume_from is None or not (Path(self.resume_from) / "checkpoint.pth").exists():
            return None
        return load_checkpoint(self.resume_from).get(EMA_KEY)

    def after_step(self):
        self.ema.update(_unwrap(self.learn.model))  # no step count: the decay is constant from the first step

    def before_validate(self):
        model = _unwrap(self.learn.model)
        self.live = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.ema.module.state_dict())

    def after_validate(self):
        if self.live is not None:
            _unwrap(self.learn.model).load_state_dict(self.live)
            self.live = None

    def checkpoint_state(self):
        """What checkpoint.pth keeps of this callback (train.save_checkpoint asks every callback): the EMA weights."""
        return {EMA_KEY: self.weights()} if self.ema is not None else {}

    def scored_state(self):
        """The weights validation scored in this fit (train's best.pth): the EMA's."""
        return self.weights() if self.ema is not None else None

    def weights(self):
        """The EMA's state dict: this process's, or, when nothing trained here (a finished run resumed), the checkpoint's."""
        if self.ema is not None:
            return self.ema.module.state_dict()
        saved = self._saved()
        if saved is None:
            raise UserError(f"{self.resume_from}: the recipe keeps an EMA of the weights, but checkpoint.pth holds none "
                            "to score and save")
        return saved


def _ema_of(cbs):
    return next((cb for cb in cbs if isinstance(cb, EmaWeights)), None)


def use_ema_weights(learn, cbs):
    """After training: put the EMA weights (when `cbs` keep them) into the model, which is then scored and saved."""
    ema = _ema_of(cbs)
    if ema is not None:
        _unwrap(learn.model).load_state_dict(ema.weights())


# ---------------------------------------------------------------- from a recipe

def callbacks(recipe, n_classes, resume_from=None):
    """The fastai callbacks a resolved recipe's regularization needs, for every fit of the run (train.run_stages's
    extra_cbs); `resume_from`: the run folder when resuming it."""
    cbs = []
    if recipes.mixes(recipe):
        cbs.append(MixupCutmix(n_classes, recipe["mixup_alpha"], recipe["cutmix_alpha"], recipe["mixup_prob"],
                               recipe["mixup_switch_prob"]))
    if recipe["ema_decay"]:
        cbs.append(EmaWeights(recipe["ema_decay"], resume_from))
    return cbs
