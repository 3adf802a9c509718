"""One logging setup for every long-running command (serve, worker, pull and the writer process).

Logs leave the machine (journald, a log shipper, a ticket pasted into chat),
so by default nothing in them may identify a customer: a filter on the one
handler rewrites anything that looks like a mobile number to the
``138****0000`` form ops already know from the console. It works on the
formatted message, the arguments, string ``extra`` fields and tracebacks,
because a number reaches a log line in all of those ways (a ``%s`` of a dict,
an exception text from the database driver). ``log_reveal_numbers`` turns it
off for a debugging session.

One exception, on purpose: ``bot/runtime/pulling.py`` keeps a pulled item it could not
store in a file of its own (Tencent hands each item out only once); only when
even that file cannot be written does the log line become the last copy of a
customer's message, and that one line keeps its numbers; see ``_ONLY_COPY``.

``log_format: json`` writes one JSON object per line (time, level, logger,
message, then any ``extra`` fields), for log shippers that would otherwise
have to parse the text format with a regex.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

from bot.numbers import mask_phone_numbers

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LogFormat = Literal["text", "json"]

_ONLY_COPY = {
    ("smsbot.pull", "pulled item NOT stored and NOT kept (%s): %s"),
}
"""(logger, format string) of the lines that are the last copy of a customer's message (see module doc)."""

_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
_OUR_HANDLER = "_smsbot_handler"


class MaskNumbers(logging.Filter):
    """Masks phone numbers in everything a record carries before any formatter sees it.

    The message is rendered (``msg % args``) and masked as a whole, because a
    number usually arrives as an argument, often inside a dict or an
    exception, where masking the arguments one by one would miss it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and (record.name, record.msg) in _ONLY_COPY:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: let the handler report it as usual
            return True
        record.msg = mask_phone_numbers(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_phone_numbers(record.exc_text)
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD_ATTRS and isinstance(value, str):
                setattr(record, key, mask_phone_numbers(value))
        return True


_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def escape_controls(text: str) -> str:
    """``text`` with control characters (ESC, BEL, CR, ...) written as ``\\xNN``; newlines and tabs kept.

    A customer's text reaches log lines (a signature, a skipped report), and a
    raw ``\\x1b[2J`` or ``\\x1b]0;...\\x07`` there would clear or retitle the
    terminal of whoever tails the log; a CR could forge the start of a line.
    """
    return _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class EscapeControls(logging.Filter):
    """Escapes control characters in the message, string ``extra`` fields and the traceback (every format)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: let the handler report it as usual
            return True
        record.msg, record.args = escape_controls(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = escape_controls(record.exc_text)
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD_ATTRS and isinstance(value, str):
                setattr(record, key, escape_controls(value))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: the fixed fields first, then the record's ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_") and key not in entry:
                entry[key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class _Handler(logging.StreamHandler[TextIO]):
    """Writes to ``stream``, or to whatever ``sys.stderr`` is at the time, and filters a copy of each record.

    The copy matters because filters change what they mask in place: other
    handlers on the same logger (a test's log capture) must still see the
    record as it was logged.
    """

    def __init__(self, stream: TextIO | None) -> None:
        super().__init__(stream)
        self._fixed = stream

    @property
    def stream(self) -> TextIO:
        return self._fixed if self._fixed is not None else sys.stderr

    @stream.setter
    def stream(self, value: TextIO | None) -> None:
        self._fixed = value

    def handle(self, record: logging.LogRecord) -> bool:
        return bool(super().handle(copy.copy(record)))


def setup_logging(
    *,
    level: int = logging.INFO,
    log_format: LogFormat = "text",
    reveal_numbers: bool = False,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Send the root logger's records to ``stream`` (default: the current stderr) in ``log_format``, numbers masked.

    Only the handler a previous call installed is replaced: handlers someone
    else put on the root logger (pytest's log capture, an embedding
    application) stay, where ``logging.basicConfig(force=True)`` would drop
    them.
    """
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _OUR_HANDLER, False):
            root.removeHandler(old)
            old.close()
    handler = _Handler(stream)
    setattr(handler, _OUR_HANDLER, True)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    if not reveal_numbers:
        handler.addFilter(MaskNumbers())
    handler.addFilter(EscapeControls())
    root.addHandler(handler)
    root.setLevel(level)
    return handler
