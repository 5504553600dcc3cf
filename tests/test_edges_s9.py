"""The edges of ``hopscope proxy``, the collector and ``hopscope run``, tried as users
meet them (session 9): an ``Upgrade: h2c`` request with a body (``curl --http2 -d``),
a collector peer stuck in the middle of a frame, a server a shell started under
``hopscope run``, an app whose load failure repeats after each ``--reload``.
Upstreams are real uvicorn apps or scripted sockets; peers are real sockets.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hopscope.app.collector import BackgroundCollector
from hopscope.tracing import SocketSink
from hopscope.tracing.sinks import WIRE_MAGIC
from test_collector import Inbox, _closed_by_peer, _raw_peer, has_span, request_records
from test_proxy import HOST, proxy_to, serve
from test_proxy_listener import read_responses
from test_proxy_user import OK, by_path, get, scripted, until_closed
from test_proxy_user2 import _client_span
from test_run import Run, _alive, _free_port
from test_run_user import _children
from test_run_user2 import _listening, _wait

pytestmark = pytest.mark.timeout(60)


async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers what reached it: method, target, header names and body."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    seen = {
        "method": scope["method"],
        "path": scope["path"],
        "headers": [name.decode() for name, _ in scope["headers"]],
        "body": body.decode("latin-1"),
    }
    data = json.dumps(seen).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"%d" % len(data))]})  # fmt: skip
    await send({"type": "http.response.body", "body": data})


def _seen(response: bytes) -> dict[str, Any]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), response[:200]
    seen: dict[str, Any] = json.loads(body)
    return seen


# -- Upgrade: h2c with a body ------------------------------------------------------------

H2C_POST = (
    b"POST /h2c HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
)


@pytest.mark.parametrize("framing", ["length", "chunked", "split"])
def test_an_h2c_upgrade_with_a_body_is_forwarded_with_it(framing: str) -> None:
    # llhttp ends an Upgrade request at its head, so the proxy answered 400 ("a request
    # body with an Upgrade is not supported"): curl --http2 -d data failed through it,
    # while nginx forwards such a request as plain HTTP/1.1.  Now its body goes on with
    # it, the Upgrade dropped, and the request pipelined behind it is answered.
    if framing == "chunked":
        request = H2C_POST + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    else:
        request = H2C_POST + b"Content-Length: 5\r\n\r\nabcde"
    behind = b"POST /next HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nxyz"
    with serve(echo) as upstream, proxy_to(upstream.url) as proxy:
        with socket.create_connection((HOST, proxy.port), timeout=10) as sock:
            if framing == "split":  # (the body in reads of its own)
                sock.sendall(request[:-3])
                time.sleep(0.1)  # (read apart: nothing observable says it was)
                sock.sendall(request[-3:] + behind)
            else:
                sock.sendall(request + behind)
            responses = read_responses(sock, 2)
    first, second = map(_seen, responses)
    assert (first["method"], first["path"], first["body"]) == ("POST", "/h2c", "abcde")
    names = [name.lower() for name in first["headers"]]
    assert "upgrade" not in names and "http2-settings" not in names
    assert (second["path"], second["body"]) == ("/next", "xyz")


def test_an_h2c_upgrade_answered_before_its_body_drops_the_body() -> None:
    # A request the proxy answers itself (no Host: 400 before any upstream) with a body
    # after an h2c Upgrade: the body is read and dropped, not taken for a request.
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    framing = b"Content-Length: %d\r\n\r\n" % len(smuggled)
    request = H2C_POST.replace(b"Host: x\r\n", b"") + framing + smuggled
    with scripted(by_path({})) as (upstream, proxy):
        with socket.create_connection((HOST, proxy.port), timeout=10) as sock:
            sock.sendall(request + get("/next"))
            responses = read_responses(sock, 1)
            assert responses[0].startswith(b"HTTP/1.1 400 ")
        assert not any(b"/smuggled" in head for head in upstream.heads)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_http2_with_data_goes_through_the_proxy() -> None:
    with serve(echo) as upstream, proxy_to(upstream.url) as proxy:
        out = subprocess.run(
            ["curl", "-sS", "--http2", "-d", "name=value", f"{proxy.url}/form"],
            capture_output=True, timeout=30, check=True,
        )  # fmt: skip
    seen = json.loads(out.stdout)
    assert (seen["method"], seen["path"], seen["body"]) == ("POST", "/form", "name=value")


# -- the collector: a peer stopped in the middle of a frame --------------------------------


def _collector(**options: Any) -> tuple[BackgroundCollector, list[str]]:
    said: list[str] = []
    collector = BackgroundCollector("127.0.0.1:0", Inbox(), warn=said.append, **options)
    collector.collector.frame_timeout = 0.5  # (FRAME_TIMEOUT is 30 s)
    collector.collector.handshake_timeout = 0.5
    return collector, said


@pytest.mark.parametrize(
    ("sent", "what"),
    [
        (WIRE_MAGIC + b"\x00\x00", "a frame"),  # half a frame's length
        (WIRE_MAGIC + struct.pack("!I", 100) + b"x" * 10, "a frame"),  # half a payload
        (WIRE_MAGIC[:4], "the handshake"),
    ],
    ids=["head", "payload", "handshake"],
)
def test_a_peer_stopped_in_the_middle_of_a_frame_is_dropped_and_said_once(
    sent: bytes, what: str
) -> None:
    # It held its connection (and its handler) for good, silently: a leak per such peer.
    collector, said = _collector()
    with collector:
        peers = [_raw_peer(collector.url) for _ in range(2)]
        try:
            for peer in peers:
                peer.sendall(sent)
            assert all(_closed_by_peer(peer) for peer in peers)  # (recv: 5 s at most)
        finally:
            for peer in peers:
                peer.close()
        assert collector.collector.rejected == 2
    assert len(said) == 1 and f"began {what} and did not end it within 0.5 s" in said[0]


def test_a_peer_that_says_nothing_is_let_go_silently() -> None:
    collector, said = _collector()
    with collector, _raw_peer(collector.url) as peer:
        assert _closed_by_peer(peer)
        assert collector.collector.rejected == 0
    assert said == []


def test_an_idle_app_between_frames_keeps_its_connection() -> None:
    # A SocketSink in an app nobody calls sends nothing for as long as it is idle.
    collector, said = _collector()
    inbox = collector.collector.consumer
    assert isinstance(inbox, Inbox)
    with collector:
        sink = SocketSink(collector.url)
        try:
            for name in ("GET /first", "GET /after-a-pause"):
                for record in request_records(name):
                    sink.emit(record)
                assert inbox.wait_for(has_span(name))
                time.sleep(1.5)  # (three frame timeouts, idle)
        finally:
            sink.close()
        assert collector.collector.connections == 1
        assert collector.collector.rejected == 0
    assert said == []


# -- hopscope run: a server a shell started --------------------------------------------------

ASGI_APP = """
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})
"""


def _watchdogs(pgid: int) -> list[int]:
    """hopscope run's watchdogs of process group ``pgid`` still running."""
    found = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/cmdline", "rb") as cmdline:
                argv = cmdline.read().split(b"\0")
        except OSError:
            continue
        if b"-c" in argv and str(pgid).encode() in argv and _alive(int(name)):
            if any(b"os.killpg(pgid" in arg for arg in argv):
                found.append(int(name))
    return found


def _shell_server(tmp_path: Path, runs: Callable[..., Run]) -> tuple[Run, int, int, int]:
    """``hopscope run -- sh -c "uvicorn ...; echo"`` (the ``;``: the shell cannot exec
    uvicorn); returns the run, the port, the shell's pid and the server's."""
    (tmp_path / "app.py").write_text(ASGI_APP)
    port = _free_port()
    script = f"uvicorn app:app --port {port}; echo the server ended"
    run = runs(tmp_path, "--headless", "--", "sh", "-c", script, save=False)
    run.wait_for(lambda: _listening(port), "the server to listen")
    (shell,) = _children(run.proc.pid)
    (server,) = _children(shell)
    return run, port, shell, server


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_server_under_a_shell_stops_when_hopscope_is_killed(
    tmp_path: Path, runs: Callable[..., Run]
) -> None:
    # PR_SET_PDEATHSIG gave the shell its SIGTERM; the uvicorn under it lived on, holding
    # the port, until someone found it.
    run, port, shell, server = _shell_server(tmp_path, runs)
    try:
        run.proc.send_signal(signal.SIGKILL)
        run.proc.wait(10)
        _wait(lambda: not _alive(server), "the server under the shell to exit")
        assert not _listening(port)
        _wait(lambda: not _watchdogs(shell), "the watchdog to exit")
    finally:  # what a failure left behind
        with contextlib.suppress(OSError):
            os.kill(server, signal.SIGKILL)


def test_a_run_stopped_by_hopscope_leaves_no_watchdog(
    tmp_path: Path, runs: Callable[..., Run]
) -> None:
    run, port, shell, server = _shell_server(tmp_path, runs)
    assert len(_watchdogs(shell)) == 1  # (detached: not a child of hopscope)
    run.stop(signal.SIGINT)  # (the shell ends by the group SIGTERM that follows: 143)
    assert not _alive(server) and not _listening(port)
    _wait(lambda: not _watchdogs(shell), "the watchdog to exit")


# -- hopscope run: a load failure after each --reload ----------------------------------------


def test_a_load_failure_is_said_again_after_each_reload(
    tmp_path: Path, runs: Callable[..., Run]
) -> None:
    # Said once a run (so that --workers 31 does not say it 31 times): a user who edits
    # the file and meets the same failure saw uvicorn's traceback again, not hopscope's.
    app = tmp_path / "broken.py"
    app.write_text('raise RuntimeError("the app is broken")\n')
    port = str(_free_port())
    run = runs(tmp_path, "--headless", "--", "uvicorn", "broken:app", "--reload", "--port", port,
               save=False)  # fmt: skip
    line = "hopscope: uvicorn could not load 'broken:app': nothing to trace"
    for n in (1, 2, 3):
        # Saved again until uvicorn reloads: its watcher starts after the first worker, so on
        # a loaded machine an edit made as that worker fails can come before it watches.
        def failed(n: int = n) -> bool:
            if run.err.count("RuntimeError: the app is") >= n:
                return True
            if n > 1:
                app.write_text(f'raise RuntimeError("the app is broken, {time.monotonic()}")\n')
                time.sleep(3)
            return False

        run.wait_for(failed, f"failure {n}", timeout=60)
        run.wait_for(lambda n=n: run.err.count(line) >= n, f"hopscope's line {n}")
    run.wait_for(
        lambda: run.err.count(line) == run.err.count("RuntimeError: the app is"),
        "a line for each failure",
    )
    run.stop(signal.SIGINT)
    assert run.err.count(line) == run.err.count("RuntimeError: the app is") >= 3


def test_h2c_upgrades_with_bodies_pipelined_in_one_read() -> None:
    # (Each Upgrade request parsed after another's: the listener's loop, not a nested call.)
    h2c_get = H2C_POST.replace(b"POST /h2c", b"GET /h2c-get") + b"\r\n"
    posts = [H2C_POST.replace(b"/h2c", b"/h2c-%d" % n) for n in range(3)]
    chunked = b"Transfer-Encoding: chunked\r\n\r\n1\r\nc\r\n0\r\n\r\n"
    bodies = [b"Content-Length: 2\r\n\r\nab", chunked]
    data = h2c_get + b"".join(post + bodies[n % 2] for n, post in enumerate(posts))
    with serve(echo) as upstream, proxy_to(upstream.url) as proxy:
        with socket.create_connection((HOST, proxy.port), timeout=10) as sock:
            sock.sendall(data + b"GET /last HTTP/1.1\r\nHost: x\r\n\r\n")
            seen = [_seen(response) for response in read_responses(sock, 5)]
    assert [(s["path"], s["body"]) for s in seen] == [
        ("/h2c-get", ""), ("/h2c-0", "ab"), ("/h2c-1", "c"), ("/h2c-2", "ab"), ("/last", ""),
    ]  # fmt: skip


# -- a raw non-ASCII byte in the target ----------------------------------------------------


def test_a_raw_non_ascii_target_is_refused_as_the_python_servers_refuse_it() -> None:
    # Decided with evidence (see HttpListener._bad_request): nginx 1.22 passes
    # "/caf\xc3\xa9" on, but uvicorn (httptools, h11), gunicorn and hypercorn answer 400.
    with scripted(by_path({})) as (upstream, proxy):
        got = until_closed(proxy, get("/first") + b"GET /caf\xc3\xa9?q HTTP/1.1\r\nHost: x\r\n\r\n")
        assert got.startswith(OK + b"HTTP/1.1 400 ")
        # Recorded with its method and target: it was "-" with no path (llhttp reports a
        # target only once it ended, and it stopped inside this one); decoded as UTF-8, as
        # uvicorn decodes a path (it was latin-1: "/cafÃ©").
        span = _client_span(proxy, "/café")
        assert span.attrs["http.request.method"] == "GET"
        assert span.attrs["url.query"] == "q"
        assert span.attrs["http.response.status_code"] == 400
        close = b"Connection: close\r\n"
        encoded = until_closed(proxy, b"GET /caf%C3%A9 HTTP/1.1\r\nHost: x\r\n" + close + b"\r\n")
        assert encoded.startswith(b"HTTP/1.1 200 ")
        assert [head.split(b" ")[1] for head in upstream.heads] == [b"/first", b"/caf%C3%A9"]
