"""W3C ``traceparent`` headers: continue a caller's trace instead of starting a new one.

Shared by the ASGI and WSGI middlewares.  Parsing is strict (the W3C Trace Context
rules), because a malformed header must start a fresh trace rather than put the request
into some other trace by accident.
"""

from __future__ import annotations

__all__ = ["format_traceparent", "parse_traceparent"]

_HEX = frozenset("0123456789abcdef")


def _hex(text: str) -> bool:
    return bool(text) and all(ch in _HEX for ch in text)


def parse_traceparent(value: bytes | str) -> tuple[int, int] | None:
    """``(trace_id, parent_span_id)`` from a ``traceparent`` value, or None if invalid.

    Version ``00`` must be exactly four fields; a later version may append fields (the
    spec asks readers to parse the known prefix).  Version ``ff`` and all-zero ids are
    invalid.
    """
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode("ascii")
        except UnicodeDecodeError:
            return None
    value = value.strip(" \t")
    if len(value) < 55:
        return None
    version = value[:2]
    if not _hex(version) or version == "ff":
        return None
    if len(value) > 55 and (version == "00" or value[55] != "-"):
        return None
    if value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    trace, parent, flags = value[3:35], value[36:52], value[53:55]
    if not (_hex(trace) and _hex(parent) and _hex(flags)):
        return None
    trace_id, parent_id = int(trace, 16), int(parent, 16)
    if not trace_id or not parent_id:
        return None
    return trace_id, parent_id


def format_traceparent(trace_id: int, span_id: int, sampled: bool = True) -> str:
    """A version-00 ``traceparent`` value naming ``span_id`` as the parent."""
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"
