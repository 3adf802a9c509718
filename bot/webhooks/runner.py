"""The webhook runner: a rule's ``call:`` made after the commit that stored its message, and fed back.

``handle_batch`` writes a pending ``webhook_calls`` row with the inbound
message; this loop (beside the delivery loop) claims it with a lease, makes
the HTTP call (``bot/webhooks/http.py``), then in one transaction through the
writer records the result on the row and applies ``resume()``'s decision
(``bot/ingest/resumed.py``): the conversation is read again and locked, the
reply queued, the goto taken, events queued. Tencent's callback never waits
for any of it. A runner that dies mid-call leaves a row whose lease runs out;
any runner then takes it again (a call lost ``MAX_CLAIMS`` times is failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol, cast

import httpx
from sqlalchemy import Connection

from bot.events.endpoints import NO_ENDPOINTS, EventEndpoints
from bot.events.woken_loop import WokenLoop
from bot.ingest.batch import Policy
from bot.ingest.resumed import DEFAULT_POLICY, Resume, ResumedResult, handle_resumed
from bot.rules.engine import resume
from bot.rules.model import Ruleset, WebhookCall, WebhookOutcome
from bot.store.driver_sql import DriverSql
from bot.store.writer import DbWriter
from bot.webhooks.http import CallResult, perform

log = logging.getLogger("smsbot.webhooks")

MAX_CLAIMS = 3
"""Claims of one call (each a runner that took it and never finished) before it is failed without calling."""

_CLAIM = (
    "SELECT id, message_id, webhook, rule, save_as, method, url, request, attempts FROM webhook_calls"
    " WHERE status = 'pending' AND next_attempt_at <= ? AND (lease_until IS NULL OR lease_until < ?)"
    " ORDER BY id LIMIT ?"
)


class RulesSource(Protocol):
    @property
    def ruleset(self) -> Ruleset | None: ...


@dataclass(frozen=True)
class ClaimedCall:
    id: int
    message_id: int
    call: WebhookCall
    claims: int
    """How many times it has been claimed, this one included."""


def _lease(call: WebhookCall) -> timedelta:
    return timedelta(seconds=2 * call.timeout + 30)


def claim_calls(conn: Connection, *, now: datetime, limit: int) -> list[ClaimedCall]:
    db = DriverSql(conn)
    lock = " FOR UPDATE SKIP LOCKED" if db.postgres else ""
    claimed: list[ClaimedCall] = []
    for call_id, message_id, webhook, rule, save_as, method, url, request, attempts in db.rows(
        _CLAIM + lock, (db.ts(now), db.ts(now), limit)
    ):
        stored: dict[str, Any] = db.read_json(request) or {}
        call = WebhookCall(
            webhook=webhook,
            rule=rule,
            save_as=save_as,
            method=cast(Literal["GET", "POST"], method),
            url=url,
            body=stored.get("body"),
            timeout=float(stored.get("timeout") or 3.0),
            captures=stored.get("captures") or {},
        )
        claimed.append(ClaimedCall(int(call_id), int(message_id), call, int(attempts or 0) + 1))
    for item in claimed:
        db.execute(
            "UPDATE webhook_calls SET attempts = ?, lease_until = ? WHERE id = ?",
            (item.claims, db.ts(now + _lease(item.call)), item.id),
        )
    return claimed


def finish_call(
    conn: Connection,
    claimed: ClaimedCall,
    result: CallResult,
    *,
    ruleset: Ruleset | None,
    now: datetime,
    policy: Policy,
    events: EventEndpoints,
    resume_fn: Resume = resume,
) -> ResumedResult | None:
    """Record the call's result and apply what the rule does next; None when another runner already did."""
    db = DriverSql(conn)
    lock = " FOR UPDATE" if db.postgres else ""
    status = db.scalar(f"SELECT status FROM webhook_calls WHERE id = ?{lock}", (claimed.id,))
    if status != "pending":
        return None
    outcome = result.outcome
    db.execute(
        "UPDATE webhook_calls SET status = ?, http_status = ?, response = ?, error = ?, duration_ms = ?,"
        " finished_at = ?, lease_until = NULL WHERE id = ?",
        (
            result.status,
            result.http_status,
            db.json({"json": outcome.data}) if outcome.ok else None,
            outcome.error,
            result.duration_ms,
            db.ts(now),
            claimed.id,
        ),
    )
    return handle_resumed(
        conn,
        ruleset=ruleset,
        message_id=claimed.message_id,
        call=claimed.call,
        outcome=outcome,
        now=now,
        policy=policy,
        events=events,
        resume_fn=resume_fn,
    )


class WebhookRunner(WokenLoop):
    """Claims pending calls, makes them (several at once) and feeds each answer back through the engine."""

    def __init__(
        self,
        writer: DbWriter,
        rules: RulesSource,
        *,
        policy: Policy = DEFAULT_POLICY,
        events: Callable[[], EventEndpoints] = lambda: NO_ENDPOINTS,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        poll_seconds: float = 2.0,
        concurrency: int = 16,
        on_committed: Callable[[ResumedResult], None] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        resume_fn: Resume = resume,
    ) -> None:
        super().__init__(poll_seconds=poll_seconds, transport=transport)  # each call has its own timeout
        self.writer = writer
        self.rules = rules
        self.policy = policy
        self.events = events
        self.clock = clock
        self.concurrency = concurrency
        self.on_committed = on_committed
        self.resume_fn = resume_fn
        self.finished = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def run_once(self) -> int:
        """Claim due calls for the free slots and start them; returns how many were claimed."""
        self._ensure_started()
        free = self.concurrency - len(self._tasks)
        if free <= 0:
            return 0
        now = self.clock()
        claimed = await self.writer.run(lambda conn: claim_calls(conn, now=now, limit=free))
        for item in claimed:
            task = asyncio.create_task(self._run_call(self._http(), item), name="smsbot-webhook")
            self._tasks.add(task)
            task.add_done_callback(self._done)
        return len(claimed)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._wake is not None:
            self._wake.set()  # a slot is free

    async def _run_call(self, client: httpx.AsyncClient, item: ClaimedCall) -> None:
        if item.claims > MAX_CLAIMS:
            result = CallResult(
                "failed",
                WebhookOutcome(ok=False, error=f"the call was taken {item.claims - 1} times and never finished"),
                None,
                0,
                0,
            )
        else:
            result = await perform(client, item.call)
        log.info(
            "webhook %s (%s %s): %s%s in %d ms",
            item.call.webhook,
            item.call.method,
            item.call.url,
            result.status,
            f" ({result.outcome.error})" if result.outcome.error else "",
            result.duration_ms,
        )
        for delay in (0.2, 1.0, 5.0, None):
            try:
                done_at = self.clock()
                ruleset = self.rules.ruleset
                events = self.events()
                resumed = await self.writer.run(
                    functools.partial(
                        finish_call,
                        claimed=item,
                        result=result,
                        ruleset=ruleset,
                        now=done_at,
                        policy=self.policy,
                        events=events,
                        resume_fn=self.resume_fn,
                    )
                )
            except Exception:
                if delay is None:
                    log.exception(
                        "could not record webhook call %s; its lease will run out and it is made again", item.id
                    )
                    return
                log.warning("recording webhook call %s failed; trying again in %.1fs", item.id, delay, exc_info=True)
                await asyncio.sleep(delay)
                continue
            self.finished += 1
            if resumed is not None and self.on_committed is not None:
                self.on_committed(resumed)
            return

    async def drain(self) -> int:
        """Make every call due now and wait for each to be recorded (tests, ``worker --once``)."""
        total = 0
        while True:
            claimed = await self.run_once()
            total += claimed
            if self._tasks:
                await asyncio.wait(set(self._tasks))
            elif not claimed:
                return total

    async def run_forever(self) -> None:
        self._ensure_started()
        assert self._wake is not None
        try:
            while True:
                try:
                    await self.run_once()
                except Exception:
                    log.exception("webhook round failed; retrying")
                await self._wait()
        finally:
            if self._tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait(set(self._tasks), timeout=10)
                for task in self._tasks:
                    task.cancel()
            await self.close()
