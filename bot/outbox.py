"""Handing queued replies to an ``SmsSender``.

The pipeline only ever writes replies into the ``outbox`` table; this module
takes them out and sends them, outside any callback request. Each round
claims due rows with a lease (so a crashed process's rows are taken over
when the lease runs out), re-checks opt-out right before sending, sends, and
records the outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol, TextIO

from sqlalchemy import Connection, delete, or_, select, update

from bot.service import mask_number
from bot.store.models import contacts, conversations, messages, outbox
from bot.writer import DbWriter

log = logging.getLogger("smsbot.outbox")

LEASE = timedelta(seconds=60)


@dataclass(frozen=True)
class OutboundSms:
    """One reply ready for the provider."""

    outbox_id: int
    message_id: int
    nationcode: str
    mobile: str
    sign: str
    template_id: str
    params: tuple[str, ...]
    text: str


@dataclass(frozen=True)
class SendResult:
    ok: bool
    serial: str | None = None
    code: str = "Ok"
    message: str = ""


class SmsSender(Protocol):
    """Something that delivers an SMS: Tencent in production, the console locally, a fake in tests."""

    def send(self, sms: OutboundSms) -> SendResult: ...


class ConsoleSender:
    """Prints each reply instead of sending it, for local runs without Tencent credentials."""

    def __init__(self, stream: TextIO | None = None, *, reveal_numbers: bool = False) -> None:
        self.stream = stream
        self.reveal_numbers = reveal_numbers

    def send(self, sms: OutboundSms) -> SendResult:
        number = sms.mobile if self.reveal_numbers else mask_number(sms.mobile)
        out = self.stream or sys.stdout
        out.write(
            f"[console sender] to +{sms.nationcode} {number} 【{sms.sign}】 template {sms.template_id} "
            f"params={list(sms.params)}: {sms.text}\n"
        )
        out.flush()
        return SendResult(ok=True, serial=f"console:{sms.message_id}", code="Ok", message="printed")


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def claim_due(conn: Connection, *, now: datetime, limit: int, owner: str) -> list[OutboundSms]:
    """Lease up to ``limit`` due outbox rows to ``owner``; rows of opted-out numbers are suppressed instead."""
    query = (
        select(
            outbox.c.id,
            outbox.c.message_id,
            messages.c.signature,
            messages.c.template_id,
            messages.c.params,
            messages.c.text,
            messages.c.rule_kind,
            contacts.c.nationcode,
            contacts.c.mobile,
            conversations.c.opted_out,
        )
        .join(messages, messages.c.id == outbox.c.message_id)
        .join(contacts, contacts.c.id == messages.c.contact_id)
        .join(conversations, conversations.c.id == messages.c.conversation_id)
        .where(
            outbox.c.next_attempt_at <= now,
            or_(outbox.c.lease_until.is_(None), outbox.c.lease_until < now),
        )
        .order_by(outbox.c.next_attempt_at, outbox.c.id)
        .limit(limit)
    )
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True, of=outbox)
    claimed: list[OutboundSms] = []
    for row in conn.execute(query):
        if row.opted_out and row.rule_kind != "opt_out":
            _settle(
                conn, row.id, row.message_id, now, status="suppressed", reason="the number opted out before sending"
            )
            continue
        conn.execute(update(outbox).where(outbox.c.id == row.id).values(lease_until=now + LEASE, leased_by=owner))
        claimed.append(
            OutboundSms(
                outbox_id=row.id,
                message_id=row.message_id,
                nationcode=row.nationcode,
                mobile=row.mobile,
                sign=row.signature,
                template_id=row.template_id or "",
                params=tuple(row.params or ()),
                text=row.text,
            )
        )
    return claimed


def _settle(
    conn: Connection,
    outbox_id: int,
    message_id: int,
    now: datetime,
    *,
    status: str,
    reason: str | None = None,
    serial: str | None = None,
    code: str | None = None,
    error: str | None = None,
) -> None:
    conn.execute(
        update(messages)
        .where(messages.c.id == message_id)
        .values(
            status=status,
            status_reason=reason,
            provider_serial=serial,
            error_code=code,
            error_message=error,
            updated_at=now,
        )
    )
    conn.execute(delete(outbox).where(outbox.c.id == outbox_id))


def record_result(conn: Connection, *, sms: OutboundSms, result: SendResult, now: datetime) -> None:
    if result.ok:
        _settle(conn, sms.outbox_id, sms.message_id, now, status="sent", serial=result.serial)
    else:
        _settle(conn, sms.outbox_id, sms.message_id, now, status="failed", code=result.code, error=result.message)


class Deliverer:
    """The in-process delivery loop: wakes on every commit that queued replies, polls otherwise."""

    def __init__(
        self,
        writer: DbWriter,
        sender: SmsSender,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        poll_seconds: float = 1.0,
        batch: int = 100,
    ) -> None:
        self.writer = writer
        self.sender = sender
        self.clock = clock
        self.poll_seconds = poll_seconds
        self.batch = batch
        self.owner = worker_id()
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.sent = 0

    def wake(self) -> None:
        """Called from any thread after a commit that queued replies."""
        loop, event = self._loop, self._wake
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
                loop.call_soon_threadsafe(event.set)

    async def run_once(self) -> int:
        """Claim due replies, send them, record the outcomes: two transactions per round, not per reply."""
        now = self.clock()
        claimed = await self.writer.run(lambda conn: claim_due(conn, now=now, limit=self.batch, owner=self.owner))
        if not claimed:
            return 0
        outcomes = await asyncio.to_thread(self._send_all, claimed)
        done_at = self.clock()

        def record(conn: Connection) -> None:
            for sms, result in outcomes:
                record_result(conn, sms=sms, result=result, now=done_at)

        await self.writer.run(record)
        self.sent += len(outcomes)
        return len(claimed)

    def _send_all(self, claimed: list[OutboundSms]) -> list[tuple[OutboundSms, SendResult]]:
        outcomes = []
        for sms in claimed:
            try:
                result = self.sender.send(sms)
            except Exception as exc:  # a sender bug must not lose the reply: it is recorded as failed
                log.exception("sending message %s failed", sms.message_id)
                result = SendResult(ok=False, code="InternalError.SenderCrashed", message=str(exc))
            outcomes.append((sms, result))
        return outcomes

    async def run_forever(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        while True:
            try:
                handled = await self.run_once()
            except Exception:
                log.exception("delivery round failed; retrying")
                handled = 0
            if handled:
                continue
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel that
            # arrives together with a wake-up, and shutdown would then hang.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_seconds):
                    await self._wake.wait()
            self._wake.clear()
