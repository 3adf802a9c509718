"""``smsbot rules versions | diff | pin | unpin | promote``: the stored rules versions and the rollout.

These talk to the database, not to a server: every serving process reads the
control row every 2 seconds and serves what it says (docs/rollout.md). Each
change is audited with ``actor="cli"``. Registered under ``smsbot rules`` by
``bot/cli/__init__.py``; SQLAlchemy is imported inside the commands, so
``smsbot rules check`` stays quick.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bot.cli.common import checked_engine, read_settings

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy import Connection

    from bot.store.rule_versions import Control

ACTOR = "cli"


def _in_db(change: Callable[[Connection, datetime], Any], *, write: bool = True) -> Any:
    """Run ``change(conn, now)`` in one transaction; a refusal is one line on stderr and exit code 1."""
    from bot.runtime.rule_versions import RolloutRefused, VersionNotFound, VersionUnusable
    from bot.store.db import WRITE_OPTIONS

    engine = checked_engine(read_settings())
    try:
        options = WRITE_OPTIONS if write else {}
        with engine.connect().execution_options(**options) as conn, conn.begin():
            return change(conn, datetime.now(UTC))
    except (RolloutRefused, VersionNotFound, VersionUnusable) as exc:
        typer.echo(f"smsbot: {exc}", err=True)
        raise typer.Exit(1) from exc
    finally:
        engine.dispose()


def _audit(conn: Connection, action: str, now: datetime, control: Control, **detail: Any) -> None:
    from bot.console.users import audit

    audit(
        conn,
        actor=ACTOR,
        action=action,
        target="rules",
        detail={**detail, "live": control.live, "candidate": control.candidate, "pinned": control.pinned},
        now=now,
    )


def _markers(version_id: int, control: Control) -> list[str]:
    return [
        name
        for name, wanted in (
            ("live", control.live_id),
            ("candidate", control.candidate_id),
            ("pinned", control.pinned_id),
        )
        if wanted == version_id
    ]


def versions_command(
    as_json: Annotated[bool, typer.Option("--json", help="one JSON array of versions")] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, help="newest versions shown")] = 50,
) -> None:
    """List the stored rules versions, newest first: id, hash, when and where loaded, check result, markers."""
    from bot.rules.versions import check_summary
    from bot.store.rule_versions import list_versions, read_control

    def read(conn: Connection, _now: datetime) -> tuple[list[Any], Control]:
        return list_versions(conn, limit=limit), read_control(conn)

    rows, control = _in_db(read, write=False)
    if as_json:
        out = [
            {
                "id": r["id"],
                "hash": r["hash"],
                "ok": bool(r["ok"]),
                "check": r["check"],
                "created_at": r["created_at"].isoformat(),
                "created_by": r["created_by"],
                "last_loaded_at": r["last_loaded_at"].isoformat(),
                "last_loaded_by": r["last_loaded_by"],
                "loads": r["loads"],
                "markers": _markers(r["id"], control),
            }
            for r in rows
        ]
        typer.echo(json.dumps(out, ensure_ascii=False, indent=2))
        return
    if not rows:
        typer.echo("no rules versions stored yet: they are stored when smsbot serve (or worker) loads the rules")
        return
    typer.echo(f"{'id':>4}  {'hash':12}  {'loaded at (UTC)':19}  {'host':24}  {'check':28}  markers")
    for r in rows:
        loaded = r["last_loaded_at"].astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
        markers = ", ".join(_markers(r["id"], control)) or ("REFUSED" if not r["ok"] else "")
        typer.echo(
            f"{r['id']:>4}  {r['hash']:12}  {loaded:19}  {r['last_loaded_by'][:24]:24}  "
            f"{check_summary(r['check'])[:28]:28}  {markers}"
        )
    if control.pinned_id is not None:
        typer.echo(
            f"pinned: version #{control.pinned_id} answers everyone whatever the folder holds (smsbot rules unpin)"
        )


def _texts_of(conn: Connection, ref: str, control: Control) -> tuple[str, dict[str, str]]:
    """(label, files) for a diff side: ``files`` (the folder now), ``live``/``candidate``/``pinned``, an id or hash."""
    from bot.rules.loader import load_rules
    from bot.runtime.rule_versions import RolloutRefused, find_stored

    if ref == "files":
        settings = read_settings()
        result = load_rules(settings.rules_dir, param_max_length=settings.param_max_length)
        return f"files ({settings.rules_dir})", dict(result.texts)
    named = {"live": control.live_id, "candidate": control.candidate_id, "pinned": control.pinned_id}
    if ref in named:
        version_id = named[ref]
        if version_id is None:
            raise RolloutRefused(f"there is no {ref} rules version")
        ref = str(version_id)
    row = find_stored(conn, ref)
    return f"#{row['id']} {row['hash']}", dict(row["files"])


def diff_command(
    old: Annotated[str, typer.Argument(help="a version: id, hash, live, candidate, pinned or files")] = "live",
    new: Annotated[str, typer.Argument(help="the version to compare with (default: the files now)")] = "files",
) -> None:
    """Show what changed between two rules versions (default: live vs the files now), per file and per rule."""
    from bot.rules.versions import file_diffs, rule_changes
    from bot.store.rule_versions import read_control

    def read(conn: Connection, _now: datetime) -> tuple[tuple[str, dict[str, str]], tuple[str, dict[str, str]]]:
        control = read_control(conn)
        return _texts_of(conn, old, control), _texts_of(conn, new, control)

    (old_label, old_files), (new_label, new_files) = _in_db(read, write=False)
    typer.echo(f"rules diff: {old_label} -> {new_label}")
    if old_files == new_files:
        typer.echo("no differences")
        return
    changes = rule_changes(old_files, new_files)
    for name in sorted(set(old_files) | set(new_files)):
        if name not in new_files:
            typer.echo(f"file removed: {name}")
        elif name not in old_files:
            typer.echo(f"file added:   {name}")
    if changes:
        added = sum(1 for c in changes if c.change == "added")
        removed = sum(1 for c in changes if c.change == "removed")
        typer.echo(f"rules: {added} added, {removed} removed, {len(changes) - added - removed} changed")
        for change in changes:
            typer.echo(f"  {change}")
    typer.echo("")
    for line in file_diffs(old_files, new_files, old_label="a", new_label="b"):
        typer.echo(line)


def pin_command(
    version: Annotated[str, typer.Argument(help="the stored version: id or hash (see smsbot rules versions)")],
) -> None:
    """Serve a stored rules version to everyone, whatever the folder holds (rollback); every server within 2 s."""
    from bot.runtime.rule_versions import pin_version

    settings = read_settings()

    def change(conn: Connection, now: datetime) -> Any:
        control, row = pin_version(conn, version, by=ACTOR, now=now, param_max_length=settings.param_max_length)
        _audit(conn, "rules.pin", now, control, version=row["hash"])
        return row

    row = _in_db(change)
    typer.echo(f"pinned rules version #{row['id']} {row['hash']}: every server serves it within 2 s")


def unpin_command() -> None:
    """Stop serving the pinned version: the live version (and the candidate for testers) answer again."""
    from bot.runtime.rule_versions import unpin_version

    def change(conn: Connection, now: datetime) -> Control:
        control = unpin_version(conn, by=ACTOR, now=now)
        _audit(conn, "rules.unpin", now, control)
        return control

    control = _in_db(change)
    typer.echo(f"unpinned: the live version #{control.live_id} {control.live} answers again")


def promote_command() -> None:
    """Make the candidate rules version live for everyone, at once."""
    from bot.runtime.rule_versions import promote_candidate

    def change(conn: Connection, now: datetime) -> Control:
        control = promote_candidate(conn, by=ACTOR, now=now)
        _audit(conn, "rules.promote", now, control, version=control.live)
        return control

    control = _in_db(change)
    note = (
        f" (version #{control.pinned_id} is pinned and still answers: smsbot rules unpin)" if control.pinned_id else ""
    )
    typer.echo(f"promoted rules version #{control.live_id} {control.live}: live for everyone within 2 s{note}")


def register(app: typer.Typer) -> None:
    """Add these commands to the ``smsbot rules`` group."""
    app.command("versions")(versions_command)
    app.command("diff")(diff_command)
    app.command("pin")(pin_command)
    app.command("unpin")(unpin_command)
    app.command("promote")(promote_command)
