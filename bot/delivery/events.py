"""``reply_failed`` events for sends the delivery loop settles ``failed`` (reason ``send_failed``).

The event itself is ``bot/events/reply_failed.py``'s, shared with delivery
reports; expired replies and failed reports kept for their send are queued by
``bot/delivery/outbox.py`` ``settle``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Connection

from bot.delivery.retry import Final
from bot.events.endpoints import EventEndpoints
from bot.events.reply_failed import FailedReply, queue_reply_failed
from bot.sms import OutboundSms


def reply_failed_events(
    conn: Connection, failed: Sequence[tuple[OutboundSms, Final]], endpoints: EventEndpoints | None, now: datetime
) -> int:
    """One ``reply_failed`` (``send_failed``) per failed send, to the endpoints that want it; rows written."""
    return queue_reply_failed(conn, [FailedReply(sms.message_id, "send_failed") for sms, _ in failed], endpoints, now)
