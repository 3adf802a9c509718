"""Shared by the pages that show messages and numbers: time zone, dates, who sees a full number, links.

Times are stored in UTC but shown in China time (UTC+8, no daylight saving):
the customers, Tencent's delivery reports and the marketing hours are all in
China, so an ops person comparing the console with a phone or Tencent's own
console reads the same clock. Every page says so next to its times, and the
date filters (``from`` / ``to``) are China-time calendar days for the same
reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, timezone
from typing import Any
from urllib.parse import urlencode

from fastapi import Request

from bot.console.users import ConsoleUser
from bot.numbers import mask_number

DISPLAY_TZ = timezone(timedelta(hours=8), "China time")
DISPLAY_TZ_LABEL = "China time (UTC+8)"
DISPLAY_OFFSET_SECONDS = 8 * 3600


def local(moment: datetime | None) -> datetime | None:
    """``moment`` in the display time zone (None stays None, so templates can show a dash)."""
    return None if moment is None else moment.astimezone(DISPLAY_TZ)


def fmt_time(moment: datetime | None, *, seconds: bool = True) -> str:
    """A stored time as the pages show it; one format everywhere so times line up in columns."""
    shown = local(moment)
    if shown is None:
        return "—"
    return shown.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


@dataclass(frozen=True)
class DateRange:
    """A ``from``/``to`` filter of China-time calendar days, both inclusive, as UTC bounds for queries."""

    start: date | None
    end: date | None
    error: str | None = None

    @property
    def since(self) -> datetime | None:
        if self.start is None:
            return None
        return datetime.combine(self.start, time.min, DISPLAY_TZ).astimezone(UTC)

    @property
    def until(self) -> datetime | None:
        """Exclusive upper bound: the start of the day after ``end``, so the whole last day is included."""
        if self.end is None:
            return None
        return datetime.combine(self.end + timedelta(days=1), time.min, DISPLAY_TZ).astimezone(UTC)


def date_range(request: Request) -> DateRange:
    """The ``from`` and ``to`` query parameters; a bad one is reported on the page and ignored, not a 500."""
    values: list[date | None] = []
    problems: list[str] = []
    for name in ("from", "to"):
        raw = request.query_params.get(name, "").strip()
        if not raw:
            values.append(None)
            continue
        try:
            values.append(date.fromisoformat(raw))
        except ValueError:
            values.append(None)
            problems.append(f"'{name}' must be a date like 2026-01-31")
    start, end = values
    if start is not None and end is not None and end < start:
        problems.append("'to' is before 'from'")
        start = end = None
    return DateRange(start, end, "; ".join(problems) or None)


OPT_OUT_SOURCES = {
    "keyword": "the customer, by keyword",
    "console": "an admin, in the console",
    "ops": "an admin, in the console",
    "provider": "Tencent's or a carrier's blacklist",
}
"""Who opted a number out, by ``opt_out_events.source``, as the opt-outs page and the thread say it.

Three causes that look alike in a list and call for different things: the
customer's own STOP/TD to us (respect it), an admin's change (ask them),
and Tencent refusing the number as blacklisted (``provider``: the customer
unsubscribed at Tencent, or a carrier blacklists it, which Tencent does not
tell apart; the event's text says so). ``ops`` is read as the console's.
"""


def opt_out_source(source: str | None) -> str:
    """``OPT_OUT_SOURCES``' words for ``source``, or the stored value itself for one it does not know."""
    if not source:
        return "unknown"
    return OPT_OUT_SOURCES.get(source, source)


def wants_reveal(request: Request, user: ConsoleUser) -> bool:
    """Full numbers only for an admin who asked (``?reveal=1``): a viewer's request is silently ignored.

    Ignored rather than refused so a shared link with ``reveal=1`` still
    works for a viewer, just masked. Every page decides it here, the export
    download included, so no page can reveal more than another.
    """
    return user.is_admin and request.query_params.get("reveal", "") in ("1", "true", "yes", "on")


def show_number(nationcode: str, mobile: str, *, reveal: bool) -> str:
    """``+86 138****0000``, or the whole number when revealed."""
    return f"+{nationcode} {mobile if reveal else mask_number(mobile)}"


def link(path: str, params: dict[str, Any]) -> str:
    """``path`` with the non-empty ``params``: filters survive pagination and the reveal toggle."""
    kept = {key: value for key, value in params.items() if value not in (None, "", False)}
    return f"{path}?{urlencode(kept)}" if kept else path
