"""The live UI under load: can it fold 2,000 requests/s and still answer keys quickly?

Run: ``python bench/tui_ingest.py [--rate 2000] [--seconds 10] [--json]``.

The app runs headless (Textual's ``run_test``) at 120x35, fed by a ``QueueSource`` from a
producer thread that pushes, every 10 ms, the requests due by then: about 10 wire events
per request (queue, server, app and a user span, body and response events), so 2,000
requests/s is about 20,000 events/s, which is what a collector hands the UI.  Traffic
is made before the clock starts and kept as marshal frames (not as live objects, which
would slow every garbage collection of the UI process); the producer thread loads each
frame when it is due.  By default frames hold ready wire events, as a collector in
another process would send them; ``--collector-in-process`` makes them records that the
producer turns into events (``to_events``), so the UI also shares the interpreter with
the collector's work.

While it runs, a key ("up" or "down", which moves the cursor and redraws the selected
request's detail) is sent every 100 ms through the same driver path a terminal uses.
Reported:

- keypress latency: key sent to its action running, and to the list's next repaint
  (p50, p99, max);
- ingest: requests folded per second, the backlog left in the inbox, events dropped;
- bytes per request held in the ring buffer, measured with ``tracemalloc`` on the store
  alone (the UI's own memory does not grow with requests).

Figures vary with the machine and its neighbours; compare runs on one machine.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import marshal
import random
import statistics
import threading
import time
import tracemalloc
from typing import Any

from hopscope.tracing.records import Record, new_span_id, new_trace_id, to_events
from hopscope.tui.app import HopscopeApp
from hopscope.tui.source import QueueSource
from hopscope.tui.store import RequestStore
from textual import events

Event = dict[str, Any]
INFO = {"process.pid": 4242}

PATHS = ("/api/items/{n}", "/api/users/{n}", "/api/items", "/health", "/static/app.js")


def request_records(n: int, t: int, rng: random.Random) -> list[Record]:
    """One request as the server hop and the ASGI middleware record it (~10 events)."""
    trace, queue, server, app, user = (new_trace_id(), *(new_span_id() for _ in range(4)))
    path = rng.choice(PATHS).format(n=n)
    status = rng.choices((200, 201, 304, 404, 500), (80, 5, 5, 7, 3))[0]
    took = int(rng.lognormvariate(15, 0.8))  # ~3 ms median
    headers = [
        (b"host", b"api.example.com"),
        (b"user-agent", b"bench/1.0"),
        (b"accept", b"application/json"),
        (b"x-request-id", f"{n:08d}".encode()),
    ]
    body = b'{"id": %d, "name": "item %d", "tags": ["a", "b"]}' % (n, n)
    records: list[Record] = [
        ("c", t, t + 200_000, trace, queue, 0, "server", "queue", 1, {"span.kind": "queue"}),
        ("s", t + 200_000, trace, server, 0, "server", f"GET {path}", 1, {"url.path": path}),
        (
            "s",
            t + 300_000,
            trace,
            app,
            server,
            "app",
            f"GET {path}",
            1,
            {
                "interface": "asgi",
                "http.request.method": "GET",
                "url.scheme": "http",
                "url.path": path,
                "url.query": "",
                "http.request.headers": headers,
            },
        ),
        ("p", t + 350_000, trace, app, "request.body", {"size": 0, "more": False}),
        ("c", t + 400_000, t + 400_000 + took // 2, trace, user, app, "app", "db", 1, None),
        ("p", t + 400_000 + took, trace, app, "response.start", {"status": status}),
    ]
    end: dict[str, Any] = {
        "http.response.status_code": status,
        "http.response.headers": [(b"content-type", b"application/json")],
        "http.response.body": [body],
        "http.response.body.size": len(body),
    }
    if status == 500:
        records.append(("p", t + 450_000 + took, trace, app, "exception", {"phase": "x"}))
        end["error"] = True
    records.append(("e", t + 500_000 + took, trace, app, end))
    records.append(("e", t + 600_000 + took, trace, server, None))
    return records


def make_frames(seconds: float, rate: int, *, records: bool) -> list[bytes]:
    """One marshal frame per 10 ms: of records (as apps send them to a collector), or of
    the wire events a collector makes of them.

    Kept as bytes so the run's future traffic is not millions of live objects, which
    would make every garbage collection in the UI process look far slower than it is.
    """
    rng = random.Random(7)
    start = time.time_ns()
    per_frame = rate / 100
    frames = []
    made = 0
    for index in range(int(seconds * 100)):
        due = int((index + 1) * per_frame)
        batch = [
            r
            for n in range(made, due)
            for r in request_records(n, start + n * 1_000_000_000 // rate, rng)
        ]
        if not records:
            batch = [e for r in batch for e in to_events(r, INFO)]
        frames.append(marshal.dumps(batch))
        made = due
    return frames


def decode(frame: bytes, records: bool) -> list[Event]:
    """Wire events of a frame; from records, that is the collector's work (``to_events``)."""
    batch = marshal.loads(frame)
    return [e for r in batch for e in to_events(r, INFO)] if records else list(batch)


def producer(
    source: QueueSource,
    frames: list[bytes],
    records: bool,
    pushed: list[int],
    stop: threading.Event,
) -> None:
    """Plays the collector: every 10 ms, decode the frame due and push its events."""
    begin = time.perf_counter()
    for index, frame in enumerate(frames):
        if stop.is_set():
            return
        delay = begin + index * 0.01 - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        events = decode(frame, records)
        pushed[0] += len({e["trace_id"] for e in events})
        source.push(events)


def percentile(values: list[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def drive(rate: int, seconds: float, frames: list[bytes], records: bool) -> dict[str, Any]:
    source = QueueSource("bench")
    app = HopscopeApp(source, max_requests=50_000)
    sent_at: list[float] = []
    handled: list[float] = []
    painted: list[float] = []
    async with app.run_test(size=(120, 35)) as pilot:
        await pilot.pause(0.2)
        request_list = app.request_list
        original_cursor = request_list.action_cursor
        original_render = request_list.render_lines

        def timed_cursor(delta: int) -> None:
            handled.append(time.perf_counter() - sent_at[-1])
            original_cursor(delta)

        def timed_render(crop: Any) -> Any:
            if len(painted) < len(handled):
                painted.append(time.perf_counter() - sent_at[len(painted)])
            return original_render(crop)

        request_list.action_cursor = timed_cursor  # type: ignore[method-assign]
        request_list.render_lines = timed_render  # type: ignore[method-assign]

        full_gc: list[float] = []
        gc_started = [0.0]

        def on_gc(phase: str, info: dict[str, int]) -> None:
            # Full collections walk every object the ring buffer holds: they are the
            # pauses to watch as it fills.
            if info["generation"] != 2:
                return
            if phase == "start":
                gc_started[0] = time.perf_counter()
            else:
                full_gc.append(time.perf_counter() - gc_started[0])

        gc.callbacks.append(on_gc)
        stop = threading.Event()
        pushed = [0]
        thread = threading.Thread(target=producer, args=(source, frames, records, pushed, stop))
        begin = time.perf_counter()
        cpu_begin = time.thread_time()  # this thread is the UI's event loop
        thread.start()
        driver = app._driver
        assert driver is not None
        keys = 0
        while time.perf_counter() - begin < seconds:
            if len(handled) == len(sent_at):  # one key in flight at a time
                key = "up" if keys % 2 == 0 else "down"
                event = events.Key(key, None)
                event.set_sender(app)
                sent_at.append(time.perf_counter())
                driver.send_message(event)
                keys += 1
            await asyncio.sleep(0.1)
        elapsed = time.perf_counter() - begin
        ui_cpu = time.thread_time() - cpu_begin
        folded = app.store.total
        backlog = app.inbox.pending
        stop.set()
        thread.join()
        gc.callbacks.remove(on_gc)
        result = {
            "rate_asked": rate,
            "seconds": round(elapsed, 2),
            "requests_pushed": pushed[0],
            "requests_folded": folded,
            "folded_per_s": round(folded / elapsed),
            "backlog_events": backlog,
            "dropped_events": app.inbox.dropped,
            "ui_thread_cpu_share": round(ui_cpu / elapsed, 2),
            "ticks": app.ticks,
            "keys": len(handled),
            "key_to_action_ms": summary(handled),
            "key_to_repaint_ms": summary(painted),
            "gc_full_collections": {
                "count": len(full_gc),
                "longest_ms": round(max(full_gc, default=0) * 1000, 1),
            },
        }
    return result


def summary(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {
        "p50": round(statistics.median(ms), 1) if ms else float("nan"),
        "p99": round(percentile(ms, 0.99), 1),
        "max": round(max(ms), 1) if ms else float("nan"),
    }


def bytes_per_request(frames: list[bytes], records: bool) -> int:
    """What the ring buffer holds per request: builder, rows and view, as allocated.

    Each frame's events are dropped once folded, as in the UI, so what stays allocated is
    what the store keeps of them.
    """
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    store = RequestStore(max_requests=1_000_000)
    for frame in frames:
        store.ingest(decode(frame, records))
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) // len(store)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=2000, help="requests per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--collector-in-process",
        action="store_true",
        help="turn records into events (to_events) in the producer thread, as a collector "
        "running inside the UI's process would; by default frames carry ready events, as "
        "from a collector in another process",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    records = args.collector_in_process
    frames = make_frames(args.seconds + 2, args.rate, records=records)
    sample = [e for frame in frames[:100] for e in decode(frame, records)]
    events_per_request = len(sample) / len({e["trace_id"] for e in sample})
    result = asyncio.run(drive(args.rate, args.seconds, frames, records))
    result["collector_in_process"] = records
    result["events_per_request"] = round(events_per_request, 1)
    first = frames[: max(1, 10_000 * 100 // args.rate)]  # about 10,000 requests
    result["bytes_per_request"] = bytes_per_request(first, records)
    if args.json:
        print(json.dumps(result))
        return
    per_s = args.rate * events_per_request
    print(f"asked {args.rate:,} req/s (~{per_s:,.0f} events/s) for {result['seconds']} s")
    print(
        f"folded {result['requests_folded']:,} of {result['requests_pushed']:,} requests "
        f"({result['folded_per_s']:,}/s); backlog {result['backlog_events']:,} events, "
        f"dropped {result['dropped_events']:,}"
    )
    for name in ("key_to_action_ms", "key_to_repaint_ms"):
        s = result[name]
        print(f"{name}: p50 {s['p50']} ms  p99 {s['p99']} ms  max {s['max']} ms")
    print(f"keys sent: {result['keys']}")
    gc_info = result["gc_full_collections"]
    print(f"full GC collections: {gc_info['count']}, longest {gc_info['longest_ms']} ms")
    print(f"UI thread busy {result['ui_thread_cpu_share']:.0%} of the time (CPU)")
    print(f"ring buffer: {result['bytes_per_request']:,} bytes per request")


if __name__ == "__main__":
    main()
