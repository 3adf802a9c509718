"""``smsbot templates``: the rule files' copies of their templates against Tencent's.

A copy that drifted (an id mistyped, a template edited at Tencent or still under review) fails only
when a customer's reply is refused; asking Tencent first turns it into ``file:line:col`` lines that
name what to fix. ``smsbot rules check --online`` runs the same comparison, so the two helpers it
needs live here once. Tencent's SDK is imported only when Tencent is asked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bot.cli.common import PathArg, config_errors, read_settings, refuse_rule_errors
from bot.rules.loader import load_rules

if TYPE_CHECKING:
    from bot.config import Settings
    from bot.tencent.config import TencentConfig
    from bot.tencent.templates import SyncReport

app = typer.Typer(help="Compare the rule files' templates with Tencent's.", no_args_is_help=True)


def tencent_templates_config(settings: Settings) -> TencentConfig:
    """Tencent's credentials for reading templates, or exit 2 (before any output) when they are missing."""
    from bot.tencent.config import tencent_config

    with config_errors():
        return tencent_config(settings, purpose="templates")


def template_report(root: Path, config: TencentConfig) -> SyncReport:
    """Tencent's templates against the rule files'; exit 2 when Tencent cannot be asked (no comparison ran)."""
    from bot.tencent.templates import TemplateFetchError, collect_rule_templates, fetch_templates, sync_report

    try:
        tencent = fetch_templates(config)
    except TemplateFetchError as exc:
        typer.echo(f"smsbot: {exc}", err=True)
        raise typer.Exit(2) from exc
    return sync_report(collect_rule_templates(root), tencent)


@app.command("sync")
def templates_sync(
    path: PathArg = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object instead of diagnostics")] = False,
) -> None:
    """Compare the rule files' templates: with Tencent's (DescribeSmsTemplateList). Exit 1 on any error."""
    settings = read_settings()
    config = tencent_templates_config(settings)
    result = load_rules(path or settings.rules_dir, param_max_length=settings.param_max_length)
    if result.errors:
        refuse_rule_errors(result.errors)
    report = template_report(path or settings.rules_dir, config)
    warnings = len(report.differences) - report.errors
    if as_json:
        typer.echo(json.dumps(_sync_document(report, warnings), ensure_ascii=False))
    else:
        for difference in report.differences:
            typer.echo(str(difference.diagnostic()))
        for t in report.unused:
            where = "domestic and international" if t.scope == "both" else t.scope
            typer.echo(f"info: template {t.id}: {t.name!r} ({t.status}, {where}) is not used by any rule file")
    typer.echo(
        f"{len(report.rule_templates)} template(s) compared with {len(report.tencent_templates)} at Tencent: "
        f"{report.errors} error(s), {warnings} warning(s), {len(report.unused)} unused at Tencent",
        err=True,
    )
    raise typer.Exit(1 if report.errors else 0)


def _sync_document(report: SyncReport, warnings: int) -> dict[str, Any]:
    """The ``--json`` object: its field names are an interface scripts read, so they only ever grow."""
    return {
        "templates_checked": len(report.rule_templates),
        "tencent_templates": len(report.tencent_templates),
        "errors": report.errors,
        "warnings": warnings,
        "differences": [
            {
                "file": d.path,
                "line": d.line,
                "col": d.col,
                "template": d.template,
                "template_id": d.template_id,
                "kind": d.kind,
                "severity": d.severity,
                "message": d.message,
            }
            for d in report.differences
        ],
        "unused": [
            {
                "template_id": t.id,
                "name": t.name,
                "status": t.status,
                "international": t.international,
                "scope": t.scope,
            }
            for t in report.unused
        ],
    }
