"""The ops console's front door: accounts from ``smsbot users``, login, sessions, CSRF, lockout and roles.

Everything goes through what a person or a script sees: the CLI's output and
exit codes, and the console's HTTP answers (status, redirects, cookies, page
text). Runs on SQLite and PostgreSQL (``db_url``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import select
from typer.testing import CliRunner

from bot.cli import app as cli
from bot.config import Settings
from bot.store.db import make_engine
from bot.store.models import audit_events, login_failures, users
from tests.support import Harness, payload

runner = CliRunner()

PASSWORD = "correct horse battery"
LOGIN_REFUSED = "Wrong name or password, or the account is locked"
HOSTILE = "<script>alert(1)</script>{{ 7*7 }}"


def smsbot(db_url: str, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    result = runner.invoke(cli, list(args), input=stdin, env={"SMSBOT_DATABASE_URL": db_url})
    return result.exit_code, result.stdout, result.stderr


def add_user(db_url: str, name: str, role: str = "viewer", password: str = PASSWORD) -> None:
    code, out, err = smsbot(db_url, "users", "add", name, "--role", role, "--password-stdin", stdin=password + "\n")
    assert code == 0, out + err


def csrf_from(page: httpx.Response) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert found, f"no CSRF field in the page: {page.text[:500]}"
    return found.group(1)


def login(client: TestClient, name: str, password: str = PASSWORD) -> httpx.Response:
    token = csrf_from(client.get("/console/login"))
    response: httpx.Response = client.post(
        "/console/login",
        data={"name": name, "password": password, "csrf_token": token},
        follow_redirects=False,
    )
    return response


def signed_in_page(client: TestClient) -> httpx.Response:
    page: httpx.Response = client.get("/console/conversations", follow_redirects=False)
    assert page.status_code == 200, page.text
    return page


@pytest.fixture(autouse=True)
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The commands run from an empty folder: no config.yaml from the repository."""
    monkeypatch.chdir(tmp_path)


# ---------------------------------------------------------------- smsbot users


def test_users_add_list_passwd_remove(db_url: str) -> None:
    add_user(db_url, "alice", "admin")
    add_user(db_url, "bob")

    code, out, _ = smsbot(db_url, "users", "list", "--json")
    assert code == 0
    listed = [json.loads(line) for line in out.splitlines()]
    assert [(u["name"], u["role"], u["last_login_at"], u["locked_until"]) for u in listed] == [
        ("alice", "admin", None, None),
        ("bob", "viewer", None, None),
    ]
    assert "password" not in out
    assert "argon2" not in out

    code, out, _ = smsbot(db_url, "users", "list")
    assert code == 0
    assert "alice\tadmin" in out
    assert "bob\tviewer" in out

    code, out, err = smsbot(db_url, "users", "passwd", "bob", "--password-stdin", stdin="a new password\n")
    assert code == 0, err
    assert "password of 'bob' changed" in out

    code, out, err = smsbot(db_url, "users", "remove", "alice")
    assert code == 0, err
    code, out, _ = smsbot(db_url, "users", "list", "--json")
    assert [json.loads(line)["name"] for line in out.splitlines()] == ["bob"]


def test_users_add_asks_for_the_password_twice(db_url: str, harness: Harness) -> None:
    code, out, err = smsbot(db_url, "users", "add", "carol", "--role", "viewer", stdin=f"{PASSWORD}\n{PASSWORD}\n")
    assert code == 0, out + err
    assert PASSWORD not in out  # hidden input is not echoed
    assert login(harness.client, "carol").status_code == 303

    code, out, err = smsbot(db_url, "users", "add", "dave", stdin=f"{PASSWORD}\nsomething else\n")
    assert code != 0
    assert "passwords differ" in err
    assert "dave" not in smsbot(db_url, "users", "list")[1]


@pytest.mark.parametrize(
    ("args", "stdin", "problem"),
    [
        (["users", "add", "erin", "--role", "owner", "--password-stdin"], PASSWORD, "unknown role 'owner'"),
        (["users", "add", "alice", "--password-stdin"], PASSWORD, "user 'alice' already exists"),
        (["users", "add", "erin", "--password-stdin"], "short", "password is too short: at least 8"),
        (["users", "add", "erin", "--password-stdin"], "", "password is empty"),
        (["users", "add", "   ", "--password-stdin"], PASSWORD, "user name is empty"),
        (["users", "remove", "nobody"], None, "no user named 'nobody'"),
        (["users", "passwd", "nobody", "--password-stdin"], PASSWORD, "no user named 'nobody'"),
        (["users", "passwd", "alice", "--password-stdin"], "1234567", "password is too short"),
    ],
)
def test_users_commands_name_the_problem(db_url: str, args: list[str], stdin: str | None, problem: str) -> None:
    add_user(db_url, "alice", "admin")
    code, out, err = smsbot(db_url, *args, stdin=None if stdin is None else stdin + "\n")
    assert code != 0
    assert problem in err
    code, out, _ = smsbot(db_url, "users", "list", "--json")
    assert [json.loads(line)["name"] for line in out.splitlines()] == ["alice"]


# ---------------------------------------------------------------- login, logout, anonymous


def test_login_shows_the_console_and_records_the_login(db_url: str, harness: Harness) -> None:
    add_user(db_url, "alice", "admin")
    answer = login(harness.client, "alice")
    assert answer.status_code == 303
    home = harness.client.get("/console/", follow_redirects=False)
    assert home.status_code == 303
    assert home.headers["location"] == "/console/conversations"
    page = signed_in_page(harness.client)
    assert "alice" in page.text
    for label, href in [("Conversations", "/console/conversations"), ("Dashboard", "/console/dashboard")]:
        assert f'href="{href}"' in page.text
        assert label in page.text
    assert harness.client.get("/console/api/me").json() == {"name": "alice", "role": "admin"}

    _code, out, _ = smsbot(db_url, "users", "list", "--json")
    [listed] = [json.loads(line) for line in out.splitlines()]
    assert listed["last_login_at"] == harness.clock().isoformat()
    assert ("alice", "login") in {(r["actor"], r["action"]) for r in harness.rows(audit_events)}


def test_wrong_password_and_unknown_name_get_the_same_answer(db_url: str, harness: Harness) -> None:
    add_user(db_url, "alice")
    wrong = login(harness.client, "alice", "not the password")
    unknown = login(harness.client, "mallory", PASSWORD)
    assert wrong.status_code == unknown.status_code == 401
    assert LOGIN_REFUSED in wrong.text
    assert LOGIN_REFUSED in unknown.text
    assert harness.client.get("/console/conversations", follow_redirects=False).status_code == 303


def test_anonymous_pages_redirect_and_the_api_answers_401(harness: Harness) -> None:
    for path in ("/console/", "/console/conversations", "/console/users"):
        answer = harness.client.get(path, follow_redirects=False)
        assert answer.status_code == 303, path
        assert answer.headers["location"] == "/console/login"
    api = harness.client.get("/console/api/me")
    assert api.status_code == 401
    assert "sign in" in api.json()["detail"]


def test_logout_ends_the_session(db_url: str, harness: Harness) -> None:
    add_user(db_url, "alice")
    login(harness.client, "alice")
    token = csrf_from(signed_in_page(harness.client))
    answer = harness.client.post("/console/logout", data={"csrf_token": token}, follow_redirects=False)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/console/login"
    assert harness.client.get("/console/conversations", follow_redirects=False).status_code == 303
    assert harness.client.get("/console/api/me").status_code == 401


def test_an_old_cookie_is_worthless_after_a_password_change_or_removal(db_url: str, harness: Harness) -> None:
    add_user(db_url, "alice")
    add_user(db_url, "bob")
    login(harness.client, "alice")
    other = TestClient(harness.app)
    login(other, "bob")
    signed_in_page(harness.client)
    signed_in_page(other)

    smsbot(db_url, "users", "passwd", "alice", "--password-stdin", stdin="another password\n")
    smsbot(db_url, "users", "remove", "bob")
    assert harness.client.get("/console/conversations", follow_redirects=False).status_code == 303
    assert other.get("/console/api/me").status_code == 401


def test_a_session_ends_after_its_maximum_age(db_url: str, harness: Harness) -> None:
    add_user(db_url, "alice")
    login(harness.client, "alice")
    harness.clock.advance(timedelta(hours=11, minutes=59))
    signed_in_page(harness.client)
    harness.clock.advance(timedelta(minutes=2))
    assert harness.client.get("/console/conversations", follow_redirects=False).status_code == 303


def test_a_forged_cookie_is_not_a_session(db_url: str, harness: Harness) -> None:
    add_user(db_url, "alice", "admin")
    harness.client.cookies.set("smsbot_console", '{"uid": 1, "at": 0, "fp": "x"}', path="/console")
    assert harness.client.get("/console/api/me").status_code == 401


# ---------------------------------------------------------------- CSRF


def test_posts_without_the_right_csrf_token_are_refused(db_url: str, harness: Harness) -> None:
    add_user(db_url, "alice", "admin")
    harness.client.get("/console/login")
    for data in ({"name": "alice", "password": PASSWORD}, {"name": "alice", "password": PASSWORD, "csrf_token": "x"}):
        refused = harness.client.post("/console/login", data=data, follow_redirects=False)
        assert refused.status_code == 403
        assert "security token (CSRF) is missing or out of date" in refused.text
    assert harness.client.get("/console/api/me").status_code == 401  # not signed in by the refused posts

    login(harness.client, "alice")
    assert harness.client.post("/console/logout", follow_redirects=False).status_code == 403
    assert harness.client.post("/console/logout", data={"csrf_token": "forged"}).status_code == 403
    signed_in_page(harness.client)  # still signed in


def test_the_token_from_before_login_is_replaced_at_login(db_url: str, harness: Harness) -> None:
    add_user(db_url, "alice")
    before = csrf_from(harness.client.get("/console/login"))
    login(harness.client, "alice")
    after = csrf_from(signed_in_page(harness.client))
    assert before != after
    assert harness.client.post("/console/logout", data={"csrf_token": before}).status_code == 403


# ---------------------------------------------------------------- lockout


def test_repeated_failures_lock_the_account_for_a_while(db_url: str, harness: Harness) -> None:
    add_user(db_url, "alice")
    for _ in range(5):
        assert login(harness.client, "alice", "guessing!").status_code == 401
    locked = login(harness.client, "alice", PASSWORD)
    assert locked.status_code == 401
    assert LOGIN_REFUSED in locked.text
    assert locked.text == login(harness.client, "nobody-at-all", PASSWORD).text.replace("nobody-at-all", "alice")
    [address] = harness.rows(login_failures)
    assert address["source"] == "testclient"
    assert address["locked_until"] == harness.clock() + timedelta(minutes=15)

    harness.clock.advance(timedelta(minutes=14))
    assert login(harness.client, "alice", PASSWORD).status_code == 401
    harness.clock.advance(timedelta(minutes=2))
    assert login(harness.client, "alice", PASSWORD).status_code == 303
    assert ("alice", "login.lockout") in {(r["actor"], r["action"]) for r in harness.rows(audit_events)}


def test_a_success_resets_the_failure_count(db_url: str, harness: Harness) -> None:
    add_user(db_url, "alice")
    for _ in range(4):
        login(harness.client, "alice", "guessing!")
    assert login(harness.client, "alice").status_code == 303
    for _ in range(4):
        login(harness.client, "alice", "guessing!")
    assert login(harness.client, "alice").status_code == 303


ATTACKER = "203.0.113.7"
OWNER = "198.51.100.20"


def audited(harness: Harness, action: str) -> list[dict[str, object]]:
    return [r["detail"] for r in harness.rows(audit_events, audit_events.c.action == action)]


def test_failures_from_one_address_lock_only_that_address(db_url: str, harness: Harness) -> None:
    add_user(db_url, "alice", "admin")
    attacker = harness.client_from(ATTACKER)
    for _ in range(5):
        assert login(attacker, "alice", "guessing!").status_code == 401
    assert login(attacker, "alice").status_code == 401

    owner = harness.client_from(OWNER)
    assert login(owner, "alice").status_code == 303
    assert owner.get("/console/api/me").json() == {"name": "alice", "role": "admin"}
    [listed] = [json.loads(line) for line in smsbot(db_url, "users", "list", "--json")[1].splitlines()]
    assert listed["locked_until"] is None  # the account itself is not locked
    assert listed["locked_addresses"] == [ATTACKER]  # but an admin can see why the attacker's address fails
    assert f"locked out from {ATTACKER}" in smsbot(db_url, "users", "list")[1]
    page = owner.get("/console/users")
    assert f"locked out from {ATTACKER}" in page.text
    assert 'action="/console/users/unlock"' in page.text

    assert [d["failures"] for d in audited(harness, "login.failed")] == [1, 2, 3, 4]
    assert {d["source"] for d in audited(harness, "login.failed")} == {ATTACKER}
    [lockout] = audited(harness, "login.lockout")
    assert (lockout["failures"], lockout["source"], lockout["locked"]) == (5, ATTACKER, "source")
    assert audited(harness, "login.locked_source") == [{"source": ATTACKER}]
    assert audited(harness, "login") == [{"source": OWNER}]
    # The owner's success leaves the attacker's lock in place (it removes only the owner's own address row).
    assert [(r["source"], r["locked_until"] is not None) for r in harness.rows(login_failures)] == [(ATTACKER, True)]


def test_a_locked_address_is_refused_even_the_right_password_until_the_lockout_ends(
    db_url: str, harness: Harness
) -> None:
    add_user(db_url, "alice")
    attacker = harness.client_from(ATTACKER)
    for _ in range(5):
        login(attacker, "alice", "guessing!")
    refused = login(attacker, "alice")
    assert refused.status_code == 401
    unknown = login(attacker, "nobody-at-all", PASSWORD)
    assert refused.text == unknown.text.replace("nobody-at-all", "alice")
    assert harness.count(login_failures) == 1  # refusals while locked are not counted, unknown names not stored

    harness.clock.advance(timedelta(minutes=14))
    assert login(attacker, "alice").status_code == 401
    harness.clock.advance(timedelta(minutes=2))
    assert login(attacker, "alice").status_code == 303
    assert harness.count(login_failures) == 0  # a success clears its address's row
    assert [d["source"] for d in audited(harness, "login.locked_source")] == [ATTACKER, ATTACKER]


def test_the_account_ceiling_locks_every_address(db_url: str, make_app: Callable[..., Harness]) -> None:
    harness = make_app(db_url, settings=Settings(console_max_failed_logins_account=4))
    add_user(db_url, "alice")
    for n in range(3):
        assert login(harness.client_from(f"203.0.113.{n + 1}"), "alice", "guessing!").status_code == 401
    # The owner's success does not wipe the others' recent failures: the guessing goes on.
    assert login(harness.client_from(OWNER), "alice").status_code == 303
    assert login(harness.client_from("203.0.113.4"), "alice", "guessing!").status_code == 401

    for address in (OWNER, "192.0.2.99"):
        refused = login(harness.client_from(address), "alice")
        assert refused.status_code == 401
        assert LOGIN_REFUSED in refused.text
    [listed] = [json.loads(line) for line in smsbot(db_url, "users", "list", "--json")[1].splitlines()]
    assert listed["locked_until"] is not None
    [lockout] = audited(harness, "login.lockout")
    assert (lockout["account_failures"], lockout["source"], lockout["locked"]) == (4, "203.0.113.4", "account")
    assert len(audited(harness, "login.locked")) == 2

    harness.clock.advance(timedelta(minutes=16))
    assert login(harness.client_from(OWNER), "alice").status_code == 303


def test_one_address_alone_never_locks_the_account(db_url: str, make_app: Callable[..., Harness]) -> None:
    """However patient: bursts up to its own lock, or just under it, spread over hours."""
    harness = make_app(db_url, settings=Settings(console_max_failed_logins_account=10))
    add_user(db_url, "alice")
    attacker = harness.client_from(ATTACKER)
    for _ in range(6):  # five at a time, waiting out each address lock
        for _ in range(5):
            login(attacker, "alice", "guessing!")
        harness.clock.advance(timedelta(minutes=16))
    for _ in range(6):  # four at a time, never quite locked
        for _ in range(4):
            login(attacker, "alice", "guessing!")
        harness.clock.advance(timedelta(minutes=14))
    assert audited(harness, "login.lockout")
    assert all(d["locked"] == "source" for d in audited(harness, "login.lockout"))
    assert login(harness.client_from(OWNER), "alice").status_code == 303
    [listed] = [json.loads(line) for line in smsbot(db_url, "users", "list", "--json")[1].splitlines()]
    assert listed["locked_until"] is None


def test_a_new_password_or_an_unlock_clears_the_locks(db_url: str, harness: Harness) -> None:
    add_user(db_url, "alice")
    add_user(db_url, "bob")
    add_user(db_url, "root", "admin")
    attacker = harness.client_from(ATTACKER)
    for name in ("alice", "bob"):
        for _ in range(5):
            login(attacker, name, "guessing!")
        login(harness.client_from(OWNER), name, "guessing!")
    assert harness.count(login_failures) == 4

    code, _out, err = smsbot(db_url, "users", "passwd", "alice", "--password-stdin", stdin="a new password\n")
    assert code == 0, err
    assert [r["source"] for r in harness.rows(login_failures)] == [ATTACKER, OWNER]  # bob's only
    assert login(attacker, "alice", "a new password").status_code == 303

    admin = harness.client_from("192.0.2.1")
    assert login(admin, "root").status_code == 303
    page = admin.get("/console/users")
    done = admin.post("/console/users/unlock", data={"name": "bob", "csrf_token": csrf_from(page)})
    assert done.status_code == 200, done.text
    assert harness.count(login_failures) == 0
    assert login(attacker, "bob").status_code == 303


def test_unknown_names_store_nothing(db_url: str, harness: Harness) -> None:
    add_user(db_url, "alice")
    for n in range(20):
        assert login(harness.client_from(f"203.0.113.{n}"), f"invented-{n}", "guessing!").status_code == 401
    assert harness.count(login_failures) == 0
    assert audited(harness, "login.unknown_user")[:2] == [{"source": "203.0.113.0"}, {"source": "203.0.113.1"}]
    assert json.dumps(audited(harness, "login.unknown_user")).count("invented") == 0


def test_removing_a_user_with_failed_logins_removes_their_rows(db_url: str, harness: Harness) -> None:
    add_user(db_url, "alice")
    for _ in range(5):
        login(harness.client_from(ATTACKER), "alice", "guessing!")
    login(harness.client_from(OWNER), "alice", "guessing!")
    assert harness.count(login_failures) == 2
    code, _out, err = smsbot(db_url, "users", "remove", "alice")
    assert code == 0, err
    assert harness.count(login_failures) == 0


def test_stale_failures_are_pruned_when_the_next_is_written(db_url: str, harness: Harness) -> None:
    add_user(db_url, "alice")
    for n in range(3):
        login(harness.client_from(f"203.0.113.{n}"), "alice", "guessing!")
    harness.clock.advance(timedelta(minutes=16))
    login(harness.client_from(ATTACKER), "alice", "guessing!")
    assert [(r["source"], r["failures"]) for r in harness.rows(login_failures)] == [(ATTACKER, 1)]


# ---------------------------------------------------------------- cookie flags


def test_the_session_cookie_is_httponly_samesite_lax_and_scoped_to_the_console(db_url: str, harness: Harness) -> None:
    add_user(db_url, "alice")
    cookie = login(harness.client, "alice").headers["set-cookie"]
    assert "smsbot_console=" in cookie
    assert "httponly" in cookie.lower()
    assert "samesite=lax" in cookie.lower()
    assert "path=/console" in cookie.lower()
    assert "secure" not in cookie.lower()  # plain http: a Secure cookie would never come back


def test_the_session_cookie_is_secure_over_https(db_url: str, harness: Harness) -> None:
    add_user(db_url, "alice")
    client = TestClient(harness.app, base_url="https://testserver")
    answer = login(client, "alice")
    assert answer.status_code == 303
    assert "secure" in answer.headers["set-cookie"].lower()
    signed_in_page(client)


def test_callbacks_carry_no_console_cookie(harness: Harness) -> None:
    answer = harness.client.post("/sms/callback", json=payload("hi", at=harness.next_time()))
    assert answer.status_code == 200
    assert "set-cookie" not in answer.headers


# ---------------------------------------------------------------- roles


def test_viewers_cannot_change_anything_admins_can(db_url: str, harness: Harness) -> None:
    add_user(db_url, "alice", "admin")
    add_user(db_url, "victor", "viewer")
    viewer = TestClient(harness.app)
    login(viewer, "victor")
    assert viewer.get("/console/users").status_code == 403
    token = csrf_from(signed_in_page(viewer))
    refused = viewer.post("/console/users/unlock", data={"name": "victor", "csrf_token": token})
    assert refused.status_code == 403
    assert "only an admin" in refused.text

    for _ in range(3):
        login(TestClient(harness.app), "victor", "guessing!")
    admin = harness.client
    login(admin, "alice")
    users_page = admin.get("/console/users")
    assert users_page.status_code == 200
    assert "3 failed login(s)" in users_page.text
    done = admin.post(
        "/console/users/unlock", data={"name": "victor", "csrf_token": csrf_from(users_page)}, follow_redirects=False
    )
    assert done.status_code == 303
    assert "failed login(s)" not in admin.get("/console/users").text
    assert ("alice", "user.unlock", "victor") in {
        (r["actor"], r["action"], r["target"]) for r in harness.rows(audit_events)
    }


# ---------------------------------------------------------------- escaping


def test_hostile_user_names_are_shown_escaped(db_url: str, harness: Harness) -> None:
    add_user(db_url, HOSTILE, "admin")
    assert login(harness.client, HOSTILE).status_code == 303
    for path in ("/console/conversations", "/console/users"):
        page = harness.client.get(path)
        assert page.status_code == 200
        assert "&lt;script&gt;alert(1)&lt;/script&gt;{{ 7*7 }}" in page.text, path
        assert "<script>alert(1)" not in page.text

    refused = login(TestClient(harness.app), HOSTILE, "wrong password")  # the name is echoed into the form
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in refused.text
    assert "<script>alert(1)" not in refused.text


# ---------------------------------------------------------------- the session key


def test_with_a_configured_secret_sessions_survive_a_restart(db_url: str, make_app: Callable[..., Harness]) -> None:
    settings = Settings(console_secret=SecretStr("a long random string from the environment"))
    first = make_app(db_url, settings=settings)
    add_user(db_url, "alice")
    login(first.client, "alice")
    cookie = first.client.cookies.get("smsbot_console")
    assert cookie

    restarted = TestClient(make_app(db_url, settings=settings).app)
    restarted.cookies.set("smsbot_console", cookie, path="/console")
    assert restarted.get("/console/api/me").json()["name"] == "alice"

    other_key = TestClient(make_app(db_url).app)  # no secret: a random key of its own
    other_key.cookies.set("smsbot_console", cookie, path="/console")
    assert other_key.get("/console/api/me").status_code == 401


def test_the_console_secret_is_refused_in_the_config_file(db_url: str, tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("console_secret: hunter22\n", encoding="utf-8")
    code, _out, err = smsbot(db_url, "users", "list")
    assert code == 2
    assert "SMSBOT_CONSOLE_SECRET" in err


def test_stored_password_hashes_are_argon2id_at_full_cost(db_url: str) -> None:
    """The suite hashes cheaply (see conftest); a real ``smsbot users add`` stores argon2id at RFC 9106 cost."""
    import subprocess
    import sys
    from pathlib import Path

    from argon2 import Type, extract_parameters

    smsbot_cmd = Path(sys.executable).parent / "smsbot"
    env = {**os.environ, "SMSBOT_DATABASE_URL": db_url}
    done = subprocess.run(
        [str(smsbot_cmd), "users", "add", "hana", "--role", "viewer", "--password-stdin"],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            stored = conn.execute(select(users.c.password_hash).where(users.c.name == "hana")).scalar_one()
    finally:
        engine.dispose()
    params = extract_parameters(stored)
    assert (params.type, params.time_cost, params.memory_cost, params.parallelism) == (Type.ID, 3, 65536, 4)
    assert PASSWORD not in stored
