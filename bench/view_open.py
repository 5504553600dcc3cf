"""How long ``hopscope view`` takes to open a 100,000-request trace file (goal: under 3 s).

Run: ``python bench/view_open.py [--requests 100000] [--repeat 1] [--keep FILE]``.

A trace file in the real format (a header line, then one wire event per line, as the
collector's ``-o`` and the UI's save write it) is generated in a temporary directory,
untimed: each request is the one ``bench/tui_ingest.py`` streams, a queue span, the
server hop, the app span with its headers, a user span, body and response events, about
10 events, so 100,000 requests are about a million lines (220 MB).  Then, timed:

- ``load``: ``hopscope.tracing.load(path)``, the file into assembled traces;
- ``view``: what ``hopscope view --max-requests N FILE`` does (``open_file`` and the
  app), driven headless with Textual's ``run_test`` at 120x35: the time to the *first
  screen* (the request list drawn with a screenful of requests, while the rest still
  loads in the background), and the time until the UI's store holds every request and
  the request list has drawn the screen after that (*all loaded*).

Both report wall and CPU time: on a shared machine the wall time mostly measures the
neighbours, so compare CPU times across runs, and say the load average (``uptime``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hopscope.tracing import load
from hopscope.tracing.records import to_events
from hopscope.tracing.tracefile import header_line
from hopscope.tui.app import HopscopeApp
from hopscope.tui.source import open_file
from tui_ingest import INFO, request_records

GOAL_S = 3.0
#: 2025-01-01 12:00:00 UTC
BASE_NS = 1_735_732_800_000_000_000


def write_file(path: str, requests: int, rate: int = 2000) -> int:
    """A trace file of ``requests`` requests ``1/rate`` s apart; returns its event count."""
    rng = random.Random(7)
    dumps = json.JSONEncoder(separators=(",", ":"), default=repr).encode
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(header_line())
        for n in range(requests):
            lines = [
                dumps(event)
                for record in request_records(n, BASE_NS + n * 1_000_000_000 // rate, rng)
                for event in to_events(record, INFO)
            ]
            count += len(lines)
            handle.write("\n".join(lines) + "\n")
    return count


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
    async with app.run_test(size=(120, 35)):
        store, inbox, request_list = app.store, app.inbox, app.request_list
        original_ingest, original_render = store.ingest, request_list.render_lines

        def all_in() -> bool:
            return len(store.rows) >= requests and inbox.pending == 0

        def timed_ingest(*args: Any) -> Any:
            change = original_ingest(*args)
            if not loaded_at and all_in():
                loaded_at.append(time.perf_counter())
            return change

        def timed_render(crop: Any) -> Any:
            strips = original_render(crop)
            if not first_at and len(store) >= min(requests, request_list.size.height):
                first_at.append(time.perf_counter())
                first_cpu.append(time.process_time() - cpu)
            if loaded_at and not drawn_at:
                drawn_at.append(time.perf_counter())
            return strips

        store.ingest = timed_ingest  # type: ignore[method-assign]
        request_list.render_lines = timed_render  # type: ignore[method-assign]
        deadline = time.perf_counter() + 600
        refreshed = False
        while not drawn_at and time.perf_counter() < deadline:
            if loaded_at and not refreshed:
                request_list.refresh()  # in case the last ingest drew before it was done
                refreshed = True
            await asyncio.sleep(0.005)
        cpu_used = time.process_time() - cpu
        held = len(store.rows)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=1, help="times each measurement")
    parser.add_argument(
        "--keep", metavar="FILE", help="write the file here and keep it (reused if present)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--skip-load", action="store_true", help="time only the view")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="hopscope-view-") as tmp:
        path = args.keep or os.path.join(tmp, "trace.jsonl")
        began = time.perf_counter()
        if args.keep and os.path.exists(path):
            events = sum(1 for _ in open(path, "rb")) - 1
        else:
            events = write_file(path, args.requests)
        size = os.path.getsize(path)
        if not args.json:
            print(
                f"{args.requests:,} requests, {events:,} events, {size / 1e6:.0f} MB"
                f" (made in {time.perf_counter() - began:.0f} s, untimed); goal {GOAL_S:g} s"
            )
        loads = [] if args.skip_load else [time_load(path) for _ in range(args.repeat)]
        views = [asyncio.run(time_view(path, args.requests)) for _ in range(args.repeat)]
    result = {
        "requests": args.requests,
        "events": events,
        "bytes": size,
        "load": min(loads, key=lambda r: r["cpu_s"]) if loads else None,
        "view": min(views, key=lambda r: r["cpu_s"]),
    }
    if args.json:
        print(json.dumps(result))
        return
    best_load, best_view = result["load"], result["view"]
    if best_load:
        print(f"load(): {best_load['wall_s']} s wall, {best_load['cpu_s']} s CPU")
    flag = "" if best_view["first_screen_s"] <= GOAL_S else "  OVER GOAL"
    print(
        f"view: first screen after {best_view['first_screen_s']} s wall"
        f" ({best_view['first_screen_cpu_s']} s CPU){flag}; all {best_view['requests_held']:,}"
        f" requests held after {best_view['loaded_s']} s, drawn after {best_view['drawn_s']} s"
        f" wall ({best_view['cpu_s']} s CPU)"
    )


if __name__ == "__main__":
    main()
