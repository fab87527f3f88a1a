#!/usr/bin/env python3
"""The fault matrix as a benchmark: seconds until the URL answers again, per kind of fault.

Two forwards to the same remote server run side by side through the test bed's ``relayed``
host (a ProxyCommand relay that can be frozen) and take each fault at the same moment:

- tether's supervised tunnel (``tether up relayed``);
- a plain autossh-style restart loop, driven from Python: ``while true; do ssh -N -L ...;
  sleep 1; done`` with the same keep-alives (``ServerAliveInterval=5``,
  ``ServerAliveCountMax=3``) and ``ExitOnForwardFailure=yes``, as ``autossh -M 0`` runs it.

Faults: the path goes silent (the connection's relay SIGSTOPped: no RST, no FIN), the client
ssh killed, the sshd child of the connection killed, sshd restarted (down 2 s), the remote
server SIGSTOPped for a few seconds (timed from SIGCONT), and the server SIGKILLed (tether
only: a restart loop of ssh has nothing that starts a server again).

Needs root and openssh-server (the test bed of ``tests/sshd.py``) and a prepared remote (the
first ``tether up`` prepares it). Prints a Markdown table and writes
``bench/results/faults-<time>.json``. Usage: ``python bench/bench_faults.py [-n 3]``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.sshd import SSHBed, free_port, kill_user_processes, start_testbed  # noqa: E402

DEADLINE = 45.0
COLD_DEADLINE = 900.0
SERVER_STOP = 5.0
SETTLE = 1.0  # both forwards answer steadily before the next fault


class Up:
    """``tether up relayed --json`` in the background."""

    def __init__(self, bed: SSHBed, deadline: float = DEADLINE) -> None:
        self.port = free_port()
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tether", "up", "relayed", "--json", "--port", str(self.port),
             "-F", str(bed.config)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.log, text=True)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], deadline)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.stop()
            self.log.seek(0)
            raise RuntimeError(f"tether up relayed printed no URL: {self.log.read()[-2000:]!r}")
        self.info = json.loads(line)

    def ssh_pids(self) -> list[int]:
        return [c.pid for c in psutil.Process(self.proc.pid).children() if c.name() == "ssh"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class RestartLoop:
    """The baseline: ssh -N -L, and whenever it exits, sleep 1 s and start it again."""

    def __init__(self, bed: SSHBed, remote: str) -> None:
        self.port = free_port()
        self.argv = ["ssh", "-F", str(bed.config), "-N", "-T", "-o", "ExitOnForwardFailure=yes",
                     "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
                     "-L", f"127.0.0.1:{self.port}:{remote}", "relayed"]
        self.proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.proc.wait()
            self._stop.wait(1.0)

    def ssh_pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []

    def stop(self) -> None:
        self._stop.set()
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._thread.join(15)


def answers(port: int, token: str) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("GET", "/api/status", headers={"Authorization": f"token {token}"})
        return conn.getresponse().status == 200
    except OSError:
        return False


def heal(port: int, token: str, since: float, out: dict[str, float | None], key: str) -> None:
    """Seconds from ``since`` until ``port`` answers again (None past the deadline)."""
    while time.perf_counter() - since < DEADLINE:
        if answers(port, token):
            out[key] = time.perf_counter() - since
            return
        time.sleep(0.02)
    out[key] = None


# -- faults: each returns the moment it took effect --------------------------------------------

Fault = Callable[[SSHBed, list[int], int], float]


def silent_drop(bed: SSHBed, ssh_pids: list[int], server: int) -> float:
    for pid in ssh_pids:
        bed.freeze_relays(pid)
    return time.perf_counter()


def kill_client_ssh(bed: SSHBed, ssh_pids: list[int], server: int) -> float:
    for pid in ssh_pids:
        psutil.Process(pid).kill()
    return time.perf_counter()


def kill_sshd_child(bed: SSHBed, ssh_pids: list[int], server: int) -> float:
    victims = []
    for pid in bed.target.connection_pids():
        proc = psutil.Process(pid)
        victims += [proc, *proc.children(recursive=True)]
    for v in victims:
        try:
            v.kill()
        except psutil.Error:
            pass
    return time.perf_counter()


def restart_sshd(bed: SSHBed, ssh_pids: list[int], server: int) -> float:
    t0 = time.perf_counter()
    bed.restart_target(down_for=2.0)
    return t0


def stop_server(bed: SSHBed, ssh_pids: list[int], server: int) -> float:
    proc = psutil.Process(server)
    proc.suspend()
    time.sleep(SERVER_STOP)  # the fault itself
    proc.resume()
    return time.perf_counter()


def kill_server(bed: SSHBed, ssh_pids: list[int], server: int) -> float:
    proc = psutil.Process(server)
    proc.kill()
    proc.wait(10)
    return time.perf_counter()


FAULTS: list[Fault] = [silent_drop, kill_client_ssh, kill_sshd_child, restart_sshd, stop_server,
                       kill_server]


def server_pid(bed: SSHBed) -> int:
    out = subprocess.run([sys.executable, "-m", "tether", "status", "relayed", "--json", "-F",
                          str(bed.config)], capture_output=True, text=True, timeout=60)
    return int(json.loads(out.stdout)["servers"][0]["pid"])


def settle(*forwards: tuple[int, str]) -> None:
    deadline = time.perf_counter() + DEADLINE
    while time.perf_counter() < deadline:
        if all(answers(port, token) for port, token in forwards):
            time.sleep(SETTLE)
            if all(answers(port, token) for port, token in forwards):
                return
        time.sleep(0.05)
    raise RuntimeError("the forwards did not settle")


def run_round(bed: SSHBed, up: Up, loop: RestartLoop, fault: Fault) -> dict[str, float | None]:
    token = up.info["token"]
    with_loop = fault is not kill_server
    settle((up.port, token), *([(loop.port, token)] if with_loop else []))
    bed.thaw_path()
    pids = up.ssh_pids() + (loop.ssh_pids() if with_loop else [])
    since = fault(bed, pids, server_pid(bed) if fault in (stop_server, kill_server) else 0)
    out: dict[str, float | None] = {}
    threads = [threading.Thread(target=heal, args=(up.port, token, since, out, "tether"))]
    if with_loop:
        threads.append(threading.Thread(target=heal, args=(loop.port, token, since, out, "loop")))
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE + 5)
    bed.thaw_path()  # stopped relays end (their ssh is gone) once they run again
    return out


def cell(xs: list[float | None]) -> str:
    got = [x for x in xs if x is not None]
    if not got:
        return "not healed"
    missed = len(xs) - len(got)
    text = f"{statistics.median(got):.2f} / {max(got):.2f}"
    return text + (f" ({missed} not healed in {DEADLINE:.0f} s)" if missed else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-n", type=int, default=3, help="rounds of each fault")
    args = ap.parse_args()

    bed = start_testbed()
    kill_user_processes(bed.user.pw_uid)
    results: dict[str, dict[str, list[float | None]]] = {}
    try:
        try:
            Up(bed, deadline=COLD_DEADLINE).stop()  # prepares the remote if needed
        except RuntimeError:  # an environment this checkout cannot update: prepare a new one
            shutil.rmtree(bed.tether_root, ignore_errors=True)
            Up(bed, deadline=COLD_DEADLINE).stop()
        up = Up(bed)
        remote = up.info["remote_sock"] or f"127.0.0.1:{up.info['remote_port']}"
        loop = RestartLoop(bed, remote)
        try:
            for _ in range(args.n):
                for fault in FAULTS:
                    got = run_round(bed, up, loop, fault)
                    print(f"{fault.__name__}: {got}", file=sys.stderr)
                    for key in ("tether", "loop"):
                        if fault is not kill_server or key == "tether":
                            results.setdefault(fault.__name__, {}).setdefault(key, []).append(
                                got.get(key))
        finally:
            loop.stop()
            up.stop()
    finally:
        subprocess.run([sys.executable, "-m", "tether", "down", "relayed", "-F", str(bed.config)],
                       capture_output=True, timeout=120)
        bed.stop()
        kill_user_processes(bed.user.pw_uid)

    print(f"\nSeconds until the URL answers again, median / max of {args.n} rounds\n")
    print("| fault | tether | ssh restart loop | tether / loop (medians) |")
    print("|---|---|---|---|")
    for name, got in results.items():
        t, loop_times = got.get("tether", []), got.get("loop", [])
        ratio = "-"
        tm = [x for x in t if x is not None]
        lm = [x for x in loop_times if x is not None]
        if tm and lm:
            ratio = f"{statistics.median(tm) / statistics.median(lm):.2f}"
        print(f"| {name} | {cell(t)} | {cell(loop_times) if loop_times else 'n/a'} | {ratio} |")
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"faults-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"\n(raw: {path})")


if __name__ == "__main__":
    main()
