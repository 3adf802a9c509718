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

import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, Response

from bot.console.web import PREFIX, ConsoleRouter, CurrentUser, render, runtime
from bot.rules.loader import load_rules
from bot.rules.model import Ruleset

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


@router.get("/rules", response_class=HTMLResponse, include_in_schema=False)
def rules_page(request: Request, _user: CurrentUser) -> Response:
    view = rules_view(request)
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
        {"view": view, "files": files, "folder": str(runtime(request).rules.path)},
    )
