"""Jinja2 expressions in rule files: sandboxed, strict, and statically checked.

Rule files hold small Jinja2 templates (``params``, ``set``). They are written
by marketers, but they are fed values that come from customers (``text``,
regex groups, stored variables). So they are compiled once at load time in an
``ImmutableSandboxedEnvironment`` with ``StrictUndefined``; customer text is
only ever passed in as a value and never compiled. SMS parameters are plain
text for Tencent, so no HTML escaping happens here (escaping belongs to the
HTML console, which autoescapes).

The module also reads each expression's syntax tree so the linter can name
unknown variables and estimate how long a rendered parameter can get.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import StrictUndefined, nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

CONTEXT_NAMES = ("text", "match", "vars", "signature", "contact", "now")
CONTACT_FIELDS = {"nationcode": 4, "mobile": 15}
_TRUNCATE_LEEWAY = 5


MAX_RESULT_LENGTH = 10_000
"""Longest string or list an expression may build: an SMS parameter never needs more."""


class _RuleSandbox(ImmutableSandboxedEnvironment):
    """The sandbox, plus limits on ``*`` and ``**`` so a rule cannot build a 10 GB string."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if isinstance(right, int) and abs(right) > 64:
                raise SecurityError("exponent too large in a rule expression")
            return left**right
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, str | list | tuple) and isinstance(times, int) and len(seq) * times > MAX_RESULT_LENGTH:
                raise SecurityError(f"result longer than {MAX_RESULT_LENGTH} in a rule expression")
        return left * right


def _make_env() -> ImmutableSandboxedEnvironment:
    env = _RuleSandbox(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False)
    env.globals.clear()  # no range, lipsum, cycler ...: only the documented context
    return env


ENV = _make_env()


def _wrap(value: object) -> object:
    """Mappings inside a Bag are Bags too (a webhook's JSON: ``vars.order.status``); lists stay lists."""
    if isinstance(value, Mapping):
        return Bag(value)
    if isinstance(value, list) and any(isinstance(item, Mapping) for item in value):
        return [Bag(item) if isinstance(item, Mapping) else item for item in value]
    return value


class Bag:
    """A read-only mapping whose items are reachable as attributes and nothing else.

    A plain dict would expose ``keys``, ``items`` ... as attributes, so a
    variable named ``items`` would render as a bound method. Nested mappings
    (a webhook's JSON answer kept with ``save_as``) are handed out as Bags too.
    """

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, object]) -> None:
        self._data = dict(data)

    def __getattr__(self, name: str) -> object:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            value = self._data[name]
        except KeyError:
            raise AttributeError(name) from None
        return value if isinstance(value, str) else _wrap(value)

    def __getitem__(self, name: str) -> object:
        value = self._data[name]
        return value if isinstance(value, str) else _wrap(value)

    def __contains__(self, name: object) -> bool:
        return name in self._data

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __str__(self) -> str:
        return str(self._data)


class ExpressionError(Exception):
    """A template that does not compile, with the line inside the template."""

    def __init__(self, message: str, lineno: int) -> None:
        super().__init__(message)
        self.message = message
        self.lineno = lineno


@dataclass(frozen=True)
class Expression:
    """One compiled rule-file template such as ``"{{ match.code }}"``."""

    source: str
    template: jinja2.Template | None
    """None when the source has no Jinja2 syntax: the literal is used as is."""
    names: frozenset[str]
    attributes: frozenset[tuple[str, str]]
    """(name, attribute) pairs read, e.g. ('match', 'code')."""
    ast: nodes.Template | None

    @property
    def is_literal(self) -> bool:
        return self.template is None

    @property
    def uses_customer_data(self) -> bool:
        return bool(self.names & {"text", "match", "vars"})

    def render(self, context: Mapping[str, Any]) -> str:
        if self.template is None:
            return self.source
        return self.template.render(context)


def _attributes(ast: nodes.Template) -> frozenset[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for node in ast.find_all(nodes.Getattr):
        if isinstance(node.node, nodes.Name):
            found.add((node.node.name, node.attr))
    for item in ast.find_all(nodes.Getitem):
        if isinstance(item.node, nodes.Name) and isinstance(item.arg, nodes.Const) and isinstance(item.arg.value, str):
            found.add((item.node.name, item.arg.value))
    return frozenset(found)


def compile_expression(source: str) -> Expression:
    """Compile a template from a rule file; raise ExpressionError with its line on bad syntax."""
    if "{{" not in source and "{%" not in source and "{#" not in source:
        return Expression(source, None, frozenset(), frozenset(), None)
    try:
        ast = ENV.parse(source)
        template = ENV.from_string(ast)
    except jinja2.TemplateSyntaxError as exc:
        raise ExpressionError(f"Jinja2 syntax error: {exc.message}", exc.lineno or 1) from exc
    from jinja2 import meta

    names = frozenset(meta.find_undeclared_variables(ast))
    return Expression(source, template, names, _attributes(ast), ast)


def max_rendered_length(
    expr: Expression, *, group_widths: Mapping[str, int | None], signature: str | None
) -> int | None:
    """An upper bound on the rendered length, or None when it cannot be bounded."""
    if expr.ast is None:
        return len(expr.source)
    return _sum_max(expr.ast.body, group_widths, signature)


def _sum_max(parts: Iterable[nodes.Node], widths: Mapping[str, int | None], signature: str | None) -> int | None:
    """The bound of pieces rendered one after another: the sum of theirs, unbounded if any one is."""
    total = 0
    for node in parts:
        part = _node_max(node, widths, signature)
        if part is None:
            return None
        total += part
    return total


def _node_max(node: nodes.Node, widths: Mapping[str, int | None], signature: str | None) -> int | None:
    if isinstance(node, nodes.Output | nodes.Concat):
        return _sum_max(node.nodes, widths, signature)
    if isinstance(node, nodes.TemplateData):
        return len(node.data)
    if isinstance(node, nodes.Const):
        return len(str(node.value))
    if isinstance(node, nodes.Name):
        if node.name == "signature" and signature is not None:
            return len(signature)
        return None
    if isinstance(node, nodes.Getattr | nodes.Getitem) and isinstance(node.node, nodes.Name):
        attr = node.attr if isinstance(node, nodes.Getattr) else getattr(node.arg, "value", None)
        if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice):
            return _slice_max(node.arg, _node_max(node.node, widths, signature))
        if node.node.name == "match" and isinstance(attr, str):
            return widths.get(attr)
        if node.node.name == "contact" and isinstance(attr, str):
            return CONTACT_FIELDS.get(attr)
        return None
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice):
        return _slice_max(node.arg, _node_max(node.node, widths, signature))
    if isinstance(node, nodes.Filter):
        return _filter_max(node, widths, signature)
    if isinstance(node, nodes.CondExpr):
        a = _node_max(node.expr1, widths, signature)
        b = _node_max(node.expr2, widths, signature) if node.expr2 is not None else 0
        return None if a is None or b is None else max(a, b)
    return None


def _slice_max(sl: nodes.Slice, inner: int | None) -> int | None:
    start = sl.start.value if isinstance(sl.start, nodes.Const) else (0 if sl.start is None else None)
    stop = sl.stop.value if isinstance(sl.stop, nodes.Const) else None
    if isinstance(start, int) and start < 0 and sl.stop is None and sl.step is None:
        return -start if inner is None else min(-start, inner)  # [-4:]: the last four
    if isinstance(start, int) and isinstance(stop, int) and start >= 0 and stop >= 0 and sl.step is None:
        bound = max(stop - start, 0)
        return bound if inner is None else min(bound, inner)
    return inner


def _filter_max(node: nodes.Filter, widths: Mapping[str, int | None], signature: str | None) -> int | None:
    inner = _node_max(node.node, widths, signature) if node.node is not None else None
    if node.name in ("default", "d"):
        fallback = _node_max(node.args[0], widths, signature) if node.args else 0
        return None if inner is None or fallback is None else max(inner, fallback)
    if node.name in ("upper", "lower", "trim", "title", "capitalize", "string", "e", "escape"):
        return inner
    if node.name == "truncate":
        length = node.args[0].value if node.args and isinstance(node.args[0], nodes.Const) else 255
        leeway: Any = _TRUNCATE_LEEWAY
        for kw in node.kwargs:
            if kw.key == "leeway" and isinstance(kw.value, nodes.Const):
                leeway = kw.value.value
        if len(node.args) >= 4 and isinstance(node.args[3], nodes.Const):
            leeway = node.args[3].value
        if isinstance(length, int) and isinstance(leeway, int):
            bound = length + leeway
            return bound if inner is None else min(bound, inner)
    return None
