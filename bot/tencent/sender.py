"""``TencentSender``: the ``SmsSender`` that calls Tencent's SendSms through the official SDK.

The SDK client is built once. Its own retryer stays off: SendSms has no
idempotency key, so a retry after a read timeout could text the customer
twice; retries happen in the outbox, which can reconcile first.

The SDK reports every transport failure as ``ClientNetworkError``, whether
the request never left (connection refused, DNS, TLS handshake) or Tencent
may have acted on it (a timeout or reset after it was written); and an answer
it cannot read (truncated, not JSON) as the name of the Python exception. The
first kind is safe to send again, the others are not, so they are told apart
here from the exception the SDK wrapped.
"""

from __future__ import annotations

from typing import Any

import requests
import urllib3.exceptions
from tencentcloud.common.exception.tencent_cloud_sdk_exception import (  # type: ignore[import-untyped]
    TencentCloudSDKException,
)
from tencentcloud.sms.v20210111 import models  # type: ignore[import-untyped]

from bot.sms import OutboundSms, SendResult
from bot.tencent.config import TencentConfig, e164, sms_client
from bot.tencent.errors import NOT_SENT, UNREADABLE

_NEVER_WRITTEN = (
    urllib3.exceptions.NewConnectionError,  # refused, unreachable, and (a subclass) DNS lookup failed
    urllib3.exceptions.ConnectTimeoutError,
    requests.exceptions.ConnectTimeout,
    requests.exceptions.SSLError,  # raised while the TLS handshake runs, before any byte of the request
)
"""Transport errors that happen before the request is written: Tencent cannot have seen it."""


class TencentSender:
    """Sends one reply per SendSms call and reports Tencent's answer as a ``SendResult``."""

    def __init__(self, config: TencentConfig) -> None:
        self.config = config
        self.client: Any = sms_client(config)
        self._contexts = config.contexts

    def __reduce__(self) -> tuple[type[TencentSender], tuple[TencentConfig]]:
        """Pickled as its config (the SDK client holds sockets): the writer process builds its own."""
        return (TencentSender, (self.config,))

    def send(self, sms: OutboundSms) -> SendResult:
        request = models.SendSmsRequest()
        request.PhoneNumberSet = [e164(sms.nationcode, sms.mobile)]
        request.SmsSdkAppId = self.config.sdk_app_id
        request.TemplateId = sms.template_id
        if sms.nationcode.lstrip("+") == "86":
            request.SignName = self.config.sign_names.get(sms.sign, sms.sign)
        elif sms.sender_id:  # abroad: no signature, and a SenderId where the country needs one
            request.SenderId = sms.sender_id
        request.TemplateParamSet = list(sms.params)
        if sms.extend_code:  # the reply goes back on the extend code its campaign uses
            request.ExtendCode = sms.extend_code
        if self._contexts is not None:  # matches delivery reports and pulls to our message, and only ours
            request.SessionContext = self._contexts.context_for(sms.message_id)
        try:
            response = self.client.SendSms(request)
        except TencentCloudSDKException as exc:
            return SendResult(ok=False, code=transport_code(exc), message=str(exc.message or ""))
        statuses = response.SendStatusSet
        if not statuses:
            # The SDK hands back an empty result when it could not read Tencent's answer.
            return SendResult(ok=False, code="", message="Tencent's answer had no SendStatusSet")
        status = statuses[0]
        if status.Code == "Ok":
            return SendResult(ok=True, serial=status.SerialNo, code="Ok", message=status.Message or "")
        return SendResult(ok=False, code=str(status.Code), message=str(status.Message or ""))


def transport_code(exc: TencentCloudSDKException) -> str:
    """Tencent's code, or ours for what the SDK could only call ``ClientNetworkError`` or an exception's name."""
    code = str(exc.code or "ClientError")
    cause = exc.__cause__ or exc.__context__
    if code == "ClientNetworkError":
        return NOT_SENT if _never_written(cause) else code
    if cause is not None and not isinstance(cause, TencentCloudSDKException) and code == type(cause).__name__:
        return UNREADABLE  # the SDK wrapped a local error while reading the answer (JSON, a cut-off body)
    return code


def _never_written(error: BaseException | None) -> bool:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, _NEVER_WRITTEN):
            return True
        reason = getattr(error, "reason", None)  # urllib3's MaxRetryError keeps the real error here
        nested = error.args[0] if error.args and isinstance(error.args[0], BaseException) else None
        error = reason if isinstance(reason, BaseException) else nested or error.__cause__ or error.__context__
    return False
