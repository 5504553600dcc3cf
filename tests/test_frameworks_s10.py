"""Frameworks beyond the five hopscope was built with: Litestar, Falcon, Sanic, Bottle and
Pyramid, bare against ``wrap(app)`` and ``hopscope run``.

What they showed: Sanic sends its response headers as a generator (the server used it
up, the recording kept an empty one, and a socket sink could not send the request at
all); Litestar keeps its route template in the scope and swallows a handler's exception
after its 500 page (no traceback anywhere); Bottle does the same but says which
exception through PEP 3333's ``exc_info`` (and leaves its route in the environ); Falcon
keeps its URI template on its request, writes a WSGI handler's exception to
``wsgi.errors`` only, and its test client sends the scope's headers as iterators, which
the middleware used up before the app read them; Sanic's own server has no hook, and
``hopscope run`` served it untraced without a word; under servers without a hook
(granian, wsgiref) none of the five was traced.

In-process apps go through httpx's ASGI and WSGI transports; the ``hopscope run`` ones are
real servers on 127.0.0.1, compared byte for byte with the same command run bare.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from hopscope.tracing import MemorySink, wrap
from hopscope.tracing.model import Span
from test_frameworks_s9 import LINE, _answers, _app_spans, _bare, _exchanges, _write
from test_run import Run, _free_port

TIMEOUT = 10.0


def _spans(sink: MemorySink) -> dict[str, Span]:
    """The app spans by name (the last of each name)."""
    return {
        span.name: span
        for trace in sink.traces()
        for span in trace.spans.values()
        if span.hop == "app" and "interface" in span.attrs
    }


def _comparable(response: httpx.Response) -> tuple[int, list[tuple[str, str]], bytes]:
    headers = [(k, v) for k, v in response.headers.multi_items() if k.lower() != "date"]
    return response.status_code, headers, response.content


REQUESTS: list[tuple[str, str, dict[str, str], bytes]] = [
    ("GET", "/items/3", {}, b""),
    ("GET", "/stream", {}, b""),
    ("POST", "/upload", {"content-type": "application/octet-stream"}, b"x" * (2 << 20)),
    ("HEAD", "/head", {}, b""),
    ("GET", "/etag", {"if-none-match": '"v1"'}, b""),
    ("GET", "/nope", {}, b""),
    ("GET", "/boom", {}, b""),
]


async def _asgi_answers(app: Any) -> list[Any]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return [
            _comparable(await client.request(m, p, headers=h, content=b or None))
            for m, p, h, b in REQUESTS
        ]


def _wsgi_answers(app: Any) -> list[Any]:
    transport = httpx.WSGITransport(app=app, raise_app_exceptions=False)  # (exc_info)
    with httpx.Client(transport=transport, base_url="http://t") as client:
        return [
            _comparable(client.request(m, p, headers=h, content=b or None))
            for m, p, h, b in REQUESTS
        ]


def _exception_types(span: Span) -> list[str]:
    return [str(e.attrs["exception.type"]) for e in span.events if e.name == "exception"]


# -- 1. headers as a generator (Sanic) ---------------------------------------------------


def test_response_headers_sent_as_a_generator_reach_both_server_and_recording() -> None:
    """ASGI allows any iterable of header pairs; Sanic sends a generator.  The server used
    it up first: the span recorded no headers (and a socket sink dropped the request)."""
    sink = MemorySink()
    pairs = [(b"content-type", b"text/plain"), (b"x-one", b"1"), (b"x-two", b"2")]
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        message = {"type": "http.response.start", "status": 200, "headers": iter(pairs)}
        sent.append(message)
        await send(message)
        await send({"type": "http.response.body", "body": b"hi"})

    response = asyncio.run(_one(wrap(app, sink=sink)))
    assert [(k, v) for k, v in response.headers.multi_items()] == [
        (k.decode(), v.decode()) for k, v in pairs
    ]
    (span,) = _spans(sink).values()
    recorded = [tuple(pair) for pair in span.attrs["http.response.headers"]]
    assert recorded == [(k.decode(), v.decode()) for k, v in pairs]
    assert not isinstance(sent[0]["headers"], list)  # the app's own message left as it was


async def _one(app: Any) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.get("/")


def test_falcon_test_client_iterators_still_reach_the_app_and_the_recording() -> None:
    """ASGI allows any iterables for the scope's headers, client and server; Falcon's test
    client sends iterators, header pairs too.  Read for a traceparent, they were used up
    before the app read them (its headers were gone) and a sink could not send the
    request (its whole batch was lost with it)."""
    falcon_asgi = pytest.importorskip("falcon.asgi")
    testing = pytest.importorskip("falcon.testing")

    class Echo:
        async def on_get(self, req: Any, resp: Any) -> None:
            resp.media = {"a": req.get_header("X-A"), "remote": req.remote_addr}

    app = falcon_asgi.App()
    app.add_route("/echo", Echo())
    sink = MemorySink()
    answers = [
        testing.TestClient(each)
        .simulate_get("/echo", headers={"X-A": "1"}, remote_addr="10.0.0.9")
        .json
        for each in (app, wrap(app, sink=sink))
    ]
    assert answers == [{"a": "1", "remote": "10.0.0.9"}] * 2
    (span,) = _spans(sink).values()
    assert ["x-a", "1"] in [list(pair) for pair in span.attrs["http.request.headers"]]
    assert span.attrs["client.address"] == "10.0.0.9"
    assert span.attrs["http.response.status_code"] == 200


# -- 2. Litestar: route template, the 500 it swallows ------------------------------------

LITESTAR_APP = """
from litestar import Litestar, Request, Response, get, head, post
from litestar.response import Stream


@get("/items/{item_id:int}")
async def item(item_id: int) -> dict:
    return {"id": item_id}


async def parts():
    for i in range(5):
        yield f"chunk {i}\\n".encode()


@get("/stream")
async def stream() -> Stream:
    return Stream(parts())


@post("/upload")
async def upload(request: Request) -> dict:
    return {"size": len(await request.body())}


@head("/head")
async def head_() -> None:
    return None


@get("/etag")
async def etag(request: Request) -> Response:
    if request.headers.get("if-none-match") == '"v1"':
        return Response(content=b"", status_code=304, headers={"etag": '"v1"'})
    return Response(content=b"hello", headers={"etag": '"v1"'})


@get("/boom")
async def boom() -> None:
    raise RuntimeError("boom")


app = Litestar([item, stream, upload, head_, etag, boom])
"""


def _module(tmp_path: Path, name: str, source: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    _write(tmp_path, {f"{name}.py": source})
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    return importlib.import_module(name)


def test_litestar_is_untouched_and_named_by_its_route_template(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("litestar")
    bare = _module(tmp_path, "s10_litestar", LITESTAR_APP, monkeypatch).app
    sink = MemorySink()
    assert asyncio.run(_asgi_answers(wrap(bare, sink=sink))) == asyncio.run(_asgi_answers(bare))
    spans = _spans(sink)
    assert spans["GET /items/3"].attrs["http.route"] == "/items/{item_id}"
    assert spans["POST /upload"].attrs["http.request.body.size"] == 2 << 20
    assert spans["GET /nope"].attrs.get("http.route") is None
    assert _exception_types(spans["GET /nope"]) == []  # Litestar's 404 is no error
    # Litestar answers 500 inside its except block and swallows the exception, logging
    # nothing by default: the span has it.
    boom = spans["GET /boom"]
    assert boom.attrs["http.response.status_code"] == 500
    assert boom.attrs["http.route"] == "/boom"
    assert _exception_types(boom) == ["builtins.RuntimeError"]
    assert boom.attrs["error"] is True


# -- 3. Bottle and Pyramid (WSGI) ----------------------------------------------------------

BOTTLE_APP = """
import bottle

app = bottle.Bottle()


@app.get("/items/<item_id:int>")
def item(item_id):
    return {"id": item_id}


@app.get("/stream")
def stream():
    return (f"chunk {i}\\n".encode() for i in range(5))


@app.post("/upload")
def upload():
    return {"size": len(bottle.request.body.read())}


@app.route("/head", method=["GET", "HEAD"])
def head():
    return "hello head"


@app.get("/etag")
def etag():
    if bottle.request.headers.get("If-None-Match") == '"v1"':
        return bottle.HTTPResponse(status=304, headers={"ETag": '"v1"'})
    bottle.response.set_header("ETag", '"v1"')
    return "hello"


@app.get("/boom")
def boom():
    raise RuntimeError("boom")
"""

PYRAMID_APP = """
from pyramid.config import Configurator
from pyramid.response import Response


def item(request):
    return {"id": int(request.matchdict["item_id"])}


def stream(request):
    return Response(app_iter=(f"chunk {i}\\n".encode() for i in range(5)))


def upload(request):
    return {"size": len(request.body)}


def head(request):
    return Response("hello head")


def etag(request):
    response = Response("hello")
    response.etag = "v1"
    response.conditional_response = True
    return response


def boom(request):
    raise RuntimeError("boom")


with Configurator() as config:
    for name, pattern, view, options in [
        ("item", "/items/{item_id}", item, {"renderer": "json"}),
        ("stream", "/stream", stream, {}),
        ("upload", "/upload", upload, {"renderer": "json", "request_method": "POST"}),
        ("head", "/head", head, {}),
        ("etag", "/etag", etag, {}),
        ("boom", "/boom", boom, {}),
    ]:
        config.add_route(name, pattern)
        config.add_view(view, route_name=name, **options)
    app = config.make_wsgi_app()
"""


def test_bottle_is_untouched_named_by_its_route_and_its_500_page_names_the_exception(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bottle catches a handler's exception, writes it to ``wsgi.errors`` and answers
    500 with ``start_response(..., exc_info)``: that names the exception to record.  Its
    matched route stays in the environ (``bottle.route``)."""
    pytest.importorskip("bottle")
    bare = _module(tmp_path, "s10_bottle", BOTTLE_APP, monkeypatch).app
    sink = MemorySink()
    assert _wsgi_answers(wrap(bare, sink=sink)) == _wsgi_answers(bare)
    spans = _spans(sink)
    assert spans["GET /items/3"].attrs["http.route"] == "/items/<item_id:int>"  # (environ)
    assert spans["POST /upload"].attrs["http.request.body.size"] == 2 << 20
    assert spans["GET /stream"].attrs["http.response.body.size"] == 40
    assert spans["GET /nope"].attrs.get("http.route") is None
    assert _exception_types(spans["GET /nope"]) == []
    boom = spans["GET /boom"]
    assert boom.attrs["http.response.status_code"] == 500
    assert _exception_types(boom) == ["builtins.RuntimeError"]
    assert boom.attrs["exception.type"] == "RuntimeError"


def test_pyramid_is_untouched_and_its_exception_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("pyramid")
    bare = _module(tmp_path, "s10_pyramid", PYRAMID_APP, monkeypatch).app
    sink = MemorySink()
    wrapped = wrap(bare, sink=sink)
    for app in (bare, wrapped):  # Pyramid lets the exception go to the server
        with pytest.raises(RuntimeError):
            httpx.Client(transport=httpx.WSGITransport(app=app)).get("http://t/boom")
    fine = REQUESTS[:-1]
    with (
        httpx.Client(transport=httpx.WSGITransport(app=bare), base_url="http://t") as plain,
        httpx.Client(transport=httpx.WSGITransport(app=wrapped), base_url="http://t") as traced,
    ):
        for m, p, h, b in fine:
            expected = _comparable(plain.request(m, p, headers=h, content=b or None))
            assert _comparable(traced.request(m, p, headers=h, content=b or None)) == expected
    spans = _spans(sink)
    assert spans["GET /etag"].attrs["http.response.status_code"] == 304
    assert spans["POST /upload"].attrs["http.request.body.size"] == 2 << 20
    assert _exception_types(spans["GET /boom"]) == ["builtins.RuntimeError"]


# -- 4. under hopscope run: Falcon's route, Sanic as ASGI, Sanic's own server ------------

FALCON_APP = """
import falcon


class Item:
    def on_get(self, req, resp, item_id):
        resp.media = {"id": item_id}


class Boom:
    def on_get(self, req, resp):
        raise RuntimeError("boom")


class Stream:
    def on_get(self, req, resp):
        resp.stream = (f"chunk {i}\\n".encode() for i in range(5))


app = falcon.App()
app.add_route("/items/{item_id:int}", Item())
app.add_route("/boom", Boom())
app.add_route("/stream", Stream())
"""

SANIC_APP = """
import asyncio

from sanic import Sanic, response

app = Sanic("s10sanic")


@app.get("/items/<item_id:int>")
async def item(request, item_id):
    return response.json({"id": item_id}, headers={"x-mark": "s10"})


@app.get("/stream")
async def stream(request):
    out = await request.respond(content_type="text/plain")
    for i in range(5):
        await out.send(f"chunk {i}\\n")
    await out.eof()


@app.get("/boom")
async def boom(request):
    raise RuntimeError("boom")
"""

PATHS = ["GET /items/3", "GET /stream", "GET /nope", "GET /boom", "HEAD /items/3"]


def _served(
    tmp_path: Path,
    runs: Callable[..., Run],
    command: list[str],
    port: int,
    paths: list[str] = PATHS,
    ready: str = "/items/1",
) -> tuple[dict[str, bytes], dict[str, bytes], Run]:
    """The answers of ``command`` bare, then under ``hopscope run -- command`` (once
    ``ready`` answers, then ``paths``)."""
    url = f"http://127.0.0.1:{port}{ready}"
    with _bare(command, tmp_path, url):
        bare = _exchanges(port, paths)
    run = runs(tmp_path, "--headless", "--", *command)
    try:
        run.wait_for(_answers(url), "the app to answer")
        traced = _exchanges(port, paths)
        run.wait_for(lambda: len(LINE.findall(run.out)) >= len(paths) + 1, "the tail lines")
    finally:
        run.stop()
    return bare, traced, run


def test_falcon_under_hopscope_run_gunicorn_is_named_by_its_uri_template(
    tmp_path: Path, runs: Callable[..., Run]
) -> None:
    pytest.importorskip("falcon")
    _write(tmp_path, {"fapp.py": FALCON_APP})
    port = _free_port()
    command = ["gunicorn", "-k", "gthread", "-b", f"127.0.0.1:{port}", "fapp:app"]
    bare, traced, run = _served(tmp_path, runs, command, port)
    assert traced == bare
    spans = {span.name: span for span in _app_spans(run.trace)}
    assert spans["GET /items/3"].attrs["http.route"] == "/items/{item_id:int}"
    assert spans["GET /boom"].attrs["http.route"] == "/boom"
    assert spans["GET /boom"].attrs["http.response.status_code"] == 500
    # Falcon writes the traceback to wsgi.errors only: its handler hands it over.
    assert _exception_types(spans["GET /boom"]) == ["builtins.RuntimeError"]
    assert spans["GET /nope"].attrs.get("http.route") is None
    assert _exception_types(spans["GET /nope"]) == []
    assert spans["GET /stream"].attrs["http.response.body.size"] == 40


def test_sanic_asgi_under_hopscope_run_uvicorn_records_every_request_whole(
    tmp_path: Path, runs: Callable[..., Run]
) -> None:
    pytest.importorskip("sanic")
    _write(tmp_path, {"sapp.py": SANIC_APP})
    port = _free_port()
    command = ["uvicorn", "--port", str(port), "sapp:app"]
    bare, traced, run = _served(tmp_path, runs, command, port)
    assert traced == bare
    assert "dropped" not in run.out + run.err
    assert "Sanic's own server" not in run.err  # (that note is for Sanic's own server)
    spans = {span.name: span for span in _app_spans(run.trace)}
    item = spans["GET /items/3"]
    assert item.attrs["http.response.status_code"] == 200
    assert ["x-mark", "s10"] in [list(pair) for pair in item.attrs["http.response.headers"]]
    assert spans["GET /stream"].attrs["http.response.body.size"] == 40
    assert _exception_types(spans["GET /boom"]) == ["builtins.RuntimeError"]


def test_hopscope_run_says_why_sanics_own_server_is_not_traced(
    tmp_path: Path, runs: Callable[..., Run]
) -> None:
    pytest.importorskip("sanic")
    _write(tmp_path, {"sapp.py": SANIC_APP})
    port = _free_port()
    run = runs(
        tmp_path, "--headless", "--", "sanic", "sapp:app", "--port", str(port), "--single-process"
    )
    try:
        run.wait_for(_answers(f"http://127.0.0.1:{port}/items/1"), "the app to answer")
    finally:
        run.stop()
    said = [line for line in run.err.splitlines() if "Sanic's own server" in line]
    assert said == [
        "hopscope: Sanic's own server cannot be traced: serve the app as ASGI instead, "
        "e.g. hopscope run -- uvicorn MODULE:app"
    ]


# -- 5. servers without a hook: the frameworks' own call records --------------------------

WSGIREF_SERVE = """
import importlib
import sys
from wsgiref.simple_server import WSGIRequestHandler, make_server


class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass


app = importlib.import_module(sys.argv[1]).app
make_server("127.0.0.1", int(sys.argv[2]), app, handler_class=Quiet).serve_forever()
"""

BOTTLE_RUN = """
import sys

import bottle

from s10app import app

bottle.run(app, host="127.0.0.1", port=int(sys.argv[1]), quiet=True)
"""

HOOKLESS = {
    # Litestar, Sanic and Falcon apps have no __dict__ (__slots__); bottle is a trigger
    # that is one module, patched as it is first imported.
    "litestar": (
        LITESTAR_APP,
        ["granian", "--interface", "asgi", "s10app:app"],
        "/items/{item_id}",
    ),
    "sanic": (
        SANIC_APP,
        ["granian", "--interface", "asgi", "s10app:app"],
        "/items/<item_id:int>",
    ),
    "falcon": (FALCON_APP, ["python", "serve.py", "s10app"], "/items/{item_id:int}"),
    "pyramid": (PYRAMID_APP, ["python", "serve.py", "s10app"], "/items/{item_id}"),
    "bottle": (BOTTLE_APP, ["python", "run.py"], "/items/<item_id:int>"),
}


@pytest.mark.parametrize("framework", sorted(HOOKLESS))
def test_an_app_served_by_a_server_without_a_hook_is_traced_once(
    tmp_path: Path, runs: Callable[..., Run], framework: str
) -> None:
    """granian, wsgiref (``bottle.run``, a script's ``make_server``) give hopscope no
    place to wrap the app: the framework's own ``__call__`` records, as Flask's does."""
    pytest.importorskip(framework)
    source, command, route = HOOKLESS[framework]
    _write(tmp_path, {"s10app.py": source, "serve.py": WSGIREF_SERVE, "run.py": BOTTLE_RUN})
    port = str(_free_port())
    if command[0] == "granian":
        command = [*command[:-1], "--port", port, command[-1]]
    else:
        command = [*command, port]
    run = runs(tmp_path, "--headless", "--", *command)
    try:
        run.wait_for(_answers(f"http://127.0.0.1:{port}/items/1"), "the app to answer")
        response = httpx.get(f"http://127.0.0.1:{port}/items/3", timeout=TIMEOUT)
        assert response.status_code == 200
        run.wait_for(lambda: "GET /items/3 " in run.out, "the request's line")
    finally:
        run.stop()
    (span,) = [span for span in _app_spans(run.trace) if span.name == "GET /items/3"]
    assert span.attrs["http.response.status_code"] == 200
    assert span.attrs["http.response.body.size"] == len(response.content)
    assert span.attrs.get("http.route") == route
