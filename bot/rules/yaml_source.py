"""YAML loading that remembers where every key and value came from.

Marketers edit these files by hand, so every error we report must point at a
line and column. PyYAML's composer gives us nodes with marks; we build plain
Python values from them ourselves and keep a side table of positions keyed by
the path to each value (the same shape as pydantic's error ``loc``).

We also deliberately resolve scalars more conservatively than YAML 1.1: only
``true``/``false`` become booleans and ``null``/``~``/empty become ``None``.
Everything else stays a string, so the keys ``on``/``off`` and keywords such
as ``YES``, ``NO``, ``010`` or ``1`` arrive exactly as typed (PyYAML would turn
them into ``True``, ``False`` and ``8``). Numbers are coerced later by the
schema where a number is expected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import yaml

Path_ = tuple[str | int, ...]

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's parser when PyYAML was built with it: several times faster on large rule files."""

_BOOL_TRUE = {"true", "True", "TRUE"}
_BOOL_FALSE = {"false", "False", "FALSE"}
_NULL = {"", "~", "null", "Null", "NULL"}


@dataclass(frozen=True)
class Position:
    """A 1-based line and column in a source file."""

    line: int
    col: int


@dataclass
class Located:
    """A loaded YAML document and where each part of it stood."""

    data: object
    values: dict[Path_, Position] = field(default_factory=dict)
    keys: dict[Path_, Position] = field(default_factory=dict)

    def position(self, path: Path_, *, key: bool = False) -> Position:
        """The closest known position for ``path``.

        Pydantic may report a path one level deeper than anything in the file
        (a missing key); we then fall back to the nearest parent.
        """
        table = self.keys if key else self.values
        p = tuple(path)
        while p:
            if p in table:
                return table[p]
            if p in self.values:
                return self.values[p]
            p = p[:-1]
        return self.values.get((), Position(1, 1))


class YamlProblem(Exception):  # noqa: N818 - a problem in the user's file, not a bug of ours
    """A YAML document that cannot be read, with where it went wrong."""

    def __init__(self, message: str, position: Position) -> None:
        super().__init__(message)
        self.message = message
        self.position = position


def _pos(node: yaml.Node) -> Position:
    return Position(node.start_mark.line + 1, node.start_mark.column + 1)


def _scalar(node: yaml.ScalarNode) -> object:
    value: str = node.value
    if node.style:  # quoted or block scalar: always a string (plain is None, or "" from libyaml)
        return value
    if value in _NULL:
        return None
    if value in _BOOL_TRUE:
        return True
    if value in _BOOL_FALSE:
        return False
    return value


_MERGE_RE = re.compile(r"^<<$")


def _build(node: yaml.Node, path: Path_, out: Located) -> object:
    pos = _pos(node)
    if isinstance(node, yaml.ScalarNode) and node.style in ("|", ">"):
        # A block scalar's text starts on the line after its '|' or '>' marker.
        pos = Position(pos.line + 1, pos.col)
    out.values[path] = pos
    if isinstance(node, yaml.ScalarNode):
        return _scalar(node)
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, (*path, i), out) for i, item in enumerate(node.value)]
    if isinstance(node, yaml.MappingNode):
        result: dict[str, object] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise YamlProblem("a key must be plain text, not a list or mapping", _pos(key_node))
            key = str(key_node.value)
            if _MERGE_RE.match(key) and key_node.style is None:
                raise YamlProblem("YAML merge keys ('<<') are not supported in rule files", _pos(key_node))
            if key in result:
                first = out.keys[(*path, key)]
                raise YamlProblem(f"duplicate key '{key}' (first defined at line {first.line})", _pos(key_node))
            out.keys[(*path, key)] = _pos(key_node)
            result[key] = _build(value_node, (*path, key), out)
        return result
    raise YamlProblem("unsupported YAML node", _pos(node))  # pragma: no cover - composer yields only these


def load_located(text: str) -> Located:
    """Parse one YAML document, keeping positions; raise YamlProblem on bad YAML."""
    try:
        node = yaml.compose(text, Loader=_LOADER)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        position = Position(mark.line + 1, mark.column + 1) if mark else Position(1, 1)
        problem = exc.problem or exc.context or "invalid YAML"
        context = f" ({exc.context})" if exc.context and exc.problem else ""
        raise YamlProblem(f"YAML syntax error: {problem}{context}", position) from exc
    except yaml.YAMLError as exc:
        raise YamlProblem(f"YAML syntax error: {exc}", Position(1, 1)) from exc
    out = Located(data=None)
    if node is None:
        out.data = None
        out.values[()] = Position(1, 1)
        return out
    out.data = _build(node, (), out)
    return out
