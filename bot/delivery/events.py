"""``reply_failed`` events: queued in the transaction that settles a reply as failed."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Connection

from bot.delivery.retry import Final
from bot.events.endpoints import EventEndpoints
from bot.events.queue import PendingEvent, queue_events
from bot.sms import OutboundSms
from bot.store.driver_sql import DriverSql, chunks

_DETAILS = (
    "SELECT m.id, m.rule, m.in_reply_to_id, v.state, v.variables FROM messages m"
    " JOIN conversations v ON v.id = m.conversation_id WHERE {where}"
)


def reply_failed_events(
    conn: Connection, failed: Sequence[tuple[OutboundSms, Final]], endpoints: EventEndpoints, now: datetime
) -> int:
    """One ``reply_failed`` per failed reply, to the endpoints that want it; rows written."""
    if not failed or not endpoints:
        return 0
    db = DriverSql(conn)
    details: dict[int, tuple[str | None, int | None, str | None, dict[str, object]]] = {}
    for chunk in chunks(sorted({sms.message_id for sms, _ in failed})):
        where, params = db.in_list("m.id", chunk)
        for message_id, rule, in_reply_to, state, variables in db.rows(_DETAILS.format(where=where), params):
            details[int(message_id)] = (rule, in_reply_to, state, dict(db.read_json(variables) or {}))
    found = []
    for sms, final in failed:
        if sms.message_id not in details or not sms.conversation_id:
            continue
        rule, in_reply_to, state, variables = details[sms.message_id]
        found.append(
            PendingEvent(
                kind="reply_failed",
                conversation_id=sms.conversation_id,
                message_id=sms.message_id,
                signature=sms.sign,
                nationcode=sms.nationcode,
                mobile=sms.mobile,
                state=state,
                vars=variables,
                extra={
                    "rule": rule,
                    "in_reply_to_id": in_reply_to,
                    "template_id": sms.template_id,
                    "text": sms.text,
                    "error_code": final.code,
                    "error_message": final.error,
                },
                rules_file=rule.rsplit(":", 1)[0] if rule else None,
            )
        )
    return queue_events(conn, endpoints, found, now)
