"""The proxy's own listening side (``hopscope.app.listener``), on raw sockets.

What uvicorn's protocol did for the proxy before, the listener must do the same way:
pipelined requests with bodies answered in order, chunked and Content-Length uploads,
``Expect: 100-continue``, HTTP/1.0, a malformed request answered 400, the keep-alive
idle timeout, and a WebSocket upgrade handed to uvicorn's protocol (also after a plain
request on the same connection).
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hopscope.tracing.model import Span
from servers import read_head
from test_proxy import (
    HOST,
    Proxy,
    Running,
    finished,
    gate,
    proxy_error,
    proxy_to,
    upstream_server,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def upstream() -> Iterator[Running]:
    with upstream_server() as running:
        yield running


@pytest.fixture(scope="module")
def proxy(upstream: Running) -> Iterator[Proxy]:
    with proxy_to(upstream.url) as running:
        yield running


def read_responses(
    sock: socket.socket, count: int, heads: tuple[int, ...] = (), timeout: float = 10.0
) -> list[bytes]:
    """``count`` whole responses (Content-Length or chunked bodies; the ``heads``-th
    answer a HEAD) read from ``sock``."""
    sock.settimeout(timeout)
    data = b""
    out: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(out) < count and time.monotonic() < deadline:
        parsed = _one(data, len(out) in heads)
        if parsed is not None:
            response, data = parsed
            out.append(response)
            continue
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return out


def _one(data: bytes, head_only: bool) -> tuple[bytes, bytes] | None:
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    lower = head.lower()
    if head_only:
        return head + sep, rest
    if b"content-length: " in lower:
        size = int(lower.split(b"content-length: ")[1].split(b"\r\n")[0])
        if len(rest) < size:
            return None
        return head + sep + rest[:size], rest[size:]
    if b"transfer-encoding: chunked" in lower:
        end = rest.find(b"\r\n0\r\n\r\n")
        if rest.startswith(b"0\r\n\r\n"):
            return head + sep + rest[:5], rest[5:]
        if end < 0:
            return None
        return head + sep + rest[: end + 7], rest[end + 7 :]
    return head + sep, rest


def body_of(response: bytes) -> bytes:
    head, _, body = response.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" not in head.lower():
        return body
    out = b""
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out, body = out + body[:size], body[size + 2 :]
    return out


def connect(running: Running | Proxy) -> socket.socket:
    return connect_to(running.port)


def connect_to(port: int) -> socket.socket:
    return socket.create_connection((HOST, port), timeout=10)


def test_pipelined_requests_with_bodies_are_answered_in_order(proxy: Proxy) -> None:
    first = os.urandom(100_000)
    chunks = [os.urandom(5000), os.urandom(70_000), b"end"]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    requests = (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(first), first)
        + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        + b"POST /count HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked
        + b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n"
        + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    with connect(proxy) as sock:
        sock.sendall(requests)
        echo, hello, count, head, again = read_responses(sock, 5, heads=(3,))
    assert echo.startswith(b"HTTP/1.1 200 ") and body_of(echo) == first
    assert body_of(hello) == b"Hello, world!"
    counted = json.loads(body_of(count))
    assert counted["size"] == sum(map(len, chunks))
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
    assert b"content-length: 13" in head.lower()
    assert body_of(again) == b"Hello, world!"


def test_expect_100_continue_is_answered_before_the_body(proxy: Proxy) -> None:
    body = b"x" * 1000
    with connect(proxy) as sock:
        sock.sendall(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        interim, rest = read_head(sock, "100 Continue")
        assert interim == b"HTTP/1.1 100 Continue"
        sock.sendall(body)
        (response,) = read_responses(_Prefixed(sock, rest), 1)  # type: ignore[arg-type]
    assert body_of(response) == body


class _Prefixed:
    """A socket whose first ``recv`` returns bytes already read."""

    def __init__(self, sock: socket.socket, first: bytes) -> None:
        self.sock = sock
        self.first = first

    def settimeout(self, timeout: float) -> None:
        self.sock.settimeout(timeout)

    def recv(self, size: int) -> bytes:
        if self.first:
            data, self.first = self.first, b""
            return data
        return self.sock.recv(size)


def test_http_1_0_gets_its_answer_and_the_connection_closes(proxy: Proxy) -> None:
    with connect(proxy) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    assert out.startswith(b"HTTP/1.1 200 ")
    assert b"connection: close\r\n" in out.lower()
    assert out.endswith(b"Hello, world!")


def test_malformed_request_is_a_400_and_closed(proxy: Proxy) -> None:
    with connect(proxy) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    assert out.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in out


def test_idle_keep_alive_connection_is_closed(upstream: Running) -> None:
    with proxy_to(upstream.url, keep_alive=0.5) as running, connect(running) as sock:
        for _ in range(3):
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            (response,) = read_responses(sock, 1)
            assert body_of(response) == b"Hello, world!"
        sock.settimeout(10)
        assert sock.recv(1024) == b""  # closed by the proxy once idle
        wait_until(lambda: running.connections == 0)


def test_websocket_upgrade_after_a_plain_request_on_one_connection(
    proxy: Proxy,
) -> None:
    key = base64.b64encode(os.urandom(16))
    upgrade = (
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: %s\r\n\r\n" % key
    )
    with connect(proxy) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + upgrade)
        # Both answers may come in one read: split them here, not in read_responses.
        data = b""
        while b"\r\n\r\n" not in data.partition(b"HTTP/1.1 101 ")[2]:
            chunk = sock.recv(4096)
            assert chunk, "closed before the handshake's answer"
            data += chunk
        hello, switch, out = data.partition(b"HTTP/1.1 101 ")
        assert body_of(hello) == b"Hello, world!"
        out = switch + out
        # A masked text frame "hi"; the upstream echoes "echo:hi".
        mask = os.urandom(4)
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(b"hi"))
        sock.sendall(b"\x81\x82" + mask + payload)
        frame = out.partition(b"\r\n\r\n")[2]
        while len(frame) < 2 + len(b"echo:hi"):
            frame += sock.recv(4096)
        assert frame[2 : 2 + 7] == b"echo:hi"


# -- requests answered from upstream's callbacks (no task): when they are not whole ----


def test_read_timeout_on_a_reused_connection_is_a_504(upstream: Running) -> None:
    opened = gate("listener504")
    try:
        with proxy_to(upstream.url, read_timeout=0.5) as proxy:
            with httpx.Client(base_url=proxy.url, timeout=10) as client:
                assert client.get("/").text == "Hello, world!"
                assert proxy.stats()["idle"] == 1  # the next request reuses it
                response = client.get("/slow?gate=listener504")
                assert response.status_code == 504
                assert "0.5s" in response.text
                assert client.get("/").text == "Hello, world!"  # the connection goes on
            _, proxy_span = proxy_error(proxy, "/slow")
            assert proxy_span.attrs["error.type"] == "read_timeout"
    finally:
        opened.set()


def test_client_leaving_while_a_reused_connection_waits(upstream: Running) -> None:
    opened = gate("listener-gone")
    try:
        with proxy_to(upstream.url) as proxy:
            with connect_to(proxy.port) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                (hello,) = read_responses(sock, 1)
                assert body_of(hello) == b"Hello, world!"
                wait_until(lambda: proxy.stats()["idle"] == 1)
                sock.sendall(b"GET /slow?gate=listener-gone HTTP/1.1\r\nHost: x\r\n\r\n")
                wait_until(lambda: proxy.stats()["idle"] == 0)  # sent on the reused one
            span = finished(proxy, "/slow")
            assert span.attrs["disconnected"] is True
            wait_until(lambda: proxy.stats()["open"] == 0)  # abandoned, not pooled
    finally:
        opened.set()


def test_stream_behind_a_whole_response_on_one_connection(upstream: Running) -> None:
    with proxy_to(upstream.url) as proxy, httpx.Client(base_url=proxy.url, timeout=10) as client:
        assert client.get("/").text == "Hello, world!"
        size = 3 * 1024 * 1024
        response = client.get(f"/big?n={size}")
        assert len(response.content) == size and response.content[:4] == bytes(range(4))
        assert client.get("/").text == "Hello, world!"


def test_client_leaving_a_pipelined_request_abandons_its_upstream(upstream: Running) -> None:
    """The request behind a whole response starts as that response completes, on an
    idle upstream connection: leaving must abandon that one at once (the request
    before it must not take its client-gone hook away as it finishes)."""
    opened = gate("listener-pipelined")
    hello = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        with proxy_to(upstream.url) as proxy:
            # Two idle upstream connections: two requests at once, both let go together.
            warm = gate("listener-warm")
            threads = [
                threading.Thread(target=httpx.get, args=(proxy.url + "/slow?gate=listener-warm",))
                for _ in range(2)
            ]
            for thread in threads:
                thread.start()
            wait_until(lambda: proxy.stats()["open"] == 2)
            warm.set()
            for thread in threads:
                thread.join(10)
            wait_until(lambda: proxy.stats()["idle"] == 2)
            assert proxy.stats()["idle"] >= 2
            with connect_to(proxy.port) as sock:
                sock.sendall(
                    hello + b"GET /slow?gate=listener-pipelined HTTP/1.1\r\nHost: x\r\n\r\n"
                )
                assert body_of(read_responses(sock, 1)[0]) == b"Hello, world!"
                wait_until(lambda: proxy.stats()["idle"] == 1)  # sent upstream
            # Ended by the client leaving, not by the gate (still shut).
            span = wait_until(lambda: _ended(proxy, "gate=listener-pipelined"), timeout=5)
            assert span.attrs["disconnected"] is True
            assert not opened.is_set()
    finally:
        opened.set()


def _ended(proxy: Proxy, query: str) -> Span | None:
    for trace in proxy.traces():
        for span in trace.spans.values():
            if span.hop == "client" and span.attrs.get("url.query") == query and span.finished:
                return span
    return None


@pytest.mark.parametrize(
    ("fields", "kept"),
    [
        # Host first (as clients send it), a repeated field, a value with a colon.
        (
            [("Host", "a.example"), ("X-One", "1"), ("X-Two", "a: b"), ("X-One", "3")],
            [["x-one", "1"], ["x-two", "a: b"], ["x-one", "3"]],
        ),
        ([("X-One", "1"), ("Host", "a.example"), ("X-Two", "2")], [["x-one", "1"], ["x-two", "2"]]),
        ([("Host", "a.example")], []),
        (
            [("Host", "a.example"), ("Connection", "x-two"), ("X-Two", "2"), ("X-One", "1")],
            [["x-one", "1"]],
        ),
        ([("Host", "a"), ("X-One", "1"), ("Host", "b"), ("X-Two", "2")], None),  # (a 400)
    ],
)
def test_client_fields_go_upstream_in_order_without_host(
    proxy: Proxy, fields: list[tuple[str, str]], kept: list[list[str]] | None
) -> None:
    head = "".join(f"{name}: {value}\r\n" for name, value in fields)
    with connect(proxy) as sock:
        sock.sendall(f"GET /headers HTTP/1.1\r\n{head}\r\n".encode())
        (response,) = read_responses(sock, 1)
    if kept is None:
        # A repeated Host: refused (RFC 9112 3.2), nothing passed on without either Host.
        assert response.startswith(b"HTTP/1.1 400")
        return
    assert response.startswith(b"HTTP/1.1 200")
    seen = json.loads(body_of(response))
    assert seen[: len(kept)] == kept
    assert seen[len(kept)] == ["host", f"{HOST}:{proxy.app.upstream.port}"]
    assert [name for name, _ in seen[len(kept) :]] == [
        "host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-start",
        "traceparent",
    ]  # fmt: skip


def test_a_traceparent_is_joined_and_a_mention_of_one_is_not(proxy: Proxy) -> None:
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    cases = [
        (f"traceparent: 00-{trace_id}-{parent}-01\r\n", "/joined-trace", (trace_id, parent)),
        (f"x-note: traceparent: 00-{trace_id}-{parent}-01\r\n", "/mentioned-trace", None),
    ]
    for field, path, expected in cases:
        with connect(proxy) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: a\r\n{field}\r\n".encode())
            (response,) = read_responses(sock, 1)
        assert response.startswith(b"HTTP/1.1 404")  # (upstream's answer, passed on)
        seen = finished(proxy, path)
        if expected is None:
            assert seen.trace_id != trace_id and seen.parent_id is None
        else:
            assert (seen.trace_id, seen.parent_id) == expected


# -- the fast path (_Exchange.serve, _upstream_moved) against the coroutine path -------

_TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
_VOLATILE = re.compile(rb"t=\d+|00-[0-9a-f]{32}-[0-9a-f]{16}-01|date: [^\r\n]*")


def _normal(value: Any) -> Any:
    """``value`` without what differs between any two requests (times, ids, ports)."""
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items() if k not in _PER_REQUEST}
    if isinstance(value, list | tuple):
        return [_normal(v) for v in value]
    if isinstance(value, str):
        return _VOLATILE.sub(b"*", value.encode()).decode()
    return value


_PER_REQUEST = {"connection.request_number", "connect_ns", "network.local.port", "reused",
                "connection.exchange", "http.response.body"}  # fmt: skip


@pytest.mark.parametrize(
    ("request_bytes", "head_only"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\nUser-Agent: t\r\n\r\n", False),
        # Hop-by-hop fields in the response; Host not first; an X-Forwarded-For.
        (b"GET /headers?x=1 HTTP/1.1\r\nX-One: 1\r\nHost: a\r\n"
         b"X-Forwarded-For: 10.0.0.1\r\n\r\n", False),
        (b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n", True),
        # A Host not seen before (checked the general way, then known); without one
        # an HTTP/1.1 request is refused (tests/test_proxy_user2.py).
        (b"GET /headers HTTP/1.1\r\nX-One: 1\r\nHost: first-seen.example\r\n\r\n", False),
        (b"GET / HTTP/1.1\r\nHost: a\r\ntraceparent: " + _TRACEPARENT
         + b"\r\nContent-Length: 0\r\n\r\n", False),
    ],
)  # fmt: skip
def test_fast_path_forwards_and_records_as_the_coroutine_path(
    upstream: Running, request_bytes: bytes, head_only: bool
) -> None:
    """The first request opens the upstream connection (the coroutine path); the second
    finds it idle and is answered from upstream's callback, with what __init__, _begin,
    ProxyApp.forwarded, _prepare, _send, _response_head, _try_whole and _end do inlined
    (and the listener's write_whole, its response_done): the same bytes both ways and the
    same recording."""
    with proxy_to(upstream.url) as proxy, connect(proxy) as sock:
        responses = []
        for _ in range(2):
            sock.sendall(request_bytes)
            (response,) = read_responses(sock, 1, heads=(0,) if head_only else ())
            responses.append(_VOLATILE.sub(b"*", response))
        assert responses[0].startswith(b"HTTP/1.1 ")
        assert responses[0] == responses[1]

        def both() -> list[Span] | None:
            spans = [s for t in proxy.traces() for s in t.spans.values() if s.end is not None]
            return spans if len(spans) == 4 else None

        spans = sorted(wait_until(both), key=lambda s: (s.start or 0, s.hop != "client"))
    clients = [s for s in spans if s.hop == "client"]
    proxies = [s for s in spans if s.hop == "proxy"]
    assert [
        e.attrs["reused"] for p in proxies for e in p.events if e.name == "upstream.connect"
    ] == [False, True]
    for first, second in (clients, proxies):
        assert _normal(first.attrs) == _normal(second.attrs)
        assert [(e.name, _normal(e.attrs)) for e in first.events] == [
            (e.name, _normal(e.attrs)) for e in second.events
        ]
        assert first.trace_id != second.trace_id or b"traceparent" in request_bytes
    bodies = [c.attrs.get("http.response.body") for c in clients]
    assert [_VOLATILE.sub(b"*", base64.b64decode(b or "")) for b in bodies] == [
        responses[0].partition(b"\r\n\r\n")[2]
    ] * 2
    assert clients[0].attrs["connection.request_number"] == 1
    assert clients[1].attrs["connection.request_number"] == 2
    if b"traceparent" in request_bytes:
        assert {c.trace_id for c in clients} == {"4bf92f3577b34da6a3ce929d0e0e4736"}
        assert {c.parent_id for c in clients} == {"00f067aa0ba902b7"}
