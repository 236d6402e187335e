"""Resumable, checked downloads and safe archive extraction.

urllib and tarfile do the work; what is added by hand is what neither does on its own:
resuming a cut download with an HTTP Range request, checking size and MD5 before a file
gets its final name (and before a file already there is used), refusing archive members that
would land outside the target, and progress (bytes, rate and time left; see progress.py)."""
import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from finegrained.errors import UserError

from .progress import Progress, track

CHUNK = 1 << 20


@dataclass(frozen=True)
class Remote:
    """One file to download: where from, its name on disk, and what it must look like."""
    url: str
    filename: str
    md5: str | None = None
    size: int | None = None


class DownloadError(Exception):
    """One source failed; the caller may try the next one."""


def md5sum(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _check(remote, path):
    """Raise DownloadError when `path` does not have the size and MD5 `remote` promises."""
    if remote.size is not None and path.stat().st_size != remote.size:
        raise DownloadError(f"{remote.url}: size {path.stat().st_size} bytes, expected {remote.size}")
    if remote.md5 is not None:
        got = md5sum(path)
        if got != remote.md5:
            raise DownloadError(f"{remote.url}: checksum mismatch (md5 {got}, expected {remote.md5})")


def _fetch_once(remote, part, timeout):
    """Append the rest of `remote` to `part`; return True when the file is complete.

    A failure to connect raises DownloadError (no point retrying); a cut mid-transfer raises OSError."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "fine-grained-classification/1.0"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(remote.url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to send: the part is already whole
            return True
        raise DownloadError(f"{remote.url}: HTTP {err.code} {err.reason}")
    except (urllib.error.URLError, OSError) as err:
        raise DownloadError(f"{remote.url}: cannot connect ({getattr(err, 'reason', err)})")
    with response:
        resumed = have and response.status == 206
        length = response.headers.get("Content-Length")
        start = have if resumed else 0
        total = start + int(length) if length is not None else remote.size
        with open(part, "ab" if resumed else "wb") as out, \
                Progress(total, f"downloading {remote.filename}", unit="bytes") as progress:
            done = start
            progress.update(done)
            for block in iter(lambda: response.read(CHUNK), b""):
                out.write(block)
                done += len(block)
                progress.update(done)
    return total is None or part.stat().st_size >= total


def download(remote, folder, retries=3, timeout=30):
    """Download `remote` into `folder`, resuming after cuts; return the final path.

    The file is written as NAME.part and renamed only once it is complete and checked (size, and
    MD5 where known), so a file under its final name is always whole: one that fails its check
    never takes that name, not even for a moment. A file already under the final name is checked
    the same way before it is used; if it fails, it is moved aside to NAME.corrupt (replacing an
    older one, so nothing the user put there is deleted unseen), one line says so, and the file is
    downloaded again."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / remote.filename
    if final.exists():
        try:
            _check(remote, final)
            return final
        except DownloadError as err:
            aside = final.with_name(final.name + ".corrupt")
            os.replace(final, aside)
            print(f"{final}: fails its check ({str(err).removeprefix(remote.url + ': ')}); "
                  f"moved aside to {aside.name}, downloading it again", file=sys.stderr)
    part = final.with_name(final.name + ".part")
    last_error = None
    for attempt in range(retries):
        print(f"downloading {remote.url}" + (" (resuming)" if part.exists() else ""), file=sys.stderr)
        try:
            if _fetch_once(remote, part, timeout):
                break
            last_error = "connection closed before the end of the file"
        except (OSError, http.client.HTTPException) as err:  # cut mid-transfer: resume
            last_error = err
        time.sleep(min(2 ** attempt, 10) * 0.1)
    else:
        raise DownloadError(f"{remote.url}: {last_error} (partial file kept as {part}; run again to resume)")
    try:
        _check(remote, part)
    except DownloadError:
        part.unlink()
        raise
    os.replace(part, final)
    return final


def extract(archive, target):
    """Unpack a tar or zip `archive` into `target`, refusing any member that would land outside it.

    A marker file records a finished extraction, so a second call does nothing."""
    archive, target = Path(archive), Path(target)
    marker = target / f".{archive.name}.extracted"
    if marker.exists():
        return
    target.mkdir(parents=True, exist_ok=True)
    print(f"extracting {archive} into {target}", file=sys.stderr)
    try:
        _unpack(archive, target)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as err:
        raise UserError(f"{archive}: cannot be unpacked, the archive is damaged or incomplete ({err})")
    marker.touch()


def _unpack(archive, target):
    """Extract every member; progress is the share of the archive file read (tar: its members are not
    counted before the end without reading it twice) or of the members (zip)."""
    label = f"extracting {archive.name}"
    if tarfile.is_tarfile(archive):
        with open(archive, "rb") as raw, tarfile.open(fileobj=raw) as tar, \
                Progress(os.path.getsize(archive), label, unit="bytes") as progress:
            def members():
                for member in tar:
                    yield member
                    progress.update(raw.tell())
            try:
                tar.extractall(target, members=members(), filter="data")
            except tarfile.FilterError as err:
                raise UserError(f"{archive}: refusing archive member {err.tarinfo.name!r}: {err}")
            progress.update(os.path.getsize(archive))  # the end-of-archive blocks are not read
    elif zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            root = target.resolve()
            names = zf.namelist()
            for name in names:
                dest = (root / name).resolve()
                if os.path.isabs(name) or not dest.is_relative_to(root):
                    raise UserError(f"{archive}: refusing archive member {name!r}: it would land outside {target}")
            for name in track(names, len(names), label):
                zf.extract(name, target)
    else:
        raise UserError(f"{archive}: not a tar or zip archive")


def is_archive(path):
    path = Path(path)
    return path.is_file() and (tarfile.is_tarfile(path) or zipfile.is_zipfile(path))


def fetch_source(remotes, downloads, target):
    """Download every file of one source into `downloads`, unpacking archives into `target`."""
    for remote in remotes:
        path = download(remote, downloads)
        if is_archive(path):
            extract(path, target)
        else:
            shutil.copy2(path, target / path.name)
