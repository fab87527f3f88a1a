"""Find a kernel's processes and end them with certainty, under the safe-kill rule.

Everything here is blocking (``/proc`` reads, bounded waits): call it through
``asyncio.to_thread`` on a server. The rule (docs/kernel-gpu-lifecycle.md): kill only processes
that run as the server's uid (as root: that also carry our marker), that are not the server, its
ancestors or pid 1, not on the deny-list, that were created after the kernel they are attributed
to, and that provably belong to us (marker, recorded process group, recorded descendant). A
member of the kernel's own cgroup (tether.remote.cgroups) is ours by the strongest proof there is:
only its owner can put a process there, and nothing leaves it. Signals go through psutil, which
refuses a pid that was reused since the snapshot.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import signal
import time
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import psutil

from tether import identity
from tether.contract import INSTANCE_ENV as INSTANCE_ENV  # (the names live in the contract)
from tether.contract import KERNEL_ID_ENV as KERNEL_ID_ENV
from tether.contract import KERNEL_MARKER_ENV
from tether.remote import cgroups

log = logging.getLogger(__name__)
MARKER_ENV = KERNEL_MARKER_ENV
DENY_NAMES = frozenset(
    {"nvidia-persistenced", "nv-hostengine", "Xorg", "X", "Xwayland", "sshd", "systemd", "init",
     "dcgm", "nvidia-smi", "containerd", "dockerd"}
)
# A process may be created a hair before the kernel's recorded start (clock granularity)
CREATE_SLACK = 0.05
KILL_WAIT = 2.0  # after SIGKILL: the kernel needs this long at most to reap a process


@dataclass(frozen=True)
class Guard:
    """Who we are: the processes that must never be signalled."""

    uid: int
    protected: frozenset[int]  # the server, its ancestors, pid 1

    @classmethod
    def here(cls) -> Guard:
        me = psutil.Process()
        protected = {1, me.pid, *(p.pid for p in me.parents())}
        return cls(uid=os.geteuid(), protected=frozenset(protected))


@dataclass(frozen=True)
class KernelRecord:
    """What a kernel's processes can be recognised by, recorded at launch."""

    kernel_id: str
    pid: int
    pgid: int | None
    marker: str
    started: float  # create time of the kernel process
    descendants: frozenset[tuple[int, float]] = frozenset()  # (pid, create time) seen alive
    cgroup: str = ""  # the kernel's own cgroup v2 directory ("" where the machine has none)


@dataclass
class SweepResult:
    terminated: list[int] = field(default_factory=list)  # ended after SIGTERM
    killed: list[int] = field(default_factory=list)  # needed SIGKILL
    survivors: list[psutil.Process] = field(default_factory=list)
    refused: list[psutil.Process] = field(default_factory=list)  # ours by attribution, unsafe
    seconds: float = 0.0

    def merge(self, other: SweepResult) -> None:
        self.terminated += other.terminated
        self.killed += other.killed
        self.survivors += other.survivors
        self.refused += other.refused
        self.seconds += other.seconds


def environ_of(proc: psutil.Process) -> dict[str, str]:
    """The environment ``proc`` was exec'ed with; {} where it cannot be read."""
    try:
        return dict(proc.environ())
    except (psutil.Error, OSError):
        return {}


def alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (a zombie holds no memory and no descriptors any more)."""
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def same_uid(proc: psutil.Process, uid: int) -> bool:
    try:
        return bool(proc.uids().real == uid)
    except psutil.Error:
        return False


def iter_marked(key: str, value: str, uid: int) -> Iterator[psutil.Process]:
    """Same-uid processes whose environment has ``key=value``."""
    for proc in psutil.process_iter():
        if same_uid(proc, uid) and environ_of(proc).get(key) == value:
            yield proc


def carrying(markers: Mapping[str, Collection[str]], guard: Guard) -> list[psutil.Process]:
    """This user's processes whose environment sets one of ``markers`` (variable -> values),
    but the guarded ones (this process, its ancestors, pid 1): one pass over the table."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid in guard.protected or not same_uid(proc, guard.uid):
            continue
        env = environ_of(proc)
        if any(env.get(key) in values for key, values in markers.items()):
            found.append(proc)
    return found


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return []


def group_members(pgid: int, uid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and same_uid(proc, uid):
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


def snapshot_descendants(record: KernelRecord) -> KernelRecord:
    """``record`` plus the kernel's live descendants (they lose their parent once it dies)."""
    seen = set(record.descendants)
    for proc in descendants(record.pid):
        try:
            seen.add((proc.pid, identity.started(proc)))
        except psutil.Error:
            continue
    return dataclasses.replace(record, descendants=frozenset(seen))


def _recorded(record: KernelRecord) -> Iterator[psutil.Process]:
    for pid, created in record.descendants:
        try:
            proc = psutil.Process(pid)
            if identity.same_start(identity.started(proc), created):
                yield proc
        except psutil.Error:
            continue


def _group_is_ours(record: KernelRecord) -> bool:
    """False if the group id now names another group: its leader (pid == pgid) is not the kernel.

    Linux reuses a pgid only once no member of the old group is left, and a new group's id is
    its leader's pid: a live leader that is not our kernel means the number was reused.
    """
    try:
        leader = psutil.Process(record.pgid)
        return (identity.same_start(identity.started(leader), record.started)
                or record.pgid != record.pid)
    except psutil.Error:
        return True


@dataclass(frozen=True)
class ProcessTable:
    """One pass over the processes, to attribute many kernels at once (the page's inventory):
    reading every process's environment once per kernel costs ~7 ms a kernel on ~100 processes."""

    children: dict[int, list[psutil.Process]]
    marked: dict[str, list[psutil.Process]]  # MARKER_ENV value -> same-uid processes carrying it

    @classmethod
    def scan(cls, uid: int) -> ProcessTable:
        children: dict[int, list[psutil.Process]] = {}
        marked: dict[str, list[psutil.Process]] = {}
        for proc in psutil.process_iter():
            try:
                children.setdefault(proc.ppid(), []).append(proc)
            except psutil.Error:
                continue
            if same_uid(proc, uid):
                value = environ_of(proc).get(MARKER_ENV)
                if value:
                    marked.setdefault(value, []).append(proc)
        return cls(children, marked)

    def descendants(self, pid: int) -> list[psutil.Process]:
        found, todo = [], list(self.children.get(pid, []))
        while todo:
            proc = todo.pop()
            found.append(proc)
            todo += self.children.get(proc.pid, [])
        return found


def kernel_processes(record: KernelRecord, guard: Guard,
                     table: ProcessTable | None = None) -> list[psutil.Process]:
    """Every live process attributed to the kernel, kernel included, each once."""
    found: dict[int, psutil.Process] = {}
    candidates: list[psutil.Process] = []
    try:
        root = psutil.Process(record.pid)
        if identity.same_start(identity.started(root), record.started):
            candidates += [root, *(table.descendants(record.pid) if table
                                   else descendants(record.pid))]
    except psutil.Error:
        pass
    candidates += _recorded(record)
    if record.pgid and _group_is_ours(record):
        candidates += group_members(record.pgid, guard.uid)
    if record.marker:
        candidates += (table.marked.get(record.marker, []) if table
                       else iter_marked(MARKER_ENV, record.marker, guard.uid))
    candidates += processes(cgroups.members(record.cgroup))
    for proc in candidates:
        if proc.pid not in found and alive(proc):
            found[proc.pid] = proc
    return list(found.values())


def processes(pids: Iterable[int]) -> list[psutil.Process]:
    """The processes of ``pids`` that still exist."""
    found = []
    for pid in pids:
        try:
            found.append(psutil.Process(pid))
        except psutil.Error:
            continue
    return found


def unsafe_reason(proc: psutil.Process, guard: Guard, marker: tuple[str, str] | None,
                  not_before: float = 0.0, members: frozenset[int] = frozenset()) -> str:
    """Why ``proc`` must not be signalled ("" when it may be).

    ``marker`` is the (variable, value) pair that proves a process ours; as root it is required.
    ``members`` are the pids in the kernel's own cgroup: ours whatever they carry.
    """
    if proc.pid in guard.protected:
        return "the server, one of its ancestors, or pid 1"
    if proc.pid in members:
        return "" if alive(proc) else "gone"
    try:
        name = proc.name()
        uid = proc.uids().real
        created = identity.started(proc)
    except psutil.Error:
        return "gone"
    if name in DENY_NAMES:
        return f"deny-listed ({name})"
    if uid != guard.uid:
        return "another user's process"
    if not_before and created + CREATE_SLACK < not_before:
        return "older than the kernel it would belong to (pid reuse?)"
    if guard.uid == 0 and marker is not None and environ_of(proc).get(marker[0]) != marker[1]:
        return "running as root without our marker"
    return ""


def _signal(proc: psutil.Process, signum: int) -> bool:
    try:
        proc.send_signal(signum)  # psutil checks the create time: a reused pid raises
        if signum == signal.SIGTERM:
            proc.resume()  # a stopped process only acts on SIGTERM once continued
        return True
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        log.warning("not allowed to signal pid %d", proc.pid)
        return False


def wait_gone(procs: Iterable[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait (bounded) until every process has exited; return those still alive.

    Waits on pidfds where the kernel has them (no polling); falls back to psutil's bounded poll.
    """
    pending = [p for p in procs if alive(p)]
    if not pending or timeout <= 0:
        return pending
    deadline = time.monotonic() + timeout
    fds: dict[int, psutil.Process] = {}
    try:
        for proc in pending:
            fd = os.pidfd_open(proc.pid)
            if proc.is_running():  # the pidfd is of the very process we snapshotted
                fds[fd] = proc
            else:
                os.close(fd)
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        while fds and (left := deadline - time.monotonic()) > 0:
            for fd, _ in poller.poll(left * 1000):
                poller.unregister(fd)
                os.close(fd)
                fds.pop(fd)
    except OSError:  # no pidfd_open (old kernel) or a race with the exit: poll instead
        for fd in fds:
            os.close(fd)
        fds = {}
        _, still = psutil.wait_procs(pending, timeout=max(0.0, deadline - time.monotonic()))
        return [p for p in still if alive(p)]
    for fd in fds:
        os.close(fd)
    return [p for p in fds.values() if alive(p)]


def terminate(procs: list[psutil.Process], grace: float,
              no_term: frozenset[int] = frozenset()) -> SweepResult:
    """SIGTERM, wait up to ``grace``, SIGKILL, wait, verify. Returns who ended how.

    Pids in ``no_term`` get no SIGTERM (a kernel being shut down by its manager), only the
    SIGKILL once ``grace`` is over.
    """
    started = time.monotonic()
    result = SweepResult()
    targets = [p for p in procs if p.pid in no_term or _signal(p, signal.SIGTERM)]
    left = wait_gone(targets, grace)
    result.terminated = [p.pid for p in targets if p not in left]
    for proc in left:
        _signal(proc, signal.SIGKILL)
    survivors = wait_gone(left, KILL_WAIT)
    result.killed = [p.pid for p in left if p not in survivors]
    result.survivors = survivors
    result.seconds = time.monotonic() - started
    if result.terminated or result.killed:
        log.info("swept: %d ended on SIGTERM %s, %d needed SIGKILL %s", len(result.terminated),
                 result.terminated, len(result.killed), result.killed)
    for proc in survivors:
        log.warning("pid %d survived SIGKILL (state %s)", proc.pid, state_of(proc))
    return result


def state_of(proc: psutil.Process) -> str:
    try:
        return str(proc.status())
    except psutil.Error:
        return "gone"


def split_safe(procs: list[psutil.Process], guard: Guard, marker: tuple[str, str] | None,
               not_before: float = 0.0, members: frozenset[int] = frozenset(),
               ) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """(may be signalled, must not be), logging why each refused one is refused."""
    safe, refused = [], []
    for proc in procs:
        why = unsafe_reason(proc, guard, marker, not_before, members)
        if why == "gone":
            continue
        if why:
            log.warning("not killing pid %d: %s", proc.pid, why)
            refused.append(proc)
        else:
            safe.append(proc)
    return safe, refused


def sweep_kernel(record: KernelRecord, guard: Guard, grace: float,
                 include_kernel: bool = True) -> SweepResult:
    """End every process of the kernel (the kernel itself too unless told not to)."""
    procs = kernel_processes(record, guard)
    if not include_kernel:
        procs = [p for p in procs if p.pid != record.pid]
    members = frozenset(cgroups.members(record.cgroup))
    safe, refused = split_safe(procs, guard, (MARKER_ENV, record.marker), record.started,
                               members)
    result = terminate(safe, grace)
    result.refused = refused
    if include_kernel and record.cgroup:
        # whatever escaped the marker and the process group is still in the cgroup
        caught = [pid for pid in cgroups.empty(record.cgroup, KILL_WAIT)
                  if pid not in result.terminated and pid not in result.killed]
        if caught:
            log.info("kernel %s: %d process(es) found only by its cgroup, killed: %s",
                     record.kernel_id, len(caught), caught)
        result.killed += caught
        result.survivors = [p for p in result.survivors if alive(p)]
        cgroups.remove(record.cgroup)
    return result


def signal_kernel(record: KernelRecord, guard: Guard, signum: int) -> list[int]:
    """Send ``signum`` to the kernel and to what the safe-kill rule allows in its process group
    (not a plain ``killpg``: as root that would reach other users' processes in the group)."""
    members = frozenset(cgroups.members(record.cgroup))
    procs = [] if not record.pgid else group_members(record.pgid, guard.uid)
    procs = [p for p in procs if p.pid != record.pid]
    safe, _ = split_safe(procs, guard, (MARKER_ENV, record.marker), record.started, members)
    sent = []
    try:
        kernel = psutil.Process(record.pid)
        if identity.same_start(identity.started(kernel), record.started):
            safe.insert(0, kernel)
    except psutil.Error:
        pass
    for proc in safe:
        try:
            proc.send_signal(signum)
            sent.append(proc.pid)
        except psutil.Error:
            continue
    return sent
