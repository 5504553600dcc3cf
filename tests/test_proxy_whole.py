"""A response that is whole when its head arrives leaves the proxy in one write.

The proxy then writes it itself instead of through uvicorn's ``send`` (see
``ClientConnection.write_whole``): what the client gets must be byte for byte what the
``send`` path writes, for every framing, and the connection must go on as before
(keep-alive, pipelining, HTTP/1.0, HEAD then GET on one upstream connection).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from hopscope.app.proxy import ClientConnection
from test_proxy import HOST, proxy_to, wait_until

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
}


class KeepAliveUpstream:
    """Answers each request on a connection with :data:`ANSWERS` (HEAD: the head)."""

    def __init__(self) -> None:
        self.sock = socket.create_server((HOST, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self._threads.append(accept)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            self.connections += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        data = b""
        with conn, contextlib.suppress(OSError):
            conn.settimeout(5)
            while not self._stop.is_set():
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, data = data.partition(b"\r\n\r\n")
                method, target = head.split(b" ", 2)[:2]
                answer = ANSWERS[target]
                if method == b"HEAD":
                    answer = answer.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
                conn.sendall(answer)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        self.sock.close()


@pytest.fixture(scope="module")
def upstream() -> Iterator[KeepAliveUpstream]:
    running = KeepAliveUpstream()
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
    upstream: KeepAliveUpstream, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    request, until = CASES[case]
    used: list[bool] = []
    write_whole = ClientConnection.write_whole

    def counted(self: ClientConnection, *args: object) -> bool:
        used.append(write_whole(self, *args))  # type: ignore[arg-type]
        return used[-1]

    monkeypatch.setattr(ClientConnection, "write_whole", counted)
    with proxy_to(f"http://{HOST}:{upstream.port}") as proxy:
        whole = exchange(proxy.port, request, until)
        wait_until(lambda: all(r[8] >= 0 for r in proxy.sink.records()))
        # Then through uvicorn's send, for the same request.
        monkeypatch.setattr(ClientConnection, "write_whole", lambda *_: False)
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
