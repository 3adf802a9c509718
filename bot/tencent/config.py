"""Where and as whom smsbot calls Tencent: one config for sending, pulling and listing templates.

Credentials come from the environment only (the SDK's own variable names),
so a missing one is refused here, naming every variable that is not set,
before any command talks to Tencent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from bot.config import ConfigError, Settings
from bot.tencent.session_context import SessionContexts, key_from

Purpose = Literal["send", "pull", "templates"]

_PURPOSES: dict[Purpose, tuple[str, bool]] = {
    "send": ("sender 'tencent'", True),
    "pull": ("pulling from Tencent", True),
    # Listing templates is an account-level call that needs no SmsSdkAppId (nor `sender: tencent`):
    # checking templates is exactly what one does before switching the sender on.
    "templates": ("asking Tencent for templates", False),
}
"""What each use of Tencent is called in a refusal, and whether it needs the SmsSdkAppId."""


@dataclass(frozen=True)
class TencentConfig:
    """Where and as whom to call Tencent."""

    secret_id: str
    secret_key: str
    sdk_app_id: str
    region: str = "ap-guangzhou"
    endpoint: str = "sms.tencentcloudapi.com"
    scheme: str = "https"
    timeout_seconds: int = 5
    sign_names: Mapping[str, str] = field(default_factory=dict)
    """Per-signature SignName override: callback ``sign`` -> the approved SignName."""
    session_context_key: bytes | None = None
    """The key of our SessionContext marker (``bot/tencent/session_context.py``); None: no marker is sent."""

    @property
    def contexts(self) -> SessionContexts | None:
        return SessionContexts(self.session_context_key) if self.session_context_key else None


def tencent_config(settings: Settings, *, purpose: Purpose) -> TencentConfig:
    """The config for ``purpose``, or a ConfigError naming every missing environment variable."""
    what, app_id = _PURPOSES[purpose]
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
        raise ConfigError(f"{what} needs {', '.join(missing)} (environment variable{plural}); not set: refusing")
    return TencentConfig(
        secret_id=secret_id.get_secret_value(),
        secret_key=secret_key.get_secret_value(),
        sdk_app_id=settings.tencent_sdk_app_id or "",
        region=settings.tencent_region,
        endpoint=settings.tencent_endpoint,
        scheme=settings.tencent_scheme,
        timeout_seconds=settings.tencent_timeout,
        sign_names=dict(settings.tencent_sign_names),
        session_context_key=_context_key(settings),
    )


def session_contexts(settings: Settings) -> SessionContexts | None:
    """How delivery reports are matched to our replies by SessionContext (None: by SerialNo alone)."""
    key = _context_key(settings)
    return SessionContexts(key) if key else None


def _context_key(settings: Settings) -> bytes | None:
    explicit, secret = settings.session_context_secret, settings.tencent_secret_key
    return key_from(
        explicit=explicit.get_secret_value() if explicit else None,
        tencent_secret_key=secret.get_secret_value() if secret else None,
    )


def e164(nationcode: str, mobile: str) -> str:
    """A number the way Tencent's API wants it (``+8613800000000``), from our nationcode and mobile."""
    return f"+{nationcode.lstrip('+')}{mobile.lstrip('+')}"


def sms_client(config: TencentConfig) -> Any:
    """The SDK's SmsClient for ``config``, its own retries off (the callers decide what may be repeated)."""
    from tencentcloud.common import credential  # type: ignore[import-untyped]
    from tencentcloud.common.profile.client_profile import ClientProfile  # type: ignore[import-untyped]
    from tencentcloud.common.profile.http_profile import HttpProfile  # type: ignore[import-untyped]
    from tencentcloud.sms.v20210111 import sms_client as sdk  # type: ignore[import-untyped]

    http = HttpProfile(endpoint=config.endpoint, reqTimeout=config.timeout_seconds)
    http.scheme = config.scheme  # the SDK reads `scheme` once constructed
    return sdk.SmsClient(
        credential.Credential(config.secret_id, config.secret_key), config.region, ClientProfile(httpProfile=http)
    )
