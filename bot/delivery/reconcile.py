"""Settling ambiguous sends: asking Tencent what became of a SendSms we got no readable answer to.

A send is *ambiguous* when the request may have reached Tencent but its
answer never did (a read timeout, a reset after the request was written, an
answer the SDK could not read). SendSms has no idempotency key, so it is never
sent again: the customer might get it twice. Most are settled by their
delivery report (pushed to ``/sms/status`` or pulled), which names our
SessionContext; but Tencent echoes SessionContext in reports only once its
support has switched that on, and a report can be lost. So every
``ambiguous_check_interval`` the delivery loop takes a bounded number of
ambiguous replies older than ``ambiguous_check_after`` (and younger than the
7 days Tencent looks back) and asks ``PullSmsSendStatusByPhoneNumber`` for
that number's sends around the reply's ``sent_at``. A reply is settled
through ``mark_reported``, the path delivery reports take, when Tencent lists
its send:

1. by an item whose ``SessionContext`` is our marker for this reply
   (``bot/tencent/session_context.py``): authoritative, only we can write it;
2. otherwise, only while Tencent does not echo our markers at all, by the one
   item in the window whose ``SerialNo`` no reply of ours has, when this reply
   is our only send to that number in the window whose serial we do not know
   (and none is in flight): the reply's ``status_reason`` says it was matched
   by number and time.

When nothing matches, ``checks`` goes up; after ``ambiguous_check_max``
checks the reply keeps its status with a reason for ops. Tencent errors are
logged and the reply is asked about again next interval. Nothing here sends.

The SDK blocks, so each call runs on a thread of its own, never on the
delivery loop's send threads; the database work goes through the delivery
loop's ``DbWriter``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Connection, String, and_, func, literal_column, or_, select, update
from sqlalchemy.sql.expression import ColumnClause

from bot.config import ConfigError, Settings
from bot.events.endpoints import EventEndpoints
from bot.events.reply_failed import FailedReply, queue_reply_failed
from bot.numbers import CHINA, parse_china_time
from bot.store.models import contacts, messages, outbox
from bot.store.reports import Outcome, mark_reported, reported_outcome, take_pending
from bot.store.writer import DbWriter
from bot.tencent.config import TencentConfig, e164, tencent_config
from bot.tencent.pull import PulledItemRefused, SendStatusLookup, TencentPullClient, send_status_to_report
from bot.tencent.session_context import SessionContexts

log = logging.getLogger("smsbot.ambiguous")

WINDOW_BEFORE = timedelta(minutes=1)
"""How long before ``sent_at`` Tencent may have taken the send: ``sent_at`` is when we gave up waiting
for the answer, at most ``tencent_timeout`` (60 s at most) after the request left."""
WINDOW_AFTER = timedelta(minutes=15)
"""How long after ``sent_at`` the window reaches, in case Tencent stamps its send late."""
TENCENT_LOOKBACK = timedelta(days=7)
"""``PullSmsSendStatusByPhoneNumber``'s ``BeginTime`` may be at most 7 days back."""
LOOKBACK_MARGIN = timedelta(minutes=5)
"""Kept from that limit, for the difference between our clock and Tencent's."""
TICK_SECONDS = 1.0
"""How often the loop looks whether a round is due (a clock comparison, nothing more)."""

_AMBIGUOUS: ColumnClause[str] = literal_column("'ambiguous'", String)
"""Written into the SQL, not bound, so SQLite and PostgreSQL use the partial index on ambiguous rows."""


@dataclass(frozen=True)
class AmbiguousChecks:
    """How ambiguous sends are looked up at Tencent: picklable, so the writer process builds its own client."""

    tencent: TencentConfig
    interval: timedelta = timedelta(minutes=5)
    after: timedelta = timedelta(minutes=5)
    max_checks: int = 3
    batch: int = 20


def ambiguous_checks(settings: Settings) -> AmbiguousChecks | None:
    """The checks for these settings: only with the Tencent sender and its credentials (nothing else is ambiguous).

    None also when ``ambiguous_check_max`` is 0, and when credentials are
    missing: choosing the sender (``make_sender``) refuses that setup already,
    naming what is missing.
    """
    if settings.sender != "tencent" or settings.ambiguous_check_max == 0:
        return None
    try:
        config = tencent_config(settings, purpose="send")
    except ConfigError:
        return None
    return AmbiguousChecks(
        tencent=config,
        interval=settings.ambiguous_check_interval,
        after=settings.ambiguous_check_after,
        max_checks=settings.ambiguous_check_max,
        batch=settings.ambiguous_check_batch,
    )


# ====================================================================== what one check found


@dataclass(frozen=True)
class AmbiguousReply:
    """One ambiguous reply taken for a check."""

    message_id: int
    contact_id: int
    phone_number: str
    """E.164, as Tencent wants it."""
    sent_at: datetime

    @property
    def window(self) -> tuple[datetime, datetime]:
        """The sends Tencent is asked about: around ``sent_at`` (see ``WINDOW_BEFORE``, ``WINDOW_AFTER``)."""
        return self.sent_at - WINDOW_BEFORE, self.sent_at + WINDOW_AFTER


@dataclass(frozen=True)
class Status:
    """One send Tencent listed, as the reply's row would record it."""

    serial: str
    outcome: Outcome


@dataclass(frozen=True)
class Finding:
    """What Tencent's answer says about one reply, before the database is consulted (pure)."""

    marked: Status | None = None
    """The send carrying our marker for this reply: it is this reply's send."""
    unmarked: tuple[Status, ...] = ()
    """Sends with no SessionContext at all: one of them may be ours, if Tencent does not echo it."""
    echoed: bool = False
    """Some send carried a marker of ours: Tencent echoes them, so this reply's send would carry its own."""
    listed: int = 0
    """How many sends Tencent listed for the number in the window."""


def examine(
    items: Sequence[Mapping[str, Any]], *, message_id: int, phone_number: str, contexts: SessionContexts | None
) -> Finding:
    """Sort Tencent's items for one reply: ours by marker, foreign, or possibly ours (no SessionContext).

    An item with a SessionContext that is not our marker is another system's
    (on a shared SmsSdkAppId) or another reply of ours: never this reply's.
    Items for another number or that the delivery-report parser refuses are
    left out, as a pulled status would be.
    """
    marked: Status | None = None
    unmarked: list[Status] = []
    echoed = False
    listed = 0
    for item in items:
        number = item.get("PhoneNumber")
        if isinstance(number, str) and number and number != phone_number:
            continue
        try:
            report = send_status_to_report(item)
        except PulledItemRefused as exc:
            log.warning("Tencent listed a send status for message %s that cannot be read: %s", message_id, exc)
            continue
        listed += 1
        delivered = report.report_status == "SUCCESS"
        received = parse_china_time(report.user_receive_time) if delivered and report.user_receive_time else None
        status = Status(
            report.sid,
            reported_outcome(
                delivered=delivered, received_at=received, code=report.errmsg, description=report.description
            ),
        )
        context = report.ext.strip() if report.ext else ""
        ours = contexts.message_id(context) if contexts is not None and context else None
        if ours is not None:
            echoed = True
            if ours == message_id:
                marked = status
        elif not context:
            unmarked.append(status)
    return Finding(marked, tuple(unmarked), echoed, listed)


# ====================================================================== the SQL


def claim_ambiguous(
    conn: Connection, *, now: datetime, after: timedelta, interval: timedelta, max_checks: int, limit: int
) -> list[AmbiguousReply]:
    """Take up to ``limit`` ambiguous replies due for a check and stamp them checked now.

    Due: old enough that a delivery report would usually have come
    (``after``), young enough for Tencent's 7-day look-back, asked about
    fewer than ``max_checks`` times, and not in the last ``interval``. The
    stamp is the claim: another delivery loop (``smsbot worker``) skips them
    for an interval, and a Tencent error leaves them to the next one. On
    PostgreSQL rows another claim holds are skipped, not waited for.
    """
    earliest = now - TENCENT_LOOKBACK + LOOKBACK_MARGIN + WINDOW_BEFORE
    query = (
        select(messages.c.id, messages.c.contact_id, messages.c.sent_at)
        .add_columns(contacts.c.nationcode, contacts.c.mobile)
        .join_from(messages, contacts, contacts.c.id == messages.c.contact_id)
        .where(
            messages.c.status == _AMBIGUOUS,
            messages.c.direction == "out",
            messages.c.sent_at <= now - after,
            messages.c.sent_at >= earliest,
            or_(messages.c.checks.is_(None), messages.c.checks < max_checks),
            or_(messages.c.checked_at.is_(None), messages.c.checked_at <= now - interval),
        )
        # never asked first, then the longest since asked: a full batch every round cannot starve any
        .order_by(messages.c.checked_at.asc().nulls_first(), messages.c.sent_at, messages.c.id)
        .limit(limit)
    )
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(of=messages, skip_locked=True)
    due = [
        AmbiguousReply(int(row.id), int(row.contact_id), e164(row.nationcode, row.mobile), row.sent_at)
        for row in conn.execute(query)
    ]
    if due:
        conn.execute(
            update(messages).where(messages.c.id.in_([reply.message_id for reply in due])).values(checked_at=now)
        )
    return due


@dataclass(frozen=True)
class CheckResult:
    """What one check did to its reply, for the log."""

    kind: Literal["settled", "unsettled", "gave_up", "settled_already"]
    status: str | None = None
    """delivered | failed, when settled."""
    by: Literal["marker", "number"] | None = None
    serial: str | None = None
    reason: str | None = None
    """Why nothing was settled (kept as the row's status_reason after the last check)."""
    checks: int = 0


def record_check(
    conn: Connection,
    reply: AmbiguousReply,
    finding: Finding,
    *,
    now: datetime,
    max_checks: int,
    echo_seen: bool,
    events: EventEndpoints | None = None,
) -> CheckResult:
    """Settle ``reply`` if Tencent listed its send, else count the check (and, after the last, tell ops why).

    Runs after Tencent answered, so the reply is read again: a delivery
    report (or another worker) may have settled it meanwhile. With ``events``,
    a send Tencent lists as failed queues ``reply_failed`` (``delivery_failed``).
    """
    row = conn.execute(select(messages.c.status, messages.c.checks).where(messages.c.id == reply.message_id)).first()
    if row is None or row.status != "ambiguous":
        return CheckResult("settled_already", status=row.status if row is not None else None)
    checks = (row.checks or 0) + 1
    found, by, why = _match(conn, reply, finding, now=now, echo_seen=echo_seen)
    if found is not None:
        mark_reported(conn, reply.message_id, found.outcome, serial=found.serial, now=now)
        take_pending(conn, [found.serial])  # a report kept for this serial (no sid we knew) is this one
        values: dict[str, Any] = {"checks": checks, "checked_at": now}
        if by == "number":
            begin, end = reply.window
            values["status_reason"] = (
                "matched by number and time, not by SessionContext (Tencent does not echo it on this account): "
                f"Tencent's only send to this number between {_china(begin)} and {_china(end)} whose SerialNo "
                "no reply of ours has"
            )
        conn.execute(update(messages).where(messages.c.id == reply.message_id).values(**values))
        if not found.outcome.delivered:
            queue_reply_failed(conn, [FailedReply(reply.message_id, "delivery_failed")], events, now)
        return CheckResult(
            "settled",
            status="delivered" if found.outcome.delivered else "failed",
            by=by,
            serial=found.serial,
            checks=checks,
        )
    values = {"checks": checks, "checked_at": now, "updated_at": now}
    kind: Literal["unsettled", "gave_up"] = "unsettled"
    if checks >= max_checks:
        kind = "gave_up"
        values["status_reason"] = (
            f"{why}: asked {checks} time(s) (PullSmsSendStatusByPhoneNumber), the last "
            f"{_age(now - reply.sent_at)} after it was sent; it may or may not have reached the customer: "
            f"look for it in Tencent's console (sends to this number around {_china(reply.sent_at)}); "
            "it was not resent"
        )
    conn.execute(update(messages).where(messages.c.id == reply.message_id).values(**values))
    return CheckResult(kind, reason=why, checks=checks)


def _record_check_on(
    conn: Connection,
    *,
    reply: AmbiguousReply,
    finding: Finding,
    now: datetime,
    max_checks: int,
    echo_seen: bool,
    events: EventEndpoints | None,
) -> CheckResult:
    """``record_check`` with the connection first and the rest by keyword, for ``functools.partial``."""
    return record_check(conn, reply, finding, now=now, max_checks=max_checks, echo_seen=echo_seen, events=events)


def _match(
    conn: Connection, reply: AmbiguousReply, finding: Finding, *, now: datetime, echo_seen: bool
) -> tuple[Status | None, Literal["marker", "number"] | None, str]:
    """The send that is this reply's, how it was recognised, and otherwise why none was."""
    if finding.marked is not None:
        return finding.marked, "marker", ""
    if finding.echoed or echo_seen:
        # Tencent echoes our markers: had it sent this reply, the send would carry this reply's marker.
        return None, None, "Tencent had no status for this send (by its SessionContext)"
    serials = [status.serial for status in finding.unmarked]
    known = (
        {
            str(s)
            for s in conn.scalars(select(messages.c.provider_serial).where(messages.c.provider_serial.in_(serials)))
        }
        if serials
        else set()
    )
    candidates = [status for status in finding.unmarked if status.serial not in known]
    if not candidates:
        return None, None, "Tencent had no status for this send"
    if len(candidates) > 1:
        return None, None, f"Tencent listed {len(candidates)} sends to this number that could be this one"
    begin, end = reply.window
    others = conn.execute(
        select(func.count())
        .select_from(messages)
        .where(
            messages.c.contact_id == reply.contact_id,
            messages.c.direction == "out",
            messages.c.id != reply.message_id,
            messages.c.provider_serial.is_(None),
            # another send of ours without a known serial whose own window overlaps this one
            messages.c.sent_at >= begin,
            messages.c.sent_at <= end + WINDOW_BEFORE,
        )
    ).scalar_one()
    if others:
        return None, None, f"{others + 1} sends of ours to this number in the window have no SerialNo"
    in_flight = conn.execute(
        select(func.count())
        .select_from(outbox.join(messages, messages.c.id == outbox.c.message_id))
        .where(and_(messages.c.contact_id == reply.contact_id, outbox.c.lease_until >= now))
    ).scalar_one()
    if in_flight:
        return None, None, "a send to this number was in flight, so Tencent's unknown send could be that one"
    return candidates[0], "number", ""


def _china(at: datetime) -> str:
    return at.astimezone(CHINA).strftime("%Y-%m-%d %H:%M China time")


def _age(delta: timedelta) -> str:
    minutes = int(delta.total_seconds() // 60)
    if minutes < 120:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"


# ====================================================================== the loop


@dataclass
class RoundResult:
    """One round's counts (for ``smsbot worker --once`` and the tests)."""

    checked: int = 0
    settled: int = 0
    gave_up: int = 0
    errors: int = 0


@dataclass
class _Counters:
    rounds: int = 0
    settled: int = 0
    gave_up: int = 0
    errors: int = 0
    last_error: str | None = None


class Reconciler:
    """Asks Tencent about ambiguous sends, once per interval, from the delivery loop (``Deliverer``).

    ``check_due`` runs a round when one is due by ``clock`` (the app's, so
    tests move time by hand) and returns None otherwise; rounds never overlap.
    """

    def __init__(
        self,
        writer: DbWriter,
        checks: AmbiguousChecks,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        client: SendStatusLookup | None = None,
        tick_seconds: float = TICK_SECONDS,
        events: Callable[[], EventEndpoints] | None = None,
    ) -> None:
        self.writer = writer
        self.events = events
        """The event endpoints now configured (a send settled failed queues ``reply_failed``); None: none."""
        self.checks = checks
        self.clock = clock
        self.client: SendStatusLookup = client or TencentPullClient(checks.tencent)
        self.contexts = checks.tencent.contexts
        self.tick_seconds = tick_seconds
        self.echo_seen = False
        """Tencent has echoed one of our markers (since this process started): it echoes them all."""
        self.counters = _Counters()
        self._last_round: datetime | None = None
        self._lock = asyncio.Lock()
        self._pool: ThreadPoolExecutor | None = None

    async def check_due(self) -> RoundResult | None:
        """One round if an interval has passed since the last (or none ran yet); None when none was due."""
        async with self._lock:
            now = self.clock()
            if self._last_round is not None and now < self._last_round + self.checks.interval:
                return None
            self._last_round = now
            return await self._round(now)

    async def run_forever(self) -> None:
        """A round whenever one is due; a failed round is logged and the next one comes as usual."""
        try:
            while True:
                try:
                    await self.check_due()
                except Exception:
                    log.exception("checking ambiguous sends failed; trying again next interval")
                await asyncio.sleep(self.tick_seconds)
        finally:
            self.close()

    def close(self) -> None:
        """Drop the thread (a call in progress finishes on its own; its answer is not recorded)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def _round(self, now: datetime) -> RoundResult:
        checks = self.checks
        due = await self.writer.run(
            lambda conn: claim_ambiguous(
                conn,
                now=now,
                after=checks.after,
                interval=checks.interval,
                max_checks=checks.max_checks,
                limit=checks.batch,
            )
        )
        result = RoundResult()
        for reply in due:
            items = await self._ask(reply, now)
            if items is None:
                result.errors += 1
                continue
            finding = examine(
                items, message_id=reply.message_id, phone_number=reply.phone_number, contexts=self.contexts
            )
            self.echo_seen = self.echo_seen or finding.echoed
            record = functools.partial(
                _record_check_on,
                reply=reply,
                finding=finding,
                now=self.clock(),
                max_checks=checks.max_checks,
                echo_seen=self.echo_seen,
                events=self.events() if self.events is not None else None,
            )
            done = await self.writer.run(record)
            result.checked += 1
            self._log(reply, finding, done)
            if done.kind == "settled":
                result.settled += 1
            elif done.kind == "gave_up":
                result.gave_up += 1
        self.counters.rounds += 1
        self.counters.settled += result.settled
        self.counters.gave_up += result.gave_up
        self.counters.errors += result.errors
        return result

    async def _ask(self, reply: AmbiguousReply, now: datetime) -> list[dict[str, Any]] | None:
        """Tencent's statuses for the reply's number and window, or None after logging Tencent's error."""
        begin, end = reply.window
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="smsbot-ambiguous")
        call = functools.partial(
            self.client.send_statuses_for,
            reply.phone_number,
            begin=int(begin.timestamp()),
            end=int(min(end, now).timestamp()),
        )
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, call)
        except Exception as exc:
            code = getattr(exc, "code", None) or type(exc).__name__
            message = getattr(exc, "message", None) or str(exc)
            request_id = getattr(exc, "requestId", None)
            self.counters.last_error = f"PullSmsSendStatusByPhoneNumber: {code}: {message}"
            log.warning(
                "asking Tencent about ambiguous reply %s failed: PullSmsSendStatusByPhoneNumber: %s: %s%s; "
                "asking again next interval",
                reply.message_id,
                code,
                message,
                f" (RequestId {request_id})" if request_id else "",
            )
            return None

    def _log(self, reply: AmbiguousReply, finding: Finding, done: CheckResult) -> None:
        if done.kind == "settled":
            how = "its SessionContext" if done.by == "marker" else "number and time (no SessionContext echoed)"
            log.info(
                "ambiguous reply %s to %s settled %s: Tencent lists its send (SerialNo %s), recognised by %s",
                reply.message_id,
                reply.phone_number,
                done.status,
                done.serial,
                how,
            )
        elif done.kind == "gave_up":
            log.warning(
                "ambiguous reply %s to %s left to ops: %s after %d check(s); it was not resent",
                reply.message_id,
                reply.phone_number,
                done.reason,
                done.checks,
            )
        elif done.kind == "unsettled":
            log.info(
                "ambiguous reply %s to %s: %s (check %d of %d, %d send(s) listed)",
                reply.message_id,
                reply.phone_number,
                done.reason,
                done.checks,
                self.checks.max_checks,
                finding.listed,
            )
