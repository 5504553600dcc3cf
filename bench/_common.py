"""What the bench scripts share: their child processes, a raw ``GET /``, wrk's units, and
the one request the in-process benches replay.

Why a module of its own: bench/overhead.py, bench/proxy.py and bench/hotpath.py must
start, check and stop servers the same way (a process group each, so workers never
outlive a run) and drive the same request, or their figures would not compare.  Scripts
import it as ``_common``: Python puts a script's own folder first on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Any

HOST = "127.0.0.1"

_children: list[subprocess.Popen[Any]] = []


def load_average() -> str:
    """The machine's load, printed with every figure: wall-clock figures move with it."""
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def spawn(
    argv: list[str], env: dict[str, str] | None = None, **kwargs: Any
) -> subprocess.Popen[Any]:
    """Start ``argv`` in a session of its own (so :func:`stop` reaches its workers)."""
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    proc = subprocess.Popen(
        argv, env={**os.environ, **(env or {})}, start_new_session=True, **kwargs
    )
    _children.append(proc)
    return proc


def stop(proc: subprocess.Popen[Any]) -> None:
    """SIGINT (a clean stop for every server here), then SIGTERM, then SIGKILL the group."""
    for sig, wait in ((signal.SIGINT, 10), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # workers left in the group (nginx's, gunicorn's)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()
    if proc in _children:
        _children.remove(proc)


def stop_all() -> None:
    for proc in list(reversed(_children)):
        stop(proc)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def get(port: int, timeout: float = 2.0) -> tuple[int, bytes]:
    """Status and body of ``GET /`` over a raw socket (the benches need no HTTP client)."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if b"chunked" in head.lower():
        body = body.split(b"\r\n")[1]
    return int(head.split(b" ", 2)[1]), body


def wait_ready(
    proc: subprocess.Popen[Any],
    port: int,
    name: str,
    *,
    bench: str,
    body: bytes | None = None,
    timeout: float = 30.0,
) -> None:
    """Until ``GET /`` answers 200 (with ``body``, when given); exits the bench if not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{bench}: {name} exited with {proc.returncode} before serving")
        with contextlib.suppress(OSError, ValueError, IndexError):
            status, answer = get(port)
            if status != 200 or (body is not None and answer != body):
                raise SystemExit(f"{bench}: {name} answered {status} {answer[:60]!r}")
            return
        time.sleep(0.1)
    raise SystemExit(f"{bench}: {name} did not serve within {timeout:.0f}s")


def starlette_hello() -> Any:
    """The hello world every bench serves (ASGI)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("Hello, world!")

    return Starlette(routes=[Route("/", hello)])


def flask_hello() -> Any:
    """The same hello world as a WSGI app."""
    from flask import Flask

    app = Flask("hello")

    @app.route("/")
    def hello() -> str:
        return "Hello, world!"

    return app


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(port: int, seconds: float, connections: int) -> str:
    """wrk's report of ``GET /`` on ``port`` (one thread, ``--latency``), as text."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency"]
    return subprocess.run(
        [*argv, f"http://{HOST}:{port}/"],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    ).stdout


def wrk_errors(out: str) -> int:
    """Responses that were not 2xx/3xx plus socket errors, from a wrk report."""
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*?read (\d+), write (\d+), timeout (\d+)", out)
    count = int(bad[1]) if bad else 0
    if errors:
        count += sum(int(x) for x in errors.groups())
    return count


def wrk_ms(text: str) -> float:
    """A latency as wrk prints it (``812.00us``, ``1.20ms``, ``2.00s``), in milliseconds."""
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if match is None:
        raise ValueError(f"unreadable wrk latency {text!r}")
    return float(match[1]) * _UNITS[match[2]]


#: The hello-world request the in-process benches replay, as an ASGI scope...
ASGI_SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.3"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/",
    "raw_path": b"/",
    "root_path": "",
    "query_string": b"",
    "headers": [
        (b"host", b"127.0.0.1:8000"),
        (b"user-agent", b"bench/1.0"),
        (b"accept", b"*/*"),
    ],
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 8000),
    "state": {},
}

#: ... and as a WSGI environ.
WSGI_ENVIRON: dict[str, Any] = {
    "REQUEST_METHOD": "GET",
    "SCRIPT_NAME": "",
    "PATH_INFO": "/",
    "QUERY_STRING": "",
    "SERVER_NAME": "127.0.0.1",
    "SERVER_PORT": "8000",
    "SERVER_PROTOCOL": "HTTP/1.1",
    "SERVER_SOFTWARE": "bench",
    "REMOTE_ADDR": "127.0.0.1",
    "REMOTE_PORT": "50000",
    "HTTP_HOST": "127.0.0.1:8000",
    "HTTP_USER_AGENT": "bench/1.0",
    "HTTP_ACCEPT": "*/*",
    "wsgi.version": (1, 0),
    "wsgi.url_scheme": "http",
    "wsgi.errors": sys.stderr,
    "wsgi.multithread": False,
    "wsgi.multiprocess": False,
    "wsgi.run_once": False,
}


def callgrind_total(argv: list[str], out: str, env: dict[str, str], name: str = "") -> int:
    """Instructions the Python command ``argv`` runs inside :func:`functools.reduce`
    under callgrind (the benches call their measured loop through it, so start-up and
    tear-down are not counted), from the totals of ``out``."""
    command = [
        "valgrind",
        "--tool=callgrind",
        "--collect-atstart=no",
        "--toggle-collect=functools_reduce",
        "--cache-sim=no",
        "--branch-sim=no",
        f"--callgrind-out-file={out}",
        *argv,
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=3600, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"valgrind failed{name}: {proc.stderr.strip()[-500:]}")
    with open(out) as handle:
        for line in handle:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise SystemExit(f"no totals in {out}")
