"""Saving what the UI holds as a trace file, and the prompt that asks where.

The file is the same JSON Lines format :class:`~hopscope.tracing.FileSink` writes (a
header line, then events), created with mode 0600 even if it existed, because headers and
bodies can carry secrets.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from typing import Any

from hopscope.tracing.tracefile import header_line

from .prompt import PromptScreen

__all__ = ["SaveScreen", "default_name", "write_trace_file"]


def default_name() -> str:
    return time.strftime("hopscope-%Y%m%d-%H%M%S.jsonl")


def write_trace_file(path: str, events: Iterable[dict[str, Any]]) -> int:
    """Write a loadable trace file; returns the number of events written.

    Raises OSError with the file name in its message.
    """
    path = os.path.expanduser(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    count = 0
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8", closefd=False) as handle:
            handle.write(header_line())
            for event in events:
                handle.write(json.dumps(event, separators=(",", ":"), default=repr))
                handle.write("\n")
                count += 1
    finally:
        os.close(fd)
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
