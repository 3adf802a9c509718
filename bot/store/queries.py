"""Reads that the console pages, the export and ``/metrics`` share: one home for each status set, join and filter.

They used to be written out by each caller, so a new column of ``messages``
or a new reply status meant finding every copy. Here each exists once, and
the pages, the export file and the scrape count the same rows the same way.
What only one page reads stays next to that page, in ``bot.console.queries``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, Connection, Join, String, and_, func, literal_column, or_, select

from bot.store.models import account_limits, contacts, conversations, events, messages, outbox, webhook_calls

# ---------------------------------------------------------------- reply statuses

REPLY_STATUSES = frozenset(
    {"queued", "sent", "delivered", "failed", "ambiguous", "expired", "suppressed", "looping", "error"}
)
"""Reply statuses ``/metrics`` reports even at zero, because alerts need the series.

``ambiguous`` (Tencent may have sent it: ops must look) and ``expired`` (held
past its deadline, never sent) are what an operator alerts on, so they are
listed too. Any other is reported once a reply in the window has it.
"""
NOT_SENT = ("suppressed", "looping")
"""Replies the bot decided not to send: not "out" traffic."""
FAILED = ("failed", "error")
"""Sends known not to have reached the customer: the dashboard's failed replies."""
RETRYABLE = ("failed", "ambiguous", "error")
"""Sends that did not surely reach the customer (``ambiguous`` may have): what an admin may retry."""
NEEDS_A_LOOK = (*RETRYABLE, "expired")
"""Replies the deliveries page lists by default: every send that did not surely go out.

``expired`` is listed but not retryable: it was held past its deadline
(``reply_max_delay``) because a late reply confuses more than none, and a
retry by hand would send exactly that late reply.
"""

# ---------------------------------------------------------------- the number beside a row

NUMBER = (contacts.c.nationcode, contacts.c.mobile)
"""The columns every page and the export show a phone number from (masked by the caller, not here)."""


def messages_with_numbers() -> Join:
    """``messages`` with the contact each was from or to, for ``NUMBER``."""
    return messages.join(contacts, contacts.c.id == messages.c.contact_id)


def conversations_with_numbers() -> Join:
    """``conversations`` with their contact, for ``NUMBER``."""
    return conversations.join(contacts, contacts.c.id == conversations.c.contact_id)


# ---------------------------------------------------------------- filters


def message_filter(
    *,
    direction: str | None = None,
    signature: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    unmatched: bool | None = None,
) -> list[ColumnElement[bool]]:
    """Conditions on ``messages`` (None: not filtered); ``since <= created_at < until``, a range of its index.

    The one definition of "in this time range" and "under this signature"
    the export, the unmatched and dashboard pages, the deliveries page and
    the scrape all use, so a file and a page covering the same range agree.
    """
    where: list[ColumnElement[bool]] = []
    if unmatched is not None:
        where.append(messages.c.unmatched.is_(unmatched))
    if direction is not None:
        where.append(messages.c.direction == direction)
    if signature is not None:
        where.append(messages.c.signature == signature)
    if since is not None:
        where.append(messages.c.created_at >= since)
    if until is not None:
        where.append(messages.c.created_at < until)
    return where


def number_probes(digits: str) -> ColumnElement[bool]:
    """Contacts for typed ``digits`` as the conversations page reads them: a suffix, or a whole number.

    Up to 4 digits: the number ends with them; more: the whole number, with
    or without its country code. ``+86 138 0000 0000``, ``8613800000000`` and
    ``13800000000`` all find the same contact. Every reading of a whole number
    is a (nationcode, mobile) pair, so the lookup is a few probes of
    ``uq_contacts_number`` rather than a scan: digits alone are read as a
    Chinese number (86, where nearly all of Tencent's domestic SMS go), and as
    a country code of 1 to 3 digits followed by the mobile. A suffix cannot
    use a b-tree, so the last-4 search scans ``contacts`` (one row per
    number: tens of milliseconds at 100k).
    """
    if len(digits) <= 4:
        return contacts.c.mobile.endswith(digits, autoescape=True)
    readings = [("86", digits)] + [(digits[:k], digits[k:]) for k in (1, 2, 3) if len(digits) - k >= 5]
    return or_(*(and_(contacts.c.nationcode == code, contacts.c.mobile == mobile) for code, mobile in readings))


def number_match(digits: str) -> ColumnElement[bool]:
    """Contacts for typed ``digits`` as the opt-outs page reads them: the last 4, a mobile, or code and mobile.

    Four digits or fewer is a suffix search (what the masked form shows);
    more is an exact number, with or without its country code in front,
    so a number copied from anywhere finds its contact. Unlike
    ``number_probes`` a bare mobile matches under any country code (the
    page lists few rows, so the scan this costs does not matter there).
    """
    if len(digits) <= 4:
        return contacts.c.mobile.endswith(digits, autoescape=True)
    return (contacts.c.mobile == digits) | ((contacts.c.nationcode + contacts.c.mobile) == digits)


# ---------------------------------------------------------------- shared reads


def known_signatures(conn: Connection, *, extra: Iterable[str] = ()) -> list[str]:
    """Signatures to offer in a filter: those with conversations, plus ``extra`` (e.g. the rule files')."""
    found = {str(s) for s in conn.execute(select(conversations.c.signature).distinct()).scalars()}
    found.update(s for s in extra if s and s != "*")
    return sorted(found)


def replies_by_status(conn: Connection, *, since: datetime) -> dict[str, int]:
    """Replies created since ``since``, counted by their current status (a bounded range of the index)."""
    stmt = (
        select(messages.c.status, func.count())
        .where(*message_filter(since=since, direction="out"))
        .group_by(messages.c.status)
    )
    return {str(status): int(count) for status, count in conn.execute(stmt)}


def outbox_backlog(conn: Connection) -> tuple[int, datetime | None]:
    """How many replies wait in the outbox, and when the oldest of them was queued (None: it is empty)."""
    depth, oldest_at = conn.execute(select(func.count(), func.min(outbox.c.created_at))).one()
    return int(depth), oldest_at


@dataclass(frozen=True)
class AccountCap:
    """An account-wide daily cap Tencent reported (a row of ``account_limits``)."""

    code: str
    """Tencent's code, e.g. ``LimitExceeded.AppDailyLimit``."""
    nationcode: str
    """The country it blocks, or ``""`` for every number."""
    message: str | None
    """Tencent's own words when it refused the send."""
    until: datetime
    """When the delivery loop sends again (the next China day, as Tencent counts)."""
    created_at: datetime

    def active(self, now: datetime) -> bool:
        """True while it holds replies (the delivery loop's own test: ``until > now``)."""
        return self.until > now


def account_caps(conn: Connection, *, active_at: datetime | None = None) -> list[AccountCap]:
    """The caps Tencent reported, every number's first, then by country; only those in force at ``active_at``.

    The table holds one row per (code, country) ever met, updated each time
    the cap is met again, so it stays a handful of rows: reading it costs a
    console page view or a scrape nothing worth measuring. ``/metrics``
    reads every row (a cap that ended reports 0, so its series does not
    vanish); the console's banner only those in force.
    """
    stmt = select(
        account_limits.c.code,
        account_limits.c.nationcode,
        account_limits.c.message,
        account_limits.c.until,
        account_limits.c.created_at,
    ).order_by(account_limits.c.nationcode, account_limits.c.code)
    if active_at is not None:
        stmt = stmt.where(account_limits.c.until > active_at)
    return [
        AccountCap(str(code), str(nationcode), message, until, created_at)
        for code, nationcode, message, until, created_at in conn.execute(stmt)
    ]


def limit_statement_time(conn: Connection, *, milliseconds: int) -> None:
    """Bound each statement of this transaction on PostgreSQL, so a slow database cannot hang the caller.

    SQLite has no such setting; its statements here are index ranges anyway.
    """
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SET LOCAL statement_timeout = {int(milliseconds)}")


def unsettled_ambiguous(conn: Connection) -> int:
    """Every reply still ``ambiguous``, whatever its age (a partial index holds exactly these rows)."""
    stmt = select(func.count()).select_from(messages).where(messages.c.status == "ambiguous")
    return int(conn.execute(stmt).scalar_one())


WEBHOOK_STATUSES = ("pending", "ok", "failed", "timeout")
"""A webhook call's statuses (``webhook_calls.status``): /metrics reports each, at 0 until one has it."""


def _status(value: str) -> ColumnElement[str]:
    """A status written into the SQL, not bound, so both databases use the partial index on it."""
    return literal_column(f"'{value}'", String)


def events_by_endpoint(conn: Connection) -> tuple[dict[str, int], dict[str, int]]:
    """Events waiting (``pending``) and given up on (``failed``), by endpoint: each a partial index's rows."""
    found: list[dict[str, int]] = []
    for status in ("pending", "failed"):
        stmt = select(events.c.endpoint, func.count()).where(events.c.status == _status(status))
        found.append({str(e): int(n) for e, n in conn.execute(stmt.group_by(events.c.endpoint))})
    return found[0], found[1]


def webhook_calls_by_status(conn: Connection, *, since: datetime) -> dict[str, int]:
    """Webhook calls waiting now (any age: a partial index), and those created since ``since`` by status.

    Finished calls are counted over a window (a range of ``ix_webhook_calls_created_at``), as replies
    are: a count over all time would grow with the table.
    """
    pending = select(func.count()).select_from(webhook_calls).where(webhook_calls.c.status == _status("pending"))
    counts = {"pending": int(conn.execute(pending).scalar_one())}
    finished = (
        select(webhook_calls.c.status, func.count())
        .where(webhook_calls.c.created_at >= since, webhook_calls.c.status != _status("pending"))
        .group_by(webhook_calls.c.status)
    )
    counts.update({str(status): int(n) for status, n in conn.execute(finished)})
    return counts
