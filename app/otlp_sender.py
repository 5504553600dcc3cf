"""Send finished traces to an OpenTelemetry backend (OTLP/HTTP JSON) as they happen.

The sender runs beside a live command (tail, proxy, run), whose own work must not wait
on a slow or absent backend: traces go into a bounded queue that a background thread
drains in batches; when the queue is full, traces are dropped and counted, never waited
for.  A batch the backend refuses is counted as failed and not retried (the next batch
is already coming).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from hopscope.tracing.model import Trace, TraceBuilder
from hopscope.tracing.otlp import traces_to_otlp_json

__all__ = ["OtlpSender", "traces_url"]

Event = dict[str, Any]


def traces_url(url: str) -> str:
    """The OTLP traces endpoint for ``url``: a bare collector address
    (``http://localhost:4318``) gets the standard ``/v1/traces`` path."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"OTLP endpoint {url!r} is not an http:// or https:// URL")
    if parts.path in ("", "/"):
        parts = parts._replace(path="/v1/traces")
    return urlunsplit(parts)


class OtlpSender:
    """``submit(trace)`` finished traces (or ``feed(events)`` wire events); a thread
    POSTs them to ``url`` in batches of up to ``batch_size`` every ``interval`` seconds.

    Counters: :attr:`sent` and :attr:`failed` (spans), :attr:`dropped` (traces that
    found the queue full); :attr:`last_error` says why the last batch failed.
    """

    def __init__(
        self,
        url: str,
        *,
        max_queue: int = 10_000,
        batch_size: int = 256,
        interval: float = 1.0,
        timeout: float = 10.0,
        redact: bool = True,
        headers: dict[str, str] | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.url = traces_url(url)
        self.warn = warn
        """Told (once, on the sender's thread) why the first batch failed."""
        self.batch_size = batch_size
        self.interval = interval
        self.redact = redact
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self.unsent = 0
        """Traces still queued or in flight when :meth:`close` gave up on the backend."""
        self.last_error: str | None = None
        self._warned = False
        self._posting = 0  # traces in the batch being posted now
        self._posting_since = 0.0
        self.slow_after = min(timeout, 5.0)
        """A batch in flight this long is worth the (one) warning line."""
        self._queue: queue.Queue[Trace | None] = queue.Queue(max_queue)
        self._client = httpx.Client(timeout=timeout, headers=headers)
        self._builder = TraceBuilder(max_traces=max_queue)
        self._done: OrderedDict[str, None] = OrderedDict()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="hopscope-otlp", daemon=True)
        self._thread.start()

    # -- producers (any thread; never block) -------------------------------------------
    def submit(self, trace: Trace) -> bool:
        """Queue one finished trace; False (and counted) when the queue is full."""
        if self._closed:
            return False
        since = self._posting_since
        if since and not self._warned and time.monotonic() - since > self.slow_after:
            self._warn(f"OTLP backend {self.url} is slow (no answer in {self.slow_after:g} s)")
        try:
            self._queue.put_nowait(trace)
        except queue.Full:
            self.dropped += 1
            return False
        return True

    def feed(self, events: Iterable[Event]) -> None:
        """Fold wire events and submit each trace when its root span ends (events for a
        trace already sent are ignored)."""
        finished: dict[str, Trace] = {}
        for event in events:
            if not isinstance(event, dict) or event.get("trace_id") in self._done:
                continue
            try:
                trace = self._builder.add(event)
            except (KeyError, TypeError, ValueError):
                continue
            if trace is not None and trace.finished:
                finished[trace.trace_id] = trace
        for trace_id, trace in finished.items():
            self._builder.traces.pop(trace_id, None)
            self._done[trace_id] = None
            if len(self._done) > 10_000:
                self._done.popitem(last=False)
            self.submit(trace)

    # -- the thread -------------------------------------------------------------------
    def _run(self) -> None:
        stop = False
        while not stop:
            batch: list[Trace] = []
            deadline = time.monotonic() + self.interval
            while len(batch) < self.batch_size:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            if batch:
                self._post(batch)

    def _post(self, batch: list[Trace]) -> None:
        payload = traces_to_otlp_json(batch, redact=self.redact)
        spans = sum(len(s["spans"]) for r in payload["resourceSpans"] for s in r["scopeSpans"])
        self._posting, self._posting_since = len(batch), time.monotonic()
        try:
            response = self._client.post(self.url, json=payload)
        except httpx.HTTPError as exc:
            self._failed(spans, f"cannot send to {self.url}: {type(exc).__name__}: {exc}")
            return
        finally:
            self._posting, self._posting_since = 0, 0.0
        if response.is_success:
            self.sent += spans
        else:
            self._failed(spans, f"{self.url} answered {response.status_code}")

    def _failed(self, spans: int, reason: str) -> None:
        self.failed += spans
        self.last_error = reason
        self._warn(f"OTLP export failing: {reason}")

    def _warn(self, message: str) -> None:
        # One line per run, whichever trouble comes first: the summary has the counts.
        if self._warned:
            return
        self._warned = True
        if self.warn is not None:
            with contextlib.suppress(Exception):  # a warning must not stop the sender
                self.warn(message)

    def summary(self) -> str:
        """One line for the end of a run."""
        text = f"OTLP: {self.sent} span(s) sent to {self.url}"
        if self.failed:
            text += f", {self.failed} failed ({self.last_error})"
        if self.dropped:
            text += f", {self.dropped} trace(s) dropped (queue full)"
        if self.unsent:
            text += f", {self.unsent} trace(s) not sent (the backend did not answer in time)"
        return text

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (for up to ``timeout`` seconds) and stop."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            # A slow backend still holds a batch: what it and the queue hold is counted
            # as not sent, never waited for (the thread is a daemon).
            left = self._posting
            with contextlib.suppress(queue.Empty):
                while True:
                    if self._queue.get_nowait() is not None:
                        left += 1
            self.unsent = left
            return
        self._client.close()

    def __enter__(self) -> OtlpSender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
