"""Traffic for the demo app: every kind of request, in turn, with a pause between.

Plain synchronous httpx, one request at a time, so the tail reads like a story.  Given
a sink, each request is recorded as the ``client`` hop (see
:class:`~hopscope.app.client_hop.ClientHopTransport`): the first span of its trace.  The
WebSocket exchange uses the ``websockets`` library when it is installed (httpx speaks
no WebSocket, so it has no client span) and is skipped otherwise.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Callable

import httpx
from hopscope.tracing.sinks import Sink

from ..client_hop import ClientHopTransport

__all__ = ["Traffic", "TrafficError", "steps"]

Step = Callable[[httpx.Client, int], int]


class TrafficError(Exception):
    """The demo app stopped answering; the message is one line."""


def _get(path: str) -> Step:
    def step(client: httpx.Client, n: int) -> int:
        return client.get(path.format(n=n)).status_code

    return step


def _boom(client: httpx.Client, n: int) -> int:
    # The server closes the connection after an app error: do not reuse it.
    return client.get("/api/boom", headers={"connection": "close"}).status_code


def _upload(client: httpx.Client, n: int) -> int:
    items = [{"sku": f"sku-{n}-{i}", "qty": i + 1} for i in range(3)]
    return client.post("/api/upload", json=items).status_code


def _stream(client: httpx.Client, n: int) -> int:
    with client.stream("GET", "/api/stream") as response:
        for _ in response.iter_bytes():
            pass
        return response.status_code


def _websocket_step() -> Step | None:
    try:
        from websockets.exceptions import WebSocketException
        from websockets.sync.client import connect
    except ImportError:
        return None

    def step(client: httpx.Client, n: int) -> int:
        url = str(client.base_url.copy_with(scheme="ws", path="/ws/echo"))
        try:
            with connect(url, open_timeout=10, close_timeout=5) as ws:
                for i in range(3):
                    ws.send(json.dumps({"n": n, "i": i}))
                    ws.recv(timeout=10)
        except WebSocketException as exc:
            raise TrafficError(f"WS /ws/echo failed: {exc}") from None
        return 101  # Switching Protocols: the handshake's status

    return step


def steps() -> list[tuple[str, Step]]:
    """The cycle of requests: each demo route once."""
    cycle: list[tuple[str, Step]] = [
        ("GET /api/items/{n}", _get("/api/items/{n}")),
        ("GET /api/slow", _get("/api/slow")),
        ("GET /api/stream", _stream),
        ("GET /api/download", _get("/api/download")),
        ("POST /api/upload", _upload),
        ("GET /api/nothing-here", _get("/api/nothing-here")),
        ("GET /api/boom", _boom),
        ("GET /api/background", _get("/api/background")),
    ]
    ws = _websocket_step()
    if ws is not None:
        cycle.append(("WS /ws/echo", ws))
    cycle.append(("GET /legacy/hello", _get("/legacy/hello")))
    return cycle


class Traffic:
    """Sends the cycle of requests to ``base_url`` until ``count`` or :attr:`stop`."""

    def __init__(
        self,
        base_url: str,
        *,
        delay: float = 0.2,
        timeout: float = 10.0,
        sink: Sink | None = None,
    ) -> None:
        self.base_url = base_url
        self.delay = delay
        self.timeout = timeout
        self.sink = sink
        self.stop = threading.Event()
        self.sent = 0
        self.statuses: list[int] = []

    def run(self, count: int | None = None) -> int:
        """Send requests; returns how many were sent.  Raises :class:`TrafficError`."""
        cycle = steps()
        transport = ClientHopTransport(self.sink) if self.sink is not None else None
        with httpx.Client(
            base_url=self.base_url, timeout=self.timeout, transport=transport
        ) as client:
            for n in itertools.count(1):
                if (count is not None and self.sent >= count) or self.stop.is_set():
                    break
                label, step = cycle[(n - 1) % len(cycle)]
                try:
                    status = step(client, n)
                except (httpx.HTTPError, OSError, TimeoutError) as exc:
                    raise TrafficError(f"{label} failed: {exc or type(exc).__name__}") from None
                self.sent += 1
                self.statuses.append(status)
                if self.delay and self.stop.wait(self.delay):
                    break
        return self.sent
