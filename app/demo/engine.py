"""The demo's moving parts: its app process, hopscope's proxy and the traffic.

:class:`Demo` starts them in the calling process (``hopscope demo --headless``), or, under
the UI, in a helper process of their own (``python -m hopscope.app.demo.engine``, see
:mod:`hopscope.app.child`): the proxy and the client measure time, and a UI drawing in
the same process would make them measure late.  The helper says ``ready`` with the
URLs, then ``("notice", message, severity)`` frames about the traffic, and stops
everything when its parent asks (or goes away).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import socket
import subprocess
import sys
import tempfile
import threading
from typing import IO

from hopscope.tracing.sinks import SocketSink

from ..child import ParentLink
from ..front import Front
from ..proxy_config import ProxyError
from .traffic import Traffic, TrafficError

__all__ = ["Demo", "DemoError", "listen", "main"]


class DemoError(Exception):
    """The demo cannot run; the message is one line."""


def listen(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise DemoError(
                f"cannot serve the demo on 127.0.0.1:{port}: address already in use"
            ) from None
        raise DemoError(f"cannot serve the demo on 127.0.0.1:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def _spawn(
    sock: socket.socket, sink_url: str, log: IO[bytes], server_timing: bool = False
) -> subprocess.Popen[bytes]:
    env = dict(os.environ, HOPSCOPE_SINK=sink_url, PYTHONUNBUFFERED="1")
    if server_timing:
        env["HOPSCOPE_SERVER_TIMING"] = "1"
    fd = sock.fileno()
    # -P: the user's working directory must not shadow hopscope's or uvicorn's modules.
    command = [sys.executable, "-P", "-m", "hopscope.app.demo.server", "--fd", str(fd)]
    try:
        return subprocess.Popen(
            command, env=env, pass_fds=(fd,), stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
    except OSError as exc:
        raise DemoError(f"cannot start the demo app: {exc.strerror or exc}") from None


def _last_line(log: IO[bytes]) -> str:
    log.flush()
    log.seek(0)
    lines = [line.strip() for line in log.read().decode(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else "no output"


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class Demo:
    """The demo's parts, started on ``stack`` (stopped in reverse): the app process on
    a free port, hopscope's proxy on ``public``, and the traffic generator's client."""

    def __init__(
        self,
        stack: contextlib.ExitStack,
        public: socket.socket,
        collector_url: str,
        *,
        delay: float,
        server_timing: bool = False,
    ) -> None:
        self.log = stack.enter_context(tempfile.TemporaryFile())
        sock = listen(0)
        try:
            self.proc = _spawn(sock, collector_url, self.log, server_timing)
            self.app_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        finally:
            sock.close()  # the app process has its own copy
        stack.callback(_stop_process, self.proc)
        try:
            front = Front(
                public, self.app_url, collector_url, server_timing=server_timing, keep_host=True
            )
        except ProxyError as exc:
            raise DemoError(str(exc)) from None
        stack.callback(front.stop)
        self.url = f"http://127.0.0.1:{public.getsockname()[1]}"
        self.client_sink = SocketSink(collector_url)
        stack.callback(self.client_sink.close)
        self.traffic = Traffic(self.url, delay=delay, sink=self.client_sink)

    def failure(self, exc: TrafficError) -> str:
        """Why the traffic failed, in one line: most likely the app died."""
        if self.proc.poll() is not None:
            return f"the demo app exited with status {self.proc.returncode}: {_last_line(self.log)}"
        return str(exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hopscope.app.demo.engine")
    parser.add_argument("--fd", type=int, required=True, help="the proxy's listening socket")
    parser.add_argument("--sink", required=True, help="the collector's address")
    parser.add_argument("--delay", type=float, default=0.2)
    parser.add_argument("--requests", type=int)
    parser.add_argument("--server-timing", action="store_true")
    args = parser.parse_args(argv)
    link = ParentLink()
    with contextlib.ExitStack() as stack:
        public = stack.enter_context(socket.socket(fileno=args.fd))
        try:
            demo = Demo(
                stack, public, args.sink, delay=args.delay, server_timing=args.server_timing
            )
        except DemoError as exc:
            link.send(("error", str(exc)))
            return 1
        link.send(("ready", {"proxy": demo.url, "app": demo.app_url}))

        def drive() -> None:
            try:
                sent = demo.traffic.run(args.requests)
            except TrafficError as exc:
                if not demo.traffic.stop.is_set():
                    link.send(("notice", demo.failure(exc), "error"))
                return
            if args.requests is not None:
                link.send(("notice", f"demo: sent {sent} requests; q to quit", "information"))

        thread = threading.Thread(target=drive, name="hopscope-demo-traffic", daemon=True)
        thread.start()
        link.wait()
        demo.traffic.stop.set()
        # A request still on its way fails once the proxy stops: no need to wait it out.
        thread.join(3.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
