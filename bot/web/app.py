"""The FastAPI application: Tencent's callbacks and health checks.

Routes stay thin: they check the request, hand the work to the database
writer (which commits it with others in one transaction) and answer only
after that commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import Engine, text
from starlette.routing import Route

from bot.config import Settings
from bot.console import install as install_console
from bot.delivery.deliverer import Deliverer, delivery_options
from bot.ingest.batch import InboundResult, Policy
from bot.ingest.delivery_reports import apply_reports
from bot.ingest.inbound_store import InboundStore
from bot.runtime.live_rules import LiveRules
from bot.runtime.pulling import Puller, make_puller, pulling
from bot.runtime.sinks import ProcessSink, WriterSink
from bot.runtime.writer_process import ProcessWriter, WriterConfig
from bot.sms import ConsoleSender, Inbound, SmsSender
from bot.store.writer import DbWriter
from bot.tencent.callbacks import (
    BadCallback,
    BadReport,
    CallbackAnswer,
    ReplyCallback,
    StatusReport,
    parse_reply_callback,
    parse_status_callback,
)
from bot.web.metrics import DUPLICATE, build_metrics

log = logging.getLogger("smsbot.web")

RESULT_BAD_REQUEST = 1
RESULT_UNAUTHORIZED = 2
RESULT_TOO_LARGE = 3
RESULT_UNAVAILABLE = 4


@dataclass
class Runtime:
    """Everything the routes need, built once per app."""

    settings: Settings
    engine: Engine
    rules: LiveRules
    writer: DbWriter
    deliverer: Deliverer | None
    clock: Callable[[], datetime]
    policy: Policy
    inbound: InboundStore
    process_writer: ProcessWriter | None = None
    """Set in ``writer_mode="process"``: the writer process does the database work, delivery and rules."""
    puller: Puller | None = None
    """Set when ``settings.pull``: pulls Tencent's queues into the same storage as the routes."""


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
    writer = DbWriter(engine)
    policy = Policy(loop_limit=settings.loop_limit, loop_window=settings.loop_window)
    process_writer = None
    if writer_mode == "process":
        process_writer = ProcessWriter(
            WriterConfig(
                database_url=engine.url.render_as_string(hide_password=False),
                rules_dir=rules.path,
                param_max_length=rules.param_max_length,
                policy=policy,
                deliver=deliver,
                watch_rules=watch_rules,
                sender=sender,
                log_level=logging.getLogger().getEffectiveLevel(),
                log_format=settings.log_format,
                log_reveal_numbers=settings.log_reveal_numbers,
                delivery=delivery_options(settings),
            )
        )
    deliverer = (
        Deliverer(writer, sender or ConsoleSender(), clock=clock, **delivery_options(settings))
        if deliver and process_writer is None
        else None
    )
    inbound = InboundStore(rules=rules, policy=policy, clock=clock)
    inbound.deliverer = deliverer
    runtime = Runtime(
        settings=settings,
        engine=engine,
        rules=rules,
        writer=writer,
        deliverer=deliverer,
        clock=clock,
        policy=policy,
        inbound=inbound,
        process_writer=process_writer,
    )
    writer.on_commit = inbound.after_commit
    if settings.pull:
        sink = ProcessSink(process_writer) if process_writer is not None else WriterSink(writer, inbound, clock)
        runtime.puller = make_puller(settings, sink, clock=clock)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if process_writer is not None:
            await process_writer.start()
            try:
                async with pulling(runtime.puller):
                    yield
            finally:
                await process_writer.stop()
            return
        writer.start()
        tasks = []
        if deliverer is not None:
            tasks.append(asyncio.create_task(deliverer.run_forever(), name="smsbot-deliverer"))
        if watch_rules:
            tasks.append(asyncio.create_task(rules.watch(metrics.on_rules_reload), name="smsbot-rules-watch"))
        try:
            async with pulling(runtime.puller):
                yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await asyncio.to_thread(writer.stop)

    app = FastAPI(
        title="smsbot",
        summary="Conversational SMS auto-responder for Tencent Cloud SMS",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    metrics = app.state.metrics = build_metrics(
        settings, engine=engine, clock=clock, rules=rules, process_writer=process_writer
    )
    app.get("/metrics", summary="Prometheus metrics (bearer token, or loopback clients only)")(metrics.endpoint)
    expected_token = settings.callback_token.get_secret_value().encode() if settings.callback_token else None

    @app.post(
        "/sms/callback",
        response_model=CallbackAnswer,
        responses=_ERRORS,
        summary="Tencent Cloud 'SMS Reply' callback",
        description=(
            "A customer's reply (one JSON object as Tencent documents, or an array of them, "
            "processed all or nothing). Answered with result 0 only after everything it caused is committed."
        ),
        openapi_extra=_callback_openapi(_REPLY_SCHEMA),
    )
    @metrics.observe("reply")
    async def sms_callback(request: Request) -> JSONResponse:
        body = await _checked_body(request)
        if isinstance(body, JSONResponse):
            return body
        try:
            inbound = parse_reply_callback(body, now=clock())
        except BadCallback as exc:
            return _answer(400, RESULT_BAD_REQUEST, str(exc))
        try:
            results = await _store(runtime, inbound)
        except Exception as exc:
            log.error("callback not stored: %s", exc)
            return _answer(503, RESULT_UNAVAILABLE, "database unavailable, nothing stored; retry later")
        if process_writer is None:  # (the writer process warns about unknown signatures itself)
            runtime.inbound.warn_unknown_signatures(inbound, results)
        if results and all(r.duplicate for r in results):
            request.state.metrics_result = DUPLICATE
        return JSONResponse({"result": 0, "errmsg": "OK"})

    async def _checked_body(request: Request) -> bytes | JSONResponse:
        """The body of a Tencent callback, or the answer refusing it (wrong token, too large)."""
        # The token is read by hand rather than declared as a Query parameter: this is the
        # hot path, and FastAPI's parameter machinery costs more than the rest of it.
        if expected_token is not None:
            token = request.query_params.get("token") or ""
            if not hmac.compare_digest(token.encode(), expected_token):
                return _answer(401, RESULT_UNAUTHORIZED, "missing or wrong token")
        try:
            return await _read_limited(request, settings.max_body_bytes)
        except OverflowError:
            return _answer(413, RESULT_TOO_LARGE, f"body larger than {settings.max_body_bytes} bytes")

    @app.post(
        "/sms/status",
        response_model=CallbackAnswer,
        responses=_ERRORS,
        summary="Tencent Cloud 'SMS delivery status' callback",
        description=(
            "A JSON array of at most 100 delivery reports. Each marks the reply with that SerialNo (sid), "
            "or our SessionContext (ext), delivered or failed. Reports for unknown sends are logged, not refused."
        ),
        openapi_extra=_callback_openapi(_REPORT_SCHEMA, max_items=100),
    )
    @metrics.observe("status")
    async def sms_status(request: Request) -> JSONResponse:
        body = await _checked_body(request)
        if isinstance(body, JSONResponse):
            return body
        try:
            reports = parse_status_callback(body)
        except BadReport as exc:
            return _answer(400, RESULT_BAD_REQUEST, str(exc))
        try:
            if process_writer is not None:
                outcome = await process_writer.apply_reports(reports)
            else:
                now = clock()
                outcome = await writer.run(lambda conn: apply_reports(conn, reports, now=now))
        except Exception as exc:
            log.error("delivery reports not stored: %s", exc)
            return _answer(503, RESULT_UNAVAILABLE, "database unavailable, nothing stored; retry later")
        if outcome.unknown:
            log.info("%d delivery report(s) for sends we do not know: %s", len(outcome.unknown), outcome.unknown[:5])
        return JSONResponse({"result": 0, "errmsg": "OK"})

    @app.get("/healthz", summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        summary="Ready to take callbacks: database reachable and rules loaded",
        responses={503: {"description": "not ready: the body says what is missing"}},
    )
    async def readyz() -> JSONResponse:
        if process_writer is not None:
            return _with_puller(await _process_readyz(process_writer), runtime.puller)
        database = "ok"
        try:
            await asyncio.to_thread(_ping, engine)
        except Exception as exc:
            database = f"unavailable: {type(exc).__name__}"
        ruleset = rules.ruleset
        body = {
            "status": "ok" if database == "ok" and ruleset is not None else "unavailable",
            "database": database,
            "rules": {
                "version": ruleset.version if ruleset else None,
                "files": [f.name for f in ruleset.files] if ruleset else [],
                "loaded_at": rules.loaded_at.isoformat() if rules.loaded_at else None,
                "last_reload_error": rules.last_error or None,
            },
        }
        return _with_puller(JSONResponse(body, status_code=200 if body["status"] == "ok" else 503), runtime.puller)

    # Tencent's two callbacks are served by plain Starlette routes placed first: the same handlers,
    # without FastAPI's per-request dependency machinery (about a fifth of the HTTP process's time
    # per callback under load). The FastAPI routes above stay for the OpenAPI document.
    app.router.routes[:0] = [
        Route("/sms/callback", sms_callback, methods=["POST"], include_in_schema=False),
        Route("/sms/status", sms_status, methods=["POST"], include_in_schema=False),
    ]

    # The console goes last: routes are matched in order, and Tencent's callbacks (the hot path)
    # should not be compared with every console page first.
    install_console(app, settings)  # the ops console under /console (bot/console)
    return app


def _ping(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def _with_puller(answer: JSONResponse, puller: Puller | None) -> JSONResponse:
    """With pull mode on, /readyz also says how pulling goes (a failing pull does not make it unready:
    callbacks may still arrive, and the puller retries by itself)."""
    if puller is None:
        return answer
    body = json.loads(bytes(answer.body))
    body["pull"] = {"rounds": puller.rounds, "held": puller.held, "last_error": puller.last_error}
    return JSONResponse(body, status_code=answer.status_code)


async def _process_readyz(process_writer: ProcessWriter) -> JSONResponse:
    database = "ok"
    try:
        await process_writer.ping()
    except Exception as exc:
        database = f"unavailable: {getattr(exc, 'kind', None) or type(exc).__name__}"
    rules = process_writer.rules_status
    body = {
        "status": "ok" if database == "ok" and rules["version"] is not None else "unavailable",
        "database": database,
        "rules": rules,
        "writer": {"mode": "process", "pid": process_writer.pid, "restarts": process_writer.restarts},
    }
    return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)


async def _store(runtime: Runtime, inbound: list[Inbound]) -> list[InboundResult]:
    if runtime.process_writer is not None:
        return await runtime.process_writer.store(inbound)
    return await runtime.writer.run_batch(runtime.inbound.store, inbound)
