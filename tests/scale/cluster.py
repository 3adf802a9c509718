"""Real ``smsbot serve`` and ``smsbot worker`` processes on one database, with a fake Tencent recording sends.

The scale-out and fault tests run the deployment the way ``docs/deploy.md``
describes it: callback servers that only store and queue (``--no-deliver``),
worker processes that send through the Tencent sender, all on one database,
against ``tests/fakes/tencent_sms.py`` (a real HTTP server speaking Tencent's
API). Every process gets its own process group, so a test can ``kill -9`` one
process (the crash) or its whole group, and every one left is killed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine, create_engine, text

from bot.tencent.session_context import SessionContexts, key_from
from tests.fakes.tencent_sms import FakeTencentSms, FrequencyLimits
from tests.support import SMSBOT, free_port, wait_until

SIGN = "Scale Shop"
SECRET_ID = "AKIDscaletest000000000000000000000"
SECRET_KEY = "scale-test-secret-key-0000000000"
CONTEXT_SECRET = "scale-test-session-context-secret"
CONTEXTS = SessionContexts(key_from(explicit=CONTEXT_SECRET, tencent_secret_key=None) or b"")

TEMPLATES = {
    "2000001": "Menu: reply 1 or 2.",
    "2000002": "You chose one. Reply BYE.",
    "2000003": "You chose two. Reply BYE.",
    "2000004": "Goodbye.",
    "2000005": "New menu: reply 1 or 2.",
}
RULES = """\
signature: Scale Shop
templates:
  menu: {id: "2000001", text: "Menu: reply 1 or 2."}
  one:  {id: "2000002", text: "You chose one. Reply BYE."}
  two:  {id: "2000003", text: "You chose two. Reply BYE."}
  bye:  {id: "2000004", text: "Goodbye."}
  new_menu: {id: "2000005", text: "New menu: reply 1 or 2."}
start: idle
states:
  idle:
    on:
      - keywords: [HI]
        reply: MENU_TEMPLATE
        goto: menu
  menu:
    on:
      - keywords: ["1"]
        reply: one
        goto: chose
      - keywords: ["2"]
        reply: two
        goto: chose
  chose:
    on:
      - keywords: [BYE]
        reply: bye
        goto: done
  done:
    on:
      - keywords: [HI]
        reply: menu
        goto: menu
"""
"""Each customer says HI, then 1 or 2, then BYE: three replies, and the conversation ends in ``done``."""


def rules_text(menu_template: str = "menu") -> str:
    return RULES.replace("MENU_TEMPLATE", menu_template)


def script(i: int) -> list[tuple[str, str, str]]:
    """Conversation ``i``: (text, template id of the reply, state after) for each step."""
    choice = "1" if i % 2 == 0 else "2"
    return [
        ("HI", "2000001", "menu"),
        (choice, "2000002" if choice == "1" else "2000003", "chose"),
        ("BYE", "2000004", "done"),
    ]


def mobile(i: int) -> str:
    return f"139{i:08d}"


def callback(text_: str, number: str, at: int) -> dict[str, Any]:
    return {"extend": "", "mobile": number, "nationcode": "86", "sign": SIGN, "text": text_, "time": at}


def make_fake(**options: Any) -> FakeTencentSms:
    """The fake Tencent the processes send to: our templates and signature, no frequency limits."""
    options.setdefault("limits", FrequencyLimits.disabled())
    options.setdefault("echo_session_context", True)
    return FakeTencentSms(
        secret_id=SECRET_ID, secret_key=SECRET_KEY, templates=TEMPLATES, signatures={SIGN}, **options
    ).start()


@dataclass
class Proc:
    """One smsbot command running in a process group of its own."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    port: int | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        """``kill -9`` of this process alone (its children, such as the writer process, see it die)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def group_gone(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return True
        return False

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGINT (Ctrl-C, a service manager's stop), then kill the group if it has not ended in time."""
        if self.alive():
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_group()
        with contextlib.suppress(Exception):
            wait_until(self.group_gone, timeout=10, what=f"{self.name}'s processes to end")
        return self.proc.returncode

    def ready(self) -> bool:
        assert self.alive(), f"{self.name} exited:\n{self.output()[-4000:]}"
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.base}/readyz", timeout=5).status_code == 200
        return False


@dataclass
class Cluster:
    """Processes of one deployment: a database URL, a rules folder, a fake Tencent, their environment."""

    database_url: str
    folder: Path
    fake_endpoint: str
    extra_env: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)

    @property
    def rules(self) -> Path:
        return self.folder / "rules"

    def env(self, **extra: str) -> dict[str, str]:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("SMSBOT_")}
        environment |= {
            "SMSBOT_DATABASE_URL": self.database_url,
            "SMSBOT_RULES_DIR": str(self.rules),
            "SMSBOT_WRITER": "process",
            "SMSBOT_SENDER": "tencent",
            "SMSBOT_TENCENT_ENDPOINT": self.fake_endpoint,
            "SMSBOT_TENCENT_SCHEME": "http",
            "SMSBOT_TENCENT_SDK_APP_ID": "1400006666",
            "TENCENTCLOUD_SECRET_ID": SECRET_ID,
            "TENCENTCLOUD_SECRET_KEY": SECRET_KEY,
            "SMSBOT_SESSION_CONTEXT_SECRET": CONTEXT_SECRET,
            "SMSBOT_FREQUENCY_SAME_CONTENT": "0s",
            "SMSBOT_FREQUENCY_PER_DAY": "0",
            "SMSBOT_LOOP_LIMIT": "1000",
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
            **extra,
        }
        return environment

    def _start(self, name: str, argv: Sequence[str], env: dict[str, str], port: int | None = None) -> Proc:
        log = self.folder / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [str(SMSBOT), *argv],
                cwd=self.folder,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a group of its own, as under a service manager
            )
        started = Proc(name, proc, log, port)
        self.procs.append(started)
        return started

    def serve(
        self,
        name: str,
        *,
        workers: int = 1,
        port: int | None = None,
        wait: bool = True,
        deliver: bool = False,
        **env: str,
    ) -> Proc:
        """``smsbot serve``; ``--no-deliver`` (workers send) unless ``deliver``."""
        port = port or free_port()
        argv = ["serve", "--port", str(port), *([] if deliver else ["--no-deliver"])]
        if workers > 1:
            argv += ["--workers", str(workers)]
        proc = self._start(name, argv, self.env(**env), port)
        if wait:
            wait_until(proc.ready, timeout=90, what=f"{name} to be ready")
        return proc

    def worker(self, name: str, *, concurrency: int = 8, **env: str) -> Proc:
        proc = self._start(name, ["worker", "--concurrency", str(concurrency)], self.env(**env))
        wait_until(
            lambda: "sending queued replies" in proc.output() or not proc.alive(), timeout=60, what=f"{name} to start"
        )
        assert proc.alive(), f"{name} exited:\n{proc.output()[-4000:]}"
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        for proc in self.procs:
            proc.kill_group()


@contextlib.contextmanager
def cluster(database_url: str, folder: Path, fake_endpoint: str, **extra_env: str) -> Iterator[Cluster]:
    """A migrated database, the scale rules in ``folder/rules``; every process started is stopped after."""
    (folder / "rules").mkdir(parents=True, exist_ok=True)
    (folder / "rules" / "scale.yaml").write_text(rules_text(), encoding="utf-8")
    result = subprocess.run(
        [str(SMSBOT), "db", "upgrade"],
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("SMSBOT_")},
            "SMSBOT_DATABASE_URL": database_url,
        },
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr.decode()
    c = Cluster(database_url, folder, fake_endpoint, dict(extra_env))
    try:
        yield c
    finally:
        c.stop_all()


# ---------------------------------------------------------------- driving conversations


@dataclass
class Drive:
    """What the customers saw: every callback answered with result 0, and every other answer."""

    ok: list[tuple[int, int]] = field(default_factory=list)
    """(conversation, step) whose callback was answered ``{"result": 0}``."""
    refused: list[tuple[int, int, int]] = field(default_factory=list)
    """(conversation, step, HTTP status) answered otherwise (a 503 while the database was down)."""
    errors: list[tuple[int, int, str]] = field(default_factory=list)
    """(conversation, step, error) that got no answer at all (the server was killed)."""


def drive(
    bases: Callable[[], Sequence[str]],
    conversations: Sequence[int],
    *,
    concurrency: int = 48,
    retry_for: float = 0.0,
    stop_on_failure: bool = True,
    t0: int | None = None,
    into: Drive | None = None,
) -> Drive:
    """Run each conversation's script, its steps in order, step k of conversation i to server (i + k) % n.

    A step not answered with result 0 is tried again for ``retry_for`` seconds
    (as Tencent retries a callback); after that the conversation stops there
    when ``stop_on_failure``. ``bases`` is asked again for every request, so a
    test can swap a restarted server in. ``into``: fill this ``Drive`` as answers
    come (another thread watches it to time a fault).
    """
    at = t0 if t0 is not None else int(time.time()) - 600
    result = into if into is not None else Drive()

    async def one(client: httpx.AsyncClient, gate: asyncio.Semaphore, i: int) -> None:
        async with gate:
            for k, (said, _, _) in enumerate(script(i)):
                deadline = time.monotonic() + retry_for
                while True:
                    servers = bases()
                    base = servers[(i + k) % len(servers)]
                    try:
                        response = await client.post(
                            f"{base}/sms/callback", json=callback(said, mobile(i), at + k), timeout=30
                        )
                    except httpx.HTTPError as exc:
                        result.errors.append((i, k, type(exc).__name__))
                    else:
                        if response.status_code == 200 and response.json() == {"result": 0, "errmsg": "OK"}:
                            result.ok.append((i, k))
                            break
                        result.refused.append((i, k, response.status_code))
                    if time.monotonic() > deadline:
                        if stop_on_failure:
                            return
                        break
                    await asyncio.sleep(0.2)

    async def main() -> None:
        gate = asyncio.Semaphore(concurrency)
        limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
        async with httpx.AsyncClient(limits=limits) as client:
            await asyncio.gather(*(one(client, gate, i) for i in conversations))

    asyncio.run(main())
    return result


# ---------------------------------------------------------------- what the database and the fake hold


def fake_sends(endpoint: str) -> list[dict[str, Any]]:
    return list(httpx.get(f"http://{endpoint}/_fake/sends", timeout=30).json())


def fake_send_count(endpoint: str) -> int:
    return int(httpx.get(f"http://{endpoint}/_fake/sends/count", timeout=10).json()["count"])


def sent_message_ids(sends: Sequence[Any]) -> list[int | None]:
    """The reply each recorded send carried (by our SessionContext marker), in the order they reached Tencent."""
    return [CONTEXTS.message_id(s["session_context"] if isinstance(s, dict) else s.session_context) for s in sends]


def outbound(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [
            dict(row)
            for row in conn.execute(
                text(
                    "SELECT m.id, m.status, m.template_id, m.status_reason, c.mobile FROM messages m"
                    " JOIN contacts c ON c.id = m.contact_id WHERE m.direction = 'out' ORDER BY m.id"
                )
            ).mappings()
        ]


def states(engine: Engine) -> dict[str, str | None]:
    with engine.connect() as conn:
        return {
            str(mobile_): state
            for mobile_, state in conn.execute(
                text("SELECT c.mobile, v.state FROM conversations v JOIN contacts c ON c.id = v.contact_id")
            )
        }


def inbound_texts(engine: Engine) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    with engine.connect() as conn:
        for mobile_, said in conn.execute(
            text(
                "SELECT c.mobile, m.text FROM messages m JOIN contacts c ON c.id = m.contact_id"
                " WHERE m.direction = 'in' ORDER BY m.id"
            )
        ):
            found.setdefault(str(mobile_), []).append(str(said))
    return found


def outbox_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM outbox")).scalar_one())


def rules_loaded(proc: Proc, version: str) -> int:
    """How many processes of ``proc`` logged loading rules ``version`` (each writer process logs its own)."""
    return len(re.findall(rf"rules loaded: version {re.escape(version)}\b", proc.output()))


def engine_for(url: str) -> Engine:
    return create_engine(url, pool_pre_ping=True)
