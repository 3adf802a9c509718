"""Why a message got its answer: the rule (``file:line``) and its text from the rules version that decided it.

``/console/conversations/{id}/explain/{message_id}``, linked from every
message of a thread that has a rule. The rule's lines come from the stored
version named by ``messages.rules_version`` (``rule_versions.files``), so the
text shown is the one that answered, even after the files changed. A message
without a version (stored before versions were kept), or whose version is not
stored (or does not hold that file), falls back to the files in the rules
folder now, and the page says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, Response

from bot.console.display import DISPLAY_TZ_LABEL, fmt_time, link, show_number, wants_reveal
from bot.console.queries.conversations import conversation_with_number, one_message
from bot.console.web import PREFIX, ConsoleRouter, CurrentUser, engine, render, runtime
from bot.rules.loader import rule_files
from bot.rules.versions import RuleText, rule_text
from bot.store.rule_versions import version_by_hash

router = ConsoleRouter(prefix=PREFIX)


@dataclass(frozen=True)
class Source:
    """Where the rule's text shown comes from."""

    stored: bool
    """True: the stored version that decided the message; False: the files in the rules folder now."""
    version: str | None
    version_id: int | None
    note: str
    text: RuleText | None
    """None: the file has no such line (or, when ``file_found`` is False, there is no such file)."""
    file_found: bool = True


def split_ref(ref: str) -> tuple[str, int] | None:
    """``acme-shop.yaml:47`` -> (``acme-shop.yaml``, 47); None when it is not ``file:line``."""
    name, sep, line = ref.rpartition(":")
    if not sep or not name or not line.isascii() or not line.isdigit() or len(line) > 9:
        return None
    return name, int(line)


def text_now(root: Path, name: str) -> str | None:
    """The text of rule file ``name`` in the rules folder now (only files the loader would read)."""
    for path in rule_files(root) if root.exists() else []:
        shown = path.name if root.is_file() else path.relative_to(root).as_posix()
        if shown == name:
            try:
                return path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                return None
    return None


def _source(request: Request, version: str | None, stored: Any, name: str, line: int) -> Source:
    if stored is not None and name in (stored["files"] or {}):
        return Source(
            True,
            stored["hash"],
            int(stored["id"]),
            f"from stored version {stored['hash']} (#{stored['id']})",
            rule_text(stored["files"][name], line),
        )
    if version is None:
        why = "this message has no rules version recorded (it was stored before versions were kept)"
    elif stored is None:
        why = f"rules version {version} is not stored"
    else:
        why = f"stored version {version} (#{stored['id']}) has no file {name}"
    folder = runtime(request).rules.path
    now_text = text_now(folder, name)
    if now_text is None:
        return Source(False, version, None, f"{why}, and the rules folder has no file {name} now", None, False)
    return Source(
        False,
        version,
        None,
        f"{why}: shown from the files in the rules folder now, which may differ from what answered",
        rule_text(now_text, line),
    )


@router.get(
    "/conversations/{conversation_id}/explain/{message_id}", response_class=HTMLResponse, include_in_schema=False
)
def explain(request: Request, user: CurrentUser, conversation_id: str, message_id: str) -> Response:
    reveal = wants_reveal(request, user)
    ids = [int(v) if v.isascii() and v.isdigit() and len(v) < 19 else None for v in (conversation_id, message_id)]
    convo = message = None
    stored = None
    with engine(request).connect() as conn:
        if ids[0] is not None and ids[1] is not None:
            convo = conversation_with_number(conn, conversation_id=ids[0])
            message = one_message(conn, conversation_id=ids[0], message_id=ids[1]) if convo is not None else None
        if message is not None and message["rules_version"]:
            stored = version_by_hash(conn, message["rules_version"])
    if convo is None or message is None:
        return render(
            request,
            "error.html",
            {"status": 404, "message": f"conversation {conversation_id!r} has no message {message_id!r}"},
            status_code=404,
        )
    ref = split_ref(message["rule"] or "")
    source = _source(request, message["rules_version"], stored, *ref) if ref is not None else None
    thread = link(f"{PREFIX}/conversations/{convo['id']}", {"reveal": "1" if reveal else ""})
    return render(
        request,
        "explain.html",
        {
            "convo": convo,
            "message": message,
            "number": show_number(convo["nationcode"], convo["mobile"], reveal=reveal),
            "time": fmt_time(message["created_at"]),
            "tz_label": DISPLAY_TZ_LABEL,
            "ref": ref,
            "source": source,
            "back": f"{thread}#m{message['id']}",
        },
    )
