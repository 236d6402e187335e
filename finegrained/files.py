"""Every file the project writes goes through here: under a temporary name, renamed when whole, so a crash or a full
disk never leaves a half-written file under its real name; and the lock that keeps one run per folder."""
import contextlib
import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

from finegrained.errors import UserError


def disk_full(folder):
    """The one line for ENOSPC: which folder, and how much room is left there."""
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free"
    except OSError:
        free = "free space unknown"
    return f"{folder}: no space left on device ({free}); free some space and run again (--resume continues a run)"


@contextlib.contextmanager
def atomic(path):
    """Yield a temporary path beside `path` to write to; it becomes `path` only if the block completes,
    so a file under its final name is always whole and nothing there is lost to a crash. The temporary
    name holds the process id, so two processes never write into each other's file; a full disk is one line."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise UserError(f"{disk_full(path.parent)}; {path.name} was left as it was") from None
        raise
    finally:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()


@contextlib.contextmanager
def folder_lock(folder):
    """Hold `folder` for this process alone while the block runs; another process gets one line naming the holder.
    An flock is released by the kernel when its process dies, so a killed run leaves no stale lock to clear by hand
    (a bare O_EXCL file would); the PID is written into the file only to name the holder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise UserError(f"{folder}: in use by another run (process {holder}); wait for it to end, "
                            "or choose another --out")
        try:
            same = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its last holder unlinked while we waited to lock it
            break
        f.close()
    try:
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield
    finally:
        path.unlink(missing_ok=True)
        f.close()



def write_text(path, text):
    """`text` into `path`, atomically (UTF-8)."""
    with atomic(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path, obj):
    """`obj` as indented JSON into `path`, atomically."""
    return write_text(path, json.dumps(obj, indent=2))


def write_csv(df, path):
    """A pandas DataFrame into `path` without its index, atomically."""
    with atomic(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


def save_png(fig, path, **savefig):
    """A matplotlib figure into `path` as PNG, atomically, its folder made if needed."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic(path) as tmp:
        fig.savefig(tmp, format="png", **savefig)
    return Path(path)
