"""``smsbot start``, ``smsbot contacts import`` and ``smsbot apikeys``, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import Result
from sqlalchemy import Engine
from typer.testing import CliRunner

from bot.cli import app
from bot.outreach.check import StartRefused
from bot.outreach.numbers import parse_number
from bot.store.models import api_keys, audit_events, conversations, messages, outbox
from tests.api.helpers import SIGN, api_rules
from tests.support import count, rows

runner = CliRunner()


@pytest.fixture
def cli_env(db_url: str, tmp_path: Path) -> dict[str, str]:
    return {"SMSBOT_DATABASE_URL": db_url, "SMSBOT_RULES_DIR": str(api_rules(tmp_path / "rules"))}


def smsbot(env: dict[str, str], *args: str) -> Result:
    return runner.invoke(app, list(args), env=env)


def test_numbers_are_read_with_their_country_code() -> None:
    assert parse_number("+8613800138000") == ("86", "13800138000")
    assert parse_number("13800138000") == ("86", "13800138000")
    assert parse_number("+852 9123 4567") == ("852", "91234567")
    assert parse_number("0065 9123 4567") == ("65", "91234567")
    with pytest.raises(StartRefused):
        parse_number("hello")


def test_start_numbers(cli_env: dict[str, str], engine: Engine) -> None:
    result = smsbot(
        cli_env,
        *("start", "--sign", SIGN, "--template", "remind", "--state", "reminder"),
        *("--var", "appointment_id=C3", "--param", "{{ vars.appointment_id }}", "--param", "9:30"),
        *("+8613800138001", "13800138002"),
    )
    assert result.exit_code == 0, result.output
    assert "queued: 2" in result.output
    out = rows(engine, messages)
    assert [m["text"] for m in out] == ["Appointment C3 at 9:30. Reply 1 to confirm."] * 2
    assert {m["started_by"] for m in out} == {"cli"}
    assert count(engine, outbox) == 2
    assert [c["state"] for c in rows(engine, conversations)] == ["reminder", "reminder"]
    assert rows(engine, audit_events)[-1]["actor"] == "cli"


def test_start_refuses_a_bad_template_before_anything(cli_env: dict[str, str], engine: Engine) -> None:
    result = smsbot(cli_env, "start", "--sign", SIGN, "--template", "nope", "13800138001")
    assert result.exit_code == 2
    assert "--template" in result.output
    assert count(engine, messages) == 0


def test_start_csv_dry_run_and_line_numbered_rejects(cli_env: dict[str, str], engine: Engine, tmp_path: Path) -> None:
    csv_file = tmp_path / "people.csv"
    csv_file.write_text(
        "nationcode,mobile,appointment_id\n86,13800138001,A1\n86,12x,A2\n\n86,13800138003,\n86,13800138004,A4\n",
        encoding="utf-8",
    )
    args = ("start", "--sign", SIGN, "--template", "remind", "--state", "reminder", "--csv", str(csv_file))
    args += ("--param", "{{ vars.appointment_id }}", "--param", "10:00")
    dry = smsbot(cli_env, *args, "--dry-run")
    assert dry.exit_code == 1, dry.output  # some rows were rejected
    assert "would queue: 2" in dry.output
    assert "line 3: mobile:" in dry.output
    assert "line 5: params[0]: undefined value" in dry.output
    assert "would send line 2: Appointment A1 at 10:00." in dry.output
    assert count(engine, messages) == 0
    assert count(engine, conversations) == 0
    real = smsbot(cli_env, *args)
    assert "queued: 2" in real.output
    assert count(engine, outbox) == 2


def test_contacts_import_is_all_or_nothing(cli_env: dict[str, str], engine: Engine, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("nationcode,mobile,order_id\n86,13800138001,A1\n86,nope,A2\n", encoding="utf-8")
    result = smsbot(cli_env, "contacts", "import", str(bad), "--sign", SIGN)
    assert result.exit_code == 1
    assert "line 3: mobile:" in result.output
    assert count(engine, conversations) == 0
    good = tmp_path / "good.csv"
    good.write_text("nationcode,mobile,order_id\n86,13800138001,A1\n+86,13800138002,A2\n", encoding="utf-8")
    result = smsbot(cli_env, "contacts", "import", str(good), "--sign", SIGN)
    assert result.exit_code == 0, result.output
    assert "imported 2 row(s): 2 new" in result.output
    assert sorted(c["variables"]["order_id"] for c in rows(engine, conversations)) == ["A1", "A2"]
    assert count(engine, messages) == 0


def test_apikeys_add_list_revoke(cli_env: dict[str, str], engine: Engine) -> None:
    added = smsbot(cli_env, "apikeys", "add", "crm", "--scope", "start,read")
    assert added.exit_code == 0, added.output
    key = added.stdout.splitlines()[0]
    assert key.startswith("smsbot_")
    (stored,) = rows(engine, api_keys)
    assert stored["key_hash"] != key
    assert key not in json.dumps([dict(r) for r in rows(engine, api_keys)], default=str)
    assert stored["scopes"] == ["start", "read"]
    listed = smsbot(cli_env, "apikeys", "list", "--json")
    document = json.loads(listed.stdout.splitlines()[0])
    assert document["name"] == "crm"
    assert document["prefix"] == key[:12]
    assert document["revoked_at"] is None
    assert smsbot(cli_env, "apikeys", "add", "crm").exit_code == 1
    assert smsbot(cli_env, "apikeys", "add", "x", "--scope", "everything").exit_code == 1
    assert smsbot(cli_env, "apikeys", "revoke", "crm").exit_code == 0
    assert rows(engine, api_keys)[0]["revoked_at"] is not None
    assert "revoked" in smsbot(cli_env, "apikeys", "list").stdout
    assert smsbot(cli_env, "apikeys", "revoke", "nobody").exit_code == 1
