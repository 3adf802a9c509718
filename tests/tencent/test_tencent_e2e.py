"""Replies out through Tencent (the local fake, via the real SDK) and delivery reports back; SQLite and Postgres."""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from bot.cli import app as cli
from bot.config import ConfigError, Settings
from bot.delivery.senders import make_sender
from bot.sms import ConsoleSender
from bot.store.models import messages
from bot.tencent.config import session_contexts
from bot.tencent.sender import TencentSender
from tests.fakes.tencent_sms import FakeTencentSms
from tests.support import REPO, Harness, tencent_settings

SECRET_ID = "AKIDsmsbote2e"
SECRET_KEY = "e2e-secret-key"
APP_ID = "1400006666"
TEMPLATES = {
    "1490001": "Reply 1 for order status, 2 for opening hours. Reply TD to opt out.",
    "1490002": "Order {1}: {2}.",
    "1490007": "You will get no more messages from us. Reply START to rejoin.",
}


@pytest.fixture
def fake() -> Iterator[FakeTencentSms]:
    with FakeTencentSms(
        secret_id=SECRET_ID, secret_key=SECRET_KEY, app_id=APP_ID, templates=TEMPLATES, signatures={"Acme Shop"}
    ) as server:
        yield server


def test_callback_in_reply_out_at_tencent_report_back_delivered(
    make_app: Callable[..., Harness], db_url: str, fake: FakeTencentSms
) -> None:
    settings = tencent_settings(fake)
    sender = make_sender(settings)
    assert isinstance(sender, TencentSender)
    h = make_app(db_url, settings=settings, sender=sender)
    h.say("hi")
    [reply] = h.wait_settled()
    [sent] = fake.sends
    assert (sent.phone_number, sent.template_id, sent.template_params) == ("+8613800000000", "1490001", ())
    contexts = session_contexts(settings)
    assert contexts is not None
    assert contexts.message_id(sent.session_context) == reply["id"]
    assert (reply["status"], reply["provider_serial"]) == ("sent", sent.serial_no)

    response = h.client.post("/sms/status", json=[fake.delivery_report(sent)])
    assert response.status_code == 200, response.text
    [after] = h.rows(messages, messages.c.id == reply["id"])
    assert after["status"] == "delivered"
    assert after["delivered_at"] is not None


def test_a_permanent_tencent_error_is_recorded_on_the_reply(
    make_app: Callable[..., Harness], db_url: str, fake: FakeTencentSms
) -> None:
    fake.fail_number("+8613800000000", "FailedOperation.ContainSensitiveWord")
    h = make_app(db_url, settings=tencent_settings(fake), sender=make_sender(tencent_settings(fake)))
    h.say("hi")
    [reply] = h.wait_settled()
    assert (reply["status"], reply["error_code"]) == ("failed", "FailedOperation.ContainSensitiveWord")
    assert fake.sends == []


def test_the_tencent_sender_survives_pickling_for_the_writer_process(fake: FakeTencentSms) -> None:
    sender = make_sender(tencent_settings(fake))
    copy = pickle.loads(pickle.dumps(sender))
    assert isinstance(copy, TencentSender)
    assert copy.config == sender.config  # type: ignore[attr-defined]


def test_console_is_the_default_sender() -> None:
    assert isinstance(make_sender(Settings()), ConsoleSender)


def test_tencent_sender_without_credentials_is_refused_naming_what_is_missing() -> None:
    with pytest.raises(ConfigError) as caught:
        make_sender(Settings(sender="tencent", tencent_sdk_app_id=APP_ID))
    message = str(caught.value)
    assert "TENCENTCLOUD_SECRET_ID" in message
    assert "TENCENTCLOUD_SECRET_KEY" in message
    assert "SMSBOT_TENCENT_SDK_APP_ID" not in message


def test_serve_refuses_sender_tencent_without_credentials(
    db_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    started: list[Any] = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: started.append(app))
    env = {"SMSBOT_RULES_DIR": str(REPO / "rules"), "SMSBOT_DATABASE_URL": db_url, "SMSBOT_SENDER": "tencent"}
    result = CliRunner().invoke(cli, ["serve"], env=env)
    assert result.exit_code == 2
    assert "TENCENTCLOUD_SECRET_ID" in result.stderr
    assert "SMSBOT_TENCENT_SDK_APP_ID" in result.stderr
    assert started == []


def test_tencent_secrets_are_refused_in_the_config_file(tmp_path: Path) -> None:
    from bot.config import load_settings

    config = tmp_path / "config.yaml"
    config.write_text("tencent_secret_key: oops\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="secret"):
        load_settings(config)
