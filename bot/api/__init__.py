"""The HTTP API for the business's own systems: ``/api/v1`` (start conversations, read them, merge vars).

``routes.py`` holds the routes and their one error shape, ``keys.py`` the API
keys (``smsbot apikeys``), ``models.py`` the bodies and answers (the OpenAPI
schemas), ``queries.py`` the API's own SQL. The work itself is ``bot/outreach``'s.
Documented for people in docs/api.md.
"""

from __future__ import annotations

from fastapi import FastAPI

from bot.api.routes import router


def install(app: FastAPI) -> None:
    """Mount ``/api/v1`` on ``app`` (called by ``create_app``, after the callbacks, before the console)."""
    app.include_router(router)
