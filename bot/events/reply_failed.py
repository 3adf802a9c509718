"""``reply_failed`` events: one per reply settled ``failed`` or ``expired``, queued in that transaction.

Every path that ends a reply badly calls ``queue_reply_failed`` with the
reply's message id and why (``reason``):

- ``send_failed``: Tencent refused the send for good, or its retries ran out
  (the delivery loop, ``bot/delivery/outbox.py`` ``apply_plans``);
- ``delivery_failed``: a delivery report (pushed, pulled, kept until the send
  was recorded, or found by the ambiguous-send check) says the handset did not
  get it;
- ``expired``: it could not go out before its deadline (``reply_max_delay``).

The body is read from the reply's row after it was updated, so it says what
the row says (``error_code``, ``error_message``; an expired reply's reason
when it has no error of its own). With no endpoint wanting ``reply_failed``
nothing is read or written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Connection

from bot.events.endpoints import EventEndpoints
from bot.events.queue import PendingEvent, queue_events
from bot.store.driver_sql import DriverSql, chunks

Reason = Literal["send_failed", "delivery_failed", "expired"]
KIND = "reply_failed"

_DETAILS = (
    "SELECT m.id, m.conversation_id, m.signature, m.rule, m.in_reply_to_id, m.template_id, m.text, m.error_code,"
    " m.error_message, m.status_reason, c.nationcode, c.mobile, v.state, v.variables"
    " FROM messages m JOIN contacts c ON c.id = m.contact_id JOIN conversations v ON v.id = m.conversation_id"
    " WHERE m.direction = 'out' AND {where}"
)


@dataclass(frozen=True)
class FailedReply:
    """A reply just settled badly, and why."""

    message_id: int
    reason: Reason


def wanted(endpoints: EventEndpoints | None) -> bool:
    """Whether any endpoint (config or rule file) wants ``reply_failed``: no work at all otherwise."""
    if not endpoints:
        return False
    return any(e.wants(KIND) for e in endpoints.config) or any(
        e.wants(KIND) for es in endpoints.files.values() for e in es
    )


def queue_reply_failed(
    conn: Connection, failed: Sequence[FailedReply], endpoints: EventEndpoints | None, now: datetime
) -> int:
    """One ``reply_failed`` per reply (first reason wins for a reply named twice); returns the rows written."""
    if not failed or not wanted(endpoints):
        return 0
    assert endpoints is not None
    reasons: dict[int, Reason] = {}
    for item in failed:
        reasons.setdefault(int(item.message_id), item.reason)
    db = DriverSql(conn)
    details: dict[int, Sequence[Any]] = {}
    for chunk in chunks(sorted(reasons)):
        where, params = db.in_list("m.id", chunk)
        for row in db.rows(_DETAILS.format(where=where), params):
            details[int(row[0])] = row
    found = []
    for message_id, reason in reasons.items():
        if message_id not in details:
            continue
        (
            _,
            conversation_id,
            signature,
            rule,
            in_reply_to,
            template_id,
            text,
            error_code,
            error_message,
            status_reason,
            nationcode,
            mobile,
            state,
            variables,
        ) = details[message_id]
        found.append(
            PendingEvent(
                kind=KIND,
                conversation_id=int(conversation_id),
                message_id=message_id,
                signature=signature,
                nationcode=nationcode,
                mobile=mobile,
                state=state,
                vars=dict(db.read_json(variables) or {}),
                extra={
                    "rule": rule,
                    "in_reply_to_id": in_reply_to,
                    "template_id": template_id,
                    "text": text,
                    "reason": reason,
                    "error_code": error_code,
                    "error_message": error_message or (status_reason if reason == "expired" else None),
                },
                rules_file=rule.rsplit(":", 1)[0] if rule else None,
            )
        )
    return queue_events(conn, endpoints, found, now)
