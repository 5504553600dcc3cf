"""``hopscope run`` the way users start their servers: what test_run.py does not cover.

Same rules as there: the ``hopscope`` command as a process, real servers on 127.0.0.1,
stopped with Ctrl+C (SIGINT).  A module that sleeps on import stands for an app that is
still loading: it writes a marker first, so the test knows when to press Ctrl+C.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from hopscope.tracing.wrap import is_traced, wrap
from test_run import (
    DJANGO_FILES,
    FLASK_APP,
    HOPSCOPE,
    STARLETTE_APP,
    URL,
    Run,
    _check_traces,
    _env,
    _free_port,
    _get,
    _project,
    _requests,
)

#: Writes its marker, then takes long to import: Ctrl+C comes while it loads.
SLOW_IMPORT = """
import pathlib, time
pathlib.Path("loading").write_text("yes")
time.sleep(60)

async def app(scope, receive, send):
    pass
"""


def _loading(tmp_path: Path) -> Path:
    (tmp_path / "slowapp.py").write_text(SLOW_IMPORT)
    return tmp_path / "loading"


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            return [int(child) for child in children.read().split()]
    except OSError:
        return []


def _answers_from_another(base: str, pid: int) -> bool:
    """Whether a process other than ``pid`` answers now: a probe without a number, which
    _check_traces skips."""
    try:
        answer = httpx.get(f"{base}/pid", headers={"connection": "close"}, timeout=5)
    except httpx.HTTPError:
        return False
    return answer.status_code == 200 and answer.json()["pid"] != pid


def test_an_empty_pythonpath_entry_still_means_the_current_directory(tmp_path: Path) -> None:
    """``PYTHONPATH=$PYTHONPATH:/x`` made while it was unset starts with an empty entry,
    which Python reads as the current directory: the command must still import from it."""
    (tmp_path / "mymodule.py").write_text("VALUE = 'from the current directory'\n")
    elsewhere = tmp_path / "scripts"
    elsewhere.mkdir()
    (elsewhere / "script.py").write_text("import mymodule\nprint(mymodule.VALUE)\n")
    env = _env(PYTHONPATH=os.pathsep + str(tmp_path / "nowhere"))
    plain = subprocess.run(
        [sys.executable, str(elsewhere / "script.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert plain.stdout.strip() == "from the current directory", plain.stderr
    result = subprocess.run(
        [*HOPSCOPE, "--headless", "--", sys.executable, str(elsewhere / "script.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "from the current directory"


@pytest.mark.parametrize("command", ["./no-such-script", "./not-executable.txt", ""])
def test_a_command_path_that_cannot_run_is_one_line(tmp_path: Path, command: str) -> None:
    (tmp_path / "not-executable.txt").write_text("")
    result = subprocess.run(
        [*HOPSCOPE, "--headless", "--", command],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode in (126, 127)
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert (command or "command not found: ''") in result.stderr
    assert "Traceback" not in result.stderr


def test_ctrl_c_while_the_target_loads_is_quiet(tmp_path: Path, runs: Callable[..., Run]) -> None:
    loading = _loading(tmp_path)
    run = runs(tmp_path, "--headless", "--no-proxy", "--port", "0", "slowapp:app")
    run.wait_for(loading.exists, "the app to start loading")
    assert run.stop() == 128 + signal.SIGINT
    assert "Traceback" not in run.err and "KeyboardInterrupt" not in run.err, run.err
    assert "exited with status" not in run.err  # stopped, not failed


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_ctrl_c_while_the_server_loads_the_app_is_not_a_load_failure(
    tmp_path: Path, runs: Callable[..., Run], server: str
) -> None:
    loading = _loading(tmp_path)
    port = str(_free_port())
    if server == "uvicorn":
        command = ["uvicorn", "slowapp:app", "--port", port]
    else:  # gunicorn's worker loads it; the master tells it to quit
        command = ["gunicorn", "-b", f"127.0.0.1:{port}", "slowapp:app"]
    run = runs(tmp_path, "--headless", "--", *command)
    run.wait_for(loading.exists, "the app to start loading")
    run.stop()
    assert "could not load" not in run.err, run.err


def test_the_command_reads_hopscopes_stdin(tmp_path: Path) -> None:
    """A ``breakpoint()`` in the app reads the terminal: the command keeps stdin."""
    result = subprocess.run(
        [*HOPSCOPE, "--headless", "--", sys.executable, "-c", "print('got', input())"],
        cwd=tmp_path, env=_env(), input="a line\n", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "got a line"


def test_the_target_reads_hopscopes_stdin(tmp_path: Path) -> None:
    (tmp_path / "stdinapp.py").write_text(
        textwrap.dedent(
            """
            from starlette.applications import Starlette
            from starlette.responses import PlainTextResponse
            from starlette.routing import Route

            LINE = input()

            async def line(request):
                return PlainTextResponse(LINE)

            app = Starlette(routes=[Route("/pid", line)])
            """
        )
    )
    line = tmp_path / "line.txt"
    line.write_text("a line\n")
    err_path = tmp_path / "err.txt"
    with open(line, "rb") as stdin, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [*HOPSCOPE, "--headless", "--no-proxy", "--port", "0", "stdinapp:app"],
            cwd=tmp_path, env=_env(), stdin=stdin, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (match := URL.search(err_path.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, err_path.read_text()
            time.sleep(0.05)
        assert httpx.get(f"{match.group(1)}/pid", timeout=10).text == "a line"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


@pytest.mark.parametrize("framework", ["starlette", "flask"])
def test_the_app_itself_given_as_a_factory_is_one_line(tmp_path: Path, framework: str) -> None:
    source = STARLETTE_APP if framework == "starlette" else FLASK_APP
    _project(tmp_path, source)
    result = subprocess.run(
        [*HOPSCOPE, "--headless", "--no-proxy", "--port", "0", "--factory", "app:app"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "app:app takes arguments, so it cannot be an app factory" in result.stderr
    assert "Traceback" not in result.stderr


FLASK_WRAPPED_INSIDE = f"""{FLASK_APP}
from hopscope.tracing import wrap

app.wsgi_app = wrap(app.wsgi_app)  # Flask's way to add WSGI middleware
"""
STARLETTE_WRAPPED_INSIDE = f"""{STARLETTE_APP}
from hopscope.tracing import wrap
from starlette.middleware.gzip import GZipMiddleware

app = GZipMiddleware(wrap(app))
"""


@pytest.mark.parametrize(
    ("source", "command", "server"),
    [
        (FLASK_WRAPPED_INSIDE, ["flask", "--app", "app", "run", "--port", "{port}"], False),
        (FLASK_WRAPPED_INSIDE, [], True),  # hopscope run app:app
        (STARLETTE_WRAPPED_INSIDE, ["uvicorn", "app:app", "--port", "{port}"], True),
    ],
    ids=["flask-run", "target", "uvicorn"],
)
def test_an_app_wrapped_inside_by_the_user_is_recorded_once(
    tmp_path: Path, runs: Callable[..., Run], source: str, command: list[str], server: bool
) -> None:
    _project(tmp_path, source)
    if command:
        port = str(_free_port())
        run = runs(tmp_path, "--headless", "--", *[a.replace("{port}", port) for a in command])
        base = f"http://127.0.0.1:{port}"
        run.wait_serving(base)
    else:
        run = runs(tmp_path, "--headless", "--no-proxy", "--port", "0", "app:app")
        base = run.url()
    _check_traces(run, _requests(base, count=2), server=server)  # one app span each


def test_is_traced_follows_only_what_every_request_goes_through() -> None:
    def app(environ: Any, start_response: Any) -> Any:
        return []

    class Middleware:
        def __init__(self, app: Any) -> None:
            self.app = app

    class Loud:
        """An app whose attributes must not be computed just to look inside it."""

        @property
        def app(self) -> Any:
            raise AssertionError("a property ran")

        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"__getattr__ ran for {name}")

    class StaticFiles:  # Django's static files handler serves some requests itself
        def __init__(self, application: Any) -> None:
            self.application = application

    assert is_traced(wrap(app)) and is_traced(Middleware(Middleware(wrap(app))))
    assert not is_traced(app) and not is_traced(Middleware(app)) and not is_traced(Loud())
    assert not is_traced(StaticFiles(wrap(app)))
    looped = Middleware(app)
    looped.app = looped
    assert not is_traced(looped)


def test_headless_run_does_not_import_the_ui() -> None:
    """The UI (textual) is most of the start-up's imports, and ``--headless`` never uses it."""
    code = "import sys, hopscope.app.run; print('textual' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "False", result.stderr


def test_uvicorn_reload_wraps_each_new_child_once(tmp_path: Path, runs: Callable[..., Run]) -> None:
    """The reloader's child serves, wrapped once: and so is the child after a reload."""
    _project(tmp_path, STARLETTE_APP)
    port = str(_free_port())
    run = runs(tmp_path, "--headless", "--", "uvicorn", "app:app", "--reload", "--port", port)
    base = f"http://127.0.0.1:{port}"
    run.wait_serving(base)
    pids = {0: _get(base, 0)["pid"]}
    assert pids[0] != run.proc.pid and pids[0] not in _children(run.proc.pid)  # not the reloader

    def reloaded() -> bool:
        # Saved again until uvicorn reloads: its watcher can start after the first child
        # answers, and an edit made before then goes unseen (on a loaded machine).
        if _answers_from_another(base, pids[0]):
            return True
        with open(tmp_path / "app.py", "a") as source:
            source.write("\n# edited\n")
        time.sleep(3)
        return _answers_from_another(base, pids[0])

    run.wait_for(reloaded, "the reloaded child", timeout=60)
    pids[1] = _get(base, 1)["pid"]
    assert pids[1] != pids[0]
    _check_traces(run, pids, server=True)


def test_django_runservers_reloader_child_is_traced_once(
    tmp_path: Path, runs: Callable[..., Run]
) -> None:
    """``runserver`` serves from a child its autoreloader starts (test_run: --noreload)."""
    for name, source in DJANGO_FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(source))
    port = str(_free_port())
    run = runs(tmp_path, "--headless", "--", sys.executable, "manage.py", "runserver", port)
    base = f"http://127.0.0.1:{port}"
    run.wait_serving(base)
    pids = _requests(base, count=2)
    assert set(pids.values()).isdisjoint([run.proc.pid, *_children(run.proc.pid)])
    _check_traces(run, pids, server=False)


def test_the_target_gunicorn_leaves_the_users_control_socket_alone(
    tmp_path: Path, runs: Callable[..., Run]
) -> None:
    """gunicorn >= 25.1 opens ~/.gunicorn/gunicorn.ctl, replacing the socket of a gunicorn
    the user runs (and removing it at exit): hopscope's own server is no one's to manage."""
    home = tmp_path / "home"
    home.mkdir()
    _project(tmp_path, FLASK_APP)
    env = _env(HOME=str(home))
    env.pop("XDG_RUNTIME_DIR", None)
    run = runs(tmp_path, "--headless", "--no-proxy", "--port", "0", "app:app", env=env)
    _check_traces(run, _requests(run.url(), count=1), server=True)
    assert not (home / ".gunicorn").exists()


def test_gunicorn_preload_keeps_the_server_hop_and_the_users_hooks_after_a_reload(
    tmp_path: Path, runs: Callable[..., Run]
) -> None:
    """SIGHUP to the master (a graceful reload) reads the config anew, without the hooks
    hopscope added; with --preload the app is not loaded again to add them."""
    _project(tmp_path, FLASK_APP)
    (tmp_path / "gunicorn.conf.py").write_text(
        textwrap.dedent(
            """
            import os

            preload_app = True

            def pre_request(worker, req):
                with open("hooks.log", "a") as log:
                    log.write(f"pre {os.getpid()}\\n")

            def post_request(worker, req, environ, resp):
                with open("hooks.log", "a") as log:
                    log.write(f"post {os.getpid()} {resp.status_code}\\n")
            """
        )
    )
    port = str(_free_port())
    run = runs(tmp_path, "--headless", "--", "gunicorn", "-b", f"127.0.0.1:{port}", "app:app")
    base = f"http://127.0.0.1:{port}"
    run.wait_serving(base)
    pids = {0: _get(base, 0)["pid"]}
    (master,) = _children(run.proc.pid)
    os.kill(master, signal.SIGHUP)
    run.wait_for(lambda: _answers_from_another(base, pids[0]), "a new worker")
    pids[1] = _get(base, 1)["pid"]
    _check_traces(run, pids, server=True)
    hooks = (tmp_path / "hooks.log").read_text().split("\n")
    for pid in pids.values():  # the user's hooks ran too, before and after the reload
        assert f"pre {pid}" in hooks and f"post {pid} 200" in hooks
