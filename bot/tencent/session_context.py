"""Our SessionContext: a marker on each send that only smsbot can write, so only our reports match it.

Tencent echoes SendSms's ``SessionContext`` in delivery reports and pulled
statuses only when its support has switched that on, and then for every
system sending through the same SmsSdkAppId. A bare message id (``"42"``)
from another system would mark our reply 42 delivered. So ours is
``smsbot:<message id>:<tag>``, the tag an HMAC of the id under a key only
this deployment holds: a context that does not verify is not ours, whatever
it says.
"""

from __future__ import annotations

import hashlib
import hmac
import re

PREFIX = "smsbot"
_TAG_HEX = 16
"""64 bits of HMAC: enough that a guessed tag never verifies, short enough to read in a log."""
_FORM = re.compile(rf"^{PREFIX}:(\d{{1,18}}):([0-9a-f]{{{_TAG_HEX}}})$")


class SessionContexts:
    """Writes and reads our markers with one key (see ``key_from``)."""

    def __init__(self, key: bytes) -> None:
        if not key:
            raise ValueError("a SessionContext key must not be empty")
        self.key = key

    def _tag(self, message_id: int) -> str:
        return hmac.new(self.key, f"{PREFIX}:{message_id}".encode(), hashlib.sha256).hexdigest()[:_TAG_HEX]

    def context_for(self, message_id: int) -> str:
        """The SessionContext to send with reply ``message_id``."""
        return f"{PREFIX}:{message_id}:{self._tag(message_id)}"

    def message_id(self, context: str | None) -> int | None:
        """The reply a SessionContext names, or None when it is not one of ours (or was tampered with)."""
        match = _FORM.match(context.strip()) if context else None
        if match is None:
            return None
        message_id = int(match.group(1))
        return message_id if hmac.compare_digest(match.group(2), self._tag(message_id)) else None


def key_from(*, explicit: str | None, tencent_secret_key: str | None) -> bytes | None:
    """The marker key: ``SMSBOT_SESSION_CONTEXT_SECRET`` if set, else one derived from the Tencent secret key.

    Derived, not the secret key itself, so a leaked marker key would not be a
    Tencent credential; None when neither is configured (then reports match
    by SerialNo alone).
    """
    if explicit:
        return explicit.encode()
    if tencent_secret_key:
        return hmac.new(tencent_secret_key.encode(), b"smsbot session context v1", hashlib.sha256).digest()
    return None
