"""What frameworks' own test suites found when run through ``hopscope run --``.

``bench/framework_suites.py`` runs Flask's, Starlette's, FastAPI's and part of Django's
suites bare and injected, and compares every test's outcome.  Each difference it found
is a test here, on the real framework, called the way that suite calls it.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import subprocess
import sys
import textwrap
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from djangotools import django_urls
from hopscope.app.run import BOOTSTRAP_DIR
from hopscope.tracing import inject, sinks
from hopscope.tracing.asgi import ASGIMiddleware
from hopscope.tracing.sinks import MemorySink
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route


@pytest.fixture
def sink(monkeypatch: pytest.MonkeyPatch) -> MemorySink:
    """The process's default sink, as the framework patches find it, kept in memory."""
    memory = MemorySink()
    monkeypatch.setattr(sinks, "_default", memory)
    monkeypatch.setattr(inject, "_served", False)
    return memory


def django_hello(request: Any) -> Any:
    from django.http import HttpResponse

    return HttpResponse(b"Hello World!", content_type="text/plain")


def django_file(request: Any) -> Any:
    from django.http import FileResponse

    return FileResponse(open(__file__, "rb"))  # the response closes it


@pytest.fixture
def django_handler() -> Iterator[Any]:
    """Django's own ``WSGIHandler``, patched the way ``hopscope run`` patches it (on a
    subclass here, so the rest of the test run keeps Django as it is)."""
    from django.core.handlers.wsgi import WSGIHandler
    from django.urls import path

    urlpatterns = [path("", django_hello), path("file", django_file)]
    with django_urls("hopscope_test_suites_urls", urlpatterns):

        class Handler(WSGIHandler):
            pass

        inject._patch_wsgi_call(Handler)
        yield Handler()


def environ_for(path: str, **extra: Any) -> dict[str, Any]:
    from django.test.client import RequestFactory

    return RequestFactory()._base_environ(PATH_INFO=path, REQUEST_METHOD="GET", **extra)


def app_span(sink: MemorySink) -> Any:
    (trace,) = sink.traces()
    (span,) = trace.spans.values()
    return span


def test_django_handler_called_directly_gives_its_own_response(
    django_handler: Any, sink: MemorySink
) -> None:
    """Django's tests (handlers, wsgi) call ``WSGIHandler`` and use the ``HttpResponse``
    it returns: with hopscope it was the middleware's body iterator, which has no
    ``status_code`` and no ``bytes()`` (6 errors in Django's suite)."""
    from django.http import HttpResponse

    started: list[str] = []
    response = django_handler(environ_for("/"), lambda status, headers: started.append(status))

    assert started == ["200 OK"]
    assert isinstance(response, HttpResponse)
    assert response.status_code == 200
    assert response["Content-Type"] == "text/plain"
    assert "Content-Type" in response
    assert bytes(response).endswith(b"\r\n\r\nHello World!")
    assert repr(response) == '<HttpResponse status_code=200, "text/plain">'
    response["X-Later"] = "1"  # item and attribute writes reach the response itself
    response.custom = "kept"
    assert response.headers["X-Later"] == "1"
    assert response.__dict__["custom"] == "kept"
    assert not response.closed

    # What a server does with it, and that this is still what is recorded.
    assert list(response) == [b"Hello World!"]
    response.close()
    assert response.closed  # Django's own close ran (request_finished, closers)
    span = app_span(sink)
    assert span.attrs["http.response.status_code"] == 200
    assert span.attrs["http.response.body.size"] == 12


def test_a_file_wrapper_is_still_handed_back_as_it_is(
    django_handler: Any, sink: MemorySink
) -> None:
    class FileWrapper:
        def __init__(self, filelike: Any, block_size: int = 8192) -> None:
            self.filelike = filelike

        def __iter__(self) -> Iterator[bytes]:
            yield self.filelike.read()

        def close(self) -> None:
            self.filelike.close()

    environ = environ_for("/file", **{"wsgi.file_wrapper": FileWrapper})
    result = django_handler(environ, lambda status, headers: None)
    assert type(result) is FileWrapper  # servers test its type to use sendfile
    assert b"".join(result).startswith(b'"""What frameworks')
    result.close()
    assert app_span(sink).attrs["http.response.status_code"] == 200


def test_a_sized_result_keeps_its_length_and_items(sink: MemorySink) -> None:
    """A WSGI app returning a list: its caller may use ``len()``, index it, or test its
    type, as on the bare app."""

    class App:
        def __call__(self, environ: Any, start_response: Any) -> list[bytes]:
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"one", b"two"]

    inject._patch_wsgi_call(App)
    result = App()({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, lambda *args: None)
    assert isinstance(result, list)
    assert len(result) == 2
    assert result[1] == b"two"
    assert b"two" in result
    assert copy.copy(result) == [b"one", b"two"]  # a copy of the app's list, as bare
    assert list(result) == [b"one", b"two"]
    result.close()
    assert app_span(sink).attrs["http.response.body.size"] == 6


def test_a_failed_request_is_freed_when_the_app_returns() -> None:
    """FastAPI's ``test_retained_context_does_not_keep_failed_request_alive``, failing
    now and then: the recording kept the exception Starlette's error page was sent for,
    and through its traceback the view's frame and its ``Request``, until the sink's
    next drain.  A ``MemorySink`` keeps recordings for good: nothing may be left."""
    requests: list[weakref.ref[Request]] = []

    async def boom(request: Request) -> None:
        await request.body()
        requests.append(weakref.ref(request))
        raise ValueError("endpoint failed")

    with warnings.catch_warnings():
        # Starlette 1.x asks for httpx2 over httpx, which hopscope's tests use.
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    sink = MemorySink()
    app = ASGIMiddleware(Starlette(routes=[Route("/", boom, methods=["POST"])]), sink=sink)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/", json={"name": "request data"}).status_code == 500
    gc.collect()
    assert requests[0]() is None
    span = app_span(sink)
    assert span.attrs["exception.type"] == "ValueError"
    assert span.attrs["http.response.status_code"] == 500


SCRIPT = """
import django
from django.conf import settings
from django.http import HttpResponse
from django.urls import path

settings.configure(ROOT_URLCONF=__name__, ALLOWED_HOSTS=["*"], SECRET_KEY="x")
django.setup()
urlpatterns = [path("django", lambda request: HttpResponse(b"from django"))]

from django.core.wsgi import get_wsgi_application
from django.test.client import RequestFactory
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient


async def hello(request):
    return PlainTextResponse("from starlette")


async def boom(request):
    raise ValueError("boom")


starlette_app = Starlette(routes=[Route("/starlette", hello), Route("/boom", boom)])
fastapi_app = FastAPI()


@fastapi_app.get("/fastapi/{name}")
def item(name: str):
    return {"name": name}


client = TestClient(starlette_app)
assert client.get("/starlette").text == "from starlette"
try:
    client.get("/boom")
except ValueError as exc:
    assert str(exc) == "boom"
else:
    raise AssertionError("the app's exception did not reach the test")
assert TestClient(fastapi_app).get("/fastapi/ada").json() == {"name": "ada"}

import asyncio

from quart import Quart

quart_app = Quart(__name__)


@quart_app.get("/quart/<name>")
async def quart_item(name):
    return {"quart": name}


async def quart_client():
    response = await quart_app.test_client().get("/quart/ada")
    assert await response.get_json() == {"quart": "ada"}


asyncio.run(quart_client())

environ = RequestFactory()._base_environ(PATH_INFO="/django", REQUEST_METHOD="GET")
response = get_wsgi_application()(environ, lambda status, headers: None)
assert response.status_code == 200, response.status_code
assert b"".join(response) == b"from django"
response.close()
print("ok")
"""


def test_test_clients_go_through_hopscope_when_injected(tmp_path: Path) -> None:
    """Under ``hopscope run --``, Starlette's (and FastAPI's) ``TestClient`` and Quart's
    test client call the app directly, with no server to hook: ``Starlette.__call__`` and
    ``Quart.__call__`` record them, and the app behaves as it does bare (same body, same
    exception)."""
    trace = tmp_path / "trace.jsonl"
    script = tmp_path / "client_script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = dict(os.environ, PYTHONPATH=str(BOOTSTRAP_DIR), HOPSCOPE_SINK=f"file:{trace}")
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    events = [json.loads(line) for line in trace.read_text().splitlines()[1:]]
    starts = {e["span_id"]: e for e in events if e["kind"] == "span_start"}
    ends = {e["span_id"]: e["attrs"] for e in events if e["kind"] == "span_end"}
    spans = sorted((s["name"], s["attrs"]["interface"]) for s in starts.values())
    assert spans == [
        ("GET /boom", "asgi"),
        ("GET /django", "wsgi"),
        ("GET /fastapi/ada", "asgi"),
        ("GET /quart/ada", "asgi"),
        ("GET /starlette", "asgi"),
    ]
    by_name = {s["name"]: ends[span_id] for span_id, s in starts.items()}
    assert by_name["GET /boom"]["exception.type"] == "ValueError"
    assert by_name["GET /fastapi/ada"]["http.route"] == "/fastapi/{name}"
    assert by_name["GET /starlette"]["http.response.body.size"] == len("from starlette")
