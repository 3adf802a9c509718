"""The inbound pipeline end to end, through HTTP, on SQLite and PostgreSQL.

Tencent's "SMS Reply" callback goes in; rows in contacts, conversations,
messages, outbox and opt_out_events come out, and queued replies reach the
sender (a recording fake) through the in-process delivery loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bot.config import Settings
from bot.delivery.outbox import claim_due
from bot.rules.normalize import normalize
from bot.store.db import make_engine
from bot.store.models import contacts, conversations, messages, opt_out_events, outbox
from bot.store.writer import DbWriter
from tests.support import (
    MOBILE,
    NOTHING_STORED,
    RULES,
    SEED,
    SIGN,
    Harness,
    copy_rules,
    payload,
    stored_counts,
    write_rules,
)

ACME = RULES / "acme-shop.yaml"
MENU_TEXT = "Reply 1 for order status, 2 for opening hours. Reply TD to opt out."
UNKNOWN_TEXT = "Sorry, we did not understand. Reply MENU for options."


def rule_at(needle: str, path: Path = ACME) -> str:
    """``file:line`` of the first line of ``path`` containing ``needle`` (how the engine names rules)."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if needle in line:
            return f"{path.name}:{number}"
    raise AssertionError(f"{needle!r} not in {path}")


RULE_HI = rule_at("keywords: [MENU, 菜单, HI, HELLO, 你好]")
RULE_STATUS = rule_at('keywords: ["1"]')
RULE_CODE = rule_at('keywords: ["3", CODE]')
RULE_RECEIPT = rule_at("regex: '^(?P<code>")
RULE_OTHERWISE = rule_at("otherwise: {reply: unknown}")
RULE_OPT_OUT = rule_at("keywords: [STOP, TD, T, 退订")
RULE_OPT_IN = rule_at("opt_in:")


def seed_sample(title: str) -> dict[str, object]:
    """The JSON after ``title`` in the Tencent documentation page we were given."""
    text = SEED.read_text(encoding="utf-8")
    start = text.index("{", text.index(title))
    return dict(json.loads(text[start : text.index("}", start) + 1]))


def conversation(h: Harness, sign: str = SIGN) -> dict[str, object]:
    found = h.rows(conversations, conversations.c.signature == sign)
    assert len(found) == 1, found
    return dict(found[0])


# ---------------------------------------------------------------- the seed payload


def test_seed_sample_payload_is_stored_replied_and_sent(harness: Harness) -> None:
    h = harness
    sample = seed_sample("Sample request:")
    assert set(sample) == {"extend", "mobile", "nationcode", "sign", "text", "time"}
    # The sample's placeholders replaced by real values; its extend and time are kept as they are.
    body = sample | {"mobile": MOBILE, "sign": SIGN, "text": "hi"}
    h.sender.gate.clear()  # hold the send back so the queued state can be seen

    response = h.post(body)

    assert response.status_code == 200
    assert response.json() == seed_sample("Sample response:") == {"result": 0, "errmsg": "OK"}
    [contact] = h.rows(contacts)
    assert (contact["nationcode"], contact["mobile"]) == ("86", MOBILE)
    convo = conversation(h)
    assert convo["contact_id"] == contact["id"]
    assert convo["state"] == "menu"
    assert convo["variables"] == {}
    assert convo["expires_at"] == h.clock() + timedelta(minutes=30)
    assert convo["opted_out"] is False

    [inbound] = h.inbound()
    assert inbound["text"] == "hi"
    assert inbound["normalized_text"] == "hi"
    assert inbound["signature"] == SIGN
    assert inbound["provider_time"] == datetime.fromtimestamp(int(str(sample["time"])), UTC)
    assert inbound["rule"] == RULE_HI
    assert inbound["rule_kind"] == "on"
    assert (inbound["state_before"], inbound["state_after"]) == (None, "menu")
    assert inbound["status"] == "received"
    assert inbound["dedupe_key"]
    assert inbound["conversation_id"] == convo["id"]
    assert inbound["error_message"] is None

    [reply] = h.outbound()
    assert reply["status"] == "queued"
    assert reply["in_reply_to_id"] == inbound["id"]
    assert reply["template_name"] == "menu"
    assert reply["template_id"] == "1490001"
    assert reply["params"] == []
    assert reply["text"] == MENU_TEXT
    assert reply["segments"] >= 1
    assert reply["rule"] == RULE_HI
    [queued] = h.rows(outbox)
    assert queued["message_id"] == reply["id"]

    h.sender.gate.set()
    [reply] = h.wait_settled()
    assert reply["status"] == "sent"
    assert reply["provider_serial"] == f"test:{reply['id']}"
    [sms] = h.sender.sent
    assert (sms.nationcode, sms.mobile, sms.sign) == ("86", MOBILE, SIGN)
    assert (sms.template_id, sms.params, sms.text) == ("1490001", (), MENU_TEXT)
    assert sms.message_id == reply["id"]


def test_extend_null_and_plus_prefixed_numbers_are_accepted(harness: Harness) -> None:
    """Tencent's page says extend 'an null value must be entered'."""
    h = harness
    body = payload("hi", at=h.next_time()) | {"extend": None, "mobile": "+" + MOBILE, "nationcode": "+86"}
    response = h.post(body)
    assert response.status_code == 200, response.text
    [contact] = h.rows(contacts)
    assert (contact["nationcode"], contact["mobile"]) == ("86", MOBILE)
    assert len(h.wait_settled()) == 1


# ---------------------------------------------------------------- conversations


def test_multi_step_conversation(harness: Harness) -> None:
    h = harness
    steps = [
        # text, rule, state after, template, params, reply text
        ("hi", RULE_HI, "menu", "1490001", [], MENU_TEXT),
        ("1", RULE_STATUS, "menu", "1490002", ["none", "sent"], "Order none: sent."),
        ("3", RULE_CODE, "code", "1490004", [], "Please reply with the 6-digit code on your receipt."),
        ("123456", RULE_RECEIPT, "idle", "1490005", ["123456"], "Thanks! Code 123456 is registered."),
        ("xyz", RULE_OTHERWISE, "idle", "1490006", [], UNKNOWN_TEXT),
    ]
    for text, *_ in steps:
        h.say(text)

    inbound = h.inbound()
    outbound = h.wait_settled()
    assert [m["text"] for m in inbound] == [s[0] for s in steps]
    assert [m["rule"] for m in inbound] == [s[1] for s in steps]
    assert [m["state_after"] for m in inbound] == [s[2] for s in steps]
    assert [m["state_before"] for m in inbound] == [None, "menu", "menu", "code", "idle"]
    assert [m["template_id"] for m in outbound] == [s[3] for s in steps]
    assert [m["params"] for m in outbound] == [s[4] for s in steps]
    assert [m["text"] for m in outbound] == [s[5] for s in steps]
    assert [m["in_reply_to_id"] for m in outbound] == [m["id"] for m in inbound]
    assert {m["status"] for m in outbound} == {"sent"}
    assert [sms.template_id for sms in h.sender.sent] == [s[3] for s in steps]

    convo = conversation(h)
    assert convo["state"] == "idle"
    assert convo["variables"] == {"receipt": "123456"}
    assert h.count(contacts) == 1
    assert h.count(opt_out_events) == 0


def test_two_numbers_have_separate_conversations(harness: Harness) -> None:
    h = harness
    h.say("hi", mobile="13800000001")
    h.say("1", mobile="13800000002")  # not in the menu: this number never said hi
    h.say("1", mobile="13800000001")
    h.wait_settled()
    by_number = {
        c["mobile"]: h.rows(messages, messages.c.contact_id == c["id"], messages.c.direction == "out")
        for c in h.rows(contacts)
    }
    assert [m["template_id"] for m in by_number["13800000001"]] == ["1490001", "1490002"]
    assert [m["template_id"] for m in by_number["13800000002"]] == ["1490006"]


def test_opt_out_silence_and_opt_in(harness: Harness) -> None:
    h = harness
    h.say("hi")
    h.wait_settled()  # sent before the opt-out (a reply still queued then is suppressed: see below)
    h.say("  Ｔｄ。 ")  # full-width, punctuation, spaces: still TD
    h.say("MENU")  # opted out: stored, silent
    h.say("hi")
    h.say("START")
    h.say("hi")  # back to normal
    outbound = h.wait_settled()

    inbound = h.inbound()
    assert [m["rule"] for m in inbound] == [RULE_HI, RULE_OPT_OUT, None, None, RULE_OPT_IN, RULE_HI]
    assert [m["rule_kind"] for m in inbound] == ["on", "opt_out", None, None, "opt_in", "on"]
    assert {m["status"] for m in inbound} == {"received"}
    assert [m["template_name"] for m in outbound] == ["menu", "bye", "back", "menu"]
    assert [m["in_reply_to_id"] for m in outbound] == [inbound[i]["id"] for i in (0, 1, 4, 5)]
    assert outbound[2]["params"] == ["friend"]
    assert {m["status"] for m in outbound} == {"sent"}
    assert [sms.template_id for sms in h.sender.sent] == ["1490001", "1490007", "1490008", "1490001"]

    out_event, in_event = h.rows(opt_out_events)
    convo = conversation(h)
    assert out_event["event"] == "opt_out"
    assert out_event["source"] == "keyword"
    assert out_event["raw_text"] == "  Ｔｄ。 "
    assert out_event["normalized_text"] == normalize("  Ｔｄ。 ") == "td"
    assert out_event["rule"] == RULE_OPT_OUT
    assert out_event["message_id"] == inbound[1]["id"]
    assert out_event["conversation_id"] == convo["id"]
    assert in_event["event"] == "opt_in"
    assert (in_event["raw_text"], in_event["normalized_text"]) == ("START", "start")
    assert in_event["rule"] == RULE_OPT_IN
    assert in_event["message_id"] == inbound[4]["id"]
    assert convo["opted_out"] is False
    assert convo["opted_out_at"] is None
    assert convo["state"] == "menu"


def test_opted_out_conversation_row(harness: Harness) -> None:
    h = harness
    h.say("hi")
    h.say("我要退订")
    [_, stop] = h.inbound()
    convo = conversation(h)
    assert convo["opted_out"] is True
    assert convo["opted_out_at"] == h.clock()
    assert convo["opt_out_message_id"] == stop["id"]
    assert convo["state"] == "idle"
    [event] = h.rows(opt_out_events)
    assert (event["raw_text"], event["normalized_text"]) == ("我要退订", "我要退订")


def test_reply_queued_before_an_opt_out_is_suppressed_not_sent(make_app: Callable[..., Harness], db_url: str) -> None:
    """A reply still in the outbox when the number opts out is never handed to the sender (but 'bye' is)."""
    h = make_app(db_url, deliver=False)
    h.say("hi")
    h.say("TD")
    assert [m["status"] for m in h.outbound()] == ["queued", "queued"]
    writer = DbWriter(h.engine)
    writer.start()
    try:
        claimed = writer.run_sync(lambda conn: claim_due(conn, now=h.clock(), limit=10, owner="test"))
    finally:
        writer.stop()
    assert [sms.template_id for sms in claimed] == ["1490007"]
    menu, bye = h.outbound()
    assert menu["status"] == "suppressed"
    assert "opted out" in menu["status_reason"]
    assert bye["status"] == "queued"
    assert [row["message_id"] for row in h.rows(outbox)] == [bye["id"]]


def test_state_expires_after_its_timeout(harness: Harness) -> None:
    h = harness
    h.say("hi")
    h.clock.advance(timedelta(minutes=29))
    h.say("1")  # still in the menu; the expiry is renewed
    assert conversation(h)["expires_at"] == h.clock() + timedelta(minutes=30)
    h.clock.advance(timedelta(minutes=31))
    h.say("1")  # the menu has expired: back to idle, where "1" means nothing
    outbound = h.wait_settled()

    inbound = h.inbound()
    assert [m["rule"] for m in inbound] == [RULE_HI, RULE_STATUS, RULE_OTHERWISE]
    assert [(m["state_before"], m["state_after"]) for m in inbound] == [
        (None, "menu"),
        ("menu", "menu"),
        ("menu", "idle"),
    ]
    assert [m["template_id"] for m in outbound] == ["1490001", "1490002", "1490006"]
    assert conversation(h)["state"] == "idle"


# ---------------------------------------------------------------- arrays


def test_array_payload_processes_every_item_in_order(harness: Harness) -> None:
    h = harness
    body = [payload("hi", at=h.next_time()), payload("1", at=h.next_time())]
    response = h.post(body)
    assert response.status_code == 200
    assert response.json() == {"result": 0, "errmsg": "OK"}
    assert [m["text"] for m in h.inbound()] == ["hi", "1"]
    assert [m["template_id"] for m in h.wait_settled()] == ["1490001", "1490002"]


def test_array_behaves_like_the_same_messages_one_by_one(make_app: Callable[..., Harness], db_url: str) -> None:
    """One request carrying a whole conversation leaves the rows that separate requests leave.

    No delivery loop: what is compared is what the pipeline decided and queued,
    not how far the sender got (a reply still queued at the opt-out is suppressed).
    """
    h = make_app(db_url, deliver=False)
    script = ["hi", "3", "123456", "TD", "MENU", "START", "hi", "1"]
    one_by_one, batched = "13800000001", "13800000002"
    for text in script:
        h.say(text, mobile=one_by_one)
    response = h.post([payload(text, at=h.next_time(), mobile=batched) for text in script])
    assert response.status_code == 200

    def story(mobile: str) -> dict[str, Any]:
        [contact] = h.rows(contacts, contacts.c.mobile == mobile)
        convo = dict(h.rows(conversations, conversations.c.contact_id == contact["id"])[0])
        mine = h.rows(messages, messages.c.contact_id == contact["id"])
        inbound = [m for m in mine if m["direction"] == "in"]
        position = {m["id"]: n for n, m in enumerate(inbound)}
        keys_in = ("text", "normalized_text", "rule", "rule_kind", "state_before", "state_after", "status")
        keys_out = ("template_id", "params", "text", "status", "rule", "state_before", "state_after")
        return {
            "in": [tuple(m[k] for k in keys_in) for m in inbound],
            "out": [
                (position[m["in_reply_to_id"]], *(m[k] for k in keys_out)) for m in mine if m["direction"] == "out"
            ],
            "events": [
                (e["event"], e["raw_text"], e["normalized_text"], e["rule"], position[e["message_id"]])
                for e in h.rows(opt_out_events, opt_out_events.c.conversation_id == convo["id"])
            ],
            "conversation": {k: convo[k] for k in ("state", "variables", "opted_out", "expires_at", "opted_out_at")},
        }

    expected = story(one_by_one)
    assert len(expected["out"]) == 7
    assert {out[4] for out in expected["out"]} == {"queued"}
    assert story(batched) == expected


def test_array_payload_is_all_or_nothing(harness: Harness) -> None:
    h = harness
    good = payload("hi", at=h.next_time())
    bad = payload("1", at=h.next_time()) | {"time": "yesterday"}
    response = h.post([good, bad])
    assert response.status_code == 400
    assert response.json()["result"] != 0
    assert "[1].time" in response.json()["errmsg"]
    assert stored_counts(h.engine) == NOTHING_STORED
    assert h.sender.sent == []


# ---------------------------------------------------------------- signatures without rules


def test_unknown_signature_without_default_rules_is_stored_without_reply(
    make_app: Callable[..., Harness], db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    h = make_app(db_url, rules_path=copy_rules(tmp_path / "only-acme", "acme-shop.yaml"))
    caplog.set_level(logging.WARNING, logger="smsbot.web")
    h.say("hello", sign="Other Brand")
    h.say("TD", sign="Other Brand")
    h.say("hi")  # Acme Shop still answers

    unknown = h.rows(messages, messages.c.signature == "Other Brand")
    assert [m["text"] for m in unknown] == ["hello", "TD"]
    assert {m["direction"] for m in unknown} == {"in"}
    assert {m["status"] for m in unknown} == {"ignored"}
    assert {m["rule"] for m in unknown} == {None}
    assert all("no rules" in m["status_reason"] for m in unknown)
    assert conversation(h, "Other Brand")["opted_out"] is False
    assert [m["signature"] for m in h.wait_settled()] == [SIGN]
    warnings = [r for r in caplog.records if "Other Brand" in r.getMessage()]
    assert len(warnings) == 1, "one warning per signature, not per message"


def test_unknown_signature_falls_back_to_default_rules(harness: Harness) -> None:
    h = harness
    h.say("hello", sign="Other Brand")  # the default file has no conversation: silence
    h.say("R", sign="Other Brand")  # but opt-out works for every signature
    outbound = h.wait_settled()
    assert [m["template_id"] for m in outbound] == ["1490101"]
    assert outbound[0]["rule"].startswith("default.yaml:")
    assert conversation(h, "Other Brand")["opted_out"] is True
    [event] = h.rows(opt_out_events)
    assert (event["raw_text"], event["rule"]) == ("R", outbound[0]["rule"])


# ---------------------------------------------------------------- template errors

BROKEN_PARAMS = """\
signature: Acme Shop
templates:
  hello: {id: "3000001", text: "Hello {1}"}
  fine:  {id: "3000002", text: "All fine."}
start: idle
states:
  idle:
    on:
      - keywords: [BOOM]
        reply: hello
        params: ["{{ vars.never_set }}"]
        goto: boomed
  boomed:
    on:
      - keywords: [OK]
        reply: fine
        goto: idle
"""


def test_template_rendering_error_is_recorded_and_callback_succeeds(
    make_app: Callable[..., Harness], db_url: str, tmp_path: Path
) -> None:
    rules = tmp_path / "broken-params"
    write_rules(rules, "acme.yaml", BROKEN_PARAMS)
    h = make_app(db_url, rules_path=rules)
    h.say("BOOM")  # asserts 200 {"result": 0, "errmsg": "OK"}

    [inbound] = h.inbound()
    assert inbound["rule"] == "acme.yaml:9"
    assert inbound["status"] == "received"
    assert "acme.yaml:9" in inbound["error_message"]
    assert "never_set" in inbound["error_message"]
    assert h.outbound() == []
    assert conversation(h)["state"] == "boomed"
    h.say("OK")
    assert [m["template_id"] for m in h.wait_settled()] == ["3000002"]


# ---------------------------------------------------------------- loop protection


def test_loop_protection_defaults_to_20_replies_in_5_minutes() -> None:
    assert (Settings().loop_limit, Settings().loop_window) == (20, timedelta(minutes=5))


def test_identical_replies_beyond_the_loop_limit_are_not_queued(make_app: Callable[..., Harness], db_url: str) -> None:
    h = make_app(db_url, settings=Settings(loop_limit=3))
    for _ in range(5):
        h.say("xyz")
    h.say("hi")  # a different reply is not a loop
    outbound = h.wait_settled()
    assert [m["text"] for m in outbound] == [UNKNOWN_TEXT] * 5 + [MENU_TEXT]
    assert [m["status"] for m in outbound] == ["sent"] * 3 + ["looping"] * 2 + ["sent"]
    assert all("3" in m["status_reason"] for m in outbound if m["status"] == "looping")
    assert len(h.sender.sent) == 4

    h.clock.advance(timedelta(minutes=6))  # outside the 5 minute window
    h.say("xyz")
    assert h.wait_settled()[-1]["status"] == "sent"


# ---------------------------------------------------------------- health


def test_healthz_and_readyz(harness: Harness) -> None:
    h = harness
    assert h.client.get("/healthz").json() == {"status": "ok"}
    ready = h.client.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ok"
    assert body["database"] == "ok"
    assert h.rules.ruleset is not None
    assert body["rules"]["version"] == h.rules.ruleset.version
    assert sorted(body["rules"]["files"]) == ["acme-shop.yaml", "default.yaml"]
    assert body["rules"]["last_reload_error"] is None


def test_readyz_not_ready_without_rules(make_app: Callable[..., Harness], db_url: str) -> None:
    h = make_app(db_url, load_rules=False)
    ready = h.client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["status"] == "unavailable"
    assert ready.json()["rules"]["version"] is None


def test_openapi_documents_callback_errors(harness: Harness) -> None:
    spec = harness.client.get("/openapi.json").json()
    responses = spec["paths"]["/sms/callback"]["post"]["responses"]
    assert {"200", "400", "401", "413", "503"} <= set(responses)
    callback = spec["paths"]["/sms/callback"]["post"]
    assert [p["name"] for p in callback["parameters"]] == ["token"]
    assert callback["requestBody"]["content"]["application/json"]["schema"]["anyOf"][1]["type"] == "array"
    assert {"/healthz", "/readyz"} <= set(spec["paths"])
    assert "503" in spec["paths"]["/readyz"]["get"]["responses"]


# ---------------------------------------------------------------- the delivery loop's own behaviour


def test_idle_delivery_loop_does_not_spin(harness: Harness) -> None:
    """With nothing to send the loop should wait (poll_seconds=1), not run a transaction after every commit.

    ``create_app`` sets ``writer.on_commit = deliverer.wake``; every delivery round's own (empty)
    claim transaction is a commit, so it wakes itself up again, forever.
    """
    h = harness
    h.say("hi")
    h.wait_settled()
    writer = h.app.state.runtime.pipeline.writer
    stop = threading.Event()
    before = writer.batches
    stop.wait(0.5)  # a measuring window, not a wait for something
    idle_transactions = writer.batches - before
    assert idle_transactions <= 3, f"{idle_transactions} database transactions in 0.5 s with nothing to do"


@pytest.mark.slow
def test_app_shuts_down_promptly(make_app: Callable[..., Harness], db_url: str) -> None:
    """Leaving the lifespan (server shutdown, Ctrl-C) must not hang on the delivery task.

    The lifespan cancels the delivery task once and awaits it. On Python 3.11,
    ``asyncio.wait_for`` returns normally (swallowing the cancellation) when its
    inner wait has already finished; the spinning loop above makes that likely,
    so the task keeps running and shutdown waits forever. Several starts and
    stops make the race show up; each stop gets 2 s.
    """
    for attempt in range(10):
        h = make_app(db_url)
        h.say(f"hi {attempt}")
        h.wait_settled()
        leaving = threading.Thread(target=h.client.__exit__, args=(None, None, None), daemon=True)
        leaving.start()
        leaving.join(2)
        assert not leaving.is_alive(), (
            f"shutdown {attempt + 1} hung: the delivery task survived the lifespan's cancel()"
        )


def test_delivery_task_honours_a_cancel_that_arrives_with_a_wake_up(harness: Harness) -> None:
    """The lifespan cancels the delivery task once and then awaits it, so that one cancel must end it.

    Here a wake-up (a commit that queued a reply) lands just before the cancel,
    as it does when the last callbacks finish during a graceful shutdown. On
    Python 3.11, ``asyncio.wait_for`` returns normally (dropping the
    cancellation) when its inner wait has already finished, and
    ``Deliverer.run_forever`` keeps looping: the shutdown then hangs forever.
    """
    h = harness
    h.say("hi")
    h.wait_settled()
    deliverer = h.app.state.runtime.pipeline.deliverer

    async def wake_then_cancel() -> bool:
        [task] = [t for t in asyncio.all_tasks() if t.get_name() == "smsbot-deliverer"]
        for _ in range(200):  # until the loop is idle, waiting for a wake-up
            if deliverer._wake is not None and deliverer._wake._waiters:
                break
            await asyncio.sleep(0.01)
        deliverer._wake.set()
        await asyncio.sleep(0)  # the inner event.wait() finishes
        await asyncio.sleep(0)  # wait_for's waiter is released; the task is about to resume
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=2)
        return bool(done)

    assert h.client.portal is not None
    assert h.client.portal.call(wake_then_cancel), "the delivery task ignored cancel(): shutdown would hang"


def test_sqlite_engine_uses_wal_and_busy_timeout(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'smsbot.db'}")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert int(conn.exec_driver_sql("PRAGMA busy_timeout").scalar() or 0) >= 1000
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        engine.dispose()


def test_masked_numbers_in_logs() -> None:
    from bot.numbers import mask_number

    assert re.fullmatch(r"138\*+0000", mask_number(MOBILE))
