"""Rules > Activity in a real browser (Playwright driving Debian's Chromium): signed in as a viewer, from the
Rules page to the Activity page, the funnel's SVG and numbers shown; its screenshot (tests/artifacts/activity.png) is the one copied to docs/activity.png."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import uvicorn

from bot.config import Settings
from bot.console.users import add_user
from bot.runtime.live_rules import LiveRules
from bot.store.db import make_engine, upgrade
from bot.web.app import create_app
from tests.support import (
    ARTIFACTS,
    NO_FREQUENCY_LIMITS,
    RecordingSender,
    copy_rules,
    free_port,
    ingest_history,
    launch_chromium,
    require_chromium,
    wait_until,
    writing,
)

PASSWORD = "correct horse battery"

pytestmark = pytest.mark.slow

require_chromium()

sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'smsbot.db'}"
    upgrade(url)
    engine = make_engine(url)
    now = datetime.now(UTC)
    with writing(engine) as conn:
        add_user(conn, "vic", "viewer", PASSWORD, now=now, actor="test")
    rules = LiveRules(copy_rules(tmp_path / "rules"))
    rules.load()
    t = now - timedelta(hours=5)
    said = ["hi", "2", "hi", "3", "abc", "123456", "hi", "1", "hi", "TD", "hi", "blah", "hi", "2", "hello", "3"]
    history = [(f"138000000{i // 2:02d}", text, t + timedelta(minutes=i)) for i, text in enumerate(said)]
    ingest_history(engine, rules.ruleset, history)
    app = create_app(
        Settings(**NO_FREQUENCY_LIMITS), engine=engine, rules=rules, sender=RecordingSender(), watch_rules=False
    )
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    wait_until(lambda: uv.started, timeout=10, what="uvicorn to start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(10)
        engine.dispose()


def test_a_viewer_opens_rules_activity_and_reads_the_funnel(server: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "activity.png"
    with sync_api.sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(10_000)
            page.goto(server + "/console/rules/activity")
            assert "/console/login" in page.url
            page.fill("input[name=name]", "vic")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.goto(server + "/console/rules")
            page.click("a.activity-link")
            page.wait_for_url("**/console/rules/activity**")
            menu = page.locator("section.file tr[data-state=menu]")
            sync_api.expect(menu.locator("td.entered")).to_have_text("7")
            sync_api.expect(menu.locator("td.left")).to_have_text("4")
            sync_api.expect(menu.locator("td.opted-out")).to_have_text("1")
            assert page.locator("section.file svg rect").count() > 0
            page.select_option("select[name=since]", "1d")
            page.click("form.filters button[type=submit]")
            page.wait_for_url("**since=1d**")
            sync_api.expect(menu.locator("td.entered")).to_have_text("7")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
