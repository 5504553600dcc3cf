"""Trace files: versioned JSON Lines, read back tolerantly.

Line 1 is a header ``{"format": "hopscope", "version": "1.0", ...}``; every other line
is one wire event.  The major version gates reading: a file from a newer major version
is refused with a one-line error, older ones go through :data:`UPGRADES`.
"""

from __future__ import annotations

import gc
import json
import operator
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

from .model import Trace, TraceBuilder

__all__ = [
    "FORMAT_VERSION",
    "LoadReport",
    "TraceFileError",
    "header_line",
    "load",
    "read_chunks",
    "read_events",
]

FORMAT_VERSION = "1.0"
FORMAT_NAME = "hopscope"

#: One converter per major version step: ``UPGRADES[n]`` turns an event of major
#: version ``n`` into one of ``n + 1``.  Empty until the format has a version 2.
UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


class TraceFileError(ValueError):
    """A trace file that cannot be read at all; the message is one line for the user."""


class TraceFileWarning(UserWarning):
    """Something in a trace file was skipped; everything else was kept."""


@dataclass
class LoadReport:
    """What reading a file had to skip."""

    events: int = 0
    malformed_lines: list[int] = field(default_factory=list)
    truncated_last_line: bool = False
    bytes_read: int = 0
    """How far into the file reading got (whole chunks): progress for a big file."""


def header_line() -> str:
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "created": time.time_ns(),
        "pid": os.getpid(),
    }
    return json.dumps(header, separators=(",", ":")) + "\n"


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
    is not a trace file), and ``report`` is up to date after each list.
    """
    report = report if report is not None else LoadReport()
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
        upgrades = [UPGRADES[step] for step in range(major, current)]
        number = 2  # of the first line of the chunk
        while True:
            lines = handle.readlines(_CHUNK_BYTES)
            if not lines:
                break
            report.bytes_read = handle.tell()
            events = _decode(lines, number, report)
            for upgrade in upgrades:
                events = [upgrade(event) for event in events]
            report.events += len(events)
            number += len(lines)
            if events:
                yield events
    finally:
        handle.close()


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
                return events  # type: ignore[no-any-return]
    events = []
    for offset, raw in enumerate(lines):
        try:
            event = json.loads(raw)
            if not isinstance(event, dict) or "kind" not in event:
                raise ValueError
        except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
            if not raw.endswith(b"\n"):
                report.truncated_last_line = True
            else:
                report.malformed_lines.append(number + offset)
            continue
        events.append(event)
    return events


def load(path: str | os.PathLike[str], *, strict: bool = False) -> list[Trace]:
    """Read a trace file into assembled traces.

    A cut-off last line (a crash mid-write) and malformed lines are skipped with one
    warning saying how many; ``strict=True`` raises instead.
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
    if problems:
        message = f"{os.fspath(path)}: " + "; ".join(problems) + f"; kept {report.events} events"
        if strict:
            raise TraceFileError(message)
        warnings.warn(message, TraceFileWarning, stacklevel=2)
    return list(builder.traces.values())
