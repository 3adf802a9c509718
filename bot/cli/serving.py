"""``smsbot serve``, ``pull`` and ``worker``: the long-running processes a deployment is made of.

They start up the same way, in the same order: refuse settings that cannot work (missing
credentials, a public address without a callback token) before anything is logged, then set up
logging, check the database schema and (serve and pull, which answer messages) load the rules, so
a process that would fail on its first message fails at start instead. uvicorn, FastAPI,
SQLAlchemy and Tencent's SDK are imported inside the commands, so the rest of ``smsbot`` starts
without them.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bot.cli.common import checked_engine, config_errors, current_config, read_settings, safe_url, use_config

if TYPE_CHECKING:
    from fastapi import FastAPI
    from sqlalchemy import Engine

    from bot.config import Settings
    from bot.runtime.live_rules import LiveRules
    from bot.sms import SmsSender

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _setup_logging(settings: Settings) -> None:
    """serve, worker and pull log the same way: ``log_format``, numbers masked unless ``log_reveal_numbers``."""
    import logging

    from bot.runtime.logs import setup_logging

    setup_logging(level=logging.INFO, log_format=settings.log_format, reveal_numbers=settings.log_reveal_numbers)


def _loaded_rules(settings: Settings) -> LiveRules:
    """The rules, loaded, or exit 1 with every problem."""
    from bot.runtime.live_rules import LiveRules, RulesInvalid

    rules = LiveRules(settings.rules_dir, settings.param_max_length)
    try:
        rules.load()
    except RulesInvalid as exc:
        typer.echo(f"smsbot: {exc}", err=True)
        raise typer.Exit(1) from exc
    return rules


def serve(
    host: Annotated[str | None, typer.Option("--host", help="address to bind (default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option("--port", help="port (default 8000)")] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="allow a non-loopback address without a callback token")
    ] = False,
    pull: Annotated[
        bool,
        typer.Option("--pull", help="also pull replies and delivery statuses from Tencent (default: SMSBOT_PULL)"),
    ] = False,
    no_deliver: Annotated[
        bool,
        typer.Option("--no-deliver", help="only store and queue: `smsbot worker` processes send (SMSBOT_DELIVER)"),
    ] = False,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            min=1,
            max=32,
            help="HTTP processes (uvicorn workers), each with its own writer process; more than 1 needs PostgreSQL",
        ),
    ] = 1,
) -> None:
    """Run the callback server and the delivery loop (in a writer process unless SMSBOT_WRITER=thread)."""

    import uvicorn

    from bot.delivery.senders import make_sender

    settings = read_settings()
    if pull:
        settings = settings.model_copy(update={"pull": True})
    bind_host = host or settings.host
    bind_port = port or settings.port
    if bind_host not in _LOOPBACK and settings.callback_token is None and not insecure:
        typer.echo(
            f"smsbot: refusing to listen on {bind_host} without a callback token: set SMSBOT_CALLBACK_TOKEN "
            "(Tencent then calls /sms/callback?token=...) or pass --insecure",
            err=True,
        )
        raise typer.Exit(2)
    if workers > 1:
        _refuse_workers(settings, workers)
    with config_errors():
        sender = make_sender(settings)
        if settings.pull:
            from bot.tencent.config import tencent_config

            tencent_config(settings, purpose="pull")
    _setup_logging(settings)
    engine = checked_engine(settings)
    rules = _loaded_rules(settings)
    if no_deliver:
        settings = settings.model_copy(update={"deliver": False})
    described = (
        f"(database {safe_url(settings.database_url)}, writer {settings.writer}"
        f"{f', {workers} workers' if workers > 1 else ''}"
        f"{f', pulling from Tencent every {settings.pull_interval:g}s' if settings.pull else ''}"
        f"{'' if settings.deliver else ', not delivering'})"
    )
    if workers > 1:
        # Each worker is a process of its own (uvicorn starts them fresh): it builds its app from the same
        # settings through ``worker_app``; this process only checked them and supervises the workers.
        engine.dispose()
        config = current_config()
        os.environ[_WORKER_OPTIONS] = json.dumps(
            {"config": str(config) if config else None, "pull": settings.pull, "deliver": settings.deliver}
        )
        typer.echo(f"smsbot: listening on http://{bind_host}:{bind_port} {described}")
        uvicorn.run(
            "bot.cli.serving:worker_app",
            factory=True,
            workers=workers,
            host=bind_host,
            port=bind_port,
            log_level="info",
            access_log=False,
            log_config=None,
        )
        return
    application = _build_app(settings, engine, rules, sender)
    typer.echo(f"smsbot: listening on http://{bind_host}:{bind_port} {described}")
    # log_config=None: uvicorn's own lines go through the root handler, so they are masked and JSON too.
    uvicorn.run(application, host=bind_host, port=bind_port, log_level="info", access_log=False, log_config=None)


_WORKER_OPTIONS = "SMSBOT_INTERNAL_SERVE_WORKER"
"""How ``serve --workers N`` hands its command-line choices to the worker processes uvicorn starts."""


def _refuse_workers(settings: Settings, workers: int) -> None:
    """``--workers`` needs PostgreSQL, and only one process may pull from Tencent."""
    from sqlalchemy.engine import make_url

    if make_url(settings.database_url).get_backend_name() == "sqlite":
        typer.echo(
            f"smsbot: --workers {workers} needs PostgreSQL: SQLite lets one process write at a time, so more "
            "HTTP processes would only wait for each other (one `smsbot serve` already commits in a writer "
            "process of its own); set SMSBOT_DATABASE_URL to a postgresql+psycopg:// URL or drop --workers",
            err=True,
        )
        raise typer.Exit(2)
    if settings.pull:
        typer.echo(
            f"smsbot: --pull with --workers {workers} would pull from Tencent in every worker; "
            "run one `smsbot pull` beside them instead",
            err=True,
        )
        raise typer.Exit(2)


def _build_app(settings: Settings, engine: Engine, rules: LiveRules, sender: SmsSender | None) -> FastAPI:
    from bot.web.app import create_app

    application = create_app(
        settings, engine=engine, rules=rules, sender=sender, writer_mode=settings.writer, deliver=settings.deliver
    )
    if settings.writer == "process":
        engine.dispose()  # the writer process opens its own; this one only checked the schema
    return application


def worker_app() -> FastAPI:
    """The app of one ``serve --workers N`` worker: the settings ``serve`` checked, read again in this process.

    Each worker has its own writer process (its own connection, rules watch and,
    unless ``--no-deliver``, delivery loop): on PostgreSQL the conversation row
    locks keep one number's messages in order across them, and the outbox
    claims (leases, ``SKIP LOCKED``, advisory locks) keep every reply to one sender.
    """
    from bot.delivery.senders import make_sender

    options = json.loads(os.environ[_WORKER_OPTIONS])
    use_config(Path(options["config"]) if options["config"] else None)
    settings = read_settings().model_copy(update={"pull": options["pull"], "deliver": options["deliver"]})
    _setup_logging(settings)
    with config_errors():
        sender = make_sender(settings)
    return _build_app(settings, checked_engine(settings), _loaded_rules(settings), sender)


def pull_command(
    once: Annotated[
        bool, typer.Option("--once", help="pull until Tencent has nothing more, print the counts and exit")
    ] = False,
    interval: Annotated[
        float | None,
        typer.Option("--interval", min=0.1, help="seconds between pulls (default: pull_interval, 10)"),
    ] = None,
) -> None:
    """Pull replies and delivery statuses from Tencent into the database (for servers Tencent cannot call).

    Replies are stored and answered exactly as by the callback, and only queued:
    whoever runs smsbot serve (or smsbot worker) sends them. Exit 1 when --once could not finish.
    """
    import asyncio

    from bot.runtime.pulling import PollResult, pull_into_database
    from bot.tencent.config import tencent_config

    settings = read_settings()
    with config_errors():
        tencent_config(settings, purpose="pull")
    _setup_logging(settings)
    engine = checked_engine(settings)
    try:
        rules = _loaded_rules(settings)
        if not once:
            typer.echo(
                f"smsbot: pulling from Tencent every {interval or settings.pull_interval:g}s into "
                f"{safe_url(settings.database_url)} (Ctrl-C to stop)"
            )
        puller, result = asyncio.run(
            pull_into_database(settings, engine=engine, rules=rules, once=once, interval=interval)
        )
    finally:
        engine.dispose()
    typer.echo(f"smsbot pull: {puller.counts.summary()}")
    if puller.held:
        typer.echo(
            f"smsbot: {puller.held} pulled item(s) could not be stored; they are kept in {settings.pull_unstored_file}",
            err=True,
        )
    if result is not None and result is not PollResult.DONE:
        typer.echo(f"smsbot: {puller.last_error}", err=True)
        raise typer.Exit(1)
    if puller.held:
        raise typer.Exit(1)


def worker_command(
    once: Annotated[
        bool, typer.Option("--once", help="send what is due now, wait for the outcomes, print the count and exit")
    ] = False,
    concurrency: Annotated[
        int | None,
        typer.Option("--concurrency", min=1, max=64, help="numbers sent to at once (default: send_concurrency, 8)"),
    ] = None,
) -> None:
    """Send queued replies from the database: run several for more throughput (PostgreSQL), beside serve.

    With the Tencent sender it also asks Tencent about ambiguous sends
    (``ambiguous_check_*``); ``--once`` does one such round after sending.

    Workers share the outbox safely: each claims due rows with a lease (``FOR
    UPDATE SKIP LOCKED`` on PostgreSQL), so no reply is sent twice and a crashed
    worker's rows are taken over when their lease ends. A worker sees new
    replies within a second (it polls); ``serve`` wakes its own delivery loop
    at once.
    """
    import asyncio
    import signal

    from bot.delivery.deliverer import Deliverer, delivery_options
    from bot.delivery.senders import make_sender
    from bot.store.writer import DbWriter

    settings = read_settings()
    with config_errors():
        sender = make_sender(settings)
    _setup_logging(settings)
    engine = checked_engine(settings)
    options = delivery_options(settings)
    if concurrency:
        options["concurrency"] = concurrency
    writer = DbWriter(engine)
    writer.start()
    # Events out and rules' webhook calls run beside the delivery loop (bot/runtime/edge.py).
    from bot.runtime.edge import EdgeLoops, live_endpoints
    from bot.runtime.live_rules import LiveRules, RulesInvalid
    from bot.runtime.pipeline import inbound_policy
    from bot.runtime.rule_versions import VersionStore

    rules = LiveRules(settings.rules_dir, settings.param_max_length)
    with contextlib.suppress(RulesInvalid):  # logged; webhook answers then change nothing
        rules.load()
    # Webhook answers are fed to the version serving now (a pin or promote made anywhere).
    rules.attach(VersionStore(engine, param_max_length=settings.param_max_length))
    endpoints = live_endpoints(settings.events, rules)
    deliverer = Deliverer(writer, sender, events=endpoints.current, **options)
    edge = EdgeLoops(writer, rules, endpoints, policy=inbound_policy(settings), deliverer=deliverer)

    async def main() -> int:
        if once:
            await edge.drain()
            sent = await deliverer.drain()
            await edge.dispatcher.drain()
            if deliverer.reconciler is not None:  # cron's workers must settle ambiguous sends too
                await deliverer.reconciler.check_due()
                deliverer.reconciler.close()
            return sent
        edge_tasks = [*edge.start_tasks(), asyncio.create_task(rules.follow(), name="smsbot-rules-control")]
        task = asyncio.create_task(deliverer.run_forever())
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, task.cancel)
        typer.echo(
            f"smsbot worker: sending queued replies from {safe_url(settings.database_url)} "
            f"({options['concurrency']} at once; Ctrl-C to stop)"
        )
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for edge_task in edge_tasks:
            edge_task.cancel()
        await asyncio.gather(*edge_tasks, return_exceptions=True)
        return deliverer.sent

    try:
        sent = asyncio.run(main())
    finally:
        writer.stop()
        engine.dispose()
    typer.echo(f"smsbot worker: {sent} repl{'y' if sent == 1 else 'ies'} handled")
