"""Shared fixtures: a real ``tether serve`` process with real ipykernel kernels."""

from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# `pytest -n N` (pytest-xdist): each worker gets a test bed of its own (users, lock, network
# namespace: tests/sshd.py reads the variable when it is first imported, after this file)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["TETHER_TEST_BED"] = os.environ.get("TETHER_TEST_BED", "") \
        + os.environ["PYTEST_XDIST_WORKER"]

# The laptop's own state (what `tether up` attached and recorded: tether/session.py,
# tether/runtimes.py, the ControlMaster's socket) is per test process, never the developer's:
# two workers' test beds use the same host aliases for different sshds.
_LOCAL_STATE = tempfile.mkdtemp(prefix="tether-xdg-")
os.environ["XDG_RUNTIME_DIR"] = _LOCAL_STATE
atexit.register(shutil.rmtree, _LOCAL_STATE, True)

READY_DEADLINE = 60.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests by kind: a module named ``test_*_units.py`` needs nothing but this checkout; every
    other one is ``integration`` (a real sshd, Slurm, Chromium, jupyter_server or kernels), so
    ``pytest -m "not integration"`` runs the fast ones alone."""
    for item in items:
        if not item.path.name.endswith("_units.py"):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _pids_pinned_per_test() -> None:
    """A pid a test names is pinned to its process within that test only (kernel_client)."""
    for name in ("kernel_client", "tests.kernel_client"):  # imported both ways
        module = sys.modules.get(name)
        if module is not None:
            module.PINNED.clear()


@dataclass
class RunningServer:
    proc: subprocess.Popen[str]
    info: dict
    root: Path
    runtime_dir: Path

    @property
    def url(self) -> str:
        return self.info["url"].rstrip("/")

    @property
    def token(self) -> str:
        return self.info["token"]

    @property
    def port(self) -> int:
        return self.info["port"]


def start_server(tmp: Path, *args: str, env: dict[str, str] | None = None) -> RunningServer:
    """Start ``tether serve --json`` and wait (bounded) for its one JSON line."""
    root = tmp / "notebooks"
    runtime = tmp / "runtime"
    root.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime), **(env or {})}
    cmd = [sys.executable, "-m", "tether", "serve", "--json", "--notebook-dir", str(root), *args]
    if "--port" not in args and "--sock" not in args:
        cmd += ["--port", "0"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                            env=full_env,
                            start_new_session=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], READY_DEADLINE)
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        raise RuntimeError(f"tether serve did not become ready (exit {proc.poll()})")
    return RunningServer(proc, json.loads(line), root, runtime)


def stop_server(server: RunningServer, timeout: float = 30.0,
                signum: int = signal.SIGINT) -> int:
    """Stop the server: SIGINT (Ctrl-C) shuts its kernels down; SIGTERM leaves them running for
    the next server to adopt (tether.remote.adopt)."""
    if server.proc.poll() is None:
        server.proc.send_signal(signum)
        try:
            server.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(5)
    return server.proc.returncode


@pytest.fixture
def procs() -> Iterator[Callable[..., subprocess.Popen]]:
    """Start processes for a test; every one still alive is killed (by pid) afterwards."""
    started: list[subprocess.Popen] = []

    def start(*argv: str, env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen:
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(list(argv), env={**os.environ, **(env or {})}, **kw)
        started.append(p)
        return p

    yield start
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One tether server per test module."""
    srv = start_server(tmp_path_factory.mktemp("srv"))
    yield srv
    stop_server(srv)


pytest_plugins = ["tests.fixtures_ssh"]
