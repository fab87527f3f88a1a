"""Accounting and release: what each kernel holds (processes, RSS, GPU), and ending it for sure.

Release order for one kernel (docs/kernel-gpu-lifecycle.md): snapshot -> interrupt -> delete
the session/kernel while its other processes get SIGTERM -> SIGKILL whatever is left once the
grace is over (the kernel too) -> verify, bounded, until nothing of it holds the GPU -> report
leftovers with pid, user, state and MiB; ``D``/``Z`` processes holding a GPU need a GPU reset.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

import psutil
from jupyter_core.utils import ensure_async

from tether import identity
from tether.config import DEFAULT_SHUTDOWN_WAIT
from tether.remote import cgroups, gpu, sweep
from tether.remote.lifecycle import DEFAULT_GRACE, ServerContext, server_context
from tether.remote.sweep import INSTANCE_ENV, KERNEL_ID_ENV, Guard, KernelRecord

log = logging.getLogger(__name__)

MIB = 1024 * 1024
VERIFY_TIMEOUT = 30.0
VERIFY_INTERVAL = 0.25
INTERRUPT_TIMEOUT = 2.0
CMDLINE_MAX = 300
STUCK_STATES = frozenset({psutil.STATUS_DISK_SLEEP, psutil.STATUS_ZOMBIE})


# --- accounting (blocking: run in a thread) ------------------------------------------------------


def _by_pid(holders: Iterable[gpu.GpuHolder]) -> dict[int, list[gpu.GpuHolder]]:
    found: dict[int, list[gpu.GpuHolder]] = {}
    for h in holders:
        found.setdefault(h.pid, []).append(h)
    return found


def _gpu_fields(holders: list[gpu.GpuHolder]) -> dict[str, Any]:
    known = [h.memory for h in holders if h.memory is not None]
    return {
        "gpus": sorted({h.gpu for h in holders}),
        "gpu_memory": sum(known) if known else (None if holders else 0),
    }


def process_row(proc: psutil.Process, holders: list[gpu.GpuHolder]) -> dict[str, Any] | None:
    """One process as the API shows it; None if it is gone."""
    try:
        with proc.oneshot():
            status = str(proc.status())
            row = {
                "pid": proc.pid,
                "ppid": proc.ppid(),
                "user": _user(proc),
                "name": proc.name(),
                "status": status,
                "rss": proc.memory_info().rss if status != psutil.STATUS_ZOMBIE else 0,
                "cmdline": " ".join(proc.cmdline())[:CMDLINE_MAX],
            }
    except psutil.Error:
        return None
    row.update(_gpu_fields(holders))
    row["needs_gpu_reset"] = bool(holders) and status in STUCK_STATES
    return row


def _user(proc: psutil.Process) -> str:
    try:
        return str(proc.username())
    except (psutil.Error, KeyError):
        try:
            return str(proc.uids().real)
        except psutil.Error:
            return "?"


def _attributed_kernel(pid: int, instances: set[str]) -> str:
    """The tether kernel id a process says it belongs to ("" if none of this server's, adopted
    kernels included)."""
    env = sweep.environ_of(psutil.Process(pid)) if psutil.pid_exists(pid) else {}
    return env.get(KERNEL_ID_ENV, "") if env.get(INSTANCE_ENV) in instances else ""


def inventory(records: dict[str, KernelRecord], ctx: ServerContext) -> dict[str, Any]:
    """Per-kernel process trees with RSS and GPU memory; GPUs; GPU holders that are not ours."""
    holders = _by_pid(gpu.query_holders())
    kernels: dict[str, list[dict[str, Any]]] = {}
    owned: set[int] = set()
    table = sweep.ProcessTable.scan(ctx.guard.uid) if len(records) > 1 else None
    for kid, record in records.items():
        rows = []
        for proc in sweep.kernel_processes(record, ctx.guard, table):
            row = process_row(proc, holders.get(proc.pid, []))
            if row is not None:
                rows.append(row)
                owned.add(proc.pid)
        kernels[kid] = rows
    foreign = []
    for pid, held in sorted(holders.items()):
        if pid in owned:
            continue
        try:
            row = process_row(psutil.Process(pid), held)
        except psutil.Error:
            row = None
        if row is not None:
            row["kernel"] = _attributed_kernel(pid, ctx.instances()) or None
            foreign.append(row)
    return {"kernels": kernels, "foreign": foreign, "gpus": [_gpu_row(g) for g in gpu.query_gpus()]}


def _gpu_row(g: gpu.GpuInfo) -> dict[str, Any]:
    return {"index": g.index, "name": g.name, "uuid": g.uuid, "memory_used": g.memory_used,
            "memory_total": g.memory_total, "utilization": g.utilization_gpu}


def kernel_memory(processes: list[dict[str, Any]]) -> tuple[int, int]:
    """(RSS bytes, GPU bytes) of a kernel's process rows."""
    rss = sum(int(p["rss"]) for p in processes)
    gpu_bytes = sum(int(p["gpu_memory"] or 0) for p in processes)
    return rss, gpu_bytes


# --- releasing ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What a release did, and what (if anything) it could not free."""

    kernel: str | None
    seconds: float = 0.0
    terminated: list[int] = field(default_factory=list)
    killed: list[int] = field(default_factory=list)
    leftovers: list[dict[str, Any]] = field(default_factory=list)
    foreign: list[dict[str, Any]] = field(default_factory=list)
    forced: list[int] = field(default_factory=list)
    error: str = ""
    # why the release cannot vouch that nothing of the kernel is left ("" when it can: its
    # cgroup was emptied); ``released`` then covers only the processes that could be found
    unverified: str = cgroups.NO_CGROUP

    @property
    def released(self) -> bool:
        return not self.leftovers and not self.error

    @property
    def verified(self) -> bool:
        return self.released and not self.unverified

    def to_json(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "released": self.released, "verified": self.verified,
                "unverified_reason": "" if self.verified else self.unverified or "leftovers",
                "seconds": round(self.seconds, 3), "terminated": self.terminated,
                "killed": self.killed, "leftovers": self.leftovers, "foreign": self.foreign,
                "forced": self.forced, "error": self.error}


def leftover_rows(procs: Iterable[psutil.Process], refused: dict[int, str],
                  gpu_pids: Iterable[int] = ()) -> list[dict[str, Any]]:
    """Rows for what is left: live processes, zombies that still hold a GPU, and ``gpu_pids``
    the driver still lists (a process stuck in the driver: only a GPU reset frees that)."""
    holders = _by_pid(gpu.query_holders())
    rows, seen = [], set()
    for proc in procs:
        if proc.pid in seen or not (sweep.alive(proc) or proc.pid in holders):
            continue
        row = process_row(proc, holders.get(proc.pid, []))
        if row is not None:
            row["reason"] = refused.get(proc.pid, "survived SIGKILL")
            rows.append(row)
            seen.add(proc.pid)
    for pid in sorted(set(gpu_pids) - seen):
        if pid in holders:
            rows.append({"pid": pid, "ppid": None, "user": "?", "name": "?", "status": "gone",
                         "rss": 0, "cmdline": "", **_gpu_fields(holders[pid]),
                         "needs_gpu_reset": True,
                         "reason": "exited, but the driver still lists it"})
    return rows


def our_holders(pids: set[int], marker: tuple[str, str]) -> list[int]:
    """GPU holders that are ours: recorded pids or carriers of ``marker``."""
    found = []
    for h in gpu.query_holders():
        if h.pid in pids:
            found.append(h.pid)
            continue
        try:
            env = sweep.environ_of(psutil.Process(h.pid))
        except psutil.Error:
            continue
        if env.get(marker[0]) == marker[1]:
            found.append(h.pid)
    return found


def foreign_holders(exclude: set[int]) -> list[psutil.Process]:
    """Live processes holding a GPU, but for ``exclude``."""
    procs = []
    for pid in sorted({h.pid for h in gpu.query_holders()} - exclude):
        try:
            procs.append(psutil.Process(pid))
        except psutil.Error:
            continue
    return [p for p in procs if sweep.alive(p)]


def force_kill(procs: list[psutil.Process], guard: Guard, grace: float) -> sweep.SweepResult:
    """``--force``: end what the release's scope named (never another user's process, the
    server, its ancestors, pid 1 or deny-listed daemons)."""
    safe = []
    for proc in procs:
        try:
            name, uid = proc.name(), proc.uids().real
        except psutil.Error:
            continue
        if uid != guard.uid or proc.pid in guard.protected or name in sweep.DENY_NAMES:
            log.warning("--force: still not killing pid %d (%s, uid %d)", proc.pid, name, uid)
            continue
        safe.append(proc)
    return sweep.terminate(safe, grace)


def _cgroup_verdict(path: str) -> str:
    """"" if the kernel's cgroup is empty (or emptied and removed), else why not verified."""
    if not path:
        return cgroups.NO_CGROUP
    if os.path.isdir(path) and cgroups.populated(path):
        return f"the kernel's cgroup {path} still has processes: {cgroups.members(path)}"
    return ""


Deleter = Callable[[str], Coroutine[Any, Any, None]]


class Releaser:
    """Releases kernels of one server: owns the background releases it starts."""

    def __init__(self, kernel_manager: Any, delete: Deleter, ctx: ServerContext | None = None,
                 grace: float = DEFAULT_GRACE, verify_timeout: float = VERIFY_TIMEOUT) -> None:
        self.km = kernel_manager
        self.delete = delete
        self.ctx = ctx or server_context()
        self.grace = grace
        self.verify_timeout = verify_timeout
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Awaitable[Any], name: str) -> None:
        """Run ``coro`` in the background, owned here; failures are logged, never lost."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", task.get_name(), exc_info=task.exception())

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def record(self, kernel_id: str, remember: bool = True) -> KernelRecord | None:
        """What the kernel's processes are known by; ``remember``: note its children first."""
        kernel = self.km.get_kernel(kernel_id)  # KeyError for an unknown kernel
        provisioner = getattr(kernel, "provisioner", None)
        note = getattr(provisioner, "remember_descendants", None)
        if remember and note is not None:
            note()
        record = self.ctx.records.get(kernel_id)
        if record is not None:
            return record
        pid = getattr(provisioner, "pid", None)  # a kernel of another provisioner: pid and group
        if not pid:
            return None
        try:
            started = identity.started(psutil.Process(pid))
        except psutil.Error:
            return None
        return sweep.snapshot_descendants(
            KernelRecord(kernel_id, pid, getattr(provisioner, "pgid", None), "", started))

    async def release(self, kernel_id: str, force: bool = False) -> Outcome:
        """Release one kernel; the outcome lists whatever is left."""
        started = time.monotonic()
        record = await asyncio.to_thread(self.record, kernel_id)
        outcome = Outcome(kernel_id)
        if record is None:
            outcome.unverified = "not started by tether's provisioner: its processes are unknown"
            await self._delete(kernel_id, outcome)
        else:
            refused = await self._release_record(record, outcome)
            await self._verify(record, outcome, refused)
            outcome.unverified = await asyncio.to_thread(_cgroup_verdict, record.cgroup)
        if force:  # that kernel's processes only: what is left of it, and its marked holders
            marked = [] if record is None else await asyncio.to_thread(
                our_holders, set(), (sweep.MARKER_ENV, record.marker))
            await self._force(outcome, marked)
        outcome.seconds = time.monotonic() - started
        log.info("kernel %s released in %.2f s: %s", kernel_id, outcome.seconds,
                 "clean" if outcome.released else f"{len(outcome.leftovers)} leftover(s)")
        return outcome

    async def _release_record(self, record: KernelRecord, outcome: Outcome) -> dict[int, str]:
        """Delete the kernel while its other processes are swept; the refused ones, with why."""
        procs = await asyncio.to_thread(sweep.kernel_processes, record, self.ctx.guard)
        # a kernel of another provisioner has no marker (""): as root, none of it is provably ours
        marker = (sweep.MARKER_ENV, record.marker)
        members = frozenset(await asyncio.to_thread(cgroups.members, record.cgroup))
        safe, refused = sweep.split_safe(procs, self.ctx.guard, marker, record.started, members)
        why = {p.pid: sweep.unsafe_reason(p, self.ctx.guard, marker, record.started, members)
               for p in refused}
        await self._interrupt(record.kernel_id)
        swept, _ = await asyncio.gather(
            asyncio.to_thread(sweep.terminate, safe, self.grace, frozenset({record.pid})),
            self._delete(record.kernel_id, outcome),
        )
        outcome.terminated, outcome.killed = swept.terminated, swept.killed
        return why

    async def _interrupt(self, kernel_id: str) -> None:
        try:
            await asyncio.wait_for(ensure_async(self.km.interrupt_kernel(kernel_id)),
                                   INTERRUPT_TIMEOUT)
        except (asyncio.TimeoutError, KeyError, RuntimeError, OSError) as e:
            log.info("kernel %s: interrupt before release failed: %r", kernel_id, e)

    async def _delete(self, kernel_id: str, outcome: Outcome) -> None:
        try:
            await asyncio.wait_for(self.delete(kernel_id), self.grace + self._shutdown_wait() + 5)
        except KeyError:
            pass  # gone already (culled, or deleted by the client meanwhile)
        except asyncio.TimeoutError:
            outcome.error = "the kernel manager did not finish the shutdown in time"
        except Exception as e:  # the documented boundary: the manager's own failures
            log.exception("kernel %s: shutdown failed", kernel_id)
            outcome.error = f"shutdown failed: {e}"

    def _shutdown_wait(self) -> float:
        return float(getattr(self.km, "shutdown_wait_time", 0) or DEFAULT_SHUTDOWN_WAIT)

    async def _verify(self, record: KernelRecord, outcome: Outcome,
                      refused: dict[int, str]) -> None:
        """Bounded: until no process of the kernel lives and none of ours holds a GPU."""
        deadline = time.monotonic() + self.verify_timeout
        marker = (sweep.MARKER_ENV, record.marker)
        recorded = {pid for pid, _ in record.descendants} | {record.pid}
        while True:
            procs = await asyncio.to_thread(sweep.kernel_processes, record, self.ctx.guard)
            ours = [p for p in procs if p.pid not in refused]
            pids = recorded | {p.pid for p in procs}
            holding = set(await asyncio.to_thread(our_holders, pids, marker)) - set(refused)
            if (not ours and not holding) or time.monotonic() >= deadline:
                break
            if ours:  # a late fork, or one that escaped: sweep again
                await asyncio.to_thread(sweep.sweep_kernel, record, self.ctx.guard, self.grace)
            else:
                await asyncio.sleep(VERIFY_INTERVAL)  # the driver lags behind exits; bounded
        outcome.leftovers = await asyncio.to_thread(self._leftovers, procs, refused, holding)

    @staticmethod
    def _leftovers(procs: list[psutil.Process], refused: dict[int, str],
                   holding: set[int]) -> list[dict[str, Any]]:
        extra = []
        for pid in holding - {p.pid for p in procs}:
            try:
                extra.append(psutil.Process(pid))  # a zombie or a D-state process on the GPU
            except psutil.Error:
                continue
        return leftover_rows([*procs, *extra], refused, holding)

    async def _force(self, outcome: Outcome, extra: list[int]) -> None:
        """End the outcome's leftovers and ``extra`` (pids), under :func:`force_kill`'s rule."""
        procs = []
        for pid in dict.fromkeys([*(row["pid"] for row in outcome.leftovers), *extra]):
            try:
                procs.append(psutil.Process(pid))
            except psutil.Error:
                continue
        result = await asyncio.to_thread(force_kill, procs, self.ctx.guard, self.grace)
        outcome.forced = result.terminated + result.killed
        outcome.leftovers = await asyncio.to_thread(
            leftover_rows, [*procs, *result.survivors], {p.pid: "forced, survived" for p in procs})
        outcome.leftovers = [r for r in outcome.leftovers if r["pid"] not in outcome.forced]

    async def release_all(self, force: bool = False) -> dict[str, Any]:
        """Release every kernel, then whatever else says it descends from this server."""
        started = time.monotonic()
        kernel_ids = list(self.km.list_kernel_ids())
        outcomes = await asyncio.gather(*(self.release(k) for k in kernel_ids))
        stray = Outcome(None)
        result = await asyncio.to_thread(self._sweep_instance)
        stray.terminated, stray.killed = result.terminated, result.killed
        stray.leftovers = await asyncio.to_thread(
            leftover_rows, [*result.survivors, *result.refused], {})
        if force:  # what is left of the server's own processes; never a GPU holder of no kernel
            await self._force(stray, [])
        stray.foreign = await asyncio.to_thread(self._foreign_rows)
        # every process a kernel started stays in its cgroup: strays are all found if each
        # kernel had one (and it was emptied)
        stray.unverified = next((o.unverified for o in outcomes if o.unverified), "") \
            if self.ctx.cgroup else cgroups.NO_CGROUP
        everything = [*outcomes, stray]
        return {
            "released": all(o.released for o in everything) and not stray.foreign,
            "verified": all(o.verified for o in everything) and not stray.foreign,
            "unverified_reason": next((o.unverified for o in everything if o.unverified), ""),
            "seconds": round(time.monotonic() - started, 3),
            "kernels": [o.to_json() for o in outcomes],
            "stray": stray.to_json(),
        }

    def _sweep_instance(self) -> sweep.SweepResult:
        live = set(self.km.list_kernel_ids())
        result = sweep.SweepResult()
        for instance in sorted(self.ctx.instances()):  # adopted kernels carry their first server's
            procs = [p for p in sweep.iter_marked(INSTANCE_ENV, instance, self.ctx.guard.uid)
                     if sweep.environ_of(p).get(KERNEL_ID_ENV) not in live and sweep.alive(p)]
            safe, refused = sweep.split_safe(procs, self.ctx.guard, (INSTANCE_ENV, instance))
            part = sweep.terminate(safe, self.grace)
            part.refused = refused
            result.merge(part)
        return result

    def _foreign_rows(self) -> list[dict[str, Any]]:
        holders = _by_pid(gpu.query_holders())
        rows = []
        for proc in foreign_holders(set()):
            row = process_row(proc, holders.get(proc.pid, []))
            if row is not None:
                try:  # this user's own: the CLI names the command that ends it
                    row["forcible"] = proc.uids().real == self.ctx.guard.uid
                except psutil.Error:
                    continue
                rows.append(row)
        return rows
