"""Choosing the ``SmsSender`` from settings, refusing a Tencent setup that cannot work."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bot.config import ConfigError, Settings
from bot.outbox import ConsoleSender, SmsSender

if TYPE_CHECKING:
    from bot.tencent.sender import TencentConfig


def tencent_config(settings: Settings, *, purpose: str, app_id: bool = True) -> TencentConfig:
    """Where and as whom to call Tencent, or a ConfigError naming every missing environment variable.

    ``purpose`` starts the refusal ("sender 'tencent' needs ..."); ``app_id`` is
    False for account-level calls (listing templates) that need no SmsSdkAppId.
    """
    needed: dict[str, object] = {
        "TENCENTCLOUD_SECRET_ID": settings.tencent_secret_id,
        "TENCENTCLOUD_SECRET_KEY": settings.tencent_secret_key,
    }
    if app_id:
        needed["SMSBOT_TENCENT_SDK_APP_ID"] = settings.tencent_sdk_app_id
    missing = [name for name, value in needed.items() if not value]
    secret_id, secret_key = settings.tencent_secret_id, settings.tencent_secret_key
    if missing or secret_id is None or secret_key is None:
        plural = "s" if len(missing) > 1 else ""
        raise ConfigError(f"{purpose} needs {', '.join(missing)} (environment variable{plural}); not set: refusing")
    from bot.tencent.sender import TencentConfig

    return TencentConfig(
        secret_id=secret_id.get_secret_value(),
        secret_key=secret_key.get_secret_value(),
        sdk_app_id=settings.tencent_sdk_app_id or "",
        region=settings.tencent_region,
        endpoint=settings.tencent_endpoint,
        scheme=settings.tencent_scheme,
        timeout_seconds=settings.tencent_timeout,
        sign_names=dict(settings.tencent_sign_names),
    )


def make_sender(settings: Settings) -> SmsSender:
    """The console sender, or Tencent's when ``sender: tencent`` and its credentials are all there."""
    if settings.sender == "console":
        return ConsoleSender()
    from bot.tencent.sender import TencentSender

    return TencentSender(tencent_config(settings, purpose="sender 'tencent'"))
