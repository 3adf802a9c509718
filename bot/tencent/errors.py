"""Every outcome Tencent can give a send, classified once, in one table.

The outbox decides what to do with a failed send from this table alone:
retry soon (transient), retry after the frequency window (frequency), never
retry (permanent), or reconcile before anything else (ambiguous: Tencent may
have sent it, and SendSms has no idempotency key, so a blind resend could
text the customer twice).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Outcome(StrEnum):
    SENT = "sent"
    TRANSIENT = "transient"
    FREQUENCY = "frequency"
    PERMANENT = "permanent"
    AMBIGUOUS = "ambiguous"


@dataclass(frozen=True)
class ErrorClass:
    """What a Tencent code means for us."""

    outcome: Outcome
    opted_out: bool = False
    """The customer unsubscribed at Tencent: treat the number as opted out."""
    alert_ops: bool = False
    """Nothing will get through until someone acts (balance, credentials, approvals)."""

    @property
    def retryable(self) -> bool:
        return self.outcome in (Outcome.TRANSIENT, Outcome.FREQUENCY)


_T = ErrorClass(Outcome.TRANSIENT)
_F = ErrorClass(Outcome.FREQUENCY)
_P = ErrorClass(Outcome.PERMANENT)
_P_OPS = ErrorClass(Outcome.PERMANENT, alert_ops=True)
_A = ErrorClass(Outcome.AMBIGUOUS)

EXACT: dict[str, ErrorClass] = {
    "Ok": ErrorClass(Outcome.SENT),
    # transient: retry with backoff
    "InternalError.Timeout": _T,
    "InternalError.SendAndRecvFail": _T,
    "InternalError.UnknownError": _T,
    "InternalError.OtherError": _T,
    "InternalError.ParseBackendResponseFail": _T,
    "LimitExceeded.GlobalSmsSendingRateLimit": _T,
    "ServerNetworkError": _T,
    # the request may or may not have reached Tencent
    "ClientNetworkError": _A,
    # frequency windows: retry after the window, or give up by policy
    "LimitExceeded.PhoneNumberThirtySecondLimit": _F,
    "LimitExceeded.PhoneNumberOneHourLimit": _F,
    "LimitExceeded.PhoneNumberDailyLimit": _F,
    "LimitExceeded.PhoneNumberSameContentDailyLimit": _F,
    "LimitExceeded.AppDailyLimit": _F,
    "LimitExceeded.DeliveryFrequencyLimit": _F,
    "FailedOperation.MarketingSendTimeConstraint": _F,
    # permanent
    "FailedOperation.PhoneNumberInBlacklist": ErrorClass(Outcome.PERMANENT, opted_out=True),
    "FailedOperation.PhoneNumberParseFail": _P,
    "InvalidParameterValue.IncorrectPhoneNumber": _P,
    "FailedOperation.SignatureIncorrectOrUnapproved": _P_OPS,
    "FailedOperation.TemplateIncorrectOrUnapproved": _P_OPS,
    "FailedOperation.TemplateParamSetNotMatchApprovedTemplate": _P_OPS,
    "FailedOperation.ContainSensitiveWord": _P,
    "FailedOperation.InsufficientBalanceInSmsPackage": _P_OPS,
    "InvalidParameterValue.TemplateParameterFormatError": _P,
    "InvalidParameterValue.TemplateParameterLengthLimit": _P,
    "InvalidParameterValue.ProhibitedUseUrlInTemplateParameter": _P,
    "InvalidParameterValue.ContentLengthLimit": _P,
    "InvalidCredential": _P_OPS,
    "ClientParamsError": _P,
}

PREFIXES: tuple[tuple[str, ErrorClass], ...] = (
    ("RequestLimitExceeded", _T),
    ("InternalError.", _T),
    ("AuthFailure.", _P_OPS),
    ("UnauthorizedOperation.", _P_OPS),
    ("UnsupportedOperation.", _P),
    ("MissingParameter", _P),
    ("InvalidParameter", _P),
    ("FailedOperation.", _P),
    ("LimitExceeded.", _F),
)

UNKNOWN = ErrorClass(Outcome.PERMANENT, alert_ops=True)
"""A code we have never seen: not retried blindly, and shown to ops."""


def classify(code: str | None) -> ErrorClass:
    """The class of a Tencent (or SDK) code; unknown codes are permanent and flagged for ops."""
    if not code:
        return _A  # no answer we can read: Tencent may have sent it
    found = EXACT.get(code)
    if found is not None:
        return found
    for prefix, value in PREFIXES:
        if code.startswith(prefix):
            return value
    return UNKNOWN
