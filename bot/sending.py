"""Choosing the ``SmsSender`` from settings, refusing a Tencent setup that cannot work."""

from __future__ import annotations

from bot.config import ConfigError, Settings
from bot.outbox import ConsoleSender, SmsSender


def make_sender(settings: Settings) -> SmsSender:
    """The console sender, or Tencent's when ``sender: tencent`` and its credentials are all there."""
    if settings.sender == "console":
        return ConsoleSender()
    needed = {
        "TENCENTCLOUD_SECRET_ID": settings.tencent_secret_id,
        "TENCENTCLOUD_SECRET_KEY": settings.tencent_secret_key,
        "SMSBOT_TENCENT_SDK_APP_ID": settings.tencent_sdk_app_id,
    }
    missing = [name for name, value in needed.items() if not value]
    secret_id, secret_key = settings.tencent_secret_id, settings.tencent_secret_key
    if missing or secret_id is None or secret_key is None:
        raise ConfigError(f"sender 'tencent' needs {', '.join(missing)} (environment variables); not set: refusing")
    from bot.tencent.sender import TencentConfig, TencentSender

    return TencentSender(
        TencentConfig(
            secret_id=secret_id.get_secret_value(),
            secret_key=secret_key.get_secret_value(),
            sdk_app_id=str(settings.tencent_sdk_app_id),
            region=settings.tencent_region,
            endpoint=settings.tencent_endpoint,
            scheme=settings.tencent_scheme,
            timeout_seconds=settings.tencent_timeout,
            sign_names=dict(settings.tencent_sign_names),
        )
    )
