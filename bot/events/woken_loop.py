"""What the event dispatcher and the webhook runner share: a loop woken after commits, polling otherwise.

Both are queues in the database worked off beside the delivery loop: a commit
that queued work wakes them from the writer's thread, and a modest poll picks
up retries that came due and work another process queued.
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx


class WokenLoop:
    """``wake`` from any thread; ``wait`` until woken or ``poll_seconds`` passed; one lazily built HTTP client."""

    def __init__(
        self, *, poll_seconds: float, timeout: float | None = None, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.poll_seconds = poll_seconds
        self.timeout = timeout
        self.transport = transport
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: httpx.AsyncClient | None = None

    def wake(self) -> None:
        """Called from any thread after a commit that queued work."""
        loop, event = self._loop, self._wake
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)

    def _ensure_started(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()

    async def _wait(self) -> None:
        """Until woken, or for ``poll_seconds``."""
        self._ensure_started()
        assert self._wake is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.poll_seconds):
                await self._wake.wait()
        self._wake.clear()

    def _http(self) -> httpx.AsyncClient:
        """The HTTP client, built on first use (it loads the CA certificates: not worth it for nothing)."""
        if self._client is None:
            if self.timeout is None:  # each request says its own
                self._client = httpx.AsyncClient(transport=self.transport, follow_redirects=False, trust_env=False)
            else:
                self._client = httpx.AsyncClient(
                    timeout=self.timeout, transport=self.transport, follow_redirects=False, trust_env=False
                )
        return self._client

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
