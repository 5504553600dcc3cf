"""Zero-code injection gaps session 10 left open (``hopscope run --``), closed in session 11.

Werkzeug's own test ``Client`` on a plain Werkzeug app and Django's ``AsyncClient`` were
not recorded; ``python -m bottle module:app`` was not traced (Bottle runs as
``__main__``, which the import hook never sees); gunicorn's ``-k gevent_pywsgi`` worker
and gevent's own ``WSGIServer`` gave no ``server`` span, and cut short the body of a
sized response without a Content-Length (gevent iterates it twice).  Each test runs the
real framework or server with hopscope's bootstrap, as ``hopscope run --`` does, next to
the same command bare.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from djangotools import DJANGO_CLIENT_PROJECT
from hopscope.tracing import load
from hopscope.tracing.model import Span, Trace
from test_frameworks_s9 import _raw
from test_run import Run, _free_port
from test_run import _env as _bare_env
from test_suites_s10 import _env, _spans, _wait_listening

TIMEOUT = 60


def _run_script(tmp_path: Path, source: str, traced: bool) -> tuple[Any, Path]:
    """Run ``source`` bare or with the bootstrap: (what it printed as JSON, its trace)."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    trace = tmp_path / f"trace-{time.monotonic_ns()}.jsonl"
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=_env(trace) if traced else _bare_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    assert "hopscope" not in done.stderr, done.stderr
    return json.loads(done.stdout), trace


# -- 1. Werkzeug's test Client -----------------------------------------------------------

WERKZEUG_CLIENT = """
import gc
import json
import weakref

from flask import Flask, request
from werkzeug.test import Client, create_environ, run_wsgi_app
from werkzeug.wrappers import Request, Response


@Request.application
def app(req):
    if req.path == "/boom":
        raise ValueError("boom")
    if req.path == "/stream":
        return Response(iter([b"one ", b"two"]), content_type="text/plain")
    return Response(b"hello " + req.get_data(), headers={"x-mark": "s11"})


def legacy(environ, start_response):
    # PEP 3333's write() callable, which run_wsgi_app supports.
    write = start_response("200 OK", [("Content-Type", "text/plain")])
    write(b"written ")
    return [b"returned"]


def text(environ, start_response):
    # str chunks: WSGI forbids them, Werkzeug's client takes them (encoded as UTF-8).
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
    return ["caf\u00e9 ", environ["PATH_INFO"]]


flask_app = Flask(__name__)


@flask_app.post("/f")
def f():
    return "flask " + request.get_data(as_text=True)


def seen(response):
    with response:  # its close ends the span, as a server's would
        return [response.status, sorted(response.headers.items()), response.get_data(as_text=True)]


def collected():
    # Nothing of a client's app is kept once the client is gone (Werkzeug's own
    # suite counts the objects its apps hold: test_no_memory_leak_from_Rule_builder).
    def gone(environ, start_response):
        start_response("204 No Content", [])
        return []

    seen(Client(gone).get("/gone"))
    return weakref.ref(gone)


def direct():
    # Werkzeug's own calls of run_wsgi_app (Response.force_type, from_app) are not a
    # client's request: not recorded.
    app_iter, status, headers = run_wsgi_app(app, create_environ("/direct"))
    return [status, b"".join(app_iter).decode()]


out = [
    seen(Client(app).post("/hello", data=b"ada")),
    seen(Client(app).get("/stream")),
    seen(Client(legacy).get("/legacy")),
    seen(Client(text).get("/text")),
    seen(Client(flask_app).post("/f", data=b"via werkzeug")),
    seen(flask_app.test_client().post("/f", data=b"via flask")),
    direct(),
]
ref = collected()
gc.collect()
out.append(ref() is None)
try:
    Client(app).get("/boom")
except ValueError as exc:
    out.append(str(exc))
print(json.dumps(out))
"""


def test_werkzeug_client_records_a_plain_app_and_a_flask_app_once(tmp_path: Path) -> None:
    """``hopscope run -- pytest`` on a plain Werkzeug app: its test ``Client`` runs the
    app through ``run_wsgi_app``, which no framework patch reached.  Each request is now
    recorded (body sizes, the app's exception), a Flask app through Werkzeug's ``Client``
    or Flask's once, not twice, and the test sees what it sees bare."""
    pytest.importorskip("flask")
    bare, _ = _run_script(tmp_path, WERKZEUG_CLIENT, traced=False)
    seen, trace = _run_script(tmp_path, WERKZEUG_CLIENT, traced=True)
    assert seen == bare
    assert seen[-3:] == [["200 OK", "hello "], True, "boom"]
    assert seen[3][2] == "caf\u00e9 /text"
    spans = list(_spans(trace).values())
    names = sorted(s["name"] for s in spans)
    assert names == [
        "GET /boom", "GET /gone", "GET /legacy", "GET /stream", "GET /text",
        "POST /f", "POST /f", "POST /hello",
    ]  # fmt: skip
    ends = {s["name"]: s["end"] for s in spans}
    assert ends["POST /hello"]["http.request.body.size"] == 3
    assert ends["POST /hello"]["http.response.body.size"] == len("hello ada")
    assert ends["GET /stream"]["http.response.body.size"] == len("one two")
    assert ends["GET /legacy"]["http.response.body.size"] == len("written returned")
    assert ends["GET /text"]["http.response.status_code"] == 200
    assert ends["GET /boom"]["exception.type"] == "ValueError"


# -- 2. Django's AsyncClient -------------------------------------------------------------

DJANGO_ASYNC_CLIENT = (
    """
import asyncio
import json

import django
from django.conf import settings
from django.http import HttpResponse, StreamingHttpResponse
from django.test import AsyncClient
from django.urls import path


async def stream(request):
    async def parts():
        yield b"one "
        yield b"two"

    return StreamingHttpResponse(parts())
"""
    + DJANGO_CLIENT_PROJECT
    + """

async def main():
    client = AsyncClient()
    posted = await client.post("/hello/ada", b"ada", content_type="text/plain")
    streamed = await client.get("/stream")
    body = b"".join([chunk async for chunk in streamed.streaming_content])
    try:
        await client.get("/boom")
        raised = None
    except ValueError as exc:
        raised = str(exc)
    return [
        posted.status_code,
        sorted(posted.items()),
        posted.content.decode(),
        posted.cookies["seen"].value,
        posted.asgi_request.path,
        posted.asgi_request.body.decode(),
        body.decode(),
        raised,
    ]


print(json.dumps(asyncio.run(main())))
"""
)


def test_django_async_client_requests_are_recorded_once(tmp_path: Path) -> None:
    """Django's ``AsyncClient`` awaits its ``AsyncClientHandler`` with a scope alone,
    not ASGI: ``ASGIHandler``'s patch never saw it.  Each request is now recorded once,
    as an ASGI app span with its route, request and response body sizes, cookies and
    status, and the test sees the same response, request body, stream and exception."""
    pytest.importorskip("django")
    bare, _ = _run_script(tmp_path, DJANGO_ASYNC_CLIENT, traced=False)
    seen, trace = _run_script(tmp_path, DJANGO_ASYNC_CLIENT, traced=True)
    assert seen == bare
    assert seen[2:] == ["hello ada", "yes", "/hello/ada", "ada", "one two", "boom"]
    spans = list(_spans(trace).values())
    assert sorted(s["name"] for s in spans) == ["GET /boom", "GET /stream", "POST /hello/ada"]
    assert {s["attrs"]["interface"] for s in spans} == {"asgi"}
    ends = {s["name"]: s["end"] for s in spans}
    posted = ends["POST /hello/ada"]
    assert posted["http.route"] == "/hello/<name>"
    assert posted["http.request.body.size"] == 3
    assert posted["http.response.body.size"] == len("hello ada")
    assert ["Set-Cookie", "seen=yes; Path=/"] in posted["http.response.headers"]
    assert ends["GET /stream"]["http.response.status_code"] == 200
    assert ends["GET /boom"]["http.response.status_code"] == 500


# -- 3. python -m bottle -------------------------------------------------------------------

BOTTLE_APP = """
import bottle

app = bottle.Bottle()


@app.get("/items/<item_id:int>")
def item(item_id):
    return {"id": item_id}


def boom():
    raise RuntimeError("boom")


app.get("/boom")(boom)
bottle.get("/boom")(boom)  # (the default app's)


@bottle.route("/default")
def default():
    return "default " + str(bottle.default_app() is not app)
"""

BOTTLE_PATHS = ["GET /items/3", "GET /nope", "GET /boom", "GET /default"]


def _answers(port: int, paths: list[str]) -> dict[str, bytes]:
    return {line: _raw(port, f"{line} HTTP/1.0\r\nHost: x\r\n\r\n".encode()) for line in paths}


def _served(
    tmp_path: Path,
    processes: Callable[..., subprocess.Popen[bytes]],
    command: list[str],
    paths: list[str],
    trace: Path | None,
) -> dict[str, bytes]:
    """The answers of ``command`` (``{port}`` in it) to ``paths``, bare or traced."""
    port = _free_port()
    env = _bare_env() if trace is None else _env(trace)
    argv = [part.replace("{port}", str(port)) for part in command]
    proc = processes(argv, tmp_path / f"err-{port}", cwd=tmp_path, env=env)
    _wait_listening(port, proc)
    return _answers(port, paths)


def _wait_spans(trace: Path, count: int) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + 10
    spans = _spans(trace)
    while time.monotonic() < deadline and (
        len(spans) < count or any(s["end"] is None for s in spans.values())
    ):
        time.sleep(0.05)
        spans = _spans(trace)
    return spans


@pytest.mark.parametrize("target", ["s11bottle:app", "s11bottle"])
def test_python_m_bottle_is_traced(
    tmp_path: Path, processes: Callable[..., subprocess.Popen[bytes]], target: str
) -> None:
    """``python -m bottle module:app`` runs Bottle as ``__main__`` and puts it in
    ``sys.modules`` as ``bottle``: the import hook never saw Bottle load.  It is patched
    as ``__main__`` now, so each request is recorded with its route, the app's own or
    the default app (``python -m bottle module``: still the one the module's
    ``@bottle.route`` filled), and every answer is byte-identical to bare."""
    pytest.importorskip("bottle")
    (tmp_path / "s11bottle.py").write_text(textwrap.dedent(BOTTLE_APP))
    command = [sys.executable, "-m", "bottle", "--bind", "127.0.0.1:{port}", target]
    bare = _served(tmp_path, processes, command, BOTTLE_PATHS, None)
    trace = tmp_path / "trace.jsonl"
    traced = _served(tmp_path, processes, command, BOTTLE_PATHS, trace)
    assert traced == bare
    ok = "GET /items/3" if target.endswith(":app") else "GET /default"
    assert bare[ok].startswith(b"HTTP/1.0 200 ")
    spans = {s["name"]: s for s in _wait_spans(trace, len(BOTTLE_PATHS)).values()}
    assert sorted(spans) == sorted(BOTTLE_PATHS)
    route = "/items/<item_id:int>" if ok == "GET /items/3" else "/default"
    assert spans[ok]["end"]["http.route"] == route
    assert spans[ok]["end"]["http.response.status_code"] == 200
    assert spans["GET /boom"]["end"]["exception.type"] == "RuntimeError"


# -- 4. gevent's WSGI server: the server span ----------------------------------------------

GEVENT_APP = """
def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/boom":
        raise RuntimeError("boom")
    if path == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return (f"chunk {n}\\n".encode() for n in range(5))
    if path == "/post":
        size = len(environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0)))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"got ", str(size).encode()]
    # A list and no Content-Length: gevent adds the lengths up (it iterates it twice).
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello ", path.encode()]
"""

GEVENT_SERVE = """
import sys

from gevent import monkey

monkey.patch_all()

from gevent.pywsgi import WSGIServer

from s11gevent import app

WSGIServer(("127.0.0.1", int(sys.argv[1])), app, log=None).serve_forever()
"""

GEVENT_REQUESTS = [
    b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"POST /post HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 65536\r\n\r\n"
    + b"x" * 65536,
    b"GET /boom HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /x HTTP/1.0\r\nHost: x\r\n\r\n",
]


def _queued(port: int) -> bytes:
    """A request a web server in front stamped a second ago (``X-Request-Start``)."""
    stamp = f"t={time.time() - 1:.3f}"
    head = f"GET /queued HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Request-Start: {stamp}"
    return _raw(port, f"{head}\r\n\r\n".encode())


def _server_and_app(trace: Trace) -> tuple[Span, Span]:
    (server,) = [s for s in trace.by_hop("server") if s.name != "queue"]
    (app,) = [s for s in trace.by_hop("app") if "interface" in s.attrs]
    return server, app


def _check_gevent_traces(traces: list[Trace]) -> None:
    by_path = {t.path: t for t in traces}
    assert sorted(by_path) == ["/boom", "/post", "/queued", "/stream", "/x"]
    assert len(traces) == len(GEVENT_REQUESTS) + 1
    for path, trace in by_path.items():
        server, app = _server_and_app(trace)
        assert app.parent_id == server.span_id, path
        assert server.finished and app.finished, path
        assert server.attrs["url.path"] == path
        expected = 500 if path == "/boom" else 200
        assert server.attrs["http.response.status_code"] == expected, path
    assert _server_and_app(by_path["/x"])[1].attrs["http.response.body.size"] == len("hello /x")
    assert _server_and_app(by_path["/boom"])[1].attrs["exception.type"] == "RuntimeError"
    (queue,) = [s for s in by_path["/queued"].by_hop("server") if s.name == "queue"]
    assert queue.finished and queue.attrs["span.kind"] == "queue"
    assert not [s for s in by_path["/x"].by_hop("server") if s.name == "queue"]


def test_gunicorn_gevent_pywsgi_has_a_server_span_and_answers_as_bare(
    tmp_path: Path, runs: Callable[..., Run], processes: Callable[..., subprocess.Popen[bytes]]
) -> None:
    """gunicorn's ``-k gevent_pywsgi`` worker runs no gunicorn request hooks: a request
    had an app span only.  gevent's handler now opens the server span (its queue time
    from ``X-Request-Start``) the app span hangs under.  And a list response without a
    Content-Length came out cut short (gevent iterates it twice to add the lengths up):
    every answer is byte-identical to bare now."""
    pytest.importorskip("gevent")
    (tmp_path / "s11gevent.py").write_text(textwrap.dedent(GEVENT_APP))
    gunicorn = ["gunicorn", "-k", "gevent_pywsgi", "s11gevent:app"]
    bare_port, port = _free_port(), _free_port()
    bare = processes(
        [*gunicorn, "-b", f"127.0.0.1:{bare_port}"], tmp_path / "bare-err", cwd=tmp_path,
        env=_bare_env(),
    )  # fmt: skip
    run = runs(tmp_path, "--headless", "--", *gunicorn, "-b", f"127.0.0.1:{port}")
    _wait_listening(bare_port, bare)
    _wait_listening(port, run.proc)
    for request in GEVENT_REQUESTS:
        assert _raw(port, request) == _raw(bare_port, request), request[:40]
    assert _queued(port).startswith(b"HTTP/1.1 200 ")
    run.wait_for(lambda: run.out.count("\n") >= len(GEVENT_REQUESTS) + 1, "the tail lines")
    assert run.stop() == 0, run.err
    traces = load(run.trace)
    _check_gevent_traces(traces)
    (server, _) = _server_and_app(traces[0])
    assert server.attrs["server.handler.class"] == "PyWSGIHandler"


def test_gevent_own_wsgi_server_records_the_server_and_app_spans(
    tmp_path: Path, processes: Callable[..., subprocess.Popen[bytes]]
) -> None:
    """gevent's own ``WSGIServer`` has no hooks, and a plain WSGI app under it has no
    framework call: nothing was recorded.  Its handler is a server wrap point now, as
    ``run_simple`` is: each request has its server span and the app span under it, and
    answers as bare."""
    pytest.importorskip("gevent")
    (tmp_path / "s11gevent.py").write_text(textwrap.dedent(GEVENT_APP))
    (tmp_path / "serve.py").write_text(textwrap.dedent(GEVENT_SERVE))
    trace = tmp_path / "trace.jsonl"
    ports = _free_port(), _free_port()
    for port, env in zip(ports, (_bare_env(), _env(trace)), strict=True):
        proc = processes(
            [sys.executable, "serve.py", str(port)], tmp_path / f"err-{port}", cwd=tmp_path, env=env
        )
        _wait_listening(port, proc)
    bare_port, port = ports
    for request in GEVENT_REQUESTS:
        assert _raw(port, request) == _raw(bare_port, request), request[:40]
    assert _queued(port).startswith(b"HTTP/1.1 200 ")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        traces = load(trace) if trace.is_file() else []
        if len(traces) >= len(GEVENT_REQUESTS) + 1 and all(
            s.finished for t in traces for s in t.spans.values()
        ):
            break
        time.sleep(0.05)
    _check_gevent_traces(traces)
    (server, _) = _server_and_app(traces[0])
    assert server.attrs["server.handler.class"] == "WSGIHandler"
