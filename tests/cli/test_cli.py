"""The `smsbot` command as users run it: exit codes, printed problems, JSON lines."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import cast

import pytest
from typer.testing import CliRunner

from bot.cli import app
from bot.rules.yaml_source import load_located
from tests.support import CONTRACT

SIGN = "Acme Shop"
REPLY_KEYS = {"template", "template_id", "params", "text"}
LINE_KEYS = {"text", "rule", "state", "replies", "opted_out"}

runner = CliRunner()


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No SMSBOT_* settings from the developer's shell, and no config.yaml from the repo."""
    for name in list(os.environ):
        if name.startswith("SMSBOT_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    return path


def json_lines(stdout: str) -> list[dict[str, object]]:
    lines = stdout.splitlines()
    parsed = [json.loads(line) for line in lines]
    assert all(isinstance(p, dict) for p in parsed)
    return parsed


# ---------------------------------------------------------------- rules check


def test_check_contract_exits_0() -> None:
    result = runner.invoke(app, ["rules", "check", str(CONTRACT)])
    assert result.exit_code == 0, result.output
    assert ": error:" not in result.stdout
    assert "0 error(s)" in result.stderr


def col(path: Path, line: int, needle: str) -> int:
    return path.read_text(encoding="utf-8").splitlines()[line - 1].index(needle) + 1


def test_check_broken_file_prints_every_problem_as_file_line_col_and_exits_1(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "broken.yaml",
        """\
        signature: Acme
        templates:
          menu: {id: "1", text: "Menu"}
        states:
          idle:
            on:
              - regex: '^(oops$'
                reply: menu
          menu:
            on:
              - keywords: [X]
                reply: mneu
                goto: nowhere
        """,
    )
    result = runner.invoke(app, ["rules", "check", str(path)])
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    expected = [
        f"{path}:7:{col(path, 7, chr(39) + '^(')}: error: invalid regex",
        f"{path}:12:{col(path, 12, 'mneu')}: error: reply names unknown template 'mneu'",
        f"{path}:13:{col(path, 13, 'nowhere')}: error: goto names unknown state 'nowhere'",
    ]
    for start in expected:
        assert any(line.startswith(start) for line in lines), (start, lines)
    for line in lines:
        assert re.match(rf"^{re.escape(str(path))}:\d+:\d+: (error|warning): ", line), line
    assert "3 error(s)" in result.stderr


def test_check_reports_unknown_keys_and_other_problems_in_one_run(tmp_path: Path) -> None:
    """A typo'd key must not hide the file's other problems: users fix everything from one run."""
    path = write(
        tmp_path,
        "broken.yaml",
        """\
        signature: Acme
        templates:
          menu: {id: "1", text: "Menu"}
        states:
          idle:
            on:
              - kewords: [HI]
                reply: menu
              - keywords: [X]
                reply: mneu
        """,
    )
    result = runner.invoke(app, ["rules", "check", str(path)])
    assert result.exit_code == 1
    assert f"{path}:7:{col(path, 7, 'kewords')}: error: unknown key 'kewords' (did you mean 'keywords'?)" in (
        result.stdout
    )
    assert f"{path}:10:{col(path, 10, 'mneu')}: error: reply names unknown template 'mneu'" in result.stdout


def test_check_with_only_warnings_exits_0(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "warn.yaml",
        """\
        signature: Acme
        templates:
          echo: {id: "1", text: "You said {1}"}
        states:
          idle:
            on:
              - first_word: [ECHO]
                reply: echo
                params: ["{{ text }}"]
        """,
    )
    result = runner.invoke(app, ["rules", "check", str(path)])
    assert result.exit_code == 0, result.output
    assert re.search(rf"^{re.escape(str(path))}:9:\d+: warning: .*customer text", result.stdout, re.M)


def test_check_param_max_length_option(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "long.yaml",
        """\
        signature: Acme
        templates:
          hours: {id: "1", text: "Open from {1}"}
        otherwise: {reply: hours, params: ["9:00 am"]}
        """,
    )
    strict = runner.invoke(app, ["rules", "check", str(path)])
    assert strict.exit_code == 1
    assert f"{path}:4:" in strict.stdout
    assert "7 characters" in strict.stdout
    relaxed = runner.invoke(app, ["rules", "check", "--param-max-length", "12", str(path)])
    assert relaxed.exit_code == 0, relaxed.output


def test_check_missing_path_is_an_error_not_a_crash(tmp_path: Path) -> None:
    result = runner.invoke(app, ["rules", "check", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert "no such file or folder" in result.stdout
    assert result.exception is None or isinstance(result.exception, SystemExit)


# ---------------------------------------------------------------- rules test


def test_rule_tests_of_the_contract_pass() -> None:
    result = runner.invoke(app, ["rules", "test", str(CONTRACT)])
    assert result.exit_code == 0, result.output
    assert "order status through the menu" in result.stdout
    assert "opt-out silences the bot until START" in result.stdout
    assert "2 ok, 0 failing" in result.stdout


def test_failing_rule_test_reports_name_step_expected_and_actual(tmp_path: Path) -> None:
    text = CONTRACT.read_text(encoding="utf-8").replace(
        '      - {reply: status, params: ["none", "sent"]}',
        '      - {reply: hours, params: ["none", "sent"]}',
    )
    assert text != CONTRACT.read_text(encoding="utf-8")
    path = tmp_path / "wrong.yaml"
    path.write_text(text, encoding="utf-8")
    result = runner.invoke(app, ["rules", "test", str(path)])
    assert result.exit_code == 1
    out = result.stdout
    assert "FAIL" in out
    assert "order status through the menu" in out
    assert "step 2" in out
    assert "'1'" in out  # what was said at that step
    assert "expected reply 'hours'" in out
    assert "got 'status'" in out
    assert "1 ok, 1 failing" in out


def test_rule_test_on_broken_rules_exits_1_with_the_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "broken.yaml", "signature: Acme\notherwise: {reply: nothing}\n")
    result = runner.invoke(app, ["rules", "test", str(path)])
    assert result.exit_code == 1
    assert f"{path}:2:" in result.stdout
    assert "unknown template 'nothing'" in result.stdout


# ---------------------------------------------------------------- rules schema


def _schema() -> dict[str, object]:
    result = runner.invoke(app, ["rules", "schema"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.stdout)
    assert isinstance(schema, dict)
    return schema


def test_schema_is_json_describing_the_rule_file() -> None:
    schema = _schema()
    assert schema["type"] == "object"
    properties = schema["properties"]
    assert isinstance(properties, dict)
    assert {"signature", "templates", "states", "opt_out", "opt_in", "help", "anywhere", "otherwise", "tests"} <= set(
        properties
    )
    assert "signature" in schema["required"]  # type: ignore[operator]
    assert schema["additionalProperties"] is False  # editors flag 'kewords'-style typos


def test_schema_validates_the_contract_file() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = _schema()
    data = load_located(CONTRACT.read_text(encoding="utf-8")).data
    jsonschema.validate(data, schema)
    broken = dict(data)  # type: ignore[call-overload]
    broken["kewords"] = ["X"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


# ---------------------------------------------------------------- simulate


def simulate(*args: str) -> list[dict[str, object]]:
    result = runner.invoke(app, ["simulate", "--rules", str(CONTRACT), "--json", *args])
    assert result.exit_code == 0, result.output
    return json_lines(result.stdout)


def test_simulate_json_prints_one_object_per_message_with_exact_keys() -> None:
    lines = simulate("--sign", SIGN, "hi", "1", "TD", "MENU")
    assert len(lines) == 4
    for line in lines:
        assert set(line) == LINE_KEYS
        assert isinstance(line["replies"], list)
        for reply in line["replies"]:
            assert set(reply) == REPLY_KEYS
    hi, one, td, menu = lines
    assert hi["text"] == "hi"
    assert re.fullmatch(r"contract\.yaml:\d+", str(hi["rule"]))
    assert hi["state"] == "menu"
    assert hi["replies"] == [
        {
            "template": "menu",
            "template_id": "1490001",
            "params": [],
            "text": "Reply 1 for order status, 2 for opening hours. Reply TD to opt out.",
        }
    ]
    assert hi["opted_out"] is False
    assert one["replies"] == [
        {"template": "status", "template_id": "1490002", "params": ["none", "sent"], "text": "Order none: sent."}
    ]
    assert td["opted_out"] is True
    assert [r["template"] for r in cast("list[dict[str, object]]", td["replies"])] == ["bye"]
    assert menu["replies"] == []
    assert menu["opted_out"] is True


def test_simulate_gap_lets_the_menu_expire() -> None:
    quick = simulate("--sign", SIGN, "hi", "1")
    assert quick[1]["replies"][0]["template"] == "status"  # type: ignore[index]
    slow = simulate("--sign", SIGN, "--gap", "31m", "hi", "1")
    assert slow[0]["state"] == "menu"
    assert slow[1]["replies"][0]["template"] == "unknown"  # type: ignore[index]
    assert slow[1]["state"] == "idle"


def test_simulate_gap_shorter_than_expiry_keeps_the_menu() -> None:
    lines = simulate("--sign", SIGN, "--gap", "29m", "hi", "1")
    assert lines[1]["replies"][0]["template"] == "status"  # type: ignore[index]


def test_simulate_unknown_signature_without_default_gives_no_reply() -> None:
    lines = simulate("--sign", "Nobody Ltd", "hi", "TD")
    assert len(lines) == 2
    for line in lines:
        assert set(line) == LINE_KEYS
        assert line["replies"] == []
        assert line["rule"] is None
        assert line["opted_out"] is False


def test_simulate_transcript_is_readable() -> None:
    result = runner.invoke(app, ["simulate", "--rules", str(CONTRACT), "--sign", SIGN, "hi", "1"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "hi" in out
    assert "Reply 1 for order status, 2 for opening hours. Reply TD to opt out." in out
    assert "Order none: sent." in out
    assert not out.lstrip().startswith("{")  # not JSON


@pytest.mark.parametrize("gap", ["5x", "0s", "soon", "-1m"])
def test_simulate_bad_gap_is_a_clear_error(gap: str) -> None:
    result = runner.invoke(app, ["simulate", "--rules", str(CONTRACT), "--sign", SIGN, "--gap", gap, "hi"])
    assert result.exit_code != 0
    assert "--gap" in result.stderr
    assert "duration" in result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""


def test_simulate_with_broken_rules_says_where(tmp_path: Path) -> None:
    path = write(tmp_path, "broken.yaml", "signature: Acme\notherwise: {reply: nothing}\n")
    result = runner.invoke(app, ["simulate", "--rules", str(path), "--sign", "Acme", "--json", "hi"])
    assert result.exit_code == 1
    assert f"{path}:2:" in result.stderr
    assert result.stdout == ""


# ---------------------------------------------------------------- the installed console script


def _smsbot() -> str:
    beside = Path(sys.executable).parent / "smsbot"
    found = str(beside) if beside.exists() else shutil.which("smsbot")
    if found is None:
        pytest.fail("the smsbot console script is not installed (pip install -e .)")
    return found


def test_console_script_runs_from_another_directory(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMSBOT_")}
    done = subprocess.run(
        [_smsbot(), "simulate", "--rules", str(CONTRACT), "--sign", SIGN, "--json", "hi", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = json_lines(done.stdout)
    assert [line["replies"][0]["template"] for line in lines] == ["menu", "hours"]  # type: ignore[index]
    assert lines[1]["replies"][0]["text"] == "We are open 9:00 to 18:00 today."  # type: ignore[index]
