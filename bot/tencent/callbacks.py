"""Tencent's two callbacks, as payloads: "SMS Reply" (a customer's answer) and "SMS delivery status".

Parsing and validation only, so the routes and the puller (which turns pulled
items into the same payloads) refuse exactly the same things. Tencent documents
a single JSON object per reply callback; we also accept an array of them
(processed all or nothing). The status callback is an array of at most 100
reports. Every problem names the field and what was wrong, because the person
reading it is debugging an integration.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError, field_validator

from bot.numbers import parse_china_time
from bot.rules.normalize import clean
from bot.sms import Inbound

EARLIEST = datetime(2010, 1, 1).timestamp()
FUTURE_SLACK = timedelta(days=1)
MAX_ITEMS = 1000
MAX_REPORTS = 100

log = logging.getLogger("smsbot.reports")


# ---------------------------------------------------------------- either body: one JSON object or an array


class BadBody(Exception):  # noqa: N818 - named for what the caller sent
    """A callback body we refuse, with the reason for Tencent's (or a developer's) logs."""


def json_items(body: bytes, *, max_items: int, noun: str, error: type[BadBody] = BadBody) -> tuple[list[Any], bool]:
    """The items in ``body`` (whatever their type) and whether it was an array; ``error`` says what is wrong."""
    try:
        data: Any = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise error(f"body is not valid UTF-8 (byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise error(f"body is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except RecursionError as exc:  # [[[[...: Python's parser gives up; not a crash, a bad body
        raise error("body is nested too deeply to be a callback") from exc
    is_array = isinstance(data, list)
    items = data if is_array else [data]
    if not items:
        raise error(f"empty array: no {noun} in the callback")
    if len(items) > max_items:
        raise error(f"too many {noun} in one callback ({len(items)}, at most {max_items})")
    return items, is_array


def json_objects(
    body: bytes, *, max_items: int, noun: str, error: type[BadBody] = BadBody
) -> tuple[list[dict[str, Any]], bool]:
    """The objects in ``body`` and whether it was an array; ``error`` (a BadBody) says what is wrong."""
    items, is_array = json_items(body, max_items=max_items, noun=noun, error=error)
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            where = f"[{index}]" if is_array else "body"
            raise error(f"{where}: expected a JSON object, got {type(item).__name__}")
    return items, is_array


# ---------------------------------------------------------------- the reply callback


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


# ---------------------------------------------------------------- the delivery-status callback


class BadReport(BadBody):
    """A delivery-status body (or, pulled, one item) we refuse, saying which field is wrong."""


class StatusReport(BaseModel):
    """One item of Tencent's delivery-status callback.

    Tencent documents ``user_receive_time``, ``nationcode``, ``mobile``,
    ``report_status``, ``errmsg``, ``description`` and ``sid``; ``ext`` (our
    SessionContext) comes only when Tencent support turned its echo on, and
    whatever else arrives is ignored. ``report_status`` is read in any case,
    ``ext`` of any JSON type (only a string can be ours).
    """

    model_config = ConfigDict(extra="ignore")

    sid: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]
    report_status: Literal["SUCCESS", "FAIL"]
    user_receive_time: str | None = Field(default=None, description="China time, 'YYYY-MM-DD HH:MM:SS'")
    nationcode: str | None = None
    mobile: str | None = None
    errmsg: str | None = None
    description: str | None = None
    ext: str | None = None

    @field_validator("sid", "user_receive_time", "ext", mode="before")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        """NUL and lone surrogates replaced (as in replies): PostgreSQL could not store or even compare them."""
        return clean(value) if isinstance(value, str) else value

    @field_validator("report_status", mode="before")
    @classmethod
    def _any_case(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("ext", mode="before")
    @classmethod
    def _any_json(cls, value: Any) -> Any:
        """A number is kept as its text; an object, array or boolean cannot be ours and is dropped."""
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            return None
        return str(value)

    @field_validator("nationcode", "mobile", "errmsg", "description", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        if value is None:
            return value
        if not isinstance(value, str):
            value = json.dumps(value, ensure_ascii=False) if isinstance(value, dict | list) else str(value)
        return clean(value)


@dataclass(frozen=True)
class SkippedReport:
    """An item of a status callback that could not be used, and why (logged; the others are applied)."""

    where: str
    reason: str
    item: Any


def parse_status_callback(body: bytes) -> list[StatusReport]:
    """The usable reports of a callback body; BadReport only when the body as a whole is unreadable.

    One odd item never discards the batch: it is logged (numbers masked, like
    every log line) and skipped while the others are applied, and Tencent gets
    its success answer, so it does not post the same batch again and again.
    """
    reports, skipped = read_status_callback(body)
    for item in skipped:
        log.warning(
            "delivery report %s skipped (%s): %s", item.where, item.reason, json.dumps(item.item, ensure_ascii=False)
        )
    return reports


def read_status_callback(body: bytes) -> tuple[list[StatusReport], list[SkippedReport]]:
    """The reports of a callback body and the items that could not be used."""
    items, is_array = json_items(body, max_items=MAX_REPORTS, noun="reports", error=BadReport)
    reports: list[StatusReport] = []
    skipped: list[SkippedReport] = []
    for index, item in enumerate(items):
        where = f"[{index}]" if is_array else "body"
        try:
            reports.append(parse_status_item(item, where="" if where == "body" else where))
        except BadReport as exc:
            skipped.append(SkippedReport(where, str(exc), item))
    return reports, skipped


def parse_status_item(item: Any, *, where: str = "") -> StatusReport:
    """One report, or BadReport naming the field that is wrong (a pulled status takes this path alone)."""
    if not isinstance(item, dict):
        raise BadReport(f"{where or 'body'}: expected a JSON object, got {type(item).__name__}")
    prefix = f"{where}." if where else ""
    try:
        report = StatusReport.model_validate(item)
    except ValidationError as exc:
        problems = [
            f"field '{prefix}{'.'.join(str(p) for p in err['loc'])}': {err['msg']}"
            for err in exc.errors(include_url=False)
        ]
        raise BadReport("; ".join(problems)) from exc
    if report.user_receive_time is not None and parse_china_time(report.user_receive_time) is None:
        raise BadReport(
            f"field '{prefix}user_receive_time': expected 'YYYY-MM-DD HH:MM:SS', got {report.user_receive_time!r}"
        )
    return report
