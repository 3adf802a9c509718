"""Choosing the ``SmsSender`` from settings, refusing a Tencent setup that cannot work."""

from __future__ import annotations

from bot.config import Settings
from bot.sms import ConsoleSender, SmsSender


def make_sender(settings: Settings) -> SmsSender:
    """The console sender, or Tencent's when ``sender: tencent`` and its credentials are all there."""
    if settings.sender == "console":
        return ConsoleSender()
    from bot.tencent.config import tencent_config
    from bot.tencent.sender import TencentSender

    return TencentSender(tencent_config(settings, purpose="send"))
