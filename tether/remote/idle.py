"""Idleness: kernels released by a GPU-aware idle policy; the server stopped after a period
with no kernels, running a hook once.

Kernels: jupyter_server's culler counts only messages, so a training loop in a background thread
looks idle, and a notebook that finished hours ago keeps its GPU memory for the whole timeout.
:class:`KernelMonitor` takes over its knobs (``MappingKernelManager.cull_idle_timeout``,
``cull_busy``, ``cull_connected``) and samples every few seconds what each kernel's process tree
does on the GPUs: a kernel is busy while any of its processes uses a GPU, whatever its messages
say, and is never released then; an idle kernel that holds GPU memory is released after
``Tether.gpu_idle_timeout``, one that holds none after the general timeout. Every cull is the
verified release of the buttons and of ``tether release``, logged with what it freed.

The server: idle uses jupyter_server's own definition (``ServerApp.shutdown_no_activity``): no
kernels, no terminals or extension activity, and nothing on the API for the period. The hook (``--on-idle``) runs once, before the server stops: typically
powering off or deallocating the VM, e.g. on Azure with a managed identity::

    tether serve --stop-after-idle 900 \\
      --on-idle 'az login --identity && az vm deallocate -g MY_RG -n MY_VM --no-wait'
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol

from tornado.ioloop import PeriodicCallback

from tether.remote import gpu

log = logging.getLogger(__name__)

MAX_CHECK_INTERVAL = 60.0
HOOK_TIMEOUT = 600.0
OUTPUT_TAIL = 2000


def check_interval(period: float) -> float:
    return max(0.5, min(MAX_CHECK_INTERVAL, period / 4))


def idle_seconds(serverapp: Any) -> float:
    """Seconds the server has had no kernels and no activity (0 while it has any)."""
    if len(serverapp.kernel_manager) or serverapp.extension_manager.any_activity():
        return 0.0
    terminals = serverapp.web_app.settings.get("terminal_manager")
    if terminals is not None and getattr(terminals, "terminals", None):
        return 0.0
    last = serverapp.web_app.last_activity()
    return max(0.0, float((datetime.now(timezone.utc) - last).total_seconds()))


async def run_hook(command: str, idle_for: float, timeout: float = HOOK_TIMEOUT) -> int | None:
    """Run the user's ``--on-idle`` command (a shell line by design), bounded; its exit status."""
    env = {**os.environ, "TETHER_IDLE_SECONDS": str(int(idle_for))}
    proc = await asyncio.create_subprocess_exec(
        "/bin/sh", "-c", command, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        log.error("on-idle hook still running after %.0f s: killing it", timeout)
        proc.kill()
        await proc.wait()
        return None
    tail = out.decode(errors="replace")[-OUTPUT_TAIL:].strip()
    log.warning("on-idle hook exited with %s%s", proc.returncode, f": {tail}" if tail else "")
    return proc.returncode


class IdleWatcher:
    """Fires once when the server has been idle for ``period`` seconds: hook, then stop."""

    def __init__(self, serverapp: Any, period: float, on_idle: str = "",
                 spawn: Callable[[Any, str], None] | None = None) -> None:
        self.serverapp = serverapp
        self.period = period
        self.on_idle = on_idle
        self.fired = False
        self._spawn = spawn
        self._callback = PeriodicCallback(self.check, check_interval(period) * 1000)

    def start(self) -> None:
        log.info("the server stops after %.0f s with no kernels%s", self.period,
                 ", running the on-idle hook first" if self.on_idle else "")
        self._callback.start()

    def stop(self) -> None:
        self._callback.stop()

    def check(self) -> None:
        if self.fired:
            return
        idle = idle_seconds(self.serverapp)
        if idle < self.period:
            return
        self.fired = True
        self._callback.stop()
        log.warning("no kernels and no activity for %.0f s", idle)
        if self._spawn is not None:
            self._spawn(self.finish(idle), "on-idle")

    async def finish(self, idle: float) -> None:
        if self.on_idle:
            await run_hook(self.on_idle, idle)
        self.serverapp.stop()


# --- kernels: the GPU-aware idle policy ----------------------------------------------------------

SAMPLE_INTERVAL = 5.0  # seconds between samples of the GPUs and the kernels, at most
HISTORY_SECONDS = 600.0  # the page's sparklines: the last 10 minutes


@dataclass(frozen=True)
class IdlePolicy:
    """When an idle kernel is released; a timeout of 0 turns that one off."""

    idle_timeout: float  # kernels that hold no GPU memory (jupyter's cull_idle_timeout)
    gpu_idle_timeout: float  # kernels that hold some: sooner
    cull_busy: bool = False
    cull_connected: bool = False

    @property
    def interval(self) -> float:
        timeouts = [t for t in (self.idle_timeout, self.gpu_idle_timeout) if t > 0]
        return max(0.5, min(SAMPLE_INTERVAL, min(timeouts) / 4)) if timeouts else SAMPLE_INTERVAL

    def timeout_for(self, holds_gpu: bool) -> float:
        if holds_gpu and self.gpu_idle_timeout > 0:
            return self.gpu_idle_timeout
        return self.idle_timeout


@dataclass(frozen=True)
class KernelFacts:
    """What the policy looks at, for one kernel (times in epoch seconds)."""

    state: str  # jupyter's execution_state
    connections: int
    last_activity: float
    holds_gpu: bool  # memory or an open device on a GPU, anywhere in its process tree
    gpu_busy: bool  # a process of its tree used a GPU in the last sample
    gpu_busy_at: float = 0.0  # when one last did
    util_known: bool = True  # False: no per-process utilisation on this machine


@dataclass(frozen=True)
class Verdict:
    """``release_at`` (epoch seconds) if the kernel stays idle, None if it is kept; and why."""

    reason: str
    timeout: float
    release_at: float | None = None

    def due(self, now: float) -> bool:
        return self.release_at is not None and now >= self.release_at

    def to_json(self, now: float) -> dict[str, Any]:
        left = None if self.release_at is None else max(0.0, self.release_at - now)
        return {"reason": self.reason, "timeout": self.timeout, "release_at": self.release_at,
                "release_in": None if left is None else round(left, 1)}


def decide(policy: IdlePolicy, facts: KernelFacts, now: float) -> Verdict:
    """The idle policy, for one kernel: a pure function of what was sampled."""
    # a holder whose GPU use cannot be seen might be training: never sooner than the general one
    timeout = policy.timeout_for(facts.holds_gpu and facts.util_known)
    if timeout <= 0:
        return Verdict("no idle timeout", 0.0)
    if facts.state == "dead":
        return Verdict("dead", timeout, now)
    if facts.gpu_busy:
        return Verdict("using a GPU", timeout)
    if facts.state == "busy" and not policy.cull_busy:
        return Verdict("busy", timeout)
    if facts.connections and not policy.cull_connected:
        return Verdict("open in a browser tab", timeout)
    since = max(facts.last_activity, facts.gpu_busy_at)
    gpu_rule = facts.holds_gpu and facts.util_known and policy.gpu_idle_timeout > 0
    return Verdict("idle, holding GPU memory" if gpu_rule else "idle", timeout, since + timeout)


class Inventory(Protocol):
    """What the monitor needs of the server's life cycle (``tether.remote.api.Lifecycle``)."""

    async def snapshot(self, max_age: float = 0.0) -> dict[str, Any]: ...

    async def release_logged(self, kernel_id: str, reason: str) -> dict[str, Any]: ...

    def kernel_facts(self, snapshot: dict[str, Any]) -> dict[str, KernelFacts]: ...


def holds_gpu(processes: list[dict[str, Any]]) -> bool:
    return any(p.get("gpus") or p.get("gpu_memory") for p in processes)


class KernelMonitor:
    """Samples the GPUs and the kernels every few seconds; releases those the policy says are due.

    Keeps what the page shows besides: the last 10 minutes of each GPU's utilisation and memory,
    and each process's latest GPU utilisation.
    """

    def __init__(self, lifecycle: Inventory, policy: IdlePolicy,
                 spawn: Callable[[Coroutine[Any, Any, Any], str], None]) -> None:
        self.lifecycle = lifecycle
        self.policy = policy
        self.interval = policy.interval
        self.history: deque[dict[str, Any]] = deque(maxlen=int(HISTORY_SECONDS / self.interval))
        self.util: dict[int, int] | None = None  # pid -> percent; None: cannot be known here
        self.gpu_busy_at: dict[str, float] = {}
        self._util_since = time.time()
        self._releasing: set[str] = set()
        self._spawn = spawn
        self._callback = PeriodicCallback(self.tick, self.interval * 1000)

    def start(self) -> None:
        log.info("idle kernels are released after %.0f s, %.0f s when they hold GPU memory "
                 "(0: never); sampling every %.1f s", self.policy.idle_timeout,
                 self.policy.gpu_idle_timeout, self.interval)
        self._callback.start()

    def stop(self) -> None:
        self._callback.stop()

    async def tick(self) -> None:
        # tornado skips a tick while the previous one still runs: no overlap, no pile-up
        try:
            snapshot = await self.sample()
            self.cull(snapshot, time.time())
        except Exception:  # the documented boundary: one failed sample must not end the culler
            log.exception("idle check failed; trying again in %.1f s", self.interval)

    async def sample(self) -> dict[str, Any]:
        since, self._util_since = self._util_since, time.time()
        util = await asyncio.to_thread(gpu.query_process_util, since)
        self.util = None if util is None else _busiest(util)
        # shared with the pages refreshing meanwhile: one inventory serves both
        snapshot = await self.lifecycle.snapshot(max_age=min(1.0, self.interval / 2))
        now = time.time()
        for kid, rows in snapshot["kernels"].items():
            if any(self.util and self.util.get(p["pid"], 0) > 0 for p in rows):
                self.gpu_busy_at[kid] = now
        for kid in set(self.gpu_busy_at) - set(snapshot["kernels"]):
            del self.gpu_busy_at[kid]
        if snapshot["gpus"]:
            self.history.append({"t": round(now, 1),
                                 "utilization": [g["utilization"] for g in snapshot["gpus"]],
                                 "memory_used": [g["memory_used"] for g in snapshot["gpus"]]})
        return snapshot

    def verdicts(self, snapshot: dict[str, Any], now: float) -> dict[str, Verdict]:
        facts = self.lifecycle.kernel_facts(snapshot)
        return {kid: decide(self.policy, f, now) for kid, f in facts.items()}

    def cull(self, snapshot: dict[str, Any], now: float) -> None:
        for kid, verdict in self.verdicts(snapshot, now).items():
            if verdict.due(now) and kid not in self._releasing:
                self._releasing.add(kid)
                self._spawn(self._release(kid, verdict), f"idle release {kid}")

    async def _release(self, kernel_id: str, verdict: Verdict) -> None:
        try:
            await self.lifecycle.release_logged(
                kernel_id, f"{verdict.reason} for {verdict.timeout:.0f} s")
        finally:
            self._releasing.discard(kernel_id)

    def gpu_utilization(self, processes: list[dict[str, Any]]) -> int | None:
        """The busiest GPU use among these processes, in percent; None where unknown."""
        if self.util is None:
            return None
        return max((self.util.get(p["pid"], 0) for p in processes), default=0)


def _busiest(samples: list[gpu.ProcessUtil]) -> dict[int, int]:
    found: dict[int, int] = {}
    for s in samples:
        found[s.pid] = max(found.get(s.pid, 0), s.sm, s.memory)
    return found
