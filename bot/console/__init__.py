"""The ops console: server-rendered pages under ``/console``, for signed-in users only.

How to add a page (the whole interface; everything lives in ``bot.console.web``)::

    # bot/console/conversations.py
    from fastapi import Request
    from fastapi.responses import HTMLResponse, RedirectResponse, Response
    from bot.console.web import PREFIX, AdminUser, ConsoleRouter, CurrentUser, engine, now, render

    router = ConsoleRouter(prefix=PREFIX)          # NOT a bare APIRouter: see below

    @router.get("/conversations", response_class=HTMLResponse)
    def conversations(request: Request, user: CurrentUser) -> Response:      # any signed-in user
        with engine(request).connect() as conn:
            rows = conversation_page(conn, filters=..., ...)   # from bot.console.queries.conversations
        return render(request, "conversations.html", {"rows": rows})

    @router.post("/opt-outs/add")
    def add_opt_out(request: Request, admin: AdminUser, ...) -> Response:   # admins only (viewers: 403)
        ...  # change data, audit(conn, actor=admin.name, action="opt_out.add", target=..., now=now(request))
        return RedirectResponse(PREFIX + "/opt-outs", status_code=303)      # post/redirect/get

then add the module's ``router`` to ``PAGES`` below.

- **Routers**: ``ConsoleRouter(prefix=PREFIX)``. Its route class reads the
  signed session cookie, checks the CSRF token on every POST/PUT/PATCH/DELETE
  (403 before your code runs), turns ``LoginRequired`` into a redirect to
  ``/console/login`` (pages) or a 401 JSON answer (``/console/api/*``, where
  login is checked before anything else), and ``Forbidden`` into a 403.
- **Who**: ``CurrentUser`` / ``AdminUser`` are ``Annotated`` dependencies
  (``current_user`` / ``require_admin``) giving a ``ConsoleUser`` (``id``,
  ``name``, ``role``, ``is_admin``). EVERY route takes one of them: without
  it a page is public. Anything that changes data takes ``AdminUser``.
- **Database and time**: ``engine(request)`` (write with
  ``engine(request).connect().execution_options(**WRITE_OPTIONS)`` from
  ``bot.store.db`` and ``conn.begin()``); ``now(request)``, the app's
  injectable clock. Write routes as plain ``def`` (FastAPI's thread pool).
- **SQL**: never in a route. A page's own queries live in
  ``bot/console/queries/<page>.py``: typed functions taking the connection
  and keyword arguments (the route owns the transaction). What several
  pages, the export or ``/metrics`` read (reply status sets, the contacts
  join, the number and time filters, the signature list) is in
  ``bot.store.queries``, so it is written once.
- **Phone numbers**: masked unless ``bot.console.display.wants_reveal``
  (an admin asking with ``?reveal=1``); printed by ``display.show_number``.
- **Audit**: ``bot.console.users.audit(conn, actor=user.name, action=...,
  target=..., detail={...}, now=...)`` in the transaction making the change.
- **Rendering**: ``render(request, "page.html", context, status_code=200)``
  with templates in ``bot/console/templates`` (autoescape on: never use
  ``|safe`` on stored text). The context always has ``user``,
  ``csrf_input``, ``csrf_token``, ``nav`` and ``current_path``; for a
  signed-in user also ``account_caps``, which ``base.html`` shows as a
  banner on every page while a Tencent account-wide cap is in force (one
  small query per page view).
- **Templates**: ``{% extends "base.html" %}`` and fill ``{% block title %}``,
  ``{% block content %}``, optionally ``{% block head %}`` (extra ``<style>``)
  and ``{% block scripts %}``. Every POST form contains ``{{ csrf_input }}``;
  ``fetch`` calls send the header ``X-CSRF-Token: {{ csrf_token }}``.
  The nav marks the entry whose path starts the URL; its links are in
  ``web.NAV``.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from bot.config import Settings
from bot.console import (
    account_caps,
    activity,
    conversations,
    dashboard,
    deliveries,
    events_page,
    explain,
    export_page,
    optouts,
    routes,
    rules_page,
    simulator,
    unmatched,
)
from bot.console.web import ConsoleConfig

PAGES: list[APIRouter] = [conversations.router, unmatched.router, dashboard.router]
"""Page routers, included before the login routes."""
PAGES += [optouts.router, deliveries.router, rules_page.router, simulator.router, export_page.router]
PAGES += [account_caps.router, events_page.router, activity.router, explain.router]


def install(app: FastAPI, settings: Settings) -> None:
    """Mount the console on ``app`` (called by ``create_app``); the session key is fixed here, once per app."""
    app.state.console = ConsoleConfig.from_settings(settings)
    for page in PAGES:
        app.include_router(page)
    app.include_router(routes.router)
