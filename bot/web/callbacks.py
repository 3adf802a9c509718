"""Tencent's "SMS Reply" callback payload: parsing and validation.

Tencent documents a single JSON object per call; we also accept an array of
them (processed all or nothing). Every problem names the field and what was
wrong, because the person reading it is debugging an integration.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError

from bot.json_body import BadBody, json_objects
from bot.rules.normalize import clean
from bot.service import Inbound

EARLIEST = datetime(2010, 1, 1).timestamp()
FUTURE_SLACK = timedelta(days=1)
MAX_ITEMS = 1000


class BadCallback(BadBody):
    """A reply callback body we refuse, with the reason."""


class ReplyCallback(BaseModel):
    """One customer reply as Tencent posts it."""

    model_config = ConfigDict(strict=True, extra="ignore")

    extend: str | None = Field(default="", description="extended code of the channel, usually empty")
    mobile: str = Field(min_length=1, max_length=32, pattern=r"^\+?[0-9]+$", description="mobile number")
    nationcode: str = Field(min_length=1, max_length=8, pattern=r"^\+?[0-9]+$", description="country code")
    sign: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=128)] = Field(
        description="SMS signature"
    )
    text: str = Field(max_length=4096, description="the customer's reply")
    time: int = Field(description="Unix timestamp in seconds")


class CallbackAnswer(BaseModel):
    """What Tencent expects back: result 0 means accepted."""

    result: int = Field(description="0: success; anything else: failure")
    errmsg: str = Field(description='"OK", or what was wrong')


def _where(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_FAST = TypeAdapter(ReplyCallback | list[ReplyCallback])


def parse_reply_callback(body: bytes, *, now: datetime) -> list[Inbound]:
    """Turn a callback body into messages, or raise BadCallback saying what is wrong.

    Well-formed bodies take pydantic's JSON parser in one step (this is the hot
    path); anything it refuses goes through the slower path below, which cleans
    text that can be repaired and words each problem for a human.
    """
    try:
        parsed = _FAST.validate_json(body)
    except ValidationError:
        return _parse_carefully(body, now=now)
    replies = parsed if isinstance(parsed, list) else [parsed]
    if not replies or len(replies) > MAX_ITEMS:
        return _parse_carefully(body, now=now)
    latest = (now + FUTURE_SLACK).timestamp()
    messages = []
    for index, reply in enumerate(replies):
        if not EARLIEST <= reply.time <= latest:
            prefix: tuple[int | str, ...] = (index,) if isinstance(parsed, list) else ()
            raise BadCallback(
                f"field '{_where((*prefix, 'time'))}': {reply.time} is not a plausible Unix time in seconds"
            )
        messages.append(_inbound(reply, cleaned=False))
    return messages


def _inbound(reply: ReplyCallback, *, cleaned: bool) -> Inbound:
    extend = reply.extend or ""
    sign, text = reply.sign, reply.text
    if not cleaned:
        sign, text, extend = clean(sign), clean(text), clean(extend)
    return Inbound(
        nationcode=reply.nationcode.lstrip("+"),
        mobile=reply.mobile.lstrip("+"),
        sign=sign,
        text=text,
        time=reply.time,
        extend=extend,
    )


def _parse_carefully(body: bytes, *, now: datetime) -> list[Inbound]:
    items, is_array = json_objects(body, max_items=MAX_ITEMS, noun="replies", error=BadCallback)
    messages: list[Inbound] = []
    for index, item in enumerate(items):
        prefix: tuple[int | str, ...] = (index,) if is_array else ()
        for name in ("text", "sign", "extend"):
            if isinstance(item.get(name), str):
                item[name] = clean(item[name])
        try:
            reply = ReplyCallback.model_validate(item)
        except ValidationError as exc:
            problems = []
            for err in exc.errors(include_url=False):
                where = _where(prefix + tuple(err["loc"]))
                problems.append(
                    f"field '{where}': {err['msg']}" if err["type"] != "missing" else f"field '{where}' is missing"
                )
            raise BadCallback("; ".join(problems)) from exc
        if not EARLIEST <= reply.time <= (now + FUTURE_SLACK).timestamp():
            raise BadCallback(
                f"field '{_where((*prefix, 'time'))}': {reply.time} is not a plausible Unix time in seconds"
            )
        messages.append(_inbound(reply, cleaned=True))
    return messages
