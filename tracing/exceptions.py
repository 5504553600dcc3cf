"""Exceptions as point events.

The traceback is formatted at once, on the (rare) error path, because the exception
object itself must not travel: it keeps frames alive and cannot be marshalled.
"""

from __future__ import annotations

import time
import traceback

from .records import Record

__all__ = ["exception_event"]


def exception_event(trace_id: int, span_id: int, exc: BaseException, **attrs: object) -> Record:
    return (
        "p",
        time.time_ns(),
        trace_id,
        span_id,
        "exception",
        {
            "exception.type": f"{type(exc).__module__}.{type(exc).__qualname__}",
            "exception.message": str(exc),
            "exception.stacktrace": "".join(traceback.format_exception(exc)),
            **attrs,
        },
    )
