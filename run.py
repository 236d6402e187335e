"""The published Stanford Cars recipe end to end (../shared/REFERENCE.md §1, seeds/000), on today's fastai.

  model   ImageNet-pretrained ResNeXt50-32x4d, fastai's concat-pool head, 3 parameter groups
  optim   AdamW (beta2 0.99; beta1 cycled 0.95-0.85-0.95 by one-cycle), weight decay 1e-3, one-cycle per stage
  stage 1 body frozen except BatchNorm, 20 epochs, 224 px, batch 32, max lr 1e-2 on the head, /3 per earlier group
  stage 2 unfrozen, 40 epochs, 224 px, batch 32, max lr 3e-3, /3 per earlier group
  stage 3 progressive resize: 40 epochs, 299 px, batch 16, same lrs
  data    fastai's default augmentation, ImageNet normalization, no validation split (all of train)
Then the test set is scored once: every image, in order, no augmentation."""
import json
import sys
import time
from pathlib import Path

import cli
from cli import UserError


RUN_FILES = ("progress.json", "history.csv", "checkpoint.pth", "model.safetensors", "metrics.json")


def parse_args(argv=None):
    p = cli.parser(__doc__)
    cli.add_data(p)
    cli.add_model_choice(p)
    p.add_argument("--epochs", type=cli.int_list, default="20,40,40", help="epochs of the frozen, unfrozen and resized stages")
    p.add_argument("--sizes", type=cli.int_list, default="224,299", help="image size of stages 1-2, then of stage 3")
    p.add_argument("--bs", type=cli.int_list, default="32,16", help="batch size of stages 1-2, then of stage 3")
    p.add_argument("--lr", type=cli.float_list, default="1e-2,3e-3",
                   help="max learning rate of the head in the frozen stage, then in the unfrozen stages")
    p.add_argument("--wd", type=float, default=1e-3, help="AdamW weight decay")
    cli.add_common_training(p)
    p.add_argument("--out", default="runs/resnext50", help="folder for the model, checkpoints, history and metrics")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last completed epoch")
    args = p.parse_args(argv)
    for name, n in (("epochs", 3), ("sizes", 2), ("bs", 2), ("lr", 2)):
        if len(getattr(args, name)) != n:
            p.error(f"--{name} takes {n} comma-separated values, got {getattr(args, name)}")
    if not 0 <= args.valid_pct < 1:
        p.error(f"--valid-pct must be in [0, 1), got {args.valid_pct}")
    return args


def recipe_stages(args):
    from train import Stage
    (e1, e2, e3), (s1, s2), (b1, b2), (lr1, lr2) = args.epochs, args.sizes, args.bs, args.lr
    stages = [Stage("frozen", e1, s1, b1, lr1, frozen=True), Stage("unfrozen", e2, s1, b1, lr2, frozen=False),
              Stage("resized", e3, s2, b2, lr2, frozen=False)]
    return [s for s in stages if s.epochs > 0]


def score(learn, test_df):
    """Top-1 and top-5 accuracy over every row of the test CSV, once each, without augmentation."""
    from data import eval_dl
    vocab = list(learn.dls.vocab)
    unknown = test_df.index[~test_df["class_id"].isin(vocab)]
    if len(unknown):
        raise UserError(f"test.csv, row {unknown[0] + 1}: class_id {test_df['class_id'][unknown[0]]} never occurs in train.csv")
    preds, targets = learn.get_preds(dl=eval_dl(learn.dls, test_df))
    top5 = preds.topk(min(5, preds.shape[1]), dim=1).indices
    return {"test_top1": float((top5[:, 0] == targets).float().mean()),
            "test_top5": float((top5 == targets[:, None]).any(1).float().mean()), "test_images": len(targets)}


def model_meta(args, learn, train_df):
    from data import BOX_MARGIN, IMAGENET_STATS, class_names
    names = class_names(train_df)
    return {"arch": args.arch, "classes": [{"id": int(c), "name": names[int(c)]} for c in learn.dls.vocab],
            "image_size": args.sizes[1] if args.epochs[2] else args.sizes[0], "resize": "crop",
            "normalize": {"mean": IMAGENET_STATS[0], "std": IMAGENET_STATS[1]},
            "crop_bbox": args.crop_bbox, "bbox_margin": BOX_MARGIN}


def main(argv=None):
    args = parse_args(argv)
    from fastai.torch_core import set_seed
    from data import check_table_images, get_dls, read_table
    from models import create_learner, save_trained
    from dataclasses import asdict
    from train import run_stages, use_device

    data, out = Path(args.data), Path(args.out)
    if not data.is_dir():
        raise UserError(f"{data}: no such data folder (prepare it first: python data.py --dataset cars --root data)")
    if any((out / name).exists() for name in RUN_FILES) and not args.resume:
        raise UserError(f"{out}: already holds a run; pass --resume to continue it, or choose another --out")
    if args.resume and not (out / "progress.json").exists():
        raise UserError(f"{out}: nothing to resume (no progress.json)")
    train_df, test_df = read_table(data / "train.csv"), read_table(data / "test.csv")
    check_table_images(train_df, data / "train.csv")
    check_table_images(test_df, data / "test.csv")
    stages = recipe_stages(args)
    set_seed(args.seed)

    def make_dls(size, bs):
        return get_dls(train_df, size, bs, args.valid_pct, args.seed, args.crop_bbox, balance=args.balance, workers=args.workers)

    learn = create_learner(make_dls(stages[0].size, stages[0].bs), args.arch, pretrained=not args.no_pretrained,
                           weights=args.weights, loss=args.loss, wd=args.wd, path=out)
    device = use_device(learn)
    print(f"training {args.arch} on {device}", file=sys.stderr if "CPU" in device else sys.stdout)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({**vars(args), "stages": [asdict(s) for s in stages]}, indent=2))
    started = time.time()
    seconds = run_stages(learn, stages, make_dls, out, resume=args.resume)
    eval_started = time.time()
    metrics = score(learn, test_df)
    metrics.update(seconds_per_stage=seconds, scoring_seconds=round(time.time() - eval_started, 2),
                   total_seconds=round(time.time() - started, 2), device=device)
    save_trained(learn.model, out, model_meta(args, learn, train_df))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"test accuracy: {metrics['test_top1']:.4f} (top-5 {metrics['test_top5']:.4f}) on {metrics['test_images']} images")
    print(f"model, history.csv and metrics.json are in {out}")


if __name__ == "__main__":
    cli.run(main)
