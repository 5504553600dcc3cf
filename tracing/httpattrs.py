"""The request attributes an HTTP span starts with, in one place.

The ASGI middleware's app span and the proxy's client span describe the same request
the same way (OpenTelemetry's names, in the same order), from the same tuple layout the
two record on their request paths; keeping one builder keeps a viewer's columns, filters
and exports from drifting between the two hops.
"""

from __future__ import annotations

from typing import Any

__all__ = ["request_attrs"]


def request_attrs(attrs: dict[str, Any], request: Any) -> dict[str, Any]:
    """Fill ``attrs`` from ``request``'s first eight fields: ``(method, scheme, version,
    path, query, client, server, headers)``, ``client``/``server`` as ``(host, port)``
    or None."""
    method, scheme, version, path, query, client, server, headers = request[:8]
    client = client or (None, None)
    server = server or (None, None)
    attrs["http.request.method"] = method
    attrs["url.scheme"] = scheme
    attrs["network.protocol.version"] = version
    attrs["url.path"] = path
    attrs["url.query"] = query
    attrs["client.address"] = client[0]
    attrs["client.port"] = client[1]
    attrs["server.address"] = server[0]
    attrs["server.port"] = server[1]
    attrs["http.request.headers"] = headers
    return attrs
