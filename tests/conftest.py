"""Shared fixtures: real servers on 127.0.0.1, on ports the kernel picks."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from servers import interrupt, uvicorn_thread


def pytest_configure(config: pytest.Config) -> None:
    """The developer's own hopscope config (remapped keys) must not change what tests see,
    in this process or in the hopscope processes tests start."""
    os.environ.pop("HOPSCOPE_CONFIG", None)
    os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="hopscope-tests-config-")


@contextlib.contextmanager
def _uvicorn_thread(app: Any, **options: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread; yields its base URL (``https://`` when
    ``options``, more of uvicorn's settings, give a certificate).  See
    :func:`servers.uvicorn_thread`."""
    with uvicorn_thread(app, **options) as served:
        yield served.url


@pytest.fixture
def serve_asgi() -> Callable[..., contextlib.AbstractContextManager[str]]:
    """``with serve_asgi(app) as base_url:`` runs a real uvicorn for the block
    (``serve_asgi(app, ssl_certfile=..., ssl_keyfile=...)`` for TLS)."""
    return _uvicorn_thread


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def hop_sink(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A MemorySink as the process default sink: the server hooks (uvicorn's protocol
    classes, gunicorn's hooks) record through it, as they find no sink of their own."""
    from hopscope.tracing import MemorySink, sinks

    sink = MemorySink()
    monkeypatch.setattr(sinks, "_default", sink)
    return sink


@pytest.fixture
def new_sink(monkeypatch: pytest.MonkeyPatch) -> Callable[[], Any]:
    """``new_sink()``: like :func:`hop_sink`, one MemorySink as the process default sink
    for each call (a test that starts several servers, one after the other, gives each
    its own)."""
    from hopscope.tracing import MemorySink, sinks

    def make() -> MemorySink:
        sink = MemorySink()
        monkeypatch.setattr(sinks, "_default", sink)
        return sink

    return make


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """``free_port()``: a port nothing listens on right now (for "collector absent");
    session-wide, so module fixtures can ask for ports too."""
    return _free_port


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths are limited to ~100 bytes: pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="hs", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1 (a development server's kind):
    (certificate, key) files, made with the ``openssl`` CLI (skips when it is missing)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    argv = [
        "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-days", "2", "-subj", "/CN=localhost",
        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        "-keyout", str(key), "-out", str(cert),
    ]  # fmt: skip
    subprocess.run(argv, check=True, capture_output=True, timeout=30)
    return cert, key


@pytest.fixture(scope="module")
def starlette_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a Starlette ``app.py`` (test_run.STARLETTE_APP) and a ``tracing.py``
    of the user's own, that ``hopscope run`` must not shadow."""
    from test_run import STARLETTE_APP, _project

    return _project(tmp_path_factory.mktemp("starlette"), STARLETTE_APP)


@pytest.fixture(scope="module")
def flask_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_run import FLASK_APP, _project

    return _project(tmp_path_factory.mktemp("flask"), FLASK_APP)


@pytest.fixture(scope="module")
def quart_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_run import QUART_APP, _project

    return _project(tmp_path_factory.mktemp("quart"), QUART_APP)


@pytest.fixture
def runs() -> Iterator[Callable[..., Any]]:
    """``hopscope run`` processes (:class:`test_run.Run`), stopped at the end if a failing
    test left them; ``save=False`` starts one without ``-o``."""
    import signal

    from test_run import Run

    started: list[Run] = []

    def start(cwd: Path, *args: str, env: dict[str, str] | None = None, save: bool = True) -> Run:
        run = Run(list(args), cwd, env, save=save)
        started.append(run)
        return run

    yield start
    for run in started:
        if run.proc.poll() is None:
            run.stop(signal.SIGTERM)


@pytest.fixture
def processes() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Commands a test starts (stdout dropped, stderr into ``err``), stopped at its end
    with SIGINT as a user stops a server, killed if one hangs: a failure leaves nothing."""
    started: list[subprocess.Popen[bytes]] = []

    def start(
        args: list[str], err: Path, *, cwd: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with open(err, "wb") as stderr:
            proc = subprocess.Popen(
                args,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        interrupt(proc)
