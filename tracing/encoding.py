"""Content codings (``Content-Encoding``) undone, for comparing and showing bodies.

Why here: replays compare decoded bodies (two compressions of one document need not be the
same bytes), HAR files store decoded text, and the UI shows decoded bodies; all of them must
agree on what a body says.  gzip and deflate come with Python; brotli and zstd are decoded
when their usual modules are installed (the ones httpx uses), and are otherwise unknown.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

__all__ = ["decode_content", "decode_prefix"]


def _inflate(wbits: int) -> Callable[[bytes, int], tuple[bytes, bool]]:
    def run(data: bytes, limit: int) -> tuple[bytes, bool]:
        inflater = zlib.decompressobj(wbits)
        out = inflater.decompress(data, limit) if limit else inflater.decompress(data)
        return out, inflater.eof

    return run


def _deflate(data: bytes, limit: int) -> tuple[bytes, bool]:
    try:
        return _inflate(zlib.MAX_WBITS)(data, limit)
    except zlib.error:  # raw deflate without the zlib header, as some servers send it
        return _inflate(-zlib.MAX_WBITS)(data, limit)


def _brotli() -> Callable[[bytes, int], tuple[bytes, bool]] | None:
    try:
        import brotli  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None

    def run(data: bytes, limit: int) -> tuple[bytes, bool]:
        decoder: Any = brotli.Decompressor()
        out = bytes(decoder.process(data))
        done = bool(decoder.is_finished()) if hasattr(decoder, "is_finished") else True
        return (out[:limit] if limit else out), done

    return run


def _zstd() -> Callable[[bytes, int], tuple[bytes, bool]] | None:
    try:
        import zstandard  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None

    def run(data: bytes, limit: int) -> tuple[bytes, bool]:
        decoder: Any = zstandard.ZstdDecompressor().decompressobj()
        out = bytes(decoder.decompress(data))
        return (out[:limit] if limit else out), bool(getattr(decoder, "eof", True))

    return run


_Decoder = Callable[[bytes, int], tuple[bytes, bool]]
_DECODERS: dict[str, _Decoder | None] = {
    "gzip": _inflate(16 + zlib.MAX_WBITS),
    "x-gzip": _inflate(16 + zlib.MAX_WBITS),
    "deflate": _deflate,
}
_OPTIONAL: dict[str, Callable[[], _Decoder | None]] = {"br": _brotli, "zstd": _zstd}


def _decoder(coding: str) -> _Decoder | None:
    if coding not in _DECODERS and coding in _OPTIONAL:
        _DECODERS[coding] = _OPTIONAL[coding]()  # imported once, on first use
    return _DECODERS.get(coding)


def _codings(content_encoding: str) -> list[str]:
    return [
        coding
        for coding in (c.strip().lower() for c in content_encoding.split(","))
        if coding and coding != "identity"
    ]


def decode_content(body: bytes, content_encoding: str) -> bytes | None:
    """``body`` with every content coding undone, last applied first; None when it cannot
    be: an unknown coding, bad data, or bytes cut short."""
    for coding in reversed(_codings(content_encoding)):
        decoder = _decoder(coding)
        if decoder is None:
            return None
        try:
            body, complete = decoder(body, 0)
        except Exception:  # zlib.error, brotli.error, zstandard.ZstdError: all "bad data"
            return None
        if not complete:
            return None
    return body


def decode_prefix(data: bytes, content_encoding: str, limit: int) -> tuple[bytes, str | None]:
    """As much of a possibly cut-off body as decodes (at most ``limit`` bytes) and a note
    saying what was done; the input unchanged when the coding is unknown.  For showing a
    body whose capture stopped at hopscope's body limit, where a full decode would fail."""
    codings = _codings(content_encoding)
    if not codings:
        return data, None
    label = ", ".join(codings)
    original = data
    for coding in reversed(codings):
        decoder = _decoder(coding)
        if decoder is None:
            return original, None
        try:
            data, _complete = decoder(data, limit)
        except Exception:
            return original, f"could not decode {label}"
    return data, f"decoded from {label}"
