"""The conversations list and one conversation's thread, as SQL.

The list pages by keyset on (``updated_at``, ``id``), a range scan of
``ix_conversations_updated_at``, so page 2000 costs what page 1 does; the
total is a separate ``count(*)`` with the same filters.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, Select, exists, func, or_, select
from sqlalchemy.engine import RowMapping

from bot.store.models import contacts, conversations, messages, opt_out_events
from bot.store.queries import NUMBER, conversations_with_numbers, number_probes

Cursor = tuple[datetime, int]
"""(``updated_at``, ``id``) of the row a page starts after."""


@dataclass(frozen=True)
class ConversationFilter:
    """What the list is narrowed to; empty values do not filter."""

    signature: str = ""
    number_digits: str = ""
    """Digits only: a whole number or its last 4 (see ``bot.store.queries.number_probes``)."""
    state: str = ""
    opted_out: bool | None = None
    text: str = ""
    """Any message of the conversation contains it, case-insensitively, ``%`` and ``_`` literal."""
    since: datetime | None = None
    until: datetime | None = None

    def conditions(self) -> list[ColumnElement[bool]]:
        where: list[ColumnElement[bool]] = []
        if self.signature:
            where.append(conversations.c.signature == self.signature)
        if self.number_digits:
            matching = select(contacts.c.id).where(number_probes(self.number_digits))
            where.append(conversations.c.contact_id.in_(matching))
        if self.state:
            where.append(conversations.c.state == self.state)
        if self.opted_out is not None:
            where.append(conversations.c.opted_out.is_(self.opted_out))
        if self.since is not None:
            where.append(conversations.c.updated_at >= self.since)
        if self.until is not None:
            where.append(conversations.c.updated_at < self.until)
        if self.text:
            # ILIKE on PostgreSQL, lower() LIKE lower() on SQLite; autoescape makes % and _ literal.
            where.append(
                exists().where(
                    messages.c.conversation_id == conversations.c.id,
                    messages.c.text.icontains(self.text, autoescape=True),
                )
            )
        return where


def count_conversations(conn: Connection, *, filters: ConversationFilter) -> int:
    stmt = select(func.count()).select_from(conversations).where(*filters.conditions())
    return int(conn.execute(stmt).scalar_one())


def _listing(filters: ConversationFilter) -> Select[Any]:
    """The list's columns: the conversation, its number, and its latest message's text and direction."""
    latest = (
        select(messages.c.text, messages.c.direction)
        .where(messages.c.conversation_id == conversations.c.id)
        .order_by(messages.c.created_at.desc(), messages.c.id.desc())
        .limit(1)
    )
    return (
        select(
            conversations.c.id,
            conversations.c.signature,
            conversations.c.state,
            conversations.c.opted_out,
            conversations.c.created_at,
            conversations.c.updated_at,
            *NUMBER,
            latest.with_only_columns(messages.c.text).scalar_subquery().label("last_text"),
            latest.with_only_columns(messages.c.direction).scalar_subquery().label("last_direction"),
        )
        .select_from(conversations_with_numbers())
        .where(*filters.conditions())
    )


def conversation_page(
    conn: Connection, *, filters: ConversationFilter, size: int, after: Cursor | None, before: Cursor | None
) -> tuple[list[RowMapping], bool, bool]:
    """One page, newest first, and whether there are newer / older pages.

    ``after`` (the page above, newer rows) wins over ``before`` (the page
    below); with neither it is the first page.
    """
    stmt = _listing(filters)
    at, key = conversations.c.updated_at, conversations.c.id
    if after is not None:
        t, i = after
        stmt = stmt.where(at >= t, or_(at > t, key > i)).order_by(at.asc(), key.asc()).limit(size + 1)
        rows = list(conn.execute(stmt).mappings())
        has_newer = len(rows) > size
        return list(reversed(rows[:size])), has_newer, True
    if before is not None:
        t, i = before
        stmt = stmt.where(at <= t, or_(at < t, key < i))
    stmt = stmt.order_by(at.desc(), key.desc()).limit(size + 1)
    rows = list(conn.execute(stmt).mappings())
    return rows[:size], before is not None, len(rows) > size


def conversation_with_number(conn: Connection, *, conversation_id: int) -> RowMapping | None:
    """The whole conversation row and its number."""
    stmt = (
        select(conversations, *NUMBER)
        .select_from(conversations_with_numbers())
        .where(conversations.c.id == conversation_id)
    )
    return conn.execute(stmt).mappings().first()


def newest_messages(conn: Connection, *, conversation_id: int, limit: int) -> list[RowMapping]:
    """Up to ``limit`` of the conversation's messages, every column, newest first."""
    stmt = (
        select(messages)
        .where(messages.c.conversation_id == conversation_id)
        .order_by(messages.c.created_at.desc(), messages.c.id.desc())
        .limit(limit)
    )
    return list(conn.execute(stmt).mappings())


def one_message(conn: Connection, *, conversation_id: int, message_id: int) -> RowMapping | None:
    """One message of the conversation, every column (None: no such message in that conversation)."""
    stmt = select(messages).where(messages.c.id == message_id, messages.c.conversation_id == conversation_id)
    return conn.execute(stmt).mappings().first()


def opt_out_history(conn: Connection, *, conversation_id: int) -> list[RowMapping]:
    """Every opt-out and opt-in of the conversation, in the order they were written."""
    stmt = (
        select(opt_out_events).where(opt_out_events.c.conversation_id == conversation_id).order_by(opt_out_events.c.id)
    )
    return list(conn.execute(stmt).mappings())
