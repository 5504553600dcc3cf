"""``X-Request-Start``: when the web server in front first saw the request.

nginx sends seconds with a millisecond fraction (``t=${msec}``), Heroku milliseconds,
Apache ``%t`` and hopscope's proxy microseconds, some nanoseconds.  The unit is guessed
from the magnitude; values in the future (beyond clock skew) or absurdly old are dropped,
because a wrong queue time is worse than none.
"""

from __future__ import annotations

__all__ = ["parse_request_start"]

#: Accept a stamp at most this far in the future (clocks of two processes on one host).
_SKEW_NS = 5_000_000
#: Ignore stamps older than this: a misconfigured header, not a queue.
_MAX_AGE_NS = 3600 * 1_000_000_000


def parse_request_start(value: bytes | str, now_ns: int) -> int | None:
    """Epoch nanoseconds from an ``X-Request-Start`` value, or None when unusable."""
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("latin-1")
    text = value.strip()
    if text.startswith("t="):
        text = text[2:]
    whole, _, fraction = text.partition(".")
    if not whole.isdigit() or (fraction and not fraction.isdigit()):
        return None
    # Integer arithmetic: a float loses the sub-microsecond digits of an epoch stamp.
    number = int(whole)
    digits = len(whole)
    if digits <= 11:  # seconds (11 digits last until the year 5138)
        ns = number * 10**9 + int((fraction + "0" * 9)[:9])
    elif digits <= 14:  # milliseconds
        ns = number * 10**6 + int((fraction + "0" * 6)[:6])
    elif digits <= 17:  # microseconds
        ns = number * 10**3 + int((fraction + "0" * 3)[:3])
    else:  # nanoseconds
        ns = number
    if ns <= 0:
        return None
    if ns > now_ns + _SKEW_NS or ns < now_ns - _MAX_AGE_NS:
        return None
    return min(ns, now_ns)
