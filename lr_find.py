"""The learning-rate range test (fastai's LR finder) before a stage of a recipe: a plot of
loss against learning rate, saved as a PNG with fastai's suggestions marked, and printed.

    python lr_find.py --stage frozen                              # loss_plot_frozen.png
    python lr_find.py --stage unfrozen --model runs/NAME          # after the frozen stage, as the original did
    python lr_find.py --recipe resnets_sgd --stage unfrozen       # another recipe's model, optimizer and data

The model, head, loss, optimizer and data settings come from the recipe (--recipe, default
fastai_resnext50), the image and batch size from its first stage that trains that way. It prints fastai's four
suggestions and the run.py command line that trains that stage at the one fastai uses by default (valley):

    use: python run.py --lr 0.01,0.0012      (--lr as run.py reads it: per stage, or per run of stages sharing one)"""
import json
import sys
from pathlib import Path

from finegrained import cli
from finegrained import recipe as recipes
from finegrained.errors import UserError
from finegrained.files import write_json

USED = "valley"   # the suggestion printed as a run.py flag: fastai's default (Learner.lr_find's suggest_funcs)
DEFAULT_DATA = "data/stanford_cars"


def lr_values(recipe, index, lr):
    """run.py's --lr values that give stage `index` (and the stages after it that share its lr and its way of training)
    the head lr `lr`, every other stage its recipe's: one value per run of stages sharing an lr when that says it,
    else one per stage (recipe._spread reads both). Under lr_rule "linear" the recipe's lr is for 256 images, so the
    value is lr x 256 / the stage's bs, which the stage trains at as `lr`."""
    stages = recipe["stages"]
    value = lr * 256 / stages[index]["bs"] if recipe["lr_rule"] == "linear" else lr
    runs = recipes._runs([s["lr"] for s in stages])
    group = next(r for r in runs if index in r)
    targets = [i for i in group if i >= index and stages[i]["train"] == stages[index]["train"]]
    targets = [i for k, i in enumerate(targets) if i == index + k]     # consecutive from the measured stage
    new = [value if i in targets else s["lr"] for i, s in enumerate(stages)]
    text = [f"{v:.3g}" if i in targets else str(v) for i, v in enumerate(new)]  # the recipe's own, exactly
    if all(len({text[i] for i in r}) == 1 for r in runs):
        text = [text[r[0]] for r in runs]
    return ",".join(text), targets


def run_command(args, recipe, given, index, lr):
    """(the run.py command line that trains the recipe lr_find measured, with stage `index` at `lr`; the stages it sets)."""
    import shlex
    flags = ["--recipe", args.recipe] if args.recipe else []
    flags += ["--data", str(args.data)] if str(args.data) != DEFAULT_DATA else []
    flags += ["--weights", str(args.weights)] if args.weights else []
    for key, value in given.items():   # the recipe settings given here, as run.py spells them
        name = key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(f"--{name}" if value else f"--no-{name}")
        else:  # str() of a float is its shortest exact spelling: run.py reads back the very value
            flags += [f"--{name}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    values, targets = lr_values(recipe, index, lr)
    return shlex.join(["python", "run.py", *flags, "--lr", values]), targets


def measured(args):
    """(the resolved recipe, the recipe settings the flags give, the index of the stage the test is for: the first that
    trains that way, else the first). With --model, the trained model's architecture and head."""
    where, raw = recipes.load(args.recipe)
    given = recipes.overrides(args)
    recipe = recipes.resolve(raw, given, where)
    if args.model and (Path(args.model) / "model.json").exists():  # the trained model's own architecture and head
        try:
            meta = json.loads((Path(args.model) / "model.json").read_text())
            if not isinstance(meta, dict):
                raise ValueError(f"a JSON {type(meta).__name__}, not an object")
        except (ValueError, OSError) as err:
            raise UserError(f"{Path(args.model) / 'model.json'}: not a readable model description ({err})")
        recipe.update(arch=meta.get("arch", recipe["arch"]), head=meta.get("head", recipe["head"]))
        if recipe["head"] == "bilinear":
            from finegrained.models import saved_head_options
            recipe["bilinear_dim"] = saved_head_options(meta, Path(args.model) / "model.json").get("bilinear_dim") or 0
        given.update(arch=recipe["arch"], head=recipe["head"], **({"bilinear_dim": recipe["bilinear_dim"]}
                                                                  if recipe["head"] == "bilinear" else {}))
    want = "frozen" if args.stage == "frozen" else "all"
    return recipe, given, next((i for i, s in enumerate(recipe["stages"]) if s["train"] == want), 0)


def parse_args(argv=None):
    p = cli.parser(__doc__)
    cli.add_data(p, DEFAULT_DATA)
    cli.add_recipe(p, resume=False)
    recipes.add_flags(p, skip=("epochs", "lr"))  # the test finds the lr; epochs do not change it
    cli.add_weights(p)
    p.add_argument("--stage", choices=["frozen", "unfrozen"], default="frozen",
                   help="test with the body frozen (except BatchNorm) or unfrozen")
    p.add_argument("--model", default=None,
                   help="start from this trained model folder (from run.py) instead of the backbone's ImageNet weights")
    p.add_argument("--start-lr", type=float, default=1e-7, help="smallest learning rate tried")
    p.add_argument("--end-lr", type=float, default=10.0, help="largest learning rate tried")
    p.add_argument("--num-it", type=int, default=100, help="number of mini-batches (learning rates) tried")
    cli.add_workers(p)
    cli.add_device(p)
    p.add_argument("--out", default=".", help="folder for loss_plot_<stage>.png and lr_find_<stage>.json (a run folder "
                                              "you then train into with run.py --out: its report shows the plot)")
    args = p.parse_args(argv)
    if args.num_it < 30:
        p.error(f"--num-it must be at least 30 (fastai's suggestions need that many points), got {args.num_it}")
    return args


def main(argv=None):
    args = parse_args(argv)
    from fastai.callback.schedule import minimum, slide, steep, valley
    from fastai.torch_core import set_seed
    from finegrained.prepare.tables import check_table_images, read_table
    from finegrained.models import build_learner, load_trained
    from finegrained.plots import LR_FIND_JSON, LR_FIND_PNG, SUGGESTIONS, lr_find_plot  # in --out; run.py's report shows the plots
    from finegrained.devices import choose, prepare
    from finegrained.train import show_bars

    recipe, given, index = measured(args)
    stage = recipe["stages"][index]
    size, bs = stage["size"], stage["bs"]
    data = Path(args.data)
    if not data.is_dir():
        raise UserError(f"{data}: no such data folder (prepare it first: python data.py --dataset cars --root data)")
    device = choose(args.device)
    set_seed(recipe["seed"])
    train_df = read_table(data / "train.csv")
    check_table_images(train_df, data / "train.csv")
    learn = build_learner(recipe, train_df, stage, workers=args.workers, weights=args.weights,
                          pretrained=args.model is None)
    dls, arch = learn.dls, recipe["arch"]
    if args.model:
        trained, meta = load_trained(args.model)
        if len(meta["classes"]) != dls.c:
            raise UserError(f"{args.model}: model has {len(meta['classes'])} classes, the data has {dls.c}")
        learn.model.load_state_dict(trained.state_dict())
    learn.freeze() if args.stage == "frozen" else learn.unfreeze()
    show_bars(learn, sys.stdout.isatty())
    print(f"LR range test, {args.stage} {arch} on {prepare(learn, device)[0]}")
    funcs = (valley, steep, minimum, slide)
    try:
        found = learn.lr_find(start_lr=args.start_lr, end_lr=args.end_lr, num_it=args.num_it, show_plot=False, suggest_funcs=funcs)
    except IndexError:  # fastai's suggestion functions, when the loss diverged after only a few points
        raise UserError(f"the loss diverged after {len(learn.recorder.losses)} of {args.num_it} learning rates, too few to "
                        f"suggest one; try a smaller --end-lr (now {args.end_lr:g}) or a larger --num-it")
    suggestions = {f.__name__: float(v) for f, v in zip(funcs, found)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / LR_FIND_PNG.format(stage=args.stage)
    rec = learn.recorder
    lr_find_plot(rec.lrs, rec.losses, suggestions, USED, png,
                 f"LR range test: {arch}, stage {index + 1} ({stage['name']}"
                 f"{'' if stage['name'] == args.stage else ', ' + args.stage}), {size} px, batch {bs}")
    # the points fastai suggested from (it leaves out the first tenth and the last five), to check or replot them
    curve = {"lr": [float(v) for v in rec.lrs[args.num_it // 10:-5]],
             "loss": [float(v) for v in rec.losses[args.num_it // 10:-5]]}
    command, targets = run_command(args, recipe, given, index, suggestions[USED])
    write_json(out / LR_FIND_JSON.format(stage=args.stage), {**suggestions, "used": USED, "stage": index + 1, "run": command,
                                                           "curve": curve})
    print("fastai's suggestions (each marked on the plot at this very value):")
    for n, v in suggestions.items():
        print(f"{n:>8}: {v:.3g}  {SUGGESTIONS[n]}{' (fastai default, used below)' if n == USED else ''}")
    names = ", ".join(f"{i + 1} ({recipe['stages'][i]['name']})" for i in targets)
    rule = " (the recipe's lr_rule scales it by batch / 256)" if recipe["lr_rule"] == "linear" else ""
    print(f"use: {command}")
    print(f"     the head's max lr of stage{'s' if len(targets) > 1 else ''} {names} becomes {suggestions[USED]:.3g}{rule}; "
          f"earlier parameter groups get it / lr_div ({stage['lr_div']:g})")
    print(f"plot: {png}")


if __name__ == "__main__":
    cli.run(main)
