"""Rules > Activity: per rule and state, what the rules did over a period (``/console/rules/activity``).

The figures are ``bot.console.queries.activity``'s (their exact definitions are
there); ``/console/rules/activity.json`` gives the same numbers as JSON and
``smsbot report`` prints them. The funnel charts are SVG drawn by the template
from the dashboard's bar geometry: no JavaScript.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from bot.console.dashboard import _chart
from bot.console.display import DISPLAY_TZ_LABEL, date_range, fmt_time
from bot.console.queries.activity import Activity, activity, period_of
from bot.console.rules_page import rules_view
from bot.console.web import PREFIX, ConsoleRouter, CurrentUser, engine, now, render
from bot.store.queries import known_signatures

router = ConsoleRouter(prefix=PREFIX)

PERIODS = ("1d", "7d", "30d", "90d")
FUNNEL = [
    ("entered", "entered", "#2457c5"),
    ("left", "left", "#12b76a"),
    ("expired", "expired", "#f79009"),
    ("opted_out", "opted out", "#d92d20"),
]


def _figures(request: Request) -> tuple[Activity, dict[str, Any]]:
    at = now(request)
    chosen = date_range(request)
    problem = chosen.error
    since_text = request.query_params.get("since", "").strip() or None
    if chosen.start is not None:
        since, until = chosen.since, chosen.until or at
        since_text = None
    else:
        try:
            since = period_of(since_text, at)
        except ValueError as exc:
            problem = str(exc)
            since_text, since = None, at - timedelta(days=7)
        until = at
    assert since is not None
    signature = request.query_params.get("signature", "").strip() or None
    with engine(request).connect() as conn:
        figures = activity(
            conn, ruleset=rules_view(request).ruleset, since=since, until=until, signature=signature, now=at
        )
        known = known_signatures(conn)
    form = {
        "since": since_text or ("" if chosen.start else "7d"),
        "from": request.query_params.get("from", ""),
        "to": request.query_params.get("to", ""),
        "signature": signature or "",
        "signatures": known,
        "problem": problem,
    }
    return figures, form


@router.get("/rules/activity.json", include_in_schema=False)
def activity_json(request: Request, _user: CurrentUser) -> Response:
    figures, form = _figures(request)
    body = figures.as_json()
    if form["problem"]:
        body["problem"] = form["problem"]
    return JSONResponse(body)


@router.get("/rules/activity", response_class=HTMLResponse, include_in_schema=False)
def activity_page(request: Request, _user: CurrentUser) -> Response:
    figures, form = _figures(request)
    files = []
    for file in figures.files.values():
        states = list(file.states.values())
        if not any(s.entered or s.left or s.expired or s.opted_out or s.unmatched for s in states):
            continue
        rows = [
            {"label": s.state, "entered": s.entered, "left": s.left, "expired": s.expired, "opted_out": s.opted_out}
            for s in states
        ]
        files.append(
            {
                "name": file.file,
                "signature": file.signature,
                "states": states,
                "chart": _chart(f"Funnel per state of {file.file}", rows, FUNNEL),
            }
        )
    rules = figures.rules()
    top = sorted(rules, key=lambda r: -r["fired"])[:30]
    fired_chart = (
        _chart(
            "Times fired per rule (the 30 most fired; :line@state)",
            [{"label": f":{r['rule'].rpartition(':')[2]}@{r['state']}", "fired": r["fired"]} for r in top],
            [("fired", "fired", "#7a5af8")],
        )
        if top
        else None
    )
    query = {k: form[k] for k in ("since", "from", "to", "signature") if form[k]}
    return render(
        request,
        "activity.html",
        {
            "figures": figures,
            "rules": rules,
            "files": files,
            "fired_chart": fired_chart,
            "form": form,
            "periods": PERIODS,
            "since": fmt_time(figures.since, seconds=False),
            "until": fmt_time(figures.until, seconds=False),
            "tz_label": DISPLAY_TZ_LABEL,
            "json_link": PREFIX
            + "/rules/activity.json"
            + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else ""),
        },
    )
