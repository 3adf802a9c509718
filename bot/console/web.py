"""The console's web machinery: sessions, CSRF, login checks and rendering.

Everything here is scoped to routes built with ``ConsoleRouter``: the session
cookie is read and written, and CSRF checked, by the route class, not by an
app-wide middleware, so Tencent's callbacks on ``/sms/*`` never pay for it.
See ``bot/console/__init__.py`` for how pages use it.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from itsdangerous import BadSignature, URLSafeSerializer
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from bot.config import Settings
from bot.console.display import DISPLAY_TZ_LABEL, fmt_time, opt_out_source
from bot.console.users import ConsoleUser, password_fingerprint, session_user
from bot.rules.normalize import unstorable
from bot.store.queries import account_caps

if TYPE_CHECKING:
    from bot.runtime.hosting import Runtime

log = logging.getLogger("smsbot.console")

PREFIX = "/console"
API_PREFIX = PREFIX + "/api"
COOKIE = "smsbot_console"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
_UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")

NAV: tuple[tuple[str, str], ...] = (
    ("Conversations", PREFIX + "/conversations"),
    ("Unmatched", PREFIX + "/unmatched"),
    ("Opt-outs", PREFIX + "/opt-outs"),
    ("Deliveries", PREFIX + "/deliveries"),
    ("Events", PREFIX + "/events"),
    ("Rules", PREFIX + "/rules"),
    ("Simulator", PREFIX + "/simulator"),
    ("Dashboard", PREFIX + "/dashboard"),
    ("Export", PREFIX + "/export"),
)
"""The base layout's navigation: (label, path); the entry whose path starts the URL is marked current."""

templates = Environment(
    loader=FileSystemLoader(Path(__file__).resolve().parent / "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)
"""The console's Jinja2 environment: autoescaping is on for every template, so customer text is always escaped."""
templates.filters["opt_out_source"] = opt_out_source


class LoginRequired(Exception):  # noqa: N818 - named for the answer it becomes
    """No valid session: pages redirect to the login form, the API answers 401."""


class Forbidden(Exception):  # noqa: N818 - named for the answer it becomes
    """Signed in, but not allowed (a viewer on an admin action, a bad CSRF token): 403 with the message."""


@dataclass
class ConsoleConfig:
    """What the console needs from the settings, fixed when the app is built."""

    signer: URLSafeSerializer
    fingerprint_key: bytes
    max_failed_logins: int
    max_failed_logins_account: int
    lockout_seconds: float
    session_max_age_seconds: float

    @classmethod
    def from_settings(cls, settings: Settings) -> ConsoleConfig:
        if settings.console_secret is not None and settings.console_secret.get_secret_value():
            secret = settings.console_secret.get_secret_value()
        else:
            secret = secrets.token_urlsafe(32)
            log.warning(
                "SMSBOT_CONSOLE_SECRET is not set: console sessions are signed with a random key "
                "and end when the server restarts"
            )
        return cls(
            signer=URLSafeSerializer(secret, salt="smsbot-console-session"),
            fingerprint_key=(secret + ":password").encode(),
            max_failed_logins=settings.console_max_failed_logins,
            max_failed_logins_account=settings.console_max_failed_logins_account,
            lockout_seconds=settings.console_lockout.total_seconds(),
            session_max_age_seconds=settings.console_session_max_age.total_seconds(),
        )


@dataclass
class Session:
    """The signed cookie's contents: a CSRF token always, a user id and login time once signed in."""

    data: dict[str, Any] = field(default_factory=dict)
    changed: bool = False

    @property
    def csrf_token(self) -> str:
        token = self.data.get("csrf")
        if not isinstance(token, str):
            token = secrets.token_urlsafe(32)
            self.data["csrf"] = token
            self.changed = True
        return token

    def replace(self, data: dict[str, Any]) -> None:
        """Start afresh (login, logout): a new CSRF token, so one seen before login is worthless after."""
        self.data = {**data, "csrf": secrets.token_urlsafe(32)}
        self.changed = True


def runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


def engine(request: Request) -> Engine:
    """The app's database engine; console routes are sync (``def``), so FastAPI runs them on its thread pool."""
    return runtime(request).engine


def now(request: Request) -> datetime:
    """The app's clock (injectable in tests): use it, never ``datetime.now``."""
    return runtime(request).clock()


def console_config(request: Request) -> ConsoleConfig:
    config: ConsoleConfig = request.app.state.console
    return config


def session(request: Request) -> Session:
    """This request's session (read from the cookie by ``ConsoleRoute``)."""
    found = getattr(request.state, "console_session", None)
    if found is None:
        found = _read_session(request)
        request.state.console_session = found
    result: Session = found
    return result


def _read_session(request: Request) -> Session:
    raw = request.cookies.get(COOKIE)
    if not raw:
        return Session()
    try:
        data = console_config(request).signer.loads(raw)
    except BadSignature:
        return Session()
    return Session(data=data) if isinstance(data, dict) else Session()


def current_user(request: Request) -> ConsoleUser:
    """The signed-in user; raises ``LoginRequired`` (redirect or 401) otherwise.

    The user is read from the database on every request, so a removed user,
    a changed role or a new password takes effect at once.
    """
    cached = getattr(request.state, "console_user", None)
    if cached is not None:
        user: ConsoleUser = cached
        return user
    data = session(request).data
    user_id, logged_in_at, fingerprint = data.get("uid"), data.get("at"), data.get("fp")
    if not isinstance(user_id, int) or not isinstance(logged_in_at, int | float) or not isinstance(fingerprint, str):
        raise LoginRequired
    config = console_config(request)
    age = now(request).timestamp() - logged_in_at
    if age < 0 or age > config.session_max_age_seconds:
        raise LoginRequired
    with engine(request).connect() as conn:
        found = session_user(conn, user_id)
    if found is None:
        raise LoginRequired
    user, password_hash = found
    if not hmac.compare_digest(password_fingerprint(password_hash, config.fingerprint_key), fingerprint):
        raise LoginRequired
    request.state.console_user = user
    return user


def require_admin(user: Annotated[ConsoleUser, Depends(current_user)]) -> ConsoleUser:
    """The signed-in user if an admin; a viewer gets 403. Use it on everything that changes data."""
    if not user.is_admin:
        raise Forbidden("only an admin can do this; you are signed in as a viewer")
    return user


CurrentUser = Annotated[ConsoleUser, Depends(current_user)]
AdminUser = Annotated[ConsoleUser, Depends(require_admin)]


def csrf_input(request: Request) -> Markup:
    """The hidden form field every console POST form must contain: ``{{ csrf_input }}`` in templates."""
    return Markup('<input type="hidden" name="{}" value="{}">').format(CSRF_FIELD, session(request).csrf_token)


def account_cap_banner(request: Request) -> list[dict[str, str]]:
    """The account-wide caps in force, as the base layout's banner shows them (one small query).

    Every page asks, because while a cap holds, every reply it covers expires
    unsent whatever page ops are looking at. A database that cannot answer
    leaves the banner out rather than failing the page (the page's own
    query says so if it matters); the failure is logged.
    """
    try:
        with engine(request).connect() as conn:
            caps = account_caps(conn, active_at=now(request))
    except SQLAlchemyError as exc:
        log.warning("console: account caps not readable for the banner: %s", exc)
        return []
    return [
        {
            "code": cap.code,
            "nationcode": cap.nationcode,
            "country": f"+{cap.nationcode}" if cap.nationcode else "every number",
            "until": fmt_time(cap.until, seconds=False),
            "since": fmt_time(cap.created_at, seconds=False),
            "message": cap.message or "",
        }
        for cap in caps
    ]


def render(
    request: Request,
    template: str,
    context: dict[str, Any] | None = None,
    *,
    status_code: int = 200,
    banner: bool = True,
) -> HTMLResponse:
    """A console page from ``bot/console/templates``, with what the base layout needs added to ``context``.

    Added: ``request``, ``user`` (None when signed out), ``csrf_token``,
    ``csrf_input`` (the hidden field), ``nav``, ``current_path``, and for a
    signed-in user ``account_caps`` (``account_cap_banner``), and ``display_tz_label``.
    ``banner=False`` skips the caps' query: for answers rendered on the event
    loop (``ConsoleRoute``'s refusals), where a query would block it.
    """
    user = getattr(request.state, "console_user", None)
    values: dict[str, Any] = {
        "request": request,
        "user": user,
        "csrf_token": session(request).csrf_token,
        "csrf_input": csrf_input(request),
        "nav": NAV,
        "current_path": request.url.path,
        "account_caps": account_cap_banner(request) if user is not None and banner else [],
        "display_tz_label": DISPLAY_TZ_LABEL,
        **(context or {}),
    }
    return HTMLResponse(templates.get_template(template).render(values), status_code=status_code)


def _is_api(request: Request) -> bool:
    return request.url.path == API_PREFIX or request.url.path.startswith(API_PREFIX + "/")


def _wants_json(request: Request) -> bool:
    return _is_api(request) or "application/json" in request.headers.get("accept", "")


def _refusal(request: Request, status_code: int, message: str) -> Response:
    if _wants_json(request):
        return JSONResponse({"detail": message}, status_code=status_code)
    return render(
        request, "error.html", {"status": status_code, "message": message}, status_code=status_code, banner=False
    )


async def _check_csrf(request: Request) -> bool:
    expected = session(request).data.get("csrf")
    if not isinstance(expected, str):
        return False
    given = request.headers.get(CSRF_HEADER)
    if given is None and request.headers.get("content-type", "").startswith(_FORM_TYPES):
        value = (await request.form()).get(CSRF_FIELD)  # cached: the route's Form(...) parameters reuse it
        given = value if isinstance(value, str) else None
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def _write_session(request: Request, response: Response) -> None:
    state = session(request)
    if not state.changed:
        return
    response.set_cookie(
        COOKIE,
        console_config(request).signer.dumps(state.data),
        path=PREFIX,
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
    )


async def _signed_in(request: Request) -> bool:
    try:
        await run_in_threadpool(current_user, request)
    except LoginRequired:
        return False
    return True


_DB_INT = 2**63
"""Integers a database column holds (BIGINT, SQLite's INTEGER): an id beyond them names nothing."""


async def _unstorable_input(request: Request, integers: frozenset[str] = frozenset()) -> str | None:
    """Why a value in the URL or the form can be neither stored nor looked up (NUL, half a character), or None.

    PostgreSQL refuses such text even in a WHERE clause, so a filter or form
    holding one would otherwise end as a 500.
    """
    values: list[tuple[str, str]] = [(k, v) for k, v in request.path_params.items() if isinstance(v, str)]
    values += list(request.query_params.multi_items())
    if request.method in _UNSAFE_METHODS and request.headers.get("content-type", "").startswith(_FORM_TYPES):
        values += [(k, v) for k, v in (await request.form()).multi_items() if isinstance(v, str)]
    for name, value in values:
        problem = unstorable(value) or unstorable(name)
        if problem is None and name in integers and _out_of_range(value):
            problem = "is not a number this console knows (out of range)"
        if problem is not None:
            return f"the field {name!r} {problem}"
    return None


def _out_of_range(value: str) -> bool:
    try:
        return not -_DB_INT <= int(value) < _DB_INT
    except ValueError:
        return False  # not a number at all: FastAPI's own validation says so


class ConsoleRoute(APIRoute):
    """Wraps every console route: CSRF on unsafe methods, login/permission refusals, the session cookie."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        fields = [*self.dependant.path_params, *self.dependant.query_params, *self.dependant.body_params]
        integers = frozenset(f.alias for f in fields if f.field_info.annotation in (int, int | None))

        async def console_handler(request: Request) -> Response:
            if _is_api(request) and not await _signed_in(request):
                response: Response = JSONResponse({"detail": "sign in first (POST /console/login)"}, status_code=401)
            elif request.method in _UNSAFE_METHODS and not await _check_csrf(request):
                response = _refusal(
                    request,
                    403,
                    "the form's security token (CSRF) is missing or out of date: reload the page and try again",
                )
            elif (problem := await _unstorable_input(request, integers)) is not None:
                response = _refusal(request, 400, problem)
            else:
                try:
                    response = await handler(request)
                except LoginRequired:
                    if _is_api(request):
                        response = JSONResponse({"detail": "sign in first (POST /console/login)"}, status_code=401)
                    else:
                        response = RedirectResponse(PREFIX + "/login", status_code=303)
                except Forbidden as exc:
                    response = _refusal(request, 403, str(exc))
            _write_session(request, response)
            response.headers.setdefault("Cache-Control", "no-store")
            response.headers.setdefault("X-Frame-Options", "DENY")
            response.headers.setdefault("X-Content-Type-Options", "nosniff")
            response.headers.setdefault("Referrer-Policy", "same-origin")
            return response

        return console_handler


class ConsoleRouter(APIRouter):
    """An ``APIRouter`` whose routes get the session, the CSRF check and login handling (``ConsoleRoute``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**{**kwargs, "route_class": ConsoleRoute})
