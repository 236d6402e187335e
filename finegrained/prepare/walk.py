"""Finding files under a source folder the way a user expects: symbolic links to folders are followed
(pathlib's rglob does not follow them before Python 3.13), each real folder visited once, and a link that
leads back to a folder it is inside (a loop) refused in one line.

Written by hand, not fastai's get_files / get_image_files (os.walk with followlinks as well): on a class folder with a
link back to itself it walked the loop some 40 levels deep and returned each image ~40 times without a word, it lists
a broken link as an image, its order is the file system's (the split's shuffle needs a sorted one), and importing it
loads torch (14 s on a cold, busy machine) into data preparation, which needs none."""
import fnmatch
import os
from pathlib import Path

from finegrained.errors import UserError


def refuse_loop(link, inside):
    """Raise if the folder link `link` leads to one of the real folders `inside` or to a folder above one."""
    target = Path(os.path.realpath(link))
    if os.path.islink(link) and any(Path(real).is_relative_to(target) for real in inside):
        raise UserError(f"{link}: a symbolic link to {target}, which holds the link itself (a loop); "
                        "remove the link or point it elsewhere")


def refuse_broken(path):
    """Raise if `path` is a symbolic link to nothing."""
    if os.path.islink(path) and not os.path.exists(path):
        raise UserError(f"{path}: a broken symbolic link (it points to {os.readlink(path)}, which does not exist)")


def rglob(root, pattern="*"):
    """Every path under `root` (files and folders, not `root` itself) whose name matches `pattern`, following
    symbolic links; a real folder reached twice is entered once, and a link into the folders above it is refused."""
    seen = set()
    found = []
    inside = {str(root): (os.path.realpath(root),)}  # each folder's real path and those of the folders above it
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        for name in dirs:
            path = os.path.join(folder, name)
            refuse_loop(path, inside[folder])
            inside[path] = (*inside[folder], os.path.realpath(path))
        found += [Path(folder) / name for name in sorted(dirs + files) if fnmatch.fnmatchcase(name, pattern)]
    return found
