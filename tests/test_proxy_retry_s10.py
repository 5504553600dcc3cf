"""A request on a kept-alive upstream connection the upstream closed just as it was
reused is sent once more, on a new connection: not on another idle one, which an upstream
that closed them all (restarting, as under ``--reload``) has closed too."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from test_proxy import HOST, proxy_to

pytestmark = pytest.mark.timeout(60)

_OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: keep-alive\r\n\r\nok"


def _read_head(conn: socket.socket) -> bool:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return False
        data += chunk
    return True


@contextlib.contextmanager
def one_answer_per_connection() -> Iterator[tuple[str, list[int]]]:
    """An upstream that answers a connection's first request (kept alive) and closes it,
    unanswered, at its second: every idle connection is stale."""
    listener = socket.create_server((HOST, 0))
    listener.settimeout(0.2)
    stop = threading.Event()
    connections: list[int] = []

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            with contextlib.suppress(OSError):
                if _read_head(conn):
                    time.sleep(0.3)  # (so that two requests at once need two connections)
                    conn.sendall(_OK)
                    _read_head(conn)  # the second: closed without an answer

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            connections.append(1)
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://{HOST}:{listener.getsockname()[1]}", connections
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_a_retry_after_a_stale_connection_connects_anew() -> None:
    with one_answer_per_connection() as (url, connections), proxy_to(url) as proxy:
        base = f"http://{HOST}:{proxy.port}"
        # Two requests at once: two upstream connections, both idle (and stale) after.
        barrier = threading.Barrier(2)
        answers: list[int] = []

        def get() -> None:
            barrier.wait(5)
            answers.append(httpx.get(f"{base}/first", timeout=10).status_code)

        threads = [threading.Thread(target=get) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert answers == [200, 200]
        opened = len(connections)
        assert proxy.app.pool.idle == opened  # (kept alive, both)
        # The next takes an idle one, finds it closed, and must not try another.
        response = httpx.get(f"{base}/next", timeout=10)
        assert (response.status_code, response.text) == (200, "ok")
        assert len(connections) == opened + 1
