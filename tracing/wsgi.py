"""The WSGI middleware: one app span per request, without changing a byte of it.

Everything a request needs lives in objects made per call (an :class:`_Exchange`, a
:class:`_Body` iterator, an :class:`_Input` proxy), so one middleware instance serves
any number of threads.  The hot path takes timestamps and keeps references; records
are turned into text off the request's thread (see :mod:`hopscope.tracing.records`).

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
from typing import TYPE_CHECKING, Any

from .context import SpanContext, current, server_parent
from .exceptions import exception_event
from .logs import install_log_capture
from .records import BODY_LIMIT, new_span_id, new_trace_id
from .traceparent import parse_traceparent

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from .sinks import Sink

__all__ = ["WSGIMiddleware"]

#: Body chunks that get their own point event; later ones only count towards a summary.
EVENT_CHUNKS = 4

_now = time.time_ns
_get_ident = threading.get_ident


class _HeaderNames(dict[str, "str | None"]):
    """environ key -> header name (None for keys that are not headers), computed once.

    Bounded, because header names come from clients.
    """

    def __missing__(self, key: str) -> str | None:
        name = key[5:].replace("_", "-").lower() if key.startswith("HTTP_") else None
        if len(self) < 4096:
            self[key] = name
        return name


_HEADER_NAMES = _HeaderNames(CONTENT_TYPE="content-type", CONTENT_LENGTH="content-length")
_PROTOCOLS = {"HTTP/1.1": "1.1", "HTTP/1.0": "1.0", "HTTP/2": "2", "HTTP/2.0": "2"}


def _port(value: Any) -> int | None:
    if type(value) is int:
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


_SERVER_PORTS: dict[Any, int | None] = {}


def _server_port(value: Any) -> int | None:
    # A server has few ports; clients have many, so only this one is remembered.
    try:
        return _SERVER_PORTS[value]
    except KeyError:
        port = _port(value)
        if len(_SERVER_PORTS) < 64:
            _SERVER_PORTS[value] = port
        return port
    except TypeError:
        return None


def _text(wsgi_string: str) -> str:
    # PEP 3333 "native strings" carry bytes as latin-1, and URLs are really UTF-8.  Some
    # callers (httpx's WSGITransport) pass decoded text instead: keep what is not
    # latin-1-encoded UTF-8 as it is.
    try:
        return wsgi_string.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return wsgi_string


def _content_length(headers: Iterable[tuple[str, str]] | None) -> int | None:
    for name, value in headers or ():
        if len(name) == 14 and name.lower() == "content-length":
            return _port(value)
    return None


class _Flow:
    """One direction's body: counts every chunk, keeps the first ``limit`` bytes.

    The first :data:`EVENT_CHUNKS` chunks become point events saying whether more
    follows.  When the length is known (``Content-Length``) that is emitted at once;
    otherwise the event waits for the next chunk or the end of the body to learn it.
    """

    __slots__ = (
        "_context",
        "_ended",
        "_expected",
        "_limit",
        "_name",
        "_pending",
        "chunks",
        "count",
        "first_ts",
        "kept",
        "last_ts",
        "size",
    )

    def __init__(self, context: SpanContext, name: str, limit: int, expected: int | None) -> None:
        self._context = context
        self._name = name
        self._limit = limit
        self._expected = expected
        self._pending: tuple[int, int] | None = None
        self._ended = False
        self.chunks: list[bytes] = []
        self.count = 0
        self.size = 0
        self.kept = 0
        self.first_ts = 0
        self.last_ts = 0

    def add(self, chunk: bytes | bytearray | memoryview, ts: int) -> None:
        size = len(chunk)
        self.count = count = self.count + 1
        self.size += size
        if count == 1:
            self.first_ts = ts
        self.last_ts = ts
        room = self._limit - self.kept
        if room > 0:
            piece = chunk if size <= room else chunk[:room]
            if type(piece) is not bytes:
                piece = bytes(piece)
            self.chunks.append(piece)
            self.kept += len(piece)
        if count <= EVENT_CHUNKS:
            expected = self._expected
            if expected is not None:
                self._emit(ts, size, self.size < expected)
            else:
                self._settle(True)
                self._pending = (ts, size)
        elif count == EVENT_CHUNKS + 1:
            self._settle(True)

    def eof(self) -> None:
        """The body ended: nothing more follows the last chunk."""
        if not self._ended:
            self._ended = True
            self._settle(False)

    def _settle(self, more: bool | None) -> None:
        pending = self._pending
        if pending is not None:
            self._pending = None
            self._emit(pending[0], pending[1], more)

    def _emit(self, ts: int, size: int, more: bool | None) -> None:
        context = self._context
        context.sink.emit(
            ("p", ts, context.trace_id, context.span_id, self._name, {"size": size, "more": more})
        )

    def finish(self, attrs: dict[str, Any], prefix: str) -> None:
        """Add the end-of-span attributes, and the summary event for long bodies."""
        self._settle(None)  # the body stopped before its end was seen
        attrs[prefix + ".size"] = self.size
        attrs[prefix] = self.chunks or None
        attrs[prefix + ".truncated"] = self.size > self.kept
        if self.count > EVENT_CHUNKS:
            context = self._context
            context.sink.emit(
                (
                    "p",
                    _now(),
                    context.trace_id,
                    context.span_id,
                    self._name + ".summary",
                    {
                        "count": self.count,
                        "bytes": self.size,
                        "first_ts": self.first_ts,
                        "last_ts": self.last_ts,
                    },
                )
            )


class _Input:
    """``wsgi.input`` as the app sees it: the server's stream, counted on the way.

    Arguments go through exactly as given (``read()`` and ``read(n)`` differ for some
    servers), and nothing is read ahead: the app still decides how much to read.
    """

    __slots__ = ("_content_length", "_context", "_flow", "_limit", "_stream")

    def __init__(self, stream: Any, context: SpanContext, limit: int, content_length: Any) -> None:
        self._stream = stream
        self._context = context
        self._limit = limit
        self._content_length = content_length
        self._flow: _Flow | None = None

    def _track(self, data: bytes | bytearray | memoryview) -> None:
        flow = self._flow
        if flow is None:
            expected = _port(self._content_length) if self._content_length else None
            flow = self._flow = _Flow(self._context, "request.body", self._limit, expected)
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

    def finish(self, attrs: dict[str, Any]) -> None:
        flow = self._flow
        if flow is None:
            attrs["http.request.body.size"] = 0
            attrs["http.request.body.truncated"] = False
        else:
            flow.finish(attrs, "http.request.body")


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


class _Exchange:
    """Everything one request records, made per call."""

    __slots__ = (
        "_server_start_response",
        "_server_write",
        "context",
        "disconnect",
        "environ",
        "error",
        "exhausted",
        "file_wrapper",
        "finished",
        "input",
        "limit",
        "original_close",
        "response",
        "response_headers",
        "route",
        "status",
    )

    def __init__(
        self,
        context: SpanContext,
        environ: WSGIEnvironment,
        start_response: StartResponse,
        limit: int,
    ) -> None:
        self.context = context
        self.environ = environ
        self._server_start_response = start_response
        self._server_write: Callable[[bytes], object] | None = None
        self.limit = limit
        self.input: _Input | None = None
        self.response: _Flow | None = None
        self.status: int | None = None
        self.response_headers: list[tuple[str, str]] | None = None
        self.error: str | None = None
        self.route: str | None = None
        self.exhausted = False
        self.disconnect = False
        self.file_wrapper = False
        self.finished = False
        self.original_close: Callable[[], object] | None = None

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
        self._server_write = write
        try:
            code: int | None = int(status[:3])
        except (TypeError, ValueError):
            code = None
        self.status = code
        self.response_headers = kept = list(headers)
        if self.route is None:
            # Flask drops its request from the environ when the call returns; while it
            # answers, the matched rule is still there.
            self.route = _route(self.environ)
        context = self.context
        context.sink.emit(
            (
                "p",
                ts,
                context.trace_id,
                context.span_id,
                "response.start",
                {"status": code, "headers": kept},
            )
        )
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
        if flow is None:
            flow = self.response = _Flow(
                self.context,
                "response.body",
                self.limit,
                _content_length(self.response_headers),
            )
        flow.add(chunk, _now())

    def phase(self) -> str:
        """Where an exception struck, in the terms of :func:`exception_event`."""
        if self.status is None:
            return "before_response"
        return "after_response" if self.exhausted else "after_response_start"

    def failed(self, exc: BaseException) -> None:
        context = self.context
        context.sink.emit(
            exception_event(context.trace_id, context.span_id, exc, phase=self.phase())
        )
        if self.error is None:
            self.error = type(exc).__qualname__

    def disconnected(self) -> None:
        """The server closed the body before the app finished it: the client left."""
        self.disconnect = True
        context = self.context
        context.sink.emit(
            (
                "p",
                _now(),
                context.trace_id,
                context.span_id,
                "disconnect",
                {"phase": "before_response" if self.status is None else "during_response"},
            )
        )

    def close_file_wrapper(self) -> None:
        """Stands in for a file wrapper's ``close``: the server calls it when done."""
        if self.finished:
            return
        token = current.set(self.context)
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
        if self.finished:
            return
        self.finished = True
        ts = _now()
        attrs: dict[str, Any] = {
            "http.response.status_code": self.status,
            "http.response.headers": self.response_headers,
        }
        route = self.route
        if route is None:
            route = _route(self.environ)
        if route is not None:
            attrs["http.route"] = route
        stream = self.input
        if stream is not None:
            stream.finish(attrs)
        if self.file_wrapper:
            attrs["wsgi.file_wrapper"] = True
        else:
            flow = self.response
            if flow is None:
                attrs["http.response.body.size"] = 0
                attrs["http.response.body.truncated"] = False
            else:
                flow.finish(attrs, "http.response.body")
        if self.disconnect:
            attrs["disconnected"] = True
        if self.error is not None:
            attrs["error"] = True
            attrs["exception.type"] = self.error
        context = self.context
        context.sink.emit(("e", ts, context.trace_id, context.span_id, attrs))
        self.environ = {}  # let the request's objects go once the span is over


def _route(environ: WSGIEnvironment) -> str | None:
    """The URL rule Flask (Werkzeug) matched, if it left its request in the environ."""
    request = environ.get("werkzeug.request")
    if request is None:
        return None
    rule = getattr(getattr(request, "url_rule", None), "rule", None)
    return rule if isinstance(rule, str) else None


class _Body:
    """The app's response iterable, passed on one chunk at a time.

    A class rather than a generator: ``close()`` must reach the app's iterable even if
    iteration never started, and a generator's ``close()`` would then skip our code.
    """

    __slots__ = ("_closed", "_context", "_exchange", "_iterator", "_result")

    def __init__(self, result: Iterable[bytes], exchange: _Exchange) -> None:
        self._result = result
        self._exchange = exchange
        # Stepping through a list runs no app code: no context to set for it.
        self._context = None if type(result) in _PLAIN else exchange.context
        self._iterator: Iterator[bytes] | None = None
        self._closed = False

    def __iter__(self) -> _Body:
        return self

    def __next__(self) -> bytes:
        exchange = self._exchange
        context = self._context
        token = None if context is None else current.set(context)
        try:
            iterator = self._iterator
            if iterator is None:
                iterator = self._iterator = iter(self._result)
            chunk = next(iterator)
        except StopIteration:
            if not exchange.exhausted:
                exchange.exhausted = True
                if exchange.response is not None:
                    exchange.response.eof()
            raise
        except BaseException as exc:
            exchange.failed(exc)
            raise
        finally:
            if token is not None:
                current.reset(token)
        if chunk:
            exchange.response_chunk(chunk)
        return chunk

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        exchange = self._exchange
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                token = current.set(exchange.context)
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


_PLAIN = (list, tuple)


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
        start = _now()
        # Inside another traced request of this process (a WSGI app mounted in a traced
        # app), nest under it; else continue the caller's trace, or start one.
        # A server hook on this thread (gunicorn's pre_request) may have opened the
        # server span this app span belongs under.
        outer = current.get()
        server = server_parent.get()
        if outer is not None:
            trace_id, parent_id = outer.trace_id, outer.span_id
        elif server is not None:
            trace_id, parent_id = server
        else:
            traceparent = environ.get("HTTP_TRACEPARENT")
            parent = parse_traceparent(traceparent) if traceparent else None
            if parent is None:
                trace_id, parent_id = new_trace_id(), 0
            else:
                trace_id, parent_id = parent
        span_id = new_span_id()

        names = _HEADER_NAMES
        # Servers such as Werkzeug's always set CONTENT_TYPE/CONTENT_LENGTH, empty when
        # the client sent no such header: those are not headers.
        headers = [
            (name, value)
            for key, value in environ.items()
            if (name := names[key]) is not None and (value or key[0] == "H")
        ]

        method = environ.get("REQUEST_METHOD", "")
        path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        if not path.isascii():
            path = _text(path)
        protocol = environ.get("SERVER_PROTOCOL", "")
        attrs = {
            "interface": "wsgi",
            "http.request.method": method,
            "url.scheme": environ.get("wsgi.url_scheme"),
            "network.protocol.version": _PROTOCOLS.get(protocol) or protocol.removeprefix("HTTP/"),
            "url.path": path,
            "url.query": environ.get("QUERY_STRING", ""),
            "client.address": environ.get("REMOTE_ADDR"),
            "client.port": _port(environ.get("REMOTE_PORT")),
            "server.address": environ.get("SERVER_NAME"),
            "server.port": _server_port(environ.get("SERVER_PORT")),
            "http.request.headers": headers,
            "server.software": environ.get("SERVER_SOFTWARE"),
        }
        sink.emit(
            (
                "s",
                start,
                trace_id,
                span_id,
                parent_id,
                "app",
                f"{method} {path}",
                _get_ident(),
                attrs,
            )
        )

        context = SpanContext(sink, trace_id, span_id)
        exchange = _Exchange(context, environ, start_response, self.body_limit)
        stream = environ.get("wsgi.input")
        if stream is not None:
            kind = _ReadintoInput if hasattr(stream, "readinto") else _Input
            exchange.input = environ["wsgi.input"] = kind(
                stream, context, self.body_limit, environ.get("CONTENT_LENGTH")
            )

        token = current.set(context)
        try:
            result = self.app(environ, exchange.start_response)
        except BaseException as exc:
            exchange.failed(exc)
            exchange.finish()
            raise
        finally:
            current.reset(token)

        file_wrapper = environ.get("wsgi.file_wrapper")
        if isinstance(file_wrapper, type) and isinstance(result, file_wrapper):
            return _pass_file_wrapper(result, exchange)
        if hasattr(result, "__len__"):
            return _SizedBody(result, exchange)
        return _Body(result, exchange)


def _pass_file_wrapper(result: Any, exchange: _Exchange) -> Iterable[bytes]:
    """Hand a file wrapper back unwrapped (servers test its type to use sendfile).

    Its ``close`` is swapped for one that also ends the span; when the object does not
    allow that, the span ends now, without the time spent sending the file.
    """
    exchange.file_wrapper = True
    exchange.original_close = getattr(result, "close", None)
    try:
        result.close = exchange.close_file_wrapper
    except (AttributeError, TypeError):
        exchange.finish()
    return result  # type: ignore[no-any-return]
