"""Recipes: every shipped recipe runs scaled down end to end; the learning rates and optimizer each names are the
ones that train; --show and config.json resolve to the same recipe; --resume refuses a changed flag without touching
the run and rescoring a finished run gives its accuracy; early stopping and re-initialized blocks."""
import hashlib
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from finegrained import recipe as recipes
from finegrained import runner as run
from finegrained.errors import UserError
from conftest import TINY, run_script

def train(prepared, out, *flags):
    run.main(["--data", str(prepared), *TINY, "--out", str(out), *map(str, flags)])
    return pd.read_csv(out / "history.csv")


@pytest.mark.parametrize("name, flags", [
    ("resnets_sgd", ["--arch", "resnet18", "--epochs", "2", "--sizes", "32", "--bs", "16"]),
    ("resnet50_448_ls", ["--arch", "resnet18", "--epochs", "2", "--sizes", "28", "--bs", "16"]),
    ("oversample_focal", ["--arch", "resnet10t", "--epochs", "1,2", "--sizes", "32", "--bs", "16"]),
])
def test_each_recipe_runs_scaled_down_and_writes_every_output(name, flags, prepared, tmp_path, capsys):
    out = tmp_path / name
    history = train(prepared, out, "--recipe", name, *flags)
    for file in ("model.safetensors", "model.json", "history.csv", "metrics.json", "config.json"):
        assert (out / file).is_file(), file
    assert not (out / "checkpoint.pth").exists()  # removed when the run finished
    resolved = recipes.resolve(recipes.load(name)[1])
    meta = json.loads((out / "model.json").read_text())
    assert meta["recipe"] == name and meta["head"] == resolved["head"] and meta["resize"] == resolved["resize"]
    assert len(history) == sum(int(e) for e in flags[flags.index("--epochs") + 1].split(","))
    printed = float(re.search(r"test accuracy: ([0-9.]+)", capsys.readouterr().out).group(1))
    assert printed == round(json.loads((out / "metrics.json").read_text())["test_top1"], 4)


def test_step_decay_drops_tenfold_at_its_epoch_and_sgd_trains(prepared, tmp_path):
    toml = tmp_path / "step.toml"
    toml.write_text(recipes.RECIPES.joinpath("resnets_sgd.toml").read_text().replace("step_every = 7", "step_every = 2"))
    history = train(prepared, tmp_path / "step", "--recipe", toml, "--arch", "resnet18", "--epochs", "5",
                    "--sizes", "32", "--bs", "16")
    head_lr = [float(v.split(";")[-1]) for v in history["lrs_end"]]
    assert head_lr == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-5])
    assert set(history["opt"]) == {"SGD"}


def test_cosine_decays_every_epoch_and_one_cycle_uses_adamw(prepared, tmp_path, trained):
    history = train(prepared, tmp_path / "cos", "--recipe", "resnet50_448_ls", "--arch", "resnet18", "--epochs", "4",
                    "--sizes", "28", "--bs", "16")
    head_lr = [float(v.split(";")[-1]) for v in history["lrs_end"]]
    assert all(a > b for a, b in zip(head_lr, head_lr[1:])) and head_lr[0] < 0.025 and head_lr[-1] < 0.025 * 0.01
    assert set(history["opt"]) == {"SGD"}
    default = pd.read_csv(trained / "history.csv")
    assert set(default["opt"]) == {"AdamW"}
    frozen_end = [float(v.split(";")[-1]) for v in default[default.stage == "frozen"]["lrs_end"]]
    assert frozen_end[-1] < 1e-2 / 20 and frozen_end[0] > frozen_end[-1]  # one-cycle anneals far below its peak


def test_show_prints_every_stage_and_config_resolves_to_the_same_recipe(trained, capsys):
    run.main(["--show", "--epochs", "2,4,2"])
    shown = capsys.readouterr().out
    assert all(re.search(rf"^\s+{stage}\s+{epochs}\s", shown, re.M) for stage, epochs in
               (("frozen", 2), ("unfrozen", 4), ("resized", 2)))
    config = json.loads((trained / "config.json").read_text())
    where, raw = recipes.load(str(trained / "config.json"))
    assert recipes.resolve(raw, where=where) == config["recipe"]
    assert config["recipe"]["stages"][2]["size"] == 64 and config["run"]["world_size"] == 1
    run.main(["--recipe", str(trained / "config.json"), "--show"])
    assert capsys.readouterr().out == recipes.describe(config["recipe"]) + "\n"


def test_a_wrong_number_of_values_is_one_line(tmp_path):
    result = run_script("run.py", "--recipe", "resnets_sgd", "--epochs", "2,2", "--show")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --epochs takes 1 comma-separated values (one per stage), got 2: 2,2"]
    result = run_script("run.py", "--recipe", "nonesuch", "--show")
    assert result.returncode == 2 and "unknown recipe 'nonesuch'" in result.stderr
    result = run_script("run.py", "--head", "nonesuch", "--show")  # refused before anything is shown or trained
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --head: unknown head 'nonesuch': use one of concat, linear, bilinear, localize"]


def snapshot(folder):
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("flag", [["--arch", "resnet34"], ["--epochs", "2,4,3"], ["--sizes", "48,56"],
                                  ["--recipe", "resnets_sgd"], ["--loss", "focal"]])
def test_resume_with_a_changed_flag_is_refused_and_changes_nothing(trained, flag):
    before = snapshot(trained)
    result = run_script("run.py", "--out", trained, "--resume", *flag)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag[0]} ") and "differs from the run's" in lines[0]
    assert snapshot(trained) == before


def test_resuming_a_finished_run_scores_as_the_run_did(trained, tmp_path, capsys):
    copy = shutil.copytree(trained, tmp_path / "copy")
    printed = json.loads((trained / "metrics.json").read_text())["test_top1"]
    run.main(["--out", str(copy), "--resume", "--workers", "0", "--arch", "resnet18"])  # a flag equal to the run's is fine
    out = capsys.readouterr().out
    assert f"test accuracy: {printed:.4f}" in out
    assert len(pd.read_csv(copy / "history.csv")) == len(pd.read_csv(trained / "history.csv"))


def early_stop_recipe(tmp_path, patience):
    toml = tmp_path / "early.toml"
    toml.write_text('arch = "resnet18"\npretrained = false\nvalid_pct = 0.25\nopt = "sgd"\nschedule = "flat"\n'
                    f'[[stages]]\nname = "only"\nepochs = 6\nsize = 32\nbs = 16\nlr = 0.0\npatience = {patience}\n')
    return toml


def test_early_stopping_ends_the_stage_on_validation_loss(prepared, tmp_path):
    history = train(prepared, tmp_path / "early", "--recipe", early_stop_recipe(tmp_path, 2))
    assert len(history) == 3  # at lr 0 the validation loss never improves after the first epoch: 1 + patience epochs
    with pytest.raises(UserError, match="early stopping .* needs a validation split"):
        run.main(["--recipe", str(early_stop_recipe(tmp_path, 2)), "--valid-pct", "0", "--show"])


def test_reinit_stage_trains_only_the_last_blocks_and_the_head(prepared):
    from finegrained.data import get_dls
    from finegrained.models import body_blocks, create_learner
    from finegrained.train import Stage, set_trainable
    learn = create_learner(get_dls(prepared / "train.csv", size=32, bs=8, workers=0), "resnet18", pretrained=False)
    before = {n: p.detach().clone() for n, p in learn.model.named_parameters()}
    set_trainable(learn, Stage("phase2", 1, 32, 8, 1e-3, train="reinit", blocks=2), starting=True)
    last = {id(p) for block in body_blocks(learn.model)[-2:] for m in block for p in m.parameters()}
    bn = {id(p) for m in learn.model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    for name, p in learn.model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        is_bn = id(p) in bn
        if id(p) in last:
            assert p.requires_grad and (changed or name.endswith("bias") or is_bn), name
        elif name.startswith("1."):
            assert p.requires_grad and not changed, name
        else:
            assert not changed and p.requires_grad == is_bn, name


def one_stage(tmp_path, **keys):
    """A recipe file of one stage with `keys` written as TOML values (strings as they are, so inf and nan stay bare)."""
    toml = tmp_path / "bad.toml"
    toml.write_text('arch = "resnet18"\npretrained = false\n[[stages]]\n' + "".join(f"{k} = {v}\n" for k, v in keys.items()))
    return toml


@pytest.mark.parametrize("key, value, says", [
    ("epochs", "inf", "epochs must be a finite number, got inf"),
    ("epochs", "nan", "epochs must be a finite number, got nan"),
    ("size", "1e400", "size must be a finite number, got inf"),
    ("lr", "nan", "lr must be a finite number, got nan"),
    ("lr_div", "0", "lr_div must be above 0"),
    ("mom", "5", "mom must be in [0, 1)"),
    ("mom", "1", "mom must be in [0, 1)"),
    ("step_gamma", "7", "step_gamma must be in (0, 1]"),
    ("step_gamma", "0", "step_gamma must be in (0, 1]"),
    ("bs", "0", "bs must be at least 1"),
    ("size", "4", "size must be at least 8"),
    ("warmup", "3", "unknown key 'warmup'"),
])
def test_a_bad_recipe_value_is_one_line_before_any_data_is_read(tmp_path, key, value, says):
    result = run_script("run.py", "--recipe", one_stage(tmp_path, **{key: value}), "--data", tmp_path / "nowhere",
                        "--out", tmp_path / "out")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, says", [
    (["--epochs", "1,-1,1"], "--epochs: epochs must not be negative, got -1"),
    (["--lr=-1,1"], "--lr: lr must not be negative, got -1.0"),
    (["--lr", "nan,nan"], "--lr: lr must be a finite number, got nan"),
    (["--wd", "nan"], "--wd: wd must be a finite number, got nan"),
    (["--bs", "0,16"], "--bs: bs must be at least 1, got 0"),
    (["--sizes", "inf,224"], "argument --sizes: expected comma-separated integers, got 'inf,224'"),
    (["--valid-pct", "1"], "--valid-pct: valid_pct must be in [0, 1), got 1.0"),
])
def test_the_command_line_gets_the_checks_a_recipe_file_gets(tmp_path, flags, says):
    result = run_script("run.py", *flags, "--data", tmp_path / "nowhere", "--out", tmp_path / "out")
    assert result.returncode == 2, result.stderr
    assert says in result.stderr.strip().splitlines()[-1], result.stderr


def test_resume_with_another_recipe_file_of_the_same_name_is_refused(trained, tmp_path):
    same_name = tmp_path / "fastai_resnext50.toml"
    same_name.write_text(open(recipes.load()[0]).read().replace("wd = 1e-3", "wd = 5e-2"))
    assert "wd = 5e-2" in same_name.read_text()
    before = snapshot(trained)
    result = run_script("run.py", "--out", trained, "--resume", "--recipe", same_name)
    assert result.returncode == 2 and "--recipe" in result.stderr and "differs from the run's recipe" in result.stderr
    assert snapshot(trained) == before
    copy = shutil.copytree(trained, tmp_path / "copy")
    result = run_script("run.py", "--out", copy, "--resume", "--recipe", copy / "config.json", "--workers", 0)
    assert result.returncode == 0, result.stderr  # the run's own resolved recipe is the same recipe


def test_nothing_to_resume_names_what_is_missing(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"nothing to resume \(no checkpoint\.pth: no epoch has finished yet"):
        run.main(["--out", str(tmp_path / "run"), "--resume"])
    with pytest.raises(UserError, match=r"nothing to resume \(no config\.json and no checkpoint\.pth"):
        run.main(["--out", str(tmp_path / "empty"), "--resume"])


def test_recipes_readme_tables_are_the_declared_keys():
    """recipes/README.md's key tables are generated from recipe.Recipe and recipe.Stage, the one place a key is
    declared: a key added, renamed or re-documented there without regenerating the README fails here."""
    readme = (Path(__file__).resolve().parent.parent / "recipes" / "README.md").read_text()
    assert recipes.key_tables() in readme
    for name in [*recipes.RUN_KEYS, *recipes.STAGE_KEYS]:
        assert f"| `{name}` |" in readme


def test_the_recipes_box_margin_is_the_one_prepare_crops_with():
    """prepare/ sits below the recipe and cannot import it: the two literals are kept equal here."""
    from finegrained.images import BOX_MARGIN
    assert recipes.Recipe.bbox_margin == BOX_MARGIN


@pytest.mark.parametrize("script", ["runner", "lr_find", "models"])
def test_every_declared_flag_is_taken_by_each_script_and_becomes_its_override(script):
    """The recipe flags are generated from recipe.Recipe and recipe.Stage: a key declared with a flag is a flag of
    run.py (and train.py), lr_find.py and models.py at once, parsed to the key's type and handed to the recipe."""
    import importlib
    parse_args = importlib.import_module(f"finegrained.{script}" if script == "runner" else script).parse_args
    for name in recipes.RUN_FLAGS:
        declared = recipes.RUN_KEYS[name]
        flag = f"--{name.replace('_', '-')}"
        if declared.type is bool:
            argv, want = [f"--no-{name.replace('_', '-')}"], False
        elif declared.metadata["choices"]:
            argv, want = [flag, declared.metadata["choices"][-1]], declared.metadata["choices"][-1]
        else:
            want = declared.type(1) if declared.type is not str else "resnet18"
            argv = [flag, str(want)]
        assert recipes.overrides(parse_args(argv)) == {name: want}, name
    stage_flags = [f for f in recipes.STAGE_FLAGS if not (script == "lr_find" and f in ("epochs", "lr"))]
    given = recipes.overrides(parse_args([*[a for f in stage_flags for a in (f"--{f}", "2,3" if f != "wd" else "0.5")]]))
    assert given == {f: (0.5 if f == "wd" else [2, 3] if recipes.STAGE_KEYS[recipes.STAGE_FLAGS[f]].type is int else [2.0, 3.0])
                     for f in stage_flags}


def test_unnamed_stages_are_numbered_not_named_after_the_recipe(tmp_path):
    """A recipe's name is not a default for its stages' names (history.csv and the per-stage seconds tell stages
    apart by name)."""
    toml = tmp_path / "two.toml"
    toml.write_text('arch = "resnet18"\n[[stages]]\nepochs = 1\n[[stages]]\nepochs = 2\nname = "late"\n')
    where, raw = recipes.load(str(toml))
    assert [s["name"] for s in recipes.resolve(raw, where=where)["stages"]] == ["stage1", "late"]
