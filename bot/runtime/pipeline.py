"""The port everything above the database goes through: the routes, the puller, ``/metrics``, the console.

There are two ways to host what lies below a callback route, and only this
module knows which one runs:

- ``ThreadPipeline`` (``writer_mode="thread"``, the tests' harness and
  ``smsbot pull``): all in this process. The group-commit writer thread
  (``DbWriter``) commits, ``InboundStore`` is its callback handler, the
  delivery loop (``Deliverer``) and the rules watch are asyncio tasks here.
- ``ProcessPipeline`` (``writer_mode="process"``, ``smsbot serve``'s default):
  all of that in a writer process of its own (``bot/runtime/writer_process.py``);
  this process only forwards jobs over the pipe. Its rules live there too, so
  ``live_rules`` is None and the console keeps a copy of its own.

Whichever it is, a caller stores replies, applies delivery reports, asks
whether the pipeline is ready and what rules it runs, and wakes the delivery
loop after changing the outbox itself, the same way. ``build_pipeline`` is the
only place that chooses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from sqlalchemy import Engine, text

from bot.config import EventEndpointConfig, Settings
from bot.delivery.deliverer import Deliverer, delivery_options
from bot.ingest.batch import InboundResult, Policy
from bot.ingest.delivery_reports import ReportOutcome, apply_reports
from bot.ingest.inbound_store import InboundStore
from bot.runtime.edge import EdgeLoops, live_endpoints, stop_tasks
from bot.runtime.live_rules import LiveRules, RulesStatus
from bot.runtime.rule_versions import VersionStore
from bot.runtime.writer_process import ProcessWriter, WriterConfig
from bot.sms import ConsoleSender, Inbound, SmsSender
from bot.store.writer import DbWriter
from bot.tencent.callbacks import StatusReport
from bot.tencent.config import session_contexts
from bot.tencent.session_context import SessionContexts

Readiness = dict[str, Any]
"""``/readyz``'s body: ``status``, ``database``, ``rules`` (and ``writer`` for the writer process)."""


class PullSink(Protocol):
    """Where pulled items go: the same storage the callback routes use (all the puller needs)."""

    async def store(self, items: list[Inbound]) -> list[InboundResult]: ...

    async def apply_reports(self, reports: list[StatusReport]) -> ReportOutcome: ...


class Pipeline(PullSink, Protocol):
    """What the routes, the puller, ``/metrics`` and the console need from whatever commits callbacks."""

    mode: Literal["thread", "process"]
    """For display only (the console's rules page): callers do not branch on it."""

    live_rules: LiveRules | None
    """The rules answering customers, when they live in this process; None when another process has them."""

    async def start(self) -> None:
        """Start committing (and delivering, and watching the rules); called by the lifespan."""
        ...

    async def stop(self) -> None:
        """Finish what was submitted, then stop; called by the lifespan after the puller has stopped."""
        ...

    async def readiness(self) -> Readiness:
        """Whether callbacks can be committed now: the database answers and rules are loaded."""
        ...

    def rules_status(self) -> RulesStatus:
        """The live rules' version, files, load time and last reload error (``LiveRules.status``'s shape)."""
        ...

    def on_rules_loaded(self, callback: Callable[[RulesStatus], None]) -> None:
        """Have ``callback`` called after every rules load attempt, the one before this call included."""
        ...

    def wake_delivery(self) -> None:
        """Look at the outbox now: someone else (the console) queued a reply; callable from any thread."""
        ...


def inbound_policy(settings: Settings) -> Policy:
    return Policy(
        loop_limit=settings.loop_limit, loop_window=settings.loop_window, reply_max_delay=settings.reply_max_delay
    )


@dataclass(frozen=True)
class PipelineOptions:
    """How ``create_app`` wants its pipeline run (see ``create_app`` for each option in each mode)."""

    sender: SmsSender | None = None
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    deliver: bool = True
    watch_rules: bool = True
    writer_mode: Literal["thread", "process"] = "thread"


def build_pipeline(settings: Settings, *, engine: Engine, rules: LiveRules, options: PipelineOptions) -> Pipeline:
    """The one place that picks a mode: the pipeline ``options`` ask for."""
    policy = inbound_policy(settings)
    contexts = session_contexts(settings)
    rules.rollout, rules.testers = settings.rollout, settings.tester_numbers
    sender, clock, deliver, watch_rules = options.sender, options.clock, options.deliver, options.watch_rules
    if options.writer_mode == "process":
        return ProcessPipeline(
            ProcessWriter(
                WriterConfig(
                    database_url=engine.url.render_as_string(hide_password=False),
                    rules_dir=rules.path,
                    param_max_length=rules.param_max_length,
                    policy=policy,
                    deliver=deliver,
                    watch_rules=watch_rules,
                    sender=sender,
                    log_level=logging.getLogger().getEffectiveLevel(),
                    log_format=settings.log_format,
                    log_reveal_numbers=settings.log_reveal_numbers,
                    delivery=delivery_options(settings),
                    session_context_key=contexts.key if contexts else None,
                    events=dict(settings.events),
                    rollout=settings.rollout,
                    testers=settings.tester_numbers,
                )
            )
        )
    deliverer_options = delivery_options(settings) if deliver else None
    return ThreadPipeline(
        engine,
        rules,
        policy=policy,
        clock=clock,
        sender=sender,
        delivery=deliverer_options,
        watch_rules=watch_rules,
        contexts=contexts,
        events=settings.events,
    )


class ThreadPipeline:
    """Everything in this process: the group-commit writer thread, the delivery loop and the rules watch."""

    mode: Literal["thread", "process"] = "thread"

    def __init__(
        self,
        engine: Engine,
        rules: LiveRules,
        *,
        policy: Policy,
        clock: Callable[[], datetime],
        sender: SmsSender | None = None,
        delivery: dict[str, Any] | None = None,
        watch_rules: bool = True,
        contexts: SessionContexts | None = None,
        events: Mapping[str, EventEndpointConfig] | None = None,
    ) -> None:
        """``delivery``: the ``Deliverer``'s options (``delivery_options``), or None for no delivery loop;
        ``contexts``: how delivery reports recognise our SessionContext (None: by SerialNo alone)."""
        self.contexts = contexts
        self.live_rules: LiveRules | None = rules
        self.rules = rules
        self.clock = clock
        self.watch_rules = watch_rules
        self.endpoints = live_endpoints(events or {}, rules)
        self.inbound = InboundStore(rules=rules, policy=policy, clock=clock, events=self.endpoints)
        self.writer = DbWriter(engine, on_commit=self.inbound.after_commit)
        self.deliverer = (
            Deliverer(self.writer, sender or ConsoleSender(), clock=clock, events=self.endpoints.current, **delivery)
            if delivery is not None
            else None
        )
        self.inbound.deliverer = self.deliverer
        self.edge = (
            EdgeLoops(self.writer, rules, self.endpoints, policy=policy, clock=clock, deliverer=self.deliverer)
            if delivery is not None
            else None
        )
        """The event dispatcher and webhook runner, wherever the delivery loop runs."""
        self.inbound.edge = self.edge
        self._on_rules: Callable[[RulesStatus], None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._edge_tasks: list[asyncio.Task[None]] = []

    async def store(self, items: list[Inbound]) -> list[InboundResult]:
        results: list[InboundResult] = await self.writer.run_batch(self.inbound.store, items)
        self.inbound.warn_unknown_signatures(items, results)
        return results

    async def apply_reports(self, reports: list[StatusReport]) -> ReportOutcome:
        now = self.clock()
        events = self.endpoints.current()
        return await self.writer.run(
            lambda conn: apply_reports(conn, reports, now=now, contexts=self.contexts, events=events)
        )

    async def start(self) -> None:
        # Every version this process loads is stored, and what answers whom follows the control row.
        versions = VersionStore(self.writer.engine, param_max_length=self.rules.param_max_length)
        await asyncio.to_thread(self.rules.attach, versions)
        self.writer.start()
        self._tasks.append(asyncio.create_task(self.rules.follow(), name="smsbot-rules-control"))
        if self.deliverer is not None:
            self._tasks.append(asyncio.create_task(self.deliverer.run_forever(), name="smsbot-deliverer"))
        if self.watch_rules:
            self._tasks.append(asyncio.create_task(self.rules.watch(self._rules_reloaded), name="smsbot-rules-watch"))
        if self.edge is not None:  # after the watch: their HTTP clients take a moment to build
            self._edge_tasks = self.edge.start_tasks()

    async def stop(self) -> None:
        edge_tasks, self._edge_tasks = self._edge_tasks, []
        await stop_tasks(edge_tasks)
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await asyncio.to_thread(self.writer.stop)

    async def readiness(self) -> Readiness:
        database = "ok"
        try:
            await asyncio.to_thread(_ping, self.writer.engine)
        except Exception as exc:
            database = f"unavailable: {type(exc).__name__}"
        rules = self.rules.status()
        return {
            "status": "ok" if database == "ok" and rules["version"] is not None else "unavailable",
            "database": database,
            "rules": rules,
        }

    def rules_status(self) -> RulesStatus:
        return self.rules.status()

    def on_rules_loaded(self, callback: Callable[[RulesStatus], None]) -> None:
        self._on_rules = callback
        if self.rules.ruleset is not None:  # loaded before the pipeline was built
            callback(self.rules.status())

    def _rules_reloaded(self) -> None:
        if self._on_rules is not None:
            self._on_rules(self.rules.status())

    def wake_delivery(self) -> None:
        if self.deliverer is not None:
            self.deliverer.wake()


class ProcessPipeline:
    """Everything in the writer process; this one forwards over the pipe (``ProcessWriter``)."""

    mode: Literal["thread", "process"] = "process"

    def __init__(self, writer: ProcessWriter) -> None:
        self.writer = writer
        self.live_rules: LiveRules | None = None
        # The writer's own methods, not wrappers: one coroutine less per callback. (It warns about
        # signatures no rules answer itself, where the decisions are.)
        self.store = writer.store
        self.apply_reports = writer.apply_reports

    async def start(self) -> None:
        await self.writer.start()

    async def stop(self) -> None:
        await self.writer.stop()

    async def readiness(self) -> Readiness:
        database = "ok"
        try:
            await self.writer.ping()
        except Exception as exc:
            database = f"unavailable: {getattr(exc, 'kind', None) or type(exc).__name__}"
        rules = self.writer.rules_status
        return {
            "status": "ok" if database == "ok" and rules["version"] is not None else "unavailable",
            "database": database,
            "rules": rules,
            "writer": {"mode": "process", "pid": self.writer.pid, "restarts": self.writer.restarts},
        }

    def rules_status(self) -> RulesStatus:
        return self.writer.rules_status

    def on_rules_loaded(self, callback: Callable[[RulesStatus], None]) -> None:
        # Every ("rules", status) message is one load attempt of the writer process, its start included.
        self.writer.on_rules_status = callback

    def wake_delivery(self) -> None:
        self.writer.wake_delivery()


def _ping(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
