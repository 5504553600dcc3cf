"""A summarised file bigger than the UI's ring: the file source keeps only the rows the
ring can still show for the background decode, not every row it ever read."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from hopscope.tracing import tracefile
from hopscope.tracing.tracefile import SummarisedTrace, TraceFileWriter
from hopscope.tui.source import FileSource
from uitools import request_events

REQUESTS = 1_200
KEEP = 300


def _decoded(trace: SummarisedTrace) -> bool:
    return getattr(trace.info, "_detail", None) is None


def _open(path: Path, keep: int | None) -> list[SummarisedTrace]:
    writer = TraceFileWriter.create(path, grace=0.0)
    for n in range(REQUESTS):
        writer.write(request_events(n))
    writer.close()
    rows: list[SummarisedTrace] = []
    lock = threading.Lock()

    def deliver(events: list[Any]) -> None:
        with lock:
            rows.extend(e for e in events if isinstance(e, SummarisedTrace))

    source = FileSource(path, batch_size=100, keep=keep)
    source.start(deliver)
    try:
        assert source.done.wait(30)
        assert source._thread is not None
        source._thread.join(30)  # the background decode ends the source's thread
        assert not source._thread.is_alive()
    finally:
        source.stop()
    assert len(rows) == REQUESTS
    return rows


def test_rows_past_the_ring_are_let_go_before_the_decode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tracefile, "_SCAN_BYTES", 16_384)  # parts of some 50 rows
    rows = _open(tmp_path / "big.jsonl", KEEP)
    assert all(_decoded(trace) for trace in rows[-KEEP:])
    # Whole parts of the file that only held evicted rows were let go undecoded.
    assert not any(_decoded(trace) for trace in rows[: REQUESTS - 2 * KEEP])
    # A row read on its own still decodes its detail (a filter over it would).
    assert "\nx-user\x000\n" in rows[0].info.header_text


def test_without_a_ring_every_row_is_decoded(tmp_path: Path) -> None:
    rows = _open(tmp_path / "all.jsonl", None)
    assert all(_decoded(trace) for trace in rows)
