"""Processing inbound messages inside the caller's transaction.

``handle_batch`` is the only place where decisions of the pure engine touch
the database. Everything the messages cause (inbound rows, conversations'
new states, opt-out audit events, queued replies) is written on the
connection it is given, inside the caller's transaction, so the caller
commits it all or nothing and only then tells Tencent "OK".

It works on a batch because the database writer commits many callbacks per
transaction: a handful of set-based statements for the whole batch cost far
less than a dozen round trips per message. Messages are still decided one
after another in arrival order, against the conversation as the previous
message left it, so a batch behaves exactly like the same messages handled
one by one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, cast

from sqlalchemy import Column, Connection
from sqlalchemy.types import JSON, BigInteger, Boolean, DateTime, Integer, String, TypeDecorator, TypeEngine

from bot.events.endpoints import EventEndpoints
from bot.rules.engine import decide
from bot.rules.model import Conversation as EngineConversation
from bot.rules.model import Decision, InboundMessage, Reply, Ruleset
from bot.sms import Inbound
from bot.store.driver_sql import PREPARE, DriverSql, chunks
from bot.store.models import conversations, messages, opt_out_events

log = logging.getLogger("smsbot.service")

SENDING_STATUSES = ("queued", "sent", "delivered")
"""Replies that count for loop protection: on their way, or gone out."""
_SENDING_SQL = "(" + ", ".join(f"'{status}'" for status in SENDING_STATUSES) + ")"


@dataclass(frozen=True)
class Policy:
    """Limits applied around the engine's decisions."""

    loop_limit: int = 20
    loop_window: timedelta = timedelta(minutes=5)
    reply_max_delay: timedelta = timedelta(hours=1)
    """How long a queued reply may wait to go out (a rule file may say otherwise): past it, it expires."""


@dataclass(frozen=True)
class InboundResult:
    message_id: int | None
    duplicate: bool
    queued: int = 0
    decision: Decision | None = None
    edge: int = 0
    """Webhook calls and events this message queued (the writer wakes their loops after the commit)."""


# ------------------------------------------------------------------ contacts and conversations


def _by_group(pairs: Iterable[tuple[str, Any]]) -> dict[str, list[Any]]:
    """Pairs grouped by their first element, so lookups can use an index (``a = ? AND b IN (...)``)."""
    grouped: dict[str, list[Any]] = {}
    for first, second in sorted(set(pairs)):
        grouped.setdefault(first, []).append(second)
    return grouped


def contact_ids(db: DriverSql, numbers: set[tuple[str, str]], now: datetime) -> dict[tuple[str, str], int]:
    """Ids for (nationcode, mobile) pairs, creating the contacts that are new."""
    found: dict[tuple[str, str], int] = {}

    def fetch(wanted: Iterable[tuple[str, str]]) -> None:
        for nationcode, mobiles in _by_group(wanted).items():
            for chunk in chunks(mobiles):
                where, params = db.in_list("mobile", chunk)
                for row in db.rows(
                    f"SELECT id, mobile FROM contacts WHERE nationcode = ? AND {where}", [nationcode, *params]
                ):
                    found[(nationcode, row[1])] = int(row[0])

    fetch(numbers)
    missing = sorted(numbers - found.keys())
    if missing:
        db.executemany(
            "INSERT INTO contacts (nationcode, mobile, created_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
            [(n, m, db.ts(now)) for n, m in missing],
        )
        fetch(missing)
    return found


@dataclass
class _Convo:
    """A conversation row as this batch sees and changes it."""

    id: int
    state: str | None
    variables: dict[str, str]
    expires_at: datetime | None
    opted_out: bool
    opted_out_at: datetime | None
    opt_out_message_id: int | None
    changed: bool = False
    opt_out_index: int | None = None
    """Index (in this batch) of the inbound message that opted it out, once its id is known."""

    def engine_view(self) -> EngineConversation:
        return EngineConversation(
            state=self.state, vars=self.variables, expires_at=self.expires_at, opted_out=self.opted_out
        )


_CONVO_COLUMNS = "id, contact_id, state, variables, expires_at, opted_out, opted_out_at, opt_out_message_id"


def lock_conversations(db: DriverSql, keys: set[tuple[str, int]], now: datetime) -> dict[tuple[str, int], _Convo]:
    """The conversation rows for (signature, contact id), created if needed and locked until commit.

    On PostgreSQL ``FOR UPDATE`` (taken in id order, so two processes cannot
    deadlock on the same rows) makes a message from the same number in
    another process wait until this transaction commits, so it sees our
    state. SQLite has a single writer (BEGIN IMMEDIATE): the same guarantee.
    """
    found: dict[tuple[str, int], _Convo] = {}
    lock = " FOR UPDATE" if db.postgres else ""

    def fetch(wanted: Iterable[tuple[str, int]]) -> None:
        for signature, contact_list in _by_group(wanted).items():
            for chunk in chunks(contact_list):
                where, params = db.in_list("contact_id", chunk)
                statement = (
                    f"SELECT {_CONVO_COLUMNS} FROM conversations WHERE signature = ? AND {where} ORDER BY id{lock}"
                )
                for row in db.rows(statement, [signature, *params]):
                    found[(signature, int(row[1]))] = _Convo(
                        id=int(row[0]),
                        state=row[2],
                        variables=dict(db.read_json(row[3]) or {}),
                        expires_at=db.read_ts(row[4]),
                        opted_out=bool(row[5]),
                        opted_out_at=db.read_ts(row[6]),
                        opt_out_message_id=row[7],
                    )

    fetch(keys)
    missing = sorted(keys - found.keys())
    if missing:
        db.executemany(
            "INSERT INTO conversations (signature, contact_id, state, variables, opted_out, created_at, updated_at)"
            " VALUES (?, ?, NULL, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            [(sign, contact, "{}", db.bool(False), db.ts(now), db.ts(now)) for sign, contact in missing],
        )
        fetch(missing)
    return found


def _known_keys(db: DriverSql, keys: Sequence[str]) -> set[str]:
    seen: set[str] = set()
    for chunk in chunks(sorted(set(keys))):
        where, params = db.in_list("dedupe_key", chunk)
        seen.update(
            row[0]
            for row in db.rows(f"SELECT dedupe_key FROM messages WHERE dedupe_key IS NOT NULL AND {where}", params)
        )
    return seen


def _recent_reply_counts(db: DriverSql, conversation_ids: Sequence[int], since: datetime) -> dict[tuple[int, str], int]:
    """Identical replies per (conversation, text) since ``since``: what loop protection counts."""
    counts: dict[tuple[int, str], int] = {}
    # On SQLite the unary + keeps the planner on the (conversation_id, created_at) index.
    status = "status" if db.postgres else "+status"
    for chunk in chunks(conversation_ids):
        where, params = db.in_list("conversation_id", chunk)
        statement = (
            f"SELECT conversation_id, text, count(*) FROM messages WHERE {where} AND created_at > ?"
            f" AND direction = 'out' AND {status} IN {_SENDING_SQL} GROUP BY conversation_id, text"
        )
        for conversation_id, reply_text, count in db.rows(statement, [*params, db.ts(since)]):
            counts[(int(conversation_id), reply_text)] = int(count)
    return counts


# ------------------------------------------------------------------ the batch


@dataclass
class _Pending:
    """One accepted message of the batch, decided but not yet written."""

    index: int
    message: Inbound
    contact_id: int
    convo: _Convo
    state_before: str | None
    decision: Decision | None
    reply_statuses: list[tuple[Reply, str, str | None]] = field(default_factory=list)


def handle_batch(
    conn: Connection,
    *,
    ruleset: Ruleset | None,
    batch: Sequence[Inbound],
    now: datetime,
    policy: Policy = Policy(),
    events: EventEndpoints | None = None,
) -> list[InboundResult]:
    """Store ``batch`` (in order) and everything it causes, on ``conn``; the caller commits.

    ``events``: the endpoints events go to (none: no event rows, and no SQL for them).
    """
    if not batch:
        return []
    db = DriverSql(conn)
    keys = [m.dedupe_key for m in batch]
    ids, convos, seen, counts, spare_ids = _read_batch(db, batch, keys, now, now - policy.loop_window)
    results: list[InboundResult | None] = [None] * len(batch)
    pending = _decide_batch(ruleset, batch, keys, ids, convos, seen, counts, results, now, policy)
    replies = [(p, reply, status, reason) for p in pending for reply, status, reason in p.reply_statuses]
    id_by_index, out_ids = _take_ids(db, pending, len(replies), spare_ids)
    _write_batch(db, pending, replies, out_ids, id_by_index, convos, keys, now, policy.reply_max_delay)
    for out_id, (_, _, status, reason) in zip(out_ids, replies, strict=True):
        if status != "queued":
            log.warning("reply %s not queued (%s): %s", out_id, status, reason)

    edge = _edge_rows(db, ruleset, pending, id_by_index, events, now) if events or _any_call(pending) else {}
    for p in pending:
        queued = sum(1 for _, status, _ in p.reply_statuses if status == "queued")
        results[p.index] = InboundResult(
            id_by_index[p.index], duplicate=False, queued=queued, decision=p.decision, edge=edge.get(p.index, 0)
        )
    return [r for r in results if r is not None]


def _any_call(pending: Sequence[_Pending]) -> bool:
    return any(p.decision is not None and p.decision.call is not None for p in pending)


def _edge_rows(
    db: DriverSql,
    ruleset: Ruleset | None,
    pending: Sequence[_Pending],
    id_by_index: dict[int, int],
    events: EventEndpoints | None,
    now: datetime,
) -> dict[int, int]:
    """Webhook calls and events of the batch's decisions, in its transaction; rows queued per batch index."""
    from bot.ingest.edge import decision_events, insert_calls

    queued: dict[int, int] = {}
    calls = [(p, p.decision.call) for p in pending if p.decision is not None and p.decision.call is not None]
    if calls:
        version = ruleset.version if ruleset is not None else None
        insert_calls(db, [(p.convo.id, id_by_index[p.index], call) for p, call in calls], version, now)
        for p, _ in calls:
            queued[p.index] = queued.get(p.index, 0) + 1
    if events:
        from bot.events.queue import PendingEvent, queue_events

        found: list[PendingEvent] = []
        indexes: list[int] = []
        for p in pending:
            if p.decision is not None:
                these = decision_events(p.decision, p.state_before, p.convo.id, id_by_index[p.index], p.message)
                found.extend(these)
                indexes.extend(p.index for _ in these[:1])
        if found and queue_events(db.conn, events, found, now):
            for index in indexes:
                queued[index] = queued.get(index, 0) + 1
    return queued


_PendingReply = tuple[_Pending, Reply, str, str | None]
"""A reply of the batch: the message it answers, the reply, its status and why (when not queued)."""


def _read_batch(db: DriverSql, batch: Sequence[Inbound], keys: Sequence[str], now: datetime, since: datetime) -> _Read:
    """Everything the decisions need, read with the conversations locked (and, on PostgreSQL, message ids)."""
    if db.postgres:
        return _read_postgres(db, batch, keys, now, since)
    ids = contact_ids(db, {(m.nationcode, m.mobile) for m in batch}, now)
    convos = lock_conversations(db, {(m.sign, ids[(m.nationcode, m.mobile)]) for m in batch}, now)
    seen = _known_keys(db, keys)
    counts = _recent_reply_counts(db, sorted(c.id for c in convos.values()), since)
    return ids, convos, seen, counts, []


def _decide_batch(
    ruleset: Ruleset | None,
    batch: Sequence[Inbound],
    keys: Sequence[str],
    ids: dict[tuple[str, str], int],
    convos: dict[tuple[str, int], _Convo],
    seen: set[str],
    counts: dict[tuple[int, str], int],
    results: list[InboundResult | None],
    now: datetime,
    policy: Policy,
) -> list[_Pending]:
    """Decide each new message in order, against its conversation as the previous one left it; no SQL.

    Duplicates get their result in ``results`` at once; ``convos`` and ``counts``
    are updated as each decision lands, so a later message of the batch sees them.
    """
    pending: list[_Pending] = []
    for index, (message, key) in enumerate(zip(batch, keys, strict=True)):
        if key in seen:
            results[index] = InboundResult(message_id=None, duplicate=True)
            continue
        seen.add(key)
        contact_id = ids[(message.nationcode, message.mobile)]
        convo = convos[(message.sign, contact_id)]
        item = _Pending(index, message, contact_id, convo, convo.state, _decide(ruleset, convo, message, now))
        if item.decision is not None:
            _apply_to_convo(convo, item.decision, index)
            for reply in item.decision.replies:
                status, reason = _reply_status(item.decision, reply, counts, convo.id, policy)
                if status == "queued":
                    counts[(convo.id, reply.text)] = counts.get((convo.id, reply.text), 0) + 1
                item.reply_statuses.append((reply, status, reason))
        pending.append(item)
    return pending


def _take_ids(
    db: DriverSql, pending: Sequence[_Pending], reply_count: int, spare_ids: list[int]
) -> tuple[dict[int, int], list[int]]:
    """Ids in conversation order (a message, then its replies); on PostgreSQL mostly taken by the read.

    Returns the inbound messages' ids by batch index, and the replies' ids in order.
    """
    wanted_ids = len(pending) + reply_count
    if len(spare_ids) < wanted_ids:  # more replies than the read's round trip took ids for
        spare_ids = spare_ids + db.allocate_ids("messages", wanted_ids - len(spare_ids))
    fresh = iter(spare_ids)
    id_by_index: dict[int, int] = {}
    out_ids: list[int] = []
    for p in pending:
        id_by_index[p.index] = next(fresh)
        out_ids.extend(next(fresh) for _ in p.reply_statuses)
    return id_by_index, out_ids


def _write_batch(
    db: DriverSql,
    pending: Sequence[_Pending],
    replies: Sequence[_PendingReply],
    out_ids: Sequence[int],
    id_by_index: dict[int, int],
    convos: dict[tuple[str, int], _Convo],
    keys: Sequence[str],
    now: datetime,
    max_delay: timedelta,
) -> None:
    """Every row the batch causes, one statement per table (one round trip on PostgreSQL)."""
    inbound_rows = [_inbound_row(db, p, id_by_index[p.index], keys[p.index], now) for p in pending]
    conversation_rows = _conversation_rows(db, convos.values(), id_by_index, now)
    opt_event_rows = [
        _opt_event_row(db, p, id_by_index[p.index], now) for p in pending if p.decision and p.decision.opt_change
    ]
    outbound_rows = [
        _outbound_row(db, p, out_id, id_by_index[p.index], reply, status, reason, now)
        for out_id, (p, reply, status, reason) in zip(out_ids, replies, strict=True)
    ]
    outbox_rows = [
        (out_id, db.ts(now + (p.decision.reply_max_delay if p.decision and p.decision.reply_max_delay else max_delay)))
        for out_id, (p, _, status, _) in zip(out_ids, replies, strict=True)
        if status == "queued"
    ]
    if db.postgres:
        _write_postgres(db, inbound_rows + outbound_rows, conversation_rows, opt_event_rows, outbox_rows, now)
        return
    db.executemany(_INSERT_MESSAGE, inbound_rows)
    db.executemany(_UPDATE_CONVERSATION, conversation_rows)
    db.executemany(_INSERT_OPT_EVENT, opt_event_rows)
    db.executemany(_INSERT_MESSAGE, outbound_rows)
    db.executemany(
        "INSERT INTO outbox (message_id, attempts, next_attempt_at, created_at, send_by) VALUES (?, 0, ?, ?, ?)",
        [(out_id, db.ts(now), db.ts(now), send_by) for out_id, send_by in outbox_rows],
    )


def _decide(ruleset: Ruleset | None, convo: _Convo, message: Inbound, now: datetime) -> Decision | None:
    rules = ruleset.for_signature(message.sign, message.extend) if ruleset is not None else None
    if rules is None:
        return None
    engine_message = InboundMessage(
        text=message.text,
        sign=message.sign,
        nationcode=message.nationcode,
        mobile=message.mobile,
        extend=message.extend,
    )
    return decide(rules, convo.engine_view(), engine_message, now)


def _apply_to_convo(convo: _Convo, decision: Decision, index: int) -> None:
    convo.state = decision.state
    convo.variables = dict(decision.vars)
    convo.expires_at = decision.expires_at
    convo.changed = True
    if decision.opt_change == "opt_out":
        convo.opted_out, convo.opt_out_index = True, index
    elif decision.opt_change == "opt_in":
        convo.opted_out, convo.opt_out_index = False, None
        convo.opted_out_at = convo.opt_out_message_id = None


def _reply_status(
    decision: Decision, reply: Reply, counts: dict[tuple[int, str], int], conversation_id: int, policy: Policy
) -> tuple[str, str | None]:
    if decision.opted_out and decision.opt_change != "opt_out":
        return "suppressed", "the number has opted out"
    if reply.refused is not None:
        return "failed", reply.refused
    if counts.get((conversation_id, reply.text), 0) >= policy.loop_limit:
        return "looping", f"more than {policy.loop_limit} identical replies within {policy.loop_window}"
    return "queued", None


_SET_LATER = frozenset({"provider_serial", "error_code", "delivered_at", "sent_at", "checks", "checked_at"})
"""Columns of ``messages`` a new row leaves NULL: sending and delivery reports fill them in."""
_MESSAGE_WRITTEN = [column for column in messages.columns if column.name not in _SET_LATER]
"""The columns a new message row is written with, in the model's order: the order of the tuples
``_inbound_row`` and ``_outbound_row`` build (a column added to the model is written too, so they
need a value for it, or ``_SET_LATER`` its name; the check below says so at import)."""
_MESSAGE_COLUMNS = ", ".join(column.name for column in _MESSAGE_WRITTEN)
_INSERT_MESSAGE = f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES ({', '.join('?' * len(_MESSAGE_WRITTEN))})"
_INSERT_OPT_EVENT = (
    "INSERT INTO opt_out_events (conversation_id, event, source, message_id, raw_text, normalized_text, rule,"
    " actor, created_at) VALUES (?, ?, 'keyword', ?, ?, ?, ?, NULL, ?)"
)
_UPDATE_CONVERSATION = (
    "UPDATE conversations SET state = ?, variables = ?, expires_at = ?, opted_out = ?, opted_out_at = ?,"
    " opt_out_message_id = ?, updated_at = ? WHERE id = ?"
)


def _inbound_row(db: DriverSql, p: _Pending, message_id: int, key: str, now: datetime) -> tuple[Any, ...]:
    d = p.decision
    return (
        message_id,
        "in",
        key,
        p.convo.id,
        p.contact_id,
        p.message.sign,
        p.message.text,
        d.normalized_text if d else None,
        db.ts(datetime.fromtimestamp(p.message.time, UTC)),
        None,
        d.rule if d else None,
        d.rule_kind if d else None,
        db.bool(bool(d and d.unmatched)),
        p.state_before,
        d.state if d else p.state_before,
        None,
        None,
        None,
        None,
        "received" if d else "ignored",
        None if d else "no rules for this signature",
        "; ".join(d.errors) if d and d.errors else None,
        db.bool(False),
        db.ts(now),
        db.ts(now),
        None,
        p.message.extend or None,
        None,
    )


def _outbound_row(
    db: DriverSql,
    p: _Pending,
    message_id: int,
    inbound_id: int,
    reply: Reply,
    status: str,
    reason: str | None,
    now: datetime,
) -> tuple[Any, ...]:
    d = p.decision
    assert d is not None
    return (
        message_id,
        "out",
        None,
        p.convo.id,
        p.contact_id,
        p.message.sign,
        reply.text,
        None,
        None,
        inbound_id,
        d.rule,
        d.rule_kind,
        db.bool(False),
        p.state_before,
        d.state,
        reply.template,
        reply.template_id,
        db.json(list(reply.params)),
        reply.segments,
        status,
        reason,
        None,
        db.bool(reply.marketing),
        db.ts(now),
        db.ts(now),
        reply.sender_id,
        p.message.extend or None,  # the reply goes out on the extend code the customer wrote to
        None,
    )


def _check_message_rows() -> None:
    """Both row builders give one value per column of ``_MESSAGE_WRITTEN`` (run once, at import).

    A column added to ``messages`` joins ``_MESSAGE_WRITTEN`` by itself; without
    this check the first callback would find out, on SQLite with a count of
    bindings, on PostgreSQL perhaps not at all (a missing JSON element is NULL).
    """
    db = SimpleNamespace(ts=lambda v: v, bool=lambda v: v, json=lambda v: v)
    message = SimpleNamespace(sign="", text="", time=0, extend="")
    p = SimpleNamespace(decision=None, convo=SimpleNamespace(id=0), contact_id=0, message=message, state_before=None)
    rows = {"_inbound_row": _inbound_row(cast(Any, db), cast(Any, p), 0, "", _EPOCH)}
    p.decision = SimpleNamespace(rule=None, rule_kind=None, state=None)
    reply = SimpleNamespace(
        text="", template=None, template_id=None, params=(), segments=1, marketing=False, sender_id=None
    )
    rows["_outbound_row"] = _outbound_row(cast(Any, db), cast(Any, p), 0, 0, cast(Any, reply), "queued", None, _EPOCH)
    for builder, row in rows.items():
        if len(row) != len(_MESSAGE_WRITTEN):
            raise AssertionError(
                f"{builder} gives {len(row)} values for the {len(_MESSAGE_WRITTEN)} columns of messages it writes"
                " (in the model's order): give the new column its value there, or add its name to _SET_LATER"
            )


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_check_message_rows()


def _opt_event_row(db: DriverSql, p: _Pending, inbound_id: int, now: datetime) -> tuple[Any, ...]:
    d = p.decision
    assert d is not None
    return (p.convo.id, d.opt_change, inbound_id, p.message.text, d.normalized_text, d.rule, db.ts(now))


def _conversation_rows(
    db: DriverSql, convos: Iterable[_Convo], id_by_index: dict[int, int], now: datetime
) -> list[tuple[Any, ...]]:
    """New values of the conversations the batch changed, in ``_UPDATE_CONVERSATION``'s order."""
    rows = []
    for convo in convos:
        if not convo.changed:
            continue
        if convo.opt_out_index is not None:
            convo.opt_out_message_id = id_by_index[convo.opt_out_index]
            convo.opted_out_at = now
        rows.append(
            (
                convo.state,
                db.json(convo.variables),
                db.ts(convo.expires_at),
                db.bool(convo.opted_out),
                db.ts(convo.opted_out_at),
                convo.opt_out_message_id,
                db.ts(now),
                convo.id,
            )
        )
    return rows


# ------------------------------------------------------------------ PostgreSQL: the batch in three round trips
#
# On PostgreSQL every statement is a round trip to another process, and the writer waits for
# each one; under load each wait is also a trip through the scheduler. So the batch is read
# with one pipeline (conversations locked, dedupe keys, reply counts, message ids), written
# with one pipeline of set-based statements, one per table rather than one per row, and
# committed: three round trips where the statement-by-statement path took about fifteen.
# Rows travel as one JSON document per statement: psycopg adapts Python lists to arrays
# element by element in Python, which cost more than the statements themselves.
# Lookups go key by key (``LATERAL``) on unique or leading index columns, so their plans are
# index probes whatever the statistics of a young, fast-growing table say: even the generic
# plan psycopg's prepared statements end up with, planned on empty tables, probes the indexes
# (checked with ``plan_cache_mode = force_generic_plan``). Prepared, they skip a parse and a
# plan per batch (0.6 ms of the server's time for 32 messages).

_PG_KEYS = "json_to_recordset(%s::json) AS k(signature text, nationcode text, mobile text)"
_PG_CONTACT = (
    " CROSS JOIN LATERAL (SELECT id FROM contacts WHERE nationcode = k.nationcode AND mobile = k.mobile OFFSET 0) c"
)
_PG_CONVERSATIONS = (
    "SELECT k.signature, k.nationcode, k.mobile, c.id, v.id, v.state, v.variables, v.expires_at, v.opted_out,"
    f" v.opted_out_at, v.opt_out_message_id FROM {_PG_KEYS}{_PG_CONTACT}"
    " CROSS JOIN LATERAL (SELECT id, state, variables, expires_at, opted_out, opted_out_at, opt_out_message_id"
    " FROM conversations WHERE signature = k.signature AND contact_id = c.id FOR UPDATE) v"
)
"""The batch's conversations with their contacts, locked one by one in the order of the (sorted) keys.

Writers lock in (signature, nationcode, mobile) order, so two of them do not
deadlock on each other's rows (should rows created meanwhile make them, the
database breaks the tie and the writer runs the batch again job by job); a
row another transaction holds is waited for, and read as it committed it.
"""
_PG_DEDUPE = (
    "SELECT m.dedupe_key FROM json_array_elements_text(%s::json) AS k(key) CROSS JOIN LATERAL"
    " (SELECT dedupe_key FROM messages WHERE dedupe_key = k.key AND dedupe_key IS NOT NULL OFFSET 0) m"
)
_PG_REPLY_COUNTS = (
    f"SELECT v.id, m.text, count(*) FROM {_PG_KEYS}{_PG_CONTACT}"
    " CROSS JOIN LATERAL (SELECT id FROM conversations WHERE signature = k.signature AND contact_id = c.id OFFSET 0) v"
    " CROSS JOIN LATERAL (SELECT text FROM messages WHERE conversation_id = v.id AND created_at > %s"
    f" AND direction = 'out' AND status IN {_SENDING_SQL} OFFSET 0) m"
    " GROUP BY v.id, m.text"
)


def _json_document(names: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Rows as a JSON array of objects, the shape ``json_to_recordset`` reads."""
    return json.dumps([dict(zip(names, row, strict=True)) for row in rows], ensure_ascii=False)


def _json_rows(rows: Iterable[Sequence[Any]]) -> str:
    """Rows as a JSON array of arrays (datetimes as ISO 8601): what ``_positional`` statements read.

    Arrays rather than objects: the encoder writes no column names, and most
    datetimes of a batch are its one "now", formatted once.
    """
    formatted: dict[datetime, str] = {}

    def value(v: Any) -> Any:
        if type(v) is datetime:
            text = formatted.get(v)
            if text is None:
                text = formatted[v] = v.isoformat()
            return text
        return v

    return json.dumps([[value(v) for v in row] for row in rows], ensure_ascii=False)


_PG_MESSAGE_IDS = "SELECT nextval(pg_get_serial_sequence('messages', 'id')) FROM generate_series(1, %s)"
_PG_CREATE = (
    "WITH k AS (SELECT * FROM json_to_recordset(%s::json) AS k(signature text, nationcode text, mobile text)),"
    " created AS (INSERT INTO contacts (nationcode, mobile, created_at)"
    " SELECT DISTINCT k.nationcode, k.mobile, %s::timestamptz FROM k WHERE NOT EXISTS"
    " (SELECT 1 FROM contacts WHERE nationcode = k.nationcode AND mobile = k.mobile)"
    " ON CONFLICT DO NOTHING RETURNING id, nationcode, mobile),"
    f" known AS (SELECT c.id, k.nationcode, k.mobile FROM k{_PG_CONTACT})"
    " INSERT INTO conversations (signature, contact_id, state, variables, opted_out, created_at, updated_at)"
    " SELECT k.signature, c.id, NULL, '{}', false, %s, %s"
    " FROM k JOIN (SELECT * FROM created UNION ALL SELECT * FROM known) c USING (nationcode, mobile)"
    " ON CONFLICT DO NOTHING"
)
"""The contacts and conversations of first-time numbers, in one statement; existing rows are left alone.

A row another transaction created but had not committed when this statement
began is skipped (``ON CONFLICT DO NOTHING`` after waiting for it) and is
found by the next statement, which reads on a new snapshot.
"""

_Read = tuple[
    dict[tuple[str, str], int], dict[tuple[str, int], _Convo], set[str], dict[tuple[int, str], int], list[int]
]
_IDS_PER_MESSAGE = 2
"""Message ids the read takes per message of the batch: its own and one reply's.

Taking them in the read's round trip saves the batch one; a batch that
replies more takes the rest after deciding, one that replies less leaves
gaps in the sequence (ids only need to grow, in commit order per conversation).
"""


def _read_postgres(
    db: DriverSql, batch: Sequence[Inbound], keys: Sequence[str], now: datetime, since: datetime
) -> _Read:
    """Contact ids, locked conversations, known dedupe keys, recent reply counts and ids, in one round trip.

    Statements of a pipeline run one after another, each on its own snapshot,
    so the keys and counts are read after the locks are held, as in the
    statement-by-statement path. Numbers or conversations seen for the first
    time cost a second round trip, which creates them, locks them and reads
    the keys again after its locks. Should a concurrent writer still hide a
    row from it, the statement-by-statement path settles the rest.
    """
    wanted = sorted({(m.sign, m.nationcode, m.mobile) for m in batch})
    reserve = _IDS_PER_MESSAGE * len(batch)
    ids, convos, seen, counts, spare_ids = _read_pipeline(db, wanted, keys, now, since, create=False, ids=reserve)
    missing = [key for key in wanted if (key[0], ids.get(key[1:], 0)) not in convos]
    if missing:
        # These ids were taken before the new conversations were locked: a concurrent writer may
        # commit a later message of the same number with larger ones, so take them again.
        more_ids, more_convos, seen, more_counts, spare_ids = _read_pipeline(
            db, missing, keys, now, since, create=True, ids=reserve
        )
        ids.update(more_ids)
        convos.update(more_convos)
        counts.update(more_counts)
        missing = [key for key in missing if (key[0], ids.get(key[1:], 0)) not in convos]
    if missing:
        ids.update(contact_ids(db, {(nationcode, mobile) for _, nationcode, mobile in missing}, now))
        created = lock_conversations(db, {(sign, ids[(n, m)]) for sign, n, m in missing}, now)
        convos.update(created)
        seen = _known_keys(db, keys)
        counts.update(_recent_reply_counts(db, sorted(c.id for c in created.values()), since))
        spare_ids = []
    return ids, convos, seen, counts, spare_ids


def _read_pipeline(
    db: DriverSql,
    wanted: Sequence[tuple[str, str, str]],
    keys: Sequence[str],
    now: datetime,
    since: datetime,
    *,
    create: bool,
    ids: int,
) -> _Read:
    """One round trip: (create,) lock and read the conversations of ``wanted``, the known keys, the counts,
    and take ``ids`` message ids (after the locks, so they grow in commit order per conversation)."""
    document = _json_document(("signature", "nationcode", "mobile"), wanted)
    connection = db.cursor.connection
    convo_cursor, key_cursor, count_cursor, id_cursor = (connection.cursor() for _ in range(4))
    with connection.pipeline():
        if create:
            db.cursor.execute(_PG_CREATE, (document, now, now, now), prepare=PREPARE)
        convo_cursor.execute(_PG_CONVERSATIONS, (document,))
        key_cursor.execute(_PG_DEDUPE, (json.dumps(sorted(set(keys))),))
        count_cursor.execute(_PG_REPLY_COUNTS, (document, since))
        id_cursor.execute(_PG_MESSAGE_IDS, (ids,))
    contacts: dict[tuple[str, str], int] = {}
    convos: dict[tuple[str, int], _Convo] = {}
    for sign, nationcode, mobile, contact, *row in convo_cursor.fetchall():
        contacts[(nationcode, mobile)] = int(contact)
        convos[(sign, int(contact))] = _Convo(
            id=int(row[0]),
            state=row[1],
            variables=dict(db.read_json(row[2]) or {}),
            expires_at=db.read_ts(row[3]),
            opted_out=bool(row[4]),
            opted_out_at=db.read_ts(row[5]),
            opt_out_message_id=row[6],
        )
    seen = {row[0] for row in key_cursor.fetchall()}
    counts = {(int(c), text): int(n) for c, text, n in count_cursor.fetchall()}
    message_ids = [int(row[0]) for row in id_cursor.fetchall()]
    for cursor in (convo_cursor, key_cursor, count_cursor, id_cursor):
        cursor.close()
    return contacts, convos, seen, counts, message_ids


_CAST_TYPES: tuple[tuple[type[TypeEngine[Any]], str], ...] = (
    (Boolean, "boolean"),
    (BigInteger, "bigint"),  # before Integer, its base class
    (Integer, "integer"),
    (String, "text"),  # Text too; and not varchar(n): a cast to it would cut a value too long, storing it refuses
    (DateTime, "timestamptz"),
    (JSON, "json"),
)


def _cast_type(column: Column[Any]) -> str:
    """The PostgreSQL type a value read out of the JSON rows is cast to before it is stored in ``column``."""
    kind = column.type
    if isinstance(kind, TypeDecorator):  # UtcDateTime
        kind = kind.impl_instance
    for sa_type, name in _CAST_TYPES:
        if isinstance(kind, sa_type):
            return name
    raise TypeError(f"no PostgreSQL cast known for {column.table.name}.{column.name}'s type {column.type!r}")


def _positional(columns: Sequence[Column[Any]]) -> str:
    """The select list reading ``columns`` from ``jsonb_array_elements(...) AS r`` by position.

    Columns of type json arrive as their JSON text (a string), so they are
    stored exactly as written, like the statement-by-statement path stores them.
    """
    return ", ".join(f"(r->>{i})::{_cast_type(column)} AS {column.name}" for i, column in enumerate(columns))


_PG_INSERT_MESSAGES = (
    f"INSERT INTO messages ({_MESSAGE_COLUMNS}) SELECT {_positional(_MESSAGE_WRITTEN)}"
    " FROM jsonb_array_elements(%s::jsonb) AS r"
)
_CONVERSATION_SELECT = _positional(
    [
        conversations.c[name]
        for name in (
            "state",
            "variables",
            "expires_at",
            "opted_out",
            "opted_out_at",
            "opt_out_message_id",
            "updated_at",
            "id",
        )
    ]
)
_PG_UPDATE_CONVERSATIONS = (
    "UPDATE conversations AS v SET state = x.state, variables = x.variables, expires_at = x.expires_at,"
    " opted_out = x.opted_out, opted_out_at = x.opted_out_at, opt_out_message_id = x.opt_out_message_id,"
    f" updated_at = x.updated_at FROM (SELECT {_CONVERSATION_SELECT} FROM jsonb_array_elements(%s::jsonb) AS r) x"
    " WHERE v.id = x.id AND v.id = ANY(%s::bigint[])"
)
"""``v.id = ANY(...)`` repeats the ids as an array the planner can count: joined on the JSON rows
alone it hashed the whole table, however few rows the batch changed."""
_OPT_EVENT_SELECT = _positional(
    [
        opt_out_events.c[name]
        for name in ("conversation_id", "event", "message_id", "raw_text", "normalized_text", "rule", "created_at")
    ]
)
_PG_INSERT_OPT_EVENTS = (
    "INSERT INTO opt_out_events (conversation_id, event, source, message_id, raw_text, normalized_text, rule,"
    " actor, created_at) SELECT x.conversation_id, x.event, 'keyword', x.message_id, x.raw_text, x.normalized_text,"
    f" x.rule, NULL, x.created_at FROM (SELECT {_OPT_EVENT_SELECT} FROM jsonb_array_elements(%s::jsonb) AS r) x"
)
_PG_INSERT_OUTBOX = (
    "INSERT INTO outbox (message_id, attempts, next_attempt_at, created_at, send_by)"
    " SELECT (r->>0)::bigint, 0, %s, %s, (r->>1)::timestamptz FROM jsonb_array_elements(%s::jsonb) AS r"
)


def _write_postgres(
    db: DriverSql,
    message_rows: Sequence[Sequence[Any]],
    conversation_rows: Sequence[Sequence[Any]],
    opt_event_rows: Sequence[Sequence[Any]],
    outbox_rows: Sequence[tuple[int, Any]],
    now: datetime,
) -> None:
    """Everything the batch writes, one statement per table, in one round trip (errors surface at its end)."""
    cursor = db.cursor
    with cursor.connection.pipeline():
        if message_rows:
            cursor.execute(_PG_INSERT_MESSAGES, (_json_rows(message_rows),))
        if conversation_rows:
            cursor.execute(
                _PG_UPDATE_CONVERSATIONS,
                (_json_rows(conversation_rows), [r[-1] for r in conversation_rows]),
            )
        if opt_event_rows:
            cursor.execute(_PG_INSERT_OPT_EVENTS, (_json_rows(opt_event_rows),))
        if outbox_rows:
            cursor.execute(_PG_INSERT_OUTBOX, (now, now, _json_rows(outbox_rows)))
