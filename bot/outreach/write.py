"""Writing starts and vars in the caller's transaction, set-based: a few statements for a whole list.

``start_conversations`` does what ``bot/ingest/batch.py`` does for callbacks,
for messages the business sends first: contacts and conversations looked up
or created and locked (``contact_ids`` / ``lock_conversations``, the same
functions: FOR UPDATE on PostgreSQL, the caller's BEGIN IMMEDIATE on SQLite),
opted-out conversations refused, state / expiry / vars set, the outbound
message and its outbox row written, the loop guard applied, and a
``state_entered`` event queued. The caller commits, then wakes delivery,
which keeps opt-outs, quiet hours for marketing templates and frequency
limits as it does for replies (``bot/delivery/outbox.py`` claim).

Items are applied in order, so two starts of one number in a list behave as
if sent one after the other.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Connection

from bot.events.endpoints import EventEndpoints
from bot.events.queue import PendingEvent, queue_events
from bot.ingest.batch import SENDING_STATUSES, Policy, contact_ids, lock_conversations
from bot.outreach.check import CheckedStart, StartRefused, render_params
from bot.rules.engine import template_reply
from bot.store.driver_sql import DriverSql, chunks

log = logging.getLogger("smsbot.outreach")

RULE_KIND = "start"
"""``messages.rule_kind`` of the message that started a conversation (its ``rule`` is NULL)."""

DEFAULT_POLICY = Policy()

Outcome = Literal["started", "opted_out", "refused"]


@dataclass(frozen=True)
class StartResult:
    """What became of one start: ``started`` (202), ``opted_out`` (409, nothing queued) or ``refused`` (422)."""

    outcome: Outcome
    conversation_id: int | None = None
    message_id: int | None = None
    state: str | None = None
    message_status: str | None = None
    """``queued``, or ``looping`` when the loop guard held it (stored, not sent)."""
    text: str | None = None
    segments: int | None = None
    field: str | None = None
    detail: str | None = None
    params: tuple[str, ...] = ()
    extend_code: str | None = None


@dataclass
class _Started:
    start: CheckedStart
    conversation_id: int
    contact_id: int
    state_before: str | None
    params: tuple[str, ...]
    text: str
    template_id: str
    segments: int
    marketing: bool
    sender_id: str | None
    status: str
    reason: str | None
    vars: dict[str, Any] = field(default_factory=dict)


_MESSAGE_COLUMNS = (
    "id, direction, conversation_id, contact_id, signature, text, rule, rule_kind, unmatched, state_before,"
    " state_after, template_name, template_id, params, segments, status, status_reason, marketing, created_at,"
    " updated_at, sender_id, extend_code, started_by"
)
_INSERT_MESSAGE = (
    f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES (?, 'out', ?, ?, ?, ?, NULL, '{RULE_KIND}', ?, ?, ?, ?, ?, ?,"
    " ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPDATE_CONVERSATION = "UPDATE conversations SET state = ?, variables = ?, expires_at = ?, updated_at = ? WHERE id = ?"
_INSERT_OUTBOX = (
    "INSERT INTO outbox (message_id, attempts, next_attempt_at, created_at, send_by) VALUES (?, 0, ?, ?, ?)"
)
_SENDING_SQL = "(" + ", ".join(f"'{status}'" for status in SENDING_STATUSES) + ")"


def start_conversations(
    conn: Connection,
    starts: Sequence[CheckedStart],
    *,
    now: datetime,
    started_by: str,
    policy: Policy = DEFAULT_POLICY,
    event_endpoints: EventEndpoints | None = None,
) -> list[StartResult]:
    """Start each of ``starts`` (in order) on ``conn``; one result per start, the caller commits."""
    if not starts:
        return []
    db = DriverSql(conn)
    ids = contact_ids(db, {(s.nationcode, s.mobile) for s in starts}, now)
    convos = lock_conversations(db, {(s.signature, ids[(s.nationcode, s.mobile)]) for s in starts}, now)
    counts = _recent_counts(db, sorted({c.id for c in convos.values()}), now - policy.loop_window)
    results: list[StartResult | None] = [None] * len(starts)
    started: list[tuple[int, _Started]] = []
    for index, start in enumerate(starts):
        contact = ids[(start.nationcode, start.mobile)]
        convo = convos[(start.signature, contact)]
        if convo.opted_out:
            results[index] = StartResult("opted_out", conversation_id=convo.id, state=convo.state)
            continue
        merged: dict[str, Any] = {**convo.variables, **start.vars}
        try:
            params = render_params(start, merged, now)
        except StartRefused as exc:
            results[index] = StartResult("refused", field=exc.field, detail=exc.detail)
            continue
        reply = template_reply(
            start.template, params, sign=start.signature, nationcode=start.nationcode, sender_id=start.rules.sender_id
        )
        status, reason = "queued", None
        if counts.get((convo.id, reply.text), 0) >= policy.loop_limit:
            status = "looping"
            reason = f"more than {policy.loop_limit} identical messages within {policy.loop_window}"
        else:
            counts[(convo.id, reply.text)] = counts.get((convo.id, reply.text), 0) + 1
        item = _Started(
            start=start,
            conversation_id=convo.id,
            contact_id=contact,
            state_before=convo.state,
            params=params,
            text=reply.text,
            template_id=reply.template_id,
            segments=reply.segments,
            marketing=reply.marketing,
            sender_id=reply.sender_id,
            status=status,
            reason=reason,
            vars=merged,
        )
        convo.state, convo.variables, convo.changed = start.state, merged, True
        convo.expires_at = now + start.expires if start.expires is not None else None
        started.append((index, item))

    message_ids = db.allocate_ids("messages", len(started))
    for (index, item), message_id in zip(started, message_ids, strict=True):
        results[index] = StartResult(
            "started",
            conversation_id=item.conversation_id,
            message_id=message_id,
            state=item.start.state,
            message_status=item.status,
            text=item.text,
            segments=item.segments,
            params=item.params,
            extend_code=item.start.extend_code,
        )
        if item.status != "queued":
            log.warning("start message %s not queued (%s): %s", message_id, item.status, item.reason)
    _write(db, [item for _, item in started], message_ids, convos.values(), now, started_by, policy)
    _queue_state_entered(conn, [item for _, item in started], message_ids, now, started_by, event_endpoints)
    return [r for r in results if r is not None]


def _write(
    db: DriverSql,
    started: Sequence[_Started],
    message_ids: Sequence[int],
    convos: Any,
    now: datetime,
    started_by: str,
    policy: Policy,
) -> None:
    message_rows = []
    outbox_rows = []
    for item, message_id in zip(started, message_ids, strict=True):
        start = item.start
        message_rows.append(
            (
                message_id,
                item.conversation_id,
                item.contact_id,
                start.signature,
                item.text,
                db.bool(False),
                item.state_before,
                start.state,
                start.template.name,
                item.template_id,
                db.json(list(item.params)),
                item.segments,
                item.status,
                item.reason,
                db.bool(item.marketing),
                db.ts(now),
                db.ts(now),
                item.sender_id,
                start.extend_code,
                started_by,
            )
        )
        if item.status == "queued":
            send_by = now + (start.rules.reply_max_delay or policy.reply_max_delay)
            outbox_rows.append((message_id, db.ts(now), db.ts(now), db.ts(send_by)))
    conversation_rows = [
        (c.state, db.json(c.variables), db.ts(c.expires_at), db.ts(now), c.id) for c in convos if c.changed
    ]
    db.executemany(_INSERT_MESSAGE, message_rows)
    db.executemany(_UPDATE_CONVERSATION, conversation_rows)
    db.executemany(_INSERT_OUTBOX, outbox_rows)


def _recent_counts(db: DriverSql, conversation_ids: Sequence[int], since: datetime) -> dict[tuple[int, str], int]:
    """Messages per (conversation, text) on their way or sent since ``since``: what the loop guard counts."""
    counts: dict[tuple[int, str], int] = {}
    status = "status" if db.postgres else "+status"  # SQLite: stay on the (conversation_id, created_at) index
    for chunk in chunks(conversation_ids):
        where, params = db.in_list("conversation_id", chunk)
        statement = (
            f"SELECT conversation_id, text, count(*) FROM messages WHERE {where} AND created_at > ?"
            f" AND direction = 'out' AND {status} IN {_SENDING_SQL} GROUP BY conversation_id, text"
        )
        for conversation_id, text, number in db.rows(statement, [*params, db.ts(since)]):
            counts[(int(conversation_id), text)] = int(number)
    return counts


def _queue_state_entered(
    conn: Connection,
    started: Sequence[_Started],
    message_ids: Sequence[int],
    now: datetime,
    started_by: str,
    endpoints: EventEndpoints | None,
) -> None:
    """A ``state_entered`` event per start, in this transaction; without endpoints no SQL runs."""
    if endpoints is None or not started:
        return
    events = [
        PendingEvent(
            kind="state_entered",
            conversation_id=item.conversation_id,
            message_id=message_id,
            signature=item.start.signature,
            nationcode=item.start.nationcode,
            mobile=item.start.mobile,
            state=item.start.state,
            vars=item.vars,
            extra={"started_by": started_by, "template": item.start.template.name},
            rules_file=item.start.rules.name,
        )
        for item, message_id in zip(started, message_ids, strict=True)
    ]
    queue_events(conn, endpoints, events, now)


# ------------------------------------------------------------------ vars without sending


@dataclass(frozen=True)
class VarsChange:
    """Vars to merge into one conversation (created if new); nothing is sent."""

    signature: str
    nationcode: str
    mobile: str
    vars: Mapping[str, str]


@dataclass(frozen=True)
class VarsResult:
    conversation_id: int
    created: bool
    vars: Mapping[str, Any]
    state: str | None
    opted_out: bool


def merge_vars(conn: Connection, changes: Sequence[VarsChange], *, now: datetime) -> list[VarsResult]:
    """Merge each change's vars (in order) into its conversation; one result per change, the caller commits."""
    if not changes:
        return []
    db = DriverSql(conn)
    ids = contact_ids(db, {(c.nationcode, c.mobile) for c in changes}, now)
    keys = {(c.signature, ids[(c.nationcode, c.mobile)]) for c in changes}
    before = _existing(db, keys)
    convos = lock_conversations(db, keys, now)
    results = []
    for change in changes:
        key = (change.signature, ids[(change.nationcode, change.mobile)])
        convo = convos[key]
        convo.variables = {**convo.variables, **change.vars}
        convo.changed = True
        results.append(VarsResult(convo.id, key not in before, dict(convo.variables), convo.state, convo.opted_out))
    db.executemany(
        "UPDATE conversations SET variables = ?, updated_at = ? WHERE id = ?",
        [(db.json(c.variables), db.ts(now), c.id) for c in convos.values() if c.changed],
    )
    return results


def _existing(db: DriverSql, keys: set[tuple[str, int]]) -> set[tuple[str, int]]:
    """Which of these (signature, contact id) conversations exist already (to tell created ones apart)."""
    found: set[tuple[str, int]] = set()
    by_signature: dict[str, list[int]] = {}
    for signature, contact in keys:
        by_signature.setdefault(signature, []).append(contact)
    for signature, contacts in by_signature.items():
        for chunk in chunks(sorted(contacts)):
            where, params = db.in_list("contact_id", chunk)
            for (contact,) in db.rows(
                f"SELECT contact_id FROM conversations WHERE signature = ? AND {where}", [signature, *params]
            ):
                found.add((signature, int(contact)))
    return found
