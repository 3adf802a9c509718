"""What more than one command group needs: settings, the checked database engine, refusing broken rules.

The point of sharing them is that a setting that cannot work and a database whose schema is out of
date end every command the same way: one line on stderr and exit code 2. ``--config`` is given before
the command's name, so the app's callback stores it here and the command reads the settings when it
needs them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from bot.config import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from sqlalchemy import Engine

    from bot.rules.diagnostics import Diagnostic

PathArg = Annotated[Path | None, typer.Argument(help="rule file or folder (default: rules_dir from settings)")]


class _State:
    config: Path | None = None


def use_config(path: Path | None) -> None:
    """Remember ``--config`` for the command that runs next (``None``: $SMSBOT_CONFIG, then ./config.yaml)."""
    _State.config = path


@contextlib.contextmanager
def config_errors() -> Iterator[None]:
    """A setting that cannot work ends the command with its message and exit code 2."""
    try:
        yield
    except ConfigError as exc:
        typer.echo(f"smsbot: {exc}", err=True)
        raise typer.Exit(2) from exc


def current_config() -> Path | None:
    """The ``--config`` this command was given (None: $SMSBOT_CONFIG, then ./config.yaml)."""
    return _State.config


def read_settings() -> Settings:
    with config_errors():
        return load_settings(_State.config)


def refuse_rule_errors(errors: Iterable[Diagnostic]) -> NoReturn:
    """Commands that need working rules print every error on stderr (stdout stays clean) and exit 1."""
    for diagnostic in sorted(errors):
        typer.echo(str(diagnostic), err=True)
    typer.echo("the rules have errors; fix them first (smsbot rules check)", err=True)
    raise typer.Exit(1)


def safe_url(url: str) -> str:
    """The database URL for printing: the password is hidden."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def checked_engine(settings: Settings) -> Engine:
    """The database engine, or exit 2 with one line: the schema is out of date (naming `smsbot db upgrade`),
    or the database cannot be opened or written (down, a read-only or full disk)."""
    from sqlalchemy.exc import DBAPIError

    from bot.store.db import WRITE_OPTIONS, SchemaOutOfDate, check_schema, make_engine

    engine = make_engine(settings.database_url)
    try:
        check_schema(engine)
        if engine.dialect.name == "sqlite":
            # Every long-running command writes: find a read-only file or disk now, not at the first callback.
            with engine.connect().execution_options(**WRITE_OPTIONS) as conn, conn.begin():
                pass
    except SchemaOutOfDate as exc:
        engine.dispose()
        typer.echo(f"smsbot: {exc}", err=True)
        raise typer.Exit(2) from exc
    except DBAPIError as exc:
        engine.dispose()
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else type(exc).__name__
        hint = (
            " (SQLite writes the database file and its -wal and -shm files beside it: the folder must be on a "
            "writable disk with free space)"
            if engine.dialect.name == "sqlite"
            else ""
        )
        typer.echo(f"smsbot: cannot use the database {safe_url(settings.database_url)}: {reason}{hint}", err=True)
        raise typer.Exit(2) from exc
    return engine
