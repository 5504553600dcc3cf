"""What session 10's run of Werkzeug's and Django's own suites through ``hopscope run --``
found (``bench/framework_suites.py werkzeug django``).

Werkzeug's ``dev_server`` tests start ``run_simple`` in subprocesses: with no framework
around a plain Werkzeug app, nothing of hopscope's reached those requests until
``run_simple`` became a server wrap point.  Each test runs a real server under the
bootstrap, as ``hopscope run -- python app.py`` does.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from djangotools import DJANGO_CLIENT_PROJECT
from hopscope.app.run import BOOTSTRAP_DIR

pytest.importorskip("werkzeug")

WERKZEUG_APP = """
import sys

from werkzeug.serving import run_simple
from werkzeug.wrappers import Request, Response


@Request.application
def app(request):
    if request.path == "/boom":
        raise ValueError("boom")
    return Response(iter([b"hello ", b"werkzeug"]), content_type="text/plain")


# Keywords, as Werkzeug's own live apps call it; the debugger wraps the app.
run_simple(hostname="127.0.0.1", port=int(sys.argv[1]), application=app, use_debugger=True)
"""

FLASK_APP = """
import json
import os
import sys
import threading
import time
import urllib.request

from flask import Flask
from hopscope.tracing import inject

app = Flask(__name__)


@app.get("/")
def index():
    return "hello flask"


port = int(sys.argv[1])
# app.run() hands run_simple the app positionally.
threading.Thread(target=app.run, kwargs={"host": "127.0.0.1", "port": port}, daemon=True).start()
deadline = time.monotonic() + 20
while True:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            live = response.read()
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
# The server closes the response (the span's end) just after the client has it all.
trace = os.environ["HOPSCOPE_SINK"].removeprefix("file:")
while '"span_end"' not in open(trace).read() and time.monotonic() < deadline:
    time.sleep(0.05)
with app.test_client().get("/") as response:  # its close ends the span
    tested = response.data
print(json.dumps([live.decode(), tested.decode(), inject._served]))
"""


DJANGO_CLIENT = (
    """
import json

import django
from django.conf import settings
from django.http import HttpResponse, StreamingHttpResponse
from django.test import Client
from django.urls import path


def stream(request):
    return StreamingHttpResponse(iter([b"one ", b"two"]))
"""
    + DJANGO_CLIENT_PROJECT
    + """client = Client()
posted = client.post("/hello/ada", b"ada", content_type="text/plain")
streamed = client.get("/stream")
try:
    client.get("/boom")
    raised = None
except ValueError as exc:
    raised = str(exc)
print(json.dumps([
    posted.status_code,
    posted.content.decode(),
    posted.cookies["seen"].value,
    posted.wsgi_request.path,
    b"".join(streamed.streaming_content).decode(),
    raised,
]))
"""
)


def _env(trace: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(BOOTSTRAP_DIR), HOPSCOPE_SINK=f"file:{trace}")


def _spans(trace: Path) -> dict[str, dict[str, Any]]:
    """span id -> its start event, with its end's attributes under ``end``."""
    if not trace.is_file():
        return {}
    spans: dict[str, dict[str, Any]] = {}
    for line in trace.read_text().splitlines()[1:]:
        try:
            event = json.loads(line)
        except ValueError:  # a line still being written
            continue
        if event.get("kind") == "span_start" and event.get("hop") == "app":
            spans[event["span_id"]] = dict(event, end=None)
        elif event.get("kind") == "span_end" and event.get("span_id") in spans:
            spans[event["span_id"]]["end"] = event["attrs"]
    return spans


def _run_script(
    tmp_path: Path, name: str, source: str, *args: str
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run ``source`` as ``name`` under the bootstrap, to its (successful) end: what it
    did and its trace."""
    script = tmp_path / name
    script.write_text(textwrap.dedent(source))
    trace = tmp_path / "trace.jsonl"
    done = subprocess.run(
        [sys.executable, str(script), *args],
        cwd=tmp_path,
        env=_env(trace),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done, trace


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"the server did not listen on {port} (exit status {proc.poll()})")


@pytest.fixture
def werkzeug_server(
    tmp_path: Path,
    free_port: Callable[[], int],
    processes: Callable[..., subprocess.Popen[bytes]],
) -> Iterator[tuple[str, Path]]:
    """A plain Werkzeug app under ``run_simple``, started with hopscope's bootstrap:
    (its URL, its trace file)."""
    script = tmp_path / "werkzeug_app.py"
    script.write_text(textwrap.dedent(WERKZEUG_APP))
    trace = tmp_path / "trace.jsonl"
    port = free_port()
    proc = processes(
        [sys.executable, str(script), str(port)], tmp_path / "err", cwd=tmp_path, env=_env(trace)
    )
    _wait_listening(port, proc)
    yield f"http://127.0.0.1:{port}", trace


def test_werkzeug_run_simple_is_traced_when_injected(werkzeug_server: tuple[str, Path]) -> None:
    """``hopscope run -- python app.py`` on a plain Werkzeug app: ``run_simple`` (called
    with keywords, as Werkzeug's live apps do) wraps the app inside its debugger, so each
    request is recorded once with the app's own exception, and the client gets the same
    bytes and the debugger's 500 as bare."""
    url, trace = werkzeug_server
    assert _get(url + "/") == (200, b"hello werkzeug")
    status, body = _get(url + "/boom")
    assert status == 500
    assert b"ValueError" in body  # the debugger's page: it still sees the exception
    deadline = time.monotonic() + 10
    spans = _spans(trace)
    while time.monotonic() < deadline and (
        len(spans) < 2 or any(s["end"] is None for s in spans.values())
    ):
        time.sleep(0.05)
        spans = _spans(trace)
    by_name = {s["name"]: s for s in spans.values()}
    assert sorted(by_name) == ["GET /", "GET /boom"], spans
    assert len(spans) == 2
    assert by_name["GET /"]["attrs"]["interface"] == "wsgi"
    assert by_name["GET /"]["end"]["http.response.body.size"] == len(b"hello werkzeug")
    assert by_name["GET /boom"]["end"]["exception.type"] == "ValueError"


def test_flask_app_run_records_each_request_once(
    tmp_path: Path, free_port: Callable[[], int]
) -> None:
    """Flask's ``app.run()`` ends in ``run_simple`` (the app handed positionally), where
    ``Flask.__call__``'s patch also records: a live request is recorded once, not twice,
    and starting the server leaves the process's test client traced too."""
    done, trace = _run_script(tmp_path, "flask_app.py", FLASK_APP, str(free_port()))
    # (Flask prints its banner first.)
    assert json.loads(done.stdout.splitlines()[-1]) == ["hello flask", "hello flask", False]
    spans = _spans(trace)
    assert [s["name"] for s in spans.values()] == ["GET /", "GET /"], spans
    assert all(s["end"]["http.response.body.size"] == len("hello flask") for s in spans.values())


def test_django_test_client_requests_are_recorded(tmp_path: Path) -> None:
    """Under ``hopscope run -- python manage.py test`` (or pytest), Django's test
    ``Client`` calls its ``ClientHandler``, not ``WSGIHandler``: each of its requests is
    recorded with its route, body sizes and status, and the test sees the same response
    object, cookies, streamed content and exception as bare."""
    pytest.importorskip("django")
    done, trace = _run_script(tmp_path, "django_client.py", DJANGO_CLIENT)
    assert json.loads(done.stdout) == [200, "hello ada", "yes", "/hello/ada", "one two", "boom"]
    ends = {s["name"]: s["end"] for s in _spans(trace).values()}
    assert sorted(ends) == ["GET /boom", "GET /stream", "POST /hello/ada"], ends
    posted = ends["POST /hello/ada"]
    assert posted["http.route"] == "/hello/<name>"
    assert posted["http.request.body.size"] == 3
    assert posted["http.response.body.size"] == len("hello ada")
    assert any(name == "Set-Cookie" for name, _ in posted["http.response.headers"])
    assert ends["GET /stream"]["http.response.status_code"] == 200
    assert ends["GET /boom"]["http.response.status_code"] == 500
