"""The unmatched page's SQL: inbound texts that hit ``otherwise``, grouped by their normalised text."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ColumnElement, Connection, func, select
from sqlalchemy.engine import RowMapping

from bot.store.models import messages
from bot.store.queries import message_filter

_TEXT = func.coalesce(messages.c.normalized_text, "")
"""What the rules compared against; a message without one is grouped with the empty text."""


def _where(signature: str | None, since: datetime | None, until: datetime | None) -> list[ColumnElement[bool]]:
    return message_filter(unmatched=True, direction="in", signature=signature, since=since, until=until)


def unmatched_totals(
    conn: Connection, *, signature: str | None, since: datetime | None, until: datetime | None
) -> tuple[int, int]:
    """How many unmatched texts there are, and in how many groups (all of them, not just those shown)."""
    stmt = select(func.count(), func.count(func.distinct(_TEXT))).select_from(messages)
    messages_found, groups = conn.execute(stmt.where(*_where(signature, since, until))).one()
    return int(messages_found), int(groups)


def unmatched_groups(
    conn: Connection, *, signature: str | None, since: datetime | None, until: datetime | None, limit: int
) -> list[RowMapping]:
    """The most frequent groups first: hits, conversations, when last seen, and one raw example."""
    hits = func.count().label("hits")
    stmt = (
        select(
            _TEXT.label("normalized_text"),
            hits,
            func.count(func.distinct(messages.c.conversation_id)).label("conversations"),
            func.max(messages.c.created_at).label("last_seen"),
            func.min(messages.c.text).label("example"),
        )
        .where(*_where(signature, since, until))
        .group_by(_TEXT)
        .order_by(hits.desc(), _TEXT)
        .limit(limit)
    )
    return list(conn.execute(stmt).mappings())
