"""The ``smsbot`` command.

Thin on purpose: it reads settings, calls the rules package and prints. The
command names, flags and ``--json`` fields are an interface users script
against, so they only ever grow.
"""

from __future__ import annotations

import contextlib
import json
import sys
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bot.cli import rules, serving, templates
from bot.cli.common import (
    checked_engine,
    read_settings,
    safe_url,
    use_config,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy import Connection, Engine

    from bot.store.export import ExportFilter

app = typer.Typer(help="smsbot: a conversational SMS auto-responder for Tencent Cloud SMS.", no_args_is_help=True)


@app.callback()
def main(
    config: Annotated[
        Path | None,
        typer.Option("--config", help="config file (default: $SMSBOT_CONFIG, then ./config.yaml)"),
    ] = None,
) -> None:
    """smsbot: a conversational SMS auto-responder for Tencent Cloud SMS."""
    use_config(config)


app.command("simulate")(rules.simulate_command)
app.command("serve")(serving.serve)
app.command("pull")(serving.pull_command)
app.command("worker")(serving.worker_command)
app.add_typer(rules.app, name="rules")
app.add_typer(templates.app, name="templates")


db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="target revision")] = "head") -> None:
    """Apply the database migrations (creates the tables on a new database)."""
    from bot.store.db import upgrade

    settings = read_settings()
    upgrade(settings.database_url, revision)
    typer.echo(f"database at {revision}: {safe_url(settings.database_url)}")


users_app = typer.Typer(help="Ops console accounts (viewer: read only; admin: may change data).", no_args_is_help=True)
app.add_typer(users_app, name="users")

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


@users_app.command("add")
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


@users_app.command("list")
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


@users_app.command("remove")
def users_remove(name: Annotated[str, typer.Argument(help="the user to remove")]) -> None:
    """Remove a console user (their sessions end at once; the audit trail keeps their name)."""
    from bot.console.users import remove_user

    _in_users_db(lambda conn, now: remove_user(conn, name, now=now, actor="cli"))
    typer.echo(f"user {name.strip()!r} removed")


@users_app.command("passwd")
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


class _ExportFormat(StrEnum):
    csv = "csv"
    jsonl = "jsonl"


@app.command("export")
def export_command(
    since: Annotated[
        str, typer.Option("--since", help="first day (2026-01-01) or time (2026-01-01T08:00, UTC unless +08:00 given)")
    ],
    until: Annotated[str, typer.Option("--until", help="last day, included (2026-01-31), or a time, excluded")],
    fmt: Annotated[
        _ExportFormat, typer.Option("--format", help="csv (with a header line) or jsonl")
    ] = _ExportFormat.csv,
    signature: Annotated[str | None, typer.Option("--signature", help="only this signature's messages")] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="write to this file (replaced only once complete)")
    ] = None,
    reveal: Annotated[bool, typer.Option("--reveal", help="full phone numbers (default: 138****0000)")] = False,
) -> None:
    """Export messages in and out (rule, states, template, delivery status) as CSV or JSON lines.

    Oldest first, by the time each was stored. Without -o the export goes to
    standard output. With -o the file appears only once complete (written
    beside it, then renamed), readable by its owner only: it holds customers' messages.
    """
    from bot.store.export import BadDate, ExportFilter, parse_bound

    settings = read_settings()
    try:
        filters = ExportFilter(
            since=parse_bound(since), until=parse_bound(until, end=True), signature=signature, reveal=reveal
        )
    except BadDate as exc:
        typer.echo(f"smsbot export: {exc}", err=True)
        raise typer.Exit(2) from exc
    engine = checked_engine(settings)
    try:
        written = _export_to(engine, filters, fmt.value, output)
    except OSError as exc:
        typer.echo(f"smsbot export: cannot write {output}: {exc}", err=True)
        raise typer.Exit(1) from exc
    finally:
        engine.dispose()
    typer.echo(f"smsbot export: {written} message(s){f' written to {output}' if output else ''}", err=True)


def _export_to(engine: Engine, filters: ExportFilter, fmt: str, output: Path | None) -> int:
    """Stream the export to ``output`` (atomically) or stdout; a progress bar on stderr only if it is a terminal."""
    import os
    import tempfile

    from bot.store.export import count_rows, export_chunks

    written = 0
    bar: Any = None

    def progress(rows: int) -> None:
        nonlocal written
        written += rows
        if bar is not None:
            bar.update(rows)

    with contextlib.ExitStack() as stack:
        if sys.stderr.isatty():
            total = count_rows(engine, filters)
            bar = stack.enter_context(typer.progressbar(length=total, label="exporting", file=sys.stderr))
        chunks = export_chunks(engine, filters, "jsonl" if fmt == "jsonl" else "csv", progress=progress)
        if output is None:
            for chunk in chunks:
                sys.stdout.write(chunk)
            sys.stdout.flush()
            return written
        fd, temp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".partial")
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as file:
                for chunk in chunks:
                    file.write(chunk)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, output)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
    return written
