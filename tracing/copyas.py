"""Copy as curl, HTTPie or httpx: a recorded request as something that sends it again.

The point is reproducing a bug, so every command aims at sending the same bytes:
headers in order with repeats, the body byte for byte (binary bodies through escapes a
shell or Python reads back exactly), and the client's own default headers removed when
the original request did not have them.  What cannot be reproduced (a redacted
credential, a body that was only partly captured) is said in a comment at the top
rather than silently faked.

Headers that describe one connection (hop-by-hop ones, Content-Length, Host) are left
to the client: the URL carries the host, and the client frames the body itself.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from .har import exchange, redact_body, redact_header_values, redact_query
from .model import Trace, header_value
from .redact import is_redacted, is_sensitive

__all__ = ["CopyError", "ReplayRequest", "as_curl", "as_httpie", "as_httpx", "replay_request"]

#: RFC 9110 7.6.1 connection-specific fields, plus what the sending client computes.
_LEFT_OUT = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "http2-settings",
        "content-length",
        "host",
    }
)

#: Bytes a shell single-quoted string and ``printf`` formats can hold as they are.
_PLAIN = frozenset(range(0x20, 0x7F)) - {ord("\\"), ord("'"), ord("%")}


class CopyError(ValueError):
    """The trace holds no HTTP request to copy."""


@dataclass(slots=True)
class ReplayRequest:
    """What a copied command sends."""

    method: str
    url: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | None = None
    """None: no body at all; ``b""``: an empty body with its Content-Length: 0."""
    notes: list[str] = field(default_factory=list)
    """What could not be reproduced, for a comment above the command."""

    def has(self, name: str) -> bool:
        lowered = name.lower()
        return any(key.lower() == lowered for key, _ in self.headers)


def replay_request(
    trace: Trace, *, base_url: str | None = None, redact: bool = True
) -> ReplayRequest:
    """The request to send again; ``base_url`` (``http://127.0.0.1:9000``, maybe with a
    path prefix) replaces the scheme and host the request went to.

    With ``redact``, sensitive headers (Authorization, Cookie, ``*token*``...) are left
    out and named in the notes, as are those already redacted in the trace.
    """
    ex = exchange(trace)
    if ex is None:
        raise CopyError(f"trace {trace.trace_id} holds no HTTP request")
    query = redact_query(ex.query) if redact else ex.query
    target = ex.path + (f"?{query}" if query else "")
    url = (base_url.rstrip("/") if base_url else f"{ex.scheme}://{ex.authority}") + target
    listed = {
        token.strip().lower()
        for name, value in ex.request_headers
        if name.lower() == "connection"
        for token in value.split(",")
    }
    request = ReplayRequest(ex.method, url)
    hidden = query != ex.query
    for name, value in ex.request_headers:
        lowered = name.lower()
        if lowered in _LEFT_OUT or lowered in listed or name.startswith(":"):
            continue
        if is_redacted(value):
            request.notes.append(f"header {name} was redacted in the trace")
            continue
        if redact and is_sensitive(name):
            request.notes.append(f"header {name} is left out (secret)")
            hidden = True
            continue
        if redact:
            ((_, cleaned),) = redact_header_values([(name, value)])
            if cleaned != value:
                request.notes.append(f"secret query parameters in header {name} are redacted")
                hidden, value = True, cleaned
        request.headers.append((name, value))
    size = ex.request_body_size
    framing = ("content-length", "transfer-encoding")
    sent_length = any(name.lower() in framing for name, _ in ex.request_headers)
    if ex.request_body or sent_length or size:
        request.body = ex.request_body
        if redact and ex.request_body:
            content_type = header_value(ex.request_headers, "content-type") or ""
            request.body = redact_body(ex.request_body, content_type)
    if ex.request_truncated:
        request.notes.append(
            f"body cut: only the first {len(ex.request_body)}"
            + (f" of {size}" if size is not None else "")
            + " bytes were captured"
        )
    elif size and not ex.request_body:
        request.notes.append(f"the body ({size} bytes) was not captured")
    elif ex.request_unread:
        request.notes.append("the body was not captured: the app did not read it (sent chunked)")
    if query != ex.query:
        request.notes.append("secret query parameters are redacted")
    if request.body is not None and request.body != ex.request_body:
        request.notes.append("secret fields in the body are redacted")
        hidden = True
    if hidden:
        request.notes.append("hopscope export --no-redact keeps the secrets")
    return request


def _comments(request: ReplayRequest) -> list[str]:
    return [f"# {note}" for note in request.notes]


def _shell_bytes(data: bytes) -> str:
    """The body as one shell word: plain quoting for text, ``$'...'`` escapes otherwise."""
    try:
        text = data.decode("utf-8")
        if all(ch.isprintable() or ch in "\n\t" for ch in text):
            return shlex.quote(text)
    except UnicodeDecodeError:
        pass
    out = []
    for byte in data:
        if byte in _PLAIN or byte == ord("%"):
            out.append(chr(byte))
        elif byte in (ord("\\"), ord("'")):
            out.append("\\" + chr(byte))
        else:
            out.append(f"\\x{byte:02x}")
    return "$'" + "".join(out) + "'"


def _printf(data: bytes) -> str:
    """A ``printf`` that writes ``data`` exactly, NUL bytes included (which no shell
    string can hold)."""
    out = []
    for byte in data:
        if byte == ord("%"):
            out.append("%%")
        elif byte in _PLAIN:
            out.append(chr(byte))
        else:
            out.append(f"\\{byte:03o}")
    return "printf " + shlex.quote("".join(out))


def as_curl(trace: Trace, *, base_url: str | None = None, redact: bool = True) -> str:
    """A curl command line (bash or zsh) that sends the request again."""
    request = replay_request(trace, base_url=base_url, redact=redact)
    parts = ["curl"]
    body = request.body
    if request.method == "HEAD" and body is None:
        parts.append("--head")
    elif request.method != ("POST" if body is not None else "GET"):
        parts += ["-X", shlex.quote(request.method)]
    if any(ch in request.url for ch in "[]{}"):
        parts.append("--globoff")
    if "/." in request.url.split("?")[0]:
        parts.append("--path-as-is")
    parts.append(shlex.quote(request.url))
    for name, value in request.headers:
        # "Name:" would remove the header in curl; "Name;" sends it empty.
        parts += ["-H", shlex.quote(f"{name}: {value}" if value else f"{name};")]
    # curl adds these when they are not given: remove them when the original had none.
    for default in ("User-Agent", "Accept"):
        if not request.has(default):
            parts += ["-H", shlex.quote(f"{default}:")]
    if body is not None:
        if not request.has("Content-Type"):
            parts += ["-H", shlex.quote("Content-Type:")]
        if b"\0" in body:
            parts += ["--data-binary", f"@<({_printf(body)})"]
        else:
            parts += ["--data-binary", _shell_bytes(body)]
    return "\n".join([*_comments(request), " ".join(parts)]) + "\n"


def as_httpie(trace: Trace, *, base_url: str | None = None, redact: bool = True) -> str:
    """An HTTPie command line (bash or zsh) that sends the request again.

    HTTPie percent-encodes ``[]{}`` and the like in the query (urllib3 does): servers
    decode them alike, but the bytes on the wire differ from the original's.
    """
    request = replay_request(trace, base_url=base_url, redact=redact)
    body = request.body
    # HTTPie reads its arguments as text: a binary body goes in through stdin.
    piped = body is not None and _shell_bytes(body).startswith("$'")
    parts = ["http"]
    if not piped:
        parts.append("--ignore-stdin")  # else HTTPie reads a body from a non-tty stdin
    parts += [shlex.quote(request.method), shlex.quote(request.url)]
    for name, value in request.headers:
        # HTTPie: "Name:" removes a header, "Name;" sends it empty; ":" "=" "@" in the
        # name would be read as separators, hence the backslashes.
        escaped = "".join("\\" + ch if ch in ":=@;\\" else ch for ch in name)
        parts.append(shlex.quote(f"{escaped}:{value}" if value else f"{escaped};"))
    for default in ("User-Agent", "Accept", "Accept-Encoding"):
        if not request.has(default):
            parts.append(shlex.quote(f"{default}:"))
    if body is not None:
        if not request.has("Content-Type"):
            parts.append(shlex.quote("Content-Type:"))
        if piped:
            parts.append(f"< <({_printf(body)})")
        else:
            parts += ["--raw", _shell_bytes(body)]
    return "\n".join([*_comments(request), " ".join(parts)]) + "\n"


def as_httpx(trace: Trace, *, base_url: str | None = None, redact: bool = True) -> str:
    """A Python script using httpx that sends the request again and prints the answer."""
    request = replay_request(trace, base_url=base_url, redact=redact)
    lines = [*_comments(request), "import httpx", ""]
    headers = list(request.headers)
    if request.body == b"":  # httpx sends no Content-Length for an empty body
        headers.append(("Content-Length", "0"))
    lines.append("headers = [")
    lines += [f"    ({name!r}, {value!r})," for name, value in headers]
    lines.append("]")
    args = [repr(request.method), repr(request.url), "headers=headers"]
    if request.body is not None:
        lines.append(f"content = {request.body!r}")
        args.append("content=content")
    lines += ["", "with httpx.Client() as client:"]
    for default in ("User-Agent", "Accept", "Accept-Encoding"):
        if not request.has(default):
            lines.append(f"    del client.headers[{default!r}]  # the original had none")
    lines.append(f"    response = client.request({', '.join(args)})")
    lines += [
        "print(response.status_code, response.reason_phrase)",
        "print(response.text)",
    ]
    return "\n".join(lines) + "\n"
