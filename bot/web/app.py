"""The FastAPI application: Tencent's callbacks and health checks.

Routes stay thin: they check the request, hand the work to the pipeline
(``bot/runtime/pipeline.py``: whichever writer commits it, with others, in
one transaction) and answer only after that commit.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import Engine
from starlette.routing import Route

from bot.api import install as install_api
from bot.config import Settings
from bot.console import install as install_console
from bot.runtime.hosting import Runtime, build_runtime
from bot.runtime.live_rules import LiveRules
from bot.runtime.pipeline import Pipeline, PipelineOptions
from bot.runtime.pulling import pulling
from bot.sms import SmsSender
from bot.tencent.callbacks import (
    BadCallback,
    BadReport,
    CallbackAnswer,
    ReplyCallback,
    StatusReport,
    parse_reply_callback,
    parse_status_callback,
)
from bot.web.metrics import DUPLICATE, AppMetrics, build_metrics

log = logging.getLogger("smsbot.web")

RESULT_BAD_REQUEST = 1
RESULT_UNAUTHORIZED = 2
RESULT_TOO_LARGE = 3
RESULT_UNAVAILABLE = 4


def _answer(status: int, result: int, errmsg: str) -> JSONResponse:
    return JSONResponse({"result": result, "errmsg": errmsg}, status_code=status)


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": CallbackAnswer, "description": "bad input: not JSON or UTF-8, missing or mistyped fields"},
    401: {"model": CallbackAnswer, "description": "a callback token is configured and ?token= is wrong or missing"},
    413: {"model": CallbackAnswer, "description": "body larger than max_body_bytes"},
    503: {"model": CallbackAnswer, "description": "database unavailable: nothing stored, Tencent should retry"},
}

_REPLY_SCHEMA = ReplyCallback.model_json_schema()
_REPORT_SCHEMA = StatusReport.model_json_schema()


def _callback_openapi(item: dict[str, Any], *, max_items: int | None = None) -> dict[str, Any]:
    """How a Tencent callback route is documented: the token, and one item or an array of them."""
    array: dict[str, Any] = {"type": "array", "items": item}
    if max_items is not None:
        array["maxItems"] = max_items
    return {
        "parameters": [_TOKEN_PARAMETER],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {"anyOf": [item, array]}}}},
    }


_TOKEN_PARAMETER = {
    "name": "token",
    "in": "query",
    "required": False,
    "description": "the configured callback token (required when SMSBOT_CALLBACK_TOKEN is set)",
    "schema": {"type": "string"},
}


async def _read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit():
        if int(declared) > limit:
            raise OverflowError
        body = await request.body()  # the server stops at Content-Length
        if len(body) > limit:
            raise OverflowError
        return body
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise OverflowError
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(
    settings: Settings,
    *,
    engine: Engine,
    rules: LiveRules,
    sender: SmsSender | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    deliver: bool = True,
    watch_rules: bool = True,
    writer_mode: Literal["thread", "process"] = "thread",
) -> FastAPI:
    """Build the app around an engine and loaded rules; the lifespan runs the writer and delivery loop.

    ``writer_mode="process"`` moves the database work, the delivery loop and the
    rules (loaded and watched from ``rules.path``) into a writer process of
    its own (``bot/runtime/writer_process.py``); ``sender`` must then be picklable
    (None: the console sender) and ``clock`` only stamps validation.
    """
    options = PipelineOptions(
        sender=sender, clock=clock, deliver=deliver, watch_rules=watch_rules, writer_mode=writer_mode
    )
    runtime = build_runtime(settings, engine=engine, rules=rules, options=options)
    app = FastAPI(
        title="smsbot",
        summary="Conversational SMS auto-responder for Tencent Cloud SMS",
        lifespan=_lifespan,
    )
    app.state.runtime = runtime
    metrics = app.state.metrics = build_metrics(settings, engine=engine, clock=clock, pipeline=runtime.pipeline)
    app.get("/metrics", summary="Prometheus metrics (bearer token, or loopback clients only)")(metrics.endpoint)
    _install_callbacks(app, CallbackRoutes(settings, runtime.pipeline, clock), metrics)
    _install_health(app)
    install_api(app)  # /api/v1 for the business's systems (bot/api)
    # The console goes last: routes are matched in order, and Tencent's callbacks (the hot path)
    # should not be compared with every console page first.
    install_console(app, settings)  # the ops console under /console (bot/console)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The pipeline (writer, delivery, rules watch) runs while the server does; the puller stops before it."""
    runtime: Runtime = app.state.runtime
    await runtime.pipeline.start()
    try:
        async with pulling(runtime.puller):
            yield
    finally:
        await runtime.pipeline.stop()


class CallbackRoutes:
    """Tencent's two callbacks, with what they need bound once: they are the hot path."""

    def __init__(self, settings: Settings, pipeline: Pipeline, clock: Callable[[], datetime]) -> None:
        self.store = pipeline.store
        self.apply_reports = pipeline.apply_reports
        self.clock = clock
        self.max_body_bytes = settings.max_body_bytes
        self.expected_token = settings.callback_token.get_secret_value().encode() if settings.callback_token else None

    async def sms_callback(self, request: Request) -> JSONResponse:
        body = await self._checked_body(request)
        if isinstance(body, JSONResponse):
            return body
        try:
            inbound = parse_reply_callback(body, now=self.clock())
        except BadCallback as exc:
            return _answer(400, RESULT_BAD_REQUEST, str(exc))
        try:
            results = await self.store(inbound)
        except Exception as exc:
            log.error("callback not stored: %s", exc)
            return _answer(503, RESULT_UNAVAILABLE, "database unavailable, nothing stored; retry later")
        if results and all(r.duplicate for r in results):
            request.state.metrics_result = DUPLICATE
        return JSONResponse({"result": 0, "errmsg": "OK"})

    async def sms_status(self, request: Request) -> JSONResponse:
        body = await self._checked_body(request)
        if isinstance(body, JSONResponse):
            return body
        try:
            reports = parse_status_callback(body)
        except BadReport as exc:
            return _answer(400, RESULT_BAD_REQUEST, str(exc))
        try:
            outcome = await self.apply_reports(reports)
        except Exception as exc:
            log.error("delivery reports not stored: %s", exc)
            return _answer(503, RESULT_UNAVAILABLE, "database unavailable, nothing stored; retry later")
        if outcome.unknown:
            log.info("%d delivery report(s) for sends we do not know: %s", len(outcome.unknown), outcome.unknown[:5])
        return JSONResponse({"result": 0, "errmsg": "OK"})

    async def _checked_body(self, request: Request) -> bytes | JSONResponse:
        """The body of a Tencent callback, or the answer refusing it (wrong token, too large)."""
        # The token is read by hand rather than declared as a Query parameter: this is the
        # hot path, and FastAPI's parameter machinery costs more than the rest of it.
        if self.expected_token is not None:
            token = request.query_params.get("token") or ""
            if not hmac.compare_digest(token.encode(), self.expected_token):
                return _answer(401, RESULT_UNAUTHORIZED, "missing or wrong token")
        try:
            return await _read_limited(request, self.max_body_bytes)
        except OverflowError:
            return _answer(413, RESULT_TOO_LARGE, f"body larger than {self.max_body_bytes} bytes")


def _install_callbacks(app: FastAPI, routes: CallbackRoutes, metrics: AppMetrics) -> None:
    sms_callback = metrics.observe("reply")(routes.sms_callback)
    sms_status = metrics.observe("status")(routes.sms_status)
    app.post(
        "/sms/callback",
        response_model=CallbackAnswer,
        responses=_ERRORS,
        summary="Tencent Cloud 'SMS Reply' callback",
        description=(
            "A customer's reply (one JSON object as Tencent documents, or an array of them, "
            "processed all or nothing). Answered with result 0 only after everything it caused is committed."
        ),
        openapi_extra=_callback_openapi(_REPLY_SCHEMA),
    )(sms_callback)
    app.post(
        "/sms/status",
        response_model=CallbackAnswer,
        responses=_ERRORS,
        summary="Tencent Cloud 'SMS delivery status' callback",
        description=(
            "A JSON array of at most 100 delivery reports. Each marks the reply with that SerialNo (sid), "
            "or our SessionContext (ext), delivered or failed. Reports for unknown sends are logged, not refused."
        ),
        openapi_extra=_callback_openapi(_REPORT_SCHEMA, max_items=100),
    )(sms_status)
    # Tencent's two callbacks are served by plain Starlette routes placed first: the same handlers,
    # without FastAPI's per-request dependency machinery (about a fifth of the HTTP process's time
    # per callback under load). The FastAPI routes above stay for the OpenAPI document.
    app.router.routes[:0] = [
        Route("/sms/callback", sms_callback, methods=["POST"], include_in_schema=False),
        Route("/sms/status", sms_status, methods=["POST"], include_in_schema=False),
    ]


def _install_health(app: FastAPI) -> None:
    app.get("/healthz", summary="The process is up")(healthz)
    app.get(
        "/readyz",
        summary="Ready to take callbacks: database reachable and rules loaded",
        responses={503: {"description": "not ready: the body says what is missing"}},
    )(readyz)


async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def readyz(request: Request) -> JSONResponse:
    runtime: Runtime = request.app.state.runtime
    body = await runtime.pipeline.readiness()
    puller = runtime.puller
    if puller is not None:
        # How pulling goes; a failing pull does not make the server unready: callbacks may
        # still arrive, and the puller retries by itself.
        body["pull"] = {"rounds": puller.rounds, "held": puller.held, "last_error": puller.last_error}
    return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)
