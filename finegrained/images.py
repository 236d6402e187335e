"""The bottom layer: every image the project reads is decoded here (EXIF orientation, 16-bit, JPEG draft
decoding), and a row's box is a region of that upright image. Imports nothing of the project's."""
import math

import numpy as np
import pandas as pd
from fastcore.basics import num_cpus  # fastcore.parallel's num_cpus, defined here
from PIL import ExifTags, Image, ImageOps

BOX_COLUMNS = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"]  # the devkit box of a row: 1-based, inclusive, upright pixels
# The one list of image files the project reads. Not fastai's image_extensions: that is read from the system's MIME
# table, so it lists .svg and .heic, which PIL cannot decode, and on some machines (this one) lacks .webp, which it can.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
BOX_MARGIN = 0.16  # --crop-bbox grows each box by this share of its size on every side (prepare/resize.py's crops, and
#   model.json files from before they recorded bbox_margin); recipe.Recipe.bbox_margin defaults to it, test_recipes checks


def load_image(path, draft=None):
    """(image, (width, height)): the image at `path` decoded as viewers show it, and its full size.

    Every image the project reads goes through here (training, scoring, the preparation check, the
    `--resize` copy, Aircraft's banner crop), so all of them see the same pixels:
    - the EXIF orientation is applied (PIL.ImageOps.exif_transpose): a phone photo stored sideways
      with the tag 'rotate 90°' comes out upright, and (width, height) is the upright size.
      Bounding boxes are in this upright frame, the image as viewers display it; the datasets'
      own images carry no orientation tag, so for them both frames are the same;
    - 16-bit images (mode 'I;16*', or 'I' holding values above 255, as 16-bit PNG, TIFF and PGM
      open) are scaled to 8 bits (>> 8), not clipped to white; 'I' images with values up to 255
      are taken as they are;
    - `draft(width, height) -> (w, h)`, given the upright full size, lets a JPEG be decoded at the
      smallest DCT scale that still gives at least w x h pixels of the upright image (PIL's
      draft mode); other formats are decoded at full size.
    Any other mode is left as stored (L, RGB, RGBA, P, CMYK, ...): `.convert("RGB")` maps each faithfully."""
    im = Image.open(path)
    try:
        if draft is not None and im.format == "JPEG":
            full = upright_size(im)
            want = tuple(draft(*full))
            im.draft(im.mode, want[::-1] if _turned(im) else want)
        else:
            full = None
        ImageOps.exif_transpose(im, in_place=True)  # also loads the pixels
    except BaseException:
        im.close()
        raise
    if full is None:
        full = im.size
    if im.mode.startswith("I;16") or (im.mode == "I" and im.getextrema()[1] > 255):
        im = Image.fromarray((np.asarray(im).clip(0, 65535) >> 8).astype(np.uint8), "L")
    elif im.mode == "I":
        im = im.convert("L")
    return im, full


def _turned(im):
    """Whether the image's EXIF orientation turns it a quarter (5-8), swapping width and height."""
    return im.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)


def upright_size(im):
    """(width, height) of an opened image as viewers show it (its EXIF orientation applied), from the
    header alone: the pixels are not decoded."""
    return im.size[::-1] if _turned(im) else im.size


def open_image(path, size=None, box=None, margin=0.0):
    """Open an image as RGB, upright (see load_image), optionally cropped to `box` (1-based x1,y1,x2,y2)
    grown by `margin` on every side, the box being in the upright frame.

    With `size`, JPEGs are decoded at the smallest DCT scale that still leaves the region at
    least `size` pixels on each side (PIL's draft mode): the DataLoader workers ran 1.5-2.2x faster
    on 300-1000 px images at 299-128 px (benchmarks/README.md), and the pixels after the resize
    that follows are nearly the same."""
    def draft(width, height):
        left, top, right, bottom = box_region(width, height, box, margin)
        rw, rh = max(right - left, 1), max(bottom - top, 1)
        return math.ceil(size * width / rw), math.ceil(size * height / rh)

    im, (width, height) = load_image(path, draft if size else None)
    region = box_region(width, height, box, margin)
    if region != (0, 0, width, height):
        sx, sy = im.size[0] / width, im.size[1] / height
        im = im.crop((int(region[0] * sx), int(region[1] * sy), math.ceil(region[2] * sx), math.ceil(region[3] * sy)))
    return im.convert("RGB")


def box_region(width, height, box=None, margin=0.0):
    """The pixel region (left, top, right, bottom) that `box` (1-based x1,y1,x2,y2) grown by `margin` covers,
    clipped to the image; the whole image when there is no box."""
    if box is None or any(pd.isna(v) for v in box):
        return (0, 0, width, height)
    x1, y1, x2, y2 = box
    mx, my = margin * (x2 - x1 + 1), margin * (y2 - y1 + 1)
    return (max(0, x1 - 1 - mx), max(0, y1 - 1 - my), min(width, x2 + mx), min(height, y2 + my))


def default_workers():
    """DataLoader workers when --workers is not given: the CPU cores this process may run on (fastcore's num_cpus,
    which reads the CPU affinity, so a job pinned to 4 cores of 64 gets 4), at least 1, at most 16."""
    return max(1, min(num_cpus() or 1, 16))


def image_sizes(paths):
    """(width, height) of each image as viewers show it (EXIF orientation applied), read from the header alone."""
    sizes = []
    for path in paths:
        with Image.open(path) as im:
            sizes.append(upright_size(im))
    return sizes
