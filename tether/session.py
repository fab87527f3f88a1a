"""The one orchestrator of ``tether up``: bootstrap -> server -> tunnel -> status.

Library code: it reports through a :class:`Reporter` and raises :mod:`tether.errors`; the CLI
prints. ``up`` runs until cancelled (Ctrl-C detaches: the remote server and kernels stay up).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tether import _http, _ssh, bootstrap
from tether.config import DEFAULT_PORT
from tether.errors import RemoteEnvironmentError, SSHError, TetherError, TunnelError
from tether.tunnel import Forward, State, Status, Tunnel, check_local_port, free_port

log = logging.getLogger(__name__)

STATUS_INTERVAL = 2.0
STATUS_TIMEOUT = 5.0


@dataclass(frozen=True)
class UpConfig:
    """One host of ``tether up``/``attach``: where, which local port, and the remote options."""

    target: _ssh.SSHTarget
    local_port: int = DEFAULT_PORT
    remote: bootstrap.RemoteOptions = field(default_factory=bootstrap.RemoteOptions)
    attach: bool = False


@dataclass(frozen=True)
class Runtime:
    """What the user pastes into Colab, and where it leads."""

    host: str
    local_port: int
    token: str = field(repr=False)
    server: dict[str, Any]
    reused: bool
    warnings: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.local_port}/"

    @property
    def colab_url(self) -> str:
        return f"{self.url}?token={self.token}"

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "url": self.url, "colab_url": self.colab_url,
                "token": self.token, "port": self.local_port, "reused": self.reused,
                "remote_pid": self.server.get("pid"), "remote_sock": self.server.get("sock"),
                "remote_port": self.server.get("port"), "version": self.server.get("version"),
                "warnings": list(self.warnings)}


@dataclass(frozen=True)
class Live:
    """The live status line of one host."""

    tunnel: Status
    kernels: int | None = None
    gpu_used: int | None = None
    gpu_total: int | None = None


class Reporter(Protocol):
    def event(self, host: str, event: dict[str, Any]) -> None: ...
    def ready(self, runtime: Runtime) -> None: ...
    def live(self, host: str, live: Live) -> None: ...


async def up(cfg: UpConfig, reporter: Reporter) -> None:
    """Prepare, start or find the server, open the tunnel, report, and supervise until cancelled."""
    check_local_port(cfg.local_port)  # fail before any SSH round trip
    host = cfg.target.host
    result = await bootstrap.up(cfg.target, cfg.remote, attach=cfg.attach,
                                on_event=lambda e: reporter.event(host, e))
    tunnel, result, remote = await _open(cfg, result, reporter)
    tunnel.restart_server = lambda: _restart(cfg.target, remote, result["server"]["token"],
                                             cfg.local_port, reporter)
    runtime = Runtime(host, cfg.local_port, result["server"]["token"], result["server"],
                      bool(result.get("reused")), tuple(result.get("warnings", ())))
    try:
        reporter.ready(runtime)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(tunnel.run())
            tg.create_task(_watch(runtime, tunnel, reporter))
    finally:
        await tunnel.aclose()


async def _open(cfg: UpConfig, result: dict[str, Any], reporter: Reporter
                ) -> tuple[Tunnel, dict[str, Any], bootstrap.RemoteOptions]:
    """The first tunnel; falls back to a loopback port where sshd refuses socket forwarding."""
    host = cfg.target.host
    remote = cfg.remote
    tunnel = _tunnel(cfg, result, reporter)
    t0 = time.monotonic()
    reporter.event(host, {"event": "step", "key": "tunnel", "state": "start",
                          "label": f"opening the tunnel on 127.0.0.1:{cfg.local_port}"})
    try:
        await tunnel.open()
    except TunnelError as e:
        socket_refused = bool(e.data.get("socket_refused"))
        if not (socket_refused and not result.get("reused") and cfg.remote.remote_port is None):
            raise
        log.info("%s refuses socket forwarding; restarting its server on a loopback port", host)
        await bootstrap.call_agent(cfg.target, cfg.remote, "down")
        remote = bootstrap.RemoteOptions(**{**remote.__dict__, "remote_port": 0})
        result = await bootstrap.up(cfg.target, remote, on_event=lambda ev: reporter.event(host, ev))
        tunnel = _tunnel(cfg, result, reporter)
        await tunnel.open()
    reporter.event(host, {"event": "step", "key": "tunnel", "state": "done",
                          "label": f"opening the tunnel on 127.0.0.1:{cfg.local_port}",
                          "seconds": round(time.monotonic() - t0, 2)})
    return tunnel, result, remote


async def _restart(target: _ssh.SSHTarget, remote: bootstrap.RemoteOptions, token: str,
                   local_port: int, reporter: Reporter) -> Forward:
    """The server behind the tunnel is gone: start it again with the same token (same URL)."""
    sha = hashlib.sha256(token.encode()).hexdigest()
    result = await bootstrap.call_agent(target, remote, "up", token_sha256=sha,
                                        on_event=lambda e: reporter.event(target.host, e))
    server = result.get("server")
    if not server or server.get("token") != token:
        raise RemoteEnvironmentError(f"could not start the server on {target.host} again",
                                     hint=f"Run `tether up {target.host}`.")
    log.info("server on %s restarted (pid %s)", target.host, server.get("pid"))
    return Forward(local_port, server.get("sock") or "", int(server.get("port") or 0))


def _tunnel(cfg: UpConfig, result: dict[str, Any], reporter: Reporter) -> Tunnel:
    server = result["server"]
    forward = Forward(cfg.local_port, server.get("sock") or "", int(server.get("port") or 0))
    return Tunnel(cfg.target, forward, server["token"],
                  on_status=lambda s: reporter.live(cfg.target.host, Live(s)))


async def _watch(runtime: Runtime, tunnel: Tunnel, reporter: Reporter) -> None:
    """Every few seconds, kernels and GPU memory through the tunnel, for the status line.

    Only reports: the tunnel's own health probe decides when the forward is down.
    """
    while True:
        await asyncio.sleep(STATUS_INTERVAL)
        if tunnel.status.state is not State.UP:
            continue
        live = await live_status(runtime, tunnel.status)
        reporter.live(runtime.host, live or Live(tunnel.status))


async def live_status(runtime: Runtime, status: Status) -> Live | None:
    """Kernels and GPU memory through the tunnel; None when the server does not answer.

    ``/tether/api/kernels`` is not counted as activity: a terminal left attached does not keep
    an idle server (``--stop-after-idle``) alive.
    """
    try:
        reply = await _http.get(runtime.local_port, "/tether/api/kernels", runtime.token,
                                timeout=STATUS_TIMEOUT)
    except _http.NoAnswer as e:
        log.debug("status of %s failed: %s", runtime.host, e)
        return None
    if reply.code != 200 or not isinstance(reply.body, dict):
        return None
    kernels, gpus = reply.body.get("kernels"), reply.body.get("gpus") or []
    used = sum(int(g.get("memory_used") or 0) for g in gpus) if gpus else None
    total = sum(int(g.get("memory_total") or 0) for g in gpus) if gpus else None
    return Live(status, len(kernels) if isinstance(kernels, list) else None, used, total)


async def up_many(configs: Sequence[UpConfig], reporter: Reporter) -> None:
    """Several hosts at once, each with its own local port; one failing stops them all."""
    ports = [c.local_port for c in configs]
    if len(set(ports)) != len(ports):
        raise TetherError("two hosts were given the same local port", hint="Use distinct --port.")
    async with asyncio.TaskGroup() as tg:
        for cfg in configs:
            tg.create_task(up(cfg, reporter))


async def down(target: _ssh.SSHTarget, opts: bootstrap.RemoteOptions) -> dict[str, Any]:
    """Shut down the remote server and kernels; report what was stopped and what is left."""
    return await bootstrap.call_agent(target, opts, "down")


async def status(target: _ssh.SSHTarget, opts: bootstrap.RemoteOptions) -> dict[str, Any]:
    return await bootstrap.call_agent(target, opts, "status")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str = ""
    hint: str = ""


async def doctor(target: _ssh.SSHTarget, opts: bootstrap.RemoteOptions,
                 local_port: int) -> list[Check]:
    """SSH, Python, disk, GPU driver, environment, ports, then Colab's requests via a tunnel."""
    checks: list[Check] = []
    t0 = time.monotonic()
    try:
        probe = await bootstrap.call_agent(target, opts, "probe")
    except SSHError as e:
        return [Check("ssh", False, e.message, e.hint)]
    except TetherError as e:
        return [Check("ssh", True, f"{time.monotonic() - t0:.2f} s"),
                Check("python", False, e.message, e.hint)]
    checks.append(Check("ssh", True, f"{target.host} answered in {time.monotonic() - t0:.2f} s"))
    checks += _probe_checks(target.host, probe)
    checks.append(await _port_check(local_port))
    servers = probe.get("servers", [])
    checks.append(Check("server", bool(servers),
                        f"pid {servers[0]['pid']}" if servers else "no server running",
                        f"Start one with `tether up {target.host}`."))
    if servers:
        checks += await _replay_checks(target, opts)
    return checks


def _probe_checks(host: str, probe: dict[str, Any]) -> list[Check]:
    free_gib = probe.get("free_bytes", 0) / (1 << 30)
    gpus = probe.get("gpus") or []
    if not probe.get("nvidia_smi"):
        gpu = Check("gpu driver", True, "no nvidia-smi: no NVIDIA GPU or driver (CPU only)")
    elif probe.get("error"):
        gpu = Check("gpu driver", False, f"nvidia-smi failed: {probe['error']}",
                    "Check the driver: `nvidia-smi` on the remote must list the GPUs.")
    else:
        names = ", ".join(f"{g['name']} ({g['memory_total_mib']} MiB)" for g in gpus)
        gpu = Check("gpu driver", True, f"driver {gpus[0]['driver'] if gpus else '?'}: {names}")
    return [
        Check("python", bool(probe.get("python_ok")),
              f"{probe.get('python')} {probe.get('python_version')} on {probe.get('os')} "
              f"{probe.get('machine')}", probe.get("python_error", "")),
        Check("disk", free_gib >= 1, f"{free_gib:.1f} GiB free under {probe.get('root')}",
              "Free at least 1 GiB on the remote."),
        gpu,
        Check("environment", bool(probe.get("env_ready")), str(probe.get("env")),
              f"`tether up {host}` prepares it."),
    ]


async def _port_check(port: int) -> Check:
    try:
        check_local_port(port)
    except TetherError:
        return Check("local port", True, f"127.0.0.1:{port} is in use (a running `tether up`?)")
    return Check("local port", True, f"127.0.0.1:{port} is free")


async def _replay_checks(target: _ssh.SSHTarget, opts: bootstrap.RemoteOptions) -> list[Check]:
    from tether.replay import replay

    result = await bootstrap.call_agent(target, opts, "up", attach=True)
    server = result["server"]
    forward = Forward(free_port(), server.get("sock") or "", int(server.get("port") or 0))
    tunnel = Tunnel(target, forward, server["token"])
    try:
        await tunnel.open()
    except TetherError as e:
        return [Check("tunnel", False, e.message, e.hint)]
    try:
        found = await replay(f"http://127.0.0.1:{forward.local_port}", server["token"])
    finally:
        await tunnel.aclose()
    return [Check("tunnel", True, forward.spec)] + [Check(c.name, c.ok, c.detail, c.hint)
                                                    for c in found]
