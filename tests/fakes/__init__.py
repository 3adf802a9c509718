"""Local fakes of the services smsbot talks to (used by tests and benchmarks).

Import from the modules (``from tests.fakes.tencent_sms import FakeTencentSms``): this package imports
nothing itself, so ``python -m tests.fakes.tencent_sms`` runs the module exactly once.
"""
