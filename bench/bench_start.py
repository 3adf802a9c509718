"""Start API throughput: conversations started per second through ``POST /api/v1/conversations:batch``.

Issue 12's target: at least 2,000 starts/s on SQLite on a 2-core machine. For
each database this script:

1. makes a fresh database (a new SQLite file, or the PostgreSQL database of
   ``--postgres-url`` with its ``public`` schema dropped and recreated) and
   runs ``smsbot db upgrade``, then ``smsbot apikeys add bench --scope start``;
2. starts a real ``smsbot serve`` (writer process, the default) on loopback
   with a rule file of its own (a reminder template with two params, the
   first a Jinja2 expression over the vars: every start renders it) and, by
   default, delivery off (``--no-deliver``: the messages stay queued, so only
   the starts are measured; ``--deliver`` sends them to the console sender in
   the writer process, competing for the same cores);
3. posts ``--count`` starts (default 100,000), 1,000 per request, one request
   at a time over one keep-alive connection, each to a new number (bodies are
   encoded before the clock starts), and checks every item was answered 202
   and that the database holds exactly that many started messages;
4. then posts ``--single`` (default 500) single starts one after another and
   reports their latency percentiles (p50, p99).

Run it with ``.venv/bin/python bench/bench_start.py [--count 100000]
[--databases sqlite,postgres] [--postgres-url URL]``; the PostgreSQL URL
defaults to ``$SMSBOT_BENCH_POSTGRES_URL``, else ``test_api`` on the local
server (a database the benchmark may wipe). Exit status 1 when SQLite misses
the target, 2 when the benchmark could not run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ingest import (  # the benchmarks share their server and database helpers
    BenchError,
    ensure_postgres_database,
    free_port,
    server,
    smsbot_command,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test_api"
TARGET_SQLITE = 2000.0
BATCH = 1000
SIGN = "Bench Shop"
RULES = """\
signature: Bench Shop
templates:
  remind:    {id: "3000001", text: "Appointment {1} at {2}. Reply 1 to confirm."}
  confirmed: {id: "3000002", text: "Confirmed: {1}."}
start: idle
states:
  idle:
    on:
      - keywords: [HI]
        reply: confirmed
        params: ["hi"]
  reminder:
    expires: 1d
    on:
      - keywords: ["1"]
        reply: confirmed
        params: ["{{ vars.appointment }}"]
        goto: idle
"""


@dataclass(frozen=True)
class Result:
    database: str
    starts: int
    seconds: float
    stored: int
    single_p50_ms: float
    single_p99_ms: float
    single_max_ms: float

    @property
    def per_second(self) -> float:
        return self.starts / self.seconds if self.seconds else 0.0


def env_for(url: str, rules: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMSBOT_")}
    env |= {"SMSBOT_DATABASE_URL": url, "SMSBOT_RULES_DIR": str(rules), "SMSBOT_SENDER": "console"}
    env |= {"SMSBOT_FREQUENCY_SAME_CONTENT": "0", "SMSBOT_FREQUENCY_PER_DAY": "0", "PYTHONUNBUFFERED": "1"}
    return env


def fresh_database(name: str, workdir: Path, postgres_url: str, rules: Path) -> str:
    if name == "sqlite":
        url = f"sqlite:///{workdir / 'bench-start.db'}"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{workdir / 'bench-start.db'}{suffix}").unlink(missing_ok=True)
    else:
        ensure_postgres_database(postgres_url)
        url = postgres_url
        engine = create_engine(url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
                conn.execute(text("CREATE SCHEMA public"))
        finally:
            engine.dispose()
    done = subprocess.run(
        [smsbot_command(), "db", "upgrade"], env=env_for(url, rules), capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"smsbot db upgrade failed:\n{done.stdout}{done.stderr}")
    return url


def api_key(url: str, rules: Path) -> str:
    done = subprocess.run(
        [smsbot_command(), "apikeys", "add", "bench", "--scope", "start"],
        env=env_for(url, rules),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"smsbot apikeys add failed:\n{done.stdout}{done.stderr}")
    return done.stdout.splitlines()[0].strip()


def item(n: int) -> dict[str, object]:
    return {
        "signature": SIGN,
        "nationcode": "86",
        "mobile": f"139{n:08d}",
        "template": "remind",
        "state": "reminder",
        "params": ["{{ vars.appointment }}", "10:00"],
        "vars": {"appointment": f"T{n % 100000:05d}"},
    }


def post(conn: http.client.HTTPConnection, path: str, body: bytes, key: str) -> tuple[int, bytes]:
    conn.request(
        "POST", path, body=body, headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    )
    response = conn.getresponse()
    return response.status, response.read()


def run_singles(port: int, key: str, count: int, offset: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    latencies = []
    for n in range(offset, offset + count):
        body = json.dumps(item(n)).encode()
        began = time.perf_counter()
        status, answer = post(conn, "/api/v1/conversations", body, key)
        latencies.append((time.perf_counter() - began) * 1000)
        if status != 202:
            raise BenchError(f"single start: HTTP {status}: {answer[:500]!r}")
    conn.close()
    return latencies


def stored_starts(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM messages WHERE started_by = 'api:bench'")).scalar_one())
    finally:
        engine.dispose()


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def bench(name: str, args: argparse.Namespace, workdir: Path) -> Result:
    rules = workdir / "rules"
    rules.mkdir(exist_ok=True)
    (rules / "bench.yaml").write_text(RULES, encoding="utf-8")
    url = fresh_database(name, workdir, args.postgres_url, rules)
    key = api_key(url, rules)
    port = free_port()
    cmd = [smsbot_command(), "serve", "--host", "127.0.0.1", "--port", str(port)]
    if not args.deliver:
        cmd.append("--no-deliver")
    print(f"  {name}: smsbot serve, {args.count:,} starts in batches of {BATCH} ...", flush=True)
    with server(name, cmd, env_for(url, rules), port, workdir / f"serve-{name}.log", ready_path="/readyz"):
        warm = min(2 * BATCH, args.count)
        run_batches(port, key, warm, 0)  # warm-up: imports, caches, the first pages
        seconds = run_batches(port, key, args.count, warm)
        latencies = run_singles(port, key, args.single, warm + args.count)
    stored = stored_starts(url)
    expected = warm + args.count + args.single
    if stored != expected:
        raise BenchError(f"{name}: {stored} started messages stored, expected {expected}")
    return Result(
        database=name,
        starts=args.count,
        seconds=seconds,
        stored=stored,
        single_p50_ms=statistics.median(latencies),
        single_p99_ms=percentile(latencies, 0.99),
        single_max_ms=max(latencies),
    )


def run_batches(port: int, key: str, count: int, offset: int) -> float:
    """``count`` starts to numbers from ``offset`` on, 1,000 per request, one request at a time; seconds taken."""
    bodies = [
        json.dumps({"items": [item(offset + n) for n in range(start, min(start + BATCH, count))]}).encode()
        for start in range(0, count, BATCH)
    ]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    began = time.perf_counter()
    for index, body in enumerate(bodies):
        status, answer = post(conn, "/api/v1/conversations:batch", body, key)
        if status != 200:
            raise BenchError(f"batch {index}: HTTP {status}: {answer[:500]!r}")
        refused = [r for r in json.loads(answer)["results"] if r["status"] != 202]
        if refused:
            raise BenchError(f"batch {index}: {len(refused)} item(s) not started, e.g. {refused[0]}")
    elapsed = time.perf_counter() - began
    conn.close()
    return elapsed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000, help="starts through the batch API (default 100,000)")
    parser.add_argument("--single", type=int, default=500, help="sequential single starts for the latency sample")
    parser.add_argument("--databases", default="sqlite,postgres", help="comma-separated: sqlite, postgres")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("SMSBOT_BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL),
        help="a PostgreSQL database the benchmark may wipe (default $SMSBOT_BENCH_POSTGRES_URL, else test_api)",
    )
    parser.add_argument("--deliver", action="store_true", help="deliver to the console sender while starting")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.databases.split(",") if n.strip()]
    print(f"bench_start: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}", flush=True)
    results: list[Result] = []
    try:
        with tempfile.TemporaryDirectory(prefix="smsbot-bench-start-") as folder:
            for name in names:
                if name not in ("sqlite", "postgres"):
                    raise BenchError(f"unknown database {name!r}")
                results.append(bench(name, args, Path(folder)))
    except BenchError as exc:
        print(f"bench_start: {exc}", file=sys.stderr)
        return 2
    print()
    print("| database | starts | seconds | starts/s | single start p50 | p99 | max |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r.database} | {r.starts:,} | {r.seconds:.1f} | {r.per_second:,.0f} | {r.single_p50_ms:.1f} ms"
            f" | {r.single_p99_ms:.1f} ms | {r.single_max_ms:.1f} ms |"
        )
    sqlite = next((r for r in results if r.database == "sqlite"), None)
    if sqlite is not None and sqlite.per_second < TARGET_SQLITE:
        print(f"target missed: SQLite {sqlite.per_second:,.0f} starts/s < {TARGET_SQLITE:,.0f}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
