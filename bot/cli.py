"""The ``smsbot`` command.

Thin on purpose: it reads settings, calls the rules package and prints. The
command names, flags and ``--json`` fields are an interface users script
against, so they only ever grow.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from bot.config import ConfigError, Settings, load_settings
from bot.rules.loader import LoadResult, load_rules
from bot.rules.model import Reply
from bot.rules.schema import RuleFile, parse_duration
from bot.rules.simulation import Step, run_file_tests, simulate

app = typer.Typer(help="smsbot: a conversational SMS auto-responder for Tencent Cloud SMS.", no_args_is_help=True)
rules_app = typer.Typer(help="Check, test and describe rule files.", no_args_is_help=True)
app.add_typer(rules_app, name="rules")


class _State:
    config: Path | None = None


def _settings() -> Settings:
    try:
        return load_settings(_State.config)
    except ConfigError as exc:
        typer.echo(f"smsbot: {exc}", err=True)
        raise typer.Exit(2) from exc


@app.callback()
def main(
    config: Annotated[
        Path | None,
        typer.Option("--config", help="config file (default: $SMSBOT_CONFIG, then ./config.yaml)"),
    ] = None,
) -> None:
    """smsbot: a conversational SMS auto-responder for Tencent Cloud SMS."""
    _State.config = config


def _load(path: Path | None, param_max_length: int | None = None) -> tuple[LoadResult, Settings]:
    settings = _settings()
    result = load_rules(path or settings.rules_dir, param_max_length=param_max_length or settings.param_max_length)
    return result, settings


PathArg = Annotated[Path | None, typer.Argument(help="rule file or folder (default: rules_dir from settings)")]
LimitOpt = Annotated[
    int | None,
    typer.Option("--param-max-length", min=1, help="Tencent's template variable limit (default: from settings)"),
]


@rules_app.command("check")
def rules_check(path: PathArg = None, param_max_length: LimitOpt = None) -> None:
    """Check rule files; print every problem as file:line:col: message. Exit 1 on errors."""
    result, _ = _load(path, param_max_length)
    for diagnostic in sorted(result.diagnostics):
        typer.echo(str(diagnostic))
    errors = len(result.errors)
    warnings = len(result.diagnostics) - errors
    typer.echo(f"{len(result.files)} file(s) checked: {errors} error(s), {warnings} warning(s)", err=True)
    raise typer.Exit(1 if errors else 0)


@rules_app.command("test")
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


@rules_app.command("schema")
def rules_schema() -> None:
    """Print the JSON Schema of rule files, for editors that validate YAML as you type."""
    schema: dict[str, Any] = {"$schema": "https://json-schema.org/draft/2020-12/schema"}
    schema.update(RuleFile.model_json_schema())
    typer.echo(json.dumps(schema, indent=2, ensure_ascii=False))


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


@app.command("simulate")
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
        for diagnostic in sorted(result.errors):
            typer.echo(str(diagnostic), err=True)
        typer.echo("the rules have errors; fix them first (smsbot rules check)", err=True)
        raise typer.Exit(1)
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
            d = step.decision
            line = {
                "text": step.text,
                "rule": d.rule,
                "state": d.state,
                "replies": [_reply_json(r) for r in d.replies],
                "opted_out": d.opted_out,
            }
            sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
        else:
            _print_step(step)


db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="target revision")] = "head") -> None:
    """Apply the database migrations (creates the tables on a new database)."""
    from bot.store.db import upgrade

    settings = _settings()
    upgrade(settings.database_url, revision)
    typer.echo(f"database at {revision}: {_safe_url(settings.database_url)}")


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@app.command("serve")
def serve(
    host: Annotated[str | None, typer.Option("--host", help="address to bind (default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option("--port", help="port (default 8000)")] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="allow a non-loopback address without a callback token")
    ] = False,
) -> None:
    """Run the callback server and the delivery loop (in a writer process unless SMSBOT_WRITER=thread)."""
    import logging

    import uvicorn

    from bot.live_rules import LiveRules, RulesInvalid
    from bot.sending import make_sender
    from bot.store.db import SchemaOutOfDate, check_schema, make_engine
    from bot.web.app import create_app

    settings = _settings()
    bind_host = host or settings.host
    bind_port = port or settings.port
    if bind_host not in _LOOPBACK and settings.callback_token is None and not insecure:
        typer.echo(
            f"smsbot: refusing to listen on {bind_host} without a callback token: set SMSBOT_CALLBACK_TOKEN "
            "(Tencent then calls /sms/callback?token=...) or pass --insecure",
            err=True,
        )
        raise typer.Exit(2)
    try:
        sender = make_sender(settings)
    except ConfigError as exc:
        typer.echo(f"smsbot: {exc}", err=True)
        raise typer.Exit(2) from exc
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = make_engine(settings.database_url)
    try:
        check_schema(engine)
    except SchemaOutOfDate as exc:
        typer.echo(f"smsbot: {exc}", err=True)
        raise typer.Exit(2) from exc
    rules = LiveRules(settings.rules_dir, settings.param_max_length)
    try:
        rules.load()
    except RulesInvalid as exc:
        typer.echo(f"smsbot: {exc}", err=True)
        raise typer.Exit(1) from exc
    application = create_app(settings, engine=engine, rules=rules, sender=sender, writer_mode=settings.writer)
    if settings.writer == "process":
        engine.dispose()  # the writer process opens its own; this one only checked the schema
    typer.echo(
        f"smsbot: listening on http://{bind_host}:{bind_port} (database {_safe_url(settings.database_url)}, "
        f"writer {settings.writer})"
    )
    uvicorn.run(application, host=bind_host, port=bind_port, log_level="info", access_log=False)
