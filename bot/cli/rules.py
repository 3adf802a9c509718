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
from bot.rules.model import Reply, WebhookCall, WebhookOutcome
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
    extend: Annotated[str, typer.Option("--extend", help="Tencent's extend code the customer replied to")] = "",
    state: Annotated[
        str | None, typer.Option("--state", help="begin in this state, as a conversation the start API began")
    ] = None,
    var: Annotated[
        list[str] | None, typer.Option("--var", help="a variable at the start, NAME=VALUE (repeatable)")
    ] = None,
    webhook: Annotated[
        list[str] | None,
        typer.Option(
            "--webhook",
            help="a webhook's canned answer: NAME=FILE (its JSON), NAME=error:timeout or NAME=status:500 "
            "(repeatable); a call without one is not made and takes on_error",
        ),
    ] = None,
) -> None:
    """Feed MESSAGES to one fresh conversation and show what the bot would answer. Nothing is stored or sent."""
    try:
        step_gap = parse_duration(gap)
    except ValueError as exc:
        typer.echo(f"smsbot: --gap: {exc}", err=True)
        raise typer.Exit(2) from exc
    variables = dict(_pair("--var", item) for item in var or ())
    answers = {name: _canned(name, source) for name, source in (_pair("--webhook", w) for w in webhook or ())}
    result, _ = _load(rules)
    if result.ruleset is None:
        refuse_rule_errors(result.errors)
    answering = result.ruleset.for_signature(sign, extend)
    if state is not None and answering is not None and state not in answering.states:
        known = ", ".join(answering.states)
        typer.echo(f"smsbot: --state: {answering.name} has no state {state!r}; its states: {known}", err=True)
        raise typer.Exit(2)
    if answering is not None:
        for name in answers:
            if name not in answering.webhooks:
                known = ", ".join(answering.webhooks) or "none"
                typer.echo(
                    f"smsbot: --webhook: {answering.name} has no webhook {name!r}; its webhooks: {known}", err=True
                )
                raise typer.Exit(2)
    steps = simulate(
        result.ruleset,
        messages,
        sign=sign,
        start=datetime.now(UTC),
        gap=step_gap,
        nationcode=nationcode,
        mobile=mobile,
        variables=variables,
        state=state,
        extend=extend,
        webhooks=answers,
    )
    for step in steps:
        if as_json:
            sys.stdout.write(json.dumps(_step_json(step), ensure_ascii=False) + "\n")
        else:
            _print_step(step)


def _pair(option: str, item: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep or not name.strip():
        typer.echo(f"smsbot: {option}: expected NAME=VALUE, got {item!r}", err=True)
        raise typer.Exit(2)
    return name.strip(), value


def _canned(name: str, source: str) -> WebhookOutcome:
    """``--webhook NAME=...``: a JSON file, ``error:WHAT`` or ``status:CODE``."""
    kind, _, detail = source.partition(":")
    if kind == "error" and detail:
        return WebhookOutcome(ok=False, error=detail)
    if kind == "status" and detail.isdigit() and not 200 <= int(detail) < 300:
        return WebhookOutcome(ok=False, error=f"HTTP {detail}")
    try:
        return WebhookOutcome(ok=True, data=json.loads(Path(source).read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        typer.echo(
            f"smsbot: --webhook {name}: cannot read JSON from {source!r} ({exc}); "
            "give NAME=FILE, NAME=error:timeout or NAME=status:500",
            err=True,
        )
        raise typer.Exit(2) from exc


def _step_json(step: Step) -> dict[str, Any]:
    """One ``simulate --json`` line: its field names are an interface scripts read, so they only ever grow.

    ``call`` and ``outcome`` are there only for a message whose rule called a webhook.
    """
    d = step.decision
    line: dict[str, Any] = {
        "text": step.text,
        "rule": d.rule,
        "state": d.state,
        "replies": [_reply_json(r) for r in d.replies],
        "opted_out": d.opted_out,
    }
    if step.call is not None and step.outcome is not None:
        line["call"] = _call_json(step.call)
        line["outcome"] = {
            "made": not step.unanswered,
            "ok": step.outcome.ok,
            "data": step.outcome.data,
            "error": step.outcome.error,
        }
    return line


def _call_json(call: WebhookCall) -> dict[str, Any]:
    return {
        "webhook": call.webhook,
        "method": call.method,
        "url": call.url,
        "body": dict(call.body) if call.body is not None else None,
        "timeout": call.timeout,
        "save_as": call.save_as,
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
    if step.call is not None and step.outcome is not None:
        _print_call(step.call, step.outcome, unanswered=step.unanswered)
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
    for error in step.errors:
        typer.echo(f"             error: {error}")


def _print_call(call: WebhookCall, outcome: WebhookOutcome, *, unanswered: bool) -> None:
    body = json.dumps(dict(call.body), ensure_ascii=False) if call.body is not None else "no body"
    typer.echo(f"           ~ webhook {call.webhook}: {call.method} {call.url} {body} (timeout {call.timeout:g}s)")
    if unanswered:
        typer.echo(f"             not called (no --webhook {call.webhook}=FILE given): taking on_error")
    elif outcome.ok:
        saved = f" -> vars.{call.save_as}" if call.save_as else ""
        typer.echo(f"             answer: {json.dumps(outcome.data, ensure_ascii=False)}{saved}")
    else:
        typer.echo(f"             failed: {outcome.error}: taking on_error")
