"""The fake Tencent SMS API, driven by Tencent's real SDK, so the fake itself is trusted.

Wrong signatures, expired timestamps, unknown SecretIds and malformed requests must come back as
Tencent's error envelopes (which the SDK turns into ``TencentCloudSDKException``); request fields are
checked the way Tencent does; scripted faults behave as documented in ``tests/fakes/tencent_sms.py``.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

import pytest
import urllib3
from tencentcloud.common import abstract_client, credential  # type: ignore[import-untyped]
from tencentcloud.common.exception.tencent_cloud_sdk_exception import (  # type: ignore[import-untyped]
    TencentCloudSDKException,
)
from tencentcloud.common.profile.client_profile import ClientProfile  # type: ignore[import-untyped]
from tencentcloud.common.profile.http_profile import HttpProfile  # type: ignore[import-untyped]
from tencentcloud.sms.v20210111 import models, sms_client  # type: ignore[import-untyped]

from tests.fakes.tencent_sms import (
    CHINA_TZ,
    ODD_REPORT_KINDS,
    BlacklistSource,
    FakeTemplate,
    FakeTencentSms,
    FrequencyLimits,
    GarbleKind,
    sign_tc3_request,
    split_e164,
)

SECRET_ID = "AKIDfake0000000000000000000000000000"
SECRET_KEY = "fakeSecretKey0000000000000000000"
APP_ID = "1400006666"
SIGN = "Acme Shop"
TEMPLATE = "1490001"
PHONE = "+8613800000000"
PROXY_VARS = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """With HTTP_PROXY set the SDK proxies even 127.0.0.1 (NO_PROXY does not help)."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)


class Clock:
    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(china_time(12))


def china_time(hour: int) -> float:
    return datetime(2026, 5, 28, hour, tzinfo=CHINA_TZ).timestamp()


@pytest.fixture
def fake(clock: Clock) -> Iterator[FakeTencentSms]:
    templates: dict[str, str | FakeTemplate] = {
        TEMPLATE: "Order {1}: {2}.",
        "1490002": "Thanks!",
        "1490003": FakeTemplate("Code {1}", kind="verification", name="login code"),
        "1490004": FakeTemplate("Under review {1}", status="reviewing"),
        "1490005": FakeTemplate("Hello {1}", international=True),
        "1490006": FakeTemplate("Sale {1} 拒收请回复R", kind="marketing"),
        "1490007": FakeTemplate("Hi {1}", international="both"),
        "1490008": FakeTemplate("Soon {1}", status="approved_not_effective"),
    }
    with FakeTencentSms(
        secret_id=SECRET_ID,
        secret_key=SECRET_KEY,
        app_id=APP_ID,
        templates=templates,
        signatures={SIGN},
        clock=clock,
    ) as running:
        yield running


def client_for(
    fake: FakeTencentSms, *, secret_id: str = SECRET_ID, secret_key: str = SECRET_KEY, timeout: float = 5
) -> Any:
    profile = ClientProfile(httpProfile=HttpProfile(protocol="http", endpoint=fake.endpoint, reqTimeout=timeout))
    return sms_client.SmsClient(credential.Credential(secret_id, secret_key), "ap-guangzhou", profile)


def send_request(
    numbers: list[str] | None = None,
    params: list[str] | None = None,
    *,
    template_id: str = TEMPLATE,
    sign_name: str | None = SIGN,
    app_id: str = APP_ID,
    session_context: str | None = "outbox-42",
) -> Any:
    request = models.SendSmsRequest()
    request.PhoneNumberSet = [PHONE] if numbers is None else numbers
    request.SmsSdkAppId = app_id
    request.TemplateId = template_id
    if sign_name is not None:
        request.SignName = sign_name
    request.TemplateParamSet = ["A17", "paid"] if params is None else params
    if session_context is not None:
        request.SessionContext = session_context
    return request


def sdk_error(call: Callable[[], Any]) -> Any:
    with pytest.raises(TencentCloudSDKException) as info:
        call()
    return info.value


def raw_post(fake: FakeTencentSms, body: bytes, headers: dict[str, str]) -> tuple[int, str | None, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    try:
        conn.request("POST", "/", body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type"), json.loads(response.read())
    finally:
        conn.close()


def signed_headers(fake: FakeTencentSms, body: bytes, action: str = "SendSms", **kw: Any) -> dict[str, str]:
    return sign_tc3_request(SECRET_ID, SECRET_KEY, host=fake.endpoint, action=action, body=body, **kw)


def error_of(envelope: dict[str, Any]) -> str:
    response = envelope["Response"]
    assert set(response) == {"Error", "RequestId"}
    assert set(response["Error"]) == {"Code", "Message"}
    assert response["RequestId"]
    return str(response["Error"]["Code"])


# --------------------------------------------------------------------------- sending


def test_valid_send_succeeds_and_is_recorded(fake: FakeTencentSms, clock: Clock) -> None:
    response = client_for(fake).SendSms(send_request())

    assert len(response.SendStatusSet) == 1
    status = response.SendStatusSet[0]
    assert status.Code == "Ok"
    assert status.Message == "send success"
    assert status.PhoneNumber == PHONE
    assert status.SessionContext == "outbox-42"
    assert status.IsoCode == "CN"
    assert status.Fee == 1
    assert status.SerialNo.startswith("5000:")
    assert status.SerialNo[5:].isdigit()
    assert response.RequestId

    [sent] = fake.sends
    assert sent.serial_no == status.SerialNo
    assert sent.phone_number == PHONE
    assert (sent.country_code, sent.subscriber_number) == ("86", "13800000000")
    assert sent.sms_sdk_app_id == APP_ID
    assert sent.template_id == TEMPLATE
    assert sent.sign_name == SIGN
    assert sent.template_params == ("A17", "paid")
    assert sent.text == "Order A17: paid."
    assert sent.content == "【Acme Shop】Order A17: paid."
    assert sent.session_context == "outbox-42"
    assert sent.request_id == response.RequestId
    assert sent.sent_at == clock.now
    assert fake.calls[-1].action == "SendSms"
    assert fake.calls[-1].error_code is None


def test_fee_counts_segments_and_batches_report_each_number(fake: FakeTencentSms) -> None:
    numbers = ["+8613800000001", "+8613800000002", "+8613800000003"]
    response = client_for(fake).SendSms(send_request(numbers, template_id="1490002", params=[]))

    assert [s.PhoneNumber for s in response.SendStatusSet] == numbers
    assert {s.Code for s in response.SendStatusSet} == {"Ok"}
    assert len({s.SerialNo for s in response.SendStatusSet}) == 3
    assert [s.phone_number for s in fake.sends] == numbers


def test_response_content_type_is_exactly_application_json(fake: FakeTencentSms) -> None:
    body = json.dumps(
        {"PhoneNumberSet": [PHONE], "SmsSdkAppId": APP_ID, "TemplateId": "1490002", "SignName": SIGN}
    ).encode()
    ok_status, ok_type, ok = raw_post(fake, body, signed_headers(fake, body))
    bad_status, bad_type, bad = raw_post(fake, body, signed_headers(fake, b"tampered"))

    assert (ok_status, ok_type) == (200, "application/json")
    assert ok["Response"]["SendStatusSet"][0]["Code"] == "Ok"
    assert (bad_status, bad_type) == (200, "application/json")
    assert error_of(bad) == "AuthFailure.SignatureFailure"


def test_missing_signature_name_for_mainland_numbers_is_refused(fake: FakeTencentSms) -> None:
    error = sdk_error(lambda: client_for(fake).SendSms(send_request(sign_name=None)))
    assert error.code == "FailedOperation.SignatureIncorrectOrUnapproved"


# --------------------------------------------------------------------------- authentication


def test_wrong_secret_key_is_a_signature_failure(fake: FakeTencentSms) -> None:
    error = sdk_error(lambda: client_for(fake, secret_key="not-the-key").SendSms(send_request()))

    assert error.code == "AuthFailure.SignatureFailure"
    assert error.requestId
    assert fake.sends == []


def test_unknown_secret_id_is_not_found(fake: FakeTencentSms) -> None:
    error = sdk_error(lambda: client_for(fake, secret_id="AKIDunknown").SendSms(send_request()))

    assert error.code == "AuthFailure.SecretIdNotFound"
    assert fake.sends == []


@pytest.mark.parametrize("skew", [-301, 301])
def test_timestamp_more_than_five_minutes_off_has_expired(
    fake: FakeTencentSms, monkeypatch: pytest.MonkeyPatch, skew: int
) -> None:
    """The SDK signs with ``time.time()`` of its own module: shift only that clock."""
    monkeypatch.setattr(abstract_client, "time", SimpleNamespace(time=lambda: time.time() + skew))

    error = sdk_error(lambda: client_for(fake).SendSms(send_request()))

    assert error.code == "AuthFailure.SignatureExpire"
    assert fake.sends == []


def test_timestamp_within_five_minutes_is_accepted(fake: FakeTencentSms, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(abstract_client, "time", SimpleNamespace(time=lambda: time.time() - 250))

    assert client_for(fake).SendSms(send_request()).SendStatusSet[0].Code == "Ok"


def test_raw_request_with_an_old_timestamp_has_expired(fake: FakeTencentSms) -> None:
    body = json.dumps(send_request()._serialize()).encode()
    _, _, envelope = raw_post(fake, body, signed_headers(fake, body, timestamp=int(time.time()) - 3600))
    assert error_of(envelope) == "AuthFailure.SignatureExpire"


def test_body_is_hashed_as_received(fake: FakeTencentSms) -> None:
    body = json.dumps(send_request()._serialize()).encode()
    same_json_other_bytes = json.dumps(send_request()._serialize(), indent=1).encode()

    _, _, good = raw_post(fake, body, signed_headers(fake, body))
    _, _, bad = raw_post(fake, same_json_other_bytes, signed_headers(fake, body))

    assert good["Response"]["SendStatusSet"][0]["Code"] == "Ok"
    assert error_of(bad) == "AuthFailure.SignatureFailure"


def test_signature_covers_the_host_header(fake: FakeTencentSms) -> None:
    body = json.dumps(send_request()._serialize()).encode()
    headers = sign_tc3_request(SECRET_ID, SECRET_KEY, host="sms.tencentcloudapi.com", action="SendSms", body=body)
    headers["Host"] = fake.endpoint
    _, _, envelope = raw_post(fake, body, headers)
    assert error_of(envelope) == "AuthFailure.SignatureFailure"


# --------------------------------------------------------------------------- malformed requests


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda h: h.pop("X-TC-Action"), "MissingParameter"),
        (lambda h: h.pop("X-TC-Version"), "MissingParameter"),
        (lambda h: h.pop("X-TC-Timestamp"), "MissingParameter"),
        (lambda h: h.pop("X-TC-Region"), "MissingParameter"),
        (lambda h: h.pop("Authorization"), "AuthFailure.InvalidAuthorization"),
        (lambda h: h.update({"Authorization": "Bearer nonsense"}), "AuthFailure.InvalidAuthorization"),
        (lambda h: h.update({"X-TC-Action": "SendSmsPlease"}), "InvalidAction"),
        (lambda h: h.update({"X-TC-Version": "2017-03-12"}), "NoSuchVersion"),
    ],
)
def test_malformed_envelope_answers_an_error_envelope(
    fake: FakeTencentSms, mutate: Callable[[dict[str, str]], object], code: str
) -> None:
    body = json.dumps(send_request()._serialize()).encode()
    headers = signed_headers(fake, body)
    mutate(headers)

    status, content_type, envelope = raw_post(fake, body, headers)

    assert (status, content_type) == (200, "application/json")
    assert error_of(envelope) == code
    assert fake.sends == []


def test_bad_json_with_a_valid_signature_is_an_invalid_parameter(fake: FakeTencentSms) -> None:
    body = b'{"PhoneNumberSet": ["+8613800000000"], '
    _, _, envelope = raw_post(fake, body, signed_headers(fake, body))
    assert error_of(envelope) == "InvalidParameter"


def test_unknown_parameter_and_wrong_type_are_refused(fake: FakeTencentSms) -> None:
    unknown = json.dumps({**send_request()._serialize(), "Bogus": 1}).encode()
    wrong_type = json.dumps({**send_request()._serialize(), "PhoneNumberSet": PHONE}).encode()

    assert error_of(raw_post(fake, unknown, signed_headers(fake, unknown))[2]) == "UnknownParameter"
    assert error_of(raw_post(fake, wrong_type, signed_headers(fake, wrong_type))[2]) == "InvalidParameter"


# --------------------------------------------------------------------------- SendSms field checks


@pytest.mark.parametrize(
    ("request_kwargs", "code"),
    [
        ({"params": ["only-1"]}, "FailedOperation.TemplateParamSetNotMatchApprovedTemplate"),
        ({"params": ["A17", "paid", "x"]}, "FailedOperation.TemplateParamSetNotMatchApprovedTemplate"),
        ({"params": ["A17", "toolong7"]}, "InvalidParameterValue.TemplateParameterLengthLimit"),
        ({"params": ["A17", "t.cn/x"]}, "InvalidParameterValue.ProhibitedUseUrlInTemplateParameter"),
        ({"template_id": "9999999"}, "FailedOperation.TemplateIncorrectOrUnapproved"),
        ({"template_id": "1490004", "params": ["1"]}, "FailedOperation.TemplateIncorrectOrUnapproved"),
        ({"template_id": "1490008", "params": ["1"]}, "FailedOperation.TemplateIncorrectOrUnapproved"),
        ({"template_id": "1490003", "params": ["12ab"]}, "InvalidParameterValue.TemplateParameterFormatError"),
        ({"sign_name": "Other Shop"}, "FailedOperation.SignatureIncorrectOrUnapproved"),
        ({"app_id": "1400000000"}, "UnauthorizedOperation.SmsSdkAppIdVerifyFail"),
        ({"numbers": []}, "MissingParameter.EmptyPhoneNumberSet"),
        ({"numbers": [f"+86138{i:08d}" for i in range(201)]}, "LimitExceeded.PhoneNumberCountLimit"),
        (
            {"numbers": [PHONE, "+14155550100"]},
            "UnsupportedOperation.ContainDomesticAndInternationalPhoneNumber",
        ),
        ({"numbers": ["+14155550100"]}, "UnsupportedOperation.ChineseMainlandTemplateToGlobalPhone"),
        ({"template_id": "1490005", "params": ["Al"]}, "UnsupportedOperation.GlobalTemplateToChineseMainlandPhone"),
        ({"session_context": "x" * 513}, "InvalidParameter"),
    ],
)
def test_send_sms_field_checks(fake: FakeTencentSms, request_kwargs: dict[str, Any], code: str) -> None:
    error = sdk_error(lambda: client_for(fake).SendSms(send_request(**request_kwargs)))

    assert error.code == code
    assert fake.sends == []


def test_param_length_limit_is_configurable(fake: FakeTencentSms) -> None:
    fake.param_max_length = 12
    assert client_for(fake).SendSms(send_request(params=["A17", "toolong7"])).SendStatusSet[0].Code == "Ok"


def test_two_hundred_numbers_are_allowed(fake: FakeTencentSms) -> None:
    numbers = [f"+86138{i:08d}" for i in range(200)]
    response = client_for(fake).SendSms(send_request(numbers, template_id="1490002", params=[]))
    assert len(response.SendStatusSet) == 200
    assert len(fake.sends) == 200


def test_invalid_numbers_fail_per_entry(fake: FakeTencentSms) -> None:
    numbers = ["13800000000", "+8612345", PHONE]
    response = client_for(fake).SendSms(send_request(numbers))

    codes = [(s.PhoneNumber, s.Code, s.SerialNo, s.Fee) for s in response.SendStatusSet]
    assert codes[0][:2] == ("13800000000", "FailedOperation.PhoneNumberParseFail")
    assert codes[1][:2] == ("+8612345", "InvalidParameterValue.IncorrectPhoneNumber")
    assert codes[0][2:] == codes[1][2:] == ("", 0)
    assert codes[2][1] == "Ok"
    assert [s.phone_number for s in fake.sends] == [PHONE]


def test_international_send(fake: FakeTencentSms) -> None:
    response = client_for(fake).SendSms(send_request(["+14155550100"], ["Al"], template_id="1490005", sign_name=None))
    status = response.SendStatusSet[0]
    assert (status.Code, status.IsoCode) == ("Ok", "US")
    assert fake.sends[0].content == "Hello Al"


def test_global_send_records_sender_id_and_ignores_a_sign_name(fake: FakeTencentSms) -> None:
    request = send_request(["+85291234567"], ["Al"], template_id="1490005", sign_name="Not Approved Anywhere")
    request.SenderId = "ACME"

    status = client_for(fake).SendSms(request).SendStatusSet[0]

    assert (status.Code, status.IsoCode) == ("Ok", "HK")
    [sent] = fake.sends
    assert (sent.sender_id, sent.sign_name) == ("ACME", "Not Approved Anywhere")
    assert sent.content == sent.text == "Hello Al"  # no 【signature】 outside the mainland, and not checked
    assert sent.fee == 1


def test_a_mainland_template_to_a_global_number_is_refused(fake: FakeTencentSms) -> None:
    error = sdk_error(lambda: client_for(fake).SendSms(send_request(["+85291234567"], sign_name=None)))
    assert error.code == "UnsupportedOperation.ChineseMainlandTemplateToGlobalPhone"
    assert fake.sends == []


def test_marketing_only_between_8_and_22_china_time(fake: FakeTencentSms, clock: Clock) -> None:
    clock.now = china_time(23)
    error = sdk_error(lambda: client_for(fake).SendSms(send_request(template_id="1490006", params=["50%"])))
    assert error.code == "FailedOperation.MarketingSendTimeConstraint"

    clock.now += 10 * 3600  # 09:00 China
    assert client_for(fake).SendSms(send_request(template_id="1490006", params=["50%"])).SendStatusSet[0].Code == "Ok"


# --------------------------------------------------------------------------- scripted faults


def test_per_number_fault_appears_in_that_entry_only(fake: FakeTencentSms) -> None:
    blocked = "+8613800000002"
    fake.fail_number(blocked, "FailedOperation.PhoneNumberInBlacklist")
    numbers = ["+8613800000001", blocked, "+8613800000003"]

    response = client_for(fake).SendSms(send_request(numbers))

    by_number = {s.PhoneNumber: s for s in response.SendStatusSet}
    assert by_number[blocked].Code == "FailedOperation.PhoneNumberInBlacklist"
    assert (by_number[blocked].SerialNo, by_number[blocked].Fee) == ("", 0)
    assert by_number[blocked].SessionContext == "outbox-42"
    assert {by_number[n].Code for n in numbers if n != blocked} == {"Ok"}
    assert [s.phone_number for s in fake.sends] == ["+8613800000001", "+8613800000003"]
    # times=1: the next send to that number goes through
    assert client_for(fake).SendSms(send_request([blocked], ["B2", "x"])).SendStatusSet[0].Code == "Ok"


@pytest.mark.parametrize("source", ["customer", "carrier"])
def test_a_blacklisted_number_is_refused_the_same_way_whatever_the_source(
    fake: FakeTencentSms, source: BlacklistSource
) -> None:
    blocked = "+8613800000002"
    fake.blacklist(blocked, source=source)
    client = client_for(fake)

    statuses = client.SendSms(send_request(["+8613800000001", blocked])).SendStatusSet
    again = client.SendSms(send_request([blocked], ["B2", "x"])).SendStatusSet[0]  # not once: until removed

    refused = statuses[1]
    assert (refused.Code, refused.Message) == ("FailedOperation.PhoneNumberInBlacklist", "手机号在免打扰名单库中")
    assert (refused.SerialNo, refused.Fee) == ("", 0)
    assert statuses[0].Code == "Ok"
    assert again.Code == "FailedOperation.PhoneNumberInBlacklist"
    assert [c.blacklisted for c in fake.calls] == [{blocked: source}, {blocked: source}]  # only a test can tell
    assert fake.blacklisted == {blocked: source}
    assert [s.phone_number for s in fake.sends] == ["+8613800000001"]

    fake.unblacklist(blocked)
    assert client.SendSms(send_request([blocked], ["B3", "x"])).SendStatusSet[0].Code == "Ok"
    assert fake.calls[-1].blacklisted == {}


def test_whole_request_fault(fake: FakeTencentSms) -> None:
    fake.fail_requests("InternalError.Timeout", times=2)
    client = client_for(fake)

    assert sdk_error(lambda: client.SendSms(send_request())).code == "InternalError.Timeout"
    assert sdk_error(lambda: client.SendSms(send_request())).code == "InternalError.Timeout"
    assert client.SendSms(send_request()).SendStatusSet[0].Code == "Ok"
    assert len(fake.sends) == 1


def test_http_500_is_a_server_network_error(fake: FakeTencentSms) -> None:
    fake.http_error(500)

    error = sdk_error(lambda: client_for(fake).SendSms(send_request()))

    assert error.code == "ServerNetworkError"
    assert fake.sends == []
    assert client_for(fake).SendSms(send_request()).SendStatusSet[0].Code == "Ok"


def test_slow_answer_beyond_the_timeout_is_a_client_network_error_after_sending(fake: FakeTencentSms) -> None:
    """The ambiguous case: Tencent accepted (the send is recorded) but the answer never arrived."""
    fake.slow(1.0)

    started = time.monotonic()
    error = sdk_error(lambda: client_for(fake, timeout=0.3).SendSms(send_request()))

    assert error.code == "ClientNetworkError"
    assert time.monotonic() - started < 0.9
    assert len(fake.sends) == 1


def test_slow_answer_before_processing_records_nothing_yet(fake: FakeTencentSms) -> None:
    fake.slow(0.6, after_processing=False)
    error = sdk_error(lambda: client_for(fake, timeout=0.2).SendSms(send_request()))
    assert error.code == "ClientNetworkError"
    assert fake.sends == []


@pytest.mark.parametrize(("after_processing", "recorded"), [(True, 1), (False, 0)])
def test_dropped_connection_is_a_client_network_error(
    fake: FakeTencentSms, after_processing: bool, recorded: int
) -> None:
    fake.disconnect(after_processing=after_processing)
    error = sdk_error(lambda: client_for(fake).SendSms(send_request()))
    assert error.code == "ClientNetworkError"
    assert len(fake.sends) == recorded


def context_chain(error: BaseException) -> list[type[BaseException]]:
    """The types along ``__context__`` (what was being handled when each was raised), outermost first."""
    found: list[type[BaseException]] = []
    current: BaseException | None = error
    while current is not None and len(found) < 20:
        found.append(type(current))
        current = current.__context__
    return found


def test_refused_connections_are_a_client_network_error_and_nothing_is_recorded(fake: FakeTencentSms) -> None:
    client = client_for(fake)  # one client throughout: its kept-alive connection must not get through either
    assert client.SendSms(send_request()).SendStatusSet[0].Code == "Ok"
    port = fake.port

    with fake.refused():
        assert fake.port == port
        error = sdk_error(lambda: client.SendSms(send_request(params=["A18", "paid"])))
        fresh = sdk_error(lambda: client_for(fake).SendSms(send_request(params=["A19", "paid"])))

    assert error.code == fresh.code == "ClientNetworkError"
    assert error.requestId is None
    assert urllib3.exceptions.NewConnectionError in context_chain(error)
    assert ConnectionRefusedError in context_chain(fresh)
    assert (len(fake.sends), len(fake.calls)) == (1, 1)
    assert fake.endpoint == f"127.0.0.1:{port}"
    assert client.SendSms(send_request(params=["A20", "paid"])).SendStatusSet[0].Code == "Ok"  # same port again


def test_refuse_and_accept_connections_without_a_block(fake: FakeTencentSms) -> None:
    fake.refuse_connections()
    fake.refuse_connections()  # idempotent
    try:
        assert sdk_error(lambda: client_for(fake).SendSms(send_request())).code == "ClientNetworkError"
    finally:
        fake.accept_connections()
    fake.accept_connections()  # idempotent
    assert client_for(fake).SendSms(send_request()).SendStatusSet[0].Code == "Ok"
    assert len(fake.sends) == 1


@pytest.mark.parametrize(("after_processing", "recorded"), [(True, 1), (False, 0)])
def test_a_reset_connection_is_a_client_network_error_with_connection_reset_in_the_chain(
    fake: FakeTencentSms, after_processing: bool, recorded: int
) -> None:
    fake.disconnect(reset=True, after_processing=after_processing)

    error = sdk_error(lambda: client_for(fake).SendSms(send_request()))

    assert error.code == "ClientNetworkError"
    assert ConnectionResetError in context_chain(error)
    assert len(fake.sends) == recorded
    assert client_for(fake).SendSms(send_request(params=["A18", "paid"])).SendStatusSet[0].Code == "Ok"


def test_a_plain_disconnect_closes_with_a_fin_not_a_reset(fake: FakeTencentSms) -> None:
    fake.disconnect()
    error = sdk_error(lambda: client_for(fake).SendSms(send_request()))
    chain = context_chain(error)
    assert http.client.RemoteDisconnected in chain
    assert ConnectionResetError not in chain


@pytest.mark.parametrize(
    ("kind", "code", "cause"),
    [
        ("truncated", "ChunkedEncodingError", urllib3.exceptions.IncompleteRead),
        ("not_json", "JSONDecodeError", json.JSONDecodeError),
        ("html", "JSONDecodeError", json.JSONDecodeError),
    ],
)
def test_an_unreadable_answer_after_the_send_was_accepted(
    fake: FakeTencentSms, kind: GarbleKind, code: str, cause: type[BaseException]
) -> None:
    """The SDK wraps whatever it raised reading the answer: ``TencentCloudSDKException(type(e).__name__, ...)``."""
    fake.garble(kind)

    error = sdk_error(lambda: client_for(fake).SendSms(send_request()))

    assert error.code == code
    assert error.requestId is None
    assert cause in context_chain(error)
    assert len(fake.sends) == 1  # accepted and recorded: the ambiguous case
    assert fake.calls[-1].error_code is None
    assert client_for(fake).SendSms(send_request(params=["A18", "paid"])).SendStatusSet[0].Code == "Ok"


@pytest.mark.parametrize(
    ("kind", "content_type"),
    [("truncated", "application/json"), ("not_json", "application/json"), ("html", "text/html")],
)
def test_garbled_answers_on_the_wire(fake: FakeTencentSms, kind: GarbleKind, content_type: str) -> None:
    fake.garble(kind, after_processing=False)
    body = json.dumps(send_request()._serialize()).encode()
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    try:
        conn.request("POST", "/", body=body, headers=signed_headers(fake, body))
        response = conn.getresponse()
        declared = int(response.getheader("Content-Length") or 0)
        try:
            raw = response.read()
        except http.client.IncompleteRead as e:
            raw = e.partial
        status, got_type = response.status, response.getheader("Content-Type")
    finally:
        conn.close()

    assert (status, got_type) == (200, content_type)
    assert (declared > len(raw)) == (kind == "truncated")
    with pytest.raises(json.JSONDecodeError):
        json.loads(raw)
    assert fake.sends == []  # before processing: nothing accepted
    assert fake.calls == []


# --------------------------------------------------------------------------- frequency limits


def test_same_content_to_one_number_at_most_once_per_30_seconds(fake: FakeTencentSms) -> None:
    client = client_for(fake)
    assert client.SendSms(send_request()).SendStatusSet[0].Code == "Ok"

    fake.advance(29)
    second = client.SendSms(send_request()).SendStatusSet[0]
    assert second.Code == "LimitExceeded.PhoneNumberThirtySecondLimit"
    assert (second.SerialNo, second.Fee) == ("", 0)
    other_content = client.SendSms(send_request(params=["A18", "paid"])).SendStatusSet[0]
    assert other_content.Code == "Ok"
    other_number = client.SendSms(send_request(["+8613800000009"])).SendStatusSet[0]
    assert other_number.Code == "Ok"

    fake.advance(1)
    assert client.SendSms(send_request()).SendStatusSet[0].Code == "Ok"
    assert [s.template_params for s in fake.sends if s.phone_number == PHONE] == [
        ("A17", "paid"),
        ("A18", "paid"),
        ("A17", "paid"),
    ]


def test_hourly_and_daily_limits(fake: FakeTencentSms, clock: Clock) -> None:
    clock.now = china_time(1)
    fake.limits = FrequencyLimits(same_content_seconds=30, per_hour=2, per_day=3)
    client = client_for(fake)

    def send(n: int) -> str:
        return str(client.SendSms(send_request(params=[f"A{n}", "x"])).SendStatusSet[0].Code)

    assert [send(1), send(2), send(3)] == ["Ok", "Ok", "LimitExceeded.PhoneNumberOneHourLimit"]
    fake.advance(3600)
    assert [send(4), send(5)] == ["Ok", "LimitExceeded.PhoneNumberDailyLimit"]
    fake.advance(23 * 3600)  # the next natural day in China time
    assert send(6) == "Ok"


def test_limits_can_be_disabled(fake: FakeTencentSms) -> None:
    fake.limits = FrequencyLimits.disabled()
    client = client_for(fake)
    assert {client.SendSms(send_request()).SendStatusSet[0].Code for _ in range(12)} == {"Ok"}


def test_default_limits_are_tencents_documented_ones() -> None:
    assert FrequencyLimits() == FrequencyLimits(same_content_seconds=30, per_hour=None, per_day=10)
    assert FrequencyLimits.english_faq() == FrequencyLimits(same_content_seconds=30, per_hour=None, per_day=2)


def test_the_english_faqs_daily_cap_of_two(fake: FakeTencentSms, clock: Clock) -> None:
    clock.now = china_time(9)
    fake.limits = FrequencyLimits.english_faq()
    client = client_for(fake)

    def send(n: int) -> str:
        return str(client.SendSms(send_request(params=[f"A{n}", "x"])).SendStatusSet[0].Code)

    assert [send(1), send(2), send(3)] == ["Ok", "Ok", "LimitExceeded.PhoneNumberDailyLimit"]
    assert client.SendSms(send_request(["+8613800000009"])).SendStatusSet[0].Code == "Ok"  # per number
    fake.advance(15 * 3600)  # 00:00 the next day, China time
    assert send(4) == "Ok"


def test_account_daily_limit_refuses_every_number_until_the_china_day_changes(clock: Clock) -> None:
    clock.now = china_time(23)
    numbers = [f"+861380000000{i}" for i in range(4)]
    with FakeTencentSms(
        secret_id=SECRET_ID,
        secret_key=SECRET_KEY,
        app_id=APP_ID,
        templates={TEMPLATE: "Order {1}: {2}."},
        signatures={SIGN},
        clock=clock,
        account_daily_limit=3,
    ) as fake:
        client = client_for(fake)
        first = client.SendSms(send_request(numbers[:2])).SendStatusSet
        second = client.SendSms(send_request(numbers[2:])).SendStatusSet
        fake.advance(3599)  # 23:59:59: still the same day
        third = client.SendSms(send_request(["+8613900000000"])).SendStatusSet
        fake.advance(1)  # midnight in China
        fourth = client.SendSms(send_request(["+8613900000000"])).SendStatusSet

    assert [s.Code for s in first + second] == ["Ok", "Ok", "Ok", "LimitExceeded.AppDailyLimit"]
    refused = second[1]
    assert (refused.SerialNo, refused.Fee, refused.Message) == ("", 0, "业务短信日下发条数超过设定的上限。")
    assert third[0].Code == "LimitExceeded.AppDailyLimit"
    assert fourth[0].Code == "Ok"
    assert [s.phone_number for s in fake.sends] == [*numbers[:3], "+8613900000000"]


# --------------------------------------------------------------------------- pulls and templates


def pull_replies(fake: FakeTencentSms, limit: int = 100) -> Any:
    request = models.PullSmsReplyStatusRequest()
    request.SmsSdkAppId = APP_ID
    request.Limit = limit
    return client_for(fake).PullSmsReplyStatus(request)


def test_pull_sms_reply_status_returns_each_reply_once(fake: FakeTencentSms) -> None:
    fake.enqueue_reply(PHONE, "1", sign_name=SIGN, extend_code="11", reply_time=1620734188)
    fake.enqueue_reply("+8613800000001", "TD", sign_name=SIGN)
    fake.enqueue_reply("+8613800000002", "hi", sign_name=SIGN)

    first = pull_replies(fake, limit=2).PullSmsReplyStatusSet
    rest = pull_replies(fake).PullSmsReplyStatusSet
    again = pull_replies(fake).PullSmsReplyStatusSet

    assert [r.ReplyContent for r in first] == ["1", "TD"]
    assert first[0].CountryCode == "86"
    assert first[0].SubscriberNumber == "13800000000"
    assert first[0].PhoneNumber == PHONE
    assert first[0].ExtendCode == "11"
    assert first[0].ReplyTime == 1620734188
    assert first[0].SignName == SIGN
    assert [r.ReplyContent for r in rest] == ["hi"]
    assert again == []


def test_pull_limit_over_100_is_refused(fake: FakeTencentSms) -> None:
    assert sdk_error(lambda: pull_replies(fake, limit=101)).code == "InvalidParameterValue.LimitVerifyFail"


def pull_send_statuses(fake: FakeTencentSms, limit: int = 100) -> Any:
    request = models.PullSmsSendStatusRequest()
    request.SmsSdkAppId = APP_ID
    request.Limit = limit
    return client_for(fake).PullSmsSendStatus(request).PullSmsSendStatusSet


def test_pull_sms_send_status_reports_each_send_once(fake: FakeTencentSms) -> None:
    response = client_for(fake).SendSms(send_request())

    [status] = pull_send_statuses(fake)
    assert status.SerialNo == response.SendStatusSet[0].SerialNo
    assert status.ReportStatus == "SUCCESS"
    assert status.SessionContext == ""  # not echoed unless Tencent's support enables it
    assert (status.CountryCode, status.SubscriberNumber, status.PhoneNumber) == ("86", "13800000000", PHONE)
    assert isinstance(status.UserReceiveTime, int)
    assert pull_send_statuses(fake) == []


def test_session_context_is_echoed_in_pulled_statuses_only_when_enabled(fake: FakeTencentSms) -> None:
    fake.echo_session_context = True
    client_for(fake).SendSms(send_request())
    [status] = pull_send_statuses(fake)
    assert status.SessionContext == "outbox-42"


def pull_by_number(
    fake: FakeTencentSms,
    begin: float,
    end: float | None = None,
    *,
    number: str = PHONE,
    offset: int = 0,
    limit: int = 100,
) -> Any:
    request = models.PullSmsSendStatusByPhoneNumberRequest()
    request.BeginTime = int(begin)
    request.Offset = offset
    request.Limit = limit
    request.PhoneNumber = number
    request.SmsSdkAppId = APP_ID
    if end is not None:
        request.EndTime = int(end)
    return client_for(fake).PullSmsSendStatusByPhoneNumber(request).PullSmsSendStatusSet


def test_pull_send_status_by_phone_number_answers_the_window_and_consumes_nothing(
    fake: FakeTencentSms, clock: Clock
) -> None:
    client = client_for(fake)
    start = clock.now
    serials = []
    for n in range(3):
        serials.append(client.SendSms(send_request(params=[f"A{n}", "x"])).SendStatusSet[0].SerialNo)
        client.SendSms(send_request(["+8613800000009"], [f"A{n}", "x"]))  # another number: never in the answer
        fake.advance(100)

    window = pull_by_number(fake, start + 50, start + 200)
    everything = pull_by_number(fake, start)  # no EndTime: up to now
    second_page = pull_by_number(fake, start, offset=1, limit=1)

    assert [s.SerialNo for s in window] == serials[1:]  # sent at +100 and +200: both ends count
    assert [s.SerialNo for s in everything] == serials
    assert [s.SerialNo for s in second_page] == [serials[1]]
    status = window[0]
    assert (status.PhoneNumber, status.CountryCode, status.SubscriberNumber) == (PHONE, "86", "13800000000")
    assert (status.ReportStatus, status.Description) == ("SUCCESS", "用户短信接收成功")
    assert status.SessionContext == ""  # not echoed unless enabled
    assert [s.SerialNo for s in pull_by_number(fake, start)] == serials  # nothing consumed
    assert len(pull_send_statuses(fake)) == 6  # nor the PullSmsSendStatus queue


def test_pull_send_status_by_phone_number_shows_what_the_test_chose_per_send(
    fake: FakeTencentSms, clock: Clock
) -> None:
    client = client_for(fake)
    start = clock.now
    pending, failed, delivered = (
        client.SendSms(send_request(params=[f"A{n}", "x"])).SendStatusSet[0].SerialNo for n in range(3)
    )
    by_serial = {s.serial_no: s for s in fake.sends}
    fake.set_send_status(by_serial[pending], None)  # no report from the carrier yet
    fake.set_send_status(by_serial[failed], "FAIL", description="空号", receive_time=int(start) + 7)
    fake.echo_session_context = True

    answer = {s.SerialNo: s for s in pull_by_number(fake, start)}

    assert set(answer) == {failed, delivered}
    assert (answer[failed].ReportStatus, answer[failed].Description) == ("FAIL", "空号")
    assert answer[failed].UserReceiveTime == int(start) + 7
    assert answer[delivered].ReportStatus == "SUCCESS"
    assert answer[delivered].SessionContext == "outbox-42"

    fake.set_send_status(by_serial[pending], "SUCCESS")  # the report arrived
    assert {s.SerialNo for s in pull_by_number(fake, start)} == {pending, failed, delivered}


def test_without_report_sends_no_send_has_a_status_until_one_is_set(clock: Clock) -> None:
    with FakeTencentSms(
        secret_id=SECRET_ID,
        secret_key=SECRET_KEY,
        app_id=APP_ID,
        templates={TEMPLATE: "Order {1}: {2}."},
        signatures={SIGN},
        clock=clock,
        report_sends=False,
    ) as fake:
        client_for(fake).SendSms(send_request())
        assert pull_by_number(fake, clock.now) == []
        [send] = fake.sends
        fake.enqueue_send_status(send, status="FAIL")  # queued for PullSmsSendStatus, and held by number
        [status] = pull_by_number(fake, clock.now)
    assert (status.SerialNo, status.ReportStatus) == (send.serial_no, "FAIL")


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"begin": -(7 * 86400 + 1)}, "InvalidParameterValue.BeginTimeVerifyFail"),
        ({"begin": 0, "end": -1}, "InvalidParameterValue.EndTimeVerifyFail"),
        ({"begin": 0, "limit": 101}, "InvalidParameterValue.LimitVerifyFail"),
        ({"begin": 0, "limit": 0}, "InvalidParameterValue.LimitVerifyFail"),
        ({"begin": 0, "offset": -1}, "InvalidParameterValue.OffsetVerifyFail"),
        ({"begin": 0, "number": "13800000000"}, "FailedOperation.PhoneNumberParseFail"),
    ],
)
def test_pull_send_status_by_phone_number_checks_its_fields(
    fake: FakeTencentSms, clock: Clock, kwargs: dict[str, Any], code: str
) -> None:
    """``begin``/``end`` are relative to the fake's clock; 7 days back exactly is still allowed."""
    kwargs["begin"] += clock.now
    if "end" in kwargs:
        kwargs["end"] += clock.now
    assert sdk_error(lambda: pull_by_number(fake, **kwargs)).code == code
    assert pull_by_number(fake, clock.now - 7 * 86400) == []


def test_pull_send_status_by_phone_number_requires_its_fields(fake: FakeTencentSms) -> None:
    request = models.PullSmsSendStatusByPhoneNumberRequest()
    request.Offset = 0
    request.Limit = 10
    request.PhoneNumber = PHONE
    request.SmsSdkAppId = APP_ID
    error = sdk_error(lambda: client_for(fake).PullSmsSendStatusByPhoneNumber(request))
    assert error.code == "MissingParameter"
    assert "BeginTime" in error.message


def test_describe_sms_template_list(fake: FakeTencentSms) -> None:
    request = models.DescribeSmsTemplateListRequest()
    request.International = 0
    request.Limit = 100
    request.Offset = 0

    listed = {t.TemplateId: t for t in client_for(fake).DescribeSmsTemplateList(request).DescribeTemplateStatusSet}

    assert set(listed) == {1490001, 1490002, 1490003, 1490004, 1490006, 1490007, 1490008}
    assert listed[1490001].TemplateContent == "Order {1}: {2}."
    assert listed[1490001].StatusCode == 0
    assert listed[1490004].StatusCode == 1
    assert listed[1490008].StatusCode == 2  # approved, not yet in effect
    assert listed[1490003].TemplateName == "login code"
    assert listed[1490001].International == 0

    by_id = models.DescribeSmsTemplateListRequest()
    by_id.International = 1
    by_id.TemplateIdSet = [1490005, 1490001]
    [international] = client_for(fake).DescribeSmsTemplateList(by_id).DescribeTemplateStatusSet
    assert (international.TemplateId, international.International) == (1490005, 1)


@pytest.mark.parametrize("international", [0, 1])
def test_a_template_for_both_is_listed_under_either_filter_as_3(fake: FakeTencentSms, international: int) -> None:
    request = models.DescribeSmsTemplateListRequest()
    request.International = international
    request.Limit = 100
    request.Offset = 0

    listed = {
        t.TemplateId: t.International
        for t in client_for(fake).DescribeSmsTemplateList(request).DescribeTemplateStatusSet
    }

    assert listed[1490007] == 3
    assert (1490005 in listed) == (international == 1)
    assert (1490001 in listed) == (international == 0)


def test_a_template_for_both_sends_to_mainland_and_international_numbers(fake: FakeTencentSms) -> None:
    client = client_for(fake)
    domestic = client.SendSms(send_request(params=["Al"], template_id="1490007")).SendStatusSet[0]
    abroad = client.SendSms(send_request(["+14155550100"], ["Al"], template_id="1490007")).SendStatusSet[0]

    assert (domestic.Code, abroad.Code, abroad.IsoCode) == ("Ok", "Ok", "US")
    assert [s.content for s in fake.sends] == ["【Acme Shop】Hi Al", "Hi Al"]
    error = sdk_error(lambda: client.SendSms(send_request(params=["Al"], template_id="1490007", sign_name=None)))
    assert error.code == "FailedOperation.SignatureIncorrectOrUnapproved"  # mainland numbers still need one


# --------------------------------------------------------------------------- delivery reports


REPORT_FIELDS = {"user_receive_time", "nationcode", "mobile", "report_status", "errmsg", "description", "sid"}
"""The fields Tencent documents for one item of the "SMS delivery status" callback."""


class _Receiver(BaseHTTPRequestHandler):
    received: list[tuple[str | None, Any]]

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.headers.get("Content-Type"), json.loads(body)))
        answer = b'{"result":0,"errmsg":"OK"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


@contextmanager
def receiver() -> Iterator[tuple[str, list[tuple[str | None, Any]]]]:
    """A local HTTP server standing for smsbot's /sms/status: yields its URL and what it received."""
    received: list[tuple[str | None, Any]] = []
    handler = type("Receiver", (_Receiver,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/sms/status", received
    finally:
        server.shutdown()
        server.server_close()


def test_delivery_report_push_reaches_a_local_receiver(fake: FakeTencentSms) -> None:
    client_for(fake).SendSms(send_request(["+8613800000001", "+8613800000002"]))
    ok, failed = fake.sends
    items = [fake.delivery_report(ok), fake.delivery_report(failed, status="FAIL", errmsg="MK:0001")]
    with receiver() as (url, received):
        status, body = fake.push_delivery_reports(url, items)

    assert status == 200
    assert json.loads(body) == {"result": 0, "errmsg": "OK"}
    [(content_type, pushed)] = received
    assert content_type == "application/json"
    assert isinstance(pushed, list)
    assert pushed[0]["sid"] == ok.serial_no
    assert pushed[0]["report_status"] == "SUCCESS"
    assert pushed[0]["errmsg"] == "DELIVRD"
    assert (pushed[0]["nationcode"], pushed[0]["mobile"]) == ("86", "13800000001")
    assert len(pushed[0]["user_receive_time"]) == len("2015-10-17 08:03:04")
    assert pushed[1]["report_status"] == "FAIL"
    assert set(pushed[1]) == REPORT_FIELDS  # no "ext": SessionContext is not echoed by default


def test_delivery_report_carries_ext_only_when_the_echo_is_enabled(fake: FakeTencentSms) -> None:
    client_for(fake).SendSms(send_request())
    client_for(fake).SendSms(send_request(["+8613800000001"], session_context=None))
    with_context, without_context = fake.sends

    assert "ext" not in fake.delivery_report(with_context)
    fake.echo_session_context = True
    assert fake.delivery_report(with_context)["ext"] == "outbox-42"
    assert set(fake.delivery_report(with_context)) == REPORT_FIELDS | {"ext"}
    assert "ext" not in fake.delivery_report(without_context)  # nothing to echo


def test_a_batch_mixing_good_and_odd_report_items_arrives_as_built(fake: FakeTencentSms) -> None:
    client_for(fake).SendSms(send_request(["+8613800000001", "+8613800000002"], session_context="42"))
    good, odd = fake.sends
    batch = [
        fake.delivery_report(good),
        fake.odd_delivery_report(odd, "ext_object"),
        fake.odd_delivery_report(odd, "not_object"),
        fake.odd_delivery_report(odd, "no_sid"),
    ]
    with receiver() as (url, received):
        status, _ = fake.push_delivery_reports(url, batch)

    assert status == 200
    [(_, pushed)] = received
    assert pushed == batch
    assert pushed[1]["ext"] == {"SessionContext": "42"}
    assert isinstance(pushed[2], str)
    assert json.loads(pushed[2])["sid"] == odd.serial_no
    assert "sid" not in pushed[3]


def test_odd_report_items_are_each_bent_one_way(fake: FakeTencentSms) -> None:
    client_for(fake).SendSms(send_request(session_context="42"))
    [send] = fake.sends
    good = fake.delivery_report(send, status="FAIL")
    odd = fake.odd_delivery_reports(send, status="FAIL")

    assert set(odd) == set(ODD_REPORT_KINDS)
    assert set(odd["extra_fields"]) > set(good)
    assert [odd[k]["ext"] for k in ("ext_number", "ext_object", "ext_array", "ext_null")] == [
        42,
        {"SessionContext": "42"},
        ["42"],
        None,
    ]
    assert (odd["status_lower"]["report_status"], odd["status_mixed"]["report_status"]) == ("fail", "Fail")
    assert set(odd["no_optional"]) == REPORT_FIELDS - {"errmsg", "description"}
    assert odd["minimal"] == {"sid": send.serial_no, "report_status": "FAIL"}
    assert set(odd["no_sid"]) == REPORT_FIELDS - {"sid"}
    assert json.loads(odd["not_object"]) == good
    assert odd["unknown_sid"]["sid"] not in {s.serial_no for s in fake.sends}
    assert {k: v for k, v in odd["unknown_sid"].items() if k != "sid"} == {k: v for k, v in good.items() if k != "sid"}


# --------------------------------------------------------------------------- helpers and the process


def test_split_e164() -> None:
    assert split_e164("+8613800000000") == ("86", "13800000000")
    assert split_e164("+14155550100") == ("1", "4155550100")
    assert split_e164("+85291234567") == ("852", "91234567")
    assert split_e164("13800000000") is None
    assert split_e164("+86 138") is None


@contextmanager
def fake_process(*extra: str) -> Iterator[str]:
    """``python -m tests.fakes.tencent_sms`` with the test's credentials and template; yields its endpoint."""
    command = [
        sys.executable,
        "-m",
        "tests.fakes.tencent_sms",
        "--port",
        "0",
        "--secret-id",
        SECRET_ID,
        "--secret-key",
        SECRET_KEY,
        "--app-id",
        APP_ID,
        "--template",
        f"{TEMPLATE}=Order {{1}}: {{2}}.",
        "--signature",
        SIGN,
        *extra,
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        yield url.removeprefix("http://")
    finally:
        process.terminate()
        assert process.wait(timeout=5) == 0


def process_client(endpoint: str) -> Any:
    profile = ClientProfile(httpProfile=HttpProfile(protocol="http", endpoint=endpoint, reqTimeout=5))
    return sms_client.SmsClient(credential.Credential(SECRET_ID, SECRET_KEY), "ap-guangzhou", profile)


def test_runs_as_a_process() -> None:
    with fake_process() as endpoint:
        client = process_client(endpoint)
        assert client.SendSms(send_request()).SendStatusSet[0].Code == "Ok"
        conn = http.client.HTTPConnection(endpoint, timeout=5)
        conn.request("GET", "/_fake/sends")
        [sent] = json.loads(conn.getresponse().read())
        conn.close()
        assert sent["phone_number"] == PHONE
        assert sent["content"] == "【Acme Shop】Order A17: paid."
        request = models.PullSmsSendStatusRequest()
        request.SmsSdkAppId = APP_ID
        request.Limit = 100
        [status] = client.PullSmsSendStatus(request).PullSmsSendStatusSet
        assert status.SessionContext == ""


def test_a_process_can_echo_session_context_and_cap_the_account() -> None:
    with fake_process("--echo-session-context", "--account-daily-limit", "1") as endpoint:
        client = process_client(endpoint)
        assert client.SendSms(send_request()).SendStatusSet[0].Code == "Ok"
        second = client.SendSms(send_request(["+8613800000001"])).SendStatusSet[0]
        request = models.PullSmsSendStatusRequest()
        request.SmsSdkAppId = APP_ID
        request.Limit = 100
        [status] = client.PullSmsSendStatus(request).PullSmsSendStatusSet
    assert second.Code == "LimitExceeded.AppDailyLimit"
    assert status.SessionContext == "outbox-42"
