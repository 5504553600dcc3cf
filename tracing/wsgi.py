"""The WSGI middleware: one app span per request, without changing a byte of it.

Everything a request needs lives in objects made per call (an :class:`_Exchange`, a
:class:`_Body` iterator, an :class:`_Input` proxy only when the request has a body), so
one middleware instance serves any number of threads.  The hot path takes timestamps and
keeps references: the exchange is a :class:`~hopscope.tracing.sinks.Recording` the sink
makes records of later, off the request's thread, and a request over before the next
drain travels as one ``"r"`` record (see :mod:`hopscope.tracing.records`).

PEP 3333 is followed to the letter: ``start_response`` and its ``exc_info`` go through
untouched, the ``write`` callable is wrapped rather than replaced, the body iterable is
passed on one chunk at a time and its ``close()`` is called exactly once, and
``wsgi.file_wrapper`` results are handed back as they are so servers can still use
``sendfile``.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from operator import itemgetter
from types import BuiltinFunctionType
from typing import TYPE_CHECKING, Any

from .context import SpanContext, current, server_parent
from .exceptions import exception_event
from .forking import watch as watch_forks
from .logs import install_log_capture
from .records import (
    BODY_LIMIT,
    REQUEST_BODY,
    RESPONSE_BODY,
    RESPONSE_START,
    WSGI_REQUEST,
    _getrandbits,
    port,
)
from .sinks import Recording
from .traceparent import parse_traceparent

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from .sinks import Sink

__all__ = ["WSGIMiddleware"]

#: Body chunks that get their own point event; later ones only count towards a summary.
EVENT_CHUNKS = 4

_now = time.time_ns
#: ``tuple.__new__(SpanContext, fields)`` skips the named tuple's Python-level ``__new__``.
_context = tuple.__new__


_HEADER_PREFIXES = ("HTTP_", "CONTENT_")
#: What a plan holds: the environ keys that may be headers; a getter of the request
#: fields followed by those keys' values (one call and one tuple per request:
#: :meth:`_Exchange.request_fields` splits them at the drain); and whether a GET or HEAD
#: of HTTP/1 with these keys surely has no body (neither Content-Length nor
#: Transfer-Encoding: :func:`_has_body`'s common answer, without a lookup).  Under mod_wsgi
#: and uWSGI the getter also puts the :class:`_FileWrapperShim` in the environ (a call
#: there, none on other servers' requests).
_Plan = tuple[tuple[str, ...], Callable[[Any], tuple[Any, ...]], bool]
#: environ keys, in order -> their plan.  A server builds the environs of like requests
#: alike, so the plan is made once per kind of request instead of testing every key of
#: every environ (bounded: header names come from clients).
_HEADER_PLANS: dict[tuple[Any, ...], _Plan] = {}


def _header_plan(keys: tuple[Any, ...], environ: WSGIEnvironment) -> _Plan:
    found = tuple(k for k in keys if isinstance(k, str) and k.startswith(_HEADER_PREFIXES))
    picked: Callable[[Any], tuple[Any, ...]]
    if set(WSGI_REQUEST).issubset(keys):
        picked = itemgetter(*WSGI_REQUEST, *found)
    else:  # wsgiref has no REMOTE_PORT, for one
        values = itemgetter(*found) if found else None

        def picked(environ: Any) -> tuple[Any, ...]:
            fields = tuple(environ.get(key, _DEFAULTS.get(key)) for key in WSGI_REQUEST)
            if values is None:
                return fields
            got = values(environ)
            return fields + (got if len(found) > 1 else (got,))

    shim = _shim_for(environ.get("wsgi.file_wrapper"))
    if shim is not None:
        pick = picked

        def picked(environ: Any) -> tuple[Any, ...]:
            shim.install(environ)
            return pick(environ)

    bodiless = "CONTENT_LENGTH" not in found and "HTTP_TRANSFER_ENCODING" not in found
    plan = found, picked, bodiless
    if len(_HEADER_PLANS) < 256:
        _HEADER_PLANS[keys] = plan
    return plan


#: What the old code defaulted each request field to when the environ lacked it.
_DEFAULTS = {"REQUEST_METHOD": "", "SCRIPT_NAME": "", "PATH_INFO": "", "QUERY_STRING": ""}
_DEFAULTS["SERVER_PROTOCOL"] = ""
#: How many of the values a plan picks are request fields (the rest are headers').
_FIELDS = len(WSGI_REQUEST)
#: Where the request fields have the method and protocol (read again by _has_body's test).
_METHOD = WSGI_REQUEST.index("REQUEST_METHOD")
_PROTOCOL = WSGI_REQUEST.index("SERVER_PROTOCOL")


#: Status line -> status code (bounded: an app may make up any status line).
_CODES: dict[str, int | None] = {}


def _status_code(status: Any) -> int | None:
    try:
        code: int | None = int(status[:3])
    except (TypeError, ValueError):
        code = None
    if type(status) is str and len(_CODES) < 1024:
        _CODES[status] = code
    return code


def _has_body(environ: WSGIEnvironment) -> bool:
    """Whether ``wsgi.input`` needs counting: not for a GET or HEAD that announces no
    body (RFC 9112 6.3: an HTTP/1 request without Content-Length or Transfer-Encoding
    has none), which is most requests, and then nothing is wrapped at all."""
    if environ.get("REQUEST_METHOD") not in _BODILESS:
        return True
    length = environ.get("CONTENT_LENGTH")
    if (length and length != "0") or "HTTP_TRANSFER_ENCODING" in environ:
        return True
    protocol = environ.get("SERVER_PROTOCOL")
    return not (isinstance(protocol, str) and protocol.startswith("HTTP/1"))


_BODILESS = frozenset({"GET", "HEAD"})
#: The protocols :func:`_has_body` answers for by the method and length alone (compared,
#: not hashed: a server may give anything).
_HTTP1 = ("HTTP/1.1", "HTTP/1.0")


class _Flow:
    """One direction's body: counts every chunk, keeps the first ``limit`` bytes.

    The first :data:`EVENT_CHUNKS` chunks become point events saying whether more
    follows.  When the length is known (``Content-Length``) that is recorded at once;
    otherwise the event waits for the next chunk or the end of the body to learn it.
    """

    __slots__ = (
        "_code",
        "_ended",
        "_expected",
        "_items",
        "_limit",
        "_pending",
        "chunks",
        "count",
        "first_ts",
        "kept",
        "last_ts",
        "size",
    )

    _items: list[Any]
    _code: int
    _limit: int
    _expected: int | None
    _pending: tuple[int, int] | None
    _ended: bool
    #: The kept chunks: None, the first one, then a list of them (most bodies are one
    #: chunk: no list to make, nor for the garbage collector to walk till the drain).
    chunks: bytes | list[bytes] | None
    count: int
    size: int
    kept: int
    first_ts: int
    last_ts: int

    # Made by _flow() or _response_flow(), not by an ``__init__`` (see _Exchange).

    def add(self, chunk: bytes | bytearray | memoryview, ts: int) -> None:
        size = len(chunk)
        count = self.count = self.count + 1
        total = self.size = self.size + size
        if count == 1:
            self.first_ts = ts
        self.last_ts = ts
        kept = self.kept
        room = self._limit - kept
        if room > 0:
            if size > room:
                chunk = chunk[:room]
            if type(chunk) is not bytes:
                chunk = _as_bytes(chunk)
            chunks = self.chunks
            if chunks is None:
                self.chunks = chunk
            elif type(chunks) is list:
                chunks.append(chunk)
            else:
                self.chunks = [chunks, chunk]  # type: ignore[list-item]  # bytes here
            self.kept = kept + len(chunk)
        if count <= EVENT_CHUNKS:
            expected = self._expected
            if expected is not None:
                self._items.append((self._code, ts, size, total < expected))
            else:
                self._settle(True)
                self._pending = (ts, size)
        elif count == EVENT_CHUNKS + 1:
            self._settle(True)

    def eof(self) -> None:
        """The body ended: nothing more follows the last chunk."""
        if not self._ended:
            self._ended = True
            if self._pending is not None:
                self._settle(False)

    def _settle(self, more: bool | None) -> None:
        pending = self._pending
        if pending is not None:
            self._pending = None
            self._items.append((self._code, pending[0], pending[1], more))

    def finish(self) -> tuple[int, bytes | list[bytes] | None, bool]:
        """(size, kept chunks, truncated), for the span's end."""
        if self._pending is not None:
            self._settle(None)  # the body stopped before its end was seen
        return self.size, self.chunks, self.size > self.kept


def _flow(items: list[Any], code: int, limit: int, expected: int | None) -> _Flow:
    flow = _Flow()
    # The recording's items, not the recording: no reference cycle to outlive the
    # request until the garbage collector finds it.
    flow._items = items
    flow._code = code
    flow._limit = limit
    flow._expected = expected
    flow._pending = None
    flow._ended = False
    flow.chunks = None
    flow.count = 0
    flow.size = 0
    flow.kept = 0
    # first_ts and last_ts are set by the first chunk, before anything reads them.
    return flow


def _content_length(headers: tuple[tuple[str, str], ...] | None) -> int | None:
    """The response's Content-Length, None when it has none (or not a number)."""
    for name, value in headers or ():
        if len(name) == 14 and name.lower() == "content-length":
            try:  # records.port(value), inlined
                return int(value)
            except (TypeError, ValueError):
                return None
    return None


def _first_chunk(exchange: _Exchange, chunk: Any, ts: int) -> _Flow | None:
    """Count the response's first chunk.  The common one (bytes within the limit, of a
    response with a Content-Length: its event is known at once) makes no flow: its event
    is appended and the chunk kept as it is (``body``), and the end's body fields are
    derived from it at the drain (:meth:`_Exchange.end_fields`).  Else the flow."""
    expected = None
    # _content_length, inlined: the call cost 515 instructions a request (callgrind,
    # bench/hotpath.py --only wsgi, Flask: 56,703 added inline, 57,218 with the call).
    for name, value in exchange.response_headers or ():
        if len(name) == 14 and name.lower() == "content-length":
            try:
                expected = int(value)
            except (TypeError, ValueError):
                pass
            break
    size = len(chunk)
    if expected is not None and type(chunk) is bytes and size <= exchange.limit:
        exchange.items.append((RESPONSE_BODY, ts, size, size < expected))
        exchange.body_ts = ts
        exchange.body = chunk
        return None
    flow = exchange.response = _response_flow(exchange, chunk, ts, expected)
    return flow


def _materialize(exchange: _Exchange) -> _Flow:
    """The flow a first chunk kept as it is (see _first_chunk) would have made: for the
    chunks after it.  After the end (a server that steps a closed body) it counts
    nothing the record holds: the exchange is left as it ended."""
    chunk: bytes = exchange.body  # type: ignore[assignment]  # set by _first_chunk
    flow = _Flow()
    flow._items = exchange.items
    flow._code = RESPONSE_BODY
    flow._limit = exchange.limit
    flow._expected = _content_length(exchange.response_headers)
    flow._pending = None
    flow._ended = False
    flow.chunks = chunk
    flow.count = 1
    flow.size = flow.kept = len(chunk)
    flow.first_ts = flow.last_ts = exchange.body_ts
    if exchange.end_at < 0:
        exchange.response = flow
    return flow


def _response_flow(exchange: _Exchange, chunk: bytes, ts: int, expected: int | None) -> _Flow:
    """The response's flow, made by its first chunk and counting it: what
    ``_flow(...).add(chunk, ts)`` does, in one call."""
    items = exchange.items
    flow = _Flow()
    flow._items = items
    flow._code = RESPONSE_BODY
    flow._limit = limit = exchange.limit
    flow._expected = expected
    flow._ended = False
    flow.count = 1
    flow.size = size = len(chunk)
    flow.first_ts = flow.last_ts = ts
    if limit > 0:
        if size > limit:
            chunk = chunk[:limit]
        if type(chunk) is not bytes:
            chunk = _as_bytes(chunk)
        flow.chunks = chunk
        flow.kept = len(chunk)
    else:
        flow.chunks = None
        flow.kept = 0
    if expected is not None:
        flow._pending = None
        items.append((RESPONSE_BODY, ts, size, size < expected))
    else:
        flow._pending = (ts, size)
    return flow


def _as_bytes(chunk: Any) -> bytes:
    """A chunk to keep that is not ``bytes``: a bytearray's or memoryview's bytes, or a
    ``str`` encoded as Werkzeug's test client encodes it (WSGI forbids ``str``, but that
    client takes it, and the middleware must not fail what the app's caller would not)."""
    if isinstance(chunk, str):
        return chunk.encode("utf-8", "replace")
    return bytes(chunk)


class _Input:
    """``wsgi.input`` as the app sees it: the server's stream, counted on the way.

    Arguments go through exactly as given (``read()`` and ``read(n)`` differ for some
    servers), and nothing is read ahead: the app still decides how much to read.
    """

    __slots__ = ("_content_length", "_flow", "_items", "_limit", "_stream")

    def __init__(self, stream: Any, items: list[Any], limit: int, content_length: Any) -> None:
        self._stream = stream
        self._items = items
        self._limit = limit
        self._content_length = content_length
        self._flow: _Flow | None = None

    def _track(self, data: bytes | bytearray | memoryview) -> None:
        flow = self._flow
        if flow is None:
            expected = port(self._content_length) if self._content_length else None
            flow = self._flow = _flow(self._items, REQUEST_BODY, self._limit, expected)
        if data:
            flow.add(data, _now())
        else:
            flow.eof()

    def read(self, *args: Any) -> bytes:
        data: bytes = self._stream.read(*args)
        self._track(data)
        return data

    def readline(self, *args: Any) -> bytes:
        line: bytes = self._stream.readline(*args)
        self._track(line)
        return line

    def readlines(self, *args: Any) -> list[bytes]:
        lines: list[bytes] = self._stream.readlines(*args)
        for line in lines:
            self._track(line)
        if not lines:
            self._track(b"")
        return lines

    def __iter__(self) -> Iterator[bytes]:
        for line in self._stream:
            self._track(line)
            yield line
        self._track(b"")

    def __getattr__(self, name: str) -> Any:
        # Server-specific extras (``fileno``, ``seek``...) stay reachable.
        return getattr(self._stream, name)


class _ReadintoInput(_Input):
    """For streams with ``readinto``: Werkzeug uses it when present, so keep offering it."""

    __slots__ = ()

    def readinto(self, buffer: Any) -> int | None:
        count: int | None = self._stream.readinto(buffer)
        if count:
            with memoryview(buffer) as view, view.cast("B") as octets:
                self._track(octets[:count])
        elif count == 0:
            self._track(b"")
        return count


def _shim_for(wrapper: Any) -> _FileWrapperShim | None:
    """The shim for a server's ``wsgi.file_wrapper`` whose result's ``close`` cannot be
    replaced (see :func:`_pass_file_wrapper`), and whose ``close`` is known to close the
    file it was given: mod_wsgi's (a C type) and uWSGI's (a C function that hands the
    file back, which uWSGI closes after sendfile).  Other servers keep theirs: a wrapper
    that did not close the file would leave the span open."""
    known = (isinstance(wrapper, type) and wrapper.__module__ == "mod_wsgi") or (
        isinstance(wrapper, BuiltinFunctionType) and wrapper.__name__ == "uwsgi_sendfile"
    )
    return _FileWrapperShim(wrapper) if known else None


class _FileWrapperShim:
    """``environ["wsgi.file_wrapper"]`` under mod_wsgi and uWSGI: their wrapper, given a
    :class:`_TimedFile` in place of the app's file.

    Why: those servers send a file response themselves (sendfile) after the app returned
    it, and then close it; their wrapper's ``close`` cannot be swapped for one that ends
    the span (a C object), so without this the span ended when the app returned, before
    a byte of the file was sent.  The file's ``close`` is the server's last step.  The
    server gets what the app returned, and its wrapper gets the file's descriptor and
    position through the stand-in (sendfile stays on).  One shim per server wrapper,
    made with the environ's plan: the request is found through the context variable
    the middleware sets while the app runs.
    """

    __slots__ = ("wrapped",)

    def __init__(self, wrapped: Any) -> None:
        self.wrapped = wrapped

    def install(self, environ: WSGIEnvironment) -> None:
        if environ.get("wsgi.file_wrapper") is self.wrapped:
            environ["wsgi.file_wrapper"] = self

    def __call__(self, filelike: Any, *args: Any, **kwargs: Any) -> Any:
        context = current.get()
        exchange = context[0] if context is not None else None
        if type(exchange) is not _Exchange or exchange.end_at >= 0:
            return self.wrapped(filelike, *args, **kwargs)
        file = _TimedFile(filelike, exchange)
        wrapper = self.wrapped(file, *args, **kwargs)
        exchange.timed_file = (wrapper, file)
        return wrapper

    # ``isinstance(x, environ["wsgi.file_wrapper"])`` (looked up on this class) answers
    # as it would against the server's own, as an app or middleware may ask.
    def __instancecheck__(self, instance: Any) -> bool:
        return isinstance(instance, self.wrapped)

    def __subclasscheck__(self, subclass: type) -> bool:
        return issubclass(subclass, self.wrapped)

    def __repr__(self) -> str:
        return f"<hopscope file wrapper over {self.wrapped!r}>"


class _TimedFile:
    """The app's file, as :class:`_FileWrapperShim` hands it to the server's wrapper:
    everything is the file's (its descriptor, position, reads), but ``close``, which
    also ends the request's span when the server sent the file the app returned."""

    __slots__ = ("after", "exchange", "file")

    def __init__(self, file: Any, exchange: _Exchange) -> None:
        self.file = file
        self.exchange: _Exchange | None = exchange
        #: Called once the file is closed (see :func:`after_file_sent`).
        self.after: Callable[[], object] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.file)

    def close(self) -> None:
        exchange, self.exchange = self.exchange, None
        after, self.after = self.after, None
        try:
            if (
                exchange is None
                or exchange.end_at >= 0
                or getattr(exchange, "timed_file", None) is not self
            ):
                # Closed before the app returned, or not the file of what the app
                # returned (that ends the span itself): the file's close only.
                close = getattr(self.file, "close", None)
                if close is not None:
                    close()
                return
            exchange.original_close = getattr(self.file, "close", None)
            exchange.close_file_wrapper()
        finally:
            if after is not None:
                after()


def is_server_file(result: Any, environ: WSGIEnvironment) -> bool:
    """Whether ``result`` is what the environ's ``wsgi.file_wrapper`` made (the server
    sends it itself: it goes back unwrapped).  The middleware's own test inlines the
    first case; a server hop outside the middleware calls this."""
    file_wrapper = environ.get("wsgi.file_wrapper")
    if isinstance(file_wrapper, type):
        return isinstance(result, file_wrapper)
    return file_wrapper is not None and _is_file(result, file_wrapper)


def after_file_sent(result: Any, callback: Callable[[], object]) -> bool:
    """Have ``callback`` called when the server closes the file ``result`` (mod_wsgi's
    file wrapper over it, or uWSGI's file itself) once it sent it; False when ``result``
    holds no file the middleware times (the caller ends its span now, as before)."""
    file = result if type(result) is _TimedFile else getattr(result, "filelike", None)
    if type(file) is not _TimedFile or file.exchange is None or file.after is not None:
        return False
    file.after = callback
    return True


class _Exchange(Recording):
    """Everything one request records, made per call (see :class:`sinks.Recording`)."""

    interface = "wsgi"

    __slots__ = (
        "_server_start_response",
        "_server_write",
        "body",
        "body_ts",
        "disconnect",
        "environ",
        "error",
        "exhausted",
        "file_wrapper",
        "header_keys",
        "input",
        "limit",
        "logged_event",
        "original_close",
        "response",
        "response_headers",
        "route",
        "status",
        "timed_file",
    )

    _server_start_response: StartResponse
    _server_write: Callable[[bytes], object]
    #: The response's first chunk, kept as it is when it made no flow (see _first_chunk),
    #: and its time.
    body: bytes | None
    body_ts: int
    disconnect: bool
    environ: WSGIEnvironment
    error: str | None
    exhausted: bool
    file_wrapper: bool
    #: (the server's file wrapper, the file it wraps) once the app called the environ's
    #: :class:`_FileWrapperShim`; that file, once the app returned that wrapper (its
    #: close ends the span); unset for nearly every request (read with getattr).
    timed_file: tuple[Any, _TimedFile] | _TimedFile | None
    #: The environ keys of the header values that follow the fields in ``request``.
    header_keys: tuple[str, ...]
    input: _Input | None
    limit: int
    #: What :attr:`logged` keeps of the first exception the app logged at ERROR while it
    #: answered: its type's name and its event, not the exception (see logged).
    logged_event: tuple[str, Any] | None
    original_close: Callable[[], object] | None
    response: _Flow | None
    response_headers: tuple[tuple[str, str], ...] | None
    route: str | None
    status: int | None

    # No ``__init__``: WSGIMiddleware.__call__ fills the slots in itself (a Python
    # ``__init__`` behind a type call costs a request more than all its stores).

    @property
    def logged(self) -> object | None:
        """Set by :mod:`~hopscope.tracing.logs` to the first exception the app logged at
        ERROR while it answered.  Its event is made now, and the exception not kept: its
        traceback holds the app's frames, which bare are freed once the app answered, and
        a response nobody closes (Werkzeug's test ``Client`` closes one only when the
        test does) never ends its recording, which the sink keeps."""
        return self.logged_event

    @logged.setter
    def logged(self, exc: Exception) -> None:
        if self.logged_event is None:
            self.logged_event = (
                type(exc).__qualname__,
                exception_event(self.trace_id, self.span_id, exc, phase="before_response"),
            )

    def context(self) -> SpanContext:
        """The request's context.  Made when needed, not kept: the exchange is its sink,
        and a reference back would be a cycle only the garbage collector can free."""
        return _context(SpanContext, (self, self.trace_id, self.span_id))

    def request_fields(self) -> Any:
        """``request`` keeps the fields and the header values in one tuple (one getter
        call on the request's thread): the ``"r"`` layout's three parts, split here."""
        picked = self.request
        return picked[:_FIELDS], self.header_keys, picked[_FIELDS:]

    def take(self, out: list[Any]) -> bool:
        # Recording.take's common case (a request over before its first take: nearly
        # every one) with _whole and request_fields inline: two Python calls less per
        # request in the drain (end_fields stays one: the end's layout is written once).
        if self._state < 0 and self.done:
            items = self.items
            size = len(items) - 1
            end_at = self.end_at
            if 0 <= end_at <= size and items[size] is None:
                picked = self.request
                request = picked[:_FIELDS], self.header_keys, picked[_FIELDS:]
                record = (
                    "r", self.start, self.trace_id, self.span_id, self.parent_id,
                    self.thread_id, "wsgi", request, end_at, self.end_fields(), items,
                )  # fmt: skip
                out.append(record)
                self._state = 1
                return True
        return Recording.take(self, out)

    # -- the callables the app gets ---------------------------------------------
    def start_response(
        self,
        status: str,
        headers: list[tuple[str, str]],
        exc_info: OptExcInfo | None = None,
    ) -> Callable[[bytes], object]:
        ts = _now()
        # The server decides what a second call means (PEP 3333: re-raise once the
        # headers are sent), so it is called first and exactly as the app called us.
        if exc_info is None:
            write = self._server_start_response(status, headers)
        else:
            write = self._server_start_response(status, headers, exc_info)
            self.error_page(exc_info)
        self._server_write = write
        try:
            code = _CODES[status]
        except (KeyError, TypeError):
            code = _status_code(status)
        self.status = code
        # A tuple: of pairs of str, it is the garbage collector's to forget at once.
        self.response_headers = kept = tuple(headers)
        if self.route is None:
            # Flask drops its request from the environ when the call returns; while it
            # answers, the matched rule is still there.  (_route, inlined.)
            request = self.environ.get("werkzeug.request")
            if request is not None:
                rule = getattr(getattr(request, "url_rule", None), "rule", None)
                if isinstance(rule, str):
                    self.route = rule
        self.items.append((RESPONSE_START, ts, code, kept))
        return self.write

    def write(self, data: bytes) -> object:
        """The PEP 3333 ``write`` callable, counted like iterated chunks."""
        server_write = self._server_write
        if server_write is None:  # pragma: no cover - the app broke the protocol
            raise AssertionError("write() called before start_response()")
        result = server_write(data)
        if data:
            self.response_chunk(data)
        return result

    # -- bookkeeping ------------------------------------------------------------
    def response_chunk(self, chunk: bytes) -> None:
        flow = self.response
        if flow is not None:
            flow.add(chunk, _now())
        elif self.body is None:
            _first_chunk(self, chunk, _now())
        else:
            _materialize(self).add(chunk, _now())

    def phase(self) -> str:
        """Where an exception struck, in the terms of :func:`exception_event`."""
        if self.status is None:
            return "before_response"
        return "after_response" if self.exhausted else "after_response_start"

    def failed(self, exc: BaseException) -> None:
        self.items.append(exception_event(self.trace_id, self.span_id, exc, phase=self.phase()))
        if self.error is None and self.end_at < 0:  # the end may be derived at the drain
            self.error = type(exc).__qualname__

    def error_page(self, exc_info: Any) -> None:
        """The app answers with an error page for an exception it caught: PEP 3333's
        ``exc_info`` says which (Bottle's 500 page).  The app swallows it, and may only
        have written it to ``wsgi.errors``, so it is recorded here, as if raised."""
        exc = exc_info[1] if isinstance(exc_info, tuple) and len(exc_info) == 3 else None
        if isinstance(exc, Exception):
            self.items.append(
                exception_event(self.trace_id, self.span_id, exc, phase="before_response")
            )
            if self.error is None:
                self.error = type(exc).__qualname__

    def disconnected(self) -> None:
        """The server closed the body before the app finished it: the client left."""
        self.disconnect = True
        phase = "before_response" if self.status is None else "during_response"
        self.items.append(
            ("p", _now(), self.trace_id, self.span_id, "disconnect", {"phase": phase})
        )

    def close_file_wrapper(self) -> None:
        """Stands in for a file wrapper's ``close``: the server calls it when done."""
        if self.end_at >= 0:
            return
        token = current.set(self.context())
        try:
            close = self.original_close
            if close is not None:
                close()
        except BaseException as exc:
            self.failed(exc)
            raise
        finally:
            current.reset(token)
            self.finish()

    def finish(self) -> None:
        if self.end_at >= 0:
            return
        ts = _now()
        if self.logged_event is not None:
            self._logged_error()
        route = self.route
        if route is None:
            route = self.route = _route(self.environ)
        stream = self.input
        if stream is None and self.response is None and not self.file_wrapper:
            # The common end (no request body, no response flow): its time only; the
            # end's fields are derived at the drain (end_fields), from what the
            # exchange holds, which nothing changes once end_at is set (a body stepped
            # after its close keeps no first chunk: no room left).
            self.end = ts
            self.limit = 0
        else:
            self._end(ts, route, stream)
        items = self.items
        self.end_at = len(items)  # publishes the end: written last
        eager = type(items) is not list
        if eager:
            self.push()
        # Let the request's (and the server's) objects go now: the exchange waits for
        # the next drain, and whatever it holds is walked by the garbage collector.
        self.environ = _NO_ENVIRON
        self._server_start_response = self._server_write = _ended
        # Recording.seal, inlined (one call less per request).
        self.done = True
        items.append(None)
        if eager:
            items._recording = None  # type: ignore[attr-defined]  # see Recording.seal

    def end_fields(self) -> Any:
        """The ``end`` tuple (:data:`~hopscope.tracing.records.WSGI_END`): made here, at
        the drain, for the common end (see finish), which kept its time only."""
        end = self.end
        if type(end) is not int:
            return end
        body = self.body
        return (
            end, self.status, self.response_headers, self.route, 0, None, False,
            0 if body is None else len(body), body, False, False, self.disconnect, self.error,
        )  # fmt: skip

    def _end(self, ts: int, route: str | None, stream: _Input | None) -> None:
        """The ``end`` tuple made now: a request body, a response flow or a file wrapper
        (their flows are let go once the end holds what they counted)."""
        flow = None if stream is None else stream._flow
        if flow is None:
            request_size, request_body, request_cut = 0, None, False
        else:
            request_size, request_body, request_cut = flow.finish()
            if flow.count > EVENT_CHUNKS:
                self._summary(ts, "request.body.summary", flow)
        file_wrapper = self.file_wrapper
        flow = self.response
        body: bytes | list[bytes] | None
        if flow is None or file_wrapper:
            body = None if file_wrapper else self.body  # a first chunk without a flow
            size, cut = 0 if body is None else len(body), False
        else:
            # flow.finish(), inlined: a response body is nearly every request's.
            if flow._pending is not None:
                flow._settle(None)  # the body stopped before its end was seen
            size = flow.size
            body = flow.chunks
            cut = size > flow.kept
            if flow.count > EVENT_CHUNKS:
                self._summary(ts, "response.body.summary", flow)
        self.end = (
            ts, self.status, self.response_headers, route, request_size, request_body,
            request_cut, size, body, cut, file_wrapper, self.disconnect, self.error,
        )  # fmt: skip
        self.input = self.response = None  # the end holds what they counted

    def _logged_error(self) -> None:
        """A 5xx the app answered after it logged an exception it caught (Flask's and
        Django's 500 for a view that raised): that exception is the request's error,
        recorded as if raised (its event, made when it was logged: see logged)."""
        logged, self.logged_event = self.logged_event, None
        status = self.status
        if self.error is None and type(status) is int and status >= 500 and logged is not None:
            name, event = logged
            self.items.append(("p", _now(), *event[2:]))  # (at this time, as error_page)
            self.error = name

    def _summary(self, ts: int, name: str, flow: _Flow) -> None:
        attrs = {
            "count": flow.count,
            "bytes": flow.size,
            "first_ts": flow.first_ts,
            "last_ts": flow.last_ts,
        }
        self.items.append(("p", ts, self.trace_id, self.span_id, name, attrs))


def _route(environ: WSGIEnvironment) -> str | None:
    """The URL rule Flask (Werkzeug) matched, if it left its request in the environ, or
    Bottle's route (it leaves the route it matched there, once the app ran)."""
    request = environ.get("werkzeug.request")
    if request is None:
        rule = getattr(environ.get("bottle.route"), "rule", None)
        return rule if isinstance(rule, str) else None
    rule = getattr(getattr(request, "url_rule", None), "rule", None)
    return rule if isinstance(rule, str) else None


class _Body:
    """The app's response iterable, passed on one chunk at a time.

    ``iter()`` of it is a generator (:func:`_pass_chunks`): a generator's end costs no
    ``StopIteration`` object, a ``__next__`` method's does.  The class around it is what
    the server closes: ``close()`` must reach the app's iterable even if iteration never
    started, and a bare generator's ``close()`` would then skip our code.
    """

    __slots__ = ("_chunks", "_closed", "_context", "_exchange", "_result")

    _chunks: Iterator[bytes] | None
    _closed: bool
    _context: SpanContext
    _exchange: _Exchange
    _result: Iterable[bytes]

    def __iter__(self) -> Iterator[bytes]:
        chunks = self._chunks
        if chunks is None:
            result = self._result
            # Stepping through a list runs no app code: no context to set for it.
            context = None if type(result) in _PLAIN else self._context
            chunks = self._chunks = _pass_chunks(result, self._exchange, context)
        elif type(self) is _SizedBody:
            # A sized result may be gone through twice: gevent's server adds up its
            # length when it writes the first chunk, in the middle of sending it.  The
            # pass that began first counts it; any other gets the app's own result, as
            # the server would without hopscope.
            return iter(self._result)
        return chunks

    def __next__(self) -> bytes:
        # For callers that step the result without iter() first.
        return next(self.__iter__())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        exchange = self._exchange
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                token = current.set(self._context)
                try:
                    close()
                finally:
                    current.reset(token)
        except BaseException as exc:
            exchange.failed(exc)
            raise
        finally:
            if not exchange.exhausted and exchange.error is None:
                exchange.disconnected()
            exchange.finish()

    def __del__(self) -> None:
        # Dropped without close(): Werkzeug's test Client (Flask's too) closes a response
        # only when the test does, and a test that never does left its request running
        # for ever.  It ends here, where the client let it go (a body not read to its end
        # as a client that left).  The app's own close is not called: bare, it is not.
        try:
            if self._closed:
                return
            self._closed = True
            exchange = self._exchange
            if exchange.end_at < 0:
                if not exchange.exhausted and exchange.error is None:
                    exchange.disconnected()
                exchange.finish()
        except Exception:  # never filled in, or the interpreter is exiting: nothing to say
            pass


def _pass_chunks(
    result: Iterable[bytes], exchange: _Exchange, context: SpanContext | None
) -> Iterator[bytes]:
    """The app's chunks, each counted; the app's code runs under the request's context
    (``context`` is None for a list or tuple: stepping through it runs no app code).

    Nothing is in a ``try`` at the ``yield``: a server that closes the result before
    its end leaves this generator suspended, and its ``GeneratorExit`` runs nothing.
    """
    iterator: Iterator[bytes] | None = None
    flow = exchange.response
    while True:
        token = None if context is None else current.set(context)
        try:
            if iterator is None:
                iterator = iter(result)
            # A sentinel rather than catching StopIteration: one exception less per body.
            chunk: Any = next(iterator, _END)
        except BaseException as exc:
            exchange.failed(exc)
            raise
        finally:
            if token is not None:
                current.reset(token)
        if chunk is _END:
            break
        if chunk:
            if flow is not None:
                flow.add(chunk, _now())
            elif (flow := exchange.response) is not None:  # write() made it
                flow.add(chunk, _now())
            elif exchange.body is None:  # the first chunk (write() made none)
                flow = _first_chunk(exchange, chunk, _now())
            else:  # the second, after a first that made no flow
                flow = _materialize(exchange)
                flow.add(chunk, _now())
        yield chunk
    if not exchange.exhausted:
        exchange.exhausted = True
        flow = exchange.response
        if flow is not None and flow._pending is not None:
            flow.eof()  # the last chunk's event waited to learn whether more follows


_PLAIN = (list, tuple)
_END = object()


def _ended(*args: Any) -> Any:
    raise AssertionError("start_response() or write() called after the response ended")


_NO_ENVIRON: WSGIEnvironment = {}


class _SizedBody(_Body):
    """For sized results (lists): servers may use ``len()`` to set Content-Length."""

    __slots__ = ()

    def __len__(self) -> int:
        return len(self._result)  # type: ignore[arg-type]


class WSGIMiddleware:
    """Record every request to a WSGI app as an ``app`` span.

    ``sink`` defaults to :func:`hopscope.tracing.sinks.default_sink`, looked up at the
    first request so a forking server creates it in each worker.  ``body_limit`` is how
    many bytes of each body are kept (all are counted).
    """

    __hopscope_wrapped__ = True

    def __init__(
        self,
        app: WSGIApplication,
        sink: Sink | None = None,
        body_limit: int = BODY_LIMIT,
        capture_logs: bool = True,
    ) -> None:
        self.app = app
        self.body_limit = body_limit
        self.sink = sink
        self._disabled = False
        if capture_logs:
            install_log_capture()
        # A worker forked in C (uWSGI) ran no at-fork hooks: see forking.
        watch_forks()

    def _default_sink(self) -> Sink | None:
        from .sinks import default_sink

        try:
            sink = default_sink()
        except ValueError as exc:
            # Tracing must never take the app down: say so once and get out of the way.
            print(f"hopscope: tracing disabled: {exc}", file=sys.stderr)
            self._disabled = True
            return None
        self.sink = sink
        return sink

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        sink = self.sink
        if sink is None:
            if self._disabled or (sink := self._default_sink()) is None:
                return self.app(environ, start_response)
        exchange = _Exchange()
        exchange.start = _now()
        exchange.sink = sink
        # Inside another traced request of this process (a WSGI app mounted in a traced
        # app), nest under it; else continue the caller's trace, or start one.
        # A server hook on this thread (gunicorn's pre_request) may have opened the
        # server span this app span belongs under.
        outer = current.get()
        if outer is not None:
            exchange.trace_id = outer.trace_id
            exchange.parent_id = outer.span_id
        else:
            server = server_parent.get()
            if server is not None:
                exchange.trace_id, exchange.parent_id = server
            else:
                traceparent = environ.get("HTTP_TRACEPARENT")
                parent = parse_traceparent(traceparent) if traceparent else None
                if parent is None:
                    exchange.trace_id = _getrandbits(128) or 1  # records.new_trace_id
                    exchange.parent_id = 0
                else:
                    exchange.trace_id, exchange.parent_id = parent
        exchange.span_id = span_id = _getrandbits(64) or 1  # records.new_span_id
        # Looked up per request, not bound at import: gevent patches it (a greenlet's id)
        # after hopscope may have been imported (gunicorn -k gevent, the bootstrap).
        exchange.thread_id = threading.get_ident()
        # The request's fields and header keys and values, picked out now: what the app
        # does to the environ later does not show, and no copy of it is kept (a header
        # plan makes the headers one lookup for a kind of environ the server already
        # sent).  A copy, picked out at the drain, costs the request's thread less but
        # the process more (the copy made, walked by the garbage collector, freed):
        # callgrind, Flask hello world, 1000 requests a drain: -4.9k instructions a
        # request on its thread, +4.2k with the drain's take counted.
        keys = tuple(environ)
        plan = _HEADER_PLANS.get(keys)
        if plan is None:
            plan = _header_plan(keys, environ)
        exchange.header_keys = plan[0]
        fields = exchange.request = plan[1](environ)
        exchange.items = []
        exchange.environ = environ
        exchange._server_start_response = start_response
        exchange.limit = limit = self.body_limit
        # The fields' first values, unpacked from one constant: a load and a store each.
        (
            exchange.end_at, exchange.done, exchange._state, exchange.input,
            exchange.response, exchange.status, exchange.response_headers, exchange.error,
            exchange.route, exchange.exhausted, exchange.disconnect, exchange.file_wrapper,
            exchange.logged_event, exchange.body,
        ) = (
            -1, False, -1, None, None, None, None, None, None, False, False, False, None, None
        )  # fmt: skip

        # The exchange is the context's sink either way (eager items emit at once for a
        # sink without a drain): a log then tells the exchange, whatever the sink.
        if not sink.start_live(exchange):
            exchange.go_eager()
        context = _context(SpanContext, (exchange, exchange.trace_id, span_id))
        # _has_body's common answer (a GET of HTTP/1 whose kind of environ has neither
        # Content-Length nor Transfer-Encoding: see _header_plan) without a lookup.
        if not (plan[2] and fields[_METHOD] in _BODILESS and fields[_PROTOCOL] in _HTTP1):
            stream = environ.get("wsgi.input")
            length = environ.get("CONTENT_LENGTH")
            if (
                stream is not None
                and (
                    fields[_METHOD] not in _BODILESS
                    or (length and length != "0")
                    or "HTTP_TRANSFER_ENCODING" in environ
                    or fields[_PROTOCOL] not in _HTTP1
                )
                and _has_body(environ)
            ):
                kind = _ReadintoInput if hasattr(stream, "readinto") else _Input
                exchange.input = environ["wsgi.input"] = kind(stream, exchange.items, limit, length)

        token = current.set(context)
        try:
            result = self.app(environ, exchange.start_response)
        except BaseException as exc:
            exchange.failed(exc)
            exchange.finish()
            raise
        finally:
            current.reset(token)

        body: _Body
        if type(result) is list:  # no file wrapper, and sized
            body = _SizedBody()
        else:
            file_wrapper = environ.get("wsgi.file_wrapper")
            if isinstance(file_wrapper, type):
                if isinstance(result, file_wrapper):
                    return _pass_file_wrapper(result, exchange)
            elif file_wrapper is not None and _is_file(result, file_wrapper):
                return _pass_file_wrapper(result, exchange)
            body = _SizedBody() if hasattr(result, "__len__") else _Body()
        # Filled in here, not by an ``__init__`` (see _Exchange).
        body._result = result
        body._exchange = exchange
        body._context = context
        body._chunks = None
        body._closed = False
        return body


def _is_file(result: Any, file_wrapper: Any) -> bool:
    """Whether ``result`` is what a ``file_wrapper`` that is not a class (uWSGI's, or
    the shim over mod_wsgi's or uWSGI's) made."""
    if type(file_wrapper) is _FileWrapperShim:
        file_wrapper = file_wrapper.wrapped
        if isinstance(file_wrapper, type):
            return isinstance(result, file_wrapper)
    # uWSGI's file_wrapper is a function that hands the file back as it came, and uWSGI
    # sends it with sendfile when the app returns that very object: wrapped, it would
    # be iterated line by line.  Whatever file such a server gets back is its to send
    # (or iterate) as it would bare.
    return hasattr(result, "read")


def _pass_file_wrapper(result: Any, exchange: _Exchange) -> Iterable[bytes]:
    """Hand a file wrapper back unwrapped (servers test its type to use sendfile).

    What :class:`_FileWrapperShim` made over a :class:`_TimedFile` is left as it is: the
    file's ``close`` ends the span.  Any other has its ``close`` swapped for one that also
    ends the span; when the object does not allow that, the span ends now, without the
    time spent sending the file.
    """
    exchange.file_wrapper = True
    timed = getattr(exchange, "timed_file", None)
    if type(timed) is tuple:
        wrapper, file = timed
        exchange.timed_file = None  # (the wrapper holds the file, the file the exchange)
        if wrapper is result and file.exchange is exchange:
            # The server closes the file once it sent it: the span ends then.
            exchange.timed_file = file
            return result  # type: ignore[no-any-return]
    exchange.original_close = getattr(result, "close", None)
    try:
        result.close = exchange.close_file_wrapper
    except (AttributeError, TypeError):
        exchange.finish()
    return result  # type: ignore[no-any-return]
