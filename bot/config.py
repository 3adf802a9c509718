"""Settings: defaults, then ``config.yaml``, then ``SMSBOT_*`` environment variables.

The config file is found from ``--config``, then ``SMSBOT_CONFIG``, then
``config.yaml`` in the current directory; without one, defaults and the
environment still make a working setup. Relative paths in the file are taken
relative to the file, so ``smsbot --config /etc/smsbot/config.yaml`` works
from any directory. Secrets never belong in the file: they come from the
environment.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from bot.rules.schema import Duration

CONFIG_ENV = "SMSBOT_CONFIG"
DEFAULT_CONFIG_NAME = "config.yaml"
_PATH_SETTINGS = ("rules_dir", "pull_unstored_file")
SECRET_SETTINGS = (
    "callback_token",
    "tencent_secret_id",
    "tencent_secret_key",
    "console_secret",
    "metrics_token",
    "session_context_secret",
)


class ConfigError(Exception):
    """Settings that cannot be used, with which setting and why."""


EVENT_KINDS = ("opted_out", "opted_in", "state_entered", "reply_failed", "unmatched")
EVENT_ENDPOINT_NAME = r"^[a-z0-9_-]+$"


def event_secret_env(name: str) -> str:
    """The environment variable holding an event endpoint's signing secret."""
    return "SMSBOT_EVENT_SECRET_" + name.upper().replace("-", "_")


class EventEndpointConfig(BaseModel):
    """One ``events:`` entry: where events go and which kinds (default: all); its secret is in the environment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(pattern=r"^https?://[^\s/]+", description="http(s) URL the signed events are POSTed to")
    kinds: tuple[Literal["opted_out", "opted_in", "state_entered", "reply_failed", "unmatched"], ...] | None = None


_URL_PASSWORD = re.compile(r"(?<=://)([^:/@]*):[^@/]*@")


def _hide_password(url: str) -> str:
    """``url`` with the password of its user written as ``***`` (as SQLAlchemy's ``hide_password`` does)."""
    return _URL_PASSWORD.sub(r"\1:***@", url)


def tester_number(text: str) -> str:
    """A tester's number as ``+<country code><number>``: ``+8613800138000``, ``0086 138...`` or ``13800138000`` (+86)."""
    compact = "".join(ch for ch in text.strip() if ch not in " -()")
    if compact.startswith("00"):
        compact = "+" + compact[2:]
    if compact.startswith("+") and compact[1:].isdigit() and 6 <= len(compact) <= 21:
        return compact
    if compact.isdigit() and len(compact) == 11 and compact.startswith("1"):
        return "+86" + compact
    raise ValueError(
        f"testers: {text!r} is not a phone number: give +<country code><number> (e.g. +8613800138000) "
        "or an 11-digit mainland China mobile number"
    )


class Settings(BaseSettings):
    """Every setting, with its default. Environment: ``SMSBOT_`` + the name in upper case."""

    model_config = SettingsConfigDict(env_prefix="SMSBOT_", extra="forbid", frozen=True)

    rules_dir: Path = Field(default=Path("rules"), description="folder (or file) of rule files")
    param_max_length: int = Field(
        default=6,
        ge=1,
        description="Tencent's limit for one template variable: 6 on accounts opened after 2024-01-25, else 12",
    )
    database_url: str = Field(
        default="sqlite:///smsbot.db",
        description="SQLAlchemy URL: sqlite:///smsbot.db (default) or postgresql+psycopg://user@host/db",
    )
    callback_token: SecretStr | None = Field(
        default=None, description="when set, Tencent's callbacks must carry ?token=<it>; set it in the environment"
    )
    sender: Literal["console", "tencent"] = Field(
        default="console", description="how replies are sent: console (printed) or tencent (SendSms)"
    )
    tencent_endpoint: str = Field(
        default="sms.tencentcloudapi.com", description="Tencent SMS API host, or host:port for a local fake"
    )
    tencent_scheme: Literal["https", "http"] = Field(default="https", description="http only for local fakes")
    tencent_region: str = Field(default="ap-guangzhou", description="e.g. ap-guangzhou; ap-singapore internationally")
    tencent_sdk_app_id: str | None = Field(default=None, description="the SmsSdkAppId, e.g. 1400006666")
    tencent_timeout: int = Field(default=5, ge=1, le=60, description="seconds to wait for Tencent's answer")
    tencent_sign_names: dict[str, str] = Field(
        default_factory=dict, description="per-signature SignName override: callback sign -> approved SignName"
    )
    tencent_secret_id: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("TENCENTCLOUD_SECRET_ID", "tencent_secret_id"),
        description="environment only: TENCENTCLOUD_SECRET_ID (the SDK's own name)",
    )
    tencent_secret_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("TENCENTCLOUD_SECRET_KEY", "tencent_secret_key"),
        description="environment only: TENCENTCLOUD_SECRET_KEY (the SDK's own name)",
    )
    session_context_secret: SecretStr | None = Field(
        default=None,
        description="environment only: the key of the marker smsbot puts in each send's SessionContext, so only "
        "our own delivery reports match our replies; unset: derived from TENCENTCLOUD_SECRET_KEY",
    )
    writer: Literal["thread", "process"] = Field(
        default="process",
        description="where smsbot serve commits callbacks and delivers replies: 'process' (a writer process "
        "with its own interpreter, so HTTP and the database do not share one GIL) or 'thread' (in the HTTP process)",
    )
    pull: bool = Field(
        default=False,
        description="smsbot serve also pulls replies and delivery statuses from Tencent (PullSmsReplyStatus, "
        "PullSmsSendStatus), for servers Tencent cannot call back; needs the Tencent credentials",
    )
    pull_interval: float = Field(
        default=10.0, gt=0, le=3600, description="seconds between pulls when Tencent's queues are empty"
    )
    pull_unstored_file: Path = Field(
        default=Path("smsbot-pull-unstored.jsonl"),
        description="pulled items that could not be stored are appended here in full (JSON lines, owner only): "
        "Tencent hands each out once, so this file is their only copy",
    )
    max_body_bytes: int = Field(default=64 * 1024, ge=256, description="largest callback body accepted")
    loop_limit: int = Field(default=20, ge=1, description="identical replies to one number allowed per loop_window")
    loop_window: Duration = Field(default=timedelta(minutes=5), description="window for loop_limit, e.g. 5m")
    deliver: bool = Field(
        default=True,
        description="whether smsbot serve also sends the queued replies; false when smsbot worker processes do it",
    )
    send_concurrency: int = Field(
        default=8, ge=1, le=64, description="replies sent at once (to different numbers) by one delivery loop"
    )
    delivery_lease: Duration = Field(
        default=timedelta(seconds=60),
        description="how long a claimed reply stays with the delivery loop that claimed it (at least "
        "tencent_timeout times the sends queued before it); if the loop dies, another takes the reply after "
        "this: the send it was making becomes ambiguous, never resent blindly",
    )
    frequency_same_content: Duration | None = Field(
        default=timedelta(seconds=30),
        description="hold a reply with the same text as one sent to the number within this time (Tencent's "
        "default: 30s, changeable on organisation accounts); 0s: no limit",
    )
    frequency_per_hour: int | None = Field(
        default=None,
        ge=0,
        description="replies per number per hour (Tencent has no default; set what its console says); 0: no limit",
    )
    frequency_per_day: int | None = Field(
        default=10,
        ge=0,
        description="replies per number per China calendar day; Tencent's own default is 10 in its Chinese "
        "documentation and 2 in its English FAQ, and organisation accounts change it in the console "
        "(set this to what yours says); 0: no limit",
    )
    reply_max_delay: Duration = Field(
        default=timedelta(hours=1),
        description="a reply that cannot go out within this time of the customer's message (frequency limits, "
        "quiet hours, retries) is recorded as expired, never sent late; a rule file may set its own",
    )
    ambiguous_check_interval: Duration = Field(
        default=timedelta(minutes=5),
        description="with sender tencent, how often the delivery loop asks Tencent "
        "(PullSmsSendStatusByPhoneNumber) about ambiguous sends, those SendSms gave no readable answer for; "
        "each is asked at most once per interval",
    )
    ambiguous_check_after: Duration = Field(
        default=timedelta(minutes=5),
        description="an ambiguous send is first asked about once it is this old: its delivery report "
        "usually settles it by then, with no call to Tencent",
    )
    ambiguous_check_max: int = Field(
        default=3,
        ge=0,
        le=20,
        description="times Tencent is asked about one ambiguous send before it is left to ops (with a reason "
        "saying so); 0: never ask, only delivery reports settle them",
    )
    ambiguous_check_batch: int = Field(
        default=20,
        ge=1,
        le=100,
        description="ambiguous sends asked about per interval by one delivery loop (one Tencent call each)",
    )
    host: str = Field(default="127.0.0.1", description="address smsbot serve binds to")
    console_secret: SecretStr | None = Field(
        default=None,
        description="environment only: signs the ops console's session cookies; unset: a random one per start "
        "(everyone is signed out on restart)",
    )
    console_max_failed_logins: int = Field(
        default=5,
        ge=1,
        description="failed console logins in a row from one client address that lock that address (only) "
        "out of the account for console_lockout; other addresses can still sign in",
    )
    console_max_failed_logins_account: int = Field(
        default=50,
        ge=1,
        description="failed console logins on one account within console_lockout, from all addresses together "
        "and each address counting at most console_max_failed_logins, that lock the whole account for "
        "console_lockout (stops a guesser spread over many addresses; one address alone can never reach it)",
    )
    console_lockout: Duration = Field(
        default=timedelta(minutes=15),
        description="how long an address (or, past the account ceiling, the whole account) stays locked, e.g. 15m",
    )
    console_session_max_age: Duration = Field(
        default=timedelta(hours=12), description="a console session ends this long after login, e.g. 12h"
    )
    port: int = Field(default=8000, ge=1, le=65535, description="port smsbot serve listens on")
    log_format: Literal["text", "json"] = Field(
        default="text", description="log lines of serve, worker and pull: 'text' or 'json' (one JSON object a line)"
    )
    log_reveal_numbers: bool = Field(
        default=False, description="write customers' phone numbers into the logs unmasked (for debugging only)"
    )
    metrics_token: SecretStr | None = Field(
        default=None,
        description="environment only: when set, GET /metrics needs 'Authorization: Bearer <it>'; "
        "unset: /metrics answers loopback clients only",
    )
    events: dict[str, EventEndpointConfig] = Field(
        default_factory=dict,
        description="endpoints that receive signed event POSTs (name: {url, kinds?}); each one's secret comes "
        "only from the environment, SMSBOT_EVENT_SECRET_<NAME>",
    )
    rollout: Literal["immediate", "staged"] = Field(
        default="immediate",
        description="how a new valid rules version goes live: 'immediate' (everyone, at once) or 'staged' "
        "(the tester numbers only, until 'smsbot rules promote' or the console's Promote)",
    )
    testers: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="tester numbers a staged candidate answers: '+8613800138000', or '13800138000' for +86; "
        "SMSBOT_TESTERS takes them comma-separated",
    )
    config_file: Path | None = Field(default=None, description="the config file these came from (set by smsbot)")

    @field_validator("testers", mode="before")
    @classmethod
    def _tester_numbers(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            return value
        return [tester_number(str(item)) for item in value]

    @property
    def tester_numbers(self) -> frozenset[str]:
        """``testers`` as the callbacks' numbers are compared with them: ``+<nationcode><mobile>``."""
        return frozenset(self.testers)

    @field_validator("events")
    @classmethod
    def _event_endpoints(cls, value: dict[str, EventEndpointConfig]) -> dict[str, EventEndpointConfig]:
        for name in value:
            if not re.match(EVENT_ENDPOINT_NAME, name):
                raise ValueError(f"events: endpoint name {name!r} must be lower-case letters, digits, '_' or '-'")
            if not os.environ.get(event_secret_env(name)):
                raise ValueError(
                    f"events.{name}: no signing secret; set {event_secret_env(name)} in the environment "
                    "(secrets never go in the file)"
                )
        return value

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """What ``repr()`` and ``str()`` show: every setting, the database URL's password hidden (the rest are SecretStr)."""
        for name, value in super().__repr_args__():
            yield name, (_hide_password(value) if name == "database_url" and isinstance(value, str) else value)

    @field_validator("frequency_same_content", mode="before")
    @classmethod
    def _zero_means_no_limit(cls, value: Any) -> Any:
        """A duration must be positive elsewhere; here 0 is how an environment variable says "no limit"."""
        if isinstance(value, str) and value.strip().lower() in ("0", "0s", "off", "none", ""):
            return None
        return None if value == 0 else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's values arrive as init arguments; the environment overrides them.
        return (env_settings, init_settings)


def find_config_file(explicit: Path | None, environ: Mapping[str, str]) -> Path | None:
    """The config file to read, or None when there is none to read."""
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(f"config file {explicit} does not exist")
        return explicit
    from_env = environ.get(CONFIG_ENV)
    if from_env:
        path = Path(from_env)
        if not path.is_file():
            raise ConfigError(f"{CONFIG_ENV}={from_env}: no such file")
        return path
    here = Path.cwd() / DEFAULT_CONFIG_NAME
    return here if here.is_file() else None


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of setting: value")
    known = set(Settings.model_fields) - {"config_file"}
    for secret in SECRET_SETTINGS:
        if data.get(secret):
            raise ConfigError(
                f"{path}: '{secret}' is a secret and must not be stored in a file; "
                f"set SMSBOT_{secret.upper()} in the environment instead"
            )
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{path}: unknown setting '{key}'{hint}")
    for key in _PATH_SETTINGS:
        if isinstance(data.get(key), str) and not Path(data[key]).is_absolute():
            data[key] = str((path.parent / data[key]).resolve())
    return data


def load_settings(config: Path | None = None) -> Settings:
    """Build settings from the config file (if any) and the environment."""
    path = find_config_file(config, os.environ)
    values = _read_file(path) if path else {}
    try:
        return Settings(**values, config_file=path)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            name = ".".join(str(p) for p in err["loc"])
            problems.append(f"{name}: {err['msg']} (from SMSBOT_{name.upper()} or {path or 'defaults'})")
        raise ConfigError("invalid settings: " + "; ".join(problems)) from exc
