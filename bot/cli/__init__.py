"""The ``smsbot`` command, put together from one module per command group.

``app`` is what the console script runs (``smsbot = "bot.cli:app"``) and what the tests invoke.
Command names, flags, help texts (the command functions' docstrings), exit codes, printed lines
and ``--json`` fields are an interface people script against, so they only ever grow. The
commands are added here rather than where they are defined so that the order ``smsbot --help``
lists them in is written down in one place: the top-level commands, then the groups.

Importing this package loads the rules package, the settings and typer, and nothing heavier: the
modules import SQLAlchemy, FastAPI, uvicorn and Tencent's SDK inside the commands that use them,
so ``smsbot --help`` and ``smsbot rules check`` start quickly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bot.cli import (
    apikeys,
    common,
    contacts,
    db,
    export,
    replay,
    report,
    rule_versions,
    rules,
    serving,
    start,
    templates,
    users,
)

app = typer.Typer(help="smsbot: a conversational SMS auto-responder for Tencent Cloud SMS.", no_args_is_help=True)


@app.callback()
def main(
    config: Annotated[
        Path | None,
        typer.Option("--config", help="config file (default: $SMSBOT_CONFIG, then ./config.yaml)"),
    ] = None,
) -> None:
    """smsbot: a conversational SMS auto-responder for Tencent Cloud SMS."""
    common.use_config(config)


app.command("simulate")(rules.simulate_command)
app.command("serve")(serving.serve)
app.command("pull")(serving.pull_command)
app.command("worker")(serving.worker_command)
app.command("export")(export.export_command)
app.command("start")(start.start_command)
rule_versions.register(rules.app)
app.command("report")(report.report_command)
rules.app.command("replay")(replay.replay_command)
app.add_typer(rules.app, name="rules")
app.add_typer(templates.app, name="templates")
app.add_typer(db.app, name="db")
app.add_typer(users.app, name="users")
app.add_typer(contacts.app, name="contacts")
app.add_typer(apikeys.app, name="apikeys")

__all__ = ["app"]
