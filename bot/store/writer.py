"""One writer thread that commits many jobs per transaction (group commit).

A callback may only be answered "OK" after its message is committed. Doing
one transaction per request makes every request pay for its own commit (an
fsync) and makes request threads fight over SQLite's single write lock. Here
every request hands its work to one thread, which takes everything waiting
(up to ``max_batch`` jobs), runs them in one transaction, commits once, and
only then resolves each request's future. Durability is unchanged: nobody
hears "OK" before their rows are committed; a job that fails does not harm
the others (the batch is run again with each job in its own SAVEPOINT, see
``_optimistic``); a failed commit fails every job in the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection, Engine

from bot.store.db import WRITE_OPTIONS

log = logging.getLogger("smsbot.writer")


class RepeatedFailure:
    """Logs a failure that repeats until fixed (a full or read-only disk, a database that is down) without flooding.

    The first failure is logged in full (with its traceback when ``exc_info``),
    repeats as one line at most every ``every`` seconds with a count, and the
    first success after them says it works again. A background loop that fails
    every second would otherwise write a traceback every second for as long as
    the fault lasts.
    """

    def __init__(self, logger: logging.Logger, what: str, *, every: float = 60.0) -> None:
        self.logger = logger
        self.what = what
        self.every = every
        self.failures = 0
        self._last_logged = 0.0

    def failed(self, exc: BaseException, *, level: int = logging.ERROR, exc_info: bool = True) -> None:
        import time

        self.failures += 1
        now = time.monotonic()
        if self.failures == 1:
            self.logger.log(level, "%s failed: %s", self.what, exc, exc_info=exc if exc_info else None)
            self._last_logged = now
        elif now - self._last_logged >= self.every:
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.logger.log(level, "%s still failing (%d times so far): %s", self.what, self.failures, first_line)
            self._last_logged = now

    def succeeded(self) -> None:
        if self.failures:
            self.logger.warning("%s works again after %d failure(s)", self.what, self.failures)
            self.failures = 0


T = TypeVar("T")
_STOP = object()


BatchHandler = Callable[[Connection, list[Any]], list[Any]]
"""Handles the items of many jobs at once; returns one result per item, in order."""

POSTGRES_SESSION = "SET random_page_cost = 1.1"
"""The writer's working set is in memory, where an index probe costs little more than a sequential page.

At the default of 4 (for spinning disks) the planner hashed all 5,000
conversations of the benchmark to update the batch's 32 rather than probe the
primary key 32 times (1.2 ms against 0.1 ms, ``EXPLAIN ANALYZE``).
"""


@dataclass
class Job(Generic[T]):
    fn: Callable[[Connection], T]
    loop: asyncio.AbstractEventLoop | None
    future: Any
    result: Any = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    handler: BatchHandler | None = None
    items: list[Any] = field(default_factory=list)


class DbWriter:
    """Runs database work on one thread, batching concurrent jobs into one commit."""

    def __init__(self, engine: Engine, *, max_batch: int = 256, on_commit: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.on_commit = on_commit
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="smsbot-db-writer", daemon=True)
        self._conn: Connection | None = None
        self._checkpointer = _Checkpointer(engine) if engine.dialect.name == "sqlite" else None
        self.batches = 0
        self.jobs = 0

    def start(self) -> None:
        self._thread.start()
        self.start_checkpointer()

    def start_checkpointer(self) -> None:
        """Start only the SQLite checkpointer (for a caller that runs ``process`` itself)."""
        if self._checkpointer is not None:
            self._checkpointer.start()

    def _submit(self, job: Job[Any]) -> None:
        """Hand a job to whoever runs the batches (the writer thread here)."""
        self._queue.put(job)

    def take_waiting(self, limit: int) -> list[Job[Any]]:
        """Jobs submitted and not yet taken, up to ``limit`` (for a caller that runs ``process`` itself)."""
        taken: list[Job[Any]] = []
        while len(taken) < limit:
            try:
                taken.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return taken

    def process(self, batch: list[Job[Any]]) -> None:
        """Run ``batch`` in one transaction on the calling thread (the writer process's main loop)."""
        self._process(batch)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout=10)
        if self._checkpointer is not None:
            self._checkpointer.stop()

    async def run(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` in the next batch; return its result once the batch is committed."""
        loop = asyncio.get_running_loop()
        job: Job[T] = Job(fn, loop, loop.create_future())
        self._submit(job)
        result: T = await job.future
        return result

    async def run_batch(self, handler: BatchHandler, items: list[Any]) -> list[Any]:
        """Handle ``items`` together with the items of other waiting jobs that use the same ``handler``.

        If the merged call fails, each job is retried on its own, so one bad
        request cannot fail the others.
        """
        loop = asyncio.get_running_loop()
        job: Job[list[Any]] = Job(
            lambda conn: handler(conn, items), loop, loop.create_future(), handler=handler, items=items
        )
        self._submit(job)
        result: list[Any] = await job.future
        return result

    def run_sync(self, fn: Callable[[Connection], T], timeout: float = 30.0) -> T:
        """The same for code outside the event loop (CLI, workers, tests)."""
        job: Job[T] = Job(fn, None, None)
        self._submit(job)
        if not job.done.wait(timeout):
            raise TimeoutError("the database writer did not answer in time")
        if job.error is not None:
            raise job.error
        result: T = job.result
        return result

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._drop_connection()

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch: list[Job[Any]] = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                batch.append(nxt)
            self._process(batch)
            if stop:
                return

    def _connection(self) -> Connection:
        """The writer's own connection, kept between batches (opened again after a failure)."""
        if self._conn is None:
            conn = self.engine.connect().execution_options(**WRITE_OPTIONS)
            if self._checkpointer is not None:
                # The checkpointer thread copies the WAL into the database, so commits never
                # pay for that copy and its fsync.
                conn.exec_driver_sql("PRAGMA wal_autocheckpoint=0")
                conn.commit()
            elif self.engine.dialect.name == "postgresql":
                conn.exec_driver_sql(POSTGRES_SESSION)
                conn.commit()
            self._conn = conn
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.invalidate()
                self._conn.close()
            self._conn = None

    def _process(self, batch: list[Job[Any]]) -> None:
        try:
            conn = self._connection()
            if not self._optimistic(conn, batch):
                with conn.begin():
                    for group in _groups(batch):
                        if len(group) > 1 and self._merged(conn, group):
                            continue
                        for job in group:
                            self._alone(conn, job)
        except Exception as exc:  # the commit (or the connection) failed: nothing of the batch is stored
            log.error("database transaction failed for %d job(s): %s", len(batch), exc)
            self._drop_connection()
            for job in batch:
                job.error = exc
        self.batches += 1
        self.jobs += len(batch)
        self._resolve_all(batch)
        if self.on_commit is not None:
            try:
                self.on_commit()
            except Exception:  # pragma: no cover - a notification must never kill the writer
                log.exception("on_commit hook failed")

    @staticmethod
    def _optimistic(conn: Connection, batch: list[Job[Any]]) -> bool:
        """Run and commit the whole batch without savepoints; False, with nothing kept, if a job failed.

        Jobs almost never fail, and on PostgreSQL each SAVEPOINT and RELEASE
        is a round trip of its own: two per job, as many as the whole inbound
        batch needs for its work. So the batch first runs as one plain
        transaction; only when a job raises is it rolled back and run again
        job by job under savepoints (``_merged``, ``_alone``), which keeps
        the good jobs and fails the bad one. So when a batch fails, its
        other jobs' functions run twice, their database work of the first
        run rolled back: a job's function must not count on running once
        outside the database (the delivery loop's claim only notes which rows
        it left for later, and a second run notes them again). A failed
        commit still fails every job.
        """
        transaction = conn.begin()
        try:
            for group in _groups(batch):
                handler = group[0].handler
                if len(group) > 1 and handler is not None:
                    _share(group, handler(conn, [item for job in group for item in job.items]))
                else:
                    for job in group:
                        job.result = job.fn(conn)
        except Exception as exc:
            transaction.rollback()
            for job in batch:
                job.result = None
            log.info("a job of a batch of %d failed (%s); running them again one by one", len(batch), exc)
            return False
        transaction.commit()
        return True

    @staticmethod
    def _alone(conn: Connection, job: Job[Any]) -> None:
        savepoint = conn.begin_nested()
        try:
            job.result = job.fn(conn)
            savepoint.commit()
        except Exception as exc:
            savepoint.rollback()
            job.error = exc

    @staticmethod
    def _merged(conn: Connection, group: list[Job[Any]]) -> bool:
        handler = group[0].handler
        assert handler is not None
        items = [item for job in group for item in job.items]
        savepoint = conn.begin_nested()
        try:
            results = handler(conn, items)
            savepoint.commit()
        except Exception as exc:
            savepoint.rollback()
            log.info("merged batch of %d jobs failed (%s); retrying each alone", len(group), exc)
            return False
        _share(group, results)
        return True

    @staticmethod
    def _resolve_all(batch: list[Job[Any]]) -> None:
        """Wake every waiter: one hand-over per event loop, not one per job (each costs a syscall)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[Job[Any]]] = {}
        for job in batch:
            job.done.set()
            if job.loop is not None:
                by_loop.setdefault(job.loop, []).append(job)
        for loop, jobs in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop has closed; nobody is waiting any more
                loop.call_soon_threadsafe(_settle, jobs)


def _share(group: list[Job[Any]], results: list[Any]) -> None:
    """Give each job of a merged group its slice of the handler's results."""
    start = 0
    for job in group:
        job.result = results[start : start + len(job.items)]
        start += len(job.items)


def _groups(batch: list[Job[Any]]) -> list[list[Job[Any]]]:
    """Consecutive jobs with the same batch handler form one group; order is kept."""
    groups: list[list[Job[Any]]] = []
    for job in batch:
        if groups and job.handler is not None and groups[-1][0].handler == job.handler:
            groups[-1].append(job)
        else:
            groups.append([job])
    return groups


class _Checkpointer:
    """Copies SQLite's write-ahead log into the database file from its own thread.

    With SQLite's automatic checkpoints, the commit that crosses the WAL size
    limit does the copy and the fsyncs itself, which stalls every callback
    waiting on that commit. A passive checkpoint here never blocks the writer.
    """

    def __init__(self, engine: Engine, *, interval: float = 0.5) -> None:
        self.engine = engine
        self.interval = interval
        self._failures = RepeatedFailure(log, "SQLite checkpoint")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="smsbot-sqlite-checkpoint", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
            self._checkpoint("TRUNCATE")

    def _checkpoint(self, mode: str) -> None:
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql(f"PRAGMA wal_checkpoint({mode})")
        except Exception as exc:  # a missed checkpoint only means a longer WAL until the next one
            self._failures.failed(exc, level=logging.WARNING, exc_info=False)
        else:
            self._failures.succeeded()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._checkpoint("PASSIVE")


def _settle(jobs: list[Job[Any]]) -> None:
    """Runs on the event loop: hand each job's outcome to its awaiting request."""
    for job in jobs:
        if job.future.done():
            continue
        if job.error is not None:
            job.future.set_exception(job.error)
        else:
            job.future.set_result(job.result)
