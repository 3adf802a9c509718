"""POST /sms/status: Tencent's delivery reports through HTTP, on SQLite and Postgres."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable

from pydantic import SecretStr

from bot.config import Settings
from bot.runtime.logs import setup_logging
from bot.store.models import messages
from tests.support import Harness, delivery_report


def test_a_delivery_report_marks_the_sent_reply_delivered(harness: Harness) -> None:
    h = harness
    h.say("hi")
    [reply] = h.wait_settled()
    assert reply["status"] == "sent"
    response = h.client.post("/sms/status", json=[delivery_report(reply["provider_serial"])])
    assert response.status_code == 200, response.text
    assert response.json() == {"result": 0, "errmsg": "OK"}
    [after] = h.rows(messages, messages.c.id == reply["id"])
    assert after["status"] == "delivered"
    assert after["delivered_at"] is not None


def test_a_failed_report_and_an_unknown_sid_in_one_callback(harness: Harness) -> None:
    h = harness
    h.say("hi")
    [reply] = h.wait_settled()
    body = [delivery_report(reply["provider_serial"], "FAIL"), delivery_report("5000:never-sent")]
    response = h.client.post("/sms/status", json=body)
    assert response.status_code == 200, response.text  # unknown sids are logged, not refused
    [after] = h.rows(messages, messages.c.id == reply["id"])
    assert (after["status"], after["error_code"], after["error_message"]) == ("failed", "MK:0001", "空号")


def test_an_unreadable_body_gets_400_and_changes_nothing(harness: Harness) -> None:
    h = harness
    h.say("hi")
    [reply] = h.wait_settled()
    not_json = h.client.post("/sms/status", content=b"{nope", headers={"content-type": "application/json"})
    assert (not_json.status_code, "not JSON" in not_json.json()["errmsg"]) == (400, True)
    empty = h.client.post("/sms/status", json=[])
    assert empty.status_code == 400
    [after] = h.rows(messages, messages.c.id == reply["id"])
    assert after["status"] == "sent"


def test_odd_items_are_skipped_and_logged_while_the_others_are_applied_and_tencent_hears_ok(harness: Harness) -> None:
    """Refusing the batch would make Tencent post it again and again, and the good reports never land."""
    h = harness
    h.say("hi")
    [reply] = h.wait_settled()
    body = [
        delivery_report("5000:x", "MAYBE"),
        "not an object",
        {"report_status": "SUCCESS", "mobile": "13912345678"},
        {**delivery_report(reply["provider_serial"], "success"), "ext": {"campaign": 7}, "new_field": 1},
    ]
    root = logging.getLogger()
    stream, level = io.StringIO(), root.level
    handler = setup_logging(stream=stream)  # smsbot's own handler: the one that masks numbers
    try:
        response = h.client.post("/sms/status", json=body)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert response.status_code == 200, response.text
    assert response.json() == {"result": 0, "errmsg": "OK"}
    [after] = h.rows(messages, messages.c.id == reply["id"])
    assert after["status"] == "delivered"
    skipped = [line for line in stream.getvalue().splitlines() if "skipped" in line]
    assert len(skipped) == 3
    assert any("report_status" in line for line in skipped)
    assert "139****5678" in stream.getvalue()
    assert "13912345678" not in stream.getvalue()  # numbers masked in the log, as in every line


def test_the_callback_token_protects_delivery_reports_too(make_app: Callable[..., Harness], db_url: str) -> None:
    h = make_app(db_url, settings=Settings(callback_token=SecretStr("s3cret")))
    assert h.client.post("/sms/status", json=[delivery_report("5000:1")]).status_code == 401
    assert h.client.post("/sms/status?token=wrong", json=[delivery_report("5000:1")]).status_code == 401
    assert h.client.post("/sms/status?token=s3cret", json=[delivery_report("5000:1")]).status_code == 200


def test_openapi_documents_the_status_route(harness: Harness) -> None:
    spec = harness.client.get("/openapi.json").json()
    route = spec["paths"]["/sms/status"]["post"]
    assert {"200", "400", "401", "413", "503"} <= set(route["responses"])
    assert [p["name"] for p in route["parameters"]] == ["token"]
