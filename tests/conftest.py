"""Shared fixtures: generated datasets in the real file formats and one tiny model trained on them."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import synth  # noqa: E402

N_CLASSES = 4


class PickleBomb:
    """Unpickling this writes the file PWNED in the current folder: a test fails if that ever happens."""

    def __reduce__(self):
        return (eval, ("__import__('pathlib').Path('PWNED').write_text('x')",))


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
    from data import prepare
    return prepare("cars", tmp_path_factory.mktemp("prepared"), [layouts["original"]])


@pytest.fixture(scope="session")
def trained(prepared, tmp_path_factory):
    """A run folder of run.py: resnet18 from scratch, all three stages, tiny sizes."""
    import run
    out = tmp_path_factory.mktemp("runs") / "tiny"
    run.main(["--data", str(prepared), "--arch", "resnet18", "--no-pretrained", "--epochs", "2,4,2",
              "--sizes", "48,64", "--bs", "16,16", "--workers", "0", "--out", str(out)])
    return out
