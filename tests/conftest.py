"""Shared fixtures for the storage and pipeline tests.

Every storage and pipeline test runs twice: on a SQLite file in ``tmp_path``
and on the real PostgreSQL named by ``SMSBOT_TEST_DATABASE_URL`` (skipped only
when that variable is unset; CI always sets it). Schemas are always built by
the Alembic migrations, never ``create_all``, so the migrations are exercised.
Helpers live in ``tests/support.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from bot.store.db import make_engine, upgrade
from tests.support import (
    PG_URL,
    PG_URL_ENV,
    FakeClock,
    Harness,
    copy_rules,
    postgres_schema_url,
    reset_postgres,
    reset_postgres_schema,
    start_app,
    stop_app,
)


@pytest.fixture(autouse=True, scope="session")
def _no_smsbot_settings_from_the_shell() -> Iterator[None]:
    """SMSBOT_* variables beat Settings(...) arguments; keep the developer's shell out of the tests."""
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("SMSBOT_") and name != PG_URL_ENV:
                patch.delenv(name)
        yield


# ---------------------------------------------------------------- databases


@pytest.fixture(autouse=True, scope="session")
def _cheap_password_hashes() -> Iterator[None]:
    """argon2 at production cost takes ~50 ms a hash; hundreds of test logins would take minutes.

    Only the cost parameters change (the algorithm, salts and checks are the same);
    ``tests/console/test_console_auth.py`` checks what production uses.
    """
    from argon2 import PasswordHasher

    import bot.console.users as users

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(users, "_hasher", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
        yield


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests talk to loopback only; a proxy from the shell would swallow the SDK's requests to the fake."""
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "postgres" and not PG_URL:
        pytest.skip(f"{PG_URL_ENV} is not set")
    return str(request.param)


@pytest.fixture
def empty_db_url(backend: str, tmp_path: Path) -> str:
    """A database with none of our tables (not migrated)."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'smsbot.db'}"
    assert PG_URL is not None
    reset_postgres(PG_URL)
    return PG_URL


@pytest.fixture
def db_url(empty_db_url: str) -> str:
    """A database migrated to head by Alembic (the way ``smsbot db upgrade`` does it)."""
    upgrade(empty_db_url)
    return empty_db_url


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def module_db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A migrated database shared by one module's tests (for tests that never store anything).

    On PostgreSQL it lives in its own schema, so the per-test resets of the
    ``public`` schema by ``db_url`` cannot pull it out from under a running app.
    """
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('module-db') / 'smsbot.db'}"
        upgrade(url)
        yield url
        return
    if not PG_URL:
        pytest.skip(f"{PG_URL_ENV} is not set")
    schema = "smsbot_test_" + request.module.__name__.rsplit(".", 1)[-1]
    reset_postgres_schema(PG_URL, schema)
    url = postgres_schema_url(PG_URL, schema)
    upgrade(url)
    yield url
    reset_postgres_schema(PG_URL, schema, create=False)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


# ---------------------------------------------------------------- the app


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    """A private copy of the example rules (acme-shop.yaml and default.yaml)."""
    return copy_rules(tmp_path / "rules")


@pytest.fixture
def make_app(clock: FakeClock, rules_dir: Path) -> Iterator[Callable[..., Harness]]:
    """Build and start apps (lifespan: writer thread, delivery loop); each is shut down, bounded, at the end."""
    started: list[Harness] = []
    stack = ExitStack()

    def factory(
        target: str | Engine,
        *,
        rules_path: Path | None = None,
        app_clock: FakeClock | None = None,
        **options: Any,
    ) -> Harness:
        h = start_app(target, clock=app_clock or clock, rules_path=rules_path or rules_dir, **options)
        if isinstance(target, str):
            stack.callback(h.engine.dispose)
        started.append(h)
        return h

    try:
        yield factory
    finally:
        errors: list[BaseException] = []
        for h in reversed(started):
            gate = getattr(h.sender, "gate", None)
            if gate is not None:
                gate.set()
            try:
                stop_app(h.client, h.app)
            except BaseException as exc:  # stop the others anyway
                errors.append(exc)
        stack.close()
        if errors:
            raise errors[0]


@pytest.fixture
def harness(make_app: Callable[..., Harness], db_url: str) -> Harness:
    """The default app: example rules, default settings, recording sender, fake clock."""
    return make_app(db_url)


# ---------------------------------------------------------------- slow tests


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--skip-slow",
        action="store_true",
        default=False,
        help="leave out the tests marked slow (multi-process, fault and browser tests); CI runs everything",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--skip-slow"):
        return
    deselected = [item for item in items if item.get_closest_marker("slow") is not None]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item.get_closest_marker("slow") is None]
