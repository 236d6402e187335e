"""Train a recipe end to end, then score the test set once. The default is the published Stanford Cars
recipe (the fastai ResNeXt50 write-up, recipes/fastai_resnext50.toml):

  model   ImageNet-pretrained ResNeXt50-32x4d, fastai's concat-pool head, 3 parameter groups
  optim   AdamW (beta2 0.99; beta1 cycled 0.95-0.85-0.95 by one-cycle), weight decay 1e-3, one-cycle per stage
  stage 1 body frozen except BatchNorm, 20 epochs, 224 px, batch 32, max lr 1e-2 on the head, /3 per earlier group
  stage 2 unfrozen, 40 epochs, 224 px, batch 32, max lr 3e-3, /3 per earlier group
  stage 3 progressive resize: 40 epochs, 299 px, batch 16, same lrs
  data    fastai's default augmentation, ImageNet normalization, no validation split (all of train)

Other write-ups' systems: --recipe NAME (recipes/README.md); --show prints a recipe resolved and exits.
Every flag below overrides its part of the recipe. The test set is scored once at the end: every image,
in order, no augmentation; nothing is ever chosen on it."""
import contextlib
import hashlib
import itertools
import json
import sys
import time
from pathlib import Path


from finegrained import cli, files, recipe as recipes
from finegrained.errors import UserError
from finegrained.files import write_json

CHECKPOINT, WEIGHTS = "checkpoint.pth", "model.safetensors"
RUN_FILES = ("progress.json", "history.csv", CHECKPOINT, WEIGHTS, "metrics.json")
DEFAULT_DATA = "data/stanford_cars"
DATA_TABLES = ("train.csv", "test.csv")


def parse_args(argv=None, description=__doc__):
    p = cli.parser(description)
    p.add_argument("--data", default=None, help=f"prepared dataset folder holding train.csv and test.csv "
                                                f"(default: {DEFAULT_DATA}; with --resume, the run's)")
    cli.add_recipe(p)
    p.add_argument("--show", action="store_true", help="print the recipe, resolved with the flags given, and exit")
    recipes.add_flags(p)
    cli.add_weights(p)
    cli.add_workers(p)
    p.add_argument("--out", default=None, help="folder for the model, checkpoints, history and metrics (default: "
                                               "runs/<recipe>-<arch>-<dataset>, numbered -2, -3, ... when taken)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last completed epoch, with the run's recipe and data")
    p.add_argument("--tracker", choices=["none", "tensorboard", "wandb", "mlflow"], default="none",
                   help="log every epoch's metrics, the learning rates and the recipe, offline, under --out "
                        "(optional packages: make trackers)")
    p.add_argument("--sanity", action="store_true",
                   help="only check the data and model first (as the Cars localization write-up does): the untrained loss is about ln(classes), and "
                        "the model overfits 20 images of 2 classes; exit status 1 when a check fails")
    p.add_argument("--sync-bn", action="store_true",
                   help="data-parallel on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)")
    cli.add_device(p, refuses=True)
    p.add_argument("--log-every", type=float, default=60.0, metavar="SECONDS",
                   help="when stdout is not a terminal (a log file): a progress line (loss, lr, images/s, the ETA of the "
                        "stage and the run) every SECONDS of training, besides the line at each epoch's end")
    p.add_argument("--keep-checkpoint", action="store_true",
                   help=f"keep {CHECKPOINT} (model, optimizer and random state, for --resume) when the run finishes; "
                        "by default it is removed then (model.safetensors is the trained model)")
    args = p.parse_args(argv)
    if args.log_every < 0:
        p.error(f"--log-every must be 0 (a line after every batch) or more seconds, got {args.log_every:g}")
    return args


def resolve(args):
    """(recipe, data folder, out folder or None for the default, config.json's content) from the flags; with
    --resume, the run's own, refusing any flag that differs. config.json keeps the resolved recipe (what
    `--recipe config.json` runs again), and the recipe file and flags it was resolved from."""
    given = recipes.overrides(args)
    if args.resume:
        if args.out is None:
            raise UserError("--resume needs --out, the run folder to continue")
        out = Path(args.out)
        config_path = out / "config.json"
        missing = [name for name in ("config.json", CHECKPOINT) if not (out / name).exists()]
        if missing == [CHECKPOINT] and finished(out):  # its checkpoint was removed when it ended: scored again
            missing = []
        if missing:
            why = ("no epoch has finished yet; start it again without --resume" if missing == ["checkpoint.pth"]
                   else "not a run folder of run.py")
            raise UserError(f"{out}: nothing to resume (no {' and no '.join(missing)}: {why})")
        try:
            config = json.loads(config_path.read_text())
            source, run_given = config["source"], config["overrides"]
            run_recipe = recipes.resolve(source, run_given, str(config_path))
            config["run"]["data"]  # a run configuration names its data folder (a KeyError otherwise)
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{config_path}: not a run configuration ({type(err).__name__}: {err})")
        if args.recipe is not None and not same_recipe(recipes.load(args.recipe)[1], run_given, run_recipe):
            raise UserError(f"--recipe {args.recipe} differs from the run's recipe ({config_path}); "
                            "resume continues the run as it started")
        diff = recipes.differences(run_recipe, source, run_given, given)
        if diff:
            raise UserError(f"{diff} ({config_path}); resume continues the run as it started: drop the flag, "
                            "or start a new run with another --out")
        return run_recipe, resumed_data(config, config_path, args.data), out, config
    where, raw = recipes.load(args.recipe)
    recipe = recipes.resolve(raw, given, where)
    config = {"recipe": recipe, "source": raw, "overrides": given}  # the source and flags, to check a resume against
    return recipe, Path(args.data or DEFAULT_DATA), Path(args.out) if args.out else None, config


def dataset_name(data):
    """The dataset's name: its data folder's (stanford_cars), with the folder above for a resized copy."""
    data = Path(data).resolve()
    return f"{data.parent.name}-{data.name}" if data.name.startswith("resized_") else data.name


def finished(out):
    """Whether the run in `out` has finished: its trained model is written (before the checkpoint is removed)."""
    return all((Path(out) / name).is_file() for name in (WEIGHTS, "model.json"))


def default_out(recipe, data, claim=True, root=Path("runs")):
    """runs/<recipe>-<arch>-<dataset> (the dataset being the data folder's name), or the first of -2, -3, ... not yet
    taken, as timm numbers its output folders. With `claim` the folder is made here, by mkdir, which fails for a
    folder that exists: two runs started together never get the same one."""
    base = f"{recipe['name']}-{recipe['arch'].replace('/', '_')}-{dataset_name(data)}"
    for n in itertools.count(1):
        out = root / (base if n == 1 else f"{base}-{n}")
        if not claim:
            return out
        try:
            root.mkdir(parents=True, exist_ok=True)
            out.mkdir()
            return out
        except FileExistsError:
            continue


def same_recipe(raw, run_given, run_recipe):
    """Whether the recipe `raw` (a recipe file, with the run's own flags; or a run's config.json, resolved already)
    is the recipe the run resolved to."""
    for given in (run_given, {}):
        try:
            if recipes.resolve(raw, given) == run_recipe:
                return True
        except UserError:  # the run's flags do not fit it (another number of stages)
            pass
    return False


def data_checksums(data):
    """{csv name: sha256} of the tables a run trains and scores on, recorded in config.json to check a resume."""
    return {name: hashlib.sha256((Path(data) / name).read_bytes()).hexdigest() for name in DATA_TABLES}


def resumed_data(config, config_path, given):
    """The data folder a resume trains on: the run's own (an absolute path), holding the very tables it started
    with; or --data, when it holds them too (the folder was moved). Anything else is refused in one line."""
    run = config["run"]
    recorded = run.get("data_sha256")
    if recorded is None:  # written before runs kept their data's checksums
        if given is None:
            raise UserError(f"{config_path}: this run was started before runs recorded their data's checksums, so "
                            f"its data folder ({run['data']}, relative to where it was started) cannot be checked; "
                            "pass --data with that folder to resume it")
        return Path(given)
    data = Path(given) if given is not None else Path(run["data"])
    if not all((data / name).is_file() for name in DATA_TABLES):
        raise UserError(f"{data}: no train.csv and test.csv here, but the run ({config_path}) trained on them; "
                        "pass --data with the folder they were moved to")
    changed = [name for name, digest in data_checksums(data).items() if recorded.get(name) != digest]
    if changed:
        raise UserError(f"{data / changed[0]}: not the table the run started with (its checksum differs from "
                        f"{config_path}'s); resume needs the same data: restore it, or start a new run")
    return data


def score(learn, test_df):
    """(metrics, (true, predicted)): evaluate.model_scores of every row of the test CSV, once each, without
    augmentation (test_top1, test_top5, test_images), and each row's true and predicted class (model output indices)
    for the per-class table. For a localize model also the mean IoU of its boxes and the share with IoU >= 0.5, on
    the original images' pixels as test.py reports them, over the rows that have a box."""
    import torch
    from finegrained.boxes import LocalizeLoss, predicted_devkit
    from finegrained.data import dls_frame, eval_dl
    from finegrained.evaluate import model_scores, predicted

    vocab = list(learn.dls.vocab)
    unknown = test_df.index[~test_df["class_id"].isin(vocab)]
    if len(unknown):
        raise UserError(f"test.csv, row {unknown[0] + 1}: class_id {test_df['class_id'][unknown[0]]} never occurs in train.csv")
    if not isinstance(learn.loss_func, LocalizeLoss):
        probs, targets = learn.get_preds(dl=eval_dl(learn.dls, test_df))
        metrics = model_scores(probs, targets, prefix="test_")
    else:
        # images only: the classes come from the table, and a row without a box is still scored for its class
        dl = learn.dls.test_dl(test_df, bs=learn.dls.bs, shuffle=False, drop_last=False)
        (probs, boxes), _ = learn.get_preds(dl=dl)
        targets = torch.tensor([vocab.index(c) for c in test_df["class_id"]])
        paths = [Path(test_df.attrs["folder"]) / f for f in test_df["filename"]]
        metrics = model_scores(probs, targets, predicted_devkit(boxes, paths, *dls_frame(learn.dls)), test_df, prefix="test_")
    return metrics, (targets.numpy(), predicted(probs))


def model_meta(recipe, learn, train_df):
    """model.json: what test.py and models.load_trained need to rebuild and feed the model, without unpickling."""
    from finegrained.data import IMAGENET_STATS
    from finegrained.prepare.tables import class_names
    from finegrained.models import head_options
    names = class_names(train_df)
    meta = {"arch": recipe["arch"], "head": recipe["head"], "head_options": head_options(recipe), "recipe": recipe["name"],
            "classes": [{"id": int(c), "name": names[int(c)]} for c in learn.dls.vocab],
            "image_size": recipes.final_size(recipe), "resize": recipe["resize"], "crop_pct": recipe["crop_pct"],
            "normalize": {"mean": IMAGENET_STATS[0], "std": IMAGENET_STATS[1]},
            "crop_bbox": recipe["crop_bbox"], "bbox_margin": recipe["bbox_margin"]}
    if recipe["head"] == "localize":
        meta.update(box_loss=recipe["box_loss"], box_lambda=recipe["box_lambda"])
    return meta


def sanity_checks(args, recipe, train_df, first):
    """run.py --sanity: the Cars localization write-up's checks on this data and model, printed with their numbers; exit 1 on a failure."""
    from finegrained import sanity
    from finegrained.models import build_learner
    from finegrained.train import show_bars

    def make_learner(df, size, bs):  # every row trains, each as often: no validation split, no balancing, no boxes
        learn = build_learner(recipe, df, vars(first), size, bs, args.workers, args.weights, boxes=False,
                              valid_pct=0.0, balance=False)
        show_bars(learn, sys.stdout.isatty())
        return learn
    results = sanity.run_checks(make_learner, train_df, size=first.size, bs=min(first.bs, 10), lr=first.lr,
                                seed=recipe["seed"])
    print(sanity.format_results(results))
    if not sanity.all_passed(results):
        raise SystemExit(1)


def write_run_report(out, recipe, metrics, data, train_df, test_df, classes, predictions):
    """report.html, one self-contained page titled by the architecture, recipe and dataset: the metrics, the data
    folder and its classes, the recipe as tables, the training curves, the augmented training batch, the LR range
    tests run into this folder (lr_find.py --out), and the test set's accuracy per class. `classes`: model.json's;
    `predictions`: (true, predicted) model output indices of every test row (score's), or None (train.py)."""
    from finegrained.plots import BATCH_PNG, LR_FIND_JSON, LR_FIND_PNG
    from finegrained.report import Png, class_table, per_class_table, report_sections, write_report
    from finegrained.train import CURVES
    lr_plots = []
    for stage in ("frozen", "unfrozen"):
        try:
            found = json.loads((out / LR_FIND_JSON.format(stage=stage)).read_text())
            caption = f"{stage}: suggested {found['used']} {found[found['used']]:.3g}; {found['run']}"
        except (OSError, ValueError, KeyError, TypeError):   # a plot without its suggestions (or from an older lr_find)
            caption = f"{stage}: the LR range test"
        lr_plots.append(Png(out / LR_FIND_PNG.format(stage=stage), caption))
    data_info = {"data folder": str(Path(data).resolve()), "train images": len(train_df), "test images": len(test_df),
                 "classes": len(classes)}
    write_report(out / "report.html", f"{recipe['arch']} · {recipe['name']} · {dataset_name(data)}", report_sections(
        metrics=metrics, data=data_info, classes=class_table(classes, train_df["class_id"], test_df["class_id"]),
        recipe=recipe, curves=out / CURVES, batch=out / BATCH_PNG, lr_find=lr_plots,
        per_class=per_class_table(*predictions, classes) if predictions is not None else None))


def seconds_per_stage(out):
    """Training seconds of each stage from history.csv, so that a resumed run counts the time before the kill too."""
    import pandas as pd
    history = pd.read_csv(out / "history.csv")
    return {str(k): round(float(v), 2) for k, v in history.groupby("stage", sort=False)["seconds"].sum().items()}


def load_weights(learn, path):
    """A finished run's model.safetensors into `learn.model` (safetensors: nothing is unpickled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        learn.model.load_state_dict(load_file(str(path)))
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise UserError(f"{path}: not this run's model ({type(err).__name__}: {str(err).splitlines()[0][:200]})")


def main(argv=None, score_test=True, description=__doc__):
    """run.py; train.py with `score_test` False: the same run, without the test set's score."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parse_args(argv, description)
    from finegrained import devices, distributed
    device = None if args.show else devices.choose(args.device)  # before the processes of a data-parallel run pair up
    world = distributed.setup()  # first of what trains: torchrun / accelerate launch start one of these per process
    recipe, data, out, config = resolve(args)
    if args.show:
        print(recipes.describe(recipe))
        return
    if not data.is_dir():
        raise UserError(f"{data}: no such data folder (prepare it first: python data.py --dataset cars --root data)")
    claimed = out is None and not args.sanity and distributed.is_main()  # checks write nothing; rank 0 writes
    if out is None:
        out = default_out(recipe, data, claim=claimed)
    try:
        with contextlib.ExitStack() as held:  # the run folder's lock, from the first write to the last
            train_and_score(args, argv, recipe, data, out, config, world, held, device, score_test)
    except BaseException:
        if claimed and not any(out.iterdir()):  # refused before its first write: no empty folder left behind
            out.rmdir()
        raise
    finally:
        distributed.teardown()


def refuse_existing_run(out, resume):
    if any((out / name).exists() for name in RUN_FILES) and not resume:
        raise UserError(f"{out}: already holds a run; pass --resume to continue it, or choose another --out")


def train_and_score(args, argv, recipe, data, out, config, world, held, device, score_test=True):
    """Train the recipe's stages (on every process of a data-parallel run), then, on the main process alone,
    score the test set once (unless not `score_test`) and write the model and metrics. A finished run resumed (its
    checkpoint removed when it ended) is scored again from its model.safetensors."""
    from finegrained import devices, distributed
    from fastai.torch_core import set_seed
    from finegrained.data import check_settings, dls_args
    from finegrained.images import default_workers
    from finegrained.prepare.tables import check_table_images, read_table
    from finegrained.models import build_learner, recipe_dls, save_trained
    from finegrained.train import Stage, epochs_left, run_stages, show_bars
    from finegrained.plots import BATCH_PNG, batch_grid

    refuse_existing_run(out, args.resume)
    train_df, test_df = read_table(data / "train.csv"), read_table(data / "test.csv")
    stages = [Stage(**s, lr_rule=recipe["lr_rule"]) for s in recipe["stages"]]
    rescore = args.resume and not (out / CHECKPOINT).exists()  # resolve() let it through: a finished run
    if args.sanity or rescore:
        left = []
    else:
        left = epochs_left(stages, out) if args.resume else [(s.epochs, s.size) for s in stages if s.epochs]
    check_settings(train_df, **dls_args(recipe))  # what would stop the run anyway, before its cost is estimated
    cost = devices.check_cpu_time(args.device, device, recipe, left, len(train_df), len(test_df),
                                  train_df["class_id"].nunique())  # before the images are read: refused early
    check_table_images(train_df, data / "train.csv")
    check_table_images(test_df, data / "test.csv")
    for stage in stages:  # the batch size is the global batch: refuse one that does not share out before training
        distributed.per_process_bs(stage.bs, world)
    set_seed(recipe["seed"])  # the same on every process: the same validation split everywhere
    workers = args.workers if args.workers is not None else max(1, default_workers() // distributed.local_world_size())

    def make_dls(size, bs):
        dls = recipe_dls(recipe, train_df, size, distributed.per_process_bs(bs, world), workers)
        distributed.seed_per_rank(recipe["seed"])  # each process its own augmentations
        return dls

    first = next(s for s in stages if s.epochs)
    if args.sanity:
        return sanity_checks(args, recipe, train_df, first)
    learn = build_learner(recipe, train_df, vars(first), bs=distributed.per_process_bs(first.bs, world), workers=workers,
                          weights=args.weights, path=out)
    distributed.seed_per_rank(recipe["seed"])
    where, precision = devices.prepare(learn, device)
    if device == "cpu":
        why = "--device cpu" if args.device == "cpu" else f"no usable GPU: {devices.cuda_problem()}"
        where += f" ({'; '.join(filter(None, (why, cost)))})"
    if world > 1:
        where = f"{world} processes (data-parallel), each on {where}"
    if distributed.is_main():
        held.enter_context(files.folder_lock(out))  # one process per run folder (rank 0 writes for a data-parallel run)
        refuse_existing_run(out, args.resume)  # again, now that no other run can be writing here
        print(f"training {recipe['arch']} ({recipe['name']} recipe) on {where}",  # where: the device and its precision
              file=sys.stderr if device == "cpu" else sys.stdout, flush=True)
        out.mkdir(parents=True, exist_ok=True)
        if not args.resume:
            write_json(out / "config.json", {**config, "run": {"data": str(data.resolve()), "data_sha256": data_checksums(data),
                                                               "world_size": world, "argv": argv}})
        if not (out / BATCH_PNG).exists():   # what the model sees, before the first epoch: for the report
            from finegrained.prepare.tables import class_names
            batch_grid(learn.dls.train, out / BATCH_PNG, class_names(train_df))
    from finegrained.trackers import close_trackers, tracker_callbacks
    from finegrained import regularize
    trackers = tracker_callbacks(args.tracker, out, recipe) if distributed.is_main() else []
    regularizers = regularize.callbacks(recipe, learn.dls.c, resume_from=out if args.resume else None)
    started = time.time()
    try:
        if rescore:
            print(f"{out}: the run has finished (its {CHECKPOINT} was removed then): scoring its {WEIGHTS} again")
            load_weights(learn, out / WEIGHTS)
            show_bars(learn, sys.stdout.isatty())  # as run_stages sets them: none in a log file
        else:
            with distributed.context(learn, sync_bn=args.sync_bn):
                run_stages(learn, stages, make_dls, out, resume=args.resume, extra_cbs=[*regularizers, *trackers],
                           log_every=args.log_every)
    finally:
        close_trackers(trackers)
    if not distributed.is_main():
        return
    regularize.use_ema_weights(learn, regularizers)  # with an EMA, its weights are the model scored and saved
    last = [s for s in stages if s.epochs][-1]
    metrics, predictions = {}, None
    eval_started = time.time()
    if score_test:
        with distributed.local():  # the test set is scored once, by the main process alone
            learn.dls = make_dls(last.size, last.bs)  # at the size the model was last trained at, also on a resumed run
            metrics, predictions = score(learn, test_df)
    metrics.update(seconds_per_stage=seconds_per_stage(out), total_seconds=round(time.time() - started, 2), device=where,
                   precision=precision, world_size=world, **({"scoring_seconds": round(time.time() - eval_started, 2)} if score_test else {}))
    meta = model_meta(recipe, learn, train_df)
    save_trained(distributed.unwrap(learn.model), out, meta)
    write_json(out / "metrics.json", metrics)
    write_run_report(out, recipe, metrics, data, train_df, test_df, meta["classes"], predictions)
    if not score_test:
        print(f"trained; nothing was scored on the test set. Score the model with: python test.py --model {out} "
              f"--folder {data} --csv {data / 'test.csv'}")
        return
    print(f"test accuracy: {metrics['test_top1']:.4f} (top-5 {metrics['test_top5']:.4f}) on {metrics['test_images']} images")
    if "test_mean_iou" in metrics:
        print(f"test mean IoU: {metrics['test_mean_iou']:.4f} (IoU >= 0.5: {metrics['test_iou50']:.4f}) "
              f"on the {metrics['test_box_images']} images with a box")
    if not args.keep_checkpoint and (out / CHECKPOINT).exists():
        (out / CHECKPOINT).unlink()  # the model is in model.safetensors; resuming a finished run scores that again
        print(f"{CHECKPOINT} removed now that the run has finished (--keep-checkpoint keeps it)")
    print(f"model, history.csv and metrics.json are in {out}; the report: {out / 'report.html'}")
