"""``hopscope run`` and trace files the way users meet them: what test_run_user.py and
test_files_user.py do not cover.

Same rules as there: the ``hopscope`` command as a process, real servers on 127.0.0.1
with free ports, bounded waits.
"""

from __future__ import annotations

import contextlib
import functools
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
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from test_run import HOPSCOPE, Run, _alive, _env, _free_port
from test_run_user import _children

#: An app whose module cannot be imported: every worker fails the same way.
BROKEN_APP = 'raise RuntimeError("the app is broken")\n'

WSGI_APP = """
def app(environ, start_response):
    start_response("200 OK", [("content-type", "text/plain")])
    return [b"ok"]
"""

ASGI_APP = """
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})
"""


@pytest.fixture
def runs(runs: Callable[..., Run]) -> Callable[..., Run]:
    """conftest's, without ``-o``: these tests read what the command says, not a trace."""
    return functools.partial(runs, save=False)


def _write(root: Path, name: str, source: str) -> None:
    (root / name).write_text(textwrap.dedent(source))


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _wait(predicate: Callable[[], object], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- 1. a load failure is said once per run, not once per worker -----------------------------


def test_gunicorn_workers_that_cannot_load_the_app_say_so_once(tmp_path: Path) -> None:
    _write(tmp_path, "broken.py", BROKEN_APP)
    port = str(_free_port())
    result = subprocess.run(
        [*HOPSCOPE, "--headless", "--", "gunicorn", "-w", "3", "-b", f"127.0.0.1:{port}",
         "broken:app"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "the app is broken" in result.stderr  # gunicorn's own report is kept
    lines = [line for line in result.stderr.splitlines() if "nothing to trace" in line]
    assert lines == ["hopscope: gunicorn could not load 'broken:app': nothing to trace"]


def test_uvicorn_workers_restarted_again_and_again_say_so_once(
    tmp_path: Path, runs: Callable[..., Run]
) -> None:
    """uvicorn's supervisor starts a dead worker again: each one fails to load the app."""
    _write(tmp_path, "broken.py", BROKEN_APP)
    port = str(_free_port())
    run = runs(tmp_path, "--headless", "--", "uvicorn", "broken:app", "--workers", "2",
               "--port", port)  # fmt: skip
    run.wait_for(lambda: run.err.count("the app is broken") >= 3, "a worker restarted", 60)
    run.stop()
    lines = [line for line in run.err.splitlines() if "nothing to trace" in line]
    assert lines == ["hopscope: uvicorn could not load 'broken:app': nothing to trace"]


# -- 2. gunicorn --daemon ----------------------------------------------------------------


@pytest.mark.parametrize("how", ["-D", "config"])
def test_gunicorn_daemon_is_refused_in_one_line(tmp_path: Path, how: str) -> None:
    """A daemonized gunicorn leaves hopscope's process group and outlives it."""
    _write(tmp_path, "app.py", WSGI_APP)
    _write(tmp_path, "daemon.conf.py", "daemon = True\n")
    port = _free_port()
    option = ["-c", "daemon.conf.py"] if how == "config" else [how]
    pidfile = tmp_path / "gunicorn.pid"
    try:
        result = subprocess.run(
            [*HOPSCOPE, "--headless", "--", "gunicorn", *option, "-p", str(pidfile), "-b",
             f"127.0.0.1:{port}", "app:app"],
            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:  # a daemon left by a failure is stopped
        time.sleep(0.5)  # (a detached gunicorn would be binding by now; not a timing assert)
        if pidfile.exists():
            with contextlib.suppress(ValueError, OSError):
                os.kill(int(pidfile.read_text()), signal.SIGTERM)
    assert not pidfile.exists()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    refusal = [line for line in result.stderr.splitlines() if "would detach" in line]
    assert refusal == [
        "hopscope: gunicorn --daemon would detach the server from hopscope run: "
        "run it in the foreground (no -D/--daemon, no daemon = True)"
    ]
    assert not _listening(port)


# -- 3. hopscope killed: the server goes too ------------------------------------------


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_the_server_stops_when_hopscope_is_killed(
    tmp_path: Path, runs: Callable[..., Run], server: str
) -> None:
    port = _free_port()
    if server == "uvicorn":
        _write(tmp_path, "app.py", ASGI_APP)
        command = ["uvicorn", "app:app", "--port", str(port), "--workers", "2"]
    else:
        _write(tmp_path, "app.py", WSGI_APP)
        command = ["gunicorn", "-w", "2", "-b", f"127.0.0.1:{port}", "app:app"]
    run = runs(tmp_path, "--headless", "--", *command)
    run.wait_for(lambda: _listening(port), "the server to listen")
    (leader,) = _children(run.proc.pid)
    group = [leader, *_children(leader)]
    run.proc.send_signal(signal.SIGKILL)
    run.proc.wait(10)
    try:
        _wait(lambda: not _listening(port), "the port to close")
        _wait(lambda: not any(map(_alive, group)), "the server's processes to exit")
    finally:  # what a failure left behind
        with contextlib.suppress(OSError):
            os.killpg(leader, signal.SIGKILL)


def test_the_server_started_by_hopscope_keeps_its_signals(tmp_path: Path) -> None:
    """Dying with hopscope changes nothing else: the command does not ignore SIGINT, as
    hopscope's own helpers do (a guard: ``spawn(with_parent=True)`` would fail it)."""
    code = "import signal\nprint(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    result = subprocess.run(
        [*HOPSCOPE, "--headless", "--", sys.executable, "-c", code],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


# -- 5. a HAR file read from a pipe --------------------------------------------------------

CHROME_HAR = Path(__file__).parent / "data" / "chrome.har"
VIEW = [sys.executable, "-m", "hopscope.app", "view", "--headless"]


def _lines(args: list[str]) -> list[str]:
    result = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return list(result.stdout.splitlines())


def _in_process(*args: str) -> list[str]:
    """What ``hopscope ARGS`` prints for a file (no pipe: no process needed)."""
    from click.testing import CliRunner
    from hopscope.app.cli import main

    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return list(result.stdout.splitlines())


def test_a_har_on_stdin_is_read_as_the_har_file_is() -> None:
    from_file = _in_process("view", "--headless", str(CHROME_HAR))
    assert len(from_file) >= 3
    # A pipe (``cat t.har | hopscope view -``): ``-`` is stdin, read once.
    piped = _lines(["bash", "-c", f"cat {CHROME_HAR} | {' '.join(VIEW)} -"])
    assert piped == from_file
    # A process substitution (``hopscope tail <(zcat t.har.gz)``, as view reads it).
    tail = [sys.executable, "-m", "hopscope.app", "tail"]
    assert _lines(["bash", "-c", f"{' '.join(tail)} <(cat {CHROME_HAR})"]) == from_file
    copied = _in_process("export", str(CHROME_HAR), "--curl", "2", "--no-redact")
    export = f"{sys.executable} -m hopscope.app export"
    piped = _lines(["bash", "-c", f"cat {CHROME_HAR} | {export} - --curl 2 --no-redact"])
    assert piped == copied and copied[-1].startswith("curl ")


def _through_a_pipe(data: bytes, read_it: Callable[[str], object]) -> object:
    read, write = os.pipe()

    def feed() -> None:
        with open(write, "wb") as pipe:
            pipe.write(data)

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        return read_it(f"/dev/fd/{read}")
    finally:
        writer.join(10)
        os.close(read)


def test_a_har_in_a_pipe_loads_as_traces_for_the_ui_and_export() -> None:
    """``export`` reads a pipe with tracefile's ``load``, the UI with its file source
    (through ``read_chunks``, as ``load`` does)."""
    from hopscope.tracing.har import load_har
    from hopscope.tracing.tracefile import load
    from hopscope.tui.source import open_file

    data = b"\xef\xbb\xbf\n" + CHROME_HAR.read_bytes()  # a byte order mark, a blank line
    traces = _through_a_pipe(data, load)
    expected = load_har(CHROME_HAR)
    assert isinstance(traces, list) and len(traces) == len(expected) >= 3
    assert sorted((t.start, t.method, t.path) for t in traces) == sorted(
        (t.start, t.method, t.path) for t in expected
    )

    def in_the_ui(path: str) -> list[object]:
        source = open_file(path)
        delivered: list[object] = []
        source.start(delivered.extend)
        assert source.done.wait(30)  # type: ignore[union-attr]
        return delivered

    delivered = _through_a_pipe(data, in_the_ui)
    assert isinstance(delivered, list)
    last = delivered[-1]
    assert isinstance(last, dict) and last.get("severity") == "information", last
    assert re.search(r": read [1-9]\d* events$", str(last.get("message"))), last
    assert len(delivered) > 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not json\n", "is not a hopscope trace file (no header line)"),
        (b'{"a": 1}\n', "is not a hopscope trace file (no header line)"),
        (b'{"log": 3}\n', "is not a HAR file (no log object)"),
    ],
)
def test_a_pipe_that_is_neither_says_so_in_one_line(content: bytes, message: str) -> None:
    result = subprocess.run(
        [*VIEW, "-"], input=content, env=_env(), capture_output=True, timeout=60
    )
    assert result.returncode == 1
    err = result.stderr.decode()
    assert err.count("\n") == 1 and message in err and "Traceback" not in err, err


def test_view_dash_with_the_ui_is_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hopscope.app", "view", "--ui", "-"],
        input=CHROME_HAR.read_bytes(), env=_env(), capture_output=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    err = result.stderr.decode()
    assert err.count("\n") == 1 and "--headless" in err, err


# -- 6. Quart's route ------------------------------------------------------------------------

QUART_APP = """
from quart import Quart, request

app = Quart(__name__)


@app.before_request
async def guard():
    if request.args.get("deny"):
        return "denied", 401


@app.route("/items/<int:item_id>")
async def item(item_id):
    return {"id": item_id}
"""


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
def test_quarts_route_is_recorded(tmp_path: Path, runs: Callable[..., Run], server: str) -> None:
    _write(tmp_path, "qapp.py", QUART_APP)
    port = _free_port()
    if server == "uvicorn":
        command = ["uvicorn", "qapp:app", "--port", str(port)]
    else:
        command = ["hypercorn", "-b", f"127.0.0.1:{port}", "qapp:app"]
    trace = tmp_path / "trace.jsonl"
    run = Run(["-o", str(trace), "--headless", "--", *command], tmp_path, save=False)
    try:
        base = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            try:
                return httpx.get(f"{base}/items/1", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        run.wait_for(answers, "the app to answer")
        assert httpx.get(f"{base}/items/2?deny=1", timeout=10).status_code == 401
        assert httpx.get(f"{base}/nowhere", timeout=10).status_code == 404
    finally:
        run.stop()
    from hopscope.tracing.tracefile import load

    routes = {
        span.attrs["http.response.status_code"]: span.attrs.get("http.route")
        for loaded in load(trace)
        for span in loaded.spans.values()
        if span.hop == "app"
    }
    assert routes == {200: "/items/<int:item_id>", 401: "/items/<int:item_id>", 404: None}


# -- 4. a chunked upload the app did not read ----------------------------------------------

UPLOAD_ASGI = """
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"] == "/read":
        while (await receive()).get("more_body"):
            pass
    await send({"type": "http.response.start", "status": 401, "headers": []})
    await send({"type": "http.response.body", "body": b"no"})
"""
UPLOAD_WSGI = """
def app(environ, start_response):
    if environ["PATH_INFO"] == "/read":
        environ["wsgi.input"].read()
    start_response("401 Unauthorized", [])
    return [b"no"]
"""


def _chunks() -> Iterator[bytes]:
    yield b"hello "
    yield b"world"


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_a_chunked_upload_the_app_did_not_read_is_not_exported_as_empty(
    tmp_path: Path, server: str
) -> None:
    port = _free_port()
    if server == "uvicorn":
        _write(tmp_path, "upload.py", UPLOAD_ASGI)
        command = ["uvicorn", "upload:app", "--port", str(port)]
    else:
        _write(tmp_path, "upload.py", UPLOAD_WSGI)
        command = ["gunicorn", "-b", f"127.0.0.1:{port}", "upload:app"]
    trace = tmp_path / "trace.jsonl"
    run = Run(["-o", str(trace), "--headless", "--", *command], tmp_path, save=False)
    base = f"http://127.0.0.1:{port}"
    try:
        run.wait_for(lambda: _listening(port), "the server to listen")
        for path in ("/skip", "/read"):  # chunked: no Content-Length
            assert httpx.post(f"{base}{path}", content=_chunks(), timeout=10).status_code == 401
        assert httpx.post(f"{base}/empty", content=b"", timeout=10).status_code == 401
    finally:
        run.stop()
    result = subprocess.run(
        [sys.executable, "-m", "hopscope.app", "export", str(trace), "--har", "-"],
        env=_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    requests = {
        entry["request"]["url"].rsplit("/", 1)[1]: entry["request"]
        for entry in json.loads(result.stdout)["log"]["entries"]
    }
    skipped = requests["skip"]
    assert skipped["bodySize"] == -1  # HAR: not known
    assert "not read by the app" in skipped["postData"]["comment"]
    assert skipped["postData"]["text"] == ""
    assert requests["read"]["bodySize"] == 11
    assert requests["read"]["postData"]["text"] == "hello world"
    assert requests["empty"]["bodySize"] == 0  # Content-Length: 0 is empty indeed
    assert "postData" not in requests["empty"]
    copied = _in_process("export", str(trace), "--curl", "1")
    assert "# the body was not captured: the app did not read it (sent chunked)" in copied
    # Replayed, it would go as an empty upload: it is not replayed as if whole.
    from hopscope.tracing.replay import captured_request
    from hopscope.tracing.tracefile import load

    captured = {c.path: c for c in map(captured_request, load(trace)) if c is not None}
    assert captured["/skip"].truncated and captured["/skip"].body_size is None
    assert not captured["/read"].truncated and captured["/read"].body == b"hello world"
    assert not captured["/empty"].truncated and captured["/empty"].body == b""


# -- Django's route ---------------------------------------------------------------------------

DJANGO_URLS = """
from django.http import JsonResponse
from django.urls import path, re_path


def item(request, item_id):
    return JsonResponse({"id": item_id})


def pid(request):
    return JsonResponse({})


urlpatterns = [
    path("pid", pid),
    path("items/<int:item_id>", item),
    re_path(r"^old/(?P<item_id>[0-9]+)$", item),
]
"""


def _app_routes(trace: Path) -> dict[str, object]:
    from hopscope.tracing.tracefile import load

    return {
        span.attrs["url.path"]: span.attrs.get("http.route")
        for loaded in load(trace)
        for span in loaded.spans.values()
        if span.hop == "app" and "url.path" in span.attrs  # (not a background span)
    }


@pytest.mark.parametrize("server", ["runserver", "gunicorn"])  # (ASGI: Quart's test)
def test_djangos_route_is_recorded(tmp_path: Path, server: str) -> None:
    from test_run import DJANGO_FILES

    for name, source in {**DJANGO_FILES, "mysite/urls.py": DJANGO_URLS}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        _write(tmp_path, name, source)
    port = _free_port()
    command = {
        "runserver": [sys.executable, "manage.py", "runserver", str(port), "--noreload"],
        "gunicorn": ["gunicorn", "-b", f"127.0.0.1:{port}", "mysite.wsgi"],
    }[server]
    trace = tmp_path / "trace.jsonl"
    run = Run(["-o", str(trace), "--headless", "--", *command], tmp_path, save=False)
    base = f"http://127.0.0.1:{port}"
    try:
        run.wait_serving(base)
        for path in ("/items/3", "/old/4", "/nowhere"):
            httpx.get(f"{base}{path}", timeout=10)
    finally:
        run.stop()
    routes = _app_routes(trace)
    assert routes == {
        "/pid": "/pid",
        "/items/3": "/items/<int:item_id>",
        "/old/4": "^old/(?P<item_id>[0-9]+)$",
        "/nowhere": None,
    }


def test_processes_that_cannot_import_hopscope_say_so_once(tmp_path: Path) -> None:
    """A command whose Python has no hopscope (another virtualenv) is not traced, and
    each of its processes would say so: once is enough."""
    sub = tmp_path / "sub"
    (sub / "hopscope").mkdir(parents=True)
    (sub / "hopscope" / "__init__.py").write_text("raise ImportError('not this one')\n")
    (sub / "flask").mkdir()
    (sub / "flask" / "__init__.py").write_text("")  # a trigger of the bootstrap
    _write(
        tmp_path,
        "script.py",
        """
        import subprocess, sys

        for _ in range(3):
            subprocess.run([sys.executable, "-c", "import flask"], cwd="sub", check=True)
        """,
    )
    result = subprocess.run(
        [*HOPSCOPE, "--headless", "--", sys.executable, "script.py"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "cannot import hopscope" in line]
    assert len(lines) == 1, result.stderr
    assert "not tracing this process" in lines[0]


def test_the_bootstrap_and_inject_note_what_was_said_in_the_same_folder() -> None:
    from hopscope.app.run import BOOTSTRAP_DIR
    from hopscope.tracing.inject import SAID_ENV

    assert f'os.environ.get("{SAID_ENV}")' in (BOOTSTRAP_DIR / "sitecustomize.py").read_text()


@pytest.mark.parametrize("framework", ["quart", "django"])
def test_the_route_is_recorded_for_a_target_too(tmp_path: Path, framework: str) -> None:
    """``hopscope run module:app`` wraps the app itself: the route hooks are its too."""
    if framework == "quart":
        _write(tmp_path, "qapp.py", QUART_APP)
        target, path, route = "qapp:app", "/items/3", "/items/<int:item_id>"
    else:
        from test_run import DJANGO_FILES

        for name, source in {**DJANGO_FILES, "mysite/urls.py": DJANGO_URLS}.items():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            _write(tmp_path, name, source)
        target, path, route = "mysite.wsgi:application", "/items/3", "/items/<int:item_id>"
    trace = tmp_path / "trace.jsonl"
    run = Run(["-o", str(trace), "--headless", "--no-proxy", "--port", "0", target], tmp_path,
              save=False)  # fmt: skip
    try:
        assert httpx.get(f"{run.url()}{path}", timeout=10).status_code == 200
    finally:
        run.stop()
    assert _app_routes(trace) == {path: route}


def test_the_said_folder_goes_and_so_do_those_of_killed_runs(tmp_path: Path) -> None:
    """A run killed by SIGKILL leaves its (empty) folder behind: the next run removes it."""
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    stale = tmp_path / f"hopscope-run-{int(ended.stdout)}-abc"
    live = tmp_path / f"hopscope-run-{os.getpid()}-abc"  # a run still going: kept
    other = tmp_path / "hopscope-run-notapid"
    for folder in (stale, live, other):
        folder.mkdir()
    (stale / "said").write_text("")
    code = "import os; print(os.environ['HOPSCOPE_SAID'])"
    result = subprocess.run(
        [*HOPSCOPE, "--headless", "--", sys.executable, "-c", code],
        cwd=tmp_path, env=_env(TMPDIR=str(tmp_path)), capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    used = Path(result.stdout.strip())
    assert used.parent == tmp_path and used.name.startswith("hopscope-run-")
    assert not used.exists()  # removed at the end
    assert not stale.exists() and live.exists() and other.exists()
