"""Opening a big trace file: the first rows show while the rest still loads, the header
says how far loading got, and what the UI holds at the end is what ``load`` reads."""

from __future__ import annotations

import asyncio
import importlib
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from hopscope.tracing import load
from hopscope.tracing.tracefile import (
    LoadReport,
    SummaryScan,
    header_line,
    read_chunks,
    read_events,
)
from hopscope.tui.app import HopscopeApp
from hopscope.tui.source import FileSource
from rich.console import Console
from textual.widgets import Static
from uitools import list_lines, wait_for

Event = dict[str, Any]
T0 = 1_735_732_800_000_000_000
SIZE = (120, 35)
WAIT = 30.0
REQUESTS = 3_000


def request(n: int) -> list[Event]:
    trace_id, span_id = f"{n + 1:032x}", f"{n + 1:016x}"
    return [
        {
            "kind": "span_start",
            "ts": T0 + n * 1_000_000,
            "trace_id": trace_id,
            "span_id": span_id,
            "parent_id": None,
            "hop": "app",
            "name": f"GET /items/{n}",
            "attrs": {"http.request.method": "GET", "url.path": f"/items/{n}"},
        },
        {
            "kind": "event",
            "ts": T0 + n * 1_000_000 + 100_000,
            "trace_id": trace_id,
            "span_id": span_id,
            "name": "response.start",
            "attrs": {"status": 500 if n % 10 == 0 else 200},
        },
        {
            "kind": "span_end",
            "ts": T0 + n * 1_000_000 + 500_000,
            "trace_id": trace_id,
            "span_id": span_id,
            "attrs": {"http.response.status_code": 500 if n % 10 == 0 else 200},
        },
    ]


def write_file(path: Path, requests: int) -> None:
    with path.open("w", encoding="utf-8") as handle:
        handle.write(header_line())
        for n in range(requests):
            for event in request(n):
                handle.write(json.dumps(event, separators=(",", ":")) + "\n")


def header_source(app: HopscopeApp) -> str:
    console = Console(width=200, color_system=None, record=True, file=None)
    with console.capture() as capture:
        console.print(app.query_one("#header-source", Static).content)
    return capture.get().strip()


def test_the_first_rows_show_while_a_big_file_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    write_file(path, REQUESTS)
    release = threading.Event()
    held_at: list[int] = []

    def gate(batches: int) -> None:
        # Hold the load after its first batch until the test looked at the screen.
        if batches == 1:
            held_at.append(batches)
            release.wait(WAIT)

    source = FileSource(path, batch_size=600, gate=gate)  # 200 requests a batch

    async def main() -> None:
        app = HopscopeApp(source, max_requests=REQUESTS)
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: len(app.store) >= 200, "the first batch")
            await pilot.pause(0.1)
            assert held_at == [1] and not source.done.is_set()
            assert len(app.store) == 200  # the rest is not there yet
            lines = [line for line in list_lines(app) if "/items/" in line]
            assert lines, "no request drawn while the file loads"
            assert "/items/199" in lines[-1]  # following: the newest loaded at the bottom
            label = header_source(app)
            assert label.startswith("big.jsonl · loading ") and label.endswith("%"), label
            assert 0 < int(label.rsplit(" ", 1)[1].rstrip("%")) < 100
            # Filters and counts cover what has loaded, and keep up as more comes.
            assert app.apply_filter("status:5xx")
            assert len(app.store) == 20
            assert app.store.counts == {"2xx": 180, "5xx": 20}
            release.set()
            await wait_for(
                pilot,
                lambda: header_source(app) == f"big.jsonl · {REQUESTS:,} requests",
                "the final count",
            )
            assert len(app.store.rows) == REQUESTS
            assert len(app.store) == REQUESTS // 10
            assert app.store.counts == {"2xx": REQUESTS * 9 // 10, "5xx": REQUESTS // 10}
            assert [row.trace for row in app.store.rows.values()] == load(path)

    try:
        asyncio.run(main())
    finally:
        release.set()


def test_progress_follows_the_bytes_read(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    write_file(path, REQUESTS)
    seen: list[float] = []
    source = FileSource(path, batch_size=3_000, gate=lambda _: seen.append(source.progress()))
    assert source.progress() < 1  # only the header is read, to check the file
    source.start(lambda events: None)
    assert source.done.wait(WAIT)
    assert source.progress() == 1.0
    assert seen == sorted(seen) and len(seen) == 3
    assert source.requests == REQUESTS


def test_chunks_hold_the_same_events_as_read_events(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    write_file(path, REQUESTS)
    with path.open("a") as handle:
        handle.write("not json\n")
    report = LoadReport()
    chunks = list(read_chunks(path, report))
    assert len(chunks) > 1
    assert [event for chunk in chunks for event in chunk] == list(read_events(path))
    assert report.events == REQUESTS * 3
    assert report.bytes_read == path.stat().st_size
    assert report.malformed_lines == [REQUESTS * 3 + 2]


def test_the_open_benchmark_finishes_for_a_small_file(tmp_path: Path) -> None:
    # A file small enough to be all in before the first screen: bench/view_open.py used
    # to hook the store and the list only once the app ran, missed both, and waited for
    # its 600 s timeout; the viewer itself had every request (held == requests).
    bench = Path(__file__).resolve().parent.parent / "bench"
    sys.path.insert(0, str(bench))
    try:
        view_open = importlib.import_module("view_open")
    finally:
        sys.path.remove(str(bench))
    path = tmp_path / "small.jsonl"
    view_open.write_file(str(path), 30)
    assert SummaryScan(path).may_have_summaries
    result = asyncio.run(asyncio.wait_for(view_open.time_view(str(path), 30), WAIT))
    assert result["requests_held"] == 30
    assert result["first_screen_s"] <= result["drawn_s"]


def test_the_loading_label_lays_the_screen_out_only_when_its_width_changes() -> None:
    # A whole-screen layout per tick while a big file loads ("loading 42%", then 43%...)
    # was a tenth of the CPU opening 100,000 requests took.
    from hopscope.tui.source import QueueSource

    async def main() -> None:
        app = HopscopeApp(QueueSource("live"), max_requests=10)
        async with app.run_test(size=SIZE) as pilot:
            # The header's first stats tick draws the line once: let it come first (on a
            # loaded machine it came amid the labels below, one layout more).
            for _ in range(250):
                if app.header._last is not None:
                    break
                await pilot.pause(0.02)
            assert app.header._last is not None
            line = app.header._source_line
            original = line.update
            layouts: list[bool] = []

            def update(content: Any = "", *, layout: bool = True) -> None:
                layouts.append(layout)
                original(content, layout=layout)

            line.update = update  # type: ignore[method-assign]
            for label in ("big.jsonl · loading 9%", "big.jsonl · loading 10%"):
                app.header.show_source(label)
            for percent in (11, 12, 99):
                app.header.show_source(f"big.jsonl · loading {percent}%")
            app.header.show_source("big.jsonl · 3,000 requests")
            await pilot.pause()
            assert layouts == [True, True, False, False, False, True]
            assert header_source(app) == "big.jsonl · 3,000 requests"

    asyncio.run(main())


def test_opening_a_file_does_not_import_what_only_other_features_need() -> None:
    # httpx (resending) and the HAR reader cost every `hopscope view` some 80 ms to
    # import; they are imported when used.
    code = (
        "import sys, hopscope.tui.app, hopscope.tui.source\n"
        "print(sorted(m for m in ('httpx', 'hopscope.tracing.har') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"
