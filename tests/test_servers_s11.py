"""``hopscope run -- uwsgi ...``: uWSGI, the C server that embeds Python.

Why: uWSGI is a common production WSGI server, and it is unlike the Python ones: its
master process loads the app and forks workers (or each worker loads it with
``--lazy-apps``), it sends files with its own ``wsgi.file_wrapper``, and its embedded
interpreter runs application threads only when threads are enabled.  The bootstrap
wraps the app through Flask's ``__call__`` there too; these tests check that every
worker's requests are recorded with the worker's pid, and that what the client gets is
byte for byte what bare uWSGI sends.  (uWSGI has no request hooks hopscope could use for a
server span: requests there have their app span, as under waitress.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from test_run import BIN, Run, _check_traces, _free_port, _requests
from test_servers_more_s11 import _same_as_bare

pytestmark = pytest.mark.timeout(120)


def _uwsgi() -> str:
    path = shutil.which("uwsgi", path=BIN)
    if path is None:  # pragma: no cover - the dev extras install it
        pytest.skip("uwsgi is not installed")
    return path


def _command(port: int, *extra: str) -> list[str]:
    return [
        _uwsgi(), "--http", f"127.0.0.1:{port}", "--module", "app:app", "--master",
        "--die-on-term", "--disable-logging", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("lazy", [False, True], ids=["preforked", "lazy-apps"])
def test_uwsgi_workers_are_each_traced(
    lazy: bool, flask_project: Path, runs: Callable[..., Run]
) -> None:
    port = _free_port()
    extra = ["--processes", "2", *(["--lazy-apps"] if lazy else [])]
    run = runs(flask_project, "--", *_command(port, *extra))
    base = f"http://127.0.0.1:{port}"
    run.wait_serving(base)
    pids = _requests(base, workers=2)
    assert len(set(pids.values())) == 2, pids
    # The master loads the app and forks (or each worker loads it): either way the
    # events come from the worker that answered, not from the master.
    assert run.proc.pid not in pids.values()
    traces = _check_traces(run, pids, server=False, statuses=(0, -signal.SIGINT, 1, 30))
    assert {t.route for t in traces if t.route} == {"/pid"}
    assert all(t.root is not None and t.root.attrs.get("interface") == "wsgi" for t in traces)


def test_uwsgi_answers_byte_for_byte_as_bare(tmp_path: Path, runs: Callable[..., Run]) -> None:
    file = _same_as_bare(tmp_path, runs, _command)
    assert file["wsgi.file_wrapper"] is True  # uWSGI's own: sendfile


GEVENT_LATE = """
import json, sys, threading
import hopscope.tracing.wsgi  # imported before gevent patches threading, as an app may
from gevent import monkey
monkey.patch_all()
import gevent
from gevent.pywsgi import WSGIServer
from hopscope.tracing import MemorySink, wrap

def app(environ, start_response):
    gevent.sleep(0.3)  # both requests run at once, each in its greenlet
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(threading.get_ident()).encode()]

sink = MemorySink()
server = WSGIServer(("127.0.0.1", 0), wrap(app, sink=sink), log=None)
server.start()
import urllib.request
def get():
    return urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/").read().decode()
jobs = [gevent.spawn(get) for _ in range(2)]
gevent.joinall(jobs, timeout=10)
server.stop()
answered = [int(job.value) for job in jobs]
recorded = [t.root.attrs["thread.id"] for t in sink.traces()]
print(json.dumps({"answered": answered, "recorded": recorded}))
"""


def test_gevent_greenlets_keep_their_own_thread_id(tmp_path: Path) -> None:
    """``wrap(app)`` under gevent's own server, hopscope imported before gevent patched
    threading.  Each request is a greenlet: its app span's ``thread.id`` is the one the
    app sees (the middleware's lookup was bound at import: two concurrent requests showed
    one OS thread).  And the app's list comes out whole: gevent goes through a list
    twice (it adds up its length first), and the wrapped list could be gone through once
    (the body came out empty)."""
    pytest.importorskip("gevent")
    script = tmp_path / "late.py"
    script.write_text(GEVENT_LATE)
    out = subprocess.run(
        [os.path.join(BIN, "python"), str(script)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(set(seen["answered"])) == 2, seen
    assert sorted(seen["recorded"]) == sorted(seen["answered"]), seen
