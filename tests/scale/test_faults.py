"""Crashes and faults with real processes: kill -9 of a server or a worker, PostgreSQL stopped and started.

Each test runs real ``smsbot`` processes (``tests/scale/cluster.py``) against a
fake Tencent that records every send, and then checks what a customer and ops
would see: every callback answered ``result 0`` has its message, state and
reply; no reply reached Tencent twice; nothing is left half-written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.scale.cluster import (
    CONTEXTS,
    Drive,
    callback,
    cluster,
    drive,
    engine_for,
    make_fake,
    mobile,
    outbound,
    outbox_count,
    script,
    states,
)
from tests.scale.cluster import inbound_texts as stored_texts
from tests.support import PG_URL, PG_URL_ENV, free_port, reset_postgres, wait_until

pytestmark = pytest.mark.slow

needs_postgres = pytest.mark.skipif(not PG_URL, reason=f"{PG_URL_ENV} is not set")


def check_after(engine_url: str, result: Drive, conversations: range, sends: list[int | None]) -> dict[int, str]:
    """What every fault test checks at the end; returns each reply's status by message id."""
    engine = engine_for(engine_url)
    try:
        said = stored_texts(engine)
        final = states(engine)
        replies = outbound(engine)
        assert outbox_count(engine) == 0, "an outbox row was left behind"
    finally:
        engine.dispose()
    for i, k in result.ok:  # answered result 0: its message is stored, once
        text_ = script(i)[k][0]
        assert said.get(mobile(i), []).count(text_) == 1, f"conversation {i} step {k} answered OK but not stored once"
    done = {i for i in conversations if {(i, k) for k in range(3)} <= set(result.ok)}
    assert done, "no conversation got through"
    for i in done:
        assert final[mobile(i)] == "done", f"conversation {i} was answered OK at every step but is not done"
    # nothing half-written: every stored message has its reply and the state that goes with it
    by_mobile: dict[str, list[dict[str, object]]] = {}
    for r in replies:
        by_mobile.setdefault(str(r["mobile"]), []).append(r)
    steps_state = {0: None, 1: "menu", 2: "chose", 3: "done"}
    for number, texts in said.items():
        assert len(by_mobile.get(number, [])) == len(texts), f"{number}: a message without its reply"
        assert final[number] == steps_state[len(texts)], f"{number}: state does not match its messages"
    status = {int(str(r["id"])): str(r["status"]) for r in replies}
    twice = [m for m, n in Counter(sends).items() if n > 1]
    assert not twice, f"replies sent twice: {twice}"
    assert None not in sends
    for message_id, st in status.items():  # sent: exactly once at Tencent; ambiguous: at most once, never resent
        assert st in ("sent", "ambiguous", "delivered"), (message_id, st)
        if st == "sent":
            assert message_id in sends, f"reply {message_id} is 'sent' but never reached Tencent"
    assert set(sends) <= set(status), "Tencent got a send that is no reply of ours"
    return status


# ---------------------------------------------------------------- kill -9 of the server


@needs_postgres
def test_kill_9_of_the_server_during_load_loses_no_answered_callback_and_sends_no_reply_twice(
    tmp_path: Path,
) -> None:
    """``smsbot serve`` (HTTP process, writer process and its delivery loop) killed at once, then started again.

    The customers' callbacks go on meanwhile and are retried for a while when
    unanswered (as Tencent retries), so every conversation ends; replies the
    killed delivery loop had in flight are ambiguous, never sent again.
    """
    assert PG_URL is not None
    reset_postgres(PG_URL)
    conversations = range(300)
    with (
        make_fake() as fake,
        cluster(PG_URL, tmp_path, fake.endpoint, SMSBOT_DELIVERY_LEASE="1s", SMSBOT_TENCENT_TIMEOUT="1") as c,
    ):
        port = free_port()
        server = c.serve("serve-1", port=port, deliver=True)
        current = [server]
        killed = threading.Event()

        def crash_when_busy() -> None:
            wait_until(lambda: len(result_box[0].ok) >= 250, timeout=120, what="load to build up")
            current[0].kill_group()  # kill -9 of serve, its writer process and the fork server
            killed.set()
            restarted = c.serve("serve-2", port=port, wait=False, deliver=True)
            wait_until(restarted.ready, timeout=90, what="the restarted server")
            current[0] = restarted

        result_box = [Drive()]
        crasher = threading.Thread(target=crash_when_busy, daemon=True)
        crasher.start()
        result = drive(lambda: [current[0].base], conversations, concurrency=24, retry_for=120, into=result_box[0])
        crasher.join(120)
        assert killed.is_set(), "the server was never killed: the load ended first"
        assert result.errors, "no callback went unanswered: the kill came after the load"
        engine = engine_for(PG_URL)
        wait_until(lambda: outbox_count(engine) == 0, timeout=90, what="the outbox to drain after the restart")
        engine.dispose()
        sends = [CONTEXTS.message_id(s.session_context) for s in fake.sends]
        status = check_after(PG_URL, result, conversations, sends)
        assert len(result.ok) == 3 * len(conversations), "a conversation did not finish after the restart"
        print(
            f"\nkill -9 of serve: {len(result.errors)} callbacks unanswered and retried; replies: "
            f"{Counter(status.values())}"
        )


# ---------------------------------------------------------------- kill -9 of a worker mid-send


@needs_postgres
def test_kill_9_of_a_worker_mid_send_makes_that_send_ambiguous_and_another_worker_sends_the_rest(
    tmp_path: Path,
) -> None:
    """Tencent takes the first reply and hangs; the worker is killed before it hears back.

    When the lease runs out, a second worker marks that send ambiguous (it may
    have reached the handset: Tencent has it), sends the two replies queued
    behind it that were never tried, and later settles the ambiguous one by
    asking Tencent (``PullSmsSendStatusByPhoneNumber``), which lists the send
    with our SessionContext. Tencent gets each reply once.
    """
    assert PG_URL is not None
    reset_postgres(PG_URL)
    with (
        make_fake() as fake,
        cluster(PG_URL, tmp_path, fake.endpoint, SMSBOT_TENCENT_TIMEOUT="2", SMSBOT_DELIVERY_LEASE="1s") as c,
    ):
        server = c.serve("serve")
        import httpx

        at = int(time.time()) - 60
        for k, said in enumerate(("HI", "1", "BYE")):
            response = httpx.post(f"{server.base}/sms/callback", json=callback(said, mobile(1), at + k), timeout=30)
            assert response.json() == {"result": 0, "errmsg": "OK"}
        first, second, third = (int(str(r["id"])) for r in outbound(engine_for(PG_URL)))

        fake.slow(30, times=1)  # the first SendSms is accepted and recorded, its answer never comes in time
        doomed = c.worker("worker-1", concurrency=1)
        wait_until(lambda: len(fake.sends) == 1, timeout=30, what="the first send to reach Tencent")
        doomed.kill9()  # while it waits for Tencent's answer: nothing recorded
        assert [CONTEXTS.message_id(s.session_context) for s in fake.sends] == [first]

        rescuer = c.worker("worker-2", SMSBOT_AMBIGUOUS_CHECK_AFTER="1s", SMSBOT_AMBIGUOUS_CHECK_INTERVAL="1s")
        engine = engine_for(PG_URL)

        def settled() -> dict[int, str] | None:
            found = {int(str(r["id"])): str(r["status"]) for r in outbound(engine)}
            return found if found[second] == found[third] == "sent" and found[first] != "queued" else None

        statuses = wait_until(settled, timeout=60, what="the second worker to take over")
        sends = [CONTEXTS.message_id(s.session_context) for s in fake.sends]
        assert sends == [first, second, third], "a send in flight was repeated, or one behind it lost"
        assert statuses[first] in ("ambiguous", "delivered")  # (the check with Tencent may have come already)
        assert f"marked ambiguous (not resent: {first});" in rescuer.output()
        # and Tencent's own record of the send settles it: delivered, by our SessionContext
        wait_until(
            lambda: {int(str(r["id"])): r["status"] for r in outbound(engine)}[first] == "delivered",
            timeout=60,
            what="the ambiguous send to be settled by PullSmsSendStatusByPhoneNumber",
        )
        assert outbox_count(engine) == 0
        assert len(fake.sends) == 3
        assert rescuer.alive()
        engine.dispose()


# ---------------------------------------------------------------- PostgreSQL restarted


def _pg_bin() -> Path | None:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    found = shutil.which("pg_ctl")
    return Path(found).parent if found else None


@dataclass
class PrivatePostgres:
    """A PostgreSQL server of this test's own (initdb in a temporary folder), so stopping it disturbs nobody."""

    bin: Path
    data: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str) -> None:
        command = [str(self.bin / argv[0]), *argv[1:]]
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.data.parent / "pg.log"),
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data.parent}",
            "start",
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    binaries = _pg_bin()
    if binaries is None:
        pytest.skip("PostgreSQL's server binaries (initdb, pg_ctl) are not installed")
    folder = Path(tempfile.mkdtemp(prefix="smsbot-pg-"))
    os.chmod(folder, 0o777)
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
    server = PrivatePostgres(binaries, folder / "data", free_port())
    server._run("initdb", "-D", str(server.data), "-A", "trust", "-U", "postgres", "--no-sync")
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def test_postgres_restarted_during_load_callbacks_get_503_then_succeed_and_nothing_is_half_written(
    tmp_path: Path, private_postgres: PrivatePostgres
) -> None:
    conversations = range(200)
    with (
        make_fake() as fake,
        cluster(
            private_postgres.url, tmp_path, fake.endpoint, SMSBOT_DELIVERY_LEASE="1s", SMSBOT_TENCENT_TIMEOUT="1"
        ) as c,
    ):
        server = c.serve("serve", deliver=True)
        result_box = [Drive()]
        outage: dict[str, float] = {}

        def restart_postgres() -> None:
            wait_until(lambda: len(result_box[0].ok) >= 150, timeout=120, what="load to build up")
            private_postgres.stop()
            outage["down"] = time.monotonic()
            wait_until(  # a few seconds down, and refusals seen
                lambda: len(result_box[0].refused) >= 20 and time.monotonic() - outage["down"] >= 3,
                timeout=60,
                what="callbacks to be refused",
            )
            private_postgres.start()
            outage["up"] = time.monotonic()

        restarter = threading.Thread(target=restart_postgres, daemon=True)
        restarter.start()
        result = drive(lambda: [server.base], conversations, concurrency=16, retry_for=120, into=result_box[0])
        restarter.join(180)
        assert "up" in outage, "PostgreSQL was never restarted"
        statuses = Counter(code for _, _, code in result.refused)
        assert set(statuses) == {503}, f"refused with {statuses}: Tencent retries only non-2xx"
        assert not result.errors, f"callbacks with no answer at all: {result.errors[:5]}"
        assert len(result.ok) == 3 * len(conversations), "a conversation did not finish with PostgreSQL back"
        engine = engine_for(private_postgres.url)
        wait_until(lambda: outbox_count(engine) == 0, timeout=90, what="the outbox to drain")
        engine.dispose()
        sends = [CONTEXTS.message_id(s.session_context) for s in fake.sends]
        status = check_after(private_postgres.url, result, conversations, sends)
        assert server.alive(), "serve died with its database"
        log = server.output()
        assert "callback not stored" in log
        print(
            f"\nPostgreSQL down {outage['up'] - outage['down']:.1f}s: {sum(statuses.values())} callbacks "
            f"answered 503, replies {Counter(status.values())}"
        )
