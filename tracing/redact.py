"""Secrets in headers and query strings: which ones to hide before a trace leaves the
machine, and how to recognise a value that was hidden.

Exporters (HAR, OTLP) redact with :func:`redact_headers` and :func:`redact_query`
because their files get attached to bug reports and shipped to tracing backends;
``hopscope replay`` reads the other side: a redacted value must never be sent as if it
were the real credential, so it is spotted with :func:`is_redacted` and left out unless
the user supplies the real one, and a URL redacted in the capture is compared redacted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import quote, unquote_plus

__all__ = [
    "REDACTED",
    "SENSITIVE_HEADERS",
    "is_redacted",
    "is_sensitive",
    "redact_attrs",
    "redact_headers",
    "redact_query",
    "redact_url",
]

#: What a hidden header value is replaced with.
REDACTED = "[redacted]"

#: Header names (lowercase) that always carry credentials or session state.
SENSITIVE_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-api-key",
        "api-key",
        "x-auth-token",
    }
)

#: Any header whose name contains one of these (``_`` read as ``-``) is sensitive too:
#: ``X-CSRF-Token``, ``X-Client-Secret``, ``X-Upstream-Api-Key``, ``X-DB-Password``...
_SENSITIVE_PARTS = ("token", "secret", "api-key", "apikey", "password")

#: Values other tools use for "hidden"; compared without case or surrounding space.
_MARKERS = frozenset({REDACTED, "<redacted>", "redacted", "[filtered]", "[hidden]", "***"})

_HEADER_KEYS = ("http.request.headers", "http.response.headers", "http.response.trailers")


def is_sensitive(name: str) -> bool:
    """True when a header of this name should not be written out as is."""
    lowered = name.lower().replace("_", "-")
    return lowered in SENSITIVE_HEADERS or any(part in lowered for part in _SENSITIVE_PARTS)


def is_redacted(value: str) -> bool:
    """True when a header value is a redaction marker rather than real data.

    ``Bearer [redacted]`` counts: some redactors keep the scheme.
    """
    lowered = value.strip().lower()
    return lowered in _MARKERS or REDACTED in lowered


def redact_headers(pairs: Iterable[Sequence[str]]) -> list[tuple[str, str]]:
    """The header pairs with every sensitive value replaced by :data:`REDACTED`.

    Order and duplicates are kept, so the result still shows which headers were sent.
    """
    return [
        (name, REDACTED if is_sensitive(name) else value)
        for name, value in (_pair(pair) for pair in pairs)
    ]


def redact_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """A copy of span attributes with the header lists (request, response, trailers)
    redacted; other attributes are shared, not copied."""
    out = dict(attrs)
    for key in _HEADER_KEYS:
        headers = out.get(key)
        if isinstance(headers, list):
            out[key] = [list(pair) for pair in redact_headers(headers)]
    return out


def _pair(pair: Sequence[str]) -> tuple[str, str]:
    name, value = pair
    return name, value


def redact_query(query: str) -> str:
    """The raw query string with the values of sensitive parameters (``token``,
    ``api_key``, ``password``...) replaced, everything else byte for byte."""
    if not query:
        return query
    parts = []
    for part in query.split("&"):
        name, sep, _ = part.partition("=")
        if sep and is_sensitive(unquote_plus(name)):
            part = f"{name}={quote(REDACTED)}"
        parts.append(part)
    return "&".join(parts)


def redact_url(url: str) -> str:
    """``url`` (absolute, or a path with a query) with :func:`redact_query` applied."""
    head, sep, query = url.partition("?")
    if not sep:
        return url
    query, hash_sep, fragment = query.partition("#")
    return f"{head}?{redact_query(query)}{hash_sep}{fragment}"
