"""Callback ingest throughput: the full pipeline against a bare endpoint.

The inbound pipeline promises (issue 3) that storing every callback durably
before answering costs at most half the stack's throughput: requests/second
through the real server must be at least 0.5 times those of a FastAPI +
uvicorn endpoint that answers the same JSON without doing anything. This
script measures that, for SQLite and for PostgreSQL:

1. For each database it starts two real servers on loopback, one after the
   other, each as its own process:
   - bare: ``bench/bare_app.py``, the same route answering
     ``{"result":0,"errmsg":"OK"}`` after reading the body, started with the
     same ``uvicorn.run(..., log_level="info", access_log=False)`` call as
     ``smsbot serve``;
   - full: ``smsbot serve`` itself (rules from ``rules/``, console sender, the
     in-process delivery loop, the group-commit writer) on a fresh database: a
     new SQLite file in a temporary folder, or a PostgreSQL database of its own
     (``smsbot_bench``, created when missing) with its ``public`` schema
     dropped and recreated, then ``smsbot db upgrade``.
2. Both are driven by the same load generator, ``wrk`` (C, one thread so the
   other core is left to the server), with the same connections and duration,
   after the same warm-up. A generated Lua script posts the seed's payload
   shape with a different number, text and time on every request, so every
   dedupe key differs and the full server really stores every message; the
   texts mix menu keywords, menu choices and free text, so conversations move
   between states and replies get queued and "sent" by the console sender.
3. It prints requests/second, p50/p99 latency, non-2xx answers and socket
   errors for each server, the ratio full/bare per database, and, after each
   full run, how many inbound messages were stored against the number of
   requests wrk saw answered with 2xx (the stored count may exceed it by the
   requests still in flight when wrk stopped, at most one per connection and
   wrk run).
4. On Linux it also prints where the CPU went during each measured run, per
   answered request: wrk, the server process, its child processes (smsbot's
   writer process) and PostgreSQL (every ``postgres`` process on the machine),
   read from ``/proc``, and how busy the cores were. wrk, the servers and the
   database share the same cores, so this shows what a request costs each of
   them and how far the machine is from full.

5. ``--compare-with PATH`` measures another checkout of the repository (with
   its own ``.venv``, e.g. a worktree of main) side by side with this one, in
   one run: rounds of bare, this tree, the other tree, alternately
   (``--rounds``, default 3 then), each tree's server, migrations and rules
   its own. It prints every round's req/s, its ratio to that round's bare
   endpoint and the CPU per request, then the medians and the spread of the
   rounds, and whether the medians differ by more than that spread.
6. ``--production`` adds a production-shaped run on PostgreSQL: ``smsbot serve
   --workers 2 --no-deliver`` (two HTTP processes, each with its writer
   process) and one ``smsbot worker`` process sending through the Tencent
   sender to the fake Tencent API (``python -m tests.fakes.tencent_sms``, as
   ``bench/bench_e2e.py`` starts it), with its req/s and ratio to the bare
   endpoint (the worker's and the fake's CPU in the "others" column).

Run it with ``.venv/bin/python bench/bench_ingest.py [--seconds 10]
[--connections 32] [--databases sqlite,postgres] [--rounds N]
[--compare-with PATH] [--production]``. It needs ``wrk``
(Debian/Ubuntu: ``apt-get install wrk``) and, for PostgreSQL, a database it may
wipe: ``--postgres-url``, default ``smsbot_bench`` on the local server of the
test database (``postgres@127.0.0.1:5432``, trust auth), created if missing. It
is deliberately not the ``test`` database itself: tests and CI run there,
possibly at the same moment, and the benchmark wipes its database. The
exit status is 1 when the target (ratio at least 0.5 on every database) is
missed, 2 when the benchmark could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import platform
import re
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

REPO = Path(__file__).resolve().parent.parent
RULES_DIR = REPO / "rules"
BARE_APP = REPO / "bench" / "bare_app.py"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/smsbot_bench"
TARGET_RATIO = 0.5
SIGN = "Acme Shop"
NUMBER_POOL = 4_999
"""Distinct mobile numbers: numbers come back (conversations continue) but each request's key is new.
Prime, so not a multiple of the five texts: one number gets different texts over time."""
RUN_OFFSET = 10_000_000
"""Request counter offset of the measured run, so its keys never repeat the warm-up's."""
MARKER = "BENCH_RESULT "
STOP_TIMEOUT = 15
"""Seconds a server gets to shut down after SIGINT before it is killed."""

# {placeholders} are filled in by ``lua_script``; literal braces are doubled.
LUA_TEMPLATE = """\
-- generated by bench/bench_ingest.py
local base = {base}
local nthreads = {threads}
local pool = {pool}
local t0 = {t0}
local sign = "{sign}"
local texts = {{"hi", "1", "2", "MENU"}}
local words = {{"hello", "when", "open", "order", "thanks", "price", "where", "delivery", "today", "please",
                "shop", "my", "is", "the", "receipt", "late"}}
local counter = 0
local created = 0

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

function setup(thread)
  thread:set("tid", created)
  created = created + 1
end

function init(args)
  math.randomseed(base + tid * 7 + 1)
end

function request()
  -- n is unique across threads and wrk runs; the time t0 + n makes every dedupe key unique.
  local n = base + counter * nthreads + tid
  counter = counter + 1
  local mobile = string.format("138%08d", (n * 7919) % pool)
  local k = n % 5
  local msg
  if k < 4 then
    msg = texts[k + 1]
  else
    local count = math.random(2, 5)
    local parts = {{}}
    for i = 1, count do
      parts[i] = words[math.random(#words)]
    end
    msg = table.concat(parts, " ")
  end
  local body = string.format(
    '{{"extend":"","mobile":"%s","nationcode":"86","sign":"%s","text":"%s","time":%d}}',
    mobile, sign, msg, t0 + n)
  return wrk.format(nil, "/sms/callback", nil, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "{marker}requests=%d duration_us=%d connect=%d read=%d write=%d status=%d timeout=%d "
      .. "p50_us=%d p90_us=%d p99_us=%d max_us=%d\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


class BenchError(Exception):
    """The benchmark could not run; the message says why."""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    non_2xx: int
    socket_errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def answered_ok(self) -> int:
        return self.requests - self.non_2xx


@dataclass(frozen=True)
class Stored:
    inbound: int
    outbound: int
    outbox_left: int
    conversations: int
    answered_ok: int  # 2xx answers wrk saw, warm-up and run together

    @property
    def all_stored(self) -> bool:
        return self.inbound >= self.answered_ok


@dataclass(frozen=True)
class CpuUse:
    """CPU seconds spent during the measured run, by who spent them (read from Linux's /proc)."""

    wall: float
    wrk: float
    server: float
    """The process wrk talks to (uvicorn: HTTP parsing, validation, answers)."""
    helpers: float
    """The server's child processes (smsbot's writer process and multiprocessing's fork server)."""
    postgres: float
    """Every PostgreSQL server process on this machine: backends, WAL writer, autovacuum."""
    others: float = 0.0
    """Processes beside the server (``--production``: the ``smsbot worker`` and the fake Tencent API)."""

    @property
    def total(self) -> float:
        return self.wrk + self.server + self.helpers + self.postgres + self.others


@dataclass(frozen=True)
class Row:
    database: str
    server: str
    result: WrkResult
    stored: Stored | None = None
    cpu: CpuUse | None = None
    tree: str = ""
    """``--compare-with``: which checkout ran the full server ("this" or "other"); empty for bare."""
    round: int = 0


@dataclass(frozen=True)
class Tree:
    """A checkout of the repository whose ``smsbot`` (its own venv, migrations and rules) is measured."""

    label: str
    root: Path
    smsbot: str

    @property
    def rules(self) -> Path:
        return self.root / "rules"


def this_tree() -> Tree:
    return Tree("this", REPO, smsbot_command())


def other_tree(path: str) -> Tree:
    root = Path(path).resolve()
    smsbot = root / ".venv" / "bin" / "smsbot"
    if not smsbot.exists():
        raise BenchError(f"--compare-with {path}: no {smsbot} (run 'make .venv/.installed' there first)")
    return Tree("other", root, str(smsbot))


# ------------------------------------------------------------------ wrk


def lua_script(base: int, threads: int, t0: int) -> str:
    return LUA_TEMPLATE.format(base=base, threads=threads, pool=NUMBER_POOL, t0=t0, sign=SIGN, marker=MARKER)


def parse_wrk(output: str) -> WrkResult:
    """Read the line our Lua ``done`` prints (wrk's own report is kept for the log)."""
    for line in output.splitlines():
        if line.startswith(MARKER):
            fields = dict(part.split("=", 1) for part in line[len(MARKER) :].split())
            values = {key: int(value) for key, value in fields.items()}
            return WrkResult(
                requests=values["requests"],
                seconds=values["duration_us"] / 1e6,
                non_2xx=values["status"],
                socket_errors=values["connect"] + values["read"] + values["write"] + values["timeout"],
                p50_ms=values["p50_us"] / 1000,
                p90_ms=values["p90_us"] / 1000,
                p99_ms=values["p99_us"] / 1000,
                max_ms=values["max_us"] / 1000,
            )
    raise BenchError(f"wrk printed no {MARKER.strip()} line; its output was:\n{output}")


def run_wrk(
    wrk: str, port: int, *, seconds: float, connections: int, threads: int, base: int, t0: int, workdir: Path
) -> tuple[WrkResult, str]:
    script = workdir / f"ingest-{base}.lua"
    script.write_text(lua_script(base, threads, t0), encoding="utf-8")
    cmd = [
        wrk,
        f"--threads={threads}",
        f"--connections={connections}",
        f"--duration={max(1, round(seconds))}s",
        "--timeout=10s",
        "--latency",
        f"--script={script}",
        f"http://127.0.0.1:{port}/sms/callback",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=seconds + 60)
    if proc.returncode != 0:
        raise BenchError(f"wrk failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return parse_wrk(proc.stdout), proc.stdout


# ------------------------------------------------------------------ servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _healthy(port: int, path: str = "/healthz") -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def server(
    label: str,
    cmd: Sequence[str],
    env: dict[str, str],
    port: int,
    log_path: Path,
    *,
    cwd: Path = REPO,
    ready_path: str = "/healthz",
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a server process, wait until ``ready_path`` answers 200, stop it gracefully (SIGINT) afterwards."""
    log: IO[bytes] = log_path.open("wb")
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not _healthy(port, ready_path):
            if proc.poll() is not None:
                raise BenchError(f"server exited with {proc.returncode}: {' '.join(cmd)}\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise BenchError(f"server not ready ({ready_path}) after 60 s: {' '.join(cmd)}\n{_tail(log_path)}")
            time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(
                    f"  warning: the {label} server did not exit within "
                    f"{STOP_TIMEOUT} s of SIGINT (graceful shutdown hangs); killed it",
                    flush=True,
                )
                proc.kill()
                proc.wait()
        log.close()


def server_env(database_url: str | None, rules_dir: Path = RULES_DIR) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("SMSBOT_CALLBACK_TOKEN", "SMSBOT_CONFIG"):
        env.pop(name, None)
    env["SMSBOT_RULES_DIR"] = str(rules_dir)
    env["SMSBOT_SENDER"] = "console"
    # 4,999 numbers text over and over: Tencent's per-number limits would hold most replies back
    # (deferring is cheaper than sending), so they are off and every reply is really sent.
    env["SMSBOT_FREQUENCY_SAME_CONTENT"] = "0"
    env["SMSBOT_FREQUENCY_PER_DAY"] = "0"
    env["SMSBOT_FREQUENCY_PER_HOUR"] = "0"
    if database_url is not None:
        env["SMSBOT_DATABASE_URL"] = database_url
    return env


def smsbot_command() -> str:
    beside = Path(sys.executable).parent / "smsbot"
    if beside.exists():
        return str(beside)
    found = shutil.which("smsbot")
    if found is None:
        raise BenchError("the smsbot command is not installed: run 'make run' or pip install -e . first")
    return found


# ------------------------------------------------------------------ CPU accounting


CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def ppid_and_ticks(pid: int) -> tuple[int, int] | None:
    """(parent pid, CPU ticks of the process and its threads) from /proc, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[11]) + int(fields[12])


def process_tree(root: int) -> list[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            info = ppid_and_ticks(int(entry.name))
            if info is not None:
                children[info[0]].append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def cpu_ticks(pids: Sequence[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for pid in pids:
        info = ppid_and_ticks(pid)
        if info is not None:
            out[pid] = info[1]
    return out


def postgres_pids() -> list[int]:
    """Every PostgreSQL server process on this machine (backends, WAL writer, autovacuum, ...)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().startswith("postgres"):
                    found.append(int(entry.name))
    return found


def cpu_snapshot(server_pid: int, others: Sequence[int] = ()) -> dict[str, float] | None:
    """CPU seconds so far of the server, of its descendants, of ``others`` (with theirs) and of PostgreSQL;
    None without /proc."""
    if not Path("/proc/self/stat").exists():
        return None
    tree = cpu_ticks(process_tree(server_pid))
    beside = cpu_ticks([pid for root in others for pid in process_tree(root)])
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk, once waited for
    return {
        "server": tree.get(server_pid, 0) / CLK_TCK,
        "helpers": sum(ticks for pid, ticks in tree.items() if pid != server_pid) / CLK_TCK,
        "others": sum(beside.values()) / CLK_TCK,
        "postgres": sum(cpu_ticks(postgres_pids()).values()) / CLK_TCK,
        "wrk": usage.ru_utime + usage.ru_stime,
        "wall": time.monotonic(),
    }


def cpu_used(before: dict[str, float] | None, after: dict[str, float] | None) -> CpuUse | None:
    if before is None or after is None:
        return None
    delta = {key: after[key] - before[key] for key in before}
    # A helper that exited during the run would make its share negative: count it as nothing.
    return CpuUse(
        wall=delta["wall"],
        wrk=delta["wrk"],
        server=delta["server"],
        helpers=max(0.0, delta["helpers"]),
        postgres=max(0.0, delta["postgres"]),
        others=max(0.0, delta["others"]),
    )


# ------------------------------------------------------------------ databases


def fresh_database(name: str, workdir: Path, postgres_url: str, tree: Tree | None = None) -> str:
    """A URL to an empty database, migrated by ``tree``'s ``smsbot db upgrade`` (default: this checkout's)."""
    tree = tree or this_tree()
    if name == "sqlite":
        url = f"sqlite:///{workdir / 'bench.db'}"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{workdir / 'bench.db'}{suffix}").unlink(missing_ok=True)
    else:
        url = postgres_url
        engine = create_engine(url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
                conn.execute(text("CREATE SCHEMA public"))
        except Exception as exc:
            raise BenchError(f"cannot reset PostgreSQL at {url}: {exc}") from exc
        finally:
            engine.dispose()
    proc = subprocess.run(
        [tree.smsbot, "db", "upgrade"],
        cwd=tree.root,
        env=server_env(url, tree.rules),
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise BenchError(f"smsbot db upgrade failed for {url}:\n{proc.stdout}{proc.stderr}")
    return url


def count_stored(url: str, answered_ok: int) -> Stored:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT direction, COUNT(*) FROM messages GROUP BY direction"))
            by_direction: dict[str, int] = {str(direction): int(count) for direction, count in rows}
            # replies still waiting to be sent; by status, not by the outbox table, so that a --compare-with
            # tree whose schema keeps its queue elsewhere (e.g. on the messages rows) is counted the same way
            outbox_left = conn.execute(text("SELECT COUNT(*) FROM messages WHERE status = 'queued'")).scalar_one()
            conversations = conn.execute(text("SELECT COUNT(*) FROM conversations")).scalar_one()
    finally:
        engine.dispose()
    return Stored(
        inbound=int(by_direction.get("in", 0)),
        outbound=int(by_direction.get("out", 0)),
        outbox_left=int(outbox_left),
        conversations=int(conversations),
        answered_ok=answered_ok,
    )


def ensure_postgres_database(url: str) -> None:
    """Create the benchmark's own database when it does not exist yet (needs CREATEDB)."""
    target = make_url(url)
    name = target.database
    if not name:
        raise BenchError(f"--postgres-url {url} names no database")
    admin = create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            exists = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}).first()
            if exists is None:
                quoted = conn.dialect.identifier_preparer.quote(name)
                conn.execute(text(f"CREATE DATABASE {quoted}"))
    except Exception as exc:
        raise BenchError(
            f"cannot reach or create the PostgreSQL database {name!r} ({exc}); "
            "pass --postgres-url with a database the benchmark may wipe"
        ) from exc
    finally:
        admin.dispose()


def database_version(name: str, postgres_url: str) -> str:
    if name == "sqlite":
        return f"SQLite {sqlite3.sqlite_version}"
    ensure_postgres_database(postgres_url)
    engine = create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            version = str(conn.execute(text("SHOW server_version")).scalar_one())
    except Exception as exc:
        raise BenchError(f"PostgreSQL is not reachable at {postgres_url}: {exc}") from exc
    finally:
        engine.dispose()
    return f"PostgreSQL {version.split()[0]} (database {make_url(postgres_url).database})"


# ------------------------------------------------------------------ one measurement


@dataclass(frozen=True)
class Load:
    wrk: str
    seconds: float
    warmup: float
    connections: int
    threads: int
    t0: int


def measure(
    load: Load,
    label: str,
    cmd: Sequence[str],
    env: dict[str, str],
    port: int,
    log_path: Path,
    *,
    cwd: Path = REPO,
    others: Sequence[int] = (),
) -> tuple[WrkResult, int, CpuUse | None]:
    """Warm up, then measure; returns the measured run, the 2xx answers of both wrk runs, and the CPU used."""
    with server(label, cmd, env, port, log_path, cwd=cwd) as proc:
        answered = 0
        if load.warmup > 0:
            warm, _ = run_wrk(
                load.wrk,
                port,
                seconds=load.warmup,
                connections=load.connections,
                threads=load.threads,
                base=0,
                t0=load.t0,
                workdir=log_path.parent,
            )
            answered += warm.answered_ok
        before = cpu_snapshot(proc.pid, others)
        result, report = run_wrk(
            load.wrk,
            port,
            seconds=load.seconds,
            connections=load.connections,
            threads=load.threads,
            base=RUN_OFFSET,
            t0=load.t0,
            workdir=log_path.parent,
        )
        cpu = cpu_used(before, cpu_snapshot(proc.pid, others))
        answered += result.answered_ok
    log_path.with_suffix(".wrk.txt").write_text(report, encoding="utf-8")
    return result, answered, cpu


def bench_bare(name: str, load: Load, workdir: Path, round_: int = 0) -> Row:
    port = free_port()
    bare_cmd = [sys.executable, str(BARE_APP), "--port", str(port)]
    print(f"  {name}: bare endpoint ...", flush=True)
    bare, _, bare_cpu = measure(
        load, f"{name} bare", bare_cmd, server_env(None), port, workdir / f"{name}-bare-{round_}.log"
    )
    return Row(name, "bare", bare, cpu=bare_cpu, round=round_)


def bench_full(name: str, load: Load, postgres_url: str, workdir: Path, tree: Tree, round_: int = 0) -> Row:
    url = fresh_database(name, workdir, postgres_url, tree)
    port = free_port()
    full_cmd = [tree.smsbot, "serve", "--host", "127.0.0.1", "--port", str(port)]
    print(f"  {name}: full pipeline (smsbot serve, {tree.label} tree: {tree.root}) ...", flush=True)
    full, answered, full_cpu = measure(
        load,
        f"{name} full",
        full_cmd,
        server_env(url, tree.rules),
        port,
        workdir / f"{name}-full-{tree.label}-{round_}.log",
        cwd=tree.root,
    )
    return Row(name, "full", full, count_stored(url, answered), full_cpu, tree=tree.label, round=round_)


def bench_database(name: str, load: Load, postgres_url: str, workdir: Path) -> list[Row]:
    return [bench_bare(name, load, workdir), bench_full(name, load, postgres_url, workdir, this_tree())]


PRODUCTION = "production"
"""The database column's name for ``--production`` rows (PostgreSQL, serve --workers 2 + smsbot worker)."""


def bench_production(load: Load, postgres_url: str, workdir: Path, tree: Tree, round_: int = 0) -> Row:
    """``smsbot serve --workers 2 --no-deliver`` with delivery in one ``smsbot worker`` process, Tencent sender
    against the fake Tencent API: the layout of docs/deploy.md on one machine."""
    import bench_e2e  # the fake Tencent API as bench_e2e starts it (imported here: it imports this module)

    url = fresh_database("postgres", workdir, postgres_url, tree)
    fake_port = free_port()
    env = server_env(url, tree.rules) | {
        "SMSBOT_SENDER": "tencent",
        "SMSBOT_TENCENT_ENDPOINT": f"127.0.0.1:{fake_port}",
        "SMSBOT_TENCENT_SCHEME": "http",
        "SMSBOT_TENCENT_SDK_APP_ID": bench_e2e.APP_ID,
        "TENCENTCLOUD_SECRET_ID": bench_e2e.SECRET_ID,
        "TENCENTCLOUD_SECRET_KEY": bench_e2e.SECRET_KEY,
        "SMSBOT_LOOP_LIMIT": "100000",  # numbers come back thousands of times: every reply really goes out
    }
    for name in bench_e2e.PROXY_VARIABLES:
        env.pop(name, None)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    label = f"production-{tree.label}-{round_}"
    with bench_e2e.fake_tencent(fake_port, workdir / f"{label}-fake.log") as fake:
        worker_log = workdir / f"{label}-worker.log"
        with worker_log.open("wb") as out:
            worker = subprocess.Popen(
                [tree.smsbot, "worker"], cwd=tree.root, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        try:
            deadline = time.monotonic() + 60
            while "sending queued replies" not in worker_log.read_text(encoding="utf-8", errors="replace"):
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"smsbot worker did not start:\n{_tail(worker_log)}")
                time.sleep(0.1)
            port = free_port()
            cmd = [tree.smsbot, "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2", "--no-deliver"]
            print(f"  {PRODUCTION}: serve --workers 2 --no-deliver + smsbot worker ({tree.label} tree) ...", flush=True)
            result, answered, cpu = measure(
                load,
                label,
                cmd,
                env,
                port,
                workdir / f"{label}-serve.log",
                cwd=tree.root,
                others=[worker.pid, fake.pid],
            )
        finally:
            if worker.poll() is None:
                worker.send_signal(signal.SIGINT)
                try:
                    worker.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    worker.kill()
                    worker.wait()
    return Row(PRODUCTION, "full", result, count_stored(url, answered), cpu, tree=tree.label, round=round_)


# ------------------------------------------------------------------ report


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def wrk_version(wrk: str) -> str:
    proc = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
    match = re.search(r"wrk\s+(\S+)", proc.stdout + proc.stderr)
    return match.group(1) if match else "unknown version"


def print_table(rows: list[Row]) -> bool:
    header = f"{'database':<10} {'server':<6} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} {'sock err':>8}"
    print(header)
    print("-" * len(header))
    for row in rows:
        r = row.result
        print(
            f"{row.database:<10} {row.server:<6} {r.rps:>9,.0f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f} "
            f"{r.non_2xx:>8} {r.socket_errors:>8}"
        )
    print()
    met_all = True
    for database in dict.fromkeys(row.database for row in rows):
        bare = next(row.result for row in rows if row.database == database and row.server == "bare")
        full = next(row for row in rows if row.database == database and row.server == "full")
        ratio = full.result.rps / bare.rps if bare.rps else 0.0
        met = ratio >= TARGET_RATIO
        met_all &= met
        print(
            f"{database:<10} ratio full/bare = {ratio:.2f}  (target >= {TARGET_RATIO}: {'met' if met else 'NOT met'})"
        )
    print()
    for row in rows:
        s = row.stored
        if s is None:
            continue
        print(
            f"{row.database:<10} stored after the full run: {s.inbound:,} inbound messages for {s.answered_ok:,} "
            f"requests answered 2xx by wrk (warm-up + run) -> "
            f"{'every answered request stored' if s.all_stored else 'MISSING ROWS'}"
            f"{f' (+{s.inbound - s.answered_ok} in flight when wrk stopped)' if s.inbound > s.answered_ok else ''}; "
            f"{s.outbound:,} replies, {s.outbox_left:,} still in the outbox, {s.conversations:,} conversations"
        )
        met_all &= s.all_stored
    print_cpu(rows)
    return met_all


def print_cpu(rows: list[Row]) -> None:
    """Where each request's CPU went: the ratio is bounded by what the cores can give the full pipeline."""
    measured = [row for row in rows if row.cpu is not None and row.result.requests]
    if not measured:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    print()
    print(
        f"CPU per answered request during the measured run, in microseconds ({cores} cores: "
        f"{cores * 1_000_000:,} us of CPU per second); busy = all CPU used / (cores x seconds)"
    )
    header = (
        f"{'database':<10} {'server':<6} {'wrk':>6} {'server':>7} {'helpers':>8} {'postgres':>9} {'others':>7} "
        f"{'total':>7} {'busy':>5}"
    )
    print(header)
    print("-" * len(header))
    for row in measured:
        print(f"{row.database:<10} {row.server:<6} {cpu_columns(row, cores)}")
    print(CPU_LEGEND)


CPU_LEGEND = (
    "(server: the process wrk talks to; helpers: its child processes, i.e. smsbot's writer process (with "
    "--workers 2: the two HTTP processes and their writers); others: smsbot worker and the fake Tencent; "
    "postgres: every PostgreSQL process on this machine)"
)


def cpu_columns(row: Row, cores: int) -> str:
    """wrk, server, helpers, postgres, others and total CPU per answered request (us), and how busy the cores were."""
    cpu = row.cpu
    if cpu is None or not row.result.requests:
        return ""
    per = 1e6 / row.result.requests
    busy = cpu.total / (cores * cpu.wall) if cpu.wall > 0 else 0.0
    return (
        f"{cpu.wrk * per:>6.0f} {cpu.server * per:>7.0f} {cpu.helpers * per:>8.0f} {cpu.postgres * per:>9.0f} "
        f"{cpu.others * per:>7.0f} {cpu.total * per:>7.0f} {busy:>5.0%}"
    )


def _ratio(row: Row, rows: Sequence[Row]) -> float:
    """A full run's req/s over its round's bare endpoint's (the bare run of the same database and round)."""
    database = "postgres" if row.database == PRODUCTION else row.database
    bare = next(r for r in rows if r.server == "bare" and r.database == database and r.round == row.round)
    return row.result.rps / bare.result.rps if bare.result.rps else 0.0


def print_rounds(rows: Sequence[Row]) -> None:
    """Every round (bare, then each tree's full server), then per database and tree the medians and spread."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    header = (
        f"{'database':<10} {'round':>5} {'tree':<6} {'req/s':>8} {'ratio':>6} {'p99 ms':>7} "
        f"| CPU us/request: {'wrk':>6} {'server':>7} {'helpers':>8} {'postgres':>9} {'others':>7} {'total':>7} "
        f"{'busy':>5}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        ratio = f"{_ratio(row, rows):>6.2f}" if row.server == "full" else f"{'':>6}"
        tree = row.tree or "bare"
        print(
            f"{row.database:<10} {row.round:>5} {tree:<6} {row.result.rps:>8,.0f} {ratio} {row.result.p99_ms:>7.1f} "
            f"|                 {cpu_columns(row, cores)}"
        )
    print(CPU_LEGEND)
    print()
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        if row.server == "full":
            groups.setdefault((row.database, row.tree), []).append(row)
    medians: dict[tuple[str, str], float] = {}
    spreads: dict[tuple[str, str], float] = {}
    for (database, tree), found in groups.items():
        ratios = [_ratio(r, rows) for r in found]
        rps = [r.result.rps for r in found]
        per = [r.cpu.total * 1e6 / r.result.requests for r in found if r.cpu is not None and r.result.requests]
        medians[(database, tree)] = statistics.median(ratios)
        spreads[(database, tree)] = max(ratios) - min(ratios)
        print(
            f"{database:<10} {tree:<6} median of {len(found)}: {statistics.median(rps):,.0f} req/s, "
            f"ratio {statistics.median(ratios):.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f}, "
            f"spread {max(ratios) - min(ratios):.3f})"
            + (f", CPU {statistics.median(per):,.0f} us/request" if per else "")
        )
    bares = [r.result.rps for r in rows if r.server == "bare"]
    if bares:
        print(f"bare endpoint: {min(bares):,.0f}-{max(bares):,.0f} req/s over {len(bares)} runs")
    for database in dict.fromkeys(d for d, _ in groups):
        if (database, "this") in medians and (database, "other") in medians:
            difference = medians[(database, "this")] - medians[(database, "other")]
            noise = max(spreads[(database, "this")], spreads[(database, "other")])
            verdict = "MORE than the spread of the rounds" if abs(difference) > noise else "within the noise"
            print(
                f"{database:<10} this - other: {difference:+.3f} in the median ratio; the larger spread of the "
                f"rounds is {noise:.3f}: {verdict}"
            )
            # The same round's two runs share the machine's load at that moment: their quotient is steadier.
            paired = [
                this.result.rps / other.result.rps
                for this in groups[(database, "this")]
                for other in groups[(database, "other")]
                if this.round == other.round and other.result.rps
            ]
            if paired:
                print(
                    f"{database:<10} this / other in the same round: "
                    + ", ".join(f"{p:.3f}" for p in paired)
                    + f" (median {statistics.median(paired):.3f})"
                )


def _git_head(root: Path) -> str:
    proc = subprocess.run(["git", "-C", str(root), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    return proc.stdout.strip()[:70] or "not a git checkout"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Callback ingest: full pipeline vs a bare endpoint, under wrk.")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per server (default 10)")
    parser.add_argument("--connections", type=int, default=32, help="concurrent wrk connections (default 32)")
    parser.add_argument(
        "--databases", default="sqlite,postgres", help="comma-separated: sqlite, postgres (default both)"
    )
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds before each run (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1: the other core serves)")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("SMSBOT_BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL),
        help="PostgreSQL database to WIPE and use, created if missing "
        "(default $SMSBOT_BENCH_POSTGRES_URL, else smsbot_bench on the local server)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder with server and wrk logs")
    parser.add_argument(
        "--compare-with",
        metavar="PATH",
        help="another checkout of the repository with its own .venv (e.g. a worktree of main): measured in "
        "alternating rounds with this one",
    )
    parser.add_argument(
        "--rounds", type=int, default=0, help="rounds of bare + full per database (default 1; 3 with --compare-with)"
    )
    parser.add_argument(
        "--production",
        action="store_true",
        help="also run serve --workers 2 --no-deliver + smsbot worker (Tencent sender, fake Tencent) on PostgreSQL",
    )
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.compare_with else 1)

    databases = [d.strip() for d in args.databases.split(",") if d.strip()]
    unknown = [d for d in databases if d not in ("sqlite", "postgres")]
    if unknown or not databases:
        parser.error(f"--databases: unknown {', '.join(unknown) or '(none)'}; choose from sqlite, postgres")
    wrk = shutil.which("wrk")
    if wrk is None:
        print(
            "bench_ingest: 'wrk' (the HTTP load generator) is not installed.\n"
            "Install it, e.g. on Debian/Ubuntu: sudo apt-get install -y wrk  (macOS: brew install wrk)",
            file=sys.stderr,
        )
        return 2

    try:
        versions = [database_version(d, args.postgres_url) for d in databases]
    except BenchError as exc:
        print(f"bench_ingest: {exc}", file=sys.stderr)
        return 2
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"bench_ingest: {cpu_model()}, {os.cpu_count()} cores ({affinity} usable)")
    print(
        f"Python {platform.python_version()} ({platform.python_implementation()}), wrk {wrk_version(wrk)}, "
        + ", ".join(versions)
    )
    print(
        f"load: wrk --threads {args.threads} --connections {args.connections}, {args.warmup:g} s warm-up + "
        f"{args.seconds:g} s measured per server; every request a new dedupe key "
        f"({NUMBER_POOL:,} numbers, texts hi/1/2/MENU/free words)"
    )
    print()

    load = Load(
        wrk=wrk,
        seconds=args.seconds,
        warmup=args.warmup,
        connections=args.connections,
        threads=args.threads,
        t0=int(time.time()) - 365 * 86400,  # + RUN_OFFSET (116 days) + requests stays in the past
    )
    workdir = Path(tempfile.mkdtemp(prefix="smsbot-bench-"))
    rows: list[Row] = []
    try:
        trees = [this_tree()] + ([other_tree(args.compare_with)] if args.compare_with else [])
        if args.production and "postgres" not in databases:
            parser.error("--production runs on PostgreSQL: include postgres in --databases")
        if args.compare_with:
            print("trees: " + ", ".join(f"{t.label} = {t.root} ({_git_head(t.root)})" for t in trees) + "\n")
        if len(trees) == 1 and rounds == 1 and not args.production:
            for database in databases:
                rows.extend(bench_database(database, load, args.postgres_url, workdir))
        else:
            for database in databases:
                for round_ in range(1, rounds + 1):
                    print(f"round {round_} of {rounds}:", flush=True)
                    rows.append(bench_bare(database, load, workdir, round_))
                    for tree in trees:
                        rows.append(bench_full(database, load, args.postgres_url, workdir, tree, round_))
                    if args.production and database == "postgres":
                        for tree in trees:
                            rows.append(bench_production(load, args.postgres_url, workdir, tree, round_))
    except BenchError as exc:
        print(f"bench_ingest: {exc}\n(server and wrk logs kept in {workdir})", file=sys.stderr)
        return 2
    except BaseException:
        print(f"(server and wrk logs kept in {workdir})", file=sys.stderr)
        raise
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    if all(row.round == 0 for row in rows):
        met = print_table(rows)
    else:
        print_rounds(rows)
        met = all(row.stored.all_stored for row in rows if row.stored is not None) and all(
            _ratio(row, rows) >= TARGET_RATIO for row in rows if row.server == "full" and row.tree == "this"
        )
        for row in rows:
            if row.stored is not None and not row.stored.all_stored:
                print(f"{row.database} round {row.round} {row.tree}: MISSING ROWS ({row.stored})")
    if args.keep:
        print(f"\nserver logs and wrk reports: {workdir}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
