"""Server idleness: stop the server, and run a hook once, after a period with no kernels.

Idle uses jupyter_server's own definition (``ServerApp.shutdown_no_activity``): no kernels, no
terminals or extension activity, and nothing on the API for the period. Idle kernels themselves
go through jupyter_server's culler (``MappingKernelManager.cull_idle_timeout``), whose shutdowns
our provisioner sweeps. The hook (``--on-idle``) runs once, before the server stops: typically
powering off or deallocating the VM, e.g. on Azure with a managed identity::

    tether serve --stop-after-idle 900 \\
      --on-idle 'az login --identity && az vm deallocate -g MY_RG -n MY_VM --no-wait'
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from tornado.ioloop import PeriodicCallback

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
