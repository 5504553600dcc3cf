"""Log records emitted inside a request become ``log`` events of its span."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import httpx
import pytest
from hopscope.tracing import MemorySink, wrap
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

log = logging.getLogger("hopscope.tests.app")


async def handler(request: Request) -> PlainTextResponse:
    log.warning("looking up %s", request.path_params["name"])
    try:
        raise KeyError("missing")
    except KeyError:
        log.exception("lookup failed")
    return PlainTextResponse("ok")


@pytest.mark.anyio
async def test_logs_inside_a_request_land_in_its_span() -> None:
    sink = MemorySink()
    app = wrap(Starlette(routes=[Route("/users/{name}", handler)]), sink=sink)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        assert (await c.get("/users/ada")).text == "ok"
    log.warning("outside any request")
    (trace,) = sink.traces()
    events = [e for s in trace.spans.values() for e in s.events if e.name == "log"]
    assert [e.attrs["message"] for e in events] == ["looking up ada", "lookup failed"]
    assert events[0].attrs["level"] == "WARNING"
    assert events[0].attrs["logger"] == "hopscope.tests.app"
    assert "KeyError: 'missing'" in events[1].attrs["exception.stacktrace"]
    assert len(sink.traces()) == 1  # the log outside a request recorded nothing


def test_log_capture_keeps_basic_config_and_last_resort_working() -> None:
    """Capture must not change logging's own behaviour: basicConfig still configures the
    root logger after wrap(), and unconfigured warnings still reach stderr."""
    script = textwrap.dedent(
        """
        import logging, sys
        from hopscope.tracing import MemorySink, wrap

        def app(environ, start_response):
            start_response("200 OK", [])
            return [b""]

        wrap(app, sink=MemorySink())
        logging.getLogger("x").warning("last resort still prints")
        logging.basicConfig(stream=sys.stdout, format="configured: %(message)s")
        logging.getLogger("x").warning("hello")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert "last resort still prints" in done.stderr
    assert done.stdout.strip() == "configured: hello"


def test_wsgi_logs_are_captured_too() -> None:
    sink = MemorySink()

    def app(environ: dict, start_response):  # type: ignore[no-untyped-def,type-arg]
        logging.getLogger("legacy").error("legacy says %d", 42)
        start_response("200 OK", [("content-type", "text/plain")])
        return [b"ok"]

    with httpx.Client(transport=httpx.WSGITransport(wrap(app, sink=sink))) as client:
        assert client.get("http://t/").text == "ok"
    (trace,) = sink.traces()
    (span,) = trace.spans.values()
    (event,) = [e for e in span.events if e.name == "log"]
    assert event.attrs == {"level": "ERROR", "logger": "legacy", "message": "legacy says 42"}
