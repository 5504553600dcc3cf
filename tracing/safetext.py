"""Captured text made safe to print on a terminal: for the UI and the text lines alike.

Paths, headers, bodies, span names and log lines come from the network or from an app:
printed as they are, an ESC would let a request recolour, clear or retitle the terminal,
and a bidi override would reorder what is shown around it.  Both the UI (hopscope.tui)
and ``hopscope tail`` show such text, so the one table of what each character becomes
lives here, below both (no Rich, no Textual: this package runs inside users' apps too).
"""

from __future__ import annotations

import unicodedata

__all__ = ["LINE_ESCAPES", "TEXT_ESCAPES", "printable"]

#: Control characters as what a terminal prints safely: C0 as their Unicode pictures
#: (``␛`` for ESC), DEL as ``␡``, C1 as ``\x9b``.  Paths, headers and bodies come from
#: the network: an ESC reaching the terminal raw would let a request recolour, clear or
#: retitle it.
_LINE_TABLE: dict[int, str] = {
    **{code: chr(0x2400 + code) for code in range(0x20)},
    0x7F: "\u2421",
    **{code: f"\\x{code:02x}" for code in range(0x80, 0xA0)},
}
#: The same for text of several lines: line breaks and tabs stay what they are.
_TEXT_TABLE = {code: s for code, s in _LINE_TABLE.items() if chr(code) not in "\n\r\t"}

#: Unicode categories shown as escapes (``\u202e``): format characters (bidi overrides
#: and isolates, zero-width spaces and joiners, the BOM, soft hyphens), line and paragraph
#: separators, and lone surrogates (a JSON file's ``"\udcff"``).  They draw nothing, so a
#: captured header could hide text, or reorder a row (``U+202E`` reverses what follows it,
#: the "Trojan Source" trick); a surrogate is no character at all.
_HIDDEN = frozenset({"Cf", "Zl", "Zp", "Cs"})
#: Distinct characters remembered at most (see :class:`_Escapes`).
_ESCAPES_KEPT = 50_000


class _Escapes(dict[int, str]):
    """What ``str.translate`` puts for each character, worked out the first time one is
    met (the table of every code point would take a quarter second to build).  Only
    reached for text that is not :meth:`str.isprintable`."""

    def __init__(self, fixed: dict[int, str]) -> None:
        super().__init__(fixed)
        self._fixed = fixed

    def __missing__(self, code: int) -> str:
        if len(self) > _ESCAPES_KEPT:  # text made of every character there is
            self.clear()
            self.update(self._fixed)
        char = chr(code)
        if char.isprintable() or unicodedata.category(char) not in _HIDDEN:
            shown = char  # a space other than " " (NBSP), private use, unassigned
        elif code <= 0xFFFF:
            shown = f"\\u{code:04x}"
        else:
            shown = f"\\U{code:08x}"
        self[code] = shown
        return shown


LINE_ESCAPES = _Escapes(_LINE_TABLE)
TEXT_ESCAPES = _Escapes(_TEXT_TABLE)


def printable(text: str, *, lines: bool = False) -> str:
    """``text`` with its control characters made visible (see :data:`_LINE_TABLE`) and
    its invisible ones escaped (see :data:`_HIDDEN`); ``lines`` keeps line breaks and
    tabs.  Text without any is returned as it is, after one scan in C."""
    if text.isprintable():
        return text
    return text.translate(TEXT_ESCAPES if lines else LINE_ESCAPES)
