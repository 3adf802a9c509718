"""Rules > Activity: figures of a hand-counted history (stored through ``handle_batch`` with the example rules),
the same numbers from ``/console/rules/activity.json`` and ``smsbot report --format json``, the page behind a
login (a viewer sees it), on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from bot.cli import app as cli
from bot.console.queries.activity import activity
from tests.console.test_console_ops import People
from tests.support import RULES, Harness, ingest_history

ACME = (RULES / "acme-shop.yaml").read_text(encoding="utf-8").splitlines()


def ref(fragment: str) -> str:
    return "acme-shop.yaml:" + str(next(i for i, line in enumerate(ACME, 1) if fragment in line))


MENU_KW = ref("keywords: [MENU, 菜单, HI, HELLO")
HOURS = ref('keywords: ["2"]')
CODE = ref('keywords: ["3", CODE]')
CODE_OTHERWISE = ref("otherwise: {reply: ask_code}")
RECEIPT = ref("(?P<code>")
OTHERWISE = ref("otherwise: {reply: unknown}")
OPT_OUT = ref("keywords: [STOP, TD, T, 退订")


def seed(h: Harness) -> None:
    t = h.clock() - timedelta(hours=3)
    said = [
        ("13800000001", "hi", 0),
        ("13800000001", "2", 10),  # menu -> idle by the hours rule
        ("13800000002", "hi", 20),
        ("13800000002", "3", 30),  # menu -> code
        ("13800000002", "abc", 40),  # unmatched in code, stays
        ("13800000002", "123456", 50),  # code -> idle
        ("13800000003", "hi", 60),
        ("13800000003", "1", 60 + 40 * 60),  # 40 minutes later: the menu had expired; unknown, in idle
        ("13800000004", "hi", 70),
        ("13800000004", "TD", 80),  # opted out from menu
        ("13800000005", "hi", 90),  # then silence: the menu expires with no message since
        ("13800000006", "blah", 100),  # a new conversation, unmatched in idle
    ]
    history = sorted(((m, text, t + timedelta(seconds=s)) for m, text, s in said), key=lambda x: x[2])
    ingest_history(h.engine, h.rules.ruleset, history)


EXPECTED_FIRED = {
    (MENU_KW, "idle"): 5,
    (HOURS, "menu"): 1,
    (CODE, "menu"): 1,
    (CODE_OTHERWISE, "code"): 1,
    (RECEIPT, "code"): 1,
    (OTHERWISE, "idle"): 2,
    (OPT_OUT, "menu"): 1,
}
EXPECTED_STATES = {
    # state: (entered, left, left_by, expired, expired_silent, opted_out, unmatched texts)
    "idle": (4, 0, {}, 0, 0, 0, {"1": 1, "blah": 1}),
    "menu": (5, 2, {HOURS: 1, CODE: 1}, 2, 1, 1, {}),
    "code": (1, 1, {RECEIPT: 1}, 0, 0, 0, {"abc": 1}),
    "order": (0, 0, {}, 0, 0, 0, {}),
    "appointment": (0, 0, {}, 0, 0, 0, {}),
}


@pytest.fixture
def viewers(harness: Harness) -> People:
    return People(harness)


def check(figures: dict[str, Any]) -> None:
    fired = {(r["rule"], r["state"]): r["fired"] for r in figures["rules"]}
    assert fired == EXPECTED_FIRED
    acme = next(f for f in figures["files"] if f["file"] == "acme-shop.yaml")
    assert [s["state"] for s in acme["states"]] == ["idle", "menu", "code", "order", "appointment"]  # file order
    got = {
        s["state"]: (
            s["entered"],
            s["left"],
            {b["rule"]: b["count"] for b in s["left_by"]},
            s["expired"],
            s["expired_silent"],
            s["opted_out"],
            {u["text"]: u["count"] for u in s["unmatched_texts"]},
        )
        for s in acme["states"]
    }
    assert got == EXPECTED_STATES


def test_activity_figures_match_the_hand_counted_history(harness: Harness) -> None:
    seed(harness)
    now = harness.clock()
    with harness.engine.connect() as conn:
        figures = activity(conn, ruleset=harness.rules.ruleset, since=now - timedelta(days=7), until=now, now=now)
        other = activity(
            conn, ruleset=harness.rules.ruleset, since=now - timedelta(days=7), until=now, now=now, signature="Other"
        )
        before = activity(
            conn, ruleset=harness.rules.ruleset, since=now - timedelta(days=7), until=now - timedelta(hours=4), now=now
        )
    check(figures.as_json())
    assert other.rules() == []
    assert before.rules() == []


def test_json_endpoint_and_cli_report_print_the_same_numbers(
    harness: Harness, viewers: People, db_url: str, rules_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(harness)
    answer = viewers.viewer.get("/console/rules/activity.json", params={"since": "7d"})
    assert answer.status_code == 200
    check(answer.json())
    monkeypatch.chdir(tmp_path)  # no config.yaml of the checkout
    printed = CliRunner().invoke(
        cli,
        ["report", "--since", "7d", "--format", "json"],
        env={"SMSBOT_DATABASE_URL": db_url, "SMSBOT_RULES_DIR": str(rules_dir)},
    )
    assert printed.exit_code == 0, printed.output
    report = json.loads(printed.stdout)
    check(report)
    assert report["rules"] == answer.json()["rules"]
    assert report["files"] == answer.json()["files"]
    table = CliRunner().invoke(
        cli, ["report", "--since", "7d"], env={"SMSBOT_DATABASE_URL": db_url, "SMSBOT_RULES_DIR": str(rules_dir)}
    )
    assert table.exit_code == 0, table.output
    menu_line = next(line for line in table.stdout.splitlines() if line.startswith("menu "))
    assert menu_line.split() == ["menu", "5", "0", "2", "2", "1", "0"]


def test_the_activity_page_needs_a_login_and_shows_the_figures(harness: Harness, viewers: People) -> None:
    seed(harness)
    for path in ("/console/rules/activity", "/console/rules/activity.json"):
        refused = viewers.anonymous.get(path, follow_redirects=False)
        assert refused.status_code in (303, 401)
        assert "menu" not in refused.text
    page = viewers.viewer.get("/console/rules/activity?since=7d")
    assert page.status_code == 200
    assert "<svg" in page.text
    assert (
        f'<tr data-rule="{MENU_KW}" data-state="idle"><td><code>{MENU_KW}</code></td><td>idle</td><td class="num fired">5</td>'
        in page.text
    )
    assert '<tr data-state="menu">' in page.text
    menu = page.text.split('<tr data-state="menu">', 1)[1].split("</tr>", 1)[0]
    assert '<td class="num entered">5</td>' in menu
    assert '<td class="num expired">2</td>' in menu
    assert '<td class="num opted-out">1</td>' in menu
    assert viewers.admin.get("/console/rules").text.count('href="/console/rules/activity"') == 1
    # A signature with no messages, and a bad period (reported, not a 500).
    empty = viewers.viewer.get("/console/rules/activity", params={"signature": "Nobody"})
    assert "No rule fired in this period." in empty.text
    bad = viewers.viewer.get("/console/rules/activity", params={"since": "soon"})
    assert bad.status_code == 200
    assert "neither a duration" in bad.text
