"""The ``hopscope`` command and the tail lines it prints."""

from __future__ import annotations

import io
import os
import queue
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import IO, Any

import pytest
from click.testing import CliRunner
from hopscope.app.cli import main
from hopscope.app.tail import Tail
from hopscope.tracing import FileSink, SocketSink, load
from hopscope.tracing.records import Record, new_span_id, new_trace_id, to_events

HOPSCOPE = [sys.executable, "-m", "hopscope.app"]
T0 = 1_700_000_000_000_000_000


# -- helpers -------------------------------------------------------------------------


def request(
    path: str = "/items/1",
    status: int | None = 200,
    *,
    method: str = "GET",
    route: str | None = None,
    user_spans: tuple[str, ...] = (),
    error: str | None = None,
    start: int = T0,
) -> list[Record]:
    """The records an app span (and its user spans) would leave."""
    trace_id, span_id = new_trace_id(), new_span_id()
    records: list[Record] = [
        (
            "s",
            start,
            trace_id,
            span_id,
            0,
            "app",
            f"{method} {path}",
            1,
            {"http.request.method": method, "url.path": path},
        )
    ]
    at = start
    for name in user_spans:
        child = new_span_id()
        records.append(
            ("s", at + 1000, trace_id, child, span_id, "app", name, 1, {"span.kind": "user"})
        )
        records.append(("e", at + 3_001_000, trace_id, child, None))
        at += 3_001_000
    end_attrs: dict[str, Any] = {"http.response.status_code": status}
    if route:
        end_attrs["http.route"] = route
    if error:
        records.append(
            ("p", at + 10, trace_id, span_id, "exception", {"exception.type": f"builtins.{error}"})
        )
        end_attrs.update({"error": True, "exception.type": error})
    records.append(("e", at + 5_000_000, trace_id, span_id, end_attrs))
    return records


def background_span(trace_id: int, parent: int) -> Record:
    return ("c", T0 + 6_000_000, T0 + 9_000_000, trace_id, new_span_id(), parent, "app",
            "background", 1, None)  # fmt: skip


def events(records: list[Record]) -> list[dict[str, Any]]:
    return [event for record in records for event in to_events(record, {"process.pid": 1})]


def quiet_tail(**options: Any) -> Tail:
    return Tail(io.StringIO(), **options)


def write_trace_file(path: Path, *requests: list[Record]) -> None:
    sink = FileSink(path)
    for records in requests:
        for record in records:
            sink.emit(record)
    sink.close()


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines_of(stream: IO[str]) -> queue.Queue[str]:
    """Lines of a subprocess pipe, readable with a timeout."""
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    return lines


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def assert_one_line_error(result: Any, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in err


# -- tail lines ----------------------------------------------------------------------


def test_line_shows_time_method_path_route_status_duration_and_hops() -> None:
    tail = quiet_tail()
    (line,) = tail.feed(
        events(request("/items/7", 201, route="/items/{id}", user_spans=("db.query", "db.query")))
    )
    clock, method, path, route, status, total, app, db = line.split()
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3}", clock)
    assert (method, path, route, status) == ("GET", "/items/7", "[/items/{id}]", "201")
    assert total == "11.0ms" and app == "app=11.0ms"
    assert db == "db.query=6.0msx2"


def test_error_line_names_the_exception() -> None:
    (line,) = quiet_tail().feed(events(request("/boom", 500, error="RuntimeError")))
    assert " 500 " in line and line.endswith("error=RuntimeError")


def test_hops_are_listed_outermost_first() -> None:
    trace_id, server, app = new_trace_id(), new_span_id(), new_span_id()
    records: list[Record] = [
        ("s", T0, trace_id, server, 0, "server", "GET /", 1, {"url.path": "/"}),
        ("s", T0 + 1_000_000, trace_id, app, server, "app", "GET /", 1, {"url.path": "/"}),
        ("e", T0 + 3_000_000, trace_id, app, {"http.response.status_code": 200}),
        ("e", T0 + 4_000_000, trace_id, server, None),
    ]
    (line,) = quiet_tail().feed(events(records))
    assert line.split()[-3:] == ["4.0ms", "server=4.0ms", "app=2.0ms"]


def test_one_line_per_request_and_late_stragglers_are_ignored() -> None:
    tail = quiet_tail()
    records = request("/bg")
    trace_id, app_span = records[0][2], records[0][3]
    assert len(tail.feed(events(records))) == 1
    background = background_span(trace_id, app_span)
    assert tail.feed(events([background])) == []
    assert tail.in_flight == 0
    assert tail.printed == 1


def test_work_reported_with_the_response_is_in_its_line() -> None:
    records = request("/bg")
    trace_id, app_span = records[0][2], records[0][3]
    background = background_span(trace_id, app_span)
    (line,) = quiet_tail().feed(events([*records, background]))
    assert "background=3.0ms" in line


def test_unfinished_requests_are_bounded_and_finished_ones_forgotten() -> None:
    tail = quiet_tail(max_in_flight=5, remember=3)
    for n in range(20):
        tail.feed(events(request(f"/open{n}")[:1]))  # started, never ended
    assert tail.in_flight == 5
    assert tail.evicted == 15
    for n in range(10):
        assert len(tail.feed(events(request(f"/done{n}")))) == 1
    assert len(tail._done) == 3
    assert tail.in_flight <= 5


def test_dropped_events_get_a_note() -> None:
    tail = quiet_tail()
    lines = tail.feed([{"kind": "dropped", "ts": T0, "count": 12, "attrs": {"process.pid": 9}}])
    assert lines == ["!! 12 events dropped by pid 9 (queue full or collector unreachable)"]
    assert tail.dropped == 12


def test_malformed_events_are_skipped() -> None:
    tail = quiet_tail()
    lines = tail.feed([{"kind": "span_start"}, {"kind": "what"}, ["no"], *events(request())])  # type: ignore[list-item]
    assert len(lines) == 1
    assert tail.malformed == 3


def test_status_is_coloured_only_on_a_terminal() -> None:
    tty, pipe = TTY(), io.StringIO()
    Tail(tty).feed(events(request(status=404)))
    Tail(pipe).feed(events(request(status=404)))
    assert "\x1b[" in tty.getvalue()
    assert "\x1b[" not in pipe.getvalue() and " 404 " in pipe.getvalue()


# -- the command ---------------------------------------------------------------------


def test_version_from_the_console_script() -> None:
    script = Path(sys.executable).parent / "hopscope"
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.strip() == f"hopscope {version('hopscope')}"


def test_help_via_python_m() -> None:
    result = subprocess.run([*HOPSCOPE, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "Usage: hopscope" in result.stdout
    assert "tail" in result.stdout and "demo" in result.stdout


def test_tail_file_prints_its_requests(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    write_trace_file(
        path, request("/a", 200), request("/missing", 404), request("/b", 500, error="KeyError")
    )
    result = CliRunner().invoke(main, ["tail", str(path)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split()[2:4] for line in lines] == [
        ["/a", "200"],
        ["/missing", "404"],
        ["/b", "500"],
    ]
    assert "\x1b[" not in result.stdout
    assert result.stderr == ""


def test_tail_file_says_what_it_skipped(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    write_trace_file(path, request("/a"), request("/unfinished")[:1])
    with path.open("a") as f:
        f.write("{not json\n")
        f.write('{"kind": "span_end", "ts": 1')  # cut off mid-write
    result = CliRunner().invoke(main, ["tail", str(path)])
    assert result.exit_code == 0
    assert len(result.stdout.splitlines()) == 1
    assert result.stderr.strip() == (
        f"hopscope: {path}: skipped 1 malformed line(s); the last line was cut off; "
        "1 request(s) never finished"
    )


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("this is not a trace\n", "not a hopscope trace file"),
        ('{"format": "hopscope", "version": "9.0"}\n', "newer than this"),
        (None, "cannot open"),
    ],
    ids=["garbage", "future-version", "missing"],
)
def test_tail_bad_file_is_one_line_exit_1(
    tmp_path: Path, content: str | None, fragment: str
) -> None:
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_text(content)
    result = CliRunner().invoke(main, ["tail", str(path)])
    assert_one_line_error(result, fragment)


def test_tail_malformed_file_in_a_real_process(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\x00\xff garbage\n")
    result = subprocess.run(
        [*HOPSCOPE, "tail", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_tail_listen_on_a_port_in_use(taken_port: int) -> None:
    result = subprocess.run(
        [*HOPSCOPE, "tail", "--listen", f"127.0.0.1:{taken_port}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "already in use" in line and "Traceback" not in line


@pytest.mark.parametrize(
    ("address", "fragment"),
    [("nonsense", "expected HOST:PORT"), ("0.0.0.0:7401", "non-loopback")],
)
def test_tail_listen_bad_address(address: str, fragment: str) -> None:
    result = CliRunner().invoke(main, ["tail", "--listen", address])
    assert_one_line_error(result, fragment)


def test_tail_file_and_listen_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["tail", str(tmp_path / "x"), "--listen", ":7401"])
    assert result.exit_code == 2


def test_unwritable_output_is_one_line_exit_1(tmp_path: Path) -> None:
    out = tmp_path / "no-such-dir" / "out.jsonl"
    result = CliRunner().invoke(main, ["tail", "--listen", "127.0.0.1:0", "-o", str(out)])
    assert_one_line_error(result, "cannot write")


def test_tail_listen_prints_live_lines_saves_them_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    out = tmp_path / "live.jsonl"
    proc = subprocess.Popen(
        [*HOPSCOPE, "tail", "--listen", "127.0.0.1:0", "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sink: SocketSink | None = None
    try:
        assert proc.stdout is not None and proc.stderr is not None
        stdout, stderr = lines_of(proc.stdout), lines_of(proc.stderr)
        banner = stderr.get(timeout=30)
        match = re.search(r"listening on (tcp://127\.0\.0\.1:\d+)", banner)
        assert match, banner
        sink = SocketSink(match.group(1))
        for records in (request("/live/1"), request("/live/2", 503)):
            for record in records:
                sink.emit(record)
        first, second = stdout.get(timeout=15), stdout.get(timeout=15)
        assert " /live/1 200 " in first and " /live/2 503 " in second
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
        assert "stopped after 2 request(s)" in stderr.get(timeout=5)
    finally:
        if sink is not None:
            sink.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert sorted(t.path or "" for t in load(out, strict=True)) == ["/live/1", "/live/2"]


def test_python_m_runs_the_same_command() -> None:
    result = subprocess.run([*HOPSCOPE, "--version"], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == f"hopscope {version('hopscope')}"
    assert os.path.basename(HOPSCOPE[0]).startswith("python")
