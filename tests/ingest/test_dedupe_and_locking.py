"""Retried callbacks are stored once; concurrent messages from one number never interleave."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from bot.store.models import contacts, conversations, messages
from tests.support import Harness, RecordingSender, payload, stored_counts, write_rules


def ok(response: httpx.Response) -> bool:
    return response.status_code == 200 and response.json() == {"result": 0, "errmsg": "OK"}


# ---------------------------------------------------------------- dedupe


def test_same_callback_five_times_in_a_row(harness: Harness) -> None:
    h = harness
    body = payload("hi", at=h.next_time())
    responses = [h.post(body) for _ in range(5)]
    assert all(ok(r) for r in responses), [r.text for r in responses]
    assert len(h.inbound()) == 1
    assert [m["template_id"] for m in h.wait_settled()] == ["1490001"]
    assert len(h.sender.sent) == 1
    assert h.count(contacts) == h.count(conversations) == 1


def test_same_callback_five_times_concurrently(harness: Harness) -> None:
    h = harness
    body = payload("hi", at=h.next_time())
    with ThreadPoolExecutor(max_workers=5) as pool:
        responses = list(pool.map(lambda _: h.post(body), range(5)))
    assert all(ok(r) for r in responses), [r.text for r in responses]
    assert len(h.inbound()) == 1
    assert len(h.wait_settled()) == 1
    assert len(h.sender.sent) == 1


def test_same_callback_in_one_array_is_stored_once(harness: Harness) -> None:
    h = harness
    body = payload("hi", at=h.next_time())
    assert ok(h.post([body, body, body]))
    assert len(h.inbound()) == 1
    assert len(h.wait_settled()) == 1


def test_retry_after_state_change_does_not_replay(harness: Harness) -> None:
    """A late retry of an old message changes nothing, even though the conversation moved on."""
    h = harness
    first = payload("hi", at=h.next_time())
    assert ok(h.post(first))
    h.say("2")  # menu -> idle
    assert ok(h.post(first))  # a late retry of "hi" must not put the conversation back in the menu
    assert [m["text"] for m in h.inbound()] == ["hi", "2"]
    assert [m["template_id"] for m in h.wait_settled()] == ["1490001", "1490003"]
    [convo] = h.rows(conversations)
    assert convo["state"] == "idle"


@pytest.mark.parametrize(
    "change",
    [{"text": "hi "}, {"extend": "1"}, {"sign": "Other Brand"}, {"mobile": "13800000001"}, {"nationcode": "852"}],
    ids=["text", "extend", "sign", "mobile", "nationcode"],
)
def test_messages_differing_in_any_key_field_are_not_duplicates(harness: Harness, change: dict[str, Any]) -> None:
    h = harness
    body = payload("hi", at=h.next_time())
    assert ok(h.post(body))
    assert ok(h.post(body | change))
    assert len(h.inbound()) == 2


def test_same_text_at_another_time_is_a_new_message(harness: Harness) -> None:
    h = harness
    h.say("xyz")
    h.say("xyz")
    assert len(h.inbound()) == 2
    assert len(h.wait_settled()) == 2


# ---------------------------------------------------------------- two "processes"

COUNTER_RULES = """\
signature: Counter
templates:
  count: {id: "4000001", text: "Message number {1}"}
start: idle
states:
  idle:
    otherwise:
      set: {n: "{{ (vars.n | default('0')) | int + 1 }}"}
      reply: count
      params: ["{{ vars.n }}"]
"""


@pytest.fixture
def counter_rules(tmp_path: Path) -> Path:
    folder = tmp_path / "counter-rules"
    write_rules(folder, "counter.yaml", COUNTER_RULES)
    return folder


def two_apps(make_app: Callable[..., Harness], db_url: str, rules: Path) -> tuple[Harness, Harness]:
    """Two independent apps on one database: separate engines, writer threads and delivery loops."""
    first = make_app(db_url, rules_path=rules, sender=RecordingSender())
    second = make_app(db_url, rules_path=rules, sender=RecordingSender(), app_clock=first.clock)
    return first, second


N = 40


def test_two_apps_never_interleave_one_numbers_messages(
    make_app: Callable[..., Harness], db_url: str, counter_rules: Path
) -> None:
    """Every message increments vars.n; a lost update or an interleaving shows up as a repeated or missing n."""
    a, b = two_apps(make_app, db_url, counter_rules)
    bodies = [payload(f"message {i}", at=a.next_time(), sign="Counter") for i in range(N)]
    targets = itertools.cycle([a, b])
    jobs = [(next(targets), body) for body in bodies]
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda job: job[0].post(job[1]), jobs))
    assert all(ok(r) for r in responses), [r.text for r in responses if not ok(r)]

    [convo] = a.rows(conversations)
    assert convo["variables"] == {"n": str(N)}
    inbound = a.inbound()
    outbound = a.wait_settled(timeout=10)
    assert len(inbound) == len(outbound) == N
    # Replies in commit order count 1, 2, ..., N: each message saw the one before it.
    assert [m["params"] for m in outbound] == [[str(i)] for i in range(1, N + 1)]
    assert [m["in_reply_to_id"] for m in outbound] == [m["id"] for m in inbound]
    assert [m["state_before"] for m in inbound] == [None] + ["idle"] * (N - 1)
    assert {m["state_after"] for m in inbound} == {"idle"}
    assert {m["status"] for m in outbound} == {"sent"}
    # Both delivery loops worked the one outbox; nothing was sent twice.
    sent = [sms.message_id for sms in a.sender.sent + b.sender.sent]
    assert sorted(sent) == sorted(m["id"] for m in outbound)
    assert stored_counts(a.engine)["contacts"] == 1


def test_two_apps_same_callback_concurrently_is_stored_once(
    make_app: Callable[..., Harness], db_url: str, counter_rules: Path
) -> None:
    a, b = two_apps(make_app, db_url, counter_rules)
    body = payload("hello", at=a.next_time(), sign="Counter")
    with ThreadPoolExecutor(max_workers=6) as pool:
        responses = list(pool.map(lambda i: (a if i % 2 else b).post(body), range(6)))
    assert all(ok(r) for r in responses), [r.text for r in responses if not ok(r)]
    assert a.count(messages, messages.c.direction == "in") == 1
    outbound = a.wait_settled()
    assert [m["params"] for m in outbound] == [["1"]]
    assert len(a.sender.sent) + len(b.sender.sent) == 1


def test_two_apps_new_numbers_concurrently(make_app: Callable[..., Harness], db_url: str, counter_rules: Path) -> None:
    """First contact from many numbers at once on two apps: contacts and conversations are created once each."""
    a, b = two_apps(make_app, db_url, counter_rules)
    numbers = [f"1390000{i:04d}" for i in range(10)]
    jobs = [
        (a if i % 2 else b, payload(f"m{i}", at=a.next_time(), sign="Counter", mobile=n))
        for i in range(2)
        for n in numbers
    ]
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda job: job[0].post(job[1]), jobs))
    assert all(ok(r) for r in responses), [r.text for r in responses if not ok(r)]
    assert a.count(contacts) == 10
    assert a.count(conversations) == 10
    assert {c["variables"]["n"] for c in a.rows(conversations)} == {"2"}
    assert len(a.wait_settled()) == 20
