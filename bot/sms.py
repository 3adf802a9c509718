"""The two messages smsbot exchanges with an SMS provider, and the port replies leave through.

``Inbound`` is a customer's reply as Tencent delivered it (by callback or by
pull); ``OutboundSms`` is one reply ready to go. ``SmsSender`` is the only
thing the delivery loop knows about a provider, so Tencent's SDK, the console
printer and the tests' fakes are interchangeable behind it.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, TextIO

from bot.numbers import mask_number


@dataclass(frozen=True)
class Inbound:
    """A customer's reply exactly as Tencent delivered it."""

    nationcode: str
    mobile: str
    sign: str
    text: str
    time: int
    extend: str = ""

    @property
    def dedupe_key(self) -> str:
        """Tencent sends no message id; a retried callback repeats all of these fields."""
        raw = json.dumps(
            [self.nationcode, self.mobile, self.sign, self.extend, self.time, self.text], ensure_ascii=False
        )
        return hashlib.sha256(raw.encode()).hexdigest()[:32]  # 128 bits: collisions are not a concern


@dataclass(frozen=True)
class OutboundSms:
    """One reply ready for the provider."""

    outbox_id: int
    message_id: int
    nationcode: str
    mobile: str
    sign: str
    template_id: str
    params: tuple[str, ...]
    text: str
    attempts: int = 0
    """Sends tried before this one."""
    conversation_id: int = 0
    sender_id: str | None = None
    """Tencent's SenderId, for a number outside the Chinese mainland whose country needs one."""
    send_by: datetime | None = None
    """The reply's deadline: a retry planned past it expires the reply instead."""
    extend_code: str | None = None
    """Tencent's ``ExtendCode`` to send with (the rule file's ``extend``, or the one the customer wrote to)."""


@dataclass(frozen=True)
class SendResult:
    ok: bool
    serial: str | None = None
    code: str = "Ok"
    message: str = ""


class SmsSender(Protocol):
    """Something that delivers an SMS: Tencent in production, the console locally, a fake in tests.

    Senders are called on a thread pool, as a network call blocks; one with a
    class attribute ``blocking = False`` is called on the delivery loop itself.
    """

    def send(self, sms: OutboundSms) -> SendResult: ...


class ConsoleSender:
    """Prints each reply instead of sending it, for local runs without Tencent credentials."""

    blocking = False
    """Printing a line never waits on a network: the delivery loop may call it directly."""

    def __init__(self, stream: TextIO | None = None, *, reveal_numbers: bool = False) -> None:
        self.stream = stream
        self.reveal_numbers = reveal_numbers

    def send(self, sms: OutboundSms) -> SendResult:
        number = sms.mobile if self.reveal_numbers else mask_number(sms.mobile)
        out = self.stream or sys.stdout
        out.write(
            f"[console sender] to +{sms.nationcode} {number} 【{sms.sign}】 template {sms.template_id} "
            f"params={list(sms.params)}: {sms.text}\n"
        )
        out.flush()
        return SendResult(ok=True, serial=f"console:{sms.message_id}", code="Ok", message="printed")
