"""``smsbot contacts import``: contact data (vars) for many numbers at once, sending nothing.

The file is the one ``smsbot start --csv`` reads (``nationcode``, ``mobile``, then one
column per var). All or nothing: every row is checked first, and one bad row means
nothing is written (each problem printed with its line number); a good file is written
in one transaction, merged into each number's conversation under ``--sign`` (created
when new), like ``PUT /api/v1/conversations/.../vars``.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from bot.cli.common import checked_engine, read_settings, refuse_rule_errors

app = typer.Typer(help="Contact data (conversation vars), without sending anything.", no_args_is_help=True)

CHUNK = 1000


@app.command("import")
def contacts_import(
    csv_file: Annotated[Path, typer.Argument(help="CSV: nationcode,mobile, then one column per var", exists=True)],
    sign: Annotated[str, typer.Option("--sign", help="the SMS signature the vars are for (its rule file's)")] = "",
) -> None:
    """Merge each row's vars into that number's conversation under SIGN; all rows or none."""
    from bot.console.users import audit
    from bot.outreach.check import StartRefused, rule_file
    from bot.outreach.contacts_csv import CsvRefused, read_file
    from bot.outreach.write import VarsChange, merge_vars
    from bot.rules.loader import load_rules
    from bot.store.db import WRITE_OPTIONS

    if not sign:
        typer.echo("smsbot: give --sign", err=True)
        raise typer.Exit(2)
    settings = read_settings()
    loaded = load_rules(settings.rules_dir, param_max_length=settings.param_max_length)
    if loaded.ruleset is None:
        refuse_rule_errors(loaded.errors)
    try:
        signature = rule_file(loaded.ruleset, sign).signature
    except StartRefused as exc:
        typer.echo(f"smsbot: --sign: {exc.detail}", err=True)
        raise typer.Exit(2) from exc
    try:
        found = read_file(csv_file)
    except CsvRefused as exc:
        typer.echo(f"smsbot: {exc}", err=True)
        raise typer.Exit(2) from exc
    if found.problems:
        for problem in found.problems:
            typer.echo(str(problem), err=True)
        typer.echo(f"smsbot: {len(found.problems)} bad row(s); nothing imported", err=True)
        raise typer.Exit(1)
    changes = [VarsChange(signature, row.nationcode, row.mobile, row.vars) for row in found.rows]
    created = 0
    engine = checked_engine(settings)
    try:
        now = datetime.now(UTC)
        with (
            engine.connect().execution_options(**WRITE_OPTIONS) as conn,
            conn.begin(),
            typer.progressbar(length=len(changes), label="importing", file=sys.stderr) as bar,
        ):
            for start in range(0, len(changes), CHUNK):
                chunk = changes[start : start + CHUNK]
                created += sum(1 for result in merge_vars(conn, chunk, now=now) if result.created)
                bar.update(len(chunk))
            audit(
                conn,
                actor="cli",
                action="contacts.import",
                target=f"signature:{signature}",
                detail={"file": csv_file.name, "rows": len(changes), "created": created},
                now=now,
            )
    finally:
        engine.dispose()
    typer.echo(f"imported {len(changes)} row(s): {created} new conversation(s), {len(changes) - created} updated")
