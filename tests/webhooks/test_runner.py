"""The webhook edge: a rule's call made after the commit, its answer fed back through the engine.

The rule file's ``call:`` names a webhook whose URL is a local service
(``Service``), so every call here is a real HTTP request to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine

from bot.events.endpoints import ALL_KINDS, Endpoint, EventEndpoints
from bot.ingest.batch import handle_batch
from bot.rules.engine import resume
from bot.rules.model import Decision, Ruleset
from bot.sms import Inbound
from bot.store.models import conversations, events, messages, outbox, webhook_calls
from bot.store.writer import DbWriter
from bot.webhooks.runner import WebhookRunner, claim_calls
from tests.fakes.receiver import Receiver
from tests.support import FakeClock, compile_text, rows, writing


def rules_text(url: str, timeout: int = 1) -> str:
    """ORDER calls the business's ``orders`` webhook at ``url`` and replies with what it answered."""
    return f"""
signature: Acme
templates:
  status: {{id: "3", text: "Order {{1}}."}}
  menu: {{id: "1", text: "Menu."}}
webhooks:
  orders:
    url: {url}
    method: POST
    timeout: {timeout}s
    body:
      mobile: "{{{{ contact.mobile }}}}"
      order_id: "{{{{ vars.order_id | default('A1') }}}}"
start: idle
states:
  idle:
    on:
      - keywords: [ORDER]
        call: {{webhook: orders, save_as: order}}
        reply: status
        params: ["{{{{ vars.order.status | default('none') }}}}"]
        goto: done
      - keywords: [HI]
        reply: menu
  done:
    on:
      - keywords: [HI]
        reply: menu
"""


def rules_calling(url: str, timeout: int = 1) -> Ruleset:
    return Ruleset.of((compile_text(rules_text(url, timeout), "acme.yaml"),))


class Service:
    """The business's system: answers per path, counts the requests."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.lock = threading.Lock()
        self.receiver = Receiver(answer=self._answer)

    def _answer(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, float]:
        name = path.split("?")[0].strip("/")
        with self.lock:
            self.hits[name] = self.hits.get(name, 0) + 1
            n = self.hits[name]
        if name == "ok":
            return 200, json.dumps({"status": "sent", "echo": json.loads(body or b"null")}).encode(), 0.0
        if name == "slow":
            return 200, b'{"status": "late"}', 1.5
        if name == "flaky":
            return (503, b"{}", 0.0) if n == 1 else (200, b'{"status": "sent"}', 0.0)
        if name == "down":
            return 500, b"{}", 0.0
        if name == "html":
            return 200, b"<html>hello</html>", 0.0
        if name == "big":
            return 200, json.dumps({"blob": "x" * 70_000}).encode(), 0.0
        return 404, b"{}", 0.0

    def url(self, name: str) -> str:
        return f"{self.receiver.url}/{name}"


@pytest.fixture
def service() -> Iterator[Service]:
    s = Service()
    yield s
    s.receiver.close()


@pytest.fixture
def writer(engine: Engine) -> Iterator[DbWriter]:
    w = DbWriter(engine)
    w.start()
    yield w
    w.stop()


def say(engine: Engine, ruleset: Ruleset, clock: FakeClock, text: str, events_to: EventEndpoints | None = None) -> int:
    with writing(engine) as conn:
        (result,) = handle_batch(
            conn,
            ruleset=ruleset,
            batch=[Inbound("86", "13800000001", "Acme", text, int(clock().timestamp()))],
            now=clock(),
            events=events_to,
        )
    assert result.message_id is not None
    return result.message_id


def drain(runner: WebhookRunner) -> None:
    async def go() -> None:
        await runner.drain()

    asyncio.run(go())


def runner_for(writer: DbWriter, ruleset: Ruleset, clock: FakeClock, **options: Any) -> WebhookRunner:
    class Rules:
        pass

    rules = Rules()
    rules.ruleset = ruleset  # type: ignore[attr-defined]
    return WebhookRunner(writer, rules, clock=clock, **options)  # type: ignore[arg-type]


def test_an_ok_answer_is_saved_and_the_rules_reply_queued(engine: Engine, service: Service, writer: DbWriter) -> None:
    clock = FakeClock()
    ruleset = rules_calling(service.url("ok"))
    message_id = say(engine, ruleset, clock, "ORDER")
    (call,) = rows(engine, webhook_calls)
    assert call["status"] == "pending"
    assert call["message_id"] == message_id
    assert call["request"]["body"] == {"mobile": "13800000001", "order_id": "A1"}
    assert call["rules_version"] == ruleset.version
    assert service.hits == {}  # nothing is called inside the transaction
    assert rows(engine, messages, messages.c.direction == "out") == []

    committed: list[Any] = []
    drain(runner_for(writer, ruleset, clock, on_committed=committed.append))
    (call,) = rows(engine, webhook_calls)
    assert call["status"] == "ok"
    assert call["http_status"] == 200
    assert call["response"]["json"]["status"] == "sent"
    assert call["duration_ms"] is not None
    assert call["finished_at"] is not None
    (convo,) = rows(engine, conversations)
    assert convo["variables"]["order"]["status"] == "sent"
    assert convo["state"] == "done"
    (reply,) = rows(engine, messages, messages.c.direction == "out")
    assert reply["text"] == "Order sent."
    assert reply["in_reply_to_id"] == message_id
    assert reply["status"] == "queued"
    assert len(rows(engine, outbox)) == 1
    assert committed[0].queued == 1
    assert service.hits == {"ok": 1}


def test_a_timeout_is_tried_once_more_then_takes_the_failure_path(
    engine: Engine, service: Service, writer: DbWriter
) -> None:
    clock = FakeClock()
    ruleset = rules_calling(service.url("slow"), timeout=1)
    say(engine, ruleset, clock, "ORDER")
    outcomes: list[Any] = []

    def resume_fn(*args: Any) -> Decision:
        outcomes.append(args[4])
        return resume(*args)

    drain(runner_for(writer, ruleset, clock, resume_fn=resume_fn))
    (call,) = rows(engine, webhook_calls)
    assert call["status"] == "timeout"
    assert call["error"] == "timeout"
    assert service.hits == {"slow": 2}
    assert [(o.ok, o.error) for o in outcomes] == [(False, "timeout")]
    (convo,) = rows(engine, conversations)
    assert convo["state"] == "idle"
    assert "order" not in convo["variables"]


def test_a_5xx_then_ok_on_the_retry_is_ok(engine: Engine, service: Service, writer: DbWriter) -> None:
    clock = FakeClock()
    ruleset = rules_calling(service.url("flaky"))
    say(engine, ruleset, clock, "ORDER")
    drain(runner_for(writer, ruleset, clock))
    (call,) = rows(engine, webhook_calls)
    assert (call["status"], call["http_status"]) == ("ok", 200)
    assert service.hits == {"flaky": 2}
    assert [r["text"] for r in rows(engine, messages, messages.c.direction == "out")] == ["Order sent."]


@pytest.mark.parametrize(
    ("path", "error", "hits"),
    [("html", "response not JSON", 1), ("big", "response larger than 64 KiB", 1), ("down", "HTTP 500", 2)],
)
def test_bad_answers_are_failures(
    engine: Engine,
    service: Service,
    writer: DbWriter,
    path: str,
    error: str,
    hits: int,
) -> None:
    clock = FakeClock()
    ruleset = rules_calling(service.url(path))
    say(engine, ruleset, clock, "ORDER")
    drain(runner_for(writer, ruleset, clock))
    (call,) = rows(engine, webhook_calls)
    assert call["status"] == "failed"
    assert call["error"] == error
    assert call["response"] is None
    assert service.hits == {path: hits}
    assert rows(engine, messages, messages.c.direction == "out") == []


def test_a_runner_killed_mid_call_leaves_it_to_another_once_the_lease_ends(
    engine: Engine, service: Service, writer: DbWriter
) -> None:
    clock = FakeClock()
    ruleset = rules_calling(service.url("ok"))
    say(engine, ruleset, clock, "ORDER")
    with writing(engine) as conn:  # a runner claimed it, then died before recording anything
        (claimed,) = claim_calls(conn, now=clock(), limit=10)
    assert claimed.claims == 1
    runner = runner_for(writer, ruleset, clock)
    drain(runner)
    assert rows(engine, webhook_calls)[0]["status"] == "pending"  # its lease still holds
    assert service.hits == {}
    clock.advance(timedelta(minutes=2))
    drain(runner)
    (call,) = rows(engine, webhook_calls)
    assert call["status"] == "ok"
    assert call["attempts"] == 2
    assert [r["text"] for r in rows(engine, messages, messages.c.direction == "out")] == ["Order sent."]


def test_events_of_the_resumed_decision_are_queued(engine: Engine, service: Service, writer: DbWriter) -> None:
    clock = FakeClock()
    closed = Receiver()
    closed.close()
    endpoints = EventEndpoints((Endpoint("crm", closed.url, ALL_KINDS, b"s"),))
    ruleset = rules_calling(service.url("ok"))
    say(engine, ruleset, clock, "ORDER", endpoints)
    assert [r["kind"] for r in rows(engine, events)] == ["state_entered"]  # None -> idle
    drain(runner_for(writer, ruleset, clock, events=lambda: endpoints))
    entered = [json.loads(r["body"]) for r in rows(engine, events)]
    assert [(e["type"], e["state"]) for e in entered] == [("state_entered", "idle"), ("state_entered", "done")]
    assert entered[1]["vars"]["order"]["status"] == "sent"


def test_through_the_app_the_callback_never_waits_and_the_reply_goes_out(
    make_app: Callable[..., Any], db_url: str, service: Service, tmp_path: Any
) -> None:
    from tests.support import wait_until, write_rules

    folder = tmp_path / "webhook-rules"
    write_rules(folder, "acme.yaml", rules_text(service.url("ok")))
    h = make_app(db_url, rules_path=folder)
    h.say("ORDER", sign="Acme")
    wait_until(lambda: h.sender.sent, timeout=10, what="the reply after the webhook")
    assert [s.text for s in h.sender.sent] == ["Order sent."]
    assert h.rows(webhook_calls)[0]["status"] == "ok"
