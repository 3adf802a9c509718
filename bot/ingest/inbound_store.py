"""The database writer's handler for callbacks, shared by the writer thread and the writer process.

Both writer modes commit callbacks the same way: one ``handle_batch`` per
merged batch, the delivery loop woken after a commit only when it queued
replies (waking it after its own claims would make it spin), and one warning
per signature that no rules answer.

It sees the rules and the delivery loop only through ``RulesSource`` and
``Wakeable``: what hosts them (``bot/runtime``, ``bot/delivery``) sits above
this package, which stays importable without them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from sqlalchemy import Connection

from bot.events.endpoints import LiveEndpoints
from bot.ingest.batch import InboundResult, Policy, handle_batch
from bot.rules.model import Ruleset
from bot.sms import Inbound

log = logging.getLogger("smsbot.inbound")


class RulesSource(Protocol):
    """The rules now live (``LiveRules``): read at every batch, since a reload replaces them."""

    @property
    def ruleset(self) -> Ruleset | None: ...


@dataclass(frozen=True)
class Serving:
    """What answers whom, replaced whole (one assignment) when it changes: readers never see a mix.

    ``ruleset`` answers everyone (the pinned version, else the live one); ``candidate``, in a staged
    rollout, answers the ``testers`` (numbers as ``+<nationcode><mobile>``) only.
    """

    ruleset: Ruleset | None = None
    candidate: Ruleset | None = None
    testers: frozenset[str] = frozenset()


class Wakeable(Protocol):
    """The delivery loop (``Deliverer``), woken from the writer's thread."""

    def wake(self) -> None: ...


class InboundStore:
    def __init__(
        self,
        *,
        rules: RulesSource,
        policy: Policy,
        clock: Callable[[], datetime],
        events: LiveEndpoints | None = None,
    ) -> None:
        self.rules = rules
        self.policy = policy
        self.clock = clock
        self.events = events
        """The event endpoints (config's and the live rules'); None: no events."""
        self.deliverer: Wakeable | None = None
        """Set once built (it needs the writer, which needs ``after_commit``)."""
        self.edge: Wakeable | None = None
        """The event dispatcher and webhook runner, woken after commits that queued events or calls."""
        self.queued_since_commit = False
        self.edge_since_commit = False
        self.warned_signatures: set[str] = set()

    def store(self, conn: Connection, batch: list[Inbound]) -> list[InboundResult]:
        """One call may carry many requests' messages (the writer merges them)."""
        events = self.events.current() if self.events is not None else None
        serving: Serving | None = getattr(self.rules, "serving", None)
        if serving is None:
            serving = Serving(self.rules.ruleset)
        results = handle_batch(
            conn,
            ruleset=serving.ruleset,
            batch=batch,
            now=self.clock(),
            policy=self.policy,
            events=events,
            candidate=serving.candidate,
            testers=serving.testers,
        )
        if any(r.queued for r in results):
            self.queued_since_commit = True
        if any(r.edge for r in results):
            self.edge_since_commit = True
        return results

    def after_commit(self) -> None:
        """Runs on the writer's thread after each commit: wake the delivery loop only for new replies."""
        if self.queued_since_commit and self.deliverer is not None:
            self.queued_since_commit = False
            self.deliverer.wake()
        if self.edge_since_commit and self.edge is not None:
            self.edge_since_commit = False
            self.edge.wake()

    def warn_unknown_signatures(self, items: list[Inbound], results: list[InboundResult]) -> None:
        for message, result in zip(items, results, strict=True):
            if result.decision is None and not result.duplicate and message.sign not in self.warned_signatures:
                self.warned_signatures.add(message.sign)
                log.warning(
                    "no rules answer signature %r (and no default file): messages stored, no reply", message.sign
                )
