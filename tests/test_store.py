"""The request store's memory habits: what it asks of the garbage collector, and that
summaries it keeps follow the traces."""

from __future__ import annotations

import gc
import json
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hopscope.tracing import load
from hopscope.tracing.filters import parse
from hopscope.tracing.model import Trace, TraceBuilder
from hopscope.tracing.tracefile import TraceFileWarning, header_line
from hopscope.tui import store as store_module
from hopscope.tui.source import FileSource
from hopscope.tui.store import RequestStore
from uitools import request_events as request

Event = dict[str, Any]
T0 = 1_735_732_800_000_000_000


class Marker:
    """An attribute value that can tell, through a weak reference, when it was freed."""


@pytest.fixture
def unfreeze() -> Iterator[None]:
    """Whatever a test froze goes back to the collector, not to the next test."""
    yield
    gc.unfreeze()


def test_the_store_freezes_what_it_holds_every_few_thousand_requests(
    monkeypatch: pytest.MonkeyPatch, unfreeze: None
) -> None:
    monkeypatch.setattr(store_module, "FREEZE_EVERY", 10)
    gc.unfreeze()
    store = RequestStore(max_requests=5)
    store.ingest(request(0))
    assert gc.get_freeze_count() == 0
    store.ingest([e for n in range(1, 12) for e in request(n)])
    assert gc.get_freeze_count() > 0


def test_frozen_traces_are_still_freed_when_they_leave_the_ring(
    monkeypatch: pytest.MonkeyPatch, unfreeze: None
) -> None:
    monkeypatch.setattr(store_module, "FREEZE_EVERY", 3)
    store = RequestStore(max_requests=5)
    marker = Marker()
    gone = weakref.ref(marker)
    store.ingest(request(0, marker=marker))
    del marker
    for n in range(1, 10):  # freezes along the way, with request 0 still held
        store.ingest(request(n))
    assert gc.get_freeze_count() > 0
    assert store.get(f"{1:032x}") is None  # evicted...
    assert gone() is None  # ...and freed by reference counting, frozen or not


def test_while_collection_is_off_the_store_freezes_without_collecting(
    monkeypatch: pytest.MonkeyPatch, unfreeze: None
) -> None:
    # A file source turns collection off while it loads: walking the young objects then
    # (every batch in flight included) cost a fifth of the time a big file took to open.
    monkeypatch.setattr(store_module, "FREEZE_EVERY", 10)
    collected: list[int] = []
    monkeypatch.setattr(store_module.gc, "collect", lambda generation=2: collected.append(1))
    gc.unfreeze()
    store = RequestStore(max_requests=50)
    gc.disable()
    try:
        store.ingest([e for n in range(12) for e in request(n)])
    finally:
        gc.enable()
    assert gc.get_freeze_count() > 0 and collected == []
    store.ingest([e for n in range(12, 24) for e in request(n)])
    assert collected == [1]


def test_a_store_told_not_to_never_freezes(monkeypatch: pytest.MonkeyPatch, unfreeze: None) -> None:
    monkeypatch.setattr(store_module, "FREEZE_EVERY", 2)
    gc.unfreeze()
    store = RequestStore(max_requests=5, freeze_gc=False)
    store.ingest([e for n in range(20) for e in request(n)])
    assert gc.get_freeze_count() == 0


def test_counts_and_filters_follow_a_request_that_finishes_later() -> None:
    store = RequestStore(freeze_gc=False)
    first = request(1)
    store.ingest(first[:1])
    assert len(store.inflight) == 1 and not store.counts
    store.set_filter(parse("status:2xx and header:x-user=1").test, "status:2xx")
    assert len(store) == 0
    store.ingest(first[1:])
    assert not store.inflight and store.counts == {"2xx": 1}
    assert len(store) == 1
    assert store[0].trace.info.headers == (("host", "example.com"), ("x-user", "1"))
    assert store[0].trace.info.header_text == "\nhost\0example.com\nx-user\x001\n"


def write_trace_file(path: Path, events: list[Event]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        handle.write(header_line())
        for event in events:
            handle.write(json.dumps(event) + "\n")


@pytest.mark.parametrize("batch_size", [1, 3, 5_000])
def test_a_file_source_hands_over_traces_that_equal_what_load_reads(
    tmp_path: Path, batch_size: int
) -> None:
    # Requests overlap (each one's end comes after the next one's start), so with small
    # batches a trace is handed over before its last events, which follow as events.
    events: list[Event] = []
    for n in range(12):
        events += request(n, status=200 if n % 3 else 500)[:1]
        if n:
            events += request(n - 1, status=200 if (n - 1) % 3 else 500)[1:]
    events.append({"kind": "dropped", "ts": T0, "count": 4, "attrs": {}})
    events.append({"kind": "span_end", "ts": "soon", "trace_id": "ab", "span_id": "cd"})
    path = tmp_path / "trace.jsonl"
    write_trace_file(path, events)
    batches: list[list[Event]] = []
    gated: list[int] = []
    source = FileSource(path, batch_size=batch_size, gate=gated.append)
    source.start(batches.append)
    assert source.done.wait(10)
    assert gc.isenabled()  # the source turned collection off while reading, and back on
    assert gated == list(range(1, len(events) // batch_size + 1))
    assert source.progress() == 1.0 and source.requests == 12
    store = RequestStore(freeze_gc=False)
    for batch in batches:
        store.ingest(batch)
    held = [row.trace for row in store.rows.values()]
    with pytest.warns(TraceFileWarning, match="skipped 1 malformed line"):
        assert held == load(path)
    assert [trace.status for trace in held] == [500, 200, 200] * 3 + [500, 200, None]
    assert len(store.inflight) == 1  # the last request never ended
    assert store.counts == {"2xx": 7, "5xx": 4}
    assert store.dropped == 4 and store.rejected == 1
    assert store.latest_ts == max(e["ts"] for e in events if isinstance(e["ts"], int))
    assert sum(store.rate_series()) == 12


def assembled(n: int, status: int | None = 200) -> Trace:
    builder = TraceBuilder()
    for event in request(n, status=status):
        builder.add(event)
    return builder.traces[f"{n + 1:032x}"]


def store_state(store: RequestStore) -> dict[str, Any]:
    # Arrival numbers themselves may differ (a trace evicted within its batch may never
    # get one): their order is what must hold.
    seqs = [row.seq for row in store.rows.values()]
    assert seqs == sorted(set(seqs))
    assert store._view_seqs == [row.seq for row in store.view]
    assert all(store.rows[row.trace.trace_id] is row for row in store.view)
    return {
        "rows": [(trace_id, row.trace, row.counted) for trace_id, row in store.rows.items()],
        "builder": list(store.builder.traces),
        "view": [row.trace.trace_id for row in store.view],
        "counts": dict(store.counts),
        "inflight": sorted(store.inflight),
        "total": store.total,
        "latest_ts": store.latest_ts,
        "rates": store.rate_series(),
    }


def test_a_batch_of_new_traces_files_as_their_events_would() -> None:
    # A file's rows come as batches of whole traces (the store's fast path): bounded by
    # the ring, counted, filtered and in arrival order just as the same requests folded
    # from their events, also when a batch replaces one of them or continues one.
    fast, folded = RequestStore(5, freeze_gc=False), RequestStore(5, freeze_gc=False)
    for store in (fast, folded):
        store.set_filter(parse("status:2xx").test, "status:2xx")
    statuses = [200, 500, None, 200, 404, 201, None, None, 200, 200]

    def trace_event(n: int, status: int | None = -1, **flags: Any) -> Event:
        trace = assembled(n, statuses[n] if status == -1 else status)
        return {"kind": "trace", "trace": trace, **flags}

    first = [trace_event(n) for n in range(8)]
    first.append(trace_event(6, 200, replace=True))  # a newer summary, in the same batch
    first += request(7, status=500)[1:]  # an event for one of them
    first.append(trace_event(8))  # a new one after that
    fast.ingest(first)
    for n in range(8):
        folded.ingest(request(n, status=statuses[n])[:1])
        if statuses[n] is not None:
            folded.ingest(request(n, status=statuses[n])[1:])
    folded.ingest(request(6, status=200)[1:])
    folded.ingest(request(7, status=500)[1:])
    folded.ingest(request(8))
    assert store_state(fast) == store_state(folded)
    assert len(fast.rows) == 5 and fast.builder.evicted == 4
    second = [trace_event(9), trace_event(8, replace=True)]
    fast.ingest(second)
    folded.ingest(request(9))
    assert store_state(fast) == store_state(folded)
    assert [row.trace.trace_id for row in fast.view] == [f"{n + 1:032x}" for n in (5, 6, 8, 9)]
    assert fast.counts == {"2xx": 6, "4xx": 1, "5xx": 2}


def test_a_reset_within_a_batch_forgets_the_new_traces_before_it() -> None:
    store = RequestStore(freeze_gc=False)
    store.ingest([{"kind": "trace", "trace": assembled(n)} for n in range(3)])
    batch: list[Event] = [{"kind": "trace", "trace": assembled(n)} for n in range(3, 6)]
    batch += [{"kind": "reset"}, {"kind": "trace", "trace": assembled(6, 500)}]
    change = store.ingest(batch)
    assert change.reset
    assert list(store.rows) == [f"{7:032x}"] and [row.trace.trace_id for row in store.view] == [
        f"{7:032x}"
    ]
    assert store.total == 1 and store.counts == {"5xx": 1}
    assert sum(store.rate_series()) == 1
