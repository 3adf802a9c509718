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

from sqlalchemy import Connection, bindparam, func, insert, select, text, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite

from bot.rules.engine import decide
from bot.rules.model import Conversation as EngineConversation
from bot.rules.model import Decision, InboundMessage, Reply, Ruleset
from bot.store.models import contacts, conversations, messages, opt_out_events, outbox

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
        return hashlib.sha256(raw.encode()).hexdigest()


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


def _insert_ignore(conn: Connection, table: Any) -> Any:
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def _chunks(items: Sequence[Any], size: int = 500) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ------------------------------------------------------------------ contacts and conversations


def contact_ids(conn: Connection, numbers: set[tuple[str, str]], now: datetime) -> dict[tuple[str, str], int]:
    """Ids for (nationcode, mobile) pairs, creating the contacts that are new."""
    found: dict[tuple[str, str], int] = {}

    def fetch(wanted: Sequence[tuple[str, str]]) -> None:
        for chunk in _chunks(wanted):
            query = select(contacts.c.id, contacts.c.nationcode, contacts.c.mobile).where(
                tuple_(contacts.c.nationcode, contacts.c.mobile).in_(chunk)
            )
            for row in conn.execute(query):
                found[(row.nationcode, row.mobile)] = row.id

    fetch(sorted(numbers))
    missing = sorted(numbers - found.keys())
    if missing:
        conn.execute(
            _insert_ignore(conn, contacts).on_conflict_do_nothing(),
            [{"nationcode": n, "mobile": m, "created_at": now} for n, m in missing],
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


def lock_conversations(conn: Connection, keys: set[tuple[str, int]], now: datetime) -> dict[tuple[str, int], _Convo]:
    """The conversation rows for (signature, contact id), created if needed and locked until commit.

    On PostgreSQL ``FOR UPDATE`` (taken in id order, so two processes cannot
    deadlock on the same rows) makes a message from the same number in
    another process wait until this transaction commits, so it sees our
    state. SQLite has a single writer (BEGIN IMMEDIATE): the same guarantee.
    """
    found: dict[tuple[str, int], _Convo] = {}

    def fetch(wanted: Sequence[tuple[str, int]]) -> None:
        for chunk in _chunks(wanted):
            query = (
                select(conversations)
                .where(tuple_(conversations.c.signature, conversations.c.contact_id).in_(chunk))
                .order_by(conversations.c.id)
                .with_for_update()
            )
            for row in conn.execute(query):
                found[(row.signature, row.contact_id)] = _Convo(
                    id=row.id,
                    state=row.state,
                    variables=dict(row.variables or {}),
                    expires_at=row.expires_at,
                    opted_out=bool(row.opted_out),
                    opted_out_at=row.opted_out_at,
                    opt_out_message_id=row.opt_out_message_id,
                )

    fetch(sorted(keys))
    missing = sorted(keys - found.keys())
    if missing:
        conn.execute(
            _insert_ignore(conn, conversations).on_conflict_do_nothing(),
            [
                {
                    "signature": sign,
                    "contact_id": contact,
                    "state": None,
                    "variables": {},
                    "opted_out": False,
                    "created_at": now,
                    "updated_at": now,
                }
                for sign, contact in missing
            ],
        )
        fetch(missing)
    return found


def _recent_reply_counts(conn: Connection, contact_list: Sequence[int], since: datetime) -> dict[tuple[int, str], int]:
    counts: dict[tuple[int, str], int] = {}
    for chunk in _chunks(contact_list):
        query = (
            select(messages.c.contact_id, messages.c.text, func.count())
            .where(
                messages.c.contact_id.in_(chunk),
                messages.c.direction == "out",
                messages.c.created_at > since,
                messages.c.status.in_(SENDING_STATUSES),
            )
            .group_by(messages.c.contact_id, messages.c.text)
        )
        for contact_id, reply_text, count in conn.execute(query):
            counts[(contact_id, reply_text)] = count
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


_UPDATE_CONVERSATION = (
    update(conversations)
    .where(conversations.c.id == bindparam("b_id"))
    .values(
        state=bindparam("b_state"),
        variables=bindparam("b_variables"),
        expires_at=bindparam("b_expires_at"),
        opted_out=bindparam("b_opted_out"),
        opted_out_at=bindparam("b_opted_out_at"),
        opt_out_message_id=bindparam("b_opt_out_message_id"),
        updated_at=bindparam("b_updated_at"),
    )
)


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
    ids = contact_ids(conn, {(m.nationcode, m.mobile) for m in batch}, now)
    convos = lock_conversations(conn, {(m.sign, ids[(m.nationcode, m.mobile)]) for m in batch}, now)
    keys = [m.dedupe_key for m in batch]
    seen: set[str] = set()
    for chunk in _chunks(sorted(set(keys))):
        seen.update(conn.execute(select(messages.c.dedupe_key).where(messages.c.dedupe_key.in_(chunk))).scalars())
    counts = _recent_reply_counts(
        conn, sorted({ids[(m.nationcode, m.mobile)] for m in batch}), now - policy.loop_window
    )

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
                status, reason = _reply_status(item.decision, reply, counts, contact_id, policy)
                if status == "queued":
                    counts[(contact_id, reply.text)] = counts.get((contact_id, reply.text), 0) + 1
                item.reply_statuses.append((reply, status, reason))
        pending.append(item)

    inbound_ids = _insert_returning_ids(conn, messages, [_inbound_row(p, keys[p.index], now) for p in pending])
    id_by_index = {p.index: inbound_ids[n] for n, p in enumerate(pending)}

    _write_conversations(conn, convos.values(), id_by_index, now)
    events = [_opt_event_row(p, id_by_index[p.index], now) for p in pending if p.decision and p.decision.opt_change]
    if events:
        conn.execute(insert(opt_out_events), events)

    out_rows: list[dict[str, Any]] = []
    for p in pending:
        for reply, status, reason in p.reply_statuses:
            out_rows.append(_outbound_row(p, id_by_index[p.index], reply, status, reason, now))
    out_ids = _insert_returning_ids(conn, messages, out_rows)
    queued_rows = [
        {"message_id": out_id, "attempts": 0, "next_attempt_at": now, "created_at": now}
        for out_id, row in zip(out_ids, out_rows, strict=True)
        if row["status"] == "queued"
    ]
    if queued_rows:
        conn.execute(insert(outbox), queued_rows)
    for out_id, row in zip(out_ids, out_rows, strict=True):
        if row["status"] != "queued":
            log.warning("reply %s not queued (%s): %s", out_id, row["status"], row["status_reason"])

    for p in pending:
        queued = sum(1 for _, status, _ in p.reply_statuses if status == "queued")
        results[p.index] = InboundResult(id_by_index[p.index], duplicate=False, queued=queued, decision=p.decision)
    return [r for r in results if r is not None]


def handle_inbound(
    conn: Connection, *, ruleset: Ruleset | None, message: Inbound, now: datetime, policy: Policy = Policy()
) -> InboundResult:
    """One message; the same code path as a batch of one."""
    return handle_batch(conn, ruleset=ruleset, batch=[message], now=now, policy=policy)[0]


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
    decision: Decision, reply: Reply, counts: dict[tuple[int, str], int], contact_id: int, policy: Policy
) -> tuple[str, str | None]:
    if decision.opted_out and decision.opt_change != "opt_out":
        return "suppressed", "the number has opted out"
    if counts.get((contact_id, reply.text), 0) >= policy.loop_limit:
        return "looping", f"more than {policy.loop_limit} identical replies within {policy.loop_window}"
    return "queued", None


def _insert_returning_ids(conn: Connection, table: Any, rows: list[dict[str, Any]]) -> list[int]:
    """Insert ``rows`` with ids allocated up front, so one executemany can insert them all.

    (Multi-row INSERT ... RETURNING cannot promise row order on SQLite, so
    SQLAlchemy would fall back to one statement per row.) On PostgreSQL the
    ids come from the table's sequence; on SQLite we hold the database's only
    write lock (BEGIN IMMEDIATE), so max(id) + 1 ... is ours.
    """
    if not rows:
        return []
    if conn.dialect.name == "postgresql":
        ids = [
            int(i)
            for i in conn.execute(
                text("SELECT nextval(pg_get_serial_sequence(:table, 'id')) FROM generate_series(1, :n)"),
                {"table": table.name, "n": len(rows)},
            ).scalars()
        ]
    else:
        top = int(conn.execute(select(func.coalesce(func.max(table.c.id), 0))).scalar_one())
        ids = list(range(top + 1, top + 1 + len(rows)))
    for row, new_id in zip(rows, ids, strict=True):
        row["id"] = new_id
    conn.execute(insert(table), rows)
    return ids


def _inbound_row(p: _Pending, key: str, now: datetime) -> dict[str, Any]:
    d = p.decision
    return {
        "direction": "in",
        "dedupe_key": key,
        "conversation_id": p.convo.id,
        "contact_id": p.contact_id,
        "signature": p.message.sign,
        "text": p.message.text,
        "normalized_text": d.normalized_text if d else None,
        "provider_time": datetime.fromtimestamp(p.message.time, UTC),
        "in_reply_to_id": None,
        "rule": d.rule if d else None,
        "rule_kind": d.rule_kind if d else None,
        "unmatched": bool(d and d.unmatched),
        "state_before": p.state_before,
        "state_after": d.state if d else p.state_before,
        "template_name": None,
        "template_id": None,
        "params": None,
        "segments": None,
        "status": "received" if d else "ignored",
        "status_reason": None if d else "no rules for this signature",
        "provider_serial": None,
        "error_code": None,
        "error_message": "; ".join(d.errors) if d and d.errors else None,
        "created_at": now,
        "updated_at": now,
    }


def _outbound_row(
    p: _Pending, inbound_id: int, reply: Reply, status: str, reason: str | None, now: datetime
) -> dict[str, Any]:
    d = p.decision
    assert d is not None
    return {
        "direction": "out",
        "dedupe_key": None,
        "conversation_id": p.convo.id,
        "contact_id": p.contact_id,
        "signature": p.message.sign,
        "text": reply.text,
        "normalized_text": None,
        "provider_time": None,
        "in_reply_to_id": inbound_id,
        "rule": d.rule,
        "rule_kind": d.rule_kind,
        "unmatched": False,
        "state_before": p.state_before,
        "state_after": d.state,
        "template_name": reply.template,
        "template_id": reply.template_id,
        "params": list(reply.params),
        "segments": reply.segments,
        "status": status,
        "status_reason": reason,
        "provider_serial": None,
        "error_code": None,
        "error_message": None,
        "created_at": now,
        "updated_at": now,
    }


def _opt_event_row(p: _Pending, inbound_id: int, now: datetime) -> dict[str, Any]:
    d = p.decision
    assert d is not None
    return {
        "conversation_id": p.convo.id,
        "event": d.opt_change,
        "source": "keyword",
        "message_id": inbound_id,
        "raw_text": p.message.text,
        "normalized_text": d.normalized_text,
        "rule": d.rule,
        "actor": None,
        "created_at": now,
    }


def _write_conversations(
    conn: Connection, convos: Iterable[_Convo], id_by_index: dict[int, int], now: datetime
) -> None:
    rows = []
    for convo in convos:
        if not convo.changed:
            continue
        if convo.opt_out_index is not None:
            convo.opt_out_message_id = id_by_index[convo.opt_out_index]
            convo.opted_out_at = now
        rows.append(
            {
                "b_id": convo.id,
                "b_state": convo.state,
                "b_variables": convo.variables,
                "b_expires_at": convo.expires_at,
                "b_opted_out": convo.opted_out,
                "b_opted_out_at": convo.opted_out_at,
                "b_opt_out_message_id": convo.opt_out_message_id,
                "b_updated_at": now,
            }
        )
    if rows:
        conn.execute(_UPDATE_CONVERSATION, rows)
