"""Downloads against an HTTP server on 127.0.0.1 started by the test: success, resume after a cut,
checksum mismatch (never under the final name), a corrupt file already there, progress lines, falling
back from a dead source, and safe extraction."""
import contextlib
import hashlib
import http.server
import io
import sys
import tarfile
import threading
import zipfile

import pytest

from finegrained.errors import UserError
from finegrained.prepare.fetch import DownloadError, Remote, download, extract


class Server:
    """Serves `files` ({path: bytes}) with Range support; `cut_once` paths send half, then close."""

    def __init__(self, files, cut_once=()):
        self.files, self.cut_once, self.requests = dict(files), set(cut_once), []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if self.path in server.cut_once:
                    server.cut_once.discard(self.path)
                    self.wfile.write(body[start:start + len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()  # quick shutdown

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    servers = []

    def start(files, cut_once=()):
        servers.append(Server(files, cut_once))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
MD5 = hashlib.md5(PAYLOAD).hexdigest()


def test_download_checks_and_renames(server, tmp_path):
    s = server({"/f.bin": PAYLOAD})
    path = download(Remote(f"{s.url}/f.bin", "f.bin", md5=MD5, size=len(PAYLOAD)), tmp_path)
    assert path.read_bytes() == PAYLOAD
    assert not (tmp_path / "f.bin.part").exists()


def test_download_resumes_after_a_cut(server, tmp_path):
    s = server({"/f.bin": PAYLOAD}, cut_once={"/f.bin"})
    path = download(Remote(f"{s.url}/f.bin", "f.bin", md5=MD5), tmp_path)
    assert path.read_bytes() == PAYLOAD
    ranges = [r for _, r in s.requests]
    assert ranges[0] is None and ranges[1] == f"bytes={len(PAYLOAD) // 2}-"


def test_checksum_mismatch_leaves_nothing_that_looks_complete(server, tmp_path):
    s = server({"/f.bin": PAYLOAD})
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download(Remote(f"{s.url}/f.bin", "f.bin", md5="0" * 32), tmp_path)
    assert list(tmp_path.iterdir()) == []


_WATCHED = []  # the audit hook below records into the last list here while a test watches


def _audit(event, args):
    if _WATCHED and event in ("open", "os.rename", "os.link", "os.symlink"):
        import os
        if event == "open":
            if args[2] & (os.O_WRONLY | os.O_RDWR):
                _WATCHED[-1].append(("written", str(args[0])))
        else:
            _WATCHED[-1].append(("renamed to" if event == "os.rename" else "linked to", str(args[1])))


sys.addaudithook(_audit)  # cannot be removed; it records only while a test watches


@contextlib.contextmanager
def watching_files():
    """Every file opened for writing, renamed to, or linked to in the block: (what, path)."""
    seen = []
    _WATCHED.append(seen)
    try:
        yield seen
    finally:
        _WATCHED.remove(seen)


def test_a_download_that_fails_its_check_never_takes_its_final_name(server, tmp_path):
    s = server({"/f.bin": PAYLOAD})
    final = tmp_path / "f.bin"
    for remote in (Remote(f"{s.url}/f.bin", "f.bin", md5="0" * 32), Remote(f"{s.url}/f.bin", "f.bin", size=len(PAYLOAD) + 1)):
        with watching_files() as touched, pytest.raises(DownloadError, match="checksum mismatch|size"):
            download(remote, tmp_path)
        assert touched and not [t for t in touched if t[1] == str(final)]  # not even for a moment
        assert list(tmp_path.iterdir()) == []


def test_a_good_download_takes_its_final_name_only_once_whole(server, tmp_path):
    s = server({"/f.bin": PAYLOAD})
    final = tmp_path / "f.bin"
    with watching_files() as touched:
        download(Remote(f"{s.url}/f.bin", "f.bin", md5=MD5, size=len(PAYLOAD)), tmp_path)
    assert [t for t in touched if t[1] == str(final)] == [("renamed to", str(final))]  # written elsewhere, renamed last
    assert final.read_bytes() == PAYLOAD


@pytest.mark.parametrize("check", ["md5", "size"])
def test_a_corrupt_file_under_the_final_name_is_moved_aside_and_fetched_again(check, server, tmp_path, capsys):
    s = server({"/f.bin": PAYLOAD})
    final = tmp_path / "f.bin"
    bad = PAYLOAD[:1000] + b"x" + PAYLOAD[1001:] if check == "md5" else PAYLOAD[: len(PAYLOAD) // 2]
    final.write_bytes(bad)
    remote = Remote(f"{s.url}/f.bin", "f.bin", md5=MD5) if check == "md5" else Remote(f"{s.url}/f.bin", "f.bin", size=len(PAYLOAD))
    assert download(remote, tmp_path) == final and final.read_bytes() == PAYLOAD
    assert (tmp_path / "f.bin.corrupt").read_bytes() == bad  # nothing deleted unseen
    err = capsys.readouterr().err
    assert f"{final}: fails its check" in err and "moved aside to f.bin.corrupt, downloading it again" in err
    assert len(s.requests) == 1


def test_an_intact_file_under_the_final_name_is_checked_and_used(server, tmp_path):
    s = server({"/f.bin": b"not what the server has"})
    (tmp_path / "f.bin").write_bytes(PAYLOAD)
    assert download(Remote(f"{s.url}/f.bin", "f.bin", md5=MD5, size=len(PAYLOAD)), tmp_path).read_bytes() == PAYLOAD
    assert s.requests == [] and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def progress_lines(text, label):
    return [line for line in text.splitlines() if line.startswith(label + ":")]


def test_a_download_in_a_log_shows_a_bounded_number_of_progress_lines(server, tmp_path, capsys):
    big = PAYLOAD * 8  # 8 MiB, read in 1 MiB blocks
    s = server({"/big.bin": big})
    download(Remote(f"{s.url}/big.bin", "big.bin", size=len(big)), tmp_path)
    lines = progress_lines(capsys.readouterr().err, "downloading big.bin")
    assert 3 <= len(lines) <= 12, lines
    assert all("MB/s" in line for line in lines) and " left" in lines[0]
    assert lines[-1].startswith("downloading big.bin: 100%, 8.4 MB of 8.4 MB")
    assert capsys.readouterr().out == ""  # no bar drawn into a log


def test_on_a_terminal_a_download_shows_a_fastprogress_bar(server, tmp_path, capsys, monkeypatch):
    from finegrained.prepare import progress
    monkeypatch.setattr(progress, "_terminal", lambda: True)
    s = server({"/big.bin": PAYLOAD * 3})
    download(Remote(f"{s.url}/big.bin", "big.bin"), tmp_path)
    captured = capsys.readouterr()
    assert progress_lines(captured.err, "downloading big.bin") == []  # a bar instead of lines
    assert "downloading big.bin |" in captured.out and "100.00% [4/4" in captured.out  # MB, rounded up


def test_dead_link_is_reported_with_its_status(server, tmp_path):
    s = server({})
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(Remote(f"{s.url}/gone.tgz", "gone.tgz"), tmp_path)


def _targz(folder):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname=".")
    return buf.getvalue()


def test_prepare_falls_back_from_a_dead_source(server, layouts, tmp_path, capsys):
    from finegrained.prepare.dataset import prepare
    from finegrained.prepare.tables import COLUMNS
    import pandas as pd
    archive = _targz(layouts["original"])
    s = server({"/mirror/cars.tgz": archive})
    remotes = {"dead": [Remote(f"{s.url}/stanford/car_devkit.tgz", "car_devkit.tgz")],
               "mirror": [Remote(f"{s.url}/mirror/cars.tgz", "cars.tgz", md5=hashlib.md5(archive).hexdigest())]}
    dest = prepare("cars", tmp_path, remotes=remotes)
    err = capsys.readouterr().err
    for label in ("downloading cars.tgz", "extracting cars.tgz", "checking images"):
        lines = progress_lines(err, label)
        assert 1 <= len(lines) <= 12 and "100%" in lines[-1], (label, lines)
    train = pd.read_csv(dest / "train.csv")
    assert list(train.columns) == COLUMNS and len(train) > 0
    assert all((dest / f).exists() for f in train["filename"])
    # a second run finds the data in place and asks nothing of the network
    s.close()
    before = len(s.requests)
    assert prepare("cars", tmp_path, remotes=remotes) == dest and len(s.requests) == before


def test_every_source_failing_names_them_all(server, tmp_path):
    from finegrained.prepare.dataset import prepare
    s = server({})
    remotes = {"first": [Remote(f"{s.url}/a.tgz", "a.tgz")], "second": [Remote(f"{s.url}/b.tgz", "b.tgz")]}
    with pytest.raises(UserError) as err:
        prepare("cars", tmp_path, remotes=remotes)
    text = str(err.value)
    assert "first" in text and "second" in text and "HTTP 404" in text and "--source" in text


def _climbing_tar(path):
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))


def test_climbing_tar_member_is_refused(tmp_path):
    _climbing_tar(tmp_path / "evil.tar")
    with pytest.raises(UserError, match=r"refusing archive member '../escaped.txt'"):
        extract(tmp_path / "evil.tar", tmp_path / "target")
    assert not (tmp_path / "escaped.txt").exists()


def test_climbing_zip_member_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zf:
        zf.writestr("../escaped.txt", "bad")
    with pytest.raises(UserError, match="refusing archive member"):
        extract(tmp_path / "evil.zip", tmp_path / "target")
    assert not (tmp_path / "escaped.txt").exists()


def test_unreachable_host_fails_at_once_without_retries(tmp_path):
    import socket
    import time
    with socket.socket() as sock:  # a port on 127.0.0.1 with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.time()
    with pytest.raises(DownloadError, match="cannot connect"):
        download(Remote(f"http://127.0.0.1:{port}/x.tgz", "x.tgz"), tmp_path)
    assert time.time() - started < 5 and list(tmp_path.iterdir()) == []
