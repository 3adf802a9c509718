"""Helpers for the storage and pipeline tests: databases, a fake clock, a recording sender, a running app."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import Connection, Engine, Table, create_engine, func, select
from sqlalchemy.engine import RowMapping, make_url

from bot.config import Settings
from bot.rules.compiler import compile_file
from bot.rules.model import CompiledFile
from bot.runtime.live_rules import LiveRules
from bot.sms import OutboundSms, SendResult
from bot.store.db import WRITE_OPTIONS, make_engine
from bot.store.models import Base, contacts, conversations, messages, opt_out_events, outbox
from bot.web.app import create_app
from tests.fakes.tencent_sms import FakeTencentSms

PG_URL_ENV = "SMSBOT_TEST_DATABASE_URL"


def _worker_database(url: str | None) -> str | None:
    """Under pytest-xdist each worker gets a database of its own beside the configured one (created if missing).

    The PostgreSQL tests drop and recreate every table of their database, so two
    workers sharing one would pull tables out from under each other.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if url is None or not worker:
        return url
    base = make_url(url)
    name = f"{base.database}_{worker}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            if (
                conn.exec_driver_sql("SELECT 1 FROM pg_database WHERE datname = %(name)s", {"name": name}).first()
                is None
            ):
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    finally:
        admin.dispose()
    return base.set(database=name).render_as_string(hide_password=False)


PG_URL = _worker_database(os.environ.get(PG_URL_ENV))
REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "rules"
TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS / "fixtures"
CONTRACT = FIXTURES / "contract.yaml"
"""The rule file every language feature is tested against (engine, linter, normalisation, CLI)."""
ARTIFACTS = TESTS / "artifacts"
"""Screenshots and traces the browser test leaves for a person to look at (ignored by git)."""
SEED = FIXTURES / "tencent-sms-reply-callback.txt"
"""Tencent's "SMS Reply" callback page (a copy of the seed the project started from)."""

SIGN = "Acme Shop"
MOBILE = "13800000000"
NATIONCODE = "86"

OUR_TABLES = (*(table.name for table in reversed(Base.metadata.sorted_tables)), "alembic_version")
"""Every table the migrations create, dependants first (from the models, so a new table needs no edit here)."""
ALL_TABLES = (contacts, conversations, messages, outbox, opt_out_events)


def reset_postgres(url: str) -> None:
    """Drop everything our migrations create, so the next ``upgrade`` starts from nothing."""
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            for table in OUR_TABLES:
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table} CASCADE")
            conn.exec_driver_sql("DROP FUNCTION IF EXISTS smsbot_test_fail() CASCADE")
    finally:
        admin.dispose()


def count(engine: Engine, table: Table, *where: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one())


def rows(engine: Engine, table: Table, *where: Any) -> list[RowMapping]:
    with engine.connect() as conn:
        return list(conn.execute(select(table).where(*where).order_by(table.c.id)).mappings())


def stored_counts(engine: Engine) -> dict[str, int]:
    return {table.name: count(engine, table) for table in ALL_TABLES}


NOTHING_STORED = {table.name: 0 for table in ALL_TABLES}


def wait_until(predicate: Callable[[], Any], *, timeout: float = 5.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it is truthy; fail (never hang) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class FakeClock:
    """The app's clock, moved by hand."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


class RecordingSender:
    """An SmsSender that records what it was asked to send; ``gate`` holds sends back while cleared."""

    def __init__(self) -> None:
        self.sent: list[OutboundSms] = []
        self.gate = threading.Event()
        self.gate.set()

    def send(self, sms: OutboundSms) -> SendResult:
        if not self.gate.wait(timeout=10):
            return SendResult(ok=False, code="Test.GateTimeout", message="the test never opened the gate")
        self.sent.append(sms)
        return SendResult(ok=True, serial=f"test:{sms.message_id}", code="Ok", message="recorded")


def payload(
    text: str,
    *,
    at: int,
    mobile: str = MOBILE,
    sign: str = SIGN,
    nationcode: str = NATIONCODE,
    extend: str = "",
) -> dict[str, Any]:
    return {"extend": extend, "mobile": mobile, "nationcode": nationcode, "sign": sign, "text": text, "time": at}


async def _stop_deliverer() -> None:
    for task in asyncio.all_tasks():
        if task.get_name() != "smsbot-deliverer":
            continue
        for _ in range(200):
            task.cancel()
            done, _pending = await asyncio.wait({task}, timeout=0.05)
            if done:
                break


def stop_app(client: TestClient, app: FastAPI, *, timeout: float = 10.0) -> None:
    """Leave the TestClient context (the app's shutdown), bounded in time.

    The delivery task is cancelled (repeatedly, until it ends) before the
    lifespan's own shutdown runs: a single ``cancel()`` can be swallowed by the
    delivery loop on Python 3.11 (see
    ``test_delivery_task_honours_a_cancel_that_arrives_with_a_wake_up``), which
    would hang the whole test session here.
    """
    app.state.runtime.pipeline.writer.on_commit = None
    with contextlib.suppress(Exception):  # the portal is gone: the app already stopped
        assert client.portal is not None
        client.portal.call(_stop_deliverer)
    leaving = threading.Thread(target=client.__exit__, args=(None, None, None), daemon=True)
    leaving.start()
    leaving.join(timeout)
    if leaving.is_alive():
        raise AssertionError(f"the app did not shut down within {timeout}s")


@dataclass
class Harness:
    """One running app (lifespan started: writer thread and delivery loop) and its test doubles."""

    app: FastAPI
    client: TestClient
    engine: Engine
    sender: RecordingSender
    clock: FakeClock
    rules: LiveRules
    settings: Settings
    _seq: int = field(default=0)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def next_time(self) -> int:
        """A distinct, plausible ``time`` for each message (the dedupe key includes it)."""
        with self._lock:
            self._seq += 1
            return int(self.clock().timestamp()) - 3600 + self._seq

    def post(self, body: Any, *, token: str | None = None) -> httpx.Response:
        params = {"token": token} if token is not None else None
        response: httpx.Response
        if isinstance(body, bytes | str):
            response = self.client.post(
                "/sms/callback", content=body, params=params, headers={"content-type": "application/json"}
            )
        else:
            response = self.client.post("/sms/callback", json=body, params=params)
        return response

    def say(self, text: str, **fields: Any) -> httpx.Response:
        fields.setdefault("at", self.next_time())
        response = self.post(payload(text, **fields))
        assert response.status_code == 200, response.text
        assert response.json() == {"result": 0, "errmsg": "OK"}
        return response

    def client_from(self, host: str) -> TestClient:
        """A browser of its own on the running app, connecting from ``host`` (logins are counted per address)."""
        return TestClient(self.app, raise_server_exceptions=False, client=(host, 50000))

    def count(self, table: Table, *where: Any) -> int:
        return count(self.engine, table, *where)

    def rows(self, table: Table, *where: Any) -> list[RowMapping]:
        return rows(self.engine, table, *where)

    def outbound(self) -> list[RowMapping]:
        return self.rows(messages, messages.c.direction == "out")

    def inbound(self) -> list[RowMapping]:
        return self.rows(messages, messages.c.direction == "in")

    def wait_settled(self, *, timeout: float = 5.0) -> list[RowMapping]:
        """Wait until the outbox is empty (every queued reply sent or suppressed); return the outbound rows."""
        wait_until(lambda: self.count(outbox) == 0, timeout=timeout, what="the outbox to drain")
        return self.outbound()


def compile_text(text: str, name: str = "t.yaml", *, warnings: bool = True) -> CompiledFile:
    """A rule file compiled from ``text``, asserting it has no errors (nor, with ``warnings=False``, warnings)."""
    result = compile_file(text, path=name, name=name)
    assert [str(d) for d in result.diagnostics if d.is_error or not warnings] == []
    assert result.compiled is not None
    return result.compiled


def copy_rules(dest: Path, *names: str) -> Path:
    """A rules folder in ``dest`` holding copies of the example files ``names`` (default: all)."""
    dest.mkdir(parents=True, exist_ok=True)
    for source in sorted(RULES.glob("*.yaml")):
        if not names or source.name in names:
            shutil.copy(source, dest / source.name)
    return dest


def write_rules(folder: Path, name: str, source: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(source, encoding="utf-8")
    return path


def texts(rows_: Sequence[RowMapping]) -> list[str]:
    return [r["text"] for r in rows_]


NO_FREQUENCY_LIMITS: dict[str, Any] = {"frequency_same_content": None, "frequency_per_day": None}
"""Conversation tests answer the same number many times within seconds of a frozen clock; Tencent's
per-number limits (on by default) have their own tests in ``tests/delivery/test_frequency.py``."""


def start_app(
    target: str | Engine,
    *,
    clock: FakeClock,
    rules_path: Path,
    settings: Settings | None = None,
    sender: RecordingSender | None = None,
    deliver: bool = True,
    load_rules: bool = True,
    watch_rules: bool = False,
    frequency_limits: bool = False,
) -> Harness:
    """Build an app and start its lifespan (writer thread, delivery loop); stop it with ``stop_app``."""
    eng = make_engine(target) if isinstance(target, str) else target
    live = LiveRules(rules_path)
    if load_rules:
        live.load()
    settings = settings or Settings()
    if not frequency_limits:
        settings = settings.model_copy(update=NO_FREQUENCY_LIMITS)
    sender = sender or RecordingSender()
    app = create_app(
        settings, engine=eng, rules=live, sender=sender, clock=clock, deliver=deliver, watch_rules=watch_rules
    )
    client = TestClient(app, raise_server_exceptions=False)
    client.__enter__()
    return Harness(app, client, eng, sender, clock, live, settings)


def postgres_schema_url(url: str, schema: str) -> str:
    """``url`` with ``schema`` first on the search path (a private namespace for long-lived fixtures)."""
    return make_url(url).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)


def reset_postgres_schema(url: str, schema: str, *, create: bool = True) -> None:
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            if create:
                conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    finally:
        admin.dispose()


def delivery_report(sid: str, status: str = "SUCCESS", **extra: Any) -> dict[str, Any]:
    """One item of Tencent's delivery-status callback, as Tencent writes it."""
    return {
        "user_receive_time": "2026-01-05 10:00:07",
        "nationcode": "86",
        "mobile": "13800000000",
        "report_status": status,
        "errmsg": "DELIVRD" if status == "SUCCESS" else "MK:0001",
        "description": "用户短信接收成功" if status == "SUCCESS" else "空号",
        "sid": sid,
        **extra,
    }


@contextlib.contextmanager
def writing(engine: Engine) -> Iterator[Connection]:
    """A write transaction the way the app writes (BEGIN IMMEDIATE on SQLite), for tests that write beside a running app.

    A plain ``engine.begin()`` on SQLite starts as a reader and must upgrade on its first
    write; if the app's writer committed in between, SQLite refuses at once ("database is
    locked") instead of waiting its busy timeout.
    """
    with engine.connect().execution_options(**WRITE_OPTIONS) as conn, conn.begin():
        yield conn


SMSBOT = Path(sys.executable).parent / "smsbot"
"""The ``smsbot`` command installed beside this interpreter."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    base: str
    log: Path
    engine: Engine
    rules: Path
    _seq: int = 0

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def post(self, body: Any, timeout: float = 10.0) -> httpx.Response:
        return httpx.post(f"{self.base}/sms/callback", json=body, timeout=timeout)

    def at(self) -> int:
        self._seq += 1
        return int(time.time()) - 3600 + self._seq

    def say(self, text: str, **fields: Any) -> httpx.Response:
        fields.setdefault("at", self.at())
        response = self.post(payload(text, **fields))
        assert response.status_code == 200, response.text
        assert response.json() == {"result": 0, "errmsg": "OK"}
        return response

    def ready(self) -> httpx.Response:
        return httpx.get(f"{self.base}/readyz", timeout=10)

    def printed(self, needle: str) -> int:
        return sum(1 for line in self.output().splitlines() if line.startswith("[console sender]") and needle in line)

    def wait_settled(self, timeout: float = 10.0) -> None:
        wait_until(lambda: count(self.engine, outbox) == 0, timeout=timeout, what="the outbox to drain")

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"smsbot serve did not stop within {timeout}s:\n{self.output()[-3000:]}") from None
        return int(self.proc.returncode)


@contextlib.contextmanager
def serve_process(
    db_url: str,
    tmp_path: Path,
    *,
    rules: Path | None = None,
    env: dict[str, str] | None = None,
    smsbot: Path = SMSBOT,
) -> Iterator[Server]:
    """A real ``smsbot serve`` (writer process, console sender) on a loopback port, ready; stopped after.

    ``smsbot`` is the command to run: by default the one beside this interpreter (the checkout's),
    ``tests/test_wheel.py`` passes the one a wheel installed elsewhere.
    """
    port = free_port()
    rules = rules or copy_rules(tmp_path / "rules")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SMSBOT_")}
    environment |= {
        "SMSBOT_DATABASE_URL": db_url,
        "SMSBOT_RULES_DIR": str(rules),
        "SMSBOT_WRITER": "process",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(smsbot), "serve", "--port", str(port)],
            cwd=tmp_path,
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as under a service manager
        )
    engine = create_engine(db_url)
    server = Server(proc, f"http://127.0.0.1:{port}", log, engine, rules)

    def up() -> bool:
        assert proc.poll() is None, f"smsbot serve exited:\n{server.output()}"
        with contextlib.suppress(httpx.HTTPError):
            return server.ready().status_code == 200
        return False

    try:
        wait_until(up, timeout=60, what="smsbot serve to be ready")
        yield server
    finally:
        server.stop()
        engine.dispose()


def fail_inserts_into_outbox(engine: Engine) -> None:
    """Make every INSERT INTO outbox fail: the last write of a message that gets a reply, so its whole batch fails."""
    with engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql(
                "CREATE TRIGGER smsbot_test_fail BEFORE INSERT ON outbox "
                "BEGIN SELECT RAISE(ABORT, 'simulated failure'); END"
            )
        else:
            conn.exec_driver_sql(
                "CREATE FUNCTION smsbot_test_fail() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'simulated failure'; END $$"
            )
            conn.exec_driver_sql(
                "CREATE TRIGGER smsbot_test_fail BEFORE INSERT ON outbox "
                "FOR EACH ROW EXECUTE FUNCTION smsbot_test_fail()"
            )


def store_again(engine: Engine) -> None:
    """Undo ``fail_inserts_into_outbox``."""
    with engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("DROP TRIGGER smsbot_test_fail")
        else:
            conn.exec_driver_sql("DROP TRIGGER smsbot_test_fail ON outbox")
            conn.exec_driver_sql("DROP FUNCTION smsbot_test_fail()")


def tencent_settings(fake: FakeTencentSms, **extra: Any) -> Settings:
    """Settings for the Tencent sender pointed at a running fake, with the fake's own credentials."""
    return Settings(
        sender="tencent",
        tencent_endpoint=fake.endpoint,
        tencent_scheme="http",
        tencent_sdk_app_id=fake.app_id,
        tencent_secret_id=SecretStr(fake.secret_id),
        tencent_secret_key=SecretStr(fake.secret_key),
        **extra,
    )


def ingest_history(
    engine: Engine, ruleset: Any, history: Sequence[tuple[str, str, datetime]], *, sign: str = SIGN
) -> None:
    """Store ``history`` ((mobile, text, when) in order) the way production does: ``handle_batch``, one
    transaction per message, its clock at ``when``, so the rows are exactly what real callbacks leave."""
    from bot.ingest.batch import handle_batch
    from bot.sms import Inbound

    for mobile, text, at in history:
        with writing(engine) as conn:
            handle_batch(
                conn,
                ruleset=ruleset,
                batch=[Inbound(NATIONCODE, mobile, sign, text, int(at.timestamp()))],
                now=at,
            )


CHROMIUM = Path("/usr/bin/chromium")
"""Debian's Chromium, which the real-browser tests drive through Playwright (.ci/run installs it)."""
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def require_chromium() -> None:
    """Skip without Chromium, unless SMSBOT_REQUIRE_BROWSER says a missing browser is a failure (CI)."""
    if not CHROMIUM.exists():
        if os.environ.get("SMSBOT_REQUIRE_BROWSER"):
            raise RuntimeError(f"{CHROMIUM} is missing: .ci/run installs it with apt-get (package chromium)")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)", allow_module_level=True)


def launch_chromium(playwright: Any) -> Any:
    """A headless Chromium for one test (Playwright's ``sync_playwright()`` object in, its browser out)."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
