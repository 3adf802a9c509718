"""``TencentSender``: the ``SmsSender`` that calls Tencent's SendSms through the official SDK.

The SDK client is built once. Its own retryer stays off: SendSms has no
idempotency key, so a retry after a read timeout could text the customer
twice; retries happen in the outbox, which can reconcile first.
"""

from __future__ import annotations

from typing import Any

from tencentcloud.common.exception.tencent_cloud_sdk_exception import (  # type: ignore[import-untyped]
    TencentCloudSDKException,
)
from tencentcloud.sms.v20210111 import models  # type: ignore[import-untyped]

from bot.sms import OutboundSms, SendResult
from bot.tencent.config import TencentConfig, sms_client


def e164(nationcode: str, mobile: str) -> str:
    return f"+{nationcode.lstrip('+')}{mobile.lstrip('+')}"


class TencentSender:
    """Sends one reply per SendSms call and reports Tencent's answer as a ``SendResult``."""

    def __init__(self, config: TencentConfig) -> None:
        self.config = config
        self.client: Any = sms_client(config)

    def __reduce__(self) -> tuple[type[TencentSender], tuple[TencentConfig]]:
        """Pickled as its config (the SDK client holds sockets): the writer process builds its own."""
        return (TencentSender, (self.config,))

    def send(self, sms: OutboundSms) -> SendResult:
        request = models.SendSmsRequest()
        request.PhoneNumberSet = [e164(sms.nationcode, sms.mobile)]
        request.SmsSdkAppId = self.config.sdk_app_id
        request.TemplateId = sms.template_id
        request.SignName = self.config.sign_names.get(sms.sign, sms.sign)
        request.TemplateParamSet = list(sms.params)
        request.SessionContext = str(sms.message_id)  # matches delivery reports and pulls to our message
        try:
            response = self.client.SendSms(request)
        except TencentCloudSDKException as exc:
            return SendResult(ok=False, code=str(exc.code or "ClientError"), message=str(exc.message or ""))
        statuses = response.SendStatusSet
        if not statuses:
            # The SDK hands back an empty result when it could not read Tencent's answer.
            return SendResult(ok=False, code="", message="Tencent's answer had no SendStatusSet")
        status = statuses[0]
        if status.Code == "Ok":
            return SendResult(ok=True, serial=status.SerialNo, code="Ok", message=status.Message or "")
        return SendResult(ok=False, code=str(status.Code), message=str(status.Message or ""))
