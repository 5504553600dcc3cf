"""``hopscope run -- COMMAND`` with the other production WSGI servers.

Why: beside gunicorn and uWSGI, the WSGI servers a user is most likely to deploy are
Apache httpd with mod_wsgi (``mod_wsgi-express``: a C server that embeds Python, in
daemon processes of its own or in Apache's children), waitress (threads) and cheroot
(CherryPy's server, threads).  These tests check, as a user would see it, that every
request is recorded by the process that answered it, that concurrent requests on threads
are not mixed, and that what the client gets is byte for byte what the bare server sends
(a streamed body, a file sent with the server's own ``wsgi.file_wrapper``, a 300 KB POST,
a 500, a 404).

A Flask app was recorded under all three through the framework patch (``Flask.__call__``),
but a WSGI app of no framework (mod_wsgi's own ``application`` example) not at all, without
a word: each server's wrap point is now hooked (waitress ``create_server``, cheroot's WSGI
``Server``, mod_wsgi-express's ``ApplicationHandler``), which the ``plain`` tests pin.
mod_wsgi-express runs in a user namespace where root is ``www-data`` (:func:`_user_namespace`).
"""

from __future__ import annotations

import base64
import functools
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from hopscope.tracing import load
from hopscope.tracing.model import Span, Trace
from servers import interrupt
from test_run import BIN, FLASK_APP, Run, _check_traces, _env, _free_port, _project, _requests

pytestmark = pytest.mark.timeout(120)

APP = """
import os
import threading
import time

from flask import Flask, Response, request, send_file

app = Flask(__name__)
HERE = os.path.dirname(os.path.abspath(__file__))


@app.get("/stream")
def stream():
    count = int(request.args.get("n", "3"))
    return Response((f"chunk {i}\\n".encode() * 100 for i in range(count)), mimetype="text/plain")


@app.get("/file")
def file():
    return send_file(os.path.join(HERE, "blob.bin"), mimetype="application/octet-stream")


@app.post("/echo")
def echo():
    return request.get_data()


@app.get("/boom")
def boom():
    raise RuntimeError("boom under a WSGI server")


arrived = 0
together = threading.Condition()


@app.get("/slow")
def slow():
    # Held until ``together`` requests are in: they are served side by side, or not at all.
    global arrived
    with together:
        arrived += 1
        together.notify_all()
        together.wait_for(lambda: arrived >= int(request.args["together"]), timeout=10)
    return {"n": request.args["n"], "pid": os.getpid(), "thread": threading.get_ident()}
"""

WSGI_SCRIPT = "from app import app as application\n"

#: A WSGI app of no framework: no framework patch reaches it, only the server's wrap point.
PLAIN_APP = """
import json
import os
import time

import tracing


def application(environ, start_response):
    if "slow" in environ.get("QUERY_STRING", ""):
        time.sleep(0.4)
    body = json.dumps({"pid": os.getpid(), "mark": tracing.MARK}).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    start_response("200 OK", headers)
    return [body]


app = application
"""

#: A plain app served from a script of the user's, through waitress's and cheroot's APIs.
SERVE_WAITRESS = """
import sys

from waitress import serve

from app import application

serve(application, listen=f"127.0.0.1:{sys.argv[1]}", threads=4)
"""

SERVE_CHEROOT = """
import sys

from cheroot import wsgi

from app import application

server = wsgi.Server(("127.0.0.1", int(sys.argv[1])), application, numthreads=4)
try:
    server.start()
except KeyboardInterrupt:
    server.stop()
"""


# -- mod_wsgi-express ---------------------------------------------------------------------


def _mod_wsgi_express() -> str:
    path = shutil.which("mod_wsgi-express", path=BIN)
    if path is None:
        pytest.skip("mod_wsgi is not installed (pip install mod_wsgi: needs apache2-dev)")
    return path


@functools.cache
def _user_namespace() -> list[str]:
    """What runs a command as a user, not root: Apache refuses to serve as root, and as
    ``www-data`` it could not read a Python installed under root's home (``/root`` is
    ``0700`` here, as pyenv installs it).  A user namespace where this root is ``www-data``
    is what a user has: a non-root server that can read its own Python and project."""
    if os.geteuid() != 0:
        return []
    unshare = shutil.which("unshare")
    command = [unshare or "unshare", "--user", "--map-user=33", "--map-group=33"]
    try:
        probe = subprocess.run([*command, "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return command if probe.returncode == 0 else []


def _express(root: Path, port: int, *extra: str, entry: str = "app.wsgi") -> list[str]:
    """``mod_wsgi-express start-server app.wsgi`` in the foreground, as a user runs it
    (``entry``: the script, or the module with ``--application-type module``)."""
    express = _mod_wsgi_express()
    if shutil.which("apache2") is None and shutil.which("httpd") is None:
        pytest.skip("Apache httpd is not installed")
    namespace = _user_namespace()
    if os.geteuid() == 0 and not namespace:
        pytest.skip("Apache refuses to serve as root, and no user namespace could be made")
    return [
        *namespace, express, "start-server", entry, "--host", "127.0.0.1",
        "--port", str(port), "--server-root", str(root), *extra,
    ]  # fmt: skip


# -- what every server is checked for -----------------------------------------------------

Exchange = tuple[int, list[tuple[str, str]], bytes]


def _exchanges(base: str) -> list[Exchange]:
    """What a client gets from the app: status, headers but Date, body bytes."""
    got = []
    # A connection a request: uWSGI's HTTP router closes each one after its response.
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=base, timeout=10, limits=limits) as client:
        for method, path, body in (
            ("GET", "/stream?n=50", None),
            ("GET", "/file", None),
            ("POST", "/echo", b"x" * 300_000),
            ("GET", "/boom", None),
            ("GET", "/nothing", None),
        ):
            response = client.request(method, path, content=body)
            headers = [(k, v) for k, v in response.headers.multi_items() if k != "date"]
            got.append((response.status_code, headers, response.content))
    return got


def _serving(base: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the server exited"
        try:
            httpx.get(base + "/nothing", timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError("the server did not answer")


def _bare(cwd: Path, command: list[str], base: str) -> list[Exchange]:
    """What the server sends without hopscope: stopped as a user stops it (Ctrl+C)."""
    proc = subprocess.Popen(
        command, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _serving(base, proc)
        return _exchanges(base)
    finally:
        interrupt(proc, 20)


def _same_as_bare(
    tmp_path: Path, runs: Callable[..., Run], command: Callable[[int], list[str]]
) -> dict[str, object]:
    """The server answers byte for byte as bare under ``hopscope run``, and each request
    is recorded as it was answered.  Returns the ``/file`` span's attributes."""
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "app.wsgi").write_text(WSGI_SCRIPT)
    (tmp_path / "blob.bin").write_bytes(os.urandom(200_000))
    port = _free_port()
    expected = _bare(tmp_path, command(port), f"http://127.0.0.1:{port}")
    port = _free_port()
    run = runs(tmp_path, "--", *command(port))
    _serving(f"http://127.0.0.1:{port}", run.proc)
    assert _exchanges(f"http://127.0.0.1:{port}") == expected
    paths = {"/stream", "/file", "/echo", "/boom", "/nothing"}
    run.wait_for(lambda: all(f" {p}" in run.out for p in paths), "a tail line per request")
    run.stop()
    traces = {t.path: t for t in load(run.trace) if t.path in paths}
    assert set(traces) == paths
    streamed = sum(len(f"chunk {i}\n") * 100 for i in range(50))
    assert len(expected[0][2]) == streamed
    assert expected[1][0] == 200 and len(expected[1][2]) == 200_000
    assert expected[2][2] == b"x" * 300_000
    assert expected[3][0] == 500
    # The request's app span (under mod_wsgi's server span there: not the trace's root).
    roots = {path: _app_span(trace) for path, trace in traces.items()}
    assert all(root is not None for root in roots.values())
    assert roots["/stream"].attrs["http.response.body.size"] == streamed  # type: ignore[union-attr]
    assert roots["/echo"].attrs["http.request.body.size"] == 300_000  # type: ignore[union-attr]
    assert traces["/boom"].status == 500 and traces["/boom"].error
    assert traces["/nothing"].status == 404
    return dict(roots["/file"].attrs)  # type: ignore[union-attr]


def _app_span(trace: Trace) -> Span | None:
    apps = [s for s in trace.by_hop("app") if "interface" in s.attrs]
    return apps[0] if len(apps) == 1 else None


Answer = tuple[int, int, bytes]


def _concurrent(base: str, count: int = 6) -> dict[int, Answer]:
    """``count`` requests at once, each held by the app until all are in: n -> (pid,
    thread) that answered, as the app said it, and the body the client got."""
    answers: dict[int, Answer] = {}

    def one(n: int) -> None:
        query = f"n={n}&together={count}&pad={'x' * n}"
        response = httpx.get(f"{base}/slow?{query}", timeout=20)
        body = response.json()
        assert body["n"] == str(n)
        answers[n] = (body["pid"], body["thread"], response.content)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert set(answers) == set(range(count))
    return answers


def _check_concurrent(run: Run, answers: dict[int, Answer]) -> None:
    """Each concurrent request has its own trace, its span recorded by the thread that
    answered it, with its own query and its own response; and they did overlap."""
    run.wait_for(lambda: run.out.count(" GET /slow ") >= len(answers), "a tail line per request")
    run.stop()
    spans = {}
    for trace in load(run.trace):
        if trace.path != "/slow":
            continue
        (span,) = [s for s in trace.spans.values() if "interface" in s.attrs]
        n = int(str(span.attrs["url.query"]).split("&")[0].removeprefix("n="))
        assert n not in spans
        spans[n] = span
    assert set(spans) == set(answers)
    for n, span in spans.items():
        pid, thread, body = answers[n]
        assert (span.attrs["process.pid"], span.attrs["thread.id"]) == (pid, thread)
        assert span.attrs["url.query"] == f"n={n}&together={len(answers)}&pad={'x' * n}"
        assert span.attrs["http.response.status_code"] == 200
        assert span.attrs["http.response.body.size"] == len(body)
        assert base64.b64decode(span.attrs["http.response.body"]) == body
    # Served side by side, each on a thread of its own: the first to end ended after the
    # last began (the app held each until all were in).
    assert min(s.end or 0 for s in spans.values()) > max(s.start or 0 for s in spans.values())
    assert len({thread for _, thread, _ in answers.values()}) == len(answers)


# -- mod_wsgi-express ---------------------------------------------------------------------

MODES = {
    "daemon": [],
    "daemon-2-processes": ["--processes", "2"],
    "embedded": ["--embedded-mode"],
    "embedded-2-processes": ["--embedded-mode", "--processes", "2"],
}


@pytest.mark.parametrize("mode", list(MODES))
def test_mod_wsgi_processes_are_each_traced(
    mode: str, tmp_path: Path, short_dir: Path, runs: Callable[..., Run]
) -> None:
    project = _project(tmp_path, FLASK_APP)
    (project / "app.wsgi").write_text(WSGI_SCRIPT)
    port = _free_port()
    run = runs(project, "--", *_express(short_dir, port, *MODES[mode]))
    base = f"http://127.0.0.1:{port}"
    run.wait_serving(base)
    workers = 2 if "--processes" in MODES[mode] else 1
    pids = _requests(base, workers=workers)
    assert len(set(pids.values())) == workers, pids
    # Apache's parent loads no app: the process that answered records each request.
    assert run.proc.pid not in pids.values()
    traces = _check_traces(run, pids, server=True)  # (mod_wsgi's hop: test_servers_s11b)
    assert {t.route for t in traces if t.route} == {"/pid"}
    for trace in traces:
        app = _app_span(trace)
        assert app is not None and app.attrs.get("interface") == "wsgi"
        assert app.attrs.get("server.software") == "Apache"


@pytest.mark.parametrize("mode", ["daemon", "embedded"])
def test_mod_wsgi_answers_byte_for_byte_as_bare(
    mode: str, tmp_path: Path, short_dir: Path, runs: Callable[..., Run]
) -> None:
    attrs = _same_as_bare(
        tmp_path, runs, lambda port: _express(short_dir / str(port), port, *MODES[mode])
    )
    assert attrs["wsgi.file_wrapper"] is True  # mod_wsgi's own: it sends the file itself


def test_mod_wsgi_threads_keep_requests_apart(
    tmp_path: Path, short_dir: Path, runs: Callable[..., Run]
) -> None:
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "app.wsgi").write_text(WSGI_SCRIPT)
    port = _free_port()
    run = runs(tmp_path, "--", *_express(short_dir, port, "--threads", "8"))
    base = f"http://127.0.0.1:{port}"
    _serving(base, run.proc)
    _check_concurrent(run, _concurrent(base))


# -- waitress and cheroot -----------------------------------------------------------------


def _waitress(port: int) -> list[str]:
    pytest.importorskip("waitress")
    return [
        os.path.join(BIN, "waitress-serve"), f"--listen=127.0.0.1:{port}", "--threads=8",
        "app:app",
    ]  # fmt: skip


def _cheroot(port: int) -> list[str]:
    # (``cheroot app:app`` imports the app before it puts the folder on sys.path: the
    # module form finds it, as a user finds out.)
    pytest.importorskip("cheroot")
    return [
        sys.executable,
        "-m",
        "cheroot",
        "--bind",
        f"127.0.0.1:{port}",
        "--threads",
        "8",
        "app:app",
    ]


SERVERS = {"waitress": _waitress, "cheroot": _cheroot}


@pytest.mark.parametrize("server", list(SERVERS))
def test_threaded_server_is_traced(
    server: str, flask_project: Path, runs: Callable[..., Run]
) -> None:
    port = _free_port()
    run = runs(flask_project, "--", *SERVERS[server](port))
    base = f"http://127.0.0.1:{port}"
    run.wait_serving(base)
    pids = _requests(base)
    # (cheroot dies of the KeyboardInterrupt it reports: 130, as bare.)
    traces = _check_traces(run, pids, server=False, statuses=(0, 130))
    assert {t.route for t in traces if t.route} == {"/pid"}
    assert all(t.root is not None and t.root.attrs.get("interface") == "wsgi" for t in traces)


@pytest.mark.parametrize("server", list(SERVERS))
def test_threaded_server_answers_byte_for_byte_as_bare(
    server: str, tmp_path: Path, runs: Callable[..., Run]
) -> None:
    attrs = _same_as_bare(tmp_path, runs, SERVERS[server])
    # waitress's own file wrapper, handed back for waitress to send; cheroot has none.
    assert attrs.get("wsgi.file_wrapper", False) is (server == "waitress")


@pytest.mark.parametrize("server", list(SERVERS))
def test_threaded_server_keeps_requests_apart(
    server: str, tmp_path: Path, runs: Callable[..., Run]
) -> None:
    (tmp_path / "app.py").write_text(APP)
    port = _free_port()
    run = runs(tmp_path, "--", *SERVERS[server](port))
    base = f"http://127.0.0.1:{port}"
    _serving(base, run.proc)
    _check_concurrent(run, _concurrent(base))


# -- a WSGI app of no framework -----------------------------------------------------------


def _plain_project(root: Path) -> Path:
    project = _project(root, PLAIN_APP)
    (project / "app.wsgi").write_text("from app import application\n")
    (project / "serve_waitress.py").write_text(SERVE_WAITRESS)
    (project / "serve_cheroot.py").write_text(SERVE_CHEROOT)
    return project


def _script(module: str, script: str) -> Callable[[int], list[str]]:
    """``python SCRIPT PORT``: a script of the user's that serves with ``module``."""

    def command(port: int) -> list[str]:
        pytest.importorskip(module)
        return [sys.executable, script, str(port)]

    return command


PLAIN = {
    "waitress-serve": _waitress,
    "waitress.serve": _script("waitress", "serve_waitress.py"),
    "cheroot": _cheroot,
    "cheroot.wsgi.Server": _script("cheroot", "serve_cheroot.py"),
}


@pytest.mark.parametrize("server", list(PLAIN))
def test_plain_wsgi_app_is_traced(server: str, tmp_path: Path, runs: Callable[..., Run]) -> None:
    """Only the server's wrap point reaches an app of no framework: before it, these
    servers served it untraced without a word ("stopped after 0 request(s)")."""
    project = _plain_project(tmp_path)
    port = _free_port()
    run = runs(project, "--", *PLAIN[server](port))
    base = f"http://127.0.0.1:{port}"
    run.wait_serving(base)
    traces = _check_traces(run, _requests(base), server=False, statuses=(0, 130))
    assert all(t.root is not None and t.root.attrs.get("interface") == "wsgi" for t in traces)


@pytest.mark.parametrize("mode", ["daemon", "embedded", "module"])
def test_mod_wsgi_plain_wsgi_app_is_traced(
    mode: str, tmp_path: Path, short_dir: Path, runs: Callable[..., Run]
) -> None:
    """The ``application`` function of mod_wsgi's own examples, in a ``.wsgi`` script (or
    a module, ``--application-type module``)."""
    project = _plain_project(tmp_path)
    port = _free_port()
    if mode == "module":
        command = _express(short_dir, port, "--application-type", "module", entry="app")
    else:
        command = _express(short_dir, port, *MODES[mode])
    run = runs(project, "--", *command)
    base = f"http://127.0.0.1:{port}"
    run.wait_serving(base)
    traces = _check_traces(run, _requests(base), server=True)
    assert all((a := _app_span(t)) is not None and a.attrs["interface"] == "wsgi" for t in traces)


@pytest.mark.parametrize("server", ["waitress-serve", "cheroot"])
def test_an_app_wrapped_in_code_is_recorded_once(
    server: str, tmp_path: Path, runs: Callable[..., Run]
) -> None:
    project = _plain_project(tmp_path)
    with open(project / "app.py", "a") as source:
        source.write("\nfrom hopscope.tracing import wrap\n\napp = wrap(application)\n")
    port = _free_port()
    run = runs(project, "--", *PLAIN[server](port))
    base = f"http://127.0.0.1:{port}"
    run.wait_serving(base)
    _check_traces(run, _requests(base), server=False, statuses=(0, 130))  # one app span each
