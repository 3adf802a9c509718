"""``smsbot rules replay``: a period's real inbound messages through candidate rules, nothing sent or stored.

Needs the database (unlike the rest of ``smsbot rules``), so it lives here and is registered under the
``rules`` group in ``bot/cli/__init__.py``. Numbers in the examples are always masked.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bot.cli.common import checked_engine, read_settings, refuse_rule_errors

if TYPE_CHECKING:
    from bot.replay import ReplayReport


def replay_command(
    version: Annotated[
        str | None,
        typer.Argument(
            help="a stored rules version (id or hash prefix); default: the rule files in the rules folder now"
        ),
    ] = None,
    since: Annotated[str, typer.Option("--since", help="how far back: 7d, 12h, or a date (2026-01-31)")] = "7d",
    until: Annotated[str | None, typer.Option("--until", help="end (excluded): a date or time; default: now")] = None,
    sign: Annotated[str | None, typer.Option("--sign", help="only this signature's messages")] = None,
    rules: Annotated[Path | None, typer.Option("--rules", help="rule file or folder (default: rules_dir)")] = None,
    examples: Annotated[int, typer.Option("--examples", min=0, help="examples per group")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Replay the last N days of inbound messages through candidate rules and print what would change.

    Grouped by (rule then -> rule now, state), with masked examples. Nothing is sent or stored.
    """
    from bot.replay import replay
    from bot.replay.run import period_start
    from bot.rules.loader import load_rules
    from bot.runtime.rule_versions import VersionNotFound, VersionUnusable, stored_rules

    settings = read_settings()
    now = datetime.now(UTC)
    try:
        start = period_start(since, now)
        end = period_start(until, now) if until else None
    except ValueError as exc:
        typer.echo(f"smsbot rules replay: {exc}", err=True)
        raise typer.Exit(2) from exc
    engine = checked_engine(settings)
    try:
        with engine.connect() as conn:
            if version is None:
                result = load_rules(rules or settings.rules_dir, param_max_length=settings.param_max_length)
                if result.ruleset is None:
                    refuse_rule_errors(result.errors)
                ruleset = result.ruleset
            else:
                try:
                    ruleset = stored_rules(conn, version, param_max_length=settings.param_max_length)
                except (VersionNotFound, VersionUnusable) as exc:
                    typer.echo(f"smsbot rules replay: {exc}", err=True)
                    raise typer.Exit(1) from exc
            report = replay(conn, ruleset, start, end, sign, max_examples=examples)
    finally:
        engine.dispose()
    if as_json:
        typer.echo(json.dumps(report.as_json(), ensure_ascii=False, indent=2))
    else:
        for line in report_lines(report, version or "the rule files now"):
            typer.echo(line)


def report_lines(report: ReplayReport, candidate: str) -> list[str]:
    """The report as a person reads it in a terminal."""
    lines = [
        f"replayed {report.messages} inbound message(s) in {report.conversations} conversation(s) since "
        f"{report.since.isoformat(timespec='seconds')} with {candidate} (version {report.version})",
        f"replies that would change: {report.replies_changed} (different {report.replies_different}, "
        f"added {report.replies_added}, removed {report.replies_removed})",
        f"state transitions that would change: {report.states_changed}",
    ]
    for webhook, count in sorted(report.would_call.items()):
        lines.append(f"would call webhook {webhook}: {count} time(s)")
    if report.calls_not_made:
        lines.append(
            f"calls without a recorded answer for that message: {report.calls_not_made} (not made: on_error followed)"
        )
    for group in report.sorted_groups():
        lines.append("")
        lines.append(
            f"{group.old_rule or '(no rule)'} -> {group.new_rule or '(no rule)'} in state {group.state or '(new)'}: "
            f"{group.messages} message(s), {group.replies_changed} reply change(s), "
            f"{group.states_changed} state change(s)"
        )
        for example in group.examples:
            lines.append(f"  {example.number} said {example.text!r}")
            lines.append(f"    then: {example.old_reply or '(no reply)'}  -> state {example.old_state}")
            lines.append(f"    now:  {example.new_reply or '(no reply)'}  -> state {example.new_state}")
    return lines
