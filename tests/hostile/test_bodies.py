"""Hostile bodies on every route that reads one: a clear 4xx naming the problem, and nothing stored.

Complements ``tests/web/test_callback_errors.py`` (which has truncated JSON, invalid
UTF-8, mistyped fields and absurd times for the reply callback) with what it
lacks: nesting deep enough to break Python's parser, bodies of megabytes, text
past the field limit, NUL and lone surrogates where they cannot be cleaned, and
the same attacks on the status callback and ``/api/v1``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from bot.config import Settings
from bot.store.models import Base, audit_events
from bot.web.app import RESULT_BAD_REQUEST, RESULT_TOO_LARGE
from tests.api.helpers import api_rules, auth, new_key, start_body
from tests.support import Harness, count, payload

DEEP = b"[" * 100_000 + b"]" * 100_000
JSON = {"content-type": "application/json"}
TEN_MB = b'{"text": "' + b"x" * 10_000_000 + b'"}'


def tables(h: Harness) -> dict[str, int]:
    return {t.name: count(h.engine, t) for t in Base.metadata.sorted_tables if t is not audit_events}


def refused(h: Harness, send: Callable[[], httpx.Response], status: int, *needles: str) -> dict[str, Any]:
    before = tables(h)
    response = send()
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    text = str(body.get("errmsg", body.get("detail", "")))
    for needle in needles:
        assert needle in text, body
    assert tables(h) == before
    return body


@pytest.fixture
def roomy(make_app: Callable[..., Harness], db_url: str, tmp_path: Path) -> Harness:
    """Callbacks may be up to 20 MB here, so what is checked is the parser, not the size limit."""
    return make_app(db_url, rules_path=api_rules(tmp_path / "r"), settings=Settings(max_body_bytes=20_000_000))


@pytest.fixture
def default(make_app: Callable[..., Harness], db_url: str, tmp_path: Path) -> Harness:
    return make_app(db_url, rules_path=api_rules(tmp_path / "r"))


# ---------------------------------------------------------------- Tencent's callbacks


@pytest.mark.parametrize("route", ["/sms/callback", "/sms/status"])
def test_deep_nesting_is_a_400_not_a_recursion_error(roomy: Harness, route: str) -> None:
    body = refused(roomy, lambda: roomy.client.post(route, content=DEEP, headers=JSON), 400, "nested too deeply")
    assert body["result"] == RESULT_BAD_REQUEST
    assert roomy.client.get("/readyz").status_code == 200


def test_deep_nesting_within_the_default_limit_is_a_400(default: Harness) -> None:
    depth = 30_000  # 60,000 bytes: under the 64 KiB limit, far over Python's recursion limit
    body = b"[" * depth + b"]" * depth
    refused(default, lambda: default.post(body), 400, "nested too deeply")


@pytest.mark.parametrize("route", ["/sms/callback", "/sms/status"])
def test_a_10_mb_body_is_413(default: Harness, route: str) -> None:
    body = refused(default, lambda: default.client.post(route, content=TEN_MB, headers=JSON), 413, "65536 bytes")
    assert body["result"] == RESULT_TOO_LARGE


def test_a_100000_character_text_is_refused_by_size_then_by_length(default: Harness, roomy: Harness) -> None:
    long = "退" * 100_000
    refused(default, lambda: default.post(payload(long, at=default.next_time())), 413, "larger than")
    refused(roomy, lambda: roomy.post(payload(long, at=roomy.next_time())), 400, "'text'", "4096")


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'"mobile": "1380000\\u00000"', "mobile"),
        (b'"mobile": "\\ud800"', "mobile"),
        (b'"nationcode": "8\\u00006"', "nationcode"),
    ],
    ids=["nul-in-mobile", "surrogate-in-mobile", "nul-in-nationcode"],
)
def test_nul_and_surrogates_in_numbers_are_400_naming_the_field(default: Harness, raw: bytes, field: str) -> None:
    h = default
    good = b'{"sign": "Acme Shop", "text": "hi", "extend": "", "time": %d, ' % h.next_time()
    defaults = {b"mobile": b'"mobile": "13800000000"', b"nationcode": b'"nationcode": "86"'}
    rest = b", ".join(v for k, v in defaults.items() if not raw.startswith(b'"' + k))
    refused(h, lambda: h.post(good + raw + b", " + rest + b"}"), 400, f"'{field}'")


def test_a_raw_nul_byte_is_not_json(default: Harness) -> None:
    h = default
    body = b'{"mobile": "13800000000", "nationcode": "86", "sign": "Acme Shop", "text": "hi\x00", "time": %d}'
    refused(h, lambda: h.post(body % h.next_time()), 400, "not JSON")


@pytest.mark.parametrize(
    "mobile", ["138 0000 0000", "abc", "13800000000\n", "١٣٨٠٠٠٠٠٠٠٠", "１３８００００００００", "+-1", "0x1F"]
)
def test_non_digit_mobiles_are_400(default: Harness, mobile: str) -> None:
    h = default
    refused(h, lambda: h.post(payload("hi", at=h.next_time(), mobile=mobile)), 400, "'mobile'")


def test_nul_and_surrogates_in_a_status_report_do_not_look_like_an_outage(default: Harness) -> None:
    """PostgreSQL cannot compare such text: the report is unknown (logged), Tencent hears OK, not 503."""
    h = default
    body = b'[{"sid": "\\u0000", "report_status": "FAIL", "errmsg": "\\ud800", "mobile": {"a": "\\ud83d"}}]'
    response = h.client.post("/sms/status", content=body, headers=JSON)
    assert response.status_code == 200, response.text
    assert response.json() == {"result": 0, "errmsg": "OK"}


# ---------------------------------------------------------------- /api/v1


@pytest.fixture
def api(default: Harness) -> tuple[Harness, dict[str, str]]:
    return default, {**auth(new_key(default.engine)), **JSON}


VARS = "/api/v1/conversations/Acme Shop/86/13800000001/vars"


@pytest.mark.parametrize(
    ("method", "path", "content", "field", "needle"),
    [
        ("POST", "/api/v1/conversations", DEEP, "body", "nested too deeply"),
        ("POST", "/api/v1/conversations:batch", DEEP, "body", "nested too deeply"),
        ("PUT", VARS, DEEP, "body", "nested too deeply"),
        ("POST", "/api/v1/conversations", b'{"signature": "\xff"}', "body", "not valid UTF-8"),
        ("POST", "/api/v1/conversations", b'{"signature": "Acme', "body", "not JSON"),
        ("PUT", VARS, b'{"order": "A\\u00001"}', "vars.order", "NUL"),
        ("PUT", VARS, b'{"order": "\\ud800"}', "vars.order", "surrogate"),
    ],
    ids=["deep", "deep-batch", "deep-vars", "not-utf8", "truncated", "nul-in-vars", "surrogate-in-vars"],
)
def test_unreadable_api_bodies_are_422_naming_the_problem(
    api: tuple[Harness, dict[str, str]], method: str, path: str, content: bytes, field: str, needle: str
) -> None:
    h, headers = api
    body = refused(h, lambda: h.client.request(method, path, content=content, headers=headers), 422, needle)
    assert body["error"] == "invalid"
    assert body["field"] == field


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"params": ["A\x001", "10:00"]}, "params"),
        ({"vars": {"appointment_id": "A\x00"}}, "vars"),
        ({"idempotency_key": "k\x00"}, "idempotency_key"),
        ({"mobile": 13800000001}, "mobile"),
        ({"mobile": "1380000000a"}, "mobile"),
        ({"signature": ["Acme Shop"]}, "signature"),
    ],
    ids=["nul-param", "nul-var", "nul-key", "number-mobile", "letter-in-mobile", "list-signature"],
)
def test_bad_start_values_are_422_naming_the_field(
    api: tuple[Harness, dict[str, str]], change: dict[str, Any], field: str
) -> None:
    h, headers = api
    post = lambda: h.client.post("/api/v1/conversations", json=start_body(**change), headers=headers)  # noqa: E731
    body = refused(h, post, 422)
    assert body["field"] == field


def test_a_nul_in_the_url_is_422_naming_the_part(api: tuple[Harness, dict[str, str]]) -> None:
    h, headers = api
    body = refused(h, lambda: h.client.get("/api/v1/conversations/Acme%00Shop/86/13800000001", headers=headers), 422)
    assert body["field"] == "signature"


def test_a_10_mb_api_body_is_413_before_parsing(api: tuple[Harness, dict[str, str]]) -> None:
    h, headers = api
    for path in ("/api/v1/conversations", "/api/v1/conversations:batch"):
        body = refused(h, lambda p=path: h.client.post(p, content=TEN_MB, headers=headers), 413, "larger than")
        assert body["field"] == "body"


def test_a_bad_body_without_a_key_is_401_not_422(default: Harness) -> None:
    """Who asks is checked first: without a key, nothing is said about the body."""
    h = default
    for content in (DEEP, b"{", b'{"mobile": 1}'):
        body = refused(h, lambda c=content: h.client.post("/api/v1/conversations", content=c, headers=JSON), 401)
        assert body["error"] == "unauthorized"
    bad_key = {**JSON, "Authorization": "Bearer not-a-key"}
    refused(h, lambda: h.client.post("/api/v1/conversations", content=b"{", headers=bad_key), 401, "unknown")


def test_a_full_batch_still_fits(api: tuple[Harness, dict[str, str]]) -> None:
    """The size limit is far above a real batch: 1,000 starts with vars go through."""
    h, headers = api
    items = [start_body(mobile=f"139{i:08d}", vars={"appointment_id": "A17", "note": "x" * 900}) for i in range(1000)]
    response = h.client.post("/api/v1/conversations:batch", json={"items": items}, headers=headers)
    assert response.status_code == 200, response.text[:300]
    assert {r["status"] for r in response.json()["results"]} == {202}
