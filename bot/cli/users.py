"""``smsbot users``: console accounts, managed from the shell.

The shell is where the first admin comes from (the console has no sign-up page), and where a
locked-out admin gets back in. Each change runs in one write transaction beside a running server,
with ``actor="cli"`` in the audit trail. A password is never an argument (it would land in shell
history and ``ps``): it is asked for twice without echo, or read from standard input by scripts.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bot.cli.common import checked_engine, read_settings

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy import Connection

app = typer.Typer(help="Ops console accounts (viewer: read only; admin: may change data).", no_args_is_help=True)

PasswordStdinOpt = Annotated[
    bool, typer.Option("--password-stdin", help="read the password from standard input (first line) instead of asking")
]


def _read_password(from_stdin: bool) -> str:
    """The new password: one line of standard input, or asked twice without echo (a typo is caught, not stored)."""
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first: str = typer.prompt("Password", hide_input=True, default="", show_default=False)
    second: str = typer.prompt("Repeat the password", hide_input=True, default="", show_default=False)
    if first != second:
        typer.echo("smsbot: the two passwords differ; nothing changed", err=True)
        raise typer.Exit(1)
    return first


def _in_users_db(change: Callable[[Connection, datetime], object]) -> None:
    """Run ``change(conn, now)`` in one write transaction, turning refusals into a message and exit code 1."""
    from bot.console.users import UserError
    from bot.store.db import WRITE_OPTIONS

    engine = checked_engine(read_settings())
    try:
        with engine.connect().execution_options(**WRITE_OPTIONS) as conn, conn.begin():
            change(conn, datetime.now(UTC))
    except UserError as exc:
        typer.echo(f"smsbot: {exc}", err=True)
        raise typer.Exit(1) from exc
    finally:
        engine.dispose()


@app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="the name to sign in with")],
    role: Annotated[str, typer.Option("--role", help="viewer (read only) or admin")] = "viewer",
    password_stdin: PasswordStdinOpt = False,
) -> None:
    """Add a console user; the password is asked for (twice) or read from standard input."""
    from bot.console.users import UserError, add_user, check_name, check_password, check_role

    try:  # refuse a bad name or role before asking for a password
        check_name(name)
        check_role(role)
        password = check_password(_read_password(password_stdin))
    except UserError as exc:
        typer.echo(f"smsbot: {exc}", err=True)
        raise typer.Exit(1) from exc
    _in_users_db(lambda conn, now: add_user(conn, name, role, password, now=now, actor="cli"))
    typer.echo(f"user {name.strip()!r} added ({role})")


@app.command("list")
def users_list(as_json: Annotated[bool, typer.Option("--json", help="one JSON object per user")] = False) -> None:
    """List the console users, their roles, last login and whether they are locked out."""
    from bot.console.users import is_locked, list_users, locked_addresses

    found: list[Any] = []
    addresses: dict[int, list[str]] = {}

    def read(conn: Connection, now: datetime) -> None:
        found.extend(list_users(conn))
        addresses.update(locked_addresses(conn, now))

    _in_users_db(read)
    now = datetime.now(UTC)
    for row in found:
        last = row["last_login_at"].isoformat() if row["last_login_at"] else None
        locked = is_locked(row, now)
        sources = addresses.get(int(row["id"]), [])
        if as_json:
            document = {
                "name": row["name"],
                "role": row["role"],
                "created_at": row["created_at"].isoformat(),
                "last_login_at": last,
                "locked_until": row["locked_until"].isoformat() if locked else None,
                "failed_logins": row["failed_logins"],
                "locked_addresses": sources,
            }
            typer.echo(json.dumps(document, ensure_ascii=False))
        else:
            status = f"locked until {row['locked_until']:%Y-%m-%d %H:%M} UTC" if locked else ""
            if sources:
                status = f"{status}; " if status else ""
                status += f"locked out from {', '.join(sources)}"
            typer.echo(f"{row['name']}\t{row['role']}\tlast login {last or 'never'}\t{status}".rstrip())
    if not found and not as_json:
        typer.echo("no users yet: add one with 'smsbot users add NAME --role admin'", err=True)


@app.command("remove")
def users_remove(name: Annotated[str, typer.Argument(help="the user to remove")]) -> None:
    """Remove a console user (their sessions end at once; the audit trail keeps their name)."""
    from bot.console.users import remove_user

    _in_users_db(lambda conn, now: remove_user(conn, name, now=now, actor="cli"))
    typer.echo(f"user {name.strip()!r} removed")


@app.command("passwd")
def users_passwd(
    name: Annotated[str, typer.Argument(help="the user whose password to set")],
    password_stdin: PasswordStdinOpt = False,
) -> None:
    """Set a user's password (also unlocks the account; their other sessions end)."""
    from bot.console.users import UserError, check_password, require_user, set_password

    _in_users_db(lambda conn, _now: require_user(conn, name))  # before asking for a password
    try:
        password = check_password(_read_password(password_stdin))
    except UserError as exc:
        typer.echo(f"smsbot: {exc}", err=True)
        raise typer.Exit(1) from exc
    _in_users_db(lambda conn, now: set_password(conn, name, password, now=now, actor="cli"))
    typer.echo(f"password of {name.strip()!r} changed")
