"""Every outcome Tencent can give a send, classified once, in one table.

The outbox decides what to do with a failed send from this table alone:
retry soon (transient), wait for the number's window (frequency), wait for
the next day and tell ops (an account-wide cap: every reply is blocked now),
never retry (permanent), or reconcile before anything else (ambiguous:
Tencent may have sent it, and SendSms has no idempotency key, so a blind
resend could text the customer twice).

Every code of the SDK's own list (``tencentcloud.sms.v20210111.errorcodes``)
has an explicit row here, checked by a test, so a code Tencent adds is never
silently "permanent": the test fails until someone decides what it means.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Outcome(StrEnum):
    SENT = "sent"
    TRANSIENT = "transient"
    FREQUENCY = "frequency"
    """A per-number window of Tencent's: this number can be sent to again when it ends."""
    ACCOUNT_LIMIT = "account_limit"
    """An account-wide daily cap: no reply goes anywhere (or to that country) until the next day."""
    PERMANENT = "permanent"
    AMBIGUOUS = "ambiguous"


class Wait(StrEnum):
    """When a frequency window or an account cap ends (China time, as Tencent counts days)."""

    THIRTY_SECONDS = "30s"
    ONE_HOUR = "1h"
    NEXT_DAY = "next China day"
    MARKETING_HOURS = "08:00 China time"


@dataclass(frozen=True)
class ErrorClass:
    """What a Tencent code means for us."""

    outcome: Outcome
    opted_out: bool = False
    """The number is on a blacklist at Tencent: treat it as opted out (the reason says whose list)."""
    alert_ops: bool = False
    """Nothing will get through until someone acts (balance, credentials, approvals, a raised limit)."""
    wait: Wait | None = None
    """For a frequency window or an account cap: when to try again."""
    max_attempts: int | None = None
    """A tighter bound than the retry policy's for codes that a quick retry rarely cures."""

    @property
    def retryable(self) -> bool:
        return self.outcome in (Outcome.TRANSIENT, Outcome.FREQUENCY, Outcome.ACCOUNT_LIMIT)


NOT_SENT = "ClientNetworkError.NotSent"
"""Ours, not Tencent's: the connection, DNS lookup or TLS handshake failed before the request was written."""
UNREADABLE = "ClientNetworkError.UnreadableAnswer"
"""Ours: Tencent answered, but not with JSON we can read (truncated, HTML): it may have sent."""
CARRIER_OR_CUSTOMER_BLACKLIST = "FailedOperation.PhoneNumberInBlacklist"
PER_COUNTRY_LIMITS = frozenset({"LimitExceeded.AppCountryOrRegionDailyLimit"})
"""Account caps that block only the country of the number that met them."""

_T = ErrorClass(Outcome.TRANSIENT)
_T_CAPPED = ErrorClass(Outcome.TRANSIENT, max_attempts=3)
_P = ErrorClass(Outcome.PERMANENT)
_P_OPS = ErrorClass(Outcome.PERMANENT, alert_ops=True)
_A = ErrorClass(Outcome.AMBIGUOUS)
_DAY_CAP = ErrorClass(Outcome.ACCOUNT_LIMIT, alert_ops=True, wait=Wait.NEXT_DAY)

EXACT: dict[str, ErrorClass] = {
    "Ok": ErrorClass(Outcome.SENT),
    # --- transport, as the SDK reports it (and our two finer readings of its ClientNetworkError)
    "ClientNetworkError": _A,  # a timeout or reset after the request was written: Tencent may have sent it
    UNREADABLE: _A,
    NOT_SENT: _T,
    "ServerNetworkError": _T,  # a non-200 HTTP status: a gateway in front of Tencent's API refused it
    "InvalidCredential": _P_OPS,
    "ClientParamsError": _P,
    "ClientError": _P,
    # --- Tencent's common codes (every API): retry with backoff
    "InternalError": _T,
    "ServiceUnavailable": _T,
    "ResourceUnavailable": _T,
    "RequestLimitExceeded": _T,
    # --- SMS: internal errors, retried with backoff like the bare code
    "InternalError.JsonParseFail": _T,
    "InternalError.OtherError": _T,
    "InternalError.ParseBackendResponseFail": _T,
    "InternalError.RequestTimeException": _T,
    "InternalError.RestApiInterfaceNotExist": _T,
    "InternalError.SendAndRecvFail": _T,
    "InternalError.SigFieldMissing": _T,
    "InternalError.SigVerificationFail": _T,
    "InternalError.Timeout": _T,
    "InternalError.UnknownError": _T,
    # --- SMS: per-number windows: wait for the window, then send
    "LimitExceeded.PhoneNumberThirtySecondLimit": ErrorClass(Outcome.FREQUENCY, wait=Wait.THIRTY_SECONDS),
    "LimitExceeded.PhoneNumberOneHourLimit": ErrorClass(Outcome.FREQUENCY, wait=Wait.ONE_HOUR),
    "LimitExceeded.PhoneNumberDailyLimit": ErrorClass(Outcome.FREQUENCY, wait=Wait.NEXT_DAY),
    "LimitExceeded.PhoneNumberSameContentDailyLimit": ErrorClass(Outcome.FREQUENCY, wait=Wait.NEXT_DAY),
    "FailedOperation.MarketingSendTimeConstraint": ErrorClass(Outcome.FREQUENCY, wait=Wait.MARKETING_HOURS),
    # --- SMS: account-wide caps: every reply is blocked until the next day, ops must know
    "LimitExceeded.AppDailyLimit": _DAY_CAP,
    "LimitExceeded.AppMainlandChinaDailyLimit": _DAY_CAP,
    "LimitExceeded.AppGlobalDailyLimit": _DAY_CAP,
    "LimitExceeded.AppCountryOrRegionDailyLimit": _DAY_CAP,
    "LimitExceeded.DailyLimit": _DAY_CAP,
    # --- SMS: rate limits a short wait may cure: backoff, few attempts
    "LimitExceeded.DeliveryFrequencyLimit": _T_CAPPED,
    "LimitExceeded.GlobalSmsSendingRateLimit": _T_CAPPED,
    # --- SMS: never retried
    "LimitExceeded.AppCountryOrRegionInBlacklist": _P_OPS,
    "LimitExceeded.PhoneNumberCountLimit": _P,
    CARRIER_OR_CUSTOMER_BLACKLIST: ErrorClass(Outcome.PERMANENT, opted_out=True),
    "FailedOperation.PhoneNumberParseFail": _P,
    "InvalidParameterValue.IncorrectPhoneNumber": _P,
    "FailedOperation.ContainSensitiveWord": _P,
    "InvalidParameter.DirtyWordFound": _P,
    "InvalidParameterValue.TemplateWithDirtyWords": _P,
    "FailedOperation.SignatureIncorrectOrUnapproved": _P_OPS,
    "FailedOperation.TemplateIncorrectOrUnapproved": _P_OPS,
    "FailedOperation.TemplateParamSetNotMatchApprovedTemplate": _P_OPS,
    "FailedOperation.TemplateUnapprovedOrNotExist": _P_OPS,
    "FailedOperation.TemplateIdNotExist": _P_OPS,
    "FailedOperation.InsufficientBalanceInSmsPackage": _P_OPS,
    "FailedOperation.MissingSignature": _P_OPS,
    "FailedOperation.NotEnterpriseCertification": _P_OPS,
    "FailedOperation.ProhibitSubAccountUse": _P_OPS,
    "FailedOperation.FailResolvePacket": _P,
    "FailedOperation.JsonParseFail": _P,
    "FailedOperation.OtherError": _P,
    "FailedOperation.ParametersOtherError": _P,
    "InvalidParameterValue.TemplateParameterFormatError": _P,
    "InvalidParameterValue.TemplateParameterLengthLimit": _P,
    "InvalidParameterValue.ProhibitedUseUrlInTemplateParameter": _P,
    "InvalidParameterValue.ContentLengthLimit": _P,
    "InvalidParameterValue.SdkAppIdNotExist": _P_OPS,
    "InvalidParameter": _P,
    "InvalidParameter.AppidAndBizId": _P_OPS,
    "InvalidParameter.InvalidParameters": _P,
    "MissingParameter": _P,
    "MissingParameter.EmptyPhoneNumberSet": _P,
    "UnauthorizedOperation.IndividualUserMarketingSmsPermissionDeny": _P_OPS,
    "UnauthorizedOperation.RequestIpNotInWhitelist": _P_OPS,
    "UnauthorizedOperation.RequestPermissionDeny": _P_OPS,
    "UnauthorizedOperation.SdkAppIdIsDisabled": _P_OPS,
    "UnauthorizedOperation.ServiceSuspendDueToArrears": _P_OPS,
    "UnauthorizedOperation.SmsSdkAppIdVerifyFail": _P_OPS,
    "UnsupportedOperation": _P,
    "UnsupportedOperation.ChineseMainlandTemplateToGlobalPhone": _P_OPS,
    "UnsupportedOperation.GlobalTemplateToChineseMainlandPhone": _P_OPS,
    "UnsupportedOperation.ContainDomesticAndInternationalPhoneNumber": _P,
    "UnsupportedOperation.ContainDomesticPhoneNumber": _P,
    "UnsupportedOperation.UnsupportedRegion": _P_OPS,
    # --- SMS: codes of the management APIs (signatures, templates); a send never gets them
    "FailedOperation.ForbidAddMarketingTemplates": _P,
    "FailedOperation.MissingSignatureList": _P,
    "FailedOperation.MissingSignatureToModify": _P,
    "FailedOperation.MissingTemplateList": _P,
    "FailedOperation.MissingTemplateToModify": _P,
    "FailedOperation.QualificationIdNotApproved": _P,
    "FailedOperation.SignIdNotExist": _P,
    "FailedOperation.SignNumberLimit": _P,
    "FailedOperation.TemplateAlreadyPassedCheck": _P,
    "FailedOperation.TemplateNumberLimit": _P,
    "InvalidParameterValue.BeginTimeVerifyFail": _P,
    "InvalidParameterValue.EndTimeVerifyFail": _P,
    "InvalidParameterValue.ImageInvalid": _P,
    "InvalidParameterValue.InvalidDocumentType": _P,
    "InvalidParameterValue.InvalidInternational": _P,
    "InvalidParameterValue.InvalidSignPurpose": _P,
    "InvalidParameterValue.InvalidSmsType": _P,
    "InvalidParameterValue.InvalidStartTime": _P,
    "InvalidParameterValue.InvalidTemplateFormat": _P,
    "InvalidParameterValue.InvalidUsedMethod": _P,
    "InvalidParameterValue.LimitVerifyFail": _P,
    "InvalidParameterValue.MarketingTemplateWithoutUnsubscribe": _P,
    "InvalidParameterValue.MultiSmsInfoSetEmpty": _P,
    "InvalidParameterValue.OffsetVerifyFail": _P,
    "InvalidParameterValue.QualificationIdNotFound": _P,
    "InvalidParameterValue.SignAlreadyPassedCheck": _P,
    "InvalidParameterValue.SignExistAndUnapproved": _P,
    "InvalidParameterValue.SignNameLengthTooLong": _P,
    "InvalidParameterValue.UnsupportedTemplateVariable": _P,
}

PREFIXES: tuple[tuple[str, ErrorClass], ...] = (
    # Sub-codes of Tencent's common codes that no list names are retried like their bare code.
    ("InternalError.", _T),
    ("ServiceUnavailable.", _T),
    ("ResourceUnavailable.", _T),
    ("RequestLimitExceeded.", _T),
    ("AuthFailure.", _P_OPS),
    ("UnauthorizedOperation.", _P_OPS),
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
