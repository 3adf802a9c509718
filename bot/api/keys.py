"""API keys: made by ``smsbot apikeys add`` (shown once), stored as a SHA-256 hash, checked on every call.

A key is ``smsbot_`` plus 32 random bytes (URL-safe base64): nobody guesses
it, so a fast hash is enough (no salt, no argon2), and a look-up by hash is
one index probe. Its first characters are kept as ``prefix`` to tell keys
apart in ``smsbot apikeys list``.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, insert, select, update
from sqlalchemy.engine import RowMapping

from bot.store.models import api_keys

SCOPES = ("start", "read", "vars")
"""``start``: POST conversations (and the batch); ``read``: GET a conversation; ``vars``: PUT its vars."""
KEY_PREFIX = "smsbot_"
PREFIX_LENGTH = 12
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class KeyError_(Exception):  # noqa: N801, N818 - KeyError is a builtin
    """An ``apikeys`` command that cannot be done as asked (bad name or scope, unknown key)."""


@dataclass(frozen=True)
class ApiCaller:
    """The key a request authenticated with."""

    id: int
    name: str
    scopes: frozenset[str]

    @property
    def actor(self) -> str:
        """How the audit trail and ``messages.started_by`` name this caller."""
        return f"api:{self.name}"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_scopes(text: str) -> list[str]:
    scopes = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise KeyError_(
            f"scopes are a comma-separated list of {', '.join(SCOPES)} (not {', '.join(unknown) or 'none'})"
        )
    return [s for s in SCOPES if s in scopes]


def add_key(conn: Connection, name: str, scopes: list[str], *, now: datetime) -> str:
    """Store a new key named ``name``; returns the key itself (it is not stored: show it now)."""
    if not _NAME.fullmatch(name):
        raise KeyError_("a key name is 1 to 64 letters, digits, '_', '.' or '-' (starting with a letter or digit)")
    if conn.execute(select(api_keys.c.id).where(api_keys.c.name == name)).first() is not None:
        raise KeyError_(f"there is already a key named {name!r} (revoked keys keep their name)")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    conn.execute(
        insert(api_keys).values(
            name=name, key_hash=hash_key(key), prefix=key[:PREFIX_LENGTH], scopes=scopes, created_at=now
        )
    )
    return key


def list_keys(conn: Connection) -> list[RowMapping]:
    return list(conn.execute(select(api_keys).order_by(api_keys.c.name)).mappings())


def revoke_key(conn: Connection, name: str, *, now: datetime) -> bool:
    """Revoke ``name``; False when it already was. KeyError_ when there is no such key."""
    row = conn.execute(select(api_keys.c.id, api_keys.c.revoked_at).where(api_keys.c.name == name)).first()
    if row is None:
        raise KeyError_(f"no key named {name!r}")
    if row.revoked_at is not None:
        return False
    conn.execute(update(api_keys).where(api_keys.c.id == row.id).values(revoked_at=now))
    return True


def caller_for(conn: Connection, key: str) -> ApiCaller | None:
    """The live (not revoked) key ``key`` is, or None."""
    row = conn.execute(
        select(api_keys.c.id, api_keys.c.name, api_keys.c.scopes, api_keys.c.revoked_at).where(
            api_keys.c.key_hash == hash_key(key)
        )
    ).first()
    if row is None or row.revoked_at is not None:
        return None
    return ApiCaller(id=int(row.id), name=row.name, scopes=frozenset(row.scopes or ()))


def touch(conn: Connection, caller: ApiCaller, *, now: datetime) -> None:
    """Note the key's use (``last_used_at``), in the call's own write transaction."""
    conn.execute(update(api_keys).where(api_keys.c.id == caller.id).values(last_used_at=now))
