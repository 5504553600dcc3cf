"""A real nginx in front of gunicorn: nginx's X-Request-Start becomes the queue span."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from hopscope.tracing import load

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (.ci/run installs it)"
)


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_up(url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not come up")


def test_nginx_queue_time_and_app_spans_in_one_trace(tmp_path: Path) -> None:
    (tmp_path / "hop_nginx_app.py").write_text(
        textwrap.dedent(
            """
            import time
            from hopscope.tracing import span, wrap

            def app(environ, start_response):
                with span("work"):
                    time.sleep(0.002)
                start_response("200 OK", [("content-type", "text/plain")])
                return [b"behind nginx"]

            app = wrap(app)
            """
        )
    )
    app_port, nginx_port = _port(), _port()
    trace_file = tmp_path / "trace.jsonl"
    (tmp_path / "logs").mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        textwrap.dedent(
            f"""
            daemon off;
            worker_processes 1;
            pid {tmp_path}/nginx.pid;
            error_log {tmp_path}/logs/error.log;
            events {{ worker_connections 64; }}
            http {{
                access_log off;
                client_body_temp_path {tmp_path}/body;
                proxy_temp_path {tmp_path}/proxy;
                fastcgi_temp_path {tmp_path}/fastcgi;
                uwsgi_temp_path {tmp_path}/uwsgi;
                scgi_temp_path {tmp_path}/scgi;
                server {{
                    listen 127.0.0.1:{nginx_port};
                    location / {{
                        proxy_set_header X-Request-Start "t=${{msec}}";
                        proxy_pass http://127.0.0.1:{app_port};
                    }}
                }}
            }}
            """
        )
    )
    env = {**os.environ, "HOPSCOPE_SINK": f"file:{trace_file}"}
    command = [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{app_port}", "-w", "1"]
    command += ["-c", "python:hopscope.tracing.servers.gunicorn_conf", "hop_nginx_app:app"]
    gunicorn = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        stderr=subprocess.DEVNULL,
    )
    assert NGINX is not None
    nginx = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(tmp_path)], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        _wait_up(f"http://127.0.0.1:{app_port}/probe", deadline)
        _wait_up(f"http://127.0.0.1:{nginx_port}/probe", deadline)
        for n in range(5):
            response = httpx.get(f"http://127.0.0.1:{nginx_port}/req/{n}", timeout=5)
            assert response.status_code == 200 and response.text == "behind nginx"
    finally:
        nginx.send_signal(signal.SIGQUIT)
        gunicorn.send_signal(signal.SIGTERM)
        nginx.wait(20)
        gunicorn.wait(20)
    traces = [t for t in load(trace_file) if (t.path or "").startswith("/req/")]
    assert len(traces) == 5
    for trace in traces:
        (queue,) = [s for s in trace.spans.values() if s.attrs.get("span.kind") == "queue"]
        server = trace.root
        assert server is not None and server.hop == "server"
        # nginx's stamp (milliseconds) is before the server picked the request up.
        assert queue.end == server.start
        assert queue.start is not None and queue.end is not None and queue.start <= queue.end
        assert (queue.duration_ns or 0) < 5 * 10**9
        (app,) = [s for s in trace.by_hop("app") if s.attrs.get("interface") == "wsgi"]
        assert app.parent_id == server.span_id
        assert [s.name for s in trace.children(app)] == ["work"]
