"""Stand-in pages for the navigation until the real ones land.

Each page author deletes their entry from ``PENDING`` when their router is
added to ``PAGES`` in ``bot/console/__init__.py`` (the real route is found
first anyway, because pages are included before this router).
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import HTMLResponse, Response

from bot.console.web import PREFIX, ConsoleRouter, CurrentUser, render

router = ConsoleRouter(prefix=PREFIX)

PENDING = {"conversations": "Conversations"}


@router.get("/conversations", response_class=HTMLResponse, include_in_schema=False)
def conversations_placeholder(request: Request, _user: CurrentUser) -> Response:
    return render(request, "placeholder.html", {"title": PENDING["conversations"]})
