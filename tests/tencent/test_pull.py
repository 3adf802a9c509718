"""Pulling replies and delivery statuses from Tencent (the local fake, through the real SDK); SQLite and Postgres.

For servers Tencent cannot call back: ``smsbot pull``, ``smsbot serve --pull``
and ``SMSBOT_PULL=true`` feed pulled items to the same pipeline as the
callback routes, so a pulled reply is stored, answered and deduplicated
exactly like a called-back one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine
from typer.testing import CliRunner

from bot.cli import app as cli
from bot.delivery.senders import make_sender
from bot.runtime.live_rules import LiveRules
from bot.runtime.pulling import Puller
from bot.sms import Inbound, OutboundSms
from bot.store.db import make_engine
from bot.store.models import messages, outbox
from bot.tencent.callbacks import parse_reply_callback
from bot.tencent.config import session_contexts, tencent_config
from bot.tencent.pull import (
    PulledItemRefused,
    TencentPullClient,
    china_time,
    reply_to_inbound,
    send_status_to_report,
)
from bot.web.app import create_app
from tests.fakes.tencent_sms import FakeTencentSms
from tests.support import (
    REPO,
    Harness,
    copy_rules,
    count,
    fail_inserts_into_outbox,
    payload,
    rows,
    stop_app,
    store_again,
    tencent_settings,
    wait_until,
)

SECRET_ID = "AKIDsmsbotpull"
SECRET_KEY = "pull-secret-key"
APP_ID = "1400006666"
SIGN = "Acme Shop"
CUSTOMER = "+8613800000000"
TEMPLATES = {
    "1490001": "Reply 1 for order status, 2 for opening hours. Reply TD to opt out.",
    "1490002": "Order {1}: {2}.",
    "1490007": "You will get no more messages from us. Reply START to rejoin.",
}
FAST = 0.05
"""Seconds between pulls in these tests: quick enough that waiting for one costs nothing."""

runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_config_file_here(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The commands read ./config.yaml; these tests configure them through the environment only."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def fake() -> Iterator[FakeTencentSms]:
    with FakeTencentSms(
        secret_id=SECRET_ID, secret_key=SECRET_KEY, app_id=APP_ID, templates=TEMPLATES, signatures={SIGN}
    ) as server:
        yield server


@pytest.fixture
def quiet_fake() -> Iterator[FakeTencentSms]:
    """A fake that queues no delivery status by itself: each test queues the ones it wants."""
    with FakeTencentSms(
        secret_id=SECRET_ID,
        secret_key=SECRET_KEY,
        app_id=APP_ID,
        templates=TEMPLATES,
        signatures={SIGN},
        report_sends=False,
    ) as server:
        yield server


@pytest.fixture(autouse=True)
def unstored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where pulled items that could not be stored are kept (never the repository's folder)."""
    path = tmp_path / "unstored.jsonl"
    monkeypatch.setenv("SMSBOT_PULL_UNSTORED_FILE", str(path))
    return path


def pulling_app(make_app: Callable[..., Harness], db_url: str, fake: FakeTencentSms, **extra: Any) -> Harness:
    """The server with ``pull: true`` (thread writer), replies sent to the fake through the real SDK."""
    settings = tencent_settings(fake, pull=True, pull_interval=FAST, **extra)
    return make_app(db_url, settings=settings, sender=make_sender(settings))


def puller(h: Harness) -> Puller:
    found: Puller | None = h.app.state.runtime.puller
    assert found is not None
    return found


def pull_env(fake: FakeTencentSms, db_url: str) -> dict[str, str]:
    return {
        "SMSBOT_RULES_DIR": str(REPO / "rules"),
        "SMSBOT_DATABASE_URL": db_url,
        "SMSBOT_TENCENT_ENDPOINT": fake.endpoint,
        "SMSBOT_TENCENT_SCHEME": "http",
        "SMSBOT_TENCENT_SDK_APP_ID": APP_ID,
        "TENCENTCLOUD_SECRET_ID": SECRET_ID,
        "TENCENTCLOUD_SECRET_KEY": SECRET_KEY,
    }


# ---------------------------------------------------------------- conversions


DOC_REPLY = {
    "CountryCode": "86",
    "ReplyContent": "1",
    "SubscriberNumber": "15291990000",
    "ExtendCode": "11",
    "ReplyTime": 1620734188,
    "PhoneNumber": "+8615291990000",
    "SignName": SIGN,
}
"""The example item of Tencent's PullSmsReplyStatus documentation."""

NOW = datetime(2026, 1, 5, 2, 0, tzinfo=UTC)


def test_a_pulled_reply_is_the_message_its_callback_would_be() -> None:
    callback = payload("1", at=1620734188, mobile="15291990000", sign=SIGN, extend="11")
    [called_back] = parse_reply_callback(json.dumps(callback).encode(), now=NOW)
    pulled = reply_to_inbound(DOC_REPLY, now=NOW)
    assert pulled == called_back == Inbound("86", "15291990000", SIGN, "1", 1620734188, "11")
    assert pulled.dedupe_key == called_back.dedupe_key


def test_an_approved_sign_name_maps_back_to_the_rules_signature() -> None:
    pulled = reply_to_inbound(DOC_REPLY | {"SignName": "Acme Shop Ltd"}, now=NOW, sign_aliases={"Acme Shop Ltd": SIGN})
    assert pulled.sign == SIGN


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"SignName": ""}, "SignName"),
        ({"SubscriberNumber": None}, "SubscriberNumber"),
        ({"ReplyTime": 12}, "ReplyTime"),
        ({"ReplyContent": 7}, "ReplyContent"),
    ],
)
def test_a_pulled_reply_the_callback_would_refuse_is_refused_naming_tencents_field(
    change: dict[str, Any], field: str
) -> None:
    with pytest.raises(PulledItemRefused, match=f"'{field}'"):
        reply_to_inbound(DOC_REPLY | change, now=NOW)


def test_a_pulled_send_status_is_the_report_its_callback_would_be() -> None:
    item = {
        "UserReceiveTime": 1767578407,
        "CountryCode": "86",
        "SubscriberNumber": "13800000000",
        "PhoneNumber": "+8613800000000",
        "SerialNo": "5000:1045710669157053657849499619",
        "ReportStatus": "SUCCESS",
        "Description": "用户短信接收成功",
        "SessionContext": "42",
    }
    report = send_status_to_report(item)
    assert (report.sid, report.report_status, report.ext) == ("5000:1045710669157053657849499619", "SUCCESS", "42")
    assert report.user_receive_time == "2026-01-05 10:00:07"  # what the callback says for the same instant
    assert china_time(0) is None
    with pytest.raises(PulledItemRefused, match="'ReportStatus'"):
        send_status_to_report(item | {"ReportStatus": "MAYBE"})


# ---------------------------------------------------------------- PullSmsSendStatusByPhoneNumber


def lookup_client(fake: FakeTencentSms) -> TencentPullClient:
    return TencentPullClient(tencent_config(tencent_settings(fake), purpose="pull"))


def test_send_statuses_by_number_asks_for_the_window_and_returns_tencents_items(fake: FakeTencentSms) -> None:
    sender = make_sender(tencent_settings(fake))
    outbound = OutboundSms(7, 42, "86", "13800000000", SIGN, "1490002", ("A1", "sent"), "Order A1: sent.")
    sent = sender.send(outbound)
    other = sender.send(dataclasses.replace(outbound, mobile="13900000000"))
    assert (sent.ok, other.ok) == (True, True)
    now = int(fake.now())

    items = lookup_client(fake).send_statuses_for(CUSTOMER, begin=now - 60, end=now + 1)

    [item] = items  # that number's only; the other number's send is not listed
    assert (item["SerialNo"], item["PhoneNumber"], item["ReportStatus"]) == (sent.serial, CUSTOMER, "SUCCESS")
    assert set(item) >= {"SessionContext", "UserReceiveTime", "Description", "CountryCode", "SubscriberNumber"}
    [call] = [c for c in fake.calls if c.action == "PullSmsSendStatusByPhoneNumber"]
    assert call.params == {
        "PhoneNumber": CUSTOMER,
        "BeginTime": now - 60,
        "EndTime": now + 1,
        "Offset": 0,  # documented as fixed at 0
        "Limit": 100,
        "SmsSdkAppId": APP_ID,
    }
    assert lookup_client(fake).send_statuses_for(CUSTOMER, begin=now - 60, end=now + 1) == items  # nothing consumed


def test_send_statuses_by_number_raises_tencents_error_and_an_unreadable_answer(fake: FakeTencentSms) -> None:
    from tencentcloud.common.exception.tencent_cloud_sdk_exception import (  # type: ignore[import-untyped]
        TencentCloudSDKException,
    )

    client = lookup_client(fake)
    now = int(fake.now())
    with pytest.raises(TencentCloudSDKException) as refused:
        client.send_statuses_for(CUSTOMER, begin=now - 8 * 86400, end=now)  # more than 7 days back
    assert refused.value.code == "InvalidParameterValue.BeginTimeVerifyFail"

    class EmptyAnswer:
        def PullSmsSendStatusByPhoneNumber(self, request: Any) -> Any:  # noqa: N802 - the SDK's name
            return object()  # what the SDK hands back when it could not read Tencent's answer

    client.client = EmptyAnswer()
    with pytest.raises(TencentCloudSDKException) as unreadable:
        client.send_statuses_for(CUSTOMER, begin=now - 60, end=now)
    assert unreadable.value.code == "InternalError.UnreadableAnswer"
    assert "PullSmsSendStatusSet" in str(unreadable.value.message)


# ---------------------------------------------------------------- serve with pull: true


def test_a_pulled_reply_is_stored_and_answered_like_a_callback(
    make_app: Callable[..., Harness], db_url: str, fake: FakeTencentSms
) -> None:
    h = pulling_app(make_app, db_url, fake)
    h.say("hi", mobile="13900000000")  # the same question by callback, from another number
    fake.enqueue_reply(CUSTOMER, "hi", sign_name=SIGN)
    wait_until(lambda: len(fake.sends) == 2, what="both answers sent through Tencent")
    assert [(m["text"], m["signature"]) for m in h.inbound()] == [("hi", SIGN), ("hi", SIGN)]
    [answer_callback, answer_pull] = h.wait_settled()
    assert answer_pull["text"] == answer_callback["text"]
    assert answer_pull["status"] in ("sent", "delivered")
    sent_to = {s.phone_number: s for s in fake.sends}
    contexts = session_contexts(tencent_settings(fake))
    assert contexts is not None
    assert contexts.message_id(sent_to[CUSTOMER].session_context) == answer_pull["id"]
    assert sent_to[CUSTOMER].template_id == sent_to["+8613900000000"].template_id == "1490001"
    assert puller(h).counts.replies_stored == 1


def test_the_same_reply_by_callback_and_by_pull_is_one_message(
    make_app: Callable[..., Harness], db_url: str, fake: FakeTencentSms
) -> None:
    h = pulling_app(make_app, db_url, fake)
    first, second = h.next_time(), h.next_time()
    h.say("hi", at=first)
    fake.enqueue_reply(CUSTOMER, "hi", sign_name=SIGN, reply_time=first)  # the callback came first
    fake.enqueue_reply(CUSTOMER, "1", sign_name=SIGN, reply_time=second)  # the pull comes first
    wait_until(lambda: len(h.inbound()) == 2, what="the pulled reply")
    h.say("1", at=second)  # Tencent's callback for it arrives late: accepted, not stored twice
    wait_until(lambda: puller(h).counts.duplicates == 1, what="the pulled copy of the called-back reply")
    assert [m["text"] for m in h.inbound()] == ["hi", "1"]
    assert len(h.wait_settled()) == 2  # one answer each, not two
    assert len(fake.sends) == 2


def test_pulled_send_statuses_mark_replies_delivered_or_failed(
    make_app: Callable[..., Harness], db_url: str, quiet_fake: FakeTencentSms
) -> None:
    fake = quiet_fake
    h = pulling_app(make_app, db_url, fake)
    h.say("hi")
    h.say("hi", mobile="13900000000")
    h.wait_settled()
    delivered, failed = sorted(fake.sends, key=lambda s: s.phone_number)
    received = int(h.clock().timestamp()) - 5
    fake.enqueue_send_status(delivered, receive_time=received)
    fake.enqueue_send_status(failed, status="FAIL", description="空号")
    fake.enqueue_send_status(dataclasses.replace(delivered, serial_no="5000:never-sent", session_context=""))
    wait_until(lambda: puller(h).counts.unknown_reports == 1, what="the three statuses pulled")
    by_serial = {m["provider_serial"]: m for m in h.outbound()}
    ok, bad = by_serial[delivered.serial_no], by_serial[failed.serial_no]
    assert (ok["status"], ok["delivered_at"]) == ("delivered", datetime.fromtimestamp(received, UTC))
    assert (bad["status"], bad["error_message"]) == ("failed", "空号")
    assert puller(h).counts.reports_applied == 2


def test_tencent_errors_are_logged_and_retried_without_losing_anything(
    make_app: Callable[..., Harness], db_url: str, fake: FakeTencentSms, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="smsbot.pull")
    fake.fail_requests("AuthFailure.SignatureFailure", times=3, action="PullSmsReplyStatus")
    fake.http_error(502, times=3, action="PullSmsSendStatus")
    h = pulling_app(make_app, db_url, fake)
    failing = wait_until(lambda: h.client.get("/readyz").json()["pull"]["last_error"], what="/readyz to show it")
    assert "AuthFailure.SignatureFailure" in failing or "502" in failing
    assert h.client.get("/readyz").status_code == 200  # callbacks still work: pulling retries by itself
    fake.enqueue_reply(CUSTOMER, "hi", sign_name=SIGN)
    wait_until(lambda: puller(h).counts.replies_stored == 1, what="the reply, once Tencent answers again")
    [answer] = h.wait_settled()
    assert answer["status"] in ("sent", "delivered")
    errors = caplog.text
    assert "PullSmsReplyStatus failed: AuthFailure.SignatureFailure" in errors
    assert "PullSmsSendStatus failed" in errors
    assert h.client.get("/healthz").status_code == 200
    # A round may be between pulling a page and storing it (held > 0 for a moment): what matters is that
    # the puller recovers with nothing left held, not which instant /readyz is read at.
    pull = wait_until(
        lambda: (p := h.client.get("/readyz").json()["pull"])["last_error"] is None and p["held"] == 0 and p,
        what="recovery with nothing held",
    )
    assert (pull["last_error"], pull["held"]) == (None, 0)


def test_a_pulled_reply_the_callback_would_refuse_is_logged_in_full_and_the_rest_stored(
    make_app: Callable[..., Harness], db_url: str, fake: FakeTencentSms, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="smsbot.pull")
    h = pulling_app(make_app, db_url, fake)
    fake.enqueue_reply(CUSTOMER, "TD", sign_name="")  # no signature: the callback route would answer 400
    fake.enqueue_reply("+8613900000000", "hi", sign_name=SIGN)
    wait_until(lambda: puller(h).counts.replies_stored == 1, what="the good reply of the page")
    assert puller(h).counts.refused == 1
    assert [m["text"] for m in h.inbound()] == ["hi"]
    assert "pulled reply refused (field 'SignName'" in caplog.text
    assert '"SubscriberNumber": "13800000000"' in caplog.text  # Tencent will not hand it out again


def test_pulled_replies_the_database_refuses_are_kept_and_stored_later(
    make_app: Callable[..., Harness], db_url: str, fake: FakeTencentSms
) -> None:
    admin = create_engine(db_url)
    try:
        fail_inserts_into_outbox(admin)
        h = pulling_app(make_app, db_url, fake)
        fake.enqueue_reply(CUSTOMER, "hi", sign_name=SIGN)
        p = puller(h)
        wait_until(lambda: p.held == 1, what="the pulled reply held after the database refused it")
        pulls_before = sum(1 for c in fake.calls if c.action == "PullSmsReplyStatus")
        fake.enqueue_reply("+8613900000000", "hi", sign_name=SIGN)
        rounds = p.rounds
        wait_until(lambda: p.rounds >= rounds + 3, what="more rounds while the database refuses")
        assert p.held == 1  # still held, and nothing more pulled on top of it
        assert sum(1 for c in fake.calls if c.action == "PullSmsReplyStatus") == pulls_before
        assert h.inbound() == []
        assert p.last_error is not None
        assert p.last_error.startswith("storing")

        store_again(admin)
        wait_until(lambda: len(h.inbound()) == 2, what="both replies stored once the database accepts")
        assert len(h.wait_settled()) == 2
        assert (p.held, p.counts.replies_stored, p.counts.duplicates) == (0, 2, 0)
    finally:
        admin.dispose()


def test_stopping_with_replies_held_keeps_them_in_full_in_the_unstored_file(
    make_app: Callable[..., Harness],
    db_url: str,
    fake: FakeTencentSms,
    caplog: pytest.LogCaptureFixture,
    unstored: Path,
) -> None:
    caplog.set_level(logging.ERROR, logger="smsbot.pull")
    admin = create_engine(db_url)
    try:
        fail_inserts_into_outbox(admin)
        h = pulling_app(make_app, db_url, fake)
        fake.enqueue_reply(CUSTOMER, "TD please", sign_name=SIGN)
        wait_until(lambda: puller(h).held == 1, what="the pulled reply held")
        stop_app(h.client, h.app)
        assert f"NOT stored: kept in {unstored}" in caplog.text
        [line] = unstored.read_text(encoding="utf-8").splitlines()
        kept = json.loads(line)
        assert kept["item"]["mobile"] == "13800000000"
        assert kept["item"]["text"] == "TD please"
        assert "could not be stored" in kept["why"]
        assert unstored.stat().st_mode & 0o077 == 0  # the customer's number: owner only
    finally:
        admin.dispose()


def test_a_writer_process_server_pulls_too(db_url: str, quiet_fake: FakeTencentSms, tmp_path: Path) -> None:
    fake = quiet_fake
    settings = tencent_settings(fake, pull=True, pull_interval=FAST)
    engine = make_engine(db_url)
    rules = LiveRules(copy_rules(tmp_path / "rules"))
    rules.load()
    app = create_app(
        settings, engine=engine, rules=rules, sender=make_sender(settings), writer_mode="process", watch_rules=False
    )
    try:
        with TestClient(app):
            fake.enqueue_reply(CUSTOMER, "hi", sign_name=SIGN)
            wait_until(lambda: len(fake.sends) == 1, timeout=30, what="the pulled reply answered by the writer process")
            wait_until(lambda: count(engine, messages, messages.c.status == "sent") == 1, what="the answer settled")
            fake.enqueue_send_status(fake.sends[0])
            wait_until(
                lambda: count(engine, messages, messages.c.status == "delivered") == 1,
                what="the pulled delivery status applied by the writer process",
            )
        [inbound] = rows(engine, messages, messages.c.direction == "in")
        assert inbound["text"] == "hi"
    finally:
        engine.dispose()


# ---------------------------------------------------------------- smsbot pull, smsbot serve --pull


def test_smsbot_pull_once_stores_queues_and_prints_counts(
    make_app: Callable[..., Harness], db_url: str, fake: FakeTencentSms
) -> None:
    h = make_app(db_url, settings=tencent_settings(fake), sender=make_sender(tencent_settings(fake)))  # no pull
    h.say("hi")
    [answer] = h.wait_settled()  # sent: Tencent now holds its delivery status
    [sent] = fake.sends
    fake.enqueue_send_status(dataclasses.replace(sent, serial_no="5000:never-sent", session_context=""))
    stop_app(h.client, h.app)
    at = h.next_time()
    fake.enqueue_reply("+8613900000000", "hi", sign_name=SIGN, reply_time=at)
    fake.enqueue_reply("+8613900000000", "hi", sign_name=SIGN, reply_time=at)  # Tencent handed it out twice

    result = runner.invoke(cli, ["pull", "--once"], env=pull_env(fake, db_url))
    assert result.exit_code == 0, result.output
    assert "1 reply stored, 1 duplicate(s), 1 report(s) applied, 1 unknown report(s)" in result.stdout
    [after] = h.rows(messages, messages.c.id == answer["id"])
    assert after["status"] == "delivered"
    assert [m["text"] for m in h.inbound()] == ["hi", "hi"]
    queued = h.rows(outbox)
    assert len(queued) == 1  # answered, and left for `smsbot serve` to send
    assert len(fake.sends) == 1

    again = runner.invoke(cli, ["pull", "--once"], env=pull_env(fake, db_url))
    assert again.exit_code == 0, again.output
    assert "0 replies stored, 0 duplicate(s), 0 report(s) applied, 0 unknown report(s)" in again.stdout


def test_smsbot_pull_once_exits_1_when_tencent_refuses(db_url: str, fake: FakeTencentSms) -> None:
    fake.fail_requests("AuthFailure.SecretIdNotFound", times=None, action=None)
    result = runner.invoke(cli, ["pull", "--once", "--interval", "0.1"], env=pull_env(fake, db_url))
    assert result.exit_code == 1
    assert "AuthFailure.SecretIdNotFound" in result.stderr
    assert "0 replies stored" in result.stdout


@pytest.mark.parametrize("command", [["pull", "--once"], ["serve", "--pull"]])
def test_pulling_without_credentials_is_refused_naming_what_is_missing(
    db_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, command: list[str]
) -> None:
    started: list[Any] = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: started.append(app))
    env = {"SMSBOT_RULES_DIR": str(REPO / "rules"), "SMSBOT_DATABASE_URL": db_url, "TENCENTCLOUD_SECRET_ID": "AKID"}
    result = runner.invoke(cli, command, env=env)
    assert result.exit_code == 2
    assert "TENCENTCLOUD_SECRET_KEY" in result.stderr
    assert "SMSBOT_TENCENT_SDK_APP_ID" in result.stderr
    assert "TENCENTCLOUD_SECRET_ID" not in result.stderr
    assert started == []


def test_smsbot_pull_refuses_an_out_of_date_schema(empty_db_url: str, fake: FakeTencentSms) -> None:
    result = runner.invoke(cli, ["pull", "--once"], env=pull_env(fake, empty_db_url))
    assert result.exit_code == 2
    assert "smsbot db upgrade" in result.stderr


@pytest.mark.parametrize(("command", "extra_env"), [(["serve", "--pull"], {}), (["serve"], {"SMSBOT_PULL": "true"})])
def test_serve_pull_and_smsbot_pull_setting_start_the_puller(
    db_url: str,
    fake: FakeTencentSms,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    command: list[str],
    extra_env: dict[str, str],
) -> None:
    started: list[Any] = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: started.append(app))
    env = pull_env(fake, db_url) | {"SMSBOT_WRITER": "thread", "SMSBOT_PULL_INTERVAL": str(FAST)} | extra_env
    result = runner.invoke(cli, command, env=env)
    assert result.exit_code == 0, result.output
    assert f"pulling from Tencent every {FAST}s" in result.stdout
    [app] = started
    engine = app.state.runtime.engine
    try:
        with TestClient(app):
            fake.enqueue_reply(CUSTOMER, "hi", sign_name=SIGN)
            wait_until(lambda: count(engine, messages, messages.c.direction == "in") == 1, what="the pulled reply")
    finally:
        engine.dispose()


def test_serve_without_pull_does_not_pull(db_url: str, fake: FakeTencentSms, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pulling is off by default: a server Tencent can call needs no pulls (each item is handed out once)."""
    started: list[Any] = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: started.append(app))
    result = runner.invoke(cli, ["serve"], env=pull_env(fake, db_url) | {"SMSBOT_WRITER": "thread"})
    assert result.exit_code == 0, result.output
    [app] = started
    assert app.state.runtime.puller is None
    app.state.runtime.engine.dispose()
