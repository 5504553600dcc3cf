"""Log records emitted while a request runs become ``log`` events of its span.

Capture goes through the log-record factory, not a handler: adding a handler to the
root logger would change what the app does (``logging.basicConfig()`` does nothing once
the root has a handler, and Python's last-resort stderr output stops).  The factory
sees every record a logger lets through, and outside a request it costs one contextvar
lookup per log call.

A record at ERROR or above that carries an exception is also offered to the request's
recording (``logged``): Flask, Django and Quart catch a view's exception, log it and
answer 500, so the exception never reaches the middleware.  The middlewares record the
first such exception as the request's error when its response is a 5xx (see
``_Exchange.finish`` and ``_HTTPRecording._handled``).
"""

from __future__ import annotations

import logging
import threading
import traceback
from typing import Any

from .context import current

__all__ = ["install_log_capture"]

#: First characters of a log message kept in the event.
MESSAGE_LIMIT = 4096

_lock = threading.Lock()
_installed = False


def install_log_capture() -> None:
    """Chain hopscope's capture onto the current log-record factory, once per process."""
    global _installed
    with _lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            ctx = current.get()
            if ctx is not None:
                _emit(ctx, record)
            return record

        logging.setLogRecordFactory(factory)
        _installed = True


def _emit(ctx: Any, record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a bad format string is the app's bug; the app's handler reports it
        try:
            message = str(record.msg)
        except Exception:  # a msg whose __str__ raises: the app's handler reports that too
            message = f"<unrepresentable {type(record.msg).__qualname__}>"
    attrs: dict[str, Any] = {
        "level": record.levelname,
        "logger": record.name,
        "message": message[:MESSAGE_LIMIT],
    }
    exc = record.exc_info[1] if record.exc_info else None
    if exc is not None:
        attrs["exception.stacktrace"] = "".join(traceback.format_exception(exc))
        if record.levelno >= logging.ERROR and isinstance(exc, Exception):
            try:
                if ctx.sink.logged is None:
                    ctx.sink.logged = exc
            except AttributeError:  # not a request's recording (a sink of its own)
                pass
    ctx.sink.emit(("p", int(record.created * 1e9), ctx.trace_id, ctx.span_id, "log", attrs))
