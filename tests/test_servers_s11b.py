"""``hopscope run -- COMMAND``: mod_wsgi's server hop, and uWSGI's apps of no framework.

Why: under mod_wsgi-express a request was recorded with its app span only, though Apache
and mod_wsgi ran it well before the app: mod_wsgi stamps the environ with when Apache took
the request (``mod_wsgi.request_start``) and, in daemon mode, when it began handing it to
a daemon process (``mod_wsgi.queue_start``) and when one took it
(``mod_wsgi.daemon_start``).  mod_wsgi 6.1 sets them as floats of seconds, as checked
with a real ``mod_wsgi-express`` (4 and 5 set strings of microseconds).  Requests there now
get a ``server`` span from Apache's taking the request to the response's end, with the
app span inside it and the wait for a daemon process as a ``queue`` span.

And under uWSGI a WSGI app of no framework (``def application(environ, start_response)``)
was not recorded at all, without a word: uWSGI takes the callable from C, past every
hook.  ``--module app:application`` imports the module through Python's import system,
where the bootstrap's hook now replaces the callable by the middleware once the module
has run.  ``--wsgi-file`` compiles and runs the file from C and looks the callable up at
once: the module's return is hooked (a trace function, on only while it runs).  When
uWSGI took the callable before hopscope was installed (a file that imports nothing),
hopscope says so in one line, with what to do.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from test_run import Run, _check_traces, _free_port, _requests
from test_servers_more_s11 import MODES, _express, _plain_project
from test_servers_s11 import _uwsgi

pytestmark = pytest.mark.timeout(120)


def _queued_request(base: str, n: int) -> int:
    """One request that a web server in front stamped 50 ms ago (``X-Request-Start``,
    microseconds as Apache's ``%t``): returns the pid that answered."""
    stamp = time.time_ns() // 1000 - 50_000
    response = httpx.get(
        f"{base}/pid?n={n}",
        headers={"connection": "close", "x-request-start": f"t={stamp}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return int(response.json()["pid"])


@pytest.mark.parametrize("mode", ["daemon", "embedded"])
def test_mod_wsgi_requests_get_their_server_hop(
    mode: str, tmp_path: Path, short_dir: Path, runs: Callable[..., Run]
) -> None:
    """Each request: one server span (Apache's part, from mod_wsgi's stamps) around its
    app span, recorded by the process that ran the app; in daemon mode the wait for the
    daemon process is a queue span inside the server span; a wait in front of Apache
    (``X-Request-Start``) is a queue span before it.  Before: no server span at all."""
    project = _plain_project(tmp_path)
    port = _free_port()
    run = runs(project, "--", *_express(short_dir, port, *MODES[mode]))
    base = f"http://127.0.0.1:{port}"
    run.wait_serving(base)
    pids = _requests(base)
    pids[len(pids)] = _queued_request(base, len(pids))
    traces = _check_traces(run, pids, server=True)
    fronted = 0
    for trace in traces:
        (app,) = [s for s in trace.by_hop("app") if "interface" in s.attrs]
        (server,) = [s for s in trace.by_hop("server") if s.attrs.get("span.kind") != "queue"]
        assert server.attrs["server.software"] == "mod_wsgi"
        assert server.attrs["http.response.status_code"] == 200
        assert server.attrs["url.path"] == "/pid"
        assert server.start is not None and server.end is not None
        assert app.start is not None and app.end is not None
        # Apache took the request before the app ran, and the response ended after it.
        assert server.start <= app.start and app.end <= server.end
        queues = [s for s in trace.by_hop("server") if s.attrs.get("span.kind") == "queue"]
        inside = [q for q in queues if q.parent_id == server.span_id]
        before = [q for q in queues if q.parent_id != server.span_id]
        if mode == "daemon":
            (queue,) = inside
            assert queue.start is not None and queue.end is not None
            assert server.start <= queue.start <= queue.end <= app.start
        else:  # no daemon process to wait for
            assert not inside
        if "n=4" in str(app.attrs.get("url.query")):
            (front,) = before
            assert front.end == server.start
            fronted += 1
        else:
            assert not before
    assert fronted == 1


# -- uWSGI: a WSGI app of no framework ----------------------------------------------------


def _uwsgi_command(port: int, *load: str) -> list[str]:
    return [
        _uwsgi(), "--http", f"127.0.0.1:{port}", *load, "--master", "--die-on-term",
        "--disable-logging",
    ]  # fmt: skip


UWSGI_LOADS = {
    "module": ["--module", "app:application"],
    "module-callable": ["-w", "app", "--callable", "app"],
    "lazy-apps-2-processes": ["--module", "app:application", "--lazy-apps", "--processes", "2"],
    "wsgi-file": ["--wsgi-file", "app.py"],
    "wsgi-file-2-processes": ["--wsgi-file", "app.py", "--processes", "2"],
    "wsgi-file-lazy-apps": ["--wsgi-file", "app.py", "--lazy-apps", "--processes", "2"],
}


@pytest.mark.parametrize("load", list(UWSGI_LOADS))
def test_uwsgi_plain_wsgi_app_is_traced(
    load: str, tmp_path: Path, runs: Callable[..., Run]
) -> None:
    """Before: "stopped after 0 request(s)", nothing recorded, nothing said."""
    project = _plain_project(tmp_path)
    port = _free_port()
    run = runs(project, "--", *_uwsgi_command(port, *UWSGI_LOADS[load]))
    base = f"http://127.0.0.1:{port}"
    run.wait_serving(base)
    workers = 2 if "--processes" in UWSGI_LOADS[load] else 1
    pids = _requests(base, workers=workers)
    assert len(set(pids.values())) == workers, pids
    traces = _check_traces(run, pids, server=False, statuses=(0, -signal.SIGINT, 1, 30))
    assert all(t.root is not None and t.root.attrs.get("interface") == "wsgi" for t in traces)
    assert "hopscope: uWSGI" not in run.err


#: A ``--wsgi-file`` that imports nothing: uWSGI runs it and takes its callable before
#: any import could install hopscope in the process.
NO_IMPORTS = """
def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"plain"]
"""


def test_uwsgi_wsgi_file_taken_before_hopscope_says_so(
    tmp_path: Path, runs: Callable[..., Run]
) -> None:
    """When uWSGI took the callable before hopscope was installed (a file that imports
    nothing), nothing can reach it any more: said once, in one line, with the way out,
    and the app is served as it would be."""
    (tmp_path / "bare.py").write_text(NO_IMPORTS)
    port = _free_port()
    run = runs(tmp_path, "--", *_uwsgi_command(port, "--wsgi-file", "bare.py", "--processes", "2"))
    base = f"http://127.0.0.1:{port}"
    run.wait_serving(base)
    for _ in range(3):
        assert httpx.get(base, headers={"connection": "close"}, timeout=10).text == "plain"
    run.wait_for(lambda: "hopscope: uWSGI" in run.err, "the line about --wsgi-file")
    run.stop()
    lines = [line for line in run.err.splitlines() if line.startswith("hopscope: uWSGI")]
    assert len(lines) == 1, run.err
    assert lines[0].startswith("hopscope: uWSGI took the app of --wsgi-file from C")
    assert "--module MODULE:CALLABLE" in lines[0]
    assert "application = hopscope.tracing.wrap(application)" in lines[0]
    assert "Traceback" not in run.err


def test_uwsgi_framework_app_module_is_left_as_it_is(
    flask_project: Path, runs: Callable[..., Run]
) -> None:
    """A Flask app uWSGI loads by ``--module``: recorded once (through Flask's patch),
    the module's ``app`` still the Flask object (the hook wraps only plain apps)."""
    (flask_project / "check.py").write_text(
        "import app\nimport flask\nassert isinstance(app.app, flask.Flask), app.app\n"
    )
    port = _free_port()
    load = ["--module", "app:app", "--import", "check"]
    run = runs(flask_project, "--", *_uwsgi_command(port, *load))
    base = f"http://127.0.0.1:{port}"
    run.wait_serving(base)
    traces = _check_traces(run, _requests(base), server=False, statuses=(0, -signal.SIGINT, 1, 30))
    assert {t.route for t in traces if t.route} == {"/pid"}
    assert "AssertionError" not in run.err
