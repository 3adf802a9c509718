"""The conversations list and one conversation's thread: what the bot said to whom, and why.

The list is ordered by last activity (``conversations.updated_at``, which the
pipeline moves on every message the rules looked at) and paged by keyset, not
by offset: ``?before=`` / ``?after=`` carry the (time, id) of the edge row, so
page 2000 of 100k conversations costs what page 1 does (a range scan of
``ix_conversations_updated_at``). The total shown is a separate ``count(*)``
with the same filters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import ColumnElement, Connection, and_, exists, func, or_, select
from sqlalchemy.engine import RowMapping

from bot.console.display import (
    DISPLAY_TZ_LABEL,
    DateRange,
    date_range,
    fmt_time,
    link,
    show_number,
    wants_reveal,
)
from bot.console.web import PREFIX, ConsoleRouter, CurrentUser, engine, render
from bot.store.models import contacts, conversations, messages, opt_out_events

router = ConsoleRouter(prefix=PREFIX)

PAGE_SIZE = 50
THREAD_LIMIT = 1000
"""A thread shows at most this many of the newest messages: a looping number must not make one page enormous."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CURSOR = re.compile(r"^(-?\d{1,20})_(\d{1,20})$")
_NUMBER_NOISE = re.compile(r"[\s\-().+]")


@dataclass
class ListFilters:
    """The list's query parameters, parsed once so the query, the form and the page links agree."""

    signature: str = ""
    number: str = ""
    state: str = ""
    opted_out: str = ""
    q: str = ""
    dates: DateRange = field(default_factory=lambda: DateRange(None, None))
    reveal: bool = False
    errors: list[str] = field(default_factory=list)

    def params(self) -> dict[str, Any]:
        """The filters as query parameters (for links); the cursor is added by the caller."""
        return {
            "signature": self.signature,
            "number": self.number,
            "state": self.state,
            "opted_out": self.opted_out,
            "q": self.q,
            "from": self.dates.start.isoformat() if self.dates.start else "",
            "to": self.dates.end.isoformat() if self.dates.end else "",
            "reveal": "1" if self.reveal else "",
        }


def _filters(request: Request, user: CurrentUser) -> ListFilters:
    query = request.query_params
    found = ListFilters(
        signature=query.get("signature", "").strip(),
        number=query.get("number", "").strip(),
        state=query.get("state", "").strip(),
        opted_out=query.get("opted_out", "").strip().lower(),
        q=query.get("q", "").strip(),
        dates=date_range(request),
        reveal=wants_reveal(request, user),
    )
    if found.dates.error:
        found.errors.append(found.dates.error)
    if found.opted_out not in ("", "yes", "no"):
        found.errors.append("'opted_out' must be yes or no")
        found.opted_out = ""
    if found.number and not _NUMBER_NOISE.sub("", found.number).isdigit():
        found.errors.append("'number' must be digits: a whole number or its last 4 digits")
        found.number = ""
    return found


def _number_condition(raw: str) -> ColumnElement[bool]:
    """Up to 4 digits: the number ends with them; more: the whole number, with or without its country code.

    ``+86 138 0000 0000``, ``8613800000000`` and ``13800000000`` all find the
    same contact. Every reading of a whole number is a (nationcode, mobile)
    pair, so the lookup is a few probes of ``uq_contacts_number`` rather than
    a scan: digits alone are read as a Chinese number (86, where nearly all of
    Tencent's domestic SMS go), and as a country code of 1 to 3 digits
    followed by the mobile. A suffix cannot use a b-tree, so the last-4 search
    scans ``contacts`` (one row per number: tens of milliseconds at 100k).
    """
    digits = _NUMBER_NOISE.sub("", raw)
    if len(digits) <= 4:
        return contacts.c.mobile.endswith(digits, autoescape=True)
    readings = [("86", digits)] + [(digits[:k], digits[k:]) for k in (1, 2, 3) if len(digits) - k >= 5]
    return or_(*(and_(contacts.c.nationcode == code, contacts.c.mobile == mobile) for code, mobile in readings))


def _conditions(f: ListFilters) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if f.signature:
        where.append(conversations.c.signature == f.signature)
    if f.number:
        where.append(conversations.c.contact_id.in_(select(contacts.c.id).where(_number_condition(f.number))))
    if f.state:
        where.append(conversations.c.state == f.state)
    if f.opted_out:
        where.append(conversations.c.opted_out.is_(f.opted_out == "yes"))
    if f.dates.since is not None:
        where.append(conversations.c.updated_at >= f.dates.since)
    if f.dates.until is not None:
        where.append(conversations.c.updated_at < f.dates.until)
    if f.q:
        # ILIKE on PostgreSQL, lower() LIKE lower() on SQLite; autoescape makes % and _ literal.
        where.append(
            exists().where(
                messages.c.conversation_id == conversations.c.id,
                messages.c.text.icontains(f.q, autoescape=True),
            )
        )
    return where


def _cursor(updated_at: datetime, conversation_id: int) -> str:
    return f"{(updated_at - _EPOCH) // timedelta(microseconds=1)}_{conversation_id}"


def _parse_cursor(raw: str | None) -> tuple[datetime, int] | None:
    found = _CURSOR.match(raw or "")
    if found is None:
        return None
    try:
        return _EPOCH + timedelta(microseconds=int(found.group(1))), int(found.group(2))
    except OverflowError:
        return None


def _page(
    conn: Connection, where: list[ColumnElement[bool]], before: str | None, after: str | None
) -> tuple[list[RowMapping], bool, bool]:
    """One page of rows, newest first, and whether there are newer / older pages."""
    latest = (
        select(messages.c.text, messages.c.direction)
        .where(messages.c.conversation_id == conversations.c.id)
        .order_by(messages.c.created_at.desc(), messages.c.id.desc())
        .limit(1)
    )
    stmt = (
        select(
            conversations.c.id,
            conversations.c.signature,
            conversations.c.state,
            conversations.c.opted_out,
            conversations.c.created_at,
            conversations.c.updated_at,
            contacts.c.nationcode,
            contacts.c.mobile,
            latest.with_only_columns(messages.c.text).scalar_subquery().label("last_text"),
            latest.with_only_columns(messages.c.direction).scalar_subquery().label("last_direction"),
        )
        .join(contacts, contacts.c.id == conversations.c.contact_id)
        .where(*where)
    )
    at, key = conversations.c.updated_at, conversations.c.id
    newer_cursor, older_cursor = _parse_cursor(after), _parse_cursor(before)
    if newer_cursor is not None:
        t, i = newer_cursor
        stmt = stmt.where(at >= t, or_(at > t, key > i)).order_by(at.asc(), key.asc()).limit(PAGE_SIZE + 1)
        rows = list(conn.execute(stmt).mappings())
        has_newer = len(rows) > PAGE_SIZE
        return list(reversed(rows[:PAGE_SIZE])), has_newer, True
    if older_cursor is not None:
        t, i = older_cursor
        stmt = stmt.where(at <= t, or_(at < t, key < i))
    stmt = stmt.order_by(at.desc(), key.desc()).limit(PAGE_SIZE + 1)
    rows = list(conn.execute(stmt).mappings())
    return rows[:PAGE_SIZE], older_cursor is not None, len(rows) > PAGE_SIZE


@router.get("/conversations", response_class=HTMLResponse, include_in_schema=False)
def conversation_list(request: Request, user: CurrentUser) -> Response:
    f = _filters(request, user)
    where = _conditions(f)
    with engine(request).connect() as conn:
        total = int(conn.execute(select(func.count()).select_from(conversations).where(*where)).scalar_one())
        rows, has_newer, has_older = _page(
            conn, where, request.query_params.get("before"), request.query_params.get("after")
        )
    path = PREFIX + "/conversations"
    params = f.params()
    shown = [
        {
            **row,
            "number": show_number(row["nationcode"], row["mobile"], reveal=f.reveal),
            "updated": fmt_time(row["updated_at"]),
            "started": fmt_time(row["created_at"]),
            "href": link(f"{path}/{row['id']}", {"reveal": params["reveal"]}),
        }
        for row in rows
    ]
    newer = (
        link(path, {**params, "after": _cursor(rows[0]["updated_at"], rows[0]["id"])}) if rows and has_newer else None
    )
    older = (
        link(path, {**params, "before": _cursor(rows[-1]["updated_at"], rows[-1]["id"])})
        if rows and has_older
        else None
    )
    return render(
        request,
        "conversations_list.html",
        {
            "f": f,
            "rows": shown,
            "total": total,
            "newer": newer,
            "older": older,
            "first": link(path, params) if has_newer else None,
            "reveal_link": link(path, {**params, "reveal": "" if f.reveal else "1"}) if user.is_admin else None,
            "page_size": PAGE_SIZE,
            "tz_label": DISPLAY_TZ_LABEL,
        },
    )


def _timeline(message_rows: list[RowMapping], event_rows: list[RowMapping]) -> list[dict[str, Any]]:
    """Messages and opt-out events in one order: the order the customer lived them.

    Messages are written in order, so within one moment their ids give it
    (a message, then the reply to it). An opt-out caused by a message is
    written with it and the same time, so it is placed right after that
    message, before the goodbye reply; an event without a message (ops, a
    provider report) goes after everything else of its moment.
    """
    items: list[dict[str, Any]] = [{**row, "kind": row["direction"]} for row in message_rows]
    position = {item["id"]: (item["created_at"], item["id"]) for item in items}
    keys = [(item["created_at"], item["id"], 0, 0) for item in items]
    for row in event_rows:
        anchor = position.get(row["message_id"])
        keys.append((*anchor, 1, row["id"]) if anchor is not None else (row["created_at"], 1 << 62, 1, row["id"]))
        items.append({**row, "kind": "event"})
    ordered = [item for _, item in sorted(zip(keys, items, strict=True), key=lambda pair: pair[0])]
    for item in ordered:
        item["time"] = fmt_time(item["created_at"])
        for name in ("sent_at", "delivered_at"):
            if name in item:
                item[name + "_shown"] = fmt_time(item[name]) if item[name] is not None else None
    return ordered


@router.get("/conversations/{conversation_id}", response_class=HTMLResponse, include_in_schema=False)
def conversation_thread(request: Request, user: CurrentUser, conversation_id: str) -> Response:
    reveal = wants_reveal(request, user)
    key = int(conversation_id) if conversation_id.isdigit() and len(conversation_id) < 19 else None
    with engine(request).connect() as conn:
        convo = None
        if key is not None:
            convo = (
                conn.execute(
                    select(conversations, contacts.c.nationcode, contacts.c.mobile)
                    .join(contacts, contacts.c.id == conversations.c.contact_id)
                    .where(conversations.c.id == key)
                )
                .mappings()
                .first()
            )
        if convo is None:
            return render(
                request,
                "error.html",
                {"status": 404, "message": f"there is no conversation {conversation_id!r}"},
                status_code=404,
            )
        newest = list(
            conn.execute(
                select(messages)
                .where(messages.c.conversation_id == key)
                .order_by(messages.c.created_at.desc(), messages.c.id.desc())
                .limit(THREAD_LIMIT + 1)
            ).mappings()
        )
        events = list(
            conn.execute(
                select(opt_out_events).where(opt_out_events.c.conversation_id == key).order_by(opt_out_events.c.id)
            ).mappings()
        )
    truncated = len(newest) > THREAD_LIMIT
    shown = newest[:THREAD_LIMIT]
    if truncated and shown:
        oldest = shown[-1]["created_at"]
        events = [e for e in events if e["created_at"] >= oldest]
    path = f"{PREFIX}/conversations/{key}"
    return render(
        request,
        "conversations_thread.html",
        {
            "convo": convo,
            "number": show_number(convo["nationcode"], convo["mobile"], reveal=reveal),
            "items": _timeline(shown, events),
            "truncated": truncated,
            "limit": THREAD_LIMIT,
            "started": fmt_time(convo["created_at"]),
            "updated": fmt_time(convo["updated_at"]),
            "opted_out_at": fmt_time(convo["opted_out_at"]),
            "expires_at": fmt_time(convo["expires_at"]) if convo["expires_at"] else None,
            "reveal": reveal,
            "reveal_link": link(path, {"reveal": "" if reveal else "1"}) if user.is_admin else None,
            "back": link(PREFIX + "/conversations", {"reveal": "1" if reveal else ""}),
            "tz_label": DISPLAY_TZ_LABEL,
        },
    )
