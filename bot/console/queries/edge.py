"""The console's SQL for webhook calls and events (the thread's section and the events page)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, func, select, update
from sqlalchemy.engine import RowMapping

from bot.console.display import fmt_time
from bot.store.models import events, webhook_calls

QUEUE_STATUSES = ("failed", "pending")


def calls_of(conn: Connection, *, conversation_id: int, limit: int = 200) -> list[RowMapping]:
    c = webhook_calls.c
    statement = (
        select(c.id, c.webhook, c.rule, c.status, c.http_status, c.duration_ms, c.error, c.attempts, c.message_id)
        .add_columns(c.created_at, c.finished_at)
        .where(c.conversation_id == conversation_id)
        .order_by(c.id.desc())
        .limit(limit)
    )
    return list(conn.execute(statement).mappings())


def events_of(conn: Connection, *, conversation_id: int, limit: int = 200) -> list[RowMapping]:
    e = events.c
    statement = (
        select(e.id, e.kind, e.endpoint, e.status, e.attempts, e.last_status, e.last_error, e.created_at)
        .add_columns(e.delivered_at, e.message_id)
        .where(e.conversation_id == conversation_id)
        .order_by(e.id.desc())
        .limit(limit)
    )
    return list(conn.execute(statement).mappings())


def event_queue(conn: Connection, *, status: str, limit: int) -> list[RowMapping]:
    """Failed or pending events, newest first, with their last error."""
    e = events.c
    statement = (
        select(e.id, e.kind, e.endpoint, e.conversation_id, e.status, e.attempts, e.last_status, e.last_error)
        .add_columns(e.created_at, e.next_attempt_at)
        .where(e.status == status)
        .order_by(e.id.desc())
        .limit(limit)
    )
    return list(conn.execute(statement).mappings())


def event_counts(conn: Connection) -> dict[str, int]:
    rows = conn.execute(select(events.c.status, func.count()).group_by(events.c.status))
    return {str(status): int(n) for status, n in rows}


def retry_event(conn: Connection, *, event_id: int, now: datetime) -> RowMapping | None:
    """Put a failed or pending event back as due now (the same body; its 24 hours start again); None if unknown."""
    e = events.c
    row = conn.execute(select(e.id, e.status, e.attempts, e.last_error).where(e.id == event_id)).mappings().first()
    if row is None or row["status"] == "delivered":
        return row
    conn.execute(
        update(events)
        .where(e.id == event_id)
        .values(status="pending", next_attempt_at=now, lease_until=None, attempts=0, created_at=now)
    )
    return row


def thread_edge(conn: Connection, *, conversation_id: int) -> dict[str, list[dict[str, object]]]:
    """The thread page's webhook calls and events, newest first, with their times shown."""
    return {
        "edge_calls": [
            {**r, "time": fmt_time(r["created_at"])} for r in calls_of(conn, conversation_id=conversation_id)
        ],
        "edge_events": [
            {**r, "time": fmt_time(r["created_at"])} for r in events_of(conn, conversation_id=conversation_id)
        ],
    }
