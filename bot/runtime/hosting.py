"""What one app runs on, built once: the pipeline and, in pull mode, the puller feeding it.

Kept apart from ``bot/web``, which serves it, so the console (which may not
import the web package) can name the same ``Runtime`` its pages read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine

from bot.config import Settings
from bot.runtime.live_rules import LiveRules
from bot.runtime.pipeline import Pipeline, PipelineOptions, build_pipeline
from bot.runtime.pulling import Puller, make_puller


@dataclass
class Runtime:
    """Everything the routes and the console need, built once per app (``app.state.runtime``)."""

    settings: Settings
    engine: Engine
    """The HTTP process's engine: the console reads with it (in ``writer_mode="process"`` the callbacks do not)."""
    rules: LiveRules
    """The rules ``create_app`` got; live only when ``pipeline.live_rules`` is this object."""
    clock: Callable[[], datetime]
    pipeline: Pipeline
    puller: Puller | None = None
    """Set when ``settings.pull``: pulls Tencent's queues into the same pipeline as the routes."""


def build_runtime(settings: Settings, *, engine: Engine, rules: LiveRules, options: PipelineOptions) -> Runtime:
    pipeline = build_pipeline(settings, engine=engine, rules=rules, options=options)
    puller = make_puller(settings, pipeline, clock=options.clock) if settings.pull else None
    return Runtime(settings=settings, engine=engine, rules=rules, clock=options.clock, pipeline=pipeline, puller=puller)
