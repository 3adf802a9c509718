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
from typing import Any, Literal

from bot.events.endpoints import endpoint_problems
from bot.ingest.inbound_store import Serving
from bot.rules.loader import LoadResult, load_rules
from bot.rules.model import Ruleset
from bot.rules.versions import Check, check_loaded, texts_version
from bot.runtime.rule_versions import VersionStore
from bot.store.rule_versions import Control

log = logging.getLogger("smsbot.rules")

RulesStatus = dict[str, Any]
"""What ``/readyz``, ``/metrics`` and the console show of the live rules; plain data, so the writer
process can send it over its pipe: ``version`` (what answers everyone now), ``files``, ``loaded_at``,
``last_reload_error``, and with a database ``live``, ``candidate``, ``pinned`` (``{id, version}`` or
None), ``refused`` (the last version refused, with why), ``rollout`` and ``testers`` (how many)."""

CONTROL_POLL_SECONDS = 2.0
"""How often every serving process reads the control row: a promote or a pin reaches it within this."""


class RulesInvalid(Exception):  # noqa: N818 - named for what the user sees
    def __init__(self, errors: list[str]) -> None:
        super().__init__("the rules have errors:\n" + "\n".join(errors))
        self.errors = errors


def _ref(version_id: int | None, version: str | None) -> dict[str, Any] | None:
    return {"id": version_id, "version": version} if version_id is not None else None


@dataclass
class LiveRules:
    """The rules answering customers now, and what happened at the last (re)load.

    Without a database (``attach`` never called) the folder's last valid
    version answers everyone. Attached, every version the folder loads is
    stored (valid or not, once per text) and what answers whom comes from the
    control row (``bot/store/rule_versions.py``), read at every load and every
    ``CONTROL_POLL_SECONDS`` by ``follow``: the pinned version, else the live
    one, for everyone; in a staged rollout the candidate for the testers. A
    stored version is compiled from its stored text, never written to the folder.
    """

    path: Path
    param_max_length: int | None = None
    rollout: Literal["immediate", "staged"] = "immediate"
    testers: frozenset[str] = frozenset()
    """Tester numbers as ``+<nationcode><mobile>`` (``Settings.tester_numbers``)."""
    loaded: Ruleset | None = None
    """The folder's last valid version (what answers when no database says otherwise)."""
    loaded_at: datetime | None = None
    last_error: list[str] = field(default_factory=list)
    reloads: int = 0
    serving: Serving = field(default_factory=Serving)
    """What answers whom: replaced whole, so a batch reads one consistent choice."""
    versions: VersionStore | None = None
    control: Control | None = None
    """The control row as last applied (None: no database, or not read yet)."""
    loaded_id: int | None = None
    refused: dict[str, Any] | None = None
    """The last version refused (errors or failing tests): ``{id, version, problems}``."""
    _pending: LoadResult | None = None
    """A load not yet recorded (loaded before ``attach``)."""
    _pending_check: Check | None = None

    @property
    def ruleset(self) -> Ruleset | None:
        """The rules answering everyone who is not a tester."""
        return self.serving.ruleset

    @property
    def candidate(self) -> Ruleset | None:
        return self.serving.candidate

    def attach(self, versions: VersionStore) -> None:
        """Store versions in (and follow the control row of) a database; records the load made before."""
        self.versions = versions
        pending, check = self._pending, self._pending_check
        self._pending = self._pending_check = None
        if pending is not None and check is not None:
            version_id = self._record(pending, check)
            if check.ok and pending.ruleset is not None and pending.ruleset is self.loaded:
                self.loaded_id = version_id
                if version_id is not None:
                    try:
                        self._apply(versions.loaded(version_id, staged=self.rollout == "staged"))
                    except Exception:
                        log.exception("rules version %s: could not update the control row", self.loaded.version)
        try:
            self.refresh()
        except Exception:
            log.exception("rules: cannot read the control row; serving the folder's rules until it can be read")
            if self.control is None:
                self.serving = Serving(self.loaded, None, self.testers)

    def load(self) -> Ruleset:
        """(Re)load from ``path``; keep the current rules and raise RulesInvalid when the new ones are bad.

        Bad: an error in any file, an unusable event endpoint, or a failing test of the files' own ``tests:``.
        """
        result = load_rules(self.path, param_max_length=self.param_max_length)
        for warning in result.diagnostics:
            if not warning.is_error:
                log.info("rules: %s", warning)
        problems = endpoint_problems(result.ruleset) if result.ruleset is not None else []
        check = check_loaded(result, problems)
        version_id = self._record(result, check) if self.versions is not None else None
        if self.versions is None:
            self._pending, self._pending_check = result, check
        if result.ruleset is None or not check.ok:
            self.last_error = check.problems
            self.refused = {"id": version_id, "version": texts_version(result.texts), "problems": check.problems}
            for line in self.last_error:
                log.error("rules not (re)loaded: %s", line)
            raise RulesInvalid(self.last_error)
        ruleset = result.ruleset
        self.loaded, self.loaded_id = ruleset, version_id
        self.loaded_at = datetime.now(UTC)
        self.last_error = []
        self.refused = None
        self.reloads += 1
        log.info("rules loaded: version %s, %d file(s)", ruleset.version, len(ruleset.files))
        if self.versions is not None and version_id is not None:
            try:
                control = self.versions.loaded(version_id, staged=self.rollout == "staged")
            except Exception:
                log.exception("rules version %s: could not update the control row", ruleset.version)
            else:
                self._apply(control)
                if self.rollout == "staged" and control.candidate_id == version_id:
                    log.warning(
                        "rules version %s is the candidate: it answers the %d tester number(s) only, until "
                        "'smsbot rules promote'",
                        ruleset.version,
                        len(self.testers),
                    )
                return ruleset
        if self.control is None:
            self.serving = Serving(ruleset, None, self.testers)
        return ruleset

    def _record(self, result: LoadResult, check: Check) -> int | None:
        assert self.versions is not None
        try:
            return self.versions.record(result, check)
        except Exception:
            log.exception("rules version %s could not be stored", texts_version(result.texts))
            return None

    def refresh(self) -> bool:
        """Read the control row and serve what it says; True when that changed what is served."""
        if self.versions is None:
            return False
        return self._apply(self.versions.control())

    def _apply(self, control: Control) -> bool:
        if control == self.control:
            return False
        assert self.versions is not None
        known = {self.loaded_id: self.loaded} if self.loaded_id is not None and self.loaded is not None else {}
        try:
            serving_id = control.serving_id
            everyone = self.versions.rules(serving_id, known) if serving_id is not None else self.loaded
            candidate = (
                self.versions.rules(control.candidate_id, known)
                if control.candidate_id is not None and control.pinned_id is None
                else None
            )
        except Exception:
            log.exception("rules: the control row names a version that cannot be served; keeping the rules in use")
            return False
        self.serving = Serving(everyone, candidate, self.testers)
        changed = self.control is not None
        self.control = control
        if changed:
            log.warning(
                "rules now serve version %s to everyone%s%s",
                everyone.version if everyone else None,
                f" (pinned by {control.updated_by})" if control.pinned_id is not None else "",
                f", candidate {candidate.version} to testers" if candidate is not None else "",
            )
        return True

    def status(self) -> RulesStatus:
        ruleset = self.ruleset
        control = self.control
        status: RulesStatus = {
            "version": ruleset.version if ruleset else None,
            "files": [f.name for f in ruleset.files] if ruleset else [],
            "loaded_at": self.loaded_at.isoformat() if self.loaded_at else None,
            "last_reload_error": self.last_error or None,
            "live": None,
            "candidate": None,
            "pinned": None,
            "refused": self.refused,
            "rollout": self.rollout,
            "testers": len(self.testers),
        }
        if control is not None:
            status["live"] = _ref(control.live_id, control.live)
            status["candidate"] = _ref(control.candidate_id, control.candidate)
            status["pinned"] = _ref(control.pinned_id, control.pinned)
        elif ruleset is not None:
            status["live"] = {"id": None, "version": ruleset.version}
        return status

    async def follow(self, on_change: Callable[[], None] | None = None) -> None:
        """Read the control row every ``CONTROL_POLL_SECONDS`` (a promote or pin elsewhere reaches this process)."""
        failing = False
        while True:
            await asyncio.sleep(CONTROL_POLL_SECONDS)
            try:
                changed = await asyncio.to_thread(self.refresh)
            except Exception as exc:
                if not failing:
                    log.warning("rules: cannot read the control row (%s); trying every %ss", exc, CONTROL_POLL_SECONDS)
                failing = True
                continue
            failing = False
            if changed and on_change is not None:
                on_change()

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
