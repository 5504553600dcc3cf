"""The filter language: every predicate, the operators and their precedence, every error
with its position, and properties over random expressions and random traces."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import pytest
from hopscope.tracing import filters
from hopscope.tracing.filters import Filter, FilterError, help_markdown, help_table, parse
from hopscope.tracing.model import QUEUE, Event, Span, Trace, TraceBuilder, outer_first
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
MS = 1_000_000
T0 = 1_732_540_000_000_000_000

# -- building traces the way readers do: wire events folded by TraceBuilder ---------------


def span_events(
    span_id: str,
    *,
    hop: str = "app",
    parent: str | None = None,
    start: float = 0,
    end: float | None = 10,
    start_attrs: dict[str, Any] | None = None,
    end_attrs: dict[str, Any] | None = None,
    events: tuple[tuple[str, dict[str, Any]], ...] = (),
    trace_id: str = "t1",
) -> list[dict[str, Any]]:
    """Events of one span; ``start``/``end`` in ms after T0, ``end=None`` still running."""
    out: list[dict[str, Any]] = [
        {
            "kind": "span_start",
            "ts": T0 + int(start * MS),
            "trace_id": trace_id,
            "span_id": span_id,
            "parent_id": parent,
            "hop": hop,
            "name": "GET /",
            "attrs": start_attrs or {},
        }
    ]
    for name, attrs in events:
        out.append(
            {
                "kind": "event",
                "ts": T0 + int(start * MS) + 1,
                "trace_id": trace_id,
                "span_id": span_id,
                "name": name,
                "attrs": attrs,
            }
        )
    if end is not None:
        out.append(
            {
                "kind": "span_end",
                "ts": T0 + int(end * MS),
                "trace_id": trace_id,
                "span_id": span_id,
                "attrs": end_attrs or {},
            }
        )
    return out


def build(*spans: list[dict[str, Any]]) -> Trace:
    builder = TraceBuilder()
    for events in spans:
        builder.extend(events)
    (trace,) = builder.traces.values()
    return trace


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def request(
    method: str = "GET",
    path: str = "/",
    status: int | None = 200,
    ms: float | None = 10,
    *,
    request_headers: list[list[str]] | None = None,
    response_headers: list[list[str]] | None = None,
    request_body: bytes | None = None,
    response_body: bytes | None = None,
    route: str | None = None,
    **end_attrs: Any,
) -> Trace:
    """A one-span trace: the app span of a request (``ms=None``: still running)."""
    end: dict[str, Any] = dict(end_attrs)
    if status is not None:
        end["http.response.status_code"] = status
    if response_headers is not None:
        end["http.response.headers"] = response_headers
    if request_body is not None:
        end["http.request.body"] = b64(request_body)
    if response_body is not None:
        end["http.response.body"] = b64(response_body)
    if route is not None:
        end["http.route"] = route
    start = {
        "http.request.method": method,
        "url.path": path,
        "http.request.headers": request_headers
        if request_headers is not None
        else [["host", "example.com"]],
    }
    return build(span_events("a1", start=0, end=ms, start_attrs=start, end_attrs=end))


def matches(expression: str, trace: Trace) -> bool:
    selected = parse(expression)
    answer = selected(trace)
    assert selected.select([trace]) == ([trace] if answer else [])
    return answer


# -- predicates ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "status", "expected"),
    [
        ("status:404", 404, True),
        ("status:404", 405, False),
        ("status:5xx", 500, True),
        ("status:5xx", 599, True),
        ("status:5XX", 503, True),
        ("status:5xx", 499, False),
        ("status:40x", 404, True),
        ("status:40x", 410, False),
        ("status:>=400", 400, True),
        ("status:>=400", 399, False),
        ("status>=400", 500, True),
        ("status:>400", 400, False),
        ("status>400", 401, True),
        ("status:<300", 299, True),
        ("status<300", 300, False),
        ("status:<=300", 300, True),
        ("status=204", 204, True),
        ("status:=204", 200, False),
    ],
)
def test_status(expression: str, status: int, expected: bool) -> None:
    assert matches(expression, request(status=status)) is expected


def test_status_is_what_the_outermost_hop_answered() -> None:
    trace = build(
        span_events(
            "p1", hop="proxy", start=0, end=20, end_attrs={"http.response.status_code": 502}
        ),
        span_events(
            "a1", parent="p1", start=1, end=5, end_attrs={"http.response.status_code": 200}
        ),
    )
    assert matches("status:502", trace)
    assert not matches("status:200", trace)


def test_no_status_matches_no_status_filter() -> None:
    running = request(status=None, ms=None)
    assert not matches("status:>=0", running)
    assert not matches("status:2xx", running)
    assert matches("not status:5xx", running)
    assert not matches("status:200", request(status="abc"))  # type: ignore[arg-type]
    assert matches("status:200", request(status="200"))  # type: ignore[arg-type]


def test_method_in_any_case() -> None:
    assert matches("method:POST", request("POST"))
    assert matches("method:post", request("POST"))
    assert matches("method:POST", request("post"))
    assert not matches("method:POST", request("GET"))
    assert not matches("method:PO", request("POST"))


@pytest.mark.parametrize(
    ("expression", "path", "expected"),
    [
        ("path:/api/*", "/api/items", True),
        ("path:/api/*", "/api/", True),
        ("path:/api/*", "/api/items/7/parts", True),  # * crosses slashes
        ("path:/api/*", "/apix", False),
        ("path:/api/*", "/v1/api/items", False),  # anchored at both ends
        ("path:/api", "/api", True),
        ("path:/api", "/api/items", False),
        ("path:/items/?", "/items/7", True),
        ("path:/items/?", "/items/77", False),
        ("path:/a.b", "/aXb", False),  # regex characters are literal
        ("path:/a.b", "/a.b", True),
        ("path:/A", "/a", False),  # paths are case-sensitive
        ('path:"/a b/*"', "/a b/c", True),
    ],
)
def test_path_glob(expression: str, path: str, expected: bool) -> None:
    assert matches(expression, request(path=path)) is expected


def test_route_glob() -> None:
    trace = request(path="/items/7", route="/items/{id}")
    assert matches("route:/items/{id}", trace)
    assert matches("route:/items/*", trace)
    assert not matches("route:/items/7", trace)
    assert not matches("route:/items/{id}", request(path="/items/7"))


def test_host_from_the_host_header_without_its_port() -> None:
    trace = request(request_headers=[["accept", "*/*"], ["Host", "API.Example.com:8443"]])
    assert matches("host:api.example.com", trace)
    assert matches("host:*.example.com", trace)
    assert not matches("host:example.com", trace)
    assert not matches("host:api.example.com:8443", trace)


@pytest.mark.parametrize(
    ("header", "host"),
    [("[::1]:8000", "::1"), ("[::1]", "::1"), ("localhost", "localhost"), ("h:80", "h")],
)
def test_host_ports_and_ipv6(header: str, host: str) -> None:
    assert matches(f'host:"{host}"', request(request_headers=[["host", header]]))


def test_host_falls_back_to_server_address_and_prefers_the_outer_hop() -> None:
    app = {"server.address": "10.0.0.5", "http.request.headers": [["accept", "*/*"]]}
    assert matches("host:10.0.0.5", build(span_events("a1", start_attrs=app)))
    trace = build(
        span_events(
            "p1",
            hop="proxy",
            start_attrs={"http.request.headers": [["host", "public.example.com"]]},
        ),
        span_events(
            "a1",
            parent="p1",
            start=1,
            start_attrs={"http.request.headers": [["host", "127.0.0.1:8000"]]},
        ),
    )
    assert matches("host:public.example.com", trace)
    assert not matches("host:127.0.0.1", trace)
    assert not matches("host:*", build(span_events("a1")))


@pytest.mark.parametrize(
    ("expression", "ms", "expected"),
    [
        ("duration>200ms", 200.001, True),
        ("duration>200ms", 200, False),
        ("duration>=200ms", 200, True),
        ("duration<200ms", 199.999, True),
        ("duration<200ms", 200, False),
        ("duration<=200ms", 200, True),
        ("duration:>1s", 1000.001, True),
        ("duration>1.5s", 1499, False),
        ("duration>0.5s", 501, True),
        ("duration>.5s", 499, False),
        ("duration>300us", 0.301, True),
        ("duration<300us", 0.301, False),
        # "=" rounds at the precision written
        ("duration=200ms", 200.4, True),
        ("duration=200ms", 199.5, True),
        ("duration=200ms", 200.5, False),
        ("duration=200ms", 199.4, False),
        ("duration=1.5s", 1549, True),
        ("duration=1.5s", 1551, False),
        ("duration=2s", 2400, True),
    ],
)
def test_duration(expression: str, ms: float, expected: bool) -> None:
    assert matches(expression, request(ms=ms)) is expected


def test_duration_spans_the_whole_trace_and_never_matches_one_in_flight() -> None:
    trace = build(
        span_events("s1", hop="server", start=0, end=300),
        span_events("a1", parent="s1", start=5, end=100),
    )
    assert matches("duration>=300ms", trace)
    assert not matches("duration>0us", request(ms=None))
    assert not matches("duration<1s", request(ms=None))


def test_header_presence_and_value() -> None:
    trace = request(
        request_headers=[["host", "h"], ["X-User", "42"], ["x-user", "7"]],
        response_headers=[["Content-Type", "application/json; charset=utf-8"]],
    )
    assert matches("header:x-user", trace)
    assert matches("header:X-USER", trace)
    assert matches("header:x-user=42", trace)
    assert matches("header:x-user=7", trace)  # any of the duplicates
    assert not matches("header:x-user=4", trace)  # the glob is anchored
    assert matches("header:x-user=4*", trace)
    assert matches("header:content-type=*json*", trace)  # response headers too
    assert not matches("header:content-type=*JSON*", trace)  # values are case-sensitive
    assert not matches("header:x-use", trace)
    assert not matches("header:accept", trace)
    assert matches('header:x-user="42"', trace)


def test_header_empty_value_and_other_spans() -> None:
    trace = build(
        span_events("s1", hop="server", end_attrs={"http.response.headers": [["x-s", ""]]}),
        span_events("a1", parent="s1"),
    )
    assert matches("header:x-s=", trace)
    assert matches("header:x-s", trace)
    assert not matches("header:x-s=1", trace)


def test_header_lists_that_are_not_text_pairs_are_skipped() -> None:
    junk: list[Any] = [["x-a"], 5, ["x-b", 1], [2, "v"], ["x-c", "1", "2"], ["x-d", "ok"]]
    trace = request(request_headers=junk)
    assert matches("header:x-d=ok", trace)
    for name in ("x-a", "x-b", "x-c"):
        assert not matches(f"header:{name}", trace)
    assert not matches("header:x", request(request_headers="x-a"))  # type: ignore[arg-type]


def test_body_in_either_direction() -> None:
    trace = request(request_body=b'{"name": "caf\xc3\xa9"}', response_body=b"internal error")
    assert matches('body:"error"', trace)
    assert matches("body:café", trace)
    assert matches('body:"\\"name\\""', trace)
    assert not matches("body:Error", trace)  # case-sensitive
    assert not matches("body:missing", trace)
    assert not matches("body:x", request())


def test_body_invalid_utf8_is_decoded_with_replacement() -> None:
    trace = request(response_body=b"ab\xff\xfecd")
    assert matches("body:ab", trace)
    assert matches("body:cd", trace)
    assert not matches("body:abcd", trace)
    assert matches('body:"b\ufffd"', trace)
    assert matches('body:"\ufffd\ufffdc"', trace)


def test_body_that_is_not_base64_is_ignored() -> None:
    trace = build(span_events("a1", end_attrs={"http.response.body": "not base64!é"}))
    assert not matches("body:x", trace)


def test_hop_presence_and_longest_span() -> None:
    trace = build(
        span_events("p1", hop="proxy", start=0, end=80),
        span_events("s1", hop="server", parent="p1", start=1, end=70),
        span_events(
            "q1", hop="server", parent="p1", start=0, end=30, end_attrs={"span.kind": "queue"}
        ),
        span_events("a1", parent="s1", start=2, end=20),
        span_events("a2", parent="a1", start=3, end=60),  # a user span, longer than its parent
        span_events("a3", parent="a1", start=4, end=None),  # unfinished: not compared
    )
    assert matches("hop:proxy", trace)
    assert matches("hop:proxy>79ms", trace)
    assert not matches("hop:proxy>80ms", trace)
    assert matches("hop:app=57ms", trace)
    assert matches("hop:server>=69ms hop:server<=69ms", trace)
    assert matches("hop:queue=30ms", trace)
    assert not matches("hop:client", trace)
    assert not matches("hop:client<1s", trace)


def test_hop_compares_spans_that_start_at_time_zero() -> None:
    span = Span("t1", "p1", hop="proxy", start=0, end=5 * MS)
    assert matches("hop:proxy=5ms", Trace("t1", {"p1": span}))


def test_hop_counts_unfinished_spans_as_present() -> None:
    trace = build(span_events("q1", hop="server", end=None, start_attrs={"span.kind": "queue"}))
    assert matches("hop:queue", trace)
    assert not matches("hop:queue>=0us", trace)
    assert not matches("hop:server", trace)  # a queue span is not the server


def test_error_from_attribute_or_exception_event() -> None:
    assert matches("error", request(status=500, error=True))
    assert not matches("error", request(status=500))
    raised = build(
        span_events("a1", events=(("exception", {"exception.type": "ValueError"}),), end_attrs={})
    )
    assert matches("error", raised)
    # An exception event on a span nobody marked (a hand-made trace) counts too.
    span = Span("t1", "a1", start=T0, end=T0 + MS, events=[Event("exception", T0)])
    assert matches("error", Trace("t1", {"a1": span}))


def test_inflight() -> None:
    assert matches("inflight", request(ms=None))
    assert not matches("inflight", request())
    trace = build(
        span_events("s1", hop="server", start=0, end=None),
        span_events("a1", parent="s1", start=1, end=5),
    )
    assert matches("inflight", trace)  # the app answered, the server has not finished
    assert matches("inflight", Trace("empty"))


def test_bare_and_quoted_words_search_the_path() -> None:
    trace = request(path="/api/items/error and more")
    assert matches("items", trace)
    assert matches("/api/it", trace)
    assert not matches("Items", trace)
    assert matches('"error and"', trace)
    assert matches("'error'", trace)
    assert not matches("error", trace)  # the keyword, not the word
    assert matches('"not"', request(path="/not"))
    assert matches('"status:5xx"', request(path="/status:5xx"))


def test_empty_expression_matches_everything() -> None:
    for text in ("", "   ", "\t\n"):
        selected = parse(text)
        assert selected(request()) and selected(Trace("empty"))
        assert str(selected) == "every trace"


# -- operators -----------------------------------------------------------------------------

GET_200 = request("GET", "/a", 200)


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("method:GET and status:200", True),
        ("method:GET and status:500", False),
        ("method:GET & status:200", True),
        ("method:GET && status:200", True),
        ("method:GET status:200", True),  # implicit and
        ("method:GET status:500", False),
        ("method:POST or status:200", True),
        ("method:POST | status:500", False),
        ("method:POST || status:200", True),
        ("method:GET|method:POST", True),
        ("method:POST&status:200", False),
        ("not method:POST", True),
        ("!method:POST", True),
        ("!!method:GET", True),
        ("not not method:POST", False),
        ("NOT method:GET OR method:GET AND status:200", True),
        # precedence: not > and > or
        ("method:GET or method:POST and status:500", True),  # GET or (POST and 500)
        ("(method:GET or method:POST) and status:500", False),
        ("not method:GET and status:200", False),  # (not GET) and 200
        ("not method:POST and status:500", False),  # (not POST) and 500, not not(POST and 500)
        ("not (method:GET and status:500)", True),
        ("method:POST status:200 or method:GET", True),  # (POST and 200) or GET
        ("method:POST (status:200 or method:GET)", False),
        ("((method:GET))", True),
        ("!(method:GET)", False),
        ("not(method:GET)status:200", False),
    ],
)
def test_operators(expression: str, expected: bool) -> None:
    assert matches(expression, GET_200) is expected


@pytest.mark.parametrize(
    ("expression", "english"),
    [
        ("status:5xx", "status is 5xx"),
        ("status:>=400", "status >= 400"),
        ("method:post path:/api/*", "method is POST and path matches '/api/*'"),
        ("duration=1.5s", "duration is about 1.5s"),
        ("hop:proxy>50ms", "longest proxy span > 50ms"),
        ("header:x-user", "header x-user is present"),
        ("a or b c", "path contains 'a' or (path contains 'b' and path contains 'c')"),
        ("(a or b) c", "(path contains 'a' or path contains 'b') and path contains 'c'"),
        ("!(error | inflight)", "not (some span failed or still in flight)"),
    ],
)
def test_english(expression: str, english: str) -> None:
    assert str(parse(expression)) == english


def test_and_or_of_many_parts() -> None:
    assert matches("method:GET status:200 path:/a route:* or error", GET_200) is False
    assert matches("method:GET status:200 path:/a", GET_200)
    assert matches("error or inflight or method:POST or path:/a", GET_200)
    assert not matches("error or inflight or method:POST or path:/b", GET_200)


# -- errors: one line, saying where -------------------------------------------------------


FIELDS = (
    "fields are status, method, path, host, route, duration, header, body, hop;"
    " quote text to search paths"
)
UNIT = "expected a number and a unit (us, ms, s), e.g. 200ms"
STATUS = "expected e.g. 404, 5xx or >=400"
HOPS = "hops are client, proxy, server, app, queue"
ESCAPES = "in quotes use \\\\, \\\", \\', \\n, \\t or \\r"


@pytest.mark.parametrize(
    ("expression", "message", "position"),
    [
        ("stauts:5xx", "unknown field 'stauts' at column 1: did you mean 'status'?", 0),
        ("a foo:bar", f"unknown field 'foo' at column 3: {FIELDS}", 2),
        ("(status:5xx or x", "expected ')' at column 17: to close '(' at column 1", 16),
        ("duration>20xs", f"bad duration '20xs' at column 10: {UNIT}", 9),
        ("duration>200", f"bad duration '200' at column 10: {UNIT}", 9),
        ("duration:200ms", "'duration' needs a comparison at column 10: e.g. duration>200ms,"
         " duration<=1.5s", 9),
        ("status:6x", f"bad status '6x' at column 8: {STATUS}", 7),
        ("status:>=4xx", f"bad status '4xx' at column 10: {STATUS}", 9),
        ("status:", "'status' needs a value at column 8: e.g. status:404, status:5xx,"
         " status:>=400", 7),
        ("method>GET", "'method' takes ':', not '>' at column 7: e.g. method:POST", 6),
        ("path:", "'path' needs a value at column 6: e.g. path:/api/*", 5),
        ("header:=5", "'header' needs a header name before '=' at column 8: e.g. header:x-user,"
         " header:x-user=42, header:content-type=*json*", 7),
        ("hop:proxi>5ms", "unknown hop 'proxi' at column 5: did you mean 'proxy'?", 4),
        ("hop:>5ms", f"'hop' needs a hop name at column 5: {HOPS}", 4),
        ("hop:proxy!5ms", "expected a comparison after hop 'proxy' at column 10:"
         " e.g. hop:proxy>50ms", 9),
        ("hop:proxy>", "'hop' needs a value at column 11: e.g. hop:proxy, hop:proxy>50ms,"
         " hop:queue>=10ms", 10),
        ("error:1", "'error' takes no value at column 6", 5),
        ("and x", "expected a term before 'and' at column 1", 0),
        ("x or", "expected a term after 'or' at column 5", 4),
        ("x and )", "expected a term after 'and', found ')' at column 7", 6),
        ("x | | y", "expected a term after '|', found '|' at column 5", 4),
        ("not", "expected a term after 'not' at column 4", 3),
        ("()", "expected a term after '(', found ')' at column 2", 1),
        (")", "unexpected ')' at column 1: no '(' is open", 0),
        ("status:5xx)", "unexpected ')' at column 11: no '(' is open", 10),
        ('path:"/a', 'unterminated string at column 6: close it with "', 5),
        ("'abc\\", "unterminated string at column 1: close it with '", 0),
        ('"a\\qb"', f"bad escape '\\q' at column 3: {ESCAPES}", 2),
        ('""', "empty text at column 1: to match every trace leave it out", 0),
        ('body:""', "'body' needs a value at column 8: e.g. body:\"error\"", 7),
    ],
)  # fmt: skip
def test_error_messages_say_where(expression: str, message: str, position: int) -> None:
    with pytest.raises(FilterError) as caught:
        parse(expression)
    error = caught.value
    assert str(error) == message
    assert error.position == position
    assert error.column == position + 1
    assert "\n" not in str(error)


def test_error_is_one_line_whatever_the_input() -> None:
    with pytest.raises(FilterError) as caught:
        parse('status:"4\n4"')
    assert str(caught.value) == "bad status '4\\n4' at column 9: expected e.g. 404, 5xx or >=400"


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    assert matches("(" * 100 + "status:200" + ")" * 100, GET_200)
    assert matches("!" * 100 + "status:200", GET_200)
    for text in ("(" * 101 + "x" + ")" * 101, "not " * 5000 + "x", "(" * 5000):
        with pytest.raises(FilterError, match=r"^nested too deeply at column"):
            parse(text)


def test_caret_points_at_the_mistake() -> None:
    with pytest.raises(FilterError) as caught:
        parse("method:GET duration>20xs")
    assert caught.value.caret("method:GET duration>20xs") == (
        "method:GET duration>20xs\n" + " " * 20 + "^"
    )
    assert isinstance(caught.value, ValueError)


# -- help ------------------------------------------------------------------------------------


def test_help_table_lists_every_predicate_and_operator() -> None:
    rows = help_table()
    written = " ".join(example for example, _ in rows)
    for code in (*filters._FIELDS, *filters._FLAGS, "not", "and", "or"):
        assert code in written
    for examples, text in rows:
        assert text and examples


def test_every_example_in_the_help_parses() -> None:
    for cls in filters._HELP_ORDER:
        for example in cls.examples:
            assert isinstance(parse(example), Filter)


def test_docs_carry_the_generated_help_table() -> None:
    docs = (ROOT / "docs" / "filters.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- help-table -->\n(.*?)\n<!-- /help-table -->", docs, re.DOTALL)
    assert block is not None, "docs/filters.md lost its help-table markers"
    assert block[1] == help_markdown(), "regenerate the table: see docs/filters.md"


# -- properties --------------------------------------------------------------------------------

KEYS = (
    "http.response.status_code",
    "http.request.method",
    "url.path",
    "http.route",
    "server.address",
    "http.request.headers",
    "http.response.headers",
    "http.request.body",
    "http.response.body",
    "error",
    "span.kind",
)
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 1000),
    st.floats(allow_nan=False),
    st.text(max_size=6),
    st.lists(st.one_of(st.text(max_size=3), st.integers()), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
HEADERS = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from(["host", "Host", "x-user", ":authority"]), st.text(max_size=8)
        ).map(list),
        JUNK,
    ),
    max_size=4,
)
BODIES = st.one_of(st.binary(max_size=16).map(b64), st.text(max_size=8))
VALUES = {
    "http.response.status_code": st.one_of(st.integers(100, 599), st.just("404"), JUNK),
    "http.request.method": st.one_of(st.sampled_from(["GET", "post"]), JUNK),
    "url.path": st.one_of(st.sampled_from(["/", "/api/items", "/a b"]), JUNK),
    "http.route": st.one_of(st.just("/items/{id}"), JUNK),
    "server.address": st.one_of(st.just("10.0.0.1"), JUNK),
    "http.request.headers": st.one_of(HEADERS, JUNK),
    "http.response.headers": st.one_of(HEADERS, JUNK),
    "http.request.body": st.one_of(BODIES, JUNK),
    "http.response.body": st.one_of(BODIES, JUNK),
    "error": JUNK,
    "span.kind": st.one_of(st.sampled_from(["queue", "user"]), JUNK),
}


@st.composite
def attrs(draw: st.DrawFn) -> dict[str, Any]:
    keys = draw(st.lists(st.sampled_from(KEYS), max_size=5, unique=True))
    return {key: draw(VALUES[key]) for key in keys}


@st.composite
def traces(draw: st.DrawFn) -> Trace:
    """Any trace TraceBuilder accepts: spans of any hop, parents in or out of the trace,
    starts and ends in any order or missing, attribute values of any JSON type."""
    count = draw(st.integers(1, 4))
    ids = [f"s{i}" for i in range(count)]
    builder = TraceBuilder()
    for span_id in ids:
        parent = draw(st.one_of(st.none(), st.sampled_from([*ids, "elsewhere"])))
        hop = draw(st.sampled_from(["client", "proxy", "server", "app", "worker"]))
        start = draw(st.integers(0, 10**9))
        events = span_events(
            span_id,
            hop=hop,
            parent=parent,
            start=start / MS,
            end=None if draw(st.booleans()) else draw(st.integers(0, 2 * 10**9)) / MS,
            start_attrs=draw(attrs()),
            end_attrs=draw(attrs()),
            events=tuple(
                (name, {})
                for name in draw(st.lists(st.sampled_from(["exception", "x"]), max_size=2))
            ),
        )
        if draw(st.booleans()):
            events = events[1:]  # the start never arrived
        builder.extend(events)
    (trace,) = builder.traces.values() or [Trace("t1")]
    return trace


def quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


NONEMPTY = st.text(min_size=1, max_size=6)
DURATION = st.builds(
    lambda number, unit: f"{number}{unit}",
    st.one_of(st.integers(0, 5000).map(str), st.decimals(0, 100, places=2).map(str)),
    st.sampled_from(["us", "ms", "s"]),
)
OP = st.sampled_from([">", ">=", "<", "<=", "="])
TERMS = st.one_of(
    st.sampled_from(
        ["status:404", "status:5xx", "status:40x", "status:>=400", "status<300", "status=200"]
    ),
    st.builds(lambda op, n: f"status{op}{n}", OP, st.integers(100, 999)),
    st.builds(lambda m: f"method:{m}", st.sampled_from(["GET", "post", "PATCH"])),
    st.builds(
        lambda field, text: f"{field}:{quoted(text)}",
        st.sampled_from(["path", "route", "host", "body"]),
        NONEMPTY,
    ),
    st.builds(lambda field: f"{field}:/api/*", st.sampled_from(["path", "route", "host"])),
    st.builds(lambda sep, op, d: f"duration{sep}{op}{d}", st.sampled_from(["", ":"]), OP, DURATION),
    st.builds(
        lambda name: f"header:{name}", st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,6}", fullmatch=True)
    ),
    st.builds(
        lambda name, value: f"header:{name}={quoted(value)}",
        st.sampled_from(["host", "X-User"]),
        st.text(max_size=4),
    ),
    st.builds(
        lambda hop: f"hop:{hop}",
        st.sampled_from(["client", "proxy", "server", "app", "queue", "APP"]),
    ),
    st.builds(
        lambda hop, op, d: f"hop:{hop}{op}{d}",
        st.sampled_from(["proxy", "app", "queue"]),
        OP,
        DURATION,
    ),
    st.sampled_from(["error", "inflight", "items", "/api", "Error"]),
    NONEMPTY.map(quoted),
)
EXPRESSIONS = st.recursive(
    TERMS,
    lambda inner: st.one_of(
        st.builds(lambda op, x: f"{op}{x}", st.sampled_from(["not ", "!", "! "]), inner),
        st.builds(lambda x: f"({x})", inner),
        st.builds(
            lambda x, sep, y: f"{x}{sep}{y}",
            inner,
            st.sampled_from([" and ", " & ", "&&", " ", " or ", " | ", "||"]),
            inner,
        ),
    ),
    max_leaves=6,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(EXPRESSIONS, st.lists(traces(), min_size=1, max_size=3))
def test_valid_expressions_never_raise_on_any_trace(expression: str, sample: list[Trace]) -> None:
    selected = parse(expression)
    answers = [selected(trace) for trace in sample]
    assert all(isinstance(answer, bool) for answer in answers)
    assert selected.select(sample) == [t for t, a in zip(sample, answers, strict=True) if a]
    english = str(selected)
    assert english and "\n" not in english


ATOMS = {
    "status:200": True,
    "method:GET": True,
    "path:/a": True,
    "status:500": False,
    "inflight": False,
    "error": False,
}


@st.composite
def boolean_expressions(draw: st.DrawFn, depth: int = 0) -> tuple[str, str]:
    """``(filter text, the same structure as Python)``: both languages rank not > and > or,
    so they must agree on every expression written the same way."""
    kind = draw(st.sampled_from(["atom"] if depth > 3 else ["atom", "not", "paren", "and", "or"]))
    if kind == "atom":
        atom = draw(st.sampled_from(sorted(ATOMS)))
        return atom, str(ATOMS[atom])
    if kind == "not":
        text, python = draw(boolean_expressions(depth + 1))
        return draw(st.sampled_from(["not ", "!", "NOT "])) + text, f"not {python}"
    if kind == "paren":
        text, python = draw(boolean_expressions(depth + 1))
        return f"({text})", f"({python})"
    left, left_py = draw(boolean_expressions(depth + 1))
    right, right_py = draw(boolean_expressions(depth + 1))
    if kind == "and":
        sep = draw(st.sampled_from([" and ", " & ", " && ", "&", " ", " AND "]))
        return f"{left}{sep}{right}", f"{left_py} and {right_py}"
    sep = draw(st.sampled_from([" or ", " | ", " || ", "|", " Or "]))
    return f"{left}{sep}{right}", f"{left_py} or {right_py}"


@settings(max_examples=300, deadline=None)
@given(boolean_expressions())
def test_precedence_agrees_with_python(pair: tuple[str, str]) -> None:
    text, python = pair
    assert matches(text, GET_200) is eval(python), (text, python, str(parse(text)))


def _text_pairs(headers: Any) -> list[tuple[str, str]]:
    if not isinstance(headers, list | tuple):
        return []
    return [
        (pair[0].lower(), pair[1])
        for pair in headers
        if isinstance(pair, list | tuple)
        and len(pair) == 2
        and isinstance(pair[0], str)
        and isinstance(pair[1], str)
    ]


def _reference_host(trace: Trace) -> str | None:
    """The host the slow, obvious way: the outermost span that knows one."""
    for span in sorted(trace.spans.values(), key=outer_first):
        for name, value in _text_pairs(span.attrs.get("http.request.headers")):
            if name == "host" or name == ":authority":
                if value.startswith("["):
                    return value[1 : value.find("]")] if "]" in value else value[1:]
                host, colon, port = value.rpartition(":")
                return host if colon and port.isdigit() and ":" not in host else value
        address = span.attrs.get("server.address")
        if isinstance(address, str):
            return address
    return None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(traces())
def test_one_pass_summary_agrees_with_a_walk_over_the_spans(trace: Trace) -> None:
    info = trace.info
    spans = list(trace.spans.values())
    starts = [s.start for s in spans if s.start is not None]
    assert info.start == (min(starts) if starts else None)
    roots = [
        s
        for s in spans
        if not (s.parent_id is not None and s.parent_id in trace.spans)
        and s.attrs.get("span.kind") != "queue"
    ]
    root = min(roots, key=outer_first) if roots else None
    assert info.root_id == (root.span_id if root else None)
    assert info.end == (root.end if root else None)
    assert info.method == trace.attr("http.request.method")
    assert info.path == trace.attr("url.path")
    assert info.status == trace.attr("http.response.status_code")
    assert info.route == trace.attr("http.route")
    assert info.host == _reference_host(trace)
    assert info.error == any(s.attrs.get("error") for s in spans)
    assert info.failed == any(
        s.attrs.get("error") or any(e.name == "exception" for e in s.events) for s in spans
    )
    headers = [
        pair
        for s in spans
        for key in ("http.request.headers", "http.response.headers")
        for pair in _text_pairs(s.attrs.get(key))
    ]
    assert list(info.headers) == headers
    bodies = [
        body
        for s in spans
        for key in ("http.request.body", "http.response.body")
        if isinstance(body := s.attrs.get(key), str) and body
    ]
    assert list(info.bodies) == bodies
    for hop in ("client", "proxy", "server", "app", "worker", QUEUE):
        queue = hop is QUEUE
        chosen = [
            s
            for s in spans
            if (s.attrs.get("span.kind") == "queue") == queue and (queue or s.hop == hop)
        ]
        took = [s.end - s.start for s in chosen if s.start is not None and s.end is not None]
        assert info.longest(hop) == (bool(chosen), max(took, default=None))


def test_summary_follows_new_events() -> None:
    builder = TraceBuilder()
    builder.extend(span_events("a1", end=None, start_attrs={"url.path": "/a"}))
    (trace,) = builder.traces.values()
    assert parse("inflight")(trace) and not parse("status:200")(trace)
    builder.extend(span_events("a1", end_attrs={"http.response.status_code": 200})[1:])
    assert not parse("inflight")(trace) and parse("status:200")(trace)
    assert parse("duration=10ms")(trace)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30))
def test_any_text_parses_or_fails_with_a_position(text: str) -> None:
    try:
        parse(text)
    except FilterError as error:
        assert 0 <= error.position <= len(text)
        assert "\n" not in str(error)


@settings(max_examples=300, deadline=None)
@given(st.text("ab*?", max_size=6), st.text("ab\n", max_size=6), st.booleans())
def test_glob_shortcuts_agree_with_the_regex(pattern: str, value: str, ignore_case: bool) -> None:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    flags = re.DOTALL | (re.IGNORECASE if ignore_case else 0)
    expected = re.fullmatch(regex, value, flags) is not None
    assert bool(filters._glob(pattern, ignore_case)(value)) is expected


@pytest.mark.parametrize("odd", ["a\nb", "a\0b"])
def test_header_values_holding_newlines_or_nul_are_still_matched(odd: str) -> None:
    trace = request(request_headers=[["X-A", odd], ["x-b", "c"]])
    assert trace.info.odd_headers is not None
    assert matches("header:x-a", trace) and matches('header:x-a="a*b"', trace)
    assert matches("header:x-b=c", trace)
    assert not matches("header:x-c", trace) and not matches("header:x-b=a", trace)
    plain = request(request_headers=[["X-A", "a b"]])
    assert plain.info.odd_headers is None and plain.info.headers == (("x-a", "a b"),)
    assert matches('header:x-a="a b"', plain) and not matches("header:x-a=a", plain)
