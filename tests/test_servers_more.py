"""``hopscope run -- COMMAND`` with servers beyond the ones the README names first.

Why: the bootstrap wraps the app wherever a server looks it up, so servers it has no
special knowledge of should work as well as the named ones.  Granian (a Rust server that
loads the app in worker processes it spawns, ASGI and WSGI) and Daphne (Django
Channels' server, on Twisted) are the two a user is most likely to try next.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from test_run import BIN, Run, _check_traces, _free_port, _requests

pytestmark = pytest.mark.timeout(120)


def _installed(name: str) -> str:
    path = shutil.which(name, path=BIN)
    if path is None:  # pragma: no cover - the dev extras install both
        pytest.skip(f"{name} is not installed")
    return path


@pytest.mark.parametrize("workers", [1, 2])
def test_granian_asgi(workers: int, starlette_project: Path, runs: Callable[..., Run]) -> None:
    granian = _installed("granian")
    port = _free_port()
    run = runs(
        starlette_project, "--", granian, "--interface", "asgi", "--host", "127.0.0.1",
        "--port", str(port), "--workers", str(workers), "app:app",
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    run.wait_serving(base)
    pids = _requests(base)
    # Granian serves from worker processes it spawns: events carry the worker's pid.
    assert run.proc.pid not in pids.values()
    traces = _check_traces(run, pids, server=False)
    assert {t.route for t in traces if t.route} == {"/pid"}


def test_granian_wsgi(flask_project: Path, runs: Callable[..., Run]) -> None:
    granian = _installed("granian")
    port = _free_port()
    run = runs(
        flask_project, "--", granian, "--interface", "wsgi", "--host", "127.0.0.1",
        "--port", str(port), "app:app",
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    run.wait_serving(base)
    traces = _check_traces(run, _requests(base), server=False)
    assert {t.route for t in traces if t.route} == {"/pid"}
    assert all(t.root is not None and t.root.attrs.get("interface") == "wsgi" for t in traces)


def test_daphne(starlette_project: Path, runs: Callable[..., Run]) -> None:
    daphne = _installed("daphne")
    port = _free_port()
    run = runs(starlette_project, "--", daphne, "-b", "127.0.0.1", "-p", str(port), "app:app")
    base = f"http://127.0.0.1:{port}"
    run.wait_serving(base)
    traces = _check_traces(run, _requests(base), server=False)
    assert {t.route for t in traces if t.route} == {"/pid"}
