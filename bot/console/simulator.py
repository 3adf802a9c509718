"""The simulator: type as a customer, see what the live rules would answer, store and send nothing.

It calls the engine's pure ``decide`` directly, never the pipeline, so there
is no database row and no outbox entry to forget to clean up. The throwaway
conversation (state, variables, expiry, opt-out, and the transcript so far)
travels in a hidden form field, signed so that a page cannot be handed a
forged transcript that looks like the bot's; nothing about it is kept on the
server, and a fresh page is a fresh conversation.

Time runs on the app's clock plus any "later" the user adds, so expiring
states can be tried without waiting.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import Form, Request
from fastapi.responses import HTMLResponse, Response
from itsdangerous import BadSignature, URLSafeSerializer

from bot.console.rules_page import RulesView, rules_view
from bot.console.web import PREFIX, ConsoleRouter, CurrentUser, console_config, now, render
from bot.rules.engine import decide
from bot.rules.model import Conversation, Decision, InboundMessage

router = ConsoleRouter(prefix=PREFIX)

SIM_MOBILE = "13800000000"
"""The pretend customer's number (never stored, never sent to)."""
MAX_STEPS = 40
"""Transcript steps carried in the form: older ones drop off (the conversation's state does not)."""
MAX_TEXT = 500
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
    vars: dict[str, str] | None = None
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
        vars={str(k): str(v) for k, v in (data.get("vars") or {}).items()},
        expires_at=data.get("expires_at"),
        opted_out=bool(data.get("opted_out")),
        offset_seconds=int(data.get("offset") or 0),
        steps=list(data.get("steps") or []),
    )


def _step(text: str, at: datetime, d: Decision) -> dict[str, Any]:
    """One exchange as the page shows it (plain JSON: it goes into the signed token)."""
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
        "errors": list(d.errors),
    }


def _signatures(view: RulesView) -> list[str]:
    if view.ruleset is None:
        return []
    return sorted(f.signature for f in view.ruleset.files if f.signature != "*")


def _page(request: Request, view: RulesView, sim: SimState, *, error: str | None = None, wait: str = "0") -> Response:
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
) -> Response:
    view = rules_view(request)
    sim = _load(request, token)
    sign = signature.strip()
    if sim.sign != sign:  # another signature is another conversation
        sim = SimState(sign=sign)
    if view.ruleset is None:
        return _page(request, view, sim, error="no rules are loaded, so there is nothing to simulate")
    if not sign or len(sign) > 128:
        return _page(request, view, sim, error="pick the signature the customer replies to")
    if not text.strip() or len(text) > MAX_TEXT:
        return _page(request, view, sim, error=f"type what the customer says (1 to {MAX_TEXT} characters)")
    sim.offset_seconds += int(wait) * 60 if wait in WAITS else 0
    at = now(request) + timedelta(seconds=sim.offset_seconds)
    message = InboundMessage(text=text, sign=sign, nationcode="86", mobile=SIM_MOBILE)
    decision = decide(view.ruleset, sim.conversation(), message, at)
    after = decision.conversation()
    sim.state, sim.vars, sim.opted_out = after.state, dict(after.vars), after.opted_out
    sim.expires_at = after.expires_at.isoformat() if after.expires_at else None
    sim.steps = [*(sim.steps or []), _step(text, at, decision)][-MAX_STEPS:]
    return _page(request, view, sim)
