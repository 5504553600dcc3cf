"""hopscope's proxy in front of an app that hopscope itself serves (``run TARGET``,
``demo``, the proxy under the UI).

:class:`Front` runs :class:`~hopscope.app.proxy.ProxyApp` under uvicorn on a thread of
the calling process; that is enough when the process does little else.  Under the UI
it runs in a helper process instead (:class:`FrontProcess`, ``python -m
hopscope.app.front``): a proxy sharing a process with the UI would stamp its timings
late by whatever the UI was drawing meanwhile.  Either way its spans go to the
collector through a SocketSink, like any app's.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .accept import raise_open_files_limit
from .child import ChildError, ChildProcess, ParentLink
from .proxy_config import ProxyError

__all__ = ["Front", "FrontProcess", "main"]


class Front:
    """The proxy on ``sock`` forwarding to ``upstream``, on a thread and loop of its own.

    ``options`` go to :class:`~hopscope.app.proxy.ProxyApp` (timeouts).  Raises
    :class:`~hopscope.app.proxy.ProxyError` when it does not start.
    """

    def __init__(self, sock: socket.socket, upstream: str, sink_url: str, **options: Any) -> None:
        from hopscope.tracing.sinks import SocketSink

        from .proxy import ProxyApp
        from .proxy_command import proxy_server

        self.sink = SocketSink(sink_url)
        self.app = ProxyApp(upstream, self.sink, **options)
        self.server = proxy_server(self.app)
        # Not the main thread: uvicorn leaves signals alone, the caller handles them.
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, name="hopscope-proxy", daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.server.started:
            self.stop()
            raise ProxyError("hopscope's proxy did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sink.close()


class FrontProcess:
    """:class:`Front` in a helper process serving ``sock`` (inheritable); the caller
    may close its own copy of the socket once this returns.  ``on_exit`` hears the
    child's last words should it end before :meth:`stop`."""

    def __init__(
        self,
        sock: socket.socket,
        upstream: str,
        sink_url: str,
        *,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
        on_exit: Callable[[str], None] | None = None,
        server_timing: bool = False,
        insecure: bool = False,
        keep_host: bool = False,
    ) -> None:
        args = ["--fd", str(sock.fileno()), "--upstream", upstream, "--sink", sink_url]
        if server_timing:
            args.append("--server-timing")
        if insecure:
            args.append("--insecure")
        if keep_host:
            args.append("--keep-host")
        if connect_timeout is not None:
            args += ["--connect-timeout", repr(connect_timeout)]
        if read_timeout is not None:
            args += ["--read-timeout", repr(read_timeout)]
        self.child = ChildProcess("hopscope.app.front", args, pass_fds=(sock.fileno(),))
        try:
            self.child.start()
        except ChildError as exc:
            raise ProxyError(str(exc)) from None
        if on_exit is not None:
            self.child.follow(lambda message: None, "hopscope-front", on_exit)

    def stop(self) -> None:
        self.child.stop(timeout=15.0)  # more than Front.stop may take


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hopscope.app.front")
    parser.add_argument("--fd", type=int, required=True, help="a listening socket to serve on")
    parser.add_argument("--upstream", required=True, help="http://HOST:PORT to forward to")
    parser.add_argument("--sink", required=True, help="the collector's address")
    parser.add_argument("--connect-timeout", type=float)
    parser.add_argument("--read-timeout", type=float)
    parser.add_argument("--server-timing", action="store_true")
    parser.add_argument("--insecure", action="store_true", help="no TLS verification upstream")
    parser.add_argument("--keep-host", action="store_true", help="the client's Host upstream")
    args = parser.parse_args(argv)
    link = ParentLink()
    options: dict[str, Any] = {
        name: value
        for name, value in (
            ("connect_timeout", args.connect_timeout),
            ("read_timeout", args.read_timeout),
        )
        if value is not None
    }
    if args.server_timing:
        options["server_timing"] = True
    if args.insecure:
        options["insecure"] = True
    if args.keep_host:
        options["keep_host"] = True
    raise_open_files_limit()  # a proxy holds two descriptors per client
    try:
        front = Front(socket.socket(fileno=args.fd), args.upstream, args.sink, **options)
    except (ProxyError, OSError) as exc:
        link.send(("error", str(exc)))
        return 1
    link.send(("ready", args.upstream))
    try:
        link.wait()
    finally:
        front.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
