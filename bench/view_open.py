"""How long ``hopscope view`` takes to open a 100,000-request trace file (goal: under 3 s).

Run: ``python bench/view_open.py [--requests 100000] [--repeat 1] [--keep FILE]``.

A trace file in the real format is generated in a temporary directory, untimed, the
way the real writers make it (``FileSink``, the collector's ``-o`` and the UI's save all
write through ``tracefile.TraceFileWriter``): a header line, one wire event per line, and
a summary line per finished request.  Each request is the one ``bench/tui_ingest.py``
streams, a queue span, the server hop, the app span with its headers, a user span, body
and response events, about 10 events, so 100,000 requests are about a million lines.
An *old-format* copy of it (version 1.0, no summary lines: what hopscope wrote before
summaries) is timed too, in the same run.  Then, timed, for each file:

- ``load``: ``hopscope.tracing.load(path)``, the file into assembled traces (summary
  lines are skipped: the same work for both files);
- ``view``: what ``hopscope view --max-requests N FILE`` does (``open_file`` and the
  app), driven headless with Textual's ``run_test`` at 120x35: the time to the *first
  screen* (the request list drawn with a screenful of requests, while the rest still
  loads in the background), and the time until the UI's store holds every request and
  the request list has drawn the screen after that (*all loaded*: the goal).

Both report wall and CPU time: on a shared machine the wall time mostly measures the
neighbours, so compare CPU times across runs, and say the load average (``uptime``).
``--skip-old`` times only the file with summaries.  ``--filesink`` writes the file
through ``FileSink(path)`` instead, with whatever defaults it has (whether it writes
summary lines), and times only that file.

``--from-start`` also times what a user waits for from the command's start: the view
run again in a fresh interpreter (started by this script, the clock started just before),
so the interpreter's start and the imports count too (with bytecode caches allowed, as
an installed wheel has them; this bench's own imports, a little more than the command's,
are counted with them).

``--callgrind`` instead counts the instructions per request (valgrind, so the load does
not matter) of what opening the file costs besides drawing: the summary scan
(``tracefile.SummaryScan``, in the source's thread) and filing its rows into the UI's
store (``RequestStore.ingest``, in the UI thread), each counted alone.  Use 10,000
requests: valgrind runs some 50 times slower.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import callgrind_total, load_average
from hopscope.tracing import load
from hopscope.tracing.records import Record, to_events
from hopscope.tracing.sinks import FileSink
from hopscope.tracing.tracefile import SUMMARY_PREFIX, SummaryScan, TraceFileWriter
from hopscope.tui.app import HopscopeApp
from hopscope.tui.request_list import RequestList
from hopscope.tui.source import open_file
from hopscope.tui.store import TRACE, RequestStore
from tui_ingest import INFO, request_records

GOAL_S = 3.0
#: 2025-01-01 12:00:00 UTC
BASE_NS = 1_735_732_800_000_000_000


def write_with_file_sink(path: str, requests: int, rate: int = 2000) -> int:
    """The same requests written by ``FileSink(path)`` itself, with its defaults (its
    drain's write, called here batch by batch: no queue to overflow); returns the event
    count."""
    rng = random.Random(7)
    count = 0
    sink = FileSink(path)
    try:
        batch: list[Record] = []
        for n in range(requests):
            records = request_records(n, BASE_NS + n * 1_000_000_000 // rate, rng)
            count += sum(len(to_events(record)) for record in records)
            batch += records
            if n % 64 == 63:
                sink._write(batch, 0)
                batch = []
        sink._write(batch, 0)
    finally:
        sink.close()
    return count


def write_file(path: str, requests: int, rate: int = 2000) -> int:
    """A trace file of ``requests`` requests ``1/rate`` s apart, written as ``FileSink``
    writes one (batches of 64 requests); returns its event count."""
    rng = random.Random(7)
    count = 0
    writer = TraceFileWriter.create(path)
    try:
        batch: list[dict[str, Any]] = []
        for n in range(requests):
            for record in request_records(n, BASE_NS + n * 1_000_000_000 // rate, rng):
                batch += to_events(record, INFO)
            if n % 64 == 63:
                count += len(batch)
                writer.write(batch)
                batch = []
        count += len(batch)
        writer.write(batch)
    finally:
        writer.close()
    return count


def old_format_copy(path: str, old: str) -> None:
    """``path`` as hopscope wrote it before summaries: version 1.0, events only."""
    with open(path, "rb") as source, open(old, "wb") as target:
        header = json.loads(source.readline())
        header["version"] = "1.0"
        target.write(json.dumps(header, separators=(",", ":")).encode() + b"\n")
        for line in source:
            if not line.startswith(SUMMARY_PREFIX):
                target.write(line)


def time_load(path: str) -> dict[str, Any]:
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    traces = load(path)
    result = {
        "wall_s": round(time.perf_counter() - wall, 2),
        "cpu_s": round(time.process_time() - cpu, 2),
        "traces": len(traces),
    }
    del traces
    gc.collect()
    return result


async def time_view(path: str, requests: int) -> dict[str, Any]:
    """From nothing to every request in the store and the list drawn with them."""
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    source = open_file(path)
    app = HopscopeApp(source, title="hopscope view", max_requests=requests)
    loaded_at: list[float] = []
    drawn_at: list[float] = []
    first_at: list[float] = []
    first_cpu: list[float] = []
    store, inbox = app.store, app.inbox
    original_ingest = store.ingest
    original_render = RequestList.render_lines

    def all_in() -> bool:
        return len(store.rows) >= requests and inbox.pending == 0

    def timed_ingest(*args: Any) -> Any:
        change = original_ingest(*args)
        if not loaded_at and all_in():
            loaded_at.append(time.perf_counter())
        return change

    def timed_render(widget: RequestList, crop: Any) -> Any:
        strips = original_render(widget, crop)
        if not first_at and len(store) >= min(requests, widget.size.height):
            first_at.append(time.perf_counter())
            first_cpu.append(time.process_time() - cpu)
        if loaded_at and not drawn_at:
            drawn_at.append(time.perf_counter())
        return strips

    # Hooked before the app runs: a small file is all in before the first screen, and
    # hooks set up after that never fired (the run waited for the timeout).
    store.ingest = timed_ingest  # type: ignore[method-assign]
    RequestList.render_lines = timed_render  # type: ignore[assignment,method-assign]
    try:
        async with app.run_test(size=(120, 35)):
            request_list = app.request_list
            deadline = time.perf_counter() + 600
            refreshed = False
            while not drawn_at and time.perf_counter() < deadline:
                if loaded_at and not refreshed:
                    request_list.refresh()  # in case the last ingest drew before it was done
                    refreshed = True
                await asyncio.sleep(0.005)
            cpu_used = time.process_time() - cpu
            held = len(store.rows)
    finally:
        RequestList.render_lines = original_render  # type: ignore[method-assign]
    if not drawn_at:
        raise SystemExit(f"the view did not hold {requests:,} requests within 600 s ({held:,})")
    return {
        "first_screen_s": round(first_at[0] - wall, 2),
        "first_screen_cpu_s": round(first_cpu[0], 2),
        "loaded_s": round(loaded_at[0] - wall, 2),
        "drawn_s": round(drawn_at[0] - wall, 2),
        "cpu_s": round(cpu_used, 2),
        "requests_held": held,
    }


def scan_file(path: str) -> list[list[Any]]:
    """The batches of rows ``FileSource`` hands the UI (without the inbox or a thread)."""
    batches = []
    for traces, dropped in SummaryScan(path).chunks():
        batch = [
            {"kind": TRACE, "trace": trace, "replace": True} if again else trace
            for trace, again in traces
        ]
        batches.append(batch + dropped)
    return batches


def counted_child(path: str, part: str) -> None:
    """Runs under valgrind: only what ``functools.reduce`` calls is counted."""
    batches = scan_file(path) if part == "ingest" else []
    gc.collect()
    gc.freeze()
    gc.disable()  # as FileSource does while it reads

    def step(_: Any, __: Any) -> Any:
        if part == "scan":
            return scan_file(path)
        store = RequestStore(10_000_000, freeze_gc=False)
        for batch in batches:
            store.ingest(batch)
        return store

    functools.reduce(step, [1], None)


def count_instructions(path: str, part: str) -> int:
    out = f"{path}.callgrind.{part}"
    argv = [sys.executable, os.path.abspath(__file__), "--child", part, path]
    count = callgrind_total(argv, out, {**os.environ, "PYTHONHASHSEED": "0"})
    os.unlink(out)
    return count


def from_start(path: str, requests: int) -> dict[str, Any]:
    """:func:`time_view` in a new interpreter, its times counted from before it started."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    script = os.path.abspath(__file__)
    command = [sys.executable, script, "--cold-child", "0", path, str(requests)]
    # Once untimed, so the bytecode caches exist (a fresh install compiles them).
    subprocess.run([*command[:3], "--warm"], env=env, check=True)
    command[3] = str(time.time_ns())
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return dict(json.loads(output.stdout))


def cold_child(started_ns: int, path: str, requests: int) -> None:
    """The ``--from-start`` child: its imports are done; the view's times get the time
    since ``started_ns`` (the parent's clock before it started this process) added."""
    before = (time.time_ns() - started_ns) / 1e9
    result = asyncio.run(time_view(path, requests))
    for key in ("first_screen_s", "loaded_s", "drawn_s"):
        result[key] = round(result[key] + before, 2)
    result["started_s"] = round(before, 2)
    print(json.dumps(result))


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        counted_child(sys.argv[3], sys.argv[2])
        return
    if sys.argv[1:2] == ["--cold-child"]:
        if sys.argv[2:3] != ["--warm"]:
            cold_child(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=1, help="times each measurement")
    parser.add_argument(
        "--keep", metavar="FILE", help="write the file here and keep it (reused if present)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--skip-load", action="store_true", help="time only the view")
    parser.add_argument("--skip-old", action="store_true", help="time only the file with summaries")
    parser.add_argument(
        "--filesink",
        action="store_true",
        help="write the file through FileSink(path), with its defaults (implies --skip-old)",
    )
    parser.add_argument(
        "--from-start", action="store_true", help="also time the view from a new interpreter"
    )
    parser.add_argument(
        "--callgrind", action="store_true", help="count instructions per request instead"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="hopscope-view-") as tmp:
        path = args.keep or os.path.join(tmp, "trace.jsonl")
        old = os.path.join(tmp, "old.jsonl")
        began = time.perf_counter()
        if args.keep and os.path.exists(path):
            events = sum(1 for line in open(path, "rb") if not line.startswith(SUMMARY_PREFIX))
            events -= 1
        elif args.filesink:
            events = write_with_file_sink(path, args.requests)
        else:
            events = write_file(path, args.requests)
        args.skip_old = args.skip_old or args.filesink
        if args.callgrind:
            print(f"{args.requests:,} requests; {load_average()}; instructions per request:")
            for part in ("scan", "ingest"):
                count = count_instructions(path, part)
                print(f"  {part}: {count / args.requests:,.0f}")
            return
        if not args.skip_old:
            old_format_copy(path, old)
        size = os.path.getsize(path)
        old_size = 0 if args.skip_old else os.path.getsize(old)
        if not args.json:
            print(
                f"{args.requests:,} requests, {events:,} events, {size / 1e6:.0f} MB"
                f" {'as FileSink(path) writes it' if args.filesink else 'with summaries'},"
                f" {old_size / 1e6:.0f} MB without (made in"
                f" {time.perf_counter() - began:.0f} s, untimed); goal {GOAL_S:g} s all loaded"
            )
        result: dict[str, Any] = {"requests": args.requests, "events": events}
        first = "filesink" if args.filesink else "summarised"
        files = [(first, path)] + ([] if args.skip_old else [("old_format", old)])
        for name, file in files:
            loads = [] if args.skip_load else [time_load(file) for _ in range(args.repeat)]
            views = [asyncio.run(time_view(file, args.requests)) for _ in range(args.repeat)]
            starts = []
            if args.from_start and name == first:
                starts = [from_start(file, args.requests) for _ in range(args.repeat)]
            result[name] = {
                "bytes": os.path.getsize(file),
                "load": min(loads, key=lambda r: r["cpu_s"]) if loads else None,
                "view": min(views, key=lambda r: r["cpu_s"]),
                "from_start": [r["loaded_s"] for r in starts],
                "started": [r["started_s"] for r in starts],
            }
    if args.json:
        print(json.dumps(result))
        return
    for name in ("summarised", "filesink", "old_format"):
        if name not in result:
            continue
        best_load, best_view = result[name]["load"], result[name]["view"]
        print(f"{name}:")
        if best_load:
            print(f"  load(): {best_load['wall_s']} s wall, {best_load['cpu_s']} s CPU")
        flag = "" if best_view["loaded_s"] <= GOAL_S else "  OVER GOAL"
        print(
            f"  view: first screen after {best_view['first_screen_s']} s wall"
            f" ({best_view['first_screen_cpu_s']} s CPU); all"
            f" {best_view['requests_held']:,} requests held after {best_view['loaded_s']} s"
            f" wall{flag}, drawn after {best_view['drawn_s']} s wall ({best_view['cpu_s']} s"
            " CPU)"
        )
        if result[name]["from_start"]:
            print(
                "  from the command's start (interpreter and imports"
                f" {', '.join(map(str, result[name]['started']))} s): all held after"
                f" {', '.join(map(str, result[name]['from_start']))} s wall"
            )


if __name__ == "__main__":
    main()
