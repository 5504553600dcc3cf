"""``hopscope run TARGET --reload``, session 11: a first start that cannot load waits for
a change (as ``uvicorn --reload`` does), requests meanwhile get a 502 that says why, and
a same-size edit within the second of a cached ``.pyc`` still loads the new code.

Real ``hopscope run`` processes on 127.0.0.1 (and the UI under Textual's pilot); the
helpers of tests/test_run_reload_s10.py poll with bounds and save again when a change
was missed.
"""

from __future__ import annotations

import os
import py_compile
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from hopscope.app.run import RunError, build_run_target_app
from hopscope.app.ui import Session
from hopscope.tui.app import HopscopeApp
from test_commands_ui import drive, started  # noqa: F401 (started: a fixture, used)
from test_run import HOPSCOPE, Run, _alive, _env
from test_run_reload_s10 import (
    ASGI_APP,
    BROKEN,
    WSGI_APP,
    _answer,
    _start,
    _until,
    _until_version,
    _write,
)
from textual.pilot import Pilot
from uitools import answered_after_saves

#: The line said when the first start failed: where requests go meanwhile.
PENDING = re.compile(r"(http://127\.0\.0\.1:\d+) answers 502 meanwhile")

#: A first app.py that cannot load, what its one line says, and the app that fixes it.
CANNOT_LOAD = {
    "syntax-error": ("VERSION = 1\n" + BROKEN, "app.py:3: SyntaxError: invalid syntax", ASGI_APP),
    "raises": ("raise RuntimeError('no config')\n", "app.py:1: RuntimeError: no config", WSGI_APP),
    "no-attribute": ("VERSION = 1\n", "module 'app' has no attribute 'app'", ASGI_APP),
}


def _failure(run: Run) -> str:
    """The one ``cannot load`` line, once it came."""
    run.wait_for(lambda: "cannot load" in run.err, "the load failure")
    failures = [line for line in run.err.splitlines() if "cannot load" in line]
    assert len(failures) == 1, run.err
    return failures[0]


@pytest.mark.parametrize(
    ("case", "proxy"),
    [(case, True) for case in CANNOT_LOAD] + [("syntax-error", False)],
    ids=[*CANNOT_LOAD, "syntax-error-no-proxy"],
)
def test_a_first_start_that_cannot_load_waits_for_a_change(
    tmp_path: Path, runs: Callable[..., Run], case: str, proxy: bool
) -> None:
    first, said, fixed = CANNOT_LOAD[case]
    project = tmp_path / "project"
    project.mkdir()
    app = project / "app.py"
    app.write_text(first)
    args = [] if proxy else ["--no-proxy"]
    run = runs(project, "app:app", "--port", "0", "--headless", "--reload", *args)

    failure = _failure(run)
    assert failure == f"hopscope: cannot load app:app: {said}; waiting for a change", run.err
    match = run.wait_for(lambda: PENDING.search(run.err), "the URL")
    base = match.group(1)
    assert "(reloading on changes in .; Ctrl+C to stop)" in run.err
    assert "Traceback" not in run.err and run.proc.poll() is None
    for method in ("GET", "POST"):
        response = httpx.request(method, base + "/", content=b"x" * 100_000, timeout=10)
        assert response.status_code == 502
        assert response.text == failure + "\n"

    _until_version(run, base, "two!", lambda: _write(app, fixed, "two!"))
    serving = [line for line in run.err.splitlines() if line.startswith("hopscope: serving")]
    assert len(serving) == 1 and f"open {base} (reloading on changes in ." in serving[0]
    assert "again" not in serving[0]
    assert run.stop() == 0, run.err
    if proxy:  # (recorded by the proxy: the 502s too)
        assert " GET / 502 " in run.out and " GET / 200 " in run.out, run.out


def test_requests_while_a_later_save_cannot_load_get_a_502_saying_why(
    tmp_path: Path, runs: Callable[..., Run]
) -> None:
    """The app served, then a save broke it: no waiting in the backlog for a 504."""
    project = tmp_path / "project"
    project.mkdir()
    app = project / "app.py"
    _write(app, ASGI_APP, "one")
    run, base = _start(runs, project)
    _answer(base)

    def save() -> None:
        app.write_text("raise RuntimeError('no config')\n")

    save()
    _until(run, lambda: "cannot load" in run.err, "the load failure", save)
    response = httpx.get(base + "/", timeout=10)
    assert response.status_code == 502, response.text
    assert response.text == (
        "hopscope: cannot load app:app: app.py:1: RuntimeError: no config; waiting for a change\n"
    )
    assert "not served until it loads" not in run.err  # (said only when it never served)
    _until_version(run, base, "three", lambda: _write(app, ASGI_APP, "three"))
    assert run.stop() == 0, run.err


def test_a_module_that_does_not_exist_still_ends_the_run(tmp_path: Path) -> None:
    """A typo in TARGET's module: no edit of a watched file makes it, so --reload does
    not wait for one (uvicorn would); one line, status 1, as without --reload."""
    done = subprocess.run(
        [*HOPSCOPE, "--headless", "nosuchmodule:app", "--port", "0", "--reload"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert "hopscope: cannot load nosuchmodule:app: cannot import 'nosuchmodule'" in done.stderr
    assert "Traceback" not in done.stderr and "waiting for a change" not in done.stderr
    with pytest.raises(RunError, match="cannot load nosuchmodule:app: cannot import"):
        build_run_target_app("nosuchmodule:app", port=0, reload_dirs=[str(tmp_path)])


def test_under_the_ui_a_first_start_that_cannot_load_is_a_notice(
    started: Callable[[Callable[[], Session]], Session],  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    app_py = project / "app.py"
    app_py.write_text("raise RuntimeError('no config')\n")
    folder = str(project)
    session = started(
        lambda: build_run_target_app("app:app", port=0, app_dir=folder, reload_dirs=[folder])
    )

    async def scenario(app: HopscopeApp, pilot: Pilot[None]) -> None:
        def notices() -> list[str]:
            return [str(n.message) for n in app._notifications]

        deadline = time.monotonic() + 30
        while not any("cannot load" in m for m in notices()):
            assert time.monotonic() < deadline, notices()
            await pilot.pause(0.1)
        failure = next(m for m in notices() if "cannot load" in m)
        assert failure.startswith("cannot load app:app: ") and failure.endswith(
            f"{os.sep}app.py:1: RuntimeError: no config; waiting for a change"
        )
        async with httpx.AsyncClient(base_url=session.urls["proxy"], timeout=10) as client:
            response = await client.get("/")
            assert response.status_code == 502
            assert response.text == f"hopscope: {failure}\n"
            answer = await answered_after_saves(
                pilot,
                client,
                lambda response: response.status_code == 200,
                lambda: _write(app_py, ASGI_APP, "two!"),
                deadline + 30,
                notices,
            )
            assert answer.text.split()[0] == "two!"
        while not any(m.startswith("serving app:app (ASGI, uvicorn)") for m in notices()):
            assert time.monotonic() < deadline + 40, notices()
            await pilot.pause(0.1)
        assert not any("again" in m for m in notices())

    drive(session, scenario)
    session.close()
    assert session.exit_status == 0


def test_a_same_size_edit_within_the_second_of_its_pyc_loads_the_new_code(
    tmp_path: Path, runs: Callable[..., Run]
) -> None:
    """Python takes a ``.pyc`` as current when the source's mtime in whole seconds and
    its size match: both versions here have the same size and an mtime in the same
    second, so only removing the cached bytecode makes the reload load the new code."""
    project = tmp_path / "project"
    project.mkdir()
    app = project / "app.py"
    second = 1_700_000_000  # (a whole second: both mtimes in it)

    def save(version: str, mtime: float) -> None:
        draft = project / "app.draft"  # (not a .py file: only the rename is a change)
        _write(draft, ASGI_APP, version)
        os.utime(draft, (mtime, mtime))
        os.replace(draft, app)

    save("one", second + 0.1)
    py_compile.compile(str(app), invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    run, base = _start(runs, project)
    version, first = _answer(base)
    assert version == "one"

    def reloaded() -> tuple[str, int] | None:
        answer = _answer(base)
        return answer if answer[1] != first else None

    save("two", second + 0.6)  # (one character changed, the same size)
    answer = _until(run, reloaded, "the reload", lambda: save("two", second + 0.6))
    assert answer == ("two", answer[1]), run.err  # (not "one": the stale bytecode)
    assert run.stop() == 0, run.err
    assert not _alive(first)
