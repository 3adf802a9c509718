"""Checking the rule files' ``templates:`` against the templates Tencent actually has.

A rule file copies each template's id and text from Tencent's console by hand.
When the copy drifts (a typo in the id, a template edited and re-approved at
Tencent, one still under review) nothing fails until a customer's reply is
refused or reads differently from what ``smsbot simulate`` showed. This module
fetches the account's templates with ``DescribeSmsTemplateList`` and reports
each drift at the rule file line where it has to be fixed.

The comparison (:func:`compare_templates`) is pure so it can be tested and
reasoned about without Tencent; only :func:`fetch_templates` talks to the API.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError
from tencentcloud.common.exception.tencent_cloud_sdk_exception import (  # type: ignore[import-untyped]
    TencentCloudSDKException,
)
from tencentcloud.sms.v20210111 import models  # type: ignore[import-untyped]

from bot.rules.diagnostics import Diagnostic, Severity
from bot.rules.loader import rule_files
from bot.rules.schema import TemplateSpec
from bot.rules.yaml_source import YamlProblem, load_located
from bot.tencent.config import TencentConfig, sms_client

PAGE_SIZE = 100
"""Tencent's largest ``Limit`` for DescribeSmsTemplateList."""
MAX_PAGES = 1000
"""A stop for a server that keeps answering full pages (100 000 templates is far beyond any account)."""

STATUS_NAMES: dict[int, str] = {0: "approved", 1: "reviewing", 2: "approved, not yet in effect", -1: "rejected"}
"""Tencent's ``StatusCode``: only 0 (approved and in effect) can be sent with."""
SCOPE_NAMES: dict[int, str] = {0: "domestic", 1: "international", 3: "both"}
"""Tencent's ``International``: 3 is a template for the Chinese mainland and abroad alike."""

DifferenceKind = Literal["missing", "text_changed", "not_approved"]

_PLACEHOLDER_RE = re.compile(r"\{(\d+)\}")
_WHITESPACE_RE = re.compile(r"\s+")


class TemplateFetchError(Exception):
    """Tencent could not be asked (network, HTTP, credentials): the comparison never ran."""


# ---------------------------------------------------------------- the two sides


@dataclass(frozen=True)
class RuleTemplate:
    """A template as a rule file declares it, with where its id and text are written."""

    path: str
    name: str
    id: str
    text: str
    line: int
    """Line of the ``id`` value: missing and unapproved templates are fixed there."""
    col: int
    text_line: int
    """Line of the ``text`` value: a changed text is fixed there."""
    text_col: int


@dataclass(frozen=True)
class TencentTemplate:
    """One entry of ``DescribeTemplateStatusSet``."""

    id: str
    content: str
    status_code: int
    """Tencent's ``StatusCode`` (see ``STATUS_NAMES``)."""
    international: bool = False
    """It can be sent to numbers outside the Chinese mainland (``International`` 1 or 3)."""
    review_reply: str = ""
    name: str = ""
    domestic: bool = True
    """It can be sent to Chinese mainland numbers (``International`` 0 or 3)."""

    @property
    def approved(self) -> bool:
        return self.status_code == 0

    @property
    def status(self) -> str:
        return STATUS_NAMES.get(self.status_code, f"StatusCode {self.status_code}")

    @property
    def scope(self) -> str:
        """Where it may be sent: ``domestic``, ``international`` or ``both``."""
        if self.international and self.domestic:
            return "both"
        return "international" if self.international else "domestic"


@dataclass(frozen=True)
class TemplateDifference:
    """One way a rule file's template disagrees with Tencent, pinned to the line to fix."""

    path: str
    line: int
    col: int
    template: str
    """The template's name in the rule file."""
    template_id: str
    kind: DifferenceKind
    severity: Severity
    message: str
    """Starts with ``template <id>:`` so a printed diagnostic names the id first."""

    def diagnostic(self) -> Diagnostic:
        return Diagnostic(self.path, self.line, self.col, self.severity, self.message)


# ---------------------------------------------------------------- reading the rule files


def collect_rule_templates(root: str | Path) -> list[RuleTemplate]:
    """Every well-formed template entry under ``root``, even in files with other errors.

    This reads the YAML again instead of using the compiled ruleset because a
    compiled file does not keep where its templates were written, and because
    ``rules check --online`` should still compare the templates of a file whose
    rules have an unrelated mistake. Entries the checks already refuse (a
    non-digit id, a missing text, unreadable YAML) are skipped here: they are
    reported once, by the checks, not a second time as a Tencent difference.
    Paths are spelt as ``load_rules`` spells them, so diagnostics sort together.
    """
    found: list[RuleTemplate] = []
    base = Path(root)
    if not base.exists():
        return found
    for file in rule_files(base):
        try:
            located = load_located(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, YamlProblem):
            continue
        data = located.data
        templates = data.get("templates") if isinstance(data, dict) else None
        if not isinstance(templates, dict):
            continue
        for name, raw in templates.items():
            try:
                spec = TemplateSpec.model_validate(raw)
            except ValidationError:
                continue
            if not spec.id.isdigit():
                continue
            at_id = located.position(("templates", name, "id"))
            at_text = located.position(("templates", name, "text"))
            found.append(
                RuleTemplate(
                    path=str(file),
                    name=str(name),
                    id=spec.id,
                    text=spec.text,
                    line=at_id.line,
                    col=at_id.col,
                    text_line=at_text.line,
                    text_col=at_text.col,
                )
            )
    return found


# ---------------------------------------------------------------- the comparison


def _squeezed(text: str) -> str:
    return _WHITESPACE_RE.sub(" ", text).strip()


def _placeholders(text: str) -> int:
    return len(set(_PLACEHOLDER_RE.findall(text)))


def _best_match(rule: RuleTemplate, candidates: Sequence[TencentTemplate]) -> TencentTemplate:
    """The Tencent entry the rule most likely means when an id exists both domestically and internationally."""

    def score(t: TencentTemplate) -> tuple[bool, bool]:
        return (t.approved, _squeezed(t.content) == _squeezed(rule.text))

    return max(candidates, key=score)


def compare_templates(
    rule_templates: Iterable[RuleTemplate], tencent_templates: Iterable[TencentTemplate]
) -> list[TemplateDifference]:
    """What is wrong with each rule-file template, judged against Tencent's list; [] when all agree.

    "Same text" means: equal after collapsing every run of whitespace (spaces,
    tabs, line breaks) to one space and trimming both ends. Placeholders are
    compared as written, because the rule language uses Tencent's own ``{1}``,
    ``{2}`` notation and the number of placeholders is what Tencent checks a
    send's parameters against. Whitespace is the exception because YAML
    folding, indentation and CRLF files change it without anyone meaning to,
    so a whitespace-only difference is a warning. Anything else (a word,
    punctuation, full-width against half-width characters) changes what the
    customer reads and is an error, worded more urgently when the placeholder
    count differs, since Tencent then refuses every send of that template.

    A template that is not approved is reported as well as (not instead of) a
    changed text: a template edited at Tencent is usually both.
    """
    by_id: dict[str, list[TencentTemplate]] = {}
    for t in tencent_templates:
        by_id.setdefault(t.id, []).append(t)
    differences: list[TemplateDifference] = []
    for rule in rule_templates:
        differences.extend(_differences(rule, by_id.get(rule.id, [])))
    return differences


def _difference(
    rule: RuleTemplate, kind: DifferenceKind, severity: Severity, message: str, *, at_text: bool = False
) -> TemplateDifference:
    line, col = (rule.text_line, rule.text_col) if at_text else (rule.line, rule.col)
    return TemplateDifference(
        rule.path, line, col, rule.name, rule.id, kind, severity, f"template {rule.id}: {message}"
    )


def _differences(rule: RuleTemplate, candidates: Sequence[TencentTemplate]) -> list[TemplateDifference]:
    if not candidates:
        return [
            _difference(
                rule,
                "missing",
                "error",
                f"'{rule.name}' is not a template of this Tencent account (neither domestic nor international): "
                "every reply with it would be refused",
            )
        ]
    found: list[TemplateDifference] = []
    tencent = _best_match(rule, candidates)
    if tencent.content != rule.text:
        if _squeezed(tencent.content) == _squeezed(rule.text):
            found.append(
                _difference(
                    rule,
                    "text_changed",
                    "warning",
                    f"'{rule.name}' text differs from Tencent's only in spaces or line breaks",
                    at_text=True,
                )
            )
        else:
            ours, theirs = _placeholders(rule.text), _placeholders(tencent.content)
            consequence = (
                f"; Tencent's has {theirs} placeholder(s), this file's {ours}: Tencent will refuse the sends"
                if ours != theirs
                else ": customers read Tencent's text, not this one"
            )
            found.append(
                _difference(
                    rule,
                    "text_changed",
                    "error",
                    f"'{rule.name}' text differs from Tencent's: Tencent has {tencent.content!r}, "
                    f"this file has {rule.text!r}{consequence}",
                    at_text=True,
                )
            )
    if not tencent.approved:
        if tencent.status_code == 1:
            why = "is still being reviewed at Tencent"
        elif tencent.status_code == 2:
            why = "is approved at Tencent but not yet in effect"
        elif tencent.status_code == -1:
            why = "was rejected by Tencent"
        else:
            why = f"is not approved at Tencent ({tencent.status})"
        review = f" (review: {tencent.review_reply})" if tencent.review_reply else ""
        found.append(
            _difference(
                rule,
                "not_approved",
                "error",
                f"'{rule.name}' {why}{review}: Tencent refuses replies with it until it is approved",
            )
        )
    return found


def unused_templates(
    rule_templates: Iterable[RuleTemplate], tencent_templates: Iterable[TencentTemplate]
) -> list[TencentTemplate]:
    """Tencent's templates no rule file names: worth knowing (a forgotten reply?), never an error."""
    used = {r.id for r in rule_templates}
    return sorted((t for t in tencent_templates if t.id not in used), key=lambda t: (len(t.id), t.id, t.international))


# ---------------------------------------------------------------- asking Tencent


def _explain(exc: TencentCloudSDKException, config: TencentConfig) -> str:
    code = str(exc.code or "")
    raw = exc.message
    message = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw or "")
    message = _squeezed(message)[:300]
    where = f"{config.scheme}://{config.endpoint}"
    request = f" (RequestId {exc.requestId})" if getattr(exc, "requestId", None) else ""
    if code == "ClientNetworkError":
        return f"cannot reach Tencent at {where}: {message}"
    if code == "ServerNetworkError":
        return f"Tencent at {where} answered with an HTTP error: {message}"
    if code.startswith("AuthFailure") or code == "InvalidCredential":
        return (
            f"Tencent refused the credentials ({code}: {message}){request}; "
            "check TENCENTCLOUD_SECRET_ID and TENCENTCLOUD_SECRET_KEY"
        )
    return f"Tencent refused DescribeSmsTemplateList ({code or 'no code'}: {message}){request}"


def _page(client: Any, international: int, offset: int) -> list[TencentTemplate]:
    request = models.DescribeSmsTemplateListRequest()
    request.International = international
    request.Limit = PAGE_SIZE
    request.Offset = offset
    response = client.DescribeSmsTemplateList(request)
    items = response.DescribeTemplateStatusSet
    if items is None:
        # The SDK hands back an empty result when it could not read Tencent's answer.
        raise TemplateFetchError("Tencent's answer to DescribeSmsTemplateList had no DescribeTemplateStatusSet")
    templates = []
    for item in items:
        scope = int(item.International if item.International is not None else international)
        templates.append(
            TencentTemplate(
                id=str(item.TemplateId),
                content=str(item.TemplateContent or ""),
                status_code=int(item.StatusCode if item.StatusCode is not None else -1),
                international=scope in (1, 3),
                review_reply=str(item.ReviewReply or ""),
                name=str(item.TemplateName or ""),
                domestic=scope in (0, 3),
            )
        )
    return templates


def fetch_templates(config: TencentConfig) -> list[TencentTemplate]:
    """Every template of the account, domestic and international, whatever its review status.

    The whole list (paged with Limit/Offset) rather than only the ids the
    rules name: a rule file does not say whether a template is international,
    and the full list is what lets us point out templates no rule uses.
    Raises TemplateFetchError with a message fit for the terminal.
    """
    client = sms_client(config)
    found: list[TencentTemplate] = []
    listed: set[tuple[str, str]] = set()  # a template for both scopes may be listed under each
    try:
        for international in (0, 1):
            for page in range(MAX_PAGES):
                items = _page(client, international, page * PAGE_SIZE)
                found.extend(item for item in items if (item.id, item.scope) not in listed)
                listed.update((item.id, item.scope) for item in items)
                if len(items) < PAGE_SIZE:
                    break
    except TencentCloudSDKException as exc:
        raise TemplateFetchError(_explain(exc, config)) from exc
    return found


# ---------------------------------------------------------------- both together


@dataclass(frozen=True)
class SyncReport:
    """What ``smsbot templates sync`` and ``smsbot rules check --online`` print."""

    rule_templates: tuple[RuleTemplate, ...]
    tencent_templates: tuple[TencentTemplate, ...]
    differences: tuple[TemplateDifference, ...]
    unused: tuple[TencentTemplate, ...]

    @property
    def errors(self) -> int:
        return sum(1 for d in self.differences if d.severity == "error")


def sync_report(rule_templates: Sequence[RuleTemplate], tencent: Sequence[TencentTemplate]) -> SyncReport:
    differences = sorted(compare_templates(rule_templates, tencent), key=lambda d: (d.path, d.line, d.col, d.kind))
    return SyncReport(
        tuple(rule_templates), tuple(tencent), tuple(differences), tuple(unused_templates(rule_templates, tencent))
    )
