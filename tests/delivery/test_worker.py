"""The outbox worker: several numbers at once, each number's replies in order, workers side by side, leases."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from bot.cli import app as cli
from bot.config import Settings
from bot.delivery.deliverer import Deliverer, plan_for
from bot.delivery.outbox import apply_plans, claim_due, recover_expired_leases
from bot.delivery.retry import RetryPolicy
from bot.ingest.delivery_reports import apply_reports
from bot.sms import OutboundSms, SendResult
from bot.store.db import make_engine
from bot.store.models import messages, outbox
from bot.store.writer import DbWriter
from bot.tencent.callbacks import StatusReport
from tests.support import FakeClock, Harness, RecordingSender, wait_until, writing

NUMBERS = [f"1380000{n:04d}" for n in range(40)]


class SlowSender(RecordingSender):
    """Takes a few milliseconds per send, like a network call, and notes how many ran at once."""

    def __init__(self, seed: int = 1) -> None:
        super().__init__()
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most_in_flight = 0

    def send(self, sms: OutboundSms) -> SendResult:
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            pause = self.rng.uniform(0.001, 0.02)
        time.sleep(pause)
        try:
            with self.lock:
                return super().send(sms)
        finally:
            with self.lock:
                self.in_flight -= 1


class InstantSender(RecordingSender):
    """A sender that never waits (like the console's): called on the delivery loop, a batch at a time."""

    blocking = False


@pytest.mark.parametrize("sender_kind", ["blocking", "instant"])
def test_numbers_are_sent_to_in_parallel_and_each_numbers_replies_in_order(
    make_app: Callable[..., Harness], db_url: str, clock: FakeClock, sender_kind: str
) -> None:
    h = make_app(db_url, deliver=False)
    for text in ["hi", "1", "MENU", "2", "MENU"]:
        for mobile in NUMBERS[:8]:
            h.say(text, mobile=mobile)
    outbound = h.outbound()
    assert h.count(outbox) == len(outbound) == 40

    sender: RecordingSender = SlowSender() if sender_kind == "blocking" else InstantSender()
    engine = make_engine(db_url)
    writer = DbWriter(engine)
    writer.start()
    deliverer = Deliverer(writer, sender, clock=clock, concurrency=4)

    async def deliver_all() -> None:
        # The running loop claims again as soon as one send finishes, while others are in flight.
        task = asyncio.create_task(deliverer.run_forever())
        while len(sender.sent) < 40 and not task.done():
            await asyncio.sleep(0.01)
        task.cancel()

    try:
        asyncio.run(asyncio.wait_for(deliver_all(), 30))
    finally:
        writer.stop()
        engine.dispose()
    assert len(sender.sent) == 40
    for mobile in NUMBERS[:8]:
        queued_order = [m["id"] for m in outbound if m["contact_id"] == _contact_id(h, mobile)]
        sent_order = [sms.message_id for sms in sender.sent if sms.mobile == mobile]
        assert sent_order == queued_order, f"replies to {mobile} overtook each other"
    if isinstance(sender, SlowSender):
        assert sender.most_in_flight > 1, "numbers were sent to one at a time"


def _contact_id(h: Harness, mobile: str) -> int:
    from bot.store.models import contacts

    [row] = h.rows(contacts, contacts.c.mobile == mobile)
    return int(row["id"])


def _queue(h: Harness, numbers: list[str]) -> list[int]:
    for mobile in numbers:
        h.say("hi", mobile=mobile)
    assert h.count(outbox) == len(numbers)
    return [m["id"] for m in h.outbound()]


def _worker(db_url: str, sender: RecordingSender, clock: FakeClock, concurrency: int = 2) -> int:
    """One worker process's delivery loop (own engine and writer), run until nothing is due."""
    engine = make_engine(db_url)
    writer = DbWriter(engine)
    writer.start()
    try:
        deliverer = Deliverer(writer, sender, clock=clock, concurrency=concurrency)
        return asyncio.run(deliverer.drain())
    finally:
        writer.stop()
        engine.dispose()


def test_two_workers_share_the_outbox_and_send_each_reply_once(
    make_app: Callable[..., Harness], db_url: str, clock: FakeClock
) -> None:
    h = make_app(db_url, deliver=False)
    queued = _queue(h, NUMBERS)
    senders = [SlowSender(seed=1), SlowSender(seed=2)]
    threads = [threading.Thread(target=_worker, args=(db_url, s, clock)) for s in senders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    first, second = ({sms.message_id for sms in s.sent} for s in senders)
    assert not first & second, "a reply was sent by both workers"
    assert first | second == set(queued)
    assert sum(len(s.sent) for s in senders) == len(queued)
    assert first, "the first worker sent nothing: they did not run side by side"
    assert second, "the second worker sent nothing: they did not run side by side"
    assert h.count(outbox) == 0
    assert {m["status"] for m in h.outbound()} == {"sent"}


class SharedNumbers:
    """What every worker's sender sends, in order, and whether one number was ever sent to by two at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight: dict[str, int] = {}
        self.overlaps: list[str] = []
        self.log: list[OutboundSms] = []


class TrackedSender(SlowSender):
    """One worker's sender; all of them report to one ``SharedNumbers``."""

    def __init__(self, shared: SharedNumbers, seed: int) -> None:
        super().__init__(seed)
        self.shared = shared

    def send(self, sms: OutboundSms) -> SendResult:
        with self.shared.lock:
            self.shared.in_flight[sms.mobile] = self.shared.in_flight.get(sms.mobile, 0) + 1
            if self.shared.in_flight[sms.mobile] > 1:
                self.shared.overlaps.append(sms.mobile)
        try:
            return super().send(sms)
        finally:
            with self.shared.lock:
                self.shared.log.append(sms)
                self.shared.in_flight[sms.mobile] -= 1


def test_two_workers_never_send_to_one_number_side_by_side_and_keep_its_order(
    make_app: Callable[..., Harness], db_url: str, clock: FakeClock
) -> None:
    """Scaling out keeps what one worker promises: a number's replies go one at a time, in queue order."""
    h = make_app(db_url, deliver=False)
    numbers = NUMBERS[:24]  # more than one worker's claim (16 replies) covers, so both get numbers
    for text in ["hi", "1", "MENU"]:
        for mobile in numbers:
            h.say(text, mobile=mobile)
    outbound = h.outbound()
    shared = SharedNumbers()
    senders = [TrackedSender(shared, seed=1), TrackedSender(shared, seed=2)]
    for _ in range(20):  # a worker ends when nothing is free for it; run rounds until everything went
        threads = [threading.Thread(target=_worker, args=(db_url, s, clock, 4)) for s in senders]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        if not h.count(outbox):
            break
    assert shared.overlaps == [], f"two workers sent to {sorted(set(shared.overlaps))} at the same time"
    assert sorted(sms.message_id for sms in shared.log) == sorted(m["id"] for m in outbound)
    for mobile in numbers:
        queued_order = [m["id"] for m in outbound if m["contact_id"] == _contact_id(h, mobile)]
        sent_order = [sms.message_id for sms in shared.log if sms.mobile == mobile]
        assert sent_order == queued_order, f"replies to {mobile} overtook each other"
    assert all(s.sent for s in senders), "one worker sent nothing: they did not run side by side"


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)  # SQLite runs one claim at a time
def test_a_claim_passes_over_a_number_whose_earlier_reply_another_claim_holds(
    make_app: Callable[..., Harness], db_url: str, clock: FakeClock
) -> None:
    """Another worker has locked the number's first reply and not yet reached its per-number lock."""
    h = make_app(db_url, deliver=False)
    h.say("hi", mobile=NUMBERS[0])
    h.say("1", mobile=NUMBERS[0])
    h.say("hi", mobile=NUMBERS[1])
    first, second, other_number = (m["id"] for m in h.outbound())
    with h.engine.connect() as other_worker, other_worker.begin():
        other_worker.execute(sa.text("SELECT id FROM outbox WHERE message_id = :m FOR UPDATE"), {"m": first})
        with writing(h.engine) as conn:
            claimed = claim_due(conn, now=clock(), limit=10, owner="second-worker")
        assert [sms.message_id for sms in claimed] == [other_number], "the later reply overtook the earlier one"
    with writing(h.engine) as conn:  # once the other claim has ended, both go, in order
        claimed = claim_due(conn, now=clock(), limit=10, owner="second-worker")
    assert [sms.message_id for sms in claimed] == [first, second]


def test_a_crashed_workers_send_in_flight_becomes_ambiguous_and_the_replies_behind_it_are_sent(
    make_app: Callable[..., Harness], db_url: str, clock: FakeClock
) -> None:
    """A worker claims a number's three replies and dies during the first send (kill -9: no record).

    The first may have reached Tencent: when the lease runs out it is marked
    ambiguous (for a check with Tencent), never sent again; the two behind it
    were never tried (one number's replies go one at a time) and another worker sends them.
    """
    h = make_app(db_url, deliver=False)
    for text in ("hi", "1", "MENU"):
        h.say(text, mobile=NUMBERS[0])
    [other] = _queue_more(h, NUMBERS[1])
    first, second, third = (m["id"] for m in h.outbound() if m["id"] != other)
    claimed_at = clock()
    with writing(h.engine) as conn:
        claimed = claim_due(conn, now=claimed_at, limit=10, owner="crashed-host:4242")
    assert sorted(sms.message_id for sms in claimed) == sorted([first, second, third, other])

    sender = RecordingSender()
    assert _worker(db_url, sender, clock) == 0, "a leased reply was taken while its lease ran"
    clock.advance(timedelta(seconds=61))
    assert _worker(db_url, sender, clock) == 2
    assert [sms.message_id for sms in sender.sent] == [second, third], "a send in flight was repeated blindly"
    by_id = {m["id"]: m for m in h.outbound()}
    for in_flight in (first, other):  # each number's first reply: handed to Tencent or not, nobody knows
        assert by_id[in_flight]["status"] == "ambiguous"
        assert "lease ran out" in by_id[in_flight]["status_reason"]
        assert by_id[in_flight]["sent_at"].replace(tzinfo=None) == claimed_at.replace(tzinfo=None)  # the window
    assert [by_id[m]["status"] for m in (second, third)] == ["sent", "sent"]
    assert h.count(outbox) == 0


def test_a_live_workers_leases_are_left_alone(make_app: Callable[..., Harness], db_url: str, clock: FakeClock) -> None:
    """Only an expired lease is recovered: a worker still sending (lease running) keeps its replies."""
    h = make_app(db_url, deliver=False)
    [reply] = _queue(h, NUMBERS[:1])
    with writing(h.engine) as conn:
        claim_due(conn, now=clock(), limit=10, owner="busy-host:1")
    clock.advance(timedelta(seconds=59))
    with writing(h.engine) as conn:
        assert recover_expired_leases(conn, now=clock()) == []
        assert claim_due(conn, now=clock(), limit=10, owner="other-host:2") == []
    [row] = h.outbound()
    assert row["id"] == reply
    assert row["status"] == "queued"
    assert h.count(outbox) == 1


def _queue_more(h: Harness, mobile: str) -> list[int]:
    before = {m["id"] for m in h.outbound()}
    h.say("hi", mobile=mobile)
    return [m["id"] for m in h.outbound() if m["id"] not in before]


def test_worker_command_sends_what_is_queued(
    make_app: Callable[..., Harness], db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make_app(db_url, deliver=False)
    _queue(h, NUMBERS[:3])
    monkeypatch.setenv("SMSBOT_DATABASE_URL", db_url)
    result = CliRunner().invoke(cli, ["worker", "--once"])
    assert result.exit_code == 0, result.output
    printed = [line for line in result.output.splitlines() if line.startswith("[console sender]")]
    assert len(printed) == 3
    assert all("template 1490001" in line and "138****" in line for line in printed)  # numbers masked
    assert "3 replies handled" in result.output
    assert h.count(outbox) == 0
    assert {m["status"] for m in h.rows(messages, messages.c.direction == "out")} == {"sent"}


def test_worker_command_refuses_an_old_schema(empty_db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMSBOT_DATABASE_URL", empty_db_url)
    result = CliRunner().invoke(cli, ["worker", "--once"])
    assert result.exit_code == 2
    assert "smsbot db upgrade" in result.output


def test_serve_can_leave_sending_to_workers(make_app: Callable[..., Harness], db_url: str) -> None:
    h = make_app(db_url, settings=Settings(deliver=False), deliver=Settings(deliver=False).deliver)
    h.say("hi")
    stop = threading.Event()
    stop.wait(0.3)  # a window in which a delivery loop would have sent it
    assert h.count(outbox) == 1
    assert h.sender.sent == []


def test_worker_is_woken_by_its_own_writer(make_app: Callable[..., Harness], db_url: str) -> None:
    """Inside serve the loop is woken by the commit that queued a reply: no poll interval on the hot path."""
    h = make_app(db_url)
    deliverer = h.app.state.runtime.pipeline.deliverer
    deliverer.poll_seconds = 30.0
    h.say("hi")  # the loop may be asleep for 30 s: only the wake-up can send this in time
    wait_until(lambda: len(h.sender.sent) == 1, timeout=5, what="the reply to be sent")


def test_a_delivery_report_that_beats_the_sends_own_record_is_kept(
    make_app: Callable[..., Harness], db_url: str, clock: FakeClock
) -> None:
    """Tencent can report (pushed or pulled) before the sender's thread has recorded the send as "sent"."""
    h = make_app(db_url, deliver=False)
    [reply] = _queue(h, NUMBERS[:1])
    with writing(h.engine) as conn:
        [sms] = claim_due(conn, now=clock(), limit=1, owner="me")
    report = StatusReport(
        sid="5000:77", report_status="SUCCESS", user_receive_time="2026-01-05 10:00:03", ext=str(reply)
    )
    with writing(h.engine) as conn:
        apply_reports(conn, [report], now=clock())
    result = SendResult(ok=True, serial="5000:77", code="Ok", message="send success")
    with writing(h.engine) as conn:
        apply_plans(
            conn, [(sms, plan_for(sms, result, now=clock(), policy=RetryPolicy(), rng=random.Random(1)))], clock()
        )
    [row] = h.outbound()
    assert (row["status"], row["provider_serial"]) == ("delivered", "5000:77")
    assert row["sent_at"] == clock()
    assert h.count(outbox) == 0
