"""Signatures on what Bridgeway posts to other people's URLs (job callbacks, event webhooks), so
the receiver can tell the post is Bridgeway's and fresh.

The header reads `X-Bridgeway-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>` over
`"<t>." + body`, as Stripe's do: the timestamp inside the signed bytes stops a replay of an old
post, and the `v1=` tag leaves room for another scheme later.
"""

from __future__ import annotations

import hashlib
import hmac

HEADER = "X-Bridgeway-Signature"


def sign(secret: bytes, body: bytes, now: float) -> str:
    t = int(now)
    mac = hmac.new(secret, b"%d." % t + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(secret: bytes, body: bytes, header: str, now: float, tolerance: float = 300.0) -> bool:
    """True when `header` signs `body` with `secret` within `tolerance` seconds of `now`."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        t = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - t) > tolerance:
        return False
    expected = hmac.new(secret, b"%d." % t + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields.get("v1", ""))
