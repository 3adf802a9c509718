"""``GET /metrics``: Prometheus can read it, the numbers move with traffic, strangers cannot read it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from sqlalchemy import insert, select, update

from bot.config import Settings
from bot.store.models import account_limits, conversations, events, messages, webhook_calls
from bot.web.metrics import EVERY_NUMBER_CAPS
from tests.support import Harness, payload, serve_process, wait_until, write_rules, writing

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, by (name, labels); fails the test if Prometheus could not parse it."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape(h: Harness) -> Samples:
    response = h.client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


@pytest.fixture
def local(harness: Harness) -> Harness:
    """The default app, with TestClient's made-up client host taken as local (it is not an address)."""
    harness.app.state.metrics.loopback_hosts.add("testclient")
    return harness


def test_callbacks_are_counted_by_result(local: Harness) -> None:
    h = local
    h.say("MENU")
    duplicate = payload("MENU again", at=h.next_time())
    assert h.post(duplicate).status_code == 200
    assert h.post(duplicate).status_code == 200  # Tencent retried: nothing new stored
    assert h.post(b"{not json").status_code == 400
    assert h.post(b"x" * (h.settings.max_body_bytes + 1)).status_code == 413
    assert h.client.post("/sms/status", json=[]).status_code in (200, 400)

    samples = scrape(h)
    assert value(samples, "smsbot_callbacks_total", route="reply", result="ok") == 2
    assert value(samples, "smsbot_callbacks_total", route="reply", result="duplicate") == 1
    assert value(samples, "smsbot_callbacks_total", route="reply", result="bad_request") == 1
    assert value(samples, "smsbot_callbacks_total", route="reply", result="too_large") == 1
    assert value(samples, "smsbot_callback_duration_seconds_count", route="reply") == 5
    assert value(samples, "smsbot_callback_duration_seconds_bucket", route="reply", le="+Inf") == 5
    assert value(samples, "smsbot_callback_duration_seconds_count", route="status") == 1


def test_wrong_callback_token_is_counted_as_unauthorized(make_app: Callable[..., Harness], db_url: str) -> None:
    h = make_app(db_url, settings=Settings(callback_token=SecretStr("s3cret")))
    h.app.state.metrics.loopback_hosts.add("testclient")
    assert h.post(payload("hi", at=h.next_time()), token="wrong").status_code == 401
    assert value(scrape(h), "smsbot_callbacks_total", route="reply", result="unauthorized") == 1


def test_replies_by_status_and_the_outbox_come_from_the_database(make_app: Callable[..., Harness], db_url: str) -> None:
    h = make_app(db_url, deliver=False)  # replies stay queued
    h.app.state.metrics.loopback_hosts.add("testclient")
    h.say("MENU")
    h.say("HELP", mobile="13900000001")
    h.clock.advance(timedelta(seconds=90))
    samples = scrape(h)
    assert value(samples, "smsbot_replies", status="queued") == 2
    assert value(samples, "smsbot_outbox_depth") == 2
    assert value(samples, "smsbot_outbox_oldest_age_seconds") == pytest.approx(90, abs=1)
    assert value(samples, "smsbot_database_up") == 1


def test_sent_replies_leave_the_outbox(local: Harness) -> None:
    h = local
    h.say("MENU")
    h.wait_settled()
    samples = scrape(h)
    assert value(samples, "smsbot_replies", status="sent") == 1
    assert value(samples, "smsbot_outbox_depth") == 0
    assert value(samples, "smsbot_outbox_oldest_age_seconds") == 0


def test_expired_and_ambiguous_replies_are_reported_even_before_the_first(local: Harness) -> None:
    h = local
    samples = scrape(h)
    for status in ("expired", "ambiguous"):  # a series at 0, so an alert on it has something to read
        assert (("smsbot_replies", frozenset({("status", status)}))) in samples
        assert value(samples, "smsbot_replies", status=status) == 0

    h.say("hi")
    h.say("hi", mobile="13900000001")
    h.say("hi", mobile="13900000002")
    first, second, _ = (r["id"] for r in h.wait_settled())
    with writing(h.engine) as conn:  # what the delivery loop records when a reply is held too long / unanswered
        conn.execute(update(messages).where(messages.c.id == first).values(status="expired"))
        conn.execute(update(messages).where(messages.c.id == second).values(status="ambiguous"))
    samples = scrape(h)
    assert value(samples, "smsbot_replies", status="expired") == 1
    assert value(samples, "smsbot_replies", status="ambiguous") == 1
    assert value(samples, "smsbot_replies", status="sent") == 1


def test_ambiguous_replies_waiting_for_ops_are_counted_however_old(local: Harness) -> None:
    """smsbot_replies counts the last 24 hours; an ambiguous reply left to ops must not drop out of sight."""
    h = local
    assert value(scrape(h), "smsbot_replies_ambiguous_unsettled") == 0
    h.say("hi")
    [reply] = h.wait_settled()
    with writing(h.engine) as conn:
        conn.execute(update(messages).where(messages.c.id == reply["id"]).values(status="ambiguous"))
    h.clock.advance(timedelta(days=3))
    samples = scrape(h)
    assert value(samples, "smsbot_replies", status="ambiguous") == 0  # out of the 24-hour window
    assert value(samples, "smsbot_replies_ambiguous_unsettled") == 1
    with writing(h.engine) as conn:  # settled at last (a late report, the check, or ops)
        conn.execute(update(messages).where(messages.c.id == reply["id"]).values(status="delivered"))
    assert value(scrape(h), "smsbot_replies_ambiguous_unsettled") == 0


def test_the_events_queue_and_webhook_calls_are_gauges_read_from_the_database(
    make_app: Callable[..., Harness], db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMSBOT_EVENT_SECRET_CRM", "s3cret")
    monkeypatch.setenv("SMSBOT_EVENT_SECRET_ERP", "s3cret")
    settings = Settings(events={"crm": {"url": "http://127.0.0.1:9/crm"}, "erp": {"url": "http://127.0.0.1:9/erp"}})
    h = make_app(db_url, settings=settings, deliver=False)  # no dispatcher or runner: the rows stay as written
    h.app.state.metrics.loopback_hosts.add("testclient")
    samples = scrape(h)
    for endpoint in ("crm", "erp"):  # configured endpoints have their series from the first scrape, at 0
        for name in ("smsbot_events_pending", "smsbot_events_failed"):
            assert (name, frozenset({("endpoint", endpoint)})) in samples
            assert value(samples, name, endpoint=endpoint) == 0
    for status in ("pending", "ok", "failed", "timeout"):
        assert ("smsbot_webhook_calls", frozenset({("status", status)})) in samples
        assert value(samples, "smsbot_webhook_calls", status=status) == 0

    h.say("hi")  # its state_entered is queued for both endpoints
    samples = scrape(h)
    assert value(samples, "smsbot_events_pending", endpoint="crm") == 1
    assert value(samples, "smsbot_events_pending", endpoint="erp") == 1
    now = h.clock()
    with writing(h.engine) as conn:
        conversation = conn.execute(select(conversations.c.id)).scalar_one()
        message = conn.execute(select(messages.c.id).where(messages.c.direction == "in")).scalar_one()

        def event(endpoint: str, status: str) -> dict[str, object]:
            return {
                "endpoint": endpoint,
                "kind": "state_entered",
                "conversation_id": conversation,
                "message_id": message,
                "body": "{}",
                "status": status,
                "attempts": 1,
                "next_attempt_at": now,
                "created_at": now,
            }

        rows_ = [event("crm", "pending")] * 2 + [event("crm", "failed")] + [event("crm", "delivered")] * 3
        rows_ += [event("erp", "failed")] * 2 + [event("shop-file", "pending")]  # a rule file's endpoint
        conn.execute(insert(events), rows_)

        def call(status: str, age: timedelta) -> dict[str, object]:
            return {
                "conversation_id": conversation,
                "message_id": message,
                "webhook": "order_status",
                "rule": "acme-shop.yaml:67",
                "method": "GET",
                "url": "http://127.0.0.1:9999/orders",
                "status": status,
                "attempts": 0,
                "next_attempt_at": now - age,
                "created_at": now - age,
            }

        conn.execute(
            insert(webhook_calls),
            [
                call("pending", timedelta(days=2)),  # stuck for two days: still counted, it waits
                call("ok", timedelta(minutes=5)),
                call("ok", timedelta(hours=1)),
                call("ok", timedelta(days=3)),  # finished before the 24-hour window: not counted
                call("timeout", timedelta(minutes=1)),
            ],
        )
    samples = scrape(h)
    assert value(samples, "smsbot_events_pending", endpoint="crm") == 3  # delivered ones are not counted
    assert value(samples, "smsbot_events_failed", endpoint="crm") == 1
    assert value(samples, "smsbot_events_pending", endpoint="erp") == 1
    assert value(samples, "smsbot_events_failed", endpoint="erp") == 2
    assert value(samples, "smsbot_events_pending", endpoint="shop-file") == 1
    assert ("smsbot_events_failed", frozenset({("endpoint", "shop-file")})) in samples
    assert value(samples, "smsbot_webhook_calls", status="pending") == 1
    assert value(samples, "smsbot_webhook_calls", status="ok") == 2
    assert value(samples, "smsbot_webhook_calls", status="timeout") == 1
    assert value(samples, "smsbot_webhook_calls", status="failed") == 0

    with writing(h.engine) as conn:  # an admin sends the failed ones again ("Retry now")
        conn.execute(update(events).where(events.c.status == "failed").values(status="pending"))
    samples = scrape(h)
    assert value(samples, "smsbot_events_failed", endpoint="erp") == 0
    assert value(samples, "smsbot_events_pending", endpoint="erp") == 3


def _cap(h: Harness, code: str, nationcode: str, until: datetime) -> None:
    with writing(h.engine) as conn:
        conn.execute(
            insert(account_limits).values(
                code=code, nationcode=nationcode, message="limit", until=until, created_at=h.clock()
            )
        )


def test_account_caps_are_a_gauge_per_code_and_country_with_their_end(local: Harness) -> None:
    h = local
    before = scrape(h)
    assert "LimitExceeded.AppDailyLimit" in EVERY_NUMBER_CAPS
    for code in EVERY_NUMBER_CAPS:  # known before the first cap, at 0
        assert ("smsbot_tencent_account_limited", frozenset({("code", code), ("nationcode", "")})) in before
        assert value(before, "smsbot_tencent_account_limited", code=code, nationcode="") == 0
    assert not [key for key in before if key[0] == "smsbot_tencent_account_limited_until_timestamp_seconds"]

    day_cap = h.clock() + timedelta(hours=5)
    country_cap = h.clock() + timedelta(hours=2)
    _cap(h, "LimitExceeded.AppDailyLimit", "", day_cap)
    _cap(h, "LimitExceeded.AppCountryOrRegionDailyLimit", "852", country_cap)
    body = h.client.get("/metrics").text
    assert 'smsbot_tencent_account_limited{code="LimitExceeded.AppDailyLimit",nationcode=""} 1.0' in body
    assert (
        'smsbot_tencent_account_limited{code="LimitExceeded.AppCountryOrRegionDailyLimit",nationcode="852"} 1.0' in body
    )
    samples = parse(body)
    assert (
        value(samples, "smsbot_tencent_account_limited", code="LimitExceeded.AppGlobalDailyLimit", nationcode="") == 0
    )
    until = "smsbot_tencent_account_limited_until_timestamp_seconds"
    assert value(samples, until, code="LimitExceeded.AppDailyLimit", nationcode="") == day_cap.timestamp()
    assert (
        value(samples, until, code="LimitExceeded.AppCountryOrRegionDailyLimit", nationcode="852")
        == country_cap.timestamp()
    )

    h.clock.advance(timedelta(hours=3))  # the country's cap ended, the account's holds
    samples = scrape(h)
    assert value(samples, "smsbot_tencent_account_limited", code="LimitExceeded.AppDailyLimit", nationcode="") == 1
    key = (
        "smsbot_tencent_account_limited",
        frozenset({("code", "LimitExceeded.AppCountryOrRegionDailyLimit"), ("nationcode", "852")}),
    )
    assert samples[key] == 0  # still there, at 0: a series that vanished would look like a scrape gap
    h.clock.advance(timedelta(hours=3))
    samples = scrape(h)
    assert value(samples, "smsbot_tencent_account_limited", code="LimitExceeded.AppDailyLimit", nationcode="") == 0


def test_rules_version_and_reloads(make_app: Callable[..., Harness], db_url: str, rules_dir: Path) -> None:
    h = make_app(db_url, watch_rules=True)
    h.app.state.metrics.loopback_hosts.add("testclient")
    assert h.rules.ruleset is not None
    samples = scrape(h)
    assert value(samples, "smsbot_rules_info", version=h.rules.ruleset.version) == 1
    assert value(samples, "smsbot_rules_reloads_total", result="success") == 1
    assert value(samples, "smsbot_rules_last_reload_failed") == 0

    time.sleep(0.3)  # let the watcher start before the change
    write_rules(rules_dir, "broken.yaml", "signature: Broken\nstates: [oops\n")
    wait_until(
        lambda: value(scrape(h), "smsbot_rules_reloads_total", result="failure") >= 1,
        what="the failed reload to be counted",
    )
    samples = scrape(h)
    assert value(samples, "smsbot_rules_last_reload_failed") == 1
    assert value(samples, "smsbot_rules_info", version=h.rules.ruleset.version) == 1  # the old rules stay live


def test_a_database_outage_is_reported_not_a_failed_scrape(local: Harness) -> None:
    h = local
    h.say("MENU")

    class Down:
        def connect(self) -> None:
            raise ConnectionError("database down")

    h.app.state.metrics.database.engine = Down()
    samples = scrape(h)
    assert value(samples, "smsbot_database_up") == 0
    assert value(samples, "smsbot_callbacks_total", route="reply", result="ok") == 1  # the rest still answers


# ---------------------------------------------------------------- who may read them


def test_without_a_token_only_loopback_clients_may_read(harness: Harness) -> None:
    assert harness.client.get("/metrics").status_code == 403  # "testclient" is not a loopback address
    for host, status in [("127.0.0.1", 200), ("::1", 200), ("::ffff:127.0.0.1", 200), ("10.1.2.3", 403)]:
        client = TestClient(harness.app, client=(host, 50000))
        response = client.get("/metrics")
        assert response.status_code == status, host
    assert "SMSBOT_METRICS_TOKEN" in TestClient(harness.app, client=("10.1.2.3", 1)).get("/metrics").text


def test_with_a_token_it_is_required_from_everyone(make_app: Callable[..., Harness], db_url: str) -> None:
    h = make_app(db_url, settings=Settings(metrics_token=SecretStr("m3trics")))
    loopback = TestClient(h.app, client=("127.0.0.1", 50000))
    assert loopback.get("/metrics").status_code == 401
    assert loopback.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert loopback.get("/metrics", headers={"Authorization": "Basic m3trics"}).status_code == 401
    remote = TestClient(h.app, client=("203.0.113.9", 50000))
    ok = remote.get("/metrics", headers={"Authorization": "Bearer m3trics"})
    assert ok.status_code == 200
    assert "smsbot_callbacks" in ok.text


def test_each_app_has_its_own_numbers(make_app: Callable[..., Harness], db_url: str) -> None:
    first = make_app(db_url)
    second = make_app(db_url)
    for h in (first, second):
        h.app.state.metrics.loopback_hosts.add("testclient")
    first.say("MENU")
    assert value(scrape(first), "smsbot_callbacks_total", route="reply", result="ok") == 1
    assert value(scrape(second), "smsbot_callbacks_total", route="reply", result="ok") == 0


# ---------------------------------------------------------------- the real server, writer process


@pytest.fixture
def server(db_url: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """``smsbot serve`` in writer-process mode with JSON logs, on a real loopback socket."""
    with serve_process(db_url, tmp_path, env={"SMSBOT_LOG_FORMAT": "json"}) as running:
        yield running.base, running.log


@pytest.mark.slow
def test_writer_process_mode(server: tuple[str, Path]) -> None:
    base, log = server
    body = payload("MENU", at=int(time.time()) - 60, mobile="13812345678")
    assert httpx.post(f"{base}/sms/callback", json=body, timeout=10).status_code == 200
    assert httpx.post(f"{base}/sms/callback", json=body, timeout=10).status_code == 200

    def scraped() -> Samples:
        response = httpx.get(f"{base}/metrics", timeout=10)  # from 127.0.0.1: no token needed
        assert response.status_code == 200, response.text
        return parse(response.text)

    samples = wait_until(
        lambda: (s := scraped()) and value(s, "smsbot_replies", status="sent") == 1 and s, what="the reply"
    )
    assert value(samples, "smsbot_callbacks_total", route="reply", result="ok") == 1
    assert value(samples, "smsbot_callbacks_total", route="reply", result="duplicate") == 1
    assert value(samples, "smsbot_rules_reloads_total", result="success") == 1  # the writer process's load
    version = httpx.get(f"{base}/readyz", timeout=10).json()["rules"]["version"]
    assert value(samples, "smsbot_rules_info", version=version) == 1
    assert value(samples, "smsbot_outbox_depth") == 0

    lines = [line for line in log.read_text(encoding="utf-8").splitlines() if line.startswith("{")]
    entries = [json.loads(line) for line in lines]
    assert {"smsbot.writer", "uvicorn.error"} <= {e["logger"] for e in entries}  # both processes, uvicorn too
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    assert "13812345678" not in log.read_text(encoding="utf-8")
