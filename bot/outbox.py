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
import random
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TextIO

from sqlalchemy import Connection

from bot.retry import Final, Retry, RetryPolicy, marketing_hours, next_marketing_opening, plan
from bot.service import mask_number
from bot.store.driver_sql import DriverSql, chunks
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
    attempts: int = 0
    """Sends tried before this one."""
    conversation_id: int = 0


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


_DUE = (
    "SELECT id, message_id, attempts FROM outbox WHERE next_attempt_at <= ? AND (lease_until IS NULL OR lease_until < ?)"
    " ORDER BY next_attempt_at, id LIMIT ?"
)
# Two steps rather than one join: the due rows come from the outbox index alone, then their
# details by primary key; a four-table join let PostgreSQL pick hash joins over whole tables
# whenever its statistics lagged behind a growing table.
_DETAILS = (
    "SELECT m.id, m.signature, m.template_id, m.params, m.text, m.rule_kind, c.nationcode, c.mobile, v.opted_out,"
    " v.id, m.marketing"
    " FROM messages m JOIN contacts c ON c.id = m.contact_id JOIN conversations v ON v.id = m.conversation_id"
    " WHERE {where}"
)


@dataclass(frozen=True)
class Settlement:
    """The final state of one reply: its message row is updated and its outbox row removed."""

    outbox_id: int
    message_id: int
    status: str
    reason: str | None = None
    serial: str | None = None
    code: str | None = None
    error: str | None = None


def claim_due(conn: Connection, *, now: datetime, limit: int, owner: str) -> list[OutboundSms]:
    """Lease up to ``limit`` due outbox rows to ``owner``; rows of opted-out numbers are suppressed instead.

    On PostgreSQL ``FOR UPDATE SKIP LOCKED`` lets several workers claim side by
    side without waiting for or taking each other's rows.
    """
    db = DriverSql(conn)
    due = db.rows(_DUE + (" FOR UPDATE SKIP LOCKED" if db.postgres else ""), (db.ts(now), db.ts(now), limit))
    if not due:
        return []
    outbox_of = {int(message_id): int(outbox_id) for outbox_id, message_id, _ in due}
    details: dict[int, Any] = {}
    for chunk in chunks(sorted(outbox_of)):
        where, params = db.in_list("m.id", chunk)
        for row in db.rows(_DETAILS.format(where=where), params):
            details[int(row[0])] = row
    claimed: list[OutboundSms] = []
    suppressed: list[Settlement] = []
    held: list[int] = []
    for outbox_id, message_id, attempts in due:
        row = details[int(message_id)]
        _, sign, template_id, params, text, rule_kind, nationcode, mobile, opted_out, convo, marketing = row
        if opted_out and rule_kind != "opt_out":
            suppressed.append(Settlement(outbox_id, message_id, "suppressed", "the number opted out before sending"))
            continue
        if marketing and not marketing_hours(now):
            held.append(int(outbox_id))
            continue
        claimed.append(
            OutboundSms(
                outbox_id=outbox_id,
                message_id=message_id,
                nationcode=nationcode,
                mobile=mobile,
                sign=sign,
                template_id=template_id or "",
                params=tuple(db.read_json(params) or ()),
                text=text,
                attempts=int(attempts or 0),
                conversation_id=int(convo),
            )
        )
    settle(conn, suppressed, now)
    if held:  # marketing SMS may only go out 08:00-22:00 China time: wait, do not send
        opens = next_marketing_opening(now)
        for chunk in chunks(held):
            where, params = db.in_list("id", chunk)
            db.execute(f"UPDATE outbox SET next_attempt_at = ? WHERE {where}", [db.ts(opens), *params])
    for chunk in chunks([sms.outbox_id for sms in claimed]):
        where, params = db.in_list("id", chunk)
        db.execute(
            f"UPDATE outbox SET lease_until = ?, leased_by = ? WHERE {where}", [db.ts(now + LEASE), owner, *params]
        )
    return claimed


def settle(conn: Connection, settlements: Sequence[Settlement], now: datetime) -> None:
    """Record final outcomes: one statement per table for the whole list."""
    if not settlements:
        return
    db = DriverSql(conn)
    db.executemany(
        "UPDATE messages SET status = ?, status_reason = ?, provider_serial = ?, error_code = ?, error_message = ?,"
        " updated_at = ? WHERE id = ?",
        [(s.status, s.reason, s.serial, s.code, s.error, db.ts(now), s.message_id) for s in settlements],
    )
    for chunk in chunks([s.outbox_id for s in settlements]):
        where, params = db.in_list("id", chunk)
        db.execute(f"DELETE FROM outbox WHERE {where}", params)


def plan_for(
    sms: OutboundSms, result: SendResult, *, now: datetime, policy: RetryPolicy, rng: random.Random
) -> Final | Retry:
    return plan(
        ok=result.ok,
        code=result.code,
        message=result.message,
        serial=result.serial,
        attempts=sms.attempts + 1,
        now=now,
        policy=policy,
        rng=rng,
    )


def apply_plans(conn: Connection, plans: Sequence[tuple[OutboundSms, Final | Retry]], now: datetime) -> None:
    """Record what each send led to: final outcomes settle the reply, retries put it back in the outbox."""
    db = DriverSql(conn)
    finals = [(sms, p) for sms, p in plans if isinstance(p, Final)]
    settle(
        conn,
        [Settlement(sms.outbox_id, sms.message_id, p.status, None, p.serial, p.code, p.error) for sms, p in finals],
        now,
    )
    retries = [(sms, p) for sms, p in plans if isinstance(p, Retry)]
    db.executemany(
        "UPDATE outbox SET attempts = ?, next_attempt_at = ?, lease_until = NULL, leased_by = NULL WHERE id = ?",
        [(p.attempts, db.ts(p.at), sms.outbox_id) for sms, p in retries],
    )
    db.executemany(
        "UPDATE messages SET error_code = ?, error_message = ?, updated_at = ? WHERE id = ?",
        [(p.code, p.error, db.ts(now), sms.message_id) for sms, p in retries],
    )
    for sms, p in finals:
        if p.error_class.opted_out and sms.conversation_id:
            _provider_opt_out(db, sms, p, now)
        if p.error_class.alert_ops:
            log.error("reply %s failed with %s: %s (needs ops)", sms.message_id, p.code, p.error)


def _provider_opt_out(db: DriverSql, sms: OutboundSms, final: Final, now: datetime) -> None:
    """Tencent says the customer unsubscribed there: stop messaging them here too, and say why."""
    db.execute(
        "UPDATE conversations SET opted_out = ?, opted_out_at = ?, updated_at = ? WHERE id = ?",
        (db.bool(True), db.ts(now), db.ts(now), sms.conversation_id),
    )
    db.execute(
        "INSERT INTO opt_out_events (conversation_id, event, source, message_id, raw_text, normalized_text, rule,"
        " actor, created_at) VALUES (?, 'opt_out', 'provider', ?, NULL, NULL, NULL, ?, ?)",
        (sms.conversation_id, sms.message_id, f"tencent:{final.code}", db.ts(now)),
    )


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
        retry_policy: RetryPolicy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.writer = writer
        self.sender = sender
        self.retry_policy = retry_policy or RetryPolicy()
        self.rng = rng or random.Random()
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

        plans = [
            (sms, plan_for(sms, result, now=done_at, policy=self.retry_policy, rng=self.rng))
            for sms, result in outcomes
        ]
        await self.writer.run(lambda conn: apply_plans(conn, plans, done_at))
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
