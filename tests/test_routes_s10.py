"""Sanic's and Pyramid's route templates under ``hopscope run``.

What they showed: both keep the route they matched on their request (Sanic's
``request.route``, Pyramid's ``request.matched_route``), which the middlewares never see,
so their spans had no ``http.route`` under any server: Sanic's ASGI app under uvicorn,
Pyramid under gunicorn, and either as ``hopscope run TARGET``.  The hooks in
``hopscope.tracing.inject`` (``_patch_sanic_routes`` on Sanic's ``Router.get``,
``_patch_pyramid_routes`` on Pyramid's ``RoutesMapper.__call__``) hand it over.  Sanic's
template is kept in Sanic's own syntax, as Quart's is.  ``wrap(app)`` in code installs no
hook: there, as for Quart, Django and Falcon, these spans have no route.

Real servers on 127.0.0.1; the answers are compared byte for byte with the same command
run bare.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from hopscope.tracing import MemorySink, wrap
from test_frameworks_s9 import LINE, _answers, _app_spans, _exchanges, _write
from test_frameworks_s10 import _served
from test_run import Run, _free_port

SANIC_APP = """
from sanic import Sanic, response

app = Sanic("s10routes")


@app.get("/items/<item_id:int>")
async def item(request, item_id):
    return response.json({"id": item_id})


@app.get("/static")
async def static(request):
    return response.text("plain")


@app.get("/boom")
async def boom(request):
    raise RuntimeError("boom")


@app.websocket("/ws/<name>")
async def ws(request, sock, name):
    await sock.send(f"echo:{name}:{await sock.recv()}")
"""

PYRAMID_APP = """
from pyramid.config import Configurator


def item(request):
    return {"id": int(request.matchdict["item_id"])}


def static(request):
    return {"plain": True}


def user(request):
    return {"name": request.matchdict["name"]}


with Configurator() as config:
    config.add_route("item", "/items/{item_id}")
    config.add_view(item, route_name="item", renderer="json")
    config.add_route("static", "/static")
    config.add_view(static, route_name="static", renderer="json")
    config.add_route("user", "users/{name}")  # (no leading slash: Pyramid adds it)
    config.add_view(user, route_name="user", renderer="json")
    app = config.make_wsgi_app()
"""

PATHS = ["GET /items/3", "GET /static", "GET /nope", "HEAD /items/3"]


def _routes(run: Run) -> dict[str, object]:
    return {span.name: span.attrs.get("http.route") for span in _app_spans(run.trace)}


def _target(tmp_path: Path, runs: Callable[..., Run], module: str, paths: list[str]) -> Run:
    """``hopscope run MODULE:app`` (no proxy, so the app's own port), ``paths`` asked."""
    port = _free_port()
    run = runs(tmp_path, f"{module}:app", "--port", str(port), "--no-proxy", "--headless")
    try:
        run.wait_for(_answers(f"http://127.0.0.1:{port}/static"), "the app to answer")
        _exchanges(port, paths)
        run.wait_for(lambda: len(LINE.findall(run.out)) >= len(paths) + 1, "the tail lines")
    finally:
        run.stop()
    return run


# -- Sanic --------------------------------------------------------------------------------


def test_sanic_asgi_under_hopscope_run_uvicorn_is_named_by_its_route(
    tmp_path: Path, runs: Callable[..., Run]
) -> None:
    pytest.importorskip("sanic")
    _write(tmp_path, {"sroutes.py": SANIC_APP})
    port = _free_port()
    paths = [*PATHS, "GET /boom"]
    command = ["uvicorn", "--port", str(port), "sroutes:app"]
    bare, traced, run = _served(tmp_path, runs, command, port, paths, ready="/static")
    assert traced == bare
    assert "cannot instrument" not in run.err
    routes = _routes(run)
    assert routes["GET /items/3"] == "/items/<item_id:int>"  # Sanic's own syntax
    assert b" 405 " in bare["HEAD /items/3"].split(b"\r\n")[0]  # (no HEAD with @app.get)
    assert routes["HEAD /items/3"] is None  # (matched no route)
    assert routes["GET /static"] == "/static"
    assert routes["GET /boom"] == "/boom"  # (matched, then raised)
    assert routes["GET /nope"] is None


def test_sanic_as_hopscope_run_target_is_named_by_its_route(
    tmp_path: Path, runs: Callable[..., Run]
) -> None:
    pytest.importorskip("sanic")
    _write(tmp_path, {"sroutes.py": SANIC_APP})
    run = _target(tmp_path, runs, "sroutes", PATHS)
    assert "cannot instrument" not in run.err
    routes = _routes(run)
    assert routes["GET /items/3"] == "/items/<item_id:int>"
    assert routes["GET /static"] == "/static"
    assert routes["GET /nope"] is None


def test_sanic_websocket_under_hopscope_run_uvicorn_is_named_by_its_route(
    tmp_path: Path, runs: Callable[..., Run]
) -> None:
    """Sanic routes a WebSocket through the same router: its span gets the route too
    (with the ``:str`` Sanic writes for a bare parameter, as ``request.uri_template``)."""
    pytest.importorskip("sanic")
    from websockets.sync.client import connect

    _write(tmp_path, {"sroutes.py": SANIC_APP})
    port = _free_port()
    run = runs(tmp_path, "--headless", "--", "uvicorn", "--port", str(port), "sroutes:app")
    try:
        run.wait_for(_answers(f"http://127.0.0.1:{port}/static"), "the app to answer")
        with connect(f"ws://127.0.0.1:{port}/ws/ann", open_timeout=10) as socket:
            socket.send("hi")
            assert socket.recv(timeout=10) == "echo:ann:hi"
        run.wait_for(lambda: "WS /ws/ann " in run.out, "the WebSocket's line")
    finally:
        run.stop()
    assert _routes(run)["WS /ws/ann"] == "/ws/<name:str>"


# -- Pyramid ------------------------------------------------------------------------------


def test_pyramid_under_hopscope_run_gunicorn_is_named_by_its_route_pattern(
    tmp_path: Path, runs: Callable[..., Run]
) -> None:
    pytest.importorskip("pyramid")
    _write(tmp_path, {"proutes.py": PYRAMID_APP})
    port = _free_port()
    paths = [*PATHS, "GET /users/ann"]
    command = ["gunicorn", "-k", "gthread", "-b", f"127.0.0.1:{port}", "proutes:app"]
    bare, traced, run = _served(tmp_path, runs, command, port, paths, ready="/static")
    assert traced == bare
    assert "cannot instrument" not in run.err
    routes = _routes(run)
    assert routes["GET /items/3"] == "/items/{item_id}"
    assert routes["HEAD /items/3"] == "/items/{item_id}"
    assert routes["GET /static"] == "/static"
    assert routes["GET /users/ann"] == "/users/{name}"
    assert routes["GET /nope"] is None


def test_pyramid_as_hopscope_run_target_is_named_by_its_route_pattern(
    tmp_path: Path, runs: Callable[..., Run]
) -> None:
    pytest.importorskip("pyramid")
    _write(tmp_path, {"proutes.py": PYRAMID_APP})
    run = _target(tmp_path, runs, "proutes", PATHS)
    assert "cannot instrument" not in run.err
    routes = _routes(run)
    assert routes["GET /items/3"] == "/items/{item_id}"
    assert routes["GET /static"] == "/static"
    assert routes["GET /nope"] is None


# -- wrap(app) in code: no route, as for Quart, Django and Falcon ------------------------


def test_wrap_in_code_installs_no_route_hook(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hooks are ``hopscope run``'s alone: ``wrap(app)`` patches no framework, so
    a Pyramid app wrapped in code answers as before and its span has no route (the rule
    Quart, Django and Falcon follow)."""
    pytest.importorskip("pyramid")
    import importlib

    from pyramid.urldispatch import RoutesMapper

    _write(tmp_path, {"proutes_wrap.py": PYRAMID_APP})
    monkeypatch.syspath_prepend(str(tmp_path))
    bare = importlib.import_module("proutes_wrap").app
    call = RoutesMapper.__call__
    sink = MemorySink()
    with httpx.Client(transport=httpx.WSGITransport(app=wrap(bare, sink=sink))) as client:
        assert client.get("http://t/items/3").json() == {"id": 3}
    assert RoutesMapper.__call__ is call
    (span,) = [
        span for trace in sink.traces() for span in trace.spans.values() if span.hop == "app"
    ]
    assert span.attrs.get("http.route") is None
