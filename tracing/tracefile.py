"""Trace files: versioned JSON Lines, read back tolerantly.

Line 1 is a header ``{"format": "hopscope", "version": "1.2", ...}``; every other line
is one wire event, or (since 1.1) a *summary* of a finished trace, which a viewer reads
instead of folding that trace's events (:class:`TraceFileWriter`, :class:`SummaryScan`).
The major version gates reading: a file from a newer major version is refused with a
one-line error, older ones go through :data:`UPGRADES`; lines of a kind this reader does
not know (a newer minor version's) are skipped.
"""

from __future__ import annotations

import fcntl
import gc
import json
import operator
import os
import stat
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

from .model import _QUEUE_KEY, QUEUE, Event, Span, Trace, TraceBuilder, TraceInfo

__all__ = [
    "FORMAT_VERSION",
    "LoadReport",
    "SummarisedTrace",
    "SummaryScan",
    "TraceFileError",
    "TraceFileWriter",
    "decode_details",
    "header_line",
    "load",
    "read_chunks",
    "read_events",
]

FORMAT_VERSION = "1.2"
FORMAT_NAME = "hopscope"

#: One converter per major version step: ``UPGRADES[n]`` turns an event of major
#: version ``n`` into one of ``n + 1``.  Empty until the format has a version 2.
UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


class TraceFileError(ValueError):
    """A trace file that cannot be read at all; the message is one line for the user."""


class TraceFileWarning(UserWarning):
    """Something in a trace file was skipped; everything else was kept."""


class SummaryCutOffWarning(TraceFileWarning):
    """Only the file's cut-off last line was skipped, and it was a summary: it covers
    events written before it, so no event is lost (a writer killed while summing up)."""


@dataclass
class LoadReport:
    """What reading a file had to skip."""

    events: int = 0
    malformed_lines: list[int] = field(default_factory=list)
    truncated_last_line: bool = False
    bytes_read: int = 0
    """How far into the file reading got (whole chunks): progress for a big file."""
    skipped: int = 0
    """Lines of a kind this reader does not know (summaries, a newer minor version's),
    and the header lines of files concatenated to the first (``cat a.jsonl b.jsonl``)."""
    summary_cut_off: bool = False
    """The last line was cut off, and was a summary: no event lost (unlike
    :attr:`truncated_last_line`)."""


def header_line() -> str:
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "created": time.time_ns(),
        "pid": os.getpid(),
    }
    return json.dumps(header, separators=(",", ":")) + "\n"


#: The kinds of line a reader folds into traces; others (``summary``, kinds a later minor
#: version adds) are skipped without complaint.
EVENT_KINDS = frozenset({"span_start", "span_end", "event", "dropped"})
SUMMARY = "summary"


#: What readers say of a cut-off summary line (:attr:`LoadReport.summary_cut_off`).
SUMMARY_CUT_OFF = "the last line, a summary, was cut off (no event lost)"


def _major(version: Any, name: str = "") -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        where = f"{name}: " if name else ""
        raise TraceFileError(f"{where}unreadable format version {version!r}") from None


def read_events(
    path: str | os.PathLike[str], report: LoadReport | None = None
) -> Iterator[dict[str, Any]]:
    """Yield the events of a trace file, upgraded to the current version."""
    for events in read_chunks(path, report):
        yield from events


def read_chunks(
    path: str | os.PathLike[str], report: LoadReport | None = None
) -> Iterator[list[dict[str, Any]]]:
    """The events of a trace file a list at a time (about a megabyte of lines each).

    For readers of big files, which would otherwise pay one generator step per event.
    The header is checked on the first step (a :class:`TraceFileError` for a file that
    is not a trace file), and ``report`` is up to date after each list.  A pipe that
    holds a HAR file gives the HAR's events (see :func:`_har_in_pipe`).
    """
    report = report if report is not None else LoadReport()
    try:
        handle, header = _open(path, har=True)
    except _HarInPipe as found:
        report.bytes_read = found.size
        report.events = len(found.events)
        if found.events:
            yield found.events
        return
    try:
        current = _major(FORMAT_VERSION)
        upgrades = [UPGRADES[step] for step in range(_major(header.get("version")), current)]
        number = 2  # of the first line of the chunk
        seekable = handle.seekable()  # not a pipe: ``hopscope tail <(zcat t.jsonl.gz)``
        while True:
            lines = handle.readlines(_CHUNK_BYTES)
            if not lines:
                break
            report.bytes_read = (
                handle.tell() if seekable else report.bytes_read + sum(map(len, lines))
            )
            events = _decode(lines, number, report)
            try:
                known = set(map(_KIND, events)) <= EVENT_KINDS
            except TypeError:  # a kind that is a list or an object
                known = False
            if not known:
                kept = [e for e in events if type(e["kind"]) is not str or e["kind"] in EVENT_KINDS]
                report.skipped += len(events) - len(kept)
                events = kept
            for upgrade in upgrades:
                events = [upgrade(event) for event in events]
            report.events += len(events)
            number += len(lines)
            if events:
                yield events
    finally:
        handle.close()


_KIND = operator.itemgetter("kind")

#: How a gzip file starts: users compress saved traces to keep or mail them.
GZIP_MAGIC = b"\x1f\x8b"


#: What may come before a JSON document: a byte order mark, whitespace.
_BLANK = b"\xef\xbb\xbf \t\r\n"


class _HarInPipe(Exception):
    """A pipe held a HAR file, not a trace file: its events (see :func:`_open`)."""

    def __init__(self, events: list[dict[str, Any]], size: int) -> None:
        super().__init__("a HAR file")
        self.events = events
        self.size = size


def _har_in_pipe(name: str, first: bytes, handle: Any) -> None:
    """Raise :class:`_HarInPipe` when a pipe that is not a trace file holds a HAR file.

    A file is told apart from a HAR by its callers before it is read, but a pipe
    (``cat t.har | hopscope view -``, ``<(zcat t.har.gz)``) can be read only once: what it
    held is read here, as JSON, when it starts as a HAR does.  Anything else is left
    for the caller's "not a hopscope trace file".
    """
    if handle.seekable():
        return
    while not first.strip(_BLANK) and (line := handle.readline()):  # blank lines first
        first += line
    if first.lstrip(_BLANK)[:1] != b"{":
        return
    from .har import HarError, har_events_from  # (har imports this module)

    content = first + handle.read()
    try:
        events = har_events_from(content, name)
    except HarError as exc:
        raise TraceFileError(str(exc)) from None
    if events is not None:
        raise _HarInPipe(events, len(content))


def _open(path: str | os.PathLike[str], har: bool = False) -> tuple[Any, dict[str, Any]]:
    """The file opened after its header line, and the header; a :class:`TraceFileError`
    for a file this hopscope cannot read at all.  With ``har``, a pipe holding a HAR
    file raises :class:`_HarInPipe` with its events."""
    name = os.fspath(path)
    try:
        handle = open(name, "rb")
    except OSError as exc:
        raise TraceFileError(f"cannot open {name}: {exc.strerror}") from None
    try:
        first = handle.readline()
        try:
            header = json.loads(first)
        except ValueError:
            header = None
        if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
            if first.startswith(GZIP_MAGIC):
                raise TraceFileError(f"{name} is gzip-compressed: gunzip it first")
            if har:
                _har_in_pipe(name, first, handle)
            raise TraceFileError(f"{name} is not a hopscope trace file (no header line)")
        major = _major(header.get("version"), name)
        current = _major(FORMAT_VERSION)
        if major > current:
            raise TraceFileError(
                f"{name} uses trace format {header.get('version')}, newer than this "
                f"hopscope reads ({FORMAT_VERSION}): please upgrade hopscope"
            )
        if any(step not in UPGRADES for step in range(major, current)):
            raise TraceFileError(
                f"{name} uses trace format {header.get('version')}, which this hopscope "
                f"({FORMAT_VERSION}) cannot convert"
            )
    except BaseException:
        handle.close()
        raise
    return handle, header


#: How much of the file is decoded at a time (whole lines; about 4,000 events).
_CHUNK_BYTES = 1 << 20


def _decode(lines: list[bytes], number: int, report: LoadReport) -> list[dict[str, Any]]:
    """The events of consecutive lines, ``number`` being the first one's line number.

    One ``json.loads`` of them all as an array costs half as much as one call per line
    (and shares the key strings between events).  When that fails or does not make one
    event per line, some line is malformed: decode them one by one to find which.
    """
    if lines[-1].endswith(b"\n"):
        try:
            events = json.loads(b"[" + b",".join(lines) + b"]")
        except (ValueError, RecursionError):
            pass
        else:
            if (
                len(events) == len(lines)
                and set(map(type, events)) == {dict}
                and all(map(operator.contains, events, repeat("kind")))
            ):
                # (A look per event at C speed, a fifth of a search of the bytes.)
                if any(map(operator.contains, events, repeat(NONFINITE_KEY))):
                    _restore_all(events)
                return events  # type: ignore[no-any-return]
    events = []
    for offset, raw in enumerate(lines):
        try:
            event = json.loads(raw)
            if not isinstance(event, dict) or "kind" not in event:
                raise ValueError
            if _NONFINITE_MARK in raw:
                _restore(event)
        except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
            if not raw.endswith(b"\n"):
                if raw.startswith(SUMMARY_PREFIX):
                    report.summary_cut_off = True  # the events it sums up are all in
                else:
                    report.truncated_last_line = True
            elif _is_header(raw):
                report.skipped += 1  # ``cat a.jsonl b.jsonl``: the next file starts
            else:
                report.malformed_lines.append(number + offset)
            continue
        events.append(event)
    return events


def _is_header(raw: bytes) -> bool:
    """Whether a line that is no event is the header of a file of this major version
    (files concatenated): only lines that failed as events pay for the look."""
    try:
        header = json.loads(raw)
        return (
            isinstance(header, dict)
            and header.get("format") == FORMAT_NAME
            and _major(header.get("version")) == _major(FORMAT_VERSION)
        )
    except (ValueError, RecursionError):  # (TraceFileError is a ValueError)
        return False


def load(path: str | os.PathLike[str], *, strict: bool = False) -> list[Trace]:
    """Read a trace file into assembled traces.

    A cut-off last line (a crash mid-write) and malformed lines are skipped with one
    warning saying how many; ``strict=True`` raises instead.  A cut-off summary line
    alone loses no event: its warning is a :class:`SummaryCutOffWarning`.
    """
    report = LoadReport()
    builder = TraceBuilder()
    # A million events make millions of objects that all live on: left on, the garbage
    # collector would walk them again and again as they pile up, more than doubling the
    # time.  They hold no reference cycles, so nothing is missed meanwhile.
    collecting = gc.isenabled()
    gc.disable()
    try:
        add = builder.add
        for events in read_chunks(path, report):
            for event in events:
                try:
                    add(event)
                except (KeyError, TypeError, ValueError):
                    report.malformed_lines.append(-1)
                    report.events -= 1
    finally:
        if collecting:
            gc.enable()
    problems = []
    if report.malformed_lines:
        problems.append(f"skipped {len(report.malformed_lines)} malformed line(s)")
    if report.truncated_last_line:
        problems.append("the last line was cut off")
    category = TraceFileWarning
    if problems:
        if report.summary_cut_off:
            problems.append(SUMMARY_CUT_OFF)
        message = f"{os.fspath(path)}: " + "; ".join(problems) + f"; kept {report.events} events"
    elif report.summary_cut_off:
        message = f"{os.fspath(path)}: {SUMMARY_CUT_OFF}"
        category = SummaryCutOffWarning
    if problems or report.summary_cut_off:
        if strict:
            raise TraceFileError(message)
        warnings.warn(message, category, stacklevel=2)
    return list(builder.traces.values())


# -- writing -------------------------------------------------------------------------


def _default(value: Any) -> str:
    """What the encoder writes for a value JSON has no type for: its repr, or a
    placeholder when that raises (an app's object: one value is all it may cost)."""
    try:
        return repr(value)
    except Exception:
        return f"<unrepresentable {type(value).__qualname__}>"


#: ``json.dumps(event, separators=(",", ":"), default=_default, allow_nan=False)``
#: without a new encoder per line.  ASCII only (``ensure_ascii``), so a line's length in
#: characters is its length in bytes: the writer counts offsets without encoding line by
#: line.  Strict JSON: a non-finite float raises ValueError (see :func:`_encode`).
_slow_strict = json.JSONEncoder(separators=(",", ":"), default=_default, allow_nan=False).encode


def _make_strict() -> Callable[[Any], str]:
    """:data:`_slow_strict` through one C encoder made once: ``JSONEncoder.encode``
    makes a new one per call, a third of the cost of encoding a wire event.  Without
    the circular-reference check (its memo would be shared between threads): a cycle
    ends in a RecursionError, and the slow encoder then says what it says of it."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # a Python without the C accelerator
        return _slow_strict
    try:
        fast = make(None, _default, json.encoder.encode_basestring_ascii, None, ":", ",",
                    False, False, False)  # fmt: skip
        sample = {"a": [1, 2.5, "\u00e9\0", None, True, (3,)], "b": {}}
        if "".join(fast(sample, 0)) != _slow_strict(sample):
            return _slow_strict
        try:
            fast([float("nan")], 0)
        except ValueError:
            pass
        else:
            return _slow_strict  # it took allow_nan for another argument
    except (TypeError, ValueError):  # another signature than 3.11-3.13's
        return _slow_strict
    join = "".join

    def strict(value: Any) -> str:
        try:
            return join(fast(value, 0))
        except RecursionError:
            return _slow_strict(value)

    return strict


#: Encodes like :func:`_encode`, but raises ValueError on a non-finite float (or an int
#: past Python's digit limit): the writers' fast path, which costs nothing more than
#: Python's own dialect did for values without them.
_strict = _make_strict()

#: What a non-finite float is written as (strict JSON has no NaN or Infinity; these are
#: the strings protobuf's JSON mapping, and so OTLP/JSON, uses for them).
_NONFINITE = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}
#: The key of an event that says where its non-finite floats are (see :func:`_marked`).
NONFINITE_KEY = "nonfinite"
_NONFINITE_TEXT = f'"{NONFINITE_KEY}":'
_NONFINITE_MARK = _NONFINITE_TEXT.encode()
#: Containers :func:`_finite` follows (as deep as :func:`_scrubbed`).
_FINITE_DEPTH = 64


def _float_text(value: float) -> str:
    if value != value:
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def _finite(value: Any, depth: int, path: list[Any], found: list[list[Any]] | None) -> Any:
    """``value`` with each non-finite float as its string (see :data:`_NONFINITE`),
    containers copied only where one was replaced; each replaced float's path (keys and
    list indexes from the top) appended to ``found`` unless that is None."""
    if isinstance(value, float):
        if value - value == 0.0:  # finite (inf - inf and nan - nan are nan)
            return value
        if found is not None:
            found.append(path.copy())
        return _float_text(value)
    if depth <= 0:
        return value
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        changed = False
        for key, item in value.items():
            if isinstance(key, float) and key - key != 0.0:
                new_key: Any = _float_text(key)
                changed = True
            else:
                new_key = key
            path.append(key)
            new = _finite(item, depth - 1, path, found if type(key) is str else None)
            path.pop()
            changed = changed or new is not item
            out[new_key] = new
        return out if changed else value
    if isinstance(value, list | tuple):
        items = []
        changed = False
        for index, item in enumerate(value):
            path.append(index)
            new = _finite(item, depth - 1, path, found)
            path.pop()
            changed = changed or new is not item
            items.append(new)
        return items if changed else value
    return value


def _encode(value: Any) -> str:
    """Strict JSON of ``value`` (its non-finite floats as strings, unmarked: summary
    lines, outlines), ``_default`` for what JSON has no type for."""
    try:
        return _strict(value)
    except ValueError:
        return _strict(_finite(value, _FINITE_DEPTH, [], None))


def _marked(event: dict[str, Any]) -> dict[str, Any]:
    """``event`` with its non-finite floats as strings and, under :data:`NONFINITE_KEY`,
    the paths to them, so that readers make them floats again (:func:`_restore`) while
    a string such as ``"NaN"`` an app set stays a string."""
    found: list[list[Any]] = []
    finite = _finite(event, _FINITE_DEPTH, [], found)
    if not found:
        return event
    finite = dict(finite)
    finite[NONFINITE_KEY] = found
    return finite


def _restore(event: Any) -> None:
    """Make the floats :func:`_marked` wrote as strings floats again (in place); a
    marker that does not point at one of those strings is ignored (files are input)."""
    if type(event) is not dict:
        return
    paths = event.pop(NONFINITE_KEY, None)
    if type(paths) is not list:
        return
    for path in paths:
        if type(path) is not list or not path:
            continue
        try:
            parent = event
            for step in path[:-1]:
                parent = parent[step]
            last = path[-1]
            text = parent[last]
            if type(text) is str and text in _NONFINITE and type(last) in (str, int):
                parent[last] = _NONFINITE[text]
        except (KeyError, IndexError, TypeError):
            continue


def _restore_all(events: list[Any]) -> None:
    for event in events:
        if type(event) is dict and NONFINITE_KEY in event:
            _restore(event)


def _encode_event(event: dict[str, Any]) -> str:
    """An event's line: strict JSON, its non-finite floats marked (:func:`_marked`)."""
    try:
        return _strict(event)
    except ValueError:
        return _strict(_marked(event))


def _encoded(events: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """``events`` and their lines, after one of them failed to encode strictly (a
    non-finite float, an int past Python's digit limit, a structure too deep): each is
    encoded on its own, one with non-finite floats marked (:func:`_marked`), one that
    fails again with its unencodable values as placeholders, and one that still fails
    is left out, so the others of the batch are written."""
    kept: list[dict[str, Any]] = []
    lines: list[str] = []
    for event in events:
        try:
            line = _encode_event(event)
        except Exception:
            try:
                line = _encode(_scrubbed(_marked(event), 64))
                event = _scrubbed(event, 64)
            except Exception:
                continue
        kept.append(event)
        lines.append(line)
    return kept, lines


def _scrubbed(value: Any, depth: int) -> Any:
    if isinstance(value, dict):
        if depth <= 0:
            return _default(value)
        return {
            key if type(key) is str else _default(key): _scrubbed(item, depth - 1)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        if depth <= 0:
            return _default(value)
        return [_scrubbed(item, depth - 1) for item in value]
    try:
        _encode(value)
    except Exception:
        return f"<unrepresentable {type(value).__qualname__}>"
    return value


#: How a summary line starts, exactly: :class:`SummaryScan` finds them by it.
SUMMARY_PREFIX = b'{"kind":"summary",'

#: How the writers start one: the summary's fields come next, as one array.
_SUMMARY_START = '{"kind":"summary","trace":'


class _Lines:
    """Where a trace's event lines are in the file."""

    __slots__ = ("count", "newest", "runs")

    def __init__(self) -> None:
        self.runs: list[int] = []
        """``[offset, length, offset, length, ...]``: byte ranges of whole lines."""
        self.count = 0
        self.newest = 0


#: Stands for a span's point events other than ``exception`` in the traces a writer
#: folds (see :meth:`TraceFileWriter._fold`).
_OTHER = Event("", 0)


class TraceFileWriter:
    """Appends wire events to a trace file, and a summary line for each finished trace.

    The one writer of trace files (``FileSink``, the collector's ``-o``, the UI's save),
    so the files they write carry summaries (``FileSink``'s unless told not to): a viewer
    reads one summary line per request instead of folding some ten events, which is what
    opens 100,000 requests in seconds.

    A trace is summed up ``grace`` seconds after the write that ended its last running
    span (later events from other processes, such as an app's behind a proxy's client
    span, usually come within that), at the first write after that, or at :meth:`close`.
    The summary is :meth:`TraceInfo.summary` of the trace folded from the same events
    (a request whole in one write: of the one span they make, the same thing without
    the fold), so it cannot disagree with a reader that folds them, plus the byte
    ranges of the trace's lines.  An event for a trace already summed up reopens it, and a newer
    summary follows: the last one wins.  What the writer holds is bounded: at most
    ``max_open`` unfinished traces (the oldest is summed up as it is, beyond that) and
    the ``keep`` last summed-up ones (a late event for an older one starts afresh, and
    the reader, finding lines no summary covers, folds the file instead).

    ``summaries=False`` writes the events alone (readers then fold them): for a writer
    inside an app (``FileSink(path, summaries=False)``) whose owner would rather not
    spend what summing up every trace costs the app's process, some two thirds as much
    CPU again as writing its lines.

    Used from one thread at a time.  Forked processes may share the file: each batch is
    written under a POSIX lock, so the offsets a process counts are where its lines are.
    """

    def __init__(
        self,
        fd: int,
        *,
        grace: float = 0.5,
        max_open: int = 10_000,
        keep: int = 1_000,
        clock: Callable[[], float] = time.monotonic,
        summaries: bool = True,
    ) -> None:
        self._fd = fd
        self.summaries = summaries
        self.grace = grace
        self.max_open = max_open
        self.keep = keep
        self._clock = clock
        self._builder = TraceBuilder()
        self._lines: dict[str, _Lines] = {}
        self._due: OrderedDict[str, float] = OrderedDict()
        self._done: OrderedDict[str, tuple[Trace | list[str], _Lines]] = OrderedDict()
        self._quick: dict[str, tuple[str, list[str]]] = {}
        """Traces held unfolded, as their summary line and lines (see :meth:`_fold`)."""
        self.closed = False

    @classmethod
    def create(
        cls, path: str | os.PathLike[str], *, append: bool = False, **options: Any
    ) -> TraceFileWriter:
        """A writer of a new trace file at ``path`` (mode 0600 even if it existed, as
        bodies and headers can carry secrets); ``append=True`` keeps what the file holds
        and writes the header only into an empty one.  Raises OSError."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if append else os.O_TRUNC)
        fd = os.open(path, flags, 0o600)
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):  # not /dev/null's mode, for everyone
                os.fchmod(fd, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_size == 0:
                    _write_all(fd, header_line().encode())
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, **options)

    @property
    def open_traces(self) -> int:
        """Traces not summed up yet."""
        return len(self._lines)

    def forget(self) -> None:
        """Drop every trace held (a forked child: its parent sums them up)."""
        self._builder = TraceBuilder()
        self._lines.clear()
        self._due.clear()
        self._done.clear()
        self._quick.clear()

    def write(self, events: Iterable[dict[str, Any]]) -> None:
        """Append ``events``, then the summaries that are due.  Raises OSError."""
        events = list(events)
        if events:
            try:
                lines = [_strict(event) for event in events]
            except Exception:
                events, lines = _encoded(events)
        if events:
            offset = self._append("\n".join(lines) + "\n")
            if self.summaries:
                self._fold(events, lines, offset)
        if self.summaries:
            self._sum_up(self._clock())

    def close(self) -> None:
        """Sum up every trace still open and close the file."""
        if self.closed:
            return
        self.closed = True
        try:
            self._sum_up(None)
        finally:
            os.close(self._fd)

    def _append(self, text: str) -> int:
        """Write ``text`` at the end of the file; returns the offset it starts at."""
        data = text.encode()
        fd = self._fd
        fcntl.lockf(fd, fcntl.LOCK_EX)
        try:
            _write_all(fd, data)
            return os.lseek(fd, 0, os.SEEK_CUR) - len(data)
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN)

    def _fold(self, events: list[dict[str, Any]], lines: list[str], offset: int) -> None:
        """Fold ``events`` into the traces held, and note where their lines are.

        Most traces an app's sink writes are one request, whole in one write: its span's
        start, its point events and its end, in a row.  Such a run (for a trace not
        held) is summed up at once from the one span it makes (:func:`_quick_info`), and
        kept as that summary line and its own lines (strings: nothing for the garbage
        collector to walk meanwhile), unfolded; an event for it that comes later folds
        its lines first (:meth:`_unfold`).  Other events are folded as
        :meth:`TraceBuilder.add` does, inline for the events the sinks make (exact
        types), and any other event through the builder itself.  Point events other
        than ``exception`` are not kept: a summary reads only whether a span has one of
        those (:class:`TraceInfo`), and these traces are never shown.
        """
        builder = self._builder
        traces = builder.traces
        held = self._lines
        done = self._done
        quick = self._quick
        touched: dict[str, Trace | None] = {}
        new_span = Span
        fast = builder.max_traces is None
        size = len(events)
        index = 0
        while index < size:
            event = events[index]
            length = len(lines[index]) + 1
            index += 1
            trace_id = event.get("trace_id")
            if type(trace_id) is not str:
                offset += length
                continue
            kind = event.get("kind")
            if kind == "dropped":
                offset += length
                continue
            span_id: Any = event.get("span_id")
            ts: Any = event.get("ts")
            attrs = event.get("attrs")
            exact = (
                fast
                and type(span_id) is str
                and type(ts) is int
                and (type(attrs) is dict or attrs is None)
            )
            found = held.get(trace_id)
            if found is None:
                if kind == "span_start" and exact and trace_id not in done:
                    stop = _whole_span(events, index - 1, trace_id, span_id)
                    if stop > 0:
                        found = held[trace_id] = _Lines()
                        runs = found.runs
                        runs += (offset, 0)
                        newest = 0
                        for at in range(index - 1, stop):
                            runs[-1] += len(lines[at]) + 1
                            stamp = events[at]["ts"]
                            if stamp > newest:
                                newest = stamp
                        found.count = stop - index + 1
                        found.newest = newest
                        offset += runs[-1]
                        quick[trace_id] = (
                            _summary_line(trace_id, found, *_quick_info(events[index - 1 : stop])),
                            lines[index - 1 : stop],
                        )
                        touched[trace_id] = None
                        index = stop
                        continue
                if trace_id in done:  # a late event: reopen the trace
                    folded, found = done.pop(trace_id)
                    if isinstance(folded, Trace):
                        traces[trace_id] = folded
                    else:
                        self._unfold(folded)
                else:
                    found = _Lines()
                held[trace_id] = found
            elif trace_id in quick:
                self._unfold(quick.pop(trace_id)[1])
            trace: Trace | None
            if exact and (kind == "span_start" or kind == "span_end" or kind == "event"):
                if attrs is None:
                    attrs = {}
                trace = traces.get(trace_id)
                if trace is None:
                    trace = traces[trace_id] = Trace(trace_id)
                else:
                    trace._info = None
                spans = trace.spans
                span = spans.get(span_id)
                if kind == "span_start":
                    if span is None:
                        spans[span_id] = new_span(
                            trace_id,
                            span_id,
                            event.get("parent_id"),
                            event.get("hop", "app"),
                            event.get("name", ""),
                            ts,
                            None,
                            {**attrs},
                        )
                    else:
                        span.parent_id = event.get("parent_id")
                        span.hop = event.get("hop", span.hop)
                        span.name = event.get("name", span.name)
                        span.start = ts
                        span.attrs = {**attrs, **span.attrs}
                else:
                    if span is None:
                        span = spans[span_id] = new_span(trace_id, span_id)
                    if kind == "span_end":
                        span.end = ts
                        if "name" in event:
                            span.name = event["name"]
                        span.attrs.update(attrs)
                    elif event.get("name", "") == "exception":
                        span.events.append(Event("exception", ts, attrs))
                        span.attrs["error"] = True
                    elif not span.events:
                        span.events.append(_OTHER)
            else:
                try:
                    trace = builder.add(event)
                except (AttributeError, KeyError, TypeError, ValueError):
                    trace = None  # no summary will cover it: readers then fold the file
                if trace is None:
                    if trace_id not in traces:
                        del held[trace_id]
                    offset += length
                    continue
            runs = found.runs
            if runs and runs[-2] + runs[-1] == offset:
                runs[-1] += length
            else:
                runs += (offset, length)
            found.count += 1
            if type(ts) is int and ts > found.newest:
                found.newest = ts
            touched[trace_id] = trace
            offset += length
        now = self._clock()
        due = self._due
        for trace_id, trace in touched.items():
            if trace is None:
                if trace_id not in quick:  # (folded since, by a later event)
                    trace = traces[trace_id]
            if trace is None or all(span.end is not None for span in trace.spans.values()):
                # (a trace always has a span: an event that makes none raises)
                due[trace_id] = now + self.grace
                due.move_to_end(trace_id)
            else:
                due.pop(trace_id, None)

    def _unfold(self, lines: list[str]) -> None:
        """Fold a trace kept as its lines (see :meth:`_fold`) into the builder: decoded
        again, as a reader does (strings: the garbage collector need not walk them while
        the trace is kept)."""
        builder = self._builder
        for line in lines:
            event = json.loads(line)  # (checked when kept: cannot raise)
            if _NONFINITE_TEXT in line:
                _restore(event)
            builder.add(event)

    def _sum_up(self, now: float | None) -> None:
        """Write the summaries due at ``now`` (None: every trace held)."""
        due = self._due
        quick = self._quick
        traces = self._builder.traces
        if now is None:
            ready = list(self._lines)
        else:
            ready = []
            for trace_id, at in due.items():
                if at > now:
                    break
                ready.append(trace_id)
            extra = len(self._lines) - len(ready) - self.max_open
            if extra > 0:
                ready += [t for t in traces if t not in due][:extra]
        if not ready:
            return
        held = self._lines
        done = self._done
        out = []
        for trace_id in ready:
            due.pop(trace_id, None)
            lines = held.pop(trace_id)
            if trace_id in quick:
                line, kept = quick.pop(trace_id)
                out.append(line)
                done[trace_id] = (kept, lines)
            else:
                trace = traces.pop(trace_id)
                outline = [_outlined(span) for span in trace.spans.values()]
                out.append(_summary_line(trace_id, lines, trace.info, outline))
                done[trace_id] = (trace, lines)
        while len(done) > self.keep:
            done.popitem(last=False)
        self._append("\n".join(out) + "\n")


def _summary_line(trace_id: str, lines: _Lines, info: TraceInfo, outline: list[Any]) -> str:
    fields = info.summary()
    # (1.2) The header text, odd headers, bodies and hops go apart, in ``detail``: only
    # filters read them, so a viewer keeps them undecoded until one does.
    row = [trace_id, lines.newest, lines.count, lines.runs, *fields[:10]]
    # One encoding of the whole line (keys in this order: see _SUMMARY_START).
    return _encode(
        {"kind": SUMMARY, "trace": row, "detail": fields[10:], "outline": _encode(outline)}
    )


def _quick_info(events: list[dict[str, Any]]) -> tuple[TraceInfo, list[Any]]:
    """The summary and outline of a trace made of one whole span's events (see
    :func:`_whole_span`): what folding them makes, without the fold."""
    first, last = events[0], events[-1]
    span_id = first["span_id"]
    span = Span(
        first["trace_id"],
        span_id,
        first.get("parent_id"),
        first.get("hop", "app"),
        last["name"] if "name" in last else first.get("name", ""),
        first["ts"],
        last["ts"],
        {**(first.get("attrs") or {}), **(last.get("attrs") or {})},
    )
    return TraceInfo.of_spans({span_id: span}), [_outlined(span)]


def _whole_span(events: list[dict[str, Any]], first: int, trace_id: str, span_id: str) -> int:
    """Where the run of events from ``events[first]`` (a span start) ends, when it is
    one whole span (its start, point events other than ``exception``, its end, all as
    the sinks make them) and the next event is another trace's; else 0."""
    size = len(events)
    at = first + 1
    while at < size:
        event = events[at]
        if event.get("trace_id") != trace_id:
            return 0
        attrs = event.get("attrs")
        if (
            event.get("span_id") != span_id
            or type(event.get("ts")) is not int
            or not (type(attrs) is dict or attrs is None)
        ):
            return 0
        kind = event.get("kind")
        at += 1
        if kind == "span_end":
            return 0 if at < size and events[at].get("trace_id") == trace_id else at
        if kind != "event" or event.get("name", "") == "exception":
            return 0
    return 0


#: The attributes a summary's outline keeps of each span: what a request list's row shows
#: besides :class:`~hopscope.tracing.model.TraceInfo` (its bar, a websocket, the query
#: string, the response size).
OUTLINE_KEYS = ("span.kind", "network.protocol.name", "url.query", "http.response.body.size")


def _outlined(span: Span) -> list[Any]:
    attrs = span.attrs
    kept = {key: attrs[key] for key in OUTLINE_KEYS if key in attrs}
    return [span.hop, span.name, kept or None, span.start, span.end]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


# -- reading summaries ----------------------------------------------------------------

#: The slot :class:`Trace` keeps its spans in (:class:`SummarisedTrace` fills it late).
_SPANS: Any = Trace.__dict__["spans"]


class _LineSource:
    """Reads a trace's lines back from the file, for the traces a scan made."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = open(path, "rb")  # lives as long as its traces

    def __del__(self) -> None:
        # Closed with the last of its traces, without a warning about an open file.
        file = getattr(self, "_file", None)
        if file is not None:
            file.close()

    def read(self, offset: int, length: int) -> bytes:
        try:
            return os.pread(self._file.fileno(), length, offset)
        except (OSError, OverflowError, ValueError):
            return b""

    def events(self, trace_id: str, runs: list[int]) -> list[dict[str, Any]]:
        """The trace's events (the lines that are not, or no longer, are left out)."""
        out: list[dict[str, Any]] = []
        fd = self._file.fileno()
        for index in range(0, len(runs) - 1, 2):
            try:
                data = os.pread(fd, runs[index + 1], runs[index])
            except (OSError, OverflowError, TypeError, ValueError):
                continue
            for line in data.splitlines():
                try:
                    event = json.loads(line)
                except (ValueError, RecursionError):
                    continue
                if type(event) is dict and event.get("trace_id") == trace_id:
                    if _NONFINITE_MARK in line:
                        _restore(event)
                    out.append(event)
        return out


class SummarisedTrace(Trace):
    """A trace made from its summary line: what lists and filters read (:attr:`info`)
    is there at once; its spans are read from the file and folded the first time
    anything asks for them (a detail view, an export)."""

    __slots__ = ("_loaded", "_outline", "_runs", "_source", "newest")

    _loaded: bool
    _outline: Any
    _runs: list[int]
    _source: _LineSource
    newest: int

    @classmethod
    def make(
        cls,
        trace_id: str,
        info: TraceInfo,
        source: _LineSource,
        runs: list[int],
        newest: int,
        outline: Any = None,
    ) -> SummarisedTrace:
        trace = cls.__new__(cls)  # its spans slot stays empty until they are read
        trace.trace_id = trace_id
        trace.dropped = 0
        trace._info = info
        trace._loaded = False
        trace._source = source
        trace._runs = runs
        trace.newest = newest
        trace._outline = outline
        return trace

    def outline(self) -> list[Span]:
        """From the summary's ``outline`` (JSON text, decoded when first drawn: each
        span's hop, name, :data:`OUTLINE_KEYS` attributes, start and end), without
        reading the trace's events; once they were read, from its spans."""
        outline = self._outline
        if self._loaded or outline is None:
            return super().outline()
        if type(outline) is list:
            return outline
        spans = []
        try:
            if type(outline) is tuple:  # where the JSON string is in the file
                outline = json.loads(self._source.read(*outline))
            for hop, name, attrs, start, end in json.loads(outline):
                if type(hop) is not str or type(name) is not str:
                    raise ValueError("not an outline")
                spans.append(
                    Span(
                        self.trace_id,
                        "",
                        hop=hop,
                        name=name,
                        start=start if type(start) is int else None,
                        end=end if type(end) is int else None,
                        attrs=attrs if type(attrs) is dict else {},
                    )
                )
        except (TypeError, ValueError, RecursionError):
            self._outline = None
            return super().outline()
        self._outline = spans
        return spans

    @property
    def spans(self) -> dict[str, Any]:
        if not self._loaded:
            self._load()
        return _SPANS.__get__(self)  # type: ignore[no-any-return]

    @spans.setter
    def spans(self, value: dict[str, Any]) -> None:
        _SPANS.__set__(self, value)
        self._loaded = True

    @property
    def loaded(self) -> bool:
        """Whether the spans were read from the file yet."""
        return self._loaded

    def latest_ts(self) -> int:
        return self.newest

    def _load(self) -> None:
        self._loaded = True
        builder = TraceBuilder()
        for event in self._source.events(self.trace_id, self._runs):
            try:
                builder.add(event)
            except (AttributeError, KeyError, TypeError, ValueError):
                continue
        trace = builder.traces.get(self.trace_id)
        _SPANS.__set__(self, {} if trace is None else trace.spans)


class SummaryScan:
    """Reads a trace file's summary lines only, into :class:`SummarisedTrace` objects.

    It skips every other line unread, so a file is scanned in a small part of the time
    folding its events takes.  Whether that sufficed is known at the end
    (:attr:`complete`): only if every event line is covered by its trace's last
    summary.  A file cut off before its summaries, or with events no summary covers
    (a writer that crashed, lines from another writer, a late event after the writer
    forgot the trace), must be folded the ordinary way (:func:`read_chunks`).

    The header is checked when the scan is made (a :class:`TraceFileError`).
    """

    def __init__(self, path: str | os.PathLike[str], report: LoadReport | None = None) -> None:
        self.path = os.fspath(path)
        self.report = report if report is not None else LoadReport()
        handle, header = _open(self.path)
        handle.close()
        version = str(header.get("version"))
        self.may_have_summaries = version != "1.0" and _major(version) == _major(FORMAT_VERSION)
        """False for files written before summaries existed: no use scanning them."""
        self._details = version != "1.1"
        """Whether summary lines may have a ``detail`` (1.2 on): one search a line less
        in a 1.1 file (whose lines, if a later writer appended some, are read anyway)."""
        self.complete = False
        self.summaries = 0
        self.covered: dict[str, int] = {}
        """Lines each trace's last summary covers."""

    def chunks(self) -> Iterator[tuple[list[tuple[SummarisedTrace, bool]], list[dict[str, Any]]]]:
        """``(traces, dropped)`` a part of the file at a time: each trace with whether it
        replaces one made earlier (a newer summary), and the ``dropped`` events.

        Only the summary lines are decoded; they are found by how they start.  Whether
        every line is accounted for is a sum of bytes: the header, the summary lines,
        the byte ranges of each trace's last summary and the ``dropped`` lines must
        make the bytes read (lines no summary covers, or a cut-off last line, do not).
        (Read, not mapped: a file truncated meanwhile must not crash the viewer.)
        """
        report = self.report
        source = _LineSource(self.path)
        covered = self.covered
        ranges: dict[str, list[int]] = {}  # the byte ranges of each trace's last summary
        summaries = 0
        new_info = TraceInfo.__new__
        summarised = SummarisedTrace
        new_trace = summarised.__new__
        prefix, needle = SUMMARY_PREFIX, b"\n" + SUMMARY_PREFIX
        start_bytes = _SUMMARY_START.encode()
        skip = len(start_bytes)
        outline_key, after_key = _OUTLINE_KEY, len(_OUTLINE_KEY)
        detail_key, after_detail = _DETAIL_KEY, len(_DETAIL_KEY)
        with_detail = self._details
        lazy_info = _LazyInfo
        with open(self.path, "rb", buffering=0) as handle:
            header = handle.readline()
            accounted = position = len(header)
            # One buffer read into again and again: a new 8 MB object a block made the
            # kernel map and zero fresh pages for each (a tenth of the scan).
            block = bytearray(_SCAN_BYTES)
            while True:
                # Read from the start of a line: the next block starts where this one's
                # last whole line ended (no copy of the rest in front of the next).
                handle.seek(position)
                got = handle.readinto(block) or 0
                stop = block.rfind(b"\n", 0, got)
                if stop < 0:
                    if got < len(block):
                        break  # a cut-off last line, or the end
                    block = bytearray(2 * len(block))  # a line longer than a block
                    continue
                base = position
                position += stop + 1
                report.bytes_read = position
                if block.startswith(prefix, 0, got):
                    at = -1  # where the newline before the line would be
                else:
                    at = block.find(needle, 0, stop)
                    if at < 0:
                        continue
                pieces: list[bytearray] = []
                outlines: list[tuple[int, int] | None] = []
                details: list[bytearray | None] = []
                begins: list[int] = []  # where the lines start
                add_piece, add_outline, add_begin = pieces.append, outlines.append, begins.append
                add_detail = details.append
                find, rfind, startswith = block.find, block.rfind, block.startswith
                # Every line starts as the writers start them?
                written = startswith(start_bytes, at + 1)
                while True:
                    begin = at + 1
                    end = find(b"\n", begin)
                    accounted += end - at
                    add_begin(begin)
                    # Only the array of the summary's fields is decoded.  The outline
                    # (last, a JSON string) is left in the file until its row is drawn:
                    # only where it is is kept (see SummarisedTrace.outline).  Since 1.2
                    # the header text, odd headers, bodies and hops (``detail``) stay
                    # JSON text until a filter reads them (see _LazyInfo).  Found
                    # forward: neither key can occur before its place (no object in the
                    # array, quotes escaped in strings); a backward search walked the
                    # outline.
                    split = find(detail_key, begin + skip, end) if with_detail else -1
                    if split >= 0:
                        cut = find(outline_key, split, end)
                        add_piece(block[begin + skip : split])
                        if cut < 0:
                            cut = end - 1
                    else:  # 1.1: no detail
                        cut = rfind(outline_key, begin, end)
                        if cut <= begin:
                            cut = end - 1
                        add_piece(block[begin + skip : cut])
                    # (block[end - 2 : end] == b'"}', without a call: the key fits before it)
                    if cut < end - 1 and block[end - 1] == 0x7D and block[end - 2] == 0x22:
                        where = cut + after_key
                        add_outline((base + where, end - 1 - where))
                    else:
                        add_outline(None)
                    add_detail(None if split < 0 else block[split + after_detail : cut])
                    if end < stop and startswith(start_bytes, end + 1):
                        at = end  # summaries come in runs: the next line is one
                    else:
                        at = find(needle, end, stop)
                        if at < 0:
                            break
                        if not startswith(start_bytes, at + 1):
                            written = False  # (checked here, not per line: see above)
                summaries += len(pieces)
                try:
                    if not written:
                        raise ValueError("not as the writers write them")
                    decoded: list[Any] = json.loads(b"[" + b",".join(pieces) + b"]")
                    if len(decoded) != len(pieces):
                        raise ValueError("not one array a line")
                except (ValueError, RecursionError):
                    decoded = [
                        _summary_fields(block[begin : block.find(b"\n", begin)]) for begin in begins
                    ]
                traces: list[tuple[SummarisedTrace, bool]] = []
                for row, outline, detail in zip(decoded, outlines, details, strict=True):
                    try:
                        if type(row) is tuple:  # read the slow way, with its own outline
                            row, outline = row
                            if type(outline) is not str:
                                outline = None
                            detail = None  # in the row (see _summary_fields)
                        if detail is None:  # 1.1 (or read the slow way): all in the row
                            if len(row) != 18:
                                raise ValueError("not a trace summary")
                            fields = row[:14]
                        else:
                            fields = row
                        (trace_id, newest, count, runs, start, end, root_id, method, path,
                         status, route, host, error, failed) = fields  # fmt: skip
                        if not (
                            type(trace_id) is str
                            and type(newest) is int
                            and type(count) is int
                            and type(runs) is list
                            and (start is None or type(start) is int)
                            and (end is None or type(end) is int)
                            and (root_id is None or type(root_id) is str)
                            and (host is None or type(host) is str)
                            and type(error) is bool
                            and type(failed) is bool
                        ):
                            raise ValueError("not a trace summary")
                        if detail is None:
                            info = TraceInfo.from_summary(row[4:])
                        else:
                            # TraceInfo.from_summary, inline and without the fields only
                            # filters read (see _LazyInfo): a call and a list per row
                            # less, for a hundred thousand rows.
                            info = new_info(lazy_info)
                            info.start, info.end, info.root_id = start, end, root_id
                            info.method, info.path, info.status = method, path, status
                            info.route, info.host, info.error = route, host, error
                            info.failed, info._detail = failed, detail
                        # SummarisedTrace.make, inline too.
                        trace = new_trace(summarised)
                        trace.trace_id, trace.dropped, trace._info = trace_id, 0, info
                        trace._loaded, trace._source, trace._runs = False, source, runs
                        trace.newest, trace._outline = newest, outline
                    except (TypeError, ValueError):
                        report.malformed_lines.append(-1)
                        continue
                    traces.append((trace, trace_id in covered))
                    covered[trace_id] = count
                    ranges[trace_id] = runs
                if traces:
                    yield traces, []
            total = position + got
        self.summaries = summaries
        try:
            accounted += sum([sum(runs[1::2]) for runs in ranges.values()])
        except TypeError:
            accounted = -1  # a summary's ranges are not numbers: fold the file
        report.events = sum(covered.values())
        cut_off = position < total
        if summaries and 0 <= accounted < total and not cut_off:
            # Perhaps ``dropped`` lines (no trace's): found the same way, only now.
            dropped, size = _dropped_lines(self.path, total)
            accounted += size
            report.events += len(dropped)
            if dropped:
                yield [], dropped
        self.complete = summaries > 0 and accounted == total and not cut_off


def _summary_fields(line: bytes | bytearray) -> tuple[Any, Any] | None:
    """A summary line's fields (as 1.1 has them: ``detail`` put back in the array) and
    outline, read the slow way (keys in any order)."""
    summary = _loads(line)
    if type(summary) is not dict:
        return None
    fields = summary.get("trace")
    if "detail" in summary:
        detail = summary["detail"]
        if type(fields) is not list or type(detail) is not list:
            return None
        fields = [*fields, *detail]
    return fields, summary.get("outline")


#: The summary fields a 1.2 line keeps apart, in ``detail``.
_DETAIL_FIELDS = frozenset({"header_text", "odd_headers", "bodies", "hops"})
_TEXT: Any = TraceInfo.__dict__["header_text"]
_ODD: Any = TraceInfo.__dict__["odd_headers"]
_BODIES: Any = TraceInfo.__dict__["bodies"]
_HOPS: Any = TraceInfo.__dict__["hops"]


class _LazyInfo(TraceInfo):
    """A summary whose header text, odd headers, bodies and hops are still the JSON text
    of a 1.2 summary line's ``detail``.

    Only filters read those (a request list does not), and decoding them for 100,000
    rows was a fifth of opening a file; :func:`decode_details` decodes many at once (one
    ``json.loads``), and any single read of one of them decodes its own.  Their slots
    stay unset until then, so reading them costs nothing extra afterwards.  A ``detail``
    that is not what the writers write reads as no headers, bodies nor hops.
    """

    __slots__ = ("_detail",)

    _detail: bytes | bytearray | None

    def __getattr__(self, name: str) -> Any:
        # Only called for an unset slot: a detail field not decoded yet.
        if name not in _DETAIL_FIELDS:
            raise AttributeError(name)
        raw = self._detail
        _fill(self, _loads(raw) if raw is not None else None)
        return getattr(self, name)


def _fill(info: _LazyInfo, detail: Any) -> None:
    """Set the detail fields of ``info`` from its decoded ``detail``."""
    try:
        text, odd, bodies, hops = detail
        if type(text) is not str or type(bodies) is not list or type(hops) is not list:
            raise ValueError("not a summary's detail")
        if odd is not None:
            odd = tuple((n, v) for n, v in odd)
        if _QUEUE_KEY in hops:  # as TraceInfo.from_summary
            hops[hops.index(_QUEUE_KEY)] = QUEUE
    except (TypeError, ValueError):
        text, odd, bodies, hops = "\n", None, [], []
    # Unset slots are what tells a reader to decode: set each once, final values only
    # (another thread may read them meanwhile, or decode the same detail too).
    _ODD.__set__(info, odd)
    _BODIES.__set__(info, tuple(bodies) if bodies else ())
    _HOPS.__set__(info, tuple(hops))
    _TEXT.__set__(info, text)
    info._detail = None


def decode_details(infos: Iterable[TraceInfo]) -> None:
    """Decode the detail of every summary in ``infos`` still holding it undecoded, a few
    thousand in one ``json.loads``: before a filter reads all of them (see
    :class:`_LazyInfo`)."""
    lazy = [info for info in infos if type(info) is _LazyInfo and info._detail is not None]
    for at in range(0, len(lazy), _DECODE_AT_ONCE):
        _decode_some(lazy[at : at + _DECODE_AT_ONCE])


#: Details decoded in one ``json.loads``: one text of all 100,000 took longer to make.
_DECODE_AT_ONCE = 4_096


def _decode_some(lazy: list[_LazyInfo]) -> None:
    raws = [info._detail for info in lazy]
    try:
        if None in raws:
            raise ValueError("decoded meanwhile")
        decoded = json.loads(b"[" + b",".join(raws) + b"]")  # type: ignore[arg-type]
        if type(decoded) is not list or len(decoded) != len(lazy):
            raise ValueError("not one detail a row")
    except (ValueError, RecursionError):
        decoded = [None if raw is None else _loads(raw) for raw in raws]
    for info, detail in zip(lazy, decoded, strict=True):
        if info._detail is not None:  # (not decoded by a reader meanwhile)
            _fill(info, detail)


def _dropped_lines(path: str, limit: int) -> tuple[list[dict[str, Any]], int]:
    """The ``dropped`` events in the first ``limit`` bytes of ``path``, and their bytes."""
    with open(path, "rb") as handle:
        data = b"\n" + handle.read(limit)
    events: list[dict[str, Any]] = []
    size = 0
    needle = b"\n" + _DROPPED_PREFIX
    at = data.find(needle)
    while at >= 0:
        end = data.find(b"\n", at + 1)
        if end < 0:
            break
        event = _loads(data[at + 1 : end])
        if isinstance(event, dict):
            events.append(event)
            size += end - at
        at = data.find(needle, end)
    return events, size


#: How much of the file a summary scan covers at a time.
_SCAN_BYTES = 1 << 23

_DROPPED_PREFIX = b'{"kind":"dropped",'
_OUTLINE_KEY = b',"outline":'
_DETAIL_KEY = b',"detail":'


def _loads(line: bytes | bytearray) -> Any:
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        return None
