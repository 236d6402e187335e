"""models.py: backbones by name, the recipe's parameter groups and rates, frozen BatchNorm
training, local weights, offline pretrained weights, and pickle-free saving."""
import importlib
import copy
import pickle
import urllib.error

import pytest
import torch
import torchvision
from fastai.callback.progress import ProgressCallback
from torch import nn

from finegrained.errors import UserError
from conftest import PickleBomb
from finegrained.data import get_dls
from finegrained.prepare.tables import read_table
from finegrained.models import (create_learner, load_trained, read_state_dict, resolve_arch,
                    save_trained)
from finegrained.train import group_lrs, n_groups


@pytest.fixture(scope="module")
def dls(prepared):
    return get_dls(prepared / "train.csv", size=32, bs=8, workers=0)


def test_names_resolve_to_torchvision_or_timm():
    assert resolve_arch("resnext50_32x4d") == ("torchvision", "resnext50_32x4d")
    assert resolve_arch("resnext101") == ("torchvision", "resnext101_32x8d")
    assert resolve_arch("se_resnext50_32x4d") == ("timm", "legacy_seresnext50_32x4d")
    assert resolve_arch("efficientnet_b3") == ("timm", "efficientnet_b3")
    with pytest.raises(UserError, match="unknown architecture 'resnet19'"):
        resolve_arch("resnet19")


def test_recipe_head_groups_and_rates(dls):
    learn = create_learner(dls, "resnext50_32x4d", pretrained=False)
    head = learn.model[1]
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(4096, 512), (512, 4)]
    assert [m.p for m in head if isinstance(m, nn.Dropout)] == [0.25, 0.5]
    groups = learn.splitter(learn.model)
    body = learn.model[0]
    assert len(groups) == 3 == n_groups(learn)
    assert {id(p) for p in groups[0]} == {id(p) for p in body[:6].parameters()}
    assert {id(p) for p in groups[1]} == {id(p) for p in body[6:].parameters()}
    assert group_lrs(1e-2) == pytest.approx([1e-2 / 9, 1e-2 / 3, 1e-2])


def test_frozen_stage_trains_only_head_and_batchnorm(dls):
    learn = create_learner(dls, "resnet18", pretrained=False, wd=1e-3)  # the published recipe's
    learn.freeze()
    before = {n: p.detach().clone() for n, p in learn.model.named_parameters()}
    learn.fit_one_cycle(1, group_lrs(1e-2))
    hypers = learn.opt.hypers
    assert [h["wd"] for h in hypers] == [1e-3] * 3 and hypers[0]["sqr_mom"] == 0.99  # AdamW as the recipe sets it
    bn = {f"0.{n}" for n, m in learn.model[0].named_modules() if isinstance(m, nn.BatchNorm2d)}
    for name, p in learn.model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        in_bn = name.rsplit(".", 1)[0] in bn
        if name.startswith("1.") or in_bn:
            assert changed, f"{name} should train while frozen"
        else:
            assert not changed, f"{name} is frozen but changed"


def test_local_backbone_weights_are_loaded(dls, tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    learn = create_learner(dls, "resnet18", weights=tmp_path / "resnet18.pth")
    assert torch.equal(learn.model[0][0].weight, reference.conv1.weight)
    assert torch.equal(learn.model[0][7][1].conv2.weight, reference.layer4[1].conv2.weight)
    with pytest.raises(UserError, match="do not fit resnet34"):
        create_learner(dls, "resnet34", weights=tmp_path / "resnet18.pth")


def loss_and_accuracy(model, xb, yb):
    """Cross-entropy and accuracy of `model` itself on one batch: BatchNorm on that batch's statistics (as in
    training), no dropout, on a copy, so that the model's running statistics stay as they were."""
    model = copy.deepcopy(model).eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    with torch.no_grad():
        out = model(xb).as_subclass(torch.Tensor)
    yb = yb.as_subclass(torch.Tensor)
    return float(nn.functional.cross_entropy(out, yb)), float((out.argmax(1) == yb).float().mean())


def test_timm_backbone_trains(prepared):
    """A timm body with fastai's head learns 16 images: every weight moves, the loss on them falls to less than half,
    and the accuracy rises, measured with forward passes of the model before and after fitting."""
    from fastai.torch_core import set_seed
    set_seed(0)
    df = read_table(prepared / "train.csv")
    small = df.groupby("class_id").head(4).reset_index(drop=True)
    small.attrs = dict(df.attrs)
    dls = get_dls(small, size=32, bs=8, augment="none", workers=0)
    learn = create_learner(dls, "resnet10t", pretrained=False)
    assert learn.model[0].__class__.__name__ == "TimmBody"
    learn.remove_cb(ProgressCallback)
    xb, yb = dls.test_dl(small, with_labels=True, bs=len(small)).one_batch()
    before = {n: p.detach().clone() for n, p in learn.model.named_parameters()}
    loss0, acc0 = loss_and_accuracy(learn.model, xb, yb)
    learn.fit_one_cycle(8, 1e-2)
    loss1, acc1 = loss_and_accuracy(learn.model, xb, yb)
    unchanged = [n for n, p in learn.model.named_parameters() if torch.equal(before[n], p.detach())]
    assert not unchanged, f"{len(unchanged)} of {len(before)} weights did not move, e.g. {unchanged[0]}"
    assert loss1 < loss0 / 2 and acc1 > acc0, (loss0, loss1, acc0, acc1)


def test_weights_file_with_pickled_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"conv1.weight": PickleBomb()}, f)
    with pytest.raises(UserError, match="not a weights file that can be loaded safely"):
        read_state_dict(tmp_path / "evil.pth")
    assert not (tmp_path / "PWNED").exists()


def test_no_network_for_pretrained_weights_says_what_to_do(dls, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: "/nonexistent-hub-dir")
    with pytest.raises(UserError, match="could not fetch ImageNet weights for resnet18.*--weights PATH.*--no-pretrained"):
        create_learner(dls, "resnet18", pretrained=True)


def test_saved_model_round_trips_without_pickle(dls, tmp_path):
    learn = create_learner(dls, "resnet18", pretrained=False)
    meta = {"arch": "resnet18", "classes": [{"id": i, "name": str(i)} for i in range(1, 5)], "image_size": 32,
            "normalize": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    save_trained(learn.model, tmp_path / "m", meta)
    model, loaded = load_trained(tmp_path / "m")
    x = torch.randn(2, 3, 32, 32)
    learn.model.eval()
    assert loaded == meta and torch.allclose(model(x), learn.model(x), atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.json", "model.safetensors"]


def test_loss_choices():
    from fastai.losses import CrossEntropyLossFlat, FocalLossFlat, LabelSmoothingCrossEntropyFlat
    from finegrained.models import make_loss
    assert isinstance(make_loss("ce"), CrossEntropyLossFlat)
    assert isinstance(make_loss("smooth"), LabelSmoothingCrossEntropyFlat) and make_loss("smooth").func.eps == 0.1
    assert isinstance(make_loss("focal"), FocalLossFlat) and make_loss("focal").func.gamma == 2.0


def test_models_py_counts_each_parameter_group_as_torchvision_builds_it(capsys):
    """models.py: the published recipe's ResNeXt50 has torchvision's body (its parameters less the 1000-class fc) in the
    first two groups, fastai's concat head for 196 classes in the last; the frozen stage trains the head and BatchNorm."""
    import torchvision
    models_script = importlib.import_module("models")  # the top-level script, not finegrained.models
    models_script.main([])
    lines = capsys.readouterr().out.splitlines()
    groups = [float(line.split(":")[1].split()[0]) for line in lines if line.startswith("  group ")]
    tv = torchvision.models.resnext50_32x4d()
    body = sum(p.numel() for p in tv.parameters()) - sum(p.numel() for p in tv.fc.parameters())
    assert len(groups) == 3 and abs((groups[0] + groups[1]) * 1e6 - body) < 0.01e6
    # fastai's concat head: BatchNorm(4096), Linear(4096, 512), BatchNorm(512), Linear(512, 196), the linears without bias
    head = 2 * 4096 + 4096 * 512 + 2 * 512 + 512 * 196
    assert abs(groups[2] * 1e6 - head) < 0.01e6
    bn = sum(p.numel() for m in tv.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters())
    frozen = next(line for line in lines if line.startswith("stage frozen"))
    assert f"({(head + bn) / 1e6:.2f} M)" in frozen


def test_label_smoothing_flag_reaches_fastais_loss(dls):
    """--label-smoothing, declared once in recipe.Recipe, is the eps of the loss fastai trains with."""
    from fastai.losses import LabelSmoothingCrossEntropyFlat
    from finegrained import recipe as recipes, runner
    from finegrained.models import learner_args
    args = runner.parse_args(["--loss", "smooth", "--label-smoothing", "0.25", "--arch", "resnet18", "--no-pretrained"])
    recipe = recipes.resolve(recipes.load()[1], recipes.overrides(args))
    learn = create_learner(dls, **learner_args(recipe, recipe["stages"][0]))
    assert isinstance(learn.loss_func, LabelSmoothingCrossEntropyFlat) and learn.loss_func.func.eps == 0.25
    assert recipes.resolve(recipes.load()[1])["label_smoothing"] == 0.1   # the default: the smoothing every recipe had
