"""Rules at run time: a valid change swaps in, an invalid one keeps the old rules and says where it is wrong."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bot.rules.engine import decide
from bot.rules.model import Conversation, InboundMessage, Ruleset
from bot.runtime.live_rules import LiveRules, RulesInvalid
from tests.support import SIGN, Harness, wait_until, write_rules

MENU_TEXT = "Reply 1 for order status, 2 for opening hours. Reply TD to opt out."
NEW_MENU_TEXT = "Reply 1 for your order, 2 for our hours. Reply TD to opt out."


def acme(rules_dir: Path) -> Path:
    return rules_dir / "acme-shop.yaml"


def edit(path: Path, old: str, new: str) -> None:
    source = path.read_text(encoding="utf-8")
    assert old in source
    path.write_text(source.replace(old, new, 1), encoding="utf-8")


def line_of(path: Path, needle: str) -> int:
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in {path}")


def break_goto(path: Path) -> int:
    """Make the idle state's rule go to a state that does not exist; return that line."""
    edit(path, "        goto: menu\n", "        goto: nowhere\n")
    return line_of(path, "goto: nowhere")


def menu_reply(ruleset: Ruleset) -> str:
    decision = decide(ruleset, Conversation(), InboundMessage(text="hi", sign=SIGN), datetime.now(UTC))
    [reply] = decision.replies
    return reply.text


# ---------------------------------------------------------------- LiveRules.load


def test_valid_change_is_picked_up_by_load(rules_dir: Path) -> None:
    live = LiveRules(rules_dir)
    first = live.load()
    assert menu_reply(first) == MENU_TEXT
    edit(acme(rules_dir), MENU_TEXT, NEW_MENU_TEXT)
    second = live.load()
    assert live.ruleset is second
    assert second.version != first.version
    assert menu_reply(second) == NEW_MENU_TEXT
    assert live.reloads == 2
    assert live.last_error == []


def test_invalid_change_keeps_the_old_rules_and_records_file_and_line(
    rules_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    live = LiveRules(rules_dir)
    first = live.load()
    line = break_goto(acme(rules_dir))
    caplog.set_level(logging.ERROR, logger="smsbot.rules")
    with pytest.raises(RulesInvalid) as raised:
        live.load()
    assert live.ruleset is first
    assert live.reloads == 1
    where = f"acme-shop.yaml:{line}:"
    assert any(where in error and "nowhere" in error for error in live.last_error), live.last_error
    assert any(where in error for error in raised.value.errors)
    assert any(where in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(
    ("broken", "needle"),
    [
        ("states: [\n", ""),
        ("templates:\n  menu: {id: 1490001}\n", "menu"),
    ],
    ids=["yaml-syntax", "template-without-text"],
)
def test_other_invalid_files_keep_the_old_rules(rules_dir: Path, broken: str, needle: str) -> None:
    live = LiveRules(rules_dir)
    first = live.load()
    write_rules(rules_dir, "zz-broken.yaml", "signature: Broken\n" + broken)
    with pytest.raises(RulesInvalid):
        live.load()
    assert live.ruleset is first
    assert any("zz-broken.yaml:" in error and needle in error for error in live.last_error), live.last_error


def test_one_bad_file_refuses_the_whole_folder(rules_dir: Path) -> None:
    """A valid edit in one file is not taken while another file is broken."""
    live = LiveRules(rules_dir)
    first = live.load()
    edit(acme(rules_dir), MENU_TEXT, NEW_MENU_TEXT)
    write_rules(rules_dir, "default.yaml", "signature: '*'\nopt_out: {keywords: [TD], reply: missing}\n")
    with pytest.raises(RulesInvalid):
        live.load()
    assert live.ruleset is first
    assert menu_reply(first) == MENU_TEXT
    assert all("default.yaml:" in error for error in live.last_error)


def test_fixing_the_error_clears_it(rules_dir: Path) -> None:
    live = LiveRules(rules_dir)
    live.load()
    break_goto(acme(rules_dir))
    with pytest.raises(RulesInvalid):
        live.load()
    assert live.last_error
    edit(acme(rules_dir), "goto: nowhere", "goto: menu")
    live.load()
    assert live.last_error == []


def test_a_second_file_claiming_the_same_signature_is_an_error(rules_dir: Path) -> None:
    live = LiveRules(rules_dir)
    first = live.load()
    write_rules(rules_dir, "copy.yaml", acme(rules_dir).read_text(encoding="utf-8"))
    with pytest.raises(RulesInvalid):
        live.load()
    assert live.ruleset is first
    assert any("already claimed" in error and "acme-shop.yaml" in error for error in live.last_error)


# ---------------------------------------------------------------- LiveRules.watch


def plain_save(path: Path, source: str) -> None:
    path.write_text(source, encoding="utf-8")


async def _rewrite_until(
    live: LiveRules,
    path: Path,
    sources: Callable[[int], str],
    done: Callable[[], bool],
    timeout: float = 8.0,
    write: Callable[[Path, str], None] = plain_save,
) -> None:
    """Write ``sources(n)`` again and again (the watcher may not be ready for the first write) until ``done``."""
    deadline = time.monotonic() + timeout
    attempt = 0
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"the watcher did not react within {timeout}s")
        write(path, sources(attempt))
        attempt += 1
        for _ in range(10):
            await asyncio.sleep(0.05)
            if done():
                return


def test_watch_picks_up_valid_changes_and_keeps_old_rules_on_invalid_ones(rules_dir: Path) -> None:
    live = LiveRules(rules_dir)
    first = live.load()
    path = acme(rules_dir)
    original = path.read_text(encoding="utf-8")
    changed = original.replace(MENU_TEXT, NEW_MENU_TEXT)
    broken = changed.replace("        goto: menu\n", "        goto: nowhere\n")

    async def scenario() -> None:
        watcher = asyncio.create_task(live.watch())
        try:
            await _rewrite_until(
                live,
                path,
                lambda n: changed + f"# edit {n}\n",
                lambda: live.ruleset is not None and live.ruleset.version != first.version,
            )
            assert live.ruleset is not None
            assert menu_reply(live.ruleset) == NEW_MENU_TEXT
            good = live.ruleset
            await _rewrite_until(live, path, lambda n: broken + f"# edit {n}\n", lambda: bool(live.last_error))
            assert live.ruleset is good
            assert any("acme-shop.yaml:" in error and "nowhere" in error for error in live.last_error)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(watcher, timeout=10)

    asyncio.run(scenario())


def atomic_save(path: Path, source: str) -> None:
    """Save the way editors and deployment tools do: write a temporary file, then rename it over the old one."""
    temporary = path.with_name(f".{path.name}.swp")
    temporary.write_text(source, encoding="utf-8")
    os.replace(temporary, path)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["folder", "file"])
def test_watch_survives_atomic_saves(rules_dir: Path, target: str) -> None:
    """rules_dir may name a single file; every save must be seen, not only the first.

    A rename replaces the file's inode: a watch on the file itself (rather
    than on its folder) goes deaf after the first such save.
    """
    path = acme(rules_dir)
    live = LiveRules(rules_dir if target == "folder" else path)
    live.load()
    original = path.read_text(encoding="utf-8")

    async def scenario() -> None:
        watcher = asyncio.create_task(live.watch())
        try:
            for save in range(3):
                before = live.reloads

                def source(n: int, save: int = save) -> str:
                    return original + f"# save {save}.{n}\n"

                def saved(before: int = before) -> bool:
                    return live.reloads > before

                try:
                    await _rewrite_until(
                        live,
                        path,
                        source,
                        saved,
                        timeout=3,
                        write=atomic_save,
                    )
                except AssertionError as exc:
                    raise AssertionError(f"save {save + 1} of 3 was not picked up: {exc}") from None
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(watcher, timeout=10)

    asyncio.run(scenario())


# ---------------------------------------------------------------- through the running app


def test_reload_in_a_running_app_and_readyz(harness: Harness, rules_dir: Path) -> None:
    h = harness
    assert h.rules.ruleset is not None
    version = h.rules.ruleset.version
    h.say("hi", mobile="13800000001")

    edit(acme(rules_dir), MENU_TEXT, NEW_MENU_TEXT)
    new_version = h.rules.load().version
    h.say("hi", mobile="13800000002")
    ready = h.client.get("/readyz").json()
    assert ready["rules"]["version"] == new_version != version
    assert ready["rules"]["last_reload_error"] is None

    line = break_goto(acme(rules_dir))
    with pytest.raises(RulesInvalid):
        h.rules.load()
    h.say("hi", mobile="13800000003")  # still answered, by the last good rules
    response = h.client.get("/readyz")
    assert response.status_code == 200
    ready = response.json()
    assert ready["status"] == "ok"
    assert ready["rules"]["version"] == new_version
    errors = ready["rules"]["last_reload_error"]
    assert errors
    assert any(f"acme-shop.yaml:{line}:" in error for error in errors), errors

    assert [m["text"] for m in h.wait_settled()] == [MENU_TEXT, NEW_MENU_TEXT, NEW_MENU_TEXT]
    assert h.client.get("/healthz").json() == {"status": "ok"}


def test_running_app_watches_the_rules_folder(make_app: Callable[..., Harness], db_url: str, rules_dir: Path) -> None:
    h = make_app(db_url, watch_rules=True)
    assert h.rules.ruleset is not None
    version = h.rules.ruleset.version
    path = acme(rules_dir)
    changed = path.read_text(encoding="utf-8").replace(MENU_TEXT, NEW_MENU_TEXT)
    deadline = time.monotonic() + 8
    attempt = 0

    def reloaded() -> bool:
        current: object = h.client.get("/readyz").json()["rules"]["version"]
        return current != version

    while not reloaded():  # the watcher may not be ready for the first write: write again until it reacts
        assert time.monotonic() < deadline, "the running app did not pick up the change"
        path.write_text(changed + f"# edit {attempt}\n", encoding="utf-8")
        attempt += 1
        with contextlib.suppress(AssertionError):
            wait_until(reloaded, timeout=0.5)
    h.say("hi")
    assert [m["text"] for m in h.wait_settled()] == [NEW_MENU_TEXT]
