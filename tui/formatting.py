"""Short human forms for times, sizes and statuses, shared by every widget."""

from __future__ import annotations

from datetime import datetime

from hopscope.tracing.safetext import LINE_ESCAPES, printable
from rich.cells import cell_len
from rich.style import Style
from rich.text import Text

__all__ = [
    "STATUS_STYLES",
    "VALUE_LIMIT",
    "clip",
    "clock",
    "duration",
    "one_for_one",
    "pad",
    "plain",
    "printable",
    "size",
    "status_style",
]

STATUS_STYLES = {
    "1xx": Style(color="#8a8a8a"),
    "2xx": Style(color="#5fd75f"),
    "3xx": Style(color="#5fd7d7"),
    "4xx": Style(color="#ffd75f"),
    "5xx": Style(color="#ff5f5f", bold=True),
    "err": Style(color="#ff5f5f", bold=True),
}


#: Characters of one header value, URL or name shown; the rest is counted.  Rich folds a
#: value line by line as it lays it out: a 300,000-character query and a 500,000-character
#: header (a HAR's ``data:`` URL is as long) froze the UI for seconds on each look.
VALUE_LIMIT = 10_000


def clip(text: str, limit: int = VALUE_LIMIT) -> str:
    """``text``, or its first ``limit`` characters and how many more there are."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit:,} more characters)"


def one_for_one(text: str, *, keep: str = "") -> str:
    """``text`` with each control or invisible character as one visible character (C0
    and DEL as their pictures, others as ``�``), but those in ``keep``: for a field
    being edited, where the cursor and the selection count characters and must stay
    where they are."""
    if text.isprintable():
        return text
    return "".join(
        char if char in keep else shown if len(shown := LINE_ESCAPES[ord(char)]) == 1 else "\ufffd"
        for char in text
    )


def pad(text: str, width: int) -> str:
    """``text`` filled with spaces to ``width`` terminal cells (never cut): a CJK
    character or an emoji takes two cells, and ``f"{text:<{width}}"`` counts one."""
    return text + " " * max(width - cell_len(text), 0)


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
