"""Tencent's delivery reports (pushed to ``/sms/status`` or pulled) applied to our replies.

Each report names the send by ``sid`` (SendSms's SerialNo), which is matched
first; ``ext`` (our SessionContext, echoed only where Tencent support turned
that on) counts only when it carries our own marker
(``bot/tencent/session_context.py``), so another system's context on a shared
SmsSdkAppId never marks our reply. A report for a send we do not know is
logged, not refused: refusing would only make Tencent retry.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, and_, select

from bot.events.endpoints import EventEndpoints
from bot.events.reply_failed import FailedReply, queue_reply_failed
from bot.numbers import parse_china_time
from bot.store.models import messages
from bot.store.reports import Outcome, keep_pending, mark_reported, reported_outcome
from bot.tencent.callbacks import StatusReport
from bot.tencent.session_context import SessionContexts

log = logging.getLogger("smsbot.reports")


@dataclass(frozen=True)
class ReportOutcome:
    updated: int
    unknown: list[str]


def apply_reports(
    conn: Connection,
    reports: list[StatusReport],
    *,
    now: datetime,
    contexts: SessionContexts | None = None,
    events: EventEndpoints | None = None,
) -> ReportOutcome:
    """Mark each reported reply delivered or failed; returns what matched and what did not.

    With ``events``, a reply a report turns ``failed`` queues ``reply_failed`` (``delivery_failed``)
    in this transaction; a report repeated (Tencent's retry, or pushed and pulled) for a reply already
    ``failed`` queues none.
    """
    updated = 0
    unknown: list[str] = []
    failed: list[FailedReply] = []
    for report in reports:
        message_id, status = _find(conn, report, contexts)
        outcome = _outcome(report)
        if message_id is None:
            # Perhaps the send's own answer is not recorded yet: kept, and applied when it is.
            unknown.append(report.sid)
            keep_pending(conn, report.sid, outcome, now=now)
            log.info("delivery report for a send we do not know (yet) %s: kept for when it is recorded", report.sid)
            continue
        mark_reported(conn, message_id, outcome, serial=report.sid, now=now)
        updated += 1
        if not outcome.delivered and status != "failed":
            failed.append(FailedReply(message_id, "delivery_failed"))
    queue_reply_failed(conn, failed, events, now)
    return ReportOutcome(updated, unknown)


def _outcome(report: StatusReport) -> Outcome:
    delivered = report.report_status == "SUCCESS"
    received = parse_china_time(report.user_receive_time) if delivered and report.user_receive_time else None
    return reported_outcome(
        delivered=delivered, received_at=received, code=report.errmsg, description=report.description
    )


def _find(conn: Connection, report: StatusReport, contexts: SessionContexts | None) -> tuple[int | None, str | None]:
    """The reported reply's id and its status before this report, or (None, None)."""
    outbound = messages.c.direction == "out"
    columns = (messages.c.id, messages.c.status)
    found = conn.execute(
        select(*columns).where(and_(outbound, messages.c.provider_serial == report.sid)).limit(1)
    ).first()
    ours = contexts.message_id(report.ext) if found is None and contexts is not None else None
    if ours is not None:
        found = conn.execute(select(*columns).where(and_(outbound, messages.c.id == ours))).first()
    return (None, None) if found is None else (int(found[0]), str(found[1]))
