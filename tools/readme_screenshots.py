"""Render the README's console screenshots from two days of made-up traffic.

The browser test's screenshots show a handful of messages; the README should
show what an ops person sees on a working day. This builds a throwaway SQLite
database, replays 48 hours of customers texting the example rules (on a
moved clock, through the real callback route), starts the console under
uvicorn and saves the thread and dashboard pages with Playwright and Debian's
Chromium into ``docs/images/``.

    .venv/bin/python tools/readme_screenshots.py
"""

from __future__ import annotations

import random
import socket
import sys
import tempfile
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import uvicorn
from sqlalchemy import Engine, select

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bot.config import Settings  # noqa: E402
from bot.console.users import add_user  # noqa: E402
from bot.runtime.live_rules import LiveRules  # noqa: E402
from bot.sms import OutboundSms, SendResult  # noqa: E402
from bot.store.db import make_engine, upgrade  # noqa: E402
from bot.store.models import outbox  # noqa: E402
from bot.web.app import create_app  # noqa: E402
from tests.support import NO_FREQUENCY_LIMITS, FakeClock, RecordingSender, copy_rules, payload, wait_until  # noqa: E402

OUT = ROOT / "docs" / "images"
PASSWORD = "screenshots only"
STAR = "13800138000"
"""The customer whose thread is shown."""
SCRIPTS = [
    ["hi", "1"],
    ["菜单", "2"],
    ["hi", "3", "123456"],
    ["hi", "where is my parcel?"],
    ["MENU", "TD"],
    ["price??"],
    ["hi", "1", "MENU", "2"],
]


class SometimesFailing(RecordingSender):
    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.rng = rng

    def send(self, sms: OutboundSms) -> SendResult:
        if self.rng.random() < 0.03:
            return SendResult(ok=False, code="FailedOperation.ContainSensitiveWord", message="sensitive word")
        return super().send(sms)


def outbox_empty(engine: Engine) -> bool:
    with engine.connect() as conn:
        return not conn.execute(select(outbox.c.id).limit(1)).first()


def main() -> None:
    from playwright.sync_api import sync_playwright

    rng = random.Random(7)
    work = Path(tempfile.mkdtemp(prefix="smsbot-shots-"))
    url = f"sqlite:///{work / 'smsbot.db'}"
    upgrade(url)
    engine = make_engine(url)
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    clock = FakeClock(end - timedelta(hours=48))
    with engine.begin() as conn:
        add_user(conn, "ops", "admin", PASSWORD, now=clock(), actor="screenshots")
    rules = LiveRules(copy_rules(work / "rules"))
    rules.load()
    sender = SometimesFailing(rng)
    app = create_app(
        Settings(**NO_FREQUENCY_LIMITS), engine=engine, rules=rules, sender=sender, clock=clock, watch_rules=False
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout=10, what="uvicorn")
    base = f"http://127.0.0.1:{port}"
    numbers = [f"139{rng.randrange(10**8):08d}" for _ in range(60)]
    with httpx.Client(base_url=base, trust_env=False) as client:

        def say(mobile: str, text: str) -> None:
            answer = client.post("/sms/callback", json=payload(text, at=int(clock().timestamp()), mobile=mobile))
            answer.raise_for_status()

        for hour in range(48):
            busy = 1.0 + (2.5 if 1 <= (hour + 8) % 24 <= 13 else 0.0)  # China daytime is busier
            for _ in range(int(busy * rng.uniform(2, 5))):
                for text in rng.choice(SCRIPTS):
                    say(rng.choice(numbers), text)
                    clock.advance(timedelta(seconds=rng.randint(5, 40)))
            if hour == 40:
                for text in ["hi", "1", "MENU", "2", "TD", "START"]:
                    say(STAR, text)
                    wait_until(lambda: outbox_empty(engine), timeout=30, what="this reply to be sent")
                    clock.advance(timedelta(seconds=rng.randint(20, 90)))
            clock.now = end - timedelta(hours=47 - hour)
    wait_until(lambda: not app.state.runtime.pipeline.deliverer._tasks, timeout=30, what="the replies to be sent")

    OUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(base + "/console/login")
        page.fill("input[name=name]", "ops")
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url("**/console/conversations**")
        page.fill("input[name=number]", STAR[-4:])
        page.click("form.filters button[type=submit]")
        page.wait_for_url("**number=**")
        page.locator("tbody tr a", has_text="Open").first.click()
        page.wait_for_url("**/console/conversations/*")
        page.screenshot(path=str(OUT / "console-thread.png"), full_page=True)
        page.goto(base + "/console/dashboard")
        page.screenshot(path=str(OUT / "console-dashboard.png"), clip={"x": 0, "y": 0, "width": 1200, "height": 1150})
        browser.close()
    server.should_exit = True
    thread.join(10)
    engine.dispose()
    print(f"wrote {OUT / 'console-thread.png'} and {OUT / 'console-dashboard.png'}")


if __name__ == "__main__":
    main()
