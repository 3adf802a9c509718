"""The API's own SQL: a conversation with its newest messages, and the idempotency records."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, delete, insert, select
from sqlalchemy.engine import RowMapping

from bot.store.models import api_idempotency, contacts, conversations, messages

IDEMPOTENCY_WINDOW = timedelta(hours=24)


def conversation_by_number(conn: Connection, *, signature: str, nationcode: str, mobile: str) -> RowMapping | None:
    return (
        conn.execute(
            select(conversations, contacts.c.nationcode, contacts.c.mobile)
            .join(contacts, contacts.c.id == conversations.c.contact_id)
            .where(
                conversations.c.signature == signature,
                contacts.c.nationcode == nationcode,
                contacts.c.mobile == mobile,
            )
        )
        .mappings()
        .first()
    )


def newest_messages(conn: Connection, *, conversation_id: int, limit: int) -> list[RowMapping]:
    found = list(
        conn.execute(
            select(messages)
            .where(messages.c.conversation_id == conversation_id)
            .order_by(messages.c.created_at.desc(), messages.c.id.desc())
            .limit(limit)
        ).mappings()
    )
    return found[::-1]


def remembered_answers(
    conn: Connection, *, api_key_id: int, keys: list[str], now: datetime
) -> dict[str, tuple[int, dict[str, Any]]]:
    """The first answers to these idempotency keys of this API key, within the window; older ones are dropped."""
    conn.execute(delete(api_idempotency).where(api_idempotency.c.created_at < now - IDEMPOTENCY_WINDOW))
    if not keys:
        return {}
    found: dict[str, tuple[int, dict[str, Any]]] = {}
    for start in range(0, len(keys), 500):
        rows = conn.execute(
            select(api_idempotency.c.idempotency_key, api_idempotency.c.status_code, api_idempotency.c.response).where(
                api_idempotency.c.api_key_id == api_key_id,
                api_idempotency.c.idempotency_key.in_(keys[start : start + 500]),
            )
        )
        for key, status, response in rows:
            found[key] = (int(status), dict(response))
    return found


def remember_answers(
    conn: Connection, *, api_key_id: int, answers: dict[str, tuple[int, dict[str, Any]]], now: datetime
) -> None:
    if answers:
        conn.execute(
            insert(api_idempotency),
            [
                {
                    "api_key_id": api_key_id,
                    "idempotency_key": key,
                    "status_code": status,
                    "response": body,
                    "created_at": now,
                }
                for key, (status, body) in answers.items()
            ],
        )
