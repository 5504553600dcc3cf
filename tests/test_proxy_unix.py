"""``hopscope proxy --upstream unix:PATH``: an app server bound to a Unix socket.

Why: behind nginx in production, gunicorn and uvicorn are usually bound to a Unix socket
(``gunicorn --bind unix:/run/app.sock``, ``uvicorn --uds``), and nginx forwards to it
(``proxy_pass http://unix:/run/app.sock``).  Putting hopscope's proxy in nginx's place
must not mean rebinding the app to a TCP port.  The upstream is then ``localhost`` in
the Host header and URLs (as nginx names it), and the socket's path is what traces name.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hopscope.tracing import FileSink, load, wrap
from test_proxy import proxy_to, wait_until
from test_run import _free_port
from websockets.sync.client import connect

pytestmark = pytest.mark.timeout(60)

BIN = os.path.dirname(sys.executable)

ASGI_APP = """
import json


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            await send({"type": "websocket.send", "text": "echo " + message["text"]})
    headers = {k.decode(): v.decode() for k, v in scope["headers"]}
    body = json.dumps({"path": scope["path"], "headers": headers}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
"""

WSGI_APP = """
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"wsgi over a unix socket " + environ["PATH_INFO"].encode()]
"""


def _wait_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the server did not bind {path}")
        time.sleep(0.05)


@contextlib.contextmanager
def _server(argv: list[str], cwd: Path, sock: Path) -> Iterator[None]:
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_socket(sock, proc)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:  # pragma: no cover - a failure: leave nothing
            proc.kill()
            proc.wait(10)


@pytest.fixture
def uds(short_dir: Path) -> Iterator[Path]:
    """A uvicorn serving ASGI_APP on a Unix socket."""
    (short_dir / "unixapp.py").write_text(textwrap.dedent(ASGI_APP))
    sock = short_dir / "app.sock"
    argv = [os.path.join(BIN, "uvicorn"), "unixapp:app", "--uds", str(sock)]
    argv += ["--log-level", "warning"]
    with _server(argv, short_dir, sock):
        yield sock


def test_http_goes_to_the_socket_and_the_trace_names_it(uds: Path) -> None:
    with proxy_to(f"unix:{uds}") as proxy:
        response = httpx.get(f"{proxy.url}/hello?x=1", headers={"Host": "example.test"})
        assert response.status_code == 200
        seen = response.json()
        assert seen["path"] == "/hello"
        # nginx's $proxy_host for a unix: upstream, and the client's own Host kept beside it.
        assert seen["headers"]["host"] == "localhost"
        assert seen["headers"]["x-forwarded-host"] == "example.test"
        trace, _ = proxy.span("client", "/hello")
        (span,) = trace.by_hop("proxy")
        assert span.attrs["server.address"] == str(uds)
        assert "server.port" not in span.attrs or span.attrs["server.port"] is None
        assert span.attrs["url.full"] == "http://localhost/hello?x=1"
        # Kept alive: the second request reuses the socket's connection.
        assert httpx.get(f"{proxy.url}/again").status_code == 200
        assert proxy.stats()["created"] == 1


def test_a_websocket_goes_to_the_socket(uds: Path) -> None:
    with proxy_to(f"unix:{uds}") as proxy:
        with connect(proxy.url.replace("http://", "ws://") + "/ws") as ws:
            ws.send("hi")
            assert ws.recv(timeout=10) == "echo hi"

        def ended() -> bool:
            return any(
                s.hop == "proxy" and s.finished and s.attrs.get("server.address") == str(uds)
                for t in proxy.traces()
                for s in t.spans.values()
            )

        assert wait_until(ended)


def test_a_missing_socket_is_a_502_that_says_so(short_dir: Path) -> None:
    missing = short_dir / "none.sock"
    with proxy_to(f"unix:{missing}") as proxy:
        response = httpx.get(f"{proxy.url}/x")
        assert response.status_code == 502
        assert f"unix:{missing}" in response.text
        assert "No such file or directory" in response.text


def test_gunicorn_on_a_socket_through_hopscope_proxy(short_dir: Path) -> None:
    (short_dir / "wsgiapp.py").write_text(textwrap.dedent(WSGI_APP))
    sock = short_dir / "g.sock"
    gunicorn = [os.path.join(BIN, "gunicorn"), "--bind", f"unix:{sock}", "wsgiapp:app"]
    port = _free_port()
    with _server(gunicorn, short_dir, sock):
        proxy = subprocess.Popen(
            [sys.executable, "-m", "hopscope.app", "proxy", "--upstream", f"unix:{sock}",
             "--listen", f"127.0.0.1:{port}", "--collector", f"127.0.0.1:{_free_port()}",
             "--headless"],
            cwd=short_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:

            def answered() -> httpx.Response | None:
                with contextlib.suppress(httpx.TransportError):
                    return httpx.get(f"http://127.0.0.1:{port}/g")
                return None

            response = wait_until(answered)
            assert response.text == "wsgi over a unix socket /g"
        finally:
            proxy.terminate()
            out, err = proxy.communicate(timeout=30)
        assert proxy.returncode == 0, err
        assert f"-> unix:{sock};" in err.decode()
        assert " GET /g 200 " in out.decode()


@pytest.mark.parametrize("upstream", ["unix:", "unix"])
def test_a_bad_unix_upstream_is_one_line(upstream: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "hopscope.app", "proxy", "--upstream", upstream, "--headless"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "unix:PATH" in done.stderr or "socket path" in done.stderr


def test_replay_to_a_socket(uds: Path, tmp_path: Path, serve_asgi: Any) -> None:
    namespace: dict[str, Any] = {}
    exec(textwrap.dedent(ASGI_APP), namespace)
    capture = tmp_path / "capture.jsonl"
    sink = FileSink(capture)
    with serve_asgi(wrap(namespace["app"], sink=sink)) as base:
        assert httpx.get(f"{base}/replayed").status_code == 200
    sink.close()
    done = subprocess.run(
        [sys.executable, "-m", "hopscope.app", "replay", str(capture), "--target", f"unix:{uds}",
         "-o", str(tmp_path / "replay.jsonl")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    # The app echoes the Host it got: localhost (the socket's name) against the capture's
    # 127.0.0.1:PORT, so the body differs there, and only there.
    assert done.returncode == 1, done.stderr
    assert "/replayed" in done.stdout and "200" in done.stdout
    assert "headers.host" in done.stdout
    assert f"replayed against unix:{uds}" in done.stdout
    (trace,) = load(tmp_path / "replay.jsonl")
    (client,) = trace.by_hop("client")
    assert client.attrs["server.address"] == str(uds)
    assert client.attrs["url.full"] == "http://localhost/replayed"


def test_the_uis_replay_suggests_and_reaches_the_socket(uds: Path) -> None:
    from hopscope.tui.replay_view import ComparisonScreen, TargetScreen
    from test_tui_replay import run_app, select_first, ui_with
    from textual.pilot import Pilot
    from textual.widgets import Input
    from uitools import wait_for

    with proxy_to(f"unix:{uds}") as proxy:
        assert httpx.get(f"{proxy.url}/again").status_code == 200
        events = proxy.sink.events()
    app = ui_with(events)

    async def scenario(pilot: Pilot[None]) -> None:
        await select_first(app, pilot)
        await pilot.press("r")
        prompt = await wait_for(
            pilot, lambda: isinstance(app.screen, TargetScreen) and app.screen, "the prompt"
        )
        prompt.query_one("#target-input", Input).value = f"unix:{uds}"
        await pilot.press("enter")
        screen = await wait_for(
            pilot, lambda: isinstance(app.screen, ComparisonScreen) and app.screen, "result"
        )
        (result,) = screen.results
        assert result.error is None, result.error
        assert result.status == 200
        assert result.request.url == "http://localhost/again"
        await pilot.press("escape")

    run_app(app, scenario)


def test_a_trace_sent_to_a_socket_suggests_the_socket() -> None:
    # A client span whose server is a Unix socket (hopscope replay --target unix:PATH -o):
    # the UI's replay prompt suggested "http:///PATH".
    from hopscope.tracing.model import assemble
    from hopscope.tracing.records import new_span_id, new_trace_id, to_events
    from hopscope.tui.resend import original_target

    trace_id, span_id = new_trace_id(), new_span_id()
    attrs = {"http.request.method": "GET", "url.path": "/x", "server.address": "/run/app.sock"}
    records = [
        ("s", 1, trace_id, span_id, 0, "client", "GET /x", 1, attrs),
        ("e", 2, trace_id, span_id, {"http.response.status_code": 200}),
    ]
    (trace,) = assemble([e for r in records for e in to_events(r)])
    assert original_target(trace) == "unix:/run/app.sock"
