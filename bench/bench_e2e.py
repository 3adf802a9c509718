"""End to end: callback in -> reply out at (a fake) Tencent, under a steady open-loop load.

What is measured
    For every customer callback, the time from the moment the load generator
    writes the callback request to the server's socket until the reply's
    ``SendSms`` request arrives at the fake Tencent API (the fake stamps each
    request with ``time.time()`` when it starts handling it). Both are the
    same machine's wall clock. On loopback the callback's own receipt time at
    the server is the write time plus tens of microseconds, so this is the
    server's "callback received -> SendSms arrived" latency. The script prints
    p50/p95/p99/max of it, the callbacks/second achieved, the sends/second the
    server sustained, and whether every reply was delivered exactly once: every
    callback answered 2xx got a reply, no number and no ``SessionContext`` was
    sent to twice, nothing went to a number that never texted (replies to
    callbacks answered with an error are shown apart). The issue's targets:
    p99 under 100 ms at 200 callbacks/second on a 2-core machine with SQLite,
    and every reply exactly once.

How
    1. A fresh database: a new SQLite file in a temporary folder, or the
       PostgreSQL database ``smsbot_bench`` (created when missing, its
       ``public`` schema dropped and recreated; never ``test``), then
       ``smsbot db upgrade``.
    2. The fake Tencent SMS API (``python -m tests.fakes.tencent_sms``) as a
       process of its own, with every template and signature of ``rules/``
       approved and the per-number frequency limits off, so every send is
       accepted.
    3. ``smsbot serve`` as a process of its own, in the temporary folder with
       an empty config file (``SMSBOT_CONFIG``; the repository's
       ``config.yaml`` stays out), settings from the environment only: the
       Tencent sender pointed at the fake (``SMSBOT_SENDER=tencent``,
       ``SMSBOT_TENCENT_ENDPOINT``, ``SMSBOT_TENCENT_SCHEME=http``), the writer
       in a process (default) or a thread (``--writer``). Proxy variables are
       cleared for both processes. The callbacks start once ``/readyz`` says
       the writer and the rules are ready.
    4. Load: an open-loop generator in this process (asyncio, raw keep-alive
       HTTP/1.1 sockets, request bytes built before the run): callback ``i`` is
       written at ``start + i / rate`` whatever happened to earlier ones; when
       every connection is busy it opens another instead of waiting. wrk cannot
       pace at a constant rate (wrk2 is not packaged) and its Lua has no
       sub-second wall clock to stamp requests with, so it is not used here;
       the generator costs about 5% of one core at 200/s (the script prints its
       CPU time and how late it wrote requests against the schedule). Each
       callback is a different mobile number texting ``hi`` with signature
       "Acme Shop", which the example rules answer with exactly one reply (the
       menu). A warm-up at the same rate (other numbers) runs first and is
       left out of the latency figures, not out of the exactly-once check.
    5. After the load it waits (``--drain-timeout``) until the fake has
       received as many sends as callbacks were answered 2xx and the outbox is
       empty, waits one more second for late duplicates, stops the server
       (SIGINT, graceful), reads the fake's recorded sends (``GET
       /_fake/sends``: number, ``SessionContext``, arrival time) and computes
       the figures, with a per-second timeline of the load.
    6. Where the time goes, from the database read after the server stopped:
       each reply row's ``created_at`` (the writer's clock when it handled the
       callback's batch) and ``updated_at`` (when the send's outcome was
       recorded) split each latency into ingest (callback written -> handled by
       the writer) and outbox wait (-> SendSms arrived); the replies handled but
       not yet sent (the backlog); and how many outcomes were recorded together
       (a delivery loop that records per round shows its rounds: sizes, time per
       send, gap to the next round). CPU time of each process over the measured
       window comes from ``/proc`` (the HTTP process, the writer process, the
       fake, a local PostgreSQL's backends, this generator), and the writer's
       own count of transactions and jobs from the server's log. A line names
       the ``bot`` package the server imports and its git state.

Run it with ``.venv/bin/python bench/bench_e2e.py [--rate 200] [--seconds 20]
[--database sqlite|postgres|URL] [--writer process|thread]`` (``--keep`` keeps
the logs and the SQLite file). The exit status is 0 when the measurement ran,
whether or not the targets were met (it is a measurement); 2 when it could not
run (setup failed, or no callback was answered 2xx). The machine's other work
shows up in the numbers: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import itertools
import json
import math
import os
import platform
import re
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ingest import (  # the sibling benchmark's helpers
    CLK_TCK,
    BenchError,
    cpu_model,
    cpu_ticks,
    ensure_postgres_database,
    free_port,
    ppid_and_ticks,
    process_tree,
    server,
    smsbot_command,
)

REPO = Path(__file__).resolve().parent.parent
RULES_DIR = REPO / "rules"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/smsbot_bench"
SIGN = "Acme Shop"
TEXT = "hi"
"""Answered with exactly one reply (the menu) by rules/acme-shop.yaml for a new number."""
SECRET_ID = "AKIDsmsbotbenche2e"
SECRET_KEY = "bench-e2e-secret-key"
APP_ID = "1400006666"
TARGET_RATE = 200.0
TARGET_P99_MS = 100.0
PROXY_VARIABLES = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
MAX_CONNECTIONS = 512
"""The generator opens connections as needed (open loop) up to this many; beyond, requests wait (reported)."""
INITIAL_CONNECTIONS = 16
IDLE_REUSE_SECONDS = 2.0
"""A connection idle longer is closed instead of reused: uvicorn closes idle keep-alive connections after 5 s,
and a request written on one it is closing would fail without reaching the application."""


# ------------------------------------------------------------------ numbers and requests


def mobile_number(run: int, index: int) -> str:
    """A valid Chinese mobile number (the fake checks ``1[3-9]\\d{9}``), unique per run and index."""
    return f"139{run:02d}{index:06d}"


def callback_request(port: int, mobile: str, sent_at: int) -> bytes:
    body = json.dumps(
        {"extend": "", "mobile": mobile, "nationcode": "86", "sign": SIGN, "text": TEXT, "time": sent_at},
        separators=(",", ":"),
    ).encode()
    head = (
        f"POST /sms/callback HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


# ------------------------------------------------------------------ the open-loop load generator


@dataclass
class Sample:
    mobile: str
    scheduled: float
    """Wall-clock time the schedule said to write it."""
    sent: float = math.nan
    """Wall-clock time just before the request was written."""
    answered: float = math.nan
    status: int = 0
    error: str = ""


@dataclass
class LoadResult:
    samples: list[Sample]
    started: float
    finished: float
    cpu_seconds: float
    connections_opened: int
    waited_for_connection: int

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if 200 <= s.status < 300]


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.last_used = time.monotonic()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class OpenLoopGenerator:
    """Writes request ``i`` at ``start + i / rate`` on a free keep-alive connection, opening more when needed."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[_Conn] = []
        self.opened = 0
        self.open_now = 0
        self.waited = 0
        self._freed: asyncio.Event | None = None

    async def _open(self) -> _Conn:
        self.open_now += 1  # counted while connecting, so concurrent opens respect MAX_CONNECTIONS
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except BaseException:
            self.open_now -= 1
            raise
        self.opened += 1
        return _Conn(reader, writer)

    async def prepare(self, count: int) -> None:
        self._freed = asyncio.Event()
        conns = await asyncio.gather(*(self._open() for _ in range(count)))
        self.idle.extend(conns)

    async def _connection(self) -> _Conn:
        assert self._freed is not None
        while self.idle:
            conn = self.idle.pop()
            if time.monotonic() - conn.last_used <= IDLE_REUSE_SECONDS:
                return conn
            conn.close()
            self.open_now -= 1
        if self.open_now < MAX_CONNECTIONS:
            return await self._open()
        self.waited += 1
        while not self.idle:
            self._freed.clear()
            await self._freed.wait()
        return self.idle.pop()

    async def _one(self, sample: Sample, request: bytes) -> None:
        try:
            conn = await self._connection()
        except OSError as exc:
            sample.error = f"connect: {type(exc).__name__}: {exc}"
            return
        try:
            sample.sent = time.time()
            conn.writer.write(request)
            head = await conn.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            sample.status = int(lines[0].split(" ", 2)[1])
            length, close = 0, False
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "connection" and value.strip().lower() == "close":
                    close = True
            if length:
                await conn.reader.readexactly(length)
            sample.answered = time.time()
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
            sample.error = f"{type(exc).__name__}: {exc}"
            close = True
        if close:
            conn.close()
            self.open_now -= 1
        else:
            conn.last_used = time.monotonic()
            self.idle.append(conn)
            assert self._freed is not None
            self._freed.set()

    async def run(self, requests: Sequence[tuple[str, bytes]], rate: float, answer_timeout: float) -> LoadResult:
        loop = asyncio.get_running_loop()
        await self.prepare(INITIAL_CONNECTIONS)
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        mono0 = loop.time() + 0.02
        wall0 = time.time() + (mono0 - loop.time())
        samples: list[Sample] = []
        tasks: list[asyncio.Task[None]] = []
        for i, (mobile, request) in enumerate(requests):
            due = mono0 + i / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            sample = Sample(mobile=mobile, scheduled=wall0 + i / rate)
            samples.append(sample)
            tasks.append(asyncio.create_task(self._one(sample, request)))
        finished_sending = time.time()
        _done, pending = await asyncio.wait(tasks, timeout=answer_timeout)
        for task in pending:
            task.cancel()
        for sample in samples:
            if not sample.status and not sample.error:
                sample.error = f"no answer within {answer_timeout:g} s"
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        return LoadResult(samples, wall0, finished_sending, cpu, self.opened, self.waited)

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


async def _generate(port: int, requests: Sequence[tuple[str, bytes]], rate: float, answer_timeout: float) -> LoadResult:
    generator = OpenLoopGenerator(port)
    try:
        return await generator.run(requests, rate, answer_timeout)
    finally:
        generator.close()


def generate(port: int, requests: Sequence[tuple[str, bytes]], rate: float, answer_timeout: float = 30.0) -> LoadResult:
    return asyncio.run(_generate(port, requests, rate, answer_timeout))


# ------------------------------------------------------------------ the fake Tencent API


def rules_templates_and_signatures(rules_dir: Path) -> tuple[dict[str, str], list[str]]:
    """Every template (id -> text) and concrete signature in the rule files, to approve them at the fake."""
    templates: dict[str, str] = {}
    signatures: list[str] = []
    for path in sorted(rules_dir.glob("*.y*ml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        sign = data.get("signature")
        if isinstance(sign, str) and sign != "*" and sign not in signatures:
            signatures.append(sign)
        for template in (data.get("templates") or {}).values():
            if isinstance(template, dict) and "id" in template and "text" in template:
                templates[str(template["id"])] = str(template["text"])
    if SIGN not in signatures:
        raise BenchError(f"no rule file in {rules_dir} answers the signature {SIGN!r}")
    return templates, signatures


def clean_env(workdir: Path | None = None) -> dict[str, str]:
    """The environment without proxies and SMSBOT_* settings; with ``workdir``, smsbot reads an empty config
    file there (``SMSBOT_CONFIG``), so no ``config.yaml`` changes the setup: every setting comes from here."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMSBOT_") and k not in PROXY_VARIABLES}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    if workdir is not None:
        config = workdir / "config.yaml"
        if not config.exists():
            config.write_text("# bench_e2e: settings come from the environment only\n", encoding="utf-8")
        env["SMSBOT_CONFIG"] = str(config)
    return env


def _get(port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@contextlib.contextmanager
def fake_tencent(port: int, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    templates, signatures = rules_templates_and_signatures(RULES_DIR)
    cmd = [
        sys.executable,
        "-m",
        "tests.fakes.tencent_sms",
        "--port",
        str(port),
        "--secret-id",
        SECRET_ID,
        "--secret-key",
        SECRET_KEY,
        "--app-id",
        APP_ID,
        "--no-limits",
    ]
    for tid, body in templates.items():
        cmd += ["--template", f"{tid}={body}"]
    for sign in signatures:
        cmd += ["--signature", sign]
    log: IO[bytes] = log_path.open("wb")
    proc = subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError):
                if _get(port, "/_fake/health", timeout=1)[0] == 200:
                    break
            if proc.poll() is not None:
                raise BenchError(f"the fake Tencent API exited with {proc.returncode}:\n{log_path.read_text()}")
            if time.monotonic() > deadline:
                raise BenchError(f"the fake Tencent API did not answer within 30 s:\n{log_path.read_text()}")
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def smsbot_server(
    cmd: Sequence[str], env: dict[str, str], port: int, workdir: Path
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """``smsbot serve`` in ``workdir`` (not the repository: its ``config.yaml`` and, for the writer process's
    fork server, its ``bot`` on ``sys.path[0]`` stay out), until ``/readyz``; stopped with SIGINT afterwards."""
    return server("smsbot serve", cmd, env, port, workdir / "server.log", cwd=workdir, ready_path="/readyz")


def _tail(path: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    return "(no log)"


@dataclass(frozen=True)
class Send:
    phone_number: str
    session_context: str
    received_at: float


def fake_sends(port: int) -> list[Send]:
    status, body = _get(port, "/_fake/sends", timeout=60)
    if status != 200:
        raise BenchError(f"GET /_fake/sends answered {status}")
    return [Send(s["phone_number"], s["session_context"], float(s["received_at"])) for s in json.loads(body)]


def fake_send_count(port: int) -> int:
    """Sends recorded so far: ``/_fake/sends/count`` when the fake has it (cheap), else the whole list."""
    status, body = _get(port, "/_fake/sends/count")
    if status == 200:
        return int(json.loads(body)["count"])
    return len(fake_sends(port))


# ------------------------------------------------------------------ database


def prepare_database(choice: str, workdir: Path) -> tuple[str, str]:
    """(URL, description) of an empty, migrated database."""
    if choice == "sqlite":
        url = f"sqlite:///{workdir / 'bench-e2e.db'}"
        label = f"SQLite {sqlite3.sqlite_version} (new file in {workdir})"
    else:
        url = DEFAULT_POSTGRES_URL if choice == "postgres" else choice
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            path = Path(parsed.database or "")
            if not parsed.database or path.exists():
                raise BenchError(f"--database {url}: give a SQLite file that does not exist yet (it is created)")
            label = f"SQLite {sqlite3.sqlite_version} ({path})"
        elif parsed.get_backend_name() == "postgresql":
            if parsed.database in (None, "", "test", "postgres"):
                raise BenchError(f"--database {url}: refusing to wipe the database {parsed.database!r}")
            ensure_postgres_database(url)
            engine = create_engine(url, isolation_level="AUTOCOMMIT")
            try:
                with engine.connect() as conn:
                    version = str(conn.execute(text("SHOW server_version")).scalar_one()).split()[0]
                    conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
                    conn.execute(text("CREATE SCHEMA public"))
            except Exception as exc:
                raise BenchError(f"cannot reset PostgreSQL at {url}: {exc}") from exc
            finally:
                engine.dispose()
            label = f"PostgreSQL {version} (database {parsed.database}, wiped)"
        else:
            raise BenchError(f"--database {url}: only sqlite and postgresql URLs are supported")
    env = clean_env(workdir) | {"SMSBOT_DATABASE_URL": url, "SMSBOT_RULES_DIR": str(RULES_DIR)}
    proc = subprocess.run(
        [smsbot_command(), "db", "upgrade"], cwd=workdir, env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise BenchError(f"smsbot db upgrade failed for {url}:\n{proc.stdout}{proc.stderr}")
    return url, label


def outbox_left(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT COUNT(*) FROM outbox")).scalar_one())
    finally:
        engine.dispose()


def _epoch(value: Any) -> float:
    if isinstance(value, datetime):
        moment = value
    else:
        moment = datetime.fromisoformat(str(value))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


@dataclass(frozen=True)
class ReplyRow:
    message_id: int
    mobile: str
    status: str
    created_at: float
    """When the writer handled the callback's batch (its clock at the batch's start)."""
    updated_at: float
    """When the delivery round recorded the send's outcome (one value per round)."""


def reply_rows(url: str) -> dict[int, ReplyRow]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT m.id, c.mobile, m.status, m.created_at, m.updated_at FROM messages m"
                    " JOIN contacts c ON c.id = m.contact_id WHERE m.direction = 'out'"
                )
            ).all()
    finally:
        engine.dispose()
    return {int(r[0]): ReplyRow(int(r[0]), str(r[1]), str(r[2]), _epoch(r[3]), _epoch(r[4])) for r in rows}


# ------------------------------------------------------------------ CPU per process


def postgres_backends(url: str) -> list[int]:
    """PostgreSQL server processes serving the benchmark's database (CPU of a local server is counted too)."""
    if make_url(url).get_backend_name() != "postgresql":
        return []
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
            ).all()
    except Exception:  # only the CPU table loses a line
        return []
    finally:
        engine.dispose()
    return [int(pid) for (pid,) in rows if Path(f"/proc/{pid}").exists()]


def _name(pid: int) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [w.decode(errors="replace") for w in cmdline if w]
    joined = " ".join(words)
    if "resource_tracker" in joined:
        return "resource tracker"
    if "forkserver" in joined:
        # The writer process is forked from the fork server, so it shows the fork server's command line.
        info = ppid_and_ticks(pid)
        parent = Path(f"/proc/{info[0]}/cmdline") if info else None
        with contextlib.suppress(OSError):
            if parent is not None and b"forkserver" in parent.read_bytes():
                return "writer process"
        return "forkserver"
    if "multiprocessing" in joined or "spawn_main" in joined:
        return "writer process"
    if "tencent_sms" in joined:
        return "fake Tencent API"
    if "serve" in words:
        return "smsbot serve (HTTP)"
    return Path(words[0]).name if words else "?"


# ------------------------------------------------------------------ analysis


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (no interpolation): the value that p% of the samples do not exceed."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def describe(values_ms: Sequence[float]) -> str:
    if not values_ms:
        return "(none)"
    return (
        f"p50 {percentile(values_ms, 50):7.1f}  p95 {percentile(values_ms, 95):7.1f}  "
        f"p99 {percentile(values_ms, 99):7.1f}  max {max(values_ms):7.1f} ms"
    )


@dataclass
class Delivery:
    expected: set[str]
    """Numbers whose callback was answered 2xx: each must get exactly one reply."""
    texted: set[str]
    """Every number a callback was written for, whatever the answer."""
    sends: list[Send]
    by_number: dict[str, list[Send]] = field(default_factory=dict)
    by_context: dict[str, list[Send]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for send in self.sends:
            self.by_number.setdefault(send.phone_number, []).append(send)
            self.by_context.setdefault(send.session_context, []).append(send)

    @staticmethod
    def e164(mobile: str) -> str:
        return f"+86{mobile}"

    def first(self, mobile: str) -> Send | None:
        sends = self.by_number.get(self.e164(mobile))
        return min(sends, key=lambda s: s.received_at) if sends else None

    @property
    def received(self) -> int:
        return sum(1 for m in self.expected if self.e164(m) in self.by_number)

    @property
    def missing(self) -> list[str]:
        return sorted(m for m in self.expected if self.e164(m) not in self.by_number)

    @property
    def duplicated_numbers(self) -> dict[str, int]:
        return {n: len(s) for n, s in self.by_number.items() if len(s) > 1}

    @property
    def duplicated_contexts(self) -> dict[str, int]:
        return {c: len(s) for c, s in self.by_context.items() if len(s) > 1}

    @property
    def unexpected(self) -> int:
        """Sends to numbers no callback was written for (there should never be any)."""
        texted = {self.e164(m) for m in self.texted}
        return sum(len(s) for n, s in self.by_number.items() if n not in texted)

    @property
    def after_error(self) -> int:
        """Replies to callbacks answered with an error (stored all the same; Tencent's retry would be a duplicate
        callback, deduplicated): not counted against exactly-once, shown apart."""
        errored = {self.e164(m) for m in self.texted - self.expected}
        return sum(1 for n in self.by_number if n in errored)

    @property
    def exactly_once(self) -> bool:
        return not self.missing and not self.duplicated_numbers and not self.duplicated_contexts and not self.unexpected


def wait_for_sends(fake_port: int, url: str, expected: int, timeout: float) -> tuple[int, float]:
    """Poll until the fake has ``expected`` sends and the outbox is empty; (sends seen, seconds waited)."""
    began = time.monotonic()
    count = 0
    while time.monotonic() - began < timeout:
        count = fake_send_count(fake_port)
        if count >= expected and outbox_left(url) == 0:
            break
        time.sleep(0.2)
    return count, time.monotonic() - began


# ------------------------------------------------------------------ report


def print_delivery(label: str, samples: Sequence[Sample], delivery: Delivery) -> list[float]:
    latencies: list[float] = []
    for sample in samples:
        send = delivery.first(sample.mobile)
        if send is not None:
            latencies.append((send.received_at - sample.sent) * 1000)
    print(f"  {label} latency callback sent -> SendSms at the fake ({len(latencies):,} replies): {describe(latencies)}")
    return latencies


def timeline(samples: Sequence[Sample], delivery: Delivery, started: float) -> None:
    """Per second of the load: callbacks written, replies that arrived at the fake, latency of that second's callbacks."""
    sent_in: dict[int, list[float]] = defaultdict(list)
    arrivals: Counter[int] = Counter()
    for sample in samples:
        send = delivery.first(sample.mobile)
        second = int(sample.sent - started)
        if send is not None:
            sent_in[second].append((send.received_at - sample.sent) * 1000)
            arrivals[int(send.received_at - started)] += 1
        else:
            sent_in[second].append(math.inf)
    print("  per second of the load: callbacks written, SendSms arrived, latency of that second's callbacks (ms)")
    print(f"  {'s':>4} {'cb':>5} {'sends':>6} {'p50':>7} {'p99':>7} {'max':>7}")
    for second in range(max(sent_in, default=-1) + 1):
        values = sent_in.get(second, [])
        print(
            f"  {second:>4} {len(values):>5} {arrivals.get(second, 0):>6} {percentile(values, 50):>7.1f} "
            f"{percentile(values, 99):>7.1f} {max(values, default=math.nan):>7.1f}"
        )


def breakdown(samples: Sequence[Sample], delivery: Delivery, rows: dict[int, ReplyRow]) -> None:
    """Ingest vs outbox wait per reply, the backlog, and how outcomes were recorded, from the reply rows."""
    ingest: list[float] = []
    wait: list[float] = []
    record: list[float] = []
    answer: list[float] = []
    events: list[tuple[float, int]] = []  # (time, +1 handled by the writer / -1 arrived at the fake)
    together: dict[float, list[float]] = defaultdict(list)  # updated_at -> arrivals recorded with it
    for sample in samples:
        if not math.isnan(sample.answered):
            answer.append((sample.answered - sample.sent) * 1000)
        send = delivery.first(sample.mobile)
        if send is None or not send.session_context.isdigit():
            continue
        row = rows.get(int(send.session_context))
        if row is None:
            continue
        ingest.append((row.created_at - sample.sent) * 1000)
        wait.append((send.received_at - row.created_at) * 1000)
        record.append((row.updated_at - send.received_at) * 1000)
        events += [(row.created_at, 1), (send.received_at, -1)]
        together[row.updated_at].append(send.received_at)
    print("  where the time goes (callback sent: this process; handled: reply row's created_at, the writer's clock")
    print("  when it handled the callback's batch; recorded: its updated_at; arrived: the fake's clock; one machine):")
    print(f"    callback answered (HTTP round trip, includes the commit) {describe(answer)}")
    print(f"    callback sent -> handled by the writer                   {describe(ingest)}")
    print(f"    handled by the writer -> SendSms arrived at the fake     {describe(wait)}")
    print(f"    SendSms arrived -> outcome recorded                      {describe(record)}")
    if not together:
        return
    backlog, depth = [], 0
    for _, step in sorted(events):
        depth += step
        backlog.append(depth)
    print(
        f"    replies handled but not yet at the fake (sampled at every event): mean {statistics.mean(backlog):.1f}, "
        f"p99 {percentile(backlog, 99):.0f}, max {max(backlog)}"
    )
    sizes = [len(arrivals) for arrivals in together.values()]
    print(
        f"    outcomes recorded together (same updated_at): {len(together):,} groups, mean {statistics.mean(sizes):.1f}"
        f" replies, p99 {percentile(sizes, 99):.0f}, max {max(sizes)}"
    )
    if max(sizes) == 1:
        print("    (every outcome recorded on its own: the delivery loop records per send, not per round)")
        return
    spans: list[float] = []  # first -> last arrival within a round
    per_send: list[float] = []
    gaps: list[float] = []  # outcomes recorded -> the next round's first arrival
    ordered = sorted(together.items())
    for _, arrivals in ordered:
        if len(arrivals) > 1:
            spans.append((max(arrivals) - min(arrivals)) * 1000)
            per_send.append((max(arrivals) - min(arrivals)) * 1000 / (len(arrivals) - 1))
    for (done, _), (_, nxt) in itertools.pairwise(ordered):
        gaps.append((min(nxt) - done) * 1000)
    print(f"    rounds of 2+: first -> last SendSms arrival              {describe(spans)}")
    print(f"    rounds of 2+: SendSms arrival to arrival (per send)      {describe(per_send)}")
    print(f"    outcomes recorded -> next round's first SendSms          {describe(gaps)}")


def print_cpu(
    names: dict[int, str], before: dict[int, int], after: dict[int, int], seconds: float, generator_cpu: float
) -> None:
    print(f"  CPU over the measured window ({seconds:.1f} s; 100% = one core):")
    for pid, ticks in sorted(after.items()):
        used = (ticks - before.get(pid, 0)) / CLK_TCK
        print(f"    {names.get(pid, '?'):<22} pid {pid:<8} {used:6.2f} s  {100 * used / seconds:5.1f}%")
    print(f"    {'load generator (this)':<22} {'':<12} {generator_cpu:6.2f} s  {100 * generator_cpu / seconds:5.1f}%")


def code_under_test(env: dict[str, str]) -> str:
    """Where ``smsbot serve`` will import ``bot`` from, and that tree's git state when it is this repository."""
    proc = subprocess.run(
        [sys.executable, "-c", "import bot, os; print(os.path.dirname(bot.__file__))"],
        cwd=tempfile.gettempdir(),  # not the repository: PYTHONPATH decides, as for the server
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    where = Path(proc.stdout.strip() or "?")
    if where.resolve() != (REPO / "bot").resolve():
        return f"bot from {where}"
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "bot", "migrations"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.splitlines()
    state = f"{len(dirty)} files under bot/ and migrations/ changed since" if dirty else "clean at"
    return f"bot from {where} ({state} git {head or '?'})"


def writer_transactions(log_path: Path) -> str | None:
    """The writer's own count of transactions and jobs, from the line it logs when it stops."""
    with contextlib.suppress(OSError):
        for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            match = re.search(r"stopping: (\d+) transaction\(s\) for (\d+) job\(s\)", line)
            if match:
                return f"{int(match[1]):,} transactions for {int(match[2]):,} jobs"
    return None


def loadavg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


# ------------------------------------------------------------------ main


def run(args: argparse.Namespace, workdir: Path) -> None:
    url, db_label = prepare_database(args.database, workdir)
    fake_port, server_port = free_port(), free_port()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"bench_e2e: {cpu_model()}, {os.cpu_count()} cores ({affinity} usable), load average {loadavg()}")
    print(f"Python {platform.python_version()}, {db_label}, writer {args.writer}")
    print(f"code under test: {code_under_test(clean_env(workdir))}")
    print(
        f"load: open-loop asyncio generator in this process (not wrk: no constant-rate pacing or sub-second "
        f"timestamps), {args.rate:g} callbacks/s for {args.seconds:g} s after {args.warmup:g} s of warm-up; "
        f"each callback a new number texting {TEXT!r} ({SIGN}) -> exactly one reply expected"
    )
    print(
        "latency: wall clock when the callback was written to the socket (~ its receipt at the server, "
        "loopback) -> wall clock when the fake began handling the SendSms for that number"
    )
    print()

    server_env = clean_env(workdir) | {
        "SMSBOT_DATABASE_URL": url,
        "SMSBOT_RULES_DIR": str(RULES_DIR),
        "SMSBOT_WRITER": args.writer,
        "SMSBOT_SENDER": "tencent",
        "SMSBOT_TENCENT_ENDPOINT": f"127.0.0.1:{fake_port}",
        "SMSBOT_TENCENT_SCHEME": "http",
        "SMSBOT_TENCENT_SDK_APP_ID": APP_ID,
        "TENCENTCLOUD_SECRET_ID": SECRET_ID,
        "TENCENTCLOUD_SECRET_KEY": SECRET_KEY,
    }
    serve_cmd = [smsbot_command(), "serve", "--host", "127.0.0.1", "--port", str(server_port)]
    now = int(time.time())
    warm_count = round(args.rate * args.warmup)
    count = round(args.rate * args.seconds)
    warm_requests = [
        (m, callback_request(server_port, m, now)) for m in (mobile_number(0, i) for i in range(warm_count))
    ]
    requests = [
        (m, callback_request(server_port, m, now + int(i / args.rate)))
        for i, m in enumerate(mobile_number(1, i) for i in range(count))
    ]

    with fake_tencent(fake_port, workdir / "fake.log") as fake_proc:
        with smsbot_server(serve_cmd, server_env, server_port, workdir) as server_proc:
            warm_ok: set[str] = set()
            warm_texted: set[str] = set()
            if warm_requests:
                print(f"warm-up: {len(warm_requests):,} callbacks ...", flush=True)
                warm = generate(server_port, warm_requests, args.rate)
                warm_ok = {s.mobile for s in warm.ok}
                warm_texted = {s.mobile for s in warm.samples}
                wait_for_sends(fake_port, url, len(warm_ok), args.drain_timeout)
            pids = [*process_tree(server_proc.pid), fake_proc.pid]
            names = {pid: _name(pid) for pid in pids}
            for pid in postgres_backends(url):  # the database server's work for us, when it runs here
                pids.append(pid)
                names[pid] = "PostgreSQL backend"
            print(f"measured run: {count:,} callbacks at {args.rate:g}/s, load average {loadavg()} ...", flush=True)
            before = cpu_ticks(pids)
            t_before = time.monotonic()
            load = generate(server_port, requests, args.rate)
            after = cpu_ticks(pids)
            cpu_window = time.monotonic() - t_before
            print(f"  load done; waiting up to {args.drain_timeout:g} s for the replies ...", flush=True)
            seen, waited = wait_for_sends(fake_port, url, len(warm_ok) + len(load.ok), args.drain_timeout)
            time.sleep(1.0)  # a late duplicate would arrive now
            print(f"  {seen:,} sends at the fake {waited:.1f} s after the load ended; stopping the server", flush=True)
        # the server has stopped (graceful, SIGINT); the fake still runs: read what it recorded
        sends = fake_sends(fake_port)
    rows = reply_rows(url)
    load_avg_after = loadavg()
    transactions = writer_transactions(workdir / "server.log")
    report(
        args,
        (warm_ok, warm_texted),
        load,
        sends,
        rows,
        (names, before, after),
        cpu_window,
        load_avg_after,
        transactions,
    )


def report(
    args: argparse.Namespace,
    warm: tuple[set[str], set[str]],
    load: LoadResult,
    sends: list[Send],
    rows: dict[int, ReplyRow],
    cpu: tuple[dict[int, str], dict[int, int], dict[int, int]],
    cpu_window: float,
    load_avg_after: str,
    transactions: str | None,
) -> None:
    ok = load.ok
    errors = [s for s in load.samples if not 200 <= s.status < 300]
    if not ok:
        reasons = Counter(s.error or f"HTTP {s.status}" for s in errors).most_common(3)
        raise BenchError(f"no callback of the measured run was answered 2xx: {reasons}")
    measured = {s.mobile for s in ok}
    warm_ok, warm_texted = warm
    expected = measured | warm_ok
    delivery = Delivery(expected, warm_texted | {s.mobile for s in load.samples}, sends)
    first_sent = min((s.sent for s in ok), default=math.nan)
    last_sent = max((s.sent for s in ok), default=math.nan)
    arrivals = [send.received_at for m in measured if (send := delivery.first(m)) is not None]
    lateness = [(s.sent - s.scheduled) * 1000 for s in load.samples if not math.isnan(s.sent)]
    written = sorted(s.sent for s in load.samples if not math.isnan(s.sent))
    achieved = (len(written) - 1) / (written[-1] - written[0]) if len(written) > 1 else math.nan
    sustained = len(arrivals) / (max(arrivals) - first_sent) if arrivals else math.nan

    print()
    print("results")
    print(
        f"  callbacks: {len(load.samples):,} written, {len(ok):,} answered 2xx, {len(errors):,} not "
        f"({Counter(s.error or str(s.status) for s in errors).most_common(3) if errors else 'none'}); "
        f"achieved {achieved:,.1f} callbacks/s (requested {args.rate:g})"
    )
    print(
        f"  generator: written {describe(lateness)} late against the schedule; "
        f"{load.connections_opened} connections opened, {load.waited_for_connection} waits for one"
    )
    latencies = print_delivery("measured", ok, delivery)
    print(
        f"  sends/s sustained: {sustained:,.1f} (measured replies / first callback sent -> last SendSms arrived); "
        f"while the load ran: "
        f"{sum(1 for a in arrivals if a <= last_sent) / max(last_sent - first_sent, 1e-9):,.1f}/s"
    )
    dup_numbers, dup_contexts = delivery.duplicated_numbers, delivery.duplicated_contexts
    print(
        f"  exactly once (warm-up + measured): expected {len(expected):,} replies, received {delivery.received:,}, "
        f"duplicated {len(dup_numbers):,} numbers / {len(dup_contexts):,} SessionContexts "
        f"({sum(dup_numbers.values()) - len(dup_numbers):,} extra sends), missing {len(delivery.missing):,}, "
        f"to numbers never texted {delivery.unexpected:,}"
        f"{f'; and {delivery.after_error:,} replies to callbacks answered with an error' if delivery.after_error else ''}"
    )
    if delivery.missing:
        print(f"    missing e.g. {delivery.missing[:5]}")
    if dup_numbers:
        print(f"    duplicated e.g. {list(dup_numbers.items())[:5]}")
    statuses = Counter(r.status for r in rows.values())
    print(f"  reply rows in the database: {dict(statuses)}")
    print()
    timeline(ok, delivery, first_sent)
    print()
    breakdown(ok, delivery, rows)
    print()
    print_cpu(*cpu, cpu_window, load.cpu_seconds)
    if transactions:
        print(f"  database writer, whole run (warm-up and drain included): {transactions}")
    print(f"  load average after: {load_avg_after}")
    print()
    p99 = percentile(latencies, 99)
    rate_ok = args.rate >= TARGET_RATE and not errors and achieved >= 0.95 * args.rate
    latency_ok = bool(latencies) and p99 < TARGET_P99_MS and len(latencies) == len(ok)
    once_ok = delivery.exactly_once
    print(
        f"target p99 < {TARGET_P99_MS:g} ms at {TARGET_RATE:g} callbacks/s: "
        f"{'met' if latency_ok and rate_ok else 'NOT met'} (p99 {p99:.1f} ms at {achieved:,.1f}/s"
        f"{'' if args.rate >= TARGET_RATE else f'; the requested rate {args.rate:g}/s is below the target rate'}"
        f"{f'; {len(errors)} callbacks not answered 2xx' if errors else ''})"
    )
    print(
        f"target every reply delivered exactly once: {'met' if once_ok else 'NOT met'} "
        f"(for the {len(expected):,} callbacks answered 2xx, warm-up included)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="End to end: callbacks in at a steady rate, replies out at a fake Tencent API; latency and "
        "exactly-once."
    )
    parser.add_argument("--rate", type=float, default=200.0, help="callbacks per second (default 200)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds of load (default 20)")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds at the same rate (default 2)")
    parser.add_argument(
        "--database",
        default="sqlite",
        help="sqlite (a new file, default), postgres (smsbot_bench on 127.0.0.1, WIPED, created if missing), "
        "or a URL: a SQLite file that does not exist yet or a PostgreSQL database to WIPE",
    )
    parser.add_argument("--writer", choices=("process", "thread"), default="process", help="SMSBOT_WRITER")
    parser.add_argument(
        "--drain-timeout", type=float, default=60.0, help="seconds to wait for the replies after the load"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, SQLite file)")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.seconds <= 0 or args.warmup < 0:
        parser.error("--rate and --seconds must be positive, --warmup not negative")

    workdir = Path(tempfile.mkdtemp(prefix="smsbot-bench-e2e-"))
    try:
        run(args, workdir)
    except BenchError as exc:
        print(f"bench_e2e: {exc}\n(logs kept in {workdir})", file=sys.stderr)
        return 2
    except BaseException:
        print(f"(logs kept in {workdir})", file=sys.stderr)
        raise
    if args.keep:
        print(f"\nlogs and database: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
