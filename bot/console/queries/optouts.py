"""The opt-outs page's SQL: who is opted out and why, and the rows a hand-made change writes.

A change made here is written exactly like one the pipeline makes (the
conversation's ``opted_out`` flag plus an ``opt_out_events`` row), so the
thread page, the export and the delivery loop see it with no special case.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, Join, and_, func, insert, select, true, update
from sqlalchemy.engine import RowMapping

from bot.store.models import contacts, conversations, opt_out_events
from bot.store.queries import NUMBER, conversations_with_numbers, number_match


@dataclass(frozen=True)
class OptOutFilter:
    """Which opted-out conversations the page lists; empty values do not filter."""

    number_digits: str = ""
    """Digits only: the last 4, a mobile, or country code and mobile (``bot.store.queries.number_match``)."""
    signature: str = ""
    source: str = ""
    """``opt_out_events.source`` of the latest opt-out: ``keyword``, ``console`` or ``provider`` (a blacklist)."""

    def conditions(self) -> list[ColumnElement[bool]]:
        where = [conversations.c.opted_out == true()]
        if self.number_digits:
            where.append(number_match(self.number_digits))
        if self.signature:
            where.append(conversations.c.signature == self.signature)
        if self.source:
            where.append(_LAST_EVENT.c.source == self.source)
        return where


_LAST_EVENT = opt_out_events.alias("last_event")
"""Each listed conversation's latest opt-out event: the page's "how" and "why", and the source filter."""


def _listed() -> Join:
    """Conversations with their number and their latest opt-out event (none for a flag set without one)."""
    latest = (
        select(func.max(opt_out_events.c.id))
        .where(opt_out_events.c.conversation_id == conversations.c.id, opt_out_events.c.event == "opt_out")
        .scalar_subquery()
    )
    return conversations_with_numbers().outerjoin(_LAST_EVENT, _LAST_EVENT.c.id == latest)


def count_opted_out(conn: Connection, *, filters: OptOutFilter) -> int:
    base = select(conversations.c.id).select_from(_listed()).where(*filters.conditions())
    return int(conn.execute(select(func.count()).select_from(base.subquery())).scalar_one())


def opted_out_page(conn: Connection, *, filters: OptOutFilter, limit: int, offset: int) -> list[dict[str, Any]]:
    """Latest opt-out first, each with its latest opt-out event: what the page shows as "why"."""
    event = _LAST_EVENT
    stmt = (
        select(
            conversations.c.id,
            conversations.c.signature,
            conversations.c.opted_out_at,
            *NUMBER,
            event.c.source,
            event.c.rule,
            event.c.raw_text,
            event.c.actor,
            event.c.created_at.label("event_at"),
        )
        .select_from(_listed())
        .where(*filters.conditions())
        .order_by(conversations.c.opted_out_at.desc().nulls_last(), conversations.c.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return [dict(r) for r in conn.execute(stmt).mappings()]


# ---------------------------------------------------------------- hand-made changes


def contact_id(conn: Connection, *, nationcode: str, mobile: str, at: datetime) -> int:
    """The number's contact, created when the number never wrote to us."""
    found = conn.execute(
        select(contacts.c.id).where(contacts.c.nationcode == nationcode, contacts.c.mobile == mobile)
    ).scalar_one_or_none()
    if found is not None:
        return int(found)
    created = conn.execute(
        insert(contacts).values(nationcode=nationcode, mobile=mobile, created_at=at).returning(contacts.c.id)
    ).scalar_one()
    return int(created)


def conversation_of(conn: Connection, *, signature: str, contact_id: int) -> RowMapping | None:
    """The contact's conversation under ``signature`` (its id and opt-out flag), if there is one."""
    stmt = select(conversations.c.id, conversations.c.opted_out).where(
        conversations.c.signature == signature, conversations.c.contact_id == contact_id
    )
    return conn.execute(stmt).mappings().first()


def new_opted_out_conversation(conn: Connection, *, signature: str, contact_id: int, at: datetime) -> int:
    """A conversation that starts opted out: the number opted out before it ever wrote under ``signature``."""
    stmt = (
        insert(conversations)
        .values(
            signature=signature,
            contact_id=contact_id,
            state=None,
            variables={},
            opted_out=True,
            opted_out_at=at,
            created_at=at,
            updated_at=at,
        )
        .returning(conversations.c.id)
    )
    return int(conn.execute(stmt).scalar_one())


def mark_opted_out(conn: Connection, *, conversation_id: int, at: datetime) -> None:
    conn.execute(
        update(conversations)
        .where(conversations.c.id == conversation_id)
        .values(opted_out=True, opted_out_at=at, opt_out_message_id=None, updated_at=at)
    )


def clear_opt_out(conn: Connection, *, conversation_id: int, at: datetime) -> bool:
    """Opt the conversation back in; False when it was not opted out (nothing written).

    Conditional on the flag, so two admins removing the same opt-out write
    one event, not two.
    """
    changed = conn.execute(
        update(conversations)
        .where(and_(conversations.c.id == conversation_id, conversations.c.opted_out == true()))
        .values(opted_out=False, opted_out_at=None, opt_out_message_id=None, updated_at=at)
    ).rowcount
    return bool(changed)


def record_event(
    conn: Connection, *, conversation_id: int, event: str, source: str, actor: str, reason: str | None, at: datetime
) -> None:
    """The ``opt_out_events`` row of a hand-made change: no message caused it, ``reason`` is what the admin wrote."""
    conn.execute(
        insert(opt_out_events).values(
            conversation_id=conversation_id,
            event=event,
            source=source,
            message_id=None,
            raw_text=reason,
            normalized_text=None,
            rule=None,
            actor=actor,
            created_at=at,
        )
    )


def conversation_number(conn: Connection, *, conversation_id: int) -> RowMapping | None:
    """The conversation's signature and number, for the audit entry of a change to it."""
    stmt = (
        select(conversations.c.signature, *NUMBER)
        .select_from(conversations_with_numbers())
        .where(conversations.c.id == conversation_id)
    )
    return conn.execute(stmt).mappings().first()
