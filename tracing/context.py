"""The current request, and user spans inside it.

Middlewares set :data:`current` at the start of each request and reset it at the end,
inside the call, so nothing leaks from one request to the next on a kept-alive
connection (uvicorn can carry contextvars across requests: uvicorn PR #2912).
"""

from __future__ import annotations

import threading
import time
from contextvars import ContextVar, Token
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple

from .records import new_span_id

if TYPE_CHECKING:
    from .sinks import Sink

__all__ = ["SpanContext", "current", "server_parent", "span"]


class SpanContext(NamedTuple):
    """Where new child spans go: which sink, which trace, under which span."""

    sink: Sink
    trace_id: int
    span_id: int


current: ContextVar[SpanContext | None] = ContextVar("hopscope_current", default=None)

#: (trace id, span id) of the server hop handling the request on this thread, set by
#: server hooks that run outside the app call (gunicorn's pre_request), so the WSGI
#: middleware's app span can join the server span.
server_parent: ContextVar[tuple[int, int] | None] = ContextVar(
    "hopscope_server_parent", default=None
)


class span:
    """Time a block of user code as a span under the current request.

    Works with ``with`` and ``async with``.  Outside a request it records nothing, so
    library code can use it unconditionally.  An exception leaving the block is recorded
    on the span and propagates unchanged.
    """

    __slots__ = ("_attrs", "_name", "_parent", "_span_id", "_token")

    def __init__(self, name: str, **attrs: Any) -> None:
        self._name = name
        self._attrs = attrs
        self._parent: SpanContext | None = None
        self._token: Token[SpanContext | None] | None = None
        self._span_id = 0

    def __enter__(self) -> span:
        parent = current.get()
        if parent is None:
            return self
        self._parent = parent
        self._span_id = new_span_id()
        parent.sink.emit(
            (
                "s",
                time.time_ns(),
                parent.trace_id,
                self._span_id,
                parent.span_id,
                "app",
                self._name,
                threading.get_ident(),
                {"span.kind": "user", **self._attrs} if self._attrs else {"span.kind": "user"},
            )
        )
        self._token = current.set(SpanContext(parent.sink, parent.trace_id, self._span_id))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        parent = self._parent
        if parent is None:
            return
        if self._token is not None:
            current.reset(self._token)
            self._token = None
        attrs: dict[str, Any] | None = None
        if exc is not None:
            attrs = {"error": True, "exception.type": type(exc).__qualname__}
            from .exceptions import exception_event

            parent.sink.emit(exception_event(parent.trace_id, self._span_id, exc))
        parent.sink.emit(("e", time.time_ns(), parent.trace_id, self._span_id, attrs))
        self._parent = None

    async def __aenter__(self) -> span:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)
