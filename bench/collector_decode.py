"""What the collector spends per request, decoding what apps send it.

Run: ``python bench/collector_decode.py [--requests N] [--rounds R]``.

Why: on a small machine the collector shares the cores with the app and the load
generator, so every microsecond it spends per request is taken from the app's
throughput (bench/overhead.py's end-to-end ratio).  This feeds the collector the frames a
SocketSink really sends (``"r"`` records of hello-world requests made by the real
middlewares, 256 per frame as a busy sink drains them) and prints CPU microseconds per
request, from the frame's bytes to what each kind of consumer does with it:

* ``none``: no consumer and no file (what bench/overhead.py's collector process does);
* ``tail``: ``hopscope tail --listen``'s consumer, printing its lines into a buffer;
* ``file``: the ``-o FILE`` writer, into /dev/null;
* ``events``: a consumer that walks every wire event it is given (UIs, OTLP export);
* ``tail-base``: the tail of another version of app/tail.py, side by side with ``tail``
  (``--base-tail FILE``, e.g. from ``git show HEAD~1:app/tail.py > /tmp/tail.py``).

No sockets, no event loop: only the collector's own work is timed.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # the hello-world apps
import overhead  # the fake servers

FRAME_RECORDS = 256


def records_of(framework: str, n: int) -> list[tuple[Any, ...]]:
    """``n`` records of hello-world requests, as the middleware made them."""
    from hopscope.tracing import MemorySink

    sink = MemorySink()
    make = _common.starlette_hello if framework == "asgi" else _common.flask_hello
    app = overhead.wrapped(make(), "hopscope", sink, framework)
    if framework == "asgi":
        overhead.drive_asgi(app, n, lambda: None)
    else:
        overhead.drive_wsgi(app, n, lambda: None)
    records = sink.records()
    assert len(records) == n and all(r[0] == "r" for r in records), "expected 'r' records"
    return records


def frames_of(records: list[tuple[Any, ...]]) -> list[bytes]:
    """The payloads a SocketSink sends for these records (length prefix stripped)."""
    from hopscope.tracing.records import process_info
    from hopscope.tracing.sinks import encode_frame

    info = process_info(os.getpid())
    info["server.software"] = "uvicorn/0.54.0"
    return [
        encode_frame(records[i : i + FRAME_RECORDS], 0, info)[4:]
        for i in range(0, len(records), FRAME_RECORDS)
    ]


def _walk(events: Any) -> None:
    for event in events:
        event["attrs"]


def load_tail(path: str) -> Any:
    """The ``Tail`` class of another version of app/tail.py."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tail_base", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Tail


BASE_TAIL: Any = None
#: What each tail printed, last round: ``tail`` and ``tail-base`` must agree.
PRINTED: dict[str, str] = {}


def consumer_for(kind: str) -> tuple[Callable[..., None] | None, Any, Callable[[], None]]:
    """(consumer, output file or None, what to call at the end)."""
    if kind == "none":
        return None, None, lambda: None
    if kind == "file":
        return None, os.devnull, lambda: None
    if kind == "events":
        return _walk, None, lambda: None
    from hopscope.app.tail import Tail

    buffer = io.StringIO()
    tail = (BASE_TAIL if kind == "tail-base" else Tail)(buffer, live=False, hold=0)

    def done() -> None:
        tail.close()
        PRINTED[kind] = buffer.getvalue()
        lines = PRINTED[kind].count("\n")
        assert lines > 0, "the tail printed nothing"

    return tail.feed, None, done


def run_once(frames: list[bytes], kind: str, requests: int) -> float:
    """CPU microseconds per request to decode and deliver ``frames``."""
    from hopscope.app.collector import Collector
    from hopscope.tracing.sinks import decode_frame

    consumer, output, done = consumer_for(kind)
    collector = Collector("127.0.0.1:0", consumer, output=output)
    if output is not None:
        from hopscope.app.collector import EventWriter

        collector.writer = EventWriter(output)
    deliver = collector._deliver
    began = time.process_time()
    for payload in frames:
        info, dropped, records = decode_frame(payload)
        collector.frames += 1
        deliver(info, dropped, records)
    done()
    elapsed = time.process_time() - began
    if collector.writer is not None:
        collector.writer.close()
    return elapsed / requests * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", choices=("asgi", "wsgi"))
    parser.add_argument(
        "--consumers", default="none,tail,file,events", help="comma-separated, of the above"
    )
    parser.add_argument("--base-tail", metavar="FILE", help="adds the consumer tail-base")
    args = parser.parse_args()
    if args.base_tail:
        global BASE_TAIL
        BASE_TAIL = load_tail(args.base_tail)
        if "tail-base" not in args.consumers:
            args.consumers += ",tail-base"
    kinds = [k for k in args.consumers.split(",") if k]
    frameworks = [args.only] if args.only else ["asgi", "wsgi"]
    print(
        f"python {sys.version.split()[0]}; {args.requests} requests, {FRAME_RECORDS} per frame, "
        f"median (best) of {args.rounds} rounds; CPU microseconds per request"
    )
    for framework in frameworks:
        frames = frames_of(records_of(framework, args.requests))
        size = sum(map(len, frames)) / args.requests
        times: dict[str, list[float]] = {k: [] for k in kinds}
        run_once(frames, kinds[0], args.requests)  # warm up
        for _ in range(args.rounds):
            for kind in kinds:
                times[kind].append(run_once(frames, kind, args.requests))
        if "tail" in PRINTED and "tail-base" in PRINTED:
            assert PRINTED["tail"] == PRINTED["tail-base"], "the two tails printed different lines"
        cells = "  ".join(
            f"{k} {statistics.median(v):6.2f} ({min(v):.2f})" for k, v in times.items()
        )
        print(f"  {framework}: {size:5.0f} wire bytes/request;  {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
