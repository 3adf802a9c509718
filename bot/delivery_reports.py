"""Tencent's "SMS delivery status" callback: which replies reached a handset.

Tencent posts a JSON array of at most 100 reports and retries twice on
failure. Each report names the send by ``sid`` (SendSms's SerialNo) and, when
we set one, ``ext`` (our SessionContext: the message id). A report for a send
we do not know is logged, not refused: refusing would only make Tencent retry.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from sqlalchemy import Connection, and_, select, update

from bot.json_body import BadBody, json_objects
from bot.store.models import messages

log = logging.getLogger("smsbot.reports")

CHINA = timezone(timedelta(hours=8))
MAX_REPORTS = 100


class BadReport(BadBody):
    """A delivery-status body we refuse, saying which field is wrong."""


class StatusReport(BaseModel):
    """One item of Tencent's delivery-status callback."""

    model_config = ConfigDict(extra="ignore")

    sid: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]
    report_status: Literal["SUCCESS", "FAIL"]
    user_receive_time: str | None = Field(default=None, description="China time, 'YYYY-MM-DD HH:MM:SS'")
    nationcode: str | None = None
    mobile: str | None = None
    errmsg: str | None = None
    description: str | None = None
    ext: str | None = None


@dataclass(frozen=True)
class ReportOutcome:
    updated: int
    unknown: list[str]


def parse_status_callback(body: bytes) -> list[StatusReport]:
    """The reports in a callback body, or BadBody naming what is wrong."""
    items, is_array = json_objects(body, max_items=MAX_REPORTS, noun="reports", error=BadReport)
    reports = []
    for index, item in enumerate(items):
        where = f"[{index}]" if is_array else ""
        try:
            report = StatusReport.model_validate(item)
        except ValidationError as exc:
            problems = [
                f"field '{where}{'.' if where else ''}{'.'.join(str(p) for p in err['loc'])}': {err['msg']}"
                for err in exc.errors(include_url=False)
            ]
            raise BadReport("; ".join(problems)) from exc
        if report.user_receive_time is not None and _china_time(report.user_receive_time) is None:
            raise BadReport(
                f"field '{where}{'.' if where else ''}user_receive_time': expected 'YYYY-MM-DD HH:MM:SS', "
                f"got {report.user_receive_time!r}"
            )
        reports.append(report)
    return reports


def _china_time(text: str) -> datetime | None:
    try:
        return datetime.strptime(text.strip(), "%Y-%m-%d %H:%M:%S").replace(tzinfo=CHINA).astimezone(UTC)
    except ValueError:
        return None


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
            "delivered_at": _china_time(report.user_receive_time) if delivered and report.user_receive_time else None,
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
