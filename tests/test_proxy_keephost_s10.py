"""The Host the upstream gets: the upstream's own by default (as nginx and mitmproxy's
reverse mode send it), the client's with ``keep_host`` (``hopscope proxy --keep-host``,
and what ``hopscope run TARGET`` and the demo do, where the upstream's address is one
hopscope chose and the user never sees)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from test_proxy import HOST, proxy_to, raw_request, serve, wait_until

pytestmark = pytest.mark.timeout(60)


async def _seen(request: Request) -> JSONResponse:
    return JSONResponse(
        {"host": request.headers.get("host"), "xfh": request.headers.get("x-forwarded-host")}
    )


SEEN = Starlette(routes=[Route("/{path:path}", _seen, methods=["GET", "POST"])])


@pytest.mark.parametrize("keep_host", [False, True])
def test_the_upstream_gets_the_clients_host_only_when_asked(keep_host: bool) -> None:
    with serve(SEEN) as upstream, proxy_to(upstream.url, keep_host=keep_host) as proxy:
        url = f"http://{HOST}:{proxy.port}"
        with httpx.Client(timeout=10) as client:
            plain = client.get(f"{url}/a").json()  # (the proxy's quick path)
            odd = client.post(  # (the general path: a field it handles itself)
                f"{url}/b", headers={"x-forwarded-for": "10.0.0.1", "expect": "100-continue"}
            ).json()
        ten = raw_request(proxy.port, b"GET /c HTTP/1.0\r\n\r\n")  # HTTP/1.0: no Host
    sent = f"{HOST}:{proxy.port}"
    for seen in (plain, odd):
        assert seen["xfh"] == sent
        assert seen["host"] == (sent if keep_host else upstream.url.split("//")[1])
    # Without a Host from the client there is only the upstream's to send.
    assert json.loads(ten.partition(b"\r\n\r\n")[2])["host"] == upstream.url.split("//")[1]


def test_hopscope_proxy_keep_host_flag(tmp_path: object) -> None:
    with serve(SEEN) as upstream:
        probe = socket.socket()
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
        probe.close()
        proc = subprocess.Popen(
            [sys.executable, "-m", "hopscope.app", "proxy", "--headless", "--keep-host",
             "--upstream", upstream.url, "--listen", f"{HOST}:{port}", "--collector",
             f"{HOST}:0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:

            def answered() -> dict[str, str] | None:
                try:
                    return httpx.get(f"http://{HOST}:{port}/x", timeout=2).json()  # type: ignore[no-any-return]
                except httpx.HTTPError:
                    return None

            seen = wait_until(answered, timeout=30)
            assert seen == {"host": f"{HOST}:{port}", "xfh": f"{HOST}:{port}"}
        finally:
            proc.terminate()
            proc.wait(timeout=20)
            assert proc.stderr is not None
            proc.stderr.close()
