"""The regularization options (regularize.py) each change what they should, and nothing else: mixup and cutmix mix
training batches and their targets while validation batches pass untouched; the EMA follows its formula, validation
runs on it, and it is what run.py scores, saves and resumes; the warm-up rises linearly before the cosine; the item
augmentation touches training items alone; drop_path_rate reaches timm's DropPath and is refused for torchvision; and
recipes/modern.toml runs scaled down end to end."""
import json

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback

from finegrained import recipe as recipes
from finegrained import regularize
from finegrained import runner as run
from finegrained.errors import UserError
from conftest import run_script
from finegrained.data import get_dls
from finegrained.models import build_model, create_learner, learner_args


def resolved(**keys):
    """A one-stage recipe with `keys` (run-wide or stage keys), resolved as run.py resolves one."""
    stage = {k: keys.pop(k) for k in list(keys) if k in recipes.STAGE_KEYS}
    raw = {"arch": "resnet18", "pretrained": False, **keys, "stages": [{"epochs": 1, "size": 32, "bs": 8, **stage}]}
    return recipes.resolve(raw)


def tiny_learner(prepared, recipe, valid_pct=0.25):
    bs = recipe["stages"][0]["bs"]
    dls = get_dls(prepared / "train.csv", size=32, bs=bs, valid_pct=valid_pct, augment="none", resize="squash", workers=0)
    return create_learner(dls, **learner_args(recipe, recipe["stages"][0]))


class Batches(Callback):
    """Each batch's images and targets as this callback's `order` sees them, with whether it was a training batch."""
    run_valid = True

    def __init__(self, order):
        self.order, self.seen = order, []

    def before_batch(self):
        self.seen.append((self.training, self.xb[0].detach().clone(), self.yb[0].detach().clone()))


def mixed_batches(prepared, **keys):
    recipe = resolved(**keys)
    learn = tiny_learner(prepared, recipe)
    loss = learn.loss_func
    before, after = Batches(order=-50), Batches(order=50)  # around the mixing callback (order 0)
    learn.fit(1, 1e-3, cbs=[*regularize.callbacks(recipe, learn.dls.c), before, after])
    assert learn.loss_func is loss  # the recipe's loss is back after training
    return learn.dls.c, list(zip(before.seen, after.seen))


@pytest.mark.parametrize("loss, eps", [("ce", 0.0), ("smooth", 0.1)])
def test_mixup_blends_each_training_batch_with_itself_reversed_and_leaves_validation_alone(prepared, one_thread, loss, eps):
    n_classes, batches = mixed_batches(prepared, mixup_alpha=0.4, loss=loss)
    train = [(b, a) for b, a in batches if b[0]]
    assert len(train) >= 5 and any(not b[0] for b, _ in batches)
    lams = []
    for (_, x, y), (_, mixed, target) in train:
        other = x.flip(0)
        # the weight of the image itself, fitted from the pixels alone
        d = (x - other).float().flatten()
        lam = float(((mixed - other).float().flatten() @ d) / (d @ d))
        assert torch.allclose(mixed, lam * x + (1 - lam) * other, atol=1e-4)  # a convex combination of two images
        one_hot = torch.nn.functional.one_hot(y, n_classes).float() * (1 - eps) + eps / n_classes
        assert torch.allclose(target, lam * one_hot + (1 - lam) * one_hot.flip(0), atol=1e-5)  # targets mixed alike
        lams.append(lam)
    assert all(0 < lam < 1 for lam in lams) and len(set(np.round(lams, 4))) > 1  # a Beta(0.4, 0.4) draw per batch
    for (training, x, y), (_, seen_x, seen_y) in batches:
        if not training:
            assert torch.equal(seen_x, x) and torch.equal(seen_y, y) and seen_y.ndim == 1  # validation untouched


def test_cutmix_pastes_one_box_of_the_reversed_batch_and_weighs_the_targets_by_its_area(prepared, one_thread):
    n_classes, batches = mixed_batches(prepared, cutmix_alpha=1.0)
    for (training, x, y), (_, mixed, target) in batches:
        if not training:
            assert torch.equal(mixed, x)
            continue
        other = x.flip(0)
        pasted = (mixed != x).any(0).any(0)  # (H, W): where any image of the batch took the other's pixels
        rows, cols = pasted.any(1).nonzero().flatten(), pasted.any(0).nonzero().flatten()
        box = torch.zeros_like(pasted)
        if len(rows):
            box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        assert torch.equal(mixed[..., box], other[..., box]) and torch.equal(mixed[..., ~box], x[..., ~box])
        lam = 1 - float(box.float().mean())  # the share of each image that is still its own
        one_hot = torch.nn.functional.one_hot(y, n_classes).float()
        assert torch.allclose(target, lam * one_hot + (1 - lam) * one_hot.flip(0), atol=1e-6)


def test_mixup_refuses_focal_loss_a_box_head_and_an_odd_batch_in_one_line():
    with pytest.raises(UserError, match="focal loss does not take"):
        resolved(mixup_alpha=0.2, loss="focal")
    with pytest.raises(UserError, match="head localize cannot train with mixup/cutmix"):
        resolved(cutmix_alpha=1.0, head="localize")
    with pytest.raises(UserError, match="need an even bs .* got 15"):
        resolved(mixup_alpha=0.2, bs=15)
    assert not regularize.callbacks(resolved(), 4)  # every option off by default


class Weights(Callback):
    """After each optimizer step (and the EMA's update, order -5): the head's last weight, live and averaged; in each
    validation batch: the weight the model validates with."""
    order = 0

    def __init__(self, ema):
        self.ema, self.steps, self.validated = ema, [], []

    def before_fit(self):
        self.start = self.head(self.model).clone()

    @staticmethod
    def head(model):
        return model[1][-1].weight.detach()

    def after_step(self):
        self.steps.append((self.head(self.model).clone(), self.head(self.ema.ema.module).clone()))

    def before_batch(self):
        if not self.training:
            self.validated.append((self.head(self.model).clone(), self.head(self.ema.ema.module).clone()))


def test_ema_follows_its_formula_validates_on_its_weights_and_gives_the_live_ones_back(prepared, one_thread):
    decay = 0.7
    recipe = resolved(ema_decay=decay)
    learn = tiny_learner(prepared, recipe)
    cbs = regularize.callbacks(recipe, learn.dls.c)
    weights = Weights(cbs[0])
    learn.fit(1, 1e-2, cbs=[*cbs, weights])
    expected = weights.start
    for live, ema in weights.steps:  # ema = decay x ema + (1 - decay) x weights, from the weights before training
        expected = decay * expected + (1 - decay) * live
        assert torch.allclose(ema, expected, atol=1e-6)
        assert not torch.allclose(ema, live)  # after a step the average differs from the live weights
    assert weights.validated and all(torch.equal(seen, ema) for seen, ema in weights.validated)
    final_live, final_ema = weights.steps[-1]
    assert torch.equal(Weights.head(learn.model), final_live)  # the live weights are back after validation
    regularize.use_ema_weights(learn, cbs)
    assert torch.equal(Weights.head(learn.model), final_ema)  # what run.py then scores and saves


def test_warm_up_rises_linearly_from_zero_then_decays_by_cosine(prepared, one_thread):
    from finegrained.train import Stage, fit_stage
    recipe = resolved(schedule="cosine", warmup_pct=0.4, opt="sgd", lr=0.01, bs=16)
    learn = tiny_learner(prepared, recipe, valid_pct=0.0)
    stage = Stage(**{**recipe["stages"][0], "epochs": 2})
    fit_stage(learn, stage, 0, [])
    lrs = np.array(learn.recorder.lrs)  # the head group's rate at each training batch
    pct = np.arange(len(lrs)) / len(lrs)  # where in the fit each batch is (fastai's pct_train)
    warm = pct < 0.4
    expected = np.where(warm, 0.01 * pct / 0.4, 0.01 * (1 + np.cos(np.pi * (pct - 0.4) / 0.6)) / 2)
    assert len(lrs) == 14 and warm.sum() == 6  # 7 batches of 16 from 120 images, twice
    assert np.allclose(lrs, expected, rtol=1e-5, atol=1e-9)  # fastai keeps the rates in float32
    rises = np.diff(lrs[warm])
    assert lrs[0] == 0 and np.all(rises > 0) and np.allclose(rises, rises[0])  # linear: equal steps up
    plain = resolved(schedule="cosine", opt="sgd", lr=0.01, bs=16)  # off by default: the cosine starts at the peak
    learn = tiny_learner(prepared, plain, valid_pct=0.0)
    fit_stage(learn, Stage(**plain["stages"][0]), 0, [])
    assert learn.recorder.lrs[0] == pytest.approx(0.01)
    with pytest.raises(UserError, match="warmup_pct is for schedule 'cosine'"):
        resolved(warmup_pct=0.1)  # one_cycle warms up by its own pct_start


@pytest.mark.parametrize("policy, name", [("trivialaugment", "TrivialAugmentWide"), ("randaugment", "RandAugment")])
def test_the_augmentation_changes_training_items_only(prepared, policy, name):
    from finegrained.data import eval_dl
    from finegrained.prepare.tables import read_table
    kw = dict(size=32, bs=8, valid_pct=0.25, augment="none", resize="squash", workers=0)
    augmented, plain = get_dls(prepared / "train.csv", auto_augment=policy, **kw), get_dls(prepared / "train.csv", **kw)
    for dl in (augmented.train, augmented.valid, plain.train, plain.valid):
        dl.before_iter()  # fastai hands each loader's split to its transforms here
    torch.manual_seed(0)
    changed = [not torch.equal(augmented.train.do_item(i)[0], plain.train.do_item(i)[0]) for i in range(12)]
    assert sum(changed) >= 8, changed  # a policy may draw its identity op now and then, not most of the time
    assert all(torch.equal(augmented.valid.do_item(i)[0], plain.valid.do_item(i)[0]) for i in range(len(plain.valid_ds)))
    test = read_table(prepared / "test.csv")
    assert torch.equal(eval_dl(augmented, test).one_batch()[0], eval_dl(plain, test).one_batch()[0])  # scoring too
    assert [type(t.policy).__name__ for t in augmented.train.after_item.fs if hasattr(t, "policy")] == [name]


def test_drop_path_reaches_timm_and_torchvision_refuses_it_in_one_line(prepared, tmp_path):
    from timm.layers import DropPath
    drops = lambda model: [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]  # noqa: E731
    for arch in ("resnet10t", "convnext_atto"):
        assert max(drops(build_model(arch, 4, drop_path_rate=0.2))) == pytest.approx(0.2)
        assert max(drops(build_model(arch, 4)), default=0.0) == 0.0  # off by default
    learn = tiny_learner(prepared, resolved(arch="resnet10t", drop_path_rate=0.3))  # through the recipe key
    assert max(drops(learn.model)) == pytest.approx(0.3)
    result = run_script("run.py", "--arch", "resnet18", "--drop-path-rate", "0.1", "--show")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "drop_path_rate 0.1 needs a timm backbone" in lines[0] and "resnet18.tv_in1k" in lines[0]
    with pytest.raises(UserError, match="needs a timm backbone"):
        build_model("resnet50", 4, drop_path_rate=0.1)


def modern(prepared, out, *extra):
    return ["--recipe", "modern", "--data", str(prepared), "--arch", "convnext_atto", "--no-pretrained", "--sizes", "32",
            "--epochs", "2", "--bs", "16", "--workers", "0", "--out", str(out), *extra]


def test_modern_runs_scaled_down_and_scores_and_saves_the_ema_weights(prepared, tmp_path, one_thread, capsys):
    from safetensors.torch import load_file
    from finegrained.data import inference_dl
    from finegrained.prepare.tables import read_table
    from finegrained.models import load_trained
    out = tmp_path / "modern"
    run.main(modern(prepared, out, "--keep-checkpoint"))  # the checkpoint, to compare its EMA with the model
    history = [line.split(",") for line in (out / "history.csv").read_text().splitlines()[1:]]
    assert len(history) == 2 and {row[4] for row in history} == {"AdamW"}
    saved = load_file(out / "model.safetensors")
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert all(torch.equal(saved[k], v.float()) for k, v in state["ema"].items())  # the model saved is the EMA
    assert any(not torch.equal(saved[k], v.float()) for k, v in state["model"].items() if v.is_floating_point())
    model, meta = load_trained(out)
    test = read_table(prepared / "test.csv")
    _, dl = inference_dl(test, prepared, meta["image_size"], resize=meta["resize"], crop_pct=meta["crop_pct"], workers=0)
    with torch.no_grad():
        preds = torch.cat([model(x).argmax(1) for (x,) in dl])
    classes = torch.tensor([c["id"] for c in meta["classes"]])
    accuracy = float((classes[preds] == torch.tensor(test["class_id"].to_numpy())).float().mean())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_top1"] == pytest.approx(accuracy)  # the test set was scored with the EMA weights
    assert f"test accuracy: {accuracy:.4f}" in capsys.readouterr().out


def test_a_resumed_run_continues_the_ema_from_its_checkpoint(prepared, tmp_path, monkeypatch, one_thread):
    from safetensors.torch import load_file
    from test_resume import Killed, count_writes
    run.main(modern(prepared, tmp_path / "whole"))
    count_writes(monkeypatch, kill_at=1)  # killed after the first epoch's checkpoint.pth, before anything else
    with pytest.raises(Killed):
        run.main(modern(prepared, tmp_path / "killed"))
    monkeypatch.undo()
    run.main(modern(prepared, tmp_path / "killed", "--resume"))
    whole, resumed = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "killed" / "model.safetensors")
    assert all(torch.allclose(whole[k], resumed[k], atol=1e-5) for k in whole)
