"""Content codings: one decoder for replay comparisons, HAR export and the UI's body view."""

from __future__ import annotations

import gzip
import zlib

from hopscope.tracing.encoding import decode_content, decode_prefix

DOC = b'{"items": [' + b", ".join(b"%d" % n for n in range(2000)) + b"]}"


def test_gzip_deflate_raw_deflate_and_stacked_codings_decode() -> None:
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    raw_deflate = raw.compress(DOC) + raw.flush()
    assert decode_content(gzip.compress(DOC), "gzip") == DOC
    assert decode_content(gzip.compress(DOC), "X-GZIP") == DOC
    assert decode_content(zlib.compress(DOC), "deflate") == DOC
    assert decode_content(raw_deflate, "deflate") == DOC
    # Codings are listed in the order applied: undone last one first.
    stacked = zlib.compress(gzip.compress(DOC))
    assert decode_content(stacked, "gzip, deflate") == DOC
    assert decode_content(DOC, "identity") == DOC
    assert decode_content(DOC, "") == DOC


def test_what_cannot_be_decoded_whole_is_none() -> None:
    assert decode_content(gzip.compress(DOC)[:-8], "gzip") is None  # cut short
    assert decode_content(DOC, "gzip") is None  # not gzip at all
    assert decode_content(DOC, "compress") is None  # a coding nobody decodes


def test_a_body_cut_at_capture_shows_what_decodes() -> None:
    cut = gzip.compress(DOC)[:200]
    data, note = decode_prefix(cut, "gzip", 1_000_000)
    assert note == "decoded from gzip"
    assert 0 < len(data) < len(DOC) and DOC.startswith(data)
    data, note = decode_prefix(gzip.compress(DOC), "gzip", 100)
    assert data == DOC[:100]
    assert decode_prefix(DOC, "gzip", 100) == (DOC, "could not decode gzip")
    assert decode_prefix(DOC, "compress", 100) == (DOC, None)
    assert decode_prefix(DOC, "", 100) == (DOC, None)
