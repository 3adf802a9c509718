"""The console's ops pages: opt-outs, deliveries, rules, simulator and the export download.

Everything goes through the test client as a browser would (login, CSRF
field from the page, post/redirect/get) and is checked in the page text and
in the database rows the change leaves. Runs on SQLite and PostgreSQL
(``db_url``); one test runs the real ``smsbot serve`` in ``writer: process``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, time, timedelta
from html import unescape
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, insert, update

from bot.console.users import add_user
from bot.delivery.outbox import AMBIGUOUS_REASON, PROVIDER_BLACKLIST_REASON
from bot.numbers import CHINA, next_china_time
from bot.runtime.live_rules import RulesInvalid
from bot.sms import OutboundSms, SendResult
from bot.store.models import (
    account_limits,
    audit_events,
    contacts,
    conversations,
    messages,
    opt_out_events,
    outbox,
)
from tests.support import (
    MOBILE,
    SIGN,
    Harness,
    RecordingSender,
    count,
    rows,
    serve_process,
    stored_counts,
    wait_until,
    write_rules,
    writing,
)

PASSWORD = "correct horse battery"
HOSTILE = "<script>alert(1)</script>{{ 7*7 }}"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;{{ 7*7 }}"
PAGES = ("/console/opt-outs", "/console/deliveries", "/console/rules", "/console/simulator", "/console/export")
MENU = "Reply 1 for order status, 2 for opening hours. Reply TD to opt out."
FAILING = "13900001111"
OTHER = "13700002222"


# ---------------------------------------------------------------- helpers


class FlakySender(RecordingSender):
    """Fails every send with a permanent Tencent error while ``broken`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = True
        self.refused: list[OutboundSms] = []

    def send(self, sms: OutboundSms) -> SendResult:
        if self.broken:
            self.refused.append(sms)
            return SendResult(
                ok=False, code="FailedOperation.TemplateIncorrectOrUnapproved", message="template not approved"
            )
        return super().send(sms)


def csrf_from(page: httpx.Response) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert found, f"no CSRF field in the page: {page.text[:500]}"
    return found.group(1)


def add_users(engine: Engine, at: datetime) -> None:
    with writing(engine) as conn:
        add_user(conn, "ada", "admin", PASSWORD, now=at, actor="test")
        add_user(conn, "vic", "viewer", PASSWORD, now=at, actor="test")


def login(client: TestClient | httpx.Client, name: str) -> None:
    token = csrf_from(client.get("/console/login"))
    answer = client.post(
        "/console/login", data={"name": name, "password": PASSWORD, "csrf_token": token}, follow_redirects=False
    )
    assert answer.status_code == 303, answer.text


class People:
    """The same app seen by an admin, a viewer and someone not signed in."""

    def __init__(self, h: Harness) -> None:
        add_users(h.engine, h.clock())
        self.admin = h.client
        login(self.admin, "ada")
        self.viewer = TestClient(h.app)
        login(self.viewer, "vic")
        self.anonymous = TestClient(h.app)


def post_form(client: TestClient, page: str, action: str, data: dict[str, str]) -> httpx.Response:
    """Post ``data`` to ``action`` with the CSRF token of ``page`` (as the browser would after loading it)."""
    token = csrf_from(client.get(page))
    response: httpx.Response = client.post(action, data={**data, "csrf_token": token}, follow_redirects=False)
    return response


def escaped_everywhere(text: str) -> None:
    assert "<script>alert(1)</script>" not in text
    assert ESCAPED in text


@pytest.fixture
def people(harness: Harness) -> People:
    return People(harness)


@pytest.fixture
def flaky(make_app: Callable[..., Harness], db_url: str) -> Harness:
    return make_app(db_url, sender=FlakySender())


# ---------------------------------------------------------------- every page, every role


@pytest.mark.parametrize("path", PAGES)
def test_pages_need_a_login_and_viewers_get_no_forms(harness: Harness, people: People, path: str) -> None:
    refused = people.anonymous.get(path, follow_redirects=False)
    assert refused.status_code == 303
    assert refused.headers["location"] == "/console/login"

    for client in (people.viewer, people.admin):
        page = client.get(path, follow_redirects=False)
        assert page.status_code == 200, page.text
        assert "<h1>" in page.text
    viewer_page = people.viewer.get(path).text
    assert "/opt-outs/add" not in viewer_page
    assert "/opt-outs/remove" not in viewer_page
    assert "/retry" not in viewer_page
    assert "Reveal numbers" not in viewer_page


@pytest.mark.parametrize(
    ("action", "data"),
    [
        ("/console/opt-outs/add", {"number": MOBILE, "signature": SIGN}),
        ("/console/opt-outs/remove", {"conversation_id": "1"}),
        ("/console/deliveries/1/retry", {}),
    ],
)
def test_changes_need_an_admin_and_a_csrf_token(
    harness: Harness, people: People, action: str, data: dict[str, str]
) -> None:
    harness.say("hi")
    harness.wait_settled()
    before = stored_counts(harness.engine), harness.count(audit_events)

    viewer = post_form(people.viewer, "/console/opt-outs", action, data)
    assert viewer.status_code == 403
    assert "only an admin" in viewer.text

    no_token = people.admin.post(action, data=data, follow_redirects=False)
    assert no_token.status_code == 403
    assert "CSRF" in no_token.text
    wrong = people.admin.post(action, data={**data, "csrf_token": "forged"}, follow_redirects=False)
    assert wrong.status_code == 403

    anonymous = people.anonymous.post(action, data=data, follow_redirects=False)
    assert anonymous.status_code in (303, 403)
    assert (stored_counts(harness.engine), harness.count(audit_events)) == before


# ---------------------------------------------------------------- opt-outs


def test_admin_adds_an_opt_out_by_hand_and_the_pipeline_respects_it(harness: Harness, people: People) -> None:
    added = post_form(
        people.admin,
        "/console/opt-outs",
        "/console/opt-outs/add",
        {"number": MOBILE, "signature": SIGN, "nationcode": "86", "reason": "asked by phone"},
    )
    assert added.status_code == 303
    assert added.headers["location"] == "/console/opt-outs?done=added"

    # a number that never wrote to us: contact and conversation are created, opted out
    (contact,) = harness.rows(contacts)
    assert (contact["nationcode"], contact["mobile"]) == ("86", MOBILE)
    (convo,) = harness.rows(conversations)
    assert (convo["signature"], convo["opted_out"], convo["opted_out_at"]) == (SIGN, True, harness.clock())
    (event,) = harness.rows(opt_out_events)
    assert (event["event"], event["source"], event["actor"], event["raw_text"]) == (
        "opt_out",
        "console",
        "ada",
        "asked by phone",
    )
    assert event["created_at"] == harness.clock()
    (entry,) = [r for r in harness.rows(audit_events) if r["action"] == "opt_out.add"]
    assert (entry["actor"], entry["target"], entry["created_at"]) == (
        "ada",
        f"conversation:{convo['id']}",
        harness.clock(),
    )
    assert entry["detail"]["signature"] == SIGN
    assert MOBILE not in json.dumps(entry["detail"])  # masked in the audit trail too

    page = people.viewer.get("/console/opt-outs").text
    assert "+86 138****0000" in page
    assert MOBILE not in page
    assert "console by ada" in page
    assert "asked by phone" in page
    assert MOBILE not in people.viewer.get("/console/opt-outs?reveal=1").text  # viewers cannot reveal
    assert MOBILE in people.admin.get("/console/opt-outs?reveal=1").text

    # the same again changes nothing
    again = post_form(people.admin, "/console/opt-outs", "/console/opt-outs/add", {"number": MOBILE, "signature": SIGN})
    assert again.headers["location"] == "/console/opt-outs?done=already"
    assert harness.count(opt_out_events) == 1

    # the customer writes: no reply at all
    harness.say("hi")
    harness.wait_settled()
    assert harness.sender.sent == []
    assert [r["status"] for r in harness.outbound()] == []


def test_admin_removes_an_opt_out_and_replies_resume(harness: Harness, people: People) -> None:
    harness.say("TD")
    harness.wait_settled()
    assert len(harness.sender.sent) == 1  # the opt-out confirmation
    (convo,) = harness.rows(conversations)
    assert convo["opted_out"]

    page = people.admin.get("/console/opt-outs").text
    assert "keyword" in page
    assert re.search(r"acme-shop\.yaml:\d+", page)
    assert ">TD<" in page

    removed = post_form(
        people.admin, "/console/opt-outs", "/console/opt-outs/remove", {"conversation_id": str(convo["id"])}
    )
    assert removed.status_code == 303
    assert removed.headers["location"] == "/console/opt-outs?done=removed"
    (after,) = harness.rows(conversations)
    assert (after["opted_out"], after["opted_out_at"]) == (False, None)
    events = harness.rows(opt_out_events)
    assert [(e["event"], e["source"], e["actor"]) for e in events] == [
        ("opt_out", "keyword", None),
        ("opt_in", "console", "ada"),
    ]
    assert [(r["actor"], r["action"]) for r in harness.rows(audit_events) if r["action"].startswith("opt_out")] == [
        ("ada", "opt_out.remove")
    ]
    assert "No opted-out numbers" in people.admin.get("/console/opt-outs").text

    again = post_form(
        people.admin, "/console/opt-outs", "/console/opt-outs/remove", {"conversation_id": str(convo["id"])}
    )
    assert again.headers["location"] == "/console/opt-outs?done=not-opted-out"
    assert harness.count(opt_out_events) == 2

    harness.say("hi")
    harness.wait_settled()
    assert harness.sender.sent[-1].text == MENU


def test_opt_outs_are_searched_by_number_and_signature_and_hostile_text_is_inert(
    harness: Harness, people: People
) -> None:
    harness.say("STOP " + HOSTILE)
    harness.say("TD", mobile=OTHER, sign="Other Brand")
    harness.wait_settled()

    everything = people.viewer.get("/console/opt-outs").text
    assert "+86 138****0000" in everything
    assert "+86 137****2222" in everything
    escaped_everywhere(everything)

    by_last_four = people.viewer.get("/console/opt-outs", params={"number": "2222"}).text
    assert "137****2222" in by_last_four
    assert "138****0000" not in by_last_four
    by_full = people.viewer.get("/console/opt-outs", params={"number": "+86 " + MOBILE}).text
    assert "138****0000" in by_full
    assert "137****2222" not in by_full
    by_signature = people.viewer.get("/console/opt-outs", params={"signature": "Other Brand"}).text
    assert "137****2222" in by_signature
    assert "138****0000" not in by_signature
    nothing = people.viewer.get("/console/opt-outs", params={"number": "9999"}).text
    assert "No opted-out numbers match" in nothing


def test_a_hostile_signature_is_inert_in_every_list_and_filter(harness: Harness, people: People) -> None:
    harness.say("TD", sign=HOSTILE)  # a forged callback can carry any signature
    harness.wait_settled()
    with writing(harness.engine) as conn:  # and make its reply a failed one, so the deliveries page lists it
        conn.execute(update(messages).where(messages.c.direction == "out").values(status="failed"))
    for path in ("/console/opt-outs", "/console/deliveries", "/console/export"):
        page = people.admin.get(path)
        assert page.status_code == 200
        escaped_everywhere(page.text)


def test_a_bad_number_is_refused(harness: Harness, people: People) -> None:
    for number in ("138****0000", "12", ""):
        answer = post_form(
            people.admin, "/console/opt-outs", "/console/opt-outs/add", {"number": number, "signature": SIGN}
        )
        assert answer.status_code in (400, 422)
    assert harness.count(conversations) == 0


# ---------------------------------------------------------------- deliveries


def _failed_reply(h: Harness, mobile: str = FAILING) -> int:
    h.say("hi", mobile=mobile)
    h.wait_settled()
    failed = [r for r in h.outbound() if r["status"] == "failed"]
    assert failed, h.outbound()
    return int(failed[-1]["id"])


def test_deliveries_show_failures_and_an_admin_retry_sends_again(flaky: Harness) -> None:
    people = People(flaky)
    message_id = _failed_reply(flaky)

    page = people.viewer.get("/console/deliveries")
    assert page.status_code == 200
    assert "FailedOperation.TemplateIncorrectOrUnapproved" in page.text
    assert "template not approved" in page.text
    assert "139****1111" in page.text
    assert FAILING not in page.text
    assert f"/console/deliveries/{message_id}/retry" not in page.text  # viewers see no retry button
    assert f"/console/deliveries/{message_id}/retry" in people.admin.get("/console/deliveries").text

    filtered = people.viewer.get("/console/deliveries", params={"code": "FailedOperation.Other"}).text
    assert "139****1111" not in filtered
    by_status = people.viewer.get("/console/deliveries", params={"status": "failed", "signature": SIGN}).text
    assert "139****1111" in by_status
    assert "139****1111" not in people.viewer.get("/console/deliveries", params={"status": "ambiguous"}).text

    flaky.sender.broken = False  # type: ignore[attr-defined]
    answer = post_form(people.admin, "/console/deliveries", f"/console/deliveries/{message_id}/retry", {})
    assert answer.status_code == 303
    assert answer.headers["location"] == "/console/deliveries?done=retried"
    entry = next(r for r in flaky.rows(audit_events) if r["action"] == "delivery.retry")
    assert (entry["actor"], entry["target"], entry["created_at"]) == ("ada", f"message:{message_id}", flaky.clock())
    assert entry["detail"]["status"] == "failed"
    assert entry["detail"]["error_code"] == "FailedOperation.TemplateIncorrectOrUnapproved"

    wait_until(
        lambda: flaky.rows(messages, messages.c.id == message_id)[0]["status"] == "sent", what="the retried send"
    )
    assert [s.message_id for s in flaky.sender.sent] == [message_id]
    assert flaky.count(outbox) == 0

    again = post_form(people.admin, "/console/deliveries", f"/console/deliveries/{message_id}/retry", {})
    assert again.status_code == 409
    assert "already sent" in again.text


def test_a_retry_goes_back_to_the_outbox_queued_with_attempts_reset(flaky: Harness) -> None:
    people = People(flaky)
    message_id = _failed_reply(flaky)
    with writing(flaky.engine) as conn:  # an earlier retry had counted attempts: a retry starts afresh
        conn.execute(update(messages).where(messages.c.id == message_id).values(status="error"))
    flaky.sender.broken = False  # type: ignore[attr-defined]
    flaky.sender.gate.clear()  # the send waits here, so the row stays in the outbox while we look
    try:
        answer = post_form(people.admin, "/console/deliveries", f"/console/deliveries/{message_id}/retry", {})
        assert answer.status_code == 303
        (queued,) = flaky.rows(outbox)
        assert (queued["message_id"], queued["attempts"], queued["next_attempt_at"]) == (message_id, 0, flaky.clock())
        assert flaky.rows(messages, messages.c.id == message_id)[0]["status"] == "queued"
        listed = people.viewer.get("/console/deliveries", params={"status": "pending"}).text
        assert "139****1111" in listed
        assert "0 attempt(s)" in listed
        twice = post_form(people.admin, "/console/deliveries", f"/console/deliveries/{message_id}/retry", {})
        assert twice.status_code == 409
        assert "already waiting in the outbox" in twice.text
    finally:
        flaky.sender.gate.set()
    wait_until(lambda: flaky.rows(messages, messages.c.id == message_id)[0]["status"] == "sent", what="the send")


def test_retries_are_refused_for_opted_out_numbers_and_unconfirmed_ambiguous_sends(flaky: Harness) -> None:
    people = People(flaky)
    opted = _failed_reply(flaky)
    ambiguous = _failed_reply(flaky, mobile=OTHER)
    with writing(flaky.engine) as conn:
        conn.execute(update(messages).where(messages.c.id == ambiguous).values(status="ambiguous", error_code=None))
    flaky.sender.broken = False  # type: ignore[attr-defined]

    # opted out after the failure: never sent again
    flaky.say("TD", mobile=FAILING)
    flaky.wait_settled()
    refused = post_form(people.admin, "/console/deliveries", f"/console/deliveries/{opted}/retry", {})
    assert refused.status_code == 409
    assert "opted out" in refused.text

    page = people.admin.get("/console/deliveries").text
    assert 'name="confirm_ambiguous"' in page
    unconfirmed = post_form(people.admin, "/console/deliveries", f"/console/deliveries/{ambiguous}/retry", {})
    assert unconfirmed.status_code == 400
    assert "may already have reached the customer" in unconfirmed.text
    assert flaky.count(outbox) == 0
    assert not [r for r in flaky.rows(audit_events) if r["action"] == "delivery.retry"]

    confirmed = post_form(
        people.admin,
        "/console/deliveries",
        f"/console/deliveries/{ambiguous}/retry",
        {"confirm_ambiguous": "yes"},
    )
    assert confirmed.status_code == 303
    wait_until(lambda: flaky.rows(messages, messages.c.id == ambiguous)[0]["status"] == "sent", what="the resend")
    entry = next(r for r in flaky.rows(audit_events) if r["action"] == "delivery.retry")
    assert entry["detail"]["confirmed_ambiguous"] is True

    inbound = flaky.inbound()[0]["id"]
    not_a_reply = post_form(people.admin, "/console/deliveries", f"/console/deliveries/{inbound}/retry", {})
    assert not_a_reply.status_code == 404


def test_hostile_provider_text_is_escaped_on_the_deliveries_page(flaky: Harness) -> None:
    people = People(flaky)
    message_id = _failed_reply(flaky)
    with writing(flaky.engine) as conn:
        conn.execute(
            update(messages)
            .where(messages.c.id == message_id)
            .values(error_message=HOSTILE, status_reason=HOSTILE, text=HOSTILE)
        )
    page = people.viewer.get("/console/deliveries").text
    escaped_everywhere(page)


# ---------------------------------------------------------------- what Tencent refused: caps, expiries, ambiguity

CAP = "LimitExceeded.AppDailyLimit"
ALL_PAGES = (*PAGES, "/console/conversations", "/console/unmatched", "/console/dashboard", "/console/users")


class TencentSays(RecordingSender):
    """Answers each send with Tencent's ``code`` for the numbers in ``refuse`` (every number while it is empty)."""

    def __init__(self, code: str, message: str, refuse: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.code, self.message, self.refuse = code, message, refuse
        self.working = False

    def send(self, sms: OutboundSms) -> SendResult:
        if not self.working and (not self.refuse or sms.mobile in self.refuse):
            return SendResult(ok=False, code=self.code, message=self.message)
        return super().send(sms)


def _banner(page: str) -> str:
    found = re.search(r'<section class="account-cap-banner".*?</section>', page, re.S)
    return found.group(0) if found else ""


def _row(page: str, message_id: int) -> str:
    found = re.search(rf'<tr id="message-{message_id}">.*?</tr>', page, re.S)
    assert found, f"reply {message_id} is not listed"
    return found.group(0)


@pytest.fixture
def capped(make_app: Callable[..., Harness], db_url: str) -> Harness:
    """An app whose every send meets Tencent's account-wide daily cap, with hostile text in Tencent's answer."""
    return make_app(db_url, sender=TencentSays(CAP, "daily limit reached " + HOSTILE))


def test_an_account_cap_shows_a_banner_on_every_page_until_it_ends(capped: Harness) -> None:
    people = People(capped)
    assert _banner(people.admin.get("/console/deliveries").text) == ""  # nothing yet
    capped.say("hi")
    [reply] = capped.wait_settled()
    assert (reply["status"], reply["error_code"]) == ("expired", CAP)
    ends = next_china_time(capped.clock(), time(0, 5))

    for path in ALL_PAGES:
        for client in (people.viewer, people.admin):
            page = client.get(path)
            if page.status_code == 403:  # the users page, for the viewer
                continue
            banner = _banner(page.text)
            assert banner, f"no banner on {path}"
            assert f'<code class="cap-code">{CAP}</code>' in banner
            assert '<strong class="cap-country">every number</strong>' in banner
            assert f'<strong class="cap-until">{ends:%Y-%m-%d} 00:05</strong> China time (UTC+8)' in banner
            assert "raise the limit in Tencent's SMS console" in unescape(banner)
            assert "replies expire unsent" in banner
            escaped_everywhere(banner)  # Tencent's own words, escaped
            assert ("/console/account-caps/lift" in banner) is (client is people.admin)
    assert _banner(people.anonymous.get("/console/login").text) == ""  # nothing for someone signed out

    capped.clock.now = ends + timedelta(seconds=1)  # the next China day: the cap is over
    for path in ALL_PAGES:
        assert _banner(people.admin.get(path).text) == "", path


def test_a_per_country_cap_names_the_country(harness: Harness, people: People) -> None:
    until = harness.clock() + timedelta(hours=3)
    with writing(harness.engine) as conn:
        conn.execute(
            insert(account_limits).values(
                code="LimitExceeded.AppCountryOrRegionDailyLimit",
                nationcode="852",
                message=None,
                until=until,
                created_at=harness.clock(),
            )
        )
    banner = _banner(people.viewer.get("/console/opt-outs").text)
    assert '<strong class="cap-country">+852</strong>' in banner
    assert f"{until.astimezone(CHINA):%Y-%m-%d %H:%M}" in banner
    assert "every number" not in banner
    assert "ask an admin to lift the cap" in banner


def test_an_admin_lifts_a_cap_after_raising_it_and_replies_go_again(capped: Harness) -> None:
    people = People(capped)
    capped.say("hi")
    capped.wait_settled()
    lift = {"code": CAP, "nationcode": ""}
    assert post_form(people.viewer, "/console/deliveries", "/console/account-caps/lift", lift).status_code == 403
    assert _banner(people.admin.get("/console/deliveries").text)

    capped.sender.working = True  # type: ignore[attr-defined]  # the limit was raised at Tencent
    answer = post_form(people.admin, "/console/deliveries", "/console/account-caps/lift", lift)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/console/deliveries?done=cap-lifted"
    page = people.admin.get(answer.headers["location"]).text
    assert _banner(page) == ""
    assert "Account cap lifted" in page
    (entry,) = [r for r in capped.rows(audit_events) if r["action"] == "account_cap.lift"]
    assert (entry["actor"], entry["target"]) == ("ada", f"account_cap:{CAP}:")
    (row,) = capped.rows(account_limits)
    assert row["until"] == capped.clock()  # ended, not forgotten: /metrics keeps its series

    capped.say("hi", mobile=OTHER)
    replies = capped.wait_settled()
    assert [r["status"] for r in replies] == ["expired", "sent"]  # the expired one stays expired
    again = post_form(people.admin, "/console/deliveries", "/console/account-caps/lift", lift)
    assert again.status_code == 409
    assert "is in force" in again.text


def test_expired_replies_are_listed_with_their_reason_and_are_not_retried(capped: Harness) -> None:
    people = People(capped)
    capped.say("hi")
    capped.wait_settled()
    capped.say("hi", mobile=OTHER)  # held by the cap noted for the first: Tencent is not even asked
    first, second = (int(r["id"]) for r in capped.wait_settled())

    page = people.admin.get("/console/deliveries").text
    refused, held = _row(page, first), _row(page, second)
    assert '<span class="status-expired">expired</span>' in refused
    assert "is past the reply&#39;s deadline" in refused
    assert f'<code class="error-code">{CAP}</code>' in refused
    assert "Tencent&#39;s account-wide daily cap is reached" in held
    assert "reply_max_delay" in held
    for row in (refused, held):
        assert "/retry" not in row
        assert "not retried" in row
    escaped_everywhere(page)
    assert re.search(
        r'class="summary-expired"><span class="status-expired">expired</span> <span class="n">2</span>', page
    )

    only_expired = people.viewer.get("/console/deliveries", params={"status": "expired"}).text
    assert '<span class="count">2</span>' in only_expired
    by_code = people.viewer.get("/console/deliveries", params={"code": CAP}).text
    assert f"message-{first}" in by_code
    assert f"message-{second}" not in by_code  # never sent: no code of its own
    assert f'<option value="{CAP}">' in by_code  # offered in the code filter
    assert '<option value="expired">expired</option>' in by_code

    refused_retry = post_form(people.admin, "/console/deliveries", f"/console/deliveries/{first}/retry", {})
    assert refused_retry.status_code == 409
    assert "expired" in refused_retry.text
    assert capped.count(outbox) == 0


def test_ambiguous_replies_are_marked_as_needing_ops_with_the_reason(
    make_app: Callable[..., Harness], db_url: str
) -> None:
    h = make_app(db_url, sender=TencentSays("ClientNetworkError", "read timed out"))
    people = People(h)
    h.say("hi")
    [reply] = h.wait_settled()
    assert reply["status"] == "ambiguous"

    page = people.viewer.get("/console/deliveries").text
    row = _row(page, int(reply["id"]))
    assert '<span class="status-ambiguous">ambiguous</span><span class="needs-ops">needs ops</span>' in row
    assert unescape(AMBIGUOUS_REASON) in unescape(row)
    assert "1 ambiguous reply needs ops" in page
    assert 'class="summary-ambiguous attention"' in page
    with writing(h.engine) as conn:  # the active check asked Tencent twice, to no avail
        conn.execute(update(messages).where(messages.c.id == reply["id"]).values(checks=2, checked_at=h.clock()))
    assert "asked Tencent 2 time(s)" in people.viewer.get("/console/deliveries?status=ambiguous").text
    assert '<span class="needs-ops">' not in people.viewer.get("/console/deliveries?status=expired").text


def test_opt_outs_tell_a_blacklist_from_the_customer_and_from_an_admin(
    make_app: Callable[..., Harness], db_url: str
) -> None:
    blacklisted = "13600003333"
    h = make_app(
        db_url,
        sender=TencentSays("FailedOperation.PhoneNumberInBlacklist", "number in blacklist", refuse=(blacklisted,)),
    )
    people = People(h)
    h.say("TD")  # the customer's own opt-out
    h.say("hi", mobile=blacklisted)  # Tencent refuses the number: a customer at Tencent, or a carrier
    h.wait_settled()
    added = post_form(
        people.admin,
        "/console/opt-outs",
        "/console/opt-outs/add",
        {"number": OTHER, "signature": SIGN, "reason": "asked by phone"},
    )
    assert added.status_code == 303

    page = unescape(people.viewer.get("/console/opt-outs").text)
    rows_ = {n: r for n in ("138****0000", "136****3333", "137****2222") for r in page.split("<tr>") if n in r}
    assert "the customer, by keyword" in rows_["138****0000"]
    assert 'they wrote</span> <span class="reason">TD<' in rows_["138****0000"]
    assert "Tencent's or a carrier's blacklist" in rows_["136****3333"]
    assert "tencent:FailedOperation.PhoneNumberInBlacklist" in rows_["136****3333"]
    assert PROVIDER_BLACKLIST_REASON in rows_["136****3333"]
    assert "an admin, in the console" in rows_["137****2222"]
    assert "asked by phone" in rows_["137****2222"]

    only_blacklists = people.viewer.get("/console/opt-outs", params={"source": "provider"}).text
    assert "136****3333" in only_blacklists
    assert "138****0000" not in only_blacklists
    assert "137****2222" not in only_blacklists
    assert '<span class="count">1</span>' in only_blacklists
    keyword = people.viewer.get("/console/opt-outs", params={"source": "keyword"}).text
    assert "138****0000" in keyword
    assert "136****3333" not in keyword

    (provider,) = [e for e in h.rows(opt_out_events) if e["source"] == "provider"]
    thread = unescape(people.viewer.get(f"/console/conversations/{provider['conversation_id']}").text)
    assert "Tencent's or a carrier's blacklist" in thread
    assert f'why: <span class="reason">{PROVIDER_BLACKLIST_REASON}</span>' in thread
    assert "said “" + PROVIDER_BLACKLIST_REASON not in thread  # not words the customer said

    with writing(h.engine) as conn:
        conn.execute(update(opt_out_events).where(opt_out_events.c.id == provider["id"]).values(raw_text=HOSTILE))
    escaped_everywhere(people.viewer.get("/console/opt-outs").text)
    escaped_everywhere(people.viewer.get(f"/console/conversations/{provider['conversation_id']}").text)


# ---------------------------------------------------------------- rules


def test_rules_page_shows_the_version_files_and_the_last_reload_error(harness: Harness, people: People) -> None:
    ruleset = harness.rules.ruleset
    assert ruleset is not None
    page = people.viewer.get("/console/rules").text
    assert ruleset.version in page
    assert "acme-shop.yaml" in page
    assert "default.yaml" in page
    assert "Acme Shop" in page
    for f in ruleset.files:
        assert f.version in page
    assert "The last load succeeded" in page

    write_rules(harness.rules.path, "broken.yaml", "signature: Broken\nrules:\n  - when: [\n")
    with pytest.raises(RulesInvalid):
        harness.rules.load()
    page = people.viewer.get("/console/rules").text
    assert "The last reload failed" in page
    assert re.search(r"broken\.yaml:\d+", page)
    assert ruleset.version in page  # the old rules stay live


# ---------------------------------------------------------------- simulator


def _say(
    client: TestClient, page: httpx.Response, text: str, sign: str = SIGN, wait: str = "0", webhooks: str = ""
) -> httpx.Response:
    found = re.search(r'name="token" value="([^"]*)"', page.text)
    assert found is not None
    answer: httpx.Response = client.post(
        "/console/simulator",
        data={
            "csrf_token": csrf_from(page),
            "token": found.group(1),
            "signature": sign,
            "text": text,
            "wait": wait,
            "webhooks": webhooks,
        },
    )
    assert answer.status_code == 200, answer.text
    return answer


def test_the_simulator_answers_with_the_live_rules_and_stores_and_sends_nothing(
    harness: Harness, people: People
) -> None:
    before = stored_counts(harness.engine), harness.count(audit_events)
    page = people.viewer.get("/console/simulator")

    first = _say(people.viewer, page, "hi")
    assert MENU in first.text
    assert "1490001" in first.text
    assert re.search(r'class="rule">acme-shop\.yaml:\d+<', first.text)
    assert 'class="current-state">menu<' in first.text

    second = _say(people.viewer, first, "1")
    assert MENU in second.text  # the transcript so far
    assert "Order none: sent." in second.text
    assert "1490002" in second.text
    assert "[&#34;none&#34;, &#34;sent&#34;]" in second.text or '["none", "sent"]' in second.text
    assert 'class="current-state">menu<' in second.text

    # half an hour later the menu has expired
    third = _say(people.viewer, second, "1", wait="30")
    assert "the previous state had expired" in third.text
    assert "Sorry, we did not understand" in third.text

    hostile = _say(people.viewer, third, HOSTILE)
    escaped_everywhere(hostile.text)

    opted = _say(people.viewer, hostile, "TD")
    assert 'class="opted-out">yes<' in opted.text
    silent = _say(people.viewer, opted, "hi")
    assert "(no reply: opted out)" in silent.text

    assert (stored_counts(harness.engine), harness.count(audit_events)) == before
    assert harness.sender.sent == []


def test_the_simulator_starts_afresh_on_a_forged_token_or_another_signature(harness: Harness, people: People) -> None:
    page = people.admin.get("/console/simulator")
    first = _say(people.admin, page, "hi")
    forged = people.admin.post(
        "/console/simulator",
        data={"csrf_token": csrf_from(first), "token": "eyJzdGF0ZSI6ImNvZGUifQ.forged", "signature": SIGN, "text": "1"},
    )
    assert forged.status_code == 200
    assert "Sorry, we did not understand" in forged.text  # idle, not in the menu
    other = _say(people.admin, first, "hi", sign="Somebody Else")
    assert MENU not in other.text  # the default file answers nothing to "hi"; the old transcript is gone
    no_csrf = people.admin.post("/console/simulator", data={"signature": SIGN, "text": "hi"})
    assert no_csrf.status_code == 403


def test_the_simulator_escapes_hostile_text_captured_into_replies(
    make_app: Callable[..., Harness], db_url: str, rules_dir: Path
) -> None:
    write_rules(
        rules_dir,
        "evil.yaml",
        "signature: Evil Shop\n"
        "templates:\n"
        '  hello: {id: "1500001", text: "Hello {1}"}\n'
        "start: idle\n"
        "states:\n"
        "  idle:\n"
        "    on:\n"
        "      - regex: '^name (?P<name>.+)$'\n"
        '        set: {name: "{{ match.name }}"}\n'
        "        reply: hello\n"
        '        params: ["{{ match.name }}"]\n',
    )
    h = make_app(db_url)
    people = People(h)
    answer = _say(people.viewer, people.viewer.get("/console/simulator"), "name " + HOSTILE, sign="Evil Shop")
    assert "Hello &lt;script&gt;alert(1)&lt;/script&gt;{{ 7*7 }}" in answer.text  # the reply preview
    assert "<script>alert(1)</script>" not in answer.text


def test_the_simulator_shows_a_webhook_call_it_does_not_make_and_takes_on_error(
    harness: Harness, people: People
) -> None:
    before = stored_counts(harness.engine), harness.count(audit_events)
    page = people.viewer.get("/console/simulator")
    assert 'name="webhooks"' in page.text  # acme-shop.yaml has webhooks: a canned answer may be given
    assert "<code>order_status</code>" in page.text

    unanswered = _say(people.viewer, page, "ORDER 123456")
    text = unescape(unanswered.text)
    assert 'class="webhook">order_status<' in text
    assert 'class="call-method">GET<' in text
    assert 'class="call-url">http://127.0.0.1:9999/orders<' in text
    assert '{"order": "123456", "mobile": "13800000000"}' in text  # the rendered body (a GET's query)
    assert "the simulator did not call it (no canned answer given): taking the rule's on_error" in text
    assert "Sorry, order lookup is down. Please try again later." in text  # on_error's reply

    answered = _say(
        people.viewer, unanswered, "ORDER 654321", webhooks='{"order_status": {"status": "packed <b>now</b>"}}'
    )
    assert "Order 654321: packed." in answered.text  # the reply made from the canned answer
    assert "answered with the canned JSON" in answered.text
    assert "<b>now</b>" not in answered.text  # the canned answer is shown escaped
    assert "&lt;b&gt;now&lt;/b&gt;" in answered.text
    assert "packed &lt;b&gt;now&lt;/b&gt;" in answered.text  # saved as vars.order, shown in the state card
    # the textarea keeps what was typed for the next message
    assert "{&#34;order_status&#34;: {&#34;status&#34;: &#34;packed &lt;b&gt;now&lt;/b&gt;&#34;}}" in answered.text

    bad = people.viewer.post(
        "/console/simulator",
        data={"csrf_token": csrf_from(page), "signature": SIGN, "text": "ORDER 111111", "webhooks": "{not json"},
    )
    assert bad.status_code == 400
    assert "webhook answers: not JSON" in bad.text

    assert (stored_counts(harness.engine), harness.count(audit_events)) == before
    assert harness.sender.sent == []


# ---------------------------------------------------------------- export


def test_export_download_masks_numbers_unless_an_admin_reveals(harness: Harness, people: People) -> None:
    harness.say("hi")
    harness.wait_settled()
    day = harness.clock().date().isoformat()
    params = {"since": day, "until": day, "signature": SIGN, "format": "csv"}

    masked = people.viewer.get("/console/export/download", params={**params, "reveal": "1"})
    assert masked.status_code == 200
    assert masked.headers["content-type"].startswith("text/csv")
    assert "attachment" in masked.headers["content-disposition"]
    assert "138****0000" in masked.text
    assert MOBILE not in masked.text
    assert masked.text.splitlines()[0].startswith("id,created_at")
    assert len(masked.text.splitlines()) == 3  # header, "hi", the menu

    revealed = people.admin.get("/console/export/download", params={**params, "reveal": "1", "format": "jsonl"})
    lines = [json.loads(line) for line in revealed.text.splitlines()]
    assert [line["mobile"] for line in lines] == [MOBILE, MOBILE]

    bad = people.admin.get("/console/export/download", params={**params, "since": "yesterday"})
    assert bad.status_code == 400
    assert "is not a date" in bad.text
    assert people.anonymous.get("/console/export/download", params=params, follow_redirects=False).status_code == 303
    assert [
        (r["actor"], r["detail"]["reveal"]) for r in harness.rows(audit_events) if r["action"] == "export.download"
    ] == [
        ("vic", False),
        ("ada", True),
    ]


# ---------------------------------------------------------------- writer: process


@pytest.fixture
def process_server(db_url: str, tmp_path: Path) -> Iterator[tuple[str, Path, Engine]]:
    """``smsbot serve`` with ``writer: process``, an admin and a viewer."""
    engine = create_engine(db_url)
    try:
        add_users(engine, datetime.now(UTC))
    finally:
        engine.dispose()
    with serve_process(db_url, tmp_path, env={"SMSBOT_CONSOLE_SECRET": "test-secret-for-the-console"}) as running:
        yield running.base, running.rules, running.engine


def test_rules_and_simulator_in_process_mode(process_server: tuple[str, Path, Engine]) -> None:
    base, rules_folder, engine = process_server
    version = httpx.get(base + "/readyz", timeout=5).json()["rules"]["version"]
    with httpx.Client(base_url=base, trust_env=False, timeout=10) as client:
        login(client, "vic")
        page = client.get("/console/rules").text
        assert version in page
        assert "Acme Shop" in page  # per-file details from the console's own copy
        assert "process" in page

        before = stored_counts(engine)
        sim = client.get("/console/simulator")
        found = re.search(r'name="token" value="([^"]*)"', sim.text)
        assert found is not None
        answer = client.post(
            "/console/simulator",
            data={"csrf_token": csrf_from(sim), "token": found.group(1), "signature": SIGN, "text": "hi"},
        )
        assert answer.status_code == 200
        assert MENU in answer.text
        assert stored_counts(engine) == before

        write_rules(rules_folder, "broken.yaml", "signature: Broken\nrules:\n  - when: [\n")
        wait_until(
            lambda: "The last reload failed" in client.get("/console/rules").text,
            timeout=15,
            what="the reload error on the rules page",
        )
        page = client.get("/console/rules").text
        assert re.search(r"broken\.yaml:\d+", page)
        assert version in page
    assert count(engine, messages) == 0
    assert rows(engine, outbox) == []
