"""Where replies and delivery reports are written: the port the routes and the puller share.

A callback route and the puller both hand what Tencent sent to a sink and get
back what was stored; which writer commits it (the in-process group-commit
thread, or the writer process) is the sink's business, not theirs.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from bot.ingest.batch import InboundResult
from bot.ingest.delivery_reports import ReportOutcome, apply_reports
from bot.sms import Inbound
from bot.tencent.callbacks import StatusReport

if TYPE_CHECKING:
    from bot.ingest.inbound_store import InboundStore
    from bot.runtime.writer_process import ProcessWriter
    from bot.store.writer import DbWriter


class PullSink(Protocol):
    """Where pulled items go: the same storage the callback routes use."""

    async def store(self, items: list[Inbound]) -> list[InboundResult]: ...

    async def apply(self, reports: list[StatusReport]) -> ReportOutcome: ...


class WriterSink:
    """Stores through an in-process ``DbWriter`` (``writer: thread``, and ``smsbot pull``), like the routes."""

    def __init__(self, writer: DbWriter, inbound: InboundStore, clock: Callable[[], datetime]) -> None:
        self.writer = writer
        self.inbound = inbound
        self.clock = clock

    async def store(self, items: list[Inbound]) -> list[InboundResult]:
        results: list[InboundResult] = await self.writer.run_batch(self.inbound.store, items)
        self.inbound.warn_unknown_signatures(items, results)
        return results

    async def apply(self, reports: list[StatusReport]) -> ReportOutcome:
        now = self.clock()
        return await self.writer.run(lambda conn: apply_reports(conn, reports, now=now))


class ProcessSink:
    """Stores through the writer process (``writer: process``), like the routes."""

    def __init__(self, process_writer: ProcessWriter) -> None:
        self.process_writer = process_writer

    async def store(self, items: list[Inbound]) -> list[InboundResult]:
        return await self.process_writer.store(items)

    async def apply(self, reports: list[StatusReport]) -> ReportOutcome:
        return await self.process_writer.apply_reports(reports)
