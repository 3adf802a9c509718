"""The rules a running server uses, reloaded when the rules folder changes.

A valid change replaces the whole ruleset in one assignment (readers see the
old or the new rules, never a mix); an invalid change keeps the old rules and
logs every error with file:line, and ``/readyz`` shows it until fixed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bot.events.endpoints import endpoint_problems
from bot.rules.loader import load_rules
from bot.rules.model import Ruleset

log = logging.getLogger("smsbot.rules")

RulesStatus = dict[str, Any]
"""What ``/readyz``, ``/metrics`` and the console show of the live rules; plain data, so the writer
process can send it over its pipe: ``version``, ``files``, ``loaded_at``, ``last_reload_error``."""


class RulesInvalid(Exception):  # noqa: N818 - named for what the user sees
    def __init__(self, errors: list[str]) -> None:
        super().__init__("the rules have errors:\n" + "\n".join(errors))
        self.errors = errors


@dataclass
class LiveRules:
    """The current ruleset and what happened at the last (re)load."""

    path: Path
    param_max_length: int | None = None
    ruleset: Ruleset | None = None
    loaded_at: datetime | None = None
    last_error: list[str] = field(default_factory=list)
    reloads: int = 0

    def load(self) -> Ruleset:
        """(Re)load from ``path``; keep the current rules and raise RulesInvalid when the new ones are bad."""
        result = load_rules(self.path, param_max_length=self.param_max_length)
        for warning in result.diagnostics:
            if not warning.is_error:
                log.info("rules: %s", warning)
        problems = endpoint_problems(result.ruleset) if result.ruleset is not None else []
        if result.ruleset is None or problems:
            self.last_error = [str(d) for d in sorted(result.errors)] + problems
            for line in self.last_error:
                log.error("rules not (re)loaded: %s", line)
            raise RulesInvalid(self.last_error)
        self.ruleset = result.ruleset
        self.loaded_at = datetime.now(UTC)
        self.last_error = []
        self.reloads += 1
        log.info("rules loaded: version %s, %d file(s)", result.ruleset.version, len(result.ruleset.files))
        return result.ruleset

    def status(self) -> RulesStatus:
        ruleset = self.ruleset
        return {
            "version": ruleset.version if ruleset else None,
            "files": [f.name for f in ruleset.files] if ruleset else [],
            "loaded_at": self.loaded_at.isoformat() if self.loaded_at else None,
            "last_reload_error": self.last_error or None,
        }

    async def watch(self, on_reload: Callable[[], None] | None = None) -> None:
        """Reload whenever a file under ``path`` changes; ``on_reload`` runs after every attempt."""
        from watchfiles import awatch

        # A single rules file is watched through its folder: editors and deploy tools save by
        # renaming a new file over the old one, which a watch on the file itself loses.
        if self.path.is_file():
            target = self.path.resolve()
            changes = awatch(
                self.path.parent, debounce=200, step=50, watch_filter=lambda _c, p: Path(p).resolve() == target
            )
        else:
            changes = awatch(self.path, debounce=200, step=50)
        async for _changes in changes:
            with contextlib.suppress(RulesInvalid):  # already logged; the old rules stay live
                await asyncio.to_thread(self.load)
            if on_reload is not None:
                on_reload()
