"""Stored rules versions and the control row every serving process follows (SQL only).

``rule_versions`` keeps each version's text once (by hash); ``rules_control``
(one row, ``id = 1``, made by the migration) says which stored version is live,
which is the candidate for tester numbers and which, if any, is pinned. Every
change of it is one UPDATE, so a promote or a pin switches all readers at once.
Compiling a stored text into rules is ``bot/runtime/rule_versions.py``'s job
(this package knows no rules).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, insert, select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import aliased

from bot.store.models import rule_versions, rules_control

CONTROL_ID = 1


@dataclass(frozen=True)
class Control:
    """The control row, with each version's hash (None: not set)."""

    live_id: int | None = None
    live: str | None = None
    candidate_id: int | None = None
    candidate: str | None = None
    pinned_id: int | None = None
    pinned: str | None = None
    updated_at: datetime | None = None
    updated_by: str | None = None

    @property
    def serving_id(self) -> int | None:
        """What answers non-testers: the pinned version, else the live one."""
        return self.pinned_id if self.pinned_id is not None else self.live_id


def read_control(conn: Connection) -> Control:
    """The control row in one SELECT (the timer of every serving process runs this, every 2 s)."""
    live, candidate, pinned = (aliased(rule_versions) for _ in range(3))
    c = rules_control.c
    row = conn.execute(
        select(
            c.live_version_id,
            live.c.hash,
            c.candidate_version_id,
            candidate.c.hash,
            c.pinned_version_id,
            pinned.c.hash,
            c.updated_at,
            c.updated_by,
        )
        .select_from(
            rules_control.outerjoin(live, live.c.id == c.live_version_id)
            .outerjoin(candidate, candidate.c.id == c.candidate_version_id)
            .outerjoin(pinned, pinned.c.id == c.pinned_version_id)
        )
        .where(c.id == CONTROL_ID)
    ).first()
    if row is None:
        return Control()
    return Control(*row)


def _lock_control(conn: Connection) -> Control:
    """The control row, locked until commit on PostgreSQL (SQLite writers hold the database's write lock)."""
    if conn.dialect.name == "postgresql":
        conn.execute(select(rules_control.c.id).where(rules_control.c.id == CONTROL_ID).with_for_update())
    return read_control(conn)


def _set_control(conn: Connection, *, by: str, now: datetime, **values: int | None) -> None:
    conn.execute(
        update(rules_control)
        .where(rules_control.c.id == CONTROL_ID)
        .values(**values, updated_at=now, updated_by=by[:128])
    )


def record_version(
    conn: Connection,
    *,
    hash: str,
    files: dict[str, str],
    check: dict[str, Any],
    ok: bool,
    host: str,
    now: datetime,
) -> int:
    """Store a version that loaded (once per hash; a later load counts and stamps it); its id."""
    v = rule_versions.c
    for attempt in (1, 2):
        found = conn.execute(select(v.id).where(v.hash == hash)).scalar()
        if found is not None:
            conn.execute(
                update(rule_versions)
                .where(v.id == found)
                .values(last_loaded_at=now, last_loaded_by=host[:255], loads=v.loads + 1)
            )
            return int(found)
        try:
            with conn.begin_nested():
                inserted = conn.execute(
                    insert(rule_versions)
                    .values(
                        hash=hash,
                        files=files,
                        check=check,
                        ok=ok,
                        created_at=now,
                        created_by=host[:255],
                        last_loaded_at=now,
                        last_loaded_by=host[:255],
                        loads=1,
                    )
                    .returning(v.id)
                ).scalar_one()
            return int(inserted)
        except IntegrityError:  # another process stored the same text meanwhile: count this load on it
            if attempt == 2:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def version_loaded(conn: Connection, version_id: int, *, staged: bool, by: str, now: datetime) -> Control:
    """A valid version loaded from a rules folder: what it becomes, by the rollout.

    ``immediate``: live (any candidate is dropped). ``staged``: the candidate for
    testers, unless nothing is live yet (then live: there is nothing to keep
    serving) or it is the live version itself (the folder went back: no candidate).
    """
    control = _lock_control(conn)
    if not staged or control.live_id is None:
        if control.live_id != version_id or control.candidate_id is not None:
            _set_control(conn, by=by, now=now, live_version_id=version_id, candidate_version_id=None)
    elif version_id == control.live_id:
        if control.candidate_id is not None:
            _set_control(conn, by=by, now=now, candidate_version_id=None)
    elif control.candidate_id != version_id:
        _set_control(conn, by=by, now=now, candidate_version_id=version_id)
    return read_control(conn)


def promote(conn: Connection, *, by: str, now: datetime) -> Control | None:
    """Make the candidate live for everyone, in one UPDATE; None when there is no candidate."""
    c = rules_control.c
    done = conn.execute(
        update(rules_control)
        .where(c.id == CONTROL_ID, c.candidate_version_id.is_not(None))
        .values(live_version_id=c.candidate_version_id, candidate_version_id=None, updated_at=now, updated_by=by[:128])
    )
    return read_control(conn) if done.rowcount else None


def pin(conn: Connection, version_id: int, *, by: str, now: datetime) -> Control:
    """Serve stored version ``version_id`` to everyone, whatever the folders hold, until ``unpin``."""
    _set_control(conn, by=by, now=now, pinned_version_id=version_id)
    return read_control(conn)


def unpin(conn: Connection, *, by: str, now: datetime) -> Control:
    _set_control(conn, by=by, now=now, pinned_version_id=None)
    return read_control(conn)


_LISTED = (
    rule_versions.c.id,
    rule_versions.c.hash,
    rule_versions.c.ok,
    rule_versions.c.check,
    rule_versions.c.created_at,
    rule_versions.c.created_by,
    rule_versions.c.last_loaded_at,
    rule_versions.c.last_loaded_by,
    rule_versions.c.loads,
)


def list_versions(conn: Connection, *, limit: int = 50) -> list[RowMapping]:
    """The newest versions first (without their text)."""
    return list(conn.execute(select(*_LISTED).order_by(rule_versions.c.id.desc()).limit(limit)).mappings())


class AmbiguousVersion(LookupError):  # noqa: N818 - named for what the user sees
    """A hash prefix that more than one stored version starts with."""


def find_version(conn: Connection, ref: str) -> RowMapping | None:
    """A stored version (with its ``files``) by id (``12``, ``#12``) or hash (or a unique prefix of 4+ characters)."""
    ref = ref.strip().lstrip("#")
    v = rule_versions.c
    if ref.isdigit() and len(ref) < 12:
        by_id = conn.execute(select(rule_versions).where(v.id == int(ref))).mappings().first()
        if by_id is not None:
            return by_id
    if len(ref) < 4:
        return None
    escaped = ref.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    found = list(conn.execute(select(rule_versions).where(v.hash.like(escaped + "%", escape="\\")).limit(2)).mappings())
    if len(found) > 1:
        raise AmbiguousVersion(f"more than one stored version starts with {ref!r}; give more of the hash")
    return found[0] if found else None


def version_by_hash(conn: Connection, hash: str) -> RowMapping | None:
    """The stored version (with its ``files``) whose hash is exactly ``hash`` (a message's ``rules_version``)."""
    return conn.execute(select(rule_versions).where(rule_versions.c.hash == hash)).mappings().first()


def version_count(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(rule_versions)).scalar_one())
