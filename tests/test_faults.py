"""Faults against a running ``tether up``: each is healed on the same URL, the kernel kept.

Real parts only: the OpenSSH test bed, its ``relayed`` host (a ProxyCommand relay that can be
frozen: no RST, no FIN), real remote servers and kernels, real signals. The remote server is
stopped for 20 s here, not the issue's 60 s: longer than every deadline of the supervisor (the
probe, a reconnect attempt, the backoff cap, ssh's keep-alives), so a longer stop exercises
nothing more, and the module stays within its few minutes.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import select
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psutil
import pytest

from tests.fixtures_ssh import Prepared, UpProcess, run_tether, start_up, tether_argv
from tests.sshd import SSHBed, free_port
from tether import _ssh, tunnel
from tether.replay import ColabClient

pytestmark = pytest.mark.timeout(600)  # (setup may wait for the shared test bed, then prepare it)

SILENT_DROP_DEADLINE = 10.0  # the bound for a silent drop
HEAL_DEADLINE = 30.0
SERVER_STOP = 20.0


@dataclass
class Attached:
    up: UpProcess
    kernel: str
    value: int


async def _answers_once(up: UpProcess) -> bool:
    try:
        async with ColabClient(up.url, up.token, timeout=1.0) as c:
            return (await c.request("GET", "/api/status")).code == 200
    except Exception:  # noqa: BLE001 - nothing answers while the tunnel heals
        return False


def heal_seconds(up: UpProcess, since: float, deadline: float = HEAL_DEADLINE) -> float:
    """Seconds from ``since`` until the URL answers again with the token (bounded)."""
    while not asyncio.run(_answers_once(up)):
        assert up.proc.poll() is None, f"`tether up` ended: {up.stderr()}"
        assert time.monotonic() - since < deadline, "the URL did not answer again in time"
        time.sleep(0.05)  # polling interval (a refused connection fails at once)
    return time.monotonic() - since


async def _execute(up: UpProcess, kernel: str, code: str) -> str:
    async with ColabClient(up.url, up.token, timeout=20) as c:
        result = await c.execute(kernel, code)
        assert result.status == "ok", result
        return result.result


async def _new_kernel(up: UpProcess, value: int) -> str:
    async with ColabClient(up.url, up.token, timeout=30) as c:
        kernel: str = (await c.create_session(f"faults-{value}.ipynb"))["kernel"]["id"]
        assert (await c.execute(kernel, f"x = {value}")).status == "ok"
        return kernel


def tunnel_ssh(up: UpProcess) -> int:
    pids = up.tunnel_pids()
    assert len(pids) == 1, pids
    return pids[0]


# -- the faults: each returns the moment it took effect (heal times count from there) ----------

def silent_drop(bed: SSHBed, up: UpProcess) -> float:
    """The path of the tunnel's connection goes silent (its relay stopped); new paths work."""
    assert bed.freeze_relays(tunnel_ssh(up))
    return time.monotonic()


def kill_client_ssh(bed: SSHBed, up: UpProcess) -> float:
    psutil.Process(tunnel_ssh(up)).kill()
    return time.monotonic()


def kill_sshd_child(bed: SSHBed, up: UpProcess) -> float:
    assert bed.kill_connections()
    return time.monotonic()


def restart_sshd(bed: SSHBed, up: UpProcess) -> float:
    t0 = time.monotonic()
    bed.restart_target(down_for=2.0)
    return t0


def stop_server(seconds: float) -> Callable[[SSHBed, UpProcess], float]:
    def fault(bed: SSHBed, up: UpProcess) -> float:
        server = psutil.Process(up.info["remote_pid"])
        server.suspend()
        try:
            time.sleep(seconds)  # the fault itself: the server is frozen this long
            assert up.proc.poll() is None
        finally:
            server.resume()
        return time.monotonic()
    fault.__name__ = f"stop_server_{seconds:g}s"
    return fault


def kill_server(bed: SSHBed, up: UpProcess) -> float:
    server = psutil.Process(up.info["remote_pid"])
    server.kill()
    server.wait(10)
    return time.monotonic()


@pytest.fixture(scope="class")
def attached(prepared: Prepared, testbed: SSHBed) -> Iterator[Attached]:
    run_tether(testbed, "down", "gpubox")
    up = start_up(testbed, "relayed", "--port", str(free_port()))
    assert up.info, up.stop() or up.stderr()
    try:
        yield Attached(up, asyncio.run(_new_kernel(up, 41)), 41)
    finally:
        testbed.thaw_path()
        rc = up.stop(signal.SIGINT)
        run_tether(testbed, "down", "gpubox")
    assert rc == 0, up.stderr()


def _check_state(a: Attached) -> None:
    assert asyncio.run(_execute(a.up, a.kernel, "x")) == str(a.value)


def _recover_after_crash(bed: SSHBed, a: Attached) -> None:
    """A new server: same URL, the old kernel is gone; start a kernel again."""
    status = run_tether(bed, "status", "relayed", "--json")
    servers = json.loads(status.stdout)["servers"]
    assert servers and servers[0]["pid"] != a.up.info["remote_pid"], status
    a.up.info["remote_pid"] = servers[0]["pid"]
    a.value += 1
    a.kernel = asyncio.run(_new_kernel(a.up, a.value))


class TestFaults:
    """One attached `up` for all of them (torn down before the tests below that need `down`)."""

    @pytest.mark.parametrize("fault", [silent_drop, kill_client_ssh, kill_sshd_child, restart_sshd,
                                       stop_server(SERVER_STOP), kill_server],
                             ids=lambda f: f.__name__)
    def test_fault_is_healed_on_the_same_url(self, attached: Attached, testbed: SSHBed,
                                             fault: Callable[[SSHBed, UpProcess], float]) -> None:
        up = attached.up
        _check_state(attached)
        since = fault(testbed, up)
        seconds = heal_seconds(up, since)
        print(f"{fault.__name__}: healed in {seconds:.2f} s")
        if fault is silent_drop:
            assert seconds < SILENT_DROP_DEADLINE
        if fault is kill_server:
            _recover_after_crash(testbed, attached)
        _check_state(attached)
        assert up.proc.poll() is None
        assert len(up.tunnel_pids()) == 1

    def test_stuck_proxycommand_does_not_block_the_supervisor(self, attached: Attached,
                                                              testbed: SSHBed) -> None:
        """The relay is frozen while its ssh exits: the relay keeps ssh's stderr open, forever."""
        up = attached.up
        ssh = tunnel_ssh(up)
        frozen = testbed.freeze_relays(ssh)
        assert frozen
        psutil.Process(ssh).kill()
        since = time.monotonic()
        heal_seconds(up, since, deadline=8.0)
        # the condition held all along: the old relay is alive, stopped, holding the pipe
        relay = psutil.Process(frozen[0])
        assert relay.status() == psutil.STATUS_STOPPED
        _check_state(attached)
        testbed.thaw_path()

    def test_path_frozen_then_back(self, attached: Attached, testbed: SSHBed) -> None:
        """The whole path is down for 15 s (new connections hang too): back soon after it is."""
        testbed.freeze_path()
        try:
            time.sleep(15)  # the fault itself: reconnect attempts hang meanwhile
            assert not asyncio.run(_answers_once(attached.up))
        finally:
            testbed.thaw_path()
        seconds = heal_seconds(attached.up, time.monotonic())
        print(f"path back: URL answers {seconds:.2f} s later")
        assert seconds < 15
        _check_state(attached)

    def test_path_frozen_then_a_new_one(self, attached: Attached, testbed: SSHBed) -> None:
        """Down 15 s, then another network: what hangs on the old one is never coming back."""
        testbed.freeze_path()
        try:
            time.sleep(15)  # the fault itself
            testbed.new_path()
            # each attempt is bounded, so one on a new path comes soon, whatever hangs
            bound = tunnel.RECONNECT_DEADLINE + 2 * tunnel.BACKOFF_MAX + 4
            seconds = heal_seconds(attached.up, time.monotonic(), deadline=bound)
        finally:
            testbed.thaw_path()
        print(f"new path: URL answers {seconds:.2f} s later")
        _check_state(attached)

    def test_twenty_faults_in_a_row(self, attached: Attached, testbed: SSHBed) -> None:
        faults = [silent_drop, kill_client_ssh, kill_sshd_child, restart_sshd, stop_server(3),
                  kill_server]
        plan = faults + random.Random(7).choices(faults[:-1], k=20 - len(faults))
        random.Random(11).shuffle(plan)
        t0 = time.monotonic()
        healed = []
        for fault in plan:
            since = fault(testbed, attached.up)
            healed.append((fault.__name__, round(heal_seconds(attached.up, since), 2)))
            if fault is kill_server:
                _recover_after_crash(testbed, attached)
            _check_state(attached)
        testbed.thaw_path()
        print("healed:", healed)
        assert time.monotonic() - t0 < 170
        assert attached.up.proc.poll() is None


# -- no ssh of ours outlives `tether up`, whatever the phase a signal comes in ------------------

def _our_ssh(bed: SSHBed) -> list[int]:
    config = str(bed.config)
    found = []
    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] == "ssh" and config in (p.info["cmdline"] or []):
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p.pid)
            except psutil.Error:
                pass
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []


def _wait_for(check: Callable[[], bool], deadline: float) -> bool:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("phase", ["bootstrap", "tunnel", "ready"])
@pytest.mark.parametrize("how", ["SIGINT", "SIGINT-group", "SIGTERM"])
def test_signal_leaves_no_ssh(prepared: Prepared, testbed: SSHBed, phase: str, how: str) -> None:
    before = set(_our_ssh(testbed))  # (the module's attached `up` may have one)
    ours = lambda: set(_our_ssh(testbed)) - before  # noqa: E731
    port = free_port()
    proc = subprocess.Popen([*tether_argv(testbed, "up", "relayed", "--port", str(port))],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        if phase == "bootstrap":  # the remote side's ssh runs (not the login's, nor `ssh -G`)
            assert _wait_for(lambda: any((c := _cmdline(p)) and not {"-M", "-G", "-O"} & set(c)
                                         for p in ours()), 30)
        elif phase == "tunnel":  # the forward's ssh runs, not yet listening
            assert _wait_for(lambda: any("-N" in _cmdline(p) for p in ours()), 30)
        else:  # the URL is out: the status line runs
            assert proc.stdout is not None
            assert select.select([proc.stdout], [], [], 60)[0]
            assert proc.stdout.readline().startswith(f"http://127.0.0.1:{port}/?token=")
            time.sleep(2.5)  # let one status poll and one probe run (the signal may meet them)
        sig = signal.SIGTERM if how == "SIGTERM" else signal.SIGINT
        if how == "SIGINT-group":
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    lines = [line for line in err.splitlines() if line.strip()]
    ready = "Colab runtime ready" in err
    assert ready == (phase == "ready"), err
    if ready:
        assert proc.returncode == 0, err
        assert lines[-1].startswith("Detached from relayed"), err
        assert f"tether attach relayed -F {testbed.config}" in lines[-1], err  # the user's -F
        assert lines[-2].startswith("Ctrl-C detaches"), err  # nothing between
    else:
        assert proc.returncode == 130, err
        assert lines and lines[-1].startswith("Interrupted before relayed was ready"), err
    assert not any("Exception ignored" in line or "Unknown child" in line or "Traceback" in line
                   for line in lines), err
    assert _wait_for(lambda: not ours(), 3), ours()


def test_spawned_wait_ends_although_a_grandchild_holds_the_pipes() -> None:
    """The stuck-ProxyCommand case without ssh: a child exits, its child keeps stderr open."""
    async def main() -> tuple[int, bytes, float]:
        proc = await _ssh.spawn(_ssh.SSHTarget("local"),
                                ["sh", "-c", "echo bye >&2; sleep 60 & echo $! >&2; exit 3"])
        t0 = time.monotonic()
        try:
            rc = await asyncio.wait_for(proc.wait(), 5)
            assert proc.stderr is not None
            err = await asyncio.wait_for(proc.stderr.read(), 5)
        finally:
            await _ssh.terminate(proc)
        return rc, err, time.monotonic() - t0

    rc, err, seconds = asyncio.run(main())
    grandchild = int(err.split()[1])
    try:
        assert rc == 3 and err.startswith(b"bye") and seconds < 3
        assert psutil.pid_exists(grandchild)  # it still held the pipe all along
    finally:
        os.kill(grandchild, signal.SIGKILL)


# -- looking never counts as activity -------------------------------------------------------------

def test_idle_server_stops_although_up_stays_attached(prepared: Prepared, testbed: SSHBed) -> None:
    """`up` attached, its status line and probe polling all the while: the server still idles."""
    run_tether(testbed, "down", "gpubox")
    marker = testbed.home / "idle-hook-ran"
    marker.unlink(missing_ok=True)
    t0 = time.monotonic()
    up = start_up(testbed, "relayed", "--port", str(free_port()), "--stop-after-idle", "20",
                  "--on-idle", f"touch {marker}")
    try:
        assert up.info, up.stderr()
        server = psutil.Process(up.info["remote_pid"])
        assert _wait_for(lambda: not server.is_running() or server.status() == "zombie", 75)
        assert marker.exists()
        rc = up.proc.wait(45)  # no endless restart: supervision ends, with one clear line
    finally:
        up.stop()
    err = up.stderr()
    assert rc == 1, err
    assert "stopped" in err.splitlines()[-1], err
    assert time.monotonic() - t0 < 120


def test_server_replaced_with_a_new_token_ends_supervision(prepared: Prepared,
                                                           testbed: SSHBed) -> None:
    """While `up` is frozen, its server is replaced (down, then up: a new token)."""
    run_tether(testbed, "down", "gpubox")
    first = start_up(testbed, "relayed", "--port", str(free_port()))
    assert first.info, first.stderr()
    first.proc.send_signal(signal.SIGSTOP)
    try:
        assert run_tether(testbed, "down", "gpubox").returncode == 0
        second = start_up(testbed, "gpubox", "--port", str(free_port()))
        second.stop()
        assert second.info and second.info["token"] != first.token
    finally:
        first.proc.send_signal(signal.SIGCONT)
    try:
        rc = first.proc.wait(30)  # today's loop on "something other than..." never ends
    finally:
        first.stop()
    last = first.stderr().strip().splitlines()[-1]
    assert rc == 1, last
    assert "relayed was restarted with a new token" in last and "`tether up relayed`" in last
