"""Alembic migrations against the models, the schema check, and ``smsbot db upgrade`` / ``smsbot serve``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect
from typer.testing import CliRunner

from bot.cli import app as cli
from bot.store.db import (
    SchemaOutOfDate,
    alembic_config,
    check_schema,
    current_revision,
    head_revision,
    make_engine,
    upgrade,
)
from bot.store.models import Base
from tests.support import RULES

runner = CliRunner()


@pytest.fixture
def empty_engine(empty_db_url: str) -> Iterator[Engine]:
    eng = make_engine(empty_db_url)
    yield eng
    eng.dispose()


def differences(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))


# ---------------------------------------------------------------- models == migrations


def test_migrations_match_the_models(engine: Engine) -> None:
    assert differences(engine) == []


def test_migrated_schema_has_the_tables_constraints_and_indexes(engine: Engine) -> None:
    schema = inspect(engine)
    assert {"contacts", "conversations", "messages", "outbox", "opt_out_events", "alembic_version"} <= set(
        schema.get_table_names()
    )
    assert "uq_contacts_number" in {u["name"] for u in schema.get_unique_constraints("contacts")}
    indexes = {i["name"]: i for i in schema.get_indexes("messages")}
    # dedupe keys: a unique index over the inbound rows only (partial: outbound rows have none)
    assert indexes["uq_messages_dedupe_key"]["unique"]
    assert {
        "ix_messages_created_at",
        "ix_messages_conversation_id_created_at",
        "ix_messages_provider_serial",
        "ix_messages_failed_created_at",
    } <= set(indexes)
    assert "ix_outbox_next_attempt_at" in {i["name"] for i in schema.get_indexes("outbox")}


def test_empty_database_differs_from_the_models(empty_engine: Engine) -> None:
    """The comparison is not vacuous: before the migrations it sees every table missing."""
    added = {diff[1].name for diff in differences(empty_engine) if diff[0] == "add_table"}
    assert {"contacts", "conversations", "messages", "outbox", "opt_out_events"} <= added


def test_downgrade_to_nothing_and_upgrade_again(db_url: str, engine: Engine) -> None:
    command.downgrade(alembic_config(db_url), "base")
    assert current_revision(engine) is None
    assert "messages" not in inspect(engine).get_table_names()
    upgrade(db_url)
    assert current_revision(engine) == head_revision()
    assert differences(engine) == []


def test_upgrade_twice_is_harmless(db_url: str, engine: Engine) -> None:
    upgrade(db_url)
    check_schema(engine)


# ---------------------------------------------------------------- check_schema


def test_check_schema_names_the_command_on_an_empty_database(empty_engine: Engine) -> None:
    with pytest.raises(SchemaOutOfDate, match="smsbot db upgrade"):
        check_schema(empty_engine)


def test_check_schema_rejects_an_unknown_revision(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'fffffff'")
    with pytest.raises(SchemaOutOfDate, match="smsbot db upgrade"):
        check_schema(engine)


def test_check_schema_passes_after_upgrade(engine: Engine) -> None:
    check_schema(engine)


# ---------------------------------------------------------------- the commands


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """Run the commands from an empty folder (no config.yaml) with settings from the environment."""
    monkeypatch.chdir(tmp_path)
    return {"SMSBOT_RULES_DIR": str(RULES)}


@pytest.fixture
def uvicorn_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """Record uvicorn.run instead of starting a server."""
    calls: list[dict[str, Any]] = []

    def fake_run(app: Any, **kwargs: Any) -> None:
        calls.append({"app": app, **kwargs})

    monkeypatch.setattr("uvicorn.run", fake_run)
    yield calls
    for call in calls:
        call["app"].state.runtime.engine.dispose()


def test_cli_db_upgrade_creates_the_schema(empty_db_url: str, empty_engine: Engine, cli_env: dict[str, str]) -> None:
    result = runner.invoke(cli, ["db", "upgrade"], env=cli_env | {"SMSBOT_DATABASE_URL": empty_db_url})
    assert result.exit_code == 0, result.output
    assert "database at head" in result.stdout
    check_schema(empty_engine)
    assert differences(empty_engine) == []


def test_serve_refuses_an_out_of_date_schema(
    empty_db_url: str, cli_env: dict[str, str], uvicorn_calls: list[dict[str, Any]]
) -> None:
    result = runner.invoke(cli, ["serve"], env=cli_env | {"SMSBOT_DATABASE_URL": empty_db_url})
    assert result.exit_code != 0
    assert "smsbot db upgrade" in result.stderr
    assert uvicorn_calls == []


def test_serve_starts_on_an_upgraded_schema(
    db_url: str, cli_env: dict[str, str], uvicorn_calls: list[dict[str, Any]]
) -> None:
    result = runner.invoke(cli, ["serve", "--port", "8123"], env=cli_env | {"SMSBOT_DATABASE_URL": db_url})
    assert result.exit_code == 0, result.output
    [call] = uvicorn_calls
    assert (call["host"], call["port"]) == ("127.0.0.1", 8123)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::"])
def test_serve_refuses_a_public_address_without_a_token(
    db_url: str, cli_env: dict[str, str], uvicorn_calls: list[dict[str, Any]], host: str
) -> None:
    result = runner.invoke(cli, ["serve", "--host", host], env=cli_env | {"SMSBOT_DATABASE_URL": db_url})
    assert result.exit_code != 0
    assert "refusing" in result.stderr
    assert "SMSBOT_CALLBACK_TOKEN" in result.stderr
    assert "--insecure" in result.stderr
    assert uvicorn_calls == []


def test_serve_public_address_with_insecure(
    db_url: str, cli_env: dict[str, str], uvicorn_calls: list[dict[str, Any]]
) -> None:
    result = runner.invoke(
        cli, ["serve", "--host", "0.0.0.0", "--insecure"], env=cli_env | {"SMSBOT_DATABASE_URL": db_url}
    )
    assert result.exit_code == 0, result.output
    [call] = uvicorn_calls
    assert call["host"] == "0.0.0.0"


def test_serve_public_address_with_a_token(
    db_url: str, cli_env: dict[str, str], uvicorn_calls: list[dict[str, Any]]
) -> None:
    env = cli_env | {"SMSBOT_DATABASE_URL": db_url, "SMSBOT_CALLBACK_TOKEN": "s3cret"}
    result = runner.invoke(cli, ["serve", "--host", "0.0.0.0"], env=env)
    assert result.exit_code == 0, result.output
    [call] = uvicorn_calls
    assert call["host"] == "0.0.0.0"
    assert call["app"].state.runtime.settings.callback_token.get_secret_value() == "s3cret"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_serve_loopback_needs_no_token(
    db_url: str, cli_env: dict[str, str], uvicorn_calls: list[dict[str, Any]], host: str
) -> None:
    result = runner.invoke(cli, ["serve", "--host", host], env=cli_env | {"SMSBOT_DATABASE_URL": db_url})
    assert result.exit_code == 0, result.output
    assert [c["host"] for c in uvicorn_calls] == [host]


def test_serve_refuses_invalid_rules(
    db_url: str, cli_env: dict[str, str], uvicorn_calls: list[dict[str, Any]], tmp_path: Path
) -> None:
    broken = tmp_path / "broken-rules"
    broken.mkdir()
    (broken / "acme.yaml").write_text("signature: Acme Shop\nstates: [\n", encoding="utf-8")
    env = cli_env | {"SMSBOT_DATABASE_URL": db_url, "SMSBOT_RULES_DIR": str(broken)}
    result = runner.invoke(cli, ["serve"], env=env)
    assert result.exit_code != 0
    assert "acme.yaml:" in result.stderr
    assert uvicorn_calls == []
