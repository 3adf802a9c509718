"""POST /sms/status: Tencent's delivery reports through HTTP, on SQLite and Postgres."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import SecretStr

from bot.config import Settings
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


def test_bad_report_bodies_get_400_naming_the_field_and_change_nothing(harness: Harness) -> None:
    h = harness
    h.say("hi")
    [reply] = h.wait_settled()
    response = h.client.post("/sms/status", json=[delivery_report(reply["provider_serial"], "MAYBE")])
    assert response.status_code == 400
    assert response.json()["result"] != 0
    assert "report_status" in response.json()["errmsg"]
    not_json = h.client.post("/sms/status", content=b"{nope", headers={"content-type": "application/json"})
    assert (not_json.status_code, "not JSON" in not_json.json()["errmsg"]) == (400, True)
    [after] = h.rows(messages, messages.c.id == reply["id"])
    assert after["status"] == "sent"


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
