"""Database engines and the schema version check.

SQLite is the embedded default: WAL so readers never block the writer, a busy
timeout so a second process waits instead of failing, foreign keys on, and
``synchronous=NORMAL`` (durable across process crashes in WAL mode; a power cut
may lose the last transactions, which is the usual trade-off for an embedded
store). PostgreSQL is the scale-out store.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

SQLITE_BUSY_TIMEOUT_MS = 5000


def migrations_dir() -> Path:
    """The Alembic scripts, shipped inside the package so any working directory works."""
    return Path(str(resources.files("bot.migrations")))


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url`` with our SQLite settings applied to every connection."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        connect_args = kwargs.pop("connect_args", {})
        connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
        connect_args.setdefault("check_same_thread", False)
        engine = create_engine(url, connect_args=connect_args, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # Let SQLAlchemy own transactions: pysqlite's implicit BEGIN breaks SAVEPOINTs.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            # A 64 MiB page cache keeps the indexes of a busy database in memory (the default is 2 MiB).
            cursor.execute("PRAGMA cache_size=-65536")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # Writers ask for BEGIN IMMEDIATE (see ``writing``): it takes the write lock up
            # front, so two writers queue on the busy timeout instead of failing on a
            # read-to-write upgrade. Readers keep a plain deferred BEGIN.
            conn.exec_driver_sql(conn.get_execution_options().get("sqlite_begin", "BEGIN"))

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


WRITE_OPTIONS = {"sqlite_begin": "BEGIN IMMEDIATE"}
"""Execution options for a connection that will write: ``engine.connect().execution_options(**WRITE_OPTIONS)``."""


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str | None:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return script.get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to ``revision``."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


class SchemaOutOfDate(Exception):  # noqa: N818 - a state of the deployment, named as the user sees it
    """The database is not at the schema this version of smsbot needs."""


def check_schema(engine: Engine) -> None:
    """Raise SchemaOutOfDate naming the command to run when migrations are missing."""
    have, want = current_revision(engine), head_revision()
    if have != want:
        raise SchemaOutOfDate(
            f"the database schema is at {have or 'nothing'}, this smsbot needs {want}: run 'smsbot db upgrade'"
        )
