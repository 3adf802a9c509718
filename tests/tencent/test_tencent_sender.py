"""TencentSender against the local fake, through the real SDK; and the error table it feeds."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bot.sms import OutboundSms
from bot.tencent.config import TencentConfig, e164
from bot.tencent.errors import NOT_SENT, UNREADABLE, Outcome, classify
from bot.tencent.sender import TencentSender
from bot.tencent.session_context import SessionContexts
from tests.fakes.tencent_sms import FakeTencentSms

SECRET_ID = "AKIDsmsbottest"
SECRET_KEY = "smsbot-test-secret-key"
APP_ID = "1400006666"
CONTEXT_KEY = b"smsbot-test-context-key"


@pytest.fixture
def fake() -> Iterator[FakeTencentSms]:
    with FakeTencentSms(
        secret_id=SECRET_ID,
        secret_key=SECRET_KEY,
        app_id=APP_ID,
        templates={"1490002": "Order {1}: {2}.", "1490001": "Reply 1 for order status."},
        signatures={"Acme Shop", "Acme"},
    ) as server:
        yield server


def sender_for(fake: FakeTencentSms, **overrides: object) -> TencentSender:
    config = TencentConfig(
        secret_id=str(overrides.get("secret_id", SECRET_ID)),
        secret_key=str(overrides.get("secret_key", SECRET_KEY)),
        sdk_app_id=APP_ID,
        endpoint=fake.endpoint,
        scheme="http",
        timeout_seconds=int(str(overrides.get("timeout", 5))),
        sign_names=dict(overrides.get("sign_names", {})),  # type: ignore[call-overload]
        session_context_key=CONTEXT_KEY,
    )
    return TencentSender(config)


def sms(
    *, mobile: str = "13800000000", template: str = "1490002", params: tuple[str, ...] = ("A1", "sent")
) -> OutboundSms:
    return OutboundSms(
        outbox_id=7,
        message_id=42,
        nationcode="86",
        mobile=mobile,
        sign="Acme Shop",
        template_id=template,
        params=params,
        text="",
    )


def test_a_reply_reaches_tencent_with_e164_number_template_params_and_our_message_id(fake: FakeTencentSms) -> None:
    result = sender_for(fake).send(sms())
    assert result.ok, result
    [sent] = fake.sends
    assert sent.phone_number == "+8613800000000"
    assert (sent.template_id, sent.template_params, sent.sign_name) == ("1490002", ("A1", "sent"), "Acme Shop")
    assert sent.session_context.startswith("smsbot:42:")
    assert SessionContexts(CONTEXT_KEY).message_id(sent.session_context) == 42  # ours, and only ours
    assert sent.content == "【Acme Shop】Order A1: sent."
    assert result.serial == sent.serial_no
    assert classify(result.code).outcome is Outcome.SENT


def test_sign_name_override_per_signature(fake: FakeTencentSms) -> None:
    assert sender_for(fake, sign_names={"Acme Shop": "Acme"}).send(sms()).ok
    assert fake.sends[0].sign_name == "Acme"


@pytest.mark.parametrize(
    ("script", "code", "outcome"),
    [
        (lambda f: f.fail_number("+8613800000000", "LimitExceeded.PhoneNumberDailyLimit"),
         "LimitExceeded.PhoneNumberDailyLimit", Outcome.FREQUENCY),
        (lambda f: f.fail_number("+8613800000000", "FailedOperation.PhoneNumberInBlacklist"),
         "FailedOperation.PhoneNumberInBlacklist", Outcome.PERMANENT),
        (lambda f: f.fail_requests("InternalError.Timeout"), "InternalError.Timeout", Outcome.TRANSIENT),
        (lambda f: f.fail_requests("FailedOperation.InsufficientBalanceInSmsPackage"),
         "FailedOperation.InsufficientBalanceInSmsPackage", Outcome.PERMANENT),
        (lambda f: f.http_error(502), "ServerNetworkError", Outcome.TRANSIENT),
    ],
)  # fmt: skip
def test_failures_come_back_with_tencents_code_and_their_class(
    fake: FakeTencentSms, script: object, code: str, outcome: Outcome
) -> None:
    script(fake)  # type: ignore[operator]
    result = sender_for(fake).send(sms())
    assert not result.ok
    assert result.code == code
    assert classify(result.code).outcome is outcome


def test_wrong_secret_key_is_an_auth_failure_for_ops(fake: FakeTencentSms) -> None:
    result = sender_for(fake, secret_key="not-the-key").send(sms())
    assert (result.ok, result.code) == (False, "AuthFailure.SignatureFailure")
    assert classify(result.code).alert_ops
    assert fake.sends == []


def test_wrong_param_count_is_permanent(fake: FakeTencentSms) -> None:
    result = sender_for(fake).send(sms(params=("only-one",)))
    assert not result.ok
    assert classify(result.code).outcome is Outcome.PERMANENT
    assert fake.sends == []


@pytest.mark.slow
def test_an_answer_that_never_comes_is_ambiguous_not_failed(fake: FakeTencentSms) -> None:
    """Tencent accepted the send but we timed out: a resend could text the customer twice."""
    fake.slow(3.0)
    result = sender_for(fake, timeout=1).send(sms())
    assert (result.ok, result.code) == (False, "ClientNetworkError")
    assert classify(result.code).outcome is Outcome.AMBIGUOUS
    assert len(fake.sends) == 1  # it did go out


@pytest.mark.parametrize(
    ("code", "outcome", "retryable"),
    [
        ("Ok", Outcome.SENT, False),
        ("RequestLimitExceeded.Something", Outcome.TRANSIENT, True),
        ("LimitExceeded.PhoneNumberThirtySecondLimit", Outcome.FREQUENCY, True),
        ("FailedOperation.MarketingSendTimeConstraint", Outcome.FREQUENCY, True),
        ("UnauthorizedOperation.SmsSdkAppIdVerifyFail", Outcome.PERMANENT, False),
        ("ClientNetworkError", Outcome.AMBIGUOUS, False),
        ("", Outcome.AMBIGUOUS, False),
        ("Something.NobodyHasSeen", Outcome.PERMANENT, False),
    ],
)
def test_error_table(code: str, outcome: Outcome, retryable: bool) -> None:
    found = classify(code)
    assert (found.outcome, found.retryable) == (outcome, retryable)


def test_blacklisted_number_means_opted_out() -> None:
    assert classify("FailedOperation.PhoneNumberInBlacklist").opted_out
    assert not classify("FailedOperation.PhoneNumberParseFail").opted_out


def test_e164() -> None:
    assert e164("86", "13800000000") == "+8613800000000"
    assert e164("+1", "+4155550100") == "+14155550100"


# ---------------------------------------------------------------- transport failures, as Tencent really fails


def test_a_refused_connection_never_reached_tencent_and_is_retried(fake: FakeTencentSms) -> None:
    sender = sender_for(fake)
    with fake.refused():
        result = sender.send(sms())
    assert (result.ok, result.code) == (False, NOT_SENT)
    assert classify(result.code).outcome is Outcome.TRANSIENT
    assert fake.sends == []
    assert sender.send(sms()).ok  # the same sender gets through once Tencent answers again


def test_a_dns_failure_never_reached_tencent(fake: FakeTencentSms) -> None:
    config = TencentConfig(
        secret_id=SECRET_ID, secret_key=SECRET_KEY, sdk_app_id=APP_ID, endpoint="sms.invalid:80", scheme="http",
        timeout_seconds=2,
    )  # fmt: skip
    result = TencentSender(config).send(sms())
    assert (result.ok, result.code) == (False, NOT_SENT)


@pytest.mark.parametrize("reset", [True, False], ids=["reset", "closed"])
def test_a_connection_lost_after_the_request_was_written_is_ambiguous(fake: FakeTencentSms, reset: bool) -> None:
    fake.disconnect(reset=reset)
    result = sender_for(fake).send(sms())
    assert (result.ok, result.code) == (False, "ClientNetworkError")
    assert classify(result.code).outcome is Outcome.AMBIGUOUS
    assert len(fake.sends) == 1  # Tencent did send it: a resend would text the customer twice


@pytest.mark.parametrize("kind", ["truncated", "not_json", "html"])
def test_an_unreadable_answer_is_ambiguous_not_failed(fake: FakeTencentSms, kind: str) -> None:
    fake.garble(kind)  # type: ignore[arg-type]
    result = sender_for(fake).send(sms())
    assert (result.ok, result.code) == (False, UNREADABLE)
    assert classify(result.code).outcome is Outcome.AMBIGUOUS
    assert len(fake.sends) == 1
