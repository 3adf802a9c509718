"""Bad callbacks: a non-2xx status, a non-zero ``result``, an ``errmsg`` naming the problem, and nothing stored."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, create_engine

from bot.config import Settings
from bot.store.db import upgrade
from bot.store.models import messages
from bot.web.app import RESULT_BAD_REQUEST, RESULT_TOO_LARGE, RESULT_UNAUTHORIZED, RESULT_UNAVAILABLE
from tests.support import (
    NOTHING_STORED,
    FakeClock,
    Harness,
    copy_rules,
    fail_inserts_into_outbox,
    payload,
    start_app,
    stop_app,
    store_again,
    stored_counts,
)


def rejected(h: Harness, send: Callable[[], httpx.Response], status: int, result: int, *needles: str) -> str:
    """Send, then check the status, ``result``, ``errmsg`` and that no table gained or lost a row."""
    before = stored_counts(h.engine)
    sent = len(h.sender.sent)
    response = send()
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"result", "errmsg"}
    assert body["result"] == result != 0
    for needle in needles:
        assert needle in body["errmsg"], body["errmsg"]
    assert stored_counts(h.engine) == before
    assert len(h.sender.sent) == sent
    return str(body["errmsg"])


def assert_rejected(h: Harness, body: Any, status: int, result: int, *needles: str, token: str | None = None) -> str:
    return rejected(h, lambda: h.post(body, token=token), status, result, *needles)


# ---------------------------------------------------------------- apps
# Tests that only send requests which must be refused share one app (and
# database) per backend in this module: nothing may be stored, and each
# test checks that no row appeared. Tests that expect a request to be
# accepted get a fresh app and database of their own.


@contextlib.contextmanager
def running(url: str, tmp: Path, settings: Settings) -> Iterator[Harness]:
    h = start_app(url, clock=FakeClock(), rules_path=copy_rules(tmp), settings=settings, deliver=False)
    try:
        yield h
    finally:
        stop_app(h.client, h.app)
        h.engine.dispose()


@pytest.fixture(scope="module")
def rejecting(module_db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    with running(module_db_url, tmp_path_factory.mktemp("rules"), Settings()) as h:
        yield h


@pytest.fixture(scope="module")
def small(module_db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    with running(module_db_url, tmp_path_factory.mktemp("rules"), Settings(max_body_bytes=1024)) as h:
        yield h


@pytest.fixture(scope="module")
def guarded(module_db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    with running(module_db_url, tmp_path_factory.mktemp("rules"), Settings(callback_token="s3cret-token")) as h:
        yield h


def good(h: Harness, **changes: Any) -> dict[str, Any]:
    return payload("hi", at=h.next_time()) | changes


def without(data: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != key}


# ---------------------------------------------------------------- not JSON, not UTF-8


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"hello", "not JSON"),
        (b"", "not JSON"),
        (b'{"mobile": "13800000000",', "not JSON"),
        (b"mobile=13800000000&text=hi", "not JSON"),
    ],
    ids=["word", "empty", "truncated", "form-encoded"],
)
def test_not_json(rejecting: Harness, body: bytes, needle: str) -> None:
    assert_rejected(rejecting, body, 400, RESULT_BAD_REQUEST, needle)


def test_not_utf8(rejecting: Harness) -> None:
    h = rejecting
    body = json.dumps(good(h, text="退订"), ensure_ascii=False).encode("gb18030")
    errmsg = assert_rejected(h, body, 400, RESULT_BAD_REQUEST, "UTF-8")
    assert "byte" in errmsg


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("null", "expected a JSON object"),
        ('"hi"', "expected a JSON object"),
        ("[]", "empty array"),
        ("[[]]", "[0]"),
    ],
    ids=["null", "string", "empty-array", "nested-array"],
)
def test_json_that_is_not_a_callback(rejecting: Harness, body: str, needle: str) -> None:
    assert_rejected(rejecting, body, 400, RESULT_BAD_REQUEST, needle)


# ---------------------------------------------------------------- fields


@pytest.mark.parametrize("field", ["mobile", "nationcode", "sign", "text", "time"])
def test_missing_field(rejecting: Harness, field: str) -> None:
    h = rejecting
    assert_rejected(h, without(good(h), field), 400, RESULT_BAD_REQUEST, f"'{field}'", "missing")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("time", "1457336869"),
        ("time", True),
        ("time", None),
        ("mobile", 13800000000),
        ("nationcode", 86),
        ("text", 1),
        ("sign", ["Acme Shop"]),
        ("extend", 0),
    ],
    ids=[
        "time-string",
        "time-bool",
        "time-null",
        "mobile-number",
        "nationcode-number",
        "text-number",
        "sign-list",
        "extend-number",
    ],
)
def test_mistyped_field(rejecting: Harness, field: str, value: object) -> None:
    h = rejecting
    assert_rejected(h, good(h, **{field: value}), 400, RESULT_BAD_REQUEST, f"'{field}'")


@pytest.mark.parametrize(
    ("field", "value"),
    [("mobile", ""), ("mobile", "138-0000-0000"), ("mobile", "1" * 40), ("nationcode", ""), ("sign", "")],
    ids=["empty-mobile", "mobile-with-dashes", "mobile-too-long", "empty-nationcode", "empty-sign"],
)
def test_invalid_value(rejecting: Harness, field: str, value: str) -> None:
    h = rejecting
    assert_rejected(h, good(h, **{field: value}), 400, RESULT_BAD_REQUEST, f"'{field}'")


@pytest.mark.parametrize(
    "when",
    [
        lambda now: 0,
        lambda now: -1,
        lambda now: 1_000_000_000,  # 2001: before SMS replies could reach us
        lambda now: now + int(timedelta(days=30).total_seconds()),
        lambda now: now * 1000,  # milliseconds instead of seconds
        lambda now: 10**30,
    ],
    ids=["zero", "negative", "year-2001", "next-month", "milliseconds", "huge"],
)
def test_absurd_timestamp(rejecting: Harness, when: Callable[[int], int]) -> None:
    h = rejecting
    at = when(int(h.clock().timestamp()))
    errmsg = assert_rejected(h, good(h, time=at), 400, RESULT_BAD_REQUEST, "'time'")
    assert "Unix time" in errmsg or "integer" in errmsg


def test_bad_item_in_array_is_named_by_index(rejecting: Harness) -> None:
    h = rejecting
    body = [good(h), good(h), without(good(h), "mobile")]
    assert_rejected(h, body, 400, RESULT_BAD_REQUEST, "[2].mobile", "missing")


def test_every_problem_of_an_item_is_reported(rejecting: Harness) -> None:
    h = rejecting
    errmsg = assert_rejected(h, {"time": "now", "mobile": ""}, 400, RESULT_BAD_REQUEST)
    for field in ("time", "mobile", "nationcode", "sign", "text"):
        assert f"'{field}'" in errmsg


# ---------------------------------------------------------------- size


def test_body_over_limit_is_rejected_with_413(small: Harness) -> None:
    h = small
    body = good(h, text="x" * 2000)
    assert_rejected(h, body, 413, RESULT_TOO_LARGE, "1024")


def test_body_over_limit_is_rejected_before_parsing(small: Harness) -> None:
    """Not JSON, but too big: the size is what is reported, so the body was never parsed."""
    assert_rejected(small, b"\xff" * 5000, 413, RESULT_TOO_LARGE, "1024")


def test_chunked_body_over_limit_without_content_length(small: Harness) -> None:
    h = small
    chunks = [json.dumps(good(h, text="x" * 2000)).encode()[i : i + 100] for i in range(0, 2200, 100)]
    headers = {"content-type": "application/json"}
    rejected(
        h,
        lambda: h.client.post("/sms/callback", content=iter(chunks), headers=headers),
        413,
        RESULT_TOO_LARGE,
        "1024",
    )


def test_body_just_under_limit_is_accepted(make_app: Callable[..., Harness], db_url: str) -> None:
    h = make_app(db_url, settings=Settings(max_body_bytes=1024))
    body = good(h)
    encoded = json.dumps(body).encode()
    body["text"] = "hi" + " " * (1024 - len(encoded) - 1)  # trailing spaces do not change the meaning
    assert len(json.dumps(body).encode()) <= 1024
    assert h.post(body).status_code == 200
    assert len(h.wait_settled()) == 1


def test_default_limit_is_64_kib() -> None:
    assert Settings().max_body_bytes == 64 * 1024


# ---------------------------------------------------------------- token


@pytest.mark.parametrize("token", [None, "", "wrong", "s3cret-toke", "s3cret-token-and-more", "S3CRET-TOKEN"])
def test_missing_or_wrong_token_is_401(guarded: Harness, token: str | None) -> None:
    h = guarded
    assert_rejected(h, good(h), 401, RESULT_UNAUTHORIZED, "token", token=token)


def test_token_is_checked_before_the_body(guarded: Harness) -> None:
    h = guarded
    assert_rejected(h, b"not json", 401, RESULT_UNAUTHORIZED, "token", token="wrong")


def test_right_token_is_accepted(make_app: Callable[..., Harness], db_url: str) -> None:
    h = make_app(db_url, settings=Settings(callback_token="s3cret-token"))
    response = h.post(good(h), token="s3cret-token")
    assert response.status_code == 200
    assert response.json() == {"result": 0, "errmsg": "OK"}
    assert len(h.wait_settled()) == 1


def test_token_from_the_environment(
    make_app: Callable[..., Harness], db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMSBOT_CALLBACK_TOKEN", "from-env")
    h = make_app(db_url, settings=Settings())
    assert_rejected(h, good(h), 401, RESULT_UNAUTHORIZED)
    assert h.post(good(h), token="from-env").status_code == 200


# ---------------------------------------------------------------- database unavailable


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def unreachable_url(backend: str, tmp_path: Path) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'no-such-dir' / 'smsbot.db'}"
    return f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/test?connect_timeout=2"


def test_database_unavailable_is_503_and_retry_works(
    make_app: Callable[..., Harness], unreachable_url: str, tmp_path: Path
) -> None:
    h = make_app(unreachable_url, deliver=False)  # only the callback path is under test
    body = good(h)
    response = h.post(body)
    assert response.status_code == 503
    assert response.json()["result"] == RESULT_UNAVAILABLE
    assert "database" in response.json()["errmsg"]
    ready = h.client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["database"].startswith("unavailable")
    assert h.client.get("/healthz").status_code == 200
    if h.engine.dialect.name == "sqlite":  # the database comes back: Tencent's retry is stored once
        (tmp_path / "no-such-dir").mkdir()
        upgrade(unreachable_url)
        assert h.post(body).status_code == 200
        assert [m["status"] for m in h.outbound()] == ["queued"]
        assert stored_counts(h.engine) == {
            "contacts": 1,
            "conversations": 1,
            "messages": 2,
            "outbox": 1,
            "opt_out_events": 0,
        }


@pytest.fixture
def admin_engine(db_url: str) -> Iterator[Engine]:
    eng = create_engine(db_url)
    yield eng
    eng.dispose()


def test_failure_midway_leaves_nothing_half_written(harness: Harness, admin_engine: Engine) -> None:
    """Contact, conversation, inbound and outbound rows were written before the failure; all are rolled back."""
    h = harness
    h.say("hi", mobile="13900000000")  # another number's conversation, committed before the failure
    h.wait_settled()
    before = stored_counts(h.engine)
    fail_inserts_into_outbox(admin_engine)
    body = [good(h), good(h, text="1")]
    response = h.post(body)
    assert response.status_code == 503
    assert response.json()["result"] == RESULT_UNAVAILABLE
    assert stored_counts(h.engine) == before

    store_again(admin_engine)
    assert h.post(body).status_code == 200  # Tencent's retry
    assert [m["text"] for m in h.inbound()] == ["hi", "hi", "1"]
    assert len(h.wait_settled()) == 3
    assert h.count(messages, messages.c.status == "sent") == 3


# ---------------------------------------------------------------- odd but valid text


def test_blank_sign_is_rejected(harness: Harness) -> None:
    """A signature of spaces is as good as none; it must not be stored as the empty signature."""
    h = harness
    assert_rejected(h, good(h, sign="   "), 400, RESULT_BAD_REQUEST, "'sign'")


def test_lone_surrogate_in_text_is_stored(harness: Harness) -> None:
    """Half an emoji from a broken client cannot be encoded as UTF-8; it is replaced, not refused forever."""
    h = harness
    response = h.post(
        b'{"extend": "", "mobile": "13800000000", "nationcode": "86", "sign": "Acme Shop", '
        b'"text": "hi \\ud83d", "time": %d}' % h.next_time()
    )
    assert response.status_code == 200, response.text
    [inbound] = h.inbound()
    assert inbound["text"] == "hi \ufffd"


@pytest.mark.parametrize("field", ["text", "sign", "extend"])
def test_nul_character_is_not_a_database_outage(harness: Harness, field: str) -> None:
    """PostgreSQL text cannot hold U+0000: the callback must be stored (cleaned) or refused with 400, never 503.

    A 503 makes Tencent retry a message that can never be stored, and tells
    ops the database is down when it is not.
    """
    h = harness
    value = {"text": "TD\x00", "sign": "Acme\x00 Shop", "extend": "\x00"}[field]
    response = h.post(good(h, **{field: value}))
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert f"'{field}'" in response.json()["errmsg"]
        assert stored_counts(h.engine) == NOTHING_STORED
    else:
        assert len(h.inbound()) == 1
