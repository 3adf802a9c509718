"""Settings: defaults, then config.yaml, then SMSBOT_* environment variables."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bot.cli import app
from bot.config import ConfigError, load_settings
from tests.support import REPO

CONTRACT = REPO / "tests" / "fixtures" / "contract.yaml"

runner = CliRunner()

SEVEN_CHAR_PARAM = """\
signature: Acme
templates:
  hours: {id: "1", text: "Open from {1}"}
otherwise: {reply: hours, params: ["9:00 am"]}
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No SMSBOT_* variables from the developer's shell; start in an empty directory."""
    for name in list(os.environ):
        if name.startswith("SMSBOT_"):
            monkeypatch.delenv(name)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)


def write_config(folder: Path, body: str, name: str = "config.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


def make_rules(folder: Path, text: str = SEVEN_CHAR_PARAM) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "acme.yaml").write_text(text, encoding="utf-8")
    return folder


# ---------------------------------------------------------------- where the file comes from


def test_no_config_file_uses_defaults() -> None:
    settings = load_settings()
    assert settings.config_file is None
    assert settings.rules_dir == Path("rules")
    assert settings.param_max_length == 6


def test_no_config_file_cli_checks_the_rules_folder_of_the_current_directory() -> None:
    make_rules(Path.cwd() / "rules", CONTRACT.read_text(encoding="utf-8"))
    result = runner.invoke(app, ["rules", "check"])
    assert result.exit_code == 0, result.output
    assert "1 file(s) checked: 0 error(s)" in result.stderr


def test_empty_config_file_uses_defaults(tmp_path: Path) -> None:
    path = write_config(tmp_path / "etc", "# nothing set yet\n")
    settings = load_settings(path)
    assert settings.param_max_length == 6
    assert settings.config_file == path


def test_config_given_with_option(tmp_path: Path) -> None:
    path = write_config(tmp_path / "etc", "param_max_length: 12\n")
    assert load_settings(path).param_max_length == 12


def test_config_given_with_option_on_the_command_line(tmp_path: Path) -> None:
    make_rules(tmp_path / "etc" / "rules")
    path = write_config(tmp_path / "etc", "rules_dir: rules\nparam_max_length: 12\n")
    result = runner.invoke(app, ["--config", str(path), "rules", "check"])
    assert result.exit_code == 0, result.output
    assert "1 file(s) checked: 0 error(s)" in result.stderr
    default_limit = runner.invoke(app, ["rules", "check", str(tmp_path / "etc" / "rules")])
    assert default_limit.exit_code == 1  # the 12-character limit really came from the file


def test_config_from_smsbot_config_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path / "etc", "param_max_length: 9\n")
    monkeypatch.setenv("SMSBOT_CONFIG", str(path))
    settings = load_settings()
    assert settings.param_max_length == 9
    assert settings.config_file == path


def test_config_from_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    here = tmp_path / "project"
    write_config(here, "param_max_length: 10\n")
    monkeypatch.chdir(here)
    settings = load_settings()
    assert settings.param_max_length == 10
    assert settings.config_file is not None
    assert settings.config_file.resolve() == (here / "config.yaml").resolve()


def test_option_beats_env_beats_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(Path.cwd(), "param_max_length: 7\n")
    from_env = write_config(tmp_path / "env", "param_max_length: 8\n")
    explicit = write_config(tmp_path / "opt", "param_max_length: 9\n")
    assert load_settings().param_max_length == 7
    monkeypatch.setenv("SMSBOT_CONFIG", str(from_env))
    assert load_settings().param_max_length == 8
    assert load_settings(explicit).param_max_length == 9


def test_missing_config_file_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml"):
        load_settings(missing)
    monkeypatch.setenv("SMSBOT_CONFIG", str(missing))
    with pytest.raises(ConfigError, match="SMSBOT_CONFIG"):
        load_settings()
    result = runner.invoke(app, ["rules", "check"])
    assert result.exit_code != 0
    assert "SMSBOT_CONFIG" in result.stderr


# ---------------------------------------------------------------- environment overrides


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path / "etc", "rules_dir: from_file\nparam_max_length: 12\n")
    monkeypatch.setenv("SMSBOT_RULES_DIR", str(tmp_path / "from_env"))
    monkeypatch.setenv("SMSBOT_PARAM_MAX_LENGTH", "8")
    settings = load_settings(path)
    assert settings.rules_dir == tmp_path / "from_env"
    assert settings.param_max_length == 8


def test_environment_works_without_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMSBOT_PARAM_MAX_LENGTH", "11")
    assert load_settings().param_max_length == 11


def test_param_max_length_setting_changes_what_check_accepts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rules = make_rules(tmp_path / "rules")
    assert runner.invoke(app, ["rules", "check", str(rules)]).exit_code == 1
    monkeypatch.setenv("SMSBOT_PARAM_MAX_LENGTH", "7")
    result = runner.invoke(app, ["rules", "check", str(rules)])
    assert result.exit_code == 0, result.output


def test_rules_dir_from_environment_is_used_by_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rules = make_rules(tmp_path / "elsewhere", CONTRACT.read_text(encoding="utf-8"))
    monkeypatch.setenv("SMSBOT_RULES_DIR", str(rules))
    result = runner.invoke(app, ["simulate", "--sign", "Acme Shop", "--json", "hi"])
    assert result.exit_code == 0, result.output
    assert '"template": "menu"' in result.stdout


# ---------------------------------------------------------------- paths


def test_relative_rules_dir_is_relative_to_the_config_file(tmp_path: Path) -> None:
    path = write_config(tmp_path / "etc" / "smsbot", "rules_dir: ../rules\n")
    settings = load_settings(path)
    assert settings.rules_dir.resolve() == (tmp_path / "etc" / "rules").resolve()


def test_absolute_rules_dir_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "abs" / "rules"
    path = write_config(tmp_path / "etc", f"rules_dir: {target}\n")
    assert load_settings(path).rules_dir == target


def test_cli_with_config_elsewhere_finds_its_rules_from_any_directory(tmp_path: Path) -> None:
    make_rules(tmp_path / "deploy" / "rules", CONTRACT.read_text(encoding="utf-8"))
    path = write_config(tmp_path / "deploy", "rules_dir: rules\n")
    result = runner.invoke(app, ["--config", str(path), "rules", "test"])
    assert result.exit_code == 0, result.output
    assert "2 ok, 0 failing" in result.stdout


# ---------------------------------------------------------------- mistakes


def test_unknown_key_is_named_with_did_you_mean(tmp_path: Path) -> None:
    path = write_config(tmp_path / "etc", "rules_dir: rules\nparam_max_lenght: 12\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    message = str(caught.value)
    assert "param_max_lenght" in message
    assert "did you mean 'param_max_length'" in message
    assert str(path) in message


def test_unknown_key_stops_the_cli_with_a_message(tmp_path: Path) -> None:
    path = write_config(tmp_path / "etc", "rule_dir: rules\n")
    result = runner.invoke(app, ["--config", str(path), "rules", "check"])
    assert result.exit_code != 0
    assert "rule_dir" in result.stderr
    assert "did you mean 'rules_dir'" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("value", ["lots", "0", "-3"])
def test_bad_value_in_file_names_the_setting(tmp_path: Path, value: str) -> None:
    path = write_config(tmp_path / "etc", f"param_max_length: {value}\n")
    with pytest.raises(ConfigError, match="param_max_length"):
        load_settings(path)
    result = runner.invoke(app, ["--config", str(path), "rules", "check", str(CONTRACT)])
    assert result.exit_code != 0
    assert "param_max_length" in result.stderr


def test_bad_value_in_environment_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMSBOT_PARAM_MAX_LENGTH", "six")
    with pytest.raises(ConfigError, match="SMSBOT_PARAM_MAX_LENGTH"):
        load_settings()


def test_config_that_is_not_a_mapping_is_an_error(tmp_path: Path) -> None:
    path = write_config(tmp_path / "etc", "- rules_dir\n- rules\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(path)


def test_config_with_bad_yaml_is_an_error(tmp_path: Path) -> None:
    path = write_config(tmp_path / "etc", "rules_dir: [rules\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_settings(path)


# ---------------------------------------------------------------- the project's own file


def test_repository_config_yaml_loads_and_points_at_the_example_rules() -> None:
    """The issue asks for a documented config.yaml at the top level; `make run` relies on it."""
    path = REPO / "config.yaml"
    assert path.is_file(), "config.yaml is missing at the top level of the repository"
    assert "#" in path.read_text(encoding="utf-8"), "config.yaml should document its settings"
    settings = load_settings(path)
    assert settings.rules_dir.resolve() == (REPO / "rules").resolve()
