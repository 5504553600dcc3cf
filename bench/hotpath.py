"""The middlewares' own cost per request, measured without a server and without noise.

Run: ``python bench/hotpath.py`` (CPU microseconds, best of alternating rounds) or
``python bench/hotpath.py --callgrind`` (instructions per request, counted by valgrind:
the same on a busy machine as on an idle one, so small changes can be compared).

A Starlette and a Flask hello world are driven directly: a fresh scope (environ) per
request, ``receive``/``send`` (``start_response``) that do nothing, and the ASGI coroutine
stepped by hand (the app never waits, so no event loop is needed and none is counted).
Each runs bare and wrapped; wrapped minus bare is what the middleware adds.  The sink
takes each request's recording like a real sink does and lets them go every
:data:`DRAIN_EVERY` requests; with ``--take`` it also makes their records then, and
with ``--encode`` also marshals them into a wire frame, as a SocketSink does before it
sends (that work is in the app's process too, done now and then by a request's thread).
With ``--fresh`` each ASGI request's headers are new objects, as a server parses them: the
same objects in every request let marshal write most of them as back-references, which
counts its work per request about 3.5k instructions short (Starlette hello world).

Under ``--callgrind`` each variant runs in its own ``valgrind --tool=callgrind`` process
that counts only what runs inside the measured loop (``--toggle-collect`` on the C
function driving it), so interpreter start-up, imports and warm-up are left out, with
``PYTHONHASHSEED=0`` unless it is set (dict probe counts follow the hash seed).  Counts
still move by 1-4k instructions per request with the process's memory layout (the length
of the command line and the environment: ``--take`` moves even the bare variant's), so
compare two versions of a middleware by runs with the same command and environment
(``--keep DIR`` keeps the out files for ``callgrind_annotate``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import io
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from _common import (
    ASGI_SCOPE,
    WSGI_ENVIRON,
    callgrind_total,
    flask_hello,
    load_average,
    starlette_hello,
)
from hopscope.tracing.records import process_info
from hopscope.tracing.sinks import Recording, Sink, encode_frame

#: Requests between two "drains" of the bench sink.
DRAIN_EVERY = 1000
#: ``--encode``: drains also marshal a frame (set once, before any variant is made).
ENCODE = False
#: ``--fresh``: each request's header pairs are new objects (set once, like ENCODE).
FRESH = False
VARIANTS = ("asgi-bare", "asgi-wrapped", "wsgi-bare", "wsgi-wrapped")


class BenchSink(Sink):
    """Takes recordings like a SocketSink (a reference in a queue) and drops them at
    each :meth:`drain`; with ``take`` it first makes their records, as a drain would,
    and with ``encode`` also marshals them into a frame."""

    def __init__(self, take: bool = False, encode: bool = False) -> None:
        self.queue: list[Any] = []
        self.take = take or encode
        self.encode = encode
        self.info = process_info(os.getpid())
        self.records = 0

    def emit(self, record: Any) -> None:
        self.queue.append(record)

    def start_live(self, recording: Recording) -> bool:
        self.queue.append(recording)
        return True

    def drain(self) -> None:
        if self.take:
            out: list[Any] = []
            for item in self.queue:
                if isinstance(item, Recording):
                    if not item.take(out):
                        raise AssertionError("a request was not over at the drain")
                else:
                    out.append(item)
            self.records += len(out)
            if self.encode:
                encode_frame(out, 0, self.info)
        self.queue.clear()


def asgi_step(app: Any, sink: BenchSink | None) -> Callable[[Any, int], Any]:
    """One request per call, as ``functools.reduce`` calls it."""
    request = {"type": "http.request", "body": b"", "more_body": False}
    scope = ASGI_SCOPE
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return request

    async def send(message: Any) -> None:
        sent.append(message)

    drain = sink.drain if sink is not None else sent.clear
    pairs = [(bytearray(name), bytearray(value)) for name, value in scope["headers"]]
    fresh = FRESH

    def step(acc: Any, i: int) -> Any:
        this = dict(scope)
        if fresh:  # (the bare variant makes them too: the difference is the middleware's)
            this["headers"] = [(bytes(name), bytes(value)) for name, value in pairs]
        coroutine = app(this, receive, send)
        try:
            coroutine.send(None)
        except StopIteration:
            pass
        else:  # pragma: no cover - the hello world never waits
            raise AssertionError("the app waited for something")
        if len(sent) != 2:
            raise AssertionError(f"unexpected messages: {sent}")
        sent.clear()
        if not i % DRAIN_EVERY:
            drain()
        return acc

    return step


def _discard(data: bytes) -> None:
    pass


def wsgi_step(app: Any, sink: BenchSink | None) -> Callable[[Any, int], Any]:
    environ = WSGI_ENVIRON
    bytes_io = io.BytesIO
    statuses: list[str] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        statuses.append(status)
        return _discard

    drain = sink.drain if sink is not None else statuses.clear

    def step(acc: Any, i: int) -> Any:
        env = dict(environ)
        env["wsgi.input"] = bytes_io(b"")
        result = app(env, start_response)
        try:
            body = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        if body != b"Hello, world!" or statuses[-1] != "200 OK":
            raise AssertionError(f"unexpected response: {statuses[-1]} {body!r}")
        if not i % DRAIN_EVERY:
            statuses.clear()
            drain()
        return acc

    return step


def make_step(variant: str, take: bool) -> tuple[Callable[[Any, int], Any], BenchSink | None]:
    framework, mode = variant.split("-")
    app = starlette_hello() if framework == "asgi" else flask_hello()
    sink = None
    if mode == "wrapped":
        from hopscope.tracing import wrap

        sink = BenchSink(take, ENCODE)
        app = wrap(app, sink=sink, capture_logs=False)
    step = (asgi_step if framework == "asgi" else wsgi_step)(app, sink)
    return step, sink


def run(step: Callable[[Any, int], Any], sink: BenchSink | None, n: int) -> None:
    # ``functools.reduce`` is the C function callgrind's counting is toggled on by.
    functools.reduce(step, range(1, n + 1), None)
    if sink is not None:
        sink.drain()


# --------------------------------------------------------------------------------------
# CPU time mode
# --------------------------------------------------------------------------------------


def cpu_mode(n: int, rounds: int, take: bool) -> None:
    steps = {variant: make_step(variant, take) for variant in VARIANTS}
    for step, sink in steps.values():
        run(step, sink, 2000)  # warm up
    gc.collect()
    gc.freeze()  # see child()
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for _ in range(rounds):
        for variant, (step, sink) in steps.items():
            gc.collect()
            began = time.process_time()
            run(step, sink, n)
            times[variant].append((time.process_time() - began) / n * 1e6)
    print(f"CPU us/request, best of {rounds} rounds of {n} ({_flags(take)}); {load_average()}")
    for framework in ("asgi", "wsgi"):
        bare, wrapped = min(times[f"{framework}-bare"]), min(times[f"{framework}-wrapped"])
        print(
            f"  {framework}: bare {bare:7.2f}  wrapped {wrapped:7.2f}  "
            f"added {wrapped - bare:6.2f} us ({wrapped / bare:.2f}x)"
        )


# --------------------------------------------------------------------------------------
# callgrind mode
# --------------------------------------------------------------------------------------


def child(variant: str, n: int, take: bool) -> None:
    """Runs under valgrind: warm up (a Python loop: not counted), then the counted loop."""
    step, sink = make_step(variant, take)
    for i in range(1, 1001):
        step(None, i)
    if sink is not None:
        sink.drain()
    gc.collect()
    # What the interpreter, the frameworks and the warm-up left alive is moved out of the
    # collector's sight: whether one walk of all of it falls inside the counted loop
    # would otherwise swing the count by thousands per request.
    gc.freeze()
    run(step, sink, n)


def count_instructions(variant: str, n: int, take: bool, workdir: str) -> int:
    out = os.path.join(workdir, f"callgrind.{variant}")
    argv = [sys.executable, os.path.abspath(__file__), "--child", variant, "-n", str(n)]
    if take:
        argv.append("--take")
    if ENCODE:
        argv.append("--encode")
    if FRESH:
        argv.append("--fresh")
    # A fixed hash seed: with a random one, how many probes each dict lookup takes
    # changes from run to run, and so does the count (by a thousand or so per request).
    env = {**os.environ, "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0")}
    return callgrind_total(argv, out, env, f" for {variant}")


def callgrind_mode(
    n: int, take: bool, only: str | None, jobs: int, keep: str | None = None
) -> None:
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind not found: run without --callgrind for CPU time")
    frameworks = [only] if only else ["asgi", "wsgi"]
    variants = [f"{f}-{m}" for f in frameworks for m in ("bare", "wrapped")]
    with contextlib.ExitStack() as stack:
        if keep is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory())
        else:
            workdir = keep
            try:
                os.makedirs(workdir, exist_ok=True)
            except OSError as exc:
                raise SystemExit(f"hotpath: cannot use --keep {keep}: {exc}") from None
        pool = stack.enter_context(ThreadPoolExecutor(jobs))
        counts = dict(
            zip(
                variants,
                pool.map(lambda v: count_instructions(v, n, take, workdir), variants),
                strict=True,
            )
        )
    if keep is not None:
        # Per function: callgrind_annotate DIR/callgrind.wsgi-wrapped (what differs from
        # the bare variant is the middleware's; Python functions show as the eval loop).
        print(f"callgrind out files kept in {keep}/callgrind.<variant>")
    print(f"instructions/request over {n} requests ({_flags(take)}); {load_average()}")
    for framework in frameworks:
        bare = counts[f"{framework}-bare"] / n
        wrapped = counts[f"{framework}-wrapped"] / n
        print(
            f"  {framework}: bare {bare:9.0f}  wrapped {wrapped:9.0f}  "
            f"added {wrapped - bare:8.0f} ({wrapped / bare:.3f}x)"
        )


def _flags(take: bool) -> str:
    return f"take={take}, encode={ENCODE}, fresh={FRESH}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--callgrind", action="store_true", help="count instructions")
    parser.add_argument("--take", action="store_true", help="also make records, as a drain")
    parser.add_argument(
        "--encode", action="store_true", help="also marshal them, as a SocketSink (implies --take)"
    )
    parser.add_argument(
        "--fresh", action="store_true", help="new header objects per request, as a server"
    )
    parser.add_argument("-n", type=int, default=0, help="requests per variant (and round)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", choices=("asgi", "wsgi"), help="one framework only")
    parser.add_argument("--jobs", type=int, default=2, help="valgrind processes at once")
    parser.add_argument(
        "--keep", metavar="DIR", help="--callgrind: keep the out files in DIR (to annotate)"
    )
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.n < 0 or args.rounds < 1 or args.jobs < 1:
        parser.error("-n, --rounds and --jobs must be positive")
    global ENCODE, FRESH
    ENCODE = args.encode
    FRESH = args.fresh
    args.take = args.take or args.encode
    if args.child:
        child(args.child, args.n or 2000, args.take)
    elif args.callgrind:
        callgrind_mode(args.n or 2000, args.take, args.only, args.jobs, args.keep)
    else:
        cpu_mode(args.n or 20_000, args.rounds, args.take)
    return 0


if __name__ == "__main__":
    sys.exit(main())
