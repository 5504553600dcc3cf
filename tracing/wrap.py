"""``wrap(app)``: pick the ASGI or WSGI middleware for an app."""

from __future__ import annotations

import asyncio
import functools
import inspect
import sys
from typing import Any

from .sinks import Sink

__all__ = ["is_asgi", "is_traced", "wrap"]

#: Where an app keeps the app every request goes through, as an attribute of its own:
#: most middlewares (``app``), Flask (``wsgi_app``) and Quart (``asgi_app``).  Not
#: Django's static files handler (``application``): it serves static files past it.
_INNER = ("app", "wsgi_app", "asgi_app")


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


def is_traced(app: Any) -> bool:
    """Whether hopscope's middleware is ``app`` or an app it wraps: ``wrap()`` in the
    user's code under middleware of their own, or Flask's
    ``app.wsgi_app = wrap(app.wsgi_app)``.  What serves such an app without wrapping it
    again (``hopscope run``) records each request once, where the user's wrap sees it.
    Only the objects' own attributes are read, a few levels deep: no property or
    ``__getattr__`` of theirs runs.
    """
    todo = [app]
    for _ in range(16):
        if not todo:
            break
        obj = todo.pop()
        if getattr(type(obj), "__hopscope_wrapped__", False):
            return True
        try:
            own = vars(obj)
        except TypeError:  # no __dict__ (__slots__): nothing to follow
            continue
        todo += [inner for name in _INNER if (inner := own.get(name)) is not None]
    return False


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
