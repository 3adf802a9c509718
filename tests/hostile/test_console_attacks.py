"""The console against an attacker: session fixation, CSRF on every POST, export file names, open redirects.

Brute force has its tests in ``tests/console/test_console_auth.py`` (lockout per
address and per account, the same answer for every refusal, unlocks).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from starlette.routing import BaseRoute

from bot.console.web import COOKIE
from bot.store.models import Base, audit_events
from tests.console.test_console_auth import PASSWORD, add_user, csrf_from, login
from tests.support import Harness, count


def tables(h: Harness) -> dict[str, int]:
    return {t.name: count(h.engine, t) for t in Base.metadata.sorted_tables if t is not audit_events}


def console_posts(routes: list[BaseRoute]) -> Iterator[str]:
    for route in routes:
        original = getattr(route, "original_router", None)
        if original is not None:
            yield from console_posts(original.routes)
        elif getattr(route, "path", "").startswith("/console") and "POST" in (getattr(route, "methods", None) or ()):
            yield route.path  # type: ignore[attr-defined]


@pytest.fixture
def admin(harness: Harness, db_url: str) -> Harness:
    add_user(db_url, "ops", "admin")
    assert login(harness.client, "ops").status_code == 303
    harness.say("hi")
    harness.wait_settled()  # the delivery loop must not change a table while a refusal is checked
    return harness


# ---------------------------------------------------------------- session fixation


def test_the_session_cookie_changes_at_login_and_one_from_before_is_not_a_session(
    harness: Harness, db_url: str
) -> None:
    add_user(db_url, "ops", "admin")
    victim = harness.client
    victim.get("/console/login")
    planted = victim.cookies.get(COOKIE)  # what an attacker could have fixed in the victim's browser
    assert planted
    assert login(victim, "ops").status_code == 303
    assert victim.cookies.get(COOKIE) != planted
    assert victim.get("/console/api/me").json()["name"] == "ops"

    attacker = TestClient(harness.app, raise_server_exceptions=False)
    attacker.cookies.set(COOKIE, planted, path="/console")
    assert attacker.get("/console/api/me").status_code == 401
    assert attacker.get("/console/conversations", follow_redirects=False).headers["location"] == "/console/login"


# ---------------------------------------------------------------- CSRF


def test_every_console_post_without_or_with_a_wrong_csrf_token_is_refused(admin: Harness) -> None:
    h = admin
    posts = sorted(set(console_posts(h.app.routes)))
    assert len(posts) >= 8, posts  # login, logout, opt-outs add/remove, retry, simulator, caps, unlock
    for path in posts:
        url = re.sub(r"{\w+}", "1", path)
        for data in ({}, {"csrf_token": "forged"}, {"csrf_token": ""}):
            before = tables(h)
            form = {"name": "ops", "password": PASSWORD, "number": "13800000000", "conversation_id": "1", **data}
            refused = h.client.post(url, data=form, follow_redirects=False)
            assert refused.status_code == 403, (url, data, refused.status_code)
            assert "CSRF" in refused.text
            assert tables(h) == before, url
        header = h.client.post(url, headers={"X-CSRF-Token": "forged"}, follow_redirects=False)
        assert header.status_code == 403, url
    assert h.client.get("/console/api/me").json()["name"] == "ops"  # not signed out by the refused logout


# ---------------------------------------------------------------- export file names


@pytest.mark.parametrize(
    "params",
    [
        {"since": "../../etc/passwd", "until": "2026-01-01"},
        {"since": "2026-01-01\r\nSet-Cookie: x=1", "until": "2026-01-02"},
        {"since": "2026-01-01", "until": "2026-01-02", "signature": '../../x"\r\nX-Evil: 1'},
        {"since": "2026-01-01", "until": "2026-01-02", "format": "../../csv"},
    ],
    ids=["dotdot-date", "crlf-date", "hostile-signature", "hostile-format"],
)
def test_export_file_names_carry_no_path_or_header_break(admin: Harness, params: dict[str, str]) -> None:
    response = admin.client.get("/console/export/download", params=params)
    assert response.status_code in (200, 400)
    assert "x-evil" not in response.headers
    assert "x=1" not in response.headers.get("set-cookie", "")
    if response.status_code == 200:
        disposition = response.headers["content-disposition"]
        assert re.fullmatch(r'attachment; filename="smsbot-messages-\d{8}-\d{8}\.(csv|jsonl)"', disposition)


# ---------------------------------------------------------------- open redirects


@pytest.mark.parametrize(
    "target", ["https://evil.example", "//evil.example", "/\\evil.example", "javascript:alert(1)", "http:evil.example"]
)
def test_login_never_redirects_off_the_console(harness: Harness, db_url: str, target: str) -> None:
    add_user(db_url, "ops", "admin")
    client = harness.client
    token = csrf_from(client.get("/console/login", params={"next": target}))
    for params, extra in (({"next": target}, {}), ({}, {"next": target}), ({"return_to": target}, {})):
        response = client.post(
            "/console/login",
            params=params,
            data={"name": "ops", "password": PASSWORD, "csrf_token": token, **extra},
            follow_redirects=False,
        )
        assert response.status_code == 303
        assert response.headers["location"] == "/console/"
        token = csrf_from(client.get("/console/conversations"))
        client.post("/console/logout", data={"csrf_token": token})
        token = csrf_from(client.get("/console/login"))
    page = client.get("/console/login", params={"next": target})
    assert target not in page.text or "evil" not in page.text


# ---------------------------------------------------------------- odd numbers in URLs (found by the fuzz test)


@pytest.mark.parametrize("page", ["184467440737095518", "²", "-1", "0", "9" * 40])
def test_absurd_page_numbers_show_a_page_not_a_500(admin: Harness, page: str) -> None:
    for path in ("/console/opt-outs", "/console/deliveries"):
        response = admin.client.get(path, params={"page": page})
        assert response.status_code == 200, (path, page, response.text[:300])


@pytest.mark.parametrize("conversation_id", ["²", "9" * 40, "-1", "1e3"])
def test_odd_conversation_ids_are_a_404(admin: Harness, conversation_id: str) -> None:
    response = admin.client.get(f"/console/conversations/{conversation_id}")
    assert response.status_code == 404
    assert "there is no conversation" in response.text
