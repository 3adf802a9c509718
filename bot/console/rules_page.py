"""The rules page, and the ruleset the console's simulator runs.

What is live comes from whoever answers the customers: in ``writer_mode
"thread"`` the app's own ``LiveRules`` (watched and reloaded in this
process); in ``"process"`` the writer process, which sends its rules status
over the pipe (``ProcessWriter.rules_status``, the same source as
``/readyz``). The HTTP process then holds no live ruleset of its own (the
one ``create_app`` got was loaded once at start and is never reloaded), so
the console keeps a read-only copy loaded from the same folder, reloaded
whenever the writer reports a version it does not have. That copy gives the
simulator its rules and this page the per-file details the pipe does not carry.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import Connection

from bot.console.users import ConsoleUser, audit
from bot.console.web import PREFIX, AdminUser, ConsoleRouter, CurrentUser, engine, now, render, runtime
from bot.replay import replay
from bot.rules.loader import load_rules
from bot.rules.model import Ruleset
from bot.rules.schema import parse_duration
from bot.rules.versions import check_summary
from bot.runtime.rule_versions import (
    RolloutRefused,
    VersionNotFound,
    VersionUnusable,
    compile_stored,
    find_stored,
    pin_version,
    promote_candidate,
    stored_rules,
    unpin_version,
)
from bot.store.db import WRITE_OPTIONS
from bot.store.rule_versions import Control, list_versions, read_control

router = ConsoleRouter(prefix=PREFIX)

RELOAD_AT_MOST_EVERY = 2.0
"""Seconds between two reloads of the console's copy: a version mismatch that persists
(the writer has not reported yet) must not turn every page view into a reload."""


@dataclass
class ConsoleRules:
    """The HTTP process's read-only copy of the rules, for ``writer_mode="process"``."""

    ruleset: Ruleset | None = None
    loaded_at: datetime | None = None
    errors: list[str] = field(default_factory=list)
    tried_at: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class RulesView:
    """What the simulator runs and the rules page shows, whatever the writer mode."""

    mode: str
    ruleset: Ruleset | None
    """The rules the simulator uses (None: none could be loaded)."""
    version: str | None
    """The version answering customers now."""
    loaded_at: str | None
    last_error: list[str]
    file_names: list[str]
    note: str | None = None
    """Why the simulator's rules may differ from the live ones, when they might."""


def _copy(request: Request) -> ConsoleRules:
    state = request.app.state
    found = getattr(state, "console_rules", None)
    if found is None:
        rules = runtime(request).rules
        found = ConsoleRules(ruleset=rules.ruleset, loaded_at=rules.loaded_at)
        state.console_rules = found
    copy: ConsoleRules = found
    return copy


def _refresh(request: Request, copy: ConsoleRules, wanted: str | None) -> None:
    """Reload the copy when the writer runs another version (or there is none yet); throttled."""
    if copy.ruleset is not None and (wanted is None or copy.ruleset.version == wanted):
        return
    with copy.lock:
        if copy.ruleset is not None and (wanted is None or copy.ruleset.version == wanted):
            return
        if time.monotonic() - copy.tried_at < RELOAD_AT_MOST_EVERY:
            return
        copy.tried_at = time.monotonic()
        rules = runtime(request).rules
        result = load_rules(rules.path, param_max_length=rules.param_max_length)
        if wanted is not None and (result.ruleset is None or result.ruleset.version != wanted):
            # The writer serves a stored version (pinned, or live while the folder holds a candidate).
            with contextlib.suppress(VersionNotFound, VersionUnusable), engine(request).connect() as conn:
                copy.ruleset = stored_rules(conn, wanted, param_max_length=rules.param_max_length)
                copy.loaded_at, copy.errors = datetime.now(UTC), []
                return
        if result.ruleset is None:
            copy.errors = [str(d) for d in sorted(result.errors)]  # the old copy stays, like the writer's rules
            return
        copy.ruleset, copy.loaded_at, copy.errors = result.ruleset, datetime.now(UTC), []


def rules_view(request: Request) -> RulesView:
    """The live rules' status, and the ruleset for the simulator (see the module docstring)."""
    pipeline = runtime(request).pipeline
    live = pipeline.live_rules
    if live is not None:  # the rules answering customers are this process's own
        return RulesView(
            mode=pipeline.mode,
            ruleset=live.ruleset,
            version=live.ruleset.version if live.ruleset else None,
            loaded_at=live.loaded_at.isoformat() if live.loaded_at else None,
            last_error=list(live.last_error),
            file_names=[f.name for f in live.ruleset.files] if live.ruleset else [],
        )
    status: dict[str, Any] = dict(pipeline.rules_status())
    wanted = status.get("version")
    copy = _copy(request)
    _refresh(request, copy, wanted)
    ruleset = copy.ruleset
    note = None
    if ruleset is not None and wanted and ruleset.version != wanted:
        note = (
            f"the writer process answers customers with version {wanted}; the simulator loaded version "
            f"{ruleset.version} from the files now in the rules folder"
        )
    elif ruleset is None:
        note = "the simulator could not load the rules: " + "; ".join(copy.errors or ["no rules yet"])
    return RulesView(
        mode=pipeline.mode,
        ruleset=ruleset,
        version=wanted,
        loaded_at=status.get("loaded_at"),
        last_error=list(status.get("last_reload_error") or []),
        file_names=list(status.get("files") or []),
        note=note,
    )


DONE = {
    "promoted": "Promoted: the candidate is live for every number (each server within 2 seconds).",
    "pinned": "Pinned: that version answers every number, whatever the rules folder holds, until Unpin.",
    "unpinned": "Unpinned: the live version answers again (and the candidate, for testers).",
}


def _versions(request: Request) -> tuple[Control, list[dict[str, Any]]]:
    """The control row and the newest stored versions, with their markers, for the page."""
    with engine(request).connect() as conn:
        control = read_control(conn)
        rows = list_versions(conn, limit=VERSIONS_SHOWN)
    listed = []
    for row in rows:
        markers = [
            name
            for name, wanted in (
                ("live", control.live_id),
                ("candidate", control.candidate_id),
                ("pinned", control.pinned_id),
            )
            if wanted == row["id"]
        ]
        listed.append({**row, "markers": markers, "summary": check_summary(row["check"])})
    return control, listed


VERSIONS_SHOWN = 20


def _changed(
    request: Request, admin: ConsoleUser, action: str, change: Callable[[Connection, datetime], Any]
) -> Response:
    """Make ``change`` to the control row in one transaction with its audit entry, then show the page."""
    at = now(request)
    try:
        with engine(request).connect().execution_options(**WRITE_OPTIONS) as conn, conn.begin():
            control, detail = change(conn, at)
            audit(
                conn,
                actor=admin.name,
                action=action,
                target="rules",
                detail={**detail, "live": control.live, "candidate": control.candidate, "pinned": control.pinned},
                now=at,
            )
    except RolloutRefused as exc:
        return render(request, "error.html", {"status": 409, "message": str(exc)}, status_code=409)
    live = runtime(request).pipeline.live_rules
    if live is not None:  # this process serves: follow the change now rather than at the next poll
        with contextlib.suppress(Exception):
            live.refresh()
    done = {"rules.promote": "promoted", "rules.pin": "pinned", "rules.unpin": "unpinned"}[action]
    return RedirectResponse(f"{PREFIX}/rules?done={done}", status_code=303)


@router.post("/rules/promote", include_in_schema=False)
def promote(request: Request, admin: AdminUser) -> Response:
    def change(conn: Connection, at: datetime) -> tuple[Control, dict[str, Any]]:
        control = promote_candidate(conn, by=admin.name, now=at)
        return control, {"version": control.live}

    return _changed(request, admin, "rules.promote", change)


@router.post("/rules/pin", include_in_schema=False)
def pin(request: Request, admin: AdminUser, version_id: Annotated[int, Form()]) -> Response:
    limit = runtime(request).rules.param_max_length

    def change(conn: Connection, at: datetime) -> tuple[Control, dict[str, Any]]:
        control, row = pin_version(conn, str(version_id), by=admin.name, now=at, param_max_length=limit)
        return control, {"version": row["hash"]}

    return _changed(request, admin, "rules.pin", change)


@router.post("/rules/unpin", include_in_schema=False)
def unpin(request: Request, admin: AdminUser) -> Response:
    def change(conn: Connection, at: datetime) -> tuple[Control, dict[str, Any]]:
        return unpin_version(conn, by=admin.name, now=at), {}

    return _changed(request, admin, "rules.unpin", change)


@router.get("/rules", response_class=HTMLResponse, include_in_schema=False)
def rules_page(request: Request, _user: CurrentUser) -> Response:
    view = rules_view(request)
    control, versions = _versions(request)
    status = runtime(request).pipeline.rules_status()
    details = {f.name: f for f in view.ruleset.files} if view.ruleset and view.ruleset.version == view.version else {}
    files = [
        {
            "name": name,
            "signature": details[name].signature if name in details else None,
            "version": details[name].version if name in details else None,
            "path": details[name].path if name in details else None,
            "states": len(details[name].states) if name in details else None,
            "templates": len(details[name].templates) if name in details else None,
            "tests": len(details[name].tests) if name in details else None,
        }
        for name in view.file_names
    ]
    return render(
        request,
        "rules_page.html",
        {
            "view": view,
            "files": files,
            "folder": str(runtime(request).rules.path),
            "control": control,
            "versions": versions,
            "refused": status.get("refused"),
            "rollout": runtime(request).settings.rollout,
            "testers": len(runtime(request).settings.testers),
            "done": DONE.get(request.query_params.get("done", "")),
        },
    )


REPLAY_PERIODS = ("1d", "7d", "30d")
REPLAY_LIMIT = 200_000
"""Inbound messages one replay page replays at most (about 10 s at the benchmark's 20,000/s): a page load
must not run for minutes. The page says when it stopped there; ``smsbot rules replay`` has no limit."""


@router.get("/rules/replay", response_class=HTMLResponse, include_in_schema=False)
def replay_page(request: Request, user: CurrentUser) -> Response:
    """A stored version (default: the candidate) replayed over the last day, 7 or 30 days, against what happened."""
    since = request.query_params.get("since", "7d")
    if since not in REPLAY_PERIODS:
        message = f"since must be one of {', '.join(REPLAY_PERIODS)}, not {since[:20]!r}"
        return render(request, "error.html", {"status": 400, "message": message}, status_code=400)
    at = now(request)
    start = at - parse_duration(since)
    limit = runtime(request).rules.param_max_length
    with engine(request).connect() as conn:
        control = read_control(conn)
        wanted = request.query_params.get("version", "").strip() or (
            str(control.candidate_id) if control.candidate_id is not None else ""
        )
        if not wanted:
            message = "there is no candidate to replay: pick a stored version on the Rules page"
            return render(request, "error.html", {"status": 404, "message": message}, status_code=404)
        try:
            row = find_stored(conn, wanted[:64])
            ruleset = compile_stored(row, param_max_length=limit)
        except VersionNotFound as exc:
            return render(request, "error.html", {"status": 404, "message": str(exc)}, status_code=404)
        except VersionUnusable as exc:
            return render(request, "error.html", {"status": 409, "message": str(exc)}, status_code=409)
        report = replay(conn, ruleset, start, limit=REPLAY_LIMIT)
    version_id = int(row["id"])
    markers = [
        name
        for name, marked in (
            ("live", control.live_id),
            ("candidate", control.candidate_id),
            ("pinned", control.pinned_id),
        )
        if marked == version_id
    ]
    return render(
        request,
        "rules_replay.html",
        {
            "report": report,
            "groups": report.sorted_groups(),
            "version": {"id": version_id, "hash": row["hash"], "ok": bool(row["ok"]), "markers": markers},
            "control": control,
            "since": since,
            "periods": [(p, f"{PREFIX}/rules/replay?version={version_id}&since={p}") for p in REPLAY_PERIODS],
            "limit": REPLAY_LIMIT,
            "start": start,
        },
    )
