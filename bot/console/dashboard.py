"""Traffic at a glance: messages in and out, opt-outs, failures and the unmatched rate, hourly and daily.

The charts are SVG drawn by the Jinja template from numbers computed here: no
JavaScript, no chart library, and every label goes through autoescaping like
the rest of the page. Each chart has its numbers in a table under it, for
reading exact values and for screen readers.

Buckets are computed in SQL (epoch seconds divided by the bucket length), so
the database returns at most 48 or 30 rows per query instead of every
message. Days are China-time calendar days (see ``bot.console.display``);
hours are the same instants in any time zone with whole-hour offsets.
A reply is counted in the bucket it was created in, also when its failure
report came later.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import Connection

from bot.console.display import DISPLAY_OFFSET_SECONDS, DISPLAY_TZ, DISPLAY_TZ_LABEL
from bot.console.queries.dashboard import TRAFFIC, Buckets, opt_outs, top_keywords, traffic
from bot.console.web import PREFIX, ConsoleRouter, CurrentUser, engine, now, render

router = ConsoleRouter(prefix=PREFIX)

HOURS = 48
DAYS = 30
TOP_KEYWORDS = 15

WIDTH, HEIGHT = 900, 230
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 14, 42


@dataclass(frozen=True)
class Window:
    """A run of equal buckets ending with the current one: ``first`` .. ``first + count - 1``, in bucket numbers."""

    name: str
    seconds: int
    offset: int
    count: int
    first: int

    @classmethod
    def ending_at(cls, name: str, at: datetime, seconds: int, offset: int, count: int) -> Window:
        current = (int(at.timestamp()) + offset) // seconds
        return cls(name, seconds, offset, count, current - count + 1)

    @property
    def since(self) -> datetime:
        return datetime.fromtimestamp(self.first * self.seconds - self.offset, UTC)

    def start_of(self, bucket: int) -> datetime:
        return datetime.fromtimestamp(bucket * self.seconds - self.offset, UTC)

    def buckets(self) -> Buckets:
        return Buckets(self.seconds, self.offset, self.since)

    def label(self, bucket: int) -> str:
        moment = self.start_of(bucket).astimezone(DISPLAY_TZ)
        return moment.strftime("%m-%d %H:00") if self.seconds < 86400 else moment.strftime("%m-%d")


def _counts(conn: Connection, window: Window) -> list[dict[str, Any]]:
    """One row per bucket (zeros included): in, out, failed, unmatched, opt-outs and the unmatched rate."""
    by_bucket = traffic(conn, buckets=window.buckets())
    opt_out_by_bucket = opt_outs(conn, buckets=window.buckets())
    result = []
    for number in range(window.first, window.first + window.count):
        counts = by_bucket.get(number, dict.fromkeys(TRAFFIC, 0))
        rate = 100.0 * counts["unmatched"] / counts["inbound"] if counts["inbound"] else None
        result.append(
            {
                "bucket": number,
                "label": window.label(number),
                **counts,
                "opt_outs": opt_out_by_bucket.get(number, 0),
                "unmatched_rate": rate,
            }
        )
    return result


def _nice_ceiling(value: float) -> float:
    """The y-axis top for counts: 4 times 1, 2 or 5 times a power of ten, so the quarter ticks are whole numbers."""
    quarter = max(value, 1) / 4
    power = 10 ** max(len(str(int(quarter))) - 1, 0)
    for step in (1, 2, 5, 10):
        if step * power >= quarter:
            return float(4 * step * power)
    return float(40 * power)  # pragma: no cover - the loop always ends at 10


def _chart(
    title: str, rows: list[dict[str, Any]], series: list[tuple[str, str, str]], *, percent: bool = False
) -> dict[str, Any]:
    """Bar geometry for the template: grouped bars, y ticks, and x labels thinned so they never overlap."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    values = [[row[key] or 0 for key, _, _ in series] for row in rows]
    top = 100.0 if percent else _nice_ceiling(max((v for group in values for v in group), default=0))
    group_w = plot_w / max(len(rows), 1)
    bar_w = group_w * 0.8 / len(series)
    bars = []
    for i, (row, group) in enumerate(zip(rows, values, strict=True)):
        for j, ((key, name, color), value) in enumerate(zip(series, group, strict=True)):
            height = plot_h * value / top
            shown = "—" if row[key] is None else (f"{value:.0f}%" if percent else str(value))
            bars.append(
                {
                    "x": round(LEFT + i * group_w + group_w * 0.1 + j * bar_w, 2),
                    "y": round(TOP + plot_h - height, 2),
                    "w": round(max(bar_w - 1, 1), 2),
                    "h": round(height, 2),
                    "color": color,
                    "title": f"{row['label']}: {name} {shown}",
                }
            )
    every = max(1, -(-len(rows) * 60 // plot_w))  # about 60px per label
    labels: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        if (len(rows) - 1 - i) % every:
            continue
        # Hours read "HH:00", with the date under the first one and under each midnight.
        main, _, hour = row["label"].partition(" ")
        text, sub = (hour, main if not labels or hour == "00:00" else "") if hour else (main, "")
        labels.append({"x": round(LEFT + i * group_w + group_w / 2, 2), "text": text, "sub": sub})
    ticks = []
    for k in range(5):
        value = top * k / 4
        ticks.append(
            {
                "y": round(TOP + plot_h - plot_h * k / 4, 2),
                "text": f"{value:.0f}%" if percent else (f"{value:g}" if value != int(value) else str(int(value))),
            }
        )
    return {
        "title": title,
        "width": WIDTH,
        "height": HEIGHT,
        "left": LEFT,
        "right": WIDTH - RIGHT,
        "top": TOP,
        "bottom": TOP + plot_h,
        "bars": bars,
        "labels": labels,
        "ticks": ticks,
        "series": [{"name": name, "color": color} for _, name, color in series],
    }


def _totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    totals: dict[str, Any] = {
        k: sum(row[k] for row in rows) for k in ("inbound", "outbound", "failed", "unmatched", "opt_outs")
    }
    totals["unmatched_rate"] = 100.0 * totals["unmatched"] / totals["inbound"] if totals["inbound"] else None
    return totals


def _charts(rows: list[dict[str, Any]], unit: str) -> list[dict[str, Any]]:
    return [
        _chart(f"Messages per {unit}", rows, [("inbound", "in", "#2457c5"), ("outbound", "out", "#12b76a")]),
        _chart(
            f"Opt-outs and failed replies per {unit}",
            rows,
            [("opt_outs", "opt-outs", "#f79009"), ("failed", "failed", "#d92d20")],
        ),
        _chart(
            f"Unmatched rate per {unit} (share of inbound hitting otherwise)",
            rows,
            [("unmatched_rate", "unmatched", "#7a5af8")],
            percent=True,
        ),
    ]


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
def dashboard(request: Request, _user: CurrentUser) -> Response:
    at = now(request)
    hourly = Window.ending_at("hour", at, 3600, 0, HOURS)
    daily = Window.ending_at("day", at, 86400, DISPLAY_OFFSET_SECONDS, DAYS)
    with engine(request).connect() as conn:
        hours = _counts(conn, hourly)
        days = _counts(conn, daily)
        keywords = top_keywords(conn, since=daily.since, limit=TOP_KEYWORDS)
    views = [
        {
            "id": "hourly",
            "heading": f"Last {HOURS} hours",
            "unit": "hour",
            "rows": hours,
            "totals": _totals(hours),
            "charts": _charts(hours, "hour"),
        },
        {
            "id": "daily",
            "heading": f"Last {DAYS} days",
            "unit": "day",
            "rows": days,
            "totals": _totals(days),
            "charts": _charts(days, "day"),
        },
    ]
    return render(
        request,
        "dashboard.html",
        {"views": views, "keywords": keywords, "tz_label": DISPLAY_TZ_LABEL, "days": DAYS},
    )
