"""Inbound texts that no rule understood (they hit ``otherwise``), grouped so marketers see which keywords to add.

Grouped by the normalised text (what the rules compare against), so ``Price?``
and ``price`` are one row; one raw example is shown beside it because the
normalised form is not always what a customer typed.
"""

from __future__ import annotations

from datetime import timedelta

from fastapi import Request
from fastapi.responses import HTMLResponse, Response

from bot.console.display import DISPLAY_TZ, DISPLAY_TZ_LABEL, DateRange, date_range, fmt_time, link
from bot.console.queries.unmatched import unmatched_groups, unmatched_totals
from bot.console.web import PREFIX, ConsoleRouter, CurrentUser, engine, now, render

router = ConsoleRouter(prefix=PREFIX)

GROUP_LIMIT = 200
"""Groups shown: past the first few hundred the counts are ones and twos, not keywords worth adding."""
DEFAULT_DAYS = 30
"""Without ``from``/``to`` the page covers the last 30 days: recent misses are the keywords worth adding,
and the grouping then reads a bounded range of ``ix_messages_created_at`` instead of all history.
An explicitly empty ``from=`` (the form's clear field) means all time."""


@router.get("/unmatched", response_class=HTMLResponse, include_in_schema=False)
def unmatched(request: Request, _user: CurrentUser) -> Response:
    signature = request.query_params.get("signature", "").strip()
    dates = date_range(request)
    defaulted = "from" not in request.query_params and "to" not in request.query_params
    if defaulted:
        today = now(request).astimezone(DISPLAY_TZ).date()
        dates = DateRange(today - timedelta(days=DEFAULT_DAYS - 1), None)
    sign = signature or None
    with engine(request).connect() as conn:
        total_messages, total_groups = unmatched_totals(conn, signature=sign, since=dates.since, until=dates.until)
        rows = unmatched_groups(conn, signature=sign, since=dates.since, until=dates.until, limit=GROUP_LIMIT)
    params = {
        "signature": signature,
        "from": dates.start.isoformat() if dates.start else "",
        "to": dates.end.isoformat() if dates.end else "",
    }
    groups = [
        {
            **row,
            "last_seen_shown": fmt_time(row["last_seen"]),
            "search": link(PREFIX + "/conversations", {"q": row["example"], "signature": signature}),
        }
        for row in rows
    ]
    return render(
        request,
        "unmatched.html",
        {
            "groups": groups,
            "total_messages": total_messages,
            "total_groups": total_groups,
            "limit": GROUP_LIMIT,
            "signature": signature,
            "dates": dates,
            "defaulted": defaulted,
            "default_days": DEFAULT_DAYS,
            "params": params,
            "tz_label": DISPLAY_TZ_LABEL,
        },
    )
