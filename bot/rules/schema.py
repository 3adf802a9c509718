"""The shape of a rule file, as pydantic models.

These models are the public contract of the rule language: field names here
are the YAML keys marketers write. They only check shape and types; meaning
(unknown templates, unreachable states, parameter counts ...) is checked by
``bot.rules.lint`` where every problem can be reported at once.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, model_validator

_DURATION_RE = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
DURATION_PATTERN = r"^\s*(?:\d+\s*d)?\s*(?:\d+\s*h)?\s*(?:\d+\s*m)?\s*(?:\d+\s*s)?\s*$"


def parse_duration(value: object) -> timedelta:
    """Parse '30m', '2h', '1h30m', '45s', '1d' into a timedelta."""
    if isinstance(value, timedelta):
        return value
    text = str(value).strip().replace(" ", "")
    m = _DURATION_RE.match(text)
    if not text or not m or not any(m.groups()):
        raise ValueError(f"expected a duration such as 30m, 2h, 1h30m, 45s or 1d, got {value!r}")
    days, hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
    result = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    if result <= timedelta(0):
        raise ValueError("a duration must be longer than zero")
    return result


Text = Annotated[str, WithJsonSchema({"type": ["string", "number"]})]
"""Text that may be written as a bare number (``id: 1490001``, ``keywords: [1, 2]``): it is read as text."""

Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    WithJsonSchema({"type": "string", "pattern": DURATION_PATTERN, "minLength": 2, "examples": ["30m", "1h30m"]}),
]
"""A duration written like ``30m``; a number of seconds on its own is refused."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, frozen=True)


class TemplateSpec(_Model):
    """A Tencent-approved template: its id and the approved text with {1}, {2} ..."""

    id: Text = Field(min_length=1, description="Tencent template id, e.g. '1490001'")
    text: str = Field(description="the approved template text, with {1}, {2} ... placeholders")
    marketing: bool = Field(default=False, description="a marketing template: only sent 08:00-22:00 China time")
    intl_id: Text | None = Field(
        default=None,
        description="Tencent id of the international template with this text, for numbers outside the Chinese "
        "mainland (Tencent refuses mainland templates there); the same id for a template approved for both",
    )


class Action(_Model):
    """What the bot does when a rule fires."""

    reply: str | None = Field(default=None, description="name of the template to send")
    params: list[Text] = Field(default_factory=list, description="Jinja2 expressions, one per {n}")
    set: dict[str, Text] = Field(default_factory=dict, description="variables to store, name -> Jinja2 expression")
    goto: str | None = Field(default=None, description="the state to move to")


class Call(_Model):
    """``call:``: ask one of the file's webhooks, then carry on with the rule's reply, params and goto."""

    webhook: str = Field(min_length=1, description="a name from the file's webhooks: map")
    save_as: str | None = Field(
        default=None, description="the variable that keeps the webhook's JSON answer, read as vars.NAME.field"
    )


class OnError(_Model):
    """What a rule with ``call:`` does instead when the webhook fails, times out or answers no JSON."""

    reply: str | None = Field(default=None, description="name of the template to send")
    params: list[Text] = Field(default_factory=list, description="Jinja2 expressions, one per {n}")
    goto: str | None = Field(default=None, description="the state to move to")


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


class Webhook(_Model):
    """An HTTP endpoint of the business that rules may ``call:``."""

    url: str = Field(min_length=1, description="http:// or https:// URL, literal text")
    method: Annotated[Literal["GET", "POST"], BeforeValidator(_upper)] = Field(
        default="POST", description="POST sends body as JSON; GET sends it as query parameters"
    )
    body: dict[str, Text] | None = Field(default=None, description="name -> Jinja2 expression, rendered per call")
    timeout: Duration = Field(default=timedelta(seconds=3), description="how long to wait for an answer (max 30s)")


class EventEndpoint(_Model):
    """A URL that receives signed event POSTs for the conversations this file answers."""

    url: str = Field(min_length=1, description="http:// or https:// URL")
    kinds: list[str] | None = Field(
        default=None,
        description="which events: opted_out, opted_in, state_entered, reply_failed, unmatched (default: all)",
    )


class _Matchers(_Model):
    keywords: list[Text] | None = Field(default=None, description="the whole message is one of these")
    first_word: list[Text] | None = Field(default=None, description="the first word of the message is one of these")
    contains: list[Text] | None = Field(
        default=None, description="the message contains one of these (for languages without spaces)"
    )

    @model_validator(mode="after")
    def _needs_a_matcher(self) -> Any:
        if not any(getattr(self, k) for k in self._matcher_fields()):
            names = ", ".join(self._matcher_fields())
            raise ValueError(f"a rule needs something to match: one of {names}")
        return self

    @classmethod
    def _matcher_fields(cls) -> tuple[str, ...]:
        return ("keywords", "first_word", "contains")


class KeywordAction(_Matchers, Action):
    """opt_out, opt_in and help: keyword matchers plus an action."""


class Rule(_Matchers, Action):
    """One entry of a state's ``on`` list or of ``anywhere``."""

    regex: str | None = Field(
        default=None, description="Python regular expression, full match; named groups -> match.NAME"
    )
    call: Call | None = Field(
        default=None, description="ask a webhook first (after set:); reply, params and goto follow its answer"
    )
    on_error: OnError | None = Field(
        default=None, description="with call: what to do instead when the webhook fails (default: stay silent)"
    )

    @classmethod
    def _matcher_fields(cls) -> tuple[str, ...]:
        return ("keywords", "first_word", "contains", "regex")


class State(_Model):
    """A conversation state: its rules, expiry and fallback."""

    on: list[Rule] = Field(default_factory=list)
    expires: Duration | None = Field(
        default=None, description="after this much silence the conversation returns to start"
    )
    otherwise: Action | None = None
    entry: bool = Field(
        default=False,
        description="conversations are started in this state (start API, smsbot start): it needs no goto leading to it",
    )


class Expect(_Model):
    """What one step of a rule test must produce; keys left out are not checked."""

    reply: str | None = Field(default=None, description="template name, or null for no reply")
    params: list[Text] | None = None
    state: str | None = None
    opted_out: bool | None = None
    vars: dict[str, Any] | None = Field(
        default=None, description="these variables have these values (a webhook's answer: a mapping)"
    )
    text: str | None = Field(default=None, description="the preview text of the reply")
    call: str | None = Field(default=None, description="the webhook called at this step, or null for none")


class CannedAnswer(_Model):
    """A webhook's answer in a rule test: ``json:`` for success, ``error:`` or ``status:`` for a failure."""

    json_: Any = Field(default=None, alias="json", description="the JSON the webhook answers with")
    error: str | None = Field(default=None, min_length=1, description="a failure such as timeout")
    status: int | None = Field(default=None, ge=100, le=599, description="an HTTP status other than 2xx")

    model_config = ConfigDict(populate_by_name=True)

    @model_validator(mode="after")
    def _one_kind(self) -> Any:
        given = [k for k in ("json_", "error", "status") if k in self.model_fields_set]
        if len(given) != 1:
            raise ValueError("give exactly one of json (the answer), error (e.g. timeout) or status (e.g. 500)")
        if self.status is not None and 200 <= self.status < 300:
            raise ValueError("status gives a failure (e.g. 500); for a successful answer give json")
        return self


class RuleTest(_Model):
    """A conversation the rules must produce."""

    name: str
    say: list[Text] = Field(min_length=1)
    expect: list[Expect]
    gap: Duration = Field(default=timedelta(seconds=1), description="time between messages")
    vars: dict[str, Text] = Field(default_factory=dict, description="variables at the start")
    state: str | None = Field(
        default=None, description="the state the conversation starts in (as the start API would); default: start"
    )
    webhooks: dict[str, CannedAnswer] = Field(
        default_factory=dict, description="canned answers of the webhooks this test calls: nothing calls out"
    )


class RuleFile(_Model):
    """One rule file: everything the bot does for one SMS signature."""

    model_config = ConfigDict(title="smsbot rule file")

    signature: str = Field(min_length=1, description='the callback "sign" this file answers; "*" for any other')
    extend: Text | None = Field(
        default=None,
        description="Tencent extend code (digits) this file answers under its signature; another file without "
        "extend answers the signature's other replies",
    )
    description: str | None = None
    param_max_length: int | None = Field(
        default=None, ge=1, description="Tencent's limit for one template variable (characters)"
    )
    templates: dict[str, TemplateSpec] = Field(default_factory=dict)
    international: bool | None = Field(
        default=None,
        description="this signature also answers numbers outside the Chinese mainland: every template needs an "
        "intl_id (implied by sender_id or any intl_id)",
    )
    sender_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=32,
        description="Tencent SenderId for replies to numbers outside the Chinese mainland, where a country needs one",
    )
    reply_max_delay: Duration | None = Field(
        default=None,
        description="a reply that cannot go out within this time (frequency limits, quiet hours, retries) is "
        "recorded as expired, never sent late; default: the reply_max_delay setting (1h)",
    )
    opt_out: KeywordAction | None = None
    opt_in: KeywordAction | None = None
    help: KeywordAction | None = None
    start: str | None = Field(default=None, description="the first state (default: the first one listed)")
    states: dict[str, State] = Field(default_factory=dict)
    anywhere: list[Rule] = Field(default_factory=list)
    otherwise: Action | None = None
    webhooks: dict[str, Webhook] = Field(default_factory=dict, description="HTTP endpoints rules may call:")
    events: dict[str, EventEndpoint] = Field(
        default_factory=dict, description="URLs receiving signed events of the conversations this file answers"
    )
    tests: list[RuleTest] = Field(default_factory=list)
