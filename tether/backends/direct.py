"""A machine you SSH into: the server runs there, detached, on a 0600 Unix socket."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass, field, replace
from typing import Any

from tether import _ssh, bootstrap
from tether.backends import OnEvent, OnNote, Placement
from tether.contract import RestartResult
from tether.errors import RemoteEnvironmentError
from tether.kernels import Kernels, RemoteKernels, ssh_runner

log = logging.getLogger(__name__)


@dataclass
class DirectHost:
    target: _ssh.SSHTarget
    opts: bootstrap.RemoteOptions
    attach: bool = False
    consent: bootstrap.Consent | None = None
    reused: bool = field(default=True, init=False)  # the last start found a running server

    @property
    def host(self) -> str:
        return self.target.host

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

    def record(self) -> dict[str, Any]:
        return {}  # a host is what every command assumes

    async def stop(self) -> dict[str, Any]:
        return await bootstrap.run_action(self.target, self.opts, "down")

    async def status(self) -> dict[str, Any]:
        return await bootstrap.run_action(self.target, self.opts, "status")

    async def running(self) -> str:
        servers = (await self.status()).get("servers") or []
        return f"pid {servers[0].get('pid')}" if servers else ""

    def kernels(self) -> Kernels:
        return RemoteKernels(self.host, ssh_runner(self.target))
