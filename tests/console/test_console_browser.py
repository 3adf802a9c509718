"""The console in a real browser: Playwright driving Debian's Chromium against a running server.

The TestClient tests check each page's HTML; this one checks what they cannot:
that a person can log in, search, read a thread, retry a failed delivery and
talk to the simulator by clicking and typing, with the cookies, redirects and
forms a browser really uses. Screenshots land in ``tests/artifacts/``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import uvicorn

from bot.config import Settings
from bot.console.users import add_user
from bot.runtime.live_rules import LiveRules
from bot.sms import OutboundSms, SendResult
from bot.store.db import make_engine, upgrade
from bot.web.app import create_app
from tests.support import (
    ARTIFACTS,
    NO_FREQUENCY_LIMITS,
    RecordingSender,
    copy_rules,
    free_port,
    launch_chromium,
    payload,
    require_chromium,
    wait_until,
    writing,
)

PASSWORD = "correct horse battery"
FAILING = "13900001111"
"""Replies to this number fail (a permanent Tencent error) until the test repairs the sender."""

pytestmark = pytest.mark.slow

require_chromium()

sync_api = pytest.importorskip("playwright.sync_api")


class FlakySender(RecordingSender):
    """Fails every reply to ``FAILING`` while ``broken`` is set, like an unapproved template would."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = True

    def send(self, sms: OutboundSms) -> SendResult:
        if sms.mobile == FAILING and self.broken:
            return SendResult(
                ok=False, code="FailedOperation.TemplateIncorrectOrUnapproved", message="template not approved"
            )
        return super().send(sms)


@dataclass
class Server:
    url: str
    sender: FlakySender


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """The real app under uvicorn on a loopback port (thread writer), with an admin and some conversations."""
    url = f"sqlite:///{tmp_path / 'smsbot.db'}"
    upgrade(url)
    engine = make_engine(url)
    with writing(engine) as conn:
        add_user(conn, "ada", "admin", PASSWORD, now=datetime.now(UTC), actor="test")
    rules = LiveRules(copy_rules(tmp_path / "rules"))
    rules.load()
    sender = FlakySender()
    app = create_app(Settings(**NO_FREQUENCY_LIMITS), engine=engine, rules=rules, sender=sender, watch_rules=False)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: uv.started, timeout=10, what="uvicorn to start")
    with httpx.Client(base_url=base, trust_env=False) as client:
        at = int(time.time()) - 600
        for i, (mobile, text) in enumerate(
            [("13800001234", "hi"), ("13800001234", "1"), ("13800005678", "hi"), (FAILING, "hi")]
        ):
            answer = client.post("/sms/callback", json=payload(text, at=at + i, mobile=mobile))
            assert answer.json() == {"result": 0, "errmsg": "OK"}
    wait_until(lambda: len(sender.sent) == 3, timeout=10, what="the replies to be sent")
    try:
        yield Server(base, sender)
    finally:
        uv.should_exit = True
        thread.join(10)
        engine.dispose()


def test_ops_person_logs_in_searches_reads_a_thread_retries_and_simulates(server: Server) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(10_000)

            # Anyone else is sent to the login page.
            page.goto(server.url + "/console/conversations")
            assert "/console/login" in page.url
            page.fill("input[name=name]", "ada")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url("**/console/conversations**")
            assert page.locator("table").count() > 0
            sync_api.expect(page.locator("body")).to_contain_text("138****1234")
            assert "13800001234" not in page.content()  # masked by default, even for an admin

            # Search by the last four digits, then open the thread.
            page.fill("input[name=number]", "1234")
            page.click("form.filters button[type=submit]")
            page.wait_for_url("**number=1234**")
            rows = page.locator("tbody tr")
            assert rows.count() == 1
            rows.first.locator("a", has_text="Open").click()
            page.wait_for_url("**/console/conversations/*")
            body = page.locator("body")
            sync_api.expect(body).to_contain_text("acme-shop.yaml:")  # the rule that fired
            sync_api.expect(body).to_contain_text("1490001")  # the menu's template id
            sync_api.expect(body).to_contain_text("Reply 1 for order status")  # what the customer saw
            page.screenshot(path=str(ARTIFACTS / "console-thread.png"), full_page=True)

            # The failed reply is listed with Tencent's code; retrying it sends it once the cause is fixed.
            page.click("nav >> text=Deliveries")
            page.wait_for_url("**/console/deliveries**")
            sync_api.expect(page.locator("body")).to_contain_text("FailedOperation.TemplateIncorrectOrUnapproved")
            page.screenshot(path=str(ARTIFACTS / "console-deliveries.png"), full_page=True)
            server.sender.broken = False
            page.locator("form.retry button").first.click()
            page.wait_for_load_state()
            wait_until(
                lambda: any(sms.mobile == FAILING for sms in server.sender.sent),
                timeout=10,
                what="the retried reply to be sent",
            )

            # The simulator answers from the live rules.
            page.click("nav >> text=Simulator")
            page.wait_for_url("**/console/simulator**")
            page.fill("form.say input[name=signature]", "Acme Shop")
            page.fill("form.say input[name=text]", "hi")
            page.click("form.say button[type=submit]")
            sync_api.expect(page.locator("body")).to_contain_text("Reply 1 for order status")
            page.fill("form.say input[name=text]", "1")
            page.click("form.say button[type=submit]")
            sync_api.expect(page.locator("body")).to_contain_text("Order none: sent.")
            page.screenshot(path=str(ARTIFACTS / "console-simulator.png"), full_page=True)

            page.click("nav >> text=Dashboard")
            page.wait_for_url("**/console/dashboard**")
            assert page.locator("svg").count() > 0
            page.screenshot(path=str(ARTIFACTS / "console-dashboard.png"), full_page=True)
        finally:
            browser.close()
    for name in ("console-thread.png", "console-deliveries.png", "console-simulator.png", "console-dashboard.png"):
        assert (ARTIFACTS / name).stat().st_size > 10_000
