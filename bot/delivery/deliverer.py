"""The delivery loop: queued replies out through an ``SmsSender``, outside any callback request.

It wakes on every commit that queued replies and polls otherwise (for
retries that came due, and for replies queued by other processes). The SQL it
runs (claiming with a lease, settling) is ``bot/delivery/outbox.py``; what to
do after each answer is ``bot/delivery/retry.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection

from bot.config import Settings
from bot.delivery.frequency import NO_LIMITS, FrequencyLimits
from bot.delivery.outbox import LEASE, Number, apply_plans, claim_due
from bot.delivery.reconcile import AmbiguousChecks, Reconciler, ambiguous_checks
from bot.delivery.retry import Final, Retry, RetryPolicy, plan
from bot.events.endpoints import EventEndpoints
from bot.sms import OutboundSms, SendResult, SmsSender
from bot.store.writer import DbWriter, RepeatedFailure

log = logging.getLogger("smsbot.outbox")


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


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
        send_by=sms.send_by,
    )


def frequency_limits(settings: Settings) -> FrequencyLimits:
    """The per-number limits the delivery loop keeps to (zero counts as no limit, for environment variables)."""
    return FrequencyLimits(
        same_content=settings.frequency_same_content or None,
        per_hour=settings.frequency_per_hour or None,
        per_day=settings.frequency_per_day or None,
    )


def delivery_options(settings: Settings) -> dict[str, Any]:
    """The ``Deliverer`` keyword arguments that come from settings (picklable, for the writer process).

    ``ambiguous`` is how ambiguous sends are looked up at Tencent, or None
    when the sender is not Tencent's (``bot/delivery/reconcile.py``).
    """
    return {
        "concurrency": settings.send_concurrency,
        "send_timeout": float(settings.tencent_timeout),
        "lease": settings.delivery_lease,
        "limits": frequency_limits(settings),
        "ambiguous": ambiguous_checks(settings),
    }


def _apply(
    conn: Connection, *, plans: list[tuple[OutboundSms, Final | Retry]], at: datetime, events: EventEndpoints | None
) -> None:
    apply_plans(conn, plans, at, events)


class Deliverer:
    """The delivery loop: sends queued replies, several numbers at once, each number's replies in order.

    It wakes on every commit that queued replies and polls otherwise (for
    retries that came due, and for replies queued by other processes). Each
    claimed batch is grouped by number; one task per number sends its replies
    one after another on a thread pool (the SDK blocks) and records each
    outcome as soon as it is known, so a slow send never holds up the record
    of the others and a crash loses at most the sends in flight (their lease
    runs out and the one in flight per number is marked ambiguous, for a check with
    Tencent, while those behind it are sent: ``outbox.recover_expired_leases``).

    With ``ambiguous`` (the Tencent sender), ``run_forever`` also runs the
    ``Reconciler`` beside it: a task of its own on this loop, its SDK calls
    on a thread of their own, so a slow check never holds up a send.
    """

    def __init__(
        self,
        writer: DbWriter,
        sender: SmsSender,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        poll_seconds: float = 1.0,
        concurrency: int = 8,
        batch: int | None = None,
        send_timeout: float = 5.0,
        retry_policy: RetryPolicy | None = None,
        rng: random.Random | None = None,
        limits: FrequencyLimits = NO_LIMITS,
        ambiguous: AmbiguousChecks | None = None,
        events: Callable[[], EventEndpoints] | None = None,
        lease: timedelta = LEASE,
    ) -> None:
        self.writer = writer
        self.events = events
        """The event endpoints now configured (``reply_failed``: sends failed, replies expired, failures
        reported for sends it records or the ambiguous-send check settles); None: no events."""
        self.sender = sender
        self.retry_policy = retry_policy or RetryPolicy()
        self.rng = rng or random.Random()
        self.clock = clock
        self.poll_seconds = poll_seconds
        self.concurrency = concurrency
        self.batch = batch or concurrency * 4
        # A claimed reply waits for at most batch/concurrency sends before its own, each bounded by
        # the sender's timeout; the lease must outlast that or another worker would send it again.
        self.lease = max(lease, timedelta(seconds=send_timeout * (self.batch // concurrency + 2)))
        self.limits = limits
        # A sender that never waits on the network (the console) is called on the loop itself:
        # a thread hand-off per reply would cost more than the send.
        self._in_loop = not getattr(sender, "blocking", True)
        self.owner = worker_id()
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._busy: set[Number] = set()
        self._claim_when_free = False
        self._outcomes: list[tuple[OutboundSms, Final | Retry, datetime, asyncio.Future[None]]] = []
        self._recording = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.sent = 0
        self.reconciler = (
            Reconciler(writer, ambiguous, clock=clock, tick_seconds=min(poll_seconds, 1.0), events=events)
            if ambiguous is not None
            else None
        )
        """Settles ambiguous sends by asking Tencent (None unless the sender is Tencent's)."""

    def wake(self) -> None:
        """Called from any thread after a commit that queued replies."""
        loop, event = self._loop, self._wake
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
                loop.call_soon_threadsafe(event.set)

    def _ensure_started(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="smsbot-send")

    async def run_once(self) -> int:
        """Claim due replies for numbers not already being sent to and start sending them.

        Returns how many were claimed; their sends go on in the background (see ``idle``).
        """
        self._ensure_started()
        if len(self._busy) >= self.concurrency:
            self._claim_when_free = True
            return 0
        now = self.clock()
        if self._in_loop:
            return await self.writer.run(lambda conn: self._claim_send_record(conn, now))
        busy = frozenset(self._busy)
        left: list[int] = []
        events = self.events() if self.events is not None else None
        claimed = await self.writer.run(
            lambda conn: claim_due(
                conn,
                now=now,
                limit=self.batch,
                owner=self.owner,
                lease=self.lease,
                busy=busy,
                limits=self.limits,
                left_for_busy=left,
                events=events,
            )
        )
        # Only when something due waits for a number or a slot is a finished send worth a new claim.
        self._claim_when_free = bool(left) or len(claimed) >= self.batch
        by_number: dict[Number, list[OutboundSms]] = {}
        for sms in claimed:
            by_number.setdefault((sms.nationcode, sms.mobile), []).append(sms)
        for number, replies in by_number.items():
            self._busy.add(number)
            task = asyncio.create_task(self._deliver(number, replies), name="smsbot-send")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return len(claimed)

    def _claim_send_record(self, conn: Connection, now: datetime) -> int:
        """For a sender that never waits: claim, send in queue order and settle, all in one transaction.

        No lease is needed, as nobody else can see these rows before they are
        settled; if the transaction fails after sending, the replies are sent
        again next round, which for such a sender (the console) only prints twice.
        """
        events = self.events() if self.events is not None else None
        claimed = claim_due(
            conn, now=now, limit=self.batch, owner=self.owner, limits=self.limits, take_lease=False, events=events
        )
        outcomes = [(sms, self._send_one(sms)) for sms in claimed]
        done_at = self.clock()
        plans = [
            (sms, plan_for(sms, result, now=done_at, policy=self.retry_policy, rng=self.rng))
            for sms, result in outcomes
        ]
        apply_plans(conn, plans, done_at, events)
        self.sent += len(plans)
        return len(claimed)

    @property
    def idle(self) -> bool:
        """No send in flight."""
        return not self._tasks

    async def drain(self) -> int:
        """Send everything due now and wait for the outcomes to be recorded (``smsbot worker --once``, tests)."""
        total = 0
        while True:
            claimed = await self.run_once()
            total += claimed
            if self._tasks:
                await asyncio.wait(set(self._tasks))
            elif not claimed:
                return total

    async def _deliver(self, number: Number, replies: list[OutboundSms]) -> None:
        try:
            for sms in replies:
                result = await asyncio.get_running_loop().run_in_executor(self._pool, self._send_one, sms)
                done_at = self.clock()
                step = plan_for(sms, result, now=done_at, policy=self.retry_policy, rng=self.rng)
                await self._record_soon(sms, step, done_at)
                self.sent += 1
        finally:
            self._busy.discard(number)
            if self._wake is not None and self._claim_when_free:
                self._wake.set()  # a slot is free, and replies left for it (or this number) are due

    async def _record_soon(self, sms: OutboundSms, step: Final | Retry, at: datetime) -> None:
        """Record this outcome with any others that finish while a record is being written.

        At a trickle every outcome is written on its own, at once; under load the
        ones that pile up behind a write go together in the next one, so the
        writer does one statement per table for many replies instead of many.
        """
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._outcomes.append((sms, step, at, done))
        if not self._recording:
            self._recording = True
            task = asyncio.create_task(self._write_outcomes(), name="smsbot-record")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await done

    async def _write_outcomes(self) -> None:
        try:
            while self._outcomes:
                batch, self._outcomes = self._outcomes, []
                await self._record([(sms, step) for sms, step, _, _ in batch], max(at for _, _, at, _ in batch))
                for *_, done in batch:
                    if not done.done():
                        done.set_result(None)
        finally:
            self._recording = False
            for *_, done in self._outcomes:  # cancelled while waiting: nobody may wait forever
                if not done.done():
                    done.cancel()

    async def _record(self, plans: list[tuple[OutboundSms, Final | Retry]], at: datetime) -> None:
        """Record outcomes, trying again for a while: a lost record means a reply sent twice."""
        for delay in (0.2, 0.5, 1.0, 2.0, 5.0, 10.0, None):
            try:
                events = self.events() if self.events is not None else None
                await self.writer.run(functools.partial(_apply, plans=plans, at=at, events=events))
                return
            except Exception:
                if delay is None:
                    log.exception(
                        "could not record the outcome of %d send(s): when their lease runs out they are marked "
                        "ambiguous, not resent",
                        len(plans),
                    )
                    return
                log.warning("recording a send's outcome failed; trying again in %.1fs", delay, exc_info=True)
                await asyncio.sleep(delay)

    def _send_one(self, sms: OutboundSms) -> SendResult:
        try:
            return self.sender.send(sms)
        except Exception as exc:  # a sender bug must not lose the reply: it is recorded as failed
            log.exception("sending message %s failed", sms.message_id)
            return SendResult(ok=False, code="InternalError.SenderCrashed", message=str(exc))

    async def run_forever(self) -> None:
        self._ensure_started()
        assert self._wake is not None
        checking = (
            asyncio.create_task(self.reconciler.run_forever(), name="smsbot-ambiguous-checks")
            if self.reconciler is not None
            else None
        )
        failures = RepeatedFailure(log, "delivery round (retried every poll)")
        try:
            while True:
                try:
                    handled = await self.run_once()
                except Exception as exc:  # the database is down or its disk full: once in full, then a line a minute
                    failures.failed(exc)
                    handled = 0
                else:
                    failures.succeeded()
                if handled >= self.batch:
                    continue  # a full batch: more may be due at once
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel that
                # arrives together with a wake-up, and shutdown would then hang.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_seconds):
                        await self._wake.wait()
                self._wake.clear()
        finally:
            if checking is not None:
                checking.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait({checking}, timeout=5)
            await self._finish_in_flight()

    async def _finish_in_flight(self) -> None:
        """On shutdown, let sends already handed to Tencent record their outcome (bounded in time)."""
        if self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait(set(self._tasks), timeout=10)
            for task in self._tasks:
                task.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
