"""Small pieces the ops pages (opt-outs, deliveries, simulator, export) share.

Kept apart from ``bot.console.web`` because they are policy, not machinery:
how a typed number is matched, and how the pages page through long lists.
Who may see a full number is ``bot.console.display.wants_reveal``, the same
for every page.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from fastapi import Request
from sqlalchemy import ColumnElement, Connection, and_, select

from bot.console.display import show_number
from bot.store.models import contacts, conversations

PAGE_SIZE = 50
_DIGITS = re.compile(r"\D")


def number_shower(reveal: bool) -> Callable[[str, str], str]:
    """How a page prints ``(nationcode, mobile)``: ``+86 138****0000`` unless revealed."""

    def show(nationcode: str, mobile: str) -> str:
        return show_number(nationcode, mobile, reveal=reveal)

    return show


def digits(value: str) -> str:
    return _DIGITS.sub("", value)


def number_filter(value: str) -> ColumnElement[bool] | None:
    """The contacts matching what someone typed: the last 4 digits, a full number, or +nationcode+number.

    Four digits or fewer is a suffix search (what the masked form shows);
    more is an exact number, with or without its country code in front,
    so a number copied from anywhere finds its contact.
    """
    wanted = digits(value)
    if not wanted:
        return None
    if len(wanted) <= 4:
        return contacts.c.mobile.endswith(wanted, autoescape=True)
    return (contacts.c.mobile == wanted) | ((contacts.c.nationcode + contacts.c.mobile) == wanted)


def known_signatures(conn: Connection, extra: list[str] | None = None) -> list[str]:
    """Signatures to offer in a filter: those with conversations, plus ``extra`` (e.g. the rule files')."""
    found = {str(s) for s in conn.execute(select(conversations.c.signature).distinct()).scalars()}
    found.update(s for s in (extra or []) if s and s != "*")
    return sorted(found)


@dataclass(frozen=True)
class Page:
    """Which slice of a long list is shown, and the links around it."""

    number: int
    total: int
    size: int = PAGE_SIZE

    @property
    def offset(self) -> int:
        return (self.number - 1) * self.size

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.size))

    @property
    def has_prev(self) -> bool:
        return self.number > 1

    @property
    def has_next(self) -> bool:
        return self.number < self.pages


def page_number(request: Request) -> int:
    raw = request.query_params.get("page", "1")
    return int(raw) if raw.isdigit() and int(raw) > 0 else 1


def query_without(request: Request, *names: str, **values: Any) -> str:
    """This page's query string with ``names`` dropped and ``values`` set (pagination and reveal links)."""
    params = {k: v for k, v in request.query_params.items() if k not in names and k not in values}
    params.update({k: str(v) for k, v in values.items() if v is not None})
    return urlencode(params)


def all_of(*conditions: ColumnElement[bool] | None) -> ColumnElement[bool] | None:
    present = [c for c in conditions if c is not None]
    if not present:
        return None
    return and_(*present)


def listing_context(request: Request, page: Page, reveal: bool, done: Mapping[str, str]) -> dict[str, Any]:
    """What every paged, maskable list page (opt-outs, deliveries) hands its template besides its rows."""
    return {
        "page": page,
        "reveal": reveal,
        "show": number_shower(reveal),
        "done": done.get(request.query_params.get("done", "")),
        "prev_query": query_without(request, page=page.number - 1),
        "next_query": query_without(request, page=page.number + 1),
        "reveal_query": query_without(request, "page", reveal=None if reveal else "1"),
    }
