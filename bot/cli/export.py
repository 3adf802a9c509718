"""``smsbot export``: messages in and out, streamed to a file or to standard output.

An export can hold millions of customers' messages, so it is streamed chunk by chunk (never held
in memory), a file named with ``-o`` appears only once complete and readable by its owner alone
(so a half-written export is never mailed around), and the progress bar goes to stderr only when
that is a terminal (stdout may be the export itself). The query and the row format are
:mod:`bot.store.export`'s, shared with the console's download; this module only chooses where the
chunks go.
"""

from __future__ import annotations

import contextlib
import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bot.cli.common import checked_engine, read_settings

if TYPE_CHECKING:
    from collections.abc import Iterable

    from sqlalchemy import Engine

    from bot.store.export import ExportFilter


class _ExportFormat(StrEnum):
    csv = "csv"
    jsonl = "jsonl"


def export_command(
    since: Annotated[
        str, typer.Option("--since", help="first day (2026-01-01) or time (2026-01-01T08:00, UTC unless +08:00 given)")
    ],
    until: Annotated[str, typer.Option("--until", help="last day, included (2026-01-31), or a time, excluded")],
    fmt: Annotated[
        _ExportFormat, typer.Option("--format", help="csv (with a header line) or jsonl")
    ] = _ExportFormat.csv,
    signature: Annotated[str | None, typer.Option("--signature", help="only this signature's messages")] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="write to this file (replaced only once complete)")
    ] = None,
    reveal: Annotated[bool, typer.Option("--reveal", help="full phone numbers (default: 138****0000)")] = False,
) -> None:
    """Export messages in and out (rule, states, template, delivery status) as CSV or JSON lines.

    Oldest first, by the time each was stored. Without -o the export goes to
    standard output. With -o the file appears only once complete (written
    beside it, then renamed), readable by its owner only: it holds customers' messages.
    """
    from bot.store.export import BadDate, ExportFilter, parse_bound

    settings = read_settings()
    try:
        filters = ExportFilter(
            since=parse_bound(since), until=parse_bound(until, end=True), signature=signature, reveal=reveal
        )
    except BadDate as exc:
        typer.echo(f"smsbot export: {exc}", err=True)
        raise typer.Exit(2) from exc
    engine = checked_engine(settings)
    try:
        written = _export_to(engine, filters, fmt.value, output)
    except OSError as exc:
        typer.echo(f"smsbot export: cannot write {output}: {exc}", err=True)
        raise typer.Exit(1) from exc
    finally:
        engine.dispose()
    typer.echo(f"smsbot export: {written} message(s){f' written to {output}' if output else ''}", err=True)


def _export_to(engine: Engine, filters: ExportFilter, fmt: str, output: Path | None) -> int:
    """Stream the export to ``output`` (atomically) or stdout; a progress bar on stderr only if it is a terminal."""
    from bot.store.export import count_rows, export_chunks

    written = 0
    bar: Any = None

    def progress(rows: int) -> None:
        nonlocal written
        written += rows
        if bar is not None:
            bar.update(rows)

    with contextlib.ExitStack() as stack:
        if sys.stderr.isatty():
            total = count_rows(engine, filters)
            bar = stack.enter_context(typer.progressbar(length=total, label="exporting", file=sys.stderr))
        chunks = export_chunks(engine, filters, "jsonl" if fmt == "jsonl" else "csv", progress=progress)
        if output is None:
            for chunk in chunks:
                sys.stdout.write(chunk)
            sys.stdout.flush()
            return written
        _write_replacing(output, chunks)
    return written


def _write_replacing(output: Path, chunks: Iterable[str]) -> None:
    """Write ``chunks`` beside ``output``, on disk, then rename: readers see the old file or the whole new one."""
    import os
    import tempfile

    fd, temp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as file:
            for chunk in chunks:
                file.write(chunk)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, output)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
