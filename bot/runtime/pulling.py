"""Pulling replies and delivery statuses from Tencent, for deployments Tencent cannot call back.

A server without a public URL never receives the "SMS Reply" and "SMS
delivery status" callbacks; Tencent keeps both in queues that
``PullSmsReplyStatus`` and ``PullSmsSendStatus`` hand out instead. The
``Puller`` empties those queues every ``interval`` seconds and feeds what it
gets to exactly the code the callback routes use: each pulled reply is turned
into the same ``Inbound`` the callback would have produced (it goes through
the callback's own parser), so it is stored, answered and deduplicated the
same way; a reply that arrives both by callback and by pull is one message.

Nothing pulled may be lost, because Tencent hands out each item only once:

- Items are converted and stored before the next page is pulled. If storing
  fails (database down, writer process restarting), they stay in memory and
  the next round stores them again *before pulling anything more*. Storing
  twice is harmless: replies dedupe on their key, and a delivery report sets
  the same status again.
- Stopping waits for the current round (``stop()``), tries once more to store
  what is held, and appends every item it still could not store, in full, to
  ``pull_unstored_file`` (JSON lines, readable by the owner only): that file is
  the only copy left. The log says so at ERROR, with the number masked like
  every log line (logs leave the machine; the file does not).
- Tencent errors (network, credentials, the pull not enabled on the account)
  are logged with Tencent's code and retried next round; they never end the
  loop. An item Tencent hands out that we cannot use (say, no SignName) is
  refused like the callback would refuse it, logged with the reason.
- The SDK's own retries stay off (``bot/tencent/pull.py``): a pull is not
  idempotent, and a retried pull after a lost answer would only hide that the
  first one's page is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.config import Settings
from bot.runtime.pipeline import PullSink, ThreadPipeline, inbound_policy
from bot.sms import Inbound
from bot.tencent.callbacks import StatusReport
from bot.tencent.config import session_contexts, tencent_config
from bot.tencent.pull import (
    PULL_LIMIT,
    PullClient,
    TencentPullClient,
    reply_to_inbound,
    send_status_to_report,
)

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from bot.runtime.live_rules import LiveRules

log = logging.getLogger("smsbot.pull")

DEFAULT_INTERVAL = 10.0


# ====================================================================== the loop


class PollResult(StrEnum):
    DONE = "done"
    """Tencent had nothing more and everything pulled is stored."""
    TENCENT_ERROR = "tencent_error"
    """A pull failed (nothing of it was received); everything received is stored."""
    STORE_ERROR = "store_error"
    """Items are held in memory, unstored; no more is pulled until they are."""


@dataclass
class PullCounts:
    """What pulling has done so far (``smsbot pull --once`` prints these)."""

    replies_stored: int = 0
    duplicates: int = 0
    reports_applied: int = 0
    unknown_reports: int = 0
    refused: int = 0

    def summary(self) -> str:
        text = (
            f"{self.replies_stored} repl{'y' if self.replies_stored == 1 else 'ies'} stored, "
            f"{self.duplicates} duplicate(s), {self.reports_applied} report(s) applied, "
            f"{self.unknown_reports} unknown report(s)"
        )
        return text + (f", {self.refused} item(s) refused" if self.refused else "")


@dataclass
class _Held:
    """Items received from Tencent and not yet stored: the only copy there is."""

    replies: list[Inbound] = field(default_factory=list)
    reports: list[StatusReport] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.replies) + len(self.reports)


class Puller:
    """Pulls Tencent's queues into the pipeline, round after round, holding what it could not store."""

    def __init__(
        self,
        client: PullClient,
        sink: PullSink,
        *,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        limit: int = PULL_LIMIT,
        sign_aliases: Mapping[str, str] | None = None,
        unstored_file: Path = Path("smsbot-pull-unstored.jsonl"),
    ) -> None:
        if not 0 < limit <= PULL_LIMIT:
            raise ValueError(f"limit must be 1..{PULL_LIMIT}, Tencent's maximum")
        self.client = client
        self.sink = sink
        self.interval = interval
        self.clock = clock
        self.limit = limit
        self.sign_aliases = dict(sign_aliases or {})
        self.unstored_file = unstored_file
        self.counts = PullCounts()
        self.rounds = 0
        self.last_error: str | None = None
        """The last Tencent or storage error, None once a round went through cleanly."""
        self._held = _Held()
        self._stopping = False
        self._stop: asyncio.Event | None = None

    @property
    def held(self) -> int:
        """Items received from Tencent and not stored yet."""
        return len(self._held)

    # ---------------------------------------------------------------- one round

    async def poll(self) -> PollResult:
        """Store what is held, then pull each queue until Tencent returns less than a full page."""
        try:
            if not await self._flush():
                return PollResult.STORE_ERROR
            result = PollResult.DONE
            for action, fetch, take in (
                ("PullSmsReplyStatus", self.client.pull_replies, self._take_replies),
                ("PullSmsSendStatus", self.client.pull_send_statuses, self._take_reports),
            ):
                while not self._stopping:
                    try:
                        page = await asyncio.to_thread(fetch, self.limit)
                    except Exception as exc:  # one queue failing (say, not enabled) must not block the other
                        self._tencent_error(action, exc)
                        result = PollResult.TENCENT_ERROR
                        break
                    take(page)
                    if not await self._flush():
                        return PollResult.STORE_ERROR
                    if len(page) < self.limit:
                        break
            if result is PollResult.DONE:
                self.last_error = None
            return result
        finally:
            self.rounds += 1

    def _tencent_error(self, action: str, exc: Exception) -> None:
        code = getattr(exc, "code", None) or type(exc).__name__
        message = getattr(exc, "message", None) or str(exc)
        request_id = getattr(exc, "requestId", None)
        self.last_error = f"{action}: {code}: {message}"
        log.error(
            "%s failed: %s: %s%s; retrying in %ss",
            action,
            code,
            message,
            f" (RequestId {request_id})" if request_id else "",
            self.interval,
        )

    def _take_replies(self, page: list[dict[str, Any]]) -> None:
        now = self.clock()
        for item in page:
            try:
                self._held.replies.append(reply_to_inbound(item, now=now, sign_aliases=self.sign_aliases))
            except Exception as exc:  # one bad item must not cost the rest of the page
                self._refused("reply", item, exc)

    def _take_reports(self, page: list[dict[str, Any]]) -> None:
        for item in page:
            try:
                self._held.reports.append(send_status_to_report(item))
            except Exception as exc:
                self._refused("delivery status", item, exc)

    def _refused(self, what: str, item: Mapping[str, Any], exc: Exception) -> None:
        """Kept in full in the unstored file: Tencent will not hand the item out again, so this is the only copy."""
        self.counts.refused += 1
        self._keep(f"{what} refused ({exc})", dict(item))

    def _keep(self, why: str, item: dict[str, Any]) -> None:
        """Append an item we could not store to the unstored file; the log line names it, number masked."""
        line = json.dumps({"why": why, "at": self.clock().isoformat(), "item": item}, ensure_ascii=False)
        try:
            fd = os.open(self.unstored_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a", encoding="utf-8") as out:
                out.write(line + "\n")
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            # Nowhere left to keep it: the log line is the last copy, so it keeps the number (see bot/runtime/logs.py).
            log.critical("pulled item NOT stored and NOT kept (%s): %s", exc, line)
            return
        log.error("pulled %s, NOT stored: kept in %s: %s", why, self.unstored_file, line)

    async def _flush(self) -> bool:
        """Store everything held; False (items still held) when the database said no."""
        held = self._held
        try:
            if held.replies:
                results = await self.sink.store(list(held.replies))
                stored = sum(1 for r in results if not r.duplicate)
                self.counts.replies_stored += stored
                self.counts.duplicates += len(results) - stored
                log.info("pulled %d repl(ies): %d stored, %d duplicate(s)", len(results), stored, len(results) - stored)
                held.replies.clear()
            if held.reports:
                outcome = await self.sink.apply_reports(list(held.reports))
                self.counts.reports_applied += outcome.updated
                self.counts.unknown_reports += len(outcome.unknown)
                log.info(
                    "pulled %d delivery status(es): %d applied, %d for sends we do not know",
                    len(held.reports),
                    outcome.updated,
                    len(outcome.unknown),
                )
                held.reports.clear()
        except Exception as exc:
            self.last_error = f"storing: {type(exc).__name__}: {exc}"
            log.error(
                "%d pulled item(s) not stored (%s: %s); kept in memory, stored again before pulling more",
                len(held),
                type(exc).__name__,
                exc,
            )
            return False
        return True

    # ---------------------------------------------------------------- running

    async def run(self) -> None:
        """Poll every ``interval`` until ``stop()``; never ends on an error of Tencent or the database."""
        try:
            while not self._stopping:
                try:
                    await self.poll()
                except Exception:  # a bug in a round must not end pulling for good
                    log.exception("pull round failed; retrying in %ss", self.interval)
                await self._pause()
            if self.held:
                await self._flush()
        finally:
            self.log_unsaved()

    async def drain(self, *, store_attempts: int = 5) -> PollResult:
        """Pull until Tencent has nothing more (``--once``): storage failures retried ``store_attempts`` times."""
        result = await self.poll()
        attempts = 1
        while result is PollResult.STORE_ERROR and attempts < store_attempts and not self._stopping:
            await self._pause()
            result = await self.poll()
            attempts += 1
        self.log_unsaved()
        return result

    async def _pause(self) -> None:
        """Wait ``interval`` seconds, or less if ``stop()`` is called meanwhile."""
        if self._stop is None:
            self._stop = asyncio.Event()
            if self._stopping:
                self._stop.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.interval):
                await self._stop.wait()

    def stop(self) -> None:
        """Finish the current round (a pull in flight is never abandoned: its items would be lost), then end."""
        self._stopping = True
        if self._stop is not None:
            self._stop.set()

    def log_unsaved(self) -> None:
        """Keep every item still held in the unstored file: Tencent will not hand them out again."""
        for message in self._held.replies:
            self._keep(
                "reply could not be stored before stopping",
                {
                    "nationcode": message.nationcode,
                    "mobile": message.mobile,
                    "sign": message.sign,
                    "extend": message.extend,
                    "text": message.text,
                    "time": message.time,
                },
            )
        for report in self._held.reports:
            self._keep("delivery status could not be stored before stopping", report.model_dump(exclude_none=True))


def make_puller(
    settings: Settings, sink: PullSink, *, interval: float | None = None, clock: Callable[[], datetime] | None = None
) -> Puller:
    """A Puller for these settings (ConfigError when Tencent's credentials are missing)."""
    config = tencent_config(settings, purpose="pull")
    aliases = {approved: sign for sign, approved in config.sign_names.items() if approved not in config.sign_names}
    return Puller(
        TencentPullClient(config),
        sink,
        interval=settings.pull_interval if interval is None else interval,
        clock=clock or (lambda: datetime.now(UTC)),
        sign_aliases=aliases,
        unstored_file=settings.pull_unstored_file,
    )


async def pull_into_database(
    settings: Settings,
    *,
    engine: Engine,
    rules: LiveRules,
    once: bool,
    interval: float | None = None,
    watch_rules: bool = True,
) -> tuple[Puller, PollResult | None]:
    """``smsbot pull``: pull into the database with a writer of its own; replies are only queued.

    Whoever runs ``serve`` (its delivery loop polls the outbox) sends them.
    SIGINT/SIGTERM end the current round first, so a pull in flight is stored.
    Returns the puller (its counts) and, with ``once``, how the last round ended.
    """
    import signal

    clock: Callable[[], datetime] = lambda: datetime.now(UTC)  # noqa: E731 - one line, typed
    pipeline = ThreadPipeline(
        engine,
        rules,
        policy=inbound_policy(settings),
        clock=clock,
        watch_rules=watch_rules and not once,
        contexts=session_contexts(settings),
    )  # no delivery loop: see above
    puller = make_puller(settings, pipeline, interval=interval, clock=clock)
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
            loop.add_signal_handler(signum, puller.stop)
            handled.append(signum)
    await pipeline.start()
    try:
        if once:
            return puller, await puller.drain()
        await puller.run()
        return puller, None
    finally:
        await pipeline.stop()
        for signum in handled:
            loop.remove_signal_handler(signum)


@contextlib.asynccontextmanager
async def pulling(puller: Puller | None, *, stop_timeout: float = 30.0) -> AsyncIterator[None]:
    """Run ``puller`` (if any) while the body runs, e.g. a server's lifespan; stopped before the writer is.

    Stopped with ``stop()``, not a cancel: a cancel during a pull would drop
    the page Tencent already removed from its queue. Only a round still
    running after ``stop_timeout`` is cancelled (its held items are logged).
    """
    if puller is None:
        yield
        return
    task = asyncio.create_task(puller.run(), name="smsbot-puller")
    try:
        yield
    finally:
        puller.stop()
        done, _pending = await asyncio.wait({task}, timeout=stop_timeout)
        if not done:
            log.error("the puller did not finish its round within %ss; cancelling it", stop_timeout)
            task.cancel()
            await asyncio.wait({task}, timeout=5)
