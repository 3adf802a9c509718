"""Queueing events: one ``events`` row per subscribed endpoint, in the transaction of what caused them.

The body is built here, once, and stored as the exact bytes to sign and send,
so a retry a day later sends what was true when it happened.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection

from bot.events.endpoints import EventEndpoints
from bot.store.driver_sql import DriverSql


@dataclass(frozen=True)
class PendingEvent:
    """Something that happened to a conversation, before it is a row per endpoint."""

    kind: str
    conversation_id: int
    message_id: int | None
    signature: str
    nationcode: str
    mobile: str
    state: str | None
    vars: Mapping[str, Any]
    extra: Mapping[str, Any] = field(default_factory=dict)
    rules_file: str | None = None
    """The rule file answering the conversation, when the caller knows it (else found by signature)."""


_INSERT = (
    "INSERT INTO events (id, endpoint, kind, conversation_id, message_id, body, status, attempts,"
    " next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?)"
)


def event_body(event_id: int, event: PendingEvent, now: datetime) -> str:
    body: dict[str, Any] = {
        "id": event_id,
        "type": event.kind,
        "created_at": now.astimezone(UTC).isoformat(),
        "signature": event.signature,
        "nationcode": event.nationcode,
        "mobile": event.mobile,
        "conversation_id": event.conversation_id,
        "message_id": event.message_id,
        "state": event.state,
        "vars": dict(event.vars),
    }
    body.update(event.extra)
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), default=str)


def queue_events(conn: Connection, endpoints: EventEndpoints, events: Sequence[PendingEvent], now: datetime) -> int:
    """Write one row per (event, endpoint that wants it); returns the rows written. No SQL when there are none."""
    if not events or not endpoints:
        return 0
    targets = [
        (event, endpoint.name)
        for event in events
        for endpoint in endpoints.for_event(event.kind, event.signature, event.rules_file)
    ]
    if not targets:
        return 0
    db = DriverSql(conn)
    ids = db.allocate_ids("events", len(targets))
    db.executemany(
        _INSERT,
        [
            (
                event_id,
                name,
                event.kind,
                event.conversation_id,
                event.message_id,
                event_body(event_id, event, now),
                db.ts(now),
                db.ts(now),
            )
            for event_id, (event, name) in zip(ids, targets, strict=True)
        ],
    )
    return len(targets)
