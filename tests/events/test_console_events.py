"""The console shows events and webhook calls: on the thread, and failed or pending events on /console/events."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa

from bot.store.models import audit_events, conversations, events, messages, webhook_calls
from tests.console.test_console_ops import People, post_form
from tests.support import Harness, writing


def _seed(h: Harness) -> tuple[int, int]:
    h.say("hi")
    (convo,) = h.rows(conversations)
    (message,) = h.rows(messages, messages.c.direction == "in")
    at = h.clock()
    with writing(h.engine) as conn:
        failed = conn.execute(
            sa.insert(events).values(
                endpoint="crm",
                kind="state_entered",
                conversation_id=convo["id"],
                message_id=message["id"],
                body="{}",
                status="failed",
                attempts=27,
                next_attempt_at=at,
                last_status=503,
                last_error="HTTP 503: receiver <down>",
                created_at=at - timedelta(hours=25),
            )
        ).inserted_primary_key[0]
        conn.execute(
            sa.insert(webhook_calls).values(
                conversation_id=convo["id"],
                message_id=message["id"],
                webhook="orders",
                rule="acme-shop.yaml:30",
                save_as="order",
                method="POST",
                url="https://x",
                request={},
                status="timeout",
                attempts=1,
                next_attempt_at=at,
                duration_ms=3004,
                error="timeout",
                created_at=at,
                finished_at=at,
            )
        )
    return int(convo["id"]), int(failed)


def test_the_events_page_lists_failures_and_admins_retry_them(harness: Harness) -> None:
    people = People(harness)
    convo_id, event_id = _seed(harness)
    assert people.anonymous.get("/console/events", follow_redirects=False).status_code in (303, 307, 401)
    page = people.viewer.get("/console/events")
    assert page.status_code == 200
    assert "HTTP 503: receiver &lt;down&gt;" in page.text
    assert f'id="event-{event_id}"' in page.text
    assert "Retry now" not in page.text  # viewers see, admins act
    assert 'href="/console/events"' in page.text  # in the nav
    admin_page = people.admin.get("/console/events")
    assert "Retry now" in admin_page.text
    assert people.admin.post(f"/console/events/{event_id}/retry", follow_redirects=False).status_code == 403  # no CSRF
    answer = post_form(people.admin, "/console/events", f"/console/events/{event_id}/retry", {})
    assert answer.status_code == 303
    (row,) = harness.rows(events)
    assert (row["status"], row["attempts"]) == ("pending", 0)
    (entry,) = harness.rows(audit_events, audit_events.c.action == "event.retry")
    assert entry["actor"] == "ada"
    assert entry["target"] == f"event:{event_id}"
    assert f'id="event-{event_id}"' in people.viewer.get("/console/events?status=pending").text
    viewer_retry = post_form(people.viewer, "/console/events", f"/console/events/{event_id}/retry", {})
    assert viewer_retry.status_code == 403

    thread = people.viewer.get(f"/console/conversations/{convo_id}")
    assert "Webhook calls and events" in thread.text
    assert "orders" in thread.text
    assert "3004 ms" in thread.text
    assert "state_entered" in thread.text
