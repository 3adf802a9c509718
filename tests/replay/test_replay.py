"""Replay: a seeded history (real messages through ``handle_batch`` with the example rules) replayed with
edited rules; the counts are exact per (old rule, new rule, state), unchanged messages are not counted,
examples are masked. On SQLite and PostgreSQL; the comparison itself without a database."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine

from bot.replay import Happened, Replayed, ReplayReport, ReplyView, compare, replay
from bot.rules.loader import load_rules
from bot.rules.model import Ruleset
from bot.rules.versions import texts_version
from bot.store.rule_versions import record_version
from tests.support import RULES, copy_rules, ingest_history, write_rules, writing

T0 = datetime(2026, 3, 2, 2, 0, tzinfo=UTC)
ACME = (RULES / "acme-shop.yaml").read_text(encoding="utf-8")
HOURS_LINE = next(i for i, line in enumerate(ACME.splitlines(), 1) if '["9:00", "18:00"]' in line) - 2
CODE_LINE = next(i for i, line in enumerate(ACME.splitlines(), 1) if 'keywords: ["3", CODE]' in line)
RECEIPT_LINE = next(i for i, line in enumerate(ACME.splitlines(), 1) if "(?P<code>" in line)
OTHERWISE_LINE = next(i for i, line in enumerate(ACME.splitlines(), 1) if line.startswith("otherwise:"))


def rules_a(tmp_path: Path) -> Ruleset:
    result = load_rules(copy_rules(tmp_path / "a"))
    assert result.ruleset is not None
    return result.ruleset


def rules_b(tmp_path: Path) -> Ruleset:
    """Menu "2" answers with other opening hours; menu "3" asks for the code but stays in idle."""
    edited = ACME.replace('params: ["9:00", "18:00"]', 'params: ["8:00", "20:00"]')
    edited = edited.replace(
        "        reply: ask_code\n        goto: code\n", "        reply: ask_code\n        goto: idle\n"
    )
    assert '"8:00", "20:00"' in edited
    assert edited.count("goto: code") == ACME.count("goto: code") - 1
    folder = copy_rules(tmp_path / "b", "default.yaml")
    write_rules(folder, "acme-shop.yaml", edited)
    result = load_rules(folder)
    assert result.ruleset is not None, [str(d) for d in result.errors]
    return result.ruleset


def history(start: datetime) -> list[tuple[str, str, datetime]]:
    said = [
        ("13800000001", "hi"),
        ("13800000001", "2"),  # changes: other hours
        ("13800000002", "hi"),
        ("13800000002", "3"),  # changes: state code -> idle (same reply)
        ("13800000002", "123456"),  # changes: thanks -> unknown (idle has no code rule)
        ("13800000003", "hi"),
        ("13800000003", "1"),
        ("13800000004", "TD"),
        ("13800000005", "hello"),
        ("13800000005", "2"),  # changes: other hours
    ]
    out = [(mobile, text, start + timedelta(seconds=10 * i)) for i, (mobile, text) in enumerate(said)]
    # The menu expires after 30 minutes: "1" then finds the conversation back in idle, before and after.
    out.append(("13800000006", "hi", start + timedelta(minutes=5)))
    out.append(("13800000006", "1", start + timedelta(minutes=40)))
    return out


def test_replay_counts_changed_replies_and_states_by_rule_and_state(engine: Engine, tmp_path: Path) -> None:
    a, b = rules_a(tmp_path), rules_b(tmp_path)
    ingest_history(engine, a, history(T0))
    with engine.connect() as conn:
        report = replay(conn, b, since=T0 - timedelta(hours=1))
    assert report.messages == 12
    assert report.conversations == 6
    assert report.replies_changed == 3
    assert (report.replies_different, report.replies_added, report.replies_removed) == (3, 0, 0)
    assert report.states_changed == 1
    groups = {(g.old_rule, g.new_rule, g.state): g for g in report.groups.values()}
    hours = f"acme-shop.yaml:{HOURS_LINE}"
    code = f"acme-shop.yaml:{CODE_LINE}"
    assert set(groups) == {
        (hours, hours, "menu"),
        (code, code, "menu"),
        (f"acme-shop.yaml:{RECEIPT_LINE}", f"acme-shop.yaml:{OTHERWISE_LINE}", "idle"),
    }
    assert (groups[(hours, hours, "menu")].messages, groups[(hours, hours, "menu")].changed) == (2, 2)
    assert (groups[(code, code, "menu")].states_changed, groups[(code, code, "menu")].replies_changed) == (1, 0)
    example = groups[(hours, hours, "menu")].examples[0]
    assert example.number == "+86 138****0001"
    assert example.old_reply == "[hours] We are open 9:00 to 18:00 today."
    assert example.new_reply == "[hours] We are open 8:00 to 20:00 today."
    receipt = next(g for g in report.groups.values() if g.new_rule == f"acme-shop.yaml:{OTHERWISE_LINE}")
    assert receipt.examples[0].old_reply == "[thanks] Thanks! Code 123456 is registered."
    assert receipt.examples[0].new_reply == "[unknown] Sorry, we did not understand. Reply MENU for options."
    shown = json.dumps(report.as_json(), ensure_ascii=False)
    assert "1380000000" not in shown  # no number in full, anywhere


def test_the_same_rules_replay_to_no_change_also_from_the_middle_of_a_conversation(
    engine: Engine, tmp_path: Path
) -> None:
    a = rules_a(tmp_path)
    ingest_history(engine, a, history(T0))
    with engine.connect() as conn:
        whole = replay(conn, a, since=T0 - timedelta(hours=1))
        # From after the menu was shown: each conversation starts in the state its first message found,
        # and the expired menu (last message 35 minutes before) is expired in the replay too.
        middle = replay(conn, a, since=T0 + timedelta(minutes=30))
        only = replay(conn, rules_b(tmp_path), since=T0 - timedelta(hours=1), signature="Other Shop")
    assert (whole.messages, whole.replies_changed, whole.states_changed, whole.groups) == (12, 0, 0, {})
    assert (middle.messages, middle.replies_changed, middle.states_changed) == (1, 0, 0)
    assert only.messages == 0


def test_a_cached_replay_equals_an_uncached_one(engine: Engine, tmp_path: Path) -> None:
    a, b = rules_a(tmp_path), rules_b(tmp_path)
    ingest_history(engine, a, history(T0))
    more = [
        (f"1390000{i:04d}", text, T0 + timedelta(hours=2, minutes=i))
        for i, text in enumerate(
            ["hi", "2", "菜单", "３", "１２３４５６。", "1", "STOP", "MENU", "START", "help", "hi", "3", "999999"]
        )
    ]
    ingest_history(engine, a, [(m[:7] + "0000", t, at) for m, t, at in more])
    with engine.connect() as conn:
        for rules in (a, b):
            cached = replay(conn, rules, since=T0 - timedelta(hours=1))
            uncached = replay(conn, rules, since=T0 - timedelta(hours=1), cache=False, chunk=3)
            assert cached.as_json() == uncached.as_json()
    assert cached.messages == 25


def test_compare_tells_added_removed_changed_and_state() -> None:
    menu = ReplyView("menu", (), "Reply 1 ...")
    hours = ReplyView("hours", ("9:00", "18:00"), "We are open 9:00 to 18:00 today.")
    assert compare(Happened("r:1", "menu", (menu,)), Replayed("r:1", None, "menu", (menu,))).any is False
    assert compare(Happened("r:1", "menu", ()), Replayed("r:2", None, "menu", (menu,))).reply == "added"
    assert compare(Happened("r:1", "menu", (menu,)), Replayed(None, None, "menu", ())).reply == "removed"
    later = ReplyView("hours", ("8:00", "20:00"), "We are open 8:00 to 20:00 today.")
    changed = compare(Happened("r:1", "idle", (hours,)), Replayed("r:1", "menu", "menu", (later,)))
    assert (changed.reply, changed.state) == ("changed", True)
    report = ReplayReport(T0, None, None, "v", max_examples=1)
    for _ in range(3):
        report.add(
            Happened("r:1", "menu", (menu,)),
            Replayed("r:1", "idle", "menu", ()),
            nationcode="86",
            mobile="13912345678",
            text="call me on 13912345678",
            at=T0,
        )
    group = report.sorted_groups()[0]
    assert (report.replies_removed, group.messages, len(group.examples)) == (3, 3, 1)
    assert group.examples[0].number == "+86 139****5678"
    assert group.examples[0].text == "call me on 139****5678"


def test_the_cli_prints_the_same_counts_and_refuses_a_version_without_stored_versions(
    engine: Engine, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from bot.cli import app

    a, b = rules_a(tmp_path), rules_b(tmp_path)
    start = datetime.now(UTC) - timedelta(hours=3)
    ingest_history(engine, a, history(start))
    with engine.connect() as conn:
        expected = replay(conn, b, since=start - timedelta(hours=1))
    monkeypatch.chdir(tmp_path)
    env = {"SMSBOT_DATABASE_URL": db_url, "SMSBOT_RULES_DIR": str(tmp_path / "b")}
    printed = CliRunner().invoke(app, ["rules", "replay", "--since", "7d", "--json"], env=env)
    assert printed.exit_code == 0, printed.output
    got = json.loads(printed.stdout)
    assert (got["messages"], got["replies_changed"], got["states_changed"]) == (12, 3, 1)
    assert got["groups"] == expected.as_json()["groups"]
    table = CliRunner().invoke(app, ["rules", "replay", "--since", "7d"], env=env)
    assert "replies that would change: 3 (different 3, added 0, removed 0)" in table.stdout
    assert "138****0001" in table.stdout
    assert "13800000001" not in table.stdout
    unknown = CliRunner().invoke(app, ["rules", "replay", "--since", "7d", "abc123"], env=env)
    assert unknown.exit_code == 1
    assert "no stored rules version 'abc123'" in unknown.output

    # A stored version (as every load stores it) replays the same as its files did, whatever the folder holds now.
    texts = {p.name: p.read_text(encoding="utf-8") for p in sorted((tmp_path / "b").glob("*.yaml"))}
    with writing(engine) as conn:
        version_id = record_version(
            conn, hash=texts_version(texts), files=texts, check={}, ok=True, host="test", now=datetime.now(UTC)
        )
    env["SMSBOT_RULES_DIR"] = str(tmp_path / "a")
    stored = CliRunner().invoke(app, ["rules", "replay", "--since", "7d", "--json", str(version_id)], env=env)
    assert stored.exit_code == 0, stored.output
    assert json.loads(stored.stdout)["groups"] == expected.as_json()["groups"]
