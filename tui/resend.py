"""Sending a captured request again from the UI, and what came back.

``hopscope replay`` (in the app package) replays whole files; the UI resends one or a
few requests the user picked, possibly edited, so it needs the request as plain,
editable parts (:class:`Outgoing`) rather than a capture.  What to send and how the
answers differ still come from :mod:`hopscope.tracing.replay`, so both agree.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

from hopscope.tracing.model import Trace
from hopscope.tracing.replay import CapturedRequest, Comparison, compare, replay_headers

__all__ = [
    "Outgoing",
    "Resent",
    "TargetError",
    "check_target",
    "original_target",
    "outgoing",
    "send",
]


@dataclass(slots=True)
class Outgoing:
    """A request about to be sent: what the edit screen shows and changes."""

    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes
    #: The Unix socket to send to (a ``unix:PATH`` target: the URL then names
    #: ``localhost``, as nginx names such an upstream), else None.
    uds: str | None = None


@dataclass(slots=True)
class Resent:
    """A request sent again, the answer, and how it differs from the captured one."""

    captured: CapturedRequest
    request: Outgoing
    status: int | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    error: str | None = None
    unreachable: bool = False
    duration_ns: int = 0
    comparison: Comparison | None = None


def original_target(trace: Trace) -> str:
    """``http://HOST:PORT`` the request went to: the recorded server address, else the
    captured Host header, else localhost."""
    spans = sorted(trace.spans.values(), key=lambda s: s.start or s.end or 0)
    for span in spans:
        host = span.attrs.get("server.address")
        if isinstance(host, str) and host and "http.request.method" in span.attrs:
            if host.startswith("/"):  # a Unix socket (a proxy's ``--upstream unix:PATH``)
                return f"unix:{host}"
            scheme = span.attrs.get("url.scheme")
            scheme = scheme if scheme in ("http", "https") else "http"
            port = span.attrs.get("server.port")
            shown = f"[{host}]" if ":" in host else host
            return f"{scheme}://{shown}:{port}" if port else f"{scheme}://{shown}"
    for span in spans:
        headers = span.attrs.get("http.request.headers")
        if isinstance(headers, list):
            for pair in headers:
                if isinstance(pair, list | tuple) and len(pair) == 2:
                    name, value = pair
                    if isinstance(name, str) and name.lower() == "host" and isinstance(value, str):
                        return f"http://{value}"
    return "http://127.0.0.1"


class TargetError(ValueError):
    """A replay target that is not ``http(s)://HOST[:PORT]``; the message is one line."""


def check_target(text: str) -> str:
    """The target typed in the replay prompt, as a base URL: ``localhost:8000`` means
    ``http://localhost:8000``; ``unix:PATH`` is a server bound to a Unix socket (as
    ``hopscope replay --target unix:PATH``).  Anything else that is not
    ``http(s)://HOST[:PORT]`` (and an optional path prefix) raises :class:`TargetError`,
    before anything is sent."""
    target = text.strip()
    if target.startswith("unix:"):
        if not target[5:] or any(ch.isspace() for ch in target):
            raise TargetError(f"not a target: {text!r}; give unix:PATH to a socket")
        return target
    if "://" not in target:
        target = "http://" + target
    try:
        parts = urlsplit(target)
        port = parts.port  # raises for a port that is not a number in range
    except ValueError as exc:
        raise TargetError(f"not a target: {text!r} ({exc}); give http://HOST:PORT") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetError(f"not a target: {text!r}; give http://HOST:PORT")
    if parts.query or parts.fragment or any(ch.isspace() for ch in target):
        raise TargetError(f"not a target: {text!r} (no query, no spaces); give http://HOST:PORT")
    del port
    return target


def outgoing(captured: CapturedRequest, target: str) -> Outgoing:
    """What resending ``captured`` to ``target`` sends (headers as ``hopscope replay``
    sends them: no Host, framing or hop-by-hop ones, redacted values withheld)."""
    safe = "/!$&'()*+,;=:@~" + ("%" if captured.path_encoded else "")
    path = quote(captured.path.encode("utf-8", "surrogateescape"), safe=safe)
    uds = target[5:] if target.startswith("unix:") else None
    base = "http://localhost" if uds is not None else target.rstrip("/")
    url = base + path + (f"?{captured.query}" if captured.query else "")
    headers, _withheld = replay_headers(captured.headers)
    return Outgoing(captured.method, url, headers, captured.body, uds)


def _encode(text: str) -> bytes:
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def _reason(exc: BaseException) -> str:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror[0].lower() + cause.strerror[1:]
        cause = cause.__cause__
    return str(exc) or type(exc).__name__


def send(
    captured: CapturedRequest, request: Outgoing, *, timeout: float = 30.0, edit_keys: str = "e"
) -> Resent:
    """Send ``request`` (blocking: call it from a worker thread); never raises for
    network trouble, the result says what went wrong.

    ``edit_keys`` is the key that opens the edit screen now (the user may have remapped
    it), for the message that says to use it."""
    result = Resent(captured, request)
    if captured.truncated and request.body == captured.body:
        # Never send a body cut at capture as if it were whole (hopscope replay skips
        # these too); a body typed in the edit screen is the user's own.
        result.error = f"not sent: its body was truncated at capture ({edit_keys} to edit the body)"
        return result
    # Imported here: only resending needs httpx, and importing it cost the start of
    # every ``hopscope view`` some 70 ms.
    import httpx

    start = 0
    try:
        transport = None if request.uds is None else httpx.HTTPTransport(uds=request.uds)
        with httpx.Client(
            timeout=timeout, follow_redirects=False, trust_env=False, transport=transport
        ) as client:
            # The captured headers, not httpx's defaults.
            for name in ("accept", "accept-encoding", "user-agent"):
                del client.headers[name]
            built = client.build_request(
                request.method,
                request.url,
                headers=[(_encode(n), _encode(v)) for n, v in request.headers],
                content=request.body or None,
            )
            start = time.perf_counter_ns()
            response = client.send(built, stream=True)
            try:
                result.status = response.status_code
                result.headers = [
                    (n.decode("latin-1"), v.decode("latin-1")) for n, v in response.headers.raw
                ]
                result.body = b"".join(response.iter_raw())
            finally:
                response.close()
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        result.unreachable = True
        where = request.url if request.uds is None else f"unix:{request.uds}"
        result.error = f"cannot reach {where}: {_reason(exc)}"
    except httpx.TimeoutException:
        result.error = f"timed out after {timeout:g}s"
    except Exception as exc:  # a bad URL or header typed in the edit screen
        result.error = f"cannot send: {type(exc).__name__}: {exc}"
    result.duration_ns = time.perf_counter_ns() - start if start else 0
    if result.status is not None:
        result.comparison = compare(captured, result.status, result.headers, result.body)
    return result
