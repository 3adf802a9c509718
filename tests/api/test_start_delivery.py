"""Started messages go out the way replies do: through Tencent (params, ExtendCode on the wire), quiet hours."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bot.config import Settings
from bot.delivery.senders import make_sender
from bot.numbers import CHINA
from bot.store.models import messages, outbox
from tests.api.helpers import api_rules, new_key, start, start_body
from tests.fakes.tencent_sms import FakeTencentSms
from tests.support import FakeClock, Harness, tencent_settings, wait_until

TEMPLATES = {
    "2000001": "Appointment {1} at {2}. Reply 1 to confirm.",
    "2000002": "Confirmed: {1}.",
    "2000006": "Menu.",
}


@pytest.fixture
def fake() -> Iterator[FakeTencentSms]:
    with FakeTencentSms(
        secret_id="AKIDtest", secret_key="secret", app_id="1400007777", templates=TEMPLATES, signatures={"Acme Shop"}
    ) as server:
        yield server


def test_a_start_reaches_tencent_with_its_params_and_the_files_extend_code(
    make_app: Callable[..., Harness], db_url: str, fake: FakeTencentSms, tmp_path: Path
) -> None:
    settings = tencent_settings(fake)
    rules = api_rules(tmp_path / "r", extend="01")
    h = make_app(db_url, settings=settings, sender=make_sender(settings), rules_path=rules)
    response = start(h, new_key(h.engine), start_body())
    assert response.status_code == 202, response.text
    assert response.json()["extend_code"] == "01"
    h.wait_settled()
    [sent] = fake.sends
    assert sent.template_id == "2000001"
    assert sent.template_params == ("A17", "10:00")
    assert sent.extend_code == "01"
    assert sent.content == "【Acme Shop】Appointment A17 at 10:00. Reply 1 to confirm."

    h.say("1", mobile="13800000001", extend="01")  # the customer answers on the campaign's extend code
    h.wait_settled()
    assert [s.template_params for s in fake.sends] == [("A17", "10:00"), ("A17",)]
    assert fake.sends[-1].extend_code == "01"


def test_a_reply_goes_back_on_the_extend_code_the_customer_wrote_to(
    make_app: Callable[..., Harness], db_url: str, fake: FakeTencentSms, tmp_path: Path
) -> None:
    settings = tencent_settings(fake)
    h = make_app(db_url, settings=settings, sender=make_sender(settings), rules_path=api_rules(tmp_path / "r"))
    h.say("HI", extend="02")
    h.wait_settled()
    [sent] = fake.sends
    assert sent.extend_code == "02"


@pytest.mark.parametrize("max_delay", [timedelta(hours=1), timedelta(hours=12)], ids=["1h", "12h"])
def test_a_marketing_start_is_held_outside_08_00_22_00_china_time(
    make_app: Callable[..., Harness], db_url: str, tmp_path: Path, max_delay: timedelta
) -> None:
    """Held until 08:00; with the default reply_max_delay (1h) that is past its deadline, so it expires unsent."""
    late = datetime(2026, 3, 2, 23, 0, tzinfo=CHINA).astimezone(UTC)
    h = make_app(
        db_url,
        app_clock=FakeClock(late),
        rules_path=api_rules(tmp_path / "r"),
        settings=Settings(reply_max_delay=max_delay),
    )
    response = start(h, new_key(h.engine), start_body(template="promo", params=None, state=None, vars=None))
    assert response.status_code == 202, response.text
    if max_delay == timedelta(hours=1):
        wait_until(lambda: h.count(outbox) == 0, what="the start to expire")
        [message] = h.rows(messages)
        assert message["status"] == "expired"
        assert "08:00-22:00" in message["status_reason"]
    else:
        wait_until(lambda: h.rows(outbox)[0]["next_attempt_at"] > late, what="the start to be held")
        assert h.rows(outbox)[0]["next_attempt_at"].astimezone(CHINA).hour == 8
        assert h.rows(messages)[0]["marketing"] is True
    assert h.sender.sent == []
