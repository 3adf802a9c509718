"""The deliveries page's SQL: replies that failed, expired or still wait in the outbox, and putting one back there."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, Join, func, insert, or_, select, update
from sqlalchemy.engine import RowMapping

from bot.store.models import conversations, messages, outbox
from bot.store.queries import NEEDS_A_LOOK, NUMBER, message_filter, messages_with_numbers


def _listed() -> Join:
    """Replies with their number, and their outbox row while they wait (what "pending" looks for)."""
    return messages_with_numbers().outerjoin(outbox, outbox.c.message_id == messages.c.id)


@dataclass(frozen=True)
class DeliveryFilter:
    """Which replies the page lists; None does not filter."""

    status: str = ""
    """``pending``: in the outbox; one of ``NEEDS_A_LOOK``: replies with it; empty: all of those together."""
    signature: str | None = None
    code: str | None = None
    """Tencent's error code."""

    def conditions(self) -> list[ColumnElement[bool]]:
        where = message_filter(direction="out")
        if self.status == "pending":
            where.append(outbox.c.id.is_not(None))
        elif self.status:
            where.append(messages.c.status == self.status)
        else:
            where.append(or_(messages.c.status.in_(NEEDS_A_LOOK), outbox.c.id.is_not(None)))
        where += message_filter(signature=self.signature)
        if self.code is not None:
            where.append(messages.c.error_code == self.code)
        return where


def count_deliveries(conn: Connection, *, filters: DeliveryFilter) -> int:
    stmt = select(func.count()).select_from(_listed()).where(*filters.conditions())
    return int(conn.execute(stmt).scalar_one())


def delivery_page(conn: Connection, *, filters: DeliveryFilter, limit: int, offset: int) -> list[dict[str, Any]]:
    """Newest first: what was sent, what became of it, and its outbox row if it is still waiting."""
    stmt = (
        select(
            messages.c.id,
            messages.c.conversation_id,
            messages.c.signature,
            messages.c.text,
            messages.c.template_id,
            messages.c.status,
            messages.c.status_reason,
            messages.c.error_code,
            messages.c.error_message,
            messages.c.rule,
            messages.c.created_at,
            messages.c.updated_at,
            messages.c.checks,
            messages.c.checked_at,
            *NUMBER,
            outbox.c.id.label("outbox_id"),
            outbox.c.attempts,
            outbox.c.next_attempt_at,
            outbox.c.lease_until,
        )
        .select_from(_listed())
        .where(*filters.conditions())
        .order_by(messages.c.created_at.desc(), messages.c.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return [dict(r) for r in conn.execute(stmt).mappings()]


def failure_codes(conn: Connection, *, limit: int) -> list[str]:
    """Tencent's error codes on the replies the page lists, for the filter (at most ``limit`` of them).

    Expired replies count too: one that expired because of an account cap
    carries its code (``LimitExceeded.AppDailyLimit``), the first thing ops filter by.
    """
    stmt = (
        select(messages.c.error_code)
        .distinct()
        .where(messages.c.error_code.is_not(None), messages.c.status.in_(NEEDS_A_LOOK))
        .limit(limit)
    )
    return sorted(str(c) for c in conn.execute(stmt).scalars())


def counts_by_status(conn: Connection) -> dict[str, int]:
    """How many replies have each of ``NEEDS_A_LOOK`` now, whatever the filters: the page's summary line.

    Shown above the list so ambiguous sends waiting for ops are seen even
    when the list is filtered to something else or they are pages down.
    """
    stmt = (
        select(messages.c.status, func.count())
        .where(*message_filter(direction="out"), messages.c.status.in_(NEEDS_A_LOOK))
        .group_by(messages.c.status)
    )
    found = {str(status): int(n) for status, n in conn.execute(stmt)}
    return {status: found.get(status, 0) for status in NEEDS_A_LOOK}


def retry_facts(conn: Connection, *, message_id: int) -> RowMapping | None:
    """What decides whether a reply may be sent again: its outcome, its conversation's opt-out, its outbox row."""
    stmt = (
        select(
            messages.c.status,
            messages.c.direction,
            messages.c.rule_kind,
            messages.c.template_id,
            messages.c.error_code,
            messages.c.error_message,
            conversations.c.opted_out,
            outbox.c.id.label("outbox_id"),
        )
        .select_from(
            messages.outerjoin(conversations, conversations.c.id == messages.c.conversation_id).outerjoin(
                outbox, outbox.c.message_id == messages.c.id
            )
        )
        .where(messages.c.id == message_id)
    )
    return conn.execute(stmt).mappings().first()


def requeue(conn: Connection, *, message_id: int, status: str, reason: str, at: datetime) -> bool:
    """Queue the reply again, due now with a fresh budget of attempts, if it still has ``status``.

    Conditional on the status read before: of two admins retrying at once,
    one requeues it and the other gets False (nothing written).
    """
    changed = conn.execute(
        update(messages)
        .where(messages.c.id == message_id, messages.c.status == status)
        .values(status="queued", status_reason=reason, updated_at=at)
    ).rowcount
    if not changed:
        return False
    conn.execute(
        insert(outbox).values(
            message_id=message_id, attempts=0, next_attempt_at=at, lease_until=None, leased_by=None, created_at=at
        )
    )
    return True
