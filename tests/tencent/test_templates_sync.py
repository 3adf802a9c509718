"""`smsbot templates sync` and `smsbot rules check --online` against the local fake, through the real SDK.

The fake answers DescribeSmsTemplateList the way Tencent does (TC3 signatures
checked, Limit/Offset paging, International 0/1, StatusCode 0/1/-1); nothing
of the SDK is mocked. The comparison itself is also tested on its own.
"""

from __future__ import annotations

import json
import re
import socket
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bot.cli import app
from bot.tencent.templates import (
    RuleTemplate,
    TencentTemplate,
    collect_rule_templates,
    compare_templates,
    unused_templates,
)
from tests.fakes.tencent_sms import FakeTemplate, FakeTencentSms

SECRET_ID = "AKIDsmsbottemplates"
SECRET_KEY = "smsbot-templates-secret-key"

RULES = """\
signature: Acme Shop
templates:
  menu:   {id: "1490001", text: "Reply 1 for order status."}
  status: {id: "1490002", text: "Order {1}: {2}."}
opt_out: {keywords: [STOP], reply: menu}
otherwise: {reply: menu}
"""
"""``menu``'s id is on line 3 (column 16), ``status``'s on line 4; texts at column 33."""

IN_SYNC: dict[str, str | FakeTemplate] = {"1490001": "Reply 1 for order status.", "1490002": "Order {1}: {2}."}

runner = CliRunner()


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No config.yaml from the repo and no Tencent credentials from the developer's shell."""
    monkeypatch.chdir(tmp_path)
    for name in ("TENCENTCLOUD_SECRET_ID", "TENCENTCLOUD_SECRET_KEY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    path = tmp_path / "rules" / "acme.yaml"
    path.parent.mkdir()
    path.write_text(RULES, encoding="utf-8")
    return path


def point_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, *, secret_key: str = SECRET_KEY) -> None:
    """Settings as a user would give them: the SDK's own credential variables plus SMSBOT_TENCENT_*."""
    monkeypatch.setenv("TENCENTCLOUD_SECRET_ID", SECRET_ID)
    monkeypatch.setenv("TENCENTCLOUD_SECRET_KEY", secret_key)
    monkeypatch.setenv("SMSBOT_TENCENT_ENDPOINT", endpoint)
    monkeypatch.setenv("SMSBOT_TENCENT_SCHEME", "http")


@pytest.fixture
def tencent(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeTencentSms]:
    """The fake, its templates in sync with RULES until a test changes them, and smsbot pointed at it."""
    with FakeTencentSms(secret_id=SECRET_ID, secret_key=SECRET_KEY, templates=IN_SYNC) as fake:
        point_at(monkeypatch, fake.endpoint)
        yield fake


def sync(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["templates", "sync", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


# ---------------------------------------------------------------- templates sync


def test_templates_in_sync_exit_0_and_unused_ones_are_only_information(tencent: FakeTencentSms, rules: Path) -> None:
    tencent.templates["1490099"] = FakeTemplate("Summer sale {1}", name="Summer sale")
    code, out, err = sync(str(rules.parent))
    assert code == 0, out + err
    assert ": error:" not in out
    assert ": warning:" not in out
    assert "info: template 1490099: 'Summer sale' (approved, domestic) is not used by any rule file" in out
    assert "2 template(s) compared with 3 at Tencent: 0 error(s), 0 warning(s), 1 unused at Tencent" in err


def test_a_template_id_unknown_at_tencent_is_an_error_at_the_id(tencent: FakeTencentSms, rules: Path) -> None:
    del tencent.templates["1490002"]
    code, out, _ = sync(str(rules))
    assert code == 1
    assert f"{rules}:4:16: error: template 1490002: 'status' is not a template of this Tencent account" in out


def test_changed_text_shows_both_texts_at_the_text_line(tencent: FakeTencentSms, rules: Path) -> None:
    tencent.templates["1490002"] = FakeTemplate("Order {1} is now {2}.")
    code, out, _ = sync(str(rules))
    assert code == 1
    [line] = out.splitlines()
    assert line.startswith(f"{rules}:4:33: error: template 1490002: 'status' text differs from Tencent's")
    assert "Tencent has 'Order {1} is now {2}.', this file has 'Order {1}: {2}.'" in line


def test_a_different_placeholder_count_says_the_sends_will_be_refused(tencent: FakeTencentSms, rules: Path) -> None:
    tencent.templates["1490002"] = FakeTemplate("Order {1}: {2} at {3}.")
    code, out, _ = sync(str(rules))
    assert code == 1
    assert "Tencent's has 3 placeholder(s), this file's 2: Tencent will refuse the sends" in out


def test_a_whitespace_only_difference_is_a_warning_and_exit_0(tencent: FakeTencentSms, rules: Path) -> None:
    tencent.templates["1490002"] = FakeTemplate("Order {1}:  {2}.\n")
    code, out, err = sync(str(rules))
    assert code == 0
    assert f"{rules}:4:33: warning: template 1490002: 'status' text differs from Tencent's only in spaces" in out
    assert "0 error(s), 1 warning(s)" in err


@pytest.mark.parametrize(
    ("status", "review_reply", "expected"),
    [
        ("reviewing", "", "'menu' is still being reviewed at Tencent: Tencent refuses replies with it"),
        (
            "approved_not_effective",
            "",
            "'menu' is approved at Tencent but not yet in effect: Tencent refuses replies with it",
        ),
        (
            "rejected",
            "Missing company name",
            "'menu' was rejected by Tencent (review: Missing company name): Tencent refuses replies with it",
        ),
    ],
)
def test_a_template_not_approved_is_an_error_with_tencents_review_reply(
    tencent: FakeTencentSms, rules: Path, status: str, review_reply: str, expected: str
) -> None:
    tencent.templates["1490001"] = FakeTemplate(
        "Reply 1 for order status.",
        status=status,  # type: ignore[arg-type]
        review_reply=review_reply,
    )
    code, out, _ = sync(str(rules))
    assert code == 1
    assert out.splitlines() == [f"{rules}:3:16: error: template 1490001: {expected} until it is approved"]


def test_international_templates_and_more_than_one_page_are_found(tencent: FakeTencentSms, rules: Path) -> None:
    tencent.templates.clear()
    for n in range(1, 151):  # 150 domestic templates: two pages of at most 100
        tencent.templates[str(1480000 + n)] = FakeTemplate(f"Filler {n}")
    tencent.templates["1490002"] = FakeTemplate("Order {1}: {2}.")  # sorts last: on the second page
    tencent.templates["1490001"] = FakeTemplate("Reply 1 for order status.", international=True)
    code, out, err = sync("--json", str(rules))
    assert code == 0, out + err
    document = json.loads(out)
    assert document["differences"] == []
    assert document["tencent_templates"] == 152
    pages = [(c.params or {}).get("Offset") for c in tencent.calls if (c.params or {}).get("International") == 0]
    assert pages == [0, 100]


def test_a_template_for_both_scopes_is_counted_once_and_named_by_its_scope(
    tencent: FakeTencentSms, rules: Path
) -> None:
    tencent.templates["1490099"] = FakeTemplate("Summer sale, reply R to opt out", international="both", name="sale")
    code, out, err = sync(str(rules))
    assert code == 0, out + err
    assert "info: template 1490099: 'sale' (approved, domestic and international) is not used by any rule file" in out
    code, out, _ = sync("--json", str(rules))
    [unused] = [u for u in json.loads(out)["unused"] if u["template_id"] == "1490099"]
    assert (unused["scope"], unused["international"], unused["status"]) == ("both", True, "approved")


def test_json_reports_every_difference_with_file_line_id_and_kind(tencent: FakeTencentSms, rules: Path) -> None:
    del tencent.templates["1490002"]
    tencent.templates["1490001"] = FakeTemplate("Reply 1 for status.", status="reviewing")
    tencent.templates["1490077"] = FakeTemplate("Old promo", status="rejected", international=True, name="Old promo")
    code, out, err = sync(str(rules), "--json")
    assert code == 1
    document = json.loads(out)
    assert set(document) == {
        "templates_checked",
        "tencent_templates",
        "errors",
        "warnings",
        "differences",
        "unused",
    }
    assert (document["templates_checked"], document["tencent_templates"]) == (2, 2)
    assert (document["errors"], document["warnings"]) == (3, 0)
    found = [(d["file"], d["line"], d["template_id"], d["kind"], d["severity"]) for d in document["differences"]]
    assert found == [
        (str(rules), 3, "1490001", "not_approved", "error"),  # at the id (column 16)
        (str(rules), 3, "1490001", "text_changed", "error"),  # at the text (column 33)
        (str(rules), 4, "1490002", "missing", "error"),
    ]
    for d in document["differences"]:
        assert set(d) == {"file", "line", "col", "template", "template_id", "kind", "severity", "message"}
        assert d["message"].startswith(f"template {d['template_id']}: '{d['template']}'")
    assert document["unused"] == [
        {
            "template_id": "1490077",
            "name": "Old promo",
            "status": "rejected",
            "international": True,
            "scope": "international",
        }
    ]
    assert "3 error(s)" in err


def test_rule_errors_stop_templates_sync_before_asking_tencent(tencent: FakeTencentSms, rules: Path) -> None:
    rules.write_text(RULES.replace('"1490002"', '"14900O2"'), encoding="utf-8")
    code, out, err = sync(str(rules))
    assert code == 1
    assert out == ""
    assert "must be digits" in err
    assert "fix them first" in err
    assert tencent.calls == []


def test_the_rules_dir_setting_is_the_default_path(
    tencent: FakeTencentSms, rules: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMSBOT_RULES_DIR", str(rules.parent))
    del tencent.templates["1490001"]
    code, out, _ = sync()
    assert code == 1
    assert f"{rules}:3:16: error: template 1490001" in out


# ---------------------------------------------------------------- rules check --online


def test_rules_check_online_reports_differences_as_errors_with_file_and_line(
    tencent: FakeTencentSms, rules: Path
) -> None:
    tencent.templates["1490002"] = FakeTemplate("Order {1} shipped {2}.")
    offline = runner.invoke(app, ["rules", "check", str(rules)])
    assert offline.exit_code == 0, offline.output
    assert tencent.calls == []  # without --online nothing goes to Tencent
    result = runner.invoke(app, ["rules", "check", "--online", str(rules)])
    assert result.exit_code == 1, result.output
    assert re.search(
        rf"^{re.escape(str(rules))}:4:33: error: template 1490002: 'status' text differs", result.stdout, re.M
    )
    assert "1 error(s), 0 warning(s); 2 template(s) compared with Tencent" in result.stderr


def test_rules_check_online_in_sync_exits_0(tencent: FakeTencentSms, rules: Path) -> None:
    result = runner.invoke(app, ["rules", "check", "--online", str(rules)])
    assert result.exit_code == 0, result.output
    assert "0 error(s)" in result.stderr


def test_rules_check_online_keeps_the_usual_checks(tencent: FakeTencentSms, rules: Path) -> None:
    rules.write_text(RULES.replace("reply: menu}\nother", "reply: menuu}\nother"), encoding="utf-8")
    del tencent.templates["1490002"]
    result = runner.invoke(app, ["rules", "check", "--online", str(rules)])
    assert result.exit_code == 1
    assert "reply names unknown template 'menuu'" in result.stdout
    assert f"{rules}:4:16: error: template 1490002: 'status' is not a template" in result.stdout


# ---------------------------------------------------------------- refusing to run


@pytest.mark.parametrize("command", [["templates", "sync"], ["rules", "check", "--online"]])
def test_missing_credentials_exit_2_naming_the_variables(
    rules: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    result = runner.invoke(app, [*command, str(rules)])
    assert result.exit_code == 2
    assert "TENCENTCLOUD_SECRET_ID, TENCENTCLOUD_SECRET_KEY (environment variables); not set" in result.stderr
    assert result.stdout == ""
    monkeypatch.setenv("TENCENTCLOUD_SECRET_ID", SECRET_ID)
    result = runner.invoke(app, [*command, str(rules)])
    assert result.exit_code == 2
    assert "needs TENCENTCLOUD_SECRET_KEY (environment variable); not set" in result.stderr


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("command", [["templates", "sync"], ["rules", "check", "--online"]])
def test_unreachable_tencent_exit_2_with_a_clear_message(
    rules: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    port = _closed_port()
    point_at(monkeypatch, f"127.0.0.1:{port}")
    result = runner.invoke(app, [*command, str(rules)])
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)  # a message, not a traceback
    assert result.stderr.startswith(f"smsbot: cannot reach Tencent at http://127.0.0.1:{port}: ")
    assert "Traceback" not in result.output
    assert result.stdout == ""


def test_wrong_secret_key_exit_2_pointing_at_the_credentials(rules: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeTencentSms(secret_id=SECRET_ID, secret_key=SECRET_KEY, templates=IN_SYNC) as fake:
        point_at(monkeypatch, fake.endpoint, secret_key="not-the-key")
        code, out, err = sync(str(rules))
    assert code == 2
    assert "Tencent refused the credentials (AuthFailure.SignatureFailure" in err
    assert "check TENCENTCLOUD_SECRET_ID and TENCENTCLOUD_SECRET_KEY" in err
    assert out == ""


def test_tencent_http_error_exit_2(tencent: FakeTencentSms, rules: Path) -> None:
    tencent.http_error(502, action="DescribeSmsTemplateList")
    code, _, err = sync(str(rules))
    assert code == 2
    assert f"smsbot: Tencent at http://{tencent.endpoint} answered with an HTTP error" in err


# ---------------------------------------------------------------- the comparison on its own


def rule(tid: str = "1490002", text: str = "Order {1}: {2}.", name: str = "status") -> RuleTemplate:
    return RuleTemplate("rules/acme.yaml", name, tid, text, line=4, col=20, text_line=4, text_col=37)


def at_tencent(
    tid: str = "1490002", content: str = "Order {1}: {2}.", status: int = 0, **kw: object
) -> TencentTemplate:
    return TencentTemplate(tid, content, status, **kw)  # type: ignore[arg-type]


def kinds(rules: list[RuleTemplate], tencent: list[TencentTemplate]) -> list[tuple[str, str, int]]:
    return [(d.kind, d.severity, d.col) for d in compare_templates(rules, tencent)]


def test_compare_same_id_and_text_approved_is_no_difference() -> None:
    assert compare_templates([rule()], [at_tencent()]) == []


def test_compare_missing_points_at_the_id() -> None:
    [d] = compare_templates([rule()], [at_tencent("1490003")])
    assert (d.kind, d.severity, d.path, d.line, d.col) == ("missing", "error", "rules/acme.yaml", 4, 20)
    assert str(d.diagnostic()).startswith("rules/acme.yaml:4:20: error: template 1490002: 'status' is not a template")


def test_compare_whitespace_is_a_warning_other_changes_are_errors() -> None:
    assert kinds([rule()], [at_tencent(content=" Order {1}:\n{2}. ")]) == [("text_changed", "warning", 37)]
    assert kinds([rule()], [at_tencent(content="Order {1}：{2}.")]) == [("text_changed", "error", 37)]  # full-width
    assert kinds([rule()], [at_tencent(content="Order {2}: {1}.")]) == [("text_changed", "error", 37)]


def test_compare_an_edited_template_under_review_is_both_changed_and_not_approved() -> None:
    found = kinds([rule()], [at_tencent(content="Order {1} now {2}.", status=1)])
    assert found == [("text_changed", "error", 37), ("not_approved", "error", 20)]


def test_compare_unknown_status_code_is_not_approved() -> None:
    [d] = compare_templates([rule()], [at_tencent(status=7)])
    assert d.kind == "not_approved"
    assert "not approved at Tencent (StatusCode 7)" in d.message


def test_compare_prefers_the_approved_matching_entry_when_an_id_exists_twice() -> None:
    domestic_rejected = at_tencent(content="Old", status=-1)
    international_ok = at_tencent(international=True)
    assert compare_templates([rule()], [domestic_rejected, international_ok]) == []


def test_compare_reports_each_place_a_shared_id_is_used() -> None:
    other = RuleTemplate("rules/b.yaml", "st", "1490002", "Order {1}: {2}.", 7, 9, 7, 30)
    found = compare_templates([rule(), other], [])
    assert [(d.path, d.line) for d in found] == [("rules/acme.yaml", 4), ("rules/b.yaml", 7)]


def test_unused_lists_tencent_templates_no_rule_names() -> None:
    unused = unused_templates([rule()], [at_tencent(), at_tencent("1490100"), at_tencent("990")])
    assert [t.id for t in unused] == ["990", "1490100"]


def test_collect_rule_templates_keeps_positions_and_skips_what_the_checks_refuse(tmp_path: Path) -> None:
    source = textwrap.dedent(
        """\
        signature: A
        templates:
          good:
            id: "1490001"
            text: |
              Line one {1}
          bad_id: {id: "14x", text: "x"}
          no_text: {id: "1490003"}
        """
    )
    (tmp_path / "a.yaml").write_text(source, encoding="utf-8")
    (tmp_path / "broken.yaml").write_text("signature: [unclosed\n", encoding="utf-8")
    [found] = collect_rule_templates(tmp_path)
    assert (found.name, found.id, found.text) == ("good", "1490001", "Line one {1}\n")
    assert (found.line, found.col, found.text_line) == (4, 9, 6)
    assert found.path == str(tmp_path / "a.yaml")
