"""Training and scoring throughput: the project against a plain PyTorch loop and the model's ceiling.

    python benchmarks/throughput.py                      # CPU-sized defaults: resnet18, 128 px
    python benchmarks/throughput.py --arch resnext50_32x4d --sizes 224,299 --bs 32,16 --images 2048   # a GPU

Over one generated JPEG set of Stanford Cars shapes (a few hundred to a thousand px a side,
196 classes), each mode runs in its own process, one after another, and reports steady-state
images/s (timed after `--warmup` batches) and peak memory:
  ceiling   the model alone: a training step on random tensors already on the device,
            in the project's precision and memory format (bf16 + channels-last on a GPU)
  project   the project's unfrozen training stage (data.get_dls + models.create_learner + fastai), from JPEGs
  loader    the project's DataLoader workers alone (decode, crop, resize, to tensor, collate): no model,
            no batch augmentation (which runs on the GPU where there is one)
  loader_nodraft  the same decoding every JPEG at full size: what draft decoding saves
  project_resized, loader_resized  project and loader reading the copy that `data.py --resize` makes
            once (images shrunk to --resize-px; 320 for the recipe's 299)
  ceiling_compiled  (only when named in --modes) the ceiling under torch.compile, to see whether
            compiling would pay before the training path uses it
  plain     a plain PyTorch loop as the ResNets and ResNet50-448 write-ups train: torchvision transforms on PIL images,
            DataLoader workers, fp32, NCHW, SGD
and the same for scoring (test.py's path against a plain eval loop). Ratios: project/plain,
project/ceiling."""
import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

TRAIN_MODES = ("ceiling", "project", "plain", "loader", "loader_nodraft", "project_resized", "loader_resized")
SCORE_MODES = ("score_project", "score_plain")


def make_dataset(folder, n_images, n_classes, min_size, max_size):
    """A prepared dataset folder (train.csv, test.csv) of generated JPEGs."""
    import synth
    from finegrained.prepare.dataset import prepare
    samples = synth.make_samples(n_classes, min_size=min_size, max_size=max_size, seed=0, totals=(n_images, n_classes))
    synth.write_layout(samples, folder / "source", "original", n_classes)
    return prepare("cars", folder / "data", [folder / "source"])


class Timer:
    """Images/s between the end of batch `warmup` and the end of the last timed batch."""

    def __init__(self, warmup, steps, bs, device):
        self.warmup, self.steps, self.bs, self.device, self.marks = warmup, steps, bs, device, []

    def tick(self):
        if self.device.type == "cuda":
            import torch
            torch.cuda.synchronize()
        self.marks.append(time.perf_counter())
        return len(self.marks) >= self.warmup + self.steps + 1

    def rate(self):
        timed = self.marks[self.warmup:]
        return self.bs * (len(timed) - 1) / (timed[-1] - timed[0])


def device_setup():
    import torch
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats()
    return device


def peak_mib(device):
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ceiling(args, size, bs, device, compiled=False):
    import torch
    from finegrained.models import build_model
    model = build_model(args.arch, args.classes).to(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    if compiled:
        model.compile()  # in place: the module and its state_dict keys stay as they are
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-3)
    x = torch.randn(bs, 3, size, size, device=device)
    x = x.to(memory_format=torch.channels_last) if cuda else x
    y = torch.randint(0, args.classes, (bs,), device=device)
    timer = Timer(args.warmup, args.steps, bs, device)
    while True:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if timer.tick():
            return timer.rate()


def resized_folder(args):
    from finegrained.prepare.resize import folder_name
    return Path(args.data) / folder_name(args.resize_px)


def run_project(args, size, bs, device, folder=None):
    from fastai.callback.core import Callback, CancelFitException
    from finegrained.data import get_dls
    from finegrained.devices import choose, prepare
    from finegrained.models import create_learner
    from finegrained.train import show_bars
    on = choose("auto")
    dls = get_dls(Path(folder or args.data) / "train.csv", size, bs, workers=args.workers)
    learn = create_learner(dls, args.arch, pretrained=False)
    prepare(learn, on)
    show_bars(learn, False)
    learn.unfreeze()
    timer = Timer(args.warmup, args.steps, bs, device)

    class Stop(Callback):
        def after_batch(self):
            if self.training and timer.tick():
                raise CancelFitException()
    epochs = -(-(args.warmup + args.steps + 1) // len(dls.train)) + 1
    learn.fit_one_cycle(epochs, 1e-4, cbs=Stop())
    return timer.rate()


def run_loader(args, size, bs, device, draft=True, folder=None):
    """The work of the project's DataLoader workers alone: decode, crop, resize, to tensor, collate.

    The batch augmentation is left out: in training it runs on the GPU where there is one (and is
    inside `project` everywhere)."""
    from fasttransform import Pipeline
    from finegrained.data import get_dls
    dls = get_dls(Path(folder or args.data) / "train.csv", size, bs, workers=args.workers, draft=draft, device=device)
    dls.train.after_batch = Pipeline([])
    timer = Timer(args.warmup, args.steps, bs, device)
    while True:
        for _ in dls.train:
            if timer.tick():
                return timer.rate()


def plain_dataset(args, size, train):
    """torchvision transforms on PIL images, as the plain PyTorch write-ups load them."""
    import pandas as pd
    import torch
    from PIL import Image
    from torchvision import transforms as T
    table = pd.read_csv(Path(args.data) / ("train.csv" if train else "test.csv"))
    vocab = {c: i for i, c in enumerate(sorted(table["class_id"].unique()))}
    norm = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    tfm = T.Compose([T.Resize((size, size)), *([T.RandomHorizontalFlip(), T.RandomRotation(10)] if train else []),
                     T.ToTensor(), norm])

    class Frame(torch.utils.data.Dataset):
        def __len__(self):
            return len(table)

        def __getitem__(self, i):
            with Image.open(Path(args.data) / table["filename"][i]) as im:
                return tfm(im.convert("RGB")), vocab.get(table["class_id"][i], 0)
    return Frame()


def workers(args):
    from finegrained.images import default_workers
    return default_workers() if args.workers is None else args.workers


def run_plain(args, size, bs, device):
    import torch
    import torchvision
    loader = torch.utils.data.DataLoader(plain_dataset(args, size, True), batch_size=bs, shuffle=True, drop_last=True,
                                         num_workers=workers(args), pin_memory=device.type == "cuda")
    model = getattr(torchvision.models, args.arch)(num_classes=args.classes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    timer = Timer(args.warmup, args.steps, bs, device)
    while True:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if timer.tick():
                return timer.rate()


def run_score_project(args, size, bs, device):
    """test.py's path: load the saved model, inference_dl, fastai get_preds over the whole test set."""
    import pandas as pd
    from finegrained.models import build_model, load_trained, save_trained
    model_dir = Path(args.data).parent / f"model_{size}"
    classes = [{"id": i + 1, "name": str(i + 1)} for i in range(args.classes)]
    save_trained(build_model(args.arch, args.classes), model_dir,
                 {"arch": args.arch, "classes": classes, "image_size": size,
                  "normalize": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}})
    from finegrained import holdout
    model, meta = load_trained(model_dir)
    df = pd.read_csv(Path(args.data) / "test.csv")[["filename"]]
    holdout.predict(model, meta, df.head(bs), args.data, bs, workers=args.workers)  # warm-up
    started = time.perf_counter()
    holdout.predict(model, meta, df, args.data, bs, workers=args.workers)
    return len(df) / (time.perf_counter() - started)


def run_score_plain(args, size, bs, device):
    import torch
    import torchvision
    data = plain_dataset(args, size, False)
    loader = torch.utils.data.DataLoader(data, batch_size=bs, num_workers=workers(args))
    model = getattr(torchvision.models, args.arch)(num_classes=args.classes).to(device).eval()
    with torch.no_grad():
        for x, _ in loader:  # warm-up pass over the first batch
            model(x[:bs].to(device))
            break
        started = time.perf_counter()
        for x, _ in loader:
            model(x.to(device)).cpu()
    return len(data) / (time.perf_counter() - started)


def child(args):
    """One mode in this process: print one JSON line."""
    import warnings
    warnings.filterwarnings("ignore")
    device = device_setup()
    runner = {"ceiling": run_ceiling, "project": run_project, "plain": run_plain,
              "ceiling_compiled": lambda *a: run_ceiling(*a, compiled=True),
              "loader": run_loader, "loader_nodraft": lambda *a: run_loader(*a, draft=False),
              "project_resized": lambda *a: run_project(*a, folder=resized_folder(args)),
              "loader_resized": lambda *a: run_loader(*a, folder=resized_folder(args)),
              "score_project": run_score_project, "score_plain": run_score_plain}[args.mode]
    rate = runner(args, args.size, args.bs[0], device)
    print(json.dumps({"mode": args.mode, "size": args.size, "images_per_s": rate, "peak_mib": peak_mib(device),
                      "device": str(device)}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18", help="a torchvision ResNet/ResNeXt name")
    p.add_argument("--sizes", default="128", help="comma-separated image sizes (training stage 2 and 3 sizes)")
    p.add_argument("--bs", default="32", help="comma-separated batch sizes, one per size")
    p.add_argument("--images", type=int, default=256, help="images in the generated set")
    p.add_argument("--classes", type=int, default=196, help="classes in the generated set")
    p.add_argument("--min-px", type=int, default=300, help="smallest generated image side")
    p.add_argument("--max-px", type=int, default=1000, help="largest generated image side")
    p.add_argument("--warmup", type=int, default=3, help="batches before timing starts")
    p.add_argument("--steps", type=int, default=10, help="batches timed")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers for project and plain (default: all cores, at most 16)")
    p.add_argument("--resize-px", type=int, default=None,
                   help="shorter side of the resized copy for the *_resized modes (default: the largest size x 1.07)")
    p.add_argument("--modes", default=",".join(TRAIN_MODES + SCORE_MODES), help="which modes to run")
    p.add_argument("--data", default=None, help="use this prepared dataset folder instead of generating one")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.bs = [int(b) for b in str(args.bs).split(",")]
    if args.mode:
        return child(args)
    sizes = [int(s) for s in args.sizes.split(",")]
    if len(args.bs) != len(sizes):
        p.error("--bs needs one batch size per --sizes entry")
    unknown = set(args.modes.split(",")) - set(TRAIN_MODES + SCORE_MODES + ("ceiling_compiled",))
    if unknown:
        p.error(f"unknown mode(s) {', '.join(sorted(unknown))}; the modes are listed in --help")
    args.resize_px = args.resize_px or math.ceil(max(sizes) * 1.07)
    with tempfile.TemporaryDirectory() as tmp:
        if args.data is None:
            print(f"generating {args.images} JPEGs of {args.min_px}-{args.max_px} px, {args.classes} classes", file=sys.stderr)
            args.data = str(make_dataset(Path(tmp), args.images, args.classes, args.min_px, args.max_px))
        if any(m.endswith("_resized") for m in args.modes.split(",")):
            from finegrained.prepare.resize import resize_copy
            resize_copy(args.data, args.resize_px, args.workers)
        results = []
        for size, bs in zip(sizes, args.bs):
            for mode in args.modes.split(","):
                cmd = [sys.executable, __file__, "--mode", mode, "--size", str(size), "--bs", str(bs), "--arch", args.arch,
                       "--classes", str(args.classes), "--warmup", str(args.warmup), "--steps", str(args.steps),
                       "--data", args.data, "--resize-px", str(args.resize_px)] + (["--workers", str(args.workers)] if args.workers is not None else [])
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"{mode} at {size} px failed:\n{done.stderr[-2000:]}")
                results.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(f"  {mode:>16} {size} px: {results[-1]['images_per_s']:8.1f} images/s", file=sys.stderr)
    print_table(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def print_table(results, args):
    device = results[0]["device"]
    print(f"\n{args.arch}, device {device}, {args.images} generated JPEGs, resized copy {args.resize_px} px, "
          f"steady state after {args.warmup} batches")
    print(f"{'size':>5} {'mode':>16} {'images/s':>10} {'peak MiB':>10}  ratios")
    for size in sorted({r["size"] for r in results}):
        rate = {r["mode"]: r["images_per_s"] for r in results if r["size"] == size}
        for r in (r for r in results if r["size"] == size):
            ratio = ""
            if r["mode"] == "project":
                ratio = "  ".join(f"project/{b} {rate['project'] / rate[b]:.2f}" for b in ("plain", "ceiling") if b in rate)
            if r["mode"] == "ceiling_compiled" and "ceiling" in rate:
                ratio = f"compiled/eager {rate['ceiling_compiled'] / rate['ceiling']:.2f}"
            if r["mode"] == "loader" and "loader_nodraft" in rate:
                ratio = f"draft/nodraft {rate['loader'] / rate['loader_nodraft']:.2f}"
            full_size = r["mode"].removesuffix("_resized")
            if full_size != r["mode"] and full_size in rate:
                ratio = f"resized/full-size {r['images_per_s'] / rate[full_size]:.2f}"
            if r["mode"] == "score_project" and "score_plain" in rate:
                ratio = f"project/plain {rate['score_project'] / rate['score_plain']:.2f}"
            print(f"{size:>5} {r['mode']:>16} {r['images_per_s']:>10.1f} {r['peak_mib']:>10.0f}  {ratio}")


if __name__ == "__main__":
    main()
