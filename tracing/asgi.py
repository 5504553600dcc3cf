"""The ASGI middleware: records each HTTP request and WebSocket as an ``app`` span.

Pure ASGI, no ``BaseHTTPMiddleware``: ``receive`` and ``send`` are wrapped, messages pass
through unchanged and unbuffered, and every message type this module does not know
(pathsend, zerocopysend, early hints, push, future ones) goes through untouched.
Per-request state lives in a recording made per call, never on the middleware, so
concurrent requests cannot mix (OpenTelemetry's ASGI middleware once did: contrib #5081).
An HTTP request's recording is handed to the sink at once and only filled in afterwards
(see :class:`~hopscope.tracing.sinks.Recording`): the request's own path takes timestamps
and keeps references, and a request that is over before the next drain travels as one
record.  WebSockets, long-lived and rare, emit their records as they happen.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from operator import itemgetter
from types import MethodType
from typing import Any

from .context import SpanContext, current, server_parent
from .exceptions import exception_event
from .forking import watch as watch_forks
from .logs import install_log_capture
from .records import (
    ASGI_REQUEST,
    BODY_LIMIT,
    REQUEST_BODY,
    RESPONSE_BODY,
    RESPONSE_START,
    _getrandbits,
    item_records,
    new_span_id,
    request_end,
    request_start,
)
from .sinks import Recording, Sink, default_sink
from .traceparent import parse_traceparent

__all__ = ["ASGIMiddleware", "BodyCapture"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[Any]]

#: Body chunks (and WebSocket messages) recorded one event each; later ones are summed.
FIRST_CHUNKS = 4
#: Work the app does after the response ended becomes a ``background`` span past this.
#: Frameworks take a few milliseconds to unwind after the last body (Django closes the
#: response in a worker thread, Starlette's StreamingResponse cancels its listener):
#: below 10 ms that is noise, not a background task.  Wall-clock time, so a loaded machine
#: stretches that unwinding past it: for the frameworks in :data:`_TASK_FRAMEWORKS` a span
#: is made only when the request queued one of their background tasks (see
#: :func:`_watch_background_tasks`).
BACKGROUND_MIN_NS = 10_000_000
#: Modules whose apps do no work of their own after the response but run it as background
#: tasks, which hopscope recognises (Starlette's ``BackgroundTask``, which FastAPI's
#: ``BackgroundTasks`` use, and FastAPI's dependencies with ``yield``, closed after the
#: response), or have none that runs in the request (Django's ASGI handler,
#: Quart's ``add_background_task``): the time they take to return after the response is
#: their own unwinding, however long a loaded machine makes it.
_TASK_FRAMEWORKS = ("starlette.", "fastapi.", "quart.", "django.core.handlers.")
#: First bytes of a WebSocket message kept in its event.
WS_PREVIEW = 256
#: How frameworks that catch a WebSocket handler's exception log it (at ERROR, with the
#: exception): Quart's ``log_exception``.  Other records with an exception do not fail
#: the connection (an app may log one it recovered from).
_FRAMEWORK_WS_ERRORS = ("Exception on websocket ",)

_now = time.time_ns
_ident = threading.get_ident
# A server hook that opened the server span from outside the scope (gunicorn's ASGI
# worker runs pre_request in the task that then calls the app) leaves its ids here.
_server_parent = server_parent.get
_exception = sys.exception


class ASGIMiddleware:
    """Instrument an ASGI 3 app; see the module docstring for what is recorded."""

    __hopscope_wrapped__ = True

    def __init__(
        self,
        app: ASGIApp,
        sink: Sink | None = None,
        body_limit: int = BODY_LIMIT,
        capture_logs: bool = True,
    ):
        self.app = app
        self.sink = sink
        self.body_limit = body_limit
        #: Whether the app's late return is a background span only when a background
        #: task it ran says so (see BACKGROUND_MIN_NS).
        self.tasks_only = _runs_background_tasks(app)
        if self.tasks_only:
            _watch_background_tasks()
        if capture_logs:
            install_log_capture()
        # A worker forked in C (uWSGI) ran no at-fork hooks: see forking.
        watch_forks()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> Any:
        # The request's whole life is in this one coroutine (no ``run`` of a recorder to
        # await): every frame and coroutine object less is time the app gets back.
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                return await _WebSocketRecorder(self, scope).run(receive, send)
            return await self.app(scope, receive, send)
        # The recording is made here, not by a function or an ``__init__``: a call costs
        # a request more than all the stores below.  (A class without ``__new__`` or
        # ``__init__``, called, costs less than ``object.__new__(cls)``: 300
        # instructions, as the latter goes through a wrapper that slices its arguments.)
        recording = _HTTPRecording()
        recording.start = _now()
        sink = recording.sink = self.sink or self._sink()
        # _request_fields(scope) and _ids(scope), inlined; the headers searched for a
        # traceparent are the request fields' (one lookup in the scope less).
        try:
            request = recording.request = _REQUEST_FIELDS(scope)
        except KeyError:
            request = recording.request = _request_fields(scope)
        if request[7].__class__ is not list:  # (servers send a list: see _plain)
            request = recording.request = _plain(scope)
        # (``in`` then a subscript only when it is there: no method call on most requests.)
        if "hopscope" in scope and (server := scope["hopscope"]) is not None:
            trace_id = recording.trace_id = server["trace_id"]
            recording.parent_id = server["parent_id"]
        elif (hooked := _server_parent()) is not None:
            trace_id = recording.trace_id = hooked[0]
            recording.parent_id = hooked[1]
        else:
            # The first traceparent, as _ids looks for it.  A plain loop: ``in map(...)``
            # asked in C cost more (the map and a call per header: 2k instructions
            # against 1.2k for three headers, counted by callgrind).
            for name, value in request[7] or ():
                if name == b"traceparent":
                    parsed = parse_traceparent(value)
                    if parsed is None:
                        parsed = _getrandbits(128) or 1, 0
                    recording.trace_id, recording.parent_id = parsed
                    trace_id = parsed[0]
                    break
            else:
                trace_id = recording.trace_id = _getrandbits(128) or 1  # new_trace_id()
                recording.parent_id = 0
        span_id = recording.span_id = _getrandbits(64) or 1  # new_span_id(), inlined
        recording.thread_id = _ident()
        recording.items = []
        recording.limit = self.body_limit
        recording.scope = scope
        # The fields' first values, unpacked from one constant: a load and a store per
        # field, against three bytecodes each for chained assignments.  status is None
        # until the response starts; response_chunks holds the first kept chunk, then a
        # list.  (response_first and response_last are set by the first chunk, read
        # only by a summary of more than FIRST_CHUNKS chunks: nothing to set before.)
        (
            recording.end_at, recording._state, recording.status, recording.response_headers,
            recording.handling, recording.end_extra, recording.route, recording.request_body,
            recording.response_chunks, recording.done, recording.trailers,
            recording.complete, recording.end_ts, recording.response_count,
            recording.response_size, recording.response_ts, recording.logged,
        ) = (
            -1, -1, None, None, None, None, None, None, None, False, False, False, 0, 0, 0, 0,
            None,
        )  # fmt: skip
        # The recording is the context's sink either way (a sink without a drain gets
        # each record as the recording's eager items make it): a log or a background
        # task then tells the recording, whatever the sink.
        if not sink.start_live(recording):
            recording.end_at = -2  # its end pushes the records (see _not_plain)
            recording.go_eager()
        token = current.set(_context(SpanContext, (recording, trace_id, span_id)))
        try:
            # The server's channels are bound into what the app gets (see _receive).
            channels = (recording, receive, send)
            result = await self.app(scope, _method(_receive, channels), _method(_send, channels))
        except BaseException as exc:
            recording.failed(exc, self.tasks_only)
            raise
        finally:
            current.reset(token)
        # What returned() and seal() do, inlined: two calls less on every request.
        if recording.complete:
            if recording.end_at < 0:
                if recording.handling is not None:
                    recording._handled()
                recording._end(recording.end_extra)
            if _now() - recording.end_ts > BACKGROUND_MIN_NS and (
                not self.tasks_only or getattr(recording, "deferred", False)
            ):
                recording._background(None)
        elif recording.end_at < 0:
            # The app returned without finishing its response (or without one at all).
            recording._end({"response.incomplete": True})
        recording.scope = _NO_SCOPE
        recording.handling = recording.logged = None
        recording.done = True
        items = recording.items
        items.append(None)
        if type(items) is not list:  # eager items (see Recording.seal)
            items._recording = None  # type: ignore[attr-defined]
        return result

    def _sink(self) -> Sink:
        sink = self.sink
        if sink is None:
            sink = self.sink = default_sink()
        return sink


#: ``tuple.__new__(SpanContext, fields)`` skips the named tuple's Python-level ``__new__``.
_context = tuple.__new__
_NO_SCOPE: Scope = {}
_method = MethodType


def _request_attrs(scope: Scope, interface: str) -> dict[str, Any]:
    client = scope.get("client") or (None, None)
    server = scope.get("server") or (None, None)
    return {
        "interface": interface,
        "http.request.method": scope.get("method", "GET"),
        "url.scheme": scope.get("scheme"),
        "network.protocol.version": scope.get("http_version"),
        "url.path": scope.get("path"),
        "url.query": scope.get("query_string"),
        "client.address": client[0],
        "client.port": client[1],
        "server.address": server[0],
        "server.port": server[1],
        "http.request.headers": scope.get("headers"),
    }


#: The scope's request fields, in the order of :data:`records.ASGI_REQUEST`.
_REQUEST_FIELDS = itemgetter(*ASGI_REQUEST)


def _request_fields(scope: Scope) -> tuple[Any, ...]:
    try:
        return _REQUEST_FIELDS(scope)  # type: ignore[no-any-return]
    except KeyError:  # optional keys missing: what _request_attrs would have read
        fields = tuple(scope.get(key) for key in ASGI_REQUEST)
        return (scope.get("method", "GET"), *fields[1:])


def _ids(scope: Scope) -> tuple[int, int]:
    """(trace id, parent span id): the server hop's span when a hopscope server protocol
    runs (``scope["hopscope"]``) or a server hook opened it (:data:`server_parent`), else
    an incoming ``traceparent``, else a new trace."""
    server = scope.get("hopscope")
    if server is not None:
        return server["trace_id"], server["parent_id"]
    hooked = _server_parent()
    if hooked is not None:
        return hooked
    for name, value in scope.get("headers") or ():
        if name == b"traceparent":
            parsed = parse_traceparent(value)
            if parsed is not None:
                return parsed
            break
    return _getrandbits(128) or 1, 0  # records.new_trace_id, without the call


def _route(scope: Scope, root_path: Any) -> str | None:
    route = scope.get("route")
    path = getattr(route, "path", None)
    if not isinstance(path, str):
        return None
    prefix = scope.get("root_path", "")
    if prefix == root_path:
        return path  # no mount in between (also what the slicing below gives then)
    if not isinstance(root_path, str):
        root_path = ""
    if not isinstance(prefix, str) or not prefix.startswith(root_path):
        return path
    prefix = prefix[len(root_path) :]
    if hasattr(route, "routes"):
        # A mount nothing inside matched (a 404 there, or a mounted app without routes):
        # the root_path it set already ends with its own path.
        return prefix or path
    return prefix + path


def _mount(scope: Scope, root_path: Any) -> str | None:
    """The mount a router passed the request to without a route in the scope: the root
    path it added.  FastAPI's router, unlike Starlette's, leaves no ``route`` for an app
    it ``mount()``s (StaticFiles, a sub-app's 404): named as :func:`_route` names a
    Starlette ``Mount`` nothing inside matched.  (The identity test before the call:
    a root path no router changed is the very object the request started with.)"""
    prefix = scope.get("root_path", "")
    if not isinstance(root_path, str):
        root_path = ""
    if not isinstance(prefix, str) or not prefix.startswith(root_path):
        return None
    return prefix[len(root_path) :] or None


def _plain(scope: Scope) -> tuple[Any, ...]:
    """The request's fields, once the scope's headers, client and server are lists and
    tuples.  ASGI allows any iterables there, and Falcon's test client sends iterators
    (of iterators, for the header pairs): read for a ``traceparent`` they would be used
    up before the app reads them, and a sink could not send them.  Put back into the
    scope as lists and tuples of the same values, they read the same for the app."""
    headers = scope.get("headers")
    if headers is not None:
        pairs = headers if type(headers) is list or type(headers) is tuple else list(headers)
        if not all(type(pair) is tuple or type(pair) is list for pair in pairs):
            pairs = [tuple(pair) for pair in pairs]
        if pairs is not headers:
            scope["headers"] = pairs
    for key in ("client", "server"):
        value = scope.get(key)
        if value is not None and type(value) is not tuple and type(value) is not list:
            scope[key] = tuple(value)
    return _request_fields(scope)


def _template(scope: Scope) -> str | None:
    """The route template Litestar leaves in the scope once it routed the request
    (``/items/{item_id}``); read where the response ends, only for requests without a
    Starlette route."""
    template = scope.get("path_template")
    return template if type(template) is str and template else None


def _listed(message: Message, headers: Any) -> tuple[Message, Any]:
    """The message as the server gets it, and its headers as recorded.  ASGI allows any
    iterable of header pairs: one the server would use up (Sanic sends a generator) is
    made a list first, in a copy of the message (the app's own is left as it is), so the
    server and the recording both see every header.  Lists and tuples are kept."""
    if headers is None or type(headers) is tuple:
        return message, headers
    headers = list(headers)
    copy = dict(message)
    copy["headers"] = headers
    return copy, headers


def _runs_background_tasks(app: Any) -> bool:
    """Whether ``app`` is a framework's (see :data:`_TASK_FRAMEWORKS`): a Starlette or
    FastAPI app, Django's ASGI handler or a Quart app, or the call of one that hopscope's
    framework patches wrap (a ``functools.partial`` of the method and the app).  A
    middleware of the user's around it is not: what it does after the response is work
    of its own, timed as before."""
    if isinstance(app, functools.partial) and app.args:
        app = app.args[0]
    return any(
        (getattr(cls, "__module__", None) or "").startswith(_TASK_FRAMEWORKS)
        for cls in type(app).__mro__
    )


def _defer() -> None:
    """Tell the request running here (if any) that work of its own follows its response."""
    context = current.get()
    if context is not None and type(context[0]) is _HTTPRecording:
        context[0].deferred = True


def _watch_background_tasks() -> None:
    """Have each Starlette ``BackgroundTask`` made while a request runs (each of FastAPI's
    ``BackgroundTasks`` is one) tell that request it has one, once per process; and
    each FastAPI dependency with ``yield`` (see :func:`_watch_fastapi_dependencies`).

    Its ``__init__`` is wrapped, not its ``__call__``: what the task runs, raises and how
    long it takes are untouched, its traceback has no frame of hopscope's, and it is
    still an async callable to whoever asks.  A task is made in the request that queues
    it (in the view, or FastAPI's ``add_task``): its context is the request's."""
    _watch_fastapi_dependencies()
    module = sys.modules.get("starlette.background")
    if module is None:
        return
    task_class = module.BackgroundTask
    init = task_class.__init__
    if getattr(init, "__hopscope_wrapped__", False):
        return

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        _defer()

    __init__.__hopscope_wrapped__ = True  # type: ignore[attr-defined]
    task_class.__init__ = __init__


def _watch_fastapi_dependencies() -> None:
    """Have each FastAPI dependency with ``yield`` tell its request, as a background task
    does.  Why: FastAPI closes them after the response went out (``db.close()`` after
    ``yield db``), work of the app's own that is a background span.  The function that
    enters one is wrapped to mark the request, then hands back FastAPI's own coroutine
    (no frame of hopscope's in a traceback); a FastAPI without it is left alone."""
    module = sys.modules.get("fastapi.dependencies.utils")
    solve = getattr(module, "_solve_generator", None)
    if solve is None or getattr(solve, "__hopscope_wrapped__", False):
        return

    @functools.wraps(solve)
    def _solve_generator(*args: Any, **kwargs: Any) -> Any:
        _defer()
        return solve(*args, **kwargs)

    _solve_generator.__hopscope_wrapped__ = True  # type: ignore[attr-defined]
    module._solve_generator = _solve_generator  # type: ignore[union-attr]


class BodyCapture:
    """Counts a body's chunks and keeps its first bytes (references, not copies).

    The middleware makes one at a request's first chunk (most requests have none; the
    response's counters live on its recording, as nearly every response has a body);
    ``hopscope proxy`` uses it for both directions.  :meth:`kept` cuts what was kept to
    ``limit`` bytes, once, when the request is over.
    """

    __slots__ = ("chunks", "count", "first_ts", "kept_size", "last_ts", "limit", "size")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.size = 0
        self.kept_size = 0
        self.chunks: list[bytes] = []
        self.first_ts = 0
        self.last_ts = 0

    def add(self, chunk: bytes, ts: int) -> int:
        """Count ``chunk`` (and keep it while under the limit); returns its number."""
        size = len(chunk)
        if not self.count:
            self.first_ts = ts
        count = self.count = self.count + 1
        self.size += size
        self.last_ts = ts
        if self.kept_size < self.limit:
            self.chunks.append(chunk)
            self.kept_size += size
        return count

    def summary(self) -> dict[str, int]:
        return {
            "count": self.count,
            "bytes": self.size,
            "first_ts": self.first_ts,
            "last_ts": self.last_ts,
        }

    def kept(self) -> list[bytes]:
        """The first ``limit`` bytes, as chunks (cut here if the last one went past)."""
        if self.kept_size > self.limit:
            self.chunks = _cut(self.chunks, self.limit)
            self.kept_size = self.limit
        return self.chunks


def _cut(chunks: Any, limit: int) -> Any:
    """The kept chunks (bytes, or a list of them) cut to exactly ``limit`` bytes, once per
    request, so the capture is the first ``limit`` bytes and a big chunk is let go."""
    if type(chunks) is not list:
        return chunks[:limit]
    excess = sum(map(len, chunks)) - limit
    if excess > 0:
        last = chunks[-1]
        chunks[-1] = last[: len(last) - excess]
    return chunks


class _HTTPRecording(Recording):
    """One HTTP request's recording; made per call (see :class:`sinks.Recording`)."""

    interface = "asgi"

    __slots__ = (
        "complete",
        "deferred",
        "end_extra",
        "end_ts",
        "handling",
        "limit",
        "logged",
        "request_body",
        "response_chunks",
        "response_count",
        "response_first",
        "response_headers",
        "response_last",
        "response_size",
        "response_ts",
        "route",
        "scope",
        "status",
        "trailers",
    )

    complete: bool
    #: Set (never initialised: read only when the app returns late) when the request
    #: queued a background task of its framework's (see _watch_background_tasks).
    deferred: bool
    end_extra: dict[str, Any] | None
    end_ts: int
    handling: BaseException | None
    limit: int
    #: The first exception the app logged at ERROR while it answered (see logs): Django's
    #: and Quart's 500 for a view that raised is sent after the exception was handled.
    logged: Exception | None
    request_body: BodyCapture | None
    response_chunks: Any  # the first kept chunk, then a list of them
    response_count: int
    response_first: int
    response_headers: Any
    response_last: int
    response_size: int
    #: When the response started, if nothing was in ``items`` then (see _send): its
    #: ``response.start`` event is then not an item but made from the end fields.
    response_ts: int
    route: str | None
    scope: Scope
    status: int | None
    trailers: bool

    # Filled in by ASGIMiddleware.__call__, not by an ``__init__``: a Python ``__init__``
    # behind a type call costs a request more than all the stores it makes.  (Neither
    # this class nor its bases may define ``__init__`` or ``__new__``.)

    def _event(self, ts: int, name: str, attrs: dict[str, Any] | None) -> None:
        self.items.append(("p", ts, self.trace_id, self.span_id, name, attrs))

    def seal(self) -> None:
        # (ASGIMiddleware.__call__ does the same inline when the app returns.)
        # The scope was only needed for the route: let it (and whatever the app hung on
        # it) go now rather than at the next drain, so the collector of garbage does
        # not walk it in the meantime.  Likewise the exception an error page was sent
        # for: its traceback holds the app's frames (the request, whatever the view had),
        # which the app expects freed once it returned, not at the sink's next drain.
        self.scope = _NO_SCOPE
        self.handling = self.logged = None
        Recording.seal(self)

    def _background(self, attrs: dict[str, Any] | None) -> None:
        """Work the app did after its response was complete becomes its own span."""
        returned = _now()
        if attrs or returned - self.end_ts > BACKGROUND_MIN_NS:
            self.items.append(
                (
                    "c",
                    self.end_ts,
                    returned,
                    self.trace_id,
                    new_span_id(),
                    self.span_id,
                    "app",
                    "background",
                    _ident(),
                    attrs,
                )
            )

    def _handled(self) -> None:
        """The app returned after it sent a server error page while it handled an
        exception, which it then swallowed (Litestar's exception middleware, a Starlette
        exception handler), or after it logged one it caught (Django, Quart): that
        exception is recorded here, as if the app had raised it.  (Only on this rare
        path: error pages below 500 are the app's answers, a 404 for a route Litestar
        raised as an exception.)"""
        exc = self.handling
        status = self.status
        if isinstance(exc, Exception) and type(status) is int and status >= 500:
            self.items.append(
                exception_event(self.trace_id, self.span_id, exc, phase="before_response")
            )
            extra = dict(self.end_extra or ())
            extra["error"] = True
            extra["exception.type"] = type(exc).__qualname__
            self.end_extra = extra

    # -- end -------------------------------------------------------------------
    def _complete(self, extra: dict[str, Any] | None, handed: int) -> None:
        """The response is fully sent: the span ends here, unless it is an error page."""
        self.complete = True
        self.end_ts = handed
        if self.handling is None:
            self._end(extra)
        else:
            # Sent while an exception was being handled: if the app re-raises it, the
            # span must say so, so it ends (at this time) when the app returns or raises.
            self.end_extra = extra

    def _end(self, extra: dict[str, Any] | None) -> None:
        if self.end_at >= 0:
            return
        ts = self.end_ts or _now()
        self.end_ts = ts
        self.end_extra = extra
        size, limit = self.response_size, self.limit
        if size > limit and self.response_chunks is not None:
            self.response_chunks = _cut(self.response_chunks, limit)
        scope = self.scope
        route = scope.get("route")
        if route is not None:
            # _route's common case inline: no mount between the middleware and the route.
            try:
                path = route.path  # (cheaper than getattr with a default when it is there)
            except AttributeError:
                path = None
            if type(path) is str and scope.get("root_path", "") == self.request[8]:
                self.route = path
            else:
                self.route = _route(scope, self.request[8])
        elif self.route is None:
            if scope.get("root_path") is not self.request[8]:
                self.route = _mount(scope, self.request[8])
            elif "path_template" in scope:
                self.route = _template(scope)
        request = self.request_body
        if request is not None:
            request.kept()
            if request.count > FIRST_CHUNKS:
                self._event(ts, "request.body.summary", request.summary())
        if self.response_count > FIRST_CHUNKS:
            summary = {
                "count": self.response_count,
                "bytes": size,
                "first_ts": self.response_first,
                "last_ts": self.response_last,
            }
            self._event(ts, "response.body.summary", summary)
        items = self.items
        self.end_at = len(items)  # publishes the end: written last
        if type(items) is not list:
            self.push()

    def take(self, out: list[Any]) -> bool:
        # Recording.take's common case (a request over before its first take: nearly
        # every one) with _whole, request_fields and end_fields inline: three Python
        # calls less per request in the drain.
        if self._state < 0 and self.done:
            items = self.items
            end_at = self.end_at
            # Sealed (a seal at the end: the end was published before it) and ended.
            if items and items[-1] is None and end_at >= 0:
                if self.request_body is None:
                    size = self.response_size
                    end = (
                        self.end_ts, self.status, self.response_headers, self.route, 0, None,
                        False, size, self.response_chunks, size > self.limit, self.end_extra,
                        self.response_ts,
                    )  # fmt: skip
                else:
                    end = self.end_fields()
                record = (
                    "r", self.start, self.trace_id, self.span_id, self.parent_id,
                    self.thread_id, "asgi", self.request, end_at, end, items,
                )  # fmt: skip
                out.append(record)
                self._state = 1
                return True
        self._state, finished = self._collect(self._state, out)
        return finished

    def end_fields(self) -> tuple[Any, ...]:
        # Made when the sink asks, from fields that are final once the span ended: a
        # tuple made at the end would be one more object alive until the next drain.
        request = self.request_body
        size = self.response_size
        if request is None:
            return (
                self.end_ts, self.status, self.response_headers, self.route, 0, None, False,
                size, self.response_chunks, size > self.limit, self.end_extra,
                self.response_ts,
            )  # fmt: skip
        return (
            self.end_ts, self.status, self.response_headers, self.route, request.size,
            request.chunks, request.size > request.limit, size, self.response_chunks,
            size > self.limit, self.end_extra, self.response_ts,
        )  # fmt: skip

    def _collect(self, state: int, out: list[Any]) -> tuple[int, bool]:
        # Recording._collect, plus the response start kept out of the items: a request
        # seen running sends it as a record of its own, before the items that followed
        # it (all of them: there were none when it was kept out).  ``state`` is
        # ``4 * items sent + 2 * start sent + end sent``.
        done, items, size, end_at = self._published()
        # Read after the items: an item that follows the start is then never sent
        # before it (_send writes response_ts before it appends anything more).
        response_ts = self.response_ts
        trace_id, span_id = self.trace_id, self.span_id
        if state < 0:
            if done and end_at >= 0:
                out.append(self._whole(end_at, items))
                return 1, True
            out.append(
                request_start(
                    "asgi", self.start, trace_id, span_id, self.parent_id, self.thread_id,
                    self.request,
                )
            )  # fmt: skip
            state = 0
        cursor, start_sent, end_sent = state >> 2, state >> 1 & 1, state & 1
        if response_ts and not start_sent:
            attrs = {"status": self.status, "headers": self.response_headers}
            out.append(("p", response_ts, trace_id, span_id, "response.start", attrs))
            start_sent = 1
        if end_at >= 0 and not end_sent:
            if cursor < end_at:
                cursor = item_records(items, cursor, end_at, trace_id, span_id, out)
            out.append(request_end("asgi", trace_id, span_id, self.end_fields()))
            end_sent = 1
        cursor = item_records(items, cursor, size, trace_id, span_id, out)
        return cursor << 2 | start_sent << 1 | end_sent, done

    def failed(self, exc: BaseException, tasks_only: bool = False) -> None:
        """The app raised; ``tasks_only`` as for the middleware's app (see
        BACKGROUND_MIN_NS): a cancellation after its response, while it unwinds, is then
        no background work unless it queued a background task."""
        attrs: dict[str, Any]
        if isinstance(exc, Exception):
            attrs = {"error": True, "exception.type": type(exc).__qualname__}
            if exc is self.handling:
                phase = "before_response"  # the response was this exception's error page
            elif self.complete:
                phase = "after_response"
            elif self.status is not None:
                phase = "after_response_start"
            else:
                phase = "before_response"
            self.items.append(exception_event(self.trace_id, self.span_id, exc, phase=phase))
        else:
            # Cancellation or interpreter exit: not the app's error, but the request ended.
            attrs = {"cancelled": type(exc).__name__}
        if self.complete and exc is not self.handling:
            # The response went out fine; what failed is the work after it.
            self._end(self.end_extra)
            if "error" in attrs or not tasks_only or getattr(self, "deferred", False):
                self._background(attrs)
        else:
            if self.end_extra:
                attrs.update(self.end_extra)
            self._end(attrs)
        self.seal()


_Channels = tuple[_HTTPRecording, Receive, Send]


# -- the app's receive and send ---------------------------------------------------------
# Bound to ``(recording, server's receive, server's send)`` with MethodType: one tuple and
# two method objects per request (two partials made six objects), and not on the
# recording, which outlives the request until the next drain and would keep the server's
# per-request objects alive (and walked by the collector of garbage) all that time.  (Methods
# of the recording holding the channels only while the app runs cost 850 instructions
# less, but a task the app left behind could then no longer reach the server: a
# behaviour change, so not done.)


async def _receive(channels: _Channels) -> Message:
    recording, receive, _ = channels
    message = await receive()
    kind = message.get("type")
    if kind == "http.request":
        body = message.get("body", b"")
        if body:
            ts = _now()
            request = recording.request_body
            if request is None:
                request = recording.request_body = BodyCapture(recording.limit)
                _not_plain(recording)
            request.add(body, ts)
            if request.count <= FIRST_CHUNKS:
                more = bool(message.get("more_body"))
                recording.items.append((REQUEST_BODY, ts, len(body), more))
    elif (
        kind == "http.disconnect"
        and not recording.complete
        and recording.end_at < 0
        and not (recording.end_ts and not recording.trailers)
    ):
        # After the final body (or while the server writes it, see _send) a disconnect
        # is the normal end of the exchange.
        phase = "during_response" if recording.status is not None else "before_response"
        recording._event(_now(), "disconnect", {"phase": phase})
        recording._end({"disconnected": True})
    return message


async def _send(channels: _Channels, message: Message) -> None:
    recording, _, send = channels
    # Subscripts where a key is (nearly) always there and ``in`` where it is often not:
    # both cost less than a method call (a try costs nothing until it catches).
    try:
        kind = message["type"]
    except (KeyError, TypeError):  # not a message: the server's to refuse
        kind = None
    if kind == "http.response.start":
        # Read before the server has the message: headers may be any iterable, and a
        # generator (Sanic's) is used up by the server (see _listed).
        try:
            headers = message["headers"]
        except KeyError:
            headers = None
        else:
            if headers.__class__ is not list:
                message, headers = _listed(message, headers)
        try:
            await send(message)
        except OSError:
            _send_failed(recording)
            raise
        # An app (Starlette's ServerErrorMiddleware) may send an error page while it
        # handles an exception that it then re-raises: remember which, see _complete.
        # (Or after it handled one it logged: Django's and Quart's 500, see logs.)
        handling = recording.handling = _exception() or recording.logged
        try:
            status = message["status"]
        except KeyError:
            status = 0
        recording.status = status
        recording.response_headers = headers
        if "trailers" in message and message["trailers"]:  # noqa: RUF019 (see above)
            recording.trailers = True
            _not_plain(recording)
        elif handling is not None:
            _not_plain(recording)
        ts = _now()
        items = recording.items
        if items:
            items.append((RESPONSE_START, ts, status, headers))
        else:
            # Nothing happened before it (most responses): its time is enough, the
            # end fields have the rest (records.expand makes the event first), and no
            # tuple is made here nor marshalled later.  Written last: see _collect.
            recording.response_ts = ts
        return
    # The app's part ends when it hands the last message over: the server's own
    # span (which writes it) then closes after the app span, not before.  Only
    # messages that may be the last need that time (the start above does not).
    handed = _now()
    if kind != "http.response.body":
        try:
            await send(message)
        except OSError:
            _send_failed(recording)
            raise
        if kind == "http.response.trailers":
            attrs = {"http.response.trailers": message.get("headers")}
            recording._event(_now(), "response.trailers", attrs)
            if not message.get("more_trailers"):
                recording._complete(None, handed)
        elif kind == "http.response.pathsend":
            recording._complete({"http.response.pathsend": message.get("path")}, handed)
        elif kind == "http.response.zerocopysend":
            if not message.get("more_body"):
                recording._complete({"http.response.zerocopysend": True}, handed)
        return
    more = "more_body" in message and message["more_body"]
    if not more:
        # Set before the server has it: a disconnect the server reports while it
        # writes the last body (hypercorn ends the stream inside this send) is the
        # exchange's normal end, not a client that left (see _receive).
        recording.end_ts = handed
    try:
        await send(message)
    except OSError:
        _send_failed(recording)
        raise
    try:
        body = message["body"]
    except KeyError:
        body = b""
    if not more and recording.end_at == -1:
        # The usual response: one body, nothing that needs more than its facts (see
        # _not_plain), so the span ends here, inline: no counting of earlier chunks,
        # nothing to cut but this body, no summary to add.
        recording.complete = True
        if body:
            recording.response_count = 1
            size = recording.response_size = len(body)
            limit = recording.limit
            # A body past the limit is cut now: only its first bytes are kept.
            recording.response_chunks = body if size <= limit else body[:limit]
        scope = recording.scope
        route = scope.get("route")
        if route is not None:
            try:
                path = route.path
            except AttributeError:
                path = None
            root_path = recording.request[8]
            if type(path) is str and scope.get("root_path", "") == root_path:
                recording.route = path
            else:
                recording.route = _route(scope, root_path)
        elif recording.route is None:
            if "root_path" in scope and scope["root_path"] is not recording.request[8]:
                recording.route = _mount(scope, recording.request[8])
            elif "path_template" in scope:
                recording.route = _template(scope)
        recording.end_at = len(recording.items)  # publishes the end: written last
        return
    if body:
        count = recording.response_count = recording.response_count + 1
        size = recording.response_size
        if size < recording.limit:
            kept = recording.response_chunks
            if kept is None:
                recording.response_chunks = body
            elif type(kept) is list:
                kept.append(body)
            else:
                recording.response_chunks = [kept, body]
        recording.response_size = size + len(body)
        # The chunk's time serves its event and a long body's summary.
        if more or count > FIRST_CHUNKS:
            ts = _now()
            if count == 1:
                recording.response_first = ts
            recording.response_last = ts
            if more and count <= FIRST_CHUNKS:
                recording.items.append((RESPONSE_BODY, ts, len(body), True))
    if more:
        _not_plain(recording)  # the last body then goes the long way, through _end
    elif not recording.trailers:
        recording._complete(None, handed)


def _not_plain(recording: _HTTPRecording) -> None:
    """The response's last body must end the span the long way (:meth:`_end`).

    ``end_at`` is -1 while nothing but a response start happened (the usual request),
    -2 once something did that the short way in ``_send`` does not handle: a request
    body, earlier response bodies, trailers, an error page, a sink without a drain.
    Readers only ever ask whether it is below 0 (not ended) or not.
    """
    if recording.end_at == -1:
        recording.end_at = -2


def _send_failed(recording: _HTTPRecording) -> None:
    """The server could not write: the client is gone."""
    if recording.end_at < 0:
        recording._event(_now(), "disconnect", {"phase": "send"})
        recording._end({"disconnected": True})


class _WebSocketRecorder(Sink):
    """One WebSocket connection's recording: handshake, messages each way, close.

    It is also the sink of the connection's context, passing records on to the real
    one: a framework that keeps its route off the scope (Quart) hands it over through
    the context (:func:`hopscope.tracing.inject._note_route`), as for HTTP requests.
    And so it sees the log records the connection emits: Quart catches the exception of
    a WebSocket handler, logs it and closes normally (1000), so the exception is only
    known from that log record (see :meth:`emit`).
    """

    __slots__ = (
        "accepted",
        "app",
        "caught",
        "close_code",
        "close_reason",
        "connect_ts",
        "inbound",
        "outbound",
        "root_path",
        "route",
        "scope",
        "sink",
        "span_id",
        "status",
        "trace_id",
    )

    def __init__(self, middleware: ASGIMiddleware, scope: Scope) -> None:
        self.app = middleware.app
        self.scope = scope
        self.sink = middleware._sink()
        self.inbound = [0, 0]
        self.outbound = [0, 0]
        self.accepted = False
        self.status: int | None = None
        self.connect_ts = 0
        root_path = scope.get("root_path", "")
        self.root_path = root_path if isinstance(root_path, str) else ""
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.route: str | None = None
        self.caught: BaseException | None = None

    def emit(self, record: Any) -> None:
        self.sink.emit(record)
        if (
            record[0] == "p"
            and record[4] == "log"
            and self.caught is None
            and type(attrs := record[5]) is dict
            and "exception.stacktrace" in attrs
            and attrs.get("level") == "ERROR"
            and str(attrs.get("message")).startswith(_FRAMEWORK_WS_ERRORS)
        ):
            # The framework logs the handler's exception while it handles it (in its
            # ``except`` block): that one is the exception being handled now.
            caught = _exception()
            if isinstance(caught, Exception):
                self.caught = caught
                self.sink.emit(exception_event(self.trace_id, self.span_id, caught))

    async def run(self, receive: Receive, send: Send) -> Any:
        scope = self.scope
        start = _now()
        if scope.get("headers").__class__ is not list:
            _plain(scope)
        trace_id, parent_id = _ids(scope)
        self.trace_id = trace_id
        self.span_id = span_id = new_span_id()
        attrs = _request_attrs(scope, "asgi")
        attrs["network.protocol.name"] = "websocket"
        self.sink.emit(
            (
                "s",
                start,
                trace_id,
                span_id,
                parent_id,
                "app",
                f"WS {scope.get('path', '')}",
                _ident(),
                attrs,
            )
        )

        async def receive_() -> Message:
            message = await receive()
            self._received(message)
            return message

        async def send_(message: Message) -> None:
            await send(message)
            self._sent(message)

        token = current.set(SpanContext(self, trace_id, span_id))
        end_attrs: dict[str, Any] = {}
        try:
            return await self.app(scope, receive_, send_)
        except BaseException as exc:
            if isinstance(exc, Exception):
                if exc is not self.caught:  # (its event is there already)
                    self.sink.emit(exception_event(trace_id, span_id, exc))
                end_attrs["error"] = True
                end_attrs["exception.type"] = type(exc).__qualname__
            raise
        finally:
            current.reset(token)
            caught = self.caught
            if caught is not None and "error" not in end_attrs:
                end_attrs["error"] = True
                end_attrs["exception.type"] = type(caught).__qualname__
            self.caught = None  # (its traceback holds the handler's frames)
            end_attrs.update(
                {
                    "websocket.accepted": self.accepted,
                    "websocket.messages_in": self.inbound[0],
                    "websocket.bytes_in": self.inbound[1],
                    "websocket.messages_out": self.outbound[0],
                    "websocket.bytes_out": self.outbound[1],
                    "websocket.close_code": self.close_code,
                    "websocket.close_reason": self.close_reason,
                }
            )
            if self.status is not None:
                end_attrs["http.response.status_code"] = self.status
            route = (
                _route(scope, self.root_path)
                or self.route
                or _mount(scope, self.root_path)
                or _template(scope)
            )
            if route is not None:
                end_attrs["http.route"] = route
            self.sink.emit(("e", _now(), trace_id, span_id, end_attrs))

    def _message_event(self, direction: str, message: Message, counts: list[int]) -> None:
        data = message.get("bytes")
        text = message.get("text")
        size = len(data) if data is not None else len(text.encode()) if text is not None else 0
        counts[0] += 1
        counts[1] += size
        if counts[0] <= FIRST_CHUNKS:
            attrs: dict[str, Any] = {"direction": direction, "size": size}
            if text is not None:
                attrs["text"] = text[:WS_PREVIEW]
            elif data is not None:
                attrs["bytes"] = data[:WS_PREVIEW]
            self.sink.emit(("p", _now(), self.trace_id, self.span_id, "websocket.message", attrs))

    def _received(self, message: Message) -> None:
        kind = message.get("type")
        if kind == "websocket.receive":
            self._message_event("in", message, self.inbound)
        elif kind == "websocket.connect":
            self.connect_ts = _now()
        elif kind == "websocket.disconnect":
            if self.close_code is None:
                self.close_code = message.get("code", 1005)
                reason = message.get("reason")
                self.close_reason = reason or None
            self.sink.emit(
                (
                    "p",
                    _now(),
                    self.trace_id,
                    self.span_id,
                    "websocket.disconnect",
                    {"code": message.get("code", 1005)},
                )
            )

    def _sent(self, message: Message) -> None:
        kind = message.get("type")
        if kind == "websocket.send":
            self._message_event("out", message, self.outbound)
        elif kind == "websocket.accept":
            self.accepted = True
            now = _now()
            self.sink.emit(
                (
                    "p",
                    now,
                    self.trace_id,
                    self.span_id,
                    "websocket.accept",
                    {"handshake_ns": now - self.connect_ts if self.connect_ts else None},
                )
            )
        elif kind == "websocket.close":
            if not self.accepted and self.status is None:
                self.status = 403  # what servers answer a handshake closed before accept
            self.close_code = message.get("code", 1000)
            self.close_reason = message.get("reason") or None
            self.sink.emit(
                (
                    "p",
                    _now(),
                    self.trace_id,
                    self.span_id,
                    "websocket.close",
                    {"code": self.close_code, "reason": self.close_reason},
                )
            )
        elif kind == "websocket.http.response.start":
            self.status = message.get("status")
            self.sink.emit(
                (
                    "p",
                    _now(),
                    self.trace_id,
                    self.span_id,
                    "response.start",
                    {"status": self.status, "headers": message.get("headers")},
                )
            )
