"""Replay: the inbound messages of a period run again through candidate rules, compared with what happened.

Reads the database (one streaming cursor, one conversation in memory at a
time), runs the pure engine, writes nothing and sends nothing. The comparison
itself (``compare``, ``ReplayReport``) needs no database.
"""

from __future__ import annotations

from bot.replay.compare import Difference, Example, Group, Happened, Replayed, ReplayReport, ReplyView, compare
from bot.replay.run import replay

__all__ = [
    "Difference",
    "Example",
    "Group",
    "Happened",
    "ReplayReport",
    "Replayed",
    "ReplyView",
    "compare",
    "replay",
]
