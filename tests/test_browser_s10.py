"""A web developer's browser through ``hopscope run``, session 10: what test_browser.py and
test_browser_user.py do not already try.

* A server-sent event stream and a WebSocket the page drives message by message: each
  event reaches the page before the next is sent (the app waits for the page's
  acknowledgement, so a proxy that buffered would stall it), while the stream is open
  the saved trace already shows it running and the tail has no line for it yet, and the
  trace holds the stream's chunk summary and the WebSocket's messages.
* A gzip-compressed response larger than the 64 KiB capture limit: the browser decodes
  the same text through hopscope; the HAR export used to hold the first 64 KiB of
  *gzip* bytes (base64, under a ``text/plain`` mimeType); it now holds their start
  decoded, as the UI's Response tab shows it, and says so.
* A page navigating away while its fetch waits: client gone before the response, the
  upstream connection dropped, the app's span still ended, no socket left open.
* Django's admin login through ``hopscope run``: the proxy sent the upstream's Host, and
  Django's CSRF check, comparing the browser's Origin with that Host, refused the login
  POST with a 403; ``hopscope run`` now keeps the client's Host (``keep_host``).

One Chromium (Debian's, driven by Playwright) serves the module; each test has its own
context (cookies, cache).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hopscope.tracing import load
from test_browser import _chromium, _env, _free_port, _wait

pytestmark = pytest.mark.timeout(120)

ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
HOPSCOPE_RUN = [sys.executable, "-m", "hopscope.app", "run"]
URL = re.compile(r"open (http://127\.0\.0\.1:\d+)")

APP = '''
import asyncio
import random

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.responses import HTMLResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute

PAGE = """<!doctype html><title>loading</title><script>
(async () => {
  const seen = {sse: [], ws: []};
  await new Promise((resolve) => {
    const source = new EventSource("/sse");
    source.onmessage = (e) => {
      seen.sse.push(e.data);
      document.title = "got:" + seen.sse.length;
      if (e.data === "end") { source.close(); resolve(); }
      else fetch("/ack?n=" + (seen.sse.length - 1));
    };
  });
  await new Promise((resolve) => {
    const ws = new WebSocket("ws://" + location.host + "/ws");
    ws.onopen = () => ws.send("m0");
    ws.onmessage = (e) => {
      seen.ws.push(e.data);
      if (seen.ws.length === 20) { ws.close(1000); resolve(); }
      else ws.send("m" + seen.ws.length);
    };
  });
  document.title = "done:" + JSON.stringify(seen);
})().catch((e) => { document.title = "failed:" + e; });
</script>"""

EVENTS = {}


def event(name):
    return EVENTS.setdefault(name, asyncio.Event())


async def page(request):
    return HTMLResponse(PAGE)


async def sse(request):
    for name in list(EVENTS):
        del EVENTS[name]

    async def events():
        for n in range(6):
            yield f"data: tick {n}\\n\\n"
            waits = [f"ack{n}"] + (["release"] if n == 2 else [])
            for name in waits:
                try:
                    await asyncio.wait_for(event(name).wait(), 20)
                except asyncio.TimeoutError:
                    yield f"data: no {name}\\n\\n"
        yield "data: end\\n\\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def ack(request):
    event("ack" + request.query_params["n"]).set()
    return PlainTextResponse("ok")


async def release(request):
    event("release").set()
    return PlainTextResponse("ok")


async def ws(websocket):
    await websocket.accept()
    for _ in range(20):
        await websocket.send_text((await websocket.receive_text()).upper())
    await websocket.receive()  # the page's close


def huge_text():
    chars = random.Random(7)
    return "".join(chars.choice("abcdefghijklmnopqrstuvwxyz \\n") for _ in range(400_000))


LEAVE = """<!doctype html><title>leave</title><script>
fetch("/long");
setTimeout(() => { location.href = "/ack?n=left"; }, 300);
</script>"""


async def leave(request):
    return HTMLResponse(LEAVE)


async def long(request):
    await asyncio.sleep(1.5)
    return PlainTextResponse("late")


async def huge(request):
    return PlainTextResponse(huge_text())


app = Starlette(
    routes=[
        Route("/", page),
        Route("/sse", sse),
        Route("/ack", ack),
        Route("/release", release),
        WebSocketRoute("/ws", ws),
        Route("/huge", huge),
        Route("/leave", leave),
        Route("/long", long),
    ],
    middleware=[Middleware(GZipMiddleware, minimum_size=500)],
)
'''


def _huge_text() -> str:
    """What the app's ``/huge`` answers (compressed: some 257 KB, over the 64 KiB limit)."""
    chars = random.Random(7)
    return "".join(chars.choice("abcdefghijklmnopqrstuvwxyz \n") for _ in range(400_000))


def _until(what: str, ready: Callable[[], Any], proc: subprocess.Popen[bytes], err: Path) -> Any:
    return _wait(proc, ready, what, err)  # (test_browser's, the question first)


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return False
    return True


class _Servers:
    """The module's app served bare (uvicorn) and through ``hopscope run`` (``-o``);
    ``err`` holds hopscope's output, its tail lines included."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []
        try:  # (a start that fails stops what it started: nothing outlives the test)
            port = _free_port()
            bare_err = root / "bare.err"
            argv = [sys.executable, "-m", "uvicorn", "app:app", "--port", str(port)]
            bare = self._start(argv, bare_err)
            self.bare = f"http://127.0.0.1:{port}"
            _until("bare uvicorn", lambda: _answers(self.bare + "/ack?n=x"), bare, bare_err)
            self.trace = root / "trace.jsonl"
            self.err = root / "hopscope.err"
            argv = [*HOPSCOPE_RUN, "app:app", "--port", "0", "--headless", "-o", str(self.trace)]
            self.run = self._start(argv, self.err)
            found = _until("the URL", lambda: URL.search(self.err.read_text()), self.run, self.err)
            self.url: str = found.group(1)
            _until("hopscope", lambda: _answers(self.url + "/ack?n=x"), self.run, self.err)
        except BaseException:
            self.close()
            raise

    def _start(self, argv: list[str], err: Path) -> subprocess.Popen[bytes]:
        with open(err, "wb") as stderr:
            proc = subprocess.Popen(
                argv, cwd=self.root, env=_env(), stdin=subprocess.DEVNULL,
                stdout=stderr, stderr=subprocess.STDOUT,  # (tail lines are on stdout)
            )  # fmt: skip
        self.procs.append(proc)
        return proc

    def traces(self, path: str) -> list[Any]:
        """The saved traces of ``path`` so far (the file is written as requests arrive)."""
        return [t for t in load(self.trace) if t.path == path] if self.trace.exists() else []

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:  # pragma: no cover - a failure
                proc.kill()
                proc.wait(10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = _chromium()
    from playwright.sync_api import Error, sync_playwright

    playwright = sync_playwright().start()
    try:
        launched = playwright.chromium.launch(executable_path=chromium, args=ARGS)
    except Error as exc:
        playwright.stop()
        pytest.skip(f"Chromium cannot run here: {str(exc).splitlines()[0]}")
    yield launched
    launched.close()
    playwright.stop()


@pytest.fixture(scope="module")
def servers(browser: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Servers]:
    root = tmp_path_factory.mktemp("browser_s10")
    (root / "app.py").write_text(textwrap.dedent(APP))
    started = _Servers(root)
    yield started
    started.close()


def _stream_page(browser: Any, servers: _Servers, url: str) -> dict[str, Any]:
    """Load the page, stop at the third event (the app waits for /release), check the
    proxied trace there (``url`` is hopscope's), then let it finish: what it saw."""
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(url + "/", timeout=20_000)
        page.wait_for_function("document.title === 'got:3'", timeout=20_000)
        if url == servers.url:
            # The stream is open: the saved trace shows it running, the tail has no line.
            running = _until(
                "/sse in the trace file", lambda: servers.traces("/sse"), servers.run, servers.err
            )
            assert not running[0].finished
            assert " /sse " not in servers.err.read_text()
        assert httpx.get(url + "/release", timeout=10).status_code == 200
        page.wait_for_function(
            "document.title.startsWith('done:') || document.title.startsWith('failed:')",
            timeout=20_000,
        )
        title: str = page.title()
    finally:
        context.close()
    assert title.startswith("done:"), title
    seen: dict[str, Any] = json.loads(title.removeprefix("done:"))
    return seen


def test_sse_and_websocket_arrive_one_by_one_and_are_traced_live(
    browser: Any, servers: _Servers
) -> None:
    expected = {
        "sse": [f"tick {n}" for n in range(6)] + ["end"],
        "ws": [f"M{n}" for n in range(20)],
    }
    assert _stream_page(browser, servers, servers.bare) == expected
    assert _stream_page(browser, servers, servers.url) == expected

    def done() -> list[Any]:
        return [t for t in servers.traces("/sse") + servers.traces("/ws") if t.finished]

    _until("both finished in the trace", lambda: len(done()) == 2, servers.run, servers.err)
    _until("the tail line of /sse", lambda: " /sse 200 " in servers.err.read_text(),
           servers.run, servers.err)  # fmt: skip
    sse = servers.traces("/sse")[0]
    for hop in ("proxy", "app"):
        span = next(s for s in sse.spans.values() if s.hop == hop)
        summary = next(e for e in span.events if e.name == "response.body.summary")
        assert summary.attrs["count"] == 7, (hop, summary.attrs)
    ws = servers.traces("/ws")[0]
    app = next(s for s in ws.spans.values() if s.hop == "app")
    assert app.attrs["websocket.messages_in"] == app.attrs["websocket.messages_out"] == 20
    texts = [e.attrs.get("text") for e in app.events if e.name == "websocket.message"]
    assert texts[:4] == ["m0", "M0", "m1", "M1"]


def test_a_cut_gzip_body_is_exported_decoded(
    browser: Any, servers: _Servers, tmp_path: Path
) -> None:
    text = _huge_text()
    context = browser.new_context()
    try:
        page = context.new_page()
        for url in (servers.bare, servers.url):
            response = page.goto(url + "/huge", timeout=20_000)
            assert response is not None
            assert response.headers.get("content-encoding") == "gzip"
            assert response.body().decode() == text  # (the browser decodes the same)
    finally:
        context.close()

    found = _until("/huge in the trace", lambda: [t for t in servers.traces("/huge") if t.finished],
                   servers.run, servers.err)  # fmt: skip
    app = next(s for s in found[0].spans.values() if s.hop == "app")
    assert app.attrs["http.response.body.truncated"] is True
    sent = app.attrs["http.response.body.size"]
    assert sent > 64 * 1024

    har = tmp_path / "out.har"
    argv = [sys.executable, "-m", "hopscope.app", "export", str(servers.trace), "--har", str(har)]
    subprocess.run(argv, check=True, capture_output=True, timeout=60, env=_env())
    entries = [
        e for e in json.loads(har.read_text())["log"]["entries"]
        if e["request"]["url"].endswith("/huge")
    ]  # fmt: skip
    content = entries[0]["response"]["content"]
    assert "encoding" not in content, str(content)[:200]  # text, not base64 gzip bytes
    shown = content["text"]
    assert len(shown) > 64 * 1024 and text.startswith(shown)
    assert content["size"] == sent == entries[0]["response"]["bodySize"]
    assert content["comment"].startswith("hopscope kept only the first 65536 of")
    assert "decoded from gzip" in content["comment"]


def _established(port: int) -> int:
    """TCP connections to or from ``port`` on this machine that are not closed (ESTABLISHED
    or half-closed), from /proc."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                local, remote, state = fields[1], fields[2], fields[3]
                ports = {int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16)}
                if port in ports and state in (
                    "01",
                    "08",
                    "04",
                    "05",
                ):  # ESTAB, CLOSE_WAIT, FIN_WAITs
                    count += 1
    return count


def test_navigating_away_from_a_long_request_leaves_nothing_open(
    browser: Any, servers: _Servers
) -> None:
    """The page leaves while its fetch of ``/long`` waits: the trace says the client went
    before the response, the proxy dropped that upstream connection, the app's own span
    still ends with what it answered; once the browser is gone no socket on the proxy's
    port is left open."""
    if not os.path.exists("/proc/net/tcp"):
        pytest.skip("needs Linux's /proc/net/tcp")
    public = int(servers.url.rsplit(":", 1)[1])
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(servers.url + "/leave", timeout=20_000)
        page.wait_for_url("**/ack?n=left", timeout=20_000)
    finally:
        context.close()

    def ended() -> list[Any]:
        return [
            t for t in servers.traces("/long")
            if t.finished and all(s.finished for s in t.spans.values())
        ]  # fmt: skip

    trace = _until("/long's spans all ended", ended, servers.run, servers.err)[0]
    spans = {s.hop: s for s in trace.spans.values() if s.attrs.get("span.kind") != "queue"}
    client, proxy, server, app = (spans[h] for h in ("client", "proxy", "server", "app"))
    assert client.attrs.get("disconnected") is True
    gone = [e.attrs for e in client.events if e.name == "disconnect"]
    assert gone == [{"phase": "before_response"}]
    assert "http.response.status_code" not in client.attrs
    assert proxy.attrs.get("upstream.aborted") is True
    assert proxy.attrs.get("upstream.connection.closed") is True
    assert server.attrs.get("disconnected") is True
    assert app.attrs.get("http.response.status_code") == 200  # (what the app answered)
    _until("no socket left on the proxy's port", lambda: _established(public) == 0,
           servers.run, servers.err)  # fmt: skip


DJANGO_PASSWORD = "pw-12345-xyz"


class _Django:
    """A ``django-admin startproject`` project (sqlite, a superuser) served bare by gunicorn
    and by ``hopscope run mysite.wsgi:application`` (gunicorn behind the proxy, ``-o``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []
        try:  # (a start that fails stops what it started: nothing outlives the test)
            port = _free_port()
            self.bare = f"http://127.0.0.1:{port}"
            argv = [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{port}"]
            bare_err = root / "bare.err"
            bare = self._start([*argv, "mysite.wsgi:application"], bare_err)
            _until("bare gunicorn", lambda: _answers(self.bare + "/admin/login/"), bare, bare_err)
            self.trace = root / "trace.jsonl"
            self.err = root / "hopscope.err"
            argv = [*HOPSCOPE_RUN, "mysite.wsgi:application", "--port", "0", "--headless"]
            self.run = self._start([*argv, "-o", str(self.trace)], self.err)
            found = _until("the URL", lambda: URL.search(self.err.read_text()), self.run, self.err)
            self.url: str = found.group(1)
            _until("hopscope", lambda: _answers(self.url + "/admin/login/"), self.run, self.err)
        except BaseException:
            self.close()
            raise

    _start = _Servers._start
    close = _Servers.close


@pytest.fixture(scope="module")
def django_site(browser: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Django]:
    pytest.importorskip("django")
    pytest.importorskip("gunicorn")
    root = tmp_path_factory.mktemp("djangoadmin")
    admin = shutil.which("django-admin", path=os.path.dirname(sys.executable))
    env = {**_env(), "DJANGO_SUPERUSER_PASSWORD": DJANGO_PASSWORD}
    steps = [
        [admin or "django-admin", "startproject", "mysite", "."],
        [sys.executable, "manage.py", "migrate", "-v0"],
        [sys.executable, "manage.py", "createsuperuser", "--noinput", "--username", "admin",
         "--email", "admin@example.com"],
    ]  # fmt: skip
    for argv in steps:
        subprocess.run(argv, cwd=root, env=env, check=True, capture_output=True, timeout=60)
    site = _Django(root)
    yield site
    site.close()


def _cookie_attrs(context: Any) -> list[dict[str, Any]]:
    """The browser's cookies without their (random) values and (time-dependent) dates."""
    kept = []
    for cookie in sorted(context.cookies(), key=lambda c: c["name"]):
        attrs = {k: v for k, v in cookie.items() if k not in ("value", "expires")}
        kept.append({**attrs, "session": cookie["expires"] < 0})
    return kept


def test_django_admin_login_page_and_its_csrf_cookie(browser: Any, django_site: _Django) -> None:
    """``/admin/`` redirects to the login page, which sets the CSRF cookie: the same for the
    browser bare and through hopscope; the trace has both requests with their route and
    the cookie (whole in the trace file); the HAR export redacts its value and writes its
    attributes as browsers do (ISO 8601 ``expires``, ``sameSite``)."""
    seen = []
    for url in (django_site.bare, django_site.url):
        context = browser.new_context()
        try:
            page = context.new_page()
            response = page.goto(url + "/admin/", timeout=20_000)
            assert response is not None
            text = page.inner_text("body")
            seen.append((page.url.removeprefix(url), response.status, text, _cookie_attrs(context)))
        finally:
            context.close()
    assert seen[0] == seen[1]
    assert seen[0][0] == "/admin/login/?next=/admin/"
    assert seen[0][3][0]["name"] == "csrftoken" and seen[0][3][0]["sameSite"] == "Lax"

    def login_page() -> list[Any]:
        return [t for t in load(django_site.trace) if t.path == "/admin/login/" and t.finished]

    found = _until("the login page's trace", login_page, django_site.run, django_site.err)
    redirect = [t for t in load(django_site.trace) if t.path == "/admin/"]
    assert [(t.status, t.route) for t in redirect] == [(302, "/admin/")]
    trace = found[-1]
    assert (trace.status, trace.route) == (200, "/admin/login/")
    client = next(s for s in trace.spans.values() if s.hop == "client")
    cookies = [v for k, v in client.headers("response") if k.lower() == "set-cookie"]
    assert len(cookies) == 1 and re.match(r"csrftoken=\w{32}; ", cookies[0]), cookies

    har = django_site.root / "out.har"
    argv = [
        sys.executable,
        "-m",
        "hopscope.app",
        "export",
        str(django_site.trace),
        "--har",
        str(har),
    ]
    subprocess.run(argv, check=True, capture_output=True, timeout=60, env=_env())
    entry = next(
        e for e in json.loads(har.read_text())["log"]["entries"]
        if e["request"]["url"].endswith("/admin/login/?next=/admin/")
    )  # fmt: skip
    cookie = entry["response"]["cookies"][0]
    assert cookie["name"] == "csrftoken" and cookie["value"] == "[redacted]"
    assert cookie["sameSite"] == "Lax" and cookie["path"] == "/"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.000Z", cookie["expires"]), cookie


def _admin_login(browser: Any, url: str) -> tuple[str, str]:
    """Log in to Django's admin at ``url``: (the final path, the page's heading)."""
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(url + "/admin/", timeout=20_000)
        page.fill("#id_username", "admin")
        page.fill("#id_password", DJANGO_PASSWORD)
        with page.expect_navigation(timeout=20_000):
            page.click("input[type=submit]")
        return page.url.removeprefix(url), page.inner_text("h1")
    finally:
        context.close()


def test_django_admin_login_through_hopscope_run(browser: Any, django_site: _Django) -> None:
    """The same admin login bare (gunicorn) and through ``hopscope run`` (gunicorn behind
    hopscope's proxy): the browser must land on the admin index both times."""
    assert _admin_login(browser, django_site.bare) == ("/admin/", "Site administration")
    assert _admin_login(browser, django_site.url) == ("/admin/", "Site administration")
