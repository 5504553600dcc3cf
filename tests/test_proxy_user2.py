"""``hopscope proxy`` used as clients and upstreams really use it (second round).

Each test pins a place where the proxy once answered differently from nginx or from
the upstream itself: a WebSocket's target rebuilt (``/p?`` lost its ``?``), an upstream
WebSocket redirect followed instead of relayed, an HTTP/1.1 request without Host passed
on, a request pipelined behind an ``Upgrade: h2c`` one lost, header names lowercased and
the reason phrase replaced.  Upstreams are scripted sockets (exact bytes, and what
reached them) or real uvicorn apps.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
from hopscope.tracing.model import Span
from test_proxy import HOST, Proxy, wait_until
from test_proxy_listener import read_responses
from test_proxy_user import OK, by_path, exchange, get, scripted

pytestmark = pytest.mark.timeout(60)


def _client_span(proxy: Proxy, path: str) -> Span:
    def done() -> Span | None:
        for trace in proxy.traces():
            for span in trace.spans.values():
                if span.hop == "client" and span.attrs.get("url.path") == path and span.finished:
                    return span
        return None

    return wait_until(done)


# -- WebSocket -----------------------------------------------------------------------------

REFUSED = b"HTTP/1.1 403 Forbidden\r\ncontent-length: 2\r\n\r\nno"


def websocket_head(target: bytes) -> bytes:
    return (
        b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("target", "sent"),
    [(b"/p?", b"/p?"), (b"/p?a=1", b"/p?a=1"), (b"/a;b?c", b"/a;b?c"), (b"/p?#f", b"/p?")],
)
def test_a_websocket_target_goes_upstream_byte_for_byte(target: bytes, sent: bytes) -> None:
    # The WebSocket path rebuilt the target from path and query: "/p?" went as "/p" (the
    # plain path keeps it), twice: in uvicorn's scope and in websockets' URL.
    with scripted(lambda head: REFUSED) as (upstream, proxy):
        (response,) = exchange(proxy, websocket_head(target), 1)
        assert response.startswith(b"HTTP/1.1 403")
        assert [head.split(b" ")[1] for head in upstream.heads] == [sent]


def test_an_upstream_websocket_redirect_is_relayed_not_followed() -> None:
    # websockets' connect follows a 3xx (to any host it names): the proxy opened a
    # WebSocket wherever the upstream pointed, and the client never saw the redirect.
    def answer(head: bytes) -> bytes:
        host = re.search(rb"(?i)\r\nhost: ([^\r]*)", head)
        assert host is not None
        location = b"ws://" + host[1] + b"/elsewhere"
        return b"HTTP/1.1 302 Found\r\nlocation: " + location + b"\r\ncontent-length: 0\r\n\r\n"

    with scripted(answer) as (upstream, proxy):
        (response,) = exchange(proxy, websocket_head(b"/ws"), 1)
        assert response.startswith(b"HTTP/1.1 302")
        assert b"/elsewhere\r\n" in response
        assert [head.split(b" ")[1] for head in upstream.heads] == [b"/ws"]


# -- Host ----------------------------------------------------------------------------------


def test_an_http_1_1_request_without_host_is_refused_and_recorded() -> None:
    # RFC 9112 3.2: a server MUST answer 400 (nginx does).  The proxy passed it on, with
    # the upstream's own Host, whichever idle or new connection it took.
    with scripted(by_path({})) as (upstream, proxy):
        assert exchange(proxy, get("/warm"), 1) == [OK]  # (an idle connection: fast path)
        for path in ("/no-host", "/no-host-again"):
            (response,) = exchange(proxy, f"GET {path} HTTP/1.1\r\nX-A: 1\r\n\r\n".encode(), 1)
            assert response.startswith(b"HTTP/1.1 400 ")
            assert b"no Host field" in response
            span = _client_span(proxy, path)
            assert "Host" in span.attrs["proxy.refused"]
            spans = [s for t in proxy.traces() for s in t.spans.values()]
            assert [s.hop for s in spans if s.trace_id == span.trace_id] == ["client"]
        assert [head.split(b" ")[1] for head in upstream.heads] == [b"/warm"]


def test_an_http_1_0_request_without_host_goes_through() -> None:
    with scripted(by_path({})) as (upstream, proxy):
        (response,) = exchange(proxy, b"GET /old HTTP/1.0\r\n\r\n", 1)
        assert response.startswith(b"HTTP/1.1 200")
        (head,) = upstream.heads
        assert head.startswith(b"GET /old HTTP/1.1\r\n")
        assert f"\r\nhost: {HOST}:".encode() in head.lower()
        assert b"x-forwarded-host" not in head.lower()


# -- Upgrade other than WebSocket ----------------------------------------------------------

H2C = (
    b"GET /h2c HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
)


@pytest.mark.parametrize("split", [False, True])
def test_a_request_pipelined_behind_an_h2c_upgrade_is_answered(split: bool) -> None:
    # The listener handed the connection to uvicorn's protocol on any Upgrade; uvicorn
    # answered the h2c request as a plain one and dropped what came behind it.  Now both
    # are answered, the Upgrade not passed on (as nginx without proxy_set_header Upgrade).
    with scripted(by_path({})) as (upstream, proxy):
        if split:  # (the head in two reads: the listener's counting path)
            with socket.create_connection((HOST, proxy.port), timeout=10) as sock:
                sock.sendall(H2C[:20])
                time.sleep(0.1)  # (read apart: nothing observable says it was)
                sock.sendall(H2C[20:] + get("/next"))
                responses = read_responses(sock, 2)
        else:
            responses = exchange(proxy, H2C + get("/next") + get("/third"), 3)
        assert responses == [OK] * (2 if split else 3)
        first = upstream.heads[0].lower()
        assert first.startswith(b"get /h2c http/1.1\r\n")
        assert b"upgrade" not in first and b"http2-settings" not in first
        assert [head.split(b" ")[1] for head in upstream.heads[1:]] == (
            [b"/next"] if split else [b"/next", b"/third"]
        )


def test_an_h2c_upgrade_with_a_body_is_not_misread() -> None:
    # llhttp ends an Upgrade request at its head: its body would be read as the next
    # request (or the request sent upstream without it).  (It goes on with its body:
    # see test_edges_s9.)
    request = H2C.replace(b"GET", b"POST").replace(b"\r\n\r\n", b"\r\nContent-Length: 2\r\n\r\nab")
    with scripted(by_path({})) as (upstream, proxy):
        (response,) = exchange(proxy, request, 1)
        assert response == OK
        (head,) = upstream.heads
        assert head.lower().startswith(b"post /h2c ") and b"content-length: 2" in head.lower()


# -- Host values nginx takes -----------------------------------------------------------------

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
#: Taken by nginx 1.22 and now by the proxy: nothing in them is a delimiter to a parser.
NGINX_TAKES = [b"caf\xc3\xa9.example", b"a\x80b", b'a"b', b"a<b>", b"a|b", b"a^b`{c}"]
#: Taken by nginx, still refused here (see proxy._HOST): read as another host by some.
STRICTER = [b"a\\b", b"a:b:c", b"a:80x", b"a@b", b"a?b", b"a#b"]


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    if NGINX is None:
        pytest.skip("nginx is not installed (.ci/run installs it)")
    root = tmp_path_factory.mktemp("nginx")
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    (root / "logs").mkdir()
    temps = "\n".join(f"{kind}_temp_path {root}/{kind};" for kind in (
        "client_body", "proxy", "fastcgi", "uwsgi", "scgi"))  # fmt: skip
    (root / "nginx.conf").write_text(
        f"daemon off; worker_processes 1; pid {root}/nginx.pid; error_log {root}/error.log;\n"
        f"events {{ worker_connections 16; }}\nhttp {{ access_log off; {temps}\n"
        f"server {{ listen {HOST}:{port}; location / {{ return 200 ok; }} }} }}\n"
    )
    proc = subprocess.Popen([NGINX, "-c", str(root / "nginx.conf"), "-p", str(root)],
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_until(lambda: _answers(port), timeout=15)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
        return True
    return False


def _status(port: int, host: bytes) -> bytes:
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(b"GET /h HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        (response,) = read_responses(sock, 1)
    return response[9:12]


def test_host_values_nginx_takes_go_through_where_harmless(nginx: int) -> None:
    # The proxy refused every byte >= 0x80 (a UTF-8 name) and "<|\ as not RFC 3986.
    with scripted(by_path({})) as (upstream, proxy):
        for host in NGINX_TAKES:
            assert (_status(nginx, host), _status(proxy.port, host)) == (b"200", b"200"), host
            assert b"\r\nx-forwarded-host: " + host + b"\r\n" in upstream.heads[-1]
        for host in STRICTER:
            assert (_status(nginx, host), _status(proxy.port, host)) == (b"200", b"400"), host


# -- field names as they came ----------------------------------------------------------------

NAMED = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Trace-Id: 7\r\n"


@pytest.mark.parametrize(
    "answer",
    [
        NAMED + b"Content-Length: 2\r\n\r\nok",
        b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\nX-MiXeD: a\r\n\r\nno",
    ],
    ids=["canonical", "mixed"],
)
def test_response_field_names_reach_the_client_as_upstream_sent_them(answer: bytes) -> None:
    # Names were lowercased (nginx and mitmproxy pass them as received).  First on a new
    # upstream connection, then on an idle one (the fast path).
    with scripted(by_path({b"/a": answer})) as (_, proxy):
        assert exchange(proxy, get("/a") + get("/a"), 2) == [answer, answer]


def test_a_streamed_response_keeps_its_field_names() -> None:
    later = threading.Event()
    head = NAMED + b"Transfer-Encoding: chunked\r\n\r\n"
    answer: list[bytes | threading.Event] = [head + b"2\r\nok\r\n", later, b"0\r\n\r\n"]
    with scripted(by_path({b"/s": answer})) as (_, proxy):
        with socket.create_connection((HOST, proxy.port), timeout=10) as sock:
            sock.sendall(get("/s"))
            data = b""
            while b"ok\r\n" not in data:
                data += sock.recv(65536)
            later.set()
            while not data.endswith(b"0\r\n\r\n"):
                data += sock.recv(65536)
    # (Transfer-Encoding is hop-by-hop: the proxy frames the body itself.)
    assert data == NAMED + b"transfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"


def test_request_field_names_go_upstream_as_the_client_sent_them() -> None:
    with scripted(by_path({})) as (upstream, proxy):
        request = (
            b"GET /n HTTP/1.1\r\nHOST: x\r\nX-Api-Key: k\r\naccept: */*\r\n"
            b"Connection: X-Hop\r\nX-Hop: 1\r\nContent-Length: 0\r\n\r\n"
        )
        assert exchange(proxy, request + get("/n"), 2) == [OK, OK]
        first = upstream.heads[0]
        assert b"\r\nX-Api-Key: k\r\naccept: */*\r\n" in first
        assert b"X-Hop" not in first and b"HOST" not in first
        assert b"\r\nx-forwarded-host: x\r\n" in first


# -- keep-alive after errors -----------------------------------------------------------------


def test_the_client_connection_and_the_pool_go_on_after_an_invalid_response() -> None:
    bad = b"HTTP/1.1 999 Odd\r\ncontent-length: 2\r\n\r\nok"
    with scripted(by_path({b"/bad": bad})) as (upstream, proxy):
        with socket.create_connection((HOST, proxy.port), timeout=10) as sock:
            sock.sendall(get("/ok"))
            assert read_responses(sock, 1) == [OK]
            sock.sendall(get("/bad"))  # (on the idle upstream connection: the fast path)
            (response,) = read_responses(sock, 1)
            assert response.startswith(b"HTTP/1.1 502 ")
            sock.sendall(get("/after"))
            assert read_responses(sock, 1) == [OK]
        assert exchange(proxy, get("/again") + get("/again"), 2) == [OK, OK]
        assert [h.split(b" ")[1] for h in upstream.heads][-2:] == [b"/again"] * 2


def test_a_websocket_handshake_without_host_is_refused() -> None:
    with scripted(lambda head: REFUSED) as (upstream, proxy):
        head = websocket_head(b"/ws").replace(b"Host: x\r\n", b"")
        (response,) = exchange(proxy, head, 1)
        assert response.startswith(b"HTTP/1.1 400 ")
        assert upstream.heads == []


# -- a client silent in the middle of its body -----------------------------------------------


@pytest.mark.parametrize("first", [b"", b"0123456789"], ids=["no-body-yet", "part"])
def test_a_body_that_stops_coming_closes_the_connection(
    monkeypatch: pytest.MonkeyPatch, first: bytes
) -> None:
    # Before: the client connection and the upstream one stayed open for good, each
    # waiting for the other's bytes.  nginx closes after client_body_timeout (60 s).
    from hopscope.app.listener import HttpListener

    monkeypatch.setattr(HttpListener, "body_timeout", 1.0)
    with scripted(by_path({})) as (_, proxy):
        with socket.create_connection((HOST, proxy.port), timeout=10) as sock:
            sock.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + first)
            sock.settimeout(15)
            assert sock.recv(65536) == b""  # (closed, nothing sent: as nginx does)
        span = _client_span(proxy, "/up")
        assert span.attrs["disconnected"] is True
        wait_until(lambda: proxy.stats()["open"] == 0 and proxy.connections == 0)
