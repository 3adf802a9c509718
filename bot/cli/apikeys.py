"""``smsbot apikeys``: keys for ``/api/v1`` (docs/api.md), managed from the shell.

A key is printed once, by ``add``; only its SHA-256 hash is stored. Each change is
audited with ``actor="cli"``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bot.cli.common import checked_engine, read_settings

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy import Connection

app = typer.Typer(help="API keys for /api/v1 (scopes: start, read, vars).", no_args_is_help=True)


def _in_db(change: Callable[[Connection, datetime], Any]) -> Any:
    """Run ``change(conn, now)`` in one write transaction; a refusal is one line on stderr and exit code 1."""
    from bot.api.keys import KeyError_
    from bot.store.db import WRITE_OPTIONS

    engine = checked_engine(read_settings())
    try:
        with engine.connect().execution_options(**WRITE_OPTIONS) as conn, conn.begin():
            return change(conn, datetime.now(UTC))
    except KeyError_ as exc:
        typer.echo(f"smsbot: {exc}", err=True)
        raise typer.Exit(1) from exc
    finally:
        engine.dispose()


@app.command("add")
def apikeys_add(
    name: Annotated[str, typer.Argument(help="a name for the key: who uses it (audit trail: api:NAME)")],
    scope: Annotated[
        str, typer.Option("--scope", help="comma-separated: start (POST), read (GET), vars (PUT vars)")
    ] = "start,read,vars",
) -> None:
    """Add an API key and print it (once: only its hash is stored)."""
    from bot.api.keys import KeyError_, add_key, check_scopes
    from bot.console.users import audit

    try:
        scopes = check_scopes(scope)
    except KeyError_ as exc:
        typer.echo(f"smsbot: {exc}", err=True)
        raise typer.Exit(1) from exc

    def add(conn: Connection, now: datetime) -> str:
        key = add_key(conn, name, scopes, now=now)
        audit(conn, actor="cli", action="apikey.add", target=f"apikey:{name}", detail={"scopes": scopes}, now=now)
        return key

    key: str = _in_db(add)
    typer.echo(key)
    typer.echo(
        f"API key {name!r} added ({', '.join(scopes)}); it is shown only now: send it as 'Authorization: Bearer <key>'",
        err=True,
    )


@app.command("list")
def apikeys_list(as_json: Annotated[bool, typer.Option("--json", help="one JSON object per key")] = False) -> None:
    """List the API keys: name, prefix, scopes, created, revoked, last used (never the keys themselves)."""
    from bot.api.keys import list_keys

    found = _in_db(lambda conn, _now: list_keys(conn))

    def when(value: datetime | None) -> str | None:
        return value.isoformat() if value is not None else None

    for row in found:
        if as_json:
            document = {
                "name": row["name"],
                "prefix": row["prefix"],
                "scopes": list(row["scopes"]),
                "created_at": when(row["created_at"]),
                "revoked_at": when(row["revoked_at"]),
                "last_used_at": when(row["last_used_at"]),
            }
            typer.echo(json.dumps(document, ensure_ascii=False))
        else:
            revoked = f"revoked {row['revoked_at']:%Y-%m-%d %H:%M} UTC" if row["revoked_at"] else "active"
            used = f"{row['last_used_at']:%Y-%m-%d %H:%M} UTC" if row["last_used_at"] else "never"
            typer.echo(
                f"{row['name']}\t{row['prefix']}...\t{','.join(row['scopes'])}\tcreated "
                f"{row['created_at']:%Y-%m-%d %H:%M} UTC\t{revoked}\tlast used {used}"
            )
    if not found and not as_json:
        typer.echo("no API keys yet: add one with 'smsbot apikeys add NAME'", err=True)


@app.command("revoke")
def apikeys_revoke(name: Annotated[str, typer.Argument(help="the key to revoke")]) -> None:
    """Revoke an API key: calls with it get 401 from now on (its name stays taken, for the audit trail)."""
    from bot.api.keys import revoke_key
    from bot.console.users import audit

    def revoke(conn: Connection, now: datetime) -> bool:
        changed = revoke_key(conn, name, now=now)
        if changed:
            audit(conn, actor="cli", action="apikey.revoke", target=f"apikey:{name}", now=now)
        return changed

    changed = _in_db(revoke)
    typer.echo(f"API key {name!r} revoked" if changed else f"API key {name!r} was already revoked")
