"""Fixtures for the SSH side: a real sshd on loopback, a non-root remote user, ``tether up``.

The remote is prepared once per test session (the cold bootstrap installs jupyter_server from
the package index; the remote user's pip cache is kept between runs). Set
``TETHER_TEST_KEEP_ENV=1`` to keep the remote environment from an earlier run too.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.sshd import SSHBed, kill_user_processes, start_testbed

UP_DEADLINE = 60.0
COLD_DEADLINE = 600.0


@dataclass
class UpProcess:
    """A running ``tether up --json``: its first JSON line, then it supervises until stopped."""

    proc: subprocess.Popen[str]
    info: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def url(self) -> str:
        return self.info["url"].rstrip("/")

    @property
    def token(self) -> str:
        return self.info["token"]

    def tunnel_pids(self) -> list[int]:
        try:
            return [c.pid for c in psutil.Process(self.proc.pid).children()
                    if c.name() == "ssh"]
        except psutil.Error:
            return []

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read()

    def stop(self, sig: int = signal.SIGINT, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                for child in psutil.Process(self.proc.pid).children(recursive=True):
                    child.kill()
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def tether_argv(testbed: SSHBed, command: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "tether", command, *args, "-F", str(testbed.config)]


def start_up(testbed: SSHBed, *args: str, command: str = "up",
             deadline: float = UP_DEADLINE) -> UpProcess:
    """Start ``tether up ARGS --json``; wait (bounded) for its JSON line or its exit."""
    argv = tether_argv(testbed, command, *args, "--json")
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    up = UpProcess(proc)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], deadline)
    line = proc.stdout.readline() if ready else ""
    up.seconds = time.monotonic() - t0
    if line:
        up.info = json.loads(line)
    return up


def run_tether(testbed: SSHBed, command: str, *args: str,
               timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(tether_argv(testbed, command, *args), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def live_user_pids(testbed: SSHBed) -> list[int]:
    pids = []
    for pid in testbed.user_pids():
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                pids.append(pid)
        except psutil.Error:
            pass
    return pids


def wait_no_user_processes(testbed: SSHBed, timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        left = live_user_pids(testbed)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


@pytest.fixture(scope="session")
def testbed() -> Iterator[SSHBed]:
    if os.geteuid() != 0 or not Path("/usr/sbin/sshd").exists():
        pytest.skip("needs root and openssh-server (/usr/sbin/sshd)")
    bed = start_testbed()
    kill_user_processes(bed.user.pw_uid)
    if not os.environ.get("TETHER_TEST_KEEP_ENV"):
        shutil.rmtree(bed.tether_root, ignore_errors=True)
    try:
        yield bed
    finally:
        subprocess.run(tether_argv(bed, "down"), capture_output=True, timeout=60)
        bed.stop()
        kill_user_processes(bed.user.pw_uid)
        shutil.rmtree(bed.dir, ignore_errors=True)


@dataclass
class Prepared:
    interrupted_rc: int | None
    interrupted_at_install: bool
    cold: UpProcess


@pytest.fixture(scope="session")
def prepared(testbed: SSHBed) -> Prepared:
    """Cold bootstrap, interrupted halfway (after the venv, during pip), then run again."""
    env_python = testbed.tether_root / "env-0.1.0" / "bin" / "python"
    interrupted_rc: int | None = None
    at_install = False
    if not env_python.exists():
        first = subprocess.Popen(tether_argv(testbed, "up", "gpubox", "--json"), stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None and not env_python.exists():
            time.sleep(0.05)
        at_install = env_python.exists() and first.poll() is None
        first.send_signal(signal.SIGINT)
        interrupted_rc = first.wait(30)
    cold = start_up(testbed, "gpubox", deadline=COLD_DEADLINE)
    assert cold.info, f"cold `tether up` failed: {cold.stop() and cold.stderr()}"
    cold.stop()
    return Prepared(interrupted_rc, at_install, cold)


class RemotePage:
    """A small HTTP server here that plays the user's TensorBoard on the remote's loopback
    (the test bed's sshd is on this machine), or a foreign program on a port: it answers every
    GET with ``body`` (by default one of its own)."""

    def __init__(self, host: str = "127.0.0.1", body: bytes = b"") -> None:
        import http.server
        import secrets
        import threading

        body = self.body = body or secrets.token_hex(8).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> RemotePage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def answers_on(port: int, deadline: float = 20.0) -> bytes:
    """What 127.0.0.1:``port`` answers, once it answers (bounded)."""
    import urllib.request

    t0 = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=3) as reply:
                return bytes(reply.read())
        except OSError:
            assert time.monotonic() - t0 < deadline, f"nothing answered on {port} in time"
            await asyncio.sleep(0.05)


async def url_answers(url: str, token: str, deadline: float) -> float:
    """Seconds until ``url`` answers ``GET /api/status`` with the token (again), bounded:
    polling while the tunnel heals or the server comes back."""
    from tether.replay import ColabClient

    t0 = time.monotonic()
    async with ColabClient(url.rstrip("/"), token, timeout=5) as c:
        while True:
            try:
                if (await c.request("GET", "/api/status")).code == 200:
                    return time.monotonic() - t0
            except Exception:  # noqa: BLE001 - the tunnel is down while it reconnects
                pass
            assert time.monotonic() - t0 < deadline, "the URL did not answer again in time"
            await asyncio.sleep(0.05)


# x, a thread that counts while no server listens, and the kernel's pid
STATE = ("import os, threading, time\nx = 42\nticks = [0]\n"
         "def _count():\n    while True:\n        ticks[0] += 1\n        time.sleep(0.02)\n"
         "threading.Thread(target=_count, daemon=True).start()\nprint(os.getpid())")
CHECK = ("import os, time\nt = ticks[0]\ntime.sleep(0.3)\n"
         "print(x, os.getpid(), ticks[0] > t, ticks[0])")


async def same_kernel(url: str, token: str, kid: str, session_id: str, pid: int, seen: int,
                      how: str, deadline: float) -> int:
    """After the server was replaced: the same URL answers, with the same kernel and session,
    and ``print(x)`` gives 42 from the same process whose thread kept counting (past
    ``seen``); its count now."""
    import json

    from tether.replay import ColabClient

    await url_answers(url, token, deadline)  # the same URL, the same token
    async with ColabClient(url.rstrip("/"), token, timeout=30) as c:
        kernels = json.loads((await c.request("GET", "/api/kernels")).body)
        assert [k["id"] for k in kernels] == [kid], how
        sessions = json.loads((await c.request("GET", "/api/sessions")).body)
        assert [s["id"] for s in sessions] == [session_id], how
        x, same, counting, ticks = (await c.execute(kid, CHECK)).stdout.split()
    assert (x, same, counting) == ("42", str(pid), "True"), how
    assert int(ticks) > seen, f"{how}: its threads kept running"
    return int(ticks)
