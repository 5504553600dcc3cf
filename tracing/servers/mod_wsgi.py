"""mod_wsgi (``mod_wsgi-express``): the ``server`` hop, from the timing in the environ.

Apache runs the request before any Python does: its child process takes the request,
and in daemon mode (mod_wsgi-express's default) hands it over a socket to one of the
daemon processes that run the app.  Python first sees it when mod_wsgi-express's
``ApplicationHandler`` calls the app, but mod_wsgi puts its own stamps in the environ:

* ``mod_wsgi.request_start``: when Apache took the request (``r->request_time``);
* ``mod_wsgi.queue_start``: when Apache's child began handing it to the daemon;
* ``mod_wsgi.daemon_start``: when a daemon process took it.

mod_wsgi 6 sets them as floats of epoch seconds (``queue_start`` and ``daemon_start``
0.0 in embedded mode); mod_wsgi 4 and 5 as strings of epoch microseconds, the last two in
daemon mode only.  The server span runs from ``request_start`` to the response's end
(the server closing the body); the wait for a daemon process, from ``queue_start`` to
``daemon_start``, is a ``queue`` span inside it.  A wait in a web server in front of
Apache (``X-Request-Start``) is a ``queue`` span before it, as for the other servers.

:class:`ServerHop` stands in for the app in ``ApplicationHandler``
(:mod:`hopscope.tracing.inject`): it opens the server span, calls the app (hopscope's
middleware, whose app span joins it through
:data:`hopscope.tracing.context.server_parent`) and ends the span when the server closes
what the app returned.  What the app returns reaches mod_wsgi as it would have: its own
file wrapper unchanged (mod_wsgi tests its type to send the file itself), anything else
iterated as it is (``iter()`` hands over the app's own iterator: nothing per chunk).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..context import server_parent
from ..records import new_span_id
from ..sinks import default_sink
from ..wsgi import after_file_sent, is_server_file
from .hop import open_server_span

__all__ = ["ServerHop", "stamp"]

_now = time.time_ns

#: A stamp later than now by more than this is not taken (clocks of one host), nor one
#: older than an hour: a wrong server span is worse than one that starts at the app.
_SKEW_NS = 5_000_000
_MAX_AGE_NS = 3600 * 1_000_000_000


def stamp(value: Any, now: int) -> int | None:
    """Epoch nanoseconds from one of mod_wsgi's stamps (a float of seconds, mod_wsgi 6;
    a string of microseconds, mod_wsgi 4 and 5), None when absent, 0 or implausible."""
    if type(value) is float:
        ns = round(value * 1_000_000) * 1000  # (mod_wsgi's own resolution: microseconds)
    elif type(value) is str and value.isdigit():
        ns = int(value) * 1000
    else:
        return None
    if ns <= 0 or ns > now + _SKEW_NS or ns < now - _MAX_AGE_NS:
        return None
    return min(ns, now)


def _headers(environ: dict[str, Any]) -> list[tuple[str, Any]]:
    """The two request headers the server span reads, as pairs."""
    pairs = []
    traceparent = environ.get("HTTP_TRACEPARENT")
    if traceparent is not None:
        pairs.append(("traceparent", traceparent))
    request_start = environ.get("HTTP_X_REQUEST_START")
    if request_start is not None:
        pairs.append(("x-request-start", request_start))
    return pairs


class _Span:
    """One request's open server span: ended once, when the response is over."""

    __slots__ = ("attrs", "ended", "sink", "span_id", "trace_id")

    def __init__(self, sink: Any, trace_id: int, span_id: int) -> None:
        self.sink = sink
        self.trace_id = trace_id
        self.span_id = span_id
        self.attrs: dict[str, Any] = {}
        self.ended = False

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.sink.emit(("e", _now(), self.trace_id, self.span_id, self.attrs))


def _open(environ: dict[str, Any]) -> _Span:
    """Emit the queue spans (if any) and the server span's start for ``environ``."""
    now = _now()
    sink = default_sink()
    begin = stamp(environ.get("mod_wsgi.request_start"), now) or now
    method = environ.get("REQUEST_METHOD", "")
    path = f"{environ.get('SCRIPT_NAME', '')}{environ.get('PATH_INFO', '')}"
    opened = open_server_span(
        sink,
        _headers(environ),
        f"{method} {path}",
        begin,
        now,
        {
            "server.software": "mod_wsgi",
            "server.worker.pid": os.getpid(),
            "mod_wsgi.process_group": environ.get("mod_wsgi.process_group") or None,
            "http.request.method": method,
            "url.path": path,
            "client.address": environ.get("REMOTE_ADDR"),
        },
    )
    queued = stamp(environ.get("mod_wsgi.queue_start"), now)
    taken = stamp(environ.get("mod_wsgi.daemon_start"), now)
    if queued is not None and taken is not None and begin <= queued <= taken:
        sink.emit(
            (
                "c",
                queued,
                taken,
                opened.trace_id,
                new_span_id(),
                opened.span_id,
                "server",
                "queue",
                threading.get_ident(),
                {"span.kind": "queue", "queue.for": "mod_wsgi daemon process"},
            )
        )
    return _Span(sink, opened.trace_id, opened.span_id)


class _Body:
    """The app's result, closed through the server span's end."""

    __slots__ = ("_result", "_span")

    def __init__(self, result: Iterable[bytes], span: _Span) -> None:
        self._result = result
        self._span = span

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._result)

    def close(self) -> None:
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                close()
        finally:
            self._span.end()


class _SizedBody(_Body):
    """For results with a length (a server may use ``len()``, as it would bare)."""

    __slots__ = ()

    def __len__(self) -> int:
        return len(self._result)  # type: ignore[arg-type]


def _ending(result: Any, environ: dict[str, Any], span: _Span) -> Any:
    """What goes back to mod_wsgi: the span ends when it closes it."""
    if not is_server_file(result, environ):
        return (_SizedBody if hasattr(result, "__len__") else _Body)(result, span)
    close = getattr(result, "close", None)

    def closing() -> None:
        try:
            if close is not None:
                close()
        finally:
            span.end()

    try:
        result.close = closing
    except (AttributeError, TypeError):
        # mod_wsgi's own wrapper takes no attributes: its file tells when it was sent
        # (the app's middleware gave it one), or the span ends now.
        if not after_file_sent(result, span.end):
            span.end()
    return result


class ServerHop:
    """The app as mod_wsgi-express's handler calls it, inside a ``server`` span.

    ``report`` is told (once per process is the caller's business) when the span
    cannot be recorded: the request is then served as it would be without it."""

    __slots__ = ("app", "report")

    def __init__(self, app: Callable[..., Any], report: Callable[[Exception], None]) -> None:
        self.app = app
        self.report = report

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        try:
            span = _open(environ)
        except Exception as exc:  # tracing never fails a request
            self.report(exc)
            return self.app(environ, start_response)
        attrs = span.attrs

        def start(status: str, headers: Any, *exc_info: Any) -> Any:
            code = status.split(None, 1)[0] if isinstance(status, str) else ""
            if code.isdigit():
                attrs["http.response.status_code"] = int(code)
            return start_response(status, headers, *exc_info)

        token = server_parent.set((span.trace_id, span.span_id))
        try:
            result = self.app(environ, start)
        except BaseException:
            span.end()
            raise
        finally:
            try:
                server_parent.reset(token)
            except ValueError:  # set in another context: do not leak it to the next request
                server_parent.set(None)
        try:
            return _ending(result, environ, span)
        except Exception as exc:
            self.report(exc)
            span.end()
            return result
