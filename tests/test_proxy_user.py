"""``hopscope proxy`` used as clients and upstreams really use it, on raw sockets.

Each test here pins a place where the proxy once answered differently from the upstream
itself (or from nginx): a 304 with a Content-Length, an upstream status no client can
be given, a malformed request behind pipelined good ones, a head without size limit,
two Host fields, a Host that is not host[:port], a transfer coding the proxy cannot
pass on, a refusal of the listener's missing from the trace, an empty query dropped
from the target, a WebSocket's X-Forwarded-Proto.  The upstream is a scripted socket
server, so the bytes it sends are exact and what reached it can be checked.
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from test_proxy import HOPSCOPE, HOST, Proxy, proxy_to, serve, wait_until
from test_proxy_listener import read_responses

pytestmark = pytest.mark.timeout(60)

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


Answer = bytes | list[bytes | threading.Event]


class Scripted:
    """An upstream answering each request (keep-alive, Content-Length bodies read)
    with ``answer(head)``: bytes, or pieces sent one by one, an event between two
    waited for (bounded); ``heads`` are the request heads that reached it."""

    def __init__(self, answer: Callable[[bytes], Answer]) -> None:
        self.answer = answer
        self.heads: list[bytes] = []
        self.sock = socket.create_server((HOST, 0))
        self.sock.settimeout(0.2)
        self.url = f"http://{HOST}:{self.sock.getsockname()[1]}"
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        data = b""
        with conn, contextlib.suppress(OSError):
            conn.settimeout(10)
            while not self._stop.is_set():
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, data = data.partition(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                size = int(length[1]) if length else 0
                while len(data) < size:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                data = data[size:]
                self.heads.append(head)
                answer = self.answer(head)
                for piece in [answer] if isinstance(answer, bytes) else answer:
                    if isinstance(piece, threading.Event):
                        piece.wait(10)
                    else:
                        conn.sendall(piece)

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


@contextlib.contextmanager
def scripted(answer: Callable[[bytes], Answer]) -> Iterator[tuple[Scripted, Proxy]]:
    upstream = Scripted(answer)
    try:
        with proxy_to(upstream.url) as proxy:
            yield upstream, proxy
    finally:
        upstream.close()


def by_path(answers: dict[bytes, Answer]) -> Callable[[bytes], Answer]:
    """Answer ``answers[path]`` (OK for any other path)."""

    def answer(head: bytes) -> Answer:
        return answers.get(head.split(b" ", 2)[1], OK)

    return answer


def exchange(proxy: Proxy, data: bytes, count: int, heads: tuple[int, ...] = ()) -> list[bytes]:
    with socket.create_connection((HOST, proxy.port), timeout=10) as sock:
        sock.sendall(data)
        return read_responses(sock, count, heads)


def until_closed(proxy: Proxy, data: bytes) -> bytes:
    """Everything the proxy answers to ``data`` until it closes the connection."""
    out = b""
    with socket.create_connection((HOST, proxy.port), timeout=10) as sock:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            sock.sendall(data)
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            while chunk := sock.recv(65536):
                out += chunk
    return out


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


# -- responses without a body ------------------------------------------------------------


@pytest.mark.parametrize("status", [b"304 Not Modified", b"204 No Content"])
def test_a_bodiless_response_with_a_content_length_keeps_the_connection(status: bytes) -> None:
    # A 304's Content-Length is the size of the full response (RFC 9110 8.6): there is
    # no body.  The proxy used to wait for 50 bytes, fail, and drop the connection.
    answer = b"HTTP/1.1 " + status + b'\r\netag: "v1"\r\ncontent-length: 50\r\n\r\n'
    with scripted(by_path({b"/cached": answer})) as (_, proxy):
        first, second = exchange(proxy, get("/cached") + get("/next"), 2, heads=(0,))
        assert first == answer
        assert second == OK


# -- HTTP/1.0 clients -----------------------------------------------------------------------


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_an_http_1_0_client_never_gets_a_chunked_body(streamed: bool) -> None:
    # RFC 9112 6.1: no Transfer-Encoding to an HTTP/1.0 client, which would take the
    # chunk sizes for body bytes (ab, curl --http1.0).  Before: chunked, both ways.
    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n"
    rest = b"6\r\n world\r\n0\r\n\r\n"
    gate = threading.Event()
    answer: Answer = [head, gate, rest] if streamed else head + rest
    with scripted(by_path({b"/chunked": answer})) as (_, proxy):
        with socket.create_connection((HOST, proxy.port), timeout=10) as sock:
            sock.sendall(b"GET /chunked HTTP/1.0\r\n\r\n")
            got = b""
            if streamed:
                while not got.endswith(b"hello"):
                    got += sock.recv(65536)
                gate.set()
            with contextlib.suppress(TimeoutError):
                while chunk := sock.recv(65536):
                    got += chunk
        assert got == b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nhello world"
        # An HTTP/1.1 client still gets the chunks.
        (chunked,) = exchange(proxy, get("/chunked"), 1)
        assert chunked.startswith(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n")


def test_an_http_1_0_client_gets_no_100_continue() -> None:
    # RFC 9110 10.1.1: an HTTP/1.0 request's 100-continue expectation is ignored.
    # Before: "HTTP/1.1 100 Continue" came first, which such a client takes for its
    # answer (and the real one for garbage after it).
    with scripted(by_path({})) as (upstream, proxy):
        request = b"POST /up HTTP/1.0\r\ncontent-length: 3\r\nexpect: 100-continue\r\n\r\nabc"
        got = until_closed(proxy, request)
        assert got == OK.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n")
        assert len(upstream.heads) == 1


# -- interim responses -------------------------------------------------------------------


EARLY = b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"


@pytest.mark.parametrize("version", ["1.1", "1.0"])
def test_early_hints_reach_the_client_before_the_final_response(version: str) -> None:
    # RFC 9110 15.2: a proxy forwards 1xx responses (not to an HTTP/1.0 client).
    # Before: dropped, so a browser could not start on the hinted resources.
    final = threading.Event()
    answer: Answer = [EARLY, final, b"HTTP/1.1 100 Continue\r\n\r\n" + EARLY + OK]
    with scripted(by_path({b"/hinted": answer})) as (_, proxy):
        with socket.create_connection((HOST, proxy.port), timeout=10) as sock:
            sock.sendall(f"GET /hinted HTTP/{version}\r\nHost: x\r\n\r\n".encode())
            expected = EARLY  # (its field names as upstream sent them)
            got = b""
            if version == "1.1":
                while len(got) < len(expected):  # the first, while upstream waits
                    got += sock.recv(65536)
                assert got == expected
            final.set()
            got = b""
            with contextlib.suppress(TimeoutError):
                while not got.endswith(b"ok") and (chunk := sock.recv(65536)):
                    got += chunk
        if version == "1.1":
            assert got == expected + OK  # (a stray 100 Continue is not passed on)
        else:
            assert got == OK.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n")
        wait_until(lambda: _client_span(proxy, "/hinted"))
        trace, _ = proxy.span("client", "/hinted")
        (proxy_span,) = [span for span in trace.spans.values() if span.hop == "proxy"]
        interim = [event.attrs for event in proxy_span.events if event.name == "response.interim"]
        assert [(attrs["status"], attrs["forwarded"]) for attrs in interim] == [
            (103, version == "1.1")
        ] * 2


# -- the upstream's status ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (b"HTTP/1.1 999 Odd\r\ncontent-length: 2\r\n\r\nok", b"(status 999)"),
        (b"HTTP/1.1 600 Odd\r\ncontent-length: 2\r\n\r\nok", b"(status 600)"),
        (
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\nconnection: upgrade\r\n\r\n",
            b"(switched protocols unasked)",
        ),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            b"unsupported Transfer-Encoding 'gzip, chunked'",
        ),
    ],
    ids=["999", "600", "101", "gzip-chunked"],
)
def test_a_response_no_client_can_be_given_is_a_502(answer: bytes, reason: bytes) -> None:
    # Before: a KeyError in the listener (no response, the connection cut) for 999, a
    # 101 with a chunked body passed on for an unasked switch, and a gzip-coded body
    # passed on as plain chunks, its coding dropped.
    with scripted(by_path({b"/odd": answer})) as (_, proxy):
        bad, after = exchange(proxy, get("/odd") + get("/next"), 2)
        assert bad.startswith(b"HTTP/1.1 502 ")
        assert b"hopscope proxy: 502 upstream sent an " in bad and reason in bad
        assert after == OK  # the client's connection goes on


# -- requests the proxy refuses ----------------------------------------------------------


def test_a_bad_request_behind_pipelined_ones_is_answered_after_them() -> None:
    def slowly(head: bytes) -> bytes:
        time.sleep(0.2)  # still answering when the bad request arrives
        return OK

    with scripted(slowly) as (upstream, proxy):
        bad = b"GET /3 HTTP/1.1\r\nHost: x\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n"
        got = until_closed(proxy, get("/1") + get("/2") + bad)
        assert got.startswith(OK + OK + b"HTTP/1.1 400 Bad Request\r\n"), got
        assert got.endswith(b"Invalid HTTP request received.")
        assert len(upstream.heads) == 2


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\nx-big: " + b"a" * 100_000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"x-many: 0123456789\r\n" * 5000 + b"\r\n", 431),
        (b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: x\r\nx-endless: " + b"a" * 3_000_000, 431),
    ],
    ids=["one-field", "many-fields", "target", "endless"],
)
def test_an_oversized_request_head_is_refused_before_the_upstream(
    request_head: bytes, status: int
) -> None:
    # Before: no limit at all (a megabyte of fields went upstream; an endless one grew
    # the proxy's memory until the client stopped).
    with scripted(by_path({})) as (upstream, proxy):
        got = until_closed(proxy, request_head)
        assert got.startswith(b"HTTP/1.1 %d " % status), got[:100]
        assert b"connection: close\r\n" in got
        assert upstream.heads == []
        wait_until(lambda: proxy.connections == 0)  # (once read past, closed)
        # A long head under the limit, in pieces, still goes through.
        with socket.create_connection((HOST, proxy.port), timeout=10) as sock:
            head = b"GET /long HTTP/1.1\r\nHost: x\r\nx-long: " + b"b" * 60_000 + b"\r\n\r\n"
            for start in range(0, len(head), 7000):
                sock.sendall(head[start : start + 7000])
                time.sleep(0.005)
            assert read_responses(sock, 1) == [OK]
        assert b"b" * 60_000 in upstream.heads[0]


@pytest.mark.parametrize(
    ("fields", "status", "reason"),
    [
        (b"Host: a\r\nHost: b\r\n", 400, b"more than one Host field"),
        (b"Host: a\r\nX-A: 1\r\nhost: a\r\n", 400, b"more than one Host field"),
        (
            b"Host: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n",
            501,
            b"Transfer-Encoding 'gzip, chunked' is not supported",
        ),
    ],
    ids=["two-hosts", "two-hosts-apart", "gzip-chunked"],
)
def test_requests_the_upstream_could_read_otherwise_are_refused(
    fields: bytes, status: int, reason: bytes
) -> None:
    # Before: two Host fields went upstream (X-Forwarded-Host the last one), and a
    # gzip-coded chunked body went on dechunked as plain bytes, its coding dropped.
    with scripted(by_path({})) as (upstream, proxy):
        request = b"POST /x HTTP/1.1\r\n" + fields + b"\r\n"
        got, after = exchange(proxy, request + get("/after"), 2)
        assert got.startswith(b"HTTP/1.1 %d " % status), got
        assert got.endswith(b"hopscope proxy: %d " % status + reason + b"\n")
        assert after == OK  # (a body is read past: the connection goes on)
        assert [head.split(b" ")[1] for head in upstream.heads] == [b"/after"]
        span = wait_until(lambda: _client_span(proxy, "/x"))
        assert span.attrs["http.response.status_code"] == status
        assert span.attrs["proxy.refused"] == reason.decode()


@pytest.mark.parametrize(
    "host",
    [b"a b", b"", b"a/b", b"a..b", b"a:80x", b"[::1", b"a@b"],
    ids=["space", "empty", "slash", "two-dots", "bad-port", "open-bracket", "at"],
)
@pytest.mark.parametrize("reused", [False, True], ids=["first", "idle-upstream"])
def test_a_host_that_is_not_host_port_is_refused(host: bytes, reused: bool) -> None:
    # nginx answers 400 ("client sent invalid host header"). Before: passed on, and the
    # upstream told it as X-Forwarded-Host (which site it names was the app's guess).
    with scripted(by_path({})) as (upstream, proxy):
        warm = get("/warm") if reused else b""  # (the fast path needs an idle upstream)
        request = b"GET /h HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
        got = exchange(proxy, warm + request + get("/after"), 3 if reused else 2)
        assert got[-2].startswith(b"HTTP/1.1 400 "), got
        assert b"invalid Host field" in got[-2]
        assert got[-1] == OK
        assert [head.split(b" ")[1] for head in upstream.heads] == [b"/warm"] * reused + [b"/after"]
        span = wait_until(lambda: _client_span(proxy, "/h"))
        assert span.attrs["http.response.status_code"] == 400
        assert span.attrs["proxy.refused"].startswith("invalid Host field")


@pytest.mark.parametrize(
    "host", [b"example.com", b"EXAMPLE.com:8080", b"[::1]:80", b"127.0.0.1", b"a_b-c.d~e"]
)
def test_a_valid_host_goes_through(host: bytes) -> None:
    with scripted(by_path({})) as (upstream, proxy):
        request = b"GET /v HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
        assert exchange(proxy, request + request, 2) == [OK, OK]
        assert all(b"\r\nx-forwarded-host: " + host + b"\r\n" in h for h in upstream.heads)


@pytest.mark.parametrize(
    ("request_head", "status", "path", "attrs"),
    [
        (
            b"GET /bad HTTP/1.1\r\nHost: x\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            400,
            "/bad",
            {"proxy.refused.error": "Duplicate Content-Length", "http.request.method": "GET"},
        ),
        (
            b"GET /big HTTP/1.1\r\nHost: x\r\nx-big: " + b"a" * 100_000 + b"\r\n\r\n",
            431,
            "/big",
            {"proxy.refused.fields": 2},
        ),
        (
            b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            414,
            "/" + "a" * 2047,
            {"proxy.refused.target_size": 100_001},
        ),
    ],
    ids=["400", "431", "414"],
)
def test_a_request_the_listener_refuses_is_recorded(
    request_head: bytes, status: int, path: str, attrs: dict[str, object]
) -> None:
    # Before: answered, but nothing in the trace: a user watching saw no request.
    with scripted(by_path({})) as (upstream, proxy):
        got = until_closed(proxy, get("/first") + request_head)
        assert got.startswith(OK + b"HTTP/1.1 %d " % status), got[:200]
        span = wait_until(lambda: _client_span(proxy, path))
        assert span.attrs["http.response.status_code"] == status
        assert span.attrs["proxy.refused.by"] == "listener"
        assert span.attrs["proxy.refused"]
        for key, value in attrs.items():
            assert span.attrs[key] == value
        trace, _ = proxy.span("client", path)
        assert [s.hop for s in trace.spans.values()] == ["client"]  # nothing upstream
        assert [head.split(b" ")[1] for head in upstream.heads] == [b"/first"]


def test_an_empty_query_reaches_the_upstream() -> None:
    # The target goes upstream byte for byte.  Before: "/p?" went as "/p".
    with scripted(by_path({})) as (upstream, proxy):
        targets = [b"/p?", b"/p?a", b"/p?#f", b"/p??", b"/%2F?x=%20"]
        request = b"".join(b"GET " + t + b" HTTP/1.1\r\nHost: x\r\n\r\n" for t in targets)
        assert exchange(proxy, request, len(targets)) == [OK] * len(targets)
        assert [head.split(b" ")[1] for head in upstream.heads] == [
            b"/p?", b"/p?a", b"/p?", b"/p??", b"/%2F?x=%20"
        ]  # fmt: skip


def _client_span(proxy: Proxy, path: str) -> object:
    with contextlib.suppress(AssertionError):
        _, span = proxy.span("client", path)
        return span if span.finished else None
    return None


# -- WebSocket -----------------------------------------------------------------------------


def test_a_websocket_goes_upstream_with_x_forwarded_proto_http() -> None:
    # nginx's $scheme: http or https.  The proxy sent "ws", which an app checking for
    # "https" (Django's SECURE_PROXY_SSL_HEADER) or "http" does not expect.
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket
    from websockets.sync.client import connect

    seen: dict[str, str] = {}

    async def socket_app(websocket: WebSocket) -> None:
        seen.update(websocket.headers)
        await websocket.accept()
        await websocket.send_text("hi")
        await websocket.close()

    app = Starlette(routes=[WebSocketRoute("/ws", socket_app)])
    with serve(app, ws="websockets-sansio") as upstream, proxy_to(upstream.url) as proxy:
        with connect(proxy.url.replace("http://", "ws://") + "/ws", open_timeout=5) as ws:
            assert ws.recv(timeout=5) == "hi"
    assert seen["x-forwarded-proto"] == "http"


# -- targets ---------------------------------------------------------------------------------


def test_options_asterisk_stays_asterisk_under_a_prefix() -> None:
    # Before: "OPTIONS /api* HTTP/1.1" went upstream (the prefix glued to "*").
    upstream = Scripted(by_path({}))
    try:
        with proxy_to(upstream.url + "/api") as proxy:
            request = b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n" + get("/a?b=%2F")
            assert exchange(proxy, request, 2) == [OK, OK]
        assert [head.split(b"\r\n")[0] for head in upstream.heads] == [
            b"OPTIONS * HTTP/1.1",
            b"GET /api/a?b=%2F HTTP/1.1",
        ]
    finally:
        upstream.close()


# -- connections that never finish a request -------------------------------------------------


def closed_by_proxy(sock: socket.socket, timeout: float = 15.0) -> bool:
    """Whether the proxy closes ``sock`` (sending nothing) within ``timeout``."""
    sock.settimeout(timeout)
    with contextlib.suppress(TimeoutError):
        return sock.recv(65536) == b""
    return False


def test_a_connection_without_a_whole_request_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: a connection that sent nothing, or half a head, stayed open for good
    # (the keep-alive timer ran only after a response): a slowloris, or a browser's
    # unused preconnection, held a socket forever.  Now a silent one gets the
    # keep-alive timeout, a head head_timeout from its first byte (nginx's
    # client_header_timeout), and one that arrives within it is answered.
    from hopscope.app.listener import HttpListener

    monkeypatch.setattr(HttpListener, "head_timeout", 5.0)
    upstream = Scripted(by_path({}))
    try:
        with proxy_to(upstream.url, keep_alive=0.3) as proxy:
            with socket.create_connection((HOST, proxy.port), timeout=10) as silent:
                assert closed_by_proxy(silent)
            with socket.create_connection((HOST, proxy.port), timeout=10) as slow:
                head = get("/slow")
                slow.sendall(head[:10])
                time.sleep(1.0)  # past the keep-alive timeout, within the head's
                slow.sendall(head[10:])
                assert read_responses(slow, 1) == [OK]
                slow.sendall(head[:10])
                assert closed_by_proxy(slow)
            wait_until(lambda: proxy.connections == 0)
        assert len(upstream.heads) == 1
    finally:
        upstream.close()


# -- the command ---------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["--connect-timeout", "--read-timeout"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_timeout_that_is_not_a_number_of_seconds_is_one_line(option: str, value: str) -> None:
    # Before: accepted, then every request failed with a traceback in the proxy and a
    # 500 ("Internal Server Error") for the client.
    command = [*HOPSCOPE, "proxy", "--upstream", "http://127.0.0.1:9", "--headless"]
    addresses = ["--listen", f"{HOST}:0", "--collector", f"{HOST}:0"]
    result = subprocess.run(
        [*command, *addresses, option, value],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"Error: {option} must be a positive number of seconds, got {value}"
    ]
