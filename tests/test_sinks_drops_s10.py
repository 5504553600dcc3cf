"""Dropped records are counted when a collector dies with frames waiting (session 10).

Each frame a :class:`SocketSink` sends reports the drops since the frame before it.
When the collector stops reading, frames wait in the sink; when it is then killed (or
restarted), those frames never arrive whole, so their records are counted as dropped,
and the drops they reported must go with the first frame to the next collector.  They
did not: the collector never heard of them.  The collectors here are real processes on
a real socket (a raw frame reader, so that one can read nothing for a while), killed
and started again on the same address; the check is the one a user makes: records
received plus drops reported is what the app emitted, and ``sink.dropped`` agrees.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from frames import ProcessCollector, ThreadCollector, Unrecordable, fill, listener, record
from hopscope.tracing import MemorySink, SocketSink

#: Queued records at most: a small queue, so that a send in progress makes drops.
MAX_QUEUE = 64


def _frames_wait_with_drops(sink: SocketSink) -> int:
    """Fill the socket (the collector reads nothing) until frames wait in the sink, then
    drop records while a send is in progress, so that the next frame, which waits too,
    reports drops.  How many records were emitted."""
    emitted = fill(sink)
    # A send in progress (another thread's, whose socket is full): a request never waits
    # for it, so past a full queue its records are dropped.
    with sink._drain_lock:
        for _ in range(MAX_QUEUE + 10):
            sink.emit(record(emitted))
            emitted += 1
    drops = sink.dropped
    assert drops >= 10
    sink.emit(record(emitted))  # sends the queue: a frame that reports those drops
    emitted += 1
    assert len(sink._pending) >= 2 and sink.dropped == drops
    return emitted


@pytest.mark.parametrize("family", ["tcp", "unix"])
@pytest.mark.parametrize("resume", ["flush", "emit-then-flush"])
def test_drops_reported_by_frames_lost_with_a_killed_collector_reach_the_next(
    family: str, resume: str, short_dir: Path
) -> None:
    """The frames waiting when the collector was killed were counted as dropped, but
    not the drops they reported: the next collector heard of fewer drops than the app
    made, and ``sink.dropped`` disagreed with it.  With ``flush`` (what close and exit
    do) the frames were even sent into the dead connection first, where they vanished
    without being counted at all."""
    first = ProcessCollector("hold", "0" if family == "tcp" else f"unix:{short_dir}/c.sock")
    second: ProcessCollector | None = None
    sink = SocketSink(first.url, interval=60, flush_at=1, max_queue=MAX_QUEUE)
    try:
        emitted = _frames_wait_with_drops(sink)
        # It reads what its socket holds before it is killed: bytes the kernel took
        # and a killed collector never read are lost where no sink can count them.
        before = first.report()
        first.kill()
        second = ProcessCollector("read", first.where)
        if resume == "emit-then-flush":
            sink.emit(record(emitted))  # a request finds the connection gone
            emitted += 1
        sink.flush(10)
        assert sink.connects == 2
    except BaseException:
        if second is not None:
            second.kill()
        raise
    finally:
        sink.close()
        first.kill()
    after = second.final()
    received = before["ids"] + after["ids"]
    assert len(set(received)) == len(received)  # nothing twice
    heard = before["dropped"] + after["dropped"]
    assert after["dropped"] > 10  # what waited, and the drops it reported
    assert len(received) + heard == emitted  # nothing vanished uncounted
    assert sink.dropped == heard


def test_a_send_that_fails_counts_each_dropped_record_once() -> None:
    """The connection fails at the very send of a batch holding a record that cannot be
    marshalled (counted, and reported in the batch's frame): the batch's records were
    counted again on top, that one twice, so ``sink.dropped`` said more than the
    collector then heard.  Only what the failed send lost is counted now."""
    # It keeps every connection open after reading it to its end: the sink cannot tell
    # from its socket that one is over.
    collector = ThreadCollector(listener("0"), keep_open=True)
    sink = SocketSink(collector.url, interval=60)  # sends at flush() only
    try:
        sink.emit(record(0))
        collector.wait_for(lambda: sink.connects == 1, 10)
        sink.flush(5)
        collector.wait_for(lambda: collector.ids == [0], 10)
        assert sink._sock is not None
        # The connection breaks for the sink (its next send fails) while the collector
        # says nothing (its end stays open): what a dead link looks like.
        sink._sock.shutdown(socket.SHUT_WR)
        collector.wait_for(lambda: collector.ended == 1, 10)
        sink.emit(object())  # no record at all: marshal refuses it, and its repr fallback
        sink.emit(record(1))
        sink.emit(record(2))
        sink.flush(5)
        assert sink.connects == 2
    finally:
        sink.close()
        collector.wait_for(lambda: collector.ended == 2, 10)
        collector.stop()
    assert collector.ids == [0]
    assert collector.dropped == 3  # the odd one, and the two its batch lost
    assert sink.dropped == 3


def test_memory_sink_records_leave_out_and_count_a_request_that_cannot_be_recorded() -> None:
    """``records()`` raised (and so ``events()`` and ``traces()``) for every request
    when one of them could not be recorded; that one is left out and counted now."""
    sink = MemorySink()
    sink.emit(record(1))
    assert sink.start_live(Unrecordable(sink))
    sink.emit(record(2))
    assert [record[1] for record in sink.records()] == [1, 2]
    assert sink.dropped == 1
    assert [record[1] for record in sink.records()] == [1, 2]
    assert sink.dropped == 1  # counted once, not at each look
    events = sink.events()
    assert [e["count"] for e in events if e["kind"] == "dropped"] == [1]
    assert len([e for e in events if e["kind"] == "event"]) == 2
    sink.traces()
    sink.clear()
    assert sink.records() == [] and sink.events() == [] and sink.dropped == 0
