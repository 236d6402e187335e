"""The learning-rate range test (fastai's LR finder) before a stage of a recipe: a plot of
loss against learning rate, saved as a PNG with fastai's suggestions marked, and printed.

    python lr_find.py --stage frozen                              # loss_plot_frozen.png
    python lr_find.py --stage unfrozen --model runs/NAME          # after the frozen stage, as the original did
    python lr_find.py --recipe resnets_sgd --stage unfrozen       # another recipe's model, optimizer and data

The model, head, loss, optimizer and data settings come from the recipe (--recipe, default
fastai_resnext50), the image and batch size from its first stage that trains that way."""
import json
import sys
from pathlib import Path

from finegrained import cli
from finegrained.errors import UserError
from finegrained.files import save_png, write_json


def parse_args(argv=None):
    p = cli.parser(__doc__)
    cli.add_data(p)
    cli.add_recipe(p)
    cli.add_model_choice(p)
    p.add_argument("--stage", choices=["frozen", "unfrozen"], default="frozen",
                   help="test with the body frozen (except BatchNorm) or unfrozen")
    p.add_argument("--model", default=None,
                   help="start from this trained model folder (from run.py) instead of the backbone's ImageNet weights")
    p.add_argument("--size", type=int, default=None, help="image size (default: from the recipe's stage)")
    p.add_argument("--bs", type=int, default=None, help="batch size (default: from the recipe's stage)")
    p.add_argument("--start-lr", type=float, default=1e-7, help="smallest learning rate tried")
    p.add_argument("--end-lr", type=float, default=10.0, help="largest learning rate tried")
    p.add_argument("--num-it", type=int, default=100, help="number of mini-batches (learning rates) tried")
    p.add_argument("--wd", type=float, default=None, help="weight decay (default: from the recipe's stage)")
    cli.add_common_training(p)
    p.add_argument("--out", default=".", help="folder for loss_plot_<stage>.png and lr_find_<stage>.json")
    args = p.parse_args(argv)
    if args.num_it < 30:
        p.error(f"--num-it must be at least 30 (fastai's suggestions need that many points), got {args.num_it}")
    return args


def main(argv=None):
    args = parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from fastai.callback.schedule import minimum, slide, steep, valley
    from fastai.torch_core import set_seed
    from finegrained.data import dls_args, get_dls
    from finegrained.prepare.tables import check_table_images, read_table
    from finegrained.models import create_learner, learner_args, load_trained
    from finegrained.train import show_bars, use_device

    from finegrained import recipe as recipes
    where, raw = recipes.load(args.recipe)
    recipe = recipes.resolve(raw, recipes.overrides(args), where)
    if args.model and (Path(args.model) / "model.json").exists():  # the trained model's own architecture and head
        meta = json.loads((Path(args.model) / "model.json").read_text())
        recipe.update(arch=meta.get("arch", recipe["arch"]), head=meta.get("head", recipe["head"]))
        if recipe["head"] == "bilinear":
            recipe["bilinear_dim"] = (meta.get("head_options") or {}).get("reduce_ch") or 0
    want = "frozen" if args.stage == "frozen" else "all"
    stage = next((s for s in recipe["stages"] if s["train"] == want), recipe["stages"][0])
    size, bs = args.size or stage["size"], args.bs or stage["bs"]
    data = Path(args.data)
    if not data.is_dir():
        raise UserError(f"{data}: no such data folder (prepare it first: python data.py --dataset cars --root data)")
    set_seed(recipe["seed"])
    train_df = read_table(data / "train.csv")
    check_table_images(train_df, data / "train.csv")
    dls = get_dls(train_df, size, bs, **dls_args(recipe), workers=args.workers)
    arch = recipe["arch"]
    learn = create_learner(dls, weights=args.weights, **{**learner_args(recipe, stage),
                                                         "pretrained": recipe["pretrained"] and args.model is None})
    if args.model:
        trained, meta = load_trained(args.model)
        if len(meta["classes"]) != dls.c:
            raise UserError(f"{args.model}: model has {len(meta['classes'])} classes, the data has {dls.c}")
        learn.model.load_state_dict(trained.state_dict())
    learn.freeze() if args.stage == "frozen" else learn.unfreeze()
    show_bars(learn, sys.stdout.isatty())
    print(f"LR range test, {args.stage} {arch} on {use_device(learn)}")
    funcs = (minimum, steep, valley, slide)
    # fastai draws the plot with the suggestions marked only inside lr_find (plot_lr_find returns no figure)
    try:
        found = learn.lr_find(start_lr=args.start_lr, end_lr=args.end_lr, num_it=args.num_it, show_plot=True, suggest_funcs=funcs)
    except IndexError:  # fastai's suggestion functions, when the loss diverged after only a few points
        raise UserError(f"the loss diverged after {len(learn.recorder.losses)} of {args.num_it} learning rates, too few to "
                        f"suggest one; try a smaller --end-lr (now {args.end_lr:g}) or a larger --num-it")
    names = [f.__name__ for f in funcs]
    fig = plt.gcf()
    fig.axes[0].set_title(f"LR range test: {arch}, {args.stage}, {size} px")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"loss_plot_{args.stage}.png"
    save_png(fig, png, dpi=120, bbox_inches="tight")
    suggestions = {n: float(v) for n, v in zip(names, found)}
    # the points fastai suggested from (it leaves out the first tenth and the last five), to check or replot them
    rec = learn.recorder
    curve = {"lr": [float(v) for v in rec.lrs[args.num_it // 10:-5]],
             "loss": [float(v) for v in rec.losses[args.num_it // 10:-5]]}
    write_json(out / f"lr_find_{args.stage}.json", {**suggestions, "curve": curve})
    for n, v in suggestions.items():
        print(f"{n:>8}: {v:.2e}")
    print(f"plot: {png}")


if __name__ == "__main__":
    cli.run(main)
