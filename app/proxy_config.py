"""What ``hopscope proxy`` is told: its upstream, where it listens, its timeouts.

Each is parsed into a value here or refused with a :class:`ProxyError` whose message is
one line (the CLI prints it and exits non-zero), before anything starts: the commands that
put the proxy in front of something (``proxy``, ``run``, the UI's front) share these.
"""

from __future__ import annotations

import errno
import math
import os
import socket
import ssl
from urllib.parse import urlsplit

__all__ = [
    "ProxyError",
    "Upstream",
    "bind",
    "check_timeout",
    "parse_listen",
    "parse_upstream",
    "tls_context",
]


class ProxyError(Exception):
    """The proxy cannot start (bad upstream, port in use); the message is one line."""


class Upstream:
    """The one place this proxy forwards to (it is never an open proxy).

    ``unix`` is the path of a Unix socket to connect to instead of ``host:port`` (a
    gunicorn or uvicorn bound to ``unix:PATH``, as they are behind nginx in production).
    The upstream is then ``localhost`` in its Host header and URLs, as nginx names it,
    and the socket's path is its ``host`` (``server.address`` in traces, as OpenTelemetry
    names a Unix socket), with no port.
    """

    __slots__ = ("host", "host_header", "origin", "port", "prefix", "scheme", "unix", "url")

    def __init__(
        self,
        host: str,
        port: int,
        prefix: str = "",
        scheme: str = "http",
        unix: str | None = None,
    ) -> None:
        self.host = host if unix is None else unix
        self.port: int | None = port if unix is None else None
        self.scheme = scheme
        self.unix = unix
        self.prefix = prefix.rstrip("/")
        shown = f"[{host}]" if ":" in host else host
        default = 443 if scheme == "https" else 80
        self.host_header = shown if port == default else f"{shown}:{port}"
        self.origin = f"{scheme}://{self.host_header}"
        self.url = f"{self.origin}{self.prefix}"

    def __str__(self) -> str:
        return f"unix:{self.unix}" if self.unix is not None else self.url

    @property
    def tls(self) -> bool:
        return self.scheme == "https"


def parse_upstream(url: str) -> Upstream:
    """``http[s]://HOST[:PORT][/PREFIX]`` or ``unix:PATH`` -> :class:`Upstream` (raises
    :class:`ProxyError`)."""
    if url.startswith("unix:"):
        path = url[5:]
        if not path:
            raise ProxyError(f"--upstream unix: needs a socket path, got {url!r}")
        return Upstream("localhost", 80, unix=os.path.abspath(path))
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ProxyError(f"invalid --upstream {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ProxyError(
            f"--upstream must look like http://HOST:PORT, https://HOST or unix:PATH, got {url!r}"
        )
    if parts.query or parts.fragment:
        raise ProxyError(f"--upstream cannot have a query or fragment, got {url!r}")
    default = 443 if parts.scheme == "https" else 80
    return Upstream(parts.hostname, port or default, parts.path, parts.scheme)


def tls_context(insecure: bool = False) -> ssl.SSLContext:
    """The client context for an https upstream: the system's CAs and hostname checks,
    or (``insecure``, for a dev server's self-signed certificate) no verification."""
    context = ssl.create_default_context()
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def check_timeout(option: str, seconds: float) -> float:
    """``seconds`` when it is a usable timeout (raises :class:`ProxyError`): NaN or
    infinity would reach the event loop's timers, and every request fail there."""
    if not (math.isfinite(seconds) and seconds > 0):
        raise ProxyError(f"{option} must be a positive number of seconds, got {seconds!r}")
    return seconds


def parse_listen(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``:PORT`` (loopback) -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ProxyError(f"--listen must be HOST:PORT, got {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, inheritable (a server may run it in a
    worker); raises :class:`ProxyError` saying which address and why, in one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            raise ProxyError(f"cannot listen on {where}: address already in use") from None
        raise ProxyError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock
