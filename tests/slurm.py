"""A real single-node Slurm on this machine: munge, slurmctld and slurmd, two fake GPUs.

Used by the Slurm fixtures and benchmarks. Needs root and Debian's ``slurmctld slurmd
slurm-client munge`` (``scripts/setup test`` installs them). Config, state, spool and logs live
in a private directory; ``/etc/slurm/slurm.conf`` is a symlink to the private config for the
test's lifetime, because ``sbatch`` run over ssh (no ``SLURM_CONF`` in an ssh session) reads
that path. The daemons are children of the test process, stopped by pid.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.sshd import flock_wait

SLURMCTLD = "/usr/sbin/slurmctld"
SLURMD = "/usr/sbin/slurmd"
MUNGED = "/usr/sbin/munged"
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")
READY_DEADLINE = 60.0
GPUS = 2
LOCK = Path(tempfile.gettempdir()) / "tether-slurm.lock"

SLURM_CONF = """\
ClusterName=tethertest
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
MessageTimeout=10
KillWait=5
MinJobAge=300
InactiveLimit=0
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName={host} CPUs={cpus} RealMemory=4000 Gres=gpu:{gpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def available() -> bool:
    return os.geteuid() == 0 and all(os.path.exists(p) for p in (SLURMCTLD, SLURMD, MUNGED))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    dir: Path
    host: str
    gpus: list[Path]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    munged: subprocess.Popen[bytes] | None = None
    lock_fd: int = -1

    @property
    def conf(self) -> Path:
        return self.dir / "slurm.conf"

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *argv: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), capture_output=True, text=True, env=self.env(),
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def squeue(self, user: str | None = None) -> list[tuple[str, str, str]]:
        """(job id, state, reason) of every job (of ``user``) in the queue."""
        argv = ["squeue", "-h", "-o", "%i %T %r"] + (["-u", user] if user else [])
        out = self.run(*argv).stdout
        return [tuple(line.split(None, 2)) for line in out.splitlines() if line.strip()]  # type: ignore[misc]

    def wait_idle(self, deadline: float = READY_DEADLINE) -> None:
        """Until the node is idle (no job left on it): bounded."""
        end = time.monotonic() + deadline
        state = ""
        while time.monotonic() < end:
            state = self.run("sinfo", "-h", "-N", "-o", "%t").stdout.strip()
            if state == "idle" and not self.squeue():
                return
            time.sleep(0.2)
        raise RuntimeError(f"the test node is {state!r}, not idle, after {deadline:.0f} s: "
                           f"{self.log_tail()}")

    def log_tail(self) -> str:
        return "".join((self.dir / name).read_text()[-800:] for name in
                       ("slurmctld.log", "slurmd.log") if (self.dir / name).exists())

    def stop(self) -> None:
        for job, _, _ in self.squeue():
            self.run("scancel", job)
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if SYSTEM_CONF.is_symlink() and os.readlink(SYSTEM_CONF) == str(self.conf):
            SYSTEM_CONF.unlink()
        if self.munged is not None:
            self.munged.terminate()
            try:
                self.munged.wait(10)
            except subprocess.TimeoutExpired:
                self.munged.kill()
                self.munged.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.lock_fd >= 0:
            os.close(self.lock_fd)  # releases the flock
            self.lock_fd = -1


def _start_munge() -> subprocess.Popen[bytes] | None:
    """munged in the foreground as the munge user, unless one already answers."""
    if MUNGE_SOCKET.exists() and subprocess.run(
            ["munge", "-n"], capture_output=True, timeout=10).returncode == 0:
        return None
    MUNGE_SOCKET.parent.mkdir(parents=True, exist_ok=True)
    shutil.chown(MUNGE_SOCKET.parent, "munge", "munge")
    proc = subprocess.Popen(["runuser", "-u", "munge", "--", MUNGED, "--foreground", "--force"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    end = time.monotonic() + READY_DEADLINE
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"munged exited with {proc.returncode}")
        if MUNGE_SOCKET.exists() and subprocess.run(
                ["munge", "-n"], capture_output=True, timeout=10).returncode == 0:
            return proc
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("munged did not start")


def start_cluster() -> Cluster:
    if not available():
        raise RuntimeError("the Slurm test bed needs root and slurmctld, slurmd, munge")
    if SYSTEM_CONF.exists() and not SYSTEM_CONF.is_symlink():
        raise RuntimeError(f"{SYSTEM_CONF} is a real file: not a test machine's, refusing")
    # one cluster on a machine (its node is this host, its config at /etc/slurm), whatever the
    # SSH test bed: runs with their own TETHER_TEST_BED wait here for each other
    lock_fd = flock_wait(path=LOCK)
    try:
        return _start_cluster(lock_fd)
    except BaseException:
        os.close(lock_fd)
        raise


def _start_cluster(lock_fd: int) -> Cluster:
    dir = Path(tempfile.mkdtemp(prefix="tether-slurm-"))
    dir.chmod(0o755)
    for sub in ("state", "spool"):
        (dir / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    gpus = []
    for i in range(GPUS):  # GRES wants character devices: /dev/null's numbers will do
        dev = dir / f"nvidia{i}"
        os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))
        gpus.append(dev)
    cluster = Cluster(dir, host, gpus, lock_fd=lock_fd)
    cluster.conf.write_text(SLURM_CONF.format(host=host, ctld_port=_free_port(),
                                              d_port=_free_port(), dir=dir,
                                              cpus=os.cpu_count() or 2, gpus=GPUS))
    (dir / "gres.conf").write_text(f"NodeName={host} Name=gpu File={dir}/nvidia[0-{GPUS - 1}]\n")
    (dir / "cgroup.conf").write_text("")  # not CgroupPlugin=disabled: slurmd 22.05 dies on it
    try:
        cluster.munged = _start_munge()
        SYSTEM_CONF.unlink(missing_ok=True)
        SYSTEM_CONF.symlink_to(cluster.conf)
        for argv in ([SLURMCTLD, "-D", "-i", "-f", str(cluster.conf)],
                     [SLURMD, "-D", "-f", str(cluster.conf)]):
            cluster.procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                                  stdout=subprocess.DEVNULL,
                                                  stderr=subprocess.DEVNULL, env=cluster.env()))
        cluster.wait_idle()
    except BaseException:
        cluster.lock_fd = -1  # the caller releases it
        cluster.stop()
        raise
    return cluster
