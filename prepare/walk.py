"""Finding files under a source folder the way a user expects: symbolic links to folders are followed
(pathlib's rglob does not follow them before Python 3.13), each real folder visited once."""
import fnmatch
import os
from pathlib import Path


def rglob(root, pattern="*"):
    """Every path under `root` (files and folders, not `root` itself) whose name matches `pattern`, following
    symbolic links; a link that leads back to a folder already seen is not entered again."""
    seen = set()
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        found += [Path(folder) / name for name in sorted(dirs + files) if fnmatch.fnmatchcase(name, pattern)]
    return found
