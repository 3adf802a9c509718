"""Small pieces the ops pages (opt-outs, deliveries) share: typed numbers, paging and the list context.

Kept apart from ``bot.console.web`` because they are policy, not machinery:
how a typed number is read and how the pages page through long lists. Who
may see a full number is ``bot.console.display.wants_reveal``, the same for
every page.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from fastapi import Request

from bot.console.display import show_number

PAGE_SIZE = 50
_DIGITS = re.compile(r"\D")


def number_shower(reveal: bool) -> Callable[[str, str], str]:
    """How a page prints ``(nationcode, mobile)``: ``+86 138****0000`` unless revealed."""

    def show(nationcode: str, mobile: str) -> str:
        return show_number(nationcode, mobile, reveal=reveal)

    return show


def digits(value: str) -> str:
    return _DIGITS.sub("", value)


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


MAX_PAGE = 1_000_000
"""Pages beyond this are this one: an offset of page x size must stay a number the database takes."""


def page_number(request: Request) -> int:
    raw = request.query_params.get("page", "1")
    if not (raw.isascii() and raw.isdigit()):  # "²" is a digit to str.isdigit, not to int()
        return 1
    return min(int(raw), MAX_PAGE) or 1


def query_without(request: Request, *names: str, **values: Any) -> str:
    """This page's query string with ``names`` dropped and ``values`` set (pagination and reveal links)."""
    params = {k: v for k, v in request.query_params.items() if k not in names and k not in values}
    params.update({k: str(v) for k, v in values.items() if v is not None})
    return urlencode(params)


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
