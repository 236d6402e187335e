"""Test instrument, not part of the project: run run.py's main in this process, recording on every rank what it
trained on each epoch and a hash of its weights at the end of every fit, into $DDP_RECORD/rank<R>.json. Launched
by tests/test_distributed.py as `torchrun --nproc_per_node 2 tests/ddp_record.py <run.py args>`, so that the test
sees what each rank did instead of trusting the launcher."""
import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finegrained import cli  # noqa: E402
from finegrained import runner as run  # noqa: E402
from fastai.callback.core import Callback  # noqa: E402
from fastai.learner import Learner  # noqa: E402


class RecordItems(Callback):
    """The rows of train.csv this rank trained on in each epoch, and its weights' hash after each fit."""
    order = 12  # after fastai's DistributedTrainer (11) has wrapped the training loader

    def __init__(self):
        self.epochs, self.hashes = [], []

    def before_train(self):
        dl = self.learn.dl
        if not getattr(dl, "_recorded", False):
            inner = dl.get_idxs

            def get_idxs():
                self.idxs = list(inner())
                return self.idxs
            dl.get_idxs, dl._recorded = get_idxs, True
        self.n_items, self.trained, self.world = 0, True, os.environ.get("WORLD_SIZE", "1")

    def after_batch(self):
        if self.training:
            self.n_items += len(self.yb[0])

    def after_train(self):
        items = self.learn.dl.dataset.items
        self.epochs.append(sorted(items.iloc[int(i)]["filename"] for i in self.idxs[:self.n_items]))

    def after_fit(self):
        if not getattr(self, "trained", False):  # get_preds (scoring) fires after_fit too, without training
            return
        self.trained = False
        model = getattr(self.learn.model, "module", self.learn.model)
        digest = hashlib.md5()
        for name, tensor in sorted(model.state_dict().items()):
            if tensor.is_floating_point() and "running" not in name:  # weights, not BatchNorm's running statistics
                digest.update(tensor.detach().cpu().numpy().tobytes())
        self.hashes.append(digest.hexdigest())
        out = Path(os.environ["DDP_RECORD"])
        out.mkdir(parents=True, exist_ok=True)
        rank = os.environ.get("RANK", "0")
        (out / f"rank{rank}.json").write_text(json.dumps({"world": self.world,
                                                          "epochs": self.epochs, "hashes": self.hashes}))


_init = Learner.__init__


def _init_recording(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.add_cb(RecordItems())


Learner.__init__ = _init_recording

if __name__ == "__main__":
    cli.run(lambda: run.main(sys.argv[1:]))
