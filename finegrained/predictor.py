"""Use a trained model from Python: a run folder or an exported .onnx file, on one image, a list or a folder.

    from finegrained.predictor import Predictor
    model = Predictor.load("runs/cars")              # a run folder (run.py), or an exported file (export.py)
    top = model.predict("photo.jpg", k=3)            # one image (a path or a PIL image): one Prediction
    top.classes, top.ids, top.probabilities, top.box # the 3 most likely class names, their ids and probabilities;
                                                     # the box (localize models) in the image's pixels, else None
    model.predict("photos/")                         # a folder (searched recursively) or a list: one Prediction each

Images are read, prepared and scored by test.py's own code (its model loading, data.inference_dl, its box mapping),
so a Predictor gives what test.py writes for the same images: the same top-5 and probabilities, the same boxes."""
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from finegrained.errors import UserError


def _scoring():
    """test.py's scoring (finegrained.holdout), loaded when first used: importing the API stays light."""
    from finegrained import holdout
    return holdout


@dataclass
class Prediction:
    """The k most likely classes of one image, most likely first."""
    image: str           # the file, or "<image N>" for the N-th in-memory image of the call
    classes: list        # class names
    ids: list            # class ids (train.csv's class_id)
    probabilities: list  # each class's probability
    box: tuple = None    # a localize model's box: (x1, y1, x2, y2) in the image's pixels, 1-based as the devkit


class Predictor:
    """A trained model ready to predict; `Predictor.load(path)` makes one."""

    def __init__(self, model, meta, source, bs=64, workers=None):
        self.model, self.meta, self.source, self.bs, self.workers = model, meta, str(source), int(bs), workers

    @classmethod
    def load(cls, path, bs=64, workers=None):
        """A run folder (model.safetensors + model.json) or an exported .onnx file (with its JSON beside it).
        `bs` images are prepared and scored at a time; `workers`: DataLoader processes (None: none for a batch or
        fewer, else test.py's default, every CPU core up to 16)."""
        if int(bs) < 1:
            raise UserError(f"bs takes 1 or more, got {bs}")
        model, meta = _scoring().load_model(path)
        return cls(model, meta, path, bs, workers)

    @property
    def classes(self):
        """Every class name, in the model's output order."""
        return [str(c["name"]) for c in self.meta["classes"]]

    @property
    def has_boxes(self):
        return _scoring().is_localizer(self.meta)

    def predict(self, images, k=5):
        """One Prediction for one image (a file path or a PIL image); a list of Predictions, in order, for a list of
        them or a folder (every image in it and its subfolders, sorted by path)."""
        if int(k) < 1:
            raise UserError(f"k takes 1 or more, got {k}")
        single = not isinstance(images, (list, tuple)) and not (isinstance(images, (str, Path)) and Path(images).is_dir())
        with tempfile.TemporaryDirectory() as scratch:
            files = self._files([images] if single else images, Path(scratch))
            found = self._predict(files, min(int(k), len(self.meta["classes"]))) if files else []
        return found[0] if single else found

    def _files(self, images, scratch):
        """[(absolute path, name to report)] for a folder or a list of paths and PIL images; in-memory images are saved
        losslessly (PNG) into `scratch`, so they are read as a file is."""
        from PIL import Image
        if isinstance(images, (str, Path)):  # a folder
            df, folder = _scoring().list_images(images, labels=False)
            return [((Path(folder) / f).resolve(), str(Path(folder) / f)) for f in df["filename"]]
        files = []
        for i, image in enumerate(images):
            if isinstance(image, Image.Image):
                path = scratch / f"image_{i}.png"
                image.save(path)
                files.append((path, f"<image {i}>"))
            elif isinstance(image, (str, Path)) and Path(image).is_file():
                files.append((Path(image).resolve(), str(image)))
            else:
                raise UserError(f"{image!r}: not an image file, a folder or a PIL image"
                                if not isinstance(image, (str, Path)) else f"{image}: no such image or folder")
        return files

    def _predict(self, files, k):
        from finegrained.prepare.tables import image_problems
        scoring = _scoring()
        for (path, name), problem in zip(files, image_problems([p for p, _ in files])):
            if problem:
                raise UserError(f"{name}: {problem}")
        df, folder = pd.DataFrame({"filename": [str(p) for p, _ in files]}), Path(".")  # absolute paths: Path(".") / f is f
        workers = self.workers if self.workers is not None else (0 if len(df) <= self.bs else None)
        boxes = None
        if self.has_boxes:
            probs, frame_boxes = scoring.predict(self.model, self.meta, df, folder, self.bs, workers=workers)
            boxes = scoring.devkit_boxes(frame_boxes, df, folder, self.meta)
        else:
            probs = scoring.predict(self.model, self.meta, df, folder, self.bs, workers=workers)
        conf, top = probs.topk(k, dim=1)
        ids = [int(c["id"]) for c in self.meta["classes"]]
        return [Prediction(image=name, classes=[self.classes[j] for j in row], ids=[ids[j] for j in row],
                           probabilities=[float(p) for p in ps],
                           box=None if boxes is None else tuple(float(v) for v in np.asarray(boxes)[i]))
                for i, ((_, name), row, ps) in enumerate(zip(files, top.tolist(), conf.tolist()))]

    def __repr__(self):
        return f"Predictor({self.source!r}: {len(self.classes)} classes{', boxes' if self.has_boxes else ''})"
