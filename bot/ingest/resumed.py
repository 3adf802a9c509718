"""A webhook's answer fed back through the engine, written like an inbound decision (no new inbound row).

The webhook runner (``bot/webhooks``) calls ``handle_resumed`` in one
transaction after a rule's ``call:`` has answered: the conversation is read
again and locked, ``resume()`` decides, and the decision is applied with the
same row builders as ``handle_batch`` (conversation, replies and outbox,
opt-out audit, events, a further call), attached to the inbound message that
fired the rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection

from bot.events.endpoints import EventEndpoints
from bot.events.queue import queue_events
from bot.ingest.batch import (
    _CONVO_COLUMNS,
    _INSERT_MESSAGE,
    _INSERT_OPT_EVENT,
    _UPDATE_CONVERSATION,
    Policy,
    _apply_to_convo,
    _conversation_rows,
    _Convo,
    _opt_event_row,
    _outbound_row,
    _Pending,
    _recent_reply_counts,
    _reply_status,
)
from bot.ingest.edge import decision_events, insert_calls
from bot.rules.engine import resume
from bot.rules.model import Decision, InboundMessage, Ruleset, WebhookCall, WebhookOutcome
from bot.sms import Inbound
from bot.store.driver_sql import DriverSql

Resume = Callable[..., Decision]
DEFAULT_POLICY = Policy()

_MESSAGE = (
    "SELECT m.conversation_id, m.contact_id, m.signature, m.text, m.provider_time, m.extend_code, c.nationcode,"
    " c.mobile FROM messages m JOIN contacts c ON c.id = m.contact_id WHERE m.id = ?"
)


@dataclass(frozen=True)
class ResumedResult:
    decision: Decision | None
    queued: int = 0
    """Replies queued."""
    edge: int = 0
    """Events and further webhook calls queued."""


def handle_resumed(
    conn: Connection,
    *,
    ruleset: Ruleset | None,
    message_id: int,
    call: WebhookCall,
    outcome: WebhookOutcome,
    now: datetime,
    policy: Policy = DEFAULT_POLICY,
    events: EventEndpoints | None = None,
    resume_fn: Resume = resume,
) -> ResumedResult:
    """Apply ``resume(...)`` for inbound message ``message_id`` on ``conn``; the caller commits."""
    db = DriverSql(conn)
    found = db.rows(_MESSAGE, (message_id,))
    if not found or ruleset is None:
        return ResumedResult(None)
    conversation_id, contact_id, sign, text, provider_time, extend, nationcode, mobile = found[0]
    lock = " FOR UPDATE" if db.postgres else ""
    row = db.rows(f"SELECT {_CONVO_COLUMNS} FROM conversations WHERE id = ?{lock}", (conversation_id,))[0]
    convo = _Convo(
        id=int(row[0]),
        state=row[2],
        variables=dict(db.read_json(row[3]) or {}),
        expires_at=db.read_ts(row[4]),
        opted_out=bool(row[5]),
        opted_out_at=db.read_ts(row[6]),
        opt_out_message_id=row[7],
    )
    sent = db.read_ts(provider_time)
    inbound = Inbound(nationcode, mobile, sign, text, int(sent.timestamp()) if sent else 0, extend or "")
    message = InboundMessage(text=text, sign=sign, nationcode=nationcode, mobile=mobile, extend=extend or "")
    state_before = convo.state
    decision = resume_fn(ruleset, convo.engine_view(), message, call, outcome, now)
    _apply_to_convo(convo, decision, 0)
    counts = _recent_reply_counts(db, [convo.id], now - policy.loop_window)
    p = _Pending(0, inbound, int(contact_id), convo, state_before, decision)
    for reply in decision.replies:
        status, reason = _reply_status(decision, reply, counts, convo.id, policy)
        if status == "queued":
            counts[(convo.id, reply.text)] = counts.get((convo.id, reply.text), 0) + 1
        p.reply_statuses.append((reply, status, reason))

    out_ids = db.allocate_ids("messages", len(p.reply_statuses))
    outbound = [
        _outbound_row(db, p, out_id, message_id, reply, status, reason, now)
        for out_id, (reply, status, reason) in zip(out_ids, p.reply_statuses, strict=True)
    ]
    db.executemany(_INSERT_MESSAGE, outbound)
    db.executemany(_UPDATE_CONVERSATION, _conversation_rows(db, [convo], {0: message_id}, now))
    if decision.opt_change:
        db.execute(_INSERT_OPT_EVENT, _opt_event_row(db, p, message_id, now))
    max_delay = decision.reply_max_delay or policy.reply_max_delay
    db.executemany(
        "INSERT INTO outbox (message_id, attempts, next_attempt_at, created_at, send_by) VALUES (?, 0, ?, ?, ?)",
        [
            (out_id, db.ts(now), db.ts(now), db.ts(now + max_delay))
            for out_id, (_, status, _) in zip(out_ids, p.reply_statuses, strict=True)
            if status == "queued"
        ],
    )
    db.execute(
        "UPDATE messages SET state_after = ?, error_message = coalesce(?, error_message), updated_at = ? WHERE id = ?",
        (decision.state, "; ".join(decision.errors) or None, db.ts(now), message_id),
    )
    edge = 0
    if decision.call is not None:
        insert_calls(db, [(convo.id, message_id, decision.call)], ruleset.version, now)
        edge += 1
    if events:
        edge += queue_events(conn, events, decision_events(decision, state_before, convo.id, message_id, inbound), now)
    queued = sum(1 for _, status, _ in p.reply_statuses if status == "queued")
    return ResumedResult(decision, queued=queued, edge=edge)
