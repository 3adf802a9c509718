"""Tencent's pull APIs, for deployments Tencent cannot call back.

A server without a public URL never receives the "SMS Reply" and "SMS
delivery status" callbacks; Tencent keeps both in queues that
``PullSmsReplyStatus`` and ``PullSmsSendStatus`` hand out instead. This module
is the vendor side of pulling: the SDK client, and the conversions that turn
each pulled item into exactly the payload the callback would have carried
(through the callback's own parser), so the rest of smsbot cannot tell the two
paths apart. The loop that stores what is pulled is ``bot/runtime/pulling.py``.
``PullSmsSendStatusByPhoneNumber`` (one number's statuses in a time window,
nothing consumed) is here too: ``bot/delivery/reconcile.py`` asks it about
ambiguous sends.

The SDK's own retries stay off: a pull is not idempotent, and a retried pull
after a lost answer would only hide that the first one's page is gone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from bot.numbers import format_china_time
from bot.sms import Inbound
from bot.tencent.callbacks import (
    EARLIEST,
    BadCallback,
    BadReport,
    StatusReport,
    parse_reply_callback,
    parse_status_item,
)
from bot.tencent.config import TencentConfig, sms_client

PULL_LIMIT = 100
"""Tencent's maximum page; a full page means more may be waiting."""

REPLY_FIELDS = {
    "nationcode": "CountryCode",
    "mobile": "SubscriberNumber",
    "sign": "SignName",
    "extend": "ExtendCode",
    "text": "ReplyContent",
    "time": "ReplyTime",
}
"""Callback field -> PullSmsReplyStatus field: the same reply under Tencent's two sets of names."""

REPORT_FIELDS = {
    "sid": "SerialNo",
    "report_status": "ReportStatus",
    "nationcode": "CountryCode",
    "mobile": "SubscriberNumber",
    "description": "Description",
    "ext": "SessionContext",
    "user_receive_time": "UserReceiveTime",
}
"""Delivery-status callback field -> PullSmsSendStatus field."""


class PulledItemRefused(ValueError):  # noqa: N818 - named for what the log reader sees
    """An item Tencent handed out that the callback route would refuse too, with the reason."""


# ====================================================================== conversions (pure)


def _tencent_names(message: str, names: Mapping[str, str]) -> str:
    """The parser's message with Tencent's pull field names, so the log points at the item's real fields."""
    return re.sub(r"'(\w+)'", lambda m: f"'{names.get(m.group(1), m.group(1))}'", message)


def reply_to_inbound(
    item: Mapping[str, Any], *, now: datetime, sign_aliases: Mapping[str, str] | None = None
) -> Inbound:
    """The ``Inbound`` the reply callback would give for this pulled reply, or PulledItemRefused.

    It goes through the callback's own parser so the dedupe key, the text
    cleaning and the checks cannot drift apart between the two paths.
    ``sign_aliases`` maps an approved SignName back to the signature the rules
    are keyed by (the reverse of ``tencent_sign_names``).
    """
    sign = item.get("SignName")
    if sign_aliases and isinstance(sign, str):
        sign = sign_aliases.get(sign.strip(), sign)
    callback = {
        "nationcode": item.get("CountryCode"),
        "mobile": item.get("SubscriberNumber"),
        "sign": sign,
        "extend": item.get("ExtendCode") or "",
        "text": item.get("ReplyContent"),
        "time": item.get("ReplyTime"),
    }
    try:
        [message] = parse_reply_callback(json.dumps(callback, ensure_ascii=False).encode(), now=now)
    except BadCallback as exc:
        raise PulledItemRefused(_tencent_names(str(exc), REPLY_FIELDS)) from exc
    return message


def china_time(unix_seconds: object) -> str | None:
    """A unix time as the delivery-status callback writes it (China time), or None when it is not one."""
    if isinstance(unix_seconds, bool) or not isinstance(unix_seconds, int) or unix_seconds < EARLIEST:
        return None
    return format_china_time(datetime.fromtimestamp(unix_seconds, UTC))


def send_status_to_report(item: Mapping[str, Any]) -> StatusReport:
    """The ``StatusReport`` the delivery-status callback would give for this pulled status, or PulledItemRefused.

    ``UserReceiveTime`` (unix seconds) becomes the callback's China-time text,
    which ``apply_reports`` reads back to the same instant, so one path applies
    both.
    """
    callback = {
        "sid": item.get("SerialNo"),
        "report_status": item.get("ReportStatus"),
        "user_receive_time": china_time(item.get("UserReceiveTime")),
        "nationcode": item.get("CountryCode"),
        "mobile": item.get("SubscriberNumber"),
        "description": item.get("Description"),
        "ext": item.get("SessionContext") or None,
    }
    try:
        report = parse_status_item(callback)
    except BadReport as exc:
        raise PulledItemRefused(_tencent_names(str(exc), REPORT_FIELDS)) from exc
    return report


class PullClient(Protocol):
    """Tencent's two pull actions; each call removes what it returns from Tencent's queue."""

    def pull_replies(self, limit: int) -> list[dict[str, Any]]: ...

    def pull_send_statuses(self, limit: int) -> list[dict[str, Any]]: ...


class SendStatusLookup(Protocol):
    """``PullSmsSendStatusByPhoneNumber``: the statuses Tencent holds for one number's sends in a time window.

    Unlike the queue pulls it consumes nothing, so asking again is harmless:
    it is how an ambiguous send (no readable answer to SendSms) is looked up
    (``bot/delivery/reconcile.py``).
    """

    def send_statuses_for(self, phone_number: str, *, begin: int, end: int) -> list[dict[str, Any]]: ...


class TencentPullClient:
    """The real SDK's ``PullSmsReplyStatus``, ``PullSmsSendStatus`` and ``PullSmsSendStatusByPhoneNumber``.

    Items come back as Tencent's JSON names (``SerialNo``, ``SessionContext``, ...).
    """

    def __init__(self, config: TencentConfig) -> None:
        from tencentcloud.common.exception.tencent_cloud_sdk_exception import (  # type: ignore[import-untyped]
            TencentCloudSDKException,
        )
        from tencentcloud.sms.v20210111 import models  # type: ignore[import-untyped]

        self._models: Any = models
        self._error: Any = TencentCloudSDKException
        self.config = config
        self.client: Any = sms_client(config)

    def pull_replies(self, limit: int) -> list[dict[str, Any]]:
        return self._pull("PullSmsReplyStatus", limit)

    def pull_send_statuses(self, limit: int) -> list[dict[str, Any]]:
        return self._pull("PullSmsSendStatus", limit)

    def send_statuses_for(self, phone_number: str, *, begin: int, end: int) -> list[dict[str, Any]]:
        """The statuses of the sends to ``phone_number`` (E.164) between ``begin`` and ``end`` (unix seconds).

        ``Offset`` is 0: Tencent documents it as fixed at 0 for now ("目前固定设置为0"),
        so one page of ``PULL_LIMIT`` is all there is. ``begin`` may be at most
        7 days back; a send the carrier has not reported on yet is absent.
        """
        request = self._models.PullSmsSendStatusByPhoneNumberRequest()
        request.PhoneNumber = phone_number
        request.BeginTime = begin
        request.EndTime = end
        request.Offset = 0
        request.Limit = PULL_LIMIT
        return self._call("PullSmsSendStatusByPhoneNumber", request, "PullSmsSendStatusSet")

    def _pull(self, action: str, limit: int) -> list[dict[str, Any]]:
        request = getattr(self._models, f"{action}Request")()
        request.Limit = limit
        return self._call(action, request, f"{action}Set")

    def _call(self, action: str, request: Any, field: str) -> list[dict[str, Any]]:
        request.SmsSdkAppId = self.config.sdk_app_id
        response = getattr(self.client, action)(request)
        items = getattr(response, field, None)
        if items is None:
            # The SDK hands back an empty model when it could not read Tencent's answer. For the queue
            # pulls that page (if there was one) is gone at Tencent, and all we can do is say so; a
            # lookup by number consumes nothing and is simply asked again.
            raise self._error("InternalError.UnreadableAnswer", f"Tencent's answer had no {field}")
        return [json.loads(item.to_json_string()) for item in items]
