"""The outbox's SQL: claiming due replies with a lease, and recording what became of each.

The pipeline only ever writes replies into the ``outbox`` table; the delivery
loop (``bot/delivery/deliverer.py``) takes them out through these functions.
Each claim leases due rows (so a crashed process's rows are taken over when
the lease runs out), re-checks opt-out right before sending and keeps
marketing hours and frequency limits; settling records the outcome on the
reply's message row and removes it from the outbox.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence, Set
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Connection

from bot.delivery.events import reply_failed_events
from bot.delivery.frequency import NO_LIMITS, FrequencyLimits, Sent, earliest_send
from bot.delivery.retry import DAILY_RESET, Final, Retry, marketing_hours, next_marketing_opening
from bot.events.endpoints import EventEndpoints
from bot.events.reply_failed import FailedReply, queue_reply_failed
from bot.numbers import CHINA, next_china_time
from bot.sms import OutboundSms
from bot.store.driver_sql import PREPARE, DriverSql, chunks
from bot.store.reports import mark_reported, take_pending
from bot.tencent.errors import PER_COUNTRY_LIMITS, Outcome, classify

log = logging.getLogger("smsbot.outbox")

LEASE = timedelta(seconds=60)


_DUE = (
    "SELECT id, message_id, attempts, next_attempt_at, send_by FROM outbox"
    " WHERE next_attempt_at <= ? AND (lease_until IS NULL OR lease_until < ?)"
    " ORDER BY next_attempt_at, id LIMIT ?"
)
# Two steps rather than one join: the due rows come from the outbox index alone, then their
# details by primary key; a four-table join let PostgreSQL pick hash joins over whole tables
# whenever its statistics lagged behind a growing table.
_DETAILS = (
    "SELECT m.id, m.signature, m.template_id, m.params, m.text, m.rule_kind, c.nationcode, c.mobile, v.opted_out,"
    " v.id, m.marketing, m.contact_id, m.sender_id, m.extend_code"
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
_EXPIRED_LEASES = (
    "SELECT o.id, o.message_id, o.leased_by, o.lease_until, m.contact_id FROM outbox o"
    " JOIN messages m ON m.id = o.message_id WHERE o.lease_until IS NOT NULL AND o.lease_until < ?"
    " ORDER BY o.next_attempt_at, o.id"
)
"""Replies whose sender stopped before recording them (few, by the partial index on ``lease_until``)."""
_RECOVERY_LOCK = "SELECT pg_try_advisory_xact_lock(?::int, 0)"
"""On PostgreSQL one claim at a time looks at expired leases, so two never split one number's rows between them."""
RECOVERY_LOCK_SPACE = CLAIM_LOCK_SPACE + 1
_HISTORY = (
    "SELECT contact_id, sent_at, text FROM messages"
    " WHERE {where} AND sent_at IS NOT NULL AND sent_at >= ? AND direction = 'out'"
)

AMBIGUOUS_REASON = (
    "no answer from Tencent: the SMS may have gone out, so it is not resent; its delivery report (by "
    "SessionContext) or a check with Tencent a few minutes later (PullSmsSendStatusByPhoneNumber) settles it; "
    "without either, check Tencent's console before sending again"
)

LEASE_EXPIRED_REASON = (
    "the worker sending it stopped (its lease ran out) before it recorded Tencent's answer: the SMS may have "
    "gone out, so it is not resent; its delivery report (by SessionContext) or a check with Tencent a few "
    "minutes later (PullSmsSendStatusByPhoneNumber) settles it; without either, check Tencent's console "
    "before sending again"
)
"""Why a reply whose send was in flight when its worker died is ``ambiguous`` (``recover_expired_leases``)."""

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


class _Details(NamedTuple):
    """One row of ``_DETAILS``, in its select order: what a claim needs to know about a due reply."""

    message_id: int
    sign: str
    template_id: str | None
    params: Any
    text: str
    rule_kind: str | None
    nationcode: str
    mobile: str
    opted_out: Any
    conversation_id: int
    marketing: Any
    contact_id: int
    sender_id: str | None
    extend_code: str | None


@dataclass
class _Claim:
    """What one claim decided for each due row, before any of it is written."""

    claimed: list[OutboundSms] = field(default_factory=list)
    suppressed: list[Settlement] = field(default_factory=list)
    deferred: dict[datetime, list[int]] = field(default_factory=dict)
    """Outbox ids by the time they may go (marketing hours, frequency limits, an account cap)."""


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
    events: EventEndpoints | None = None,
) -> list[OutboundSms]:
    """Lease up to ``limit`` due outbox rows to ``owner``, in the order they were queued.

    Rows of opted-out numbers are suppressed instead; marketing replies outside
    08:00-22:00 China time and replies that would break a number's frequency
    limits are put back with the time they may go; rows for ``busy`` numbers
    (a send to them is in flight here) are left for a later round, so replies
    to one number never overtake each other (their ids go to ``left_for_busy``); numbers another worker is
    sending to or claiming are left too (``_numbers_taken_elsewhere``). On PostgreSQL ``FOR UPDATE SKIP
    LOCKED`` lets several workers claim side by side without waiting for or
    taking each other's rows. With ``events``, a reply that expired here queues
    ``reply_failed`` (reason ``expired``) in the same transaction.
    """
    db = DriverSql(conn)
    recover_expired_leases(conn, now=now, lease=lease)
    due = db.rows(_DUE + (" FOR UPDATE SKIP LOCKED" if db.postgres else ""), (db.ts(now), db.ts(now), limit))
    if not due:
        return []
    details = _details(db, due)
    history = _history(db, {int(d.contact_id) for d in details.values()}, now, limits)
    elsewhere = _numbers_taken_elsewhere(db, _first_of(db, due, details), [int(row[0]) for row in due], now)
    claim = _decide_claim(
        db,
        due,
        details,
        history,
        elsewhere,
        now=now,
        busy=busy,
        limits=limits,
        left_for_busy=left_for_busy,
        blocked=active_account_limits(db, now),
    )
    settle(conn, claim.suppressed, now, events)
    for at, ids in claim.deferred.items():
        for chunk in chunks(ids):
            where, params = db.in_list("id", chunk)
            db.execute(f"UPDATE outbox SET next_attempt_at = ? WHERE {where}", [db.ts(at), *params])
    if take_lease:  # (not when the caller settles these rows in this same transaction)
        for chunk in chunks([sms.outbox_id for sms in claim.claimed]):
            where, params = db.in_list("id", chunk)
            db.execute(
                f"UPDATE outbox SET lease_until = ?, leased_by = ? WHERE {where}", [db.ts(now + lease), owner, *params]
            )
    return claim.claimed


def recover_expired_leases(conn: Connection, *, now: datetime, lease: timedelta = LEASE) -> list[int]:
    """Replies leased by a worker that stopped before recording them: never resent blindly.

    A worker sends one number's claimed replies one after another and records
    each outcome before the next send starts. So of the rows one worker holds
    for one number, only the first in queue order can have been handed to
    Tencent when it died: that one becomes ``ambiguous`` (``sent_at`` is the
    claim's time, for the check with Tencent; ``bot/delivery/reconcile.py``),
    and the rows behind it, never tried, are released to be sent as usual.
    Returns the message ids made ambiguous. On PostgreSQL only one claim at a
    time does this (an advisory lock tried without waiting; the others skip it).
    """
    db = DriverSql(conn)
    if db.postgres and not db.rows(_RECOVERY_LOCK, (RECOVERY_LOCK_SPACE,))[0][0]:
        return []
    expired = db.rows(_EXPIRED_LEASES + (" FOR UPDATE OF o SKIP LOCKED" if db.postgres else ""), (db.ts(now),))
    if not expired:
        return []
    in_flight: list[Settlement] = []
    release: list[int] = []
    seen: set[tuple[int, str | None]] = set()
    for outbox_id, message_id, leased_by, lease_until, contact_id in expired:
        key = (int(contact_id), leased_by)
        if key in seen:
            release.append(int(outbox_id))
            continue
        seen.add(key)
        until = db.read_ts(lease_until)
        assert until is not None  # IS NOT NULL above
        in_flight.append(
            Settlement(
                int(outbox_id),
                int(message_id),
                "ambiguous",
                LEASE_EXPIRED_REASON,
                error="its worker stopped during the send (lease expired)",
                sent_at=until - lease,
            )
        )
    settle(conn, in_flight, now)
    ambiguous = [s.message_id for s in in_flight]
    for chunk in chunks(ambiguous):
        where, params = db.in_list("id", chunk)
        db.execute(f"UPDATE messages SET checks = NULL, checked_at = NULL WHERE {where}", params)
    for chunk in chunks(release):
        where, params = db.in_list("id", chunk)
        db.execute(f"UPDATE outbox SET lease_until = NULL, leased_by = NULL WHERE {where}", params)
    log.error(
        "%d repl%s left in flight by a stopped worker marked ambiguous (not resent: %s); %d queued behind released",
        len(ambiguous),
        "y" if len(ambiguous) == 1 else "ies",
        ", ".join(map(str, ambiguous[:10])),
        len(release),
    )
    return ambiguous


def _details(db: DriverSql, due: Sequence[Any]) -> dict[int, _Details]:
    """The due rows' messages, numbers and conversations, by message id (by primary key, see ``_DETAILS``)."""
    details: dict[int, _Details] = {}
    for chunk in chunks(sorted({int(row[1]) for row in due})):
        where, params = db.in_list("m.id", chunk)
        for row in db.rows(_DETAILS.format(where=where), params):
            found = _Details._make(row)
            details[int(found.message_id)] = found
    return details


def _first_of(db: DriverSql, due: Sequence[Any], details: dict[int, _Details]) -> dict[int, tuple[datetime, int]]:
    """Each number's (contact id's) first row in this claim, as ``(next_attempt_at, outbox id)``: the queue order."""
    first_of: dict[int, tuple[datetime, int]] = {}
    for outbox_id, message_id, _, next_attempt_at, _ in due:
        at = db.read_ts(next_attempt_at)
        assert at is not None  # NOT NULL
        first_of.setdefault(int(details[int(message_id)].contact_id), (at, int(outbox_id)))
    return first_of


def _decide_claim(
    db: DriverSql,
    due: Sequence[Any],
    details: dict[int, _Details],
    history: dict[int, list[Sent]],
    elsewhere: set[int],
    *,
    now: datetime,
    busy: Set[Number],
    limits: FrequencyLimits,
    left_for_busy: list[int] | None,
    blocked: dict[str, datetime],
) -> _Claim:
    """Which due rows go now and which are suppressed, deferred or left for later (see ``claim_due``); no SQL."""
    claim = _Claim()
    for outbox_id, message_id, attempts, _, raw_send_by in due:
        d = details[int(message_id)]
        send_by = db.read_ts(raw_send_by)
        if d.opted_out and d.rule_kind != "opt_out":
            claim.suppressed.append(
                Settlement(outbox_id, message_id, "suppressed", "the number opted out before sending")
            )
            continue
        if (d.nationcode, d.mobile) in busy:
            if left_for_busy is not None:
                left_for_busy.append(int(outbox_id))
            continue
        if int(d.contact_id) in elsewhere:  # another worker is sending to this number: its turn comes after
            continue
        sent_before = history.setdefault(int(d.contact_id), [])
        held = _held(d, sent_before, now, limits, blocked)
        if held is not None:  # it may not go now: wait, or expire when the wait outlasts its deadline
            at, why = held
            if send_by is not None and at > send_by:
                claim.suppressed.append(Settlement(outbox_id, message_id, "expired", _expired(why, at, send_by)))
            else:
                claim.deferred.setdefault(at, []).append(int(outbox_id))
            continue
        if send_by is not None and now > send_by:  # it waited in the queue (a backlog, a stopped worker)
            claim.suppressed.append(Settlement(outbox_id, message_id, "expired", _expired(None, now, send_by)))
            continue
        sent_before.append(Sent(now, d.text))  # the next reply to this number in the batch counts this one
        claim.claimed.append(
            OutboundSms(
                outbox_id=outbox_id,
                message_id=message_id,
                nationcode=d.nationcode,
                mobile=d.mobile,
                sign=d.sign,
                template_id=d.template_id or "",
                params=tuple(db.read_json(d.params) or ()),
                text=d.text,
                attempts=int(attempts or 0),
                conversation_id=int(d.conversation_id),
                sender_id=d.sender_id,
                send_by=send_by,
                extend_code=d.extend_code,
            )
        )
    return claim


def _held(
    d: _Details, sent_before: list[Sent], now: datetime, limits: FrequencyLimits, blocked: dict[str, datetime]
) -> tuple[datetime, str] | None:
    """When this reply may go and why, if not now: an account cap, marketing hours, a frequency limit."""
    capped = max((blocked[k] for k in ("", d.nationcode) if k in blocked), default=None)
    if capped is not None:
        return capped, "Tencent's account-wide daily cap is reached"
    if d.marketing and not marketing_hours(now):
        # marketing SMS may only go out 08:00-22:00 China time: wait, do not send
        return next_marketing_opening(now), "marketing SMS go out only 08:00-22:00 China time"
    allowed_at = earliest_send(sent_before, d.text, now, limits) if limits.enabled else None
    if allowed_at is not None:
        return allowed_at, "the number's frequency limits"
    return None


def _expired(why: str | None, at: datetime, send_by: datetime) -> str:
    """The status reason of a reply that could not go out in time (``reply_max_delay``)."""
    late = at - send_by
    if why is None:
        return f"not sent within its reply_max_delay: it waited in the queue until {late} past its deadline"
    when = at.astimezone(CHINA).strftime("%Y-%m-%d %H:%M")
    return f"not sent: {why}, so it could go only at {when} China time, {late} after its deadline (reply_max_delay)"


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


def settle(
    conn: Connection, settlements: Sequence[Settlement], now: datetime, events: EventEndpoints | None = None
) -> None:
    """Record final outcomes (one statement per table for the whole list), then reports that came first.

    With ``events``: an ``expired`` settlement, and a sent reply whose kept delivery report says it
    failed, queue ``reply_failed`` (``failed`` settlements are the caller's: ``apply_plans``).
    """
    if not settlements:
        return
    db = DriverSql(conn)
    if db.postgres:
        _settle_postgres(db, settlements, now)
    else:
        _settle_sqlite(db, settlements, now)
    failed = [FailedReply(s.message_id, "expired") for s in settlements if s.status == "expired"]
    by_serial = {s.serial: s for s in settlements if s.serial}
    if by_serial:
        for serial, outcome in take_pending(conn, list(by_serial)).items():
            settled = by_serial[serial]
            mark_reported(conn, settled.message_id, outcome, serial=serial, now=now)
            if not outcome.delivered and settled.status in ("sent", "ambiguous"):
                failed.append(FailedReply(settled.message_id, "delivery_failed"))
    queue_reply_failed(conn, failed, events, now)


def _settle_sqlite(db: DriverSql, settlements: Sequence[Settlement], now: datetime) -> None:
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


def apply_plans(
    conn: Connection,
    plans: Sequence[tuple[OutboundSms, Final | Retry]],
    now: datetime,
    events: EventEndpoints | None = None,
) -> None:
    """Record what each send led to: final outcomes settle the reply, retries put it back in the outbox.

    With ``events``, a reply that failed or expired (or whose kept delivery report says it failed)
    queues a ``reply_failed`` event in the same transaction.
    """
    db = DriverSql(conn)
    finals = [(sms, p) for sms, p in plans if isinstance(p, Final)]
    settle(
        conn,
        [
            Settlement(
                sms.outbox_id,
                sms.message_id,
                p.status,
                AMBIGUOUS_REASON if p.status == "ambiguous" else p.error if p.status == "expired" else None,
                p.serial,
                p.code,
                p.error,
                # an ambiguous send may have reached the handset: it counts against the limits too
                sent_at=now if p.status in ("sent", "ambiguous") else None,
            )
            for sms, p in finals
        ],
        now,
        events,  # the expired ones' reply_failed, and those of sends whose kept report says failed
    )
    ambiguous = [sms.message_id for sms, p in finals if p.status == "ambiguous"]
    for chunk in chunks(ambiguous):
        # A new ambiguous send gets its own checks with Tencent (bot/delivery/reconcile.py), also when
        # an admin resent a reply whose earlier send used them up.
        where, params = db.in_list("id", chunk)
        db.execute(f"UPDATE messages SET checks = NULL, checked_at = NULL WHERE {where}", params)
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
    _record_account_limits(db, plans, now)
    reply_failed_events(conn, [(sms, p) for sms, p in finals if p.status == "failed"], events, now)


def _record_account_limits(db: DriverSql, plans: Sequence[tuple[OutboundSms, Final | Retry]], now: datetime) -> None:
    """An account-wide cap blocks every reply until it ends: note it, so claims hold the others and ops see it."""
    for sms, p in plans:
        code = p.code or ""
        kind = classify(code)
        if kind.outcome is not Outcome.ACCOUNT_LIMIT:
            continue
        until = p.at if isinstance(p, Retry) else next_china_time(now, DAILY_RESET)
        nationcode = sms.nationcode if code in PER_COUNTRY_LIMITS else ""
        db.execute(
            "INSERT INTO account_limits (code, nationcode, message, until, created_at) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (code, nationcode) DO UPDATE SET message = excluded.message, until = excluded.until,"
            " created_at = excluded.created_at",
            (code, nationcode, p.error, db.ts(until), db.ts(now)),
        )
        log.error(
            "Tencent's account-wide cap %s%s: no reply goes out until %s (needs ops: raise it in Tencent's console)",
            code,
            f" for +{nationcode}" if nationcode else "",
            until.astimezone(CHINA).strftime("%Y-%m-%d %H:%M China time"),
        )


def active_account_limits(db: DriverSql, now: datetime) -> dict[str, datetime]:
    """The caps in force: nationcode ("" for every number) -> when the last of them ends."""
    found: dict[str, datetime] = {}
    for nationcode, until in db.rows("SELECT nationcode, until FROM account_limits WHERE until > ?", (db.ts(now),)):
        at = db.read_ts(until)
        if at is not None and (nationcode not in found or at > found[nationcode]):
            found[str(nationcode)] = at
    return found


PROVIDER_BLACKLIST_REASON = (
    "Tencent refused the number as blacklisted (FailedOperation.PhoneNumberInBlacklist): the customer "
    "unsubscribed at Tencent (TD/R to a marketing SMS) or a carrier blacklists the number; Tencent does not "
    "say which, and it was not an opt-out keyword sent to us"
)
"""What an opt-out from Tencent's blacklist says, so ops can tell it from a customer's own STOP/TD to us."""


def _provider_opt_out(db: DriverSql, sms: OutboundSms, final: Final, now: datetime) -> None:
    """Tencent refuses the number as blacklisted: stop messaging it here too, and say why and whose list."""
    db.execute(
        "UPDATE conversations SET opted_out = ?, opted_out_at = ?, updated_at = ? WHERE id = ?",
        (db.bool(True), db.ts(now), db.ts(now), sms.conversation_id),
    )
    db.execute(
        "INSERT INTO opt_out_events (conversation_id, event, source, message_id, raw_text, normalized_text, rule,"
        " actor, created_at) VALUES (?, 'opt_out', 'provider', ?, ?, NULL, NULL, ?, ?)",
        (sms.conversation_id, sms.message_id, PROVIDER_BLACKLIST_REASON, f"tencent:{final.code}", db.ts(now)),
    )
