"""Where the UI's events come from, and how they cross into the UI thread.

A source pushes lists of wire events from any thread; the UI never waits for it.  The
:class:`Inbox` between them is the only shared state: sources append whole lists under a
lock, and the UI's timer takes them out in slices, so one message or call per event never
reaches the event loop however fast events come.

Besides wire events a source may deliver a *notice*, ``{"kind": "notice", "message": str,
"severity": "information" | "warning" | "error"}``, which the UI shows as a notification:
that is how a file source says it could not read part of its file.
"""

from __future__ import annotations

import bisect
import gc
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from typing import Any, Protocol, runtime_checkable

from hopscope.tracing.model import TraceBuilder
from hopscope.tracing.tracefile import (
    SUMMARY_CUT_OFF,
    LoadReport,
    SummarisedTrace,
    SummaryScan,
    TraceFileError,
    decode_details,
    read_chunks,
    read_events,
)

from .store import TRACE

__all__ = [
    "EventSource",
    "FileSource",
    "Inbox",
    "PlaybackSource",
    "QueueSource",
    "har_events",
    "notice",
    "open_file",
]

Event = dict[str, Any]
Deliver = Callable[[list[Event]], None]


@runtime_checkable
class EventSource(Protocol):
    """What the UI needs from a source of wire events."""

    def describe(self) -> str:
        """Where events come from, for the header: ``live 127.0.0.1:7401``, a file name."""
        ...

    def start(self, deliver: Deliver) -> None:
        """Begin delivering; ``deliver`` may be called from any thread and returns quickly.

        The source must not change a list after handing it to ``deliver``.
        """
        ...

    def stop(self) -> None:
        """Stop delivering; called once when the UI closes."""
        ...


def notice(message: str, severity: str = "information") -> Event:
    """A pseudo-event the UI shows as a notification instead of folding into a trace."""
    return {"kind": "notice", "message": message, "severity": severity}


class Inbox:
    """Thread-safe hand-off from sources to the UI timer.

    ``deliver`` never blocks the UI thread.  For a live source it never blocks at all:
    past ``limit`` pending events (the UI is paused, or cannot keep up) new lists are
    dropped and counted, because a stalled collector would make the apps drop instead,
    and unbounded memory is worse than a visible gap.  A replay (``block=True``) loses
    nothing: its reader waits while more than ``high_water`` events are pending, so a big
    file is read at the speed the UI folds it.
    """

    def __init__(
        self, *, block: bool = False, high_water: int = 100_000, limit: int = 1_000_000
    ) -> None:
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._chunks: deque[list[Event]] = deque()
        self._offset = 0  # how much of the first chunk was already taken
        self._pending = 0
        self._high_water = high_water
        self._limit = limit
        self._closed = False
        self.block = block
        self.ui_thread: int | None = None
        """Calls from this thread never wait (the UI must not block on itself)."""
        self.dropped = 0
        """Events refused because the inbox was full."""

    @property
    def pending(self) -> int:
        return self._pending

    def deliver(self, events: list[Event]) -> None:
        if not events:
            return
        with self._lock:
            if self.block and threading.get_ident() != self.ui_thread:
                while not self._closed and (
                    self._pending > self._high_water
                    or (self._pending and self._pending + len(events) > self._limit)
                ):
                    self._drained.wait(0.5)
            if self._closed:
                return
            if self._pending + len(events) > self._limit:
                self.dropped += len(events)
                return
            self._chunks.append(events)
            self._pending += len(events)

    def take(self, max_events: int) -> list[Event]:
        """Up to ``max_events`` of the oldest pending events (an empty list when none)."""
        with self._lock:
            chunks = self._chunks
            if not chunks:
                return []
            head = chunks[0]
            if (self._offset == 0 and len(head) >= max_events) or len(chunks) == 1:
                taken = self._slice(max_events)
            else:
                taken = []
                while chunks and len(taken) < max_events:
                    taken += self._slice(max_events - len(taken))
            self._pending -= len(taken)
            if self._pending <= self._high_water:
                self._drained.notify_all()
            return taken

    def _slice(self, count: int) -> list[Event]:
        """Up to ``count`` events of the first chunk (the chunk itself when it all fits)."""
        head = self._chunks[0]
        start = self._offset
        if start == 0 and len(head) <= count:
            self._chunks.popleft()
            return head
        taken = head[start : start + count]
        self._offset = start + len(taken)
        if self._offset >= len(head):
            self._chunks.popleft()
            self._offset = 0
        return taken

    def close(self) -> None:
        """Refuse further events and release any waiting producer."""
        with self._lock:
            self._closed = True
            self._chunks.clear()
            self._offset = 0
            self._pending = 0
            self._drained.notify_all()


class QueueSource:
    """A source anything can :meth:`push` events into, from any thread.

    Events pushed before the UI starts are kept and delivered on start; events pushed
    after :meth:`stop` are ignored.
    """

    def __init__(self, description: str = "live", *, live: bool = True) -> None:
        self.description = description
        """What :meth:`describe` says (settable until the UI starts)."""
        self.live = live
        """True when events describe requests happening now (in-flight bars grow with
        the wall clock); False for replays."""
        self._lock = threading.Lock()
        self._deliver: Deliver | None = None
        self._early: list[list[Event]] = []
        self._stopped = False

    def describe(self) -> str:
        return self.description

    def start(self, deliver: Deliver) -> None:
        with self._lock:
            self._deliver = deliver
            early, self._early = self._early, []
        for events in early:
            deliver(events)

    def push(self, events: Iterable[Event]) -> None:
        batch = list(events)
        if not batch:
            return
        with self._lock:
            if self._stopped:
                return
            deliver = self._deliver
            if deliver is None:
                self._early.append(batch)
                return
        deliver(batch)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._deliver = None
            self._early = []


class FileSource:
    """Replays a trace file, read and assembled into traces in a background thread, and
    delivered in batches (see :func:`_hand_over`).

    The UI shows each batch as it comes, so the first screen of a big file is there
    long before the last line is read; :meth:`progress` says how far reading got.  A
    file with summaries is delivered as its rows, each a
    :class:`~hopscope.tracing.tracefile.SummarisedTrace` handed over bare (see
    :meth:`RequestStore.ingest <hopscope.tui.store.RequestStore.ingest>`).

    The header is checked when the source is made, so a file that cannot be read at all
    fails with a one-line :class:`~hopscope.tracing.TraceFileError` before any UI starts.

    ``gate``, when given, is called in the source's thread after each batch it delivered,
    with the number of batches so far: a test holds the load there to look at the UI
    mid-way, deterministically.
    """

    live = False

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        batch_size: int = 5_000,
        gate: Callable[[int], object] | None = None,
        keep: int | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.batch_size = batch_size
        self.gate = gate
        self.keep = keep
        self.report = LoadReport()
        # A pipe (``hopscope view <(zcat t.jsonl.gz)``) can be read once, front to back:
        # not scanned for summaries (that opens the file again and seeks), but folded.
        self._scan: SummaryScan | None = (
            SummaryScan(self.path, self.report) if _regular_file(self.path) else None
        )
        self._chunks: Iterator[list[Event]] | None = None
        self._first: list[Event] | None = None
        if self._scan is None or not self._scan.may_have_summaries:
            self._scan = None
            self._fold_from_start()
        try:
            self.size = os.path.getsize(self.path)
        except OSError:
            self.size = 0
        self.requests = 0
        """Traces handed over so far."""
        self._rows: deque[list[tuple[SummarisedTrace, bool]]] = deque()
        """The rows made from summaries, a part of the file each: at most the parts
        that hold the last ``keep`` rows (what the UI's ring can still show), so a file
        bigger than the ring does not keep its evicted rows alive until they are decoded."""
        self._kept = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.done = threading.Event()
        """Set once the whole file was delivered (or reading stopped)."""

    def _fold_from_start(self) -> None:
        """Read the file the way that works for any file: every event, folded."""
        self.report = LoadReport()
        self._chunks = read_chunks(self.path, self.report)
        try:
            self._first = next(self._chunks)
        except StopIteration:
            self._first = None

    def progress(self) -> float:
        """How much of the file was read, 0.0 to 1.0 (1.0 once done)."""
        if self.done.is_set() or self.size <= 0:
            return 1.0
        return min(self.report.bytes_read / self.size, 1.0)

    def describe(self) -> str:
        return os.path.basename(self.path) or self.path

    def start(self, deliver: Deliver) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(deliver,), name="hopscope-file-source", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(2.0)

    def _run(self, deliver: Deliver) -> None:
        if self._read(deliver):
            self._decode_details(deliver)

    def _decode_details(self, deliver: Deliver) -> None:
        """Decode what the rows of a summarised file left undecoded (the header text,
        bodies and hops only filters read, see
        :func:`~hopscope.tracing.tracefile.decode_details`) once the UI filed them all, a
        part at a time: so the first filter typed after the file opened does not wait
        for all of it, and the file opens no later for it (one GIL)."""
        inbox = getattr(deliver, "__self__", None)
        while isinstance(inbox, Inbox) and inbox.pending:
            if self._stop.wait(0.05):
                return
        if self._stop.wait(DETAILS_AFTER):
            return
        collecting = gc.isenabled()
        gc.disable()  # (what it makes lives on, as the rows do: see _read)
        try:
            for traces in self._rows:
                decode_details([trace.info for trace, _ in traces])
                if self._stop.is_set():
                    return
                time.sleep(0)  # let the UI thread in between
            self._rows.clear()
            self._kept = 0
        finally:
            if collecting:
                gc.freeze()
                gc.enable()

    def _read(self, deliver: Deliver) -> bool:
        """Deliver the file; True when that was from its summaries."""
        # While the file is read, a million new objects that all live on would make the
        # garbage collector walk them again and again (as in tracing.load); the store
        # freezes what it holds every few thousand requests meanwhile.
        collecting = gc.isenabled()
        gc.disable()
        try:
            if self._scan is not None:
                if self._run_summaries(self._scan, deliver):
                    self._finish(deliver)
                    return True
                if self._stop.is_set():
                    return False
                # Some events are in no summary: fold the file after all, from scratch.
                self._rows.clear()
                self._kept = 0
                if self.requests:
                    deliver([RESET])
                    self.requests = 0
                self._fold_from_start()
            assert self._chunks is not None
            chunks = self._chunks if self._first is None else chain([self._first], self._chunks)
            builder = TraceBuilder()
            add = builder.add
            handed: set[str] = set()
            plain: list[Event] = []
            count = batches = 0
            batch_size = self.batch_size
            for events in chunks:
                for event in events:
                    trace_id = event.get("trace_id")
                    if (
                        type(trace_id) is not str
                        or trace_id in handed
                        or event.get("kind") not in _FOLDED
                    ):
                        plain.append(event)
                    else:
                        try:
                            add(event)
                        except (AttributeError, KeyError, TypeError, ValueError):
                            plain.append(event)  # for the store to count as rejected
                    count += 1
                    if count >= batch_size:
                        _hand_over(builder, handed, plain, deliver)
                        self.requests = len(handed)
                        builder, plain, count = TraceBuilder(), [], 0
                        add = builder.add
                        batches += 1
                        if self.gate is not None:
                            self.gate(batches)
                        if self._stop.is_set():
                            return False
            _hand_over(builder, handed, plain, deliver)
            self.requests = len(handed)
            self._finish(deliver)
        except (TraceFileError, OSError) as exc:
            deliver([notice(f"{self.describe()}: {exc}", "error")])
        finally:
            if collecting:
                # What was read lives on in the store (or waits in the inbox to get
                # there): out of the collector's sight, or the first collections after
                # this would walk all of it, again for every few thousand requests the
                # UI still has to file (see RequestStore.freeze_gc).
                gc.freeze()
                gc.enable()
            self.done.set()
        return False

    def _run_summaries(self, scan: SummaryScan, deliver: Deliver) -> bool:
        """Deliver a row per summary line, without folding events; False when the file
        turned out to need folding (events no summary covers), or reading stopped."""
        batch: list[Any] = []  # events, and rows bare (see RequestStore.ingest)
        later: list[Event] = []
        batches = 0
        append = batch.append
        for traces, dropped in scan.chunks():
            self._hold(traces)
            later += dropped
            new = 0
            for trace, again in traces:
                if again:
                    append({"kind": TRACE, "trace": trace, "replace": True})
                else:
                    new += 1
                    append(trace)  # short for {"kind": TRACE, "trace": trace}
            self.requests += new
            if len(batch) >= self.batch_size or (batch and not batches):
                deliver(batch)
                batch = []
                append = batch.append
                batches += 1
                if self.gate is not None:
                    self.gate(batches)
            if self._stop.is_set():
                return False
        if not scan.complete:
            return False
        deliver(batch + later)
        return True

    def _hold(self, traces: list[tuple[SummarisedTrace, bool]]) -> None:
        rows = self._rows
        rows.append(traces)
        self._kept += len(traces)
        keep = self.keep
        if keep is not None:
            while len(rows) > 1 and self._kept - len(rows[0]) >= keep:
                self._kept -= len(rows.popleft())

    def _finish(self, deliver: Deliver) -> None:
        report = self.report
        warning = _load_warning(self.describe(), report, report.events)
        deliver([warning or notice(f"{self.describe()}: read {report.events:,} events")])


def _regular_file(path: str) -> bool:
    """False for a pipe or a device, which cannot be reopened nor seeked in."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return True  # the scan says why it cannot be opened, in its words


def _load_warning(name: str, report: LoadReport, events: int) -> Event | None:
    """The warning a file read with losses gets (malformed lines, a cut-off last line)."""
    problems = []
    if report.malformed_lines:
        problems.append(f"skipped {len(report.malformed_lines)} malformed line(s)")
    if report.truncated_last_line:
        problems.append("the last line was cut off")
    if report.summary_cut_off:
        problems.append(SUMMARY_CUT_OFF)
    if not problems:
        return None
    message = f"{name}: " + "; ".join(problems)
    return notice(f"{message}; kept {events:,} events", "warning")


_FOLDED = ("span_start", "span_end", "event")

#: Seconds after a summarised file was delivered before its rows' details are decoded
#: (:meth:`FileSource._decode_details`): the UI files the last rows first.
DETAILS_AFTER = 0.25


def _hand_over(
    builder: TraceBuilder, handed: set[str], plain: list[Event], deliver: Deliver
) -> None:
    """Deliver the traces assembled since the last call, then the other events.

    Folding and summing up happen here, in the source's thread, so the UI thread only
    files ready traces: it is not the bottleneck of opening a big file, and answers keys
    meanwhile.  A trace is never touched again once handed over: its later events (a
    request whose events straddle two batches) go to the UI as ordinary events, after it.
    """
    traces = list(builder.traces.values())
    for trace in traces:
        trace.info  # noqa: B018  (worked out now, off the UI thread)
    handed.update(builder.traces)
    batch: list[Event] = [{"kind": TRACE, "trace": trace} for trace in traces]
    if batch or plain:
        deliver(batch + plain)


#: A pseudo-event telling the UI to forget every request (a playback seeking back).
RESET: Event = {"kind": "reset"}


class PlaybackSource:
    """Plays a saved recording at its recorded pace (or ``speed`` times faster).

    Events go through ``deliver`` like live ones, from the source's own thread.  The
    position is a point in the recording's time; :meth:`pause`, :meth:`step` and
    :meth:`seek` move it from the UI thread.  Seeking back cannot take events back, so
    it delivers :data:`RESET` and then everything up to the new position again: only
    this thread delivers, so the reset always lands after what was delivered before.
    """

    live = False

    def __init__(
        self,
        events: Iterable[Event],
        name: str,
        *,
        speed: float = 1.0,
        batch_size: int = 5_000,
        tick: float = 0.05,
    ) -> None:
        if not speed > 0:
            raise ValueError("speed must be positive")
        self.name = name
        self.speed = speed
        self.batch_size = batch_size
        self.tick = tick
        stamped = list(events)
        # Stable sort on the time each event happened (untimed ones keep their place).
        times: list[int] = []
        last = 0
        for event in stamped:
            ts = event.get("ts")
            last = ts if isinstance(ts, int) else last
            times.append(last)
        order = sorted(range(len(stamped)), key=times.__getitem__)
        self._events = [stamped[i] for i in order]
        self._times = [times[i] for i in order]
        self.first_ts = self._times[0] if self._times else 0
        self.last_ts = self._times[-1] if self._times else 0
        self._cond = threading.Condition()
        self._index = 0  # next event to deliver
        self._limit = 0  # deliver up to here
        self._pos = self.first_ts
        self._paused = False
        self._reset = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.notices: list[Event] = []
        """Delivered once, first (what reading the file found wrong)."""

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, speed: float = 1.0) -> PlaybackSource:
        """A playback of a trace file or a HAR file (raises TraceFileError like
        :func:`open_file`)."""
        path = os.fspath(path)
        report = LoadReport()
        try:
            events = list(read_events(path, report))
        except TraceFileError:
            har = har_events(path)
            if har is None:
                raise
            events = har
        source = cls(events, os.path.basename(path) or path, speed=speed)
        warning = _load_warning(source.describe(), report, len(events))
        if warning is not None:
            source.notices.append(warning)
        return source

    # -- what the UI reads -----------------------------------------------------------

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def position_ns(self) -> int:
        """How far into the recording playback is."""
        return self._pos - self.first_ts

    @property
    def length_ns(self) -> int:
        return self.last_ts - self.first_ts

    @property
    def delivered(self) -> int:
        """Events handed to the UI since the last reset."""
        return self._index

    def describe(self) -> str:
        return self.name

    def state(self) -> str:
        """``playing x4  0:12 / 1:30`` for the header."""
        word = "⏸ paused" if self._paused else f"▶ playing x{self.speed:g}"
        if self._index >= len(self._events) and not self._paused:
            word = "■ played"
        return f"{word}  {_clock(self.position_ns)} / {_clock(self.length_ns)}"

    # -- control, from any thread -------------------------------------------------------

    def pause(self, paused: bool = True) -> None:
        with self._cond:
            self._paused = paused
            self._cond.notify_all()

    def step(self) -> None:
        """Pause, and deliver the next request: everything up to the start of the one
        after it."""
        with self._cond:
            self._paused = True
            start = max(self._index, self._limit)
            seen = {e.get("trace_id") for e in self._events[:start]}
            fresh = 0
            end = len(self._events)
            for i in range(start, len(self._events)):
                trace_id = self._events[i].get("trace_id")
                if trace_id is not None and trace_id not in seen:
                    seen.add(trace_id)
                    fresh += 1
                    if fresh == 2:
                        end = i
                        break
            self._limit = end
            if end > 0:
                self._pos = max(self._pos, self._times[end - 1])
            self._cond.notify_all()

    def seek(self, seconds: float) -> None:
        """Move the position by ``seconds`` (back replays from the start, see above)."""
        with self._cond:
            target = self._pos + int(seconds * 1_000_000_000)
            target = min(max(target, self.first_ts), self.last_ts)
            limit = bisect.bisect_right(self._times, target)
            if limit < max(self._index, self._limit):
                self._reset = True
                self._index = 0
            self._limit = limit
            self._pos = target
            self._cond.notify_all()

    # -- EventSource ---------------------------------------------------------------------

    def start(self, deliver: Deliver) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(deliver,), name="hopscope-playback", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(2.0)

    def _run(self, deliver: Deliver) -> None:
        if self.notices:
            deliver(list(self.notices))
        last = time.monotonic()
        while True:
            with self._cond:
                if self._stopped:
                    return
                now = time.monotonic()
                if not self._paused and self._limit < len(self._events):
                    self._pos += int((now - last) * 1e9 * self.speed)
                    self._pos = min(self._pos, self.last_ts)
                    self._limit = max(self._limit, bisect.bisect_right(self._times, self._pos))
                last = now
                batch: list[Event] = [RESET] if self._reset else []
                self._reset = False
                batch += self._events[self._index : self._limit]
                self._index = max(self._index, self._limit)
                if not batch:
                    wait = self.tick
                    if not self._paused and self._limit < len(self._events):
                        ahead = (self._times[self._limit] - self._pos) / 1e9 / self.speed
                        wait = min(max(ahead, 0.001), self.tick)
                    self._cond.wait(wait)
                    continue
            for start in range(0, len(batch), self.batch_size):
                deliver(batch[start : start + self.batch_size])


def _clock(ns: int) -> str:
    seconds = max(ns, 0) // 1_000_000_000
    minutes, seconds = divmod(seconds, 60)
    if minutes >= 60:
        return f"{minutes // 60}:{minutes % 60:02}:{seconds:02}"
    return f"{minutes}:{seconds:02}"


def open_file(path: str | os.PathLike[str], *, keep: int | None = None) -> FileSource | QueueSource:
    """A source for a saved trace file, or for a HAR file (told apart by content);
    ``keep`` is how many requests the UI holds (its ring), see :class:`FileSource`.

    Raises :class:`~hopscope.tracing.TraceFileError` with a one-line reason when the
    file is neither, so the caller can refuse before any UI starts.
    """
    try:
        return FileSource(path, keep=keep)
    except TraceFileError:
        if not _regular_file(os.fspath(path)):
            raise  # a pipe is read once, as a trace file (as ``tail`` reads it)
        events = har_events(os.fspath(path))
        if events is None:
            raise
    source = QueueSource(os.path.basename(os.fspath(path)), live=False)
    source.push(events)
    source.push([notice(f"{source.describe()}: read {len(events):,} events (HAR)")])
    return source


def har_events(path: str) -> list[Event] | None:
    """The events of a HAR file; None when the file does not even look like one.

    Raises :class:`~hopscope.tracing.TraceFileError` for a HAR file that is broken.
    """
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    named_har = path.lower().endswith(".har")
    if not raw.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{"):
        if named_har:  # (what ``export`` says of it too)
            raise TraceFileError(f"{path} is not a HAR file (not JSON)")
        return None
    from hopscope.tracing.har import HarError, har_events_from  # only HAR files need it

    try:
        events = har_events_from(raw, path)
    except HarError as exc:
        raise TraceFileError(str(exc)) from None
    if events is None and named_har:
        raise TraceFileError(f"{path} is not a HAR file (not JSON, or no log object)")
    return events
