"""``smsbot export``: what ops get in the file, on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

import bot.store.export
from bot.cli import app
from bot.store.export import COLUMNS
from bot.store.models import messages
from tests.support import MOBILE, SIGN, Harness

runner = CliRunner()


@pytest.fixture
def conversation(harness: Harness, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Harness:
    """Two days of messages: MENU and 1 on day one (Acme Shop), a number-bearing text on day two (another sign)."""
    monkeypatch.chdir(tmp_path)  # no config.yaml from the developer's checkout
    monkeypatch.setenv("SMSBOT_DATABASE_URL", str(harness.engine.url.render_as_string(hide_password=False)))
    harness.say("MENU")
    harness.say("1")
    harness.wait_settled()
    harness.clock.advance(timedelta(days=2))
    harness.say("call me on 13912345678 =HYPERLINK(x)", sign="Other Shop", mobile="13700001111")
    harness.wait_settled()
    return harness


def export(*args: str) -> Result:
    return runner.invoke(app, ["export", *args])


def day(h: Harness, offset: int = 0) -> str:
    return (h.clock() + timedelta(days=offset)).date().isoformat()


def csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def everything(h: Harness, *extra: str) -> Result:
    result = export("--since", day(h, -3), "--until", day(h), *extra)
    assert result.exit_code == 0, result.output
    return result


def test_csv_has_every_message_in_and_out_with_the_bots_reasons(conversation: Harness) -> None:
    h = conversation
    result = everything(h)
    rows = csv_rows(result.stdout)
    assert tuple(csv.reader(io.StringIO(result.stdout)).__next__()) == COLUMNS
    stored = h.rows(messages)
    assert [r["id"] for r in rows] == [str(m["id"]) for m in stored]
    menu_reply = next(r for r in rows if r["direction"] == "out" and r["template_id"] == "1490001")
    assert menu_reply["signature"] == SIGN
    assert menu_reply["rule"].startswith("acme-shop.yaml:")  # file:line of the rule that fired
    assert menu_reply["state_before"] == ""  # a new conversation
    assert menu_reply["state_after"] == "menu"
    assert menu_reply["status"] == "sent"
    assert menu_reply["provider_serial"].startswith("test:")
    status_reply = next(r for r in rows if r["template_id"] == "1490002")
    assert json.loads(status_reply["params"]) == ["none", "sent"]
    assert (status_reply["state_before"], status_reply["state_after"]) == ("menu", "menu")
    assert "smsbot export: " in result.stderr
    assert f"{len(rows)} message(s)" in result.stderr


def test_numbers_are_masked_unless_revealed(conversation: Harness) -> None:
    h = conversation
    masked = csv_rows(everything(h).stdout)
    assert {r["mobile"] for r in masked} == {"138****0000", "137****1111"}
    assert MOBILE not in everything(h).stdout
    typed = next(r for r in masked if r["text"].startswith("call me"))
    assert "13912345678" not in typed["text"]
    assert "139****5678" in typed["text"]

    revealed = csv_rows(everything(h, "--reveal").stdout)
    assert {r["mobile"] for r in revealed} == {MOBILE, "13700001111"}
    assert any("13912345678" in r["text"] for r in revealed)


def test_csv_cells_a_spreadsheet_would_run_as_formulas_are_quoted(conversation: Harness) -> None:
    rows = csv_rows(everything(conversation, "--reveal").stdout)
    assert all(not r["text"].startswith("=") for r in rows)
    jsonl = [json.loads(line) for line in everything(conversation, "--format", "jsonl").stdout.splitlines()]
    assert any("=HYPERLINK(x)" in r["text"] for r in jsonl)  # JSON lines keep the text as it came


def test_jsonl_one_object_per_message_with_native_types(conversation: Harness) -> None:
    h = conversation
    lines = everything(h, "--format", "jsonl").stdout.splitlines()
    objects = [json.loads(line) for line in lines]
    assert len(objects) == h.count(messages)
    assert all(set(o) == set(COLUMNS) for o in objects)
    reply = next(o for o in objects if o["template_id"] == "1490002")
    assert reply["params"] == ["none", "sent"]
    assert reply["unmatched"] is False
    assert reply["created_at"].endswith("+00:00")
    inbound = next(o for o in objects if o["direction"] == "in")
    assert inbound["mobile"] == "138****0000"


def test_signature_filter(conversation: Harness) -> None:
    rows = csv_rows(everything(conversation, "--signature", "Other Shop").stdout)
    assert rows
    assert {r["signature"] for r in rows} == {"Other Shop"}


def test_until_a_day_includes_that_day_and_a_time_excludes_it(conversation: Harness) -> None:
    h = conversation  # day one: today - 2; day two: today
    first = day(h, -2)
    only_day_one = csv_rows(export("--since", first, "--until", first).stdout)
    assert only_day_one
    assert {r["signature"] for r in only_day_one} == {SIGN}
    newest = max(r["created_at"] for r in csv_rows(everything(h).stdout))
    up_to_newest = csv_rows(export("--since", first, "--until", newest).stdout)
    assert newest not in {r["created_at"] for r in up_to_newest}  # a time is exclusive
    since_day_two = csv_rows(export("--since", day(h), "--until", day(h)).stdout)
    assert {r["signature"] for r in since_day_two} == {"Other Shop"}


def test_offsets_are_honoured(conversation: Harness) -> None:
    h = conversation
    newest = max(r["created_at"] for r in csv_rows(everything(h).stdout))
    # The same instant written in China time: still exclusive, still the same row left out.
    from datetime import datetime, timezone

    china = datetime.fromisoformat(newest).astimezone(timezone(timedelta(hours=8))).isoformat()
    rows = csv_rows(export("--since", day(h, -3), "--until", china).stdout)
    assert newest not in {r["created_at"] for r in rows}
    assert rows


@pytest.mark.parametrize(
    ("since", "until", "complaint"),
    [
        ("yesterday", "2026-01-01", "'yesterday' is not a date or time"),
        ("2026-01-01", "2026-02-30", "'2026-02-30' is not a date or time"),
        ("2026-02-01", "2026-01-01", "the range is empty"),
    ],
)
def test_bad_dates_are_refused_clearly(conversation: Harness, since: str, until: str, complaint: str) -> None:
    result = export("--since", since, "--until", until)
    assert result.exit_code == 2
    assert complaint in result.stderr
    assert result.stdout == ""


def test_output_file_is_complete_or_not_there(
    conversation: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = conversation
    target = tmp_path / "out" / "messages.csv"
    target.parent.mkdir()
    result = everything(h, "-o", str(target))
    assert result.stdout == ""
    good = target.read_text(encoding="utf-8")
    assert len(csv_rows(good)) == h.count(messages)
    assert target.stat().st_mode & 0o077 == 0  # customers' messages: owner only

    real = bot.store.export.export_chunks

    def failing(*args: Any, **kwargs: Any) -> Iterator[str]:
        chunks = real(*args, **kwargs)
        yield next(chunks)
        raise ConnectionError("database went away")

    monkeypatch.setattr(bot.store.export, "export_chunks", failing)
    failed = export("--since", day(h, -3), "--until", day(h), "--format", "jsonl", "-o", str(target))
    assert failed.exit_code != 0
    assert target.read_text(encoding="utf-8") == good  # the old file, untouched
    assert sorted(p.name for p in target.parent.iterdir()) == ["messages.csv"]  # no half file left


def test_unwritable_output_is_an_error_not_a_traceback(conversation: Harness, tmp_path: Path) -> None:
    result = export("--since", "2026-01-01", "--until", "2026-01-02", "-o", str(tmp_path / "no" / "x"))
    assert result.exit_code == 1
    assert "cannot write" in result.stderr


def test_streams_in_batches(conversation: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of BATCH_ROWS rows: a long range never has to fit in memory."""
    h = conversation
    monkeypatch.setattr(bot.store.export, "BATCH_ROWS", 2)
    from bot.store.export import ExportFilter, export_chunks, parse_bound

    seen: list[int] = []
    filters = ExportFilter(since=parse_bound(day(h, -3)), until=parse_bound(day(h), end=True))
    chunks = list(export_chunks(h.engine, filters, "jsonl", progress=seen.append))
    total = h.count(messages)
    assert seen == [2] * (total // 2) + ([total % 2] if total % 2 else [])
    assert len(chunks) == len(seen)
