"""The demo web app: one route for each kind of request hopscope should make visible.

A fast JSON route, a slow one with user spans around fake database calls, a streamed
response, a download, a JSON upload, a 404, a 500 with a traceback, a background task,
a WebSocket echo and a small plain-WSGI app mounted through :mod:`.wsgi_mount`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from hopscope.tracing import Sink, span, wrap
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from .wsgi_mount import WSGIMount

__all__ = ["ROUTES", "build_app", "create_app", "legacy_wsgi_app"]

#: What the demo serves, for the index page and the traffic generator's docs.
ROUTES = [
    ("GET", "/api/items/{item_id}", "fast JSON"),
    ("GET", "/api/slow", "slow, with db.query spans"),
    ("GET", "/api/stream", "streamed response"),
    ("GET", "/api/download", "file download (bigger than the body limit)"),
    ("POST", "/api/upload", "JSON upload"),
    ("GET", "/api/background", "response, then a background task"),
    ("GET", "/api/boom", "500 with a traceback"),
    ("WS", "/ws/echo", "WebSocket echo"),
    ("GET", "/legacy/hello", "plain WSGI app"),
]

#: About 100 KB, so the download exceeds the default 64 KiB body capture.
_REPORT = "".join(f"{n},item-{n},{n * 7 % 100}.{n % 100:02d}\n" for n in range(4000)).encode()


async def index(request: Request) -> JSONResponse:
    routes = [{"method": m, "path": p, "what": w} for m, p, w in ROUTES]
    return JSONResponse({"app": "hopscope demo", "routes": routes})


async def item(request: Request) -> JSONResponse:
    item_id = request.path_params["item_id"]
    return JSONResponse({"id": item_id, "name": f"item-{item_id}", "price": item_id * 1.5})


async def _fake_query(statement: str, seconds: float) -> list[dict[str, Any]]:
    async with span("db.query", **{"db.system": "sqlite", "db.statement": statement}):
        await asyncio.sleep(seconds)
        return [{"id": n} for n in range(3)]


async def slow(request: Request) -> JSONResponse:
    user = await _fake_query("SELECT * FROM users WHERE id = ?", 0.02)
    orders = await _fake_query("SELECT * FROM orders WHERE user_id = ?", 0.04)
    with span("render"):
        payload = {"user": user[0], "orders": orders}
    return JSONResponse(payload)


async def stream(request: Request) -> StreamingResponse:
    async def numbers() -> AsyncIterator[bytes]:
        for n in range(8):
            await asyncio.sleep(0.005)
            yield f"line {n}\n".encode()

    return StreamingResponse(numbers(), media_type="text/plain")


async def download(request: Request) -> Response:
    return Response(
        _REPORT,
        media_type="text/csv",
        headers={"content-disposition": 'attachment; filename="report.csv"'},
    )


async def upload(request: Request) -> JSONResponse:
    try:
        data = await request.json()
    except (ValueError, UnicodeDecodeError):
        return JSONResponse({"error": "expected a JSON body"}, status_code=400)
    count = len(data) if isinstance(data, list | dict) else 1
    return JSONResponse({"received": count}, status_code=201)


async def _send_receipt(order: int) -> None:
    async with span("email.send", order=order):
        await asyncio.sleep(0.03)


async def background(request: Request) -> JSONResponse:
    return JSONResponse({"queued": True}, background=BackgroundTask(_send_receipt, 42))


async def boom(request: Request) -> Response:
    raise RuntimeError("the demo broke on purpose")


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            text = await websocket.receive_text()
            await websocket.send_text(f"echo: {text}")
    except WebSocketDisconnect:
        pass


def legacy_wsgi_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """A plain WSGI app, as an old Flask or Django app would be."""
    path = environ.get("PATH_INFO", "")
    if path == "/hello":
        with span("legacy.lookup"):
            body = json.dumps({"hello": "from WSGI", "thread": "worker"}).encode()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found\n"]


def build_app(sink: Sink | None = None) -> Starlette:
    """The demo app; only its mounted WSGI app is instrumented (as a legacy app would be).

    ``sink`` is for that WSGI app (default: the one ``HOPSCOPE_SINK`` names).
    """
    return Starlette(
        routes=[
            Route("/", index),
            Route("/api/items/{item_id:int}", item),
            Route("/api/slow", slow),
            Route("/api/stream", stream),
            Route("/api/download", download),
            Route("/api/upload", upload, methods=["POST"]),
            Route("/api/background", background),
            Route("/api/boom", boom),
            WebSocketRoute("/ws/echo", echo),
            Mount("/legacy", app=WSGIMount(wrap(legacy_wsgi_app, sink=sink))),
        ]
    )


def create_app(sink: Sink | None = None) -> Any:
    """The demo app, instrumented (also a uvicorn ``--factory`` target)."""
    return wrap(build_app(sink), sink=sink)
