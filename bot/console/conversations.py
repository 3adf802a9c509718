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
from bot.console.queries.conversations import (
    ConversationFilter,
    Cursor,
    conversation_page,
    conversation_with_number,
    count_conversations,
    newest_messages,
    opt_out_history,
)
from bot.console.queries.edge import thread_edge
from bot.console.web import PREFIX, ConsoleRouter, CurrentUser, engine, render

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

    def query(self) -> ConversationFilter:
        """The filters as the query reads them: digits only, opted-out as a flag, no links or errors."""
        return ConversationFilter(
            signature=self.signature,
            number_digits=_NUMBER_NOISE.sub("", self.number),
            state=self.state,
            opted_out=None if not self.opted_out else self.opted_out == "yes",
            text=self.q,
            since=self.dates.since,
            until=self.dates.until,
        )


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


def _cursor(updated_at: datetime, conversation_id: int) -> str:
    return f"{(updated_at - _EPOCH) // timedelta(microseconds=1)}_{conversation_id}"


def _parse_cursor(raw: str | None) -> Cursor | None:
    found = _CURSOR.match(raw or "")
    if found is None:
        return None
    try:
        return _EPOCH + timedelta(microseconds=int(found.group(1))), int(found.group(2))
    except OverflowError:
        return None


@router.get("/conversations", response_class=HTMLResponse, include_in_schema=False)
def conversation_list(request: Request, user: CurrentUser) -> Response:
    f = _filters(request, user)
    filters = f.query()
    after = _parse_cursor(request.query_params.get("after"))
    before = _parse_cursor(request.query_params.get("before"))
    with engine(request).connect() as conn:
        total = count_conversations(conn, filters=filters)
        rows, has_newer, has_older = conversation_page(
            conn, filters=filters, size=PAGE_SIZE, after=after, before=before
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
    key = (
        int(conversation_id)
        if conversation_id.isascii() and conversation_id.isdigit() and len(conversation_id) < 19
        else None
    )
    with engine(request).connect() as conn:
        convo = conversation_with_number(conn, conversation_id=key) if key is not None else None
        if convo is None:
            return render(
                request,
                "error.html",
                {"status": 404, "message": f"there is no conversation {conversation_id!r}"},
                status_code=404,
            )
        newest = newest_messages(conn, conversation_id=convo["id"], limit=THREAD_LIMIT + 1)
        events = opt_out_history(conn, conversation_id=convo["id"])
        edge = thread_edge(conn, conversation_id=convo["id"])
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
            **edge,
        },
    )
