"""``hopscope proxy --upstream https://...``: a real uvicorn serving TLS with a certificate
made here (``openssl`` CLI), the proxy in front of it, verification on and off."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hopscope.app.proxy_config import ProxyError, parse_upstream
from hopscope.tracing import MemorySink, load
from hopscope.tracing.model import Span
from servers import interrupt
from test_proxy import (
    HOPSCOPE,
    HOST,
    Proxy,
    Running,
    _answers,
    finished,
    proxy_to,
    serve,
    upstream_app,
    wait_until,
)

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI"),
]


@pytest.fixture
def tls_upstream(certificate: tuple[Path, Path]) -> Iterator[tuple[Running, MemorySink]]:
    cert, key = certificate
    sink = MemorySink()
    with serve(upstream_app(sink), ssl_certfile=str(cert), ssl_keyfile=str(key)) as running:
        yield running, sink


def proxy_span(proxy: Proxy, path: str) -> Span:
    """The proxy span of the last request to ``path``, once its client span ended."""
    finished(proxy, path)
    trace, _ = proxy.span("client", path)
    return trace.by_hop("proxy")[0]


def https(running: Running, host: str = HOST) -> str:
    return f"https://{host}:{running.port}"


@contextlib.contextmanager
def proxied(url: str, **options: Any) -> Iterator[Proxy]:
    with proxy_to(url, **options) as proxy:
        yield proxy


def test_parse_https_upstream() -> None:
    up = parse_upstream("https://example.test/api/")
    assert (up.scheme, up.host, up.port, up.prefix) == ("https", "example.test", 443, "/api")
    assert up.host_header == "example.test"  # the default port is not named
    assert up.url == "https://example.test/api"
    assert parse_upstream("https://example.test:8443").host_header == "example.test:8443"
    assert parse_upstream("http://example.test:443").host_header == "example.test:443"
    with pytest.raises(ProxyError):
        parse_upstream("ftp://example.test")


def test_self_signed_upstream_is_refused_by_default(
    tls_upstream: tuple[Running, MemorySink],
) -> None:
    running, _ = tls_upstream
    with proxied(https(running)) as proxy:
        response = httpx.get(f"{proxy.url}/", timeout=10)
        assert response.status_code == 502
        assert "certificate" in response.text and "--insecure" in response.text
        span = proxy_span(proxy, "/")
        assert span.attrs["error.type"] == "connect_failed"


def test_insecure_forwards_to_a_self_signed_upstream(
    tls_upstream: tuple[Running, MemorySink],
) -> None:
    running, up_sink = tls_upstream
    with proxied(https(running), insecure=True) as proxy:
        with httpx.Client(timeout=10) as client:
            for _ in range(3):
                response = client.post(f"{proxy.url}/echo", content=b"over TLS")
                assert response.status_code == 200
                assert response.content == b"over TLS"
        span = proxy_span(proxy, "/echo")
        assert span.attrs["url.full"] == f"https://{HOST}:{running.port}/echo"
        assert proxy.stats()["created"] == 1  # kept alive across requests, TLS included
        # The app joined the trace over TLS (the traceparent went through), and saw the
        # client's scheme (X-Forwarded-Proto), not the proxy's.
        trace, _ = proxy.span("client", "/echo", up_sink)
        apps = trace.by_hop("app")
        assert apps and apps[0].attrs["url.scheme"] == "http"


def test_verified_upstream_by_name(
    tls_upstream: tuple[Running, MemorySink],
    certificate: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Verification on, the certificate trusted: the name checked (and sent as SNI) is
    the upstream's host."""
    running, _ = tls_upstream
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
    with proxied(https(running, "localhost")) as proxy:
        response = httpx.get(f"{proxy.url}/", timeout=10)
        assert response.status_code == 200
        assert response.text == "Hello, world!"


def test_websocket_to_a_tls_upstream(tls_upstream: tuple[Running, MemorySink]) -> None:
    from websockets.sync.client import connect

    running, _ = tls_upstream
    with proxied(https(running), insecure=True) as proxy:
        url = proxy.url.replace("http://", "ws://") + "/ws"
        with connect(url, open_timeout=5, close_timeout=5) as ws:
            ws.send("hello")
            assert ws.recv(timeout=5) == "echo:hello"
        span = proxy_span(proxy, "/ws")
        assert span.attrs["url.full"].startswith("wss://")


def test_the_command_takes_an_https_upstream_with_insecure(
    tls_upstream: tuple[Running, MemorySink], tmp_path: Path, free_port: Callable[[], int]
) -> None:
    running, _ = tls_upstream
    port, collector = free_port(), free_port()
    output = tmp_path / "trace.jsonl"
    argv = [
        *HOPSCOPE, "proxy", "--upstream", https(running), "--insecure", "--headless",
        "--listen", f"{HOST}:{port}", "--collector", f"{HOST}:{collector}", "-o", str(output),
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: _answers(port) or proc.poll() is not None, timeout=20)
        assert proc.poll() is None
        response = httpx.get(f"http://{HOST}:{port}/", timeout=10)
        assert response.status_code == 200 and response.text == "Hello, world!"
    finally:
        _, err = interrupt(proc, 15, 5)
    assert "-> https://" in err and "stopped after 1 request" in err
    traces = load(output)
    assert any(
        s.hop == "proxy" and s.attrs.get("url.full", "").startswith("https://")
        for t in traces
        for s in t.spans.values()
    )
