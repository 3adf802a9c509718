"""The console's Rules page: live, candidate and pinned versions, and Promote / Pin / Unpin (admins, CSRF, audited).

TestClient tests on SQLite and PostgreSQL, then Promote clicked in a real
browser (Playwright + Debian's Chromium), which also leaves the README's
screenshot of the page (``docs/rules-page.png``).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import uvicorn

from bot.config import Settings
from bot.console.users import add_user
from bot.runtime.live_rules import LiveRules
from bot.store.db import make_engine, upgrade
from bot.store.models import audit_events, rule_versions
from bot.web.app import create_app
from tests.console.test_console_ops import People, post_form
from tests.runtime.test_rule_versions import MENU, NEW_MENU, TESTER, edit_menu, last_reply, staged
from tests.support import (
    ARTIFACTS,
    NO_FREQUENCY_LIMITS,
    Harness,
    copy_rules,
    free_port,
    launch_chromium,
    payload,
    require_chromium,
    wait_until,
    writing,
)

PASSWORD = "correct horse battery"


@pytest.fixture
def staged_app(make_app: Callable[..., Harness], db_url: str) -> Harness:
    return make_app(db_url, settings=staged())


def _with_candidate(h: Harness, rules_dir: Path) -> tuple[str, str]:
    live = h.rules.ruleset
    assert live is not None
    edit_menu(rules_dir)
    candidate = h.rules.load()
    return live.version, candidate.version


def test_the_page_shows_live_and_candidate_and_only_admins_get_buttons(staged_app: Harness, rules_dir: Path) -> None:
    people = People(staged_app)
    live, candidate = _with_candidate(staged_app, rules_dir)
    for client in (people.admin, people.viewer):
        page = client.get("/console/rules")
        assert page.status_code == 200
        live_slot = re.search(r'id="live-version">(.*?)</div>', page.text, re.S)
        candidate_slot = re.search(r'id="candidate-version">(.*?)</div>', page.text, re.S)
        assert live_slot is not None
        assert live in live_slot.group(1)
        assert candidate_slot is not None
        assert candidate in candidate_slot.group(1)
    admin_page = people.admin.get("/console/rules").text
    assert 'action="/console/rules/promote"' in admin_page
    assert admin_page.count('action="/console/rules/pin"') == 2
    viewer_page = people.viewer.get("/console/rules").text
    assert "/console/rules/promote" not in viewer_page
    assert "/console/rules/pin" not in viewer_page
    assert people.anonymous.get("/console/rules", follow_redirects=False).status_code == 303


@pytest.mark.parametrize(
    ("action", "data"),
    [("/console/rules/promote", {}), ("/console/rules/pin", {"version_id": "1"}), ("/console/rules/unpin", {})],
)
def test_rollout_changes_need_an_admin_and_a_csrf_token(
    staged_app: Harness, rules_dir: Path, action: str, data: dict[str, str]
) -> None:
    people = People(staged_app)
    _with_candidate(staged_app, rules_dir)
    before = staged_app.client.get("/readyz").json()["rules"], staged_app.count(audit_events)

    viewer = post_form(people.viewer, "/console/rules", action, data)
    assert viewer.status_code == 403
    assert "only an admin" in viewer.text
    no_token = people.admin.post(action, data=data, follow_redirects=False)
    assert no_token.status_code == 403
    assert "CSRF" in no_token.text
    anonymous = people.anonymous.post(action, data=data, follow_redirects=False)
    assert anonymous.status_code in (303, 403)
    staged_app.rules.refresh()
    assert (staged_app.client.get("/readyz").json()["rules"], staged_app.count(audit_events)) == before


def test_an_admin_promotes_pins_and_unpins_and_each_is_audited(staged_app: Harness, rules_dir: Path) -> None:
    h = staged_app
    people = People(h)
    live, candidate = _with_candidate(h, rules_dir)

    promoted = post_form(people.admin, "/console/rules", "/console/rules/promote", {})
    assert promoted.status_code == 303
    page = people.admin.get(promoted.headers["location"]).text
    assert "Promoted" in page
    h.say("hi", mobile="13800000042")
    assert last_reply(h, "13800000042") == (NEW_MENU, candidate)

    [old] = [r for r in h.rows(rule_versions) if r["hash"] == live]
    pinned = post_form(people.admin, "/console/rules", "/console/rules/pin", {"version_id": str(old["id"])})
    assert pinned.status_code == 303
    h.say("MENU", mobile=TESTER)
    assert last_reply(h, TESTER) == (MENU, live)
    assert re.search(r'id="pinned-version">.*?' + live, people.admin.get("/console/rules").text, re.S)

    unpinned = post_form(people.admin, "/console/rules", "/console/rules/unpin", {})
    assert unpinned.status_code == 303
    h.say("MENU", mobile=TESTER)
    assert last_reply(h, TESTER) == (NEW_MENU, candidate)

    trail = [(r["actor"], r["action"], (r["detail"] or {}).get("live")) for r in h.rows(audit_events)]
    assert [t for t in trail if t[1].startswith("rules.")] == [
        ("ada", "rules.promote", candidate),
        ("ada", "rules.pin", candidate),
        ("ada", "rules.unpin", candidate),
    ]
    again = post_form(people.admin, "/console/rules", "/console/rules/promote", {})
    assert again.status_code == 409
    assert "no candidate" in again.text


# ---------------------------------------------------------------- a real browser


@pytest.fixture
def browser_server(tmp_path: Path) -> Iterator[tuple[str, LiveRules, Path]]:
    """The real app under uvicorn (staged rollout, one tester), with an admin and a candidate waiting."""
    require_chromium()
    url = f"sqlite:///{tmp_path / 'smsbot.db'}"
    upgrade(url)
    engine = make_engine(url)
    with writing(engine) as conn:
        add_user(conn, "ada", "admin", PASSWORD, now=datetime.now(UTC), actor="test")
    rules_dir = copy_rules(tmp_path / "rules")
    rules = LiveRules(rules_dir)
    rules.load()
    settings = Settings(rollout="staged", testers=[TESTER], **NO_FREQUENCY_LIMITS)  # type: ignore[arg-type]
    app = create_app(settings, engine=engine, rules=rules, watch_rules=False)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    wait_until(lambda: uv.started, timeout=10, what="uvicorn to start")
    edit_menu(rules_dir)
    rules.load()  # the candidate
    try:
        yield f"http://127.0.0.1:{port}", rules, rules_dir
    finally:
        uv.should_exit = True
        thread.join(10)
        engine.dispose()


@pytest.mark.slow
def test_an_admin_clicks_promote_in_a_browser(browser_server: tuple[str, LiveRules, Path]) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    base, rules, _ = browser_server
    candidate = rules.candidate
    assert candidate is not None
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.set_default_timeout(10_000)
            page.goto(base + "/console/rules")
            page.fill("input[name=name]", "ada")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.goto(base + "/console/rules")
            sync_api.expect(page.locator("#candidate-version")).to_contain_text(candidate.version)
            sync_api.expect(page.locator("#live-version")).not_to_contain_text(candidate.version)
            page.screenshot(path=str(ARTIFACTS / "rules-page.png"), full_page=True)

            page.click("#promote")
            page.wait_for_url("**/console/rules?done=promoted")
            sync_api.expect(page.locator("[role=status]")).to_contain_text("Promoted")
            sync_api.expect(page.locator("#live-version")).to_contain_text(candidate.version)
            sync_api.expect(page.locator("#candidate-version")).to_contain_text("none")
        finally:
            browser.close()
    # The server answers everyone with the promoted version now.
    with httpx.Client(base_url=base, trust_env=False) as client:
        assert client.get("/readyz").json()["rules"]["live"]["version"] == candidate.version
        answer = client.post(
            "/sms/callback", json=payload("hi", at=int(datetime.now(UTC).timestamp()) - 5, mobile="13800000077")
        )
        assert answer.json() == {"result": 0, "errmsg": "OK"}
    assert rules.ruleset is not None
    assert rules.ruleset.version == candidate.version
    shot = ARTIFACTS / "rules-page.png"
    assert shot.stat().st_size > 10_000
    # docs/rules-page.png (the README's) is a copy of this screenshot: cp tests/artifacts/rules-page.png docs/
