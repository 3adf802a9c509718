"""A faithful local fake of Tencent Cloud SMS API v3 (version 2021-01-11).

It speaks the wire protocol the real ``tencentcloud-sdk-python`` uses: ``POST /`` with a JSON body,
``X-TC-*`` headers and a TC3-HMAC-SHA256 ``Authorization`` header, and answers
``{"Response": {...}}`` with HTTP 200 and ``Content-Type: application/json`` exactly (the SDK only
raises on an error envelope when the content type is exactly that). Facts and error codes follow
``shared/docs/tencent-sms.md`` and the SDK's own ``tencentcloud.sms.v20210111.errorcodes``.

Actions: ``SendSms``, ``PullSmsReplyStatus``, ``PullSmsSendStatus``, ``PullSmsSendStatusByPhoneNumber``,
``DescribeSmsTemplateList``.

In tests::

    with FakeTencentSms(secret_id="AKID...", secret_key="...", app_id="1400006666",
                        templates={"1490001": "Order {1}: {2}."}, signatures={"Acme Shop"}) as fake:
        client = SmsClient(credential.Credential(fake.secret_id, fake.secret_key), "ap-guangzhou",
                           ClientProfile(httpProfile=HttpProfile(protocol="http", endpoint=fake.endpoint)))
        ...
        fake.sends  # every accepted send, in order

As a process (prints its URL on the first line of stdout, then serves until SIGINT/SIGTERM)::

    python -m tests.fakes.tencent_sms --port 9000 --secret-id ID --secret-key KEY --app-id 1400006666 \
        --template '1490001=Order {1}: {2}.' --signature 'Acme Shop' [--no-limits] [--account-daily-limit N] \
        [--echo-session-context]

Scriptable faults (Python API), each saying what the SDK then raises or returns:

- :meth:`~FakeTencentSms.fail_number`: a per-number ``Code`` in ``SendStatusSet``;
  :meth:`~FakeTencentSms.blacklist` (``source="customer"|"carrier"``): ``FailedOperation.PhoneNumberInBlacklist``
  until :meth:`~FakeTencentSms.unblacklist`, the source kept in :attr:`CallRecord.blacklisted`;
- :meth:`~FakeTencentSms.fail_requests`: a whole-request error envelope (``TencentCloudSDKException`` with its code);
- :meth:`~FakeTencentSms.http_error`: HTTP 5xx -> ``ServerNetworkError``;
- :meth:`~FakeTencentSms.slow` and :meth:`~FakeTencentSms.disconnect` (``reset=True``: a TCP RST, not a FIN)
  -> ``ClientNetworkError``, by default after the send was accepted, the ambiguous case;
- :meth:`~FakeTencentSms.refuse_connections` / :meth:`~FakeTencentSms.accept_connections` (or ``with
  fake.refused():``): the port is closed -> ``ClientNetworkError`` (``NewConnectionError``), nothing recorded;
- :meth:`~FakeTencentSms.garble`: HTTP 200 the SDK cannot read (``truncated`` -> ``ChunkedEncodingError``,
  ``not_json`` and ``html`` -> ``JSONDecodeError``), by default after the send was accepted;
- per-number frequency limits (:class:`FrequencyLimits`: Tencent's defaults, :meth:`FrequencyLimits.english_faq`)
  and an account-wide daily cap (``account_daily_limit`` -> ``LimitExceeded.AppDailyLimit`` per number);
- templates under review, approved but not yet in effect, rejected, or for both mainland and global numbers
  (:class:`FakeTemplate`).

Tencent's defaults the fake keeps unless told otherwise: ``SessionContext`` is echoed in ``SendSms``'s answer but
not in delivery reports (``ext``) or pulled statuses (``SessionContext: ""``) until Tencent's support enables it
(``echo_session_context=True``).

Replies for ``PullSmsReplyStatus``: :meth:`~FakeTencentSms.enqueue_reply`. Delivery statuses: one per accepted
send (``report_sends``), queued for ``PullSmsSendStatus`` (each handed out once) and held for
``PullSmsSendStatusByPhoneNumber`` (nothing consumed); :meth:`~FakeTencentSms.enqueue_send_status` queues one more,
:meth:`~FakeTencentSms.set_send_status` sets one (``SUCCESS``, ``FAIL`` or None: no status yet). Delivery-status
callbacks: :meth:`~FakeTencentSms.delivery_report` (and :meth:`~FakeTencentSms.odd_delivery_report`, the same item
bent the ways Tencent or a proxy might post it) + :meth:`~FakeTencentSms.push_delivery_reports`.

A process also answers ``GET /_fake/sends`` (the recorded sends as JSON, with their arrival time),
``GET /_fake/sends/count`` (``{"count": n}``, cheap to poll) and ``GET /_fake/health``; these paths are
not part of Tencent's API.

Time: signatures are checked against the wall clock (``auth_clock``, the SDK signs with
``time.time()``); frequency windows, the account cap's China day, marketing hours, report/reply times and
``PullSmsSendStatusByPhoneNumber``'s window use ``clock`` plus whatever :meth:`FakeTencentSms.advance` added, so
tests can move time without sleeping.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import math
import re
import secrets
import signal
import socket
import struct
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal, cast, get_args

SERVICE = "sms"
API_VERSION = "2021-01-11"
ALGORITHM = "TC3-HMAC-SHA256"
JSON_CONTENT_TYPE = "application/json"
MAX_CLOCK_SKEW_SECONDS = 300
"""Tencent rejects a timestamp more than five minutes off the server's clock."""
MAX_PHONE_NUMBERS = 200
MAX_PULL_LIMIT = 100
MAX_SESSION_CONTEXT_BYTES = 512
MAX_PULL_BY_NUMBER_DAYS = 7
"""``PullSmsSendStatusByPhoneNumber``'s ``BeginTime`` may be at most 7 days back."""
CHINA_TZ = timezone(timedelta(hours=8))
DEFAULT_REGION = "ap-guangzhou"

IMPLEMENTED_ACTIONS = frozenset(
    {"SendSms", "PullSmsReplyStatus", "PullSmsSendStatus", "PullSmsSendStatusByPhoneNumber", "DescribeSmsTemplateList"}
)
KNOWN_SMS_ACTIONS = IMPLEMENTED_ACTIONS | frozenset(
    {
        "AddSmsSign",
        "AddSmsTemplate",
        "CallbackStatusStatistics",
        "DeleteSmsSign",
        "DeleteSmsTemplate",
        "DescribePhoneNumberInfo",
        "DescribeSmsSignList",
        "ModifySmsSign",
        "ModifySmsTemplate",
        "PullSmsReplyStatusByPhoneNumber",
        "ReportConversion",
        "SendMultiGlobalSms",
        "SendStatusStatistics",
        "SmsPackagesStatistics",
    }
)
"""Actions of sms 2021-01-11 (from the SDK's client); the others answer UnsupportedOperation here."""

KNOWN_PARAMS: dict[str, frozenset[str]] = {
    "SendSms": frozenset(
        {
            "PhoneNumberSet",
            "SmsSdkAppId",
            "TemplateId",
            "SignName",
            "TemplateParamSet",
            "ExtendCode",
            "SessionContext",
            "SenderId",
        }
    ),
    "PullSmsReplyStatus": frozenset({"Limit", "SmsSdkAppId"}),
    "PullSmsSendStatus": frozenset({"Limit", "SmsSdkAppId"}),
    "PullSmsSendStatusByPhoneNumber": frozenset(
        {"BeginTime", "Offset", "Limit", "PhoneNumber", "SmsSdkAppId", "EndTime"}
    ),
    "DescribeSmsTemplateList": frozenset({"International", "TemplateIdSet", "Limit", "Offset"}),
}

MESSAGES: dict[str, str] = {
    "AuthFailure.InvalidAuthorization": "Authorization in the request header is invalid.",
    "AuthFailure.SecretIdNotFound": (
        "The SecretId is not found, please ensure that your SecretId is correct. "
        "Key does not exist. Check if the key has been deleted or disabled in the console."
    ),
    "AuthFailure.SignatureExpire": (
        "Signature expired. Timestamp and server time cannot differ by more than five minutes. "
        "Please ensure your current local time matches the standard time."
    ),
    "AuthFailure.SignatureFailure": (
        "The provided credentials could not be validated. Please check your signature is correct."
    ),
    "FailedOperation.PhoneNumberInBlacklist": "手机号在免打扰名单库中",
    "FailedOperation.PhoneNumberParseFail": "号码解析失败，请检查号码是否符合 E.164 标准。",
    "FailedOperation.SignatureIncorrectOrUnapproved": "签名未审批或格式错误。",
    "FailedOperation.TemplateIncorrectOrUnapproved": "模板未审批或内容不匹配。",
    "FailedOperation.TemplateParamSetNotMatchApprovedTemplate": (
        "请求内容与审核通过的模板内容不匹配。请检查请求中模板参数的个数是否与申请的模板一致。"
    ),
    "FailedOperation.MarketingSendTimeConstraint": "营销短信发送时间限制，营销短信只允许在8点到22点发送。",
    "InvalidParameterValue.IncorrectPhoneNumber": "手机号格式错误。",
    "InvalidParameterValue.TemplateParameterFormatError": "验证码模板参数格式错误，验证码类模板，模板变量只能传入0 - 6位（包括6位）纯数字。",
    "InvalidParameterValue.TemplateParameterLengthLimit": "单个模板变量字符数超过规定的限制数。",
    "InvalidParameterValue.ProhibitedUseUrlInTemplateParameter": "禁止在模板变量中使用 URL。",
    "InvalidParameterValue.LimitVerifyFail": "参数 Limit 校验失败。",
    "InvalidParameterValue.OffsetVerifyFail": "参数 Offset 校验失败。",
    "InvalidParameterValue.BeginTimeVerifyFail": "参数 BeginTime 校验失败。",
    "InvalidParameterValue.EndTimeVerifyFail": "参数 EndTime 校验失败。",
    "InvalidParameterValue.InvalidInternational": "International 字段校验错误。",
    "LimitExceeded.PhoneNumberCountLimit": "调用接口单次提交的手机号个数超过200个。",
    "LimitExceeded.PhoneNumberThirtySecondLimit": "单个手机号30秒内下发短信条数超过设定的上限。",
    "LimitExceeded.PhoneNumberOneHourLimit": "单个手机号1小时内下发短信条数超过设定的上限。",
    "LimitExceeded.PhoneNumberDailyLimit": "单个手机号日下发短信条数超过设定的上限。",
    "LimitExceeded.PhoneNumberSameContentDailyLimit": "单个手机号下发相同内容超过设定的上限。",
    "LimitExceeded.AppDailyLimit": "业务短信日下发条数超过设定的上限。",
    "LimitExceeded.AppMainlandChinaDailyLimit": "业务短信中国大陆日下发条数超过设定的上限。",
    "LimitExceeded.AppGlobalDailyLimit": "业务短信国际/港澳台日下发条数超过设定的上限。",
    "LimitExceeded.AppCountryOrRegionDailyLimit": "业务短信国家/地区日下发条数超过设定的上限。",
    "LimitExceeded.DailyLimit": "短信日下发条数超过设定的上限 (国际/港澳台)。",
    "MissingParameter.EmptyPhoneNumberSet": "传入的号码列表为空，请确认您的参数中是否传入号码。",
    "UnauthorizedOperation.SmsSdkAppIdVerifyFail": "SmsSdkAppId 校验失败。",
    "UnsupportedOperation.ContainDomesticAndInternationalPhoneNumber": "群发请求里既有国内手机号也有国际手机号。",
    "UnsupportedOperation.ChineseMainlandTemplateToGlobalPhone": "国内短信模板不支持发送国际/港澳台手机号。",
    "UnsupportedOperation.GlobalTemplateToChineseMainlandPhone": "国际/港澳台短信模板不支持发送国内手机号。",
    "InternalError.Timeout": "接口超时或短信收发包超时。",
    "InternalError.SendAndRecvFail": "接口超时或短信收发包超时。",
    "InternalError.UnknownError": "未知错误类型。",
}

_TWO_DIGIT_CALLING_CODES = frozenset(
    ("20", "27", "30", "31", "32", "33", "34", "36", "39", "40", "41", "43", "44", "45", "46", "47", "48", "49")
    + ("51", "52", "53", "54", "55", "56", "57", "58", "60", "61", "62", "63", "64", "65", "66")
    + ("81", "82", "84", "86", "90", "91", "92", "93", "94", "95", "98")
)
_ISO_CODES = {
    "86": "CN",
    "852": "HK",
    "853": "MO",
    "886": "TW",
    "1": "US",
    "7": "RU",
    "44": "GB",
    "49": "DE",
    "33": "FR",
    "39": "IT",
    "34": "ES",
    "81": "JP",
    "82": "KR",
    "65": "SG",
    "60": "MY",
    "66": "TH",
    "84": "VN",
    "62": "ID",
    "63": "PH",
    "91": "IN",
    "61": "AU",
    "64": "NZ",
    "971": "AE",
    "55": "BR",
    "52": "MX",
}
_GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM7_EXTENDED = frozenset("^{}\\[~]|€\f")
_PLACEHOLDER = re.compile(r"\{(\d+)\}")
_URL = re.compile(r"(?i)(https?://|www\.|\b[a-z0-9-]+\.(com|cn|net|org|io|cc|top|xyz|me|info)\b)")
_AUTH = re.compile(
    r"^TC3-HMAC-SHA256 Credential=(?P<id>[^/\s,]+)/(?P<date>[^/\s,]+)/(?P<service>[^/\s,]+)/tc3_request, "
    r"SignedHeaders=(?P<signed>[a-z0-9;\-]+), Signature=(?P<sig>[0-9a-f]+)$"
)


# --------------------------------------------------------------------------- TC3 signing


def _hmac_sha256(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def tc3_signature(secret_key: str, date: str, service: str, string_to_sign: str) -> str:
    """kDate = HMAC("TC3"+key, date); kService = HMAC(kDate, service); kSigning = HMAC(kService, "tc3_request")."""
    k_date = _hmac_sha256(("TC3" + secret_key).encode("utf-8"), date)
    k_service = _hmac_sha256(k_date, service)
    k_signing = _hmac_sha256(k_service, "tc3_request")
    return hmac.new(k_signing, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


def tc3_string_to_sign(
    *,
    method: str,
    path: str,
    query: str,
    headers: Mapping[str, str],
    signed_headers: Sequence[str],
    payload_hash: str,
    timestamp: str,
    date: str,
    service: str = SERVICE,
) -> str:
    """The string to sign; ``headers`` maps lower-case names to values."""
    canonical_headers = "".join(f"{name}:{headers.get(name, '').strip().lower()}\n" for name in signed_headers)
    canonical_request = "\n".join([method, path, query, canonical_headers, ";".join(signed_headers), payload_hash])
    digest = hashlib.sha256(canonical_request.encode("utf-8")).hexdigest()
    return f"{ALGORITHM}\n{timestamp}\n{date}/{service}/tc3_request\n{digest}"


def sign_tc3_request(
    secret_id: str,
    secret_key: str,
    *,
    host: str,
    action: str,
    body: bytes,
    timestamp: int | None = None,
    version: str = API_VERSION,
    region: str | None = DEFAULT_REGION,
    content_type: str = JSON_CONTENT_TYPE,
    service: str = SERVICE,
) -> dict[str, str]:
    """Headers for a signed ``POST /`` the way the SDK builds them (for raw requests in tests and benches)."""
    ts = int(time.time()) if timestamp is None else timestamp
    date = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")
    headers = {"content-type": content_type, "host": host}
    string_to_sign = tc3_string_to_sign(
        method="POST",
        path="/",
        query="",
        headers=headers,
        signed_headers=["content-type", "host"],
        payload_hash=hashlib.sha256(body).hexdigest(),
        timestamp=str(ts),
        date=date,
        service=service,
    )
    signature = tc3_signature(secret_key, date, service, string_to_sign)
    out = {
        "Authorization": (
            f"{ALGORITHM} Credential={secret_id}/{date}/{service}/tc3_request, "
            f"SignedHeaders=content-type;host, Signature={signature}"
        ),
        "Content-Type": content_type,
        "Host": host,
        "X-TC-Action": action,
        "X-TC-Version": version,
        "X-TC-Timestamp": str(ts),
    }
    if region:
        out["X-TC-Region"] = region
    return out


# --------------------------------------------------------------------------- numbers and content


def split_e164(number: str) -> tuple[str, str] | None:
    """``"+8613800000000"`` -> ``("86", "13800000000")``; None when it is not E.164."""
    if not re.fullmatch(r"\+[1-9]\d{6,14}", number):
        return None
    digits = number[1:]
    if digits[0] in "17":
        cc = digits[0]
    elif digits[:2] in _TWO_DIGIT_CALLING_CODES:
        cc = digits[:2]
    else:
        cc = digits[:3]
    return cc, digits[len(cc) :]


def iso_code(country_code: str) -> str:
    return _ISO_CODES.get(country_code, "")


def segments(text: str) -> int:
    """SMS count: GSM-7 160/153 (extended characters count double), else UCS-2 70/67 in UTF-16 units."""
    if all(c in _GSM7_BASIC or c in _GSM7_EXTENDED for c in text):
        units = sum(2 if c in _GSM7_EXTENDED else 1 for c in text)
        single, multi = 160, 153
    else:
        units = len(text.encode("utf-16-le")) // 2
        single, multi = 70, 67
    if units == 0:
        return 0
    return 1 if units <= single else math.ceil(units / multi)


# --------------------------------------------------------------------------- configuration and records


TemplateKind = Literal["notification", "verification", "marketing"]
TemplateStatus = Literal["approved", "reviewing", "approved_not_effective", "rejected"]
_STATUS_CODES: dict[str, int] = {"approved": 0, "reviewing": 1, "approved_not_effective": 2, "rejected": -1}
"""``DescribeTemplateListStatus.StatusCode``: 0 approved and in effect, 1 under review, 2 approved but not yet in
effect, -1 rejected. Only 0 can send: the others answer ``FailedOperation.TemplateIncorrectOrUnapproved``."""


@dataclass(frozen=True)
class FakeTemplate:
    """A template as configured in Tencent's console.

    ``international``: False for Chinese mainland numbers only (``International`` 0), True for international and
    Hong Kong/Macao/Taiwan numbers only (1), ``"both"`` for either (3, "该模板既支持国内短信也支持国际/港澳台短信").
    ``DescribeSmsTemplateList`` takes only 0 or 1 as its filter and Tencent's documents do not say under which a
    "both" template is listed: the fake lists it under either, with ``International`` 3."""

    content: str
    status: TemplateStatus = "approved"
    international: bool | Literal["both"] = False
    kind: TemplateKind = "notification"
    name: str = ""
    review_reply: str = ""
    create_time: int = 1_700_000_000

    @property
    def international_code(self) -> int:
        """``International`` as ``DescribeSmsTemplateList`` answers it: 0, 1 or 3."""
        return 3 if self.international == "both" else int(self.international)

    def serves(self, *, domestic: bool) -> bool:
        """Whether this template may be sent to Chinese mainland numbers (``domestic``) or to the others."""
        return self.international == "both" or bool(self.international) != domestic

    @property
    def placeholders(self) -> int:
        return len(set(_PLACEHOLDER.findall(self.content)))

    def render(self, params: Sequence[str]) -> str:
        return _PLACEHOLDER.sub(lambda m: params[int(m.group(1)) - 1], self.content)


@dataclass(frozen=True)
class FrequencyLimits:
    """Per-number limits as Tencent's console sets them; None disables one.

    The defaults are Tencent's documented defaults for a new application: the same content to one number at most
    once per 30 s, and at most 10 messages to one number per calendar day (China time), as the Chinese
    documentation says. The English FAQ ("What is the default sending frequency limit of SMS?") says 2 per day
    instead: :meth:`english_faq` builds that. No hourly or same-content-per-day default is documented (the console
    has settings for them, which organisation accounts may change, as they may change the others; individual
    accounts cannot), so both are off by default. Exceeding one answers a per-number ``Code``:
    ``LimitExceeded.PhoneNumberThirtySecondLimit``, ``...OneHourLimit``, ``...DailyLimit``,
    ``...SameContentDailyLimit``."""

    same_content_seconds: float | None = 30.0
    per_hour: int | None = None
    per_day: int | None = 10
    same_content_per_day: int | None = None

    @classmethod
    def english_faq(cls) -> FrequencyLimits:
        """Tencent's defaults as its English FAQ states them: 1 per 30 s for the same content, 2 per day."""
        return cls(same_content_seconds=30.0, per_hour=None, per_day=2)

    @classmethod
    def disabled(cls) -> FrequencyLimits:
        """No per-number limit at all (benches, and tests that are about something else)."""
        return cls(same_content_seconds=None, per_hour=None, per_day=None, same_content_per_day=None)


OddReportKind = Literal[
    "extra_fields",
    "ext_number",
    "ext_object",
    "ext_array",
    "ext_null",
    "status_lower",
    "status_mixed",
    "no_optional",
    "minimal",
    "no_sid",
    "not_object",
    "unknown_sid",
]
ODD_REPORT_KINDS: tuple[OddReportKind, ...] = get_args(OddReportKind)
"""Variants of a delivery-status callback item (:meth:`FakeTencentSms.odd_delivery_report`):

- ``extra_fields``: fields Tencent does not document today (``sign``, ``fee``, ``report_time``): it may add some;
- ``ext_number`` / ``ext_object`` / ``ext_array`` / ``ext_null``: ``ext`` as a JSON number (the digits of the
  SessionContext, else 42), an object, an array, ``null`` (the documents show only strings);
- ``status_lower`` / ``status_mixed``: ``report_status`` as ``success`` / ``Success`` (``fail`` / ``Fail``);
- ``no_optional``: without ``errmsg``, ``description`` and ``ext``; ``minimal``: only ``sid`` and ``report_status``;
- ``no_sid``: every field but ``sid``; ``unknown_sid``: a ``sid`` no send of the fake has;
- ``not_object``: not a JSON object but the item's JSON text as a string (encoded twice, a proxy's classic)."""


@dataclass(frozen=True)
class RecordedSend:
    """One accepted message (one number of one SendSms)."""

    serial_no: str
    phone_number: str
    country_code: str
    subscriber_number: str
    iso_code: str
    sms_sdk_app_id: str
    template_id: str
    sign_name: str | None
    template_params: tuple[str, ...]
    text: str
    """The template with its parameters filled in."""
    content: str
    """What the handset shows: ``【SignName】`` + text for Chinese mainland numbers."""
    fee: int
    session_context: str
    extend_code: str | None
    sender_id: str | None
    request_id: str
    received_at: float
    """Wall-clock time (``time.time()``) when the request arrived."""
    sent_at: float
    """The fake's clock (``clock`` + ``advance``) at acceptance, used by the frequency windows."""


BlacklistSource = Literal["customer", "carrier"]
"""Why Tencent will not send to a number: ``customer``, the customer unsubscribed at Tencent (replied the marketing
template's unsubscribe word); ``carrier``, the number is on a carrier's do-not-disturb list. One error code covers
both (``FailedOperation.PhoneNumberInBlacklist``, "通常是用户退订或者命中运营商免打扰名单导致的")."""


@dataclass(frozen=True)
class CallRecord:
    """Every API request the fake answered, accepted or not."""

    action: str
    params: dict[str, Any] | None
    error_code: str | None
    request_id: str
    received_at: float
    blacklisted: dict[str, BlacklistSource] = field(default_factory=dict)
    """Numbers of this ``SendSms`` refused as blacklisted (:meth:`FakeTencentSms.blacklist`), and why: Tencent's
    answer is the same for both sources, so only a test can tell them apart, here."""


GarbleKind = Literal["truncated", "not_json", "html"]
"""An answer the SDK cannot read (:meth:`FakeTencentSms.garble`)."""


@dataclass
class _Fault:
    remaining: int | None
    """None: forever."""
    action: str | None
    code: str = ""
    message: str = ""
    status: int = 500
    body: bytes = b""
    seconds: float = 0.0
    after_processing: bool = True
    reset: bool = False
    garble: GarbleKind | None = None

    def matches(self, action: str) -> bool:
        return self.action is None or self.action == action


@dataclass(frozen=True)
class _Status:
    """A send's delivery status as Tencent holds it, for ``PullSmsSendStatusByPhoneNumber``."""

    status: Literal["SUCCESS", "FAIL"]
    description: str | None
    receive_time: int


@dataclass
class _Reply:
    status: int
    content_type: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False
    """Close the connection without answering."""
    reset: bool = False
    """Close the connection without answering, with a TCP RST instead of a FIN."""
    content_length: int | None = None
    """The ``Content-Length`` to declare when it is not ``len(body)`` (a truncated answer); the connection closes."""


def _garbled(kind: GarbleKind, payload: bytes) -> _Reply:
    """An HTTP 200 answer the SDK cannot read, instead of ``payload`` (the real answer)."""
    if kind == "truncated":
        return _Reply(200, JSON_CONTENT_TYPE, payload[: len(payload) // 2], content_length=len(payload))
    if kind == "not_json":
        body = b"upstream connect error or disconnect/reset before headers. reset reason: connection termination"
        return _Reply(200, JSON_CONTENT_TYPE, body)
    if kind == "html":
        page = (
            "<html><head><title>请稍候</title></head><body><p>Access is being verified, please wait.</p></body></html>"
        )
        return _Reply(200, "text/html", page.encode("utf-8"))
    raise ValueError(f"unknown kind of garbled answer: {kind!r}")


class ApiError(Exception):
    def __init__(self, code: str, message: str | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.message = message or MESSAGES.get(code, code)


def _missing(name: str) -> ApiError:
    return ApiError("MissingParameter", f"The request is missing a required parameter `{name}`.")


def _get_str(params: Mapping[str, Any], name: str, *, required: bool) -> str | None:
    value = params.get(name)
    if value is None:
        if required:
            raise _missing(name)
        return None
    if not isinstance(value, str):
        raise ApiError("InvalidParameter", f"The value type of parameter `{name}` is not valid; it should be String.")
    return value


def _get_str_list(params: Mapping[str, Any], name: str, *, required: bool) -> list[str] | None:
    value = params.get(name)
    if value is None:
        if required:
            raise _missing(name)
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ApiError(
            "InvalidParameter", f"The value type of parameter `{name}` is not valid; it should be Array of String."
        )
    return cast(list[str], value)


def _get_int(params: Mapping[str, Any], name: str, *, required: bool) -> int | None:
    value = params.get(name)
    if value is None:
        if required:
            raise _missing(name)
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError("InvalidParameter", f"The value type of parameter `{name}` is not valid; it should be Integer.")
    return value


def _required_int(params: Mapping[str, Any], name: str) -> int:
    value = _get_int(params, name, required=True)
    assert value is not None  # required=True raised otherwise
    return value


# --------------------------------------------------------------------------- the fake


class FakeTencentSms:
    """A Tencent Cloud SMS API v3 server on a loopback port, with scriptable faults."""

    def __init__(
        self,
        *,
        secret_id: str,
        secret_key: str,
        app_id: str = "1400006666",
        templates: Mapping[str, str | FakeTemplate] | None = None,
        signatures: Iterable[str] = (),
        param_max_length: int = 6,
        limits: FrequencyLimits | None = None,
        account_daily_limit: int | None = None,
        report_sends: bool = True,
        echo_session_context: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.time,
        auth_clock: Callable[[], float] = time.time,
        extra_credentials: Mapping[str, str] | None = None,
    ) -> None:
        self.secret_id = secret_id
        self.secret_key = secret_key
        self.app_id = app_id
        self.templates: dict[str, FakeTemplate] = {
            tid: t if isinstance(t, FakeTemplate) else FakeTemplate(content=t) for tid, t in (templates or {}).items()
        }
        self.signatures: set[str] = set(signatures)
        self.param_max_length = param_max_length
        self.limits = FrequencyLimits() if limits is None else limits
        self.account_daily_limit = account_daily_limit
        """Messages the whole application may send per calendar day (China time); None: no cap. Past it, every
        number of a ``SendSms`` answers :attr:`account_daily_limit_code` until the fake's China day changes
        (:meth:`advance`). Tencent's console sets such caps (mainland, global, per country); the fake has none unless
        told."""
        self.account_daily_limit_code = "LimitExceeded.AppDailyLimit"
        """The per-number ``Code`` for the cap: Tencent also answers ``LimitExceeded.AppMainlandChinaDailyLimit``,
        ``...AppGlobalDailyLimit``, ``...AppCountryOrRegionDailyLimit`` and ``LimitExceeded.DailyLimit``."""
        self.report_sends = report_sends
        self.echo_session_context = echo_session_context
        """Whether delivery reports (``ext``) and pulled send statuses (``SessionContext``) carry the send's
        ``SessionContext``. Tencent echoes it there only once its support enables it for the account (the SDK's
        ``PullSmsSendStatus.SessionContext``: "默认为空，如需开通请联系腾讯云短信小助手"), so by default they do
        not, and a client must match reports by ``SerialNo``/``sid``. ``SendSms``'s own answer echoes it always.
        Read when an item is built: when a status is queued, pulled by number, or a report is made."""
        self._credentials = {secret_id: secret_key, **(extra_credentials or {})}
        self._bind = (host, port)
        self._clock = clock
        self._auth_clock = auth_clock
        self._offset = 0.0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._sends: list[RecordedSend] = []
        self._calls: list[CallRecord] = []
        self._history: dict[str, list[tuple[float, str]]] = {}
        self._accepted_per_day: dict[date, int] = {}
        """Accepted messages per China calendar day, for the account-wide cap."""
        self._replies: deque[dict[str, Any]] = deque()
        self._send_statuses: deque[dict[str, Any]] = deque()
        self._statuses: dict[str, _Status] = {}
        """Each send's status by ``SerialNo``; a send without one has no status yet."""
        self._number_faults: dict[str, list[_Fault]] = {}
        self._request_faults: list[_Fault] = []
        self._http_faults: list[_Fault] = []
        self._slow_faults: list[_Fault] = []
        self._drop_faults: list[_Fault] = []
        self._garble_faults: list[_Fault] = []
        self._blacklist: dict[str, BlacklistSource] = {}
        self._serial = 0
        self._server: _Server | None = None
        self._refused_port: int | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> FakeTencentSms:
        if self._server is not None or self._refused_port is not None:
            return self
        self._listen(self._bind)
        return self

    def _listen(self, address: tuple[str, int]) -> None:
        self._closing.clear()
        server = _Server(address, _Handler)
        server.fake = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def _close_listener(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            server.drop_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def stop(self) -> None:
        self._closing.set()
        self._refused_port = None
        self._close_listener()

    def refuse_connections(self) -> None:
        """Close the listening socket (and every open connection, as a server going down does) so that connecting
        to :attr:`endpoint` fails with ECONNREFUSED, until :meth:`accept_connections` listens on the same port again.
        The SDK answers ``ClientNetworkError`` (urllib3's ``NewConnectionError`` in the chain); nothing reaches the
        fake, so nothing is recorded. Another process could take the port meanwhile: keep the refusal short."""
        with self._lock:
            if self._server is None:
                return
            self._refused_port = int(self._server.server_address[1])
        self._close_listener()

    def accept_connections(self) -> None:
        """Listen again on the port :meth:`refuse_connections` closed (no-op when not refusing)."""
        port, self._refused_port = self._refused_port, None
        if port is not None:
            self._listen((self._bind[0], port))

    @contextmanager
    def refused(self) -> Iterator[None]:
        """``with fake.refused(): ...``: :meth:`refuse_connections` for the block, then :meth:`accept_connections`."""
        self.refuse_connections()
        try:
            yield
        finally:
            self.accept_connections()

    def __enter__(self) -> FakeTencentSms:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The listening port (also while :meth:`refuse_connections` has closed it)."""
        if self._refused_port is not None:
            return self._refused_port
        if self._server is None:
            raise RuntimeError("the fake is not running")
        return int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        """``host:port`` for ``HttpProfile(endpoint=...)``."""
        return f"{self._bind[0]}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    # ------------------------------------------------------------ time

    def now(self) -> float:
        """The fake's clock: ``clock()`` plus everything :meth:`advance` added."""
        return self._clock() + self._offset

    def advance(self, seconds: float) -> None:
        """Move the fake's clock forward (frequency windows, marketing hours), not the signature check's."""
        with self._lock:
            self._offset += seconds

    # ------------------------------------------------------------ inspection

    @property
    def sends(self) -> list[RecordedSend]:
        with self._lock:
            return list(self._sends)

    @property
    def calls(self) -> list[CallRecord]:
        with self._lock:
            return list(self._calls)

    def reset(self) -> None:
        """Forget sends, calls, frequency history, queues, faults and the blacklist."""
        with self._lock:
            self._sends.clear()
            self._calls.clear()
            self._history.clear()
            self._accepted_per_day.clear()
            self._replies.clear()
            self._send_statuses.clear()
            self._statuses.clear()
            self._number_faults.clear()
            self._request_faults.clear()
            self._http_faults.clear()
            self._slow_faults.clear()
            self._drop_faults.clear()
            self._garble_faults.clear()
            self._blacklist.clear()
            self._offset = 0.0

    # ------------------------------------------------------------ faults

    def fail_number(self, phone_number: str, code: str, message: str | None = None, *, times: int | None = 1) -> None:
        """The next ``times`` sends to this number (None: all) get this per-number ``Code`` in ``SendStatusSet``."""
        with self._lock:
            self._number_faults.setdefault(phone_number, []).append(
                _Fault(remaining=times, action="SendSms", code=code, message=message or MESSAGES.get(code, code))
            )

    def fail_requests(
        self, code: str, message: str | None = None, *, times: int | None = 1, action: str | None = "SendSms"
    ) -> None:
        """The next ``times`` authenticated requests (of ``action``; None: any) answer this error envelope."""
        with self._lock:
            self._request_faults.append(
                _Fault(remaining=times, action=action, code=code, message=message or MESSAGES.get(code, code))
            )

    def http_error(
        self,
        status: int = 500,
        *,
        times: int | None = 1,
        action: str | None = "SendSms",
        body: bytes = b"<html><body><h1>502 Bad Gateway</h1></body></html>",
    ) -> None:
        """The next ``times`` requests get this HTTP status (before authentication, nothing is processed)."""
        with self._lock:
            self._http_faults.append(_Fault(remaining=times, action=action, status=status, body=body))

    def slow(
        self, seconds: float, *, times: int | None = 1, action: str | None = "SendSms", after_processing: bool = True
    ) -> None:
        """Delay the next ``times`` answers. ``after_processing`` (default): the request is processed (a send is
        accepted and recorded) and only the answer is late, which is the ambiguous case a client timeout creates."""
        with self._lock:
            self._slow_faults.append(
                _Fault(remaining=times, action=action, seconds=seconds, after_processing=after_processing)
            )

    def disconnect(
        self,
        *,
        times: int | None = 1,
        action: str | None = "SendSms",
        after_processing: bool = True,
        reset: bool = False,
    ) -> None:
        """Close the connection without an answer for the next ``times`` requests; ``after_processing`` (default):
        the request was processed first (a send is accepted and recorded), the other ambiguous network error.

        ``reset``: close with a TCP RST (``SO_LINGER`` 0) instead of a FIN, as a load balancer or firewall that
        drops the flow does. The SDK says ``ClientNetworkError`` either way; the chain under it differs
        (``ConnectionResetError`` for a reset, ``RemoteDisconnected`` for a FIN)."""
        with self._lock:
            self._drop_faults.append(
                _Fault(remaining=times, action=action, after_processing=after_processing, reset=reset)
            )

    def garble(
        self, kind: GarbleKind, *, times: int | None = 1, action: str | None = "SendSms", after_processing: bool = True
    ) -> None:
        """Answer the next ``times`` requests with HTTP 200 and a body the SDK cannot read, as a proxy, WAF or
        captive portal in between might:

        - ``truncated``: ``Content-Type: application/json``, a ``Content-Length`` larger than the bytes sent (the
          first half of the real answer), then the connection closes: the SDK raises ``ChunkedEncodingError``;
        - ``not_json``: ``application/json`` and a body that is not JSON: the SDK raises ``JSONDecodeError``;
        - ``html``: ``text/html`` and an HTML page: the SDK raises ``JSONDecodeError`` too.

        (The SDK wraps any exception as ``TencentCloudSDKException(type(e).__name__, str(e))``, so those are the
        ``code`` values; no ``requestId``.) ``after_processing`` (default): the request was processed first (a send
        accepted and recorded, the call recorded): the ambiguous case; otherwise nothing is processed."""
        with self._lock:
            self._garble_faults.append(
                _Fault(remaining=times, action=action, after_processing=after_processing, garble=kind)
            )

    def blacklist(self, phone_number: str, source: BlacklistSource = "customer") -> None:
        """Sends to this number answer the per-number ``Code`` ``FailedOperation.PhoneNumberInBlacklist`` (with
        Tencent's one message for both sources) until :meth:`unblacklist`. ``source`` is kept in each refusing
        call's :attr:`CallRecord.blacklisted`: the customer's own unsubscribe is an opt-out smsbot should honour,
        a carrier's list is not the customer's word, and Tencent's answer does not say which."""
        with self._lock:
            self._blacklist[phone_number] = source

    def unblacklist(self, phone_number: str) -> None:
        """Sends to this number go through again (the customer resubscribed, the carrier lifted it)."""
        with self._lock:
            self._blacklist.pop(phone_number, None)

    @property
    def blacklisted(self) -> dict[str, BlacklistSource]:
        """The numbers :meth:`blacklist` holds, and why."""
        with self._lock:
            return dict(self._blacklist)

    def clear_faults(self) -> None:
        with self._lock:
            self._number_faults.clear()
            self._request_faults.clear()
            self._http_faults.clear()
            self._slow_faults.clear()
            self._drop_faults.clear()
            self._garble_faults.clear()

    @staticmethod
    def _take(faults: list[_Fault], action: str) -> _Fault | None:
        for fault in faults:
            if fault.matches(action):
                if fault.remaining is not None:
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        faults.remove(fault)
                return fault
        return None

    # ------------------------------------------------------------ replies, send statuses, delivery reports

    def enqueue_reply(
        self,
        phone_number: str,
        content: str,
        *,
        sign_name: str = "",
        extend_code: str = "",
        reply_time: int | None = None,
    ) -> dict[str, Any]:
        """Queue a customer reply for ``PullSmsReplyStatus`` (each is pulled once)."""
        split = split_e164(phone_number)
        if split is None:
            raise ValueError(f"not an E.164 number: {phone_number!r}")
        item = {
            "CountryCode": split[0],
            "ReplyContent": content,
            "SubscriberNumber": split[1],
            "ExtendCode": extend_code,
            "ReplyTime": int(self.now()) if reply_time is None else reply_time,
            "PhoneNumber": phone_number,
            "SignName": sign_name,
        }
        with self._lock:
            self._replies.append(item)
        return item

    def enqueue_send_status(
        self,
        send: RecordedSend,
        *,
        status: Literal["SUCCESS", "FAIL"] = "SUCCESS",
        description: str | None = None,
        receive_time: int | None = None,
    ) -> dict[str, Any]:
        """Queue a delivery status for ``PullSmsSendStatus`` (done automatically per send when ``report_sends``),
        which hands each out once; it is also the send's status for ``PullSmsSendStatusByPhoneNumber``."""
        when = int(self.now()) if receive_time is None else receive_time
        item = self._send_status_item(send, status, description, when)
        with self._lock:
            self._send_statuses.append(item)
            self._statuses[send.serial_no] = _Status(status, description, when)
        return item

    def set_send_status(
        self,
        send: RecordedSend,
        status: Literal["SUCCESS", "FAIL"] | None,
        *,
        description: str | None = None,
        receive_time: int | None = None,
    ) -> None:
        """What ``PullSmsSendStatusByPhoneNumber`` says of this send from now on: ``SUCCESS`` or ``FAIL``, or None
        for "no status yet" (the carrier has not reported: the send is absent from the answer, as Tencent's note
        "仅当运营商有返回短信接收状态时回包中才会有状态数据" says). Queues nothing for ``PullSmsSendStatus``."""
        with self._lock:
            if status is None:
                self._statuses.pop(send.serial_no, None)
            else:
                when = int(self.now()) if receive_time is None else receive_time
                self._statuses[send.serial_no] = _Status(status, description, when)

    def _send_status_item(
        self, send: RecordedSend, status: str, description: str | None, receive_time: int
    ) -> dict[str, Any]:
        """A ``PullSmsSendStatus`` item (both pull actions answer them)."""
        return {
            "UserReceiveTime": receive_time,
            "CountryCode": send.country_code,
            "SubscriberNumber": send.subscriber_number,
            "PhoneNumber": send.phone_number,
            "SerialNo": send.serial_no,
            "ReportStatus": status,
            "Description": description or ("用户短信接收成功" if status == "SUCCESS" else "用户短信接收失败"),
            "SessionContext": send.session_context if self.echo_session_context else "",
        }

    def delivery_report(
        self,
        send: RecordedSend,
        *,
        status: Literal["SUCCESS", "FAIL"] = "SUCCESS",
        errmsg: str | None = None,
        description: str | None = None,
        receive_time: datetime | None = None,
    ) -> dict[str, Any]:
        """One item of the "SMS delivery status" callback for this send: the seven documented fields, plus ``ext``
        (the send's ``SessionContext``) only when :attr:`echo_session_context` is on and it is not empty."""
        when = receive_time or datetime.fromtimestamp(self.now(), UTC)
        item: dict[str, Any] = {
            "user_receive_time": when.astimezone(CHINA_TZ).strftime("%Y-%m-%d %H:%M:%S"),
            "nationcode": send.country_code,
            "mobile": send.subscriber_number,
            "report_status": status,
            "errmsg": errmsg or ("DELIVRD" if status == "SUCCESS" else "UNDELIV"),
            "description": description or ("用户短信送达成功" if status == "SUCCESS" else "用户短信未送达"),
            "sid": send.serial_no,
        }
        if self.echo_session_context and send.session_context:
            item["ext"] = send.session_context
        return item

    def odd_delivery_report(
        self,
        send: RecordedSend,
        kind: OddReportKind,
        *,
        status: Literal["SUCCESS", "FAIL"] = "SUCCESS",
    ) -> Any:
        """One item of the delivery-status callback for this send, bent the way Tencent (its documents are thin on
        types and optional fields) or a broken proxy in between might post it; see :data:`ODD_REPORT_KINDS`.

        Mix them with good items in one batch: ``[fake.delivery_report(a), fake.odd_delivery_report(b, "no_sid")]``.
        The ``ext`` kinds carry an ``ext`` whatever :attr:`echo_session_context` says (the point is its type)."""
        item = self.delivery_report(send, status=status)
        context = send.session_context
        if kind == "extra_fields":
            return {**item, "sign": send.sign_name or "", "fee": send.fee, "report_time": item["user_receive_time"]}
        if kind == "ext_number":
            return {**item, "ext": int(context) if context.isdigit() else 42}
        if kind == "ext_object":
            return {**item, "ext": {"SessionContext": context}}
        if kind == "ext_array":
            return {**item, "ext": [context]}
        if kind == "ext_null":
            return {**item, "ext": None}
        if kind == "status_lower":
            return {**item, "report_status": status.lower()}
        if kind == "status_mixed":
            return {**item, "report_status": status.capitalize()}
        if kind == "no_optional":
            return {k: v for k, v in item.items() if k not in ("errmsg", "description", "ext")}
        if kind == "minimal":
            return {"sid": item["sid"], "report_status": item["report_status"]}
        if kind == "no_sid":
            return {k: v for k, v in item.items() if k != "sid"}
        if kind == "not_object":
            return json.dumps(item, ensure_ascii=False)  # the item encoded twice: a string inside the array
        if kind == "unknown_sid":
            return {**item, "sid": f"5000:{secrets.randbelow(10**19):019d}000000000"}
        raise ValueError(f"unknown kind of odd delivery report: {kind!r}")

    def odd_delivery_reports(
        self, send: RecordedSend, kinds: Iterable[OddReportKind] = (), *, status: Literal["SUCCESS", "FAIL"] = "SUCCESS"
    ) -> dict[OddReportKind, Any]:
        """Every odd variant (or those of ``kinds``) of this send's report, by kind (for parametrised tests)."""
        return {kind: self.odd_delivery_report(send, kind, status=status) for kind in tuple(kinds) or ODD_REPORT_KINDS}

    @staticmethod
    def push_delivery_reports(
        url: str, items: Sequence[Any], *, timeout: float = 5.0, retries: int = 0
    ) -> tuple[int, bytes]:
        """POST the delivery-status callback (a JSON array, at most 100 items) to ``url`` like Tencent does.

        Retries up to ``retries`` more times (Tencent: 2) when the answer is not HTTP 200 with ``result`` 0.
        Proxies from the environment are ignored. Returns the last (status, body)."""
        if len(items) > 100:
            raise ValueError("Tencent pushes at most 100 delivery reports per request")
        data = json.dumps(list(items), ensure_ascii=False).encode("utf-8")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        status, body = 0, b""
        for _ in range(retries + 1):
            request = urllib.request.Request(
                url, data=data, method="POST", headers={"Content-Type": "application/json"}
            )
            try:
                with opener.open(request, timeout=timeout) as response:
                    status, body = int(response.status), response.read()
            except urllib.error.HTTPError as e:
                status, body = e.code, e.read()
            except OSError as e:
                status, body = 0, str(e).encode()
            if status == 200:
                try:
                    if json.loads(body).get("result") == 0:
                        break
                except (ValueError, AttributeError):
                    pass
        return status, body

    # ------------------------------------------------------------ request handling

    def handle_http(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> _Reply:
        """Answer one HTTP request (``headers`` with lower-case names). Runs on the server's handler threads."""
        received_at = time.time()
        if method == "GET" and path.startswith("/_fake/"):
            return self._control(path)
        action = headers.get("x-tc-action", "")
        with self._lock:
            http_fault = self._take(self._http_faults, action)
            slow = self._take(self._slow_faults, action)
            drop = self._take(self._drop_faults, action)
            garble = self._take(self._garble_faults, action)
        request_id = str(uuid.uuid4())
        blacklisted: dict[str, BlacklistSource] = {}
        if http_fault is not None:
            return _Reply(http_fault.status, "text/html", http_fault.body)
        if drop is not None and not drop.after_processing:
            return _Reply(0, "", b"", drop=True, reset=drop.reset)
        if garble is not None and garble.garble is not None and not garble.after_processing:
            unprocessed = json.dumps({"Response": {"RequestId": request_id}}).encode()
            return _garbled(garble.garble, unprocessed)
        if slow is not None and not slow.after_processing:
            self._closing.wait(slow.seconds)
        params: dict[str, Any] | None = None
        try:
            params = self._authenticate(method, path, headers, body)
            with self._lock:
                fault = self._take(self._request_faults, action)
            if fault is not None:
                raise ApiError(fault.code, fault.message)
            result = self._dispatch(action, params, request_id, received_at, blacklisted)
            response: dict[str, Any] = {**result, "RequestId": request_id}
            error_code = None
        except ApiError as e:
            response = {"Error": {"Code": e.code, "Message": e.message}, "RequestId": request_id}
            error_code = e.code
        with self._lock:
            self._calls.append(CallRecord(action, params, error_code, request_id, received_at, blacklisted))
        if slow is not None and slow.after_processing:
            self._closing.wait(slow.seconds)
        if drop is not None:
            return _Reply(0, "", b"", drop=True, reset=drop.reset)
        payload = json.dumps({"Response": response}, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        if garble is not None and garble.garble is not None:
            return _garbled(garble.garble, payload)
        return _Reply(200, JSON_CONTENT_TYPE, payload)

    def _control(self, path: str) -> _Reply:
        if path == "/_fake/health":
            body: Any = {"ok": True}
        elif path == "/_fake/sends":
            body = [asdict(s) for s in self.sends]
        elif path == "/_fake/sends/count":
            with self._lock:
                body = {"count": len(self._sends)}
        else:
            return _Reply(404, "text/plain", b"not found")
        return _Reply(200, JSON_CONTENT_TYPE, json.dumps(body, ensure_ascii=False).encode("utf-8"))

    def _authenticate(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
        """Check the envelope and the TC3 signature; returns the parsed JSON parameters."""
        if method != "POST":
            raise ApiError("UnsupportedProtocol", f"The fake only supports POST requests, not {method}.")
        if path.split("?", 1)[0] != "/":
            raise ApiError("InvalidParameter", f"The request path `{path}` is not valid; it should be `/`.")
        action = headers.get("x-tc-action")
        if not action:
            raise _missing("Action")
        version = headers.get("x-tc-version")
        if not version:
            raise _missing("Version")
        if action not in KNOWN_SMS_ACTIONS:
            raise ApiError("InvalidAction", f"The action `{action}` is not found in the service `{SERVICE}`.")
        if version != API_VERSION:
            raise ApiError("NoSuchVersion", f"The API version `{version}` is not supported by the fake.")
        raw_ts = headers.get("x-tc-timestamp")
        if not raw_ts:
            raise _missing("Timestamp")
        if not raw_ts.isdigit():
            raise ApiError(
                "InvalidParameter", "The value type of parameter `Timestamp` is not valid; it should be Integer."
            )
        if not headers.get("x-tc-region"):
            raise _missing("Region")
        authorization = headers.get("authorization")
        if not authorization:
            raise ApiError("AuthFailure.InvalidAuthorization", "The request is missing the `Authorization` header.")
        match = _AUTH.match(authorization.strip())
        if match is None:
            raise ApiError("AuthFailure.InvalidAuthorization")
        secret_key = self._credentials.get(match["id"])
        if secret_key is None:
            raise ApiError("AuthFailure.SecretIdNotFound")
        timestamp = int(raw_ts)
        if abs(self._auth_clock() - timestamp) > MAX_CLOCK_SKEW_SECONDS:
            raise ApiError("AuthFailure.SignatureExpire")
        signed_headers = match["signed"].split(";")
        if (
            "content-type" not in signed_headers
            or "host" not in signed_headers
            or signed_headers != sorted(signed_headers)
            or any(h not in headers for h in signed_headers)
            or match["service"] != SERVICE
            or match["date"] != datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d")
        ):
            raise ApiError("AuthFailure.SignatureFailure")
        payload_hash = (
            "UNSIGNED-PAYLOAD"
            if headers.get("x-tc-content-sha256") == "UNSIGNED-PAYLOAD"
            else hashlib.sha256(body).hexdigest()
        )
        string_to_sign = tc3_string_to_sign(
            method=method,
            path="/",
            query="",
            headers=headers,
            signed_headers=signed_headers,
            payload_hash=payload_hash,
            timestamp=raw_ts,
            date=match["date"],
        )
        expected = tc3_signature(secret_key, match["date"], SERVICE, string_to_sign)
        if not hmac.compare_digest(expected, match["sig"]):
            raise ApiError("AuthFailure.SignatureFailure")
        content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type != JSON_CONTENT_TYPE:
            raise ApiError(
                "InvalidParameter", f"The Content-Type `{content_type}` is not supported; use application/json."
            )
        try:
            params = json.loads(body.decode("utf-8")) if body.strip() else {}
        except (UnicodeDecodeError, ValueError) as e:
            raise ApiError("InvalidParameter", f"The request body is not valid JSON: {e}.") from None
        if not isinstance(params, dict):
            raise ApiError("InvalidParameter", "The request body should be a JSON object.")
        unknown = sorted(set(params) - KNOWN_PARAMS.get(action, frozenset(params)))
        if unknown:
            raise ApiError("UnknownParameter", f"The parameter `{unknown[0]}` is not recognized.")
        return cast(dict[str, Any], params)

    def _dispatch(
        self,
        action: str,
        params: dict[str, Any],
        request_id: str,
        received_at: float,
        blacklisted: dict[str, BlacklistSource],
    ) -> dict[str, Any]:
        if action == "SendSms":
            return self._send_sms(params, request_id, received_at, blacklisted)
        if action == "PullSmsReplyStatus":
            return {"PullSmsReplyStatusSet": self._pull(params, self._replies)}
        if action == "PullSmsSendStatus":
            return {"PullSmsSendStatusSet": self._pull(params, self._send_statuses)}
        if action == "PullSmsSendStatusByPhoneNumber":
            return {"PullSmsSendStatusSet": self._pull_statuses_by_number(params)}
        if action == "DescribeSmsTemplateList":
            return self._describe_templates(params)
        raise ApiError("UnsupportedOperation", f"The action `{action}` is not implemented by the fake.")

    def _check_app_id(self, params: Mapping[str, Any]) -> None:
        app_id = _get_str(params, "SmsSdkAppId", required=True)
        if app_id != self.app_id:
            raise ApiError("UnauthorizedOperation.SmsSdkAppIdVerifyFail")

    def _pull(self, params: Mapping[str, Any], queue: deque[dict[str, Any]]) -> list[dict[str, Any]]:
        limit = _get_int(params, "Limit", required=True)
        self._check_app_id(params)
        assert limit is not None
        if not 0 < limit <= MAX_PULL_LIMIT:
            raise ApiError("InvalidParameterValue.LimitVerifyFail")
        with self._lock:
            return [queue.popleft() for _ in range(min(limit, len(queue)))]

    def _pull_statuses_by_number(self, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The statuses of the accepted sends to ``PhoneNumber`` sent in [BeginTime, EndTime] (seconds, both ends
        included; EndTime defaults to now), oldest first, ``Offset``/``Limit`` applied. Nothing is consumed, unlike
        ``PullSmsSendStatus``; a send with no status yet (:meth:`set_send_status` None) is absent.

        Tencent's documents say "Offset: 目前固定设置为0" (fixed at 0 for now) without saying what another value does:
        the fake pages by it, so do not rely on that against Tencent."""
        begin = _required_int(params, "BeginTime")
        offset = _required_int(params, "Offset")
        limit = _required_int(params, "Limit")
        number = _get_str(params, "PhoneNumber", required=True) or ""
        self._check_app_id(params)
        end = _get_int(params, "EndTime", required=False)
        if not 0 < limit <= MAX_PULL_LIMIT:
            raise ApiError("InvalidParameterValue.LimitVerifyFail")
        if offset < 0:
            raise ApiError("InvalidParameterValue.OffsetVerifyFail")
        now = self.now()
        if begin < now - MAX_PULL_BY_NUMBER_DAYS * 86400:
            raise ApiError("InvalidParameterValue.BeginTimeVerifyFail")
        if end is not None and end < begin:
            raise ApiError("InvalidParameterValue.EndTimeVerifyFail")
        if split_e164(number) is None:
            raise ApiError("FailedOperation.PhoneNumberParseFail")
        last = math.floor(now) if end is None else end
        with self._lock:
            found = [
                (send, self._statuses[send.serial_no])
                for send in self._sends
                if send.phone_number == number
                and begin <= math.floor(send.sent_at) <= last
                and send.serial_no in self._statuses
            ]
        page = found[offset : offset + limit]
        return [self._send_status_item(send, st.status, st.description, st.receive_time) for send, st in page]

    def _describe_templates(self, params: Mapping[str, Any]) -> dict[str, Any]:
        international = _get_int(params, "International", required=True)
        if international not in (0, 1):
            raise ApiError("InvalidParameterValue.InvalidInternational")
        ids = params.get("TemplateIdSet")
        limit = _get_int(params, "Limit", required=False)
        offset = _get_int(params, "Offset", required=False)
        candidates = sorted(
            ((tid, t) for tid, t in self.templates.items() if t.serves(domestic=international == 0)),
            key=lambda item: (len(item[0]), item[0]),
        )
        if ids:
            if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise ApiError(
                    "InvalidParameter",
                    "The value type of parameter `TemplateIdSet` is not valid; it should be Array of Integer.",
                )
            wanted = {str(i) for i in ids}
            chosen = [(tid, t) for tid, t in candidates if tid in wanted]
        else:
            if limit is None:
                raise _missing("Limit")
            if offset is None:
                raise _missing("Offset")
            if not 0 < limit <= MAX_PULL_LIMIT:
                raise ApiError("InvalidParameterValue.LimitVerifyFail")
            if offset < 0:
                raise ApiError("InvalidParameterValue.OffsetVerifyFail")
            chosen = candidates[offset : offset + limit]
        return {
            "DescribeTemplateStatusSet": [
                {
                    "TemplateId": int(tid) if tid.isdigit() else tid,
                    "International": t.international_code,
                    "StatusCode": _STATUS_CODES[t.status],
                    "ReviewReply": t.review_reply,
                    "TemplateName": t.name or f"template {tid}",
                    "CreateTime": t.create_time,
                    "TemplateContent": t.content,
                }
                for tid, t in chosen
            ]
        }

    def _send_sms(
        self,
        params: Mapping[str, Any],
        request_id: str,
        received_at: float,
        blacklisted: dict[str, BlacklistSource],
    ) -> dict[str, Any]:
        numbers = _get_str_list(params, "PhoneNumberSet", required=True)
        _get_str(params, "SmsSdkAppId", required=True)
        template_id = _get_str(params, "TemplateId", required=True)
        sign_name = _get_str(params, "SignName", required=False)
        template_params = _get_str_list(params, "TemplateParamSet", required=False) or []
        extend_code = _get_str(params, "ExtendCode", required=False)
        session_context = _get_str(params, "SessionContext", required=False) or ""
        sender_id = _get_str(params, "SenderId", required=False)
        assert numbers is not None
        assert template_id is not None
        if not numbers:
            raise ApiError("MissingParameter.EmptyPhoneNumberSet")
        if len(numbers) > MAX_PHONE_NUMBERS:
            raise ApiError("LimitExceeded.PhoneNumberCountLimit")
        self._check_app_id(params)
        if len(session_context.encode("utf-8")) > MAX_SESSION_CONTEXT_BYTES:
            raise ApiError("InvalidParameter", "The length of parameter `SessionContext` exceeds 512 bytes.")
        if extend_code is not None and not re.fullmatch(r"\d{0,12}", extend_code):
            raise ApiError("InvalidParameter", "The parameter `ExtendCode` should consist of digits.")

        parsed = {n: split_e164(n) for n in numbers}
        domestic = {split[0] == "86" for split in parsed.values() if split is not None}
        if len(domestic) > 1:
            raise ApiError("UnsupportedOperation.ContainDomesticAndInternationalPhoneNumber")
        is_domestic = domestic != {False}

        template = self.templates.get(template_id)
        if template is None or template.status != "approved":
            raise ApiError("FailedOperation.TemplateIncorrectOrUnapproved")
        if domestic == {True} and not template.serves(domestic=True):
            raise ApiError("UnsupportedOperation.GlobalTemplateToChineseMainlandPhone")
        if domestic == {False} and not template.serves(domestic=False):
            raise ApiError("UnsupportedOperation.ChineseMainlandTemplateToGlobalPhone")
        if is_domestic and (not sign_name or sign_name not in self.signatures):
            raise ApiError("FailedOperation.SignatureIncorrectOrUnapproved")
        if len(template_params) != template.placeholders:
            raise ApiError("FailedOperation.TemplateParamSetNotMatchApprovedTemplate")
        for value in template_params:
            if template.kind == "verification":
                if not re.fullmatch(r"\d{0,6}", value):
                    raise ApiError("InvalidParameterValue.TemplateParameterFormatError")
                continue
            if _URL.search(value):
                raise ApiError("InvalidParameterValue.ProhibitedUseUrlInTemplateParameter")
            if len(value) > self.param_max_length:
                raise ApiError("InvalidParameterValue.TemplateParameterLengthLimit")
        now = self.now()
        if template.kind == "marketing" and is_domestic and not 8 <= datetime.fromtimestamp(now, CHINA_TZ).hour < 22:
            raise ApiError("FailedOperation.MarketingSendTimeConstraint")

        text = template.render(template_params)
        content = f"【{sign_name}】{text}" if is_domestic and sign_name else text
        fee = segments(content)
        statuses: list[dict[str, Any]] = []
        accepted: list[RecordedSend] = []
        with self._lock:
            for number in numbers:
                split = parsed[number]
                entry: dict[str, Any] = {
                    "SerialNo": "",
                    "PhoneNumber": number,
                    "Fee": 0,
                    "SessionContext": session_context,
                    "Code": "Ok",
                    "Message": "send success",
                    "IsoCode": iso_code(split[0]) if split else "",
                }
                code = self._number_outcome(number, split, content, now)
                if number in self._blacklist and code == self._BLACKLISTED:
                    blacklisted[number] = self._blacklist[number]
                if code is not None:
                    entry["Code"], entry["Message"] = code
                else:
                    assert split is not None
                    self._serial += 1
                    serial = f"5000:{secrets.randbelow(10**19):019d}{self._serial:09d}"
                    send = RecordedSend(
                        serial_no=serial,
                        phone_number=number,
                        country_code=split[0],
                        subscriber_number=split[1],
                        iso_code=entry["IsoCode"],
                        sms_sdk_app_id=self.app_id,
                        template_id=template_id,
                        sign_name=sign_name,
                        template_params=tuple(template_params),
                        text=text,
                        content=content,
                        fee=fee,
                        session_context=session_context,
                        extend_code=extend_code,
                        sender_id=sender_id,
                        request_id=request_id,
                        received_at=received_at,
                        sent_at=now,
                    )
                    self._sends.append(send)
                    self._history.setdefault(number, []).append((now, content))
                    day = datetime.fromtimestamp(now, CHINA_TZ).date()
                    self._accepted_per_day[day] = self._accepted_per_day.get(day, 0) + 1
                    accepted.append(send)
                    entry["SerialNo"], entry["Fee"] = serial, fee
                statuses.append(entry)
        if self.report_sends:
            for send in accepted:
                self.enqueue_send_status(send)
        return {"SendStatusSet": statuses}

    _BLACKLISTED = ("FailedOperation.PhoneNumberInBlacklist", MESSAGES["FailedOperation.PhoneNumberInBlacklist"])

    def _number_outcome(
        self, number: str, split: tuple[str, str] | None, content: str, now: float
    ) -> tuple[str, str] | None:
        """(Code, Message) for a number that is not sent, None to send. Called with the lock held."""
        if split is None:
            return "FailedOperation.PhoneNumberParseFail", MESSAGES["FailedOperation.PhoneNumberParseFail"]
        if split[0] == "86" and not re.fullmatch(r"1[3-9]\d{9}", split[1]):
            return "InvalidParameterValue.IncorrectPhoneNumber", MESSAGES["InvalidParameterValue.IncorrectPhoneNumber"]
        fault = self._take(self._number_faults.get(number, []), "SendSms")
        if fault is not None:
            return fault.code, fault.message
        if number in self._blacklist:
            return self._BLACKLISTED
        day = datetime.fromtimestamp(now, CHINA_TZ).date()
        cap = self.account_daily_limit
        if cap is not None and self._accepted_per_day.get(day, 0) >= cap:
            return self.account_daily_limit_code, MESSAGES.get(
                self.account_daily_limit_code, self.account_daily_limit_code
            )
        limits = self.limits
        history = self._history.get(number, [])
        today = [c for t, c in history if datetime.fromtimestamp(t, CHINA_TZ).date() == day]
        code: str | None = None
        if limits.same_content_seconds is not None and any(
            c == content and now - t < limits.same_content_seconds for t, c in history
        ):
            code = "LimitExceeded.PhoneNumberThirtySecondLimit"
        elif limits.per_hour is not None and sum(1 for t, _ in history if now - t < 3600) >= limits.per_hour:
            code = "LimitExceeded.PhoneNumberOneHourLimit"
        elif limits.per_day is not None and len(today) >= limits.per_day:
            code = "LimitExceeded.PhoneNumberDailyLimit"
        elif limits.same_content_per_day is not None and today.count(content) >= limits.same_content_per_day:
            code = "LimitExceeded.PhoneNumberSameContentDailyLimit"
        return None if code is None else (code, MESSAGES[code])


# --------------------------------------------------------------------------- HTTP plumbing


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeTencentSms

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        self.closed = False

    def drop_connections(self) -> None:
        """Shut every open connection (idle keep-alive ones too): a refused fake must not answer on old ones."""
        with self.connections_lock:
            self.closed = True
            connections = list(self.connections)
        for connection in connections:
            with suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stalls
    server_version = "FakeTencentSms/1.0"
    sys_version = ""

    _reset = False
    """Close this connection with a TCP RST (SO_LINGER 0) instead of a FIN when the handler is done."""

    def log_message(self, format: str, *args: Any) -> None:
        return

    def setup(self) -> None:
        super().setup()
        server = cast(_Server, self.server)
        with server.connections_lock:
            if not server.closed:
                server.connections.add(self.connection)
                return
        with suppress(OSError):  # accepted in the instant the fake began refusing: refuse this one too
            self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            server = cast(_Server, self.server)
            with server.connections_lock:
                server.connections.discard(self.connection)
            if self._reset:
                # Without this, socketserver's shutdown_request would send a FIN first (shutdown(SHUT_WR)).
                self.connection.close()

    def _handle(self) -> None:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = self._read_chunked()
        else:
            body = self.rfile.read(int(length)) if length and length.isdigit() else b""
        server = cast(_Server, self.server)
        if server.closed:  # a request on a connection opened before refuse_connections(): never processed
            self.close_connection = True
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        reply = server.fake.handle_http(self.command, self.path, headers, body)
        if reply.reset:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self._reset = True
        if reply.drop or reply.reset:
            self.close_connection = True
            return
        declared = len(reply.body) if reply.content_length is None else reply.content_length
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(declared))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(reply.body)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        if declared != len(reply.body):
            self.close_connection = True  # the promised rest never comes: close, as a proxy that gave up would

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline()

    def do_POST(self) -> None:
        self._handle()

    def do_GET(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()


# --------------------------------------------------------------------------- command line


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.fakes.tencent_sms", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument("--secret-id", required=True)
    parser.add_argument("--secret-key", required=True)
    parser.add_argument("--app-id", default="1400006666")
    parser.add_argument(
        "--template", action="append", default=[], metavar="ID=TEXT", help="an approved template (repeatable)"
    )
    parser.add_argument("--signature", action="append", default=[], help="an approved signature (repeatable)")
    parser.add_argument("--param-max-length", type=int, default=6)
    parser.add_argument("--no-limits", action="store_true", help="disable the per-number frequency limits")
    parser.add_argument(
        "--account-daily-limit",
        type=int,
        default=None,
        metavar="N",
        help="messages the application may send per China day, then LimitExceeded.AppDailyLimit (default: no cap)",
    )
    parser.add_argument(
        "--echo-session-context",
        action="store_true",
        help="echo SessionContext in pulled send statuses and delivery reports (Tencent: only once support enables it)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    templates: dict[str, str | FakeTemplate] = {}
    for spec in args.template:
        tid, sep, text = spec.partition("=")
        if not sep:
            raise SystemExit(f"--template wants ID=TEXT, got {spec!r}")
        templates[tid] = text
    fake = FakeTencentSms(
        secret_id=args.secret_id,
        secret_key=args.secret_key,
        app_id=args.app_id,
        templates=templates,
        signatures=args.signature,
        param_max_length=args.param_max_length,
        limits=FrequencyLimits.disabled() if args.no_limits else None,
        account_daily_limit=args.account_daily_limit,
        echo_session_context=args.echo_session_context,
        host=args.host,
        port=args.port,
    )
    stop = threading.Event()

    def _on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    with fake:
        print(fake.url, flush=True)
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
