"""Where events go: endpoints from config.yaml's ``events:`` and from rule files' ``events:``.

An endpoint is a name, a URL, the kinds it wants and its signing secret, which
comes only from the environment (``SMSBOT_EVENT_SECRET_<NAME>``). Config
endpoints get the events of every signature; a rule file's endpoints only the
events of conversations that file answers.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from bot.config import EVENT_ENDPOINT_NAME, EVENT_KINDS, EventEndpointConfig, event_secret_env
from bot.rules.model import Ruleset

log = logging.getLogger("smsbot.events")

ALL_KINDS = frozenset(EVENT_KINDS)


class EndpointError(Exception):
    """An endpoint that cannot be used (no secret, a bad name, a name used twice), naming it."""


@dataclass(frozen=True)
class Endpoint:
    name: str
    url: str
    kinds: frozenset[str]
    secret: bytes = field(repr=False)
    source: str = "config"
    """``config`` or the rule file's name."""

    def wants(self, kind: str) -> bool:
        return kind in self.kinds


def _endpoint(name: str, url: str, kinds: Iterable[str] | None, source: str, environ: Mapping[str, str]) -> Endpoint:
    where = "config.yaml events" if source == "config" else f"{source}: events"
    if not re.match(EVENT_ENDPOINT_NAME, name):
        raise EndpointError(f"{where}: endpoint name {name!r} must be lower-case letters, digits, '_' or '-'")
    secret = environ.get(event_secret_env(name))
    if not secret:
        raise EndpointError(
            f"{where}.{name}: no signing secret; set {event_secret_env(name)} in the environment "
            "(secrets never go in a file)"
        )
    wanted = frozenset(kinds) if kinds else ALL_KINDS
    unknown = sorted(wanted - ALL_KINDS)
    if unknown:
        raise EndpointError(
            f"{where}.{name}.kinds: unknown kind(s) {', '.join(unknown)}; known: {', '.join(EVENT_KINDS)}"
        )
    return Endpoint(name=name, url=url, kinds=wanted, secret=secret.encode(), source=source)


def config_endpoints(
    events: Mapping[str, EventEndpointConfig], environ: Mapping[str, str] | None = None
) -> tuple[Endpoint, ...]:
    """The endpoints of ``Settings.events``; raises EndpointError naming one that cannot be used."""
    env = os.environ if environ is None else environ
    return tuple(_endpoint(name, spec.url, spec.kinds, "config", env) for name, spec in sorted(events.items()))


@dataclass(frozen=True)
class EventEndpoints:
    """Every endpoint now configured: config's, and each rule file's (by file name)."""

    config: tuple[Endpoint, ...] = ()
    files: Mapping[str, tuple[Endpoint, ...]] = field(default_factory=dict)
    ruleset: Ruleset | None = None

    def __bool__(self) -> bool:
        return bool(self.config) or any(self.files.values())

    def for_event(self, kind: str, signature: str, rules_file: str | None = None) -> list[Endpoint]:
        """The endpoints that get an event of ``kind`` of a conversation under ``signature``."""
        found = [e for e in self.config if e.wants(kind)]
        if self.files:
            if rules_file is None and self.ruleset is not None:
                answering = self.ruleset.for_signature(signature)
                rules_file = answering.name if answering is not None else None
            if rules_file is not None:
                found.extend(e for e in self.files.get(rules_file, ()) if e.wants(kind))
        return found

    def by_name(self, name: str) -> Endpoint | None:
        for endpoint in self.config:
            if endpoint.name == name:
                return endpoint
        for endpoints in self.files.values():
            for endpoint in endpoints:
                if endpoint.name == name:
                    return endpoint
        return None

    def names(self) -> list[str]:
        return sorted({e.name for e in self.config} | {e.name for es in self.files.values() for e in es})


NO_ENDPOINTS = EventEndpoints()


def rule_file_endpoints(
    ruleset: Ruleset | None, config: tuple[Endpoint, ...] = (), environ: Mapping[str, str] | None = None
) -> dict[str, tuple[Endpoint, ...]]:
    """Each rule file's endpoints; raises EndpointError for a missing secret or a name used twice."""
    env = os.environ if environ is None else environ
    taken = {e.name: "config.yaml" for e in config}
    files: dict[str, tuple[Endpoint, ...]] = {}
    for compiled in ruleset.files if ruleset is not None else ():
        specs: Mapping[str, Any] = getattr(compiled, "events", None) or {}
        endpoints = []
        for name, spec in sorted(specs.items()):
            endpoint = _endpoint(name, spec.url, getattr(spec, "kinds", None), compiled.name, env)
            if name in taken:
                raise EndpointError(f"{compiled.name}: events.{name}: the name is already used in {taken[name]}")
            taken[name] = compiled.name
            endpoints.append(endpoint)
        if endpoints:
            files[compiled.name] = tuple(endpoints)
    return files


def endpoint_problems(ruleset: Ruleset | None, environ: Mapping[str, str] | None = None) -> list[str]:
    """Why the rule files' endpoints cannot be used (empty: they can): for refusing a rules load."""
    try:
        rule_file_endpoints(ruleset, environ=environ)
    except EndpointError as exc:
        return [str(exc)]
    return []


class RulesSource(Protocol):
    @property
    def ruleset(self) -> Ruleset | None: ...


class LiveEndpoints:
    """The endpoints for the live rules, rebuilt when the rules are replaced (a reload)."""

    def __init__(self, config: tuple[Endpoint, ...], rules: RulesSource | None) -> None:
        self.config = config
        self.rules = rules
        self._for: Ruleset | None = None
        self._current = EventEndpoints(config) if config else NO_ENDPOINTS
        self._built = False

    def current(self) -> EventEndpoints:
        ruleset = self.rules.ruleset if self.rules is not None else None
        if self._built and ruleset is self._for:
            return self._current
        self._for, self._built = ruleset, True
        files: dict[str, tuple[Endpoint, ...]] = {}
        try:
            files = rule_file_endpoints(ruleset, self.config)
        except EndpointError as exc:  # (a reload with this problem is refused: see LiveRules)
            log.error("rule files' event endpoints not used: %s", exc)
        if self.config or files:
            self._current = EventEndpoints(self.config, files, ruleset)
        else:
            self._current = NO_ENDPOINTS
        return self._current
