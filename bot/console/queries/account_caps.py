"""The SQL of lifting an account-wide cap by hand (the banner's admin button).

Reading the caps is shared with ``/metrics`` (``bot.store.queries.account_caps``);
only the console writes them besides the delivery loop.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, select, update

from bot.store.models import account_limits


def lift_cap(conn: Connection, *, code: str, nationcode: str, at: datetime) -> datetime | None:
    """End the cap now (``until = at``); returns when it would have ended, None when none was in force.

    The row stays, ended: ``/metrics`` keeps its series (at 0) and, if Tencent
    refuses again, the delivery loop records the cap on the same row.
    Conditional on the ``until`` read, so of two admins lifting at once one
    lifts and the other is told nothing was in force.
    """
    until = conn.execute(
        select(account_limits.c.until).where(
            account_limits.c.code == code, account_limits.c.nationcode == nationcode, account_limits.c.until > at
        )
    ).scalar_one_or_none()
    if until is None:
        return None
    changed = conn.execute(
        update(account_limits)
        .where(
            account_limits.c.code == code,
            account_limits.c.nationcode == nationcode,
            account_limits.c.until == until,
        )
        .values(until=at)
    ).rowcount
    return until if changed else None
