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

from bot.store.models import audit_events, login_failures, users

Role = Literal["viewer", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "admin")
MIN_PASSWORD_LENGTH = 8
MAX_NAME_LENGTH = 64
UNKNOWN_SOURCE = "unknown"
"""The address recorded when the server does not know the client's (e.g. a Unix socket)."""
MAX_SOURCE_LENGTH = 64

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


def locked_addresses(conn: Connection, now: datetime) -> dict[int, list[str]]:
    """Per user id, the client addresses locked out of that account now (sorted).

    Shown beside each user so an admin asked "I cannot log in from the office"
    can see an address lock, which leaves the account itself unlocked.
    """
    rows = conn.execute(
        select(login_failures.c.user_id, login_failures.c.source)
        .where(login_failures.c.locked_until > now)
        .order_by(login_failures.c.user_id, login_failures.c.source)
    )
    found: dict[int, list[str]] = {}
    for user_id, source in rows:
        found.setdefault(int(user_id), []).append(str(source))
    return found


def require_user(conn: Connection, name: str) -> RowMapping:
    """The user named ``name``; ``UserError`` naming it when there is none."""
    row = get_user(conn, name.strip())
    if row is None:
        raise UserError(f"no user named {name!r}")
    return row


def remove_user(conn: Connection, name: str, *, now: datetime, actor: str) -> None:
    row = require_user(conn, name)
    # ON DELETE CASCADE does this too, but SQLite honours it only with foreign keys switched on, and
    # SQLite may hand a removed user's id to the next new user: their rows must not outlive them.
    conn.execute(delete(login_failures).where(login_failures.c.user_id == row["id"]))
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
    conn.execute(delete(login_failures).where(login_failures.c.user_id == row["id"]))
    audit(conn, actor=actor, action="user.passwd", target=row["name"], now=now)


def unlock_user(conn: Connection, name: str, *, now: datetime, actor: str) -> None:
    """Lifts the account lock and every address's lock: the admin vouches for whoever asked."""
    row = require_user(conn, name)
    conn.execute(update(users).where(users.c.id == row["id"]).values(failed_logins=0, locked_until=None))
    conn.execute(delete(login_failures).where(login_failures.c.user_id == row["id"]))
    audit(conn, actor=actor, action="user.unlock", target=row["name"], now=now)


def is_locked(row: RowMapping, now: datetime) -> bool:
    locked_until: datetime | None = row["locked_until"]
    return locked_until is not None and locked_until > now


def authenticate(
    conn: Connection,
    name: str,
    password: str,
    *,
    now: datetime,
    source: str,
    max_failures: int,
    max_failures_account: int,
    lockout: timedelta,
) -> ConsoleUser | None:
    """The user if ``password`` is theirs and neither they nor ``source`` is locked out; else None, alike for all.

    Failures are counted per (account, client address): ``max_failures`` in a
    row from one address lock that address out of the account for
    ``lockout``, so someone who only knows a name cannot lock its owner out
    from everywhere. ``max_failures_account`` failures from all addresses
    together, with no success between them, still lock the whole account, so
    a guesser spread over many addresses gets only so many tries. While
    locked, even the right password is refused (and not counted). Every
    refusal costs one argon2 verification, so timing tells neither which
    names exist nor whether a lock is in force.
    """
    source = source[:MAX_SOURCE_LENGTH] or UNKNOWN_SOURCE
    # The user row lock serialises concurrent logins to one account, so the counters cannot lose updates.
    row = conn.execute(select(users).where(users.c.name == name.strip()).with_for_update()).mappings().first()
    if row is None:
        _verify(_DUMMY_HASH, password)
        # Neither the name (people type their password into it by mistake) nor a login_failures row
        # (invented names must not grow the table) is stored.
        audit(conn, actor="anonymous", action="login.unknown_user", detail={"source": source}, now=now)
        return None
    user_id = int(row["id"])
    here = (
        conn.execute(
            select(login_failures).where(login_failures.c.user_id == user_id, login_failures.c.source == source)
        )
        .mappings()
        .first()
    )
    if is_locked(row, now):
        _verify(_DUMMY_HASH, password)
        audit(conn, actor=row["name"], action="login.locked", detail={"source": source}, now=now)
        return None
    if here is not None and is_locked(here, now):
        _verify(_DUMMY_HASH, password)
        audit(conn, actor=row["name"], action="login.locked_source", detail={"source": source}, now=now)
        return None
    if not _verify(row["password_hash"], password):
        _count_failure(
            conn,
            row,
            here,
            source=source,
            now=now,
            max_failures=max_failures,
            max_failures_account=max_failures_account,
            lockout=lockout,
        )
        return None
    # This address starts again; other addresses' recent failures still count towards the account.
    conn.execute(delete(login_failures).where(login_failures.c.user_id == user_id, login_failures.c.source == source))
    values: dict[str, Any] = {
        "failed_logins": recent_failures(conn, user_id, now=now, max_failures=max_failures),
        "locked_until": None,
        "last_login_at": now,
    }
    if _hasher.check_needs_rehash(row["password_hash"]):
        values["password_hash"] = _hasher.hash(password)
    conn.execute(update(users).where(users.c.id == user_id).values(**values))
    audit(conn, actor=row["name"], action="login", detail={"source": source}, now=now)
    return _user(row)


def _count_failure(
    conn: Connection,
    row: RowMapping,
    here: RowMapping | None,
    *,
    source: str,
    now: datetime,
    max_failures: int,
    max_failures_account: int,
    lockout: timedelta,
) -> None:
    """Count a wrong password against the address and the account, locking either at its limit.

    Rows whose lock has ended and whose last failure is older than ``lockout``
    are dropped first (this address's too, whose count then starts again), so
    the table holds only addresses that failed recently. The account's count
    is worked out from those rows: the failures of the last ``lockout``, each
    address counting at most ``max_failures`` (a locked address counts that
    much). One address, however patient, can therefore never reach the
    account's limit; it takes that many addresses failing at about the same
    time, which is the distributed guessing the limit is there to stop.
    """
    user_id = int(row["id"])
    stale = (login_failures.c.updated_at < now - lockout) & (
        login_failures.c.locked_until.is_(None) | (login_failures.c.locked_until <= now)
    )
    conn.execute(delete(login_failures).where(login_failures.c.user_id == user_id, stale))
    fresh = here is not None and not _is_stale(here, now, lockout)
    failures = (int(here["failures"]) if here is not None and fresh else 0) + 1
    source_values: dict[str, Any] = {"failures": failures, "updated_at": now}
    action = "login.failed"
    if failures >= max_failures:
        source_values = {"failures": 0, "locked_until": now + lockout, "updated_at": now}
        action = "login.lockout"
    if here is not None and fresh:
        conn.execute(update(login_failures).where(login_failures.c.id == here["id"]).values(**source_values))
    else:
        conn.execute(insert(login_failures).values(user_id=user_id, source=source, **source_values))
    account_failures = recent_failures(conn, user_id, now=now, max_failures=max_failures)
    account_values: dict[str, Any] = {"failed_logins": account_failures}
    detail: dict[str, Any] = {"failures": failures, "account_failures": account_failures, "source": source}
    if failures >= max_failures:
        detail["locked"] = "source"
    if account_failures >= max_failures_account:
        account_values = {"failed_logins": 0, "locked_until": now + lockout}
        action = "login.lockout"
        detail["locked"] = "account"
    conn.execute(update(users).where(users.c.id == user_id).values(**account_values))
    audit(conn, actor=row["name"], action=action, detail=detail, now=now)


def recent_failures(conn: Connection, user_id: int, *, now: datetime, max_failures: int) -> int:
    """The account's failed logins still counting: per address at most ``max_failures`` (a locked one: that)."""
    rows = conn.execute(
        select(login_failures.c.failures, login_failures.c.locked_until).where(login_failures.c.user_id == user_id)
    )
    return sum(
        max_failures if locked_until is not None and locked_until > now else min(int(failures), max_failures)
        for failures, locked_until in rows
    )


def _is_stale(row: RowMapping, now: datetime, lockout: timedelta) -> bool:
    """The same test as the pruning ``DELETE`` in ``_count_failure``, for the row already read."""
    updated_at: datetime = row["updated_at"]
    return updated_at < now - lockout and not is_locked(row, now)


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
