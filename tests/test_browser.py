"""A real browser through ``hopscope run``: the page behaves as it does without hopscope.

Chromium (Debian's, driven by Playwright) loads one page that does what browsers do and
test clients rarely do: parallel connections, a gzip-encoded response, a conditional
request answered ``304 Not Modified`` from a static file's ETag, a form POST,
server-sent events and a WebSocket.  The page reports what it saw in its title; the
same page served by bare uvicorn must report the same, and the saved trace must hold
every request with the proxy, server and app hops.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from hopscope.tracing import Trace, load

APP = '''
import asyncio
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

PAGE = """<!doctype html><html><head><title>loading</title></head><body><script>
(async () => {
  const seen = {};
  const [a, b] = await Promise.all([fetch("/api/json?n=1"), fetch("/api/json?n=2")]);
  seen.json = [(await a.json()).n, (await b.json()).n];
  const big = await fetch("/big");
  seen.big = [big.status, (await big.text()).length];
  const first = await fetch("/static/data.txt");
  const etag = first.headers.get("etag");
  await first.text();
  const again = await fetch("/static/data.txt", {headers: {"If-None-Match": etag}});
  seen.etag = [first.status, again.status];
  const form = new URLSearchParams({name: "zoë", n: "3"});
  const posted = await fetch("/api/echo", {method: "POST", body: form});
  seen.form = await posted.json();
  seen.sse = await new Promise((resolve) => {
    const got = [];
    const source = new EventSource("/sse");
    source.onmessage = (e) => {
      got.push(e.data);
      if (got.length === 3) { source.close(); resolve(got); }
    };
  });
  seen.ws = await new Promise((resolve) => {
    const ws = new WebSocket("ws://" + location.host + "/ws");
    ws.onopen = () => ws.send("hello");
    ws.onmessage = (e) => { ws.close(1000); resolve(e.data); };
  });
  document.title = "done:" + JSON.stringify(seen);
})().catch((e) => { document.title = "failed:" + e; });
</script></body></html>"""


async def page(request):
    return HTMLResponse(PAGE)


async def api_json(request):
    return JSONResponse({"n": int(request.query_params["n"])})


async def big(request):
    return HTMLResponse("x" * 100_000)


async def echo(request):
    form = dict(parse_qsl((await request.body()).decode()))  # python-multipart not needed
    return JSONResponse({key: form[key] for key in sorted(form)})


async def sse(request):
    async def events():
        for n in range(3):
            yield f"data: tick {n}\\n\\n"
            await asyncio.sleep(0.05)

    return StreamingResponse(events(), media_type="text/event-stream")


async def ws(websocket):
    await websocket.accept()
    message = await websocket.receive_text()
    await websocket.send_text(message.upper())
    await websocket.receive()  # the close the page sends


app = Starlette(
    routes=[
        Route("/", page),
        Route("/api/json", api_json),
        Route("/big", big),
        Route("/api/echo", echo, methods=["POST"]),
        Route("/sse", sse),
        WebSocketRoute("/ws", ws),
        Mount("/static", StaticFiles(directory="static")),
    ],
    middleware=[Middleware(GZipMiddleware, minimum_size=500)],
)
'''

EXPECTED = {
    "json": [1, 2],
    "big": [200, 100_000],
    "etag": [200, 304],
    "form": {"n": "3", "name": "zoë"},
    "sse": ["tick 0", "tick 1", "tick 2"],
    "ws": "HELLO",
}
HOPSCOPE_RUN = [sys.executable, "-m", "hopscope.app", "run"]
URL = re.compile(r"open (http://127\.0\.0\.1:\d+)")


def _chromium() -> str:
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("Playwright is not installed (pip install playwright, and a Chromium)")
    system = shutil.which("chromium") or shutil.which("chromium-browser")
    if system is None:
        pytest.skip("no Chromium on PATH (Debian: apt-get install chromium)")
    return system


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOPSCOPE_")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    (root / "app.py").write_text(textwrap.dedent(APP))
    (root / "static").mkdir()
    (root / "static" / "data.txt").write_text("static file\n" * 50)
    return root


def _wait(proc: subprocess.Popen[bytes], ready: Any, what: str, err: Path) -> Any:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        result = ready()
        if result:
            return result
        if proc.poll() is not None:
            pytest.fail(f"exited ({proc.returncode}) before {what}:\n{err.read_text()}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}:\n{err.read_text()}")


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def serve(project: Path, processes: Callable[..., Any]) -> Callable[..., Any]:
    """Start a server command in the project; stopped with SIGINT, as a user would."""
    return functools.partial(processes, cwd=project, env=_env())


def _browse(chromium: str, url: str, timeout: float = 20_000) -> dict[str, Any]:
    """What the page in ``url`` saw (its title, ``done:`` + JSON), waited for ``timeout``
    milliseconds; skips when Chromium cannot run here."""
    from playwright.sync_api import Error, sync_playwright

    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium)
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_function(
                "document.title.startsWith('done:') || document.title.startsWith('failed:')",
                timeout=timeout,
            )
            title = page.title()
            browser.close()
    except Error as exc:
        pytest.skip(f"Chromium cannot run here: {str(exc).splitlines()[0]}")
    assert title.startswith("done:"), title
    seen: dict[str, Any] = json.loads(title.removeprefix("done:"))
    return seen


def test_a_browser_sees_the_same_page_through_hopscope(
    project: Path, serve: Any, tmp_path: Path
) -> None:
    chromium = _chromium()

    port = _free_port()
    bare_err = tmp_path / "bare.err"
    bare = serve([sys.executable, "-m", "uvicorn", "app:app", "--port", str(port)], bare_err)
    _wait(bare, lambda: _answers(f"http://127.0.0.1:{port}/"), "bare uvicorn", bare_err)
    assert _browse(chromium, f"http://127.0.0.1:{port}") == EXPECTED

    trace_file = tmp_path / "browser.jsonl"
    err = tmp_path / "hopscope.err"
    run = serve(
        [*HOPSCOPE_RUN, "app:app", "--headless", "-o", str(trace_file)],
        err,
    )
    url = _wait(run, lambda: URL.search(err.read_text()), "the URL", err).group(1)
    _wait(run, lambda: _answers(url + "/"), "hopscope to answer", err)
    assert _browse(chromium, url) == EXPECTED

    run.send_signal(signal.SIGINT)
    assert run.wait(30) == 0, err.read_text()
    traces = [t for t in load(trace_file) if t.finished]

    def hops(trace: Trace) -> set[str]:
        return {span.hop for span in trace.spans.values()}

    by_target: dict[str, list[Trace]] = {}
    for trace in traces:
        target = (trace.path or "").split("?")[0]
        by_target.setdefault(target, []).append(trace)
    for target in ("/", "/api/json", "/big", "/static/data.txt", "/api/echo", "/sse", "/ws"):
        assert target in by_target, f"no trace for {target}: {sorted(by_target)}"
    for target, found in by_target.items():
        if target in ("/", "/api/json", "/big", "/static/data.txt", "/api/echo", "/sse"):
            for trace in found:
                assert {"proxy", "server", "app"} <= hops(trace), (target, hops(trace))
    statuses = sorted(trace.status for trace in by_target["/static/data.txt"] if trace.status)
    assert 304 in statuses and 200 in statuses, statuses
    assert len(by_target["/api/json"]) >= 2
    assert "app" in hops(by_target["/ws"][0])
