"""Short human forms for times, sizes and statuses, shared by every widget."""

from __future__ import annotations

from datetime import datetime

from rich.style import Style
from rich.text import Text

__all__ = ["STATUS_STYLES", "clock", "duration", "plain", "printable", "size", "status_style"]

#: Control characters as what a terminal prints safely: C0 as their Unicode pictures
#: (``␛`` for ESC), DEL as ``␡``, C1 as ``\x9b``.  Paths, headers and bodies come from
#: the network: an ESC reaching the terminal raw would let a request recolour, clear or
#: retitle it.
_LINE_TABLE: dict[int, str] = {
    **{code: chr(0x2400 + code) for code in range(0x20)},
    0x7F: "\u2421",
    **{code: f"\\x{code:02x}" for code in range(0x80, 0xA0)},
}
#: The same for text of several lines: line breaks and tabs stay what they are.
_TEXT_TABLE = {code: s for code, s in _LINE_TABLE.items() if chr(code) not in "\n\r\t"}

STATUS_STYLES = {
    "1xx": Style(color="#8a8a8a"),
    "2xx": Style(color="#5fd75f"),
    "3xx": Style(color="#5fd7d7"),
    "4xx": Style(color="#ffd75f"),
    "5xx": Style(color="#ff5f5f", bold=True),
    "err": Style(color="#ff5f5f", bold=True),
}


def printable(text: str, *, lines: bool = False) -> str:
    """``text`` with its control characters made visible (see :data:`_LINE_TABLE`);
    ``lines`` keeps line breaks and tabs.  Text without any is returned as it is, after
    one scan in C."""
    if text.isprintable():
        return text
    return text.translate(_TEXT_TABLE if lines else _LINE_TABLE)


def plain(value: object, *, lines: bool = False, style: str = "") -> Text:
    """``value`` as a Rich Text that says exactly what it is: a ``str`` handed to Rich
    (a table cell, a notification) is read as markup, and ``[/]`` in a header crashed
    the UI."""
    text = value if isinstance(value, str) else str(value)
    return Text(printable(text, lines=lines), style=style)


def status_style(status: int | None, error: bool = False) -> Style:
    if status is None:
        return STATUS_STYLES["err"] if error else Style(dim=True)
    return STATUS_STYLES.get(f"{status // 100}xx", STATUS_STYLES["err"])


def duration(ns: int | None) -> str:
    """``850µs``, ``12.3ms``, ``123ms``, ``1.24s``, ``2m03s``: at most 6 cells."""
    if ns is None:
        return "…"
    if ns < 0:
        ns = 0
    if ns < 1_000_000:
        return f"{ns // 1000}µs"
    ms = ns / 1_000_000
    if ms < 100:
        return f"{ms:.1f}ms"
    if ms < 1000:
        return f"{ms:.0f}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.2f}s" if seconds < 10 else f"{seconds:.1f}s"
    minutes, rest = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{rest:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def size(count: int | None) -> str:
    """``0B``, ``512B``, ``1.2K``, ``34K``, ``1.2M``: at most 5 cells."""
    if count is None:
        return ""
    value = float(count)
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            if unit == "B":
                return f"{int(value)}B"
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
        value /= 1024
    return f"{count}B"  # pragma: no cover


def clock(ns: int | None) -> str:
    """Local wall-clock time ``HH:MM:SS.mmm``."""
    if ns is None:
        return "--:--:--.---"
    return datetime.fromtimestamp(ns / 1e9).strftime("%H:%M:%S.%f")[:-3]
