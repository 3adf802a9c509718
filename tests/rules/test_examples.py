"""The example rule files users copy from must stay valid and keep passing their own tests."""

from __future__ import annotations

from typer.testing import CliRunner

from bot.cli import app
from bot.rules.loader import load_rules
from bot.rules.simulation import run_file_tests
from tests.support import RULES


def test_example_rules_have_no_errors_and_cover_a_named_signature_and_the_default() -> None:
    result = load_rules(RULES)
    assert result.errors == [], [str(d) for d in result.errors]
    assert result.ruleset is not None
    assert result.ruleset.for_signature("Acme Shop") is not None
    assert result.ruleset.default is not None
    assert result.ruleset.for_signature("Some Other Brand") is result.ruleset.default


def test_example_rules_pass_their_own_tests() -> None:
    result = load_rules(RULES)
    assert result.ruleset is not None
    outcomes = [o for f in result.ruleset.files for o in run_file_tests(f)]
    assert len(outcomes) >= 7
    assert [str(x) for o in outcomes for x in o.failures] == []


def test_rules_check_and_rules_test_commands_succeed_on_the_examples() -> None:
    runner = CliRunner()
    check = runner.invoke(app, ["rules", "check", str(RULES)])
    assert check.exit_code == 0, check.output
    assert ": error:" not in check.stdout
    tested = runner.invoke(app, ["rules", "test", str(RULES)])
    assert tested.exit_code == 0, tested.output
    assert "FAIL" not in tested.stdout
