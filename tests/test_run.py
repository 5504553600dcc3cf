"""``hopscope run``: real servers on 127.0.0.1, started the way a user starts them.

Every test runs the ``hopscope`` command as a process, sends real requests, stops it as
a user would (Ctrl+C is SIGINT) and reads back the ``-o`` trace file.  The user's
projects are generated in tmp dirs with modules named ``app.py`` and ``tracing.py``, the
names most likely to collide with hopscope's own packages.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from hopscope.app.run import BOOTSTRAP_DIR as BOOTSTRAP
from hopscope.tracing import Span, Trace, load
from hopscope.tracing.inject import PATCHES

BIN = os.path.dirname(sys.executable)
HOPSCOPE = [sys.executable, "-m", "hopscope.app", "run"]
MARK = "the user's own tracing.py"
URL = re.compile(r"open (http://127\.0\.0\.1:\d+)")
LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} GET /pid ", re.M)

TRACING_PY = f"MARK = {MARK!r}\n"

STARLETTE_APP = """
import os
import time

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

import tracing


async def pid(request):
    if "slow" in request.query_params:
        time.sleep(0.4)  # blocks the worker, so the next connection goes to another
    return JSONResponse({"pid": os.getpid(), "mark": tracing.MARK})


app = Starlette(routes=[Route("/pid", pid)])


def create_app():
    return Starlette(routes=[Route("/pid", pid)])
"""

FLASK_APP = """
import os
import time

from flask import Flask, request

import tracing

app = Flask(__name__)


@app.get("/pid")
def pid():
    if "slow" in request.args:
        time.sleep(0.4)
    return {"pid": os.getpid(), "mark": tracing.MARK}
"""

QUART_APP = """
import os
import time

from quart import Quart, request

import tracing

app = Quart(__name__)


@app.get("/pid")
async def pid():
    if "slow" in request.args:
        time.sleep(0.4)
    return {"pid": os.getpid(), "mark": tracing.MARK}
"""


# -- helpers ------------------------------------------------------------------------------


def _project(root: Path, app_source: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "app.py").write_text(textwrap.dedent(app_source))
    (root / "tracing.py").write_text(TRACING_PY)
    return root


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOPSCOPE_")}
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


class Run:
    """A ``hopscope run`` process, its output in files."""

    def __init__(
        self, args: list[str], cwd: Path, env: dict[str, str] | None = None, save: bool = True
    ) -> None:
        self.trace = cwd / f"trace-{time.monotonic_ns()}.jsonl"
        self.out_path = cwd / f"out-{time.monotonic_ns()}.txt"
        self.err_path = cwd / f"err-{time.monotonic_ns()}.txt"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [*HOPSCOPE, *(["-o", str(self.trace)] if save else []), *args],
                cwd=cwd,
                env=env or _env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )

    @property
    def out(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def err(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_for(
        self,
        predicate: Callable[[], Any],
        what: str,
        timeout: float = 30,
        *,
        again: Callable[[], object] | None = None,
        pause: float = 0.05,
    ) -> Any:
        """Poll ``predicate`` (each ``pause`` s) until it is true; returns it.  Fails when
        hopscope exits first or after ``timeout`` s.  ``again`` is called each 5 s with
        no result: a file save that watching may have missed, made again."""
        deadline = time.monotonic() + timeout
        again_at = time.monotonic() + 5
        while True:
            result = predicate()
            if result:
                return result
            if self.proc.poll() is not None:
                pytest.fail(f"hopscope exited ({self.proc.returncode}) before {what}:\n{self.err}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}:\n{self.err}")
            if again is not None and time.monotonic() > again_at:
                again()
                again_at = time.monotonic() + 5
            time.sleep(pause)

    def url(self) -> str:
        match = self.wait_for(lambda: URL.search(self.err), "the URL")
        return str(match.group(1))

    def wait_serving(self, base: str) -> None:
        def answers() -> bool:
            try:
                return httpx.get(f"{base}/pid", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        self.wait_for(answers, f"{base} to answer")

    def stop(self, signum: int = signal.SIGINT, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:  # pragma: no cover - a failure: do not leave it
            self.proc.kill()
            self.proc.wait(10)
            pytest.fail(f"hopscope did not stop on signal {signum}:\n{self.err}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _get(base: str, n: int, slow: bool = False) -> dict[str, Any]:
    query = f"n={n}" + ("&slow=1" if slow else "")
    response = httpx.get(f"{base}/pid?{query}", headers={"connection": "close"}, timeout=10)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert body["mark"] == MARK  # the user's tracing.py, not hopscope's
    return body


def _requests(base: str, count: int = 4, workers: int = 1) -> dict[int, int]:
    """Send ``count`` requests; returns n -> pid that answered.  With several workers,
    pairs of slow requests (the second sent while the first blocks its worker) make a
    second worker answer too."""
    pids = {n: _get(base, n)["pid"] for n in range(count)}
    n = count
    for _ in range(6):
        if len(set(pids.values())) >= workers:
            break
        answers: dict[int, int] = {}

        def slow(k: int, answers: dict[int, int] = answers) -> None:
            answers[k] = _get(base, k, True)["pid"]

        first = threading.Thread(target=slow, args=(n,))
        first.start()
        time.sleep(0.15)
        answers[n + 1] = _get(base, n + 1, True)["pid"]
        first.join(10)
        pids.update(answers)
        n += 2
    return pids


def _number(span: Span) -> int | None:
    match = re.search(r"(?:^|&)n=(\d+)", str(span.attrs.get("url.query") or ""))
    return int(match.group(1)) if match else None


def _check_traces(
    run: Run,
    pids: dict[int, int],
    *,
    server: bool,
    software: str | None = None,
    statuses: tuple[int, ...] = (0,),
) -> list[Trace]:
    """Every request has one app span, recorded by the process that answered it, under
    the server span when the server has hooks.  Returns the traces.  ``statuses``: what
    the server itself exits with on Ctrl+C (hopscope run passes its status on)."""
    run.wait_for(lambda: len(LINE.findall(run.out)) >= len(pids), "a tail line per request")
    assert run.stop() in statuses, run.err
    traces = [t for t in load(run.trace) if t.path == "/pid"]
    seen: dict[int, int] = {}
    for trace in traces:
        # The request's own app span (user and background spans are hop "app" too; a
        # loaded machine can make any app return >10 ms after its response).
        apps = [s for s in trace.by_hop("app") if "interface" in s.attrs]
        assert len(apps) == 1, trace.spans
        app = apps[0]
        n = _number(app)
        if n is None:
            continue  # a probe that the server was up
        assert n in pids, app.attrs
        seen[n] = app.attrs["process.pid"]
        if software is not None:
            assert str(app.attrs.get("server.software", "")).startswith(software)
        servers = [s for s in trace.by_hop("server") if s.attrs.get("span.kind") != "queue"]
        if server:
            assert len(servers) == 1, trace.spans
            assert app.parent_id == servers[0].span_id
            assert servers[0].attrs["process.pid"] == app.attrs["process.pid"]
        else:
            assert not servers
    assert seen == pids
    for pid in set(pids.values()):
        assert not _alive(pid), f"worker {pid} outlived hopscope"
    return traces


# -- hopscope run TARGET ------------------------------------------------------------------


def test_target_asgi_behind_the_proxy(starlette_project: Path, runs: Callable[..., Run]) -> None:
    run = runs(starlette_project, "app:app", "--port", "0")
    base = run.url()
    assert "(ASGI, uvicorn)" in run.err and "proxy" in run.err
    pids = _requests(base)
    traces = _check_traces(run, pids, server=True, software="uvicorn")
    for trace in traces:
        (client,) = trace.by_hop("client")
        (proxy,) = trace.by_hop("proxy")
        (server,) = [s for s in trace.by_hop("server") if s.attrs.get("span.kind") != "queue"]
        assert proxy.parent_id == client.span_id and server.parent_id == proxy.span_id
        assert client.attrs["process.pid"] != server.attrs["process.pid"]
    assert "stopped after" in run.err


def test_target_without_a_file_prints_every_hop(
    starlette_project: Path, runs: Callable[..., Run]
) -> None:
    """No -o: the collector hands the tail raw records, the proxy's folded without events."""
    run = runs(starlette_project, "app:app", "--port", "0", save=False)
    base = run.url()
    _get(base, 1)
    lines = run.wait_for(
        lambda: [line for line in run.out.splitlines() if " GET /pid" in line], "a tail line"
    )
    assert all(f" {hop}=" in lines[0] for hop in ("client", "proxy", "server", "app")), lines
    assert run.stop() == 0, run.err
    assert not run.trace.exists() and "Traceback" not in run.err


def test_target_wsgi_under_gunicorn(flask_project: Path, runs: Callable[..., Run]) -> None:
    run = runs(flask_project, "app:app", "--port", "0", "--no-proxy", "--headless")
    base = run.url()
    assert "(WSGI, gunicorn)" in run.err
    pids = _requests(base)
    _check_traces(run, pids, server=True, software="gunicorn")


def test_target_factory_and_app_dir(
    starlette_project: Path, tmp_path: Path, runs: Callable[..., Run]
) -> None:
    run = runs(
        tmp_path,
        "app:create_app",
        "--factory",
        "--app-dir",
        str(starlette_project),
        "--no-proxy",
        "--port",
        "0",
    )
    pids = _requests(run.url(), count=2)
    _check_traces(run, pids, server=True)


def test_target_factory_without_flag_and_missing_module_are_one_line(
    starlette_project: Path,
) -> None:
    for target, fragment in [
        ("app:create_app", "add --factory"),
        ("nosuchmodule:app", "cannot import 'nosuchmodule'"),
        ("app:nothing", "has no attribute 'nothing'"),
    ]:
        result = subprocess.run(
            [*HOPSCOPE, target, "--port", "0", "--no-proxy"],
            cwd=starlette_project,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1, result.stderr
        assert fragment in result.stderr
        assert "Traceback" not in result.stderr
        assert f"hopscope: {target} exited with status 1" in result.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["justamodule"], "module:attribute"),
        (["app:app", "--", "uvicorn", "app:app"], "not both"),
        (["--port", "9", "--", "uvicorn", "app:app"], "--port applies to TARGET"),
        ([], "give TARGET"),
        (["--"], "nothing to run"),
        (["--", "no-such-program-here"], "command not found: no-such-program-here"),
    ],
)
def test_usage_errors_are_one_line(args: list[str], fragment: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [*HOPSCOPE, *args], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode in (2, 127), result.stderr
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr


def test_target_port_in_use(starlette_project: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*HOPSCOPE, "app:app", "--port", str(port), "--no-proxy"],
            cwd=starlette_project,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert "address already in use" in result.stderr and "Traceback" not in result.stderr


# -- hopscope run -- COMMAND --------------------------------------------------------------


def test_uvicorn_with_two_workers(starlette_project: Path, runs: Callable[..., Run]) -> None:
    port = _free_port()
    run = runs(starlette_project, "--", "uvicorn", "app:app", "--port", str(port), "--workers", "2")
    base = f"http://127.0.0.1:{port}"
    run.wait_serving(base)
    pids = _requests(base, workers=2)
    assert len(set(pids.values())) == 2
    _check_traces(run, pids, server=True, software="uvicorn")


def test_gunicorn_sync_with_two_workers(flask_project: Path, runs: Callable[..., Run]) -> None:
    port = _free_port()
    run = runs(flask_project, "--", "gunicorn", "-w", "2", "-b", f"127.0.0.1:{port}", "app:app")
    base = f"http://127.0.0.1:{port}"
    run.wait_serving(base)
    pids = _requests(base, workers=2)
    assert len(set(pids.values())) == 2
    _check_traces(run, pids, server=True, software="gunicorn")


def test_gunicorn_gthread(flask_project: Path, runs: Callable[..., Run]) -> None:
    port = _free_port()
    run = runs(
        flask_project,
        "--",
        "gunicorn",
        "-k",
        "gthread",
        "--threads",
        "4",
        "-w",
        "2",
        "-b",
        f"127.0.0.1:{port}",
        "app:app",
    )
    base = f"http://127.0.0.1:{port}"
    run.wait_serving(base)
    _check_traces(run, _requests(base), server=True, software="gunicorn")


@pytest.mark.parametrize(
    ("worker", "hooks"),
    [
        # The worker's uvicorn records the server hop: gunicorn's hooks never fire there.
        ("uvicorn.workers.UvicornWorker", False),
        # gunicorn's own ASGI worker runs the request hooks: the server span is theirs.
        ("asgi", True),
    ],
)
def test_gunicorn_with_asgi_workers(
    starlette_project: Path, runs: Callable[..., Run], worker: str, hooks: bool
) -> None:
    port = _free_port()
    run = runs(
        starlette_project,
        "--",
        "gunicorn",
        "-k",
        worker,
        "-w",
        "2",
        "-b",
        f"127.0.0.1:{port}",
        "app:app",
    )
    base = f"http://127.0.0.1:{port}"
    run.wait_serving(base)
    pids = _requests(base, workers=2)
    assert len(set(pids.values())) == 2
    traces = _check_traces(run, pids, server=True, software="gunicorn" if hooks else None)
    hooked = {
        s.attrs.get("server.worker.class")
        for t in traces
        for s in t.by_hop("server")
        if s.attrs.get("span.kind") != "queue"
    }
    assert hooked == ({"ASGIWorker"} if hooks else {None})


def test_gunicorn_conf_hooks_are_not_doubled(flask_project: Path, runs: Callable[..., Run]) -> None:
    port = _free_port()
    run = runs(
        flask_project,
        "--",
        "gunicorn",
        "-c",
        "python:hopscope.tracing.servers.gunicorn_conf",
        "-b",
        f"127.0.0.1:{port}",
        "app:app",
    )
    base = f"http://127.0.0.1:{port}"
    run.wait_serving(base)
    # One server span per request (gunicorn_conf's), parent of the WSGI app span.
    _check_traces(run, _requests(base, count=3), server=True)


def test_hypercorn(starlette_project: Path, runs: Callable[..., Run]) -> None:
    port = _free_port()
    run = runs(starlette_project, "--", "hypercorn", "app:app", "--bind", f"127.0.0.1:{port}")
    base = f"http://127.0.0.1:{port}"
    run.wait_serving(base)
    pids = _requests(base)
    # hypercorn serves from a process it spawns: the pid is that worker's.
    assert run.proc.pid not in pids.values()
    _check_traces(run, pids, server=False, software="hypercorn")


@pytest.mark.parametrize(
    "command",
    [
        # Quart's own server: hypercorn's wrap point wraps any ASGI app, Quart's too.
        ["hypercorn", "app:app", "--bind", "127.0.0.1:{port}"],
        # ``quart run`` starts hypercorn from inside Quart (no hypercorn command line).
        ["quart", "--app", "app", "run", "--port", "{port}"],
    ],
    ids=["hypercorn", "quart-run"],
)
def test_quart(command: list[str], quart_project: Path, runs: Callable[..., Run]) -> None:
    port = _free_port()
    run = runs(quart_project, "--", *(part.format(port=port) for part in command))
    base = f"http://127.0.0.1:{port}"
    run.wait_serving(base)
    # On Python 3.13 ``quart run`` itself exits 3 on Ctrl+C, without hopscope too.
    statuses = (0, 3) if command[0] == "quart" and sys.version_info >= (3, 13) else (0,)
    _check_traces(run, _requests(base), server=False, software="hypercorn", statuses=statuses)


def test_flask_run(flask_project: Path, runs: Callable[..., Run]) -> None:
    port = _free_port()
    run = runs(flask_project, "--", "flask", "--app", "app", "run", "--port", str(port))
    base = f"http://127.0.0.1:{port}"
    run.wait_serving(base)
    _check_traces(run, _requests(base), server=False, software="Werkzeug")


DJANGO_FILES = {
    "manage.py": """
        import os
        import sys

        if __name__ == "__main__":
            os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
            from django.core.management import execute_from_command_line

            execute_from_command_line(sys.argv)
    """,
    "mysite/__init__.py": "",
    "mysite/settings.py": """
        SECRET_KEY = "test-only"
        DEBUG = True
        ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
        ROOT_URLCONF = "mysite.urls"
        INSTALLED_APPS = []
        MIDDLEWARE = []
        DATABASES = {}
        USE_TZ = True
        WSGI_APPLICATION = "mysite.wsgi.application"
    """,
    "mysite/urls.py": """
        import os

        from django.http import JsonResponse
        from django.urls import path

        import tracing


        def pid(request):
            return JsonResponse({"pid": os.getpid(), "mark": tracing.MARK})


        urlpatterns = [path("pid", pid)]
    """,
    "mysite/wsgi.py": """
        import os

        from django.core.wsgi import get_wsgi_application

        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
        application = get_wsgi_application()
    """,
    "tracing.py": TRACING_PY,
}


def test_django_runserver(tmp_path: Path, runs: Callable[..., Run]) -> None:
    for name, source in DJANGO_FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(source))
    port = _free_port()
    run = runs(
        tmp_path, "--", sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"
    )
    base = f"http://127.0.0.1:{port}"
    run.wait_serving(base)
    _check_traces(run, _requests(base), server=False)


def test_an_existing_sitecustomize_still_runs_and_the_status_propagates(tmp_path: Path) -> None:
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "sitecustomize.py").write_text(
        "import os\nos.environ['USER_SITECUSTOMIZE'] = 'ran'\n"
    )
    report = tmp_path / "report.json"
    script = textwrap.dedent(
        f"""
        import json, os, sys
        light = "hopscope.tracing" not in sys.modules  # nothing served yet: nothing loaded
        import flask
        inject = sys.modules["hopscope.tracing.inject"]
        json.dump(
            {{
                "user": os.environ.get("USER_SITECUSTOMIZE"),
                "light": light,
                "installed": inject._installed,
                "patched": hasattr(flask.Flask.__call__, "__wrapped__"),
                "path": os.environ["PYTHONPATH"],
                "sink": os.environ.get("HOPSCOPE_SINK"),
            }},
            open({str(report)!r}, "w"),
        )
        sys.exit(7)
        """
    )
    result = subprocess.run(
        [*HOPSCOPE, "--", sys.executable, "-c", script],
        cwd=tmp_path,
        env=_env(PYTHONPATH=str(custom)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 7, result.stderr
    assert "exited with status 7" in result.stderr
    seen = json.loads(report.read_text())
    assert seen["user"] == "ran"  # chained to the user's sitecustomize
    assert seen["light"] is True
    assert seen["installed"] is True and seen["patched"] is True
    entries = seen["path"].split(os.pathsep)
    assert entries[1:] == [str(custom)]  # kept intact for spawned workers, ours first
    assert os.listdir(entries[0]) in (["sitecustomize.py"], ["sitecustomize.py", "__pycache__"])
    assert seen["sink"].startswith("tcp://127.0.0.1:")


def test_the_bootstrap_triggers_on_every_patched_package() -> None:
    spec = importlib.util.spec_from_file_location(
        "hopscope_bootstrap", BOOTSTRAP / "sitecustomize.py"
    )
    assert spec is not None and spec.loader is not None
    bootstrap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bootstrap)  # not named sitecustomize: defines, installs nothing
    assert bootstrap.TRIGGERS == {name.partition(".")[0] for name in PATCHES}


@pytest.mark.parametrize(
    ("command", "fragment"),
    [
        (["uvicorn", "nosuchmodule:app"], "hopscope: uvicorn could not load 'nosuchmodule:app'"),
        (["gunicorn", "nosuchmodule:app"], "hopscope: gunicorn could not load 'nosuchmodule:app'"),
    ],
)
def test_an_unimportable_app_fails_on_the_servers_terms(
    command: list[str], fragment: str, tmp_path: Path
) -> None:
    port = _free_port()
    bind = ["--port", str(port)] if command[0] == "uvicorn" else ["-b", f"127.0.0.1:{port}"]
    result = subprocess.run(
        [*HOPSCOPE, "--", *command, *bind],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert fragment in result.stderr
    assert f"exited with status {result.returncode}" in result.stderr


IGNORE_SIGINT_AND_SPAWN = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
open(sys.argv[2], "w").write(f"{os.getpid()} {child.pid}")
if sys.argv[3] == "stay":
    time.sleep(60)
"""
CHILD = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)"


def test_a_second_ctrl_c_kills_the_whole_group(tmp_path: Path, runs: Callable[..., Run]) -> None:
    pid_file = tmp_path / "pids"
    argv = [sys.executable, "-c", IGNORE_SIGINT_AND_SPAWN, CHILD, str(pid_file), "stay"]
    run = runs(tmp_path, "--", *argv)
    text = run.wait_for(lambda: pid_file.exists() and pid_file.read_text(), "the pids")
    leader, child = map(int, text.split())
    run.proc.send_signal(signal.SIGINT)  # passed on to the leader, which ignores it
    time.sleep(0.3)
    assert run.proc.poll() is None and _alive(leader) and _alive(child)
    assert run.stop(signal.SIGINT) == 128 + signal.SIGKILL
    assert not _alive(leader) and not _alive(child)


def test_what_the_command_leaves_behind_is_stopped(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    argv = [sys.executable, "-c", IGNORE_SIGINT_AND_SPAWN, CHILD, str(pid_file), "leave"]
    result = subprocess.run(
        [*HOPSCOPE, "--", *argv], cwd=tmp_path, env=_env(), capture_output=True, timeout=60
    )
    assert result.returncode == 0
    leader, child = map(int, pid_file.read_text().split())
    assert not _alive(leader) and not _alive(child)
