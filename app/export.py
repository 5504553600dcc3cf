"""``hopscope export``: a trace file (or a HAR) out as HAR, OTLP JSON, or a command that
sends one of its requests again.

Exported files hold requests' headers and bodies, so they are written ``0600`` and
atomically (a reader never sees half a file), never over the file being read, and with
secrets redacted unless ``--no-redact`` says otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from hopscope.tracing.copyas import CopyError, as_curl, as_httpie, as_httpx
from hopscope.tracing.har import HarError, exchange, load_har, traces_to_har
from hopscope.tracing.model import Trace
from hopscope.tracing.otlp import traces_to_otlp_json
from hopscope.tracing.tracefile import FORMAT_NAME, TraceFileError, load

__all__ = ["COPY_FORMS", "ExportError", "Result", "load_any", "run_export", "select"]

COPY_FORMS: dict[str, Callable[..., str]] = {
    "curl": as_curl,
    "httpie": as_httpie,
    "httpx": as_httpx,
}


class ExportError(Exception):
    """The export cannot be done; the message is one line for the user."""


@dataclass
class Result:
    output: str = ""
    """For stdout (a copied command, or a document written to ``-``)."""
    notes: list[str] = field(default_factory=list)
    """For stderr: what was written, what was skipped."""


def _is_trace_file(path: str) -> bool:
    if not os.path.isfile(path):  # a pipe, ``<(zcat t.jsonl.gz)``, can be read only once
        return True
    try:
        with open(path, "rb") as handle:
            first = handle.readline(64 * 1024)
    except OSError as exc:
        raise ExportError(f"cannot open {path}: {exc.strerror}") from None
    try:
        header = json.loads(first)
    except ValueError:
        return False
    return isinstance(header, dict) and header.get("format") == FORMAT_NAME


def load_any(path: str, notes: list[str] | None = None) -> list[Trace]:
    """Traces from a hopscope trace file or a HAR file, whichever ``path`` is (``-``:
    stdin, as ``view`` and ``tail`` read it)."""
    if path == "-":
        path = "/dev/stdin"
    try:
        if not _is_trace_file(path):
            return load_har(path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            traces = load(path)
        if notes is not None:
            notes += [str(warning.message) for warning in caught]
        return traces
    except (TraceFileError, HarError) as exc:
        raise ExportError(str(exc)) from None


def requests_of(traces: list[Trace]) -> list[Trace]:
    """The traces that hold an HTTP request, by start time: what ``#N`` counts."""
    found = [trace for trace in traces if exchange(trace) is not None]
    return sorted(found, key=lambda trace: trace.start or 0)


def select(traces: list[Trace], ident: str) -> Trace:
    """The request ``ident`` names: ``N`` or ``#N`` (the N-th request by start time,
    from 1) or the first 4+ hex digits of its trace id."""
    requests = requests_of(traces)
    text = ident.strip().lower()
    number = text[1:] if text.startswith("#") else text
    by_index: Trace | None = None
    if number.isdigit():
        index = int(number)
        if 1 <= index <= len(requests):
            by_index = requests[index - 1]
        elif text.startswith("#") or len(number) < 4:
            raise ExportError(f"there is no request #{index}: the file has {len(requests)}")
    if text.startswith("#"):
        if by_index is None:
            raise ExportError(f"{ident!r} is not a request number (#1, #2...)")
        return by_index
    if len(text) < 4 or any(ch not in "0123456789abcdef" for ch in text):
        if by_index is not None:
            return by_index
        raise ExportError(
            f"{ident!r} is neither a request number nor a trace id prefix (4+ hex digits)"
        )
    matches = [trace for trace in requests if trace.trace_id.startswith(text)]
    if by_index is not None and any(trace is not by_index for trace in matches):
        raise ExportError(f"{ident} is request #{number} and a trace id prefix: use #{number}")
    if by_index is not None:
        return by_index
    if not matches:
        raise ExportError(f"no request's trace id starts with {text}")
    if len(matches) > 1:
        shown = ", ".join(trace.trace_id[:12] for trace in matches[:5])
        raise ExportError(f"{text} matches {len(matches)} traces ({shown}...): give more digits")
    return matches[0]


def _write_private(out: str, data: bytes, source: str) -> None:
    """Write ``out`` as ``0600``, all at once, refusing to replace ``source``.

    Only a regular file is replaced: a device, a FIFO or ``/dev/stdout`` is written
    into (replacing ``/dev/null`` with a file, as root, would break the machine), and a
    symlink's target is replaced, not the link.
    """
    with contextlib.suppress(OSError):
        if os.path.samefile(out, source):
            raise ExportError(f"refusing to overwrite the input file {source}")
    if os.path.isdir(out):
        raise ExportError(f"cannot write {out}: it is a directory")
    try:
        special = not stat.S_ISREG(os.stat(out).st_mode)
    except OSError:
        special = False  # nothing there yet (or a dangling link): a new file
    if special:
        try:
            with open(out, "wb") as handle:
                handle.write(data)
        except OSError as exc:
            raise ExportError(f"cannot write {out}: {exc.strerror}") from None
        return
    target = os.path.realpath(out)
    try:
        fd, temp = tempfile.mkstemp(
            dir=os.path.dirname(target), prefix=f".{os.path.basename(target)}.", suffix=".tmp"
        )
    except OSError as exc:
        raise ExportError(f"cannot write {out}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(data)
        os.replace(temp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise ExportError(f"cannot write {out}: {exc.strerror}") from None


def _document(document: dict[str, Any], out: str, source: str, what: str) -> Result:
    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    if out == "-":
        return Result(output=text)
    _write_private(out, text.encode("utf-8"), source)
    return Result(notes=[f"hopscope: wrote {what} to {out}"])


def run_export(
    file: str,
    *,
    har: str | None = None,
    otlp: str | None = None,
    copy: tuple[str, str] | None = None,
    base_url: str | None = None,
    redact: bool = True,
) -> Result:
    """Do one export: ``har``/``otlp`` name the output file (``-``: stdout), ``copy`` is
    ``(form, ID)`` with form one of :data:`COPY_FORMS`."""
    if base_url is not None:
        _check_base_url(base_url, copy)
    notes: list[str] = []
    traces = load_any(file, notes)
    notes = [f"hopscope: {note}" for note in notes]
    if har is not None:
        document = traces_to_har(traces, redact=redact)
        count = len(document["log"]["entries"])
        result = _document(document, har, file, f"{count} request(s) as HAR")
    elif otlp is not None:
        document = traces_to_otlp_json(traces, redact=redact)
        spans = sum(len(s["spans"]) for r in document["resourceSpans"] for s in r["scopeSpans"])
        result = _document(document, otlp, file, f"{spans} span(s) as OTLP JSON")
    elif copy is not None:
        form, ident = copy
        trace = select(traces, ident)
        try:
            result = Result(output=COPY_FORMS[form](trace, base_url=base_url, redact=redact))
        except CopyError as exc:
            raise ExportError(str(exc)) from None
    else:
        raise ExportError("nothing to export: give --har, --otlp, --curl, --httpie or --httpx")
    result.notes = notes + result.notes
    return result


def _check_base_url(base_url: str, copy: tuple[str, str] | None) -> None:
    """``--base-url`` goes into a copied command as is: a typo would make a command
    that sends elsewhere (``curl example`` asks the host ``example``)."""
    if copy is None:
        raise ExportError("--base-url goes with --curl, --httpie or --httpx")
    try:
        parts = urlsplit(base_url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        valid = valid and (parts.port or 0) >= 0  # raises for a port that is no number
    except ValueError:
        valid = False
    if not valid:
        raise ExportError(f"--base-url must look like http://HOST:PORT, got {base_url!r}")
    if parts.query or parts.fragment:
        raise ExportError(f"--base-url cannot have a query or fragment, got {base_url!r}")


def print_result(result: Result) -> None:
    if result.output:
        sys.stdout.write(result.output)
        sys.stdout.flush()
    for note in result.notes:
        print(note, file=sys.stderr)
