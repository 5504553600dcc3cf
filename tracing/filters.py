"""The filter language: ``status:5xx and path:/api/*``, for the TUI and ``replay --filter``.

Shaped after mitmproxy's ``flowfilter``: one small class per predicate and operator, each
with a ``code``, ``examples``, a ``help`` line, ``__call__(trace) -> bool`` and an English
``__str__``; the help table (:func:`help_table`, docs/filters.md) is generated from the
classes, so it cannot drift from what the parser accepts.  Unlike mitmproxy's, a bad
expression says where it is wrong: :class:`FilterError` carries the position.

The parser is hand-written (a tokenizer and a recursive descent over three precedence
levels) because the grammar is tiny and ``tracing`` runs inside users' apps, where a
parser dependency would be one more thing to conflict with theirs::

    expr  := and ( ("or" | "|" | "||") and )*
    and   := unary ( ("and" | "&" | "&&")? unary )*     adjacent terms: implicit "and"
    unary := ("not" | "!") unary | "(" expr ")" | term
    term  := FIELD (":" | ">" | ">=" | "<" | "<=" | "=") VALUE | "error" | "inflight" | TEXT

A viewer re-applies its filter to every trace it holds (100,000 and more) on each
keystroke, so the work happens once, at parse time: globs become string methods or
compiled regexes, durations integer nanosecond bounds, header names lowercase; and each
filter compiles to a plain closure (:attr:`Filter.test`), because calling a closure
costs a fraction of dispatching ``__call__`` on an instance.  Per trace, predicates read
the trace's summary (:class:`~hopscope.tracing.model.TraceInfo`: worked out once per
change of the trace, not once per filter), fetched once for the whole expression, and
tolerate values of the wrong type (a trace file is user input).
"""

from __future__ import annotations

import binascii
import difflib
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property
from operator import attrgetter
from typing import Any, ClassVar

from .model import HOP_ORDER, QUEUE, Trace, TraceInfo

__all__ = [
    "And",
    "Body",
    "Duration",
    "Error",
    "Everything",
    "Filter",
    "FilterError",
    "Header",
    "Hop",
    "Host",
    "Inflight",
    "Method",
    "Not",
    "Or",
    "Path",
    "Route",
    "Status",
    "Text",
    "help_markdown",
    "help_table",
    "parse",
]

Test = Callable[[Trace], bool]
Check = Callable[[TraceInfo], bool]


class FilterError(ValueError):
    """A filter expression that does not parse; says what is wrong and where.

    ``position`` is the 0-based index into the expression (``len(text)`` for "at the
    end"), so a UI can put a caret under it; ``str()`` is one line naming the 1-based
    column, then a hint when there is one.
    """

    def __init__(self, message: str, position: int, hint: str | None = None) -> None:
        super().__init__(message, position, hint)
        self.message = message
        self.position = position
        self.hint = hint

    @property
    def column(self) -> int:
        return self.position + 1

    def __str__(self) -> str:
        text = f"{self.message} at column {self.column}"
        return f"{text}: {self.hint}" if self.hint else text

    def caret(self, text: str) -> str:
        """The expression with a ``^`` under the offending character, on two lines."""
        return f"{text}\n{' ' * self.position}^"


def _show(text: str) -> str:
    """Quote user text for a one-line message (``repr`` only when it must escape)."""
    return f"'{text}'" if text.isprintable() and "'" not in text else repr(text)


# -- what the predicates read from a trace ---------------------------------------------------
#
# Every predicate reads the trace's TraceInfo (model.py): worked out once per change of the
# trace, in one pass over its spans, and kept, so a filter over 100,000 traces is a field
# read and a comparison per trace, not a walk over every span.


def _as_int(value: Any) -> int | None:
    if type(value) is int:
        return value
    if type(value) is str and value.isascii() and value.isdigit():
        return int(value)
    return None


def _body(encoded: str) -> bytes:
    try:
        return binascii.a2b_base64(encoded)
    except (binascii.Error, ValueError):  # not base64, or not ASCII
        return b""


# -- the filter classes ------------------------------------------------------------------------


class Filter:
    """A predicate over traces; ``str()`` says in English what it matches.

    ``filter(trace)`` answers for one trace; over many, :meth:`select` (or calling
    :attr:`test` directly) skips the method dispatch per trace.
    """

    code: ClassVar[str] = ""
    """The field name (``status``), keyword (``error``) or operator (``and``)."""
    examples: ClassVar[tuple[str, ...]] = ()
    """How to write it, shown in the help table."""
    help: ClassVar[str] = ""
    """One line for the help table."""

    def __call__(self, trace: Trace) -> bool:
        return self.test(trace)

    @cached_property
    def test(self) -> Test:
        """This filter as a plain function of a trace (no method dispatch per call)."""
        check = self.check
        return lambda trace: check(trace.info)

    @cached_property
    def check(self) -> Check:
        """The same, of a trace's summary: operators combine these, so a whole
        expression reads :attr:`Trace.info` once per trace."""
        return self._compile()

    def _compile(self) -> Check:
        raise NotImplementedError

    def select(self, traces: Iterable[Trace]) -> list[Trace]:
        """The traces that match, in their order: ``[t for t in traces if self(t)]``."""
        check = self.check
        return [trace for trace in traces if check(trace.info)]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self}>"


class Everything(Filter):
    help = "An empty expression matches every trace."

    def _compile(self) -> Check:
        return lambda info: True

    def __str__(self) -> str:
        return "every trace"


@dataclass(frozen=True, slots=True)
class _Value:
    """A field's value after unquoting, with the source position of each character."""

    text: str
    where: tuple[int, ...]
    end: int

    def at(self, index: int) -> int:
        return self.where[index] if index < len(self.where) else self.end

    def rest(self, index: int) -> _Value:
        return _Value(self.text[index:], self.where[index:], self.end)


@dataclass(frozen=True, slots=True)
class _Field:
    """``name OP value`` as written, for the field's class to check and build from."""

    name: str
    op: str
    op_pos: int
    value: _Value

    def fail(self, message: str, index: int = 0, hint: str | None = None) -> FilterError:
        return FilterError(message, self.value.at(index), hint)

    def colon_only(self, cls: type[FieldFilter]) -> _Value:
        if self.op != ":":
            raise FilterError(f"{self.name!r} takes ':', not {self.op!r}", self.op_pos, cls.hint())
        return self.needs_value(cls)

    def needs_value(self, cls: type[FieldFilter], value: _Value | None = None) -> _Value:
        value = self.value if value is None else value
        if not value.text:
            raise FilterError(f"{self.name!r} needs a value", value.end, cls.hint())
        return value

    def comparison(self) -> tuple[str, _Value]:
        """The comparison operator, written either ``name>=v`` or ``name:>=v`` (``:`` when
        there is none)."""
        if self.op != ":":
            return self.op, self.value
        match = _COMPARISON.match(self.value.text)
        if match is None:
            return ":", self.value
        return match[0], self.value.rest(match.end())


_COMPARISON = re.compile(r">=|<=|[<>=]")


class FieldFilter(Filter):
    """A ``name:value`` predicate; ``build`` checks the value and makes the filter."""

    @classmethod
    def build(cls, field: _Field) -> Filter:
        raise NotImplementedError

    @classmethod
    def hint(cls) -> str:
        return "e.g. " + ", ".join(cls.examples)


def _bounds(op: str, value: Fraction, half: Fraction = Fraction(0)) -> tuple[float, float]:
    """Inclusive bounds on an integer x for ``x OP value`` (``=`` means within ±half)."""
    if op == ">":
        return math.floor(value) + 1, math.inf
    if op == ">=":
        return math.ceil(value), math.inf
    if op == "<":
        return -math.inf, math.ceil(value) - 1
    if op == "<=":
        return -math.inf, math.floor(value)
    return math.ceil(value - half), math.ceil(value + half) - 1


class _Range(FieldFilter):
    """A number measured on the trace within inclusive bounds (``status``, ``duration``)."""

    def __init__(self, low: float, high: float, text: str) -> None:
        self.low, self.high, self.text = low, high, text

    @staticmethod
    def measure(info: TraceInfo) -> int | None:
        """The number compared, or None when the trace has none (it never matches)."""
        raise NotImplementedError

    def _compile(self) -> Check:
        low, high, measure = self.low, self.high, self.measure

        def test(info: TraceInfo) -> bool:
            value = measure(info)
            return value is not None and low <= value <= high

        return test


class Status(_Range):
    code = "status"
    examples = ("status:404", "status:5xx", "status:>=400")
    help = "Response status (the outermost hop's): exact, a class (5xx, 40x), or > >= < <= =."

    _CLASS = re.compile(r"\d(?:\d[\dxX]|[xX][xX])")

    @classmethod
    def build(cls, field: _Field) -> Filter:
        op, value = field.comparison()
        text = field.needs_value(cls, value).text
        bad = FilterError(
            f"bad status {_show(text)}", value.at(0), "expected e.g. 404, 5xx or >=400"
        )
        if op in (":", "="):
            if not cls._CLASS.fullmatch(text):
                raise bad
            text = text.lower()
            return cls(int(text.replace("x", "0")), int(text.replace("x", "9")), text)
        if not (text.isascii() and text.isdigit()):
            raise bad
        return cls(*_bounds(op, Fraction(int(text))), f"{op} {int(text)}")

    @staticmethod
    def measure(info: TraceInfo) -> int | None:
        return _as_int(info.status)

    def __str__(self) -> str:
        return f"status {self.text}" if self.text[0] in "<>=" else f"status is {self.text}"


class Method(FieldFilter):
    code = "method"
    examples = ("method:POST",)
    help = "Request method, in any case."

    def __init__(self, method: str) -> None:
        self.method = method.upper()

    @classmethod
    def build(cls, field: _Field) -> Filter:
        return cls(field.colon_only(cls).text)

    def _compile(self) -> Check:
        method = self.method

        def test(info: TraceInfo) -> bool:
            value = info.method
            return type(value) is str and (value == method or value.upper() == method)

        return test

    def __str__(self) -> str:
        return f"method is {self.method}"


def _glob(pattern: str, ignore_case: bool = False) -> Callable[[str], object]:
    """``*`` any run of characters (``/`` too), ``?`` one character; the rest is literal.

    Returns a function that is truthy for a match.  The usual shapes (``text``,
    ``text*``, ``*text``, ``*text*``) become a string method, several times faster than
    a regex over 100,000 values.
    """
    if not ignore_case and "?" not in pattern:
        inner = pattern.strip("*")
        if "*" not in inner:
            lead, trail = pattern.startswith("*"), pattern.endswith("*") and bool(inner)
            if not inner:
                return (lambda value: True) if pattern else (lambda value: value == "")
            if lead and trail:
                return lambda value: inner in value
            if lead:
                return lambda value: value.endswith(inner)
            if trail:
                return lambda value: value.startswith(inner)
            return inner.__eq__
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(regex, re.DOTALL | (re.IGNORECASE if ignore_case else 0)).fullmatch


class _GlobField(FieldFilter):
    """A request attribute (as the outermost hop saw it) that matches a glob."""

    field: ClassVar[str] = ""
    """The TraceInfo field read."""
    ignore_case: ClassVar[bool] = False

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern

    @classmethod
    def build(cls, field: _Field) -> Filter:
        return cls(field.colon_only(cls).text)

    def _compile(self) -> Check:
        get, match = attrgetter(self.field), _glob(self.pattern, self.ignore_case)

        def test(info: TraceInfo) -> bool:
            value = get(info)
            return type(value) is str and bool(match(value))

        return test

    def __str__(self) -> str:
        verb = "matches" if "*" in self.pattern or "?" in self.pattern else "is"
        return f"{self.code} {verb} {self.pattern!r}"


class Path(_GlobField):
    code = "path"
    field = "path"
    examples = ("path:/api/*",)
    help = "The path (without query) matches the glob: * is any run, ? one character."


class Route(_GlobField):
    code = "route"
    field = "route"
    examples = ("route:/items/{id}",)
    help = "The framework's route template matches the glob."


class Host(_GlobField):
    code = "host"
    field = "host"
    ignore_case = True
    examples = ("host:example.com", "host:*.example.com")
    help = "Host header without its port (else server.address) matches the glob, in any case."


_UNITS = {"us": 1_000, "ms": 1_000_000, "s": 1_000_000_000}
_DURATION = re.compile(r"(\d*\.?\d+)(us|ms|s)")


def _duration_bounds(op: str, value: _Value) -> tuple[float, float]:
    """Bounds in ns; ``=`` means "rounds to this, at the precision written": ``=200ms`` is
    199.5ms up to (not including) 200.5ms, ``=1.5s`` is 1.45s up to 1.55s."""
    match = _DURATION.fullmatch(value.text)
    if match is None:
        raise FilterError(
            f"bad duration {_show(value.text)}",
            value.at(0),
            "expected a number and a unit (us, ms, s), e.g. 200ms",
        )
    number, unit = match.groups()
    scale = _UNITS[unit]
    half = Fraction(scale, 2 * 10 ** len(number.partition(".")[2]))
    return _bounds(op, Fraction(number) * scale, half)


def _english_duration(op: str, text: str) -> str:
    return f"is about {text}" if op == "=" else f"{op} {text}"


class Duration(_Range):
    code = "duration"
    examples = ("duration>200ms", "duration<=1.5s")
    help = "The whole trace's time, > >= < <= = (us, ms, s; = rounds as written); not if running."

    @classmethod
    def build(cls, field: _Field) -> Filter:
        op, value = field.comparison()
        if op == ":":
            raise field.fail(f"{field.name!r} needs a comparison", 0, cls.hint())
        value = field.needs_value(cls, value)
        return cls(*_duration_bounds(op, value), _english_duration(op, value.text))

    @staticmethod
    def measure(info: TraceInfo) -> int | None:
        start, end = info.start, info.end
        return None if start is None or end is None else end - start

    def __str__(self) -> str:
        return f"duration {self.text}"


class Header(FieldFilter):
    code = "header"
    examples = ("header:x-user", "header:x-user=42", "header:content-type=*json*")
    help = "A span has the request or response header (name in any case), value matching the glob."

    def __init__(self, name: str, pattern: str | None) -> None:
        self.name = name.lower()
        self.pattern = pattern

    @classmethod
    def build(cls, field: _Field) -> Filter:
        text = field.colon_only(cls).text
        name, equals, pattern = text.partition("=")
        if not name:
            raise field.fail(f"{field.name!r} needs a header name before '='", 0, cls.hint())
        return cls(name, pattern if equals else None)

    def _compile(self) -> Check:
        wanted = self.name
        key = f"\n{wanted}\0"
        size = len(key)
        plain = "\n" not in wanted and "\0" not in wanted  # else only odd headers have it
        match = None if self.pattern is None else _glob(self.pattern)

        def test(info: TraceInfo) -> bool:
            odd = info.odd_headers
            if odd is not None:
                for name, value in odd:
                    if name == wanted and (match is None or match(value)):
                        return True
                return False
            if not plain:
                return False
            text = info.header_text
            at = text.find(key)  # most traces are ruled out here, in C
            if match is None:
                return at >= 0
            while at >= 0:
                end = text.index("\n", at + size)
                if match(text[at + size : end]):
                    return True
                at = text.find(key, end)
            return False

        return test

    def __str__(self) -> str:
        if self.pattern is None:
            return f"header {self.name} is present"
        return f"header {self.name} matches {self.pattern!r}"


class Body(FieldFilter):
    code = "body"
    examples = ('body:"error"',)
    help = "A captured request or response body contains the text (UTF-8, case-sensitive)."

    def __init__(self, text: str) -> None:
        self.text = text

    @classmethod
    def build(cls, field: _Field) -> Filter:
        return cls(field.colon_only(cls).text)

    def _compile(self) -> Check:
        text = self.text
        # UTF-8 is self-synchronising: the encoded needle occurs in the raw bytes exactly
        # where the text occurs in the decoded body, so bodies need no decoding.  Only a
        # needle holding U+FFFD can match where invalid bytes were replaced.
        needle = text.encode("utf-8", "surrogatepass")
        decode = "\ufffd" in text

        def test(info: TraceInfo) -> bool:
            for encoded in info.bodies:
                data = _body(encoded)
                if (text in data.decode("utf-8", "replace")) if decode else (needle in data):
                    return True
            return False

        return test

    def __str__(self) -> str:
        return f"body contains {self.text!r}"


_HOPS = (*HOP_ORDER, "queue")


class Hop(FieldFilter):
    code = "hop"
    examples = ("hop:proxy", "hop:proxy>50ms", "hop:queue>=10ms")
    help = (
        "A span of the hop: client, proxy, server, app, or queue (waiting before the server);"
        " with a comparison, the hop's longest finished span is compared."
    )

    _NAME = re.compile(r"[A-Za-z_][\w-]*")

    def __init__(
        self, hop: str, low: float | None = None, high: float = math.inf, text: str = ""
    ) -> None:
        self.hop, self.low, self.high, self.text = hop, low, high, text

    @classmethod
    def build(cls, field: _Field) -> Filter:
        value = field.colon_only(cls)
        match = cls._NAME.match(value.text)
        known = "hops are " + ", ".join(_HOPS)
        if match is None:
            raise field.fail(f"{field.name!r} needs a hop name", 0, known)
        name = match[0].lower()
        if name not in _HOPS:
            close = difflib.get_close_matches(name, _HOPS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else known
            raise field.fail(f"unknown hop {_show(match[0])}", 0, hint)
        rest = value.rest(len(name))
        if not rest.text:
            return cls(name)
        op = _COMPARISON.match(rest.text)
        if op is None:
            raise FilterError(
                f"expected a comparison after hop {name!r}", rest.at(0), "e.g. hop:proxy>50ms"
            )
        rest = field.needs_value(cls, rest.rest(op.end()))
        low, high = _duration_bounds(op[0], rest)
        return cls(name, low, high, _english_duration(op[0], rest.text))

    def _compile(self) -> Check:
        hop, high, compare = self.hop, self.high, self.low is not None
        low = -math.inf if self.low is None else self.low
        # Queue spans are recorded under the server hop, but are not the server.
        key: str | tuple[str] = QUEUE if hop == "queue" else hop

        def test(info: TraceInfo) -> bool:
            hops = info.hops
            if key not in hops:
                return False
            if not compare:
                return True
            longest = hops[hops.index(key) + 1]
            return longest is not None and low <= longest <= high

        return test

    def __str__(self) -> str:
        if self.low is None:
            return f"has a {self.hop} span"
        return f"longest {self.hop} span {self.text}"


class Error(Filter):
    code = "error"
    examples = ("error",)
    help = "Some span failed: error set or an exception event (status:5xx is separate)."

    def _compile(self) -> Check:
        return lambda info: info.failed

    def __str__(self) -> str:
        return "some span failed"


class Inflight(Filter):
    code = "inflight"
    examples = ("inflight",)
    help = "Still running: the outermost span has not ended."

    def _compile(self) -> Check:
        return lambda info: info.end is None

    def __str__(self) -> str:
        return "still in flight"


class Text(Filter):
    code = ""
    examples = ("items", '"/a b"')
    help = "The path contains the word; quote it to search for spaces, and, or, not, error..."

    def __init__(self, text: str) -> None:
        self.text = text

    def _compile(self) -> Check:
        text = self.text

        def test(info: TraceInfo) -> bool:
            path = info.path
            return type(path) is str and text in path

        return test

    def __str__(self) -> str:
        return f"path contains {self.text!r}"


class Not(Filter):
    code = "not"
    examples = ("not error", "!error")
    help = "Negation; binds tightest."

    def __init__(self, inner: Filter) -> None:
        self.inner = inner

    def _compile(self) -> Check:
        inner = self.inner._compile()
        return lambda info: not inner(info)

    def __str__(self) -> str:
        inner = self.inner
        return f"not ({inner})" if isinstance(inner, And | Or) else f"not {inner}"


class And(Filter):
    code = "and"
    examples = ("a and b", "a & b", "a b")
    help = "Both; adjacent terms are joined by an implicit and."

    def __init__(self, *parts: Filter) -> None:
        self.parts = parts

    def _compile(self) -> Check:
        tests = [part._compile() for part in self.parts]
        if len(tests) == 2:
            first, second = tests
            return lambda info: first(info) and second(info)

        def test(info: TraceInfo) -> bool:
            for part in tests:
                if not part(info):
                    return False
            return True

        return test

    def __str__(self) -> str:
        return " and ".join(f"({p})" if isinstance(p, Or) else str(p) for p in self.parts)


class Or(Filter):
    code = "or"
    examples = ("a or b", "a | b")
    help = "Either; binds loosest, group with ( )."

    def __init__(self, *parts: Filter) -> None:
        self.parts = parts

    def _compile(self) -> Check:
        tests = [part._compile() for part in self.parts]
        if len(tests) == 2:
            first, second = tests
            return lambda info: first(info) or second(info)

        def test(info: TraceInfo) -> bool:
            for part in tests:
                if part(info):
                    return True
            return False

        return test

    def __str__(self) -> str:
        return " or ".join(f"({p})" if isinstance(p, And) else str(p) for p in self.parts)


_FIELDS: dict[str, type[FieldFilter]] = {
    cls.code: cls for cls in (Status, Method, Path, Host, Route, Duration, Header, Body, Hop)
}
_FLAGS: dict[str, type[Filter]] = {cls.code: cls for cls in (Error, Inflight)}
_HELP_ORDER: tuple[type[Filter], ...] = (*_FIELDS.values(), *_FLAGS.values(), Text, Not, And, Or)


def help_table() -> list[tuple[str, str]]:
    """``(how to write it, what it matches)`` for every predicate and operator."""
    return [("  ".join(cls.examples), cls.help) for cls in _HELP_ORDER]


def help_markdown() -> str:
    """The help table as Markdown, as docs/filters.md includes it."""
    rows = ["| write | matches |", "|---|---|"]
    for cls in _HELP_ORDER:
        written = ", ".join(f"`{e}`" for e in cls.examples).replace("|", "\\|")
        help = cls.help.replace("|", "\\|")
        rows.append(f"| {written} | {help} |")
    return "\n".join(rows)


# -- tokenizer -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Token:
    """A symbol, keyword or word of the expression, and where it starts."""

    kind: str
    """``(``, ``)``, ``and``, ``or``, ``not``, ``word`` or ``end``."""
    pos: int
    source: str = ""
    """The token as written (for messages)."""
    text: str = ""
    """A word, unquoted."""
    where: tuple[int, ...] = ()
    """Source index of each character of ``text``."""
    plain: int = 0
    """How many leading characters of ``text`` were outside quotes."""


_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t", "r": "\r"}
_SYMBOLS = {"(": "(", ")": ")", "&": "and", "|": "or", "!": "not"}
_KEYWORDS = ("and", "or", "not")


def _tokenize(text: str) -> Iterator[_Token]:
    i, n = 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            yield _Token("end", n)
            return
        c = text[i]
        if c in _SYMBOLS:
            size = 2 if c in "&|" and text.startswith(c * 2, i) else 1
            yield _Token(_SYMBOLS[c], i, text[i : i + size])
            i += size
            continue
        start = i
        chars: list[str] = []
        where: list[int] = []
        plain = -1
        while i < n:
            c = text[i]
            if c.isspace() or c in "()&|":
                break
            if c not in "\"'":
                chars.append(c)
                where.append(i)
                i += 1
                continue
            if plain < 0:
                plain = len(chars)
            quote, opened = c, i
            i += 1
            while True:
                if i >= n:
                    raise FilterError("unterminated string", opened, f"close it with {quote}")
                c = text[i]
                if c == quote:
                    i += 1
                    break
                if c == "\\":
                    if i + 1 >= n:
                        raise FilterError("unterminated string", opened, f"close it with {quote}")
                    escaped = _ESCAPES.get(text[i + 1 : i + 2])
                    if escaped is None:
                        raise FilterError(
                            f"bad escape {_show(text[i : i + 2])}",
                            i,
                            "in quotes use \\\\, \\\", \\', \\n, \\t or \\r",
                        )
                    chars.append(escaped)
                    where.append(i)
                    i += 2
                    continue
                chars.append(c)
                where.append(i)
                i += 1
        word = "".join(chars)
        if plain < 0:
            plain = len(word)
            if word.lower() in _KEYWORDS:
                yield _Token(word.lower(), start, word)
                continue
        yield _Token("word", start, text[start:i], word, tuple(where), plain)


# -- parser ----------------------------------------------------------------------------------

_FIELD = re.compile(r"([A-Za-z_][\w-]*)(>=|<=|[:<>=])")


_MAX_DEPTH = 100


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = list(_tokenize(text))
        self.index = 0
        self.depth = 0

    def peek(self) -> _Token:
        return self.tokens[self.index]

    def take(self) -> _Token:
        token = self.tokens[self.index]
        self.index += 1
        return token

    def parse(self) -> Filter:
        if self.peek().kind == "end":
            return Everything()
        result = self.or_(None)
        token = self.peek()
        if token.kind != "end":  # only a stray ')' can stop the loops early
            raise FilterError("unexpected ')'", token.pos, "no '(' is open")
        return result

    def or_(self, after: _Token | None) -> Filter:
        parts = [self.and_(after)]
        while self.peek().kind == "or":
            parts.append(self.and_(self.take()))
        return parts[0] if len(parts) == 1 else Or(*parts)

    def and_(self, after: _Token | None) -> Filter:
        parts = [self.unary(after)]
        while True:
            kind = self.peek().kind
            if kind == "and":
                parts.append(self.unary(self.take()))
            elif kind in ("word", "(", "not"):
                parts.append(self.unary(None))
            else:
                break
        return parts[0] if len(parts) == 1 else And(*parts)

    def unary(self, after: _Token | None) -> Filter:
        token = self.take()
        if token.kind in ("not", "("):
            # Nesting is recursion: refuse it politely long before Python would.
            self.depth += 1
            if self.depth > _MAX_DEPTH:
                raise FilterError("nested too deeply", token.pos, f"at most {_MAX_DEPTH} levels")
            inner = self.unary(token) if token.kind == "not" else self.or_(token)
            self.depth -= 1
            if token.kind == "not":
                return Not(inner)
            close = self.peek()
            if close.kind != ")":
                hint = f"to close '(' at column {token.pos + 1}"
                raise FilterError("expected ')'", close.pos, hint)
            self.take()
            return inner
        if token.kind == "word":
            return self.term(token)
        if after is not None:
            found = "" if token.kind == "end" else f", found {_show(token.source)}"
            raise FilterError(f"expected a term after {_show(after.source)}{found}", token.pos)
        if token.kind == ")":
            raise FilterError("unexpected ')'", token.pos, "no '(' is open")
        raise FilterError(f"expected a term before {_show(token.source)}", token.pos)

    def term(self, token: _Token) -> Filter:
        text, where = token.text, token.where
        field = _FIELD.match(text, 0, token.plain)
        if field is None:
            if token.plain == len(text) and text.lower() in _FLAGS:
                return _FLAGS[text.lower()]()
            if not text:
                raise FilterError("empty text", token.pos, "to match every trace leave it out")
            return Text(text)
        name = field[1].lower()
        cls = _FIELDS.get(name)
        if cls is None:
            if name in _FLAGS:
                raise FilterError(f"{_show(field[1])} takes no value", where[field.start(2)])
            raise FilterError(f"unknown field {_show(field[1])}", token.pos, _suggest(name))
        value = _Value(text[field.end() :], where[field.end() :], token.pos + len(token.source))
        return cls.build(_Field(name, field[2], where[field.start(2)], value))


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, [*_FIELDS, *_FLAGS], n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    return f"fields are {', '.join(_FIELDS)}; quote text to search paths"


def parse(text: str) -> Filter:
    """Compile a filter expression; raises :class:`FilterError` saying where it is wrong."""
    return _Parser(text).parse()
