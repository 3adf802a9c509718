"""``GET /metrics``: what an operator's Prometheus needs to alert on, in its text format.

Two kinds of numbers, kept apart on purpose:

- Events the HTTP process sees (callbacks by result, their latency, rule
  loads) are counters in that process. In ``writer: process`` mode that is
  still right: every callback passes through the HTTP process, and the writer
  process reports every rules (re)load to it over the pipe.
- State that lives in the database (replies by status, outbox depth and the
  age of its oldest row, Tencent's account-wide caps, the events queue by
  endpoint, webhook calls by status) is read at scrape time, so it is true whichever
  process, worker or restart changed it, and costs nothing between scrapes.
  Those queries are bounded: replies are counted for the last
  ``REPLY_WINDOW`` only, a range on ``ix_messages_created_at``, because a
  count over all time grows with the table and a scrape must stay cheap.
  The caps are a handful of rows (one per code and country ever met); pending
  and failed events, and pending webhook calls, are each a partial index's
  rows; finished webhook calls are counted for ``REPLY_WINDOW`` too.

Every app has its own ``CollectorRegistry``: the global one would make two
apps in one process (the tests, an embedding) report each other's numbers.

Access: with ``metrics_token`` set, a bearer token; without one, loopback
clients only, so a server bound to a public address does not publish its
traffic by default.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from fastapi import Request, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine

from bot.config import Settings
from bot.runtime.pipeline import Pipeline
from bot.store.queries import (
    REPLY_STATUSES,
    WEBHOOK_STATUSES,
    AccountCap,
    account_caps,
    events_by_endpoint,
    limit_statement_time,
    outbox_backlog,
    replies_by_status,
    unsettled_ambiguous,
    webhook_calls_by_status,
)
from bot.tencent.errors import EXACT, PER_COUNTRY_LIMITS, Outcome

log = logging.getLogger("smsbot.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
REPLY_WINDOW = timedelta(hours=24)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1"})
STATUS_RESULTS = {200: "ok", 400: "bad_request", 401: "unauthorized", 413: "too_large", 503: "unavailable"}
"""A callback's HTTP status -> its ``result`` label (anything else: ``error``)."""
DUPLICATE = "duplicate"
"""Set as ``request.state.metrics_result`` by a route whose request stored nothing new."""

RulesStatus = dict[str, Any]

EVERY_NUMBER_CAPS = tuple(
    sorted(
        code for code, kind in EXACT.items() if kind.outcome is Outcome.ACCOUNT_LIMIT and code not in PER_COUNTRY_LIMITS
    )
)
"""Caps on every number (``nationcode=""``), reported at 0 before Tencent ever reports one.

Prometheus' advice is to export 0 for series known in advance, so an alert
or a graph has a series to read before the first cap; a per-country cap
cannot be known in advance and appears once met.
"""


class _Scrape(NamedTuple):
    """What one scrape read from the database."""

    replies: dict[str, int]
    depth: int
    oldest: float
    caps: list[AccountCap]
    now: datetime
    ambiguous: int = 0
    events_pending: dict[str, int] | None = None
    events_failed: dict[str, int] | None = None
    webhook_calls: dict[str, int] | None = None


def _is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


class _DatabaseCollector(Collector):
    """Gauges read from the database at each scrape: one grouped query per table, bounded."""

    def __init__(self, engine: Engine, clock: Callable[[], datetime], endpoints: tuple[str, ...] = ()) -> None:
        self.engine = engine
        self.clock = clock
        self.endpoints = endpoints
        """config.yaml's event endpoints: reported at 0 before they have events (rule files' once they do)."""

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("smsbot_database_up", "1 if the last scrape could read the database")
        try:
            read = self._read()
        except Exception as exc:  # a scrape must answer even when the database does not
            log.warning("metrics: database not readable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        by_status = GaugeMetricFamily(
            "smsbot_replies",
            f"replies created in the last {int(REPLY_WINDOW.total_seconds())}s, by current status",
            labels=["status"],
        )
        for status in sorted(REPLY_STATUSES | read.replies.keys()):  # known ones at 0 too: alerts need the series
            by_status.add_metric([status], read.replies.get(status, 0))
        yield by_status
        yield GaugeMetricFamily("smsbot_outbox_depth", "replies waiting in the outbox", value=read.depth)
        yield GaugeMetricFamily(
            "smsbot_outbox_oldest_age_seconds",
            "age of the oldest reply in the outbox (0 when empty)",
            value=read.oldest,
        )
        yield GaugeMetricFamily(
            "smsbot_replies_ambiguous_unsettled",
            "replies that may have gone out and that neither a delivery report nor the check with Tencent has "
            "settled, however old: each waits for ops",
            value=read.ambiguous,
        )
        yield from _cap_metrics(read.caps, read.now)
        yield from self._edge_metrics(read)

    def _edge_metrics(self, read: _Scrape) -> Iterator[Metric]:
        """The events queue by endpoint and the rules' webhook calls by status."""
        pending, failed = read.events_pending or {}, read.events_failed or {}
        names = sorted(set(self.endpoints) | pending.keys() | failed.keys())
        waiting = GaugeMetricFamily(
            "smsbot_events_pending",
            "events waiting to be delivered (retries included), by endpoint",
            labels=["endpoint"],
        )
        given_up = GaugeMetricFamily(
            "smsbot_events_failed",
            "events given up on after 24 hours of retries, by endpoint, until sent again from the console",
            labels=["endpoint"],
        )
        for name in names:
            waiting.add_metric([name], pending.get(name, 0))
            given_up.add_metric([name], failed.get(name, 0))
        yield waiting
        yield given_up
        calls = read.webhook_calls or {}
        by_status = GaugeMetricFamily(
            "smsbot_webhook_calls",
            f"rules' webhook calls: pending now, and the others created in the last {int(REPLY_WINDOW.total_seconds())}s"
            ", by status",
            labels=["status"],
        )
        for status in sorted(set(WEBHOOK_STATUSES) | calls.keys()):
            by_status.add_metric([status], calls.get(status, 0))
        yield by_status

    def _read(self) -> _Scrape:
        now = self.clock()
        with self.engine.connect() as conn:
            limit_statement_time(conn, milliseconds=5000)
            replies = replies_by_status(conn, since=now - REPLY_WINDOW)
            depth, oldest_at = outbox_backlog(conn)
            caps = account_caps(conn)
            ambiguous = unsettled_ambiguous(conn)
            events_pending, events_failed = events_by_endpoint(conn)
            calls = webhook_calls_by_status(conn, since=now - REPLY_WINDOW)
        oldest = 0.0 if oldest_at is None else max(0.0, (now - oldest_at).total_seconds())
        return _Scrape(replies, depth, oldest, caps, now, ambiguous, events_pending, events_failed, calls)


def _cap_metrics(caps: list[AccountCap], now: datetime) -> Iterator[Metric]:
    """``smsbot_tencent_account_limited`` (1 while a cap holds every reply it covers) and when each ends.

    One series per (code, nationcode): the every-number codes always (0 until
    met), a per-country cap once met; a cap that ended stays at 0, since its
    row stays. ``..._until_timestamp_seconds`` is the end of each cap met
    (Unix time; in the past once it ended), for an alert to say when.
    """
    limited = GaugeMetricFamily(
        "smsbot_tencent_account_limited",
        "1 while a Tencent account-wide daily cap holds every reply it covers (nationcode empty: every number)",
        labels=["code", "nationcode"],
    )
    until = GaugeMetricFamily(
        "smsbot_tencent_account_limited_until_timestamp_seconds",
        "when a Tencent account-wide daily cap ends and replies go out again (Unix time)",
        labels=["code", "nationcode"],
    )
    seen: dict[tuple[str, str], AccountCap | None] = {(code, ""): None for code in EVERY_NUMBER_CAPS}
    seen.update(((cap.code, cap.nationcode), cap) for cap in caps)
    for (code, nationcode), cap in sorted(seen.items()):
        limited.add_metric([code, nationcode], 1 if cap is not None and cap.active(now) else 0)
        if cap is not None:
            until.add_metric([code, nationcode], cap.until.timestamp())
    yield limited
    yield until


class _RulesCollector(Collector):
    """The rules version now live, as an info metric, and whether the last reload failed."""

    def __init__(self, status: Callable[[], RulesStatus]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        status = self.status()
        info = InfoMetricFamily("smsbot_rules", "the rules now live (version: a hash of the files)")
        info.add_metric([], {"version": str(status.get("version") or "")})
        yield info
        yield GaugeMetricFamily(
            "smsbot_rules_last_reload_failed",
            "1 while the last reload failed (the previous rules stay live)",
            value=1 if status.get("last_reload_error") else 0,
        )


class AppMetrics:
    """One app's metrics: its registry, the counters the routes move, and the /metrics endpoint."""

    def __init__(
        self,
        settings: Settings,
        *,
        engine: Engine,
        clock: Callable[[], datetime],
        rules_status: Callable[[], RulesStatus],
    ) -> None:
        self.registry = CollectorRegistry()
        self.token = settings.metrics_token.get_secret_value().encode() if settings.metrics_token else None
        self.loopback_hosts: set[str] = set(LOOPBACK_HOSTS)
        """Extra client hosts taken as local; tests add TestClient's ``"testclient"`` here."""
        self.callbacks = Counter(
            "smsbot_callbacks",
            "Tencent callbacks received, by route and result",
            ["route", "result"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "smsbot_callback_duration_seconds",
            "time to answer a Tencent callback (body read to answer, storage included)",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rule_loads = Counter(
            "smsbot_rules_reloads",
            "rule (re)loads by result; the load at start (and at each writer process start) included",
            ["result"],
            registry=self.registry,
        )
        for result in ("success", "failure"):
            self.rule_loads.labels(result)
        self._children: dict[tuple[str, str], Any] = {}
        self.database = _DatabaseCollector(engine, clock, tuple(sorted(settings.events)))
        self.registry.register(self.database)
        self.registry.register(_RulesCollector(rules_status))

    # ---------------------------------------------------------------- events

    def rules_loaded(self, status: RulesStatus) -> None:
        """Count one rules load attempt from its status (``last_reload_error`` set: it failed)."""
        self.rule_loads.labels("failure" if status.get("last_reload_error") else "success").inc()

    def callback(self, route: str, result: str, seconds: float) -> None:
        key = (route, result)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = (self.callbacks.labels(route, result), self.latency.labels(route))
        counter, histogram = child
        counter.inc()
        histogram.observe(seconds)

    def observe(self, route: str) -> Callable[[Callable[[Request], Awaitable[Response]]], Callable[..., Any]]:
        """Decorate a callback route: count it by result and time it (a route sets ``DUPLICATE`` itself)."""

        def decorate(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[..., Any]:
            @functools.wraps(endpoint)
            async def timed(request: Request) -> Response:
                started = time.perf_counter()
                try:
                    response = await endpoint(request)
                except BaseException:
                    self.callback(route, "error", time.perf_counter() - started)
                    raise
                result = STATUS_RESULTS.get(response.status_code, "error")
                if result == "ok" and getattr(request.state, "metrics_result", None) == DUPLICATE:
                    result = DUPLICATE
                self.callback(route, result, time.perf_counter() - started)
                return response

            return timed

        return decorate

    # ---------------------------------------------------------------- the endpoint

    def allowed(self, request: Request) -> int | None:
        """None when this request may read the metrics, else the HTTP status refusing it."""
        if self.token is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token):
                return 401
            return None
        host = request.client.host if request.client else ""
        if host in self.loopback_hosts or _is_loopback(host):
            return None
        return 403

    async def endpoint(self, request: Request) -> Response:
        refused = self.allowed(request)
        if refused == 401:
            return Response(
                "missing or wrong bearer token\n",
                status_code=401,
                media_type="text/plain",
                headers={"WWW-Authenticate": 'Bearer realm="smsbot metrics"'},
            )
        if refused is not None:
            return Response(
                "metrics are served to loopback clients only; set SMSBOT_METRICS_TOKEN to read them remotely\n",
                status_code=refused,
                media_type="text/plain",
            )
        body = await asyncio.to_thread(generate_latest, self.registry)
        return Response(body, media_type=CONTENT_TYPE)


def build_metrics(
    settings: Settings,
    *,
    engine: Engine,
    clock: Callable[[], datetime],
    pipeline: Pipeline,
) -> AppMetrics:
    """The metrics of one app, wired to wherever its rules live (this process, or the writer process)."""
    metrics = AppMetrics(settings, engine=engine, clock=clock, rules_status=pipeline.rules_status)
    pipeline.on_rules_loaded(metrics.rules_loaded)
    return metrics
