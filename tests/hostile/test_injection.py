"""Customer text that tries to be code: stored verbatim, shown escaped, exported inert, never run.

The texts arrive as Tencent would post them; what is checked is what ops see:
the database row, the console's thread, search and unmatched pages, the CSV
export, the reply a rule renders from the text, and the log lines.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bot.config import Settings
from bot.runtime.logs import setup_logging
from bot.store.models import conversations
from tests.console.test_console_auth import add_user, login
from tests.support import Harness, write_rules

HOSTILE = [
    "{{ 7*7 }}",
    "{% for x in range(3) %}loop{% endfor %}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "'; DROP TABLE messages; --",
    '" OR 1=1 --',
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "\x1b[2J\x1b]0;owned\x07",
]
FORMULAS = ['=HYPERLINK("http://evil.example","x")', "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(A1)", "\t=1", "\r=1"]

ECHO = """\
signature: Echo Shop
templates:
  said: {id: "3000001", text: "You said: {1}"}
start: idle
states:
  idle:
    on:
      - keywords: [NEVER]
        reply: said
        params: ["never"]
otherwise: {reply: said, params: ["{{ text }}"]}
"""


@pytest.fixture
def h(make_app: Callable[..., Harness], db_url: str, rules_dir: Path) -> Harness:
    """The example rules plus an echo rule; a signed-in admin on ``client``."""
    write_rules(rules_dir, "echo.yaml", ECHO)
    harness = make_app(db_url, settings=Settings(param_max_length=200))
    add_user(db_url, "ops", "admin")
    assert login(harness.client, "ops").status_code == 303
    return harness


def _mobile(i: int) -> str:
    return f"1390000{i:04d}"


def test_hostile_text_is_stored_verbatim(h: Harness) -> None:
    for i, text in enumerate(HOSTILE + FORMULAS):
        h.say(text, mobile=_mobile(i), sign="Unknown Shop")
    assert [m["text"] for m in h.inbound()] == HOSTILE + FORMULAS
    assert h.client.get("/readyz").status_code == 200  # and the messages table is still there


def test_a_rule_echoing_the_text_sends_it_literally_never_rendered(h: Harness) -> None:
    for i, text in enumerate(HOSTILE[:4]):
        h.say(text, mobile=_mobile(i), sign="Echo Shop")
    sent = h.wait_settled()
    assert [m["params"] for m in sent] == [[t] for t in HOSTILE[:4]]
    assert [s.text for s in h.sender.sent] == [f"You said: {t}" for t in HOSTILE[:4]]


def _page_texts(h: Harness) -> Iterator[tuple[str, str]]:
    thread_ids = [c["id"] for c in h.rows(conversations)]
    for cid in thread_ids:
        yield f"thread {cid}", h.client.get(f"/console/conversations/{cid}").text
    yield "search", h.client.get("/console/conversations", params={"q": "alert"}).text
    yield "unmatched", h.client.get("/console/unmatched").text


def test_hostile_text_is_shown_escaped_on_the_console(h: Harness) -> None:
    for i, text in enumerate(HOSTILE):
        h.say(text, mobile=_mobile(i))  # the example rules: no keyword matches, so all are unmatched
    pages = list(_page_texts(h))
    assert len(pages) == len(HOSTILE) + 2
    everything = "\n".join(text for _name, text in pages)
    for name, page in pages:
        assert "<script>alert(1)</script>" not in page, name
        assert "<img src=x" not in page, name
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in everything
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in everything
    assert "{{ 7*7 }}" in everything  # shown as typed, not evaluated
    assert dict(pages)["search"].count('href="/console/conversations/') >= 2  # the search found both alerts


def test_the_csv_export_defuses_formulas(h: Harness) -> None:
    for i, text in enumerate(FORMULAS + HOSTILE[3:4]):
        h.say(text, mobile=_mobile(i), sign="Unknown Shop")
    day = h.clock().date().isoformat()
    response = h.client.get("/console/export/download", params={"since": day, "until": day, "format": "csv"})
    assert response.status_code == 200
    assert all(line.count(",") >= 20 for line in response.text.split("\r\n") if line)  # no row broken by a CR
    exported = [r["text"] for r in csv.DictReader(io.StringIO(response.text, newline="")) if r["direction"] == "in"]
    assert exported == ["'" + t for t in FORMULAS] + [HOSTILE[3]]
    jsonl = h.client.get("/console/export/download", params={"since": day, "until": day, "format": "jsonl"})
    assert FORMULAS[0].replace('"', '\\"') in jsonl.text  # JSON lines keep the text as it was


def test_log_lines_carry_no_raw_control_characters(h: Harness) -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    handler = setup_logging(stream=stream)
    try:
        h.say(
            "hi", sign="Evil\x1b[2J\x1b]0;owned\x07 Shop", mobile=_mobile(1)
        )  # its text and sign pass the request log
        bad = b'[{"sid": "x\\u001b[2J", "report_status": "MAYBE"}]'  # logged: an odd report, skipped
        assert h.client.post("/sms/status", content=bad).status_code == 200
        logging.getLogger("smsbot.test").warning("customer said %s", "\x1b]0;title\x07\rFAKE LINE")
    finally:
        root.removeHandler(handler)
    out = stream.getvalue()
    assert "delivery report [0] skipped" in out
    assert "\\x1b]0;title\\x07\\x0dFAKE LINE" in out
    for control in ("\x1b", "\x07", "\r"):
        assert control not in out, repr(out)
