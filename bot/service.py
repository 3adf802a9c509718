"""Processing one inbound message inside the caller's transaction.

``handle_inbound`` is the only place where a decision of the pure engine
touches the database. Everything a message causes (the inbound row, the
conversation's new state, opt-out audit events, queued replies) is written
on the connection it is given, inside the caller's transaction, so the
caller commits it all or nothing and only then tells Tencent "OK".
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from bot.rules.engine import decide
from bot.rules.model import Conversation as EngineConversation
from bot.rules.model import Decision, InboundMessage, Reply, Ruleset
from bot.store.models import contacts, conversations, messages, opt_out_events, outbox

log = logging.getLogger("smsbot.service")


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


def contact_id_for(conn: Connection, nationcode: str, mobile: str, now: datetime) -> int:
    where = and_(contacts.c.nationcode == nationcode, contacts.c.mobile == mobile)
    found = conn.execute(select(contacts.c.id).where(where)).scalar()
    if found is not None:
        return int(found)
    stmt = (
        _insert_ignore(conn, contacts)
        .values(nationcode=nationcode, mobile=mobile, created_at=now)
        .on_conflict_do_nothing()
        .returning(contacts.c.id)
    )
    created = conn.execute(stmt).scalar()
    if created is None:  # another transaction created it between our select and insert
        created = conn.execute(select(contacts.c.id).where(where)).scalar_one()
    return int(created)


def lock_conversation(conn: Connection, signature: str, contact_id: int, now: datetime) -> Any:
    """The conversation row, created if needed and locked for the rest of the transaction.

    On PostgreSQL ``FOR UPDATE`` makes a second message from the same number
    wait here until the first commits, so it sees the first's state. SQLite
    has a single writer (BEGIN IMMEDIATE), which gives the same guarantee.
    """
    where = and_(conversations.c.signature == signature, conversations.c.contact_id == contact_id)
    query = select(conversations).where(where).with_for_update()
    row = conn.execute(query).first()
    if row is None:
        conn.execute(
            _insert_ignore(conn, conversations)
            .values(
                signature=signature,
                contact_id=contact_id,
                state=None,
                variables={},
                opted_out=False,
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_nothing()
        )
        row = conn.execute(query).one()
    return row


def handle_inbound(
    conn: Connection,
    *,
    ruleset: Ruleset | None,
    message: Inbound,
    now: datetime,
    policy: Policy = Policy(),
) -> InboundResult:
    """Store ``message`` and everything it causes, on ``conn`` (the caller commits)."""
    contact_id = contact_id_for(conn, message.nationcode, message.mobile, now)
    convo = lock_conversation(conn, message.sign, contact_id, now)
    key = message.dedupe_key
    if conn.execute(select(messages.c.id).where(messages.c.dedupe_key == key)).first() is not None:
        return InboundResult(message_id=None, duplicate=True)

    engine_message = InboundMessage(
        text=message.text, sign=message.sign, nationcode=message.nationcode, mobile=message.mobile
    )
    rules = ruleset.for_signature(message.sign) if ruleset is not None else None
    before = EngineConversation(
        state=convo.state,
        vars=dict(convo.variables or {}),
        expires_at=convo.expires_at,
        opted_out=bool(convo.opted_out),
    )
    decision = decide(rules, before, engine_message, now) if rules is not None else None
    inbound_id = conn.execute(
        insert(messages)
        .values(
            direction="in",
            dedupe_key=key,
            conversation_id=convo.id,
            contact_id=contact_id,
            signature=message.sign,
            text=message.text,
            normalized_text=decision.normalized_text if decision else None,
            provider_time=datetime.fromtimestamp(message.time, UTC),
            rule=decision.rule if decision else None,
            rule_kind=decision.rule_kind if decision else None,
            unmatched=bool(decision and decision.unmatched),
            state_before=convo.state,
            state_after=decision.state if decision else convo.state,
            status="received" if decision else "ignored",
            status_reason=None if decision else "no rules for this signature",
            error_message="; ".join(decision.errors) if decision and decision.errors else None,
            created_at=now,
            updated_at=now,
        )
        .returning(messages.c.id)
    ).scalar_one()
    if decision is None:
        return InboundResult(message_id=inbound_id, duplicate=False)

    changes: dict[str, Any] = {
        "state": decision.state,
        "variables": dict(decision.vars),
        "expires_at": decision.expires_at,
        "updated_at": now,
    }
    if decision.opt_change is not None:
        opted_out = decision.opt_change == "opt_out"
        changes |= {
            "opted_out": opted_out,
            "opted_out_at": now if opted_out else None,
            "opt_out_message_id": inbound_id if opted_out else None,
        }
        conn.execute(
            insert(opt_out_events).values(
                conversation_id=convo.id,
                event=decision.opt_change,
                source="keyword",
                message_id=inbound_id,
                raw_text=message.text,
                normalized_text=decision.normalized_text,
                rule=decision.rule,
                created_at=now,
            )
        )
    conn.execute(update(conversations).where(conversations.c.id == convo.id).values(**changes))

    queued = 0
    for reply in decision.replies:
        status, reason = _reply_status(conn, decision, reply, contact_id, now, policy)
        out_id = conn.execute(
            insert(messages)
            .values(
                direction="out",
                conversation_id=convo.id,
                contact_id=contact_id,
                signature=message.sign,
                text=reply.text,
                in_reply_to_id=inbound_id,
                rule=decision.rule,
                rule_kind=decision.rule_kind,
                state_before=convo.state,
                state_after=decision.state,
                template_name=reply.template,
                template_id=reply.template_id,
                params=list(reply.params),
                segments=reply.segments,
                status=status,
                status_reason=reason,
                created_at=now,
                updated_at=now,
            )
            .returning(messages.c.id)
        ).scalar_one()
        if status == "queued":
            conn.execute(insert(outbox).values(message_id=out_id, attempts=0, next_attempt_at=now, created_at=now))
            queued += 1
        else:
            log.warning("reply %s to %s not queued: %s", out_id, mask_number(message.mobile), reason)
    return InboundResult(message_id=inbound_id, duplicate=False, queued=queued, decision=decision)


def _reply_status(
    conn: Connection, decision: Decision, reply: Reply, contact_id: int, now: datetime, policy: Policy
) -> tuple[str, str | None]:
    if decision.opted_out and decision.opt_change != "opt_out":
        return "suppressed", "the number has opted out"
    recent = conn.execute(
        select(func.count())
        .select_from(messages)
        .where(
            messages.c.contact_id == contact_id,
            messages.c.direction == "out",
            messages.c.created_at > now - policy.loop_window,
            messages.c.text == reply.text,
            messages.c.status.in_(("queued", "sent", "delivered")),
        )
    ).scalar_one()
    if recent >= policy.loop_limit:
        return "looping", f"more than {policy.loop_limit} identical replies within {policy.loop_window}"
    return "queued", None
