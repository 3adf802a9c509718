"""Console accounts: creation, passwords, lockout and the audit trail.

No web code here, so ``smsbot users`` and the login page share one set of
rules (name and password checks, argon2 hashing, the lockout) and cannot
drift apart. Every function takes a connection inside a transaction the
caller owns; each change is recorded in ``audit_events`` in the same
transaction, so an audit row exists exactly when the change does.
"""

from __future__ import annotations

import hashlib
import hmac
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Connection, delete, insert, select, update
from sqlalchemy.engine import RowMapping

from bot.store.models import audit_events, users

Role = Literal["viewer", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "admin")
MIN_PASSWORD_LENGTH = 8
MAX_NAME_LENGTH = 64

_hasher = PasswordHasher()
_DUMMY_HASH = _hasher.hash("not a password: equalises the time of a login for an unknown name")


class UserError(Exception):
    """A request about users that cannot be carried out; the message names the problem."""


@dataclass(frozen=True)
class ConsoleUser:
    """A signed-in console user, as the pages see them."""

    id: int
    name: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def _user(row: RowMapping) -> ConsoleUser:
    role: Role = "admin" if row["role"] == "admin" else "viewer"
    return ConsoleUser(id=int(row["id"]), name=str(row["name"]), role=role)


def check_name(name: str) -> str:
    """The name as stored; refuses names that could not be told apart or typed back."""
    name = unicodedata.normalize("NFC", name.strip())
    if not name:
        raise UserError("user name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise UserError(f"user name is longer than {MAX_NAME_LENGTH} characters")
    if any(unicodedata.category(c).startswith("C") for c in name):
        raise UserError("user name contains control characters")
    return name


def check_role(role: str) -> Role:
    if role == "admin":
        return "admin"
    if role == "viewer":
        return "viewer"
    raise UserError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")


def check_password(password: str) -> str:
    if not password:
        raise UserError("password is empty")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"password is too short: at least {MIN_PASSWORD_LENGTH} characters")
    return password


def hash_password(password: str) -> str:
    return _hasher.hash(check_password(password))


def password_fingerprint(password_hash: str, key: bytes) -> str:
    """A short keyed digest of the stored hash, kept in sessions: a new password ends every older session."""
    return hmac.new(key, password_hash.encode(), hashlib.sha256).hexdigest()[:16]


def audit(
    conn: Connection,
    *,
    actor: str,
    action: str,
    now: datetime,
    target: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Record who did what; call it in the transaction that makes the change."""
    conn.execute(insert(audit_events).values(actor=actor, action=action, target=target, detail=detail, created_at=now))


def get_user(conn: Connection, name: str) -> RowMapping | None:
    return conn.execute(select(users).where(users.c.name == name)).mappings().first()


def user_by_id(conn: Connection, user_id: int) -> RowMapping | None:
    return conn.execute(select(users).where(users.c.id == user_id)).mappings().first()


def add_user(conn: Connection, name: str, role: str, password: str, *, now: datetime, actor: str) -> ConsoleUser:
    name = check_name(name)
    checked_role = check_role(role)
    password_hash = hash_password(password)
    if get_user(conn, name) is not None:
        raise UserError(f"user {name!r} already exists")
    conn.execute(
        insert(users).values(name=name, role=checked_role, password_hash=password_hash, failed_logins=0, created_at=now)
    )
    audit(conn, actor=actor, action="user.add", target=name, detail={"role": checked_role}, now=now)
    row = get_user(conn, name)
    assert row is not None
    return _user(row)


def list_users(conn: Connection) -> list[RowMapping]:
    return list(conn.execute(select(users).order_by(users.c.name)).mappings())


def require_user(conn: Connection, name: str) -> RowMapping:
    """The user named ``name``; ``UserError`` naming it when there is none."""
    row = get_user(conn, name.strip())
    if row is None:
        raise UserError(f"no user named {name!r}")
    return row


def remove_user(conn: Connection, name: str, *, now: datetime, actor: str) -> None:
    row = require_user(conn, name)
    conn.execute(delete(users).where(users.c.id == row["id"]))
    audit(conn, actor=actor, action="user.remove", target=row["name"], now=now)


def set_password(conn: Connection, name: str, password: str, *, now: datetime, actor: str) -> None:
    """A new password also unlocks the account (the admin who set it vouches for the person)."""
    row = require_user(conn, name)
    conn.execute(
        update(users)
        .where(users.c.id == row["id"])
        .values(password_hash=hash_password(password), failed_logins=0, locked_until=None)
    )
    audit(conn, actor=actor, action="user.passwd", target=row["name"], now=now)


def unlock_user(conn: Connection, name: str, *, now: datetime, actor: str) -> None:
    row = require_user(conn, name)
    conn.execute(update(users).where(users.c.id == row["id"]).values(failed_logins=0, locked_until=None))
    audit(conn, actor=actor, action="user.unlock", target=row["name"], now=now)


def is_locked(row: RowMapping, now: datetime) -> bool:
    locked_until: datetime | None = row["locked_until"]
    return locked_until is not None and locked_until > now


def authenticate(
    conn: Connection, name: str, password: str, *, now: datetime, max_failures: int, lockout: timedelta
) -> ConsoleUser | None:
    """The user if ``password`` is theirs and the account is not locked; else None, for every reason alike.

    Failures are counted per account; ``max_failures`` in a row lock it for
    ``lockout``, during which even the right password is refused (and not
    counted). An unknown name costs the same argon2 verification, so timing
    does not tell which names exist.
    """
    row = conn.execute(select(users).where(users.c.name == name.strip()).with_for_update()).mappings().first()
    if row is None:
        _verify(_DUMMY_HASH, password)
        # The name is not recorded: people type their password into the name field by mistake.
        audit(conn, actor="anonymous", action="login.unknown_user", now=now)
        return None
    if is_locked(row, now):
        _verify(_DUMMY_HASH, password)
        audit(conn, actor=row["name"], action="login.locked", now=now)
        return None
    if not _verify(row["password_hash"], password):
        failures = int(row["failed_logins"]) + 1
        values: dict[str, Any] = {"failed_logins": failures}
        action = "login.failed"
        if failures >= max_failures:
            values = {"failed_logins": 0, "locked_until": now + lockout}
            action = "login.lockout"
        conn.execute(update(users).where(users.c.id == row["id"]).values(**values))
        audit(conn, actor=row["name"], action=action, detail={"failures": failures}, now=now)
        return None
    values = {"failed_logins": 0, "locked_until": None, "last_login_at": now}
    if _hasher.check_needs_rehash(row["password_hash"]):
        values["password_hash"] = _hasher.hash(password)
    conn.execute(update(users).where(users.c.id == row["id"]).values(**values))
    audit(conn, actor=row["name"], action="login", now=now)
    return _user(row)


def _verify(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def session_user(conn: Connection, user_id: int) -> tuple[ConsoleUser, str] | None:
    """The user a session names and their current password hash (to compare fingerprints), if they still exist."""
    row = user_by_id(conn, user_id)
    if row is None:
        return None
    return _user(row), str(row["password_hash"])
