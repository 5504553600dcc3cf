"""OpenTelemetry (OTLP) in and out: hopscope traces to any tracing backend, and spans
from apps instrumented with the OpenTelemetry SDK into hopscope.

Out, spans keep their ids (hopscope ids are W3C ids already), so a trace hopscope
recorded and the same trace seen by other OpenTelemetry instrumentation line up in a
backend.  Attributes already use the semantic-convention names; header lists become
``http.request.header.<name>`` arrays, redacted; captured bodies are left out (they are
not telemetry, and they can hold anything).  Each span says which hop it is in
``hopscope.hop``, which is how they come back in exactly.

The JSON form is OTLP/HTTP JSON (hex ids, enums as numbers, 64-bit integers as
strings).  Protobuf needs the ``opentelemetry-proto`` package, imported only when used.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import math
import re
from collections.abc import Iterable
from typing import Any

from .har import redact_header_values, redact_query, redact_url
from .model import Span, Trace
from .records import HOPS

__all__ = [
    "SPAN_KIND_CLIENT",
    "SPAN_KIND_INTERNAL",
    "SPAN_KIND_SERVER",
    "OtlpError",
    "otlp_protobuf_to_json",
    "otlp_to_events",
    "protobuf_available",
    "traces_to_otlp_json",
    "traces_to_otlp_protobuf",
]

SPAN_KIND_INTERNAL = 1
SPAN_KIND_SERVER = 2
SPAN_KIND_CLIENT = 3
STATUS_CODE_ERROR = 2

_KIND_NAMES = {
    "SPAN_KIND_UNSPECIFIED": 0,
    "SPAN_KIND_INTERNAL": 1,
    "SPAN_KIND_SERVER": 2,
    "SPAN_KIND_CLIENT": 3,
    "SPAN_KIND_PRODUCER": 4,
    "SPAN_KIND_CONSUMER": 5,
}

#: Process-wide attributes: on the resource, not repeated on every span.
_RESOURCE_KEYS = ("process.pid", "server.software")
_HEADER_ATTRS = {
    "http.request.headers": "http.request.header.",
    "http.response.headers": "http.response.header.",
    "http.response.trailers": "http.response.trailer.",
}
_INT64 = range(-(2**63), 2**63)
_HEX = re.compile(r"[0-9a-fA-F]+")


class OtlpError(ValueError):
    """An OTLP payload that cannot be read; the message is one line."""


# --------------------------------------------------------------------------------------
# Out


def _value(value: Any) -> dict[str, Any]:
    """An OTLP ``AnyValue``."""
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        if value in _INT64:
            return {"intValue": str(value)}
        return {"stringValue": str(value)}
    if isinstance(value, float):
        if math.isfinite(value):
            return {"doubleValue": value}
        # proto3 JSON spells the non-finite doubles this way (JSON has no literal)
        return {
            "doubleValue": "NaN" if math.isnan(value) else f"{'-' if value < 0 else ''}Infinity"
        }
    if isinstance(value, str):
        return {"stringValue": value}
    if isinstance(value, list | tuple):
        return {"arrayValue": {"values": [_value(item) for item in value]}}
    if isinstance(value, dict):
        return {"kvlistValue": {"values": _attributes(value)}}
    return {"stringValue": repr(value)}


def _attributes(attrs: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"key": str(key), "value": _value(value)} for key, value in attrs.items()]


def _is_pairs(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
        for pair in value
    )


def _keep(pairs: list[Any]) -> list[tuple[str, str]]:
    return [(str(name), str(value)) for name, value in pairs]


def _plain_attrs(attrs: dict[str, Any], redact: bool) -> dict[str, Any]:
    """Span or event attributes as exported: bodies out, headers per name and (with
    ``redact``) secrets in headers and query strings replaced."""
    headers = redact_header_values if redact else _keep
    query = redact_query if redact else str
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if value is None or key.endswith(".body") or key in _RESOURCE_KEYS:
            continue
        prefix = _HEADER_ATTRS.get(key)
        if prefix is not None and _is_pairs(value):
            for name, text in headers(value):
                if not name.startswith(":"):  # HTTP/2 pseudo-headers are not headers
                    out.setdefault(prefix + name.lower(), []).append(text)
        elif _is_pairs(value) and "header" in key:  # response.start's, the proxy's...
            out[key] = [list(pair) for pair in headers(value)]
        elif key == "url.query" and isinstance(value, str):
            out[key] = query(value)
        elif key == "url.full" and isinstance(value, str) and redact:
            out[key] = redact_url(value)
        else:
            out[key] = value
    return out


def _kind(span: Span) -> int:
    if span.attrs.get("span.kind") in ("user", "queue") or span.name == "background":
        return SPAN_KIND_INTERNAL
    if span.hop in ("client", "proxy"):
        return SPAN_KIND_CLIENT
    return SPAN_KIND_SERVER


def _otlp_span(span: Span, redact: bool) -> dict[str, Any]:
    stamps = [event.ts for event in span.events]
    start = span.start if span.start is not None else min([*stamps, span.end or 0])
    end = span.end if span.end is not None else max([*stamps, start])
    attrs = _plain_attrs(span.attrs, redact)
    attrs["hopscope.hop"] = span.hop
    if span.end is None:
        attrs["hopscope.unfinished"] = True
    error = bool(span.attrs.get("error"))
    if error and "exception.type" in span.attrs and "error.type" not in attrs:
        attrs["error.type"] = span.attrs["exception.type"]
    attrs.pop("error", None)
    result: dict[str, Any] = {
        "traceId": span.trace_id,
        "spanId": span.span_id,
        "name": span.name or "span",
        "kind": _kind(span),
        "startTimeUnixNano": str(start),
        "endTimeUnixNano": str(max(end, start)),
        "attributes": _attributes(attrs),
        "events": [
            {
                "timeUnixNano": str(event.ts),
                "name": event.name,
                "attributes": _attributes(_plain_attrs(event.attrs, redact)),
            }
            for event in sorted(span.events, key=lambda e: e.ts)
        ],
        "status": {},
    }
    if span.parent_id:
        result["parentSpanId"] = span.parent_id
    if error:
        message = span.attrs.get("exception.type") or span.attrs.get("error.type") or "error"
        result["status"] = {"code": STATUS_CODE_ERROR, "message": str(message)}
    return result


def _resource_of(span: Span) -> tuple[Any, Any]:
    return (span.attrs.get("process.pid"), span.attrs.get("server.software"))


def traces_to_otlp_json(traces: Iterable[Trace], *, redact: bool = True) -> dict[str, Any]:
    """An OTLP/HTTP JSON ``ExportTraceServiceRequest``: one resource per process.

    ``redact=False`` keeps secret headers and query parameters (a local backend)."""
    by_resource: dict[tuple[Any, Any], list[dict[str, Any]]] = {}
    for trace in traces:
        for span in sorted(trace.spans.values(), key=lambda s: s.start or 0):
            by_resource.setdefault(_resource_of(span), []).append(_otlp_span(span, redact))
    resource_spans = []
    for (pid, software), spans in by_resource.items():
        resource: dict[str, Any] = {"service.name": str(software) if software else "hopscope"}
        if software:
            resource["server.software"] = str(software)
        if isinstance(pid, int) and not isinstance(pid, bool):
            resource["process.pid"] = pid
        resource_spans.append(
            {
                "resource": {"attributes": _attributes(resource)},
                "scopeSpans": [{"scope": {"name": "hopscope"}, "spans": spans}],
            }
        )
    return {"resourceSpans": resource_spans}


# --------------------------------------------------------------------------------------
# Protobuf (optional)


def protobuf_available() -> bool:
    try:
        _request_class()
    except ImportError:
        return False
    return True


def _request_class() -> Any:
    module = importlib.import_module("opentelemetry.proto.collector.trace.v1.trace_service_pb2")
    return module.ExportTraceServiceRequest


def _json_format() -> Any:
    return importlib.import_module("google.protobuf.json_format")


def _convert_ids(payload: Any, convert: Any) -> Any:
    """A copy of an OTLP payload with every trace/span id passed through ``convert``:
    OTLP JSON writes ids in hex where protobuf's JSON mapping wants base64."""
    if isinstance(payload, dict):
        return {
            key: convert(value)
            if key in ("traceId", "spanId", "parentSpanId") and isinstance(value, str)
            else _convert_ids(value, convert)
            for key, value in payload.items()
        }
    if isinstance(payload, list):
        return [_convert_ids(item, convert) for item in payload]
    return payload


def _hex_to_b64(value: str) -> str:
    try:
        return base64.b64encode(bytes.fromhex(value)).decode("ascii")
    except ValueError:
        raise OtlpError(f"id {value!r} is not hex") from None


def _b64_to_hex(value: str) -> str:
    try:
        return base64.b64decode(value, validate=True).hex()
    except (binascii.Error, ValueError):
        raise OtlpError(f"id {value!r} is not base64") from None


def traces_to_otlp_protobuf(traces: Iterable[Trace], *, redact: bool = True) -> bytes:
    """The same request as :func:`traces_to_otlp_json`, serialized as protobuf.

    Raises ImportError when ``opentelemetry-proto`` is not installed.
    """
    message = _request_class()()
    payload = _convert_ids(traces_to_otlp_json(traces, redact=redact), _hex_to_b64)
    _json_format().ParseDict(payload, message)
    data: bytes = message.SerializeToString()
    return data


def otlp_protobuf_to_json(data: bytes) -> dict[str, Any]:
    """A protobuf ``ExportTraceServiceRequest`` as OTLP JSON (hex ids).

    Raises ImportError when ``opentelemetry-proto`` is not installed, :class:`OtlpError`
    when ``data`` is not such a message.
    """
    message = _request_class()()
    try:
        message.ParseFromString(data)
    except Exception:  # google.protobuf.message.DecodeError, from a module maybe absent
        raise OtlpError("not an OTLP protobuf ExportTraceServiceRequest") from None
    payload = _json_format().MessageToDict(message)
    converted: dict[str, Any] = _convert_ids(payload, _b64_to_hex)
    return converted


# --------------------------------------------------------------------------------------
# In


def _from_value(value: Any) -> Any:
    if not isinstance(value, dict) or not value:
        return None
    kind, inner = next(iter(value.items()))
    if kind == "stringValue":
        return str(inner)
    if kind == "boolValue":
        return bool(inner)
    if kind == "intValue":
        try:
            return int(inner)
        except (TypeError, ValueError, OverflowError):
            return None
    if kind == "doubleValue":
        try:
            return float(inner)
        except (TypeError, ValueError):
            return None
    if kind == "arrayValue":
        values = inner.get("values", []) if isinstance(inner, dict) else []
        return [_from_value(item) for item in values]
    if kind == "kvlistValue":
        values = inner.get("values", []) if isinstance(inner, dict) else []
        return _from_attributes(values)
    if kind == "bytesValue":
        return str(inner)
    return None


def _from_attributes(items: Any) -> dict[str, Any]:
    if not isinstance(items, list):
        return {}
    out: dict[str, Any] = {}
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("key"), str):
            value = _from_value(item.get("value"))
            if value is not None:
                out[item["key"]] = value
    return out


def _id(value: Any, width: int, what: str) -> str | None:
    """A hex id from OTLP JSON (hex) or from protobuf's JSON mapping (base64)."""
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise OtlpError(f"{what} is not a string")
    if len(value) == width and _HEX.fullmatch(value):
        text = value.lower()
    else:
        text = _b64_to_hex(value)
        if len(text) != width:
            raise OtlpError(f"{what} {value!r} is not {width // 2} bytes")
    return None if set(text) == {"0"} else text


def _time(value: Any, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: JSON's Infinity
        raise OtlpError(f"{what} is not a number of nanoseconds") from None


def _kind_of(value: Any) -> int:
    if isinstance(value, str):
        return _KIND_NAMES.get(value, 0)
    return value if isinstance(value, int) else 0


def _links(value: Any) -> list[str]:
    """A span's links as ``TRACEID-SPANID`` strings (W3C traceparent order): the spans a
    batch job or a consumer of a queue points back to, shown and searchable as they are."""
    if value in (None, []):
        return []
    if not isinstance(value, list):
        raise OtlpError("a span's links is not a list")
    out = []
    for link in value:
        if not isinstance(link, dict):
            raise OtlpError("a span link is not an object")
        trace_id = _id(link.get("traceId"), 32, "a link's traceId")
        span_id = _id(link.get("spanId"), 16, "a link's spanId")
        if trace_id is not None and span_id is not None:
            out.append(f"{trace_id}-{span_id}")
    return out


def _span_events(span: dict[str, Any], resource: dict[str, Any]) -> list[dict[str, Any]]:
    trace_id = _id(span.get("traceId"), 32, "traceId")
    span_id = _id(span.get("spanId"), 16, "spanId")
    if trace_id is None or span_id is None:
        raise OtlpError("a span has no traceId or spanId")
    attrs = _from_attributes(span.get("attributes"))
    kind = _kind_of(span.get("kind"))
    hop = attrs.pop("hopscope.hop", None)
    if hop not in HOPS:
        hop = "client" if kind == SPAN_KIND_CLIENT else "app"
        if kind == SPAN_KIND_INTERNAL:
            attrs.setdefault("span.kind", "user")
    for key, prefix in _HEADER_ATTRS.items():
        pairs = []
        for name in [k for k in attrs if k.startswith(prefix)]:
            values = attrs.pop(name)
            for value in values if isinstance(values, list) else [values]:
                pairs.append([name[len(prefix) :], str(value)])
        if pairs:
            attrs[key] = pairs
    for key, value in resource.items():
        attrs.setdefault(key, value)
    links = _links(span.get("links"))
    if links:
        attrs["otel.links"] = links
    start = _time(span.get("startTimeUnixNano"), "startTimeUnixNano")
    end = _time(span.get("endTimeUnixNano"), "endTimeUnixNano")
    end_attrs: dict[str, Any] = {}
    status = span.get("status")
    if isinstance(status, dict) and status.get("code") in (STATUS_CODE_ERROR, "STATUS_CODE_ERROR"):
        end_attrs["error"] = True
        if status.get("message"):
            end_attrs["otel.status_description"] = str(status["message"])
    ids = {"trace_id": trace_id, "span_id": span_id}
    events: list[dict[str, Any]] = [
        {
            "kind": "span_start",
            "ts": start,
            **ids,
            "parent_id": _id(span.get("parentSpanId"), 16, "parentSpanId"),
            "hop": hop,
            "name": str(span.get("name") or ""),
            "attrs": attrs,
        }
    ]
    span_events = span.get("events") or []
    if not isinstance(span_events, list):
        raise OtlpError("a span's events is not a list")
    for event in span_events:
        if not isinstance(event, dict):
            raise OtlpError("a span event is not an object")
        events.append(
            {
                "kind": "event",
                "ts": _time(event.get("timeUnixNano"), "timeUnixNano"),
                **ids,
                "name": str(event.get("name") or ""),
                "attrs": _from_attributes(event.get("attributes")),
            }
        )
    if not attrs.pop("hopscope.unfinished", False):
        events.append({"kind": "span_end", "ts": end, **ids, "attrs": end_attrs})
    return events


def otlp_to_events(payload: Any) -> list[dict[str, Any]]:
    """Wire events (a span start, its events, its end) for every span in an OTLP JSON
    ``ExportTraceServiceRequest``; raises :class:`OtlpError` for anything else."""
    if not isinstance(payload, dict):
        raise OtlpError("an OTLP request is a JSON object")
    resource_spans = payload.get("resourceSpans", payload.get("resource_spans"))
    if resource_spans is None:
        return []
    if not isinstance(resource_spans, list):
        raise OtlpError("resourceSpans is not a list")
    events: list[dict[str, Any]] = []
    for group in resource_spans:
        if not isinstance(group, dict):
            raise OtlpError("a resourceSpans item is not an object")
        resource_obj = group.get("resource")
        resource = _from_attributes(
            resource_obj.get("attributes") if isinstance(resource_obj, dict) else None
        )
        scopes = group.get("scopeSpans", group.get("scope_spans")) or []
        if not isinstance(scopes, list):
            raise OtlpError("scopeSpans is not a list")
        for scope in scopes:
            spans = scope.get("spans") if isinstance(scope, dict) else None
            if not isinstance(spans, list):
                raise OtlpError("a scopeSpans item has no spans list")
            for span in spans:
                if not isinstance(span, dict):
                    raise OtlpError("a span is not an object")
                events += _span_events(span, resource)
    return events
