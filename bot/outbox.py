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
import json
import logging
import os
import random
import socket
import sys
from collections.abc import Callable, Sequence, Set
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TextIO

from sqlalchemy import Connection

from bot.config import Settings, frequency_limits
from bot.frequency import NO_LIMITS, FrequencyLimits, Sent, earliest_send
from bot.retry import Final, Retry, RetryPolicy, marketing_hours, next_marketing_opening, plan
from bot.service import mask_number
from bot.store.driver_sql import PREPARE, DriverSql, chunks
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
    """Something that delivers an SMS: Tencent in production, the console locally, a fake in tests.

    Senders are called on a thread pool, as a network call blocks; one with a
    class attribute ``blocking = False`` is called on the delivery loop itself.
    """

    def send(self, sms: OutboundSms) -> SendResult: ...


class ConsoleSender:
    """Prints each reply instead of sending it, for local runs without Tencent credentials."""

    blocking = False
    """Printing a line never waits on a network: the delivery loop may call it directly."""

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
    "SELECT id, message_id, attempts, next_attempt_at FROM outbox"
    " WHERE next_attempt_at <= ? AND (lease_until IS NULL OR lease_until < ?)"
    " ORDER BY next_attempt_at, id LIMIT ?"
)
# Two steps rather than one join: the due rows come from the outbox index alone, then their
# details by primary key; a four-table join let PostgreSQL pick hash joins over whole tables
# whenever its statistics lagged behind a growing table.
_DETAILS = (
    "SELECT m.id, m.signature, m.template_id, m.params, m.text, m.rule_kind, c.nationcode, c.mobile, v.opted_out,"
    " v.id, m.marketing, m.contact_id"
    " FROM messages m JOIN contacts c ON c.id = m.contact_id JOIN conversations v ON v.id = m.conversation_id"
    " WHERE {where}"
)
_LEASED = "SELECT message_id FROM outbox WHERE lease_until IS NOT NULL AND lease_until >= ?"
"""Replies being sent somewhere (a live lease; the claim's own candidates never have one): few, by an index."""
_CLAIM_NUMBERS = (
    "SELECT c FROM unnest(?::bigint[]) AS c WHERE NOT pg_try_advisory_xact_lock(?::int, mod(c, 2147483647)::int)"
)
"""On PostgreSQL, the numbers another worker is claiming at this moment (its transaction holds their lock)."""
_PASSED_OVER = (
    "SELECT o.id, o.next_attempt_at, m.contact_id FROM outbox o JOIN messages m ON m.id = o.message_id"
    " WHERE o.next_attempt_at <= ? AND (o.lease_until IS NULL OR o.lease_until < ?) AND NOT (o.id = ANY(?))"
    " AND m.contact_id = ANY(?)"
)
"""Due rows of these numbers that this claim did not get (PostgreSQL: another claim has them locked)."""
CLAIM_LOCK_SPACE = 0x534D53
"""First key of the claim's advisory locks ("SMS"), so they cannot meet another application's."""
_HISTORY = (
    "SELECT contact_id, sent_at, text FROM messages"
    " WHERE {where} AND sent_at IS NOT NULL AND sent_at >= ? AND direction = 'out'"
)

AMBIGUOUS_REASON = (
    "no answer from Tencent: the SMS may have gone out, so it is not resent; its delivery report (by "
    "SessionContext) settles it; without one, check Tencent's console before sending again"
)

Number = tuple[str, str]
"""(nationcode, mobile): replies to one number go out one at a time, in order."""


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
    sent_at: datetime | None = None


def claim_due(
    conn: Connection,
    *,
    now: datetime,
    limit: int,
    owner: str,
    lease: timedelta = LEASE,
    busy: Set[Number] = frozenset(),
    limits: FrequencyLimits = NO_LIMITS,
    left_for_busy: list[int] | None = None,
    take_lease: bool = True,
) -> list[OutboundSms]:
    """Lease up to ``limit`` due outbox rows to ``owner``, in the order they were queued.

    Rows of opted-out numbers are suppressed instead; marketing replies outside
    08:00-22:00 China time and replies that would break a number's frequency
    limits are put back with the time they may go; rows for ``busy`` numbers
    (a send to them is in flight here) are left for a later round, so replies
    to one number never overtake each other (their ids go to ``left_for_busy``); numbers another worker is
    sending to or claiming are left too (``_numbers_taken_elsewhere``). On PostgreSQL ``FOR UPDATE SKIP
    LOCKED`` lets several workers claim side by side without waiting for or
    taking each other's rows.
    """
    db = DriverSql(conn)
    due = db.rows(_DUE + (" FOR UPDATE SKIP LOCKED" if db.postgres else ""), (db.ts(now), db.ts(now), limit))
    if not due:
        return []
    outbox_of = {int(message_id): int(outbox_id) for outbox_id, message_id, _, _ in due}
    details: dict[int, Any] = {}
    for chunk in chunks(sorted(outbox_of)):
        where, params = db.in_list("m.id", chunk)
        for row in db.rows(_DETAILS.format(where=where), params):
            details[int(row[0])] = row
    history = _history(db, {int(row[11]) for row in details.values()}, now, limits)
    first_of: dict[int, tuple[datetime, int]] = {}  # each number's first row in this claim (the queue order)
    for outbox_id, message_id, _, next_attempt_at in due:
        at = db.read_ts(next_attempt_at)
        assert at is not None  # NOT NULL
        first_of.setdefault(int(details[int(message_id)][11]), (at, int(outbox_id)))
    elsewhere = _numbers_taken_elsewhere(db, first_of, [int(row[0]) for row in due], now)
    claimed: list[OutboundSms] = []
    suppressed: list[Settlement] = []
    deferred: dict[datetime, list[int]] = {}
    for outbox_id, message_id, attempts, _ in due:
        row = details[int(message_id)]
        _, sign, template_id, params, text, rule_kind, nationcode, mobile, opted_out, convo, marketing, contact = row
        if opted_out and rule_kind != "opt_out":
            suppressed.append(Settlement(outbox_id, message_id, "suppressed", "the number opted out before sending"))
            continue
        if (nationcode, mobile) in busy:
            if left_for_busy is not None:
                left_for_busy.append(int(outbox_id))
            continue
        if int(contact) in elsewhere:  # another worker is sending to this number: its turn comes after
            continue
        if marketing and not marketing_hours(now):
            # marketing SMS may only go out 08:00-22:00 China time: wait, do not send
            deferred.setdefault(next_marketing_opening(now), []).append(int(outbox_id))
            continue
        sent_before = history.setdefault(int(contact), [])
        allowed_at = earliest_send(sent_before, text, now, limits) if limits.enabled else None
        if allowed_at is not None:
            deferred.setdefault(allowed_at, []).append(int(outbox_id))
            continue
        sent_before.append(Sent(now, text))  # the next reply to this number in the batch counts this one
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
    for at, ids in deferred.items():
        for chunk in chunks(ids):
            where, params = db.in_list("id", chunk)
            db.execute(f"UPDATE outbox SET next_attempt_at = ? WHERE {where}", [db.ts(at), *params])
    if take_lease:  # (not when the caller settles these rows in this same transaction)
        for chunk in chunks([sms.outbox_id for sms in claimed]):
            where, params = db.in_list("id", chunk)
            db.execute(
                f"UPDATE outbox SET lease_until = ?, leased_by = ? WHERE {where}", [db.ts(now + lease), owner, *params]
            )
    return claimed


def _numbers_taken_elsewhere(
    db: DriverSql, first_of: dict[int, tuple[datetime, int]], claimed: Sequence[int], now: datetime
) -> set[int]:
    """Numbers another worker is sending to (a live lease) or claiming right now (PostgreSQL).

    Replies to one number must go out one at a time and in queue order, and
    ``SKIP LOCKED`` alone would let a second worker take a number's next reply
    while the first still sends, or is claiming, its earlier one. So:

    - a number with a reply leased anywhere is skipped (the lease lasts until
      that send is recorded);
    - on PostgreSQL each claim takes a transaction-scoped advisory lock per
      number, never waiting, and skips the numbers whose lock another claim
      holds (the lock lasts until that claim's leases are committed);
    - on PostgreSQL a number is skipped too when a due reply queued before
      this claim's first one for it was passed over: ``SKIP LOCKED`` skipped it
      because another claim has locked the row and may not have reached its
      advisory lock yet. A plain read still sees such rows.

    On SQLite claims never overlap (one writer at a time): the leases say it all.
    ``first_of`` maps each number (contact id) to its first row in this claim,
    as ``(next_attempt_at, outbox id)``; ``claimed`` are this claim's rows.
    """
    if not first_of:
        return set()
    contacts = sorted(first_of)
    taken: set[int] = set()
    if db.postgres:
        # One round trip; the statements still run in this order, each reading after the one before.
        # Not prepared (see PREPARE): generic plans made on small tables scan whole tables later.
        connection = db.cursor.connection
        lock_cursor, lease_cursor, skipped_cursor = (connection.cursor() for _ in range(3))
        latest = max(first for first, _ in first_of.values())
        with connection.pipeline():
            lock_cursor.execute(db.sql(_CLAIM_NUMBERS), (contacts, CLAIM_LOCK_SPACE), prepare=PREPARE)
            lease_cursor.execute(db.sql(_LEASED), (now,), prepare=PREPARE)
            skipped_cursor.execute(db.sql(_PASSED_OVER), (latest, now, list(claimed), contacts), prepare=PREPARE)
        taken.update(int(row[0]) for row in lock_cursor.fetchall())
        leased = [int(row[0]) for row in lease_cursor.fetchall()]
        for outbox_id, next_attempt_at, contact in skipped_cursor.fetchall():
            if (next_attempt_at, int(outbox_id)) < first_of[int(contact)]:
                taken.add(int(contact))
        for cursor in (lock_cursor, lease_cursor, skipped_cursor):
            cursor.close()
    else:
        leased = [int(row[0]) for row in db.rows(_LEASED, (db.ts(now),))]
    for chunk in chunks(leased):
        where, params = db.in_list("id", chunk)
        taken.update(int(row[0]) for row in db.rows(f"SELECT contact_id FROM messages WHERE {where}", params))
    return taken & set(contacts)


def _history(db: DriverSql, contacts: set[int], now: datetime, limits: FrequencyLimits) -> dict[int, list[Sent]]:
    """What was sent to these contacts recently, for the frequency limits."""
    history: dict[int, list[Sent]] = {}
    if not limits.enabled or not contacts:
        return history
    since = db.ts(now - limits.lookback)
    for chunk in chunks(sorted(contacts)):
        where, params = db.in_list("contact_id", chunk)
        for contact, sent_at, text in db.rows(_HISTORY.format(where=where), [*params, since]):
            at = db.read_ts(sent_at)
            if at is not None:
                history.setdefault(int(contact), []).append(Sent(at, text))
    return history


def settle(conn: Connection, settlements: Sequence[Settlement], now: datetime) -> None:
    """Record final outcomes: one statement per table for the whole list."""
    if not settlements:
        return
    db = DriverSql(conn)
    if db.postgres:
        _settle_postgres(db, settlements, now)
        return
    db.executemany(
        # A delivery report (pushed or pulled) can arrive before the send's own outcome is committed:
        # what the handset said is kept, it is never turned back into "sent".
        "UPDATE messages SET"
        " status = CASE WHEN status IN ('delivered', 'failed') AND ? THEN status ELSE ? END,"
        " status_reason = CASE WHEN status IN ('delivered', 'failed') AND ? THEN status_reason ELSE ? END,"
        " error_code = CASE WHEN status IN ('delivered', 'failed') AND ? THEN error_code ELSE ? END,"
        " error_message = CASE WHEN status IN ('delivered', 'failed') AND ? THEN error_message ELSE ? END,"
        " provider_serial = coalesce(?, provider_serial), sent_at = ?, updated_at = ? WHERE id = ?",
        [
            (
                *[item for value in (s.status, s.reason, s.code, s.error) for item in (_reported(db, s), value)],
                s.serial,
                db.ts(s.sent_at),
                db.ts(now),
                s.message_id,
            )
            for s in settlements
        ],
    )
    for chunk in chunks([s.outbox_id for s in settlements]):
        where, params = db.in_list("id", chunk)
        db.execute(f"DELETE FROM outbox WHERE {where}", params)


_SETTLE_POSTGRES = (
    "UPDATE messages m SET"
    " status = CASE WHEN m.status IN ('delivered', 'failed') AND x.keep THEN m.status ELSE x.status END,"
    " status_reason = CASE WHEN m.status IN ('delivered', 'failed') AND x.keep THEN m.status_reason ELSE x.reason END,"
    " error_code = CASE WHEN m.status IN ('delivered', 'failed') AND x.keep THEN m.error_code ELSE x.code END,"
    " error_message = CASE WHEN m.status IN ('delivered', 'failed') AND x.keep THEN m.error_message ELSE x.error END,"
    " provider_serial = coalesce(x.serial, m.provider_serial), sent_at = x.sent_at, updated_at = ?"
    " FROM json_to_recordset(?::json) AS x(id bigint, status text, reason text, serial text, code text, error text,"
    " sent_at timestamptz, keep boolean)"
    " WHERE m.id = x.id"
)


def _settle_postgres(db: DriverSql, settlements: Sequence[Settlement], now: datetime) -> None:
    """The same as the SQLite statements, as one UPDATE for all rows (one statement, not one per reply)."""
    rows = [
        {
            "id": s.message_id,
            "status": s.status,
            "reason": s.reason,
            "serial": s.serial,
            "code": s.code,
            "error": s.error,
            "sent_at": s.sent_at.isoformat() if s.sent_at else None,
            "keep": s.status in ("sent", "ambiguous"),  # a stored delivery report outranks these
        }
        for s in settlements
    ]
    db.execute(_SETTLE_POSTGRES, [now, json.dumps(rows, ensure_ascii=False)])
    for chunk in chunks([s.outbox_id for s in settlements]):
        where, params = db.in_list("id", chunk)
        db.execute(f"DELETE FROM outbox WHERE {where}", params)


def _reported(db: DriverSql, settlement: Settlement) -> Any:
    """Whether a delivery report, where one is already stored, outranks this settlement."""
    return db.bool(settlement.status in ("sent", "ambiguous"))


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
        [
            Settlement(
                sms.outbox_id,
                sms.message_id,
                p.status,
                AMBIGUOUS_REASON if p.status == "ambiguous" else None,
                p.serial,
                p.code,
                p.error,
                # an ambiguous send may have reached the handset: it counts against the limits too
                sent_at=now if p.status in ("sent", "ambiguous") else None,
            )
            for sms, p in finals
        ],
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


def delivery_options(settings: Settings) -> dict[str, Any]:
    """The ``Deliverer`` keyword arguments that come from settings (picklable, for the writer process)."""
    return {
        "concurrency": settings.send_concurrency,
        "send_timeout": float(settings.tencent_timeout),
        "limits": frequency_limits(settings),
    }


class Deliverer:
    """The delivery loop: sends queued replies, several numbers at once, each number's replies in order.

    It wakes on every commit that queued replies and polls otherwise (for
    retries that came due, and for replies queued by other processes). Each
    claimed batch is grouped by number; one task per number sends its replies
    one after another on a thread pool (the SDK blocks) and records each
    outcome as soon as it is known, so a slow send never holds up the record
    of the others and a crash loses at most the sends in flight (their lease
    runs out and they are marked for a check, see ``bot/retry.py``).
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
    ) -> None:
        self.writer = writer
        self.sender = sender
        self.retry_policy = retry_policy or RetryPolicy()
        self.rng = rng or random.Random()
        self.clock = clock
        self.poll_seconds = poll_seconds
        self.concurrency = concurrency
        self.batch = batch or concurrency * 4
        # A claimed reply waits for at most batch/concurrency sends before its own, each bounded by
        # the sender's timeout; the lease must outlast that or another worker would send it again.
        self.lease = max(LEASE, timedelta(seconds=send_timeout * (self.batch // concurrency + 2)))
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
        claimed = claim_due(conn, now=now, limit=self.batch, owner=self.owner, limits=self.limits, take_lease=False)
        outcomes = [(sms, self._send_one(sms)) for sms in claimed]
        done_at = self.clock()
        plans = [
            (sms, plan_for(sms, result, now=done_at, policy=self.retry_policy, rng=self.rng))
            for sms, result in outcomes
        ]
        apply_plans(conn, plans, done_at)
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
                await self.writer.run(lambda conn: apply_plans(conn, plans, at))
                return
            except Exception:
                if delay is None:
                    log.exception("could not record the outcome of %d send(s): they will be retried", len(plans))
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
        try:
            while True:
                try:
                    handled = await self.run_once()
                except Exception:
                    log.exception("delivery round failed; retrying")
                    handled = 0
                if handled >= self.batch:
                    continue  # a full batch: more may be due at once
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel that
                # arrives together with a wake-up, and shutdown would then hang.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_seconds):
                        await self._wake.wait()
                self._wake.clear()
        finally:
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
