"""The deliveries page: replies that failed, may not have gone out, expired or still wait; admins retry some.

``ambiguous`` replies (Tencent may have sent them) are marked "needs ops":
nothing settles them but a delivery report, the active check, or a person
who looked in Tencent's console. ``expired`` ones (held past
``reply_max_delay``: marketing hours, frequency limits, an account cap, a
retry past the deadline, a queue that stood still) are listed with that
reason and are not retryable: a reply that late confuses more than none,
and a retry would send exactly that late reply.

A retry puts the reply back in the outbox exactly as the pipeline queues a
new one (status ``queued``, due now), so the delivery loop sends it with
every usual check: the last-moment opt-out check, marketing hours and the
frequency limits. ``attempts`` starts again at 0: the retry policy's budget
counts automatic tries of one send, and an admin retrying after fixing the
cause (a template, a balance, a blocked number) wants a full new budget,
not the last try of a spent one. The previous error code and message stay
on the message until the new send settles, so the page keeps saying why it
was retried.

Refused: a reply already sent or delivered (the customer has it), one still
waiting in the outbox, one that was never a failed send (suppressed,
looping), one to a number that has opted out since (the opt-out's own
confirmation excepted, as the delivery loop does), and an ``ambiguous`` one
without the explicit confirmation, because Tencent may have delivered it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import Connection

from bot.console.display import wants_reveal
from bot.console.ops_shared import Page, listing_context, page_number
from bot.console.queries.deliveries import (
    DeliveryFilter,
    count_deliveries,
    counts_by_status,
    delivery_page,
    failure_codes,
    requeue,
    retry_facts,
)
from bot.console.users import audit
from bot.console.web import PREFIX, AdminUser, ConsoleRouter, CurrentUser, engine, now, render, runtime
from bot.store.db import WRITE_OPTIONS
from bot.store.queries import NEEDS_A_LOOK, RETRYABLE, known_signatures

router = ConsoleRouter(prefix=PREFIX)

STATUS_FILTERS = (*NEEDS_A_LOOK, "pending")
"""``pending``: in the outbox (queued, or waiting for a retry after a transient error)."""

DONE = {
    "retried": "Put back in the outbox: the delivery loop sends it shortly.",
    "cap-lifted": (
        "Account cap lifted: the delivery loop sends again now. If Tencent still refuses, the cap is noted again "
        "and the banner comes back. Replies that already expired stay expired."
    ),
}


class RetryRefused(Exception):  # noqa: N818 - named for what the admin sees
    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


@router.get("/deliveries", response_class=HTMLResponse, include_in_schema=False)
def deliveries(request: Request, user: CurrentUser) -> Response:
    status = request.query_params.get("status", "")
    signature = request.query_params.get("signature", "").strip()
    code = request.query_params.get("code", "").strip()
    reveal = wants_reveal(request, user)
    if status != "pending" and status not in NEEDS_A_LOOK:
        status = ""
    filters = DeliveryFilter(status=status, signature=signature or None, code=code or None)
    with engine(request).connect() as conn:
        page = Page(page_number(request), count_deliveries(conn, filters=filters))
        rows = delivery_page(conn, filters=filters, limit=page.size, offset=page.offset)
        codes = failure_codes(conn, limit=200)
        signatures = known_signatures(conn)
        summary = counts_by_status(conn)
    return render(
        request,
        "deliveries.html",
        {
            "rows": rows,
            "status": status,
            "statuses": STATUS_FILTERS,
            "signature": signature,
            "signatures": signatures,
            "code": code,
            "codes": codes,
            "retryable": RETRYABLE,
            "summary": summary,
            **listing_context(request, page, reveal, DONE),
        },
    )


@router.post("/deliveries/{message_id}/retry", include_in_schema=False)
def retry(
    request: Request,
    admin: AdminUser,
    message_id: int,
    confirm_ambiguous: Annotated[str, Form()] = "",
) -> Response:
    at = now(request)
    confirmed = confirm_ambiguous in ("1", "yes", "on", "true")
    try:
        with engine(request).connect().execution_options(**WRITE_OPTIONS) as conn, conn.begin():
            previous = _requeue(conn, message_id, confirmed=confirmed, at=at)
            audit(
                conn,
                actor=admin.name,
                action="delivery.retry",
                target=f"message:{message_id}",
                detail={**previous, "confirmed_ambiguous": confirmed, "attempts_reset": True},
                now=at,
            )
    except RetryRefused as exc:
        return render(
            request, "error.html", {"status": exc.status_code, "message": str(exc)}, status_code=exc.status_code
        )
    runtime(request).pipeline.wake_delivery()  # wherever the delivery loop runs, if it runs
    return RedirectResponse(f"{PREFIX}/deliveries?done=retried", status_code=303)


def _requeue(conn: Connection, message_id: int, *, confirmed: bool, at: datetime) -> dict[str, str | None]:
    """Check the reply may be sent again and put it back in the outbox; returns its previous outcome."""
    row = retry_facts(conn, message_id=message_id)
    if row is None or row["direction"] != "out":
        raise RetryRefused(404, f"there is no reply {message_id}")
    status = row["status"]
    if status in ("sent", "delivered"):
        raise RetryRefused(409, f"reply {message_id} was already {status}: the customer has it, it is not sent again")
    if row["outbox_id"] is not None or status == "queued":
        raise RetryRefused(409, f"reply {message_id} is already waiting in the outbox")
    if status == "expired":
        raise RetryRefused(
            409,
            f"reply {message_id} expired: it could not go out within its reply_max_delay, and a reply that late "
            "confuses more than none, so it is not sent again",
        )
    if status not in RETRYABLE:
        raise RetryRefused(409, f"reply {message_id} is {status}, not a failed send: there is nothing to retry")
    if row["opted_out"] and row["rule_kind"] != "opt_out":
        raise RetryRefused(409, f"the number of reply {message_id} has opted out: it must not be sent anything")
    if not row["template_id"]:
        raise RetryRefused(409, f"reply {message_id} has no Tencent template id: fix the rules, it cannot be sent")
    if status == "ambiguous" and not confirmed:
        raise RetryRefused(
            400,
            f"reply {message_id} may already have reached the customer (Tencent never answered the send): "
            "tick the confirmation to send it again anyway",
        )
    reason = f"retry requested in the console (was {status})"
    if not requeue(conn, message_id=message_id, status=status, reason=reason, at=at):
        raise RetryRefused(409, f"reply {message_id} changed meanwhile: reload the page")
    return {"status": status, "error_code": row["error_code"], "error_message": row["error_message"]}
