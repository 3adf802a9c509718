"""``smsbot report``: the Rules > Activity figures in a terminal (the same numbers as the console's page and JSON)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bot.cli.common import checked_engine, read_settings

if TYPE_CHECKING:
    from bot.console.queries.activity import Activity


class _Format(StrEnum):
    table = "table"
    json = "json"


def report_command(
    since: Annotated[str, typer.Option("--since", help="how far back: 7d, 12h, or a date (2026-01-31)")] = "7d",
    sign: Annotated[str | None, typer.Option("--sign", help="only this signature")] = None,
    fmt: Annotated[_Format, typer.Option("--format", help="table or json")] = _Format.table,
    rules: Annotated[
        Path | None, typer.Option("--rules", help="rule files for states' order and expiry (default: rules_dir)")
    ] = None,
) -> None:
    """What each rule and state did: times fired, entered / left / expired / opted out per state, unmatched texts."""
    from bot.console.queries.activity import activity, period_of
    from bot.rules.loader import load_rules

    settings = read_settings()
    now = datetime.now(UTC)
    try:
        start = period_of(since, now)
    except ValueError as exc:
        typer.echo(f"smsbot report: {exc}", err=True)
        raise typer.Exit(2) from exc
    loaded = load_rules(rules or settings.rules_dir, param_max_length=settings.param_max_length)
    if loaded.ruleset is None:
        typer.echo("smsbot report: the rule files do not load; states are listed without order or expiry", err=True)
    engine = checked_engine(settings)
    try:
        with engine.connect() as conn:
            figures = activity(conn, ruleset=loaded.ruleset, since=start, until=now, signature=sign, now=now)
    finally:
        engine.dispose()
    if fmt is _Format.json:
        typer.echo(json.dumps(figures.as_json(), ensure_ascii=False, indent=2))
        return
    for line in table_lines(figures):
        typer.echo(line)


def table_lines(figures: Activity) -> list[str]:
    lines = [
        f"activity from {figures.since.isoformat(timespec='seconds')} to {figures.until.isoformat(timespec='seconds')}"
        + (f", signature {figures.signature}" if figures.signature else ""),
        "",
        f"{'rule':<36} {'state':<16} {'fired':>8}",
    ]
    for r in figures.rules():
        lines.append(f"{r['rule']:<36} {r['state'] or '-':<16} {r['fired']:>8}")
    for file in figures.files.values():
        states = [s for s in file.states.values() if s.entered or s.left or s.expired or s.opted_out or s.unmatched]
        if not states:
            continue
        lines += [
            "",
            f"funnel of {file.file}",
            f"{'state':<16} {'entered':>8} {'started':>8} {'left':>8} {'expired':>8} {'opted out':>9} {'unmatched':>9}",
        ]
        for s in states:
            lines.append(
                f"{s.state:<16} {s.entered:>8} {s.started:>8} {s.left:>8} {s.expired:>8} {s.opted_out:>9}"
                f" {s.unmatched:>9}"
            )
            for rule, n in sorted(s.left_by.items(), key=lambda kv: -kv[1]):
                lines.append(f"  left by {rule}: {n}")
            for text, n in s.unmatched_texts:
                lines.append(f"  unmatched {text!r}: {n}")
    return lines
