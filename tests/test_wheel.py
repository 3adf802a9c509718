"""A wheel built from the repository installs and works away from the checkout.

Why: a wheel built with ``pip wheel .`` once held no ``bot/tencent/`` (the
package list was kept by hand), and every other test runs against the
editable checkout, where a package missing from the wheel is still found on
disk. So these tests build the wheel from a copy of the repository, install
it into a fresh virtual environment outside it, and run the installed
``smsbot`` from a directory that is not the checkout: ``--help``,
``rules check``, ``db upgrade`` and ``serve`` (health checks); they also
import every module the wheel holds and compare its files with the tree.

The fresh environment gets its third-party dependencies from the project's
own ``.venv`` (already installed there) through a ``.pth`` file naming the
project venv's site-packages, so nothing but the wheel itself is installed.
This does not make the checkout visible: a directory a ``.pth`` line adds is
appended to ``sys.path``, but the ``.pth`` files *in* it (among them the
finder of the editable install of smsbot) are not processed, which
``test_every_module_of_the_wheel_imports_from_the_new_environment`` checks.

Building needs the build backend pyproject.toml names (``setuptools>=77``,
newer than the one a Python 3.11 venv comes with); the dev extras install it
into the project venv, so the build runs without isolation and nothing is
downloaded at test time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support import REPO, copy_rules, serve_process, wait_until

pytestmark = pytest.mark.slow

PACKAGED = {"bot": "bot", "migrations": "bot/migrations"}
"""Repository folder -> where its files are in the wheel (pyproject.toml installs migrations/ as bot.migrations)."""

NOT_IMPORTABLE = {"bot.migrations.env"}
"""Modules that only run inside another program: Alembic's env.py reads ``alembic.context.config``, which
exists only while Alembic runs it (``smsbot db upgrade`` does, in ``test_db_upgrade_then_serve``)."""

JUNK_AT_TOP = {".git", ".venv", "build", "dist", ".mypy_cache", ".ruff_cache", ".pytest_cache"}
"""What a working checkout holds beside its sources: never copied, so no stale ``build/lib`` of an
earlier build (setuptools never cleans it) can put files into the wheel that the tree no longer has."""


def _junk(directory: str, names: list[str]) -> set[str]:
    here = Path(directory)
    ignored = {n for n in names if n == "__pycache__" or n.endswith((".pyc", ".egg-info"))}
    if here == REPO:
        ignored |= {n for n in names if n in JUNK_AT_TOP or n.endswith((".db", ".db-wal", ".db-shm"))}
    if here == REPO / "tests":
        ignored |= {"artifacts"}
    return ignored


def run(
    *command: str | Path, cwd: Path, settings: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` as a user would from ``cwd``: no PYTHONPATH, no SMSBOT_* but ``settings``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("SMSBOT_")}
    env |= settings or {}
    return subprocess.run(
        [str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def ok(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, f"{done.args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


@dataclass(frozen=True)
class Installed:
    """The wheel, the fresh environment it is installed in, and a working directory outside the repository."""

    wheel: Path
    venv: Path
    python: Path
    smsbot: Path
    work: Path


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    assert not root.is_relative_to(REPO)
    source = root / "source"
    shutil.copytree(REPO, source, ignore=_junk, symlinks=True)

    wheels = root / "wheels"
    ok(
        run(
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            wheels,
            source,
            cwd=root,
        )
    )
    [wheel] = wheels.glob("smsbot-*.whl")

    venv = root / "venv"
    ok(run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=root))
    python = venv / "bin" / "python"
    # The wheel goes in before the environment can see the project's packages, so pip sees no other
    # smsbot (the project venv's editable one) it might want to replace.
    ok(run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel, cwd=root))
    site = Path(
        ok(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=root)).stdout.strip()
    )
    ours = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (site / "smsbot-test-dependencies.pth").write_text("".join(f"{path}\n" for path in ours), encoding="utf-8")

    work = root / "elsewhere"
    work.mkdir()
    return Installed(wheel, venv, python, venv / "bin" / "smsbot", work)


def wheel_files(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return {name for name in archive.namelist() if not name.split("/", 1)[0].endswith(".dist-info")}


def tree_files() -> set[str]:
    """Where every file of bot/ and migrations/ must be in the wheel.

    Compiled files, dotfiles and editor backups (``~``) are left out: a working checkout may hold them.
    """
    files = set()
    for folder, packaged in PACKAGED.items():
        for path in (REPO / folder).rglob("*"):
            relative = path.relative_to(REPO / folder)
            if (
                path.is_file()
                and "__pycache__" not in relative.parts
                and path.suffix != ".pyc"
                and not any(part.startswith(".") for part in relative.parts)
                and not path.name.endswith("~")
            ):
                files.add(f"{packaged}/{relative.as_posix()}")
    return files


def module_names(files: set[str]) -> list[str]:
    names = {
        name.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for name in files if name.endswith(".py")
    }
    return sorted(names)


def test_the_wheel_holds_every_file_of_bot_and_migrations(installed: Installed) -> None:
    """Every module, template and Alembic script of the tree is in the wheel, and nothing else."""
    packed, expected = wheel_files(installed.wheel), tree_files()
    missing_packages = sorted(
        {name.rsplit("/", 1)[0] for name in expected - packed} - {n.rsplit("/", 1)[0] for n in packed}
    )
    assert missing_packages == [], f"packages missing from the wheel: {missing_packages}"
    assert sorted(expected - packed) == [], "files missing from the wheel"
    assert sorted(packed - expected) == [], "files in the wheel that the tree does not have"
    assert {"bot/tencent/__init__.py", "bot/migrations/script.py.mako", "bot/console/templates/base.html"} <= packed


IMPORT_ALL = textwrap.dedent("""\
    import importlib, json, sys, traceback
    failed = {}
    places = {}
    for name in json.loads(sys.argv[1]):
        try:
            places[name] = importlib.import_module(name).__file__
        except BaseException:
            failed[name] = traceback.format_exc()
    print(json.dumps({"failed": failed, "places": places}))
    """)


def test_every_module_of_the_wheel_imports_from_the_new_environment(installed: Installed) -> None:
    """Each module of the wheel (and of the tree: one the wheel lacks fails here by name too) imports in the
    new environment, and from it: never from the checkout, whose editable finder must stay out of sight."""
    names = sorted(set(module_names(wheel_files(installed.wheel))) | set(module_names(tree_files())))
    assert {"bot", "bot.tencent.sender", "bot.migrations.versions.0001_initial_schema"} <= set(names), names
    wanted = [name for name in names if name not in NOT_IMPORTABLE]
    done = ok(run(installed.python, "-c", IMPORT_ALL, json.dumps(wanted), cwd=installed.work))
    report = json.loads(done.stdout)
    failed: dict[str, str] = report["failed"]
    assert failed == {}, f"modules that do not import: {sorted(failed)}\n" + "\n".join(failed.values())
    site = installed.venv.resolve()
    outside = {
        name: place for name, place in report["places"].items() if not Path(place).resolve().is_relative_to(site)
    }
    assert outside == {}, "modules imported from outside the new environment (the checkout?)"
    assert sorted(report["places"]) == wanted


def test_help(installed: Installed) -> None:
    done = ok(run(installed.smsbot, "--help", cwd=installed.work))
    for command in ("rules", "db", "serve", "simulate"):
        assert command in done.stdout


def test_rules_check_on_the_example_rules(installed: Installed) -> None:
    rules = copy_rules(installed.work / "rules-check")
    count = len(list(rules.glob("*.yaml")))
    assert count >= 2
    done = ok(run(installed.smsbot, "rules", "check", rules, cwd=installed.work))
    assert f"{count} file(s) checked: 0 error(s)" in done.stderr


def test_db_upgrade_then_serve(installed: Installed, monkeypatch: pytest.MonkeyPatch) -> None:
    """The migrations are found inside the installed package; the server (writer process included) comes up,
    answers its health checks and a customer, and stops cleanly."""
    work = installed.work / "serve"
    work.mkdir()
    db_url = f"sqlite:///{work / 'smsbot.db'}"
    upgraded = ok(run(installed.smsbot, "db", "upgrade", cwd=work, settings={"SMSBOT_DATABASE_URL": db_url}))
    assert "database at head" in upgraded.stdout

    monkeypatch.delenv("PYTHONPATH", raising=False)  # serve_process passes the test's environment on
    with serve_process(db_url, work, rules=copy_rules(work / "rules"), smsbot=installed.smsbot) as server:
        assert httpx.get(f"{server.base}/healthz", timeout=10).json() == {"status": "ok"}
        ready = server.ready().json()
        assert ready["status"] == "ok", ready
        assert ready["writer"]["mode"] == "process", ready
        assert sorted(ready["rules"]["files"]) == sorted(p.name for p in server.rules.glob("*.yaml")), ready
        # one message through the whole installed pipeline: stored by the writer process, answered by the
        # console sender (the example rules' menu)
        server.say("hi")
        wait_until(lambda: server.printed("Reply 1 for order status") == 1, timeout=20, what="the menu to be sent")
        assert server.stop() == 0, server.output()
    assert "Traceback" not in server.output(), server.output()
