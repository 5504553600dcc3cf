import pytest
from hopscope.tracing.records import new_span_id, new_trace_id
from hopscope.tracing.traceparent import format_traceparent, parse_traceparent

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_parses_the_spec_example() -> None:
    assert parse_traceparent(VALID) == (
        0x4BF92F3577B34DA6A3CE929D0E0E4736,
        0x00F067AA0BA902B7,
    )


def test_accepts_bytes_and_surrounding_whitespace() -> None:
    assert parse_traceparent(VALID.encode()) == parse_traceparent(VALID)
    assert parse_traceparent(f" {VALID}\t") == parse_traceparent(VALID)


def test_future_versions_may_append_fields() -> None:
    assert parse_traceparent("cc" + VALID[2:] + "-what-the-future-holds") is not None
    assert parse_traceparent("cc" + VALID[2:] + "x") is None


@pytest.mark.parametrize(
    "value",
    [
        "",
        "garbage",
        VALID + "-extra",  # version 00 has exactly four fields
        VALID.upper(),  # ids are lowercase hex
        "ff" + VALID[2:],  # version ff is forbidden
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-\xff\xff",
    ],
)
def test_rejects_malformed_values(value: str | bytes) -> None:
    assert parse_traceparent(value) is None


def test_format_round_trips() -> None:
    for _ in range(200):
        trace_id, span_id = new_trace_id(), new_span_id()
        text = format_traceparent(trace_id, span_id)
        assert len(text) == 55
        assert parse_traceparent(text) == (trace_id, span_id)
    assert format_traceparent(1, 2, sampled=False).endswith("-00")
