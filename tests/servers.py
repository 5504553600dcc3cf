"""Real servers for tests: uvicorn on a thread, on 127.0.0.1, at a port the kernel picks.

One helper for what several test files wrote each for themselves (the ``serve_asgi``
fixture of ``conftest.py`` is this with a URL only).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn

__all__ = ["Served", "uvicorn_thread"]


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
