"""Saving what the UI holds as a trace file, and the prompt that asks where.

The file is the same JSON Lines format :class:`~hopscope.tracing.FileSink` writes (a
header line, then events), created with mode 0600 even if it existed, because headers and
bodies can carry secrets.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

from hopscope.tracing.tracefile import TraceFileWriter

from .prompt import PromptScreen

__all__ = ["SaveScreen", "default_name", "write_trace_file"]


def default_name() -> str:
    return time.strftime("hopscope-%Y%m%d-%H%M%S.jsonl")


def write_trace_file(path: str, events: Iterable[dict[str, Any]]) -> int:
    """Write a loadable trace file (summaries included); returns the number of events
    written.

    Raises OSError with the file name in its message.
    """
    path = os.path.expanduser(path)
    writer = TraceFileWriter.create(path)
    count = 0
    try:
        batch: list[dict[str, Any]] = []
        for event in events:
            batch.append(event)
            if len(batch) >= 5_000:
                writer.write(batch)
                count += len(batch)
                batch = []
        writer.write(batch)
        count += len(batch)
    finally:
        writer.close()
    return count


class SaveScreen(PromptScreen):
    """Asks for a file name; dismisses with the path, or None when cancelled."""

    def __init__(self, suggestion: str) -> None:
        super().__init__(
            "Save the trace (JSON Lines, mode 0600) to:",
            suggestion,
            accept="save",
            input_id="save-path",
            hint_id="save-hint",
        )
