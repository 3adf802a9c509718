"""Login, logout, the home redirect, the users page and ``/console/api/me``.

The login answer is the same for an unknown name, a wrong password, a locked
address and a locked account, so the form cannot be used to find out which
names exist or whether a lock is in force.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from bot.console.users import (
    UNKNOWN_SOURCE,
    UserError,
    authenticate,
    is_locked,
    list_users,
    locked_addresses,
    password_fingerprint,
    session_user,
    unlock_user,
)
from bot.console.web import (
    PREFIX,
    AdminUser,
    ConsoleRouter,
    CurrentUser,
    console_config,
    engine,
    now,
    render,
    session,
)
from bot.store.db import WRITE_OPTIONS

router = ConsoleRouter(prefix=PREFIX)

LOGIN_REFUSED = "Wrong name or password, or the account is locked after too many failed attempts."


@router.get("/login", response_class=HTMLResponse, include_in_schema=False)
def login_form(request: Request) -> Response:
    return render(request, "login.html", {"error": None, "name": ""})


@router.post("/login", response_class=HTMLResponse, include_in_schema=False)
def login(request: Request, name: Annotated[str, Form()] = "", password: Annotated[str, Form()] = "") -> Response:
    config = console_config(request)
    at = now(request)
    # uvicorn has already put a trusted proxy's forwarded address here; an untrusted header never is.
    source = request.client.host if request.client is not None and request.client.host else UNKNOWN_SOURCE
    with engine(request).connect().execution_options(**WRITE_OPTIONS) as conn, conn.begin():
        user = authenticate(
            conn,
            name,
            password,
            now=at,
            source=source,
            max_failures=config.max_failed_logins,
            max_failures_account=config.max_failed_logins_account,
            lockout=timedelta(seconds=config.lockout_seconds),
        )
        found = session_user(conn, user.id) if user is not None else None
    if found is None:
        return render(request, "login.html", {"error": LOGIN_REFUSED, "name": name}, status_code=401)
    user, current_hash = found
    session(request).replace(
        {"uid": user.id, "at": at.timestamp(), "fp": password_fingerprint(current_hash, config.fingerprint_key)}
    )
    return RedirectResponse(PREFIX + "/", status_code=303)


@router.post("/logout", include_in_schema=False)
def logout(request: Request) -> Response:
    session(request).replace({})
    return RedirectResponse(PREFIX + "/login", status_code=303)


@router.get("/", include_in_schema=False)
def home(_user: CurrentUser) -> Response:
    return RedirectResponse(PREFIX + "/conversations", status_code=303)


@router.get("/users", response_class=HTMLResponse, include_in_schema=False)
def users_page(request: Request, _admin: AdminUser) -> Response:
    at = now(request)
    with engine(request).connect() as conn:
        rows = list_users(conn)
        addresses = locked_addresses(conn, at)
    people = [
        {**row, "locked": is_locked(row, at), "locked_addresses": addresses.get(int(row["id"]), [])} for row in rows
    ]
    return render(request, "users.html", {"people": people, "message": request.query_params.get("done")})


@router.post("/users/unlock", include_in_schema=False)
def users_unlock(request: Request, admin: AdminUser, name: Annotated[str, Form()]) -> Response:
    with engine(request).connect().execution_options(**WRITE_OPTIONS) as conn, conn.begin():
        try:
            unlock_user(conn, name, now=now(request), actor=admin.name)
        except UserError as exc:
            return render(request, "error.html", {"status": 404, "message": str(exc)}, status_code=404)
    return RedirectResponse(PREFIX + "/users?done=unlocked", status_code=303)


@router.get("/api/me", summary="The signed-in console user")
def api_me(user: CurrentUser) -> dict[str, str]:
    return {"name": user.name, "role": user.role}
