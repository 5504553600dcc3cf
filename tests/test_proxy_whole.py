"""A response that is whole when its head arrives leaves the proxy in one write.

The proxy then writes it itself instead of through uvicorn's ``send`` (see
``ClientConnection.write_whole``): what the client gets must be byte for byte what the
``send`` path writes, for every framing, and the connection must go on as before
(keep-alive, pipelining, HTTP/1.0, HEAD then GET on one upstream connection).
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import pytest
from hopscope.app.listener import Request
from hopscope.app.proxy import ClientConnection
from hopscope.tracing.proxyrecord import RESPONSE_START
from test_proxy import HOST, proxy_to, raw_request, wait_until
from test_proxy_user import Scripted

pytestmark = pytest.mark.timeout(60)

#: What the upstream answers per path, each in one write (so it arrives whole).
ANSWERS = {
    b"/length": b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\nhello",
    b"/chunked": (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-b: 2\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    ),
    b"/empty-chunked": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    b"/hop": (
        b"HTTP/1.1 201 Created\r\nconnection: x-hop\r\nx-hop: 1\r\nkeep-alive: timeout=5\r\n"
        b"content-length: 2\r\n\r\nok"
    ),
    b"/nobody": b"HTTP/1.1 204 No Content\r\nx-c: 3\r\n\r\n",
    b"/notfound": b"HTTP/1.1 404 Not Found\r\ncontent-length: 4\r\n\r\nnope",
    b"/odd-status": b"HTTP/1.1 299 Whatever\r\ncontent-length: 1\r\n\r\nx",
    b"/empty": b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
    b"/v10": b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
    b"/v10-alive": b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok",
    b"/v11-close": b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
}


def _answer(head: bytes) -> bytes:
    """:data:`ANSWERS` by path (HEAD: the head only)."""
    method, target = head.split(b" ", 2)[:2]
    answer = ANSWERS[target.partition(b"?")[0]]
    if method == b"HEAD":
        answer = answer.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
    return answer


@pytest.fixture(scope="module")
def upstream() -> Iterator[Scripted]:
    """A keep-alive upstream answering each request with :func:`_answer`."""
    running = Scripted(_answer)
    try:
        yield running
    finally:
        running.close()


def exchange(port: int, data: bytes, until: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` on one connection; read until ``until`` has been seen (or EOF)."""
    out = b""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(data)
        deadline = time.monotonic() + timeout
        while until not in out and time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            out += chunk
        # Anything more the proxy would send on this connection (it should send none).
        sock.settimeout(0.2)
        with contextlib.suppress(TimeoutError, OSError):
            out += sock.recv(65536)
    return out


def _get(path: str, method: str = "GET", version: str = "1.1") -> bytes:
    return f"{method} {path} HTTP/{version}\r\nHost: x\r\n\r\n".encode()


CASES = {
    "length": (_get("/length"), b"hello"),
    "chunked": (_get("/chunked"), b"0\r\n\r\n"),
    "empty-chunked": (_get("/empty-chunked"), b"0\r\n\r\n"),
    "hop-by-hop": (_get("/hop"), b"ok"),
    "no-content": (_get("/nobody"), b"x-c: 3\r\n\r\n"),
    "not-found": (_get("/notfound"), b"nope"),
    "odd-status": (_get("/odd-status"), b"\r\n\r\nx"),
    "http-1.0": (_get("/length", version="1.0"), b"hello"),
    "http-1.0-chunked": (_get("/chunked", version="1.0"), b"hello"),
    "head-then-get": (_get("/length", "HEAD") + _get("/chunked"), b"0\r\n\r\n"),
    "pipelined": (_get("/length") + _get("/chunked") + _get("/notfound"), b"nope"),
    "close": (b"GET /length HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"hello"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_whole_responses_are_the_bytes_send_writes(
    upstream: Scripted, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    request, until = CASES[case]
    used: list[bool] = []
    # The proxy writes through the listener's request (or, on uvicorn's path, through
    # the connection): both are counted, then both are refused.
    for kind in (ClientConnection, Request):

        def counted(self: object, *args: object, write_whole: object = kind.write_whole) -> bool:
            used.append(write_whole(self, *args))  # type: ignore[operator]
            return used[-1]

        monkeypatch.setattr(kind, "write_whole", counted)
    with proxy_to(upstream.url) as proxy:
        whole = exchange(proxy.port, request, until)
        wait_until(lambda: all(r[8] >= 0 for r in proxy.sink.records()))
        # Then through uvicorn's send, for the same request.
        for kind in (ClientConnection, Request):
            monkeypatch.setattr(kind, "write_whole", lambda *_: False)
        sent = exchange(proxy.port, request, until)
    assert whole == sent
    assert whole.startswith(b"HTTP/1.1 ") and until in whole
    assert any(used) == (case != "no-content")  # 204: always through send
    if "1.0" in case or case == "close":
        assert b"connection: close\r\n" in whole
    if case == "pipelined":
        assert whole.count(b"HTTP/1.1 ") == 3
        assert whole.index(b"hello") < whole.index(b"0\r\n\r\n") < whole.index(b"nope")
    if case == "head-then-get":
        head, _, rest = whole.partition(b"\r\n\r\n")
        assert b"content-length: 5" in head and rest.startswith(b"HTTP/1.1 200 ")
    if case == "hop-by-hop":
        assert b"x-hop" not in whole and b"keep-alive" not in whole.lower()


def test_protocol_versions_recorded_as_the_messages_say(upstream: Scripted) -> None:
    # Both sides skip asking the parser for the version when a message kept alive
    # without a Connection field must be HTTP/1.1: every other kind asks.
    paths = {b"/length": "1.1", b"/v10": "1.0", b"/v10-alive": "1.0", b"/v11-close": "1.1"}
    sent = 0
    with proxy_to(upstream.url) as proxy:
        for version in ("1.0", "1.1"):
            for connection in ("", "close", "keep-alive"):
                for path in paths:
                    field = f"Connection: {connection}\r\n" if connection else ""
                    request = f"GET {path.decode()}?v={version}&c={connection} HTTP/{version}\r\n"
                    answer = raw_request(proxy.port, f"{request}Host: x\r\n{field}\r\n".encode())
                    assert answer.startswith(b"HTTP/1.1 200 ")
                    # (an HTTP/1.0 client asking for keep-alive keeps it: a length frames all)
                    alive = connection != "close" and (version == "1.1" or bool(connection))
                    assert (b"connection: close\r\n" in answer) != alive
                    sent += 1
        wait_until(lambda: len(proxy.sink.records()) == sent)
        wait_until(lambda: all(r[8] >= 0 for r in proxy.sink.records()))
        records = proxy.sink.records()
    for record in records:
        request, items = record[7], record[10]
        query = dict(pair.split(b"=") for pair in request[4].split(b"&"))
        assert request[2] == query[b"v"].decode()  # the client's version
        (start,) = [item for item in items if item and item[0] == RESPONSE_START]
        assert start[3] == paths[request[3].encode()]  # the upstream's


@pytest.mark.parametrize("limit", [0, 3, 5, 1000])
def test_a_body_written_whole_is_recorded_as_one_streamed(
    upstream: Scripted, monkeypatch: pytest.MonkeyPatch, limit: int
) -> None:
    # A response written whole keeps its body without a BodyCapture: its recorded size,
    # kept bytes (cut to the limit) and truncation must be those of the capture.
    ends = []
    with proxy_to(upstream.url, body_limit=limit) as proxy:
        for refuse in (False, True):
            if refuse:
                for kind in (ClientConnection, Request):
                    monkeypatch.setattr(kind, "write_whole", lambda *_: False)
            for path in ("/length", "/empty"):
                raw_request(proxy.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            count = 2 * (1 + refuse)
            wait_until(lambda: len(proxy.sink.records()) == count)  # noqa: B023
            wait_until(lambda: all(r[8] >= 0 for r in proxy.sink.records()))
        records = proxy.sink.records()
    for record in records:
        ends.append((record[7][3], record[9][10:14]))  # response size, body, cut, summary
    assert ends[:2] == ends[2:]
    assert ends[0] == ("/length", (5, [b"hello"[:limit]] if limit else [], limit < 5, None))
    assert ends[1] == ("/empty", (0, [], False, None))
