"""Local fakes of the services smsbot talks to (used by tests and benchmarks)."""

from tests.fakes.tencent_sms import FakeTemplate, FakeTencentSms, FrequencyLimits, RecordedSend, sign_tc3_request

__all__ = ["FakeTemplate", "FakeTencentSms", "FrequencyLimits", "RecordedSend", "sign_tc3_request"]
