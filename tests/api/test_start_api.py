"""The start API through HTTP, on SQLite and PostgreSQL: starts, opt-outs, idempotency, batches, auth, GET/PUT."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bot.store.models import api_idempotency, audit_events, conversations, messages, outbox
from tests.api.helpers import SIGN, api_rules, auth, new_key, revoke, start, start_body
from tests.support import Harness, stored_counts


@pytest.fixture
def api(make_app: Callable[..., Harness], db_url: str, tmp_path: Path) -> Harness:
    return make_app(db_url, rules_path=api_rules(tmp_path / "api-rules"))


def test_a_start_queues_one_message_and_the_reply_is_handled_in_the_started_state(api: Harness) -> None:
    key = new_key(api.engine)
    response = start(api, key, start_body())
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["state"] == "reminder"
    assert body["message_status"] == "queued"
    assert body["params"] == ["A17", "10:00"]
    assert body["text"] == "Appointment A17 at 10:00. Reply 1 to confirm."
    (sent,) = [r for r in api.wait_settled() if r["direction"] == "out"]
    assert sent["id"] == body["message_id"]
    assert sent["started_by"] == "api:crm"
    assert sent["rule_kind"] == "start"
    assert sent["status"] == "sent"
    assert [s.params for s in api.sender.sent] == [("A17", "10:00")]
    assert api.sender.sent[0].template_id == "2000001"

    api.say("1", mobile="13800000001")
    outbound = api.wait_settled()
    assert outbound[-1]["text"] == "Confirmed: A17."
    assert outbound[-1]["state_before"] == "reminder"
    assert api.rows(audit_events)[-1]["actor"] == "api:crm"


def test_an_opted_out_number_gets_409_and_nothing_is_queued(api: Harness) -> None:
    key = new_key(api.engine)
    api.say("TD", mobile="13800000002")
    api.wait_settled()
    before = api.count(messages)
    response = start(api, key, start_body("13800000002"))
    assert response.status_code == 409
    assert response.json()["error"] == "opted_out"
    assert api.count(messages) == before
    assert api.count(outbox) == 0


def test_the_same_idempotency_key_twice_queues_one_message_and_answers_the_same(api: Harness) -> None:
    key = new_key(api.engine)
    first = start(api, key, start_body(idempotency_key="order-1"))
    second = start(api, key, start_body(idempotency_key="order-1"))
    assert first.status_code == second.status_code == 202
    assert first.json() == second.json()
    assert second.headers.get("Idempotent-Replayed") == "true"
    assert api.count(messages, messages.c.direction == "out") == 1
    assert api.count(api_idempotency) == 1
    other_key = new_key(api.engine, "other")
    third = start(api, other_key, start_body(idempotency_key="order-1"))  # keys are per API key
    assert third.json()["message_id"] != first.json()["message_id"]


def test_a_batch_of_1000_with_10_bad_rows_queues_990_and_names_the_10(api: Harness) -> None:
    key = new_key(api.engine)
    api.sender.gate.clear()  # hold sending: the outbox is counted
    items: list[dict[str, Any]] = [start_body(f"139{i:08d}") for i in range(1000)]
    bad = {7: "template", 100: "state", 205: "params", 333: "mobile", 400: "signature"}
    items[7]["template"] = "nope"
    items[100]["state"] = "nowhere"
    items[205]["params"] = ["one"]
    items[333]["mobile"] = "12x"
    items[400]["signature"] = "Nobody"
    for index in (500, 600, 700, 800, 900):
        items[index]["params"] = ["{{ vars.missing }}", "x"]
        bad[index] = "params[0]"
    response = api.client.post("/api/v1/conversations:batch", json={"items": items}, headers=auth(key))
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["index"] for r in results] == list(range(1000))
    refused = {r["index"]: r["field"] for r in results if r["status"] == 422}
    assert refused == bad
    assert sum(1 for r in results if r["status"] == 202) == 990
    assert api.count(messages, messages.c.direction == "out") == 990
    assert api.count(audit_events, audit_events.c.action == "api.start_batch") == 1
    api.sender.gate.set()


def test_more_than_1000_items_is_refused_whole(api: Harness) -> None:
    key = new_key(api.engine)
    response = api.client.post("/api/v1/conversations:batch", json={"items": [start_body()] * 1001}, headers=auth(key))
    assert response.status_code == 422
    assert response.json()["field"] == "items"
    assert api.count(messages) == 0


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"signature": "Nobody"}, "signature"),
        ({"template": "nope"}, "template"),
        ({"state": "nowhere"}, "state"),
        ({"params": ["A17"]}, "params"),
        ({"params": None}, "params"),
        ({"mobile": "123"}, "mobile"),
        ({"vars": {"x": 1}}, "vars.x"),
        ({"color": "red"}, "color"),
    ],
)
def test_bad_starts_get_422_naming_the_field(api: Harness, change: dict[str, Any], field: str) -> None:
    key = new_key(api.engine)
    response = start(api, key, start_body(**change))
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid"
    assert response.json()["field"] == field
    assert api.count(messages) == 0


def test_no_key_a_revoked_key_or_a_missing_scope_change_nothing(api: Harness) -> None:
    reader = new_key(api.engine, "reader", ("read",))
    revoked = new_key(api.engine, "old")
    revoke(api.engine, "old")
    before = {**stored_counts(api.engine), "audit": api.count(audit_events)}
    assert api.client.post("/api/v1/conversations", json=start_body()).status_code == 401
    assert start(api, "smsbot_nonsense", start_body()).status_code == 401
    assert start(api, revoked, start_body()).status_code == 401
    refused = start(api, reader, start_body())
    assert refused.status_code == 403
    assert refused.json()["error"] == "forbidden"
    assert (
        api.client.put(
            f"/api/v1/conversations/{SIGN}/86/13800000001/vars", json={"a": "b"}, headers=auth(reader)
        ).status_code
        == 403
    )
    assert {**stored_counts(api.engine), "audit": api.count(audit_events)} == before


def test_get_and_put_vars(api: Harness) -> None:
    key = new_key(api.engine)
    assert api.client.get(f"/api/v1/conversations/{SIGN}/86/13800000009", headers=auth(key)).status_code == 404
    put = api.client.put(
        f"/api/v1/conversations/{SIGN}/86/13800000009/vars", json={"appointment_id": "B2"}, headers=auth(key)
    )
    assert put.status_code == 200, put.text
    assert put.json()["created"] is True
    assert put.json()["vars"] == {"appointment_id": "B2"}
    assert api.count(messages) == 0
    response = start(api, key, start_body("13800000009", vars=None))
    assert response.json()["params"] == ["B2", "10:00"]
    got = api.client.get(f"/api/v1/conversations/{SIGN}/86/13800000009", headers=auth(key))
    assert got.status_code == 200
    view = got.json()
    assert view["state"] == "reminder"
    assert view["vars"] == {"appointment_id": "B2"}
    assert view["opted_out"] is False
    assert [m["started_by"] for m in view["messages"]] == ["api:crm"]
    bad = api.client.put(f"/api/v1/conversations/{SIGN}/86/13800000009/vars", json={"a": 1}, headers=auth(key))
    assert bad.status_code == 422
    assert bad.json()["field"] == "vars.a"
    assert api.rows(conversations)[0]["variables"] == {"appointment_id": "B2"}


def test_the_console_thread_says_who_started_the_conversation(api: Harness) -> None:
    from tests.console.test_console_conversations import login, make_user

    key = new_key(api.engine)
    conversation_id = start(api, key, start_body()).json()["conversation_id"]
    make_user(api.engine, "ops", "viewer")
    login(api.client, "ops")
    page = api.client.get(f"/console/conversations/{conversation_id}")
    assert page.status_code == 200
    assert "started by api:crm" in page.text


def test_the_openapi_document_lists_the_routes_with_their_errors(api: Harness) -> None:
    paths = api.client.get("/openapi.json").json()["paths"]
    expected = {
        ("/api/v1/conversations", "post"): {"202", "401", "403", "409", "422"},
        ("/api/v1/conversations:batch", "post"): {"200", "401", "403", "422"},
        ("/api/v1/conversations/{signature}/{nationcode}/{mobile}", "get"): {"200", "401", "403", "404", "422"},
        ("/api/v1/conversations/{signature}/{nationcode}/{mobile}/vars", "put"): {"200", "401", "403", "422"},
    }
    for (path, method), codes in expected.items():
        operation = paths[path][method]
        assert set(operation["responses"]) == codes, (path, method)
        assert operation["security"] == [{"HTTPBearer": []}]
    error = paths["/api/v1/conversations"]["post"]["responses"]["422"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/ApiError"}


def test_a_batch_item_that_is_not_an_object_is_refused_alone(api: Harness) -> None:
    key = new_key(api.engine)
    items: list[Any] = [start_body(), "nonsense", start_body("13800000002", signature=None)]
    response = api.client.post("/api/v1/conversations:batch", json={"items": items}, headers=auth(key))
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [(r["status"], r.get("field")) for r in results] == [(202, None), (422, "body"), (422, "signature")]
