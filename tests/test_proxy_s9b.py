"""``hopscope proxy``: the right hint for an unwritable ``-o`` file, and serving on
with few file descriptors.

Why the first: "--collector picks another address" after "cannot write FILE" sent
people to change an address that was fine.  Why the second: under ``ulimit -n 256``
and 400 concurrent clients the proxy accepted clients until no descriptor was left
for any upstream connection, and answered every request with 502 until the load
stopped; nginx stops accepting at its limit and serves the clients it has.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hopscope.app import accept
from hopscope.app.front import Front, FrontProcess
from hopscope.app.proxy_command import run_proxy
from hopscope.app.proxy_config import ProxyError
from hopscope.app.ui import build_proxy_app
from test_proxy import serve, wait_until

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"
HOPSCOPE = [sys.executable, "-m", "hopscope.app"]
UPSTREAM = "http://127.0.0.1:9"


# -- 1. an unwritable -o file is not an address problem -----------------------------------


def _unwritable(tmp_path: Path) -> str:
    return str(tmp_path / "no-such-dir" / "out.jsonl")


@pytest.mark.parametrize("sink_kind", ["local", "socket"])
def test_in_process_unwritable_output_says_just_that(tmp_path: Path, sink_kind: str) -> None:
    out = _unwritable(tmp_path)
    with pytest.raises(ProxyError) as caught:
        run_proxy(
            UPSTREAM,
            listen=f"{HOST}:0",
            output=out,
            collector=f"{HOST}:0",
            sink_kind=sink_kind,
        )
    assert str(caught.value) == f"cannot write {out}: No such file or directory"


def test_in_process_collector_port_in_use_keeps_the_hint(tmp_path: Path) -> None:
    with socket.create_server((HOST, 0)) as taken:
        with pytest.raises(ProxyError) as caught:
            run_proxy(
                UPSTREAM,
                listen=f"{HOST}:0",
                output=str(tmp_path / "out.jsonl"),
                collector=f"{HOST}:{taken.getsockname()[1]}",
                sink_kind="local",
            )
    message = str(caught.value)
    assert "address already in use" in message and "--collector picks another" in message


def _proxy_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*HOPSCOPE, "proxy", "--upstream", UPSTREAM, "--headless", "--listen", f"{HOST}:0", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_headless_child_unwritable_output_says_just_that(tmp_path: Path) -> None:
    out = _unwritable(tmp_path)
    result = _proxy_cli("--collector", f"{HOST}:0", "-o", out)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"Error: cannot write {out}: No such file or directory"
    ], result.stderr


def test_headless_child_collector_port_in_use_keeps_the_hint(tmp_path: Path) -> None:
    with socket.create_server((HOST, 0)) as taken:
        result = _proxy_cli(
            "--collector", f"{HOST}:{taken.getsockname()[1]}", "-o", str(tmp_path / "o.jsonl")
        )
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "address already in use" in line and "--collector picks another" in line, line


def test_ui_unwritable_output_says_just_that(tmp_path: Path) -> None:
    out = _unwritable(tmp_path)
    with pytest.raises(ProxyError) as caught:
        build_proxy_app(UPSTREAM, listen=f"{HOST}:0", collector=f"{HOST}:0", output=out)
    assert str(caught.value) == f"cannot write {out}: No such file or directory"


def test_ui_collector_port_in_use_keeps_the_hint() -> None:
    with socket.create_server((HOST, 0)) as taken:
        with pytest.raises(ProxyError) as caught:
            build_proxy_app(
                UPSTREAM, listen=f"{HOST}:0", collector=f"{HOST}:{taken.getsockname()[1]}"
            )
    message = str(caught.value)
    assert "address already in use" in message and "choose another with --collector" in message


# -- 2. few file descriptors: stop accepting, serve the clients it has -------------------------


async def _hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": scope["path"].encode()})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _limits(soft: int, hard: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return apply


@contextlib.contextmanager
def _proxy_process(upstream: str, soft: int, hard: int) -> Iterator[tuple[int, int]]:
    """``hopscope proxy --headless`` started under ``ulimit -n`` soft/hard: (pid, port)."""
    port = _free_port()
    addresses = ["--listen", f"{HOST}:{port}", "--collector", f"{HOST}:0"]
    proc = subprocess.Popen(
        [*HOPSCOPE, "proxy", "--upstream", upstream, "--headless", *addresses],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=_limits(soft, hard),
    )
    try:
        assert proc.stderr is not None
        started = proc.stderr.readline().decode()  # said once its limit is raised
        assert started.startswith("hopscope proxy: http://"), started + proc.stderr.read().decode()
        yield proc.pid, port
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stderr is not None:
            proc.stderr.close()


def _crowd(port: int, clients: int, requests: int) -> collections.Counter[Any]:
    """``clients`` keep-alive clients all connected before any sends (as wrk does), then
    ``requests`` each, one at a time; what came back, counted (no retries)."""
    results: collections.Counter[Any] = collections.Counter()
    lock = threading.Lock()
    barrier = threading.Barrier(clients, timeout=30)

    def client(number: int) -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=40)
        outcome: list[Any] = []
        try:
            conn.connect()
            barrier.wait()
            for count in range(requests):
                conn.request("GET", f"/c{number}/{count}")
                response = conn.getresponse()
                body = response.read()
                ok = response.status == 200 and body == f"/c{number}/{count}".encode()
                outcome.append(200 if ok else response.status)
        except Exception as exc:  # counted: the test says which
            outcome.append(type(exc).__name__)
        finally:
            conn.close()
        with lock:
            results.update(outcome)

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(50)
    return results


def test_under_a_low_open_files_limit_every_client_is_served_in_the_end() -> None:
    with serve(_hello) as upstream, _proxy_process(upstream.url, 128, 128) as (_, port):
        results = _crowd(port, clients=150, requests=3)
        assert results == {200: 450}, results
        # and it still serves once the crowd has gone
        conn = http.client.HTTPConnection(HOST, port, timeout=10)
        conn.request("GET", "/after")
        assert conn.getresponse().status == 200
        conn.close()


def _open_files(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open files line")


def test_the_proxy_raises_its_soft_open_files_limit_to_the_hard_one() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 256:
        pytest.skip("needs a finite hard limit of 256 or more")
    with serve(_hello) as upstream, _proxy_process(upstream.url, 200, hard) as (pid, _):
        assert _open_files(pid) == (hard, hard)
        # the recording child keeps the limit it was started with
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        assert [_open_files(int(child)) for child in children] == [(200, hard)]


def test_the_proxy_never_lowers_its_limit() -> None:
    with serve(_hello) as upstream, _proxy_process(upstream.url, 150, 150) as (pid, _):
        assert _open_files(pid) == (150, 150)


def test_the_proxy_under_the_ui_raises_its_limit_too() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 256:
        pytest.skip("needs a finite hard limit of 256 or more")
    sock = socket.create_server((HOST, 0))
    sock.set_inheritable(True)
    resource.setrlimit(resource.RLIMIT_NOFILE, (200, hard))
    try:
        front = FrontProcess(sock, "http://127.0.0.1:9", "tcp://127.0.0.1:9")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        sock.close()
    try:
        assert front.child.pid is not None
        assert _open_files(front.child.pid) == (hard, hard)
    finally:
        front.stop()


def test_accepting_pauses_at_the_budget_and_resumes(monkeypatch: pytest.MonkeyPatch) -> None:
    """In process, with a budget of 4 clients: 20 connected at once are all served, never
    more than 4 accepted at a time, and accepting was paused and resumed."""
    monkeypatch.setattr(accept, "client_budget", lambda: 4)
    most = 0
    with serve(_hello) as upstream:
        sock = socket.create_server((HOST, 0))
        front = Front(sock, upstream.url, "tcp://127.0.0.1:9")
        try:
            connections = front.server.server_state.connections
            stop = threading.Event()

            def watch() -> None:
                nonlocal most
                while not stop.is_set():
                    most = max(most, len(connections))
                    time.sleep(0.001)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            results = _crowd(sock.getsockname()[1], clients=20, requests=2)
            stop.set()
            watcher.join(5)
            (acceptor,) = front.server.acceptors
            assert results == {200: 40}, results
            assert acceptor.pauses > 0 and 0 < most <= 4
            wait_until(lambda: not acceptor.paused)
        finally:
            front.stop()
            sock.close()


# -- 3. HTTP/1.0 clients asking for keep-alive (ab -k) ----------------------------------------

KEEP_10 = b"GET %s HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n"


def _response(sock: socket.socket, pending: bytearray, head_only: bool = False) -> bytes:
    """One response framed by its Content-Length (none: by the connection's end)."""
    while b"\r\n\r\n" not in pending:
        chunk = sock.recv(65536)
        assert chunk, bytes(pending)
        pending += chunk
    end = pending.index(b"\r\n\r\n") + 4
    head = bytes(pending[:end]).lower()
    match = [line for line in head.split(b"\r\n") if line.startswith(b"content-length:")]
    if head_only or b" 204 " in head.split(b"\r\n")[0]:
        size = 0
    elif match:
        size = int(match[0].split(b":")[1])
    else:
        with contextlib.suppress(TimeoutError):
            while chunk := sock.recv(65536):
                pending += chunk
        size = len(pending) - end
    while len(pending) < end + size:
        chunk = sock.recv(65536)
        assert chunk, bytes(pending)
        pending += chunk
    whole = bytes(pending[: end + size])
    del pending[: end + size]
    return whole


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_an_http_1_0_keep_alive_client_is_kept_when_a_length_frames_the_body(
    streamed: bool,
) -> None:
    from test_proxy_user import scripted

    head = b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nhello"
    gates = [threading.Event() for _ in range(4)]

    def answer(request: bytes) -> Any:
        gate = gates[len(upstream.heads) - 1]
        return [head, gate, b" world"] if streamed else head + b" world"

    with scripted(answer) as (upstream, proxy):
        with socket.create_connection((HOST, proxy.port), timeout=10) as sock:
            pending = bytearray()
            for gate in gates[:3]:
                sock.sendall(KEEP_10 % b"/len")
                if streamed:  # the body's end comes later: the head went without it
                    while b"hello" not in pending:
                        pending += sock.recv(65536)
                    assert b" world" not in pending
                gate.set()
                got = _response(sock, pending)
                assert got == (
                    b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n"
                    b"connection: keep-alive\r\n\r\nhello world"
                ), got
            gates[3].set()
            # HEAD and a 204 on the same connection, kept too
            sock.sendall(b"HEAD /len HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            assert b"connection: keep-alive\r\n" in _response(sock, pending, head_only=True)
        assert proxy.connections == 0 or wait_until(lambda: proxy.connections == 0)
        assert len(upstream.heads) == 4


def test_an_http_1_0_keep_alive_client_is_closed_when_the_end_frames_the_body() -> None:
    from test_proxy_user import by_path, scripted

    chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    nothing = b"HTTP/1.1 204 No Content\r\n\r\n"
    with scripted(by_path({b"/chunked": chunked, b"/none": nothing})) as (_, proxy):
        with socket.create_connection((HOST, proxy.port), timeout=10) as sock:
            pending = bytearray()
            sock.sendall(KEEP_10 % b"/none")
            got = _response(sock, pending)
            assert got == b"HTTP/1.1 204 No Content\r\nconnection: keep-alive\r\n\r\n", got
            sock.sendall(KEEP_10 % b"/chunked")
            got = _response(sock, pending)
            assert got == b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nhello", got
            assert _closed(sock)


def test_http_1_0_without_keep_alive_and_1_1_are_as_before() -> None:
    from test_proxy_user import scripted

    with scripted(lambda head: b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok") as (_, proxy):
        with socket.create_connection((HOST, proxy.port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            got = _response(sock, bytearray())
            assert got == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
            assert _closed(sock)
        with socket.create_connection((HOST, proxy.port), timeout=10) as sock:
            pending = bytearray()
            for _ in range(2):
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                got = _response(sock, pending)
                assert got == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


# -- found on the way: a SIGTERM before uvicorn's handlers was lost ----------------------------


def test_a_signal_before_uvicorn_listens_for_it_still_stops_the_proxy() -> None:
    # run_proxy's handlers (while uvicorn has not set its own yet) were no-ops: a SIGTERM
    # right after the start line was lost, and the proxy served on (the test above
    # waited 15 s for it, then killed it).
    import signal

    from hopscope.app.proxy_command import _quiet_signals

    class Server:
        should_exit = False

    server = Server()
    before = signal.getsignal(signal.SIGTERM)
    with _quiet_signals(server):
        signal.raise_signal(signal.SIGTERM)
    assert server.should_exit
    assert signal.getsignal(signal.SIGTERM) is before
