"""The Rules page's replay of a stored version before Promote, and the explain view of a thread's message.

A staged rollout (the live version and a candidate, both loaded through the
real ``LiveRules`` path and stored), a history made of real callbacks, then
what a person sees: the replay page's figures and masked examples (viewer: no
Promote; admin: Promote with CSRF), each thread message linking to its rule
and version, and the explain view showing the stored text after the files
changed on disk, or saying it falls back to the files now. On SQLite and
PostgreSQL (``db_url``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from html import unescape
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.engine import RowMapping

import bot.console.rules_page as rules_page
from bot.store.models import audit_events, contacts, conversations, messages, rule_versions
from tests.console.test_console_ops import HOSTILE, People, login, post_form
from tests.runtime.test_rule_versions import MENU, NEW_MENU, last_reply, staged
from tests.support import Harness, writing

UNKNOWN = "Sorry, we did not understand. Reply MENU for options."
NEW_UNKNOWN = "Sorry, we could not read that. Reply MENU for options."
HI_RULE = "      - keywords: [MENU, 菜单, HI, HELLO, 你好]"
HI_LINE = 38
ALICE, BOB, CAROL = "13800000001", "13800000002", "13800000003"


@pytest.fixture
def staged_app(make_app: Callable[..., Harness], db_url: str) -> Harness:
    return make_app(db_url, settings=staged())


def edit(rules_dir: Path, old: str, new: str) -> None:
    path = rules_dir / "acme-shop.yaml"
    source = path.read_text(encoding="utf-8")
    assert source.count(old) == 1, old
    path.write_text(source.replace(old, new), encoding="utf-8")


def seeded_candidate(h: Harness, rules_dir: Path) -> tuple[str, str]:
    """Four messages answered by the live version, then a candidate with another menu and 'unknown' text."""
    h.say("hi", mobile=ALICE)
    h.say("2", mobile=ALICE)  # opening hours: the candidate answers the same
    h.say("hi", mobile=BOB)
    h.say(HOSTILE, mobile=CAROL)  # not understood: the candidate says it otherwise
    h.wait_settled()
    live = h.rules.ruleset
    assert live is not None
    edit(rules_dir, MENU, NEW_MENU)
    edit(rules_dir, UNKNOWN, NEW_UNKNOWN)
    candidate = h.rules.load()
    assert h.rules.candidate is not None
    assert h.rules.candidate.version == candidate.version != live.version
    return live.version, candidate.version


def href(page: str, element_id: str) -> str:
    found = re.search(rf'id="{element_id}" href="([^"]+)"', page)
    assert found, f"no link #{element_id}"
    return unescape(found.group(1))


def figure(page: str, name: str) -> str:
    found = re.search(rf'class="{name}">([^<]*)', page)
    assert found, f"no figure {name}"
    return " ".join(found.group(1).split())


def group_rows(page: str) -> list[list[str]]:
    """The replay table's rows as their first six cells' text."""
    found = []
    for row in re.findall(r'<tr class="replay-group">(.*?)</tr>', page, re.S):
        cells = re.findall(r"<td>(.*?)</td>", row, re.S)
        found.append([" ".join(re.sub(r"<[^>]+>", "", c).split()) for c in cells[:6]])
    return found


# ---------------------------------------------------------------- replay


def test_the_replay_page_shows_what_the_candidate_would_change(staged_app: Harness, rules_dir: Path) -> None:
    h = staged_app
    people = People(h)
    _, candidate = seeded_candidate(h, rules_dir)
    [candidate_row] = h.rows(rule_versions, rule_versions.c.hash == candidate)

    url = href(people.viewer.get("/console/rules").text, "replay-candidate")
    assert url == f"/console/rules/replay?version={candidate_row['id']}&since=7d"
    page = people.viewer.get(url)
    assert page.status_code == 200
    text = page.text
    assert candidate in text
    assert figure(text, "messages") == "4 in 3 conversation(s)"
    assert figure(text, "replies-changed") == "3 (different"
    assert (figure(text, "replies-different"), figure(text, "replies-added"), figure(text, "replies-removed")) == (
        "3",
        "0",
        "0",
    )
    assert figure(text, "states-changed") == "0"
    rows = sorted(group_rows(text), key=lambda r: r[3], reverse=True)
    assert [(r[0], r[1], r[3], r[5]) for r in rows] == [
        (f"acme-shop.yaml:{HI_LINE}", f"acme-shop.yaml:{HI_LINE}", "2", "0"),
        ("acme-shop.yaml:99", "acme-shop.yaml:99", "1", "0"),
    ]
    # The examples: then and now, the numbers masked, the customer's text escaped.
    assert f"[menu] {MENU}" in unescape(text)
    assert f"[menu] {NEW_MENU}" in unescape(text)
    assert f"[unknown] {NEW_UNKNOWN}" in unescape(text)
    assert "+86 138****0001" in text
    assert "+86 138****0003" in text
    for number in (ALICE, BOB, CAROL):
        assert number not in text
    assert "<script>alert(1)</script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text

    # A viewer sees the figures, not the buttons; an admin gets Promote there.
    assert "/console/rules/promote" not in text
    assert "/console/rules/pin" not in text
    assert 'action="/console/rules/promote"' in people.admin.get(url).text
    assert people.anonymous.get(url, follow_redirects=False).headers["location"] == "/console/login"

    # The period: two days later, the last day holds none of these messages, the last 7 days all of them.
    h.clock.advance(timedelta(days=2))
    login(people.viewer, "vic")  # the session has ended meanwhile
    assert figure(people.viewer.get(url.replace("since=7d", "since=1d")).text, "messages") == "0 in 0 conversation(s)"
    week = people.viewer.get(url).text
    assert figure(week, "messages") == "4 in 3 conversation(s)"
    assert 'href="/console/rules/replay?version={}&amp;since=30d"'.format(candidate_row["id"]) in week
    assert people.viewer.get(url.replace("since=7d", "since=9y")).status_code == 400


def test_an_admin_promotes_from_the_replay_page_with_its_csrf_token(staged_app: Harness, rules_dir: Path) -> None:
    h = staged_app
    people = People(h)
    _, candidate = seeded_candidate(h, rules_dir)
    url = href(people.admin.get("/console/rules").text, "replay-candidate")

    assert post_form(people.viewer, url, "/console/rules/promote", {}).status_code == 403
    no_token = people.admin.post("/console/rules/promote", follow_redirects=False)
    assert no_token.status_code == 403
    assert h.count(audit_events, audit_events.c.action == "rules.promote") == 0

    promoted = post_form(people.admin, url, "/console/rules/promote", {})
    assert promoted.status_code == 303
    assert "Promoted" in people.admin.get(promoted.headers["location"]).text
    h.say("hi", mobile="13800000042")
    assert last_reply(h, "13800000042") == (NEW_MENU, candidate)
    # Now it is live and no longer the candidate: its replay page offers no Promote.
    assert 'action="/console/rules/promote"' not in people.admin.get(url).text


def test_any_stored_version_can_be_replayed_and_a_long_replay_says_where_it_stopped(
    staged_app: Harness, rules_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = staged_app
    people = People(h)
    live, _ = seeded_candidate(h, rules_dir)
    [live_row] = h.rows(rule_versions, rule_versions.c.hash == live)
    rules = people.admin.get("/console/rules").text
    links = re.findall(r'class="replay-version" href="([^"]+)"', rules)
    assert len(links) == 2  # one per stored version

    # The live version replays to what happened: nothing would change. An admin may pin it from there.
    live_url = f"/console/rules/replay?version={live_row['id']}&since=7d"
    assert live_url in [unescape(link) for link in links]
    page = people.admin.get(live_url).text
    assert live in page
    assert figure(page, "messages") == "4 in 3 conversation(s)"
    assert figure(page, "replies-changed") == "0 (different"
    assert "No reply or state would change." in page
    assert 'action="/console/rules/pin"' in page
    assert 'action="/console/rules/promote"' not in page
    assert 'id="replay-cut"' not in page

    # At most REPLAY_LIMIT messages, whole conversations: the first one (2 messages) then it stops, and says so.
    monkeypatch.setattr(rules_page, "REPLAY_LIMIT", 1)
    cut = people.admin.get(live_url).text
    assert figure(cut, "messages") == "2 in 1 conversation(s)"
    notice = re.search(r'id="replay-cut">(.*?)</div>', cut, re.S)
    assert notice is not None
    assert "stopped after 2 messages" in " ".join(notice.group(1).split())

    assert people.admin.get("/console/rules/replay?version=999").status_code == 404


def test_without_a_candidate_the_replay_page_asks_for_a_version(staged_app: Harness) -> None:
    people = People(staged_app)
    assert 'id="replay-candidate"' not in people.admin.get("/console/rules").text
    answer = people.admin.get("/console/rules/replay")
    assert answer.status_code == 404
    assert "no candidate" in answer.text


# ---------------------------------------------------------------- thread links and the explain view


def _thread(h: Harness, mobile: str) -> tuple[int, list[RowMapping]]:
    """The conversation of ``mobile`` and its messages, oldest first."""
    [contact] = h.rows(contacts, contacts.c.mobile == mobile)
    [convo] = h.rows(conversations, conversations.c.contact_id == contact["id"])
    return int(convo["id"]), sorted(h.rows(messages, messages.c.conversation_id == convo["id"]), key=lambda m: m["id"])


def test_thread_links_to_the_rule_and_the_explain_view_shows_the_stored_text_after_the_files_changed(
    make_app: Callable[..., Harness], db_url: str, rules_dir: Path
) -> None:
    # Untrusted text in the rule file itself: the explain view must show it escaped.
    edit(rules_dir, HI_RULE + "\n        reply: menu\n", HI_RULE + "\n        reply: menu  # " + HOSTILE + "\n")
    h = make_app(db_url)
    people = People(h)
    h.say("hi", mobile=ALICE)
    h.wait_settled()
    version = h.rules.ruleset.version if h.rules.ruleset else None
    [stored] = h.rows(rule_versions, rule_versions.c.hash == version)
    convo_id, [said, reply] = _thread(h, ALICE)
    assert (said["rule"], reply["rule"]) == (f"acme-shop.yaml:{HI_LINE}", f"acme-shop.yaml:{HI_LINE}")

    # The rule's line changes on disk (and is reloaded): the old reply is still explained by its own text.
    edit(rules_dir, HI_RULE, "      - keywords: [MENU, HI, HEY]")
    h.rules.load()

    thread = people.viewer.get(f"/console/conversations/{convo_id}").text
    for message in (said, reply):
        explain = f"/console/conversations/{convo_id}/explain/{message['id']}"
        assert re.search(
            rf'<a class="explain" href="{re.escape(explain)}"[^>]*><code class="rule">acme-shop\.yaml:{HI_LINE}</code>'
            rf' @ <code class="rules-version">{version}</code></a>',
            thread,
        ), explain
        page = people.viewer.get(explain)
        assert page.status_code == 200
        text = unescape(page.text)
        assert f"from stored version {version} (#{stored['id']})" in text
        rule_lines = re.findall(r'<tr class="hit"><td class="n">(\d+)</td><td>(.*?)</td></tr>', page.text)
        assert [int(n) for n, _ in rule_lines] == [HI_LINE, HI_LINE + 1, HI_LINE + 2]
        assert unescape(rule_lines[0][1]) == HI_RULE
        assert "HEY" not in text
        assert "<script>alert(1)</script>" not in page.text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
        assert "+86 138****0001" in page.text
        assert ALICE not in page.text
    assert people.anonymous.get(explain, follow_redirects=False).headers["location"] == "/console/login"
    assert people.admin.get(f"/console/conversations/{convo_id}/explain/999999").status_code == 404


def test_the_explain_view_falls_back_to_the_files_now_and_says_so(
    make_app: Callable[..., Harness], db_url: str, rules_dir: Path
) -> None:
    h = make_app(db_url)
    people = People(h)
    h.say("hi", mobile=ALICE)
    h.wait_settled()
    convo_id, [said, reply] = _thread(h, ALICE)
    edit(rules_dir, HI_RULE, "      - keywords: [MENU, HI, HEY]")
    with writing(h.engine) as conn:  # an older row (no version kept) and one whose version is not stored
        conn.execute(update(messages).where(messages.c.id == said["id"]).values(rules_version=None))
        conn.execute(update(messages).where(messages.c.id == reply["id"]).values(rules_version="0123456789ab"))

    thread = people.viewer.get(f"/console/conversations/{convo_id}").text
    assert "(no version recorded)" in thread
    for message, why in (
        (said, "this message has no rules version recorded"),
        (reply, "rules version 0123456789ab is not stored"),
    ):
        page = people.viewer.get(f"/console/conversations/{convo_id}/explain/{message['id']}")
        note = re.search(r'id="rule-source-note">(.*?)</p>', page.text, re.S)
        assert note is not None
        shown = " ".join(unescape(re.sub(r"<[^>]+>", "", note.group(1))).split())
        assert "Not the stored version" in shown
        assert why in shown
        assert "the files in the rules folder now" in shown
        [(number, line)] = re.findall(r'<tr class="hit"><td class="n">(\d+)</td><td>(.*?)</td></tr>', page.text)[:1]
        assert (int(number), unescape(line)) == (HI_LINE, "      - keywords: [MENU, HI, HEY]")
