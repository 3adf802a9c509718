"""``smsbot rules`` and ``smsbot simulate``: the commands that need rule files and nothing else.

They run where rules are written (an editor, CI, a laptop), so they need no database and, unless
``rules check --online`` asks Tencent, no network: they import only the rules package and the
settings. Editors and CI parse their output as well as people read it, so each problem is one
``file:line:col: severity: message`` line.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from bot.cli.common import PathArg, read_settings, refuse_rule_errors
from bot.cli.templates import template_report, tencent_templates_config
from bot.config import Settings
from bot.rules.loader import LoadResult, load_rules
from bot.rules.model import Reply
from bot.rules.schema import RuleFile, parse_duration
from bot.rules.simulation import Step, run_file_tests, simulate

app = typer.Typer(help="Check, test and describe rule files.", no_args_is_help=True)

LimitOpt = Annotated[
    int | None,
    typer.Option("--param-max-length", min=1, help="Tencent's template variable limit (default: from settings)"),
]


def _load(path: Path | None, param_max_length: int | None = None) -> tuple[LoadResult, Settings]:
    settings = read_settings()
    result = load_rules(path or settings.rules_dir, param_max_length=param_max_length or settings.param_max_length)
    return result, settings


@app.command("check")
def rules_check(
    path: PathArg = None,
    param_max_length: LimitOpt = None,
    online: Annotated[
        bool, typer.Option("--online", help="also compare the templates with Tencent's (smsbot templates sync)")
    ] = False,
) -> None:
    """Check rule files; print every problem as file:line:col: message. Exit 1 on errors."""
    # Missing credentials: refuse before any output.
    config = tencent_templates_config(read_settings()) if online else None
    result, settings = _load(path, param_max_length)
    diagnostics = list(result.diagnostics)
    compared = ""
    if config is not None:
        report = template_report(path or settings.rules_dir, config)
        diagnostics.extend(d.diagnostic() for d in report.differences)
        compared = f"; {len(report.rule_templates)} template(s) compared with Tencent"
    for diagnostic in sorted(diagnostics):
        typer.echo(str(diagnostic))
    errors = sum(1 for d in diagnostics if d.is_error)
    warnings = len(diagnostics) - errors
    typer.echo(f"{len(result.files)} file(s) checked: {errors} error(s), {warnings} warning(s){compared}", err=True)
    raise typer.Exit(1 if errors else 0)


@app.command("test")
def rules_test(path: PathArg = None, param_max_length: LimitOpt = None) -> None:
    """Run the tests: of every rule file. Exit 1 on any failure."""
    result, _ = _load(path, param_max_length)
    if result.ruleset is None:
        for diagnostic in sorted(result.errors):
            typer.echo(str(diagnostic))
        typer.echo("the rules have errors; run 'smsbot rules check' for details", err=True)
        raise typer.Exit(1)
    passed = failed = 0
    for compiled in result.ruleset.files:
        for outcome in run_file_tests(compiled):
            if outcome.passed:
                passed += 1
                typer.echo(f"ok    {outcome.path}:{outcome.line}: {outcome.name}")
            else:
                failed += 1
                typer.echo(f"FAIL  {outcome.path}:{outcome.line}: {outcome.name}")
                for failure in outcome.failures:
                    typer.echo(f"      {failure}")
    typer.echo(f"rule tests: {passed} ok, {failed} failing")
    raise typer.Exit(1 if failed else 0)


@app.command("schema")
def rules_schema() -> None:
    """Print the JSON Schema of rule files, for editors that validate YAML as you type."""
    schema: dict[str, Any] = {"$schema": "https://json-schema.org/draft/2020-12/schema"}
    schema.update(RuleFile.model_json_schema())
    typer.echo(json.dumps(schema, indent=2, ensure_ascii=False))


def simulate_command(
    messages: Annotated[list[str], typer.Argument(help="the customer's messages, in order")],
    sign: Annotated[str, typer.Option("--sign", help="the SMS signature the customer replies to")],
    rules: Annotated[Path | None, typer.Option("--rules", help="rule file or folder (default: rules_dir)")] = None,
    mobile: Annotated[str, typer.Option("--from", help="the customer's number")] = "13800000000",
    nationcode: Annotated[str, typer.Option("--nationcode", help="country code")] = "86",
    gap: Annotated[str, typer.Option("--gap", help="simulated time between messages, e.g. 31m")] = "1s",
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per message")] = False,
) -> None:
    """Feed MESSAGES to one fresh conversation and show what the bot would answer. Nothing is stored or sent."""
    try:
        step_gap = parse_duration(gap)
    except ValueError as exc:
        typer.echo(f"smsbot: --gap: {exc}", err=True)
        raise typer.Exit(2) from exc
    result, _ = _load(rules)
    if result.ruleset is None:
        refuse_rule_errors(result.errors)
    steps = simulate(
        result.ruleset,
        messages,
        sign=sign,
        start=datetime.now(UTC),
        gap=step_gap,
        nationcode=nationcode,
        mobile=mobile,
    )
    for step in steps:
        if as_json:
            sys.stdout.write(json.dumps(_step_json(step), ensure_ascii=False) + "\n")
        else:
            _print_step(step)


def _step_json(step: Step) -> dict[str, Any]:
    """One ``simulate --json`` line: its field names are an interface scripts read, so they only ever grow."""
    d = step.decision
    return {
        "text": step.text,
        "rule": d.rule,
        "state": d.state,
        "replies": [_reply_json(r) for r in d.replies],
        "opted_out": d.opted_out,
    }


def _reply_json(reply: Reply) -> dict[str, Any]:
    return {
        "template": reply.template,
        "template_id": reply.template_id,
        "params": list(reply.params),
        "text": reply.text,
    }


def _print_step(step: Step) -> None:
    d = step.decision
    local = step.at.astimezone()
    typer.echo(f"[{local:%H:%M:%S}] > {step.text}")
    for reply in d.replies:
        sms = f"{reply.segments} SMS, {reply.length} chars {reply.encoding}"
        typer.echo(f"           < {reply.text}")
        typer.echo(f"             ({reply.template} #{reply.template_id} params={list(reply.params)} {sms})")
    if not d.replies:
        why = "opted out" if d.opted_out else ("no rule matched" if d.rule is None else "no reply")
        typer.echo(f"           (silent: {why})")
    notes = [f"rule {d.rule}" if d.rule else "no rule", f"state {d.state_before or '-'} -> {d.state}"]
    if d.expired:
        notes.append("previous state expired")
    if d.opt_change:
        notes.append(d.opt_change.replace("_", "-"))
    typer.echo("             " + ", ".join(notes))
    for error in d.errors:
        typer.echo(f"             error: {error}")
