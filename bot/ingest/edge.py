"""The rows a decision causes at the edge: webhook calls to make after the commit, and events to send.

Shared by ``handle_batch`` (a new message) and ``handle_resumed`` (a webhook's
answer fed back through the engine), so both queue the same things.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from bot.events.queue import PendingEvent
from bot.rules.model import Decision, WebhookCall
from bot.sms import Inbound
from bot.store.driver_sql import DriverSql

_INSERT_CALL = (
    "INSERT INTO webhook_calls (conversation_id, message_id, webhook, rule, rules_version, save_as, method, url,"
    " request, status, attempts, next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?)"
)


def insert_calls(
    db: DriverSql, calls: Sequence[tuple[int, int, WebhookCall]], rules_version: str | None, now: datetime
) -> None:
    """One pending ``webhook_calls`` row per (conversation id, inbound message id, call)."""
    db.executemany(
        _INSERT_CALL,
        [
            (
                conversation_id,
                message_id,
                call.webhook,
                call.rule,
                rules_version,
                call.save_as,
                call.method,
                call.url,
                db.json(
                    {
                        "body": dict(call.body) if call.body is not None else None,
                        "captures": dict(call.captures),
                        "timeout": call.timeout,
                    }
                ),
                db.ts(now),
                db.ts(now),
            )
            for conversation_id, message_id, call in calls
        ],
    )


def decision_events(
    decision: Decision, state_before: str | None, conversation_id: int, message_id: int, message: Inbound
) -> list[PendingEvent]:
    """What a decision tells the endpoints: opt-out/in, a new state, an unmatched message."""

    def event(kind: str, **extra: object) -> PendingEvent:
        return PendingEvent(
            kind=kind,
            conversation_id=conversation_id,
            message_id=message_id,
            signature=message.sign,
            nationcode=message.nationcode,
            mobile=message.mobile,
            state=decision.state,
            vars=decision.vars,
            extra={"rule": decision.rule, **extra},
            rules_file=decision.rules_file,
        )

    found: list[PendingEvent] = []
    if decision.opt_change == "opt_out":
        found.append(event("opted_out", text=message.text))
    elif decision.opt_change == "opt_in":
        found.append(event("opted_in", text=message.text))
    if decision.state != state_before and decision.state is not None:
        found.append(event("state_entered", state_before=state_before))
    if decision.unmatched:
        found.append(event("unmatched", text=message.text))
    return found
