"""One webhook call over HTTP: its timeout, at most one retry, at most 64 KiB of JSON back."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import httpx

from bot.rules.model import WebhookCall, WebhookOutcome

MAX_RESPONSE = 64 * 1024
RETRIES = 1


@dataclass(frozen=True)
class CallResult:
    """What the call came to: the row's status (ok | failed | timeout) and the engine's outcome."""

    status: str
    outcome: WebhookOutcome
    http_status: int | None
    duration_ms: int
    attempts: int


class _RetryableError(Exception):
    def __init__(self, status: str, error: str, http_status: int | None = None) -> None:
        super().__init__(error)
        self.status, self.error, self.http_status = status, error, http_status


class _FinalError(Exception):
    def __init__(self, error: str, http_status: int | None) -> None:
        super().__init__(error)
        self.error, self.http_status = error, http_status


async def _once(client: httpx.AsyncClient, call: WebhookCall) -> tuple[int, Any]:
    body = dict(call.body) if call.body is not None else None
    request = (
        client.build_request("GET", call.url, params=body, timeout=call.timeout)
        if call.method == "GET"
        else client.build_request("POST", call.url, json=body, timeout=call.timeout)
    )
    try:
        response = await client.send(request, stream=True)
    except httpx.TimeoutException as exc:
        raise _RetryableError("timeout", "timeout") from exc
    except httpx.HTTPError as exc:
        raise _RetryableError("failed", f"connection failed: {type(exc).__name__}") from exc
    try:
        if response.status_code >= 500:
            raise _RetryableError("failed", f"HTTP {response.status_code}", response.status_code)
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > MAX_RESPONSE:
                    raise _FinalError("response larger than 64 KiB", response.status_code)
                chunks.append(chunk)
        except httpx.TimeoutException as exc:
            raise _RetryableError("timeout", "timeout") from exc
    finally:
        await response.aclose()
    if not 200 <= response.status_code < 300:
        raise _FinalError(f"HTTP {response.status_code}", response.status_code)
    try:
        return response.status_code, json.loads(b"".join(chunks))
    except ValueError:  # (UnicodeDecodeError is one)
        raise _FinalError("response not JSON", response.status_code) from None


async def perform(client: httpx.AsyncClient, call: WebhookCall) -> CallResult:
    """Make ``call``; a timeout, a connection error or a 5xx is tried once more."""
    started = time.monotonic()
    status, error, http_status = "failed", "", None
    attempts = 0
    for _ in range(1 + RETRIES):
        attempts += 1
        try:
            code, data = await _once(client, call)
        except _RetryableError as exc:
            status, error, http_status = exc.status, exc.error, exc.http_status
            continue
        except _FinalError as exc:
            return CallResult(
                "failed", WebhookOutcome(ok=False, error=exc.error), exc.http_status, _ms(started), attempts
            )
        return CallResult("ok", WebhookOutcome(ok=True, data=data), code, _ms(started), attempts)
    return CallResult(status, WebhookOutcome(ok=False, error=error), http_status, _ms(started), attempts)


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
