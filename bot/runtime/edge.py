"""The loops beside the delivery loop: events out (``EventDispatcher``) and rules' webhook calls (``WebhookRunner``).

Built wherever a ``Deliverer`` runs (``ThreadPipeline``, the writer process,
``smsbot worker``) from the same writer, rules and clock; woken by the
inbound store after commits that queued events or calls, polling otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from bot.config import EventEndpointConfig
from bot.events.dispatcher import EventDispatcher
from bot.events.endpoints import LiveEndpoints, RulesSource, config_endpoints
from bot.ingest.batch import Policy
from bot.ingest.resumed import ResumedResult
from bot.store.writer import DbWriter
from bot.webhooks.runner import WebhookRunner


class Wakeable(Protocol):
    def wake(self) -> None: ...


def live_endpoints(events: Mapping[str, EventEndpointConfig], rules: RulesSource | None) -> LiveEndpoints:
    return LiveEndpoints(config_endpoints(events), rules)


class EdgeLoops:
    """The event dispatcher and the webhook runner, started and stopped together."""

    def __init__(
        self,
        writer: DbWriter,
        rules: RulesSource,
        endpoints: LiveEndpoints,
        *,
        policy: Policy,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        deliverer: Wakeable | None = None,
        poll_seconds: float = 5.0,
    ) -> None:
        self.endpoints = endpoints
        self.deliverer = deliverer
        self.dispatcher = EventDispatcher(writer, endpoints.current, clock=clock, poll_seconds=poll_seconds)
        self.runner = WebhookRunner(
            writer,
            rules,
            policy=policy,
            events=endpoints.current,
            clock=clock,
            poll_seconds=min(poll_seconds, 2.0),
            on_committed=self._committed,
        )

    def wake(self) -> None:
        """After a commit that queued events or calls (from any thread)."""
        self.dispatcher.wake()
        self.runner.wake()

    def _committed(self, resumed: ResumedResult) -> None:
        if resumed.queued and self.deliverer is not None:
            self.deliverer.wake()
        if resumed.edge:
            self.wake()

    def coroutines(self) -> list[Coroutine[Any, Any, None]]:
        return [self.dispatcher.run_forever(), self.runner.run_forever()]

    def start_tasks(self) -> list[asyncio.Task[None]]:
        return [
            asyncio.create_task(self.dispatcher.run_forever(), name="smsbot-events"),
            asyncio.create_task(self.runner.run_forever(), name="smsbot-webhooks"),
        ]

    async def drain(self) -> tuple[int, int]:
        """Make the calls and send the events due now (``worker --once``, tests): (calls, events)."""
        calls = await self.runner.drain()
        events = await self.dispatcher.drain()
        return calls, events


async def stop_tasks(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
