"""README claims changed in session 9 that had no test of their own.

Why: a new user follows the README literally.  Most of session 9's new sentences are
pinned by the tests written with them (test_proxy_unix, test_edges_s9, test_frameworks_s9,
test_frameworks_s9b, test_tail_safe, test_tui_user3); these cover what was left:
``granian --interface wsgi --workers 2`` under ``hopscope run --``, the collector's
30 s / 10 s limits the README states, and the text line of a request the proxy refuses
for a raw byte past ASCII in its target.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from test_run import BIN, Run, _check_traces, _free_port, _requests

pytestmark = pytest.mark.timeout(120)


def test_granian_wsgi_with_two_workers(flask_project: Path, runs: Callable[..., Run]) -> None:
    """README: ``hopscope run -- granian --interface asgi|wsgi [--workers 2] main:app``,
    each request recorded by the worker that answered it, with its route."""
    granian = shutil.which("granian", path=BIN)
    if granian is None:  # pragma: no cover - the dev extras install it
        pytest.skip("granian is not installed")
    port = _free_port()
    run = runs(
        flask_project, "--", granian, "--interface", "wsgi", "--host", "127.0.0.1",
        "--port", str(port), "--workers", "2", "app:app",
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    run.wait_serving(base)
    pids = _requests(base, count=6)
    # Granian's workers are processes it spawns: hopscope's child is not one of them.
    assert run.proc.pid not in pids.values()
    # Each request's app span names the pid that answered it (_check_traces: seen == pids).
    traces = _check_traces(run, pids, server=False)
    assert {t.route for t in traces if t.route} == {"/pid"}
    assert all(t.root is not None and t.root.attrs.get("interface") == "wsgi" for t in traces)


def test_the_collector_limits_are_the_readmes() -> None:
    """README: a peer that stops in the middle of a frame for 30 s (or of its handshake
    for 10 s) loses its connection.  (test_edges_s9 checks the behaviour with the limits
    shortened; these are the numbers a user reads.)"""
    from hopscope.app import collector

    assert collector.FRAME_TIMEOUT == 30.0
    assert collector.HANDSHAKE_TIMEOUT == 10.0


def test_a_raw_byte_past_ascii_in_the_target_is_a_400_and_its_line_is_safe(
    tmp_path: Path,
) -> None:
    """README: a raw byte past ASCII in the target (not percent-encoded) is a 400 from the
    proxy, as uvicorn, gunicorn and hypercorn answer it; and a text line never carries
    captured text raw to the terminal (here a raw U+202E and an ESC in the target)."""
    port = _free_port()
    proxy = subprocess.Popen(
        [sys.executable, "-m", "hopscope.app", "proxy", "--upstream",
         f"unix:{tmp_path / 'nobody.sock'}", "--listen", f"127.0.0.1:{port}",
         "--collector", "127.0.0.1:0", "--headless"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    answers: list[bytes] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/ready")  # a 502: no upstream
                break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the proxy did not start"
            time.sleep(0.1)
        for target in (b"/raw\xe2\x80\xaeevil", b"/esc\x1b[2J\xff"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
                got = b""
                while chunk := sock.recv(65536):
                    got += chunk
            answers.append(got.partition(b"\r\n")[0])
        time.sleep(0.5)  # the line is held a moment for late spans
    finally:
        proxy.terminate()
        out, _ = proxy.communicate(timeout=30)
    assert answers == [b"HTTP/1.1 400 Bad Request"] * 2
    lines = [line for line in out.splitlines() if " /raw" in line or " /esc" in line]
    assert len(lines) == 2, out
    for line in lines:
        assert " 400 " in line
        assert all(char.isprintable() for char in line), ascii(line)
