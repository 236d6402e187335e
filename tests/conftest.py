"""Shared fixtures: generated datasets in the real file formats and one tiny model trained on them."""
import functools
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import synth  # noqa: E402

N_CLASSES = 4
# session fixtures that train a model: every test that needs one is end to end, so it is marked slow
TRAINING_FIXTURES = {"trained", "ddp_run", "runs", "exported", "localizer", "reference"}
# what a test (or a helper or fixture of its module) calls when it trains a model or starts a process
SLOW_CALLS = re.compile(r"\b(run_script|subprocess\.\w+|Popen|fit|fit_one_cycle|fit_flat_cos|fit_stage|run_stages|"
                        r"run_checks|lr_find|check_overfit|main|torchrun)\(")


def _body(func):
    return inspect.getsource(func).split("\n", 1)[-1]   # without the def line (a test named like a slow call)


def _calls_slow(body, slow_names):
    return bool(SLOW_CALLS.search(body)) or any(re.search(rf"\b{re.escape(s)}\(", body) for s in slow_names)


@functools.cache
def _slow_names(module_name):
    """The module's functions that train or start a process, directly or through another of its functions."""
    module = sys.modules[module_name]
    bodies = {name: _body(f) for name, f in vars(module).items()
              if inspect.isfunction(f) and getattr(f, "__module__", None) == module_name}
    slow = set()
    while True:  # a helper that calls a slow helper is slow too
        more = {name for name, body in bodies.items() if name not in slow and _calls_slow(body, slow)}
        if not more:
            return frozenset(slow)
        slow |= more


def _is_slow(item):
    if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    if getattr(item, "function", None) is None:
        return False
    if item.function.__name__ in _slow_names(item.module.__name__):
        return True
    fixtures = getattr(item, "_fixtureinfo", None)
    for name in getattr(item, "fixturenames", ()):   # a fixture that trains or starts a process
        for fixture in (fixtures.name2fixturedefs.get(name, ()) if fixtures else ()):
            func = getattr(fixture, "func", None)
            if func is not None and _calls_slow(_body(func), _slow_names(func.__module__)):
                return True
    return False


def pytest_collection_modifyitems(items):
    """The quick tier (`pytest -m "not slow"`) leaves out every test that trains, starts a process, or needs a model
    trained for it: found by what the test, its module's helpers and its fixtures call (SLOW_CALLS), so a new
    end-to-end test is slow without anyone marking it."""
    for item in items:
        if _is_slow(item):
            item.add_marker(pytest.mark.slow)


class PickleBomb:
    """Unpickling this writes the file PWNED in the current folder: a test fails if that ever happens."""

    def __reduce__(self):
        return (eval, ("__import__('pathlib').Path('PWNED').write_text('x')",))


TINY = ["--no-pretrained", "--workers", "0"]  # run.py's flags for a model trained from scratch, in the test's process
SCORE_LINES = {"accuracy": r"^accuracy: ([0-9.]+)$", "top5": r"^top-5 accuracy: ([0-9.]+)$",
               "mean_iou": r"^mean IoU: ([0-9.]+)", "iou50": r"^IoU >= 0.5: ([0-9.]+)$"}


def holdout_scores(capsys, *args):
    """test.py in this process: ({score: value} of the lines it printed, everything it printed)."""
    from finegrained import holdout
    holdout.main([str(a) for a in args])
    out = capsys.readouterr().out
    return {k: float(m.group(1)) for k, pattern in SCORE_LINES.items() if (m := re.search(pattern, out, re.M))}, out


def holdout_accuracy(capsys, *args):
    """test.py in this process: (the accuracy it printed, or None, everything it printed)."""
    found, out = holdout_scores(capsys, *args)
    return found.get("accuracy"), out


def localize_recipe(epochs, size):
    """A recipe file's text: resnet18 from scratch with the localize head, one stage, squashed images."""
    return (f'arch = "resnet18"\nhead = "localize"\npretrained = false\nresize = "squash"\n[[stages]]\nname = "all"\n'
            f"epochs = {epochs}\nsize = {size}\nbs = 16\nlr = 3e-3\n")


@pytest.fixture
def one_thread():
    """One intra-op thread while a test trains: on 2 busy cores, torch's 2 threads ran resnet18 20x slower."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def scoring_batches(monkeypatch):
    """[(args, kwargs, loader)] of every data.inference_dl call: the loaders test.py scores with, for the test to read."""
    from finegrained import data
    seen, real = [], data.inference_dl

    def spy(*args, **kwargs):
        dls, dl = real(*args, **kwargs)
        seen.append((args, kwargs, dl))
        return dls, dl
    monkeypatch.setattr(data, "inference_dl", spy)
    return seen


def run_script(script, *args, cwd=None, timeout=300):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


@pytest.fixture(scope="session")
def samples():
    return synth.make_samples(N_CLASSES, train_per_class=30, test_per_class=12, min_size=64, max_size=150, seed=1)


@pytest.fixture(scope="session")
def layouts(samples, tmp_path_factory):
    """{layout: folder} with the same images written in each layout."""
    base = tmp_path_factory.mktemp("layouts")
    return {name: synth.write_layout(samples, base / name, name, N_CLASSES) for name in synth.LAYOUTS}


@pytest.fixture(scope="session")
def prepared(layouts, tmp_path_factory):
    """A prepared Stanford-Cars-format dataset folder (train.csv, test.csv)."""
    from finegrained.prepare.dataset import prepare
    return prepare("cars", tmp_path_factory.mktemp("prepared"), [layouts["original"]])


@pytest.fixture(scope="session")
def trained(prepared, tmp_path_factory):
    """A run folder of run.py: resnet18 from scratch, all three stages, tiny sizes; its checkpoint kept, to compare."""
    from finegrained import runner as run
    out = tmp_path_factory.mktemp("runs") / "tiny"
    run.main(["--data", str(prepared), "--arch", "resnet18", "--no-pretrained", "--epochs", "2,4,2",
              "--sizes", "48,64", "--bs", "16,16", "--workers", "0", "--out", str(out), "--keep-checkpoint"])
    return out


# the display transform each EXIF orientation asks for, undone to store a photo "as the camera saved it"
STORED_AS = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
             6: "ROTATE_90",    # tag 6, 'rotate 90° clockwise to display': stored turned a quarter anticlockwise
             7: "TRANSVERSE", 8: "ROTATE_270"}


def upright_photo(width=96, height=72):
    """An RGB test photo that looks different under every flip and turn: a 4 x 3 grid of 12 distinct colours."""
    import numpy as np
    from PIL import Image
    colours = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
               (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]
    grid = np.array(colours, dtype=np.uint8).reshape(3, 4, 3)
    rows = np.arange(height) * 3 // height
    cols = np.arange(width) * 4 // width
    return Image.fromarray(grid[rows[:, None], cols[None, :]])


def save_stored_as(upright, path, orientation, **save_args):
    """Save `upright` as a camera would with EXIF orientation `orientation`: pixels turned, the tag saying how to undo it."""
    from PIL import Image
    exif = Image.Exif()
    exif[0x0112] = orientation
    upright.transpose(getattr(Image.Transpose, STORED_AS[orientation])).save(path, exif=exif, **save_args)


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """{name: (path, expected RGB array as displayed, tolerated mean difference in grey levels)}: one upright photo saved the
    ways phones, cameras and tools save images (EXIF orientations, 16-bit, CMYK, palette, RGBA, WebP, TIFF)."""
    import numpy as np
    from PIL import Image
    folder = tmp_path_factory.mktemp("photos")
    upright = upright_photo()
    rgb = np.asarray(upright)
    gray = upright.convert("L")
    gray_rgb = np.asarray(gray.convert("RGB"))
    found = {}
    for orientation in STORED_AS:
        path = folder / f"orientation_{orientation}.jpg"
        save_stored_as(upright, path, orientation, quality=95, subsampling=0)
        found[path.stem] = (path, rgb, 2.0)
    save_stored_as(upright, folder / "orientation_6.png", 6)
    found["orientation_6_png"] = (folder / "orientation_6.png", rgb, 0.0)
    wide = (np.asarray(gray).astype(np.uint16) * 257)  # the same grey levels over 16 bits
    Image.fromarray(wide).save(folder / "gray16.png")
    Image.fromarray(wide).save(folder / "gray16.tif")
    Image.fromarray(wide).save(folder / "gray16.pgm")  # opens as mode I
    for name in ("gray16.png", "gray16.tif", "gray16.pgm"):
        found[name.replace(".", "_")] = (folder / name, gray_rgb, 0.0)
    gray.save(folder / "gray.jpg", quality=95)
    found["gray_jpg"] = (folder / "gray.jpg", gray_rgb, 2.0)
    upright.convert("CMYK").save(folder / "cmyk.jpg", quality=95, subsampling=0)
    found["cmyk_jpg"] = (folder / "cmyk.jpg", rgb, 2.0)
    upright.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(folder / "palette.png")
    found["palette_png"] = (folder / "palette.png", rgb, 0.0)
    upright.convert("RGBA").save(folder / "rgba.png")
    found["rgba_png"] = (folder / "rgba.png", rgb, 0.0)
    upright.save(folder / "lossless.webp", lossless=True)
    found["webp"] = (folder / "lossless.webp", rgb, 0.0)
    upright.save(folder / "photo.tif")
    found["tiff"] = (folder / "photo.tif", rgb, 0.0)
    return found
