"""The opt-outs page: who must not get messages, and why; admins add and remove opt-outs by hand.

A hand-made change is written exactly like one the pipeline makes (the
conversation's ``opted_out`` flag plus an ``opt_out_events`` row, source
``console`` and the admin as actor), so the thread page, the export and the
delivery loop's last-moment opt-out check all see it with no special case.
The console's own audit trail gets an entry in the same transaction.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated

from fastapi import Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from bot.console.display import wants_reveal
from bot.console.ops_shared import Page, digits, listing_context, page_number
from bot.console.queries.optouts import (
    OptOutFilter,
    clear_opt_out,
    contact_id,
    conversation_number,
    conversation_of,
    count_opted_out,
    mark_opted_out,
    new_opted_out_conversation,
    opted_out_page,
    record_event,
)
from bot.console.users import ConsoleUser, audit
from bot.console.web import PREFIX, AdminUser, ConsoleRouter, CurrentUser, engine, now, render, runtime
from bot.numbers import mask_number
from bot.store.db import WRITE_OPTIONS
from bot.store.queries import known_signatures

router = ConsoleRouter(prefix=PREFIX)

_NOT_A_NUMBER = re.compile(r"[^\d\s+\-()]")

SOURCE = "console"
"""``opt_out_events.source`` of a change made on this page."""

SOURCES = ("keyword", SOURCE, "provider")
"""The sources the list can be filtered by: the customer's keyword, an admin here, Tencent's or a carrier's blacklist."""

DONE = {
    "added": "Opt-out added: no more messages go to that number under that signature.",
    "already": "That number was already opted out under that signature; nothing changed.",
    "removed": "Opt-out removed: the number gets replies again.",
    "not-opted-out": "That number is not opted out (any more); nothing changed.",
}


class OptOutRefused(Exception):  # noqa: N818 - named for what the admin sees
    """A hand-made change that cannot be made as asked (bad number, unknown conversation)."""


@router.get("/opt-outs", response_class=HTMLResponse, include_in_schema=False)
def opt_outs(request: Request, user: CurrentUser) -> Response:
    number = request.query_params.get("number", "").strip()
    signature = request.query_params.get("signature", "").strip()
    source = request.query_params.get("source", "").strip()
    if source not in SOURCES:
        source = ""
    reveal = wants_reveal(request, user)
    filters = OptOutFilter(number_digits=digits(number), signature=signature, source=source)
    with engine(request).connect() as conn:
        page = Page(page_number(request), count_opted_out(conn, filters=filters))
        rows = opted_out_page(conn, filters=filters, limit=page.size, offset=page.offset)
        signatures = known_signatures(conn, extra=_rule_signatures(request))
    return render(
        request,
        "optouts.html",
        {
            "rows": rows,
            "number": number,
            "signature": signature,
            "signatures": signatures,
            "source": source,
            "sources": SOURCES,
            **listing_context(request, page, reveal, DONE),
        },
    )


def _rule_signatures(request: Request) -> list[str]:
    """The signatures the loaded rule files answer, so an opt-out can be added before any conversation exists."""
    ruleset = runtime(request).rules.ruleset
    return [f.signature for f in ruleset.files] if ruleset is not None else []


@router.post("/opt-outs/add", include_in_schema=False)
def add_opt_out(
    request: Request,
    admin: AdminUser,
    number: Annotated[str, Form()] = "",
    signature: Annotated[str, Form()] = "",
    nationcode: Annotated[str, Form()] = "86",
    reason: Annotated[str, Form()] = "",
) -> Response:
    try:
        mobile, code, sign = _checked(number, nationcode, signature)
    except OptOutRefused as exc:
        return render(request, "error.html", {"status": 400, "message": str(exc)}, status_code=400)
    at = now(request)
    # Two tries: a customer's first message can create the same contact or conversation between
    # our look-up and our insert; the second try then finds it.
    for attempt in (1, 2):
        try:
            with engine(request).connect().execution_options(**WRITE_OPTIONS) as conn, conn.begin():
                changed = _opt_out(conn, admin, code, mobile, sign, reason.strip()[:500] or None, at)
            break
        except IntegrityError:
            if attempt == 2:
                raise
    return RedirectResponse(f"{PREFIX}/opt-outs?done={'added' if changed else 'already'}", status_code=303)


def _checked(number: str, nationcode: str, signature: str) -> tuple[str, str, str]:
    mobile, code, sign = digits(number), digits(nationcode) or "86", signature.strip()
    if _NOT_A_NUMBER.search(number):  # e.g. a masked "138****0000" copied from a page
        raise OptOutRefused("give the full phone number in digits, not a masked or partial one")
    if number.strip().startswith("+") and mobile.startswith(code) and len(mobile) > 11:
        mobile = mobile[len(code) :]  # "+86 138..." typed into the number field
    if not 5 <= len(mobile) <= 20:
        raise OptOutRefused("give the full phone number (5 to 20 digits), not a masked or partial one")
    if len(code) > 4:
        raise OptOutRefused("the country code has at most 4 digits (86 for mainland China)")
    if not sign or len(sign) > 128:
        raise OptOutRefused("give the SMS signature (at most 128 characters) the opt-out applies to")
    return mobile, code, sign


def _opt_out(
    conn: Connection, admin: ConsoleUser, nationcode: str, mobile: str, sign: str, reason: str | None, at: datetime
) -> bool:
    """Opt the number out under ``sign``; False when it already was (nothing written)."""
    contact = contact_id(conn, nationcode=nationcode, mobile=mobile, at=at)
    convo = conversation_of(conn, signature=sign, contact_id=contact)
    if convo is not None and convo["opted_out"]:
        return False
    if convo is None:
        convo_id = new_opted_out_conversation(conn, signature=sign, contact_id=contact, at=at)
    else:
        convo_id = convo["id"]
        mark_opted_out(conn, conversation_id=convo_id, at=at)
    _event(conn, convo_id, "opt_out", admin, reason, at)
    audit(
        conn,
        actor=admin.name,
        action="opt_out.add",
        target=f"conversation:{convo_id}",
        detail={"signature": sign, "number": f"+{nationcode} {mask_number(mobile)}", "reason": reason},
        now=at,
    )
    return True


def _event(conn: Connection, convo_id: int, event: str, admin: ConsoleUser, reason: str | None, at: datetime) -> None:
    record_event(conn, conversation_id=convo_id, event=event, source=SOURCE, actor=admin.name, reason=reason, at=at)


@router.post("/opt-outs/remove", include_in_schema=False)
def remove_opt_out(
    request: Request,
    admin: AdminUser,
    conversation_id: Annotated[int, Form()],
    reason: Annotated[str, Form()] = "",
) -> Response:
    at = now(request)
    note = reason.strip()[:500] or None
    with engine(request).connect().execution_options(**WRITE_OPTIONS) as conn, conn.begin():
        found = conversation_number(conn, conversation_id=conversation_id)
        if found is None:
            return render(request, "error.html", {"status": 404, "message": "no such conversation"}, status_code=404)
        changed = clear_opt_out(conn, conversation_id=conversation_id, at=at)
        if changed:
            _event(conn, conversation_id, "opt_in", admin, note, at)
            audit(
                conn,
                actor=admin.name,
                action="opt_out.remove",
                target=f"conversation:{conversation_id}",
                detail={
                    "signature": found["signature"],
                    "number": f"+{found['nationcode']} {mask_number(found['mobile'])}",
                    "reason": note,
                },
                now=at,
            )
    return RedirectResponse(f"{PREFIX}/opt-outs?done={'removed' if changed else 'not-opted-out'}", status_code=303)
