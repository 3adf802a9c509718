"""Rules versions and staged rollout: stored versions, testers, promote, pin, refused candidates, the CLI.

Every test runs on SQLite and PostgreSQL (``db_url``). Two apps on one
database stand for two serving processes: each follows the control row on
its own timer, as every writer process, worker and HTTP process does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from bot.cli import app as cli
from bot.config import Settings
from bot.rules.loader import load_rules
from bot.rules.versions import rule_changes, texts_version
from bot.runtime.live_rules import RulesInvalid
from bot.runtime.rule_versions import stored_rules
from bot.store.models import audit_events, messages, rule_versions
from bot.store.rule_versions import read_control
from tests.support import Harness, copy_rules, serve_process, wait_until

runner = CliRunner()

MENU = "Reply 1 for order status, 2 for opening hours. Reply TD to opt out."
NEW_MENU = "Reply 1 for your order, 2 for our hours. Reply TD to opt out."
TESTER = "13900000001"
CUSTOMER = "13800000009"
BROKEN_TEST = """
  - name: a test the edit breaks
    say: [hi]
    expect: [{reply: status}]
"""


def edit_menu(rules_dir: Path, text: str = NEW_MENU) -> None:
    path = rules_dir / "acme-shop.yaml"
    source = path.read_text(encoding="utf-8")
    path.write_text(source.replace(MENU, text, 1), encoding="utf-8")


def add_failing_test(rules_dir: Path) -> None:
    path = rules_dir / "acme-shop.yaml"
    source = path.read_text(encoding="utf-8")
    assert "\ntests:\n" in source
    path.write_text(source.replace("\ntests:\n", "\ntests:" + BROKEN_TEST, 1), encoding="utf-8")


def last_reply(h: Harness, mobile: str) -> tuple[str, str | None]:
    """The text and rules version of the last reply to ``mobile`` (after it has gone out)."""
    h.wait_settled()
    with h.engine.connect() as conn:
        row = conn.execute(
            select(messages.c.text, messages.c.rules_version, messages.c.in_reply_to_id)
            .where(messages.c.direction == "out")
            .order_by(messages.c.id.desc())
            .limit(1)
        ).one()
        inbound_version = conn.execute(
            select(messages.c.rules_version).where(messages.c.id == row.in_reply_to_id)
        ).scalar_one()
    assert h.sender.sent[-1].mobile == mobile
    assert inbound_version == row.rules_version  # the inbound message is explained by the same version
    return row.text, row.rules_version


def staged(**extra: object) -> Settings:
    return Settings(rollout="staged", testers=[TESTER], **extra)  # type: ignore[arg-type]


@pytest.fixture
def staged_app(make_app: Callable[..., Harness], db_url: str) -> Harness:
    return make_app(db_url, settings=staged())


# ---------------------------------------------------------------- versions are stored


def test_the_version_hash_identifies_the_text_and_a_stored_version_compiles_back(rules_dir: Path) -> None:
    result = load_rules(rules_dir)
    assert result.ruleset is not None
    assert texts_version(result.texts) == result.ruleset.version
    edit_menu(rules_dir)
    changed = load_rules(rules_dir)
    assert changed.ruleset is not None
    assert changed.ruleset.version != result.ruleset.version
    assert texts_version(changed.texts) == changed.ruleset.version


def test_every_load_is_stored_once_with_its_text_host_and_check(harness: Harness, rules_dir: Path) -> None:
    first = harness.rules.ruleset
    assert first is not None
    harness.rules.load()  # the same text again: counted, not stored twice
    [row] = harness.rows(rule_versions)
    assert row["hash"] == first.version
    assert row["loads"] == 2
    assert row["ok"] is True
    assert row["check"]["tests"]["passed"] > 0
    assert row["check"]["tests"]["failed"] == 0
    assert "pid" in row["last_loaded_by"]
    assert row["files"]["acme-shop.yaml"] == (rules_dir / "acme-shop.yaml").read_text(encoding="utf-8")

    harness.say("hi")
    text, version = last_reply(harness, "13800000000")
    assert (text, version) == (MENU, first.version)
    with harness.engine.connect() as conn:
        assert stored_rules(conn, version).version == version  # any reply can be explained by its exact text


# ---------------------------------------------------------------- staged rollout


def test_a_staged_candidate_answers_testers_only_until_promote(staged_app: Harness, rules_dir: Path) -> None:
    h = staged_app
    live = h.rules.ruleset
    assert live is not None
    edit_menu(rules_dir)
    candidate = h.rules.load()

    status = h.client.get("/readyz").json()["rules"]
    assert status["live"]["version"] == live.version
    assert status["candidate"]["version"] == candidate.version
    assert status["pinned"] is None

    h.say("hi", mobile=TESTER)
    assert last_reply(h, TESTER) == (NEW_MENU, candidate.version)
    h.say("hi", mobile=CUSTOMER)
    assert last_reply(h, CUSTOMER) == (MENU, live.version)

    result = runner.invoke(cli, ["rules", "promote"], env=_cli_env(h, rules_dir))
    assert result.exit_code == 0, result.output
    assert f"promoted rules version #{status['candidate']['id']} {candidate.version}" in result.output
    h.rules.refresh()  # what the 2 s timer does
    # Everyone at once: the next messages of both numbers use the promoted version.
    h.say("MENU", mobile=CUSTOMER)
    assert last_reply(h, CUSTOMER) == (NEW_MENU, candidate.version)
    h.say("MENU", mobile=TESTER)
    assert last_reply(h, TESTER) == (NEW_MENU, candidate.version)
    status = h.client.get("/readyz").json()["rules"]
    assert status["live"]["version"] == candidate.version
    assert status["candidate"] is None

    again = runner.invoke(cli, ["rules", "promote"], env=_cli_env(h, rules_dir))
    assert again.exit_code == 1
    assert "no candidate" in again.output


def test_a_candidate_whose_own_tests_fail_is_refused_even_for_testers(staged_app: Harness, rules_dir: Path) -> None:
    h = staged_app
    live = h.rules.ruleset
    assert live is not None
    edit_menu(rules_dir)
    add_failing_test(rules_dir)
    with pytest.raises(RulesInvalid) as refused:
        h.rules.load()
    assert any("a test the edit breaks" in line for line in refused.value.errors)

    h.say("hi", mobile=TESTER)
    assert last_reply(h, TESTER) == (MENU, live.version)
    body = h.client.get("/readyz").json()
    assert body["status"] == "ok"  # the live version still answers
    assert body["rules"]["candidate"] is None
    assert body["rules"]["refused"]["version"] == texts_version(load_rules(rules_dir).texts)
    assert any("a test the edit breaks" in line for line in body["rules"]["refused"]["problems"])
    stored = {r["hash"]: r for r in h.rows(rule_versions)}
    bad = stored[body["rules"]["refused"]["version"]]
    assert bad["ok"] is False
    assert bad["check"]["tests"]["failed"] == 1

    # Nor can it be pinned.
    result = runner.invoke(cli, ["rules", "pin", str(bad["id"])], env=_cli_env(h, rules_dir))
    assert result.exit_code == 1
    assert "refused when it loaded" in result.output


def test_immediate_rollout_makes_a_new_version_live_for_everyone(harness: Harness, rules_dir: Path) -> None:
    edit_menu(rules_dir)
    new = harness.rules.load()
    harness.say("hi", mobile=CUSTOMER)
    assert last_reply(harness, CUSTOMER) == (NEW_MENU, new.version)
    with harness.engine.connect() as conn:
        control = read_control(conn)
    assert (control.live, control.candidate) == (new.version, None)


# ---------------------------------------------------------------- pin


def test_a_pin_serves_a_stored_version_after_the_files_changed_in_every_process(
    make_app: Callable[..., Harness], db_url: str, rules_dir: Path
) -> None:
    first = make_app(db_url)
    old = first.rules.ruleset
    assert old is not None
    edit_menu(rules_dir)
    first.rules.load()
    second = make_app(db_url)  # another server on the same database, started after the edit
    assert second.rules.ruleset is not None
    assert second.rules.ruleset.version != old.version

    with first.engine.connect() as conn:
        old_id = conn.execute(select(rule_versions.c.id).where(rule_versions.c.hash == old.version)).scalar_one()
    result = runner.invoke(cli, ["rules", "pin", old.version[:8]], env=_cli_env(first, rules_dir))
    assert result.exit_code == 0, result.output
    assert f"pinned rules version #{old_id} {old.version}" in result.output

    # Each process finds it on its own timer (every 2 s), from the stored text: the folder is untouched.
    for h in (first, second):
        wait_until(lambda h=h: h.rules.ruleset is not None and h.rules.ruleset.version == old.version, timeout=6)
    assert NEW_MENU in (rules_dir / "acme-shop.yaml").read_text(encoding="utf-8")
    second.say("hi", mobile=CUSTOMER)
    assert last_reply(second, CUSTOMER) == (MENU, old.version)
    assert second.client.get("/readyz").json()["rules"]["pinned"] == {"id": old_id, "version": old.version}

    # A further edit of the files does not undo the pin.
    edit_menu(rules_dir, NEW_MENU.replace("our hours", "opening times"))
    first.rules.load()
    first.say("hi", mobile=TESTER)
    assert last_reply(first, TESTER) == (MENU, old.version)

    result = runner.invoke(cli, ["rules", "unpin"], env=_cli_env(first, rules_dir))
    assert result.exit_code == 0, result.output
    wait_until(lambda: second.rules.ruleset is not None and second.rules.ruleset.version != old.version, timeout=6)
    actions = [r["action"] for r in first.rows(audit_events)]
    assert actions == ["rules.pin", "rules.unpin"]
    assert {r["actor"] for r in first.rows(audit_events)} == {"cli"}


# ---------------------------------------------------------------- the CLI


def _cli_env(h: Harness, rules_dir: Path) -> dict[str, str]:
    return {
        "SMSBOT_DATABASE_URL": h.engine.url.render_as_string(hide_password=False),
        "SMSBOT_RULES_DIR": str(rules_dir),
    }


def test_versions_lists_hash_host_check_and_markers(staged_app: Harness, rules_dir: Path) -> None:
    h = staged_app
    live = h.rules.ruleset
    assert live is not None
    edit_menu(rules_dir)
    candidate = h.rules.load()
    add_failing_test(rules_dir)
    with pytest.raises(RulesInvalid):
        h.rules.load()

    table = runner.invoke(cli, ["rules", "versions"], env=_cli_env(h, rules_dir))
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split()[:3] == ["id", "hash", "loaded"]
    by_hash = {line.split()[1]: line for line in lines[1:] if len(line.split()) > 1}
    assert by_hash[live.version].rstrip().endswith("live")
    assert by_hash[candidate.version].rstrip().endswith("candidate")
    assert "FAILING" in lines[1]
    assert lines[1].rstrip().endswith("REFUSED")

    listed = json.loads(runner.invoke(cli, ["rules", "versions", "--json"], env=_cli_env(h, rules_dir)).output)
    assert [v["markers"] for v in listed] == [[], ["candidate"], ["live"]]
    assert [v["ok"] for v in listed] == [False, True, True]
    assert listed[0]["check"]["tests"]["failed"] == 1


def test_diff_shows_live_against_the_files_per_rule_with_file_and_line(harness: Harness, rules_dir: Path) -> None:
    path = rules_dir / "acme-shop.yaml"
    source = path.read_text(encoding="utf-8")
    path.write_text(
        source.replace("[MENU, 菜单, HI, HELLO, 你好]", "[MENU, 菜单, HI, HELLO, 你好, HEY]", 1), encoding="utf-8"
    )
    line = next(n for n, text in enumerate(path.read_text().splitlines(), start=1) if "HEY]" in text)

    result = runner.invoke(cli, ["rules", "diff"], env=_cli_env(harness, rules_dir))
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.splitlines()[0].startswith(f"rules diff: #1 {harness.rules.ruleset.version} -> files")  # type: ignore[union-attr]
    assert "rules: 1 added, 1 removed, 0 changed" in out  # its keywords are its identity
    assert f"added    acme-shop.yaml:{line}: states.idle.on" in out
    assert "- " in out
    assert "@@ acme-shop.yaml:" in out
    assert "+       - keywords: [MENU, 菜单, HI, HELLO, 你好, HEY]" in out

    same = runner.invoke(cli, ["rules", "diff", "live", "1"], env=_cli_env(harness, rules_dir))
    assert same.exit_code == 0
    assert "no differences" in same.output
    unknown = runner.invoke(cli, ["rules", "diff", "abcdef99"], env=_cli_env(harness, rules_dir))
    assert unknown.exit_code == 1
    assert "no stored rules version" in unknown.output


def test_rule_changes_name_the_changed_rule_by_its_new_line() -> None:
    old = {"a.yaml": "states:\n  idle:\n    on:\n      - keywords: [HI]\n        reply: menu\n"}
    new = {"a.yaml": "# top\nstates:\n  idle:\n    on:\n      - keywords: [HI]\n        reply: other\n"}
    [change] = rule_changes(old, new)
    assert str(change) == 'changed  a.yaml:5: states.idle.on {"keywords": ["HI"]}'


# ---------------------------------------------------------------- real servers: smsbot serve, writer processes


@pytest.mark.slow
def test_promote_and_pin_reach_two_real_servers_with_writer_processes(db_url: str, tmp_path: Path) -> None:
    """Two ``smsbot serve`` (each with its writer process) on one database: the CLI's changes reach both."""
    rules_dir = copy_rules(tmp_path / "rules")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    env = {"SMSBOT_ROLLOUT": "staged", "SMSBOT_TESTERS": TESTER}
    with (
        serve_process(db_url, tmp_path / "a", rules=rules_dir, env=env) as one,
        serve_process(db_url, tmp_path / "b", rules=rules_dir, env=env) as two,
    ):
        live = one.ready().json()["rules"]["live"]
        assert two.ready().json()["rules"]["live"] == live
        edit_menu(rules_dir)
        for server in (one, two):
            wait_until(
                lambda s=server: s.ready().json()["rules"]["candidate"], timeout=15, what="the candidate in /readyz"
            )
        candidate = one.ready().json()["rules"]["candidate"]
        cli_env = {"SMSBOT_DATABASE_URL": db_url, "SMSBOT_RULES_DIR": str(rules_dir)}

        result = runner.invoke(cli, ["rules", "promote"], env=cli_env)
        assert result.exit_code == 0, result.output
        for server in (one, two):
            wait_until(lambda s=server: s.ready().json()["rules"]["live"] == candidate, timeout=6, what="the promote")
        two.say("hi", mobile=CUSTOMER)
        # Either server's delivery loop may send it (they share the outbox).
        wait_until(lambda: one.printed(NEW_MENU) + two.printed(NEW_MENU) == 1, what="the promoted menu")

        result = runner.invoke(cli, ["rules", "pin", str(live["id"])], env=cli_env)
        assert result.exit_code == 0, result.output
        for server in (one, two):
            wait_until(lambda s=server: s.ready().json()["rules"]["pinned"] == live, timeout=6, what="the pin")
        assert one.ready().json()["rules"]["version"] == live["version"]
        one.say("MENU", mobile=CUSTOMER)
        wait_until(lambda: one.printed(MENU) + two.printed(MENU) == 1, what="the pinned (old) menu")
