"""Request and response, pretty: head line, headers, query, and the body as what it is.

A body is shown as JSON (indented and highlighted), form fields, text, or a hex dump,
decided from its content type and then from the bytes themselves, because apps often
send JSON as ``text/plain`` and binary as ``application/octet-stream`` or nothing.
Compressed bodies (gzip, deflate) are shown decompressed; a cut-off body decompresses as
far as its captured bytes go; a HAR's body is stored decoded already (its headers still
name the coding), so it is shown as stored.
"""

from __future__ import annotations

import json
from urllib.parse import parse_qsl

from hopscope.tracing.encoding import decode_prefix
from hopscope.tracing.model import Trace, outer_first
from rich.cells import cell_len
from rich.console import Group, RenderableType
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from . import formatting
from .exchange import Body, body, headers, url

__all__ = ["highlighted", "render_body", "render_message", "render_websocket"]

#: Bytes of a binary body shown as hex; the rest is summarised.
HEX_LIMIT = 4096
#: Text shown of a body (the capture itself is at most 64 KiB by default).
TEXT_LIMIT = 256 * 1024

SYNTAX_THEME = "monokai"

#: C0 controls but line breaks and tabs, DEL, C1 controls.
_CONTROLS = frozenset(map(chr, [*range(0x20), *range(0x7F, 0xA0)])) - set("\n\r\t")


#: Characters highlighted at most: colouring costs about 12 µs a character on the UI
#: thread (a 250 KB JSON body froze the UI for 3 s); longer text is shown plain.
HIGHLIGHT_LIMIT = 60_000
#: Header (or query, form) pairs laid out as a table at most: a table measures every
#: cell, and 3,000 response headers froze the UI for 4 s (2 s as aligned text lines).
TABLE_LIMIT = 200


def highlighted(code: str, lexer: str) -> Syntax | Text:
    """Syntax colours on the widget's own background (plain text past
    :data:`HIGHLIGHT_LIMIT`)."""
    if len(code) > HIGHLIGHT_LIMIT:
        return Text(code)
    return Syntax(code, lexer, theme=SYNTAX_THEME, background_color="default", word_wrap=True)


def _title(text: str) -> Text:
    return Text(text, style="bold underline")


def _pairs_table(pairs: list[tuple[str, str]], *, lines: bool = False) -> Table | Text:
    """Names and values; ``lines`` lets values break lines (a form's text fields), else a
    line break in a header shows as what it is."""
    if len(pairs) > TABLE_LIMIT:
        return _pairs_lines(pairs, lines=lines)
    table = Table(show_header=False, box=None, padding=(0, 1), expand=False)
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column(overflow="fold")
    for name, value in pairs:
        # Text, not str: Rich would read a header's "[/]" as markup.
        table.add_row(
            formatting.plain(formatting.clip(name)),
            formatting.plain(formatting.clip(value), lines=lines),
        )
    return table


def _pairs_lines(pairs: list[tuple[str, str]], *, lines: bool) -> Text:
    """Many pairs as the table would align them, one line each, at a fraction of its cost."""
    names = [formatting.printable(formatting.clip(name)) for name, _ in pairs]
    width = min(max(cell_len(name) for name in names), 40)
    text = Text(overflow="fold")
    for name, (_, value) in zip(names, pairs, strict=True):
        text.append(f" {formatting.pad(name, width)} ", style="bold cyan")
        text.append(formatting.printable(formatting.clip(value), lines=lines))
        text.append("\n")
    text.rstrip()
    return text


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
    # Control characters say binary; format ones (a BOM, zero-width joiners in an emoji,
    # bidi marks) are text, shown escaped.
    controls = sum(1 for ch in text[:4096] if ch in _CONTROLS)
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
    if captured.content_encoding and captured.decoded:
        notes.append(f"decoded from {captured.content_encoding} by the file's writer")
    elif captured.content_encoding:
        data, note = decode_prefix(data, captured.content_encoding, TEXT_LIMIT)
        if note:
            notes.append(note)
    heading = _title("Body")
    if notes:  # (the content type and coding are what the network sent)
        heading.append(formatting.printable("  " + " · ".join(notes)), style="dim")
    if not data:
        if captured.sent == -1:
            empty = "not read by the app: sent chunked, size unknown"
        elif captured.sent:
            empty = f"not read by the app: {captured.sent:,} bytes sent"
        else:
            empty = "not captured" if captured.size else "empty"
        return Group(heading, Text(f"({empty})", style="dim"))
    kind = captured.content_type.split(";")[0].strip().lower()
    text = _as_text(data[:TEXT_LIMIT], captured.content_type)
    if text is None:
        return Group(heading, _hexdump(data))
    if len(data) > TEXT_LIMIT:  # said, or the text would seem to end there
        cut = f"showing the first {formatting.size(TEXT_LIMIT)} of {formatting.size(len(data))}"
        heading.append(("  · " if notes else "  ") + cut, style="dim")
    if kind == "application/x-www-form-urlencoded":
        fields = parse_qsl(text, keep_blank_values=True)
        if fields:
            return Group(heading, _pairs_table(fields, lines=True))
    if "json" in kind or text.lstrip()[:1] in ("{", "["):
        try:
            pretty = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
        except (ValueError, RecursionError):
            pass
        else:
            return Group(heading, highlighted(formatting.printable(pretty, lines=True), "json"))
    return Group(heading, formatting.plain(text, lines=True))


def _is_websocket(trace: Trace) -> bool:
    return bool(trace.attr("network.protocol.name") == "websocket")


def render_websocket(trace: Trace) -> RenderableType:
    """A WebSocket's messages (the first ones each way, as recorded), then how it closed.

    ``in`` is towards the app, ``out`` towards the client; text shows as text, binary
    as hex.  The hop closest to the client that recorded messages tells them."""
    spans = [
        span
        for span in list(trace.spans.values())
        if any(event.name == "websocket.message" for event in span.events)
    ]
    span = min(spans, key=outer_first) if spans else trace.outermost("websocket.messages_in")
    counts = [trace.attr(f"websocket.{key}") for key in ("messages_in", "messages_out")]
    sizes = [trace.attr(f"websocket.{key}") for key in ("bytes_in", "bytes_out")]
    heading = _title("Messages")
    if all(isinstance(count, int) for count in counts):
        summary = f"  {counts[0]:,} in, {counts[1]:,} out"
        if all(isinstance(size, int) for size in sizes):
            summary += f" · {formatting.size(sizes[0])} in, {formatting.size(sizes[1])} out"
        heading.append(summary, style="dim")
    parts: list[RenderableType] = [heading]
    messages = [e for e in span.events if e.name == "websocket.message"] if span else []
    if not messages:
        parts.append(Text("(no messages recorded)", style="dim"))
    table = Table(show_header=False, box=None, padding=(0, 1), expand=False)
    table.add_column(style="dim", no_wrap=True, justify="right")
    table.add_column(no_wrap=True)
    table.add_column(style="dim", no_wrap=True, justify="right")
    table.add_column(overflow="fold")
    t0 = span.start if span is not None and span.start is not None else 0
    for event in messages:
        direction = str(event.attrs.get("direction", ""))
        arrow = Text("→ in " if direction == "in" else "← out", style="bold")
        size = event.attrs.get("size")
        text = event.attrs.get("text")
        data = event.attrs.get("bytes")
        recorded: int | None = None
        if isinstance(text, str):
            shown = formatting.plain(text, lines=True)
            recorded = len(text.encode("utf-8", "replace"))
        elif isinstance(data, str):  # bytes travel as latin-1 text
            raw = data.encode("latin-1", "replace")
            shown, recorded = Text(raw.hex(" "), style="#87afd7"), len(raw)
        else:
            shown = Text("(not recorded)", style="dim")
        if isinstance(size, int) and recorded is not None and recorded < size:
            shown.append(" …", style="dim")  # only its first bytes were recorded
        table.add_row(
            f"+{formatting.duration(event.ts - t0)}" if t0 else "",
            arrow,
            formatting.size(size) if isinstance(size, int) else "",
            shown,
        )
    if messages:
        parts.append(table)
        shown_count = len(messages)
        total = sum(count for count in counts if isinstance(count, int))
        if total > shown_count:
            parts.append(
                Text(f"(the first of each way recorded: {shown_count} of {total:,})", style="dim")
            )
    code = trace.attr("websocket.close_code")
    if code is not None:
        closed = formatting.plain(f"closed {code}", style="dim")
        reason = trace.attr("websocket.close_reason")
        if reason:
            closed.append(formatting.printable(f" {reason}"), style="dim")
        parts += [Text(), closed]
    return Group(*parts)


def render_message(trace: Trace, direction: str) -> RenderableType:
    """The ``request`` or ``response`` of ``trace`` as one renderable."""
    parts: list[RenderableType] = []
    if direction == "request":
        version = trace.attr("network.protocol.version")
        line = formatting.plain(f"{trace.method or '?'} ", style="bold")
        line.append(formatting.printable(formatting.clip(url(trace))))
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
        query = trace.attr("url.query")
        if query:
            parts += [
                Text(),
                _title("Query"),
                _pairs_table(parse_qsl(str(query), keep_blank_values=True)),
            ]
    else:
        trailers = headers(trace, "response", "trailers")
        if trailers:
            parts += [Text(), _title("Trailers"), _pairs_table(trailers)]
    if direction == "response" and _is_websocket(trace):
        parts += [Text(), render_websocket(trace)]
    else:
        parts += [Text(), render_body(body(trace, direction))]
    return Group(*parts)
