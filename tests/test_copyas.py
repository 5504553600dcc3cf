"""Copy as curl / HTTPie / httpx: each command is RUN against a real echo server, and what
arrives must be what the recorded request carried."""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from click.testing import CliRunner
from hopscope.app.cli import main
from hopscope.app.export import ExportError, select
from hopscope.tracing import MemorySink, wrap
from hopscope.tracing.copyas import CopyError, as_curl, as_httpie, as_httpx, replay_request
from hopscope.tracing.model import Trace, assemble
from hopscope.tracing.redact import REDACTED
from hopscope.tracing.tracefile import header_line
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

BASH = shutil.which("bash")
CURL = shutil.which("curl")
HTTPIE = importlib.util.find_spec("httpie") is not None

#: Framing the sending client decides, not the request: never compared.
CONNECTION = {"connection"}


async def echo(request: Request) -> Response:
    body = await request.body()
    return JSONResponse(
        {
            "method": request.method,
            "path": request.scope["path"],
            "query": request.scope["query_string"].decode("latin-1"),
            "headers": [
                [k.decode("latin-1"), v.decode("latin-1")] for k, v in request.scope["headers"]
            ],
            "body": base64.b64encode(body).decode("ascii"),
        }
    )


METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class Echo:
    """An instrumented echo app on a real uvicorn: what arrives, and its trace."""

    def __init__(self, url: str, sink: MemorySink) -> None:
        self.url = url
        self.sink = sink

    def send(self, method: str, path: str, **kwargs: Any) -> tuple[dict[str, Any], Trace]:
        """Send one request; returns what the server saw and the trace recorded of it."""
        marker = f"m{time.monotonic_ns()}"
        given = kwargs.pop("headers", {})
        pairs = list(given.items()) if isinstance(given, dict) else list(given)
        headers = [("x-marker", marker), *pairs]
        response = httpx.request(method, self.url + path, headers=headers, **kwargs)
        assert response.status_code == 200
        return response.json(), self.trace(marker)

    def trace(self, marker: str) -> Trace:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for trace in assemble(self.sink.events()):
                root = trace.root
                headers = root.attrs.get("http.request.headers", []) if root else []
                if root is not None and root.finished and ["x-marker", marker] in headers:
                    return trace
            time.sleep(0.01)
        raise AssertionError(f"no finished trace for {marker}")


@pytest.fixture
def server(serve_asgi: Callable[[Any], contextlib.AbstractContextManager[str]]) -> Iterator[Echo]:
    sink = MemorySink()
    app = Starlette(routes=[Route("/{path:path}", echo, methods=METHODS)])
    with serve_asgi(wrap(app, sink=sink)) as url:
        yield Echo(url, sink)


def comparable(seen: dict[str, Any], join: bool = False) -> dict[str, Any]:
    """What arrived, with headers as a sorted multiset (``join``: one value per name,
    repeats joined with ", " as RFC 9110 allows)."""
    headers = [(k, v) for k, v in seen["headers"] if k not in CONNECTION]
    if join:
        joined: dict[str, list[str]] = {}
        for name, value in headers:
            joined.setdefault(name, []).append(value)
        headers = [(name, ", ".join(values)) for name, values in joined.items()]
    return {**seen, "headers": sorted(headers)}


def run_shell(command: str) -> dict[str, Any]:
    assert BASH is not None
    done = subprocess.run(
        [BASH, "-c", command],
        capture_output=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "HOME": os.environ.get("HOME", "/tmp")},
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def run_httpx(script: str, tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "replay.py"
    path.write_text(script)
    done = subprocess.run(
        [sys.executable, str(path)], capture_output=True, timeout=30, stdin=subprocess.DEVNULL
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    status, text = done.stdout.decode().split("\n", 1)
    assert status == "200 OK"
    return json.loads(text)  # type: ignore[no-any-return]


#: (method, path with query, headers, body): text, JSON, binary with and without NUL,
#: an empty body with its Content-Length, a query that curl would glob, repeated headers.
CASES: dict[str, tuple[str, str, dict[str, str] | list[tuple[str, str]], bytes | None]] = {
    "get-query": ("GET", "/items/1?a=1&b=%20x&c=[1]&d={2}&e=it's", {"X-Quote": 'it\'s "q"'}, None),
    "post-json": (
        "POST",
        "/items",
        {"Content-Type": "application/json"},
        b'{"a": "b\'c", "n": 1}\n',
    ),
    "put-binary-nul": (
        "PUT",
        "/blob",
        {"Content-Type": "application/octet-stream"},
        bytes(range(256)) * 2,
    ),
    "patch-binary": ("PATCH", "/blob", {}, bytes(range(1, 256))),
    "delete-empty": ("DELETE", "/items/1", {"Content-Length": "0"}, b""),
    "repeated-headers": (
        "OPTIONS",
        "/x",
        [("X-Dup", "a"), ("X-Dup", "b"), ("X-Empty", "")],
        b"%s %d \\ $HOME `x`",
    ),
}


def send_case(server: Echo, name: str) -> tuple[dict[str, Any], Trace]:
    method, path, headers, body = CASES[name]
    return server.send(method, path, headers=headers, content=body)


@pytest.mark.skipif(CURL is None or BASH is None, reason="curl and bash are needed to run it")
@pytest.mark.parametrize("case", list(CASES))
def test_curl_sends_what_was_recorded(server: Echo, case: str) -> None:
    seen, trace = send_case(server, case)
    command = as_curl(trace)
    again = run_shell(command)
    assert comparable(again) == comparable(seen), command


@pytest.mark.skipif(
    not HTTPIE or BASH is None, reason="HTTPie is not installed (pip install httpie)"
)
@pytest.mark.parametrize("case", list(CASES))
def test_httpie_sends_what_was_recorded(server: Echo, case: str) -> None:
    seen, trace = send_case(server, case)
    command = as_httpie(trace)
    # The generated command says ``http``; run the same arguments with this Python's HTTPie.
    line = "\n".join(line for line in command.splitlines() if not line.startswith("#"))
    assert line.startswith("http ")
    again = run_shell(f"{sys.executable} -m httpie {line.removeprefix('http ')}")
    # HTTPie (urllib3) percent-encodes []{} in queries: the same query to any server.
    again["query"] = unquote(again["query"])
    seen = {**seen, "query": unquote(seen["query"])}
    assert comparable(again, join=True) == comparable(seen, join=True), command


@pytest.mark.parametrize("case", list(CASES))
def test_httpx_script_sends_what_was_recorded(server: Echo, case: str, tmp_path: Path) -> None:
    seen, trace = send_case(server, case)
    script = as_httpx(trace)
    again = run_httpx(script, tmp_path)
    assert comparable(again) == comparable(seen), script


@pytest.mark.skipif(CURL is None or BASH is None, reason="curl and bash are needed to run it")
def test_base_url_sends_elsewhere_with_its_host(
    server: Echo, serve_asgi: Callable[[Any], contextlib.AbstractContextManager[str]]
) -> None:
    seen, trace = server.send("POST", "/items?q=1", content=b"hello")
    other = Starlette(routes=[Route("/{path:path}", echo, methods=METHODS)])
    with serve_asgi(other) as other_url:
        again = run_shell(as_curl(trace, base_url=other_url + "/prefix/"))
    assert again["path"] == "/prefix/items"
    assert again["query"] == "q=1"
    assert base64.b64decode(again["body"]) == b"hello"
    host = dict(again["headers"])["host"]
    assert host == other_url.removeprefix("http://") != dict(seen["headers"])["host"]


@pytest.mark.skipif(CURL is None or BASH is None, reason="curl and bash are needed to run it")
def test_secrets_are_left_out_with_a_comment_unless_no_redact(server: Echo) -> None:
    _, trace = server.send(
        "POST",
        "/login?next=/home&access_token=abc",
        headers={"Authorization": "Bearer sekrit", "Content-Type": "application/json"},
        content=b'{"user": "ann", "password": "hunter2"}',
    )
    command = as_curl(trace)
    assert "sekrit" not in command and "hunter2" not in command and "abc" not in command
    assert "# header authorization is left out (secret)" in command
    again = run_shell(command)
    assert "authorization" not in dict(again["headers"])
    assert json.loads(base64.b64decode(again["body"])) == {"user": "ann", "password": REDACTED}
    assert again["query"] == "next=/home&access_token=%5Bredacted%5D"

    kept = run_shell(as_curl(trace, redact=False))
    assert dict(kept["headers"])["authorization"] == "Bearer sekrit"
    assert b"hunter2" in base64.b64decode(kept["body"])
    assert "access_token=abc" in kept["query"]


def synthetic(headers: list[list[str]], attrs: dict[str, Any] | None = None) -> Trace:
    start = {
        "kind": "span_start",
        "ts": 1,
        "trace_id": "ab" * 16,
        "span_id": "cd" * 8,
        "parent_id": None,
        "hop": "app",
        "name": "POST /x",
        "attrs": {
            "http.request.method": "POST",
            "url.path": "/x",
            "url.scheme": "http",
            "server.address": "::1",
            "server.port": 8000,
            "http.request.headers": headers,
        },
    }
    end = {
        "kind": "span_end",
        "ts": 2,
        "trace_id": "ab" * 16,
        "span_id": "cd" * 8,
        "attrs": attrs or {},
    }
    return assemble([start, end])[0]


def test_values_redacted_in_the_trace_are_never_sent_even_with_no_redact() -> None:
    trace = synthetic([["Authorization", REDACTED], ["X-Api-Key", REDACTED], ["X-Ok", "1"]])
    request = replay_request(trace, redact=False)
    assert request.headers == [("X-Ok", "1")]
    assert request.notes == [
        "header Authorization was redacted in the trace",
        "header X-Api-Key was redacted in the trace",
    ]
    for form in (as_curl, as_httpie, as_httpx):
        text = form(trace, redact=False)
        assert REDACTED not in text
        assert text.startswith("# header Authorization was redacted in the trace\n")


def test_url_without_a_host_header_uses_the_server_address() -> None:
    assert replay_request(synthetic([])).url == "http://[::1]:8000/x"


def test_a_cut_or_missing_body_is_said() -> None:
    cut = synthetic(
        [["Content-Length", "100"]],
        {
            "http.request.body": base64.b64encode(b"abc").decode(),
            "http.request.body.size": 100,
            "http.request.body.truncated": True,
        },
    )
    assert "# body cut: only the first 3 of 100 bytes were captured" in as_curl(cut)
    missing = synthetic([["Content-Length", "7"]], {"http.request.body.size": 7})
    assert "# the body (7 bytes) was not captured" in as_httpx(missing)


def test_a_trace_without_a_request_cannot_be_copied() -> None:
    trace = assemble(
        [
            {
                "kind": "span_start",
                "ts": 1,
                "trace_id": "ab" * 16,
                "span_id": "cd" * 8,
                "parent_id": None,
                "hop": "app",
                "name": "job",
                "attrs": {},
            }
        ]
    )[0]
    with pytest.raises(CopyError, match="holds no HTTP request"):
        as_curl(trace)


# -- the command -------------------------------------------------------------------------


def trace_file(server: Echo, tmp_path: Path, count: int = 3) -> tuple[Path, list[Trace]]:
    traces = [server.send("POST", f"/n/{i}", content=f"body {i}".encode())[1] for i in range(count)]
    path = tmp_path / "t.jsonl"
    with path.open("w") as handle:
        handle.write(header_line())
        for event in server.sink.events():
            handle.write(json.dumps(event) + "\n")
    return path, traces


@pytest.mark.skipif(CURL is None or BASH is None, reason="curl and bash are needed to run it")
def test_export_curl_by_number_and_by_id_prefix(server: Echo, tmp_path: Path) -> None:
    path, traces = trace_file(server, tmp_path)
    runner = CliRunner()
    by_number = runner.invoke(main, ["export", str(path), "--curl", "2"])
    assert by_number.exit_code == 0, by_number.output
    assert run_shell(by_number.output)["path"] == "/n/1"
    prefix = traces[2].trace_id[:8]
    by_id = runner.invoke(main, ["export", str(path), "--httpx", prefix])
    assert by_id.exit_code == 0, by_id.output
    assert "'http://127.0.0.1:" in by_id.output and "/n/2'" in by_id.output
    hashed = runner.invoke(main, ["export", str(path), "--httpie", "#1"])
    assert hashed.exit_code == 0 and "/n/0" in hashed.output


@pytest.mark.parametrize(
    ("ident", "message"),
    [
        ("9", "there is no request #9: the file has 3"),
        ("#0", "there is no request #0"),
        ("#x", "'#x' is not a request number"),
        ("xyz", "is neither a request number nor a trace id prefix"),
        ("ab", "is neither a request number nor a trace id prefix"),
        ("ffffffffffff", "no request's trace id starts with ffffffffffff"),
    ],
)
def test_export_bad_id_is_one_line_exit_1(
    server: Echo, tmp_path: Path, ident: str, message: str
) -> None:
    path, _ = trace_file(server, tmp_path)
    result = CliRunner().invoke(main, ["export", str(path), "--curl", ident])
    assert result.exit_code == 1
    assert message in result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


def test_export_needs_exactly_one_form(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(header_line())
    for args in ([], ["--curl", "1", "--httpx", "1"]):
        result = CliRunner().invoke(main, ["export", str(path), *args])
        assert result.exit_code == 2
        assert "give exactly one of" in result.output


def test_a_number_that_is_also_an_id_prefix_is_ambiguous() -> None:
    events = []
    for index in range(1000):
        ids = {"trace_id": f"{index + 1:04d}".ljust(32, "a"), "span_id": "cd" * 8}
        events.append(
            {"kind": "span_start", "ts": index, **ids, "parent_id": None, "hop": "app",
             "name": "GET /", "attrs": {"http.request.method": "GET", "url.path": "/"}}
        )  # fmt: skip
    traces = assemble(events)
    assert select(traces, "7").trace_id.startswith("0007")
    assert select(traces, "#1000").trace_id.startswith("1000")
    assert select(traces, "0999").trace_id.startswith("0999")  # both say the same request
    traces[0].trace_id = "1000" + traces[0].trace_id[4:]  # now "1000" names two requests
    with pytest.raises(ExportError, match="is request #1000 and a trace id prefix: use #1000"):
        select(traces, "1000")
