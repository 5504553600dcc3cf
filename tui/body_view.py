"""Request and response, pretty: head line, headers, query, and the body as what it is.

A body is shown as JSON (indented and highlighted), form fields, text, or a hex dump,
decided from its content type and then from the bytes themselves, because apps often
send JSON as ``text/plain`` and binary as ``application/octet-stream`` or nothing.
Compressed bodies (gzip, deflate) are shown decompressed; a cut-off body decompresses as
far as its captured bytes go.
"""

from __future__ import annotations

import json
from urllib.parse import parse_qsl

from hopscope.tracing.encoding import decode_prefix
from hopscope.tracing.model import Trace
from rich.console import Group, RenderableType
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from . import formatting
from .exchange import Body, attr, body, headers, url

__all__ = ["highlighted", "render_body", "render_message"]

#: Bytes of a binary body shown as hex; the rest is summarised.
HEX_LIMIT = 4096
#: Text shown of a body (the capture itself is at most 64 KiB by default).
TEXT_LIMIT = 256 * 1024

SYNTAX_THEME = "monokai"


def highlighted(code: str, lexer: str) -> Syntax:
    """Syntax colours on the widget's own background."""
    return Syntax(code, lexer, theme=SYNTAX_THEME, background_color="default", word_wrap=True)


def _title(text: str) -> Text:
    return Text(text, style="bold underline")


def _pairs_table(pairs: list[tuple[str, str]]) -> Table:
    table = Table(show_header=False, box=None, padding=(0, 1), expand=False)
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column(overflow="fold")
    for name, value in pairs:
        table.add_row(name, value)
    return table


def _hexdump(data: bytes) -> Text:
    lines = []
    for offset in range(0, min(len(data), HEX_LIMIT), 16):
        chunk = data[offset : offset + 16]
        hexes = " ".join(f"{b:02x}" for b in chunk)
        chars = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{offset:08x}  {hexes:<47}  {chars}")
    text = Text("\n".join(lines), no_wrap=True)
    if len(data) > HEX_LIMIT:
        text.append(f"\n… {len(data) - HEX_LIMIT:,} more bytes", style="dim")
    return text


def _as_text(data: bytes, content_type: str) -> str | None:
    """The body as text, or None when it looks binary."""
    charset = "utf-8"
    for part in content_type.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.lower() == "charset" and value:
            charset = value.strip('"')
    try:
        text = data.decode(charset)
    except (LookupError, UnicodeDecodeError):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            # A body cut mid-character is still text.
            if exc.start < len(data) - 4:
                return None
            text = data[: exc.start].decode("utf-8")
    controls = sum(1 for ch in text[:4096] if not ch.isprintable() and ch not in "\n\r\t")
    if controls > max(2, len(text[:4096]) // 100):
        return None
    return text


def render_body(captured: Body) -> RenderableType:
    data = captured.data
    notes: list[str] = []
    if captured.size is not None:
        notes.append(
            formatting.size(captured.size) if captured.size >= 1024 else f"{captured.size} bytes"
        )
    if captured.content_type:
        notes.append(captured.content_type)
    if captured.truncated:
        notes.append(f"showing the first {len(data):,} bytes captured")
    if captured.content_encoding:
        data, note = decode_prefix(data, captured.content_encoding, TEXT_LIMIT)
        if note:
            notes.append(note)
    heading = _title("Body")
    if notes:
        heading.append("  " + " · ".join(notes), style="dim")
    if not data:
        empty = "not captured" if captured.size else "empty"
        return Group(heading, Text(f"({empty})", style="dim"))
    kind = captured.content_type.split(";")[0].strip().lower()
    text = _as_text(data[:TEXT_LIMIT], captured.content_type)
    if text is None:
        return Group(heading, _hexdump(data))
    if kind == "application/x-www-form-urlencoded":
        fields = parse_qsl(text, keep_blank_values=True)
        if fields:
            return Group(heading, _pairs_table(fields))
    if "json" in kind or text.lstrip()[:1] in ("{", "["):
        try:
            pretty = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
        except (ValueError, RecursionError):
            pass
        else:
            return Group(heading, highlighted(pretty, "json"))
    return Group(heading, Text(text))


def render_message(trace: Trace, direction: str) -> RenderableType:
    """The ``request`` or ``response`` of ``trace`` as one renderable."""
    parts: list[RenderableType] = []
    if direction == "request":
        version = attr(trace, "network.protocol.version")
        line = Text(f"{trace.method or '?'} ", style="bold")
        line.append(url(trace))
        if version:
            line.append(f"  HTTP/{version}", style="dim")
        parts.append(line)
    else:
        status = trace.status
        if status is None:
            parts.append(
                Text("no response yet" if not trace.finished else "no response", style="dim")
            )
        else:
            parts.append(Text(f"{status}", style=formatting.status_style(status)))
    parts.append(Text())
    pairs = headers(trace, direction)
    parts.append(_title(f"Headers ({len(pairs)})"))
    parts.append(_pairs_table(pairs) if pairs else Text("(none)", style="dim"))
    if direction == "request":
        query = attr(trace, "url.query")
        if query:
            parts += [
                Text(),
                _title("Query"),
                _pairs_table(parse_qsl(str(query), keep_blank_values=True)),
            ]
    else:
        trailers = attr(trace, "http.response.trailers")
        if isinstance(trailers, list) and trailers:
            parts += [
                Text(),
                _title("Trailers"),
                _pairs_table([(str(k), str(v)) for k, v in trailers]),
            ]
    parts += [Text(), render_body(body(trace, direction))]
    return Group(*parts)
