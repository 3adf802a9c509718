"""Signing events the way Stripe signs its webhooks, and checking a signature (for receivers to copy).

Each POST carries ``X-Smsbot-Timestamp: <unix seconds>`` and
``X-Smsbot-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">`` with
the endpoint's secret; a receiver recomputes it over the raw body, compares in
constant time and refuses old timestamps (replays).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping

TIMESTAMP_HEADER = "X-Smsbot-Timestamp"
SIGNATURE_HEADER = "X-Smsbot-Signature"
EVENT_HEADER = "X-Smsbot-Event"
EVENT_ID_HEADER = "X-Smsbot-Event-Id"


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """``sha256=<hex>`` over ``"<timestamp>.<body>"``."""
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def signed_headers(secret: bytes, body: bytes, *, kind: str, event_id: int, timestamp: int) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: signature(secret, timestamp, body),
        EVENT_HEADER: kind,
        EVENT_ID_HEADER: str(event_id),
    }


def verify(
    secret: bytes | str, headers: Mapping[str, str], body: bytes, *, tolerance: float = 300, now: float | None = None
) -> bool:
    """Whether ``body`` with ``headers`` was signed with ``secret`` within ``tolerance`` seconds of ``now``.

    The same function as in docs/events.md: ``headers`` may be any mapping
    (lookups are case-insensitive), ``body`` the raw bytes as received.
    """
    key = secret.encode() if isinstance(secret, str) else secret
    lowered = {k.lower(): v for k, v in headers.items()}
    timestamp, given = lowered.get(TIMESTAMP_HEADER.lower(), ""), lowered.get(SIGNATURE_HEADER.lower(), "")
    if not timestamp.isdigit() or not given.startswith("sha256="):
        return False
    if abs((time.time() if now is None else now) - int(timestamp)) > tolerance:
        return False
    return hmac.compare_digest(signature(key, int(timestamp), body), given)
