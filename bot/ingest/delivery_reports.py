"""Tencent's delivery reports (pushed to ``/sms/status`` or pulled) applied to our replies.

Each report names the send by ``sid`` (SendSms's SerialNo) and, when we set
one, ``ext`` (our SessionContext: the message id). A report for a send we do
not know is logged, not refused: refusing would only make Tencent retry.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, select, update

from bot.numbers import parse_china_time
from bot.store.models import messages
from bot.tencent.callbacks import StatusReport

log = logging.getLogger("smsbot.reports")


@dataclass(frozen=True)
class ReportOutcome:
    updated: int
    unknown: list[str]


def apply_reports(conn: Connection, reports: list[StatusReport], *, now: datetime) -> ReportOutcome:
    """Mark each reported reply delivered or failed; returns what matched and what did not."""
    updated = 0
    unknown: list[str] = []
    for report in reports:
        message_id = _find(conn, report)
        if message_id is None:
            unknown.append(report.sid)
            log.info("delivery report for an unknown send %s", report.sid)
            continue
        delivered = report.report_status == "SUCCESS"
        values: dict[str, Any] = {
            "status": "delivered" if delivered else "failed",
            "status_reason": None,  # e.g. an ambiguous send's "may have gone out": now we know
            "delivered_at": parse_china_time(report.user_receive_time)
            if delivered and report.user_receive_time
            else None,
            "error_code": None if delivered else (report.errmsg or "FAIL"),
            "error_message": None if delivered else (report.description or "the handset did not receive it"),
            "updated_at": now,
        }
        if report.sid:
            values["provider_serial"] = report.sid
        conn.execute(update(messages).where(messages.c.id == message_id).values(**values))
        updated += 1
    return ReportOutcome(updated, unknown)


def _find(conn: Connection, report: StatusReport) -> int | None:
    outbound = messages.c.direction == "out"
    found = conn.execute(
        select(messages.c.id).where(and_(outbound, messages.c.provider_serial == report.sid)).limit(1)
    ).scalar()
    if found is None and report.ext and report.ext.isdigit():
        found = conn.execute(select(messages.c.id).where(and_(outbound, messages.c.id == int(report.ext)))).scalar()
    return None if found is None else int(found)
