"""Loading a rules folder (or one file) into a ``Ruleset``.

All files are checked before any is used: a ruleset with an error anywhere is
refused whole, so a half-edited folder can never become live.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bot.rules.compiler import FileResult, compile_file
from bot.rules.diagnostics import Diagnostic
from bot.rules.model import Ruleset, signature_key

RULE_SUFFIXES = (".yaml", ".yml")


@dataclass
class LoadResult:
    """The ruleset (None when any file has an error) and every problem found."""

    ruleset: Ruleset | None
    diagnostics: list[Diagnostic] = field(default_factory=list)
    files: list[FileResult] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)
    """Every file's text by name (the path relative to the folder): the version a rules store keeps."""

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.is_error]

    @property
    def ok(self) -> bool:
        return self.ruleset is not None


def rule_files(path: Path) -> list[Path]:
    """The rule files under ``path`` (itself, if it is a file), in a stable order."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.suffix in RULE_SUFFIXES and p.is_file())


def load_rules(path: str | Path, *, param_max_length: int | None = None) -> LoadResult:
    """Load and check every rule file under ``path``."""
    root = Path(path)
    if not root.exists():
        return LoadResult(None, [Diagnostic(str(root), 1, 1, "error", "no such file or folder")])
    files = rule_files(root)
    result = LoadResult(None)
    if not files:
        result.diagnostics.append(Diagnostic(str(root), 1, 1, "error", "no rule files (*.yaml, *.yml) found"))
        return result
    paths: dict[str, str] = {}
    for file in files:
        name = file.name if root.is_file() else file.relative_to(root).as_posix()
        try:
            result.texts[name] = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            result.diagnostics.append(Diagnostic(str(file), 1, 1, "error", f"cannot read the file: {exc}"))
        paths[name] = str(file)
    return _compile(result, paths, param_max_length)


def compile_texts(texts: Mapping[str, str], *, param_max_length: int | None = None) -> LoadResult:
    """Check and compile rule files given as ``{name: text}`` (a stored version), exactly as ``load_rules`` would."""
    result = LoadResult(None, texts={name: texts[name] for name in sorted(texts)})
    if not texts:
        result.diagnostics.append(Diagnostic("(version)", 1, 1, "error", "no rule files in this version"))
        return result
    return _compile(result, {name: name for name in texts}, param_max_length)


def _compile(result: LoadResult, paths: Mapping[str, str], param_max_length: int | None) -> LoadResult:
    """Compile ``result.texts`` (``paths``: where each name is shown in diagnostics) into ``result``."""
    claimed: dict[tuple[str, str], FileResult] = {}
    for name, text in result.texts.items():
        file = paths.get(name, name)
        compiled = compile_file(text, path=file, name=name, param_max_length=param_max_length)
        result.files.append(compiled)
        result.diagnostics.extend(compiled.diagnostics)
        if compiled.signature is not None:
            key = ("*" if compiled.signature == "*" else signature_key(compiled.signature), compiled.extend)
            first = claimed.get(key)
            if first is not None:
                what = f"signature '{compiled.signature}'"
                if compiled.extend:
                    what += f" with extend '{compiled.extend}'"
                result.diagnostics.append(
                    Diagnostic(
                        str(file),
                        compiled.signature_line,
                        1,
                        "error",
                        f"{what} is already claimed by {first.path}:{first.signature_line}",
                    )
                )
            else:
                claimed[key] = compiled
    if not result.errors:
        result.ruleset = Ruleset.of(tuple(f.compiled for f in result.files if f.compiled is not None))
    return result
