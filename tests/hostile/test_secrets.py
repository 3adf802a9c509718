"""Secrets never leave: not in logs (error paths included), error pages, ``/readyz``, ``repr`` of settings, CLI output.

Every secret gets a distinctive value, the app runs the paths that handle it
(a Tencent authentication failure, an unreachable database whose URL holds a
password, refused callbacks, console errors, ``/metrics`` refusals), and every
log record of every logger and every answer is searched for those values.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from bot.cli import app as cli
from bot.config import Settings
from bot.store.models import audit_events, events, messages
from tests.api.helpers import api_rules, auth, new_key, start_body
from tests.console.test_console_ops import People
from tests.fakes.receiver import Receiver
from tests.fakes.tencent_sms import FakeTencentSms
from tests.support import PG_URL, Harness, payload, wait_until
from tests.tencent.test_tencent_sender import APP_ID, SECRET_ID, SECRET_KEY, sender_for

SECRETS = {
    "callback_token": "cbtok-7Yq2",
    "tencent_secret_id": "AKIDsecretid-9Zp1",
    "tencent_secret_key": "tcsecretkey-4Kx8",
    "session_context_secret": "ctxsecret-2Lm6",
    "console_secret": "consolesecret-8Rt3",
    "metrics_token": "metricstok-5Vb0",
}
DB_PASSWORD = "dbpass-3Hn7"


def all_secrets(*extra: str) -> list[str]:
    return [*SECRETS.values(), DB_PASSWORD, *extra]


def settings(**extra: Any) -> Settings:
    return Settings(**{k: SecretStr(v) for k, v in SECRETS.items()}, **extra)


def leaks(text: str, secrets: list[str]) -> list[str]:
    return [s for s in secrets if s in text]


@pytest.fixture
def every_log(caplog: pytest.LogCaptureFixture) -> Callable[[], str]:
    caplog.set_level(logging.DEBUG)

    def text() -> str:
        lines = []
        for record in caplog.records:
            if record.name.startswith(("httpx", "httpcore")):
                continue  # the test's own HTTP client, logging the URLs it calls (?token= included)
            lines.append(record.getMessage())
            if record.exc_info:
                lines.append(logging.Formatter().formatException(record.exc_info))
            lines.extend(str(v) for k, v in record.__dict__.items() if k not in logging.LogRecord.__dict__)
        return "\n".join(lines)

    return text


def test_repr_and_str_of_settings_show_no_secret() -> None:
    s = settings(database_url=f"postgresql+psycopg://smsbot:{DB_PASSWORD}@db.internal/smsbot")
    for shown in (repr(s), str(s), f"{s}", repr([s])):
        assert leaks(shown, all_secrets()) == [], shown
    assert "db.internal" in repr(s)  # the rest of the URL is still there to debug with


def test_a_tencent_authentication_failure_logs_no_secret(
    make_app: Callable[..., Harness], db_url: str, every_log: Callable[[], str]
) -> None:
    wrong_key = "wrongkey-6Jd4"
    with FakeTencentSms(
        secret_id=SECRET_ID, secret_key=SECRET_KEY, app_id=APP_ID, templates={}, signatures={"Acme Shop"}
    ) as fake:
        sender = sender_for(fake, secret_key=wrong_key)
        h = make_app(db_url, settings=settings(), sender=sender)
        assert h.post(payload("hi", at=h.next_time()), token=SECRETS["callback_token"]).status_code == 200
        out = wait_until(lambda: [m for m in h.outbound() if m["status"] != "queued"], timeout=10, what="a failure")
    assert out[0]["error_code"]  # Tencent's refusal was recorded
    secrets = all_secrets(wrong_key, SECRET_KEY)
    assert leaks(every_log(), secrets) == []
    stored = " ".join(str(m[c]) for m in h.rows(messages) for c in ("error_code", "error_message", "status_reason"))
    assert leaks(stored, secrets) == []  # what the console's deliveries page shows


def test_error_answers_and_pages_show_no_secret(
    harness: Harness, make_app: Callable[..., Harness], db_url: str
) -> None:
    h = make_app(db_url, settings=settings())
    answers = [
        h.post(payload("hi", at=h.next_time()), token="wrong"),
        h.post(b"{", token=SECRETS["callback_token"]),
        h.client.get("/readyz"),
        h.client.get("/metrics"),
        h.client.get("/metrics", headers={"Authorization": "Bearer wrong"}),
        h.client.get("/console/conversations/999"),
        h.client.get("/console/login"),
        h.client.post("/console/login", data={"name": "x", "password": "y"}),
        h.client.get("/api/v1/conversations/Acme/86/13800000000", headers={"Authorization": "Bearer wrong"}),
        h.client.get("/no-such-page"),
    ]
    for response in answers:
        assert leaks(response.text + str(response.headers), all_secrets()) == [], response.url


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_database_with_a_password_in_its_url_leaks_it_nowhere(
    make_app: Callable[..., Harness], every_log: Callable[[], str]
) -> None:
    url = f"postgresql+psycopg://postgres:{DB_PASSWORD}@127.0.0.1:{closed_port()}/test?connect_timeout=2"
    h = make_app(url, settings=settings(database_url=url), deliver=False)
    callback = h.post(payload("hi", at=h.next_time()), token=SECRETS["callback_token"])
    ready = h.client.get("/readyz")
    assert callback.status_code == 503
    assert ready.status_code == 503
    assert ready.json()["database"].startswith("unavailable")
    assert leaks(callback.text + ready.text + every_log(), all_secrets()) == []


@pytest.mark.skipif(PG_URL is None, reason="needs the test PostgreSQL (trust auth takes any password)")
def test_the_cli_prints_no_database_password(monkeypatch: pytest.MonkeyPatch) -> None:
    assert PG_URL is not None
    url = make_url(PG_URL).set(password=DB_PASSWORD).render_as_string(hide_password=False)
    result = CliRunner().invoke(cli, ["db", "upgrade"], env={"SMSBOT_DATABASE_URL": url})
    assert result.exit_code == 0, result.output
    assert "***" in result.output  # it names the database, password hidden
    assert leaks(result.output + result.stderr, all_secrets()) == []


def test_api_keys_are_not_logged_or_stored(
    make_app: Callable[..., Harness], db_url: str, every_log: Callable[[], str], tmp_path: Any
) -> None:
    from tests.api.helpers import api_rules, auth, new_key, revoke, start_body

    h = make_app(db_url, rules_path=api_rules(tmp_path / "r"), settings=settings())
    key = new_key(h.engine)
    assert h.client.post("/api/v1/conversations", json=start_body(), headers=auth(key)).status_code == 202
    assert h.client.post("/api/v1/conversations", json={"x": 1}, headers=auth(key)).status_code == 422
    revoke(h.engine, "crm")
    assert h.client.post("/api/v1/conversations", json=start_body(), headers=auth(key)).status_code == 401
    assert leaks(every_log(), [key]) == []
    with h.engine.connect() as conn:  # only a hash is kept, and the audit trail names the key, not its value
        dump = " ".join(
            str(tuple(r)) for t in ("api_keys", "audit_events") for r in conn.exec_driver_sql(f"SELECT * FROM {t}")
        )
    assert leaks(dump, [key]) == []


def test_event_secrets_are_not_logged_stored_or_shown(
    make_app: Callable[..., Harness],
    db_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    every_log: Callable[[], str],
) -> None:
    secret = "evsecret-6Qw4"
    monkeypatch.setenv("SMSBOT_EVENT_SECRET_CRM", secret)
    refusing = Receiver(status=500)  # the dispatcher's error path: it records and logs what went wrong
    try:
        h = make_app(
            db_url,
            rules_path=api_rules(tmp_path / "start-rules"),
            settings=Settings(events={"crm": {"url": refusing.url + "/hooks"}}),
        )
        response = h.client.post("/api/v1/conversations", json=start_body(), headers=auth(new_key(h.engine)))
        assert response.status_code == 202, response.text
        wait_until(lambda: any(r["last_status"] == 500 for r in h.rows(events)), timeout=15, what="a refused event")
        assert refusing.received[0].headers["X-Smsbot-Signature"].startswith("sha256=")  # it was signed with it
        stored = "\n".join(str(row) for table in (events, audit_events) for row in h.rows(table))
        people = People(h)
        shown = people.admin.get("/console/events").text + h.client.get("/readyz").text + repr(h.settings)
        assert leaks(every_log() + stored + shown, [secret]) == []
    finally:
        refusing.close()
