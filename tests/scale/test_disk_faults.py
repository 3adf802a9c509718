"""The SQLite database's disk read-only or full: one clear error, no crash loop, and it works again once fixed.

A real disk for each: a tiny tmpfs mounted for the test (read-only by
remounting it, full by filling it), so SQLite meets the errors the kernel
gives (EROFS, ENOSPC), not a simulation. Mounting needs root (CAP_SYS_ADMIN),
which this project's machines and CI have; elsewhere the tests say why they skip.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import SMSBOT, copy_rules, payload, serve_process, wait_until

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _env(db_url: str, rules: Path) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SMSBOT_")}
    return environment | {"SMSBOT_DATABASE_URL": db_url, "SMSBOT_RULES_DIR": str(rules), "PYTHONUNBUFFERED": "1"}


def test_serve_on_a_read_only_disk_exits_at_once_with_one_clear_line(tmp_path: Path) -> None:
    rules = copy_rules(tmp_path / "rules")
    with tmpfs(tmp_path / "disk", "4m") as disk:
        url = f"sqlite:///{disk / 'smsbot.db'}"
        subprocess.run([str(SMSBOT), "db", "upgrade"], env=_env(url, rules), check=True, capture_output=True)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        for command in (["serve", "--port", "0"], ["worker", "--once"]):
            done = subprocess.run(
                [str(SMSBOT), *command], env=_env(url, rules), capture_output=True, timeout=120, cwd=tmp_path
            )
            err = done.stderr.decode()
            assert done.returncode == 2, err  # 2: a setup error, which a service manager should not restart
            assert "cannot use the database" in err
            assert "writable disk" in err
            assert "Traceback" not in err
            assert "Traceback" not in done.stdout.decode()


def test_a_full_disk_refuses_callbacks_with_503_without_a_crash_loop_and_recovers(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "2m") as disk:
        url = f"sqlite:///{disk / 'smsbot.db'}"
        subprocess.run(
            [str(SMSBOT), "db", "upgrade"], env=_env(url, copy_rules(tmp_path / "r0")), check=True, capture_output=True
        )
        with serve_process(url, tmp_path) as server:
            server.say("hi", mobile="13800000001")
            filler = disk / "filler"
            subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)  # until ENOSPC

            refused: list[httpx.Response] = []

            def refuses() -> bool:
                number = f"1380000{len(refused) + 10:04d}"
                response = server.post(payload("hi " + "x" * 4000, at=server.at(), mobile=number))
                if response.status_code != 200:
                    refused.append(response)
                return len(refused) >= 3

            wait_until(refuses, timeout=60, what="a callback to be refused on the full disk")
            assert {r.status_code for r in refused} == {503}
            assert refused[0].json()["result"] == 4
            full_since = time.monotonic()
            wait_until(lambda: time.monotonic() - full_since > 5, timeout=10)  # the background loops keep failing
            assert server.proc.poll() is None, "serve died on a full disk"
            out = server.output()
            assert "database or disk is full" in out
            assert out.count("Traceback") <= 3, "a traceback for every failed round: a crash loop in the log"
            assert server.ready().json()["writer"]["restarts"] == 0, "the writer process crashed and restarted"

            filler.unlink()  # space again: the same server takes callbacks again
            server.say("hi", mobile="13800000002")
            wait_until(lambda: "works again" in server.output(), timeout=30, what="the loops to say they recovered")
