"""``"r"`` records: the collector's quick decoding agrees with the general one.

``to_events`` of an ``"r"`` record takes a quick path for the types servers really give;
``expand`` then ``to_events`` of each record it makes goes the general way (raw
attributes, normalised key by key).  Both must make the same wire events, for real
requests and for whatever odd values a record may carry.
"""

from __future__ import annotations

import asyncio
import io
from typing import Any

from hopscope.tracing import MemorySink, wrap
from hopscope.tracing.records import (
    ASGI_END,
    ASGI_REQUEST,
    RESPONSE_BODY,
    RESPONSE_START,
    WSGI_END,
    WSGI_REQUEST,
    event_count,
    expand,
    legacy,
    process_info,
    to_events,
)
from hypothesis import given, settings
from hypothesis import strategies as st

INFO = {"process.pid": 7, "server.software": "uvicorn/0"}


def general(record: tuple[Any, ...], info: dict[str, Any] | None = INFO) -> Any:
    try:
        return [event for each in expand(record) for event in to_events(each, info)]
    except Exception:
        return "raises"


def quick(record: tuple[Any, ...], info: dict[str, Any] | None = INFO) -> Any:
    try:
        return to_events(record, info)
    except Exception:
        return "raises"


def same(record: tuple[Any, ...], info: dict[str, Any] | None = INFO) -> None:
    expected = general(record, info)
    got = quick(record, info)
    assert got == expected
    if expected != "raises":  # key order is what a trace file shows
        assert [list(e["attrs"]) for e in got] == [list(e["attrs"]) for e in expected]
        assert event_count(record) == len(got)


def _asgi_records() -> list[tuple[Any, ...]]:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        body = (await receive())["body"]
        headers = [(b"content-type", b"text/plain"), (b"x-dup", b"1"), (b"x-dup", b"2")]
        await send({"type": "http.response.start", "status": 201, "headers": headers})
        await send({"type": "http.response.body", "body": b"part,", "more_body": True})
        await send({"type": "http.response.body", "body": body[::-1]})

    sink = MemorySink()
    wrapped = wrap(app, sink=sink)

    async def drive() -> None:
        for query in (b"", b"a=1&b=\xe9"):
            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": "/caf\u00e9",
                "raw_path": b"/caf%C3%A9",
                "root_path": "",
                "query_string": query,
                "headers": [(b"host", b"example"), (b"content-length", b"5")],
                "client": ("127.0.0.1", 5000),
                "server": ("127.0.0.1", 8000),
            }
            sent = [{"type": "http.request", "body": b"hello", "more_body": False}]

            async def receive(sent: list[Any] = sent) -> dict[str, Any]:
                return sent.pop(0) if sent else {"type": "http.disconnect"}

            async def send(message: Any) -> None:
                pass

            await wrapped(scope, receive, send)

    asyncio.run(drive())
    return sink.records()


def _wsgi_records() -> list[tuple[Any, ...]]:
    def app(environ: Any, start_response: Any) -> list[bytes]:
        data = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
        return [data]

    sink = MemorySink()
    wrapped = wrap(app, sink=sink)
    for method in ("GET", "POST"):
        environ = {
            "REQUEST_METHOD": method,
            "SCRIPT_NAME": "",
            "PATH_INFO": "/caf\xc3\xa9",
            "QUERY_STRING": "x=1",
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "8000",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "SERVER_SOFTWARE": "gunicorn/27",
            "REMOTE_ADDR": "127.0.0.1",
            "REMOTE_PORT": "5000",
            "CONTENT_TYPE": "",
            "CONTENT_LENGTH": "5",
            "HTTP_HOST": "example",
            "HTTP_X_FORWARDED_FOR": "10.0.0.1",
            "wsgi.input": io.BytesIO(b"hello"),
            "wsgi.url_scheme": "http",
        }
        result = wrapped(environ, lambda status, headers, exc_info=None: None)
        b"".join(result)
        result.close()  # type: ignore[attr-defined]
    return sink.records()


def test_real_requests_decode_alike() -> None:
    records = _asgi_records() + _wsgi_records()
    assert [r[0] for r in records] == ["r"] * 4
    for record in records:
        same(record)
        same(record, None)
        same(record, process_info(1))
    events = to_events(records[0], INFO)
    names = [e.get("name", e["kind"]) for e in events]
    assert names == [
        "POST /caf\u00e9",
        "request.body",
        "response.start",
        "response.body",
        "span_end",
    ]
    start = events[0]["attrs"]
    assert start["url.path"] == "/caf\u00e9" and start["http.request.headers"][0] == [
        "host",
        "example",
    ]
    assert start["process.pid"] == 7 and "thread.id" in start
    assert events[-1]["attrs"]["http.response.body"] == "cGFydCxvbGxlaA=="  # part,olleh


scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 70_000),
    st.floats(allow_nan=False),
    st.text(max_size=4),
    st.binary(max_size=4),
)
value = st.one_of(
    scalar,
    st.lists(scalar, max_size=2),
    st.tuples(scalar, scalar),
    st.dictionaries(st.text(max_size=2), scalar, max_size=2),
)
text = st.one_of(st.binary(max_size=3), st.text(max_size=3))
good_pairs = st.lists(st.one_of(st.tuples(text, text), st.lists(text, min_size=2, max_size=2)))
pairs = st.one_of(st.none(), good_pairs, st.lists(value, max_size=3), value)
body = st.one_of(st.none(), st.binary(max_size=4), st.lists(st.binary(max_size=3), max_size=2))
items = st.lists(
    st.one_of(
        st.tuples(st.just(RESPONSE_START), st.integers(0, 9), st.sampled_from([200, 0]), pairs),
        st.tuples(st.just(RESPONSE_START), st.integers(0, 9), scalar, good_pairs),
        st.tuples(st.sampled_from([0, RESPONSE_BODY]), st.integers(0, 9), scalar, scalar),
        st.tuples(
            st.sampled_from([0, RESPONSE_BODY]),
            st.integers(0, 9),
            st.integers(0, 9),
            st.sampled_from([True, False, None]),
        ),
        st.tuples(
            st.just("p"),
            st.integers(0, 9),
            st.integers(1, 9),
            st.integers(1, 9),
            st.just("log"),
            st.one_of(st.none(), st.dictionaries(st.text(max_size=3), value, max_size=2)),
        ),
    ),
    max_size=4,
)


def _spoil(draw: st.DrawFn, fields: list[Any], odd: st.SearchStrategy[Any]) -> tuple[Any, ...]:
    """A mostly ordinary tuple: up to two of its fields get an odd value."""
    for index in draw(st.lists(st.integers(0, len(fields) - 1), max_size=2)):
        fields[index] = draw(odd)
    return tuple(fields)


odd = st.one_of(value, pairs)


@st.composite
def asgi_records(draw: st.DrawFn) -> tuple[Any, ...]:
    address = st.one_of(
        st.tuples(st.text(max_size=3), st.integers(0, 9)), st.none(), st.lists(scalar, max_size=3)
    )
    request = [
        draw(st.sampled_from(["GET", "POST"])),
        "http",
        draw(st.sampled_from(["1.1", "2"])),
        draw(st.sampled_from(["/p", "/\u00e9", ""])),
        draw(st.one_of(st.binary(max_size=4), st.text(max_size=2))),
        draw(address),
        draw(address),
        draw(good_pairs),
        "",
    ]
    end = [
        5,
        draw(st.sampled_from([200, 0, None, 500])),
        draw(st.one_of(st.none(), good_pairs)),
        draw(st.sampled_from([None, "/r"])),
        draw(st.integers(0, 9)),
        draw(body),
        draw(st.booleans()),
        draw(st.integers(0, 9)),
        draw(body),
        draw(st.booleans()),
        draw(st.sampled_from([None, {}, {"disconnected": True, "x": b"y"}])),
        draw(st.sampled_from([0, 3])),  # the response start kept out of the items
    ]
    assert len(request) == len(ASGI_REQUEST) and len(end) == len(ASGI_END)
    if draw(st.booleans()):
        end.pop()  # an end without response_ts (what older middlewares sent)
    request_t, end_t = _spoil(draw, request, odd), _spoil(draw, end, odd)
    return _record("asgi", request_t, end_t, draw(items), draw(st.integers(-1, 4)))


@st.composite
def wsgi_records(draw: st.DrawFn) -> tuple[Any, ...]:
    fields = [
        draw(st.sampled_from(["GET", "POST"])),
        draw(st.sampled_from(["", "/app"])),
        draw(st.sampled_from(["/p", "/\xc3\xa9", "/\xff"])),
        draw(st.text(max_size=3)),
        draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/3", "x"])),
        "http",
        "127.0.0.1",
        draw(st.sampled_from(["5000", "", "x", 5000])),
        "localhost",
        draw(st.sampled_from(["8000", "", 80])),
        draw(st.sampled_from(["gunicorn/27", None])),
    ]
    environ_pairs = st.lists(
        st.tuples(
            st.sampled_from(["HTTP_HOST", "HTTP_X_A_B", "CONTENT_TYPE", "CONTENT_LENGTH"]),
            st.one_of(st.sampled_from(["", "x", "5"]), scalar),
        ),
        max_size=4,
    )
    assert len(fields) == len(WSGI_REQUEST)
    pairs = draw(environ_pairs)
    request: list[Any] = [_spoil(draw, fields, scalar), pairs]
    if draw(st.booleans()):  # the middleware's layout: header keys and values apart
        request[1:] = [tuple(k for k, _ in pairs), tuple(v for _, v in pairs)]
    end = [
        5,
        draw(st.sampled_from([200, None])),
        draw(st.one_of(st.none(), good_pairs)),
        draw(st.sampled_from([None, "/r"])),
        draw(st.integers(0, 9)),
        draw(st.one_of(st.none(), st.lists(st.binary(max_size=3), max_size=2))),
        draw(st.booleans()),
        draw(st.integers(0, 9)),
        draw(st.one_of(st.none(), st.lists(st.binary(max_size=3), max_size=2))),
        draw(st.booleans()),
        draw(st.booleans()),
        draw(st.booleans()),
        draw(st.sampled_from([None, "ValueError"])),
    ]
    assert len(end) == len(WSGI_END)
    request_t, end_t = _spoil(draw, request, odd), _spoil(draw, end, odd)
    return _record("wsgi", request_t, end_t, draw(items), draw(st.integers(-1, 4)))


def _record(interface: str, request: Any, end: Any, items: list[Any], end_at: int) -> Any:
    items = [*items, None]
    end_at = min(end_at, len(items) - 1)
    return ("r", 1, 2**100 + 3, 99, 0, 4, interface, request, end_at, end, items)


@settings(max_examples=400, deadline=None)
@given(asgi_records())
def test_odd_asgi_values_decode_alike(record: tuple[Any, ...]) -> None:
    same(record)


@settings(max_examples=400, deadline=None)
@given(wsgi_records())
def test_odd_wsgi_values_decode_alike(record: tuple[Any, ...]) -> None:
    same(record)


def test_both_wsgi_request_layouts_make_the_same_events() -> None:
    """The middleware records header keys and values as two tuples; a record with
    ``(key, value)`` pairs instead says the same."""
    for record in _wsgi_records():
        fields, keys, values = record[7]
        pairs = list(zip(keys, values, strict=True))
        assert ("HTTP_HOST", "example") in pairs
        as_pairs = (*record[:7], (fields, pairs), *record[8:])
        assert to_events(as_pairs, INFO) == to_events(record, INFO)
        assert legacy([as_pairs]) == legacy([record])


@given(st.dictionaries(st.sampled_from(["process.pid", "interface", "thread.id", "x"]), scalar))
def test_process_attributes_never_override_the_spans_own(info: dict[str, Any]) -> None:
    record = _asgi_records()[0]
    same(record, info)
