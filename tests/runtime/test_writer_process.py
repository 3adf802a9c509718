"""``writer: process``: the real ``smsbot serve`` with its database work in a writer process.

Each test starts ``smsbot serve`` (uvicorn, console sender) as a subprocess
on a migrated database (SQLite and PostgreSQL), talks to it over HTTP and
reads what the console sender printed from its output.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from bot.ingest.batch import Policy
from bot.runtime.writer_process import ProcessWriter, WriterConfig, WriterJobFailed
from bot.sms import Inbound
from bot.store.models import messages
from tests.support import (
    NOTHING_STORED,
    Harness,
    Server,
    count,
    payload,
    rows,
    serve_process,
    stored_counts,
    wait_until,
    write_rules,
)

MENU = "Reply 1 for order status"


@pytest.fixture
def serve(db_url: str, tmp_path: Path) -> Iterator[Server]:
    with serve_process(db_url, tmp_path) as server:
        yield server


def _writer_pid(server: Server) -> int:
    pid: int = server.ready().json()["writer"]["pid"]
    return pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); its state in /proc says it is gone.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    return True


def test_conversation_end_to_end(serve: Server) -> None:
    ready = serve.ready().json()
    assert ready["writer"]["mode"] == "process"
    assert ready["writer"]["pid"] != serve.proc.pid

    serve.say("hi")
    wait_until(lambda: serve.printed(MENU) == 1, timeout=10, what="the console sender to print the menu")
    serve.say("1")
    serve.wait_settled()
    inbound = rows(serve.engine, messages, messages.c.direction == "in")
    outbound = rows(serve.engine, messages, messages.c.direction == "out")
    assert [m["text"] for m in inbound] == ["hi", "1"]
    assert len(outbound) == 2
    assert MENU in outbound[0]["text"]
    assert [m["status"] for m in outbound] == ["sent", "sent"]
    assert all(m["provider_serial"].startswith("console:") for m in outbound)
    assert inbound[1]["state_before"] == inbound[0]["state_after"]


def test_delivery_reports_are_applied_by_the_writer_process(serve: Server) -> None:
    serve.say("hi")
    serve.wait_settled()
    [reply] = rows(serve.engine, messages, messages.c.direction == "out")
    report = {
        "user_receive_time": "2026-01-05 10:00:07",
        "report_status": "SUCCESS",
        "errmsg": "DELIVRD",
        "sid": reply["provider_serial"],
    }
    response = httpx.post(f"{serve.base}/sms/status", json=[report, {**report, "sid": "5000:unknown"}], timeout=10)
    assert response.status_code == 200, response.text
    [after] = rows(serve.engine, messages, messages.c.id == reply["id"])
    assert after["status"] == "delivered"


def test_array_is_all_or_nothing_and_does_not_fail_others(serve: Server) -> None:
    """A database failure on one item of an array stores none of it; requests batched with it are stored."""
    with serve.engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql(
                "CREATE TRIGGER smsbot_test_fail BEFORE INSERT ON messages WHEN NEW.text = 'boom' "
                "BEGIN SELECT RAISE(ABORT, 'simulated failure'); END"
            )
        else:
            conn.exec_driver_sql(
                "CREATE FUNCTION smsbot_test_fail() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN IF NEW.text = 'boom' THEN RAISE EXCEPTION 'simulated failure'; END IF; RETURN NEW; END $$"
            )
            conn.exec_driver_sql(
                "CREATE TRIGGER smsbot_test_fail BEFORE INSERT ON messages "
                "FOR EACH ROW EXECUTE FUNCTION smsbot_test_fail()"
            )
    bad_array = [
        payload("hi", at=serve.at(), mobile="13911110000"),
        payload("boom", at=serve.at(), mobile="13911110001"),
    ]
    singles = [payload("hi", at=serve.at(), mobile=f"1370000{i:04d}") for i in range(20)]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(serve.post, body) for body in [*singles[:10], bad_array, *singles[10:]]]
        answers = [f.result() for f in futures]
    assert answers[10].status_code == 503
    assert answers[10].json()["result"] != 0
    assert [a.status_code for i, a in enumerate(answers) if i != 10] == [200] * 20
    stored = {
        m["text"] + "@" + str(m["contact_id"]) for m in rows(serve.engine, messages, messages.c.direction == "in")
    }
    assert len(stored) == 20
    with serve.engine.connect() as conn:
        numbers = {r[0] for r in conn.exec_driver_sql("SELECT mobile FROM contacts")}
    assert "13911110000" not in numbers
    assert "13911110001" not in numbers

    good_array = [
        payload("hi", at=serve.at(), mobile="13911110002"),
        payload("MENU", at=serve.at(), mobile="13911110003"),
    ]
    assert serve.post(good_array).status_code == 200
    assert count(serve.engine, messages, messages.c.direction == "in") == 22


def test_duplicates_are_stored_once(serve: Server) -> None:
    body = payload("hi", at=serve.at())
    for _ in range(5):
        assert serve.post(body).status_code == 200
    concurrent = payload("hi", at=serve.at(), mobile="13800009999")
    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda _i: serve.post(concurrent), range(5)))
    assert [a.status_code for a in answers] == [200] * 5
    serve.wait_settled()
    assert count(serve.engine, messages, messages.c.direction == "in") == 2
    assert count(serve.engine, messages, messages.c.direction == "out") == 2
    wait_until(lambda: serve.printed(MENU) == 2, what="two menus printed")


def test_killed_writer_answers_503_then_recovers(serve: Server) -> None:
    serve.say("hi")
    pid = _writer_pid(serve)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not _alive(pid), what="the writer process to die")
    statuses: list[int] = []
    started = time.monotonic()
    while time.monotonic() - started < 20:
        t0 = time.monotonic()
        response = serve.post(payload("MENU", at=serve.at(), mobile="13800007777"), timeout=5)
        assert time.monotonic() - t0 < 5  # answered, never hung
        statuses.append(response.status_code)
        if response.status_code == 200:
            break
        assert response.status_code == 503, response.text
        assert response.json()["result"] != 0
        time.sleep(0.02)
    assert statuses[-1] == 200, statuses
    ready = serve.ready()
    assert ready.status_code == 200
    assert ready.json()["writer"]["restarts"] == 1
    assert ready.json()["writer"]["pid"] != pid
    assert "writer process" in serve.output()
    assert "died" in serve.output()
    serve.say("hi", mobile="13800006666")
    serve.wait_settled()
    stored = [m["text"] for m in rows(serve.engine, messages, messages.c.direction == "in")]
    assert stored == ["hi", "MENU", "hi"]  # nothing from the 503 attempts


def test_pending_requests_fail_fast_when_the_writer_dies(serve: Server) -> None:
    """Requests in flight when the writer process dies are answered 503 at once, not left hanging."""
    pid = _writer_pid(serve)
    os.kill(pid, signal.SIGSTOP)  # the writer stops reading: requests queue up in the pipe
    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [
                pool.submit(serve.post, payload("hi", at=serve.at(), mobile=f"1360000{i:04d}")) for i in range(4)
            ]
            time.sleep(0.5)
            assert not any(f.done() for f in futures)
            t0 = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            answers = [f.result(timeout=10) for f in futures]
        assert time.monotonic() - t0 < 5
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert [a.status_code for a in answers] == [503] * 4
    wait_until(lambda: serve.ready().status_code == 200, timeout=20, what="the restarted writer")
    assert stored_counts(serve.engine) == NOTHING_STORED


def test_readyz_shows_rules_version_and_reload_error(serve: Server) -> None:
    before = serve.ready().json()
    assert before["status"] == "ok"
    assert before["database"] == "ok"
    version = before["rules"]["version"]
    assert version
    assert before["rules"]["files"] == ["acme-shop.yaml", "default.yaml"]
    assert before["rules"]["last_reload_error"] is None

    write_rules(serve.rules, "broken.yaml", "signature: Broken\nrules:\n  - when: [\n")
    wait_until(
        lambda: serve.ready().json()["rules"]["last_reload_error"], timeout=15, what="the reload error in /readyz"
    )
    after = serve.ready().json()
    assert after["rules"]["version"] == version  # the old rules stay live
    assert any("broken.yaml" in line for line in after["rules"]["last_reload_error"])
    serve.say("hi")  # still answered with the old rules
    wait_until(lambda: serve.printed(MENU) == 1, what="the menu with the old rules")

    (serve.rules / "broken.yaml").unlink()
    (serve.rules / "acme-shop.yaml").write_text(
        (serve.rules / "acme-shop.yaml").read_text(encoding="utf-8") + "\n# changed\n", encoding="utf-8"
    )
    wait_until(lambda: serve.ready().json()["rules"]["version"] != version, timeout=15, what="the new rules version")
    assert serve.ready().json()["rules"]["last_reload_error"] is None


def test_clean_shutdown(serve: Server) -> None:
    serve.say("hi")
    pid = _writer_pid(serve)
    assert serve.stop() == 0
    output = serve.output()
    assert "Application shutdown complete" in output
    assert "Traceback" not in output
    wait_until(lambda: not _alive(pid), what="the writer process to exit")
    assert count(serve.engine, messages, messages.c.direction == "in") == 1


def test_unknown_signature_is_warned_once(serve: Server) -> None:
    version = serve.ready().json()["rules"]["version"]
    (serve.rules / "default.yaml").unlink()  # no default rules: other signatures get no answer
    wait_until(lambda: serve.ready().json()["rules"]["version"] != version, timeout=15, what="the reload")
    serve.say("hi", sign="Nobody Shop")
    serve.say("hello", sign="Nobody Shop")
    assert count(serve.engine, messages, messages.c.direction == "in") == 2
    assert count(serve.engine, messages, messages.c.direction == "out") == 0
    wait_until(lambda: "no rules answer signature 'Nobody Shop'" in serve.output(), what="the warning")
    assert serve.output().count("no rules answer signature 'Nobody Shop'") == 1


def test_sigterm_to_the_process_group_is_a_clean_shutdown(serve: Server) -> None:
    """A service manager signals every process of the group: the writer waits for the HTTP side's "stop"."""
    serve.say("hi")
    pid = _writer_pid(serve)
    os.killpg(serve.proc.pid, signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal it caught (exit status -15)
    assert serve.proc.wait(20) in (0, -signal.SIGTERM)
    output = serve.output()
    assert "Application shutdown complete" in output
    assert "stopping:" in output  # the writer finished on "stop", not on the signal
    assert "died" not in output  # the writer was not restarted during shutdown
    assert "Traceback" not in output
    wait_until(lambda: not _alive(pid), what="the writer process to exit")


def test_process_mode_needs_a_picklable_sender(tmp_path: Path) -> None:
    import threading

    from bot.config import Settings
    from bot.runtime.live_rules import LiveRules
    from bot.store.db import make_engine
    from bot.web.app import create_app

    class Unpicklable:
        lock = threading.Lock()

        def __init__(self) -> None:
            self.lock = threading.Lock()

        def send(self, sms: Any) -> Any:
            raise NotImplementedError

    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        with pytest.raises(ValueError, match="picklable"):
            create_app(
                Settings(), engine=engine, rules=LiveRules(tmp_path), sender=Unpicklable(), writer_mode="process"
            )
    finally:
        engine.dispose()


def test_a_console_retry_wakes_the_writer_process_delivery_loop(
    make_app: Callable[..., Harness], db_url: str, rules_dir: Path
) -> None:
    """A reply requeued outside the writer process goes out at once, not at the loop's next poll."""
    writer = ProcessWriter(
        WriterConfig(database_url=db_url, rules_dir=rules_dir, param_max_length=None, policy=Policy(), poll_seconds=60)
    )
    h = make_app(db_url, deliver=False)

    def outbound_statuses() -> list[str]:
        return [m["status"] for m in h.outbound()]

    async def scenario() -> tuple[list[str], list[str]]:
        await writer.start()
        try:
            await writer.ping()
            # Its delivery loop starts after the rules are loaded, stored and checked: give it time for its
            # first look at the (empty) outbox, after which it waits the 60 s poll unless woken.
            await asyncio.sleep(2.0)
            h.say("hi")  # queued by another writer, as the console requeues a retry
            await asyncio.sleep(1.0)
            before = outbound_statuses()
            writer.wake_delivery()
            deadline = time.monotonic() + 10
            while outbound_statuses() != ["sent"] and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return before, outbound_statuses()
        finally:
            await writer.stop()

    before, after = asyncio.run(scenario())
    assert before == ["queued"], "the loop sent the reply before it was woken: the test shows nothing"
    assert after == ["sent"], "the woken delivery loop did not send the requeued reply"


def test_a_job_that_cannot_reach_the_writer_fails_alone(db_url: str, rules_dir: Path) -> None:
    """Jobs of one event-loop turn travel together; one that cannot be sent must not strand the others."""
    writer = ProcessWriter(
        WriterConfig(database_url=db_url, rules_dir=rules_dir, param_max_length=None, policy=Policy())
    )
    at = int(time.time())
    good = [Inbound("86", f"1390000000{n}", "Acme Shop", "hi", at, "") for n in range(2)]
    bad = Inbound("86", "13900000009", "Acme Shop", "hi", at, cast(str, lambda: "not picklable"))

    async def scenario() -> list[Any]:
        await writer.start()
        try:
            async with asyncio.timeout(30):  # before the fix, the whole turn's requests waited forever
                return list(
                    await asyncio.gather(
                        writer.store([good[0]]), writer.store([bad]), writer.store([good[1]]), return_exceptions=True
                    )
                )
        finally:
            await writer.stop()

    first, failed, second = asyncio.run(scenario())
    assert isinstance(failed, WriterJobFailed)
    assert "nothing stored" in str(failed)
    assert [r.duplicate for r in (*first, *second)] == [False, False]
    assert all(r.message_id for r in (*first, *second))
