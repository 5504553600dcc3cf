"""A real Apache httpd (mod_proxy) in front: the other web server the brief names.

Apache stamps ``X-Request-Start: t=<microseconds>`` (``RequestHeader set X-Request-Start
"%t"``), which must become the queue span beside gunicorn's server span, whether the app
is wrapped in code or served by ``hopscope run`` (whose own proxy then sits between Apache
and the app server and must pass the stamp on).  Apache runs in the foreground from a
config written here, on a free loopback port, and is stopped at the end of each test.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hopscope.tracing import load
from hopscope.tracing.model import Trace
from test_run import Run, _env, _free_port

APACHE = shutil.which("apache2") or shutil.which("httpd")
_MODULE_DIRS = ("/usr/lib/apache2/modules", "/usr/lib64/httpd/modules")
MODULES = next((path for path in _MODULE_DIRS if os.path.isdir(path)), None)
pytestmark = pytest.mark.skipif(
    APACHE is None or MODULES is None, reason="Apache httpd is not installed (.ci/run installs it)"
)

APP = """
from hopscope.tracing import span, wrap

def app(environ, start_response):
    with span("work"):
        stamp = environ.get("HTTP_X_REQUEST_START", "none")
        size = len(environ["wsgi.input"].read())
    start_response("200 OK", [("content-type", "text/plain"), ("x-read", str(size))])
    return [stamp.encode()]

app = wrap(app)
"""


def _config(directory: Path, port: int, upstream: int) -> Path:
    modules = ["mpm_event", "authz_core", "headers", "proxy", "proxy_http"]
    lines = [f"LoadModule {name}_module {MODULES}/mod_{name}.so" for name in modules]
    conf = directory / "httpd.conf"
    conf.write_text(
        "\n".join(lines)
        + textwrap.dedent(
            f"""
            ServerRoot {directory}
            Listen 127.0.0.1:{port}
            ServerName 127.0.0.1
            PidFile {directory}/httpd.pid
            ErrorLog {directory}/error.log
            DefaultRuntimeDir {directory}
            Mutex file:{directory} default
            User nobody
            Group nogroup
            RequestHeader set X-Request-Start "%t"
            ProxyPass "/" "http://127.0.0.1:{upstream}/"
            """
        )
    )
    return conf


def _wait_up(url: str, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with status {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"{what} did not answer at {url}")


@pytest.fixture
def apache(tmp_path: Path) -> Iterator[tuple[int, int, Path]]:
    """(Apache's port, the port it proxies to, its directory): Apache running."""
    directory = tmp_path / "apache"
    directory.mkdir()
    directory.chmod(0o777)  # its workers run as nobody and take their mutex here
    port, upstream = _free_port(), _free_port()
    assert APACHE is not None
    proc = subprocess.Popen(
        [APACHE, "-f", str(_config(directory, port, upstream)), "-DFOREGROUND"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield port, upstream, directory
    finally:
        proc.send_signal(signal.SIGTERM)  # Apache's "stop now"
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:  # pragma: no cover - do not leave it behind
            proc.kill()
            proc.wait(10)


def _queue_under_server(trace: Trace) -> None:
    spans = trace.spans.values()
    (queue,) = [s for s in spans if s.attrs.get("span.kind") == "queue"]
    (server,) = [s for s in spans if s.hop == "server" and s is not queue]
    # Apache's stamp (microseconds) is before the server picked the request up.
    assert queue.end == server.start
    assert queue.start is not None and queue.start <= queue.end
    assert (queue.duration_ns or 0) < 5 * 10**9
    (app,) = [s for s in spans if s.hop == "app" and s.attrs.get("interface") == "wsgi"]
    assert app.parent_id == server.span_id
    assert [s.name for s in trace.children(app)] == ["work"]


def test_apache_in_front_of_gunicorn_gives_the_queue_span(
    apache: tuple[int, int, Path], tmp_path: Path
) -> None:
    port, upstream, _ = apache
    (tmp_path / "hop_apache_app.py").write_text(APP)
    trace_file = tmp_path / "trace.jsonl"
    command = [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{upstream}", "-w", "1"]
    command += ["-c", "python:hopscope.tracing.servers.gunicorn_conf", "hop_apache_app:app"]
    gunicorn = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=_env(HOPSCOPE_SINK=f"file:{trace_file}"),
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_up(f"http://127.0.0.1:{port}/probe", gunicorn, "gunicorn behind Apache")
        for n in range(3):
            response = httpx.get(f"http://127.0.0.1:{port}/req/{n}", timeout=5)
            # The app saw Apache's stamp, in Apache's own format.
            assert response.status_code == 200 and response.text.startswith("t=")
    finally:
        gunicorn.send_signal(signal.SIGTERM)
        gunicorn.wait(20)
    traces = [t for t in load(trace_file) if (t.path or "").startswith("/req/")]
    assert len(traces) == 3
    for trace in traces:
        _queue_under_server(trace)


def test_apache_in_front_of_hopscope_run(apache: tuple[int, int, Path], tmp_path: Path) -> None:
    """Apache -> hopscope's proxy -> gunicorn -> the app: one trace per request with the
    proxy, queue, server and app hops, and a POST body passed through whole."""
    port, upstream, _ = apache
    (tmp_path / "hop_apache_app.py").write_text(APP)
    run = Run(["--headless", "--port", str(upstream), "hop_apache_app:app"], tmp_path, _env())
    try:
        _wait_up(f"http://127.0.0.1:{port}/probe", run.proc, "hopscope run behind Apache")
        for n in range(3):
            response = httpx.get(f"http://127.0.0.1:{port}/req/{n}", timeout=5)
            assert response.status_code == 200 and response.text.startswith("t=")
        body = os.urandom(300_000)
        response = httpx.post(f"http://127.0.0.1:{port}/req/upload", content=body, timeout=10)
        assert response.status_code == 200 and response.headers["x-read"] == str(len(body))
    finally:
        assert run.stop() == 0, run.err
    traces = [t for t in load(run.trace) if (t.path or "").startswith("/req/")]
    assert sorted(t.path for t in traces) == ["/req/0", "/req/1", "/req/2", "/req/upload"]
    for trace in traces:
        assert {s.hop for s in trace.spans.values()} >= {"client", "proxy", "server", "app"}
        _queue_under_server(trace)
    (upload,) = [t for t in traces if t.path == "/req/upload"]
    (proxy,) = [s for s in upload.spans.values() if s.hop == "proxy"]
    assert proxy.attrs.get("http.request.body.size") == len(body)
    (app,) = [s for s in upload.spans.values() if s.attrs.get("interface") == "wsgi"]
    assert app.attrs.get("http.request.body.size") == len(body)
