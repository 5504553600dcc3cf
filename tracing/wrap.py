"""``wrap(app)``: pick the ASGI or WSGI middleware for an app."""

from __future__ import annotations

import asyncio
import functools
import inspect
import sys
from typing import Any

from .sinks import Sink

__all__ = ["is_asgi", "wrap"]


def is_asgi(app: Any) -> bool:
    """True for ASGI 3 apps: coroutine functions, objects with an async ``__call__``,
    and classes whose instances are awaitable (Starlette's ``HTTPEndpoint``)."""
    while isinstance(app, functools.partial):
        app = app.func
    if inspect.isclass(app):
        return hasattr(app, "__await__")
    if _is_coroutine_function(app):
        return True
    call = getattr(app, "__call__", None)  # noqa: B004 - we need the bound method itself
    return call is not None and _is_coroutine_function(call)


def _is_coroutine_function(fn: Any) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    # Before 3.12 inspect knows no markers; asgiref marks sync callables the asyncio way.
    # (From 3.14 asyncio.iscoroutinefunction warns, so it is only asked where needed.)
    return sys.version_info < (3, 12) and asyncio.iscoroutinefunction(fn)


def wrap(app: Any, sink: Sink | None = None, **options: Any) -> Any:
    """Return ``app`` instrumented: ASGI or WSGI is detected.

    ``sink`` defaults to the one ``HOPSCOPE_SINK`` names (the local collector when unset),
    created lazily on the first request of each process.
    """
    if getattr(app, "__hopscope_wrapped__", False):
        return app
    if is_asgi(app):
        from .asgi import ASGIMiddleware

        return ASGIMiddleware(app, sink=sink, **options)
    from .wsgi import WSGIMiddleware

    return WSGIMiddleware(app, sink=sink, **options)
