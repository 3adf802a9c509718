"""The export download: the same files as ``smsbot export``, from the browser.

The query and the file format are ``bot.export``'s, so the download and the
command line can never disagree. Numbers are masked unless an admin ticks
"reveal" (``wants_reveal``, as on every page: a viewer's tick is ignored,
not refused). Every download is recorded in the audit trail: an export is a
file that leaves the system, and who took which range is worth knowing.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from bot.console.display import wants_reveal
from bot.console.users import audit
from bot.console.web import PREFIX, ConsoleRouter, CurrentUser, engine, now, render
from bot.store.db import WRITE_OPTIONS
from bot.store.export import BadDate, ExportFilter, ExportFormat, export_chunks, media_type, parse_bound
from bot.store.queries import known_signatures

router = ConsoleRouter(prefix=PREFIX)

FORMATS: tuple[ExportFormat, ...] = ("csv", "jsonl")


def _form(request: Request, values: dict[str, str], error: str | None = None) -> Response:
    with engine(request).connect() as conn:
        signatures = known_signatures(conn)
    return render(
        request,
        "export_page.html",
        {"values": values, "signatures": signatures, "formats": FORMATS, "error": error},
        status_code=400 if error else 200,
    )


@router.get("/export", response_class=HTMLResponse, include_in_schema=False)
def export_form(request: Request, _user: CurrentUser) -> Response:
    today = now(request).date()
    return _form(request, {"since": today.isoformat(), "until": today.isoformat(), "signature": "", "format": "csv"})


@router.get("/export/download", include_in_schema=False)
def export_download(request: Request, user: CurrentUser) -> Response:
    q = request.query_params
    values = {
        "since": q.get("since", "").strip(),
        "until": q.get("until", "").strip(),
        "signature": q.get("signature", "").strip(),
        "format": q.get("format", "csv"),
    }
    fmt: ExportFormat = "jsonl" if values["format"] == "jsonl" else "csv"
    reveal = wants_reveal(request, user)
    try:
        if not values["since"] or not values["until"]:
            raise BadDate("give both dates: since and until")
        filters = ExportFilter(
            since=parse_bound(values["since"]),
            until=parse_bound(values["until"], end=True),
            signature=values["signature"] or None,
            reveal=reveal,
        )
    except BadDate as exc:
        return _form(request, values, str(exc))
    at = now(request)
    with engine(request).connect().execution_options(**WRITE_OPTIONS) as conn, conn.begin():
        audit(
            conn,
            actor=user.name,
            action="export.download",
            target=filters.signature,
            detail={
                "since": filters.since.isoformat(),
                "until": filters.until.isoformat(),
                "format": fmt,
                "reveal": reveal,
            },
            now=at,
        )
    name = f"smsbot-messages-{filters.since:%Y%m%d}-{filters.until:%Y%m%d}.{fmt}"
    return StreamingResponse(
        export_chunks(engine(request), filters, fmt),
        media_type=media_type(fmt),
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )
