"""``hopscope proxy`` next to a direct connection, mitmdump and nginx, on loopback.

Run: ``python bench/proxy.py [--rounds N] [--variants]`` (needs ``wrk``; nginx and a
mitmproxy venv are set up on first use: ``apt-get install -y nginx wrk`` as root, and
``pip install mitmproxy`` into a separate venv at /tmp/hopscope-bench/mitm, because
mitmproxy's pins may clash with hopscope's).

One run, alternating rounds (the order rotates each round; medians of rounds are
reported, since round-to-round noise on a small machine is several percent):

* direct: ``wrk`` to a Starlette hello world under uvicorn (httptools, one worker);
* hopscope: the same app through ``hopscope proxy`` as a user runs it (its collector
  and tail in a child process, one tail line per request, written to /dev/null);
* mitmdump: ``mitmdump --mode reverse:URL``;
* nginx: one worker, an upstream ``keepalive`` pool, access log off.

``--variants`` adds hopscope with its collector on a thread of its own process (records
handed over in process, or sent by a SocketSink to the collector's port), and hopscope
recording nothing, to show what recording costs and where it is best done.

Each round measures every path twice: throughput at ``--connections`` (16), and latency
one request at a time (``--latency-connections``, 1).  On a 2-CPU machine the median at
-c16 is mostly time spent queueing behind the other 15 connections, so the added
latency of a hop is read from the -c1 pass.  ``--baseline DIR`` adds hopscope run from
another source tree (an older commit, ``git archive`` unpacked) for a before/after.

Goals (issue 3): hopscope's throughput at least twice mitmdump's, and its median latency
at most 1 ms above direct.  CPU microseconds per request of each proxy process are shown
too: unlike req/s they hardly move with the load of the rest of the machine.

For load-independent figures (instructions per request of the proxy, and of its
recording child's tail, under callgrind) see bench/proxy_hotpath.py.

Every process this script starts is stopped before it exits (also on Ctrl-C).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import HOST, free_port, spawn, stop_all, wait_ready, wrk, wrk_errors, wrk_ms

HERE = Path(__file__).resolve().parent
BENCH = "proxy bench"
HELLO = b"Hello, world!"
WORK = Path("/tmp/hopscope-bench")
MITM_VENV = WORK / "mitm"
GOAL_MITM_RATIO = 2.0
GOAL_ADDED_P50_MS = 1.0


# --------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    port: int
    proc: subprocess.Popen[Any] | None
    note: str


# --------------------------------------------------------------------------------------
# The contenders
# --------------------------------------------------------------------------------------


def start_app() -> Target:
    port = free_port()
    argv = [
        sys.executable, "-m", "uvicorn", "--app-dir", str(HERE),
        "--factory", "_common:starlette_hello",
        "--host", HOST, "--port", str(port), "--http", "httptools", "--log-level", "warning",
        "--no-access-log",
    ]  # fmt: skip
    proc = spawn(argv)
    wait_ready(proc, port, "the app", bench=BENCH, body=HELLO)
    import uvicorn

    return Target("direct", port, proc, f"uvicorn {uvicorn.__version__}, httptools, 1 worker")


def start_hopscope(upstream: int, variant: str = "", baseline: str = "") -> Target:
    port, collector = free_port(), free_port()
    url = f"http://{HOST}:{upstream}"
    env = None
    if not variant:
        argv = [
            sys.executable, "-m", "hopscope.app", "proxy", "--upstream", url,
            "--listen", f"{HOST}:{port}", "--collector", f"{HOST}:{collector}",
        ]  # fmt: skip
        name, note = "hopscope", "hopscope proxy (collector + tail in a child process)"
        if baseline:
            # Another checkout's sources first on the path: a before/after in one run.
            env = {**os.environ, "PYTHONPATH": baseline}
            name, note = "hopscope-baseline", f"the same, from {baseline}"
    elif variant in ("socket", "local"):
        code = (
            "from hopscope.app.proxy_command import run_proxy; "
            f"run_proxy({url!r}, listen='{HOST}:{port}', collector='{HOST}:{collector}', "
            f"sink_kind={variant!r})"
        )
        argv = [sys.executable, "-c", code]
        name, note = {
            "local": ("hopscope-inprocess", "collector thread, records handed over"),
            "socket": ("hopscope-socketsink", "collector thread, SocketSink to its port"),
        }[variant]
    else:
        code = textwrap.dedent(f"""
            import uvicorn
            from hopscope.app.proxy import ProxyApp, ProxyHttpProtocol
            from hopscope.tracing.sinks import Sink
            class Null(Sink):
                def emit(self, record): pass
                def start_live(self, recording): return True
            uvicorn.run(ProxyApp({url!r}, Null()), host={HOST!r}, port={port},
                        http=ProxyHttpProtocol, log_level="warning", access_log=False,
                        server_header=False, date_header=False, proxy_headers=False)
        """)
        argv = [sys.executable, "-c", code]
        name, note = "hopscope-norecord", "same proxy, records dropped (no collector)"
    log = open(WORK / f"{name}.log", "w")  # the child has its own copy once started
    proc = spawn(argv, stdout=subprocess.DEVNULL, stderr=log, env=env)
    log.close()
    wait_ready(proc, port, name, bench=BENCH, body=HELLO)
    return Target(name, port, proc, note)


def ensure_mitmdump() -> Path | None:
    mitmdump = MITM_VENV / "bin" / "mitmdump"
    if mitmdump.exists():
        return mitmdump
    print(f"proxy bench: installing mitmproxy into {MITM_VENV} ...", file=sys.stderr)
    python = shutil.which("python3") or sys.executable
    try:
        subprocess.run([python, "-m", "venv", str(MITM_VENV)], check=True, timeout=120)
        subprocess.run(
            [str(MITM_VENV / "bin" / "pip"), "install", "-q", "mitmproxy"],
            check=True,
            timeout=900,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"proxy bench: no mitmdump ({exc}); skipped", file=sys.stderr)
        return None
    return mitmdump if mitmdump.exists() else None


def start_mitmdump(upstream: int) -> Target | None:
    mitmdump = ensure_mitmdump()
    if mitmdump is None:
        return None
    port = free_port()
    version = subprocess.run(
        [str(mitmdump), "--version"], capture_output=True, text=True, timeout=60
    ).stdout.split("\n")[0]
    argv = [
        str(mitmdump), "--mode", f"reverse:http://{HOST}:{upstream}", "--listen-host", HOST,
        "--listen-port", str(port), "-q", "--set", f"confdir={WORK / 'mitm-conf'}",
    ]  # fmt: skip
    proc = spawn(argv, stdout=subprocess.DEVNULL)
    wait_ready(proc, port, "mitmdump", bench=BENCH, body=HELLO, timeout=60)
    return Target("mitmdump", port, proc, version.strip())


def ensure_nginx() -> str | None:
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if nginx is None and os.geteuid() == 0 and shutil.which("apt-get"):
        print("proxy bench: apt-get install -y nginx ...", file=sys.stderr)
        subprocess.run(
            ["apt-get", "install", "-y", "nginx"], capture_output=True, timeout=900, check=False
        )
        nginx = shutil.which("nginx") or (
            "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
        )
    if nginx is None:
        print("proxy bench: no nginx (apt-get install -y nginx); skipped", file=sys.stderr)
    return nginx


NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream app {{
        server {host}:{upstream};
        keepalive 64;
    }}
    server {{
        listen {host}:{port};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def start_nginx(upstream: int) -> Target | None:
    nginx = ensure_nginx()
    if nginx is None:
        return None
    port = free_port()
    prefix = WORK / "nginx"
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, host=HOST, upstream=upstream, port=port))
    version = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip()
    proc = spawn([nginx, "-c", str(conf), "-p", str(prefix), "-e", str(prefix / "error.log")])
    wait_ready(proc, port, "nginx", bench=BENCH, body=HELLO)
    return Target("nginx", port, proc, f"{version}, 1 worker, keepalive 64 upstream")


# --------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------


@dataclass
class Load:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us: float = float("nan")  # the proxy's main process
    helper_us: float = float("nan")  # its other processes (recording child, nginx worker)


def run_wrk(port: int, seconds: float, connections: int) -> tuple[Load, int]:
    out = wrk(port, seconds, connections)

    def find(pattern: str) -> str:
        match = re.search(pattern, out, re.M)
        if match is None:
            raise SystemExit(f"proxy bench: unreadable wrk output:\n{out}")
        return match[1]

    requests = int(find(r"(\d+) requests in"))
    count = wrk_errors(out)
    load = Load(
        float(find(r"Requests/sec:\s+([\d.]+)")),
        wrk_ms(find(r"^\s+50%\s+(\S+)")),
        wrk_ms(find(r"^\s+99%\s+(\S+)")),
        count,
    )
    return load, requests


_TICK = os.sysconf("SC_CLK_TCK")


def group_cpu(pgid: int) -> tuple[float, float]:
    """CPU seconds used so far by one process group: its leader, and the others."""
    leader = others = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                fields = file.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:
            used = (int(fields[11]) + int(fields[12])) / _TICK
            if int(entry) == pgid:
                leader += used
            else:
                others += used
    return leader, others


def measure(target: Target, seconds: float, connections: int) -> Load:
    if target.proc is None:
        return run_wrk(target.port, seconds, connections)[0]
    leader, others = group_cpu(target.proc.pid)
    load, requests = run_wrk(target.port, seconds, connections)
    if requests:
        leader_after, others_after = group_cpu(target.proc.pid)
        load.cpu_us = (leader_after - leader) * 1e6 / requests
        load.helper_us = (others_after - others) * 1e6 / requests
    return load


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def median(loads: list[Load], key: Callable[[Load], float]) -> float:
    return statistics.median(key(load) for load in loads)


def report(
    targets: list[Target],
    loads: dict[str, list[Load]],
    latency: dict[str, list[Load]],
    args: argparse.Namespace,
) -> None:
    print(
        f"\nThroughput: wrk -t1 -c{args.connections} -d{args.seconds:g}s --latency, GET / "
        f"(13-byte body), {args.rounds} alternating rounds, medians; {os.cpu_count()} CPUs; "
        "CPU/req: the proxy's main process + its other processes\n"
    )
    print(f"{'path':<21} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU/req':>13}  errors  what")
    for target in targets:
        runs = loads[target.name]
        cpu = median(runs, lambda x: x.cpu_us)
        helper = median(runs, lambda x: x.helper_us)
        if target.name == "direct":
            cpu_text = "-"
        elif helper >= 1:
            cpu_text = f"{cpu:.0f}+{helper:.0f} us"
        else:
            cpu_text = f"{cpu:.0f} us"
        print(
            f"{target.name:<21} {median(runs, lambda x: x.rps):>9.0f} "
            f"{median(runs, lambda x: x.p50_ms):>8.2f} {median(runs, lambda x: x.p99_ms):>8.2f} "
            f"{cpu_text:>13}  {sum(x.errors for x in runs):>6}  {target.note}"
        )
    if latency:
        print(
            f"\nLatency: wrk -t1 -c{args.latency_connections} -d{args.seconds:g}s --latency "
            "(one request at a time: the time a request takes, not the time it queues)\n"
        )
        print(f"{'path':<21} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU/req':>13}")
        for target in targets:
            runs = latency[target.name]
            cpu = median(runs, lambda x: x.cpu_us + (x.helper_us if x.helper_us >= 0 else 0))
            print(
                f"{target.name:<21} {median(runs, lambda x: x.rps):>9.0f} "
                f"{median(runs, lambda x: x.p50_ms):>8.3f} "
                f"{median(runs, lambda x: x.p99_ms):>8.2f} "
                f"{'-' if target.name == 'direct' else f'{cpu:.0f} us':>13}"
            )
    print("\nper round (req/s): " + "; ".join(
        f"{name} " + "/".join(f"{x.rps:.0f}" for x in runs) for name, runs in loads.items()
    ))  # fmt: skip

    def rps(name: str) -> float:
        return median(loads[name], lambda x: x.rps)

    def p50(name: str) -> float:
        return median(loads[name], lambda x: x.p50_ms)

    print()
    if "mitmdump" in loads:
        ratio = rps("hopscope") / rps("mitmdump")
        verdict = "meets" if ratio >= GOAL_MITM_RATIO else "MISSES"
        print(
            f"hopscope / mitmdump throughput: {ratio:.1f}x "
            f"({verdict} the >= {GOAL_MITM_RATIO:g}x goal)"
        )
    if "nginx" in loads:
        print(f"hopscope / nginx throughput:    {rps('hopscope') / rps('nginx'):.2f}x")
    for label, runs in (
        (f"-c{args.latency_connections}", latency),
        (f"-c{args.connections}", loads),
    ):
        if not runs:
            continue
        added = median(runs["hopscope"], lambda x: x.p50_ms) - median(
            runs["direct"], lambda x: x.p50_ms
        )
        verdict = "meets" if added <= GOAL_ADDED_P50_MS else "MISSES"
        per_round = [
            h.p50_ms - d.p50_ms for h, d in zip(runs["hopscope"], runs["direct"], strict=True)
        ]
        print(
            f"hopscope p50 - direct p50 at {label}: {added:+.2f} ms "
            f"({verdict} the <= {GOAL_ADDED_P50_MS:g} ms goal); per round: "
            + ", ".join(f"{x:+.2f}" for x in per_round)
        )
    print(
        f"(at -c{args.connections} on {os.cpu_count()} CPUs the median is mostly queueing "
        "behind the other connections: the added latency per request is the -c"
        f"{args.latency_connections} figure)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="wrk -d per measurement")
    parser.add_argument("--connections", type=int, default=16, help="wrk -c (throughput)")
    parser.add_argument(
        "--latency-connections",
        type=int,
        default=1,
        help="wrk -c of the latency pass (0: no latency pass)",
    )
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--variants", action="store_true", help="also hopscope variants")
    parser.add_argument(
        "--baseline",
        metavar="PYTHONPATH",
        default="",
        help="also hopscope from another source tree: a directory holding hopscope/app, "
        "hopscope/tracing, hopscope/tui (e.g. an older commit, `git archive` unpacked)",
    )
    parser.add_argument("--no-mitmdump", action="store_true")
    parser.add_argument("--no-nginx", action="store_true")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("proxy bench: needs wrk (apt-get install -y wrk)")
    WORK.mkdir(parents=True, exist_ok=True)
    try:
        app = start_app()
        targets = [app, start_hopscope(app.port)]
        if args.baseline:
            targets.append(start_hopscope(app.port, baseline=args.baseline))
        if args.variants:
            targets += [
                start_hopscope(app.port, variant) for variant in ("local", "socket", "null")
            ]
        if not args.no_mitmdump and (mitm := start_mitmdump(app.port)) is not None:
            targets.append(mitm)
        if not args.no_nginx and (nginx := start_nginx(app.port)) is not None:
            targets.append(nginx)
        for target in targets:
            run_wrk(target.port, args.warmup, args.connections)
        loads: dict[str, list[Load]] = {t.name: [] for t in targets}
        latency: dict[str, list[Load]] = (
            {t.name: [] for t in targets} if args.latency_connections > 0 else {}
        )
        for round_no in range(args.rounds):
            shift = round_no % len(targets)
            for target in targets[shift:] + targets[:shift]:
                loads[target.name].append(measure(target, args.seconds, args.connections))
                if latency:
                    latency[target.name].append(
                        measure(target, args.seconds, args.latency_connections)
                    )
            print(f"round {round_no + 1}/{args.rounds} done", file=sys.stderr)
        report(targets, loads, latency, args)
    except KeyboardInterrupt:
        print("proxy bench: interrupted", file=sys.stderr)
    finally:
        stop_all()


if __name__ == "__main__":
    main()
