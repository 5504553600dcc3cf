"""``hopscope replay FILE --target URL``: resend captured requests, report what changed.

Made for regression checks: capture real traffic once, then replay it against each new
version of the app and let the exit status say whether any response changed (0 all
the same, 1 some differ or the capture is damaged, 2 the replay itself could not run).
Deciding *what* to send and *how* responses differ is :mod:`hopscope.tracing.replay`;
this module sends with httpx, records each replayed request as a ``client`` span (so a
target running under hopscope joins the same trace through ``traceparent``) and prints
the table.

Requests go out from a small thread pool: httpx's ``trace`` extension reports the
connection and HTTP phases synchronously in the sending thread, which is exactly what a
client span needs, and a replay is I/O bound with a handful of requests in flight.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import quote

import click
import httpx
from hopscope.tracing.filters import FilterError, parse
from hopscope.tracing.har import HarError, load_har
from hopscope.tracing.model import Trace
from hopscope.tracing.records import BODY_LIMIT, Record, new_span_id, new_trace_id
from hopscope.tracing.redact import REDACTED
from hopscope.tracing.replay import (
    CapturedRequest,
    Difference,
    captured_request,
    compare,
    parse_ignore_path,
    replay_headers,
)
from hopscope.tracing.sinks import FileSink
from hopscope.tracing.tracefile import (
    SummaryCutOffWarning,
    TraceFileError,
    TraceFileWarning,
    load,
)
from hopscope.tracing.traceparent import format_traceparent

__all__ = ["ReplayError", "Replayer", "load_requests", "run_replay"]


class ReplayError(Exception):
    """The replay cannot run or go on (bad input, unreachable target): one line, exit 2."""


@dataclass(slots=True)
class Item:
    """A captured request and its place in capture order (1-based, as printed)."""

    index: int
    captured: CapturedRequest


@dataclass(slots=True)
class Result:
    item: Item
    status: int | None = None
    duration_ns: int | None = None
    differences: list[Difference] = field(default_factory=list)
    skipped: str | None = None
    withheld: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unreachable: str | None = None
    protocol: str | None = None

    @property
    def outcome(self) -> str:
        if self.skipped is not None:
            return "skipped"
        if any(d.kind == "error" for d in self.differences):
            return "error"
        return "different" if self.differences else "same"


# -- reading the capture ------------------------------------------------------------------------


def load_requests(
    path: str,
    filter_text: str | None = None,
    damage: list[str] | None = None,
    notes: list[str] | None = None,
) -> list[Item]:
    """The captured requests of a trace file, in capture order, that ``filter_text``
    selects; raises :class:`ReplayError` for a bad file or filter, or when none is left.

    What a damaged file (a writer killed mid-line, a garbled line) still holds is
    replayed; ``damage`` gets one line saying what was skipped, ``notes`` one for what
    was skipped losing nothing (a cut-off summary line)."""
    if filter_text is not None:
        try:
            selected = parse(filter_text)
        except FilterError as exc:
            raise ReplayError(f"--filter: {exc}") from None
    traces = _read_traces(
        path, damage if damage is not None else [], notes if notes is not None else []
    )
    if filter_text is not None:
        traces = selected.select(traces)
    requests = [r for r in (captured_request(t) for t in traces) if r is not None]
    requests.sort(key=lambda r: (r.start is None, r.start or 0))
    if not requests:
        which = " that --filter selects" if filter_text is not None else ""
        raise ReplayError(f"{path}: no captured requests{which}")
    return [Item(index, request) for index, request in enumerate(requests, start=1)]


def _read_traces(path: str, damage: list[str], notes: list[str]) -> list[Trace]:
    """A hopscope trace file, or a HAR file (told apart by content, not by name)."""
    if _looks_like_har(path):
        try:
            return load_har(path)
        except HarError as exc:
            raise ReplayError(str(exc)) from None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TraceFileWarning)
            traces = load(path)
    except TraceFileError as exc:
        raise ReplayError(str(exc)) from None
    for warning in caught:
        if issubclass(warning.category, SummaryCutOffWarning):
            notes.append(str(warning.message))  # nothing of the requests is lost
        elif issubclass(warning.category, TraceFileWarning):
            damage.append(str(warning.message))
    return traces


def _looks_like_har(path: str) -> bool:
    """True unless the first line is a hopscope header: HAR files are one JSON object,
    ``{"log": ...}``, on one line or pretty-printed (then the first line is ``{``).
    A pipe (``<(zcat t.jsonl.gz)``) is taken for a trace file: it can be read only once."""
    if not os.path.isfile(path):
        return False
    try:
        with open(path, "rb") as handle:
            first = handle.readline(1 << 20).removeprefix(b"\xef\xbb\xbf").strip()  # a BOM
    except OSError:
        return False  # load() says why, in its words
    if not first.startswith(b"{"):
        return False
    try:
        header = json.loads(first)
    except (ValueError, RecursionError):
        return first == b"{" or not first.endswith(b"}")  # an object going on
    return isinstance(header, dict) and "log" in header


# -- sending ------------------------------------------------------------------------------------

#: httpcore phases (the middle of its trace event names) -> the client span's event,
#: marked when the phase ends; ``request.sent`` and ``response.start`` are the names the
#: proxy's spans use and the HAR exporter reads, so a replay exports with its timings.
_PHASES = {
    "send_request_headers": "request.head.sent",
    "send_request_body": "request.sent",
    "receive_response_headers": "response.start",  # the wait for the server, then the head
    "receive_response_body": "response.end",
}


def parse_target(target: str) -> httpx.URL:
    """``--target``'s base URL: ``http://localhost`` for a ``unix:PATH`` (see
    :func:`socket_path`), as nginx names a Unix socket's upstream."""
    if target.startswith("unix:"):
        if not target[5:]:
            raise ReplayError(f"--target unix: needs a socket path, got {target!r}")
        return httpx.URL("http://localhost")
    try:
        url = httpx.URL(target)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise ReplayError(f"--target {target!r}: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ReplayError(f"--target must look like http://HOST:PORT or unix:PATH, got {target!r}")
    if url.query or url.fragment:
        raise ReplayError(f"--target cannot have a query or fragment, got {target!r}")
    return url


def socket_path(target: str) -> str | None:
    """The Unix socket of a ``unix:PATH`` target (an app server bound to one, as behind
    nginx: ``gunicorn --bind unix:...``, ``uvicorn --uds``), else None."""
    return os.path.abspath(target[5:]) if target.startswith("unix:") else None


def parse_header_option(text: str) -> tuple[str, str]:
    """``--header NAME:VALUE`` (curl's form), the name checked as an HTTP token."""
    name, colon, value = text.partition(":")
    name = name.strip()
    if not colon or not name or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
        raise ReplayError(f"--header {text!r}: expected NAME:VALUE")
    return name, value.strip()


def _encode(text: str) -> bytes:
    """Header values and queries are latin-1 text standing for bytes in a trace file."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:  # hand-edited capture: send what the text says
        return text.encode("utf-8")


def _connect_reason(exc: httpx.TransportError) -> str:
    """``connection refused`` rather than ``[Errno 111] Connection refused``."""
    if isinstance(exc, httpx.TimeoutException):
        return "connection timed out"
    cause: BaseException | None = exc.__cause__
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):  # not "[SSL: ...] (_ssl.c:1006)"
            return f"TLS certificate verify failed: {cause.verify_message}"
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror[0].lower() + cause.strerror[1:]
        cause = cause.__cause__ or cause.__context__  # httpcore raises from inside except
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", str(exc)) or type(exc).__name__
    return text[0].lower() + text[1:]


def _holds_marker(captured: CapturedRequest, part: str) -> bool:
    """True when an exporter redacted values inside the query or body (a HAR does)."""
    if part == "query":
        return REDACTED in captured.query or quote(REDACTED) in captured.query
    return REDACTED.encode() in captured.body


class _Pacer:
    """Spaces request starts ``1/rate`` seconds apart, across all sending threads."""

    def __init__(self, rate: float | None, stop: threading.Event) -> None:
        self.interval = 1.0 / rate if rate else 0.0
        self.stop = stop
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            at = max(self._next, now)
            self._next = at + self.interval
        self.stop.wait(at - now)


class Replayer:
    """Sends captured requests to one target and compares the answers.

    Thread-safe: :meth:`replay` runs in several threads at once when asked for
    concurrency (one httpx client, so connections are pooled and reused).
    """

    def __init__(
        self,
        target: str,
        *,
        overrides: Sequence[tuple[str, str]] = (),
        ignore: Sequence[tuple[str, ...]] = (),
        ignore_headers: Sequence[str] = (),
        timeout: float = 30.0,
        rate: float | None = None,
        sink: FileSink | None = None,
        source: str = "",
        max_connections: int = 10,
        insecure: bool = False,
    ) -> None:
        self.target = target
        self.base = parse_target(target)
        self.overrides = list(overrides)
        self.ignore = list(ignore)
        self.ignore_headers = list(ignore_headers)
        self.timeout = timeout
        self.sink = sink
        self.source = source
        self.stop = threading.Event()
        self.pacer = _Pacer(rate, self.stop)
        limits = httpx.Limits(max_connections=max_connections)
        self.uds = uds = socket_path(target)
        self.client = httpx.Client(
            timeout=timeout,
            follow_redirects=False,
            trust_env=False,  # the target is named explicitly: no proxies from the environment
            limits=limits,
            verify=not insecure,  # --insecure: a development server's self-signed certificate
            transport=None if uds is None else httpx.HTTPTransport(uds=uds, limits=limits),
        )
        # Send the captured headers, not httpx's defaults (an Accept-Encoding the original
        # client never sent would change the response).
        for name in ("accept", "accept-encoding", "user-agent"):
            del self.client.headers[name]

    def close(self) -> None:
        self.client.close()

    def url_for(self, captured: CapturedRequest) -> httpx.URL:
        # url.path is the decoded path (both middlewares decode it as UTF-8): quote it
        # again, "%" included, so a literal "%" in a path stays one.
        safe = "/!$&'()*+,;=:@~" + ("%" if captured.path_encoded else "")
        path = quote(captured.path.encode("utf-8", "surrogateescape"), safe=safe)
        raw = self.base.raw_path.split(b"?")[0].rstrip(b"/") + path.encode("ascii")
        if captured.query:
            raw += b"?" + _encode(captured.query)
        return self.base.copy_with(raw_path=raw)

    def skip_reason(self, captured: CapturedRequest) -> str | None:
        if captured.websocket:
            return "a WebSocket: not replayable"
        if captured.truncated:
            size = f" of {captured.body_size}" if captured.body_size is not None else ""
            return f"request body truncated at capture ({len(captured.body)}{size} bytes kept)"
        if captured.status is None:
            return "no response at capture: nothing to compare"
        return None

    def replay(self, item: Item) -> Result:
        """Send one captured request and compare; never raises for network trouble."""
        captured = item.captured
        reason = self.skip_reason(captured)
        if reason is not None:
            return Result(item, skipped=reason)
        headers, withheld = replay_headers(captured.headers, self.overrides)
        result = Result(item, withheld=withheld)
        if "\ufffd" in captured.path and not captured.path_encoded:
            # The server decoded the path as UTF-8, replacing what was not: the original
            # bytes are not in the capture, so the path sent is not the one captured.
            result.notes.append(
                "the captured path had bytes that are not UTF-8 (recorded as U+FFFD, sent so)"
            )
        redacted = [part for part in ("query", "body") if _holds_marker(captured, part)]
        if redacted:
            result.notes.append(
                f"the captured {' and '.join(redacted)} "
                + ("hold" if len(redacted) > 1 else "holds")
                + " redacted values: sent as captured"
            )
        self.pacer.wait()
        if self.stop.is_set():
            return Result(item, skipped="not sent: the replay stopped")
        exchange = self._send(captured, headers)
        result.duration_ns = exchange.end - exchange.start
        result.status = exchange.status
        result.protocol = exchange.protocol
        if exchange.unreachable:
            result.unreachable = f"cannot reach {self.target}: {exchange.unreachable}"
            self.stop.set()
            return result
        if exchange.failure is not None:
            result.differences.append(Difference("error", exchange.failure))
        elif exchange.status is not None:
            if captured.response_truncated and not captured.response_body:
                result.notes.append("the capture holds no response body: bodies not compared")
            result.differences = compare(
                captured,
                exchange.status,
                exchange.headers,
                exchange.body,
                ignore=self.ignore,
                ignore_headers=self.ignore_headers,
            ).differences
        if self.sink is not None:
            for record in self._records(item, result, exchange):
                self.sink.emit(record)
        return result

    def _send(self, captured: CapturedRequest, headers: list[tuple[str, str]]) -> _Exchange:
        """One request on the wire, with a ``traceparent`` naming its client span."""
        exchange = _Exchange(new_trace_id(), new_span_id())
        headers = [
            *headers,
            ("traceparent", format_traceparent(exchange.trace_id, exchange.span_id)),
        ]

        def on_trace(name: str, info: dict[str, Any]) -> None:
            exchange.phases.append((name, time.time_ns(), info))

        exchange.start = time.time_ns()
        try:
            request = exchange.request = self.client.build_request(
                captured.method,
                self.url_for(captured),
                headers=[(_encode(n), _encode(v)) for n, v in headers],
                content=captured.body or None,
                extensions={"trace": on_trace},
            )
            response = self.client.send(request, stream=True)
            try:
                exchange.status = response.status_code
                exchange.protocol = response.http_version.removeprefix("HTTP/")
                exchange.headers = [
                    (n.decode("latin-1"), v.decode("latin-1")) for n, v in response.headers.raw
                ]
                _read_body(response, captured, exchange)
            finally:
                response.close()
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            exchange.unreachable = _connect_reason(exc)
        except httpx.TimeoutException:
            exchange.failure = f"timed out after {self.timeout:g}s"
        except httpx.HTTPError as exc:
            exchange.failure = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # a request the capture holds but httpx cannot send
            exchange.failure = f"cannot send: {type(exc).__name__}: {exc}"
        exchange.end = time.time_ns()
        return exchange

    def _records(self, item: Item, result: Result, exchange: _Exchange) -> list[Record]:
        """The replayed request as a ``client`` span, its phases as events."""
        captured = item.captured
        trace_id, span_id = exchange.trace_id, exchange.span_id
        request = exchange.request
        url = request.url if request is not None else self.base
        attrs: dict[str, Any] = {
            "http.request.method": captured.method,
            "url.full": str(url),
            "url.scheme": url.scheme,
            "url.path": captured.path,
            "url.query": captured.query,
            "server.address": url.host if self.uds is None else self.uds,
            "server.port": (url.port or (443 if url.scheme == "https" else 80))
            if self.uds is None
            else None,
            "replay.of": captured.trace_id,
            "replay.index": item.index,
        }
        if request is not None:
            attrs["http.request.headers"] = list(request.headers.raw)
        if self.source:
            attrs["replay.source"] = self.source
        name = f"{captured.method} {captured.path}"
        ident = threading.get_ident()
        records: list[Record] = [
            ("s", exchange.start, trace_id, span_id, 0, "client", name, ident, attrs)
        ]
        records.extend(
            _phase_events(trace_id, span_id, exchange.phases, len(captured.body), result.status)
        )
        sent, body = captured.body, exchange.body
        end: dict[str, Any] = {
            "http.request.body.size": len(sent),
            "replay.match": not result.differences,
        }
        if sent:
            end["http.request.body"] = sent[:BODY_LIMIT]
            end["http.request.body.truncated"] = len(sent) > BODY_LIMIT
        if result.withheld:
            end["replay.headers.withheld"] = list(result.withheld)
        if result.differences:
            end["replay.differences"] = [str(d) for d in result.differences]
        if exchange.failure is not None:
            end["error"] = True
            end["exception.message"] = exchange.failure
        else:
            end["http.response.status_code"] = result.status
            end["network.protocol.version"] = result.protocol
            end["http.response.headers"] = exchange.headers
            end["http.response.body.size"] = exchange.body_size
            if body:
                shown = end["http.response.body"] = body[:BODY_LIMIT]
                cut = exchange.stopped or exchange.body_size > len(shown)
                end["http.response.body.truncated"] = cut
        records.append(("e", exchange.end, trace_id, span_id, end))
        return records


@dataclass(slots=True)
class _Exchange:
    """One request as sent and what came back (or why nothing did)."""

    trace_id: int
    span_id: int
    start: int = 0
    end: int = 0
    request: httpx.Request | None = None
    status: int | None = None
    protocol: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    """The response body, or as much of it as the capture can be compared with."""
    body_size: int = 0
    stopped: bool = False
    """True when the reading stopped before the body's end (the captured client did)."""
    failure: str | None = None
    unreachable: str | None = None
    phases: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)


def _read_body(response: httpx.Response, captured: CapturedRequest, exchange: _Exchange) -> None:
    """Read the response into ``exchange``, keeping only what the capture can be compared
    with: all of it, or the first bytes when the capture kept only those (a download of
    gigabytes is not held in memory), and no more than the captured client read when it
    hung up early (an event stream that never ends would keep the replay waiting)."""
    keep = len(captured.response_body) if captured.response_truncated else None
    kept = bytearray()
    for chunk in response.iter_raw():
        exchange.body_size += len(chunk)
        if keep is None:
            kept += chunk
        elif len(kept) < keep:
            kept += chunk[: keep - len(kept)]
        if captured.response_disconnected and keep is not None and len(kept) >= keep:
            exchange.stopped = True
            break
    exchange.body = bytes(kept)


def _phase_events(
    trace_id: int,
    span_id: int,
    phases: list[tuple[str, int, dict[str, Any]]],
    body_size: int,
    status: int | None,
) -> Iterator[Record]:
    """One event per phase, when it ended, with its ``duration_ns``: ``connect`` (TCP and
    TLS, with ``connect_ns`` and ``ssl_ns``; none on a reused connection),
    ``request.head.sent``, ``request.sent``, ``response.start`` (the wait for the server,
    then the response head) and ``response.end`` (the body)."""
    started: dict[str, int] = {}
    spans: dict[str, tuple[int, int, str | None]] = {}
    for name, ts, info in phases:
        parts = name.split(".")
        if len(parts) != 3:
            continue
        _, phase, state = parts
        if state == "started":
            started[phase] = ts
        else:
            failed = type(info.get("exception")).__name__ if state == "failed" else None
            spans[phase] = (started.pop(phase, ts), ts, failed)
    tcp = spans.get("connect_tcp") or spans.get("connect_unix_socket")
    if tcp is not None:
        begin, end, failed = tcp
        attrs: dict[str, Any] = {}
        tls = spans.get("start_tls")
        if tls is not None:
            end, failed = tls[1], failed or tls[2]
            attrs["ssl_ns"] = tls[1] - tls[0]
        attrs.update(duration_ns=end - begin, connect_ns=end - begin, reused=False)
        if failed:
            attrs["error"] = failed
        yield ("p", end, trace_id, span_id, "connect", attrs)
    for phase, event in _PHASES.items():
        if phase not in spans:
            continue
        begin, end, failed = spans[phase]
        attrs = {"duration_ns": end - begin}
        if phase == "send_request_body":
            attrs["bytes"] = body_size
        elif phase == "receive_response_headers" and status is not None:
            attrs["status"] = status
        if failed:
            attrs["error"] = failed
        yield ("p", end, trace_id, span_id, event, attrs)


# -- printing -----------------------------------------------------------------------------------


def _ms(ns: int | None) -> str:
    return "-" if ns is None else f"{ns / 1e6:.1f}ms"


_OUTCOME_STYLE = {"same": "green", "different": "red", "error": "red", "skipped": "yellow"}
_OUTCOME_WORD = {"same": "same", "different": "DIFFERENT", "error": "ERROR", "skipped": "skipped"}
_PATH_WIDTH = 48


class Table:
    """The result table, printed row by row as results come (widths fixed up front from
    the captured requests, so nothing waits for the slowest request)."""

    def __init__(self, items: Sequence[Item], write: Callable[[str], None], color: bool) -> None:
        self.write = write
        self.color = color
        self.index_width = max(1, len(str(len(items))))
        self.method_width = max([6, *(len(i.captured.method) for i in items)])
        paths = (len(_shown_path(i.captured)) for i in items)
        self.path_width = min(_PATH_WIDTH, max([4, *paths]))
        self.header_done = False

    def _line(self, index: str, method: str, path: str, status: str, latency: str) -> str:
        return (
            f"{index:>{self.index_width}}  {method:<{self.method_width}}  "
            f"{path:<{self.path_width}}  {status:<10}  {latency:<18}  "
        )

    def row(self, result: Result) -> None:
        if not self.header_done:
            self.header_done = True
            self.write(self._line("#", "METHOD", "PATH", "STATUS", "LATENCY") + "RESULT")
        captured = result.item.captured
        old = "-" if captured.status is None else str(captured.status)
        status = old
        if result.status is not None and result.status != captured.status:
            status = f"{old} -> {result.status}"
        latency = "-"
        if result.skipped is None:
            latency = f"{_ms(captured.duration_ns)} -> {_ms(result.duration_ns)}"
        outcome = result.outcome
        word = _OUTCOME_WORD[outcome]
        if self.color:
            word = click.style(word, fg=_OUTCOME_STYLE[outcome], bold=outcome != "same")
        if result.skipped is not None:
            word += f": {result.skipped}"
        path = _shown_path(captured)
        if len(path) > self.path_width:
            path = path[: self.path_width - 3] + "..."
        line = self._line(str(result.item.index), captured.method, path, status, latency)
        self.write(line + word)
        indent = " " * (self.index_width + 2)
        shown = result.differences[:_MAX_DETAILS]
        for difference in shown:
            self.write(f"{indent}{difference}")
        if len(result.differences) > len(shown):
            self.write(f"{indent}... and {len(result.differences) - len(shown)} more")
        for note in result.notes:
            self.write(f"{indent}note: {note}")
        if result.withheld:
            names = ", ".join(name.lower() for name in result.withheld)
            self.write(f"{indent}not sent (redacted in the capture): {names}")


_MAX_DETAILS = 10


def _shown_path(captured: CapturedRequest) -> str:
    return captured.path + (f"?{captured.query}" if captured.query else "")


def summary(results: Sequence[Result], target: str) -> list[str]:
    counts = {"same": 0, "different": 0, "error": 0, "skipped": 0}
    for result in results:
        counts[result.outcome] += 1
    sent = len(results) - counts["skipped"]
    parts = [f"{counts['same']} same", f"{counts['different']} different"]
    if counts["error"]:
        parts.append(f"{counts['error']} failed")
    line = f"{sent} request(s) replayed against {target}: " + ", ".join(parts)
    if counts["skipped"]:
        line += f"; {counts['skipped']} skipped"
    lines = [line]
    pairs = [
        (r.item.captured.duration_ns, r.duration_ns)
        for r in results
        if r.skipped is None and r.item.captured.duration_ns is not None and r.duration_ns
    ]
    if pairs:
        old = statistics.median(p[0] for p in pairs if p[0] is not None)
        new = statistics.median(p[1] for p in pairs if p[1] is not None)
        lines.append(f"median latency: {_ms(int(old))} captured, {_ms(int(new))} now")
    withheld: dict[str, list[int]] = {}
    for result in results:
        for name in result.withheld:
            withheld.setdefault(name.lower(), []).append(result.item.index)
    if withheld:
        listed = "; ".join(
            f"{name} (#{', #'.join(map(str, indexes))})" for name, indexes in withheld.items()
        )
        lines.append(
            f"not sent, redacted in the capture: {listed}; "
            "give --header NAME:VALUE to send a real value"
        )
    return lines


class _Progress:
    """A progress bar on stderr when it is a terminal; nothing otherwise.

    rich comes with textual; it is imported only here, and only when a terminal shows it.
    """

    def __init__(self, total: int, out: TextIO) -> None:
        self.total = total
        self._bar: Any = None
        self._task: Any = None
        self._console: Any = None
        self._out = out
        self._enabled = total > 1 and _isatty(sys.stderr)

    def __enter__(self) -> _Progress:
        if self._enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

            self._console = Console(file=sys.stderr)
            self._bar = Progress(
                "replaying",
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self._console,
                transient=True,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task("replay", total=self.total)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

    def write(self, line: str) -> None:
        # When stdout is the same terminal, a plain write would be overdrawn by the bar:
        # print through the bar's console, above it.
        if self._bar is not None and _isatty(self._out):
            from rich.text import Text

            self._console.print(Text.from_ansi(line), soft_wrap=True, highlight=False)
        else:
            self._out.write(line + "\n")
            self._out.flush()


def _isatty(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


# -- the command --------------------------------------------------------------------------------


def run_replay(
    file: str,
    *,
    target: str,
    filter_text: str | None = None,
    concurrency: int = 1,
    rate: float | None = None,
    keep_order: bool = False,
    output: str | None = None,
    headers: Sequence[str] = (),
    ignore: Sequence[str] = (),
    ignore_headers: Sequence[str] = (),
    timeout: float = 30.0,
    insecure: bool = False,
    out: TextIO | None = None,
) -> int:
    """Replay ``file`` against ``target``; returns the exit status (0 all the same, 1 some
    differ or failed, 2 every one skipped), raises :class:`ReplayError` when the replay
    cannot run."""
    out = out if out is not None else sys.stdout
    overrides = [parse_header_option(text) for text in headers]
    try:
        ignore_paths = [parse_ignore_path(text) for text in ignore]
    except ValueError as exc:
        raise ReplayError(f"--ignore: {exc}") from None
    parse_target(target)
    damage: list[str] = []
    notes: list[str] = []
    items = load_requests(file, filter_text, damage, notes)
    if output is not None and _same_file(output, file):
        raise ReplayError(f"-o {output} is the capture being replayed: choose another file")
    sink: FileSink | None = None
    if output is not None:
        try:
            sink = FileSink(output)
        except OSError as exc:
            raise ReplayError(f"cannot write {output}: {exc.strerror or exc}") from None
    replayer = Replayer(
        target,
        overrides=overrides,
        ignore=ignore_paths,
        ignore_headers=ignore_headers,
        timeout=timeout,
        rate=rate,
        sink=sink,
        source=os.path.abspath(file),
        max_connections=concurrency,
        insecure=insecure,
    )
    try:
        with _Progress(len(items), out) as progress:
            table = Table(items, progress.write, color=_isatty(out))
            results = _run(replayer, items, concurrency, keep_order, table, progress)
    finally:
        replayer.close()
        if sink is not None:
            sink.close()
    if results:
        out.write("\n")
    lines = summary(results, target)
    # Never 0 then: a regression gate must not pass on part of a damaged capture.
    lines += [f"damaged capture, only what could be read was replayed: {d}" for d in damage]
    lines += [f"warning: {note}" for note in notes]  # (not damage: the exit status stands)
    for line in lines:
        out.write(line + "\n")
    out.flush()
    if damage:
        return 1
    if results and all(r.outcome == "skipped" for r in results):
        # A gate that compared nothing must not pass: as when nothing was selected.
        out.write("nothing was compared: every selected request was skipped\n")
        out.flush()
        return 2
    return 0 if all(r.outcome in ("same", "skipped") for r in results) else 1


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _run(
    replayer: Replayer,
    items: Sequence[Item],
    concurrency: int,
    keep_order: bool,
    table: Table,
    progress: _Progress,
) -> list[Result]:
    """Send everything, printing rows as results come (in capture order with
    ``keep_order``); stops at the first unreachable target."""
    done: dict[int, Result] = {}
    printed = 0
    ordered = [item.index for item in items]

    def deliver(result: Result) -> None:
        nonlocal printed
        done[result.item.index] = result
        progress.advance()
        if not keep_order:
            table.row(result)
            return
        while printed < len(ordered) and ordered[printed] in done:
            table.row(done[ordered[printed]])
            printed += 1

    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="hopscope-replay")
    try:
        pending: set[Future[Result]] = set()
        queue = iter(items)
        unreachable: str | None = None
        while True:
            while len(pending) < concurrency and unreachable is None:
                item = next(queue, None)
                if item is None:
                    break
                if replayer.skip_reason(item.captured) is not None:
                    deliver(replayer.replay(item))  # answered at once, nothing to send
                    continue
                pending.add(pool.submit(replayer.replay, item))
            if not pending:
                break
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in sorted(finished, key=lambda f: f.result().item.index):
                result = future.result()
                if result.unreachable is not None:
                    unreachable = unreachable or result.unreachable
                elif unreachable is None:
                    deliver(result)
        if unreachable is not None:
            raise ReplayError(unreachable)
    except KeyboardInterrupt:
        replayer.stop.set()
        raise ReplayError("interrupted") from None
    finally:
        replayer.stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
    return [done[index] for index in ordered if index in done]
