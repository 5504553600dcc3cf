"""Real servers for tests: uvicorn on a thread, on 127.0.0.1, at a port the kernel picks.

One helper for what several test files wrote each for themselves (the ``serve_asgi``
fixture of ``conftest.py`` is this with a URL only), a way to stop a
server's process as a user does, and WebSocket clients: the raw
handshake of one that must then misbehave (what no WebSocket library lets a client
do), and an echo check of a server that may not be up yet.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn

__all__ = ["Served", "interrupt", "read_head", "uvicorn_thread", "ws_echoes", "ws_handshake"]


@dataclass(frozen=True)
class Served:
    """A running server: its base URL and the :class:`uvicorn.Server` (for its state)."""

    url: str
    server: uvicorn.Server

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


@contextlib.contextmanager
def uvicorn_thread(app: Any, *, scheme: str | None = None, **options: Any) -> Iterator[Served]:
    """Serve ``app`` with uvicorn in a daemon thread for the block.

    ``options`` are more of ``uvicorn.Config``'s settings (defaults: ``log_level
    "warning"``, ``lifespan "off"``, no access log).  ``scheme`` is the URL's (default
    ``https`` when ``ssl_certfile`` is given, else ``http``; ``ws`` for a WebSocket
    client).  Waits (10 s at most) until uvicorn has started; on the way out asks it to
    exit and waits for its thread (10 s at most), then closes the listening socket.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, **{"log_level": "warning", "lifespan": "off", "access_log": False, **options}
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.started, "uvicorn did not start"
        if scheme is None:
            scheme = "https" if options.get("ssl_certfile") else "http"
        yield Served(f"{scheme}://127.0.0.1:{port}", server)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def interrupt(
    proc: subprocess.Popen[Any], timeout: float = 30, then: float = 10
) -> tuple[Any, Any]:
    """Stop ``proc`` as a user stops a server (SIGINT, if it still runs); killed if it
    has not ended within ``timeout`` s (then waited for ``then`` s), so that a failure
    leaves nothing behind.  Its (stdout, stderr), where they are pipes."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # pragma: no cover - a failure: do not leave it
        proc.kill()
        return proc.communicate(timeout=then)


def read_head(sock: socket.socket, what: str = "the head") -> tuple[bytes, bytes]:
    """Read ``sock`` up to the end of a message head: (the head, without its blank line;
    what came after it).  The peer closing first fails the test, naming ``what``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before {what}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def ws_handshake(address: tuple[str, int], path: str, host: str = "h") -> socket.socket:
    """A WebSocket opened by hand on ``address`` (5 s timeout): the upgrade request for
    ``path`` sent, its ``101`` answer read.  The socket, for the caller to close."""
    raw = socket.create_connection(address, timeout=5)
    raw.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head, _ = read_head(raw, "the handshake's answer")
    assert head.startswith(b"HTTP/1.1 101 ")
    return raw


def ws_echoes(url: str) -> bool:
    """Whether the WebSocket at ``url`` sends "hi" back (5 s bounds): false while it is not
    up yet, for a polling wait."""
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    try:
        with connect(url, open_timeout=5) as ws:
            ws.send("hi")
            return ws.recv(timeout=5) == "hi"
    except (OSError, InvalidStatus, ConnectionClosed, TimeoutError):
        return False
