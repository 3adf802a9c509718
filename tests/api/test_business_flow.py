"""The whole business flow through HTTP, on SQLite and PostgreSQL, with nothing faked but Tencent's sender.

A start over ``/api/v1/conversations`` → the customer answers "1" on Tencent's
callback → the rule's ``call:`` asks the business's service (a real HTTP server
on 127.0.0.1) → the reply carries what it answered → ``state_entered`` events
arrive signed at the business's receiver. Also: a webhook that times out takes
the rule's ``on_error``, a receiver that is down gets every event once it is
back, in order per conversation, and the example rules' appointment reminder
runs the same way.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from bot.config import Settings
from bot.events.signing import verify
from bot.store.models import events, messages, outbox, webhook_calls
from tests.api.helpers import auth, new_key
from tests.fakes.receiver import Receiver
from tests.support import RULES as EXAMPLE_RULES
from tests.support import Harness, wait_until, write_rules

SECRET = "whsec-test-0123456789"

RULES = """\
signature: Acme Shop
templates:
  remind:   {{id: "2100001", text: "Appointment {{1}} at {{2}}. Reply 1 to confirm."}}
  order:    {{id: "2100002", text: "Order {{1}} is {{2}}."}}
  down:     {{id: "2100003", text: "Sorry, please try again later."}}
  bye:      {{id: "2100004", text: "Bye."}}
opt_out: {{keywords: [TD], reply: bye}}
webhooks:
  lookup:
    url: {url}
    method: POST
    timeout: 1s
    body: {{appointment_id: "{{{{ vars.appointment_id }}}}", mobile: "{{{{ contact.mobile }}}}"}}
start: idle
states:
  idle: {{}}
  reminder:
    entry: true
    expires: 1d
    on:
      - keywords: ["1"]
        call: {{webhook: lookup, save_as: order}}
        reply: order
        params: ["{{{{ vars.order.id }}}}", "{{{{ vars.order.status }}}}"]
        goto: confirmed
        on_error: {{reply: down, goto: idle}}
  confirmed: {{}}
"""


class Service:
    """The business's order system: answers ``/orders`` at once, ``/slow`` after the call's timeout."""

    def __init__(self) -> None:
        self.receiver = Receiver(answer=self._answer)
        self.bodies: list[Any] = []

    def _answer(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, float]:
        self.bodies.append(json.loads(body or b"null"))
        if path.startswith("/slow"):
            return 200, b'{"id": "late", "status": "late"}', 1.6
        appointment = self.bodies[-1]["appointment_id"]
        return 200, json.dumps({"id": f"O-{appointment}", "status": "packed"}).encode(), 0.0


class EventSink:
    """The business's event receiver; while ``down`` it answers 503 (and accepts nothing)."""

    def __init__(self) -> None:
        self.down = False
        self.lock = threading.Lock()
        self.accepted: list[tuple[dict[str, str], bytes, bool]] = []
        """What it answered 200, with whether the signature verified on arrival (signatures are stamped with real time)."""
        self.refused = 0
        self.receiver = Receiver(answer=self._answer)

    def _answer(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, float]:
        with self.lock:
            if self.down:
                self.refused += 1
                return 503, b"{}", 0.0
            self.accepted.append((headers, body, verify(SECRET, headers, body)))
        return 200, b"{}", 0.0

    def delivered(self) -> list[tuple[dict[str, str], bytes, bool]]:
        """What it accepted (answered 200), in arrival order."""
        with self.lock:
            return list(self.accepted)


@pytest.fixture
def service() -> Iterator[Service]:
    s = Service()
    yield s
    s.receiver.close()


@pytest.fixture
def sink(monkeypatch: pytest.MonkeyPatch) -> Iterator[EventSink]:
    monkeypatch.setenv("SMSBOT_EVENT_SECRET_CRM", SECRET)
    s = EventSink()
    yield s
    s.receiver.close()


def app_for(
    make_app: Callable[..., Harness], db_url: str, tmp_path: Path, rules: str, sink: EventSink
) -> tuple[Harness, str]:
    folder = tmp_path / "flow-rules"
    write_rules(folder, "acme.yaml", rules)
    settings = Settings(events={"crm": {"url": sink.receiver.url + "/hooks"}})
    h = make_app(db_url, rules_path=folder, settings=settings)
    return h, new_key(h.engine)


def start(h: Harness, key: str, mobile: str, appointment: str, **fields: Any) -> dict[str, Any]:
    body = {
        "signature": "Acme Shop",
        "nationcode": "86",
        "mobile": mobile,
        "template": "remind",
        "params": ["{{ vars.appointment_id }}", "10:00"],
        "state": "reminder",
        "vars": {"appointment_id": appointment},
        **fields,
    }
    response = h.client.post("/api/v1/conversations", json=body, headers=auth(key))
    assert response.status_code == 202, response.text
    answer: dict[str, Any] = response.json()
    return answer


def signed_events(sink: EventSink, h: Harness) -> list[dict[str, Any]]:
    """The events the receiver accepted, each with a signature that verified when it arrived."""
    found = []
    for headers, body, verified in sink.delivered():
        assert verified, "an event with a bad signature"
        assert verify("another secret", headers, body, now=float(headers["X-Smsbot-Timestamp"])) is False
        found.append(json.loads(body))
    return found


def test_start_reply_webhook_reply_and_signed_events(
    make_app: Callable[..., Harness], db_url: str, tmp_path: Path, service: Service, sink: EventSink
) -> None:
    h, key = app_for(make_app, db_url, tmp_path, RULES.format(url=service.receiver.url + "/orders"), sink)
    started = start(h, key, "13800000001", "A17")
    assert started["state"] == "reminder"
    wait_until(lambda: h.sender.sent, timeout=10, what="the reminder")
    assert [s.text for s in h.sender.sent] == ["Appointment A17 at 10:00. Reply 1 to confirm."]

    answered = h.say("1", mobile="13800000001")
    assert answered.json()["result"] == 0  # answered at once: the webhook runs after the commit
    wait_until(lambda: len(h.sender.sent) == 2, timeout=10, what="the reply carrying the webhook's answer")
    assert h.sender.sent[1].text == "Order O-A17 is packed."
    assert service.bodies == [{"appointment_id": "A17", "mobile": "13800000001"}]
    [call] = h.rows(webhook_calls)
    assert (call["webhook"], call["status"], call["http_status"]) == ("lookup", "ok", 200)
    assert call["response"]["json"] == {"id": "O-A17", "status": "packed"}

    conversation = h.client.get("/api/v1/conversations/Acme Shop/86/13800000001", headers=auth(key)).json()
    assert conversation["state"] == "confirmed"
    assert conversation["vars"]["order"] == {"id": "O-A17", "status": "packed"}

    wait_until(lambda: len(signed_events(sink, h)) == 2, timeout=15, what="two state_entered events")
    entered = signed_events(sink, h)
    assert [(e["type"], e["state"]) for e in entered] == [("state_entered", "reminder"), ("state_entered", "confirmed")]
    assert entered[0]["vars"] == {"appointment_id": "A17"}
    assert entered[1]["vars"]["order"]["status"] == "packed"
    assert {e["conversation_id"] for e in entered} == {started["conversation_id"]}
    assert h.rows(outbox) == []


def test_a_webhook_that_times_out_takes_on_error(
    make_app: Callable[..., Harness], db_url: str, tmp_path: Path, service: Service, sink: EventSink
) -> None:
    h, key = app_for(make_app, db_url, tmp_path, RULES.format(url=service.receiver.url + "/slow"), sink)
    start(h, key, "13800000002", "B2")
    h.say("1", mobile="13800000002")
    wait_until(lambda: len(h.sender.sent) == 2, timeout=15, what="the on_error reply")
    assert h.sender.sent[1].text == "Sorry, please try again later."
    [call] = h.rows(webhook_calls)
    assert (call["status"], call["error"]) == ("timeout", "timeout")
    assert len(service.bodies) == 2  # tried once more before giving up
    thread = h.rows(messages, messages.c.direction == "in")
    assert thread[-1]["state_after"] == "idle"  # on_error's goto


def test_a_receiver_that_was_down_gets_every_event_once_back_in_order_per_conversation(
    make_app: Callable[..., Harness], db_url: str, tmp_path: Path, service: Service, sink: EventSink
) -> None:
    h, key = app_for(make_app, db_url, tmp_path, RULES.format(url=service.receiver.url + "/orders"), sink)
    sink.down = True
    numbers = [f"1380000010{i}" for i in range(3)]
    for i, mobile in enumerate(numbers):
        start(h, key, mobile, f"C{i}")
    for mobile in numbers:
        h.say("1", mobile=mobile)
    wait_until(lambda: len(h.sender.sent) == 6, timeout=15, what="three reminders and three replies")
    wait_until(lambda: sink.refused >= 3, timeout=15, what="the first refused attempts")
    assert signed_events(sink, h) == []
    sink.down = False
    for _ in range(60):  # the backoff is measured on the app's clock: move it on until all are through
        if len(signed_events(sink, h)) >= 6:
            break
        h.clock.advance(timedelta(minutes=2))
        time.sleep(0.5)
    accepted = signed_events(sink, h)
    ids = [e["id"] for e in accepted]
    assert sorted(ids) == sorted(r["id"] for r in h.rows(events))  # every event, each once
    assert len(ids) == len(set(ids)) == 6
    for conversation in {e["conversation_id"] for e in accepted}:
        states = [e["state"] for e in accepted if e["conversation_id"] == conversation]
        assert states == ["reminder", "confirmed"]
    assert {r["status"] for r in h.rows(events)} == {"delivered"}


def test_the_example_appointment_reminder_confirms_through_its_webhook(
    make_app: Callable[..., Harness], db_url: str, tmp_path: Path, service: Service, sink: EventSink
) -> None:
    text = (EXAMPLE_RULES / "acme-shop.yaml").read_text(encoding="utf-8")
    example_url = "https://shop.example.com/api/appointments/confirm"
    assert example_url in text
    h, key = app_for(make_app, db_url, tmp_path, text.replace(example_url, service.receiver.url + "/confirm"), sink)
    started = start(h, key, "13800000003", "D4", template="appointment", state="appointment", params=["D4", "10:00"])
    assert started["text"] == "Appointment D4 at 10:00: reply 1 to confirm, 2 to reschedule."
    h.say("1", mobile="13800000003")
    wait_until(lambda: len(h.sender.sent) == 2, timeout=10, what="the confirmation")
    assert h.sender.sent[1].text == "Thank you, your appointment is confirmed."
    assert service.bodies == [{"appointment_id": "D4", "mobile": "13800000003"}]
