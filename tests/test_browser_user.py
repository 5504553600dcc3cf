"""A web developer's browser through ``hopscope proxy``: what it follows stays on the proxy.

The app sees the upstream's Host (the proxy replaces it, as nginx does), so an absolute
URL it builds names the upstream: Starlette's trailing-slash redirect, ``url_for``.  A
browser following such a Location left the proxy, and what it did next was missing from
the trace.  The proxy now rewrites a Location (or Refresh) that starts with its upstream's
URL to the scheme and Host the client used, as nginx's ``proxy_redirect default`` does,
and records the change as a ``response.relocated`` event.
"""

from __future__ import annotations

import dataclasses
import functools
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
from hopscope.tracing import load
from test_browser import _browse, _chromium, _env, _free_port

APP = """
from starlette.applications import Starlette
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route


async def items(request):
    return HTMLResponse("<title>items</title>items")


async def to(request):
    own = str(request.base_url).rstrip("/")
    where = request.query_params["loc"].replace("{own}", own)
    code = int(request.query_params.get("code", "302"))
    return Response(status_code=code, headers={"Location": where})


async def refresh(request):
    own = str(request.base_url).rstrip("/")
    return Response("later", headers={"Refresh": f"0; url={own}/items/"})


async def form(request):
    return HTMLResponse(
        '<form method="post" action="/to?loc={own}/items/&code=303">'
        '<button id="go">go</button></form>'
    )


app = Starlette(
    routes=[
        Route("/items/", items),
        Route("/to", to, methods=["GET", "POST"]),
        Route("/base/to", to),
        Route("/refresh", refresh),
        Route("/form", form),
    ]
)
"""


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return False
    return True


def _wait(proc: subprocess.Popen[bytes], url: str, err: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if _answers(url):
            return
        if proc.poll() is not None:
            pytest.fail(f"exited ({proc.returncode}):\n{err.read_text()}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {url}:\n{err.read_text()}")


@dataclasses.dataclass
class Site:
    upstream: str
    proxy: str
    trace: Path
    proc: Any
    err: Path

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        assert self.proc.wait(30) == 0, self.err.read_text()


def _start_proxy(
    start: Callable[..., Any], tmp_path: Path, upstream: str, probe: str, *extra: str
) -> tuple[str, Any, Path, Path]:
    """``hopscope proxy`` in front of ``upstream`` (its own collector port, ``-o`` a trace
    file), answering ``probe``: (its URL, the process, its stderr file, the trace file)."""
    port = _free_port()
    err, trace = tmp_path / f"proxy-{port}.err", tmp_path / f"trace-{port}.jsonl"
    args = ["--upstream", upstream, "--listen", f"127.0.0.1:{port}", "-o", str(trace),
            "--collector", f"127.0.0.1:{_free_port()}", *extra]  # fmt: skip
    proc = start([sys.executable, "-m", "hopscope.app", "proxy", *args], err)
    url = f"http://127.0.0.1:{port}"
    _wait(proc, url + probe, err)
    return url, proc, err, trace


@pytest.fixture
def site(tmp_path: Path, processes: Callable[..., Any]) -> Site:
    (tmp_path / "app.py").write_text(textwrap.dedent(APP))
    start = functools.partial(processes, cwd=tmp_path, env=_env())
    up = _free_port()
    app_err = tmp_path / "app.err"
    app = start([sys.executable, "-m", "uvicorn", "app:app", "--port", str(up)], app_err)
    upstream = f"http://127.0.0.1:{up}"
    _wait(app, upstream + "/items/", app_err)
    url, proxy, err, trace = _start_proxy(start, tmp_path, upstream, "/items/")
    return Site(upstream, url, trace, proxy, err)


def _location(url: str, **headers: str) -> str | None:
    response = httpx.get(url, headers=headers, timeout=10)
    value: str | None = response.headers.get("location")
    return value


def test_a_location_naming_the_upstream_names_the_proxy(site: Site) -> None:
    proxy, upstream = site.proxy, site.upstream
    # Starlette's trailing-slash redirect builds its URL from the Host it saw.
    assert _location(upstream + "/items") == upstream + "/items/"  # (direct: itself)
    assert _location(proxy + "/items") == proxy + "/items/"
    for code in (301, 302, 303, 307, 308):
        url = proxy + f"/to?loc={{own}}/items/%3Fa=1&code={code}"
        assert _location(url) == proxy + "/items/?a=1", code
    # The Host the client used, whatever it is (nginx: the same, with its own port).
    assert _location(proxy + "/items", Host="example.test:9999") == (
        "http://example.test:9999/items/"
    )
    # Anything else goes on as it came: relative, another site, another port.
    assert _location(proxy + "/to?loc=/items/") == "/items/"
    other = f"http://127.0.0.1:{_free_port()}/x"
    assert _location(proxy + "/to?loc=" + other) == other
    longer = upstream + "0/x"  # (a prefix of the upstream's origin, not it)
    assert _location(proxy + "/to?loc=" + longer) == longer
    refresh = httpx.get(proxy + "/refresh", timeout=10).headers["refresh"]
    assert refresh == f"0; url={proxy}/items/"

    site.stop()
    events = [
        event.attrs
        for trace in load(site.trace)
        for span in trace.spans.values()
        for event in span.events
        if event.name == "response.relocated"
    ]
    assert {"from": upstream + "/items/", "to": proxy + "/items/"} in events
    assert len(events) == 1 + 5 + 1 + 1  # (only the ones changed)


def test_with_a_prefix_only_locations_under_it_are_rewritten(
    site: Site, tmp_path: Path, processes: Callable[..., Any]
) -> None:
    """``--upstream http://h:p/base``: ``http://h:p/base/x`` is the proxy's ``/x`` (nginx:
    ``proxy_pass http://h:p/base/`` at ``location /``); ``http://h:p/x`` is not under it."""
    start = functools.partial(processes, cwd=tmp_path, env=_env())
    proxy = _start_proxy(start, tmp_path, site.upstream + "/base", "/to?loc=/")[0]
    assert _location(proxy + "/to?loc={own}/base/x%3Fq") == proxy + "/x?q"
    assert _location(proxy + "/to?loc={own}/x") == site.upstream + "/x"


def test_an_http10_request_without_host_is_sent_to_the_address_it_used(site: Site) -> None:
    host, port = site.proxy.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /items HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert f"location: {site.proxy}/items/\r\n".encode() in data.lower(), data


def test_a_browser_following_redirects_stays_on_the_proxy(site: Site) -> None:
    chromium = _chromium()
    from playwright.sync_api import Error, sync_playwright

    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium)
            page = browser.new_page()
            page.goto(site.proxy + "/items", timeout=20_000)  # 307 to /items/
            slash = page.url
            page.goto(site.proxy + "/form", timeout=20_000)
            with page.expect_navigation(timeout=20_000):
                page.click("#go")  # a POST answered 303 with the app's absolute URL
            posted = page.url
            browser.close()
    except Error as exc:
        pytest.skip(f"Chromium cannot run here: {str(exc).splitlines()[0]}")
    assert slash == site.proxy + "/items/"
    assert posted == site.proxy + "/items/"
    site.stop()
    paths = [trace.path for trace in load(site.trace)]
    assert paths.count("/items/") >= 2, paths


FLASK_APP = '''
import hashlib
import time

from flask import Flask, Response, make_response, request, send_file

app = Flask(__name__)
PAGE = """<!doctype html><html><head><title>loading</title></head><body>%s<script>
(async () => {
  const seen = {};
  await new Promise((r) => document.readyState === "complete" ? r() : addEventListener("load", r));
  seen.imgs = [...document.images].filter((i) => i.naturalWidth === 1).length;
  const form = new FormData();
  form.append("who", "zo\\u00eb");
  form.append("doc", new Blob([new Uint8Array(300000).map((_, i) => i %% 251)]), "data.bin");
  seen.upload = await (await fetch("/upload", {method: "POST", body: form})).json();
  await fetch("/cookies");
  seen.cookie = await (await fetch("/echo-cookie")).text();
  const part = await fetch("/media", {headers: {Range: "bytes=1000-1999"}});
  const size = (await part.arrayBuffer()).byteLength;
  seen.range = [part.status, part.headers.get("content-range"), size];
  const stop = new AbortController();
  const slow = await fetch("/slow", {signal: stop.signal});
  const reader = slow.body.getReader();
  let got = 0;
  while (got < 1000000) got += (await reader.read()).value.length;
  stop.abort();
  seen.aborted = got >= 1000000;
  document.title = "done:" + JSON.stringify(seen);
})().catch((e) => { document.title = "failed:" + e; });
</script></body></html>"""
GIF = bytes.fromhex(
    "47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b"
)


@app.get("/")
def page():
    return PAGE % "".join(f'<img src="/asset/{i}.gif">' for i in range(12))


@app.get("/asset/<int:i>.gif")
def asset(i):
    time.sleep(0.05)  # (the browser opens its 6 connections)
    return Response(GIF, mimetype="image/gif")


@app.post("/upload")
def upload():
    doc = request.files["doc"]
    data = doc.read()
    digest = hashlib.sha256(data).hexdigest()[:12]
    return {"name": doc.filename, "size": len(data), "sha": digest, "who": request.form["who"]}


@app.get("/cookies")
def cookies():
    response = make_response("c")
    response.set_cookie("a", "1")
    response.set_cookie("b", "two, three")
    response.set_cookie("c", "3", expires="Wed, 21 Oct 2037 07:28:00 GMT")
    return response


@app.get("/echo-cookie")
def echo_cookie():
    return request.headers.get("Cookie", "")


@app.get("/media")
def media():
    return send_file("media.bin", mimetype="video/webm", conditional=True)


@app.get("/slow")
def slow():
    def chunks():
        for n in range(400):
            yield b"y" * 65536
            if n > 16:
                time.sleep(0.02)
    return Response(chunks(), headers={"Content-Length": str(400 * 65536)})
'''

FLASK_EXPECTED = {
    "imgs": 12,
    "upload": {"name": "data.bin", "sha": "3c65ea93424a", "size": 300000, "who": "zoë"},
    "cookie": 'a=1; b="two\\054 three"; c=3',
    "range": [206, "bytes 1000-1999/3000000", 1000],
    "aborted": True,
}


def test_a_browser_on_flask_under_gunicorn_sees_the_same_page(
    tmp_path: Path, processes: Callable[..., Any]
) -> None:
    """Parallel assets, a multipart upload, several Set-Cookie fields, a Range request
    and an aborted download, direct and through the proxy; the trace says what each
    did (the aborted one: the client went away)."""
    chromium = _chromium()

    (tmp_path / "fapp.py").write_text(textwrap.dedent(FLASK_APP))
    (tmp_path / "media.bin").write_bytes(bytes(range(256)) * 11718 + bytes(192))
    start = functools.partial(processes, cwd=tmp_path, env=_env())

    browse = functools.partial(_browse, chromium, timeout=30_000)

    up = _free_port()
    upstream = f"http://127.0.0.1:{up}"
    app_err = tmp_path / "gunicorn.err"
    gunicorn = [sys.executable, "-m", "gunicorn", "-k", "gthread", "--threads", "8"]
    app = start([*gunicorn, "-b", f"127.0.0.1:{up}", "fapp:app"], app_err)
    _wait(app, upstream + "/echo-cookie", app_err)
    assert browse(upstream) == FLASK_EXPECTED

    url, proxy, err, trace = _start_proxy(start, tmp_path, upstream, "/echo-cookie")
    assert browse(url) == FLASK_EXPECTED
    proxy.send_signal(signal.SIGINT)
    assert proxy.wait(30) == 0, err.read_text()

    by_path: dict[str, list[Any]] = {}
    for found in load(trace):
        by_path.setdefault(found.path or "", []).append(found)
    assert len([p for p in by_path if p.startswith("/asset/")]) == 12
    connections = {
        span.attrs.get("connection.accepted_ts")
        for path, found in by_path.items()
        if path.startswith("/asset/")
        for span in found[0].spans.values()
        if span.hop == "client"
    }
    assert len(connections) > 1  # (in parallel)
    upload = by_path["/upload"][0]
    client = next(s for s in upload.spans.values() if s.hop == "client")
    assert client.attrs["http.request.body.size"] > 300_000
    assert by_path["/media"][0].status == 206
    slow = next(s for s in by_path["/slow"][0].spans.values() if s.hop == "client")
    assert slow.attrs.get("disconnected") is True, slow.attrs
