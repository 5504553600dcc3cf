"""Record the real ``hopscope demo`` and write it as ``demo-trace.jsonl``, made stable.

The snapshot tests (``tests/test_tui_snapshots.py``) draw the UI from this file, so it
must not change from one run of the tests to the next: what a run of the demo makes
random or machine-bound is replaced by fixed values, and everything else is kept as
the demo recorded it (hops, spans, events, bodies, real durations).

- timestamps: shifted together so the first event is at :data:`BASE_NS` (every
  nanosecond-clock value moves with them, in numbers and inside strings such as
  ``x-request-start``; HTTP ``date`` headers are rewritten to match);
- trace and span ids: replaced by stable pseudo-random ones, in order of appearance
  (also inside ``traceparent`` headers);
- ports, pids and thread ids: numbered from fixed values in order of appearance;
- file paths in tracebacks: the install location becomes ``.../site-packages``.

Run it again only to take a new recording (then update the snapshots with
``pytest tests/test_tui_snapshots.py --snapshot-update`` and look at them)::

    python tests/data/make_demo_trace.py            # writes tests/data/demo-trace.jsonl

:func:`cut` is where the snapshot tests and ``screenshots/make.py`` both stop a
recording, so the two draw the same moment of the demo.
"""

from __future__ import annotations

import argparse
import email.utils
import hashlib
import json
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hopscope

HERE = Path(__file__).resolve().parent
TARGET = HERE / "demo-trace.jsonl"
#: 2025-01-01 12:00:00 UTC: where the recording starts.
BASE_NS = 1_735_732_800_000_000_000
REQUESTS = 12
#: ``http://127.0.0.1:PORT``: the proxy's port first, then the app's.
SERVER_PORTS = 8000
CLIENT_PORTS = 50_000
PIDS = 1000
SITE = "/venv/lib/python3/site-packages"
#: Where a recording is cut: this long after the last request's first database query
#: started, so that request is in flight, inside its user span.
CUT_AFTER_NS = 20_000_000

Event = dict[str, Any]


def record(path: Path, requests: int) -> None:
    """Run the demo exactly as a user would, headless, saving its traces to ``path``."""
    command = [sys.executable, "-m", "hopscope.app", "demo", "--headless"]
    command += ["--requests", str(requests), "-o", str(path)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, timeout=120)


def read(path: Path) -> list[Event]:
    with path.open(encoding="utf-8") as handle:
        next(handle)  # the header line: written fresh below
        return [json.loads(line) for line in handle if line.strip()]


def cut(events: list[Event]) -> tuple[list[Event], int]:
    """The events up to the cut, and the moment of the cut.

    Raises ValueError when the last request has no ``db.query`` span to cut in.
    """
    starts = [e for e in events if e["kind"] == "span_start"]
    roots = [e for e in starts if e["parent_id"] is None]
    if not roots:
        raise ValueError("the recording has no request")
    last = max(roots, key=lambda e: e["ts"])
    queries = [
        e["ts"] for e in starts if e["trace_id"] == last["trace_id"] and e["name"] == "db.query"
    ]
    if not queries:
        raise ValueError("the demo's last request has no db.query span to cut in")
    now = min(queries) + CUT_AFTER_NS
    return [e for e in events if e["ts"] <= now], now


def _stable_hex(kind: str, number: int, length: int) -> str:
    return hashlib.sha256(f"hopscope-demo-{kind}-{number}".encode()).hexdigest()[:length]


class Normalizer:
    """One pass over the events with every mapping built in order of appearance."""

    def __init__(self, events: list[Event]) -> None:
        stamps = [event["ts"] for event in events]
        self.low, self.high = min(stamps), max(stamps)
        # Values that are clearly on the same clock: within an hour of the recording.
        self.slack = 3600 * 10**9
        self.ids: dict[str, str] = {}
        self.ports: dict[int, int] = {}
        self.server_ports = 0
        self.client_ports = 0
        self.numbers: dict[str, dict[int, int]] = {"pid": {}, "thread": {}}
        self.paths = sorted(
            {
                str(Path(hopscope.__path__[0]).parent),
                sysconfig.get_paths()["purelib"],
                sysconfig.get_paths()["platlib"],
            },
            key=len,
            reverse=True,
        )

    # -- clocks --------------------------------------------------------------------------

    def _is_ns(self, value: int) -> bool:
        return self.low - self.slack <= value <= self.high + self.slack

    def ns(self, value: int) -> int:
        return value - self.low + BASE_NS if self._is_ns(value) else value

    def _clock_digits(self, match: re.Match[str]) -> str:
        digits = match.group(0)
        scale = 10 ** (19 - len(digits))  # 19 digits: ns, 16: µs, 13: ms
        value = int(digits) * scale
        if not self._is_ns(value):
            return digits
        return str(self.ns(value) // scale)

    # -- ids, ports, numbers ---------------------------------------------------------------

    def span_id(self, value: str | None) -> str | None:
        if value is None:
            return None
        if value not in self.ids:
            kind = "trace" if len(value) == 32 else "span"
            count = sum(1 for v in self.ids if len(v) == len(value))
            self.ids[value] = _stable_hex(kind, count, len(value))
        return self.ids[value]

    def port(self, value: int, *, server: bool) -> int:
        if value <= 0:
            return value
        if value not in self.ports:
            if server:
                self.ports[value] = SERVER_PORTS + self.server_ports
                self.server_ports += 1
            else:
                self.ports[value] = CLIENT_PORTS + self.client_ports
                self.client_ports += 1
        return self.ports[value]

    def number(self, kind: str, value: int, first: int) -> int:
        table = self.numbers[kind]
        return table.setdefault(value, first + len(table))

    # -- strings -----------------------------------------------------------------------

    def text(self, value: str) -> str:
        value = re.sub(r"\b\d{19}\b|\b\d{16}\b|\b\d{13}\b", self._clock_digits, value)
        value = re.sub(
            r"\b[0-9a-f]{32}\b|\b[0-9a-f]{16}\b",
            lambda m: self.ids.get(m.group(0), m.group(0)),
            value,
        )
        value = re.sub(
            r"(127\.0\.0\.1|localhost):(\d+)",
            lambda m: f"{m.group(1)}:{self.ports.get(int(m.group(2)), int(m.group(2)))}",
            value,
        )
        for path in self.paths:
            value = value.replace(path, SITE)
        return value

    def http_date(self, value: str) -> str:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return value
        shifted = self.ns(int(when.timestamp()) * 10**9) / 1e9
        return email.utils.formatdate(shifted, usegmt=True)

    # -- walking -------------------------------------------------------------------------

    def value(self, key: str, value: Any) -> Any:
        if isinstance(value, bool) or value is None:
            return value
        if isinstance(value, int):
            if key == "process.pid":
                return self.number("pid", value, PIDS)
            if key == "thread.id":
                return self.number("thread", value, 1)
            if key == "server.port":
                return self.port(value, server=True)
            if key.endswith(".port"):
                return self.port(value, server=False)
            return self.ns(value)
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            if key.endswith("headers") or key.endswith("headers.added"):
                return [self.header(pair) for pair in value]
            return [self.value(key, item) for item in value]
        if isinstance(value, dict):
            return {k: self.value(k, v) for k, v in value.items()}
        return value

    def header(self, pair: Any) -> Any:
        if isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair):
            name, value = pair
            if name.lower() == "date":
                return [name, self.http_date(value)]
            return [name, self.text(value)]
        return self.value("", pair)

    def event(self, event: Event) -> Event:
        out: Event = {}
        for key, value in event.items():
            if key in ("trace_id", "span_id", "parent_id"):
                out[key] = self.span_id(value)
            elif key == "ts":
                out[key] = self.ns(value)
            elif key == "attrs":
                out[key] = {k: self.value(k, v) for k, v in value.items()}
            else:
                out[key] = value
        return out


def normalize(events: list[Event]) -> list[Event]:
    normalizer = Normalizer(events)
    # Ids and ports first, so strings met before their owner's field are rewritten too.
    for event in events:
        for key in ("trace_id", "span_id", "parent_id"):
            normalizer.span_id(event.get(key))
        for key, value in event.get("attrs", {}).items():
            if key == "server.port" and isinstance(value, int):
                normalizer.port(value, server=True)
    for event in events:
        for key, value in event.get("attrs", {}).items():
            if key.endswith(".port") and key != "server.port" and isinstance(value, int):
                normalizer.port(value, server=False)
    return [normalizer.event(event) for event in events]


def check(events: list[Event]) -> None:
    """The snapshots need these; a demo that stopped making them needs a new plan."""
    starts = [e for e in events if e["kind"] == "span_start"]
    hops = {e["hop"] for e in starts}
    statuses = {
        e["attrs"].get("http.response.status_code") for e in events if e["kind"] == "span_end"
    }
    problems: list[tuple[str, Callable[[], bool]]] = [
        (
            "client, proxy, server and app hops",
            lambda: {"client", "proxy", "server", "app"} <= hops,
        ),
        (
            "a queue span",
            lambda: any(e["hop"] == "server" and e["name"] == "queue" for e in starts),
        ),
        ("a user span", lambda: any(e["attrs"].get("span.kind") == "user" for e in starts)),
        ("a 500", lambda: 500 in statuses),
        ("an exception", lambda: any(e.get("name") == "exception" for e in events)),
    ]
    missing = [what for what, ok in problems if not ok()]
    if missing:
        sys.exit(f"make_demo_trace: the recording has no {', '.join(missing)}")


def write(path: Path, events: list[Event]) -> None:
    header = {"format": "hopscope", "version": "1.0", "created": BASE_NS, "pid": PIDS}
    lines = [json.dumps(header, separators=(",", ":"))]
    lines += [json.dumps(event, separators=(",", ":"), ensure_ascii=False) for event in events]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=TARGET)
    parser.add_argument("-n", "--requests", type=int, default=REQUESTS)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        raw = Path(folder) / "demo.jsonl"
        record(raw, options.requests)
        events = read(raw)
    # File order is arrival order at the collector, which varies: keep time order.
    events.sort(key=lambda event: event["ts"])
    events = normalize(events)
    check(events)
    write(options.output, events)
    print(f"wrote {len(events)} events to {os.path.relpath(options.output)}")


if __name__ == "__main__":
    main()
