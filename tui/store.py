"""The requests the UI holds: a bounded ring of traces and the filtered view over it.

No widgets here, so everything the list shows can be tested without a terminal.  Wire
events fold into a :class:`~hopscope.tracing.TraceBuilder` bounded at ``max_requests``
(the oldest trace goes first); the store mirrors the builder's order with a small
:class:`Row` per trace and keeps the *view*, the rows the current filter accepts, as a
list in arrival order so the list widget can index it in O(1).

A filter is re-evaluated for every trace an ingested batch touched, because whether a
request matches can change while it runs (its status arrives with its response head,
its duration grows).

Besides wire events, a source may hand over whole traces it assembled in its own thread
(:data:`TRACE`): that is how a big file opens without the UI thread folding a million
events.
"""

from __future__ import annotations

import bisect
import gc
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from hopscope.tracing.model import Trace, TraceBuilder, TraceInfo
from hopscope.tracing.tracefile import SummarisedTrace, decode_details

__all__ = ["TRACE", "Change", "RequestStore", "Row", "status_class", "trace_events"]

Event = dict[str, Any]
Predicate = Callable[[Trace], bool]

#: Seconds of history the requests/s sparkline covers.
RATE_WINDOW = 60

#: The kind of a pseudo-event carrying a trace a source assembled itself, in its own
#: thread: ``{"kind": "trace", "trace": Trace}``.  The source must not touch it after
#: handing it over; later events for it come as ordinary events, or as a trace that
#: replaces it: ``{"kind": "trace", "trace": Trace, "replace": True}``.
TRACE = "trace"

#: New requests between two :func:`gc.freeze` calls (see ``RequestStore.freeze_gc``).
FREEZE_EVERY = 2_000


@dataclass(slots=True, eq=False)
class Row:
    """The store's bookkeeping for one trace."""

    seq: int
    """Arrival number: orders rows and survives eviction of older ones."""
    trace: Trace
    version: int = 0
    """Bumped whenever an event touches the trace, so cached renderings know to redo."""
    counted: bool = False
    """Whether the finished request was added to the status counts."""


@dataclass(slots=True)
class Change:
    """What one or more ingested batches did to the view."""

    appended: int = 0
    """Rows added to the view (nearly always at its end)."""
    view_changed: bool = False
    """Rows were added or removed, so positions may have moved: find rows again by seq."""
    touched: set[str] = field(default_factory=set)
    """Ids of traces that received events."""
    events: int = 0
    rejected: int = 0
    notices: list[Event] = field(default_factory=list)
    reset: bool = False
    """Everything held before was forgotten (a playback seeked back)."""


#: :func:`status_class` of the statuses that have one, looked up.
_STATUS_CLASS = {status: f"{status // 100}xx" for status in range(100, 600)}


def _status_key(info: TraceInfo, trace: Trace) -> str:
    """What a finished request counts under: :func:`status_class`, looked up (``info``:
    the trace's summary, passed in by callers that hold it already)."""
    status = info.status
    return (_STATUS_CLASS.get(status) if type(status) is int else None) or (
        status_class(trace) or "err"
    )


def status_class(trace: Trace) -> str | None:
    """``"2xx"``..``"5xx"``, ``"err"`` for a failed request with no status, None for a
    running one with no status yet (a running stream's is known once its head went out:
    the counts, which take only finished requests, call this once it ended)."""
    status = trace.status
    if status is not None:
        return f"{status // 100}xx" if 100 <= status < 600 else "err"
    if trace.finished:
        return "err" if trace.error else None
    return None


class RequestStore:
    def __init__(self, max_requests: int = 50_000, *, freeze_gc: bool = True) -> None:
        if max_requests < 1:
            raise ValueError("max_requests must be at least 1")
        self.max_requests = max_requests
        self.freeze_gc = freeze_gc
        """Every :data:`FREEZE_EVERY` new requests, move what the process holds out of the
        garbage collector's sight (:func:`gc.freeze`).

        A full ring is millions of objects (traces, spans, events, attribute dicts), and
        a full collection walks all of them: 0.5 to 2 s with the UI frozen, every few
        seconds under load.  Traces hold no reference cycles, so reference counting
        frees them when they leave the ring, frozen or not; what freezing costs is
        cyclic garbage that already reached the oldest generation at that moment, which
        stays until the process ends.  Young generations are collected first, so that
        is little."""
        self.filter: Predicate | None = None
        self.filter_text = ""
        self._seq = 0  # never reset: a clear must not make old arrival numbers valid again
        self._reset()

    def _reset(self) -> None:
        self.builder = TraceBuilder(max_traces=self.max_requests)
        self.rows: OrderedDict[str, Row] = OrderedDict()
        """Every trace held, in arrival order (mirrors ``builder.traces``)."""
        self.view: list[Row] = []
        self._view_seqs: list[int] = []
        self.counts: Counter[str] = Counter()
        """Finished requests by status class since the last clear."""
        self.inflight: set[str] = set()
        self.total = 0
        """Requests seen since the last clear (evicted ones included)."""
        self._frozen_total = 0
        self.rejected = 0
        self.latest_ts = 0
        """Newest timestamp seen in any event: "now" for a replayed file."""
        self._rate: Counter[int] = Counter()
        self._rate_top = 0
        self._evicted_seen = 0
        self._undecoded = False
        """Rows of a file were filed without a filter: some summaries may hold undecoded
        details (see :func:`~hopscope.tracing.tracefile.decode_details`)."""

    # -- reading -------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.view)

    def __getitem__(self, index: int) -> Row:
        return self.view[index]

    @property
    def dropped(self) -> int:
        """Records the emitting processes reported lost."""
        return self.builder.dropped

    def index_of(self, seq: int) -> int | None:
        """Position in the view of the row with arrival number ``seq``."""
        index = bisect.bisect_left(self._view_seqs, seq)
        if index < len(self._view_seqs) and self._view_seqs[index] == seq:
            return index
        return None

    def nearest_index(self, seq: int) -> int | None:
        """Position of ``seq`` or of the first row after it (None for an empty view)."""
        if not self.view:
            return None
        return min(bisect.bisect_left(self._view_seqs, seq), len(self.view) - 1)

    def get(self, trace_id: str) -> Row | None:
        return self.rows.get(trace_id)

    def rate_series(self, now_s: int | None = None, window: int = RATE_WINDOW) -> list[float]:
        """Requests started per second, oldest first, ending at ``now_s`` (or the newest)."""
        top = max(self._rate_top, now_s or 0)
        return [float(self._rate.get(second, 0)) for second in range(top - window + 1, top + 1)]

    # -- writing ---------------------------------------------------------------------

    def ingest(self, events: Iterable[Any], change: Change | None = None) -> Change:
        """Fold wire events in; ``change`` accumulates across calls within one UI tick.

        Besides events (dicts), ``events`` may hold a file's rows bare: a
        :class:`~hopscope.tracing.tracefile.SummarisedTrace` is short for ``{"kind":
        TRACE, "trace": it}`` (a hundred thousand dicts less to make and read)."""
        change = change if change is not None else Change()
        builder = self.builder
        touched: dict[str, Trace] = {}
        fresh: list[Trace] = []
        traces = builder.traces
        latest = self.latest_ts
        rejected = change.rejected
        events = events if type(events) is list else list(events)
        change.events += len(events)
        summarised = SummarisedTrace
        for event in events:
            if type(event) is summarised:  # a file's row: nearly all of a big file
                trace_id = event.trace_id
                if not touched and trace_id not in traces:
                    traces[trace_id] = event  # see TRACE below
                    fresh.append(event)
                else:
                    latest = max(latest, self._adopt(event))
                    touched[trace_id] = event
                continue
            try:
                kind = event.get("kind")
                if kind == TRACE:  # first: a file's rows are nearly all of these
                    trace = event["trace"]
                    trace_id = trace.trace_id
                    if not touched and trace_id not in traces:
                        # A new trace with nothing folded before it in this batch (a
                        # file's rows, thousands a batch): its row is made in one pass
                        # over all of them (_file), before those of the traces touched.
                        traces[trace_id] = trace
                        fresh.append(trace)
                        continue
                    latest = max(latest, self._adopt(trace, event.get("replace", False)))
                    touched[trace.trace_id] = trace
                    continue
                if kind == "notice":
                    change.notices.append(event)
                    continue
                if kind == "reset":
                    self._reset()
                    builder, traces, touched = self.builder, self.builder.traces, {}
                    fresh = []
                    latest, rejected = 0, change.rejected
                    change.reset = change.view_changed = True
                    change.touched.clear()
                    continue
                is_new = event.get("trace_id") not in traces
                trace = builder.add(event)
            except (AttributeError, KeyError, TypeError, ValueError):
                change.rejected += 1  # not an event at all, or one the model refuses
                continue
            if trace is None:
                continue
            ts: int = event["ts"]
            if ts > latest:
                latest = ts
            if is_new:
                # Counted here, not when its row is made: a burst larger than the ring
                # can evict a trace before the batch ends.
                self._count_new(ts)
            touched[trace.trace_id] = trace
        if fresh:
            latest = max(latest, self._file(fresh))
        self.latest_ts = latest
        self.rejected += change.rejected - rejected
        if builder.evicted != self._evicted_seen:
            self._evicted_seen = builder.evicted
            self._drop_evicted(change)
        if fresh:
            self._file_rows(fresh, change)
        for trace_id, trace in touched.items():
            if builder.traces.get(trace_id) is not trace:
                continue  # came and went within this batch
            row = self.rows.get(trace_id)
            if row is None:
                row = self._new_row(trace)
                if self._matches(trace):
                    self._append(row, change)
            else:
                row.version += 1
                if self.filter is not None:
                    self._refilter(row, change)
            self._account(trace_id, row)
            change.touched.add(trace_id)
        if self.freeze_gc and self.total - self._frozen_total >= FREEZE_EVERY:
            self._frozen_total = self.total
            if gc.isenabled():
                # Off means a file source is loading (it turns collection off while it
                # reads): then everything allocated since the last freeze is young, the
                # traces waiting in the inbox included, and walking all that every few
                # thousand requests took a tenth of the time a big file took to open.
                gc.collect(1)
            gc.freeze()
        return change

    def _adopt(self, trace: Trace, replace: bool = False) -> int:
        """Take a trace a source already assembled (see :data:`TRACE`); returns its newest
        timestamp.  With ``replace`` it takes the place of the one held by that id (a
        newer summary of it), keeping its row."""
        newest = trace.latest_ts()
        builder = self.builder
        traces = builder.traces
        if trace.trace_id in traces:
            if replace:
                traces[trace.trace_id] = trace
                row = self.rows.get(trace.trace_id)
                if row is not None:
                    if row.counted:
                        key = status_class(row.trace) or "err"
                        self.counts[key] -= 1
                        if self.counts[key] <= 0:
                            del self.counts[key]
                        row.counted = False
                    row.trace = trace
                return newest
            for wire in trace_events(trace):  # not from FileSource; fold it into the one held
                builder.add(wire)
            return newest
        traces[trace.trace_id] = trace
        if builder.max_traces is not None and len(traces) > builder.max_traces:
            traces.popitem(last=False)
            builder.evicted += 1
        self._count_new(trace.info.start or newest)
        return newest

    def _file(self, fresh: list[Trace]) -> int:
        """Count new traces a source assembled (``ingest`` put them in the builder
        already) and keep the ring bounded; returns their newest timestamp.  What
        :meth:`_adopt` does for one, for a whole batch of a file's rows at once."""
        latest = 0
        rate = self._rate
        top = self._rate_top
        seconds: list[int] = []  # for one Counter.update
        append = seconds.append
        for trace in fresh:
            # A file's row knows its newest timestamp and summary already: read, not
            # called for (two calls of a hundred thousand less).
            if type(trace) is SummarisedTrace:
                newest = trace.newest
                info = trace._info or trace.info
            else:
                newest = trace.latest_ts()
                info = trace.info
            if newest > latest:
                latest = newest
            append((info.start or newest) // 1_000_000_000)
        if seconds:
            rate.update(seconds)
            top = max(top, max(seconds))
        self.total += len(fresh)
        if top > self._rate_top:
            self._rate_top = top
            if len(rate) > RATE_WINDOW * 2:
                floor = top - RATE_WINDOW
                for old in [s for s in rate if s <= floor]:
                    del rate[old]
        builder = self.builder
        traces = builder.traces
        if builder.max_traces is not None:
            while len(traces) > builder.max_traces:
                traces.popitem(last=False)  # their rows go in _drop_evicted
                builder.evicted += 1
        return latest

    def _file_rows(self, fresh: list[Trace], change: Change) -> None:
        """Make the rows of the traces :meth:`_file` took (those still held), as the end
        of :meth:`ingest` does for a touched trace, without its per-trace bookkeeping:
        a big file opens at a few microseconds per request here."""
        traces = self.builder.traces
        rows = self.rows
        view, seqs = self.view, self._view_seqs
        predicate = self.filter
        matches = self._matches
        if predicate is not None:
            decode_details([trace.info for trace in fresh])  # see set_filter
        else:
            self._undecoded = True
        new_row = Row.__new__
        classes = _STATUS_CLASS
        statuses: list[int] = []  # of finished requests, for one Counter (few distinct)
        finished: list[str] = []  # the status classes of the others
        running: list[str] = []
        seq = self._seq
        appended = 0
        for trace in fresh:
            trace_id = trace.trace_id
            current = traces.get(trace_id)  # another may have replaced it in the batch
            if current is None:
                # Evicted by the rest of its batch (a file bigger than the ring): no
                # row, but a finished request all the same.
                info = trace.info
                if info.end is not None:
                    finished.append(_status_key(info, trace))
                continue
            if trace_id in rows:
                continue
            seq += 1
            # Row(seq, current), without the call of its __init__ (a tenth of this loop).
            row = rows[trace_id] = new_row(Row)
            row.seq, row.trace, row.version = seq, current, 0
            if predicate is None or matches(current):
                seqs.append(seq)  # the newest arrival number: the view's end
                view.append(row)
                appended += 1
            info = current._info or current.info  # see _file
            if info.end is not None:
                row.counted = True
                status = info.status
                if type(status) is int and status in classes:
                    statuses.append(status)
                else:
                    finished.append(_status_key(info, current))
            else:
                row.counted = False
                running.append(trace_id)
        self._seq = seq
        if statuses:
            counts = self.counts
            for status, count in Counter(statuses).items():
                counts[classes[status]] += count
        if finished:
            self.counts.update(finished)
        if running:
            self.inflight.update(running)
        if appended:
            change.appended += appended
            change.view_changed = True
        change.touched.update([trace.trace_id for trace in fresh])

    def _new_row(self, trace: Trace) -> Row:
        self._seq += 1
        row = self.rows[trace.trace_id] = Row(self._seq, trace)
        return row

    def _count_new(self, ts: int) -> None:
        self.total += 1
        second = ts // 1_000_000_000
        self._rate[second] += 1
        if second > self._rate_top:
            self._rate_top = second
            if len(self._rate) > RATE_WINDOW * 2:
                floor = second - RATE_WINDOW
                for old in [s for s in self._rate if s <= floor]:
                    del self._rate[old]

    def _account(self, trace_id: str, row: Row) -> None:
        trace = row.trace
        if trace.finished:
            self.inflight.discard(trace_id)
            if not row.counted:
                row.counted = True
                self.counts[status_class(trace) or "err"] += 1
        else:
            self.inflight.add(trace_id)

    def _drop_evicted(self, change: Change) -> None:
        alive = self.builder.traces
        rows = self.rows
        view = self.view
        while rows:
            trace_id, row = next(iter(rows.items()))
            if alive.get(trace_id) is row.trace:
                break
            rows.popitem(last=False)
            self.inflight.discard(trace_id)
        # Eviction takes the oldest traces, so the dead rows of the view are a prefix.
        dead = 0
        while dead < len(view) and rows.get(view[dead].trace.trace_id) is not view[dead]:
            dead += 1
        if dead:
            del view[:dead]
            del self._view_seqs[:dead]
            change.view_changed = True

    def _matches(self, trace: Trace) -> bool:
        predicate = self.filter
        if predicate is None:
            return True
        try:
            return bool(predicate(trace))
        except Exception:  # a filter bug must not stop ingestion
            return False

    def _append(self, row: Row, change: Change) -> None:
        seqs = self._view_seqs
        if not seqs or seqs[-1] < row.seq:
            seqs.append(row.seq)
            self.view.append(row)
        else:
            index = bisect.bisect_left(seqs, row.seq)
            seqs.insert(index, row.seq)
            self.view.insert(index, row)
        change.appended += 1
        change.view_changed = True

    def _refilter(self, row: Row, change: Change) -> None:
        index = self.index_of(row.seq)
        matches = self._matches(row.trace)
        if matches and index is None:
            self._append(row, change)
        elif not matches and index is not None:
            del self.view[index]
            del self._view_seqs[index]
            change.view_changed = True

    def set_filter(self, predicate: Predicate | None, text: str = "") -> None:
        """Apply a new filter to every held trace (None shows everything)."""
        self.filter = predicate
        self.filter_text = text if predicate is not None else ""
        if predicate is None:
            self.view = list(self.rows.values())
        else:
            if self._undecoded:
                # A file's rows keep what only filters read undecoded: all of it at once
                # now, rather than row by row as the filter reads it.
                decode_details([row.trace.info for row in self.rows.values()])
                self._undecoded = False
            self.view = [row for row in self.rows.values() if self._matches(row.trace)]
        self._view_seqs = [row.seq for row in self.view]

    def clear(self) -> None:
        """Forget every request (the filter stays)."""
        self._reset()

    # -- export ----------------------------------------------------------------------

    def export_events(self, rows: Iterable[Row] | None = None) -> list[Event]:
        """Wire events that rebuild the held traces (or ``rows``) when loaded.

        Copies what can still change, so the result can be written from another thread
        while ingestion goes on.
        """
        events: list[Event] = []
        for row in self.rows.values() if rows is None else rows:
            events.extend(trace_events(row.trace))
        if self.builder.dropped:
            dropped = self.builder.dropped
            events.append({"kind": "dropped", "ts": self.latest_ts, "count": dropped, "attrs": {}})
        return events


def trace_events(trace: Trace) -> list[Event]:
    """Wire events that assemble into ``trace`` again.

    Start and end attributes are merged in the model, so all of a span's attributes go
    on its start (or on its end when its start never arrived).
    """
    events: list[Event] = []
    spans = sorted(trace.spans.values(), key=lambda s: s.start or s.end or 0)
    for span in spans:
        ids = {"trace_id": trace.trace_id, "span_id": span.span_id}
        if span.start is not None:
            events.append(
                {
                    "kind": "span_start",
                    "ts": span.start,
                    **ids,
                    "parent_id": span.parent_id,
                    "hop": span.hop,
                    "name": span.name,
                    "attrs": dict(span.attrs),
                }
            )
        for event in list(span.events):
            events.append(
                {
                    "kind": "event",
                    "ts": event.ts,
                    **ids,
                    "name": event.name,
                    "attrs": event.attrs,
                }
            )
        if span.end is not None:
            end: Event = {"kind": "span_end", "ts": span.end, **ids, "attrs": {}}
            if span.start is None:
                end["attrs"] = dict(span.attrs)
                end["name"] = span.name
            events.append(end)
    return events
