"""``hopscope run TARGET --reload``: real ``hopscope run --headless`` processes on
127.0.0.1, the app's file edited as a user edits it.

A reload stops the app's process and starts a new one on the listening socket hopscope
holds, behind the same proxy: the next response is the new code's, its trace comes on
the same port, and what arrives during the restart waits in the backlog instead of
being refused.  File watching on a loaded machine can be slow: the helpers poll with
generous bounds and save the file again when no reload came, as a user would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from hopscope.app.run import build_run_target_app
from hopscope.app.ui import Session
from hopscope.tracing import load
from hopscope.tui.app import HopscopeApp
from test_commands_ui import drive, started  # noqa: F401 (started: a fixture, used)
from test_run import HOPSCOPE, Run, _alive, _env
from test_run_user import _children
from textual.pilot import Pilot
from uitools import answered_after_saves

ASGI_APP = """
import os

VERSION = {version!r}


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = f"{{VERSION}} {{os.getpid()}}".encode()
    await send({{"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]}})
    await send({{"type": "http.response.body", "body": body}})
"""

WSGI_APP = """
import os

VERSION = {version!r}


def app(environ, start_response):
    start_response("200 OK", [("content-type", "text/plain")])
    return [f"{{VERSION}} {{os.getpid()}}".encode()]
"""

BROKEN = "\ndef broken(:\n"


def _write(path: Path, source: str, version: str) -> None:
    """The app at ``version`` (each version a different length: a same-size edit within
    the second of a cached ``.pyc`` could load the stale bytecode)."""
    path.write_text(textwrap.dedent(source.format(version=version)))


def _project(root: Path, source: str) -> Path:
    root.mkdir()
    _write(root / "app.py", source, "one")
    return root


def _answer(base: str) -> tuple[str, int]:
    response = httpx.get(base + "/", timeout=30)
    assert response.status_code == 200, response.text
    version, pid = response.text.split()
    return version, int(pid)


def _until(run: Run, check: Callable[[], object], what: str, save: Callable[[], None]) -> object:
    """Poll ``check`` until it is true; returns it.  No change seen within a few
    seconds: ``save`` again (watching may have missed the first save)."""
    return run.wait_for(check, what, 45, again=save, pause=0.1)


def _until_version(run: Run, base: str, version: str, save: Callable[[], None]) -> int:
    """Save ``version``, then ask until it answers; returns the pid that did (a 502
    meanwhile: the last save did not load, and no app serves until this one does)."""
    save()

    def answered() -> int | None:
        response = httpx.get(base + "/", timeout=30)
        if response.status_code == 502 and "waiting for a change" in response.text:
            return None
        assert response.status_code == 200, response.text
        seen, pid = response.text.split()
        return int(pid) if seen == version else None

    return int(str(_until(run, answered, f"{version} to answer", save)))


def _start(runs: Callable[..., Run], project: Path, *args: str) -> tuple[Run, str]:
    run = runs(project, "app:app", "--port", "0", "--headless", "--reload", *args)
    base = run.url()
    assert "reloading on changes in ." in run.err
    return run, base


@pytest.mark.parametrize(
    ("source", "server"), [(ASGI_APP, "uvicorn"), (WSGI_APP, "gunicorn")], ids=["asgi", "wsgi"]
)
def test_an_edit_serves_the_new_code_behind_the_same_proxy(
    tmp_path: Path, runs: Callable[..., Run], source: str, server: str
) -> None:
    project = _project(tmp_path / "project", source)
    run, base = _start(runs, project)
    assert f"({'ASGI' if server == 'uvicorn' else 'WSGI'}, {server})" in run.err
    version, first = _answer(base)
    assert version == "one"

    second = _until_version(run, base, "two!", lambda: _write(project / "app.py", source, "two!"))
    assert second != first
    run.wait_for(lambda: not _alive(first), "the first app process to end")
    assert "hopscope: reloading: app.py changed" in run.err
    assert "Traceback" not in run.err

    assert run.stop() == 0, run.err
    assert not _alive(second), "the reloaded app outlived hopscope"
    pids = {
        span.attrs["process.pid"]
        for trace in load(run.trace)
        for span in trace.by_hop("app")
        if "interface" in span.attrs
    }
    assert {first, second} <= pids
    lines = [line for line in run.out.splitlines() if " GET / 200 " in line]
    assert len(lines) >= 2 and all(" proxy=" in line for line in lines), run.out


def test_a_syntax_error_is_one_line_and_the_next_save_recovers(
    tmp_path: Path, runs: Callable[..., Run]
) -> None:
    project = _project(tmp_path / "project", ASGI_APP)
    app = project / "app.py"
    run, base = _start(runs, project)
    _, first = _answer(base)

    def break_it() -> None:
        _write(app, ASGI_APP, "broken")
        with app.open("a") as file:
            file.write(BROKEN)

    break_it()
    _until(run, lambda: "cannot load" in run.err, "the load failure", break_it)
    failures = [line for line in run.err.splitlines() if "cannot load" in line]
    assert failures[0].startswith("hopscope: cannot load app:app: app.py:"), run.err
    assert "SyntaxError" in failures[0] and "waiting for a change" in failures[0]
    assert "Traceback" not in run.err and "SyntaxError" not in run.err.replace(failures[0], "")
    assert run.proc.poll() is None and not _alive(first)

    third = _until_version(run, base, "three", lambda: _write(app, ASGI_APP, "three"))
    assert "hopscope: serving app:app again" in run.err
    assert run.stop() == 0, run.err
    assert not _alive(third)


@pytest.mark.parametrize("source", [ASGI_APP, WSGI_APP], ids=["asgi", "wsgi"])
def test_requests_during_a_reload_wait_and_are_all_answered(
    tmp_path: Path, runs: Callable[..., Run], source: str
) -> None:
    """New connections and kept-alive ones, sent back to back through the proxy while
    the app is reloaded twice: none refused or dropped, each answered (late at most)."""
    project = _project(tmp_path / "project", source)
    run, base = _start(runs, project)
    done = threading.Event()
    answers: list[str] = []
    failures: list[str] = []

    def send(keep_alive: bool) -> None:
        headers = {} if keep_alive else {"connection": "close"}
        with httpx.Client(timeout=30, headers=headers) as client:
            while not done.is_set():
                try:
                    response = client.get(base + "/")
                except httpx.HTTPError as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                if response.status_code != 200:
                    failures.append(f"{response.status_code}: {response.text}")
                else:
                    answers.append(response.text.split()[0])

    kinds = (True, False, True, False, False)
    senders = [threading.Thread(target=send, args=(k,)) for k in kinds]
    for sender in senders:
        sender.start()
    try:
        run.wait_for(lambda: "one" in answers, "answers")
        for version in ("two!", "three"):
            save = lambda v=version: _write(project / "app.py", source, v)  # noqa: E731
            _until_version(run, base, version, save)
        count = len(answers)
        run.wait_for(lambda: len(answers) > count + 10, "answers after the reloads")
    finally:
        done.set()
        for sender in senders:
            sender.join(60)
    assert not failures, failures[:5]
    assert {"one", "two!", "three"} <= set(answers)
    assert run.stop() == 0, run.err


@pytest.mark.parametrize("option", [["--reload"], ["--reload-dir", "."]])
def test_reload_with_a_command_is_refused_in_one_line(tmp_path: Path, option: list[str]) -> None:
    done = subprocess.run(
        [*HOPSCOPE, "--headless", *option, "--", sys.executable, "-m", "uvicorn", "app:app"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert option[0] in lines[0] and "pass it to your server instead" in lines[0]


def test_reload_dir_must_exist_and_go_with_reload(tmp_path: Path) -> None:
    def hopscope(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [*HOPSCOPE, "--headless", "app:app", "--port", "0", *args]
        return subprocess.run(
            argv, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=30
        )

    missing = hopscope("--reload", "--reload-dir", "nowhere")
    assert missing.returncode == 2
    assert missing.stderr.strip() == "Error: --reload-dir nowhere: no such directory"
    alone = hopscope("--reload-dir", ".")
    assert alone.returncode == 2 and "--reload-dir applies with --reload" in alone.stderr


def test_ctrl_c_while_the_app_cannot_load_stops_hopscope(
    tmp_path: Path, runs: Callable[..., Run]
) -> None:
    """Nothing runs but hopscope (the app failed after a change): Ctrl+C ends it, 0."""
    project = _project(tmp_path / "project", WSGI_APP)
    run, base = _start(runs, project, "--no-proxy")
    _, first = _answer(base)

    def save() -> None:
        (project / "app.py").write_text("raise RuntimeError('no config')\n")

    save()
    _until(run, lambda: "cannot load" in run.err, "the load failure", save)
    assert "app.py:1: RuntimeError: no config; waiting for a change" in run.err
    assert run.stop(signal.SIGINT) == 0, run.err
    assert not _alive(first)
    assert "stopped after" in run.err and os.path.exists(run.trace)


def test_ctrl_c_while_the_new_app_loads_stops_everything_with_status_0(
    tmp_path: Path, runs: Callable[..., Run]
) -> None:
    """Ctrl+C in the middle of a reload (the new process still imports the app): the
    user stopped a server that ran, so hopscope ends as after any Ctrl+C, 0."""
    project = _project(tmp_path / "project", ASGI_APP)
    run, base = _start(runs, project)
    _, first = _answer(base)

    marker = project / "loading"

    def save() -> None:
        slow = f"import time\nopen({str(marker)!r}, 'w').close()\ntime.sleep(20)\n"
        (project / "app.py").write_text(slow + textwrap.dedent(ASGI_APP.format(version="slow")))

    save()
    _until(run, marker.exists, "the new process to import the app", save)
    loading = _children(run.proc.pid)
    assert loading and first not in loading
    assert run.stop(signal.SIGINT) == 0, run.err
    assert not [pid for pid in loading if _alive(pid)]
    assert "Traceback" not in run.err and "stopped after" in run.err


def test_a_reloaded_app_does_not_outlive_a_killed_hopscope(
    tmp_path: Path, runs: Callable[..., Run]
) -> None:
    """SIGKILL (no time to stop anything): the app started by a reload, gunicorn and its
    worker, still ends with hopscope, as the first one would."""
    project = _project(tmp_path / "project", WSGI_APP)
    run, base = _start(runs, project, "--reload-dir", ".")
    _, first = _answer(base)
    second = _until_version(run, base, "two!", lambda: _write(project / "app.py", WSGI_APP, "two!"))
    group = _children(run.proc.pid)  # the new gunicorn master
    assert group and second != first
    run.kill()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in [second, *group]):
        assert time.monotonic() < deadline, "the reloaded app outlived hopscope"
        time.sleep(0.05)


def test_under_the_ui_a_reload_is_a_notice(
    started: Callable[[Callable[[], Session]], Session],  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    """The UI owns the terminal: each reload is a notification, the proxy goes on."""
    project = _project(tmp_path / "project", ASGI_APP)
    folder = str(project)
    session = started(
        lambda: build_run_target_app("app:app", port=0, app_dir=folder, reload_dirs=[folder])
    )

    async def scenario(app: HopscopeApp, pilot: Pilot[None]) -> None:
        async with httpx.AsyncClient(base_url=session.urls["proxy"], timeout=30) as client:
            first = (await client.get("/")).text.split()
            assert first[0] == "one"
            answer = await answered_after_saves(
                pilot,
                client,
                lambda response: response.text.split()[0] == "two!",
                lambda: _write(project / "app.py", ASGI_APP, "two!"),
                time.monotonic() + 45,
                lambda: [n.message for n in app._notifications],
            )
            assert answer.text.split()[1] != first[1]
        notices = [str(n.message) for n in app._notifications]
        assert any(m.startswith("reloading: ") and "app.py changed" in m for m in notices)

    drive(session, scenario)
    session.close()
    assert session.exit_status == 0
