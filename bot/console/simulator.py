"""The simulator: type as a customer, see what the live rules would answer, store and send nothing.

It runs the same simulation as ``smsbot simulate`` (``bot/rules/simulation.py``
``simulate_message``: the engine's pure ``decide``, then ``resume`` after a
rule's webhook call), never the pipeline, so there is no database row and no
outbox entry to forget to clean up. A rule's ``call:`` is never made: the page
shows what would be called (method, URL, rendered body) and answers it from the
canned JSON typed for that webhook, or, without one, takes the rule's
``on_error`` as a failed call would. The throwaway
conversation (state, variables, expiry, opt-out, and the transcript so far)
travels in a hidden form field, signed so that a page cannot be handed a
forged transcript that looks like the bot's; nothing about it is kept on the
server, and a fresh page is a fresh conversation.

Time runs on the app's clock plus any "later" the user adds, so expiring
states can be tried without waiting.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import Form, Request
from fastapi.responses import HTMLResponse, Response
from itsdangerous import BadSignature, URLSafeSerializer

from bot.console.rules_page import RulesView, rules_view
from bot.console.web import PREFIX, ConsoleRouter, CurrentUser, console_config, now, render
from bot.rules.model import Conversation, InboundMessage, Ruleset, WebhookOutcome
from bot.rules.simulation import NOT_CALLED, Step, simulate_message

router = ConsoleRouter(prefix=PREFIX)

SIM_MOBILE = "13800000000"
"""The pretend customer's number (never stored, never sent to)."""
MAX_STEPS = 40
"""Transcript steps carried in the form: older ones drop off (the conversation's state does not)."""
MAX_TEXT = 500
MAX_ANSWERS = 64 * 1024
"""The canned webhook answers' JSON, at most (a real call's answer is limited to 64 KiB too)."""
WAITS = {
    "0": "right away",
    "5": "5 minutes later",
    "30": "30 minutes later",
    "120": "2 hours later",
    "1440": "a day later",
}


def _serializer(request: Request) -> URLSafeSerializer:
    """Signed with the console's key but its own salt: a simulator token is never a valid session cookie."""
    key = console_config(request).signer.secret_keys[-1]
    return URLSafeSerializer(key, salt="smsbot-console-simulator")


@dataclass
class SimState:
    """The throwaway conversation, as carried from one form post to the next."""

    sign: str = ""
    state: str | None = None
    vars: dict[str, Any] | None = None
    """Text values, and a webhook's saved JSON answer (``save_as``) as it came."""
    expires_at: str | None = None
    opted_out: bool = False
    offset_seconds: int = 0
    steps: list[dict[str, Any]] | None = None

    def conversation(self) -> Conversation:
        return Conversation(
            state=self.state,
            vars=dict(self.vars or {}),
            expires_at=datetime.fromisoformat(self.expires_at) if self.expires_at else None,
            opted_out=self.opted_out,
        )

    def dump(self) -> dict[str, Any]:
        return {
            "sign": self.sign,
            "state": self.state,
            "vars": self.vars or {},
            "expires_at": self.expires_at,
            "opted_out": self.opted_out,
            "offset": self.offset_seconds,
            "steps": self.steps or [],
        }


def _load(request: Request, token: str) -> SimState:
    """The carried conversation; anything unreadable or unsigned starts a fresh one."""
    if not token:
        return SimState()
    try:
        data = _serializer(request).loads(token)
    except BadSignature:
        return SimState()
    if not isinstance(data, dict):
        return SimState()
    return SimState(
        sign=str(data.get("sign") or ""),
        state=data.get("state"),
        vars={str(k): v for k, v in (data.get("vars") or {}).items()},
        expires_at=data.get("expires_at"),
        opted_out=bool(data.get("opted_out")),
        offset_seconds=int(data.get("offset") or 0),
        steps=list(data.get("steps") or []),
    )


def _call(step: Step) -> dict[str, Any] | None:
    """The webhook call the fired rule asked for, and what the simulator answered it with (plain JSON)."""
    call, outcome = step.call, step.outcome
    if call is None or outcome is None:
        return None
    return {
        "webhook": call.webhook,
        "method": call.method,
        "url": call.url,
        "body": json.dumps(dict(call.body), ensure_ascii=False, default=str) if call.body is not None else None,
        "save_as": call.save_as,
        "canned": outcome.error != NOT_CALLED,
        "ok": outcome.ok,
        "answer": json.dumps(outcome.data, ensure_ascii=False, default=str) if outcome.ok else None,
        "error": outcome.error,
    }


def _step(step: Step) -> dict[str, Any]:
    """One exchange as the page shows it (plain JSON: it goes into the signed token)."""
    text, at, d = step.text, step.at, step.decision
    return {
        "said": text,
        "at": at.isoformat(timespec="seconds"),
        "replies": [
            {
                "text": r.text,
                "template": r.template,
                "template_id": r.template_id,
                "params": list(r.params),
                "segments": r.segments,
                "length": r.length,
                "marketing": r.marketing,
            }
            for r in d.replies
        ],
        "rule": d.rule,
        "rule_kind": d.rule_kind,
        "rules_file": d.rules_file,
        "state_before": d.state_before,
        "state": d.state,
        "vars": dict(d.vars),
        "expires_at": d.expires_at.isoformat(timespec="seconds") if d.expires_at else None,
        "opted_out": d.opted_out,
        "opt_change": d.opt_change,
        "unmatched": d.unmatched,
        "expired": d.expired,
        "errors": list(step.errors),
        "call": _call(step),
    }


def _signatures(view: RulesView) -> list[str]:
    if view.ruleset is None:
        return []
    return sorted(f.signature for f in view.ruleset.files if f.signature != "*")


def _webhook_names(ruleset: Ruleset | None, sign: str) -> list[str]:
    """The webhooks of the file answering ``sign``: the ones a canned answer may be given for."""
    answering = ruleset.for_signature(sign) if ruleset is not None and sign else None
    return sorted(answering.webhooks) if answering is not None else []


def _answers(text: str) -> tuple[dict[str, WebhookOutcome], str | None]:
    """The canned answers typed as a JSON object ``{"NAME": <its JSON answer>}``, or why they cannot be read."""
    if not text.strip():
        return {}, None
    if len(text) > MAX_ANSWERS:
        return {}, f"webhook answers: at most {MAX_ANSWERS // 1024} KiB of JSON"
    try:
        data = json.loads(text)
    except ValueError as exc:
        return {}, f"webhook answers: not JSON ({exc})"
    if not isinstance(data, dict):
        return {}, 'webhook answers: a JSON object by webhook name, e.g. {"order": {"status": "shipped"}}'
    return {str(name): WebhookOutcome(ok=True, data=answer) for name, answer in data.items()}, None


def _page(
    request: Request,
    view: RulesView,
    sim: SimState,
    *,
    error: str | None = None,
    wait: str = "0",
    answers: str = "",
) -> Response:
    return render(
        request,
        "simulator.html",
        {
            "view": view,
            "signatures": _signatures(view),
            "has_default": view.ruleset is not None and view.ruleset.default is not None,
            "sim": sim,
            "token": _serializer(request).dumps(sim.dump()) if sim.steps else "",
            "error": error,
            "waits": WAITS,
            "wait": wait,
            "webhooks": _webhook_names(view.ruleset, sim.sign),
            "answers": answers,
        },
        status_code=400 if error else 200,
    )


@router.get("/simulator", response_class=HTMLResponse, include_in_schema=False)
def simulator(request: Request, _user: CurrentUser) -> Response:
    view = rules_view(request)
    sign = request.query_params.get("signature", "").strip()
    signatures = _signatures(view)
    return _page(request, view, SimState(sign=sign or (signatures[0] if signatures else "")))


@router.post("/simulator", response_class=HTMLResponse, include_in_schema=False)
def simulator_say(
    request: Request,
    _user: CurrentUser,
    signature: Annotated[str, Form()] = "",
    text: Annotated[str, Form()] = "",
    token: Annotated[str, Form()] = "",
    wait: Annotated[str, Form()] = "0",
    webhooks: Annotated[str, Form()] = "",
) -> Response:
    view = rules_view(request)
    sim = _load(request, token)
    sign = signature.strip()
    if sim.sign != sign:  # another signature is another conversation
        sim = SimState(sign=sign)

    def refuse(error: str) -> Response:
        return _page(request, view, sim, error=error, wait=wait, answers=webhooks)

    if view.ruleset is None:
        return refuse("no rules are loaded, so there is nothing to simulate")
    if not sign or len(sign) > 128:
        return refuse("pick the signature the customer replies to")
    if not text.strip() or len(text) > MAX_TEXT:
        return refuse(f"type what the customer says (1 to {MAX_TEXT} characters)")
    canned, problem = _answers(webhooks)
    if problem is not None:
        return refuse(problem)
    sim.offset_seconds += int(wait) * 60 if wait in WAITS else 0
    at = now(request) + timedelta(seconds=sim.offset_seconds)
    message = InboundMessage(text=text, sign=sign, nationcode="86", mobile=SIM_MOBILE)
    step = simulate_message(view.ruleset, sim.conversation(), message, at, webhooks=canned)
    after = step.decision.conversation()
    sim.state, sim.vars, sim.opted_out = after.state, dict(after.vars), after.opted_out
    sim.expires_at = after.expires_at.isoformat() if after.expires_at else None
    sim.steps = [*(sim.steps or []), _step(step)][-MAX_STEPS:]
    return _page(request, view, sim, answers=webhooks)
