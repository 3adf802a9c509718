"""``smsbot db``: the schema, changed only when someone asks for it.

No other command migrates: the ones that use the database check its schema and exit 2 naming
``smsbot db upgrade`` (:func:`bot.cli.common.checked_engine`), so a new version of smsbot never
alters a production database just by being started.
"""

from __future__ import annotations

from typing import Annotated

import typer

from bot.cli.common import read_settings, safe_url

app = typer.Typer(help="Database schema.", no_args_is_help=True)


@app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="target revision")] = "head") -> None:
    """Apply the database migrations (creates the tables on a new database)."""
    from bot.store.db import upgrade

    settings = read_settings()
    upgrade(settings.database_url, revision)
    typer.echo(f"database at {revision}: {safe_url(settings.database_url)}")
