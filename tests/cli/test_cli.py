"""The `smsbot` command as users run it: exit codes, printed problems, JSON lines."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bot.cli import app
from bot.rules.yaml_source import load_located
from tests.support import CONTRACT, PG_URL, PG_URL_ENV, REPO, reset_postgres

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


# ---------------------------------------------------------------- runs checked against a table
#
# Most of what `rules check`, `rules test` and a refused `simulate` promise has one shape: a rule file
# goes in, an exit code and some lines come out. Each case below is one such run, so adding a
# case is one entry, and every case is held to the same rules as the others: no traceback, no
# unexpected exception, and the exit code (printed with the output when it is wrong).


@dataclass(frozen=True)
class At:
    """A diagnostic a line of stdout must start with: ``{path}:line:col: message``, col being where ``needle`` is."""

    line: int
    needle: str
    message: str


@dataclass(frozen=True)
class Case:
    """One run of ``smsbot``. ``{path}`` in ``argv`` and in the expected text is the rule file of the case:
    ``source`` written to ``name`` in a fresh folder, or no file at all when ``source`` is None."""

    id: str
    argv: tuple[str, ...]
    exit_code: int
    source: str | None = None
    name: str = "rules.yaml"
    stdout: tuple[str, ...] = ()
    """Fragments stdout contains."""
    stderr: tuple[str, ...] = ()
    """Fragments stderr contains."""
    stdout_lacks: tuple[str, ...] = ()
    stdout_starts: tuple[At, ...] = ()
    """Diagnostics some line of stdout starts with."""
    stdout_patterns: tuple[str, ...] = ()
    """Regular expressions some line of stdout matches (``{path}`` is escaped)."""
    only_diagnostics: bool = False
    """Every line of stdout is a ``{path}:line:col: error|warning: `` diagnostic."""
    stdout_empty: bool = False


def col(path: Path, line: int, needle: str) -> int:
    return path.read_text(encoding="utf-8").splitlines()[line - 1].index(needle) + 1


def run_case(case: Case, tmp_path: Path) -> None:
    path = tmp_path / case.name
    if case.source is not None:
        path.write_text(case.source, encoding="utf-8")

    def fill(text: str) -> str:
        return text.replace("{path}", str(path))

    result = runner.invoke(app, [fill(arg) for arg in case.argv])
    assert result.exit_code == case.exit_code, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    for fragment in case.stdout:
        assert fill(fragment) in result.stdout
    for fragment in case.stderr:
        assert fill(fragment) in result.stderr
    for fragment in case.stdout_lacks:
        assert fill(fragment) not in result.stdout
    lines = result.stdout.splitlines()
    for at in case.stdout_starts:
        start = f"{path}:{at.line}:{col(path, at.line, at.needle)}: {at.message}"
        assert any(line.startswith(start) for line in lines), (start, lines)
    for pattern in case.stdout_patterns:
        assert re.search(pattern.replace("{path}", re.escape(str(path))), result.stdout, re.M), pattern
    if case.only_diagnostics:
        for line in lines:
            assert re.match(rf"^{re.escape(str(path))}:\d+:\d+: (error|warning): ", line), line
    if case.stdout_empty:
        assert result.stdout == ""


def table(*cases: Case) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in cases])


def contract_with(old: str, new: str) -> str:
    """The contract file with one line changed (failing loudly if the line is no longer there)."""
    text = CONTRACT.read_text(encoding="utf-8")
    changed = text.replace(old, new)
    assert changed != text, f"{old!r} is not in {CONTRACT}"
    return changed


BROKEN = textwrap.dedent(
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
    """
)
TYPO_AND_MORE = textwrap.dedent(
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
    """
)
ONLY_WARNINGS = textwrap.dedent(
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
    """
)
SEVEN_CHAR_PARAM = textwrap.dedent(
    """\
    signature: Acme
    templates:
      hours: {id: "1", text: "Open from {1}"}
    otherwise: {reply: hours, params: ["9:00 am"]}
    """
)
UNKNOWN_TEMPLATE = "signature: Acme\notherwise: {reply: nothing}\n"
WRONG_EXPECTATION = contract_with(
    '      - {reply: status, params: ["none", "sent"]}',
    '      - {reply: hours, params: ["none", "sent"]}',
)


# ---------------------------------------------------------------- rules check


@table(
    Case(
        "contract-exits-0",
        ("rules", "check", str(CONTRACT)),
        exit_code=0,
        stdout_lacks=(": error:",),
        stderr=("0 error(s)",),
    ),
    Case(
        "every-problem-as-file-line-col-exits-1",
        ("rules", "check", "{path}"),
        exit_code=1,
        source=BROKEN,
        name="broken.yaml",
        stdout_starts=(
            At(7, "'^(", "error: invalid regex"),
            At(12, "mneu", "error: reply names unknown template 'mneu'"),
            At(13, "nowhere", "error: goto names unknown state 'nowhere'"),
        ),
        only_diagnostics=True,
        stderr=("3 error(s)",),
    ),
    # A typo'd key must not hide the file's other problems: users fix everything from one run.
    Case(
        "unknown-key-and-other-problems-in-one-run",
        ("rules", "check", "{path}"),
        exit_code=1,
        source=TYPO_AND_MORE,
        name="broken.yaml",
        stdout_starts=(
            At(7, "kewords", "error: unknown key 'kewords' (did you mean 'keywords'?)"),
            At(10, "mneu", "error: reply names unknown template 'mneu'"),
        ),
    ),
    Case(
        "only-warnings-exits-0",
        ("rules", "check", "{path}"),
        exit_code=0,
        source=ONLY_WARNINGS,
        name="warn.yaml",
        stdout_patterns=(r"^{path}:9:\d+: warning: .*customer text",),
    ),
    Case(
        "param-over-the-default-limit",
        ("rules", "check", "{path}"),
        exit_code=1,
        source=SEVEN_CHAR_PARAM,
        name="long.yaml",
        stdout=("{path}:4:", "7 characters"),
    ),
    Case(
        "param-max-length-option-raises-the-limit",
        ("rules", "check", "--param-max-length", "12", "{path}"),
        exit_code=0,
        source=SEVEN_CHAR_PARAM,
        name="long.yaml",
    ),
    Case(
        "missing-path-is-an-error-not-a-crash",
        ("rules", "check", "{path}"),
        exit_code=1,
        name="nope",
        stdout=("no such file or folder",),
    ),
)
def test_rules_check(case: Case, tmp_path: Path) -> None:
    run_case(case, tmp_path)


# ---------------------------------------------------------------- rules test


@table(
    Case(
        "contract-tests-pass",
        ("rules", "test", str(CONTRACT)),
        exit_code=0,
        stdout=("order status through the menu", "opt-out silences the bot until START", "2 ok, 0 failing"),
    ),
    Case(
        "failure-names-test-step-expected-and-actual",
        ("rules", "test", "{path}"),
        exit_code=1,
        source=WRONG_EXPECTATION,
        name="wrong.yaml",
        stdout=(
            "FAIL",
            "order status through the menu",
            "step 2",
            "'1'",  # what was said at that step
            "expected reply 'hours'",
            "got 'status'",
            "1 ok, 1 failing",
        ),
    ),
    Case(
        "broken-rules-exit-1-with-the-errors",
        ("rules", "test", "{path}"),
        exit_code=1,
        source=UNKNOWN_TEMPLATE,
        name="broken.yaml",
        stdout=("{path}:2:", "unknown template 'nothing'"),
    ),
)
def test_rules_test(case: Case, tmp_path: Path) -> None:
    run_case(case, tmp_path)


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


@dataclass(frozen=True)
class Conversation:
    """``simulate --rules contract.yaml --json ARGS`` and what each of its JSON lines must hold.

    ``lines`` has one entry per message: fields the line must have, with these values. ``templates`` is
    the reply templates in order; a compiled pattern must match the whole value.
    """

    id: str
    args: tuple[str, ...]
    lines: tuple[dict[str, object], ...]


MENU_REPLY = {
    "template": "menu",
    "template_id": "1490001",
    "params": [],
    "text": "Reply 1 for order status, 2 for opening hours. Reply TD to opt out.",
}
STATUS_REPLY = {"template": "status", "template_id": "1490002", "params": ["none", "sent"], "text": "Order none: sent."}
NO_RULE: dict[str, object] = {"replies": [], "rule": None, "opted_out": False}


def simulate(*args: str) -> list[dict[str, object]]:
    result = runner.invoke(app, ["simulate", "--rules", str(CONTRACT), "--json", *args])
    assert result.exit_code == 0, result.output
    return json_lines(result.stdout)


@pytest.mark.parametrize(
    "conversation",
    [
        pytest.param(c, id=c.id)
        for c in (
            Conversation(
                "menu-status-opt-out",
                ("--sign", SIGN, "hi", "1", "TD", "MENU"),
                (
                    {
                        "text": "hi",
                        "rule": re.compile(r"contract\.yaml:\d+"),
                        "state": "menu",
                        "replies": [MENU_REPLY],
                        "opted_out": False,
                    },
                    {"replies": [STATUS_REPLY]},
                    {"opted_out": True, "templates": ["bye"]},
                    {"replies": [], "opted_out": True},
                ),
            ),
            Conversation("quick-answer-keeps-the-menu", ("--sign", SIGN, "hi", "1"), ({}, {"templates": ["status"]})),
            Conversation(
                "gap-lets-the-menu-expire",
                ("--sign", SIGN, "--gap", "31m", "hi", "1"),
                ({"state": "menu"}, {"templates": ["unknown"], "state": "idle"}),
            ),
            Conversation(
                "gap-shorter-than-expiry-keeps-the-menu",
                ("--sign", SIGN, "--gap", "29m", "hi", "1"),
                ({}, {"templates": ["status"]}),
            ),
            Conversation(
                "unknown-signature-without-default-no-reply", ("--sign", "Nobody Ltd", "hi", "TD"), (NO_RULE,) * 2
            ),
        )
    ],
)
def test_simulate_json(conversation: Conversation) -> None:
    """One JSON object per message, with exactly the documented keys, holding what the case expects."""
    lines = simulate(*conversation.args)
    assert len(lines) == len(conversation.lines)
    for line, expected in zip(lines, conversation.lines, strict=True):
        assert set(line) == LINE_KEYS
        replies = line["replies"]
        assert isinstance(replies, list)
        for reply in replies:
            assert set(reply) == REPLY_KEYS
        actual = {**line, "templates": [reply["template"] for reply in replies]}
        for key, value in expected.items():
            if isinstance(value, re.Pattern):
                assert value.fullmatch(str(actual[key])), (key, actual[key])
            else:
                assert actual[key] == value, (key, actual[key])


def test_simulate_transcript_is_readable() -> None:
    result = runner.invoke(app, ["simulate", "--rules", str(CONTRACT), "--sign", SIGN, "hi", "1"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "hi" in out
    assert "Reply 1 for order status, 2 for opening hours. Reply TD to opt out." in out
    assert "Order none: sent." in out
    assert not out.lstrip().startswith("{")  # not JSON


@table(
    *(
        Case(
            f"bad-gap-{gap}",
            ("simulate", "--rules", str(CONTRACT), "--sign", SIGN, "--gap", gap, "hi"),
            exit_code=2,
            stderr=("--gap", "duration"),
            stdout_empty=True,
        )
        for gap in ("5x", "0s", "soon", "-1m")
    ),
    Case(
        "broken-rules-say-where",
        ("simulate", "--rules", "{path}", "--sign", "Acme", "--json", "hi"),
        exit_code=1,
        source=UNKNOWN_TEMPLATE,
        name="broken.yaml",
        stderr=("{path}:2:",),
        stdout_empty=True,
    ),
)
def test_simulate_refuses(case: Case, tmp_path: Path) -> None:
    run_case(case, tmp_path)


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


def test_serve_workers_is_refused_on_sqlite_and_with_pull(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """More HTTP processes on SQLite would only queue for its one write lock; and only one process may pull."""
    import uvicorn

    monkeypatch.chdir(tmp_path)
    started: list[object] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append(app))
    env = {"SMSBOT_RULES_DIR": str(REPO / "rules"), "SMSBOT_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"}
    result = CliRunner().invoke(app, ["serve", "--workers", "2"], env=env)
    assert result.exit_code == 2
    assert "--workers 2 needs PostgreSQL" in result.stderr
    env["SMSBOT_DATABASE_URL"] = "postgresql+psycopg://nobody@127.0.0.1:1/none"
    result = CliRunner().invoke(app, ["serve", "--workers", "2", "--pull"], env=env)
    assert result.exit_code == 2
    assert "run one `smsbot pull`" in result.stderr
    assert started == []


@pytest.mark.skipif(not PG_URL, reason=f"{PG_URL_ENV} is not set")
def test_serve_workers_hands_each_worker_the_same_choices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--workers`` starts uvicorn with the worker factory, which builds each worker's app from the same choices."""
    import uvicorn

    from bot.cli import serving
    from bot.store.db import upgrade

    assert PG_URL is not None
    reset_postgres(PG_URL)
    upgrade(PG_URL)
    db_url = PG_URL
    monkeypatch.setenv(serving._WORKER_OPTIONS, "")  # restored after: serve sets it for its workers
    monkeypatch.chdir(tmp_path)
    runs: list[tuple[object, dict[str, object]]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: runs.append((app, kw)))
    env = {"SMSBOT_RULES_DIR": str(REPO / "rules"), "SMSBOT_DATABASE_URL": db_url}
    result = CliRunner().invoke(app, ["serve", "--workers", "3", "--no-deliver"], env=env)
    assert result.exit_code == 0, result.output
    [(target, options)] = runs
    assert target == "bot.cli.serving:worker_app"
    assert (options["factory"], options["workers"]) == (True, 3)
    assert "3 workers" in result.stdout
    assert "not delivering" in result.stdout
    # what one worker process then does: the same settings, --no-deliver kept
    monkeypatch.setenv("SMSBOT_RULES_DIR", str(REPO / "rules"))
    monkeypatch.setenv("SMSBOT_DATABASE_URL", db_url)
    worker = serving.worker_app()
    assert worker.state.runtime.settings.deliver is False
    assert worker.state.runtime.pipeline.mode == "process"
