"""``smsbot start``: start conversations from the shell, for a few numbers or a whole CSV file.

The same checks and the same write as ``POST /api/v1/conversations`` (``bot/outreach``),
against the rules in ``rules_dir``; the messages are recorded as started by ``cli``.
The template's params come from ``--param`` options, in order: plain text or a Jinja2
expression over the vars (``--param '{{ vars.appointment }}'``), rendered for each number
with its vars (the CSV row's columns over the ``--var`` values over what is stored).
Rows go to the database 1,000 per transaction; a running server's delivery loop sends them
within a second. ``--dry-run`` does all of it and rolls back: the counts and the rendered
texts are exact, nothing is stored.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bot.cli.common import checked_engine, read_settings, refuse_rule_errors

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from bot.config import Settings
    from bot.outreach.check import CheckedStart, StartRequest
    from bot.rules.model import Ruleset

CHUNK = 1000
SAMPLES = 3


@dataclass
class _Summary:
    queued: int = 0
    looping: int = 0
    opted_out: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)


def parse_vars(pairs: list[str] | None) -> dict[str, str]:
    """``--var k=v`` options as a dict; exit 2 on one without ``=``."""
    values: dict[str, str] = {}
    for pair in pairs or ():
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            typer.echo(f"smsbot: --var {pair!r}: write it as NAME=VALUE", err=True)
            raise typer.Exit(2)
        values[name.strip()] = value
    return values


def start_command(
    numbers: Annotated[
        list[str] | None, typer.Argument(help="numbers: +8613800138000, +85291234567, or 13800138000 (= +86)")
    ] = None,
    sign: Annotated[str, typer.Option("--sign", help="the SMS signature (its rule file's)")] = "",
    template: Annotated[str, typer.Option("--template", help="a template name from that rule file")] = "",
    state: Annotated[str | None, typer.Option("--state", help="the state to enter (default: the file's start)")] = None,
    var: Annotated[list[str] | None, typer.Option("--var", help="NAME=VALUE, merged into every number's vars")] = None,
    param: Annotated[
        list[str] | None,
        typer.Option("--param", help="the template's params in order: text or '{{ vars.NAME }}' (repeat the option)"),
    ] = None,
    csv_file: Annotated[
        Path | None, typer.Option("--csv", help="CSV: nationcode,mobile, then one column per var", exists=True)
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="render and count, queue nothing")] = False,
) -> None:
    """Start conversations: send TEMPLATE to each number and put it in STATE with the given vars."""
    from bot.outreach.check import StartRefused, StartRequest, check_start
    from bot.outreach.contacts_csv import CsvProblem, CsvRefused, count_rows, read_rows
    from bot.outreach.numbers import parse_number
    from bot.rules.loader import load_rules

    if not sign or not template:
        typer.echo("smsbot: give --sign and --template", err=True)
        raise typer.Exit(2)
    if bool(numbers) == (csv_file is not None):
        typer.echo("smsbot: give either NUMBER... or --csv FILE", err=True)
        raise typer.Exit(2)
    settings = read_settings()
    loaded = load_rules(settings.rules_dir, param_max_length=settings.param_max_length)
    if loaded.ruleset is None:
        refuse_rule_errors(loaded.errors)
    ruleset: Ruleset = loaded.ruleset
    common_vars = parse_vars(var)

    def request(nationcode: str, mobile: str, row_vars: dict[str, str]) -> StartRequest:
        return StartRequest(sign, nationcode, mobile, template, list(param or ()), state, {**common_vars, **row_vars})

    # Refuse what is wrong for every row (signature, template, state, param count) before reading anything.
    try:
        check_start(ruleset, request("86", "13800000000", {}), param_max_length=settings.param_max_length)
    except StartRefused as exc:
        if exc.field not in ("nationcode", "mobile") and not exc.field.startswith("vars"):
            typer.echo(f"smsbot: {_option(exc.field)}: {exc.detail}", err=True)
            raise typer.Exit(2) from exc

    engine = checked_engine(settings)
    run = _Run(engine, ruleset, settings, dry_run)
    try:
        with contextlib.ExitStack() as stack:
            if csv_file is not None:
                try:
                    total = count_rows(csv_file)
                    items = read_rows(csv_file)
                    bar = stack.enter_context(typer.progressbar(length=total, label="starting", file=sys.stderr))
                    for item in items:
                        bar.update(1)
                        if isinstance(item, CsvProblem):
                            run.summary.rejected.append(str(item))
                        else:
                            run.add(f"line {item.line}", request(item.nationcode, item.mobile, item.vars))
                except CsvRefused as exc:
                    typer.echo(f"smsbot: {exc}", err=True)
                    raise typer.Exit(2) from exc
            else:
                for number in numbers or ():
                    try:
                        nationcode, mobile = parse_number(number)
                    except StartRefused as exc:
                        run.summary.rejected.append(f"{number}: {exc.detail}")
                        continue
                    run.add(number, request(nationcode, mobile, {}))
            run.flush()
    finally:
        engine.dispose()
    _print_summary(run.summary, dry_run)
    if run.summary.rejected:
        raise typer.Exit(1)


def _option(field_name: str) -> str:
    """A refusal's field as the option to change."""
    if field_name.startswith("params"):
        return "--param"
    return {"signature": "--sign", "template": "--template", "state": "--state"}.get(field_name, field_name)


class _Run:
    """Checked starts gathered and written ``CHUNK`` at a time, one transaction each (rolled back for a dry run)."""

    def __init__(self, engine: Engine, ruleset: Ruleset, settings: Settings, dry_run: bool) -> None:
        self.engine, self.ruleset, self.settings, self.dry_run = engine, ruleset, settings, dry_run
        from bot.events.endpoints import EndpointError, LiveEndpoints, config_endpoints

        try:  # the events a start causes (state_entered) go where the server would send them
            self.endpoints = LiveEndpoints(config_endpoints(settings.events), self).current()
        except EndpointError as exc:
            typer.echo(f"smsbot: events: {exc}", err=True)
            raise typer.Exit(2) from exc
        self.pending: list[tuple[str, CheckedStart]] = []
        self.summary = _Summary()

    def add(self, label: str, request: StartRequest) -> None:
        from bot.outreach.check import StartRefused, check_start

        try:
            checked = check_start(self.ruleset, request, param_max_length=self.settings.param_max_length)
        except StartRefused as exc:
            self.summary.rejected.append(f"{label}: {exc.field}: {exc.detail}")
            return
        self.pending.append((label, checked))
        if len(self.pending) >= CHUNK:
            self.flush()

    def flush(self) -> None:
        from bot.console.users import audit
        from bot.outreach.write import start_conversations
        from bot.runtime.pipeline import inbound_policy
        from bot.store.db import WRITE_OPTIONS

        if not self.pending:
            return
        summary = self.summary
        now = datetime.now(UTC)
        with self.engine.connect().execution_options(**WRITE_OPTIONS) as conn:
            transaction = conn.begin()
            try:
                results = start_conversations(
                    conn,
                    [start for _, start in self.pending],
                    now=now,
                    started_by="cli",
                    policy=inbound_policy(self.settings),
                    event_endpoints=self.endpoints,
                )
                counts = {"started": 0, "opted_out": 0, "refused": 0}
                for (label, _), result in zip(self.pending, results, strict=True):
                    counts[result.outcome] += 1
                    if result.outcome == "opted_out":
                        summary.opted_out.append(label)
                    elif result.outcome == "refused":
                        summary.rejected.append(f"{label}: {result.field}: {result.detail}")
                    elif result.message_status == "looping":
                        summary.looping += 1
                    else:
                        summary.queued += 1
                        if len(summary.samples) < SAMPLES and result.text is not None:
                            summary.samples.append(f"{label}: {result.text}")
                audit(conn, actor="cli", action="cli.start", detail={**counts, "dry_run": self.dry_run}, now=now)
            except BaseException:
                transaction.rollback()
                raise
            if self.dry_run:
                transaction.rollback()
            else:
                transaction.commit()
        self.pending.clear()


def _print_summary(summary: _Summary, dry_run: bool) -> None:
    for sample in summary.samples:
        typer.echo(f"{'would send' if dry_run else 'sent'} {sample}")
    typer.echo(f"{'would queue' if dry_run else 'queued'}: {summary.queued}")
    if summary.looping:
        typer.echo(f"held by the loop guard: {summary.looping}")
    typer.echo(
        f"opted out: {len(summary.opted_out)}" + (f" ({', '.join(summary.opted_out)})" if summary.opted_out else "")
    )
    typer.echo(f"rejected: {len(summary.rejected)}")
    for line in summary.rejected:
        typer.echo(f"  {line}", err=True)
    if dry_run:
        typer.echo("dry run: nothing was stored")
