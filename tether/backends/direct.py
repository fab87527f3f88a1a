"""A machine you SSH into: the server runs there, detached, on a 0600 Unix socket."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from tether import _ssh, bootstrap
from tether.backends import OnEvent, OnNote, Placement, Report
from tether.backends.ssh import OverSSH
from tether.contract import RestartResult
from tether.errors import RemoteEnvironmentError, TetherError
from tether.kernels import Kernels, RemoteKernels, ssh_runner

log = logging.getLogger(__name__)


@dataclass
class DirectHost(OverSSH):
    OPTIONS: ClassVar[frozenset[str]] = frozenset()
    WHAT: ClassVar[str] = "a server on that host"

    target: _ssh.SSHTarget
    opts: bootstrap.RemoteOptions
    attach: bool = False
    consent: bootstrap.Consent | None = None
    reused: bool = field(default=True, init=False)  # the last start found a running server

    @classmethod
    def create(cls, target: _ssh.SSHTarget, opts: bootstrap.RemoteOptions,
               options: Mapping[str, Any], attach: bool,
               consent: bootstrap.Consent | None) -> DirectHost:
        return cls(target, opts, attach=attach, consent=consent)

    @property
    def host(self) -> str:
        return self.target.host

    def flags(self) -> tuple[str, ...]:
        return ()

    def share(self, target: _ssh.SSHTarget) -> None:
        self.target = target

    async def start(self, on_event: OnEvent, on_note: OnNote) -> Placement:
        result = await bootstrap.up(self.target, self.opts, attach=self.attach, on_event=on_event,
                                    consent=self.consent)
        self.reused = result.reused
        return Placement(result, self.target)

    async def restart(self, token: str, on_event: OnEvent) -> Placement:
        sha = hashlib.sha256(token.encode()).hexdigest()
        result = await bootstrap.up(self.target, self.opts, token_sha256=sha, on_event=on_event)
        if result.server.token != token:
            raise RemoteEnvironmentError(f"could not start the server on {self.host} again",
                                         hint=f"Run `tether up {self.host}`.")
        return Placement(result, self.target)

    async def restart_server(self, on_event: OnEvent) -> RestartResult:
        return await bootstrap.restart(self.target, self.opts, on_event=on_event,
                                       consent=self.consent)

    async def socket_refused(self, on_event: OnEvent) -> Placement | None:
        """Restart the server we just started on a loopback port (never one we reused)."""
        if self.reused or self.opts.remote_port is not None:
            return None
        log.info("%s refuses socket forwarding; restarting its server on a loopback port",
                 self.host)
        await bootstrap.run_action(self.target, self.opts, "down")
        self.opts = replace(self.opts, remote_port=0)
        return Placement(await bootstrap.up(self.target, self.opts, on_event=on_event),
                         self.target)

    async def watch(self, info: dict[str, Any], on_note: OnNote) -> None:
        await asyncio.Event().wait()  # nothing beyond the tunnel's own probe to watch

    async def abandon(self) -> None:
        pass  # an interrupted preparation resumes on the next `up`; a server stays for attach

    def on_ctrl_c(self) -> str:
        return "Ctrl-C detaches: the server and kernels keep running on the remote."

    def leaving(self) -> str:
        return ""  # the server stays for `tether attach`

    def record(self) -> dict[str, Any]:
        return {}  # a host is what every command assumes

    async def stop(self) -> Report:
        result = await bootstrap.run_action(self.target, self.opts, "down")
        result.pop("event", None)
        return Report(result, *_down_lines(self.host, self.target, result))

    async def status(self) -> Report:
        result = await bootstrap.run_action(self.target, self.opts, "status")
        result.pop("event", None)
        return Report(result, _status_lines(self.host, result))

    async def running(self) -> str:
        servers = (await self.status()).data.get("servers") or []
        return f"pid {servers[0].get('pid')}" if servers else ""

    def kernels(self) -> Kernels:
        return RemoteKernels(self.host, ssh_runner(self.target))


def _down_lines(host: str, target: _ssh.SSHTarget,
                result: dict[str, Any]) -> tuple[tuple[str, ...], TetherError | None]:
    stopped, strays = result.get("stopped", []), result.get("strays", [])
    lines = []
    if not stopped and not strays:
        lines.append(f"No tether server was running on {host}.")
    else:
        lines.append(f"Stopped {len(stopped)} server(s) on {host} (pids "
                     f"{', '.join(map(str, stopped)) or '-'}); kernels shut down"
                     + (f"; {len(strays)} other process(es) of tether's ended." if strays
                        else "."))
    for stale in result.get("stale", []):
        lines.append(f"Removed a stale state file (pid {stale.get('pid')}: {stale.get('why')}).")
    if "purged" in result:
        freed = int(result["purged"].get("removed_bytes") or 0)
        kept = result["purged"].get("kept_for_jobs") or []
        if kept:
            lines.append(f"Removed tether's caches and logs on {host} ({freed / 2**20:.0f} MiB); "
                         f"kept the environment and the folders of {len(kept)} Slurm job(s) of "
                         f"yours still queued or running there "
                         f"(`{bootstrap.tether_command(target, 'down', '--slurm')}` ends them; "
                         "`--purge` again then removes the rest).")
        else:
            lines.append(f"Removed tether's environments, caches and logs on {host} "
                         f"({freed / 2**20:.0f} MiB): nothing of tether's is left there.")
    left = result.get("left", [])
    for row in left:
        lines.append(f"  still running: pid {row.get('pid')} {row.get('name')} "
                     f"({row.get('what')}): {row.get('why')}")
    problem = TetherError(f"{len(left)} process(es) of tether's could not be ended on {host} "
                          "(listed above)", hint=f"End them by hand (`ssh {host} kill PID`), or "
                                                 "reboot if they are stuck in the driver.") \
        if left else None
    return tuple(lines), problem


def _status_lines(host: str, result: dict[str, Any]) -> tuple[str, ...]:
    servers = result.get("servers", [])
    lines = []
    if result.get("disk_bytes") is not None:
        envs = result.get("envs") or []
        lines.append(f"{host}: {int(result['disk_bytes']) / 2**20:.0f} MiB used under "
                     f"{result.get('root')} ({len(envs)} environment"
                     f"{'s' if len(envs) != 1 else ''}{': ' + ', '.join(envs) if envs else ''}).")
    if not servers:
        lines.append(f"{host}: no tether server running "
                     f"(environment {'ready' if result.get('env_ready') else 'not prepared'}).")
    for s in servers:
        up_for = time.time() - float(s.get("started") or time.time())
        kernels = s.get("kernels") or []
        lines.append(f"{host}: server pid {s['pid']} (tether {s.get('version')}), up "
                     f"{up_for / 60:.0f} min, {len(kernels)} kernel(s), "
                     f"{'socket ' + s['sock'] if s.get('sock') else 'port ' + str(s.get('port'))}")
        for g in (s.get("resources") or {}).get("gpus", []):
            lines.append(f"  GPU {g.get('name')}: {int(g.get('memoryUsedBytes', 0)) >> 20} / "
                         f"{int(g.get('memoryTotalBytes', 0)) >> 20} MiB")
    return tuple(lines)
