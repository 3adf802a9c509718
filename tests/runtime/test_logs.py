"""Log lines: JSON when asked, and no customer's phone number in them unless asked."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bot.runtime.logs import _ONLY_COPY, setup_logging
from tests.support import REPO

Setup = Callable[..., io.StringIO]


@pytest.fixture
def logs() -> Iterator[Setup]:
    """``setup_logging`` into a buffer; the root logger is restored afterwards."""
    root = logging.getLogger()
    level = root.level
    installed: list[logging.Handler] = []

    def setup(**options: Any) -> io.StringIO:
        stream = io.StringIO()
        installed.append(setup_logging(stream=stream, **options))
        return stream

    yield setup
    for handler in installed:
        root.removeHandler(handler)
    root.setLevel(level)


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_time_level_logger_message_and_extra_fields(logs: Setup) -> None:
    out = logs(log_format="json")
    logging.getLogger("smsbot.test").warning("batch of %d stored", 3, extra={"batch": 3, "signature": "Acme"})
    [entry] = json_lines(out)
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "smsbot.test"
    assert entry["message"] == "batch of 3 stored"
    assert entry["batch"] == 3
    assert entry["signature"] == "Acme"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", entry["time"])


def test_json_exceptions_stay_on_one_line(logs: Setup) -> None:
    out = logs(log_format="json")
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        logging.getLogger("smsbot.test").exception("failed")
    [entry] = json_lines(out)
    assert entry["message"] == "failed"
    assert "RuntimeError: boom" in entry["exception"]


def test_text_format_is_the_familiar_one(logs: Setup) -> None:
    out = logs()
    logging.getLogger("smsbot.test").info("hello %s", "world")
    assert re.fullmatch(r"\S+ \S+ INFO smsbot.test: hello world\n", out.getvalue())


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_numbers_are_masked_in_messages_args_extras_and_tracebacks(logs: Setup, log_format: str) -> None:
    out = logs(log_format=log_format)
    log = logging.getLogger("smsbot.test")
    log.info("reply to 13800000000 queued")
    log.info("inbound %s", {"nationcode": "86", "mobile": "13912345678", "text": "hi"})
    log.info("sent to %s", "+8613700001111")
    log.info("hk customer %s", '{"mobile": "91234567"}')
    log.info("with extra", extra={"number": "8615000002222"})
    try:
        raise ValueError("no such number 18800003333")
    except ValueError:
        log.exception("send failed")
    text = out.getvalue()
    for number in ("13800000000", "13912345678", "13700001111", "91234567", "15000002222", "18800003333"):
        assert number not in text
    for masked in ("138****0000", "139****5678", "+861******1111", "****4567", "188****3333"):
        assert masked in text
    if log_format == "json":  # (the text format shows no extra fields)
        assert json_lines(out)[4]["number"] == "861******2222"


def test_other_numbers_are_left_alone(logs: Setup) -> None:
    out = logs()
    logging.getLogger("smsbot.test").info("message 12345 at 1620734188 (serial 1620734188123), code 400")
    assert "message 12345 at 1620734188 (serial 1620734188123), code 400" in out.getvalue()


def test_reveal_numbers_turns_masking_off(logs: Setup) -> None:
    out = logs(reveal_numbers=True)
    logging.getLogger("smsbot.test").info("reply to %s", "13800000000")
    assert "reply to 13800000000" in out.getvalue()


def test_a_pulled_message_that_could_not_be_kept_anywhere_keeps_its_number(logs: Setup) -> None:
    """bot/runtime/pulling.py logs an item in full only when neither the database nor its unstored file took it."""
    out = logs(log_format="json")
    item = json.dumps({"nationcode": "86", "mobile": "13800000000", "text": "TD please"})
    logging.getLogger("smsbot.pull").critical("pulled item NOT stored and NOT kept (%s): %s", "disk full", item)
    logging.getLogger("smsbot.pull").error("pulled reply refused (x), NOT stored: kept in %s: %s", "f.jsonl", item)
    first, second = json_lines(out)
    assert '"mobile": "13800000000"' in first["message"]
    assert "13800000000" not in second["message"]


def test_the_exempt_lines_are_the_ones_pull_really_writes() -> None:
    source = (REPO / "bot" / "runtime" / "pulling.py").read_text(encoding="utf-8")
    for logger, fmt in _ONLY_COPY:
        assert logger == "smsbot.pull"
        assert json.dumps(fmt) in source, fmt


def test_setting_up_twice_replaces_only_our_handler(logs: Setup) -> None:
    root = logging.getLogger()
    others = list(root.handlers)
    first = logs()
    second = logs(log_format="json")
    logging.getLogger("smsbot.test").info("once")
    assert first.getvalue() == ""
    assert len(json_lines(second)) == 1
    assert all(h in root.handlers for h in others)  # pytest's capture (say) is still there


def test_other_handlers_see_the_record_as_logged(logs: Setup, caplog: pytest.LogCaptureFixture) -> None:
    """Masking works on a copy: a second handler (here pytest's capture) is not changed behind its back."""
    out = logs()
    with caplog.at_level(logging.INFO):
        logging.getLogger("smsbot.test").info("reply to %s", "13800000000")
    assert "138****0000" in out.getvalue()
    assert caplog.records[-1].getMessage() == "reply to 13800000000"


def test_without_a_stream_it_writes_to_the_stderr_of_the_moment(
    logs: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    """So a handler installed by one command never writes to a stream that is gone (CliRunner's, say)."""
    root = logging.getLogger()
    handler = setup_logging()
    try:
        logging.getLogger("smsbot.test").warning("to %s", "13800000000")
    finally:
        root.removeHandler(handler)
    assert "WARNING smsbot.test: to 138****0000" in capsys.readouterr().err
