"""The events page: events that failed for good (24 hours of retries) or still wait, with their last error.

An admin may send one again now ("retry now"): it is put back as pending and
due, with the same body (its id and ``created_at`` inside the body stay what
they were, so a receiver that saw it can tell), and a new 24 hours of retries.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from bot.console.display import DISPLAY_TZ_LABEL, fmt_time
from bot.console.queries.edge import QUEUE_STATUSES, event_counts, event_queue, retry_event
from bot.console.users import audit
from bot.console.web import PREFIX, AdminUser, ConsoleRouter, CurrentUser, engine, now, render
from bot.store.db import WRITE_OPTIONS

router = ConsoleRouter(prefix=PREFIX)

LIMIT = 200


@router.get("/events", response_class=HTMLResponse, include_in_schema=False)
def event_page(request: Request, _user: CurrentUser) -> Response:
    status = request.query_params.get("status", "failed")
    if status not in QUEUE_STATUSES:
        status = "failed"
    with engine(request).connect() as conn:
        counts = event_counts(conn)
        rows = event_queue(conn, status=status, limit=LIMIT)
    shown = [
        {
            **row,
            "created": fmt_time(row["created_at"]),
            "next": fmt_time(row["next_attempt_at"]),
            "thread": f"{PREFIX}/conversations/{row['conversation_id']}" if row["conversation_id"] else None,
        }
        for row in rows
    ]
    return render(
        request,
        "events.html",
        {
            "rows": shown,
            "status": status,
            "statuses": QUEUE_STATUSES,
            "counts": counts,
            "limit": LIMIT,
            "done": request.query_params.get("done"),
            "tz_label": DISPLAY_TZ_LABEL,
        },
    )


@router.post("/events/{event_id}/retry", include_in_schema=False)
def retry(request: Request, admin: AdminUser, event_id: int) -> Response:
    at = now(request)
    with engine(request).connect().execution_options(**WRITE_OPTIONS) as conn, conn.begin():
        previous = retry_event(conn, event_id=event_id, now=at)
        if previous is None or previous["status"] == "delivered":
            message = f"there is no event {event_id}" if previous is None else f"event {event_id} was delivered"
            code = 404 if previous is None else 409
            return render(request, "error.html", {"status": code, "message": message}, status_code=code)
        audit(
            conn,
            actor=admin.name,
            action="event.retry",
            target=f"event:{event_id}",
            detail={
                "status": previous["status"],
                "attempts": previous["attempts"],
                "last_error": previous["last_error"],
            },
            now=at,
        )
    return RedirectResponse(f"{PREFIX}/events?status=pending&done=retried", status_code=303)
