"""``/api/v1``: start conversations (one or a batch), read one, merge its vars. Keys from ``smsbot apikeys``.

Every route authenticates first (``Authorization: Bearer <key>``: none, an
unknown or a revoked key is 401, a key without the route's scope 403, and
nothing is written), then does all of its work in ONE write transaction on
the HTTP process's own engine (BEGIN IMMEDIATE on SQLite, as the console's
manual actions do, beside the writer): the starts, their idempotency records,
the key's ``last_used_at`` and the call's audit row. Delivery is woken after
the commit. The rules are the live ones in thread mode and the console's copy
in writer-process mode (``bot.console.rules_page.rules_view``), so a start is
checked against the rules the customer's reply will be answered with.

Every refusal has one shape, ``{"error", "field"?, "detail"}`` (``ApiError``):
FastAPI's own validation errors are turned into it by ``ApiRoute``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from bot.api.keys import ApiCaller, caller_for, touch
from bot.api.models import (
    MAX_BATCH,
    ApiError,
    BatchAnswer,
    BatchBody,
    ConversationView,
    MessageView,
    StartBody,
    Started,
    VarsAnswer,
)
from bot.api.queries import conversation_by_number, newest_messages, remember_answers, remembered_answers
from bot.console.rules_page import rules_view
from bot.console.users import audit
from bot.events.endpoints import EventEndpoints, LiveEndpoints, config_endpoints
from bot.numbers import mask_number
from bot.outreach.check import (
    CheckedStart,
    StartRefused,
    StartRequest,
    check_number,
    check_start,
    check_vars,
    rule_file,
)
from bot.outreach.write import StartResult, VarsChange, merge_vars, start_conversations
from bot.rules.model import Ruleset
from bot.rules.normalize import unstorable
from bot.runtime.hosting import Runtime
from bot.runtime.pipeline import inbound_policy
from bot.store.db import WRITE_OPTIONS

log = logging.getLogger("smsbot.api")

PREFIX = "/api/v1"
MESSAGES_SHOWN = 20
Answer = tuple[int, dict[str, Any]]
"""An HTTP status and its JSON body."""


class ApiProblem(Exception):  # noqa: N818 - an answer, not a failure
    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        super().__init__(body.get("detail", ""))
        self.status, self.body, self.headers = status, body, headers


def invalid(field: str | None, detail: str) -> dict[str, Any]:
    return {"error": "invalid", "field": field, "detail": detail}


def field_of(location: Sequence[Any]) -> str:
    """A pydantic error location as a field path: ``("body", "params", 0)`` -> ``params[0]``."""
    parts = list(location)
    if parts and parts[0] in ("body", "path", "query", "header"):
        parts = parts[1:] or parts
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


class ApiRoute(APIRoute):
    """FastAPI's validation errors and our refusals, answered in the API's one error shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                await _read_body(request)
                _check_path(request)
                return await handler(request)
            except RequestValidationError as exc:
                if not await run_in_threadpool(_has_a_key, request):
                    return _unauthorized(request)  # who asks comes first: no key learns nothing about bodies
                first = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid body"}
                if first.get("type") == "json_invalid":
                    ctx = first.get("ctx")
                    problem = ctx.get("error", "invalid") if isinstance(ctx, dict) else "invalid"
                    return JSONResponse(invalid("body", f"not JSON: {problem}"), status_code=422)
                return JSONResponse(invalid(field_of(first.get("loc", ())), str(first.get("msg"))), status_code=422)
            except HTTPException as exc:  # FastAPI could not read the body at all
                if not await run_in_threadpool(_has_a_key, request):
                    return _unauthorized(request)
                return JSONResponse(invalid("body", _unreadable(request, exc)), status_code=422)
            except ApiProblem as exc:
                return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

        return answer


MAX_BODY_BYTES = 4 * 1024 * 1024
"""The largest API body: a full batch of starts with vars fits many times over; 10 MB of anything does not."""


async def _read_body(request: Request) -> None:
    """The body read up front within ``MAX_BODY_BYTES`` (413 beyond); FastAPI then parses the cached bytes."""
    if request.method not in ("POST", "PUT", "PATCH"):
        return
    too_large = ApiProblem(413, invalid("body", f"body larger than {MAX_BODY_BYTES} bytes"))
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    request._body = b"".join(chunks)  # Starlette's cache of the body: what request.body() returns from now on


def _check_path(request: Request) -> None:
    """A NUL or half a character in the URL's signature or number can name nothing stored: 422 naming the part."""
    for name, value in request.path_params.items():
        problem = unstorable(value) if isinstance(value, str) else None
        if problem is not None:
            raise ApiProblem(422, invalid(name, problem))


def _unreadable(request: Request, exc: HTTPException) -> str:
    """What FastAPI's "error parsing the body" was: said for the developer reading it."""
    body = getattr(request, "_body", b"")
    try:
        json.loads(body)
    except RecursionError:
        return "the JSON is nested too deeply"
    except UnicodeDecodeError as error:
        return f"the body is not valid UTF-8 (byte {error.start})"
    except ValueError as error:
        return f"not JSON: {error}"
    return str(exc.detail)


def _bearer_key(request: Request) -> str | None:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


def _has_a_key(request: Request) -> bool:
    key = _bearer_key(request)
    if key is None:
        return False
    with _runtime(request).engine.connect() as conn:
        return caller_for(conn, key) is not None


def _unauthorized(request: Request) -> Response:
    detail = "send Authorization: Bearer <API key>" if _bearer_key(request) is None else "unknown or revoked API key"
    return JSONResponse(_refusal("unauthorized", detail), status_code=401, headers={"WWW-Authenticate": "Bearer"})


router = APIRouter(prefix=PREFIX, route_class=ApiRoute, tags=["api"])
_bearer = HTTPBearer(auto_error=False, description="an API key from `smsbot apikeys add NAME --scope ...`")


def _runtime(request: Request) -> Runtime:
    found: Runtime = request.app.state.runtime
    return found


def _requires(scope: str) -> Any:
    def caller(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
    ) -> ApiCaller:
        challenge = {"WWW-Authenticate": "Bearer"}
        if credentials is None or not credentials.credentials:
            raise ApiProblem(401, _refusal("unauthorized", "send Authorization: Bearer <API key>"), challenge)
        with _runtime(request).engine.connect() as conn:
            found = caller_for(conn, credentials.credentials)
        if found is None:
            log.warning("API call refused: unknown or revoked key")
            raise ApiProblem(401, _refusal("unauthorized", "unknown or revoked API key"), challenge)
        if scope not in found.scopes:
            raise ApiProblem(403, _refusal("forbidden", f"the key {found.name!r} lacks the scope {scope!r}"))
        return found

    return Depends(caller)


def _refusal(error: str, detail: str) -> dict[str, Any]:
    return {"error": error, "detail": detail}


StartCaller = Annotated[ApiCaller, _requires("start")]
ReadCaller = Annotated[ApiCaller, _requires("read")]
VarsCaller = Annotated[ApiCaller, _requires("vars")]

_AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ApiError, "description": "no key, an unknown or a revoked key: nothing changed"},
    403: {"model": ApiError, "description": "the key lacks this route's scope: nothing changed"},
}
_INVALID: dict[int | str, dict[str, Any]] = {
    422: {
        "model": ApiError,
        "description": "a bad body, an unknown signature / template / state, a wrong param count; `field` names it",
    }
}


# ------------------------------------------------------------------ starting


@dataclass
class _Item:
    """One start of a call: its body (or why it has none), its check, and its answer once known."""

    body: StartBody | None
    checked: CheckedStart | None = None
    answer: Answer | None = None
    replayed: bool = False


def _write_transaction(request: Request) -> Any:
    return _runtime(request).engine.connect().execution_options(**WRITE_OPTIONS)


def _ruleset(request: Request) -> Ruleset | None:
    return rules_view(request).ruleset


class _RulesHolder:
    """The ruleset this process starts conversations with (``LiveEndpoints`` follows its replacements)."""

    ruleset: Ruleset | None = None


def _event_endpoints(request: Request, rt: Runtime) -> EventEndpoints:
    """The event endpoints for the rules starts are checked against: config's and the rule files'."""
    state = request.app.state
    live: LiveEndpoints | None = getattr(state, "api_event_endpoints", None)
    holder: _RulesHolder | None = getattr(state, "api_event_rules", None)
    if live is None or holder is None:
        holder = state.api_event_rules = _RulesHolder()
        live = state.api_event_endpoints = LiveEndpoints(config_endpoints(rt.settings.events), holder)
    holder.ruleset = _ruleset(request)
    return live.current()


def _started_answer(result: StartResult) -> Answer:
    if result.outcome == "opted_out":
        return 409, {
            "error": "opted_out",
            "detail": "the number opted out of this signature: nothing was queued",
        }
    if result.outcome == "refused":
        return 422, invalid(result.field, result.detail or "")
    assert result.conversation_id is not None
    assert result.message_id is not None
    assert result.state is not None
    started = Started(
        conversation_id=result.conversation_id,
        message_id=result.message_id,
        state=result.state,
        message_status="looping" if result.message_status == "looping" else "queued",
        text=result.text or "",
        segments=result.segments or 1,
        params=list(result.params),
        extend_code=result.extend_code,
    )
    return 202, started.model_dump()


def _run_starts(request: Request, caller: ApiCaller, items: list[_Item], *, action: str) -> None:
    """Check, start and answer ``items`` in one transaction (with idempotency, the key's use and the audit row)."""
    rt = _runtime(request)
    ruleset = _ruleset(request)
    limit = rt.rules.param_max_length or rt.settings.param_max_length
    for item in items:
        if item.body is None or item.answer is not None:
            continue
        body = item.body
        try:
            item.checked = check_start(
                ruleset,
                StartRequest(
                    signature=body.signature,
                    nationcode=body.nationcode,
                    mobile=body.mobile,
                    template=body.template,
                    params=body.params,
                    state=body.state,
                    vars=body.vars or {},
                    idempotency_key=body.idempotency_key,
                ),
                param_max_length=limit,
            )
        except StartRefused as exc:
            item.answer = (422, invalid(exc.field, exc.detail))
    for attempt in (1, 2):
        try:
            queued = _start_in_transaction(request, rt, caller, items, action=action)
            break
        except IntegrityError:  # two calls with one new idempotency key at once (PostgreSQL): the second replays
            if attempt == 2:
                raise
            for item in items:
                if item.checked is not None:
                    item.answer, item.replayed = None, False
    if queued:
        rt.pipeline.wake_delivery()


def _start_in_transaction(request: Request, rt: Runtime, caller: ApiCaller, items: list[_Item], *, action: str) -> int:
    now = rt.clock()
    with _write_transaction(request) as conn, conn.begin():
        keys = sorted({i.body.idempotency_key for i in items if i.body is not None and i.body.idempotency_key})
        remembered = remembered_answers(conn, api_key_id=caller.id, keys=keys, now=now)
        first_with_key: dict[str, _Item] = {}
        to_start: list[_Item] = []
        for item in items:
            key = item.body.idempotency_key if item.body is not None else None
            if key is not None and key in remembered:
                item.answer, item.replayed = remembered[key], True
            elif key is not None and key in first_with_key:
                item.replayed = True  # answered below, with the first item of that key
            elif item.checked is not None and item.answer is None:
                to_start.append(item)
                if key is not None:
                    first_with_key[key] = item
        results = start_conversations(
            conn,
            [i.checked for i in to_start if i.checked is not None],
            now=now,
            started_by=caller.actor,
            policy=inbound_policy(rt.settings),
            event_endpoints=_event_endpoints(request, rt),
        )
        new_answers: dict[str, Answer] = {}
        for item, result in zip(to_start, results, strict=True):
            item.answer = _started_answer(result)
            key = item.body.idempotency_key if item.body is not None else None
            if key is not None and item.answer[0] in (202, 409):
                new_answers[key] = item.answer
        for item in items:
            key = item.body.idempotency_key if item.body is not None else None
            if item.answer is None and key is not None and key in first_with_key:
                item.answer = first_with_key[key].answer
        remember_answers(conn, api_key_id=caller.id, answers=new_answers, now=now)
        touch(conn, caller, now=now)
        _audit_starts(conn, caller, items, action=action, now=now)
    return sum(1 for r in results if r.message_status == "queued")


def _audit_starts(conn: Connection, caller: ApiCaller, items: list[_Item], *, action: str, now: datetime) -> None:
    statuses = [item.answer[0] if item.answer else 422 for item in items]
    if action == "api.start":
        item = items[0]
        body = item.answer[1] if item.answer else {}
        detail: dict[str, Any] = {"status": statuses[0], "replayed": item.replayed}
        if item.body is not None:
            detail |= {
                "signature": item.body.signature,
                "number": f"+{item.body.nationcode.lstrip('+')} {mask_number(item.body.mobile)}",
                "template": item.body.template,
            }
        if "field" in body:
            detail["field"] = body["field"]
        target = f"conversation:{body['conversation_id']}" if "conversation_id" in body else None
        audit(conn, actor=caller.actor, action=action, target=target, detail=detail, now=now)
        return
    detail = {
        "items": len(items),
        "started": statuses.count(202),
        "opted_out": statuses.count(409),
        "invalid": statuses.count(422),
        "replayed": sum(1 for item in items if item.replayed),
    }
    audit(conn, actor=caller.actor, action=action, target=None, detail=detail, now=now)


@router.post(
    "/conversations",
    status_code=202,
    response_model=Started,
    responses={
        202: {"description": "committed to the outbox (or, replayed, the first answer to this idempotency_key)"},
        409: {"model": ApiError, "description": 'the number opted out of this signature: `{"error": "opted_out"}`'},
        **_AUTH_ERRORS,
        **_INVALID,
    },
    summary="Start (or restart) a conversation: send a template, set the state and vars",
)
def start_conversation(request: Request, body: StartBody, caller: StartCaller) -> Response:
    item = _Item(body)
    _run_starts(request, caller, [item], action="api.start")
    assert item.answer is not None
    status, answer = item.answer
    headers = {"Idempotent-Replayed": "true"} if item.replayed else None
    return JSONResponse(answer, status_code=status, headers=headers)


@router.post(
    "/conversations:batch",
    response_model=BatchAnswer,
    responses={
        **_AUTH_ERRORS,
        422: {"model": ApiError, "description": f"not a JSON object with up to {MAX_BATCH} items"},
    },
    summary=f"Start up to {MAX_BATCH} conversations; each item is answered on its own (202, 409 or 422)",
)
def start_batch(request: Request, body: BatchBody, caller: StartCaller) -> Response:
    items: list[_Item] = []
    for raw in body.items:
        try:
            items.append(_Item(StartBody.model_validate(raw)))
        except ValidationError as exc:
            first = exc.errors()[0]
            items.append(_Item(None, answer=(422, invalid(field_of(first["loc"]), first["msg"]))))
    _run_starts(request, caller, items, action="api.start_batch")
    results = []
    for index, item in enumerate(items):
        assert item.answer is not None
        status, answer = item.answer
        results.append({"index": index, "status": status, **answer})
    return JSONResponse({"results": results})


# ------------------------------------------------------------------ reading and vars


def _path_number(request: Request, signature: str, nationcode: str, mobile: str) -> tuple[str, str, str]:
    """The conversation's stored signature and number from the path; 422 naming the bad part."""
    try:
        code, number = check_number(nationcode, mobile)
    except StartRefused as exc:
        raise ApiProblem(422, invalid(exc.field, exc.detail)) from None
    try:
        stored = rule_file(_ruleset(request), signature).signature
    except StartRefused:
        stored = signature.strip().removeprefix("【").removesuffix("】")
    return stored, code, number


@router.get(
    "/conversations/{signature}/{nationcode}/{mobile}",
    response_model=ConversationView,
    responses={
        404: {"model": ApiError, "description": "no conversation of that number under that signature"},
        **_AUTH_ERRORS,
        **_INVALID,
    },
    summary="A conversation: state, vars, opt-out and its newest 20 messages",
)
def read_conversation(request: Request, signature: str, nationcode: str, mobile: str, caller: ReadCaller) -> Response:
    stored, code, number = _path_number(request, signature, nationcode, mobile)
    rt = _runtime(request)
    now = rt.clock()
    with _write_transaction(request) as conn, conn.begin():
        convo = conversation_by_number(conn, signature=stored, nationcode=code, mobile=number)
        found = None
        if convo is not None:
            rows = newest_messages(conn, conversation_id=convo["id"], limit=MESSAGES_SHOWN)
            found = _view(convo, rows)
        touch(conn, caller, now=now)
        audit(
            conn,
            actor=caller.actor,
            action="api.read",
            target=f"conversation:{convo['id']}" if convo is not None else None,
            detail={"signature": stored, "number": f"+{code} {mask_number(number)}", "found": convo is not None},
            now=now,
        )
    if found is None:
        return JSONResponse(_refusal("not_found", "no conversation of that number under that signature"), 404)
    return JSONResponse(found.model_dump(mode="json"))


def _view(convo: Any, rows: list[Any]) -> ConversationView:
    return ConversationView(
        conversation_id=convo["id"],
        signature=convo["signature"],
        nationcode=convo["nationcode"],
        mobile=convo["mobile"],
        state=convo["state"],
        expires_at=convo["expires_at"],
        vars=dict(convo["variables"] or {}),
        opted_out=bool(convo["opted_out"]),
        opted_out_at=convo["opted_out_at"],
        created_at=convo["created_at"],
        updated_at=convo["updated_at"],
        messages=[
            MessageView(
                id=row["id"],
                direction=row["direction"],
                text=row["text"],
                status=row["status"],
                created_at=row["created_at"],
                state_before=row["state_before"],
                state_after=row["state_after"],
                template=row["template_name"],
                params=row["params"],
                rule=row["rule"],
                rule_kind=row["rule_kind"],
                started_by=row["started_by"],
                sent_at=row["sent_at"],
                delivered_at=row["delivered_at"],
            )
            for row in rows
        ],
    )


_VARS_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "additionalProperties": {"type": "string", "maxLength": 1000},
                    "maxProperties": 50,
                    "example": {"appointment": "Tue 10:00", "order_id": "A1234"},
                }
            }
        },
    }
}


@router.put(
    "/conversations/{signature}/{nationcode}/{mobile}/vars",
    response_model=VarsAnswer,
    responses={**_AUTH_ERRORS, **_INVALID},
    summary="Merge contact data (a JSON object of text values) into a conversation; nothing is sent",
    openapi_extra=_VARS_BODY,
)
def put_vars(
    request: Request,
    signature: str,
    nationcode: str,
    mobile: str,
    caller: VarsCaller,
    values: Annotated[dict[str, Any], Body()],
) -> Response:
    code, number = _path_number(request, signature, nationcode, mobile)[1:]
    try:
        stored = rule_file(_ruleset(request), signature).signature
        checked = check_vars(values)
    except StartRefused as exc:
        raise ApiProblem(422, invalid(exc.field, exc.detail)) from None
    rt = _runtime(request)
    now = rt.clock()
    for attempt in (1, 2):  # a customer's first message may create the conversation meanwhile (PostgreSQL)
        try:
            with _write_transaction(request) as conn, conn.begin():
                (result,) = merge_vars(conn, [VarsChange(stored, code, number, checked)], now=now)
                touch(conn, caller, now=now)
                audit(
                    conn,
                    actor=caller.actor,
                    action="api.vars",
                    target=f"conversation:{result.conversation_id}",
                    detail={"signature": stored, "number": f"+{code} {mask_number(number)}", "vars": sorted(checked)},
                    now=now,
                )
            break
        except IntegrityError:
            if attempt == 2:
                raise
    answer = VarsAnswer(
        conversation_id=result.conversation_id,
        created=result.created,
        state=result.state,
        opted_out=result.opted_out,
        vars=dict(result.vars),
    )
    return JSONResponse(answer.model_dump())
