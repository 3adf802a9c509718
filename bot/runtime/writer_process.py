"""The database writer in a process of its own (``writer: process``).

In one process, HTTP handling and the group-commit writer thread share one
GIL, and the server is pinned at one core. Here the HTTP process only reads,
validates and forwards callbacks; a writer process (forked by a
``forkserver``, since the HTTP process has threads and a plain fork of it is
unsafe; the fork server has the writer's modules imported, so a restart takes
a fork, not seconds of imports) owns everything that touches the
database: the connection, the live rules (load and watch), the group commit
(``DbWriter.process``: the same savepoints and retry-alone fallback as the
thread) and the delivery loop with the configured sender.

The two talk over one ``multiprocessing`` pipe. HTTP -> writer:
``("jobs", [job, ...])`` (the jobs submitted in one turn of the HTTP event loop, each
``("batch", job_id, [Inbound, ...])``, ``("ping", job_id)`` or ``("reports", job_id, [StatusReport, ...])``)
``("wake",)`` (look at the outbox now: the console requeued a reply) and ``("stop",)``.
Writer -> HTTP: ``("ready", pid)``, ``("rules", status)`` at start and after
every reload attempt, ``("rules_state", status)`` when the control row changed what is served (a
promote, a pin), and ``("done", [(job_id, ok, payload), ...])`` once per
committed transaction (payload: ``[(message_id, duplicate, queued), ...]``
for a batch, an error text otherwise). The HTTP side reads the pipe from its
event loop (``add_reader``). If the writer process dies, the pipe reaches
EOF: every waiting request fails at once (the route answers 503), new ones
fail until a new writer process is ready, and it is restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection as PipeEnd
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Connection, text

from bot.events.endpoints import EventEndpoints
from bot.ingest.batch import InboundResult, Policy
from bot.ingest.delivery_reports import ReportOutcome, apply_reports
from bot.runtime.logs import setup_logging
from bot.sms import Inbound
from bot.store.writer import DbWriter, Job
from bot.tencent.callbacks import StatusReport
from bot.tencent.session_context import SessionContexts

log = logging.getLogger("smsbot.writer")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MAX_BATCH = 256
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0


class WriterUnavailable(Exception):  # noqa: N818 - named for what the caller sees
    """The writer process is not running (died, restarting, or stopped): nothing was stored."""


class WriterJobFailed(Exception):  # noqa: N818 - the job failed, not the writer
    """The writer process ran the job and it failed (the database said no): nothing was stored."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


@dataclass(frozen=True)
class WriterConfig:
    """What the writer process needs to build its own engine, rules and sender (picklable)."""

    database_url: str
    rules_dir: Path
    param_max_length: int | None
    policy: Policy
    deliver: bool = True
    watch_rules: bool = True
    sender: Any = None
    """A picklable SmsSender, or None for the console sender."""
    log_level: int = logging.INFO
    log_format: Literal["text", "json"] = "text"
    log_reveal_numbers: bool = False
    poll_seconds: float = 1.0
    delivery: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the ``Deliverer`` (see ``bot.delivery.deliverer.delivery_options``)."""
    session_context_key: bytes | None = None
    """The key of our SessionContext marker, so delivery reports match our replies (None: by SerialNo alone)."""
    events: dict[str, Any] = field(default_factory=dict)
    """``Settings.events``: the config's event endpoints (their secrets are read from the environment)."""
    rollout: Literal["immediate", "staged"] = "immediate"
    testers: frozenset[str] = frozenset()


# ====================================================================== the writer process


def writer_main(conn: PipeEnd, config: WriterConfig) -> None:
    """Entry point of the writer process."""
    # The HTTP process owns this one's life: Ctrl-C (SIGINT) and a service manager's SIGTERM reach the
    # whole process group, and the HTTP process finishes its requests, then sends "stop". If the HTTP
    # process dies instead, the pipe reaches EOF and this one finishes its batch and exits.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_logging(level=config.log_level, log_format=config.log_format, reveal_numbers=config.log_reveal_numbers)
    _Child(conn, config).run()


class _Child:
    def __init__(self, conn: PipeEnd, config: WriterConfig) -> None:
        from bot.delivery.deliverer import Deliverer
        from bot.ingest.inbound_store import InboundStore
        from bot.runtime.edge import EdgeLoops, live_endpoints
        from bot.runtime.live_rules import LiveRules, RulesInvalid
        from bot.runtime.rule_versions import VersionStore
        from bot.sms import ConsoleSender
        from bot.store.db import make_engine

        self.conn = conn
        self.contexts = SessionContexts(config.session_context_key) if config.session_context_key else None
        self.config = config
        self._send_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self.engine = make_engine(config.database_url)
        self.rules = LiveRules(
            config.rules_dir, config.param_max_length, rollout=config.rollout, testers=config.testers
        )
        self.rules.attach(VersionStore(self.engine, param_max_length=config.param_max_length))
        with contextlib.suppress(RulesInvalid):  # logged; /readyz shows it, callbacks store without replies
            self.rules.load()
        wake_w = self._wake_w

        class _Writer(DbWriter):
            def _submit(self, job: Any) -> None:
                super()._submit(job)
                with contextlib.suppress(OSError):  # BlockingIOError: the main loop is already woken
                    os.write(wake_w, b"x")

        self.endpoints = live_endpoints(config.events, self.rules)
        self.inbound = InboundStore(
            rules=self.rules, policy=config.policy, clock=lambda: datetime.now(UTC), events=self.endpoints
        )
        self.writer = _Writer(self.engine, max_batch=MAX_BATCH, on_commit=self.inbound.after_commit)
        sender = config.sender if config.sender is not None else ConsoleSender()
        # On PostgreSQL the delivery loop commits on a connection (and thread) of its own: sharing the
        # callbacks' writer put its claims and settlements inside their transactions, where they took
        # over a third of the writer's time while callbacks waited. SQLite has one write lock anyway.
        self.delivery_writer = (
            DbWriter(self.engine, max_batch=MAX_BATCH) if self.engine.dialect.name == "postgresql" else self.writer
        )
        self.deliverer = (
            Deliverer(
                self.delivery_writer,
                sender,
                poll_seconds=config.poll_seconds,
                events=self.endpoints.current,
                **config.delivery,
            )
            if config.deliver
            else None
        )
        self.inbound.deliverer = self.deliverer
        # Events and webhook calls commit through the delivery loop's writer (their own connection on PostgreSQL).
        self.edge = (
            EdgeLoops(self.delivery_writer, self.rules, self.endpoints, policy=config.policy, deliverer=self.deliverer)
            if config.deliver
            else None
        )
        self.inbound.edge = self.edge
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._astop: asyncio.Event | None = None
        self._athread = threading.Thread(target=self._async_main, name="smsbot-writer-async", daemon=True)

    # ---------------------------------------------------------------- pipe

    def send(self, message: Any) -> None:
        with self._send_lock:
            self.conn.send(message)

    def _send_rules(self) -> None:
        with contextlib.suppress(OSError):  # the HTTP process is gone; the main loop notices
            self.send(("rules", self.rules.status()))

    def _send_rules_state(self) -> None:
        """What answers whom changed (a promote or pin in the control row): not a load attempt."""
        with contextlib.suppress(OSError):
            self.send(("rules_state", self.rules.status()))

    # ---------------------------------------------------------------- batch handlers (writer main thread)

    @staticmethod
    def _ping(conn: Connection) -> bool:
        conn.execute(text("SELECT 1"))
        return True

    # ---------------------------------------------------------------- delivery and rules watch (own thread)

    def _async_main(self) -> None:
        asyncio.run(self._async_tasks())

    async def _async_tasks(self) -> None:
        self._aloop = asyncio.get_running_loop()
        self._astop = asyncio.Event()
        tasks = []
        if self.deliverer is not None:
            tasks.append(asyncio.create_task(self.deliverer.run_forever(), name="smsbot-deliverer"))
        if self.config.watch_rules:
            tasks.append(asyncio.create_task(self.rules.watch(self._send_rules), name="smsbot-rules-watch"))
        tasks.append(asyncio.create_task(self.rules.follow(self._send_rules_state), name="smsbot-rules-control"))
        if self.edge is not None:  # after the watch: their HTTP clients take a moment to build
            tasks.extend(self.edge.start_tasks())
        await self._astop.wait()
        for task in tasks:
            # Cancel until it ends: on Python 3.11 a cancel arriving with a wake-up can be swallowed.
            for _ in range(100):
                task.cancel()
                done, _pending = await asyncio.wait({task}, timeout=0.05)
                if done:
                    break

    def _stop_async(self) -> None:
        loop, event = self._aloop, self._astop
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)

    # ---------------------------------------------------------------- the main loop

    def run(self) -> None:
        self.writer.start_checkpointer()
        if self.delivery_writer is not self.writer:
            self.delivery_writer.start()
        self._athread.start()
        self._send_rules()
        self.send(("ready", os.getpid()))
        stopping_at: float | None = None
        pipe_open = True
        while True:
            waitables: list[Any] = [self._wake_r]
            if pipe_open:
                waitables.append(self.conn)
            wait(waitables, timeout=None if stopping_at is None else 0.05)
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)
            batch: list[Job[Any]] = self.writer.take_waiting(MAX_BATCH)
            remote: list[tuple[int, str, Job[Any]]] = []
            while pipe_open and len(batch) < MAX_BATCH:
                try:
                    if not self.conn.poll():
                        break
                    message = self.conn.recv()
                except (EOFError, OSError):  # the HTTP process is gone: finish what we have and leave
                    pipe_open = False
                    stopping_at = stopping_at or time.monotonic()
                    self._stop_async()
                    break
                if message[0] == "jobs":
                    for job_message in message[1]:
                        self._take(job_message, batch, remote)
                elif message[0] == "wake":
                    if self.deliverer is not None:
                        self.deliverer.wake()
                elif message[0] == "stop" and stopping_at is None:
                    stopping_at = time.monotonic()
                    self._stop_async()
            if batch:
                self.writer.process(batch)
                if remote and pipe_open:
                    self._answer(remote)
            if stopping_at is not None and (
                not self._athread.is_alive() or time.monotonic() - stopping_at > STOP_TIMEOUT
            ):
                break
        log.info(
            "writer process %s stopping: %d transaction(s) for %d job(s)",
            os.getpid(),
            self.writer.batches,
            self.writer.jobs,
        )
        self.writer.stop()  # the checkpointer (the thread was never started)
        self.writer._drop_connection()
        if self.delivery_writer is not self.writer:
            self.delivery_writer.stop()
        self.engine.dispose()
        with contextlib.suppress(OSError):
            self.conn.close()

    def _take(self, message: tuple[Any, ...], batch: list[Any], remote: list[tuple[int, str, Any]]) -> None:
        """Turn one job the HTTP process sent into a job of the next transaction."""
        kind, job_id = message[0], message[1]
        if kind == "batch":
            items = message[2]
            job: Job[Any] = Job(self._store_fn(items), None, None, handler=self.inbound.store, items=items)
        elif kind == "ping":
            job = Job(self._ping, None, None)
        elif kind == "reports":
            job = Job(
                functools.partial(_apply_reports_now, message[2], self.contexts, self.endpoints.current()), None, None
            )
        else:  # pragma: no cover - both ends are this module
            log.error("unknown job kind %r from the HTTP process", kind)
            return
        batch.append(job)
        remote.append((job_id, kind, job))

    def _store_fn(self, items: list[Inbound]) -> Any:
        return lambda conn: self.inbound.store(conn, items)

    def _answer(self, remote: list[tuple[int, str, Any]]) -> None:
        answers: list[tuple[int, bool, Any]] = []
        for job_id, kind, job in remote:
            if job.error is not None:
                answers.append((job_id, False, (type(job.error).__name__, str(job.error).splitlines()[0][:500])))
            elif kind == "batch":
                results: list[InboundResult] = job.result
                answers.append((job_id, True, [(r.message_id, r.duplicate, r.queued) for r in results]))
                self.inbound.warn_unknown_signatures(job.items, results)
            else:
                answers.append((job_id, True, job.result))
        try:
            self.send(("done", answers))
        except OSError:
            log.warning("the HTTP process is gone; %d answer(s) dropped (their rows are committed)", len(answers))


# ====================================================================== the HTTP side


def _apply_reports_now(
    reports: list[StatusReport], contexts: SessionContexts | None, events: EventEndpoints, conn: Connection
) -> ReportOutcome:
    return apply_reports(conn, reports, now=datetime.now(UTC), contexts=contexts, events=events)


def _wait_for_eof(conn: PipeEnd, timeout: float) -> bool:
    """Read (and drop) messages until the other end closes; False when ``timeout`` runs out first."""
    deadline = time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0:
            if conn.poll(left):
                conn.recv()
        return False
    except (EOFError, OSError):
        return True


class ProcessWriter:
    """Runs the writer process, forwards jobs to it and restarts it when it dies (HTTP process, event loop)."""

    def __init__(self, config: WriterConfig) -> None:
        try:
            pickle.dumps(config)
        except Exception as exc:
            raise ValueError(
                f"writer process: the sender must be picklable to reach the writer process: {exc}"
            ) from exc
        self.config = config
        self.on_rules_status: Callable[[dict[str, Any]], None] | None = None
        """Called with every rules status the writer process sends (each load attempt; ``/metrics`` counts them)."""
        self.rules_status: dict[str, Any] = {
            "version": None,
            "files": [],
            "loaded_at": None,
            "last_reload_error": None,
        }
        self.pid: int | None = None
        self.restarts = 0
        # forkserver: a clean process started once (this one has threads, so no plain fork), with the
        # writer's modules imported in advance, so a restart after a crash takes a fork, not seconds of imports.
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(
            [
                "bot.runtime.writer_process",
                "bot.ingest.batch",
                "bot.delivery.deliverer",
                "bot.runtime.live_rules",
                "bot.runtime.edge",
            ]
        )
        self._proc: Any = None
        self._conn: PipeEnd | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._futures: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 0
        self._outgoing: list[tuple[Any, ...]] = []
        self._flush_scheduled = False
        self._ready: asyncio.Future[int] | None = None
        self._alive = False
        self._stopping = False
        self._restart_task: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self._alive

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Start the writer process; on failure keep retrying in the background (callbacks answer 503)."""
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        try:
            await self._spawn()
        except Exception as exc:
            log.error("writer process did not start: %s; retrying in the background", exc)
            self._restart_task = self._loop.create_task(self._restart())

    async def _spawn(self) -> None:
        assert self._loop is not None
        ours, theirs = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=writer_main, args=(theirs, self.config), name="smsbot-writer", daemon=True)
        await asyncio.to_thread(proc.start)
        theirs.close()  # only the child holds it now: its death is EOF on ours
        self._conn = ours
        self._ready = self._loop.create_future()
        self._loop.add_reader(ours.fileno(), self._on_readable)
        try:
            async with asyncio.timeout(START_TIMEOUT):
                self.pid = await self._ready
        except BaseException:
            self._close_pipe()
            await self._reap(proc, kill=True)
            raise
        self._proc = proc
        self._alive = True
        log.info("writer process %s ready", self.pid)

    async def stop(self) -> None:
        """Ask the writer process to finish and exit; terminate it if it does not within STOP_TIMEOUT."""
        self._stopping = True
        if self._restart_task is not None:
            self._restart_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._restart_task
        proc, self._proc = self._proc, None
        conn = self._conn
        finished = conn is None
        if conn is not None:
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(conn.fileno())
            self._flush()  # jobs of this turn go before "stop", so the writer runs them and answers
            with contextlib.suppress(OSError):
                conn.send(("stop",))
            # The end of the pipe, not join(), says the writer has finished: with forkserver, join()
            # returns early if the fork server itself was signalled (SIGTERM to the process group).
            finished = await asyncio.to_thread(_wait_for_eof, conn, STOP_TIMEOUT)
        self._close_pipe()
        self._fail_all(WriterUnavailable("the server is shutting down"))
        if proc is not None:
            if not finished:
                log.warning("writer process %s did not stop within %ss; killing it", proc.pid, STOP_TIMEOUT)
            await self._reap(proc, kill=not finished)

    @staticmethod
    async def _reap(proc: Any, *, kill: bool) -> None:
        """Wait for ``proc`` to exit (killed first when ``kill``: it ignores SIGTERM); keeps its exitcode."""
        if kill and proc.is_alive():
            proc.kill()
        await asyncio.to_thread(proc.join, 3)

    def _close_pipe(self) -> None:
        conn, self._conn = self._conn, None
        self._alive = False
        if conn is not None:
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(conn.fileno())
            with contextlib.suppress(OSError):
                conn.close()

    def _fail_all(self, error: Exception) -> None:
        futures, self._futures = self._futures, {}
        for future in futures.values():
            if not future.done():
                future.set_exception(error)

    def _on_death(self) -> None:
        proc = self._proc
        was_alive = self._alive
        self._close_pipe()
        self._fail_all(WriterUnavailable("the writer process exited; nothing stored"))
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(WriterUnavailable("the writer process exited while starting"))
            return  # _spawn's caller retries
        if self._stopping or not was_alive:
            return
        self._proc = None
        assert self._loop is not None
        self._restart_task = self._loop.create_task(self._restart(proc))

    async def _restart(self, dead: Any = None) -> None:
        if dead is not None:
            await self._reap(dead, kill=False)
            log.error("writer process %s died (exit code %s); restarting it", self.pid, dead.exitcode)
        delay = 0.1
        while not self._stopping:
            await asyncio.sleep(delay)
            try:
                await self._spawn()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("writer process restart failed (%s); retrying in %.1fs", exc, min(delay * 2, 5.0))
                delay = min(delay * 2, 5.0)
                continue
            self.restarts += 1
            log.warning("writer process restarted (pid %s, restart %d)", self.pid, self.restarts)
            return

    # ---------------------------------------------------------------- messages from the writer

    def _on_readable(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            while conn.poll():
                self._handle(conn.recv())
        except (EOFError, OSError):
            self._on_death()

    def _handle(self, message: Any) -> None:
        kind = message[0]
        if kind == "done":
            for job_id, ok, payload in message[1]:
                future = self._futures.pop(job_id, None)
                if future is None or future.done():
                    continue
                if ok:
                    future.set_result(payload)
                else:
                    future.set_exception(WriterJobFailed(*payload))
        elif kind == "rules":
            self.rules_status = message[1]
            if self.on_rules_status is not None:
                self.on_rules_status(message[1])
        elif kind == "rules_state":  # a promote or pin, not a load attempt: /metrics does not count it
            self.rules_status = message[1]
        elif kind == "ready" and self._ready is not None and not self._ready.done():
            self._ready.set_result(message[1])

    # ---------------------------------------------------------------- jobs

    def _submit(self, message_kind: str, *args: Any) -> asyncio.Future[Any]:
        if not self._alive or self._conn is None or self._loop is None:
            raise WriterUnavailable("the writer process is not running (restarting); nothing stored")
        self._next_id += 1
        job_id = self._next_id
        future: asyncio.Future[Any] = self._loop.create_future()
        self._futures[job_id] = future
        self._outgoing.append((message_kind, job_id, *args))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        """Send every job submitted during this turn of the event loop as one pipe message.

        One pickle and one write for the callbacks that arrived together,
        instead of one each: under load the writer then reads a whole batch
        with one ``recv``. Every job's future is answered whatever happens: a
        broken pipe fails the jobs not yet sent (nothing of them stored), and a
        job that cannot be pickled fails alone (``send`` pickles before it
        writes, so nothing of it reached the writer).
        """
        self._flush_scheduled = False
        outgoing, self._outgoing = self._outgoing, []
        for start in range(0, len(outgoing), MAX_BATCH):
            chunk = outgoing[start : start + MAX_BATCH]
            try:
                self._send_jobs(chunk)
            except (OSError, ValueError) as exc:
                self._fail_jobs(
                    outgoing[start:], WriterUnavailable(f"the writer process is gone: {exc}; nothing stored")
                )
                self._on_death()
                return
            except Exception:
                for job in chunk:  # find the job that cannot be sent; the others go one by one
                    try:
                        self._send_jobs([job])
                    except (OSError, ValueError) as exc:
                        self._fail_jobs([job], WriterUnavailable(f"the writer process is gone: {exc}; nothing stored"))
                    except Exception as exc:
                        log.exception("job %s could not be sent to the writer process", job[1])
                        self._fail_jobs([job], WriterJobFailed(type(exc).__name__, f"nothing stored: {exc}"))

    def _send_jobs(self, jobs: list[tuple[Any, ...]]) -> None:
        conn = self._conn
        if conn is None:
            raise OSError("the pipe to the writer process is closed")
        conn.send(("jobs", jobs))

    def _fail_jobs(self, jobs: list[tuple[Any, ...]], error: Exception) -> None:
        for _, job_id, *_ in jobs:
            future = self._futures.pop(job_id, None)
            if future is not None and not future.done():
                future.set_exception(error)

    def wake_delivery(self) -> None:
        """Have the writer process's delivery loop look at the outbox now; callable from any thread.

        The console requeues a reply in its own transaction, which the writer
        process never sees commit; without this the reply would wait for the
        loop's next poll. Best effort: if the writer is down, its restart
        looks at the outbox anyway.
        """
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: the server is stopping
                loop.call_soon_threadsafe(self._send_wake)

    def _send_wake(self) -> None:
        conn = self._conn
        if conn is not None and self._alive:
            with contextlib.suppress(OSError, ValueError):
                conn.send(("wake",))

    async def store(self, inbound: list[Inbound]) -> list[InboundResult]:
        """Commit ``inbound`` in the writer process; results carry no decision (it stayed there)."""
        answers: list[tuple[int | None, bool, int]] = await self._submit("batch", inbound)
        return [InboundResult(message_id, duplicate, queued) for message_id, duplicate, queued in answers]

    async def apply_reports(self, reports: list[StatusReport]) -> ReportOutcome:
        """Apply Tencent's delivery reports in the writer process."""
        outcome: ReportOutcome = await self._submit("reports", reports)
        return outcome

    async def ping(self, timeout: float = 5.0) -> None:
        """A ``SELECT 1`` on the writer's own connection: the process is alive and the database answers."""
        async with asyncio.timeout(timeout):
            await self._submit("ping")
