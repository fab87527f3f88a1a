"""``tether up LOGIN --slurm``: the runtime as a job on a real Slurm, through the real sshd.

The login node is the SSH test bed's ``gpubox``; the compute node is this machine (``hostname
-s``), reached as an ssh alias through it. Two fake GPUs (character devices) are the node's
GRES, so a third one-GPU job waits ``PENDING (Resources)``.
"""

from __future__ import annotations

import asyncio
import json
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.fixtures_ssh import (
    STATE,
    Prepared,
    RemotePage,
    answers_on,
    live_user_pids,
    same_kernel,
    start_up,
)
from tests.slurm import Cluster, available, start_cluster
from tests.sshd import SSHBed, free_port
from tether.replay import ColabClient

pytestmark = [pytest.mark.timeout(600),
              pytest.mark.skipif(not available(), reason="needs root and Slurm (slurmctld, "
                                                         "slurmd, munge)")]

QUEUE_DEADLINE = 60.0
RUN_DEADLINE = 180.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = start_cluster()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def slurm_config(testbed: SSHBed, cluster: Cluster, tmp_path_factory) -> Path:
    """The test bed's ssh config, plus the compute node as an alias (its sshd is gpubox's)."""
    path = tmp_path_factory.mktemp("slurm-ssh") / "ssh_config"
    # `login`: the login node under a name of its own, so that what `tether up login --slurm`
    # records on the laptop never applies to the direct tests' `gpubox` (the same sshd)
    path.write_text(f"Include {testbed.config}\n"
                    f"Host {cluster.host} login\n  HostName 127.0.0.1\n"
                    f"  Port {testbed.target.port}\n")
    return path


def tether(config: Path, *args: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tether", *args, "-F", str(config)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=timeout)


@dataclass
class SlurmUp:
    proc: subprocess.Popen[str]
    stderr_lines: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def read_until(self, predicate, deadline: float) -> bool:
        """Read stderr lines (and the JSON line on stdout) until ``predicate(self)``; bounded."""
        end = time.monotonic() + deadline
        assert self.proc.stdout is not None and self.proc.stderr is not None
        streams = [self.proc.stdout, self.proc.stderr]
        while not predicate(self):
            left = end - time.monotonic()
            if left <= 0:
                return False
            if not streams:  # both closed: the process is exiting
                try:
                    self.proc.wait(left)
                except subprocess.TimeoutExpired:
                    return False
                return bool(predicate(self))
            ready, _, _ = select.select(streams, [], [], left)
            for stream in ready:
                line = stream.readline()
                if not line:
                    streams.remove(stream)
                elif stream is self.proc.stdout and line.startswith("{"):
                    data = json.loads(line)
                    if "colab_url" in data:
                        self.info = data
                else:
                    self.stderr_lines.append(line)
        return True

    @property
    def text(self) -> str:
        return "".join(self.stderr_lines)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 90.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def start(config: Path, *args: str) -> SlurmUp:
    argv = [sys.executable, "-m", "tether", "up", "login", "--slurm", *args, "--json",
            "-F", str(config)]
    return SlurmUp(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True))


def blocker(cluster: Cluster) -> str:
    done = cluster.run("sbatch", "--parsable", "--gres=gpu:1", "--job-name=blocker",
                       "--time=10", "--output=/dev/null", "--wrap", "sleep 600")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def our_jobs(cluster: Cluster, testbed: SSHBed) -> list[tuple[str, str, str]]:
    return cluster.squeue(testbed.user.pw_name)


async def test_queued_then_running_then_released_and_down(prepared: Prepared, testbed: SSHBed,
                                                          cluster: Cluster,
                                                          slurm_config: Path) -> None:
    cluster.wait_idle()
    blockers = [blocker(cluster), blocker(cluster)]
    up = start(slurm_config, "--gpus", "1", "--time", "10:00", "--port", str(free_port()))
    try:
        assert up.read_until(lambda u: "PENDING (Resources)" in u.text, QUEUE_DEADLINE), \
            up.text + cluster.log_tail()
        assert [state for _, state, _ in our_jobs(cluster, testbed)] == ["PENDING"]
        # Slurm's estimate (the blockers have a time limit) in the laptop's time, not raw
        assert up.read_until(lambda u: "expected start in " in u.text, QUEUE_DEADLINE), up.text
        assert "cluster's clock" not in up.text, up.text
        pending = tether(slurm_config, "status", "login", "--slurm")
        assert "expected start in " in pending.stdout, pending.stdout + pending.stderr
        cluster.run("scancel", blockers[0])
        assert up.read_until(lambda u: bool(u.info), RUN_DEADLINE), up.text
        assert "running on" in up.text
        assert up.info["on_ctrl_c"].startswith("Ctrl-C cancels job "), up.info  # no --keep
        # jump mode: the node is reached through the connection `up` holds to the login node
        # (`-W` over its ControlMaster), not with a second login there (ProxyJump)
        tunnels = [" ".join(c.cmdline()) for c in psutil.Process(up.proc.pid).children()
                   if c.name() == "ssh" and cluster.host in c.cmdline()]
        assert tunnels and all("ProxyCommand=" in t and " -W %h:%p " in t
                               and "ProxyJump" not in t for t in tunnels), tunnels
        async with ColabClient(up.info["url"].rstrip("/"), up.info["token"]) as c:
            session = await c.create_session("slurm.ipynb")
            kid = session["kernel"]["id"]
            out = await c.execute(kid, "import os; print(os.environ.get('CUDA_VISIBLE_DEVICES'))")
            assert out.status == "ok" and out.stdout.strip() in ("0", "1"), out
        ps = tether(slurm_config, "ps", "-H", "login", "--slurm", "--json")
        assert ps.returncode == 0, ps.stderr
        assert kid in {k["id"] for k in json.loads(ps.stdout)["kernels"]}
        status = tether(slurm_config, "status", "login", "--slurm", "--json")
        job = json.loads(status.stdout)["jobs"][0]
        assert job["state"] == "RUNNING" and job["node"] == cluster.host, status.stdout
        # a server of the login node's own (`tether up gpubox`) is not in --slurm's scope
        direct = start_up(testbed, "gpubox")
        assert direct.info, direct.stop() and direct.stderr()
        direct.stop()
        released = tether(slurm_config, "release", "-H", "login", "--slurm", kid[:8])
        assert released.returncode == 0, released.stdout + released.stderr
        still = tether(slurm_config, "ps", "-H", "gpubox", "--json")
        assert still.returncode == 0, still.stderr  # the login node's server: untouched
        # purging the login node's runtime keeps what the running job runs from
        purged = tether(slurm_config, "down", "gpubox", "--purge")
        assert purged.returncode == 0 and "kept the environment" in purged.stderr, purged.stderr
        assert f"`tether down gpubox --slurm -F {slurm_config}` ends them" in purged.stderr
        assert list(testbed.tether_root.glob("env-*")), "the job's environment was removed"
        assert list(testbed.tether_root.glob("uv/*/uv")), "the uv that updates it was removed"
        alive = tether(slurm_config, "ps", "-H", "login", "--slurm", "--json")
        assert alive.returncode == 0, alive.stderr  # the job's server still answers
        # named once: `up` recorded the job for `login`, so `down login` needs no --slurm
        down = tether(slurm_config, "down", "login")
        assert down.returncode == 0 and "Cancelled job" in down.stderr, down.stderr
        assert "the Slurm job `tether up login --slurm` started" in down.stderr, down.stderr
        assert our_jobs(cluster, testbed) == []
        # the attached `up` learns that its job ended, says so, and stops with an error
        assert up.read_until(lambda u: u.proc.poll() is not None, 60), up.text
        rest = up.proc.stderr.read() if up.proc.stderr else ""
        assert up.proc.returncode != 0 and "CANCELLED" in up.text + rest, up.text + rest
    finally:
        up.stop()
        for job in blockers:
            cluster.run("scancel", job)
    assert wait_job_processes_gone(testbed, 30) == []


def job_processes(testbed: SSHBed) -> list[int]:
    """Processes of the remote user that run inside a Slurm job (its environment says so)."""
    found = []
    for pid in live_user_pids(testbed):
        try:
            if "SLURM_JOB_ID" in psutil.Process(pid).environ():
                found.append(pid)
        except psutil.Error:
            continue
    return found


def wait_job_processes_gone(testbed: SSHBed, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := job_processes(testbed)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


async def test_forward_mode_keep_attach_and_cancel_from_outside(
        prepared: Prepared, testbed: SSHBed, cluster: Cluster, slurm_config: Path) -> None:
    """SSH to the node not used: the server listens on the node's address, the forward goes
    through the login node. --keep: Ctrl-C leaves the job; attach finds it; scancel from
    outside ends the attached `up` with the job's state."""
    cluster.wait_idle()
    up = start(slurm_config, "--node-access", "forward", "--keep", "--port", str(free_port()))
    try:
        assert up.read_until(lambda u: bool(u.info), RUN_DEADLINE), up.text
        assert up.info["remote_sock"] == "" and up.info["remote_port"] > 0, up.info
        async with ColabClient(up.info["url"].rstrip("/"), up.info["token"]) as c:
            session = await c.create_session("fwd.ipynb")
            assert (await c.execute(session["kernel"]["id"], "x = 7")).status == "ok"
        assert up.info["on_ctrl_c"].startswith("Ctrl-C detaches: job "), up.info
        assert up.stop() == 0
        assert [s for _, s, _ in our_jobs(cluster, testbed)] == ["RUNNING"], "--keep kept it"
        # named once: after `up login --slurm --keep`, commands find the job without --slurm
        # (and without -F: `up` recorded the ssh options too)
        job = our_jobs(cluster, testbed)[0][0]
        status = subprocess.run([sys.executable, "-m", "tether", "status", "login"],
                                capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                timeout=180)
        assert status.returncode == 0 and f"login: job {job} RUNNING" in status.stdout, \
            status.stdout + status.stderr
        listed = tether(slurm_config, "ps", "-H", "login", "--json")
        assert listed.returncode == 0 and json.loads(listed.stdout)["kernels"], listed.stderr
        logs = list((testbed.home / ".cache" / "tether" / "slurm").glob("*/*.log"))
        assert logs and not [p for p in logs if up.info["token"] in p.read_text()], \
            "the token is in a job's log"
        detached = up.text + (up.proc.stderr.read() if up.proc.stderr else "")
        hints = re.findall(r"`(tether (?:attach|down) [^`]*)`", detached)
        assert len(hints) == 2 and all("--slurm" in h and str(slurm_config) in h
                                       for h in hints), detached
        doctor = tether(slurm_config, "doctor", "login", "--slurm", "--json")
        checks = {c["name"]: c for c in json.loads(doctor.stdout)}
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert checks["server"]["detail"].startswith("job ") and checks["kernel runs code"]["ok"]
        port, extra = free_port(), free_port()
        page = RemotePage(socket.gethostbyname(cluster.host))  # a port on the job's node
        again = SlurmUp(subprocess.Popen(  # the printed hint, as printed (+ what the test reads)
            [sys.executable, "-m", *shlex.split(hints[0]), "--json", "--port", str(port),
             "--forward", f"{page.port}:{extra}"], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        try:
            assert again.read_until(lambda u: bool(u.info), RUN_DEADLINE), again.text
            assert again.info["token"] == up.info["token"]
            assert await answers_on(extra) == page.body  # --forward: to the node's port
            async with ColabClient(again.info["url"].rstrip("/"), again.info["token"]) as c:
                kernel = (await c.get_json("/api/kernels"))[0]["id"]
                out = await c.execute(kernel, "print(x * 6)")
                assert out.stdout.strip() == "42", out
            job = our_jobs(cluster, testbed)[0][0]
            cluster.run("scancel", job)
            assert again.read_until(lambda u: u.proc.poll() is not None, 90), again.text
            rest = again.proc.stderr.read() if again.proc.stderr else ""
            assert again.proc.returncode == 1 and "CANCELLED" in again.text + rest
        finally:
            again.stop()
            page.close()
    finally:
        up.stop()
        tether(slurm_config, "down", "login", "--slurm")
    assert our_jobs(cluster, testbed) == []
    assert wait_job_processes_gone(testbed, 30) == []


async def test_ctrl_c_while_pending_cancels_the_job(prepared: Prepared, testbed: SSHBed,
                                                    cluster: Cluster, slurm_config: Path) -> None:
    cluster.wait_idle()
    blockers = [blocker(cluster), blocker(cluster)]
    up = start(slurm_config, "--gpus", "1", "--port", str(free_port()))
    try:
        assert up.read_until(lambda u: "PENDING" in u.text, QUEUE_DEADLINE), up.text
        assert up.stop(signal.SIGINT) == 130
        rest = up.proc.stderr.read() if up.proc.stderr else ""
        assert "Cancelled job" in rest, up.text + rest
        assert our_jobs(cluster, testbed) == []
    finally:
        up.stop()
        for job in blockers:
            cluster.run("scancel", job)


async def test_ctrl_c_when_running_cancels_the_job_with_one_line(
        prepared: Prepared, testbed: SSHBed, cluster: Cluster, slurm_config: Path) -> None:
    """Ctrl-C of an attached `up --slurm` (no --keep) cancels the job, as the ready text said, in
    one line: no traceback of the requests the server's end cut short."""
    cluster.wait_idle()
    up = start(slurm_config, "--port", str(free_port()))
    try:
        assert up.read_until(lambda u: bool(u.info), RUN_DEADLINE), up.text + cluster.log_tail()
        assert up.info["on_ctrl_c"].startswith("Ctrl-C cancels job "), up.info
        async with ColabClient(up.info["url"].rstrip("/"), up.info["token"]) as c:
            kid = (await c.create_session("cut.ipynb"))["kernel"]["id"]
            assert (await c.execute(kid, "print(6 * 7)")).stdout.strip() == "42"
        assert up.stop(signal.SIGINT) == 0
        rest = up.proc.stderr.read() if up.proc.stderr else ""
        after = [line for line in rest.splitlines() if line.strip()]
        assert len(after) == 1 and after[0].startswith("Cancelled job"), up.text + rest
        assert our_jobs(cluster, testbed) == []
    finally:
        up.stop()


async def test_walltime_releases_kernels_and_runs_the_hook(prepared: Prepared, testbed: SSHBed,
                                                          cluster: Cluster,
                                                          slurm_config: Path) -> None:
    cluster.wait_idle()
    hook = testbed.home / "walltime-hook"
    hook.unlink(missing_ok=True)
    # a server of the login node's own runs too: the job's `release --all` is not about it
    direct = start_up(testbed, "gpubox")
    assert direct.info, direct.stop() and direct.stderr()
    direct.stop()
    # Slurm sends the signal up to 60 s before it is due (its event loop's resolution): with
    # --time 1 it could come before the server was up, with nothing to release yet
    up = start(slurm_config, "--time", "2", "--walltime-signal", "30",
               "--on-walltime", f"echo saved > {hook}", "--port", str(free_port()))
    try:
        assert up.read_until(lambda u: bool(u.info), RUN_DEADLINE), up.text
        async with ColabClient(up.info["url"].rstrip("/"), up.info["token"]) as c:
            session = await c.create_session("long.ipynb")
            out = await c.execute(session["kernel"]["id"], "import os; print(os.getpid())")
            kernel_pid = int(out.stdout.strip())
        assert up.read_until(lambda u: u.proc.poll() is not None, 210), up.text
        rest = up.proc.stderr.read() if up.proc.stderr else ""
        assert "TIMEOUT" in up.text + rest, up.text + rest
        assert hook.read_text().strip() == "saved"
        assert not psutil.pid_exists(kernel_pid)
        # this job's (an earlier job's folder may still hold one of its own)
        done = max(testbed.tether_root.glob("slurm/*/walltime.json"),
                   key=lambda p: p.stat().st_mtime)
        assert json.loads(done.read_text().splitlines()[-1])["released"] is True
    finally:
        up.stop()
        tether(slurm_config, "down", "login", "--slurm")


def test_refused_submission_and_hosts_without_slurm(prepared: Prepared, testbed: SSHBed,
                                                    cluster: Cluster, slurm_config: Path) -> None:
    refused = tether(slurm_config, "up", "login", "--slurm", "--partition", "nosuch",
                     "--port", str(free_port()))
    assert refused.returncode == 1
    assert "Slurm on login refused the job" in refused.stderr and "partition" in refused.stderr
    assert len(refused.stderr.strip().splitlines()[-1:]) == 1 and "Traceback" not in refused.stderr
    assert "SSH to the nodes" not in refused.stderr and "no node" not in refused.stderr, \
        "a note about node access, although the partition was the problem"
    no_slurm = tether(slurm_config, "up", "nopython", "--slurm", "--port", str(free_port()))
    assert no_slurm.returncode == 1 and "has no `sbatch`" in no_slurm.stderr, no_slurm.stderr
    assert our_jobs(cluster, testbed) == []


def test_a_job_that_does_not_see_the_home_says_so(prepared: Prepared, testbed: SSHBed,
                                                  cluster: Cluster, slurm_config: Path) -> None:
    cluster.wait_idle()
    done = tether(slurm_config, "up", "login", "--slurm", "--port", str(free_port()),
                  "--sbatch-arg=--export=ALL,XDG_CACHE_HOME=/nonexistent")
    assert done.returncode == 1, done.stderr
    assert "ended before its server was ready" in done.stderr
    assert "does not see the login node's home" in done.stderr, done.stderr


def test_release_all_and_stop_the_server_ends_the_job(prepared: Prepared, testbed: SSHBed,
                                                      cluster: Cluster,
                                                      slurm_config: Path) -> None:
    """The GPU goes back to the pool at once, not at the walltime."""
    cluster.wait_idle()
    up = start(slurm_config, "--gpus", "1", "--port", str(free_port()))
    try:
        assert up.read_until(lambda u: bool(u.info), RUN_DEADLINE), up.text
        done = tether(slurm_config, "release", "login", "--slurm", "--all",
                      "--stop-server")
        assert done.returncode == 0, done.stdout + done.stderr
        assert up.read_until(lambda u: u.proc.poll() is not None, 90), up.text
        rest = up.proc.stderr.read() if up.proc.stderr else ""
        assert "COMPLETED" in up.text + rest, up.text + rest
        assert our_jobs(cluster, testbed) == []
    finally:
        up.stop()
        tether(slurm_config, "down", "login", "--slurm")
    assert wait_job_processes_gone(testbed, 30) == []


# -- kernels that outlive the job's server (issue 15) ------------------------------------------



@pytest.mark.parametrize("access", ["jump", "forward"])
async def test_kernels_outlive_the_jobs_server_kill9_and_restart(
        prepared: Prepared, testbed: SSHBed, cluster: Cluster, slurm_config: Path,
        access: str) -> None:
    """Inside the job: kill -9 of its server, then `tether restart` (with --slurm, then as
    recorded), each with a changed option: the same URL, the same kernel process with its
    state and its thread still counting; `tether down` then leaves nothing running."""
    cluster.wait_idle()
    up = start(slurm_config, "--keep", "--node-access", access, "--port", str(free_port()))
    try:
        assert up.read_until(lambda u: bool(u.info), RUN_DEADLINE), up.text + cluster.log_tail()
        url, token = up.info["url"].rstrip("/"), up.info["token"]
        async with ColabClient(url, token, timeout=30) as c:
            session = await c.create_session("kept.ipynb")
            kid = session["kernel"]["id"]
            pid = int((await c.execute(kid, STATE)).stdout)
        seen = 0
        for how, timeout in (("kill -9", 0), ("restart --slurm", 7200), ("restart", 5400)):
            if how == "kill -9":
                server = psutil.Process(up.info["remote_pid"])
                server.kill()
                server.wait(10)
                # the job's shell took the kernel in (a subreaper): it still ends with the job
                shell = psutil.Process(psutil.Process(pid).ppid())
                assert "SLURM_JOB_ID" in shell.environ() and shell.name() in ("sh", "dash",
                                                                             "bash"), shell
            else:
                args = ["restart", "login", *how.split()[1:], "--idle-timeout", str(timeout),
                        "--json"]
                done = await asyncio.to_thread(tether, slurm_config, *args)
                assert done.returncode == 0, done.stdout + done.stderr
                result = json.loads(done.stdout)
                assert result["kept"] == [kid] and result["lost"] == [], result
                assert len(result["replaced"]) == 1, result
            seen = await same_kernel(url, token, kid, session["id"], pid, seen, how, 90)
            if timeout:
                listing = await asyncio.to_thread(tether, slurm_config, "ps", "-H", "login",
                                                  "--slurm", "--json")
                assert json.loads(listing.stdout)["server"]["idle_timeout"] == timeout, how
        assert up.proc.poll() is None, up.text  # the attached `up` followed each new server
        assert [s for _, s, _ in our_jobs(cluster, testbed)] == ["RUNNING"]
        logs = list((testbed.home / ".cache" / "tether" / "slurm").glob("*/*.log"))
        assert not [p for p in logs if token in p.read_text()], "the token is in a job's log"
    finally:
        up.stop()
    down = tether(slurm_config, "down", "login")
    assert down.returncode == 0 and "Cancelled job" in down.stderr, down.stderr
    assert our_jobs(cluster, testbed) == []
    left = wait_job_processes_gone(testbed, 30)
    assert left == [], [" ".join(psutil.Process(p).cmdline()[:4]) for p in left
                        if psutil.pid_exists(p)]
