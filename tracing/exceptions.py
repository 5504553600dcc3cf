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
    """Called while the app's exception propagates (or, for a framework that logs it,
    inside the app's logging call): nothing here may raise, or the app's exception
    would be replaced by hopscope's.  An exception's ``__str__`` is the app's code."""
    try:
        message = str(exc)
    except Exception:  # (said as the traceback module says it)
        message = "<exception str() failed>"
    return (
        "p",
        time.time_ns(),
        trace_id,
        span_id,
        "exception",
        {
            "exception.type": f"{type(exc).__module__}.{type(exc).__qualname__}",
            "exception.message": message,
            "exception.stacktrace": "".join(traceback.format_exception(exc)),
            **attrs,
        },
    )
