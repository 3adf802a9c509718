"""What a delivery report does to a reply's row, and the reports kept until their send is recorded.

Two stages write it: ingest, when a report arrives for a send we know, and
delivery, when it records a send whose report came first (a report can
overtake the send's own answer). Both go through ``mark_reported`` so the
row ends the same way whichever came first.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update

from bot.store.driver_sql import chunks
from bot.store.models import messages, pending_reports

KEEP_PENDING = timedelta(days=3)
"""How long a report for an unknown serial is kept: Tencent reports within minutes, a send's answer sooner."""


@dataclass(frozen=True)
class Outcome:
    """What the handset said, as the reply's row records it."""

    delivered: bool
    delivered_at: datetime | None
    error_code: str | None
    error_message: str | None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["delivered_at"] = self.delivered_at.isoformat() if self.delivered_at else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Outcome:
        at = data.get("delivered_at")
        return cls(
            delivered=bool(data["delivered"]),
            delivered_at=datetime.fromisoformat(at) if at else None,
            error_code=data.get("error_code"),
            error_message=data.get("error_message"),
        )


def reported_outcome(
    *, delivered: bool, received_at: datetime | None, code: str | None, description: str | None
) -> Outcome:
    """What a delivery status says, however it reached us (pushed, pulled, or looked up for an ambiguous send).

    One conversion, so a reply's row reads the same whichever path settled it:
    a failure without Tencent's code is ``FAIL``, one without a description says
    the handset did not receive it.
    """
    return Outcome(
        delivered=delivered,
        delivered_at=received_at if delivered else None,
        error_code=None if delivered else (code or "FAIL"),
        error_message=None if delivered else (description or "the handset did not receive it"),
    )


def mark_reported(conn: Connection, message_id: int, outcome: Outcome, *, serial: str | None, now: datetime) -> None:
    values: dict[str, Any] = {
        "status": "delivered" if outcome.delivered else "failed",
        "status_reason": None,  # e.g. an ambiguous send's "may have gone out": now we know
        "delivered_at": outcome.delivered_at,
        "error_code": outcome.error_code,
        "error_message": outcome.error_message,
        "updated_at": now,
    }
    if serial:
        values["provider_serial"] = serial
    conn.execute(update(messages).where(messages.c.id == message_id).values(**values))


def keep_pending(conn: Connection, serial: str, outcome: Outcome, *, now: datetime) -> None:
    """Keep a report for a serial no reply has yet (the latest report for it wins); old ones are pruned."""
    conn.execute(delete(pending_reports).where(pending_reports.c.received_at < now - KEEP_PENDING))
    conn.execute(delete(pending_reports).where(pending_reports.c.sid == serial))
    conn.execute(insert(pending_reports).values(sid=serial, report=outcome.to_json(), received_at=now))


def take_pending(conn: Connection, serials: list[str]) -> dict[str, Outcome]:
    """The kept reports for these serials, removed: their sends are being recorded now."""
    found: dict[str, Outcome] = {}
    for chunk in chunks(sorted(set(serials))):
        rows = conn.execute(
            select(pending_reports.c.sid, pending_reports.c.report).where(pending_reports.c.sid.in_(chunk))
        )
        for sid, report in rows:
            found[str(sid)] = Outcome.from_json(report if isinstance(report, dict) else json.loads(report))
    if found:
        conn.execute(delete(pending_reports).where(pending_reports.c.sid.in_(sorted(found))))
    return found
