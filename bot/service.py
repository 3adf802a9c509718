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

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection

from bot.rules.engine import decide
from bot.rules.model import Conversation as EngineConversation
from bot.rules.model import Decision, InboundMessage, Reply, Ruleset
from bot.store.driver_sql import DriverSql, chunks

log = logging.getLogger("smsbot.service")

SENDING_STATUSES = ("queued", "sent", "delivered")


@dataclass(frozen=True)
class Inbound:
    """A customer's reply exactly as Tencent delivered it."""

    nationcode: str
    mobile: str
    sign: str
    text: str
    time: int
    extend: str = ""

    @property
    def dedupe_key(self) -> str:
        """Tencent sends no message id; a retried callback repeats all of these fields."""
        raw = json.dumps(
            [self.nationcode, self.mobile, self.sign, self.extend, self.time, self.text], ensure_ascii=False
        )
        return hashlib.sha256(raw.encode()).hexdigest()[:32]  # 128 bits: collisions are not a concern


@dataclass(frozen=True)
class Policy:
    """Limits applied around the engine's decisions."""

    loop_limit: int = 20
    loop_window: timedelta = timedelta(minutes=5)


@dataclass(frozen=True)
class InboundResult:
    message_id: int | None
    duplicate: bool
    queued: int = 0
    decision: Decision | None = None


def mask_number(mobile: str) -> str:
    """138****0000: enough for ops to recognise a number in logs, not enough to misuse it."""
    if len(mobile) <= 4:
        return "*" * len(mobile)
    keep_head = 3 if len(mobile) >= 10 else 0
    return mobile[:keep_head] + "*" * (len(mobile) - keep_head - 4) + mobile[-4:]


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
            f" AND direction = 'out' AND {status} IN ('queued', 'sent', 'delivered') GROUP BY conversation_id, text"
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
) -> list[InboundResult]:
    """Store ``batch`` (in order) and everything it causes, on ``conn``; the caller commits."""
    if not batch:
        return []
    db = DriverSql(conn)
    ids = contact_ids(db, {(m.nationcode, m.mobile) for m in batch}, now)
    convos = lock_conversations(db, {(m.sign, ids[(m.nationcode, m.mobile)]) for m in batch}, now)
    keys = [m.dedupe_key for m in batch]
    seen = _known_keys(db, keys)
    counts = _recent_reply_counts(db, sorted(c.id for c in convos.values()), now - policy.loop_window)

    results: list[InboundResult | None] = [None] * len(batch)
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

    # Ids in conversation order (a message, then its replies), allocated in one round trip.
    replies = [(p, reply, status, reason) for p in pending for reply, status, reason in p.reply_statuses]
    fresh = iter(db.allocate_ids("messages", len(pending) + len(replies)))
    id_by_index: dict[int, int] = {}
    out_ids: list[int] = []
    for p in pending:
        id_by_index[p.index] = next(fresh)
        out_ids.extend(next(fresh) for _ in p.reply_statuses)
    db.executemany(_INSERT_MESSAGE, [_inbound_row(db, p, id_by_index[p.index], keys[p.index], now) for p in pending])

    _write_conversations(db, convos.values(), id_by_index, now)
    db.executemany(
        _INSERT_OPT_EVENT,
        [_opt_event_row(db, p, id_by_index[p.index], now) for p in pending if p.decision and p.decision.opt_change],
    )

    db.executemany(
        _INSERT_MESSAGE,
        [
            _outbound_row(db, p, out_id, id_by_index[p.index], reply, status, reason, now)
            for out_id, (p, reply, status, reason) in zip(out_ids, replies, strict=True)
        ],
    )
    db.executemany(
        "INSERT INTO outbox (message_id, attempts, next_attempt_at, created_at) VALUES (?, 0, ?, ?)",
        [
            (out_id, db.ts(now), db.ts(now))
            for out_id, (_, _, status, _) in zip(out_ids, replies, strict=True)
            if status == "queued"
        ],
    )
    for out_id, (_, _, status, reason) in zip(out_ids, replies, strict=True):
        if status != "queued":
            log.warning("reply %s not queued (%s): %s", out_id, status, reason)

    for p in pending:
        queued = sum(1 for _, status, _ in p.reply_statuses if status == "queued")
        results[p.index] = InboundResult(id_by_index[p.index], duplicate=False, queued=queued, decision=p.decision)
    return [r for r in results if r is not None]


def _decide(ruleset: Ruleset | None, convo: _Convo, message: Inbound, now: datetime) -> Decision | None:
    rules = ruleset.for_signature(message.sign) if ruleset is not None else None
    if rules is None:
        return None
    engine_message = InboundMessage(
        text=message.text, sign=message.sign, nationcode=message.nationcode, mobile=message.mobile
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
    if counts.get((conversation_id, reply.text), 0) >= policy.loop_limit:
        return "looping", f"more than {policy.loop_limit} identical replies within {policy.loop_window}"
    return "queued", None


_MESSAGE_COLUMNS = (
    "id, direction, dedupe_key, conversation_id, contact_id, signature, text, normalized_text, provider_time,"
    " in_reply_to_id, rule, rule_kind, unmatched, state_before, state_after, template_name, template_id, params,"
    " segments, status, status_reason, error_message, marketing, created_at, updated_at"
)
_INSERT_MESSAGE = f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES ({', '.join('?' * 25)})"
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
    )


def _opt_event_row(db: DriverSql, p: _Pending, inbound_id: int, now: datetime) -> tuple[Any, ...]:
    d = p.decision
    assert d is not None
    return (p.convo.id, d.opt_change, inbound_id, p.message.text, d.normalized_text, d.rule, db.ts(now))


def _write_conversations(db: DriverSql, convos: Iterable[_Convo], id_by_index: dict[int, int], now: datetime) -> None:
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
    db.executemany(_UPDATE_CONVERSATION, rows)
