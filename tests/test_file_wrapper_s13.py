"""File responses under mod_wsgi, uWSGI, gunicorn and waitress: spans end when they are sent.

Why: mod_wsgi and uWSGI send what an app hands their ``wsgi.file_wrapper`` themselves
(sendfile, or an Apache file bucket), after the app returned, and close it at the end.
Their wrappers are C objects whose ``close`` cannot be replaced, so the span used to end
when the app returned, before a byte of the file had gone: a 40 MB download to a slow
client showed as a millisecond. (gunicorn's and waitress's wrappers are Python classes,
whose ``close`` was always swapped: they are checked the same way.) These tests hold the
client still after the response's head, then read the rest: the span must end after the
client went on reading, the bytes must be the file's, and the server must still send it
from the file's descriptor (the app's file counts its ``read`` calls: none).
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from hopscope.tracing.tracefile import load
from servers import read_head
from test_run import Run, _free_port
from test_servers_more_s11 import _app_span, _express
from test_servers_s11 import _uwsgi

pytestmark = pytest.mark.timeout(120)

#: A WSGI app of no framework: its file is counted, so a server that fell back to
#: reading it through Python would show.
APP = """
import io
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


class Counted(io.FileIO):
    reads = 0
    isinstance = None

    def read(self, *args):
        Counted.reads += 1
        return super().read(*args)

    def readinto(self, buffer):
        Counted.reads += 1
        return super().readinto(buffer)


def application(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/file":
        name = os.path.join(HERE, "big.bin")
        headers = [("Content-Type", "application/octet-stream"),
                   ("Content-Length", str(os.path.getsize(name)))]
        start_response("200 OK", headers)
        wrapper = environ["wsgi.file_wrapper"](Counted(name), 65536)
        try:  # as an app may test what it got (a TypeError for uWSGI's function)
            Counted.isinstance = isinstance(wrapper, environ["wsgi.file_wrapper"])
        except TypeError:
            Counted.isinstance = "TypeError"
        return wrapper
    if path == "/bytes":  # no descriptor: the server reads it through the wrapper
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return environ["wsgi.file_wrapper"](io.BytesIO(b"0123456789" * 100_000), 8192)
    if path in ("/other", "/raise"):  # a wrapper made, then not returned
        environ["wsgi.file_wrapper"](Counted(os.path.join(HERE, "big.bin")), 65536)
        if path == "/raise":
            raise RuntimeError("after making a file wrapper")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"other"]
    body = json.dumps({"reads": Counted.reads, "isinstance": Counted.isinstance}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


app = application
"""

#: Far more than a loopback connection's buffers hold (some 10 MB here), so the server
#: is still sending while the client holds still.
SIZE = 40 * 1024 * 1024


def _project(root: Path) -> tuple[Path, str]:
    (root / "app.py").write_text(APP)
    (root / "app.wsgi").write_text("from app import application\n")
    block = bytes(range(256)) * 4096
    with open(root / "big.bin", "wb") as file:
        for _ in range(SIZE // len(block)):
            file.write(block)
    return root, hashlib.sha256((root / "big.bin").read_bytes()).hexdigest()


def _slow_download(port: int, pause: float = 1.0) -> tuple[int, str]:
    """GET /file, hold still after the head for ``pause`` s, then read it all: (the
    wall-clock time the client went on reading, ns; the body's sha256)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.settimeout(30)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /file HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        head, body = read_head(sock)
        assert head.startswith(b"HTTP/1.1 200"), head
        time.sleep(pause)
        resumed = time.time_ns()
        digest = hashlib.sha256(body)
        got = len(body)
        while got < SIZE:
            chunk = sock.recv(1 << 20)
            assert chunk, f"the connection ended after {got} bytes"
            digest.update(chunk)
            got += len(chunk)
        return resumed, digest.hexdigest()


def _check(run: Run, port: int, expected: str, *, server: str) -> None:
    """``server``: mod_wsgi, uwsgi, or gunicorn or waitress (whose wrappers are Python
    classes: their close was always swapped; checked the same way)."""
    is_class = server != "uwsgi"  # uWSGI's file_wrapper is a function
    base = f"http://127.0.0.1:{port}"
    run.wait_for(lambda: _answers(base), f"{base} to answer")
    resumed, digest = _slow_download(port)
    assert digest == expected
    after = httpx.get(f"{base}/reads", timeout=10).json()
    if server != "waitress":  # (which reads the file in Python, bare too)
        assert after["reads"] == 0  # still sent from the file's descriptor
    # What the app's own isinstance test says, as bare.
    assert after["isinstance"] is True if is_class else after["isinstance"] == "TypeError"
    # A file with no descriptor: the server reads it through its wrapper, as bare.
    assert httpx.get(f"{base}/bytes", timeout=10).content == b"0123456789" * 100_000
    # A wrapper the app made but did not return: the request ends as any other.
    assert httpx.get(f"{base}/other", timeout=10).content == b"other"
    try:  # uWSGI (bare too) closes the connection
        assert httpx.get(f"{base}/raise", timeout=10).status_code == 500
    except httpx.RemoteProtocolError:
        assert server == "uwsgi"
    paths = ("/file", "/bytes", "/other", "/raise")
    run.wait_for(lambda: all(f" {p}" in run.out for p in paths), "a tail line per request")
    run.stop()
    traces = {t.path: t for t in load(run.trace) if t.path in paths}
    assert traces["/other"].status == 200 and not traces["/other"].error
    assert traces["/raise"].error
    for path in ("/other", "/raise"):
        other = _app_span(traces[path])
        assert other is not None and other.end is not None
        assert "wsgi.file_wrapper" not in other.attrs
    read = _app_span(traces["/bytes"])
    assert read is not None and read.end is not None and read.attrs["wsgi.file_wrapper"] is True
    trace = traces["/file"]
    span = _app_span(trace)
    assert span is not None and span.end is not None
    assert span.attrs["wsgi.file_wrapper"] is True
    # The span went on while the server sent: it ended after the client read on.
    assert span.end > resumed, (span.end - resumed) / 1e6
    if server in ("mod_wsgi", "gunicorn"):  # their server span closes after the app's
        (hop,) = [s for s in trace.by_hop("server") if s.attrs.get("span.kind") != "queue"]
        assert hop.end is not None and hop.end >= span.end


def _answers(base: str) -> bool:
    try:
        return httpx.get(f"{base}/reads", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("load_", [["--module", "app:application"], ["--wsgi-file", "app.py"]])
def test_uwsgi_file_span_ends_when_the_file_is_sent(
    load_: list[str], tmp_path: Path, runs: Callable[..., Run]
) -> None:
    project, expected = _project(tmp_path)
    port = _free_port()
    # --http-socket: the worker speaks HTTP itself (no router process buffering between).
    command = [
        _uwsgi(), "--http-socket", f"127.0.0.1:{port}", *load_, "--master",
        "--die-on-term", "--disable-logging",
    ]  # fmt: skip
    run = runs(project, "--", *command)
    _check(run, port, expected, server="uwsgi")


@pytest.mark.parametrize("mode", [[], ["--embedded-mode"]], ids=["daemon", "embedded"])
def test_mod_wsgi_file_span_ends_when_the_file_is_sent(
    mode: list[str], tmp_path: Path, short_dir: Path, runs: Callable[..., Run]
) -> None:
    project, expected = _project(tmp_path)
    port = _free_port()
    run = runs(project, "--", *_express(short_dir, port, *mode))
    _check(run, port, expected, server="mod_wsgi")


def test_gunicorn_file_span_ends_when_the_file_is_sent(
    tmp_path: Path, runs: Callable[..., Run]
) -> None:
    project, expected = _project(tmp_path)
    port = _free_port()
    run = runs(project, "--", "gunicorn", "-b", f"127.0.0.1:{port}", "app:application")
    _check(run, port, expected, server="gunicorn")


def test_waitress_file_span_ends_when_the_file_is_sent(
    tmp_path: Path, runs: Callable[..., Run]
) -> None:
    """waitress hands the file to its channel, which sends it after the app's thread is
    done and closes it at the end: the span waits for that close."""
    pytest.importorskip("waitress")
    project, expected = _project(tmp_path)
    port = _free_port()
    command = ["waitress-serve", "--listen", f"127.0.0.1:{port}", "app:application"]
    run = runs(project, "--", *command)
    _check(run, port, expected, server="waitress")
