"""The demo app's process: uvicorn serving the instrumented demo app on a given socket.

uvicorn runs with hopscope's protocol classes (HTTP and WebSocket), so each request's
and each WebSocket's trace has the server hop (and the queue time the proxy in front
reports) around the app's own span.

``hopscope demo`` binds the listening socket itself and hands it down by file
descriptor, so the port is known (and its errors reported) before this process starts,
and no other process can take the port in between.  Records go where ``HOPSCOPE_SINK``
says, as in any instrumented app.
"""

from __future__ import annotations

import argparse
import socket

import uvicorn
from hopscope.tracing.servers.uvicorn_protocols import HttpToolsProtocol
from hopscope.tracing.servers.uvicorn_ws import ws_protocol

from .webapp import create_app

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hopscope.app.demo.server")
    parser.add_argument("--fd", type=int, required=True, help="a listening socket to serve on")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    config = uvicorn.Config(
        create_app(),
        http=HttpToolsProtocol,
        ws=ws_protocol() or "none",  # uvicorn's "auto", with the server hop
        log_level=args.log_level,
        access_log=False,
        lifespan="off",
    )
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
