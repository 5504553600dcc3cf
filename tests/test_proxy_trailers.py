"""Upstream response trailers through ``hopscope proxy``.

uvicorn (the upstream servers of the other tests) cannot send trailers over HTTP/1.1,
so the upstream here is a small socket server that answers every request with a
chunked body and a trailer section, and remembers the request heads it got.  The
clients are raw sockets too: what is checked is the bytes on the wire.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest
from hopscope.tracing.model import Span
from test_proxy import HOST, Proxy, finished, proxy_to

pytestmark = pytest.mark.timeout(60)

RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/plain\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"Trailer: X-Checksum\r\n"
    b"\r\n"
    b"5\r\nhello\r\n"
    b"6\r\n world\r\n"
    b"0\r\n"
    b"X-Checksum: abc123\r\n"
    b"X-Count: 2\r\n"
    b"\r\n"
)


class TrailerServer:
    """Answers each request on a kept-alive connection with :data:`RESPONSE`."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.url = f"http://{HOST}:{self.sock.getsockname()[1]}"
        self.heads: list[bytes] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        buffer = b""
        with conn:
            while not self.stopped.is_set():
                while b"\r\n\r\n" not in buffer:
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                self.heads.append(head.lower())
                conn.sendall(RESPONSE)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    server = TrailerServer()
    try:
        with proxy_to(server.url) as running:
            running.upstream_heads = server.heads  # type: ignore[attr-defined]
            yield running
    finally:
        server.close()


def proxy_span(proxy: Proxy, path: str) -> Span:
    trace, _ = proxy.span("client", path)
    return trace.by_hop("proxy")[0]


def exchange(proxy: Proxy, te: bytes | None, path: str = "/") -> bytes:
    """One raw request; returns the raw response up to the end of its chunked body."""
    extra = b"TE: " + te + b"\r\n" if te is not None else b""
    request = b"GET " + path.encode() + b" HTTP/1.1\r\nHost: proxied\r\n" + extra + b"\r\n"
    with contextlib.closing(socket.create_connection((HOST, proxy.port), timeout=10)) as sock:
        sock.sendall(request)
        data = b""
        while not (b"\r\n0\r\n" in data and data.endswith(b"\r\n\r\n")):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


def test_trailers_forwarded_when_the_client_takes_them(proxy: Proxy) -> None:
    raw = exchange(proxy, b"trailers", "/with-te")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"\r\ntrailer: X-Checksum" in head  # announced as upstream did
    assert body.endswith(b"0\r\nX-Checksum: abc123\r\nX-Count: 2\r\n\r\n")  # (names as sent)
    assert b"hello" in body and b" world" in body
    # TE is hop-by-hop: the proxy says it itself, upstream.
    assert b"\r\nte: trailers" in proxy.upstream_heads[-1]  # type: ignore[attr-defined]
    span = finished(proxy, "/with-te")
    up_span = proxy_span(proxy, "/with-te")
    event = up_span.event("response.trailers")
    assert event is not None and event.attrs["forwarded"] is True
    assert ["X-Checksum", "abc123"] in event.attrs["http.response.trailers"]
    assert span.attrs["http.response.status_code"] == 200


def test_trailers_recorded_not_sent_without_te(proxy: Proxy) -> None:
    raw = exchange(proxy, None, "/no-te")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert body.endswith(b"\r\n0\r\n\r\n")
    assert b"abc123" not in raw and b"trailer:" not in head.lower()
    assert b"\r\nte:" not in proxy.upstream_heads[-1]  # type: ignore[attr-defined]
    finished(proxy, "/no-te")
    up_span = proxy_span(proxy, "/no-te")
    event = up_span.event("response.trailers")
    assert event is not None and event.attrs["forwarded"] is False
    assert ["X-Count", "2"] in event.attrs["http.response.trailers"]


def test_trailers_do_not_leak_into_the_next_response(proxy: Proxy) -> None:
    """Two exchanges on one client connection: each gets its own trailer section."""
    with contextlib.closing(socket.create_connection((HOST, proxy.port), timeout=10)) as sock:
        for te in (b"TE: trailers\r\n", b""):
            sock.sendall(b"GET /twice HTTP/1.1\r\nHost: proxied\r\n" + te + b"\r\n")
            data = b""
            while not (b"\r\n0\r\n" in data and data.endswith(b"\r\n\r\n")):
                chunk = sock.recv(65536)
                assert chunk
                data += chunk
            assert (b"abc123" in data) == bool(te)
