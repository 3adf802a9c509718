"""The event dispatcher: queued events out as signed POSTs, in order per conversation, retried for 24 hours.

Like the delivery loop (``bot/delivery/deliverer.py``) it claims rows with a
lease (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), so several dispatchers, in
one process or many, share the queue and a crashed one's rows are taken over
when the lease ends. A claim takes, per (endpoint, conversation), only the
oldest pending event: event N+1 of a conversation never goes to an endpoint
before N is delivered (or given up on), while other conversations go on.

It is woken after commits that queued events and polls otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import Connection

from bot.events.endpoints import EventEndpoints
from bot.events.signing import signed_headers
from bot.events.woken_loop import WokenLoop
from bot.store.driver_sql import DriverSql, chunks
from bot.store.writer import DbWriter

log = logging.getLogger("smsbot.events")

BACKOFF = (
    timedelta(seconds=10),
    timedelta(seconds=30),
    timedelta(minutes=1),
    timedelta(minutes=5),
    timedelta(minutes=15),
    timedelta(hours=1),
)
"""Waits after the 1st, 2nd, ... failed attempt; the last one repeats."""
GIVE_UP_AFTER = timedelta(hours=24)
LEASE = timedelta(seconds=60)
TIMEOUT = 5.0

_CLAIM = (
    "SELECT e.id, e.endpoint, e.kind, e.body, e.attempts, e.created_at FROM events e"
    " WHERE e.status = 'pending' AND e.next_attempt_at <= ? AND (e.lease_until IS NULL OR e.lease_until < ?)"
    " AND NOT EXISTS (SELECT 1 FROM events p WHERE p.conversation_id = e.conversation_id"
    " AND p.endpoint = e.endpoint AND p.status = 'pending' AND p.id < e.id)"
    " ORDER BY e.id LIMIT ?"
)
"""Due events that are the oldest pending one of their (endpoint, conversation)."""


def backoff(attempts: int) -> timedelta:
    """The wait after ``attempts`` failed attempts (1, 2, ...)."""
    return BACKOFF[min(max(attempts, 1), len(BACKOFF)) - 1]


@dataclass(frozen=True)
class ClaimedEvent:
    id: int
    endpoint: str
    kind: str
    body: str
    attempts: int
    created_at: datetime


@dataclass(frozen=True)
class Attempt:
    """What one POST of one event came to."""

    event: ClaimedEvent
    ok: bool
    status: int | None = None
    error: str | None = None


def claim_events(conn: Connection, *, now: datetime, limit: int, lease: timedelta = LEASE) -> list[ClaimedEvent]:
    db = DriverSql(conn)
    lock = " FOR UPDATE OF e SKIP LOCKED" if db.postgres else ""
    rows = db.rows(_CLAIM + lock, (db.ts(now), db.ts(now), limit))
    claimed = []
    for event_id, endpoint, kind, body, attempts, created_at in rows:
        at = db.read_ts(created_at)
        assert at is not None
        claimed.append(ClaimedEvent(int(event_id), endpoint, kind, body, int(attempts or 0), at))
    for chunk in chunks([e.id for e in claimed]):
        where, params = db.in_list("id", chunk)
        db.execute(f"UPDATE events SET lease_until = ? WHERE {where}", [db.ts(now + lease), *params])
    return claimed


def record_attempts(conn: Connection, attempts: Sequence[Attempt], now: datetime) -> None:
    """Delivered, scheduled again with backoff, or failed for good 24 hours after the event was queued."""
    db = DriverSql(conn)
    rows = []
    for a in attempts:
        tries = a.event.attempts + 1
        deadline = a.event.created_at + GIVE_UP_AFTER
        if a.ok:
            status, next_at, delivered = "delivered", now, now
        elif now >= deadline:
            status, next_at, delivered = "failed", now, None
            log.error(
                "event %s (%s) to %s given up after %d attempts: %s",
                a.event.id,
                a.event.kind,
                a.event.endpoint,
                tries,
                a.error,
            )
        else:
            status, next_at, delivered = "pending", min(now + backoff(tries), deadline), None
        rows.append((status, tries, db.ts(next_at), a.status, a.error, db.ts(delivered), a.event.id))
    db.executemany(
        "UPDATE events SET status = ?, attempts = ?, next_attempt_at = ?, lease_until = NULL, last_status = ?,"
        " last_error = ?, delivered_at = ? WHERE id = ?",
        rows,
    )


class EventDispatcher(WokenLoop):
    """Sends due events; ``run_forever`` beside the delivery loop, ``drain`` for tests and ``--once``."""

    def __init__(
        self,
        writer: DbWriter,
        endpoints: Callable[[], EventEndpoints],
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        poll_seconds: float = 5.0,
        batch: int = 64,
        timeout: float = TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(poll_seconds=poll_seconds, timeout=timeout, transport=transport)
        self.writer = writer
        self.endpoints = endpoints
        self.clock = clock
        self.batch = batch
        self.delivered = 0

    async def run_once(self) -> int:
        """Claim due events, POST them (all at once: one per endpoint and conversation), record the outcomes."""
        self._ensure_started()
        if not self.endpoints():  # nothing configured: what is queued waits for its endpoint to come back
            return 0
        now = self.clock()
        claimed = await self.writer.run(lambda conn: claim_events(conn, now=now, limit=self.batch))
        if not claimed:
            return 0
        client = self._http()
        endpoints = self.endpoints()
        attempts = await asyncio.gather(*(self._post(client, endpoints, e) for e in claimed))
        done_at = self.clock()
        await self.writer.run(lambda conn: record_attempts(conn, attempts, done_at))
        self.delivered += sum(1 for a in attempts if a.ok)
        return len(claimed)

    async def _post(self, client: httpx.AsyncClient, endpoints: EventEndpoints, event: ClaimedEvent) -> Attempt:
        endpoint = endpoints.by_name(event.endpoint)
        if endpoint is None:
            return Attempt(event, ok=False, error=f"endpoint {event.endpoint!r} is no longer configured")
        body = event.body.encode()
        headers = signed_headers(endpoint.secret, body, kind=event.kind, event_id=event.id, timestamp=int(time.time()))
        try:
            response = await client.post(endpoint.url, content=body, headers=headers)
        except httpx.TimeoutException:
            return Attempt(event, ok=False, error=f"timeout after {self.timeout:g}s")
        except httpx.HTTPError as exc:
            return Attempt(event, ok=False, error=f"{type(exc).__name__}: {exc}"[:500])
        if 200 <= response.status_code < 300:
            return Attempt(event, ok=True, status=response.status_code)
        return Attempt(
            event, ok=False, status=response.status_code, error=f"HTTP {response.status_code}: {response.text[:200]}"
        )

    async def drain(self) -> int:
        """Send until nothing is due now (tests, ``worker --once``)."""
        total = 0
        while True:
            handled = await self.run_once()
            total += handled
            if not handled:
                return total

    async def run_forever(self) -> None:
        self._ensure_started()
        assert self._wake is not None
        try:
            while True:
                try:
                    handled = await self.run_once()
                except Exception:
                    log.exception("event round failed; retrying")
                    handled = 0
                if handled:
                    continue  # a delivered event may have let its conversation's next one through
                await self._wait()
        finally:
            await self.close()
