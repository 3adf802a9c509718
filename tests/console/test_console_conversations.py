"""The console's reading pages: conversations (list and thread), unmatched messages and the dashboard.

Data goes in the way production data does (customer messages through
``Harness.say``, delivery reports through ``/sms/status``), except where a
test needs many rows or exact times, which it inserts through the models.
Every assertion is on the HTML a person would see. Runs on SQLite and
PostgreSQL (``db_url``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from html import unescape
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, insert

from bot.console.users import add_user
from bot.store.db import WRITE_OPTIONS, upgrade
from bot.store.models import contacts, conversations, messages
from tests.support import PG_URL, FakeClock, Harness, delivery_report, postgres_schema_url, reset_postgres_schema

PASSWORD = "correct horse battery"
HOSTILE = "<script>alert(1)</script>{{ 7*7 }}{% raw %}"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;{{ 7*7 }}{% raw %}"
HOSTILE_NORMALISED = "script>alert(1)</script>{{ 7*7 }}{% raw"
PG_SCHEMA = "smsbot_test_console_conversations"
CHINA = timezone(timedelta(hours=8))

A, B, C, D, E = "13800001111", "13900002222", "13700003333", "13600004444", "13500005555"


@pytest.fixture
def db_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A migrated database; on PostgreSQL a schema of this module's own.

    The shared ``db_url`` resets PostgreSQL's ``public`` schema, which other
    test runs on the same server reset too; these tests build a lot of data
    through the running app and are better off out of that crossfire.
    """
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'smsbot.db'}"
        upgrade(url)
        yield url
        return
    assert PG_URL is not None
    reset_postgres_schema(PG_URL, PG_SCHEMA)
    url = postgres_schema_url(PG_URL, PG_SCHEMA)
    upgrade(url)
    yield url
    reset_postgres_schema(PG_URL, PG_SCHEMA, create=False)


@pytest.fixture
def clock() -> FakeClock:
    """A fixed start (10:00 China time), so a few minutes of traffic never straddle an hour or a day."""
    return FakeClock(datetime(2026, 3, 10, 2, 0, tzinfo=UTC))


@pytest.fixture(autouse=True)
def _cwd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No config.yaml from the repository."""
    monkeypatch.chdir(tmp_path)


def make_user(engine: Engine, name: str, role: str) -> None:
    with engine.connect().execution_options(**WRITE_OPTIONS) as conn, conn.begin():
        add_user(conn, name, role, PASSWORD, now=datetime.now(UTC), actor="test")


def login(client: TestClient, name: str) -> None:
    form = client.get("/console/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert token is not None
    answer = client.post(
        "/console/login",
        data={"name": name, "password": PASSWORD, "csrf_token": token.group(1)},
        follow_redirects=False,
    )
    assert answer.status_code == 303, answer.text


def page(client: TestClient, url: str, status: int = 200) -> httpx.Response:
    answer: httpx.Response = client.get(url, follow_redirects=False)
    assert answer.status_code == status, answer.text[:2000]
    return answer


def total(answer: httpx.Response) -> int:
    found = re.search(r'class="total" data-total="(\d+)"', answer.text)
    assert found, answer.text[:2000]
    return int(found.group(1))


def listed_numbers(answer: httpx.Response) -> list[str]:
    return [unescape(n) for n in re.findall(r'<td class="number">([^<]*)</td>', answer.text)]


def thread_ids(answer: httpx.Response) -> list[int]:
    return [int(i) for i in re.findall(r'href="/console/conversations/(\d+)', answer.text)]


def assert_inert(answer: httpx.Response) -> None:
    """Hostile customer text is shown, escaped: no tag of it reaches the browser, no template ran on it."""
    assert "<script" not in answer.text
    assert "alert(1)</script>" not in answer.text


@dataclass
class World:
    h: Harness
    old_day: str
    today: str
    ids: dict[str, int]


@pytest.fixture
def world(harness: Harness) -> World:
    """Five customers, as the rules and Tencent leave them.

    E wrote five days ago; A went through the menu (its status reply then
    failed to deliver); B sent hostile text and an unmatched ``price``; C opted
    out; D wrote hostile text to a signature with fallback rules only.
    """
    h = harness
    make_user(h.engine, "vera", "viewer")
    make_user(h.engine, "adam", "admin")
    old_day = h.clock().astimezone(CHINA).date().isoformat()
    h.say("hi", mobile=E)
    h.clock.advance(timedelta(days=5))
    h.say("hi", mobile=A)
    h.say("1", mobile=A)
    h.say("Price?", mobile=A)
    h.clock.advance(timedelta(minutes=1))
    h.say(HOSTILE, mobile=B)
    h.say("price", mobile=B)
    h.clock.advance(timedelta(minutes=1))
    h.say("TD", mobile=C)
    h.clock.advance(timedelta(minutes=1))
    h.say(HOSTILE, mobile=D, sign="Other Brand")
    outbound = h.wait_settled()
    status_reply = next(m for m in outbound if m["text"] == "Order none: sent.")
    answer = h.client.post("/sms/status", json=[delivery_report(status_reply["provider_serial"], "FAIL", mobile=A)])
    assert answer.status_code == 200, answer.text
    ids = {}
    for row in h.rows(conversations):
        mobile = next(c["mobile"] for c in h.rows(contacts, contacts.c.id == row["contact_id"]))
        ids[mobile] = row["id"]
    return World(h, old_day, h.clock().astimezone(CHINA).date().isoformat(), ids)


PAGES = ["/console/conversations", "/console/unmatched", "/console/dashboard"]


# ---------------------------------------------------------------- access


@pytest.mark.parametrize("role", ["viewer", "admin"])
def test_every_page_renders_for_viewers_and_admins(world: World, role: str) -> None:
    client = world.h.client
    login(client, "vera" if role == "viewer" else "adam")
    for url in [*PAGES, f"/console/conversations/{world.ids[A]}"]:
        answer = page(client, url)
        assert "<h1>" in answer.text
        assert_inert(answer)
    assert page(client, "/console/", 303).headers["location"] == "/console/conversations"


def test_anonymous_is_sent_to_the_login_page(world: World) -> None:
    for url in [*PAGES, f"/console/conversations/{world.ids[A]}", "/console/conversations/99999"]:
        answer = page(world.h.client, url, 303)
        assert answer.headers["location"] == "/console/login"


# ---------------------------------------------------------------- the list


def test_list_is_newest_first_with_counts(world: World) -> None:
    login(world.h.client, "vera")
    answer = page(world.h.client, "/console/conversations")
    assert total(answer) == 5
    assert thread_ids(answer) == [world.ids[m] for m in (D, C, B, A, E)]


FILTERS = [
    ("signature=Other+Brand", [D]),
    ("signature=Acme+Shop", [C, B, A, E]),
    ("number=1111", [A]),
    ("number=13800001111", [A]),
    ("number=%2B86+138+0000+1111", [A]),
    ("number=8613800001111", [A]),
    ("number=0000", []),
    ("state=menu", [A, E]),  # E's menu expired, but nothing has moved it since
    ("opted_out=yes", [C]),
    ("opted_out=no", [D, B, A, E]),
    ("q=ALERT(1)", [D, B]),
    ("q=price", [B, A]),
    ("q=%25+raw", [D, B]),  # % is a literal, not a wildcard
    ("q=_", []),
    ("q=no+more+messages", [C]),
    ("signature=Acme+Shop&q=alert", [B]),
]
"""(query string, the numbers whose conversations it finds, newest first)."""


def test_list_filters(world: World) -> None:
    """One world for every filter: building it through the app is the slow part."""
    login(world.h.client, "vera")
    for query, expected in FILTERS:
        answer = page(world.h.client, "/console/conversations?" + query)
        assert (query, total(answer)) == (query, len(expected))
        assert (query, thread_ids(answer)) == (query, [world.ids[m] for m in expected])
    for query, problem in [
        ("opted_out=maybe", "'opted_out' must be yes or no"),
        ("number=138-abc", "'number' must be digits"),
        ("from=2026-03-20&to=2026-03-01", "'to' is before 'from'"),
        ("before=garbage&after=1_x", None),
    ]:
        answer = page(world.h.client, "/console/conversations?" + query)
        assert total(answer) == 5  # the bad filter is reported and ignored
        if problem:
            assert problem in unescape(answer.text)


def test_list_date_range_is_china_days_of_last_activity(world: World) -> None:
    login(world.h.client, "vera")
    client = world.h.client
    answer = page(client, f"/console/conversations?from={world.old_day}&to={world.old_day}")
    assert (total(answer), thread_ids(answer)) == (1, [world.ids[E]])
    answer = page(client, f"/console/conversations?from={world.today}")
    assert total(answer) == 4
    assert world.ids[E] not in thread_ids(answer)
    answer = page(client, f"/console/conversations?to={world.old_day}&number=1111")
    assert total(answer) == 0
    answer = page(client, "/console/conversations?from=yesterday")
    assert "must be a date" in answer.text
    assert total(answer) == 5


def test_numbers_masked_for_viewers_revealed_for_admins_who_ask(world: World) -> None:
    client = world.h.client
    login(client, "vera")
    for url in ("/console/conversations", "/console/conversations?reveal=1"):
        answer = page(client, url)
        assert "+86 138****1111" in listed_numbers(answer)
        assert A not in answer.text
        assert "Reveal numbers" not in answer.text
    thread = page(client, f"/console/conversations/{world.ids[A]}?reveal=1")
    assert "138****1111" in thread.text
    assert A not in thread.text

    login(client, "adam")
    answer = page(client, "/console/conversations")
    assert "+86 138****1111" in listed_numbers(answer)
    assert A not in answer.text
    assert "Reveal numbers" in answer.text
    answer = page(client, "/console/conversations?reveal=1&signature=Acme+Shop")
    assert "+86 13800001111" in listed_numbers(answer)
    assert "reveal=1" in answer.text  # the thread links keep it
    thread = page(client, f"/console/conversations/{world.ids[A]}?reveal=1")
    assert A in thread.text
    assert A not in page(client, f"/console/conversations/{world.ids[A]}").text


def test_pagination_keeps_filters_and_walks_every_row_once(harness: Harness) -> None:
    h = harness
    make_user(h.engine, "vera", "viewer")
    start = h.clock()
    with h.engine.connect().execution_options(**WRITE_OPTIONS) as conn, conn.begin():
        for i in range(130):
            key = conn.execute(
                insert(contacts).values(nationcode="86", mobile=f"1380000{i:04d}", created_at=start)
            ).inserted_primary_key
            assert key is not None
            contact = key[0]
            # Pairs share a time, so the keyset's tie-break on id is exercised.
            at = start - timedelta(minutes=i // 2)
            conn.execute(
                insert(conversations).values(
                    signature="Even" if i % 2 == 0 else "Odd",
                    contact_id=contact,
                    state="idle",
                    variables={},
                    opted_out=False,
                    created_at=at,
                    updated_at=at,
                )
            )
    login(h.client, "vera")
    seen: list[int] = []
    url: str | None = "/console/conversations"
    pages = 0
    while url:
        answer = page(h.client, url)
        assert total(answer) == 130
        ids = thread_ids(answer)
        assert len(ids) == (50 if pages < 2 else 30)
        seen += ids
        pages += 1
        older = re.search(r'<a href="([^"]+)" rel="next"', answer.text)
        url = unescape(older.group(1)) if older else None
        if pages == 2:
            newer = re.search(r'<a href="([^"]+)" rel="prev"', answer.text)
            assert newer
            assert thread_ids(page(h.client, unescape(newer.group(1)))) == seen[:50]
    assert pages == 3
    assert len(set(seen)) == 130
    with h.engine.connect() as conn:
        rows = conn.execute(
            conversations.select().order_by(conversations.c.updated_at.desc(), conversations.c.id.desc())
        ).all()
    assert seen == [row.id for row in rows]

    first = page(h.client, "/console/conversations?signature=Odd")
    assert total(first) == 65
    older = re.search(r'<a href="([^"]+)" rel="next"', first.text)
    assert older
    assert "signature=Odd" in older.group(1)
    second = page(h.client, unescape(older.group(1)))
    assert len(thread_ids(second)) == 15
    assert 'rel="next"' not in second.text


# ---------------------------------------------------------------- the thread


def test_thread_shows_why_the_bot_said_what_it_said(world: World) -> None:
    login(world.h.client, "vera")
    answer = page(world.h.client, f"/console/conversations/{world.ids[A]}")
    text = answer.text
    assert "Acme Shop" in text
    said = (
        '<div class="bubble">hi</div>',
        "Reply 1 for order status",
        '<div class="bubble">1</div>',
        "Order none: sent.",
    )
    order = [text.index(s) for s in (*said, "Price?")]
    assert order == sorted(order)
    assert "acme-shop.yaml:38" in text  # the rule that fired
    assert "acme-shop.yaml:44" in text
    assert re.search(r"<code>—</code> → <code>menu</code>", text)  # state before → after
    assert re.search(r"<code>menu</code> → <code>menu</code>", text)
    assert '<code class="template-id">1490001</code>' in text
    assert '<code class="template-id">1490002</code>' in text
    assert "2 segments" in text
    assert '<span class="status status-failed">failed</span>' in text
    assert '<code class="error-code">MK:0001</code>' in text
    assert "空号" in text
    assert '<span class="status status-sent">sent</span>' in text
    assert "<strong>unmatched</strong>" in text
    assert "China time" in text


def test_thread_shows_opt_out_events_in_time_order(world: World) -> None:
    login(world.h.client, "vera")
    text = page(world.h.client, f"/console/conversations/{world.ids[C]}").text
    said, event, reply = (
        text.index('<div class="bubble">TD</div>'),
        text.index("<strong>Opted out</strong>"),
        text.index("You will get no more messages from us."),
    )
    assert said < event < reply
    assert "by keyword" in text
    assert "acme-shop.yaml:27" in text
    assert "yes, since" in text


def test_unknown_thread_is_a_404_page(world: World) -> None:
    login(world.h.client, "vera")
    for ident in ["99999", "abc", "-1", "1" * 30, "%3Cscript%3E"]:
        answer = page(world.h.client, f"/console/conversations/{ident}", 404)
        assert "Not found" in answer.text
        assert_inert(answer)


# ---------------------------------------------------------------- unmatched


def insert_inbound(world: World, mobile: str, text: str, *, rule: str, unmatched: bool, age: timedelta) -> None:
    """An inbound message from the past (the app's clock cannot send customers back in time)."""
    h = world.h
    conversation = world.ids[mobile]
    contact = h.rows(conversations, conversations.c.id == conversation)[0]["contact_id"]
    with h.engine.connect().execution_options(**WRITE_OPTIONS) as conn, conn.begin():
        conn.execute(
            insert(messages).values(
                direction="in",
                conversation_id=conversation,
                contact_id=contact,
                signature="Acme Shop",
                text=text,
                normalized_text=text,
                rule=rule,
                rule_kind="otherwise" if unmatched else "on",
                unmatched=unmatched,
                status="received",
                created_at=h.clock() - age,
                updated_at=h.clock() - age,
            )
        )


def unmatched_groups(answer: httpx.Response) -> list[tuple[str, int]]:
    found = re.findall(r'<td class="text"><code>([^<]*)</code></td>\s*<td class="num count">(\d+)</td>', answer.text)
    return [(unescape(text), int(n)) for text, n in found]


def test_unmatched_groups_by_normalised_text_most_frequent_first(world: World) -> None:
    login(world.h.client, "vera")
    answer = page(world.h.client, "/console/unmatched")
    groups = unmatched_groups(answer)
    assert groups == [("price", 2), (HOSTILE_NORMALISED, 2)]  # a tie: alphabetical
    assert 'data-messages="4"' in answer.text
    assert_inert(answer)
    assert "script&gt;alert(1)&lt;/script&gt;{{ 7*7 }}{% raw" in answer.text
    assert ESCAPED in answer.text  # the example as typed

    only_acme = unmatched_groups(page(world.h.client, "/console/unmatched?signature=Acme+Shop"))
    assert only_acme == [("price", 2), (HOSTILE_NORMALISED, 1)]
    assert unmatched_groups(page(world.h.client, f"/console/unmatched?to={world.old_day}")) == []
    assert unmatched_groups(page(world.h.client, f"/console/unmatched?from={world.today}&signature=Other+Brand")) == [
        (HOSTILE_NORMALISED, 1)
    ]


def test_unmatched_covers_the_last_30_days_unless_told_otherwise(world: World) -> None:
    insert_inbound(world, A, "price", rule="acme-shop.yaml:63", unmatched=True, age=timedelta(days=40))
    login(world.h.client, "vera")
    recent = page(world.h.client, "/console/unmatched")
    assert unmatched_groups(recent)[0] == ("price", 2)
    assert "Showing the last 30 days" in recent.text
    everything = page(world.h.client, "/console/unmatched?from=&to=&signature=")
    assert unmatched_groups(everything)[0] == ("price", 3)
    assert "Showing the last 30 days" not in everything.text


# ---------------------------------------------------------------- dashboard


def dashboard_totals(answer: httpx.Response, view: str) -> dict[str, str]:
    section = answer.text.split(f'<section class="view" id="{view}">', 1)[1].split("</section>", 1)[0]
    return dict(re.findall(r'data-total="(\w+)">([^<]*)<', section))


def test_dashboard_numbers_match_the_data(world: World) -> None:
    h = world.h
    insert_inbound(world, A, HOSTILE, rule="acme-shop.yaml:99", unmatched=False, age=timedelta(days=10))
    login(h.client, "vera")
    answer = page(h.client, "/console/dashboard")
    # Last 48 hours: A (hi, 1, Price?), B (hostile, price), C (TD), D (hostile) = 7 in; E was 5 days ago.
    # Out: replies to everything but D's (fallback rules have no otherwise) = 6, of which 1 failed.
    assert dashboard_totals(answer, "hourly") == {
        "inbound": "7",
        "outbound": "6",
        "opt_outs": "1",
        "failed": "1",
        "unmatched": "57%",  # Price?, hostile, price, D's hostile: 4 of 7
    }
    assert dashboard_totals(answer, "daily") == {
        "inbound": "9",
        "outbound": "7",
        "opt_outs": "1",
        "failed": "1",
        "unmatched": "44%",
    }
    assert "<svg" in answer.text
    assert re.search(r"<title>\d\d-\d\d \d\d:00: in 7</title>", answer.text)  # one hour holds all 7
    keywords = re.findall(r'<td class="text"><code>([^<]*)</code></td><td class="num count">(\d+)</td>', answer.text)
    assert ("hi", "2") in keywords
    assert ("td", "1") in keywords
    assert ("price", "2") not in keywords  # unmatched texts are not keywords
    assert_inert(answer)
    assert ESCAPED in answer.text


def test_dashboard_when_nothing_happened(harness: Harness) -> None:
    make_user(harness.engine, "vera", "viewer")
    login(harness.client, "vera")
    answer = page(harness.client, "/console/dashboard")
    assert dashboard_totals(answer, "daily")["inbound"] == "0"
    assert dashboard_totals(answer, "daily")["unmatched"] == "—"
    assert "No matched messages yet." in answer.text


# ---------------------------------------------------------------- hostile text everywhere


def test_hostile_text_is_escaped_everywhere_it_is_shown(world: World) -> None:
    client = world.h.client
    login(client, "adam")
    listing = page(client, "/console/conversations?reveal=1&q=" + "%3Cscript%3E")
    assert total(listing) == 2
    assert ESCAPED in listing.text  # D's last message is the hostile one; the search box echoes the query
    assert 'value="&lt;script&gt;"' in listing.text
    for mobile in (B, D):
        thread = page(client, f"/console/conversations/{world.ids[mobile]}")
        assert ESCAPED in thread.text
        assert_inert(thread)
    assert_inert(listing)
