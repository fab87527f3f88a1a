"""The one orchestrator of ``tether up``: backend (prepare, start) -> tunnel -> status.

Library code: it reports through a :class:`Reporter` and raises :mod:`tether.errors`; the CLI
prints. ``up`` runs until cancelled; where the runtime runs is the backend's business
(:mod:`tether.backends`): a host's server stays up when ``up`` ends, a Slurm job goes unless
kept.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tether import _http, bootstrap, identity
from tether._private import private_dir, write_private
from tether.backends import Backend, Forwarder, Link, Placement, Report
from tether.bootstrap import ServerInfo
from tether.config import DEFAULT_PORT
from tether.errors import ConfigError, PortInUseError, SSHError, TetherError, TunnelError
from tether.tunnel import Forward, State, Status, check_local_port, free_port

log = logging.getLogger(__name__)

STATUS_INTERVAL = 2.0
STATUS_TIMEOUT = 5.0
ABANDON_DEADLINE = 60.0  # undoing what must not outlive `up` (cancelling a Slurm job)
# Imported where first used, and loaded by `up` in a thread while ssh logs in, so the CLI
# reaches the login ~0.1 s sooner and pays for them during a wait: the HTTP client that
# checks the URL, psutil (the attached record), the package metadata (the wheel's id).
LOADED_LATE = ("tornado.simple_httpclient", "psutil", "importlib.metadata")


@dataclass(frozen=True)
class UpConfig:
    """One runtime of ``tether up``/``attach``: where it runs, which local port, and the
    user's extra forwards (local port, remote port), carried by the same tunnel."""

    backend: Backend
    local_port: int = DEFAULT_PORT
    forwards: tuple[tuple[int, int], ...] = ()


@dataclass
class Runtime:
    """What the user pastes into Colab, and where it leads (the server may be replaced by a new
    one on the same URL after a crash)."""

    host: str
    local_port: int
    server: ServerInfo
    reused: bool
    warnings: tuple[str, ...] = ()
    on_ctrl_c: str = ""  # what Ctrl-C does to it (the backend says)
    forwards: tuple[tuple[int, int], ...] = ()  # the user's extra (local, remote) ports

    # kernel id -> notebook, as last seen through the tunnel: who was lost if the server dies
    seen: dict[str, str] = field(default_factory=dict, compare=False)
    # what the backend adds to the status line (a Slurm job's id and time left)
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def token(self) -> str:
        return self.server.token

    @property
    def kernels_seen(self) -> list[str]:
        return [path or kid[:8] for kid, path in self.seen.items()]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.local_port}/"

    @property
    def colab_url(self) -> str:
        return f"{self.url}?token={self.token}"

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "url": self.url, "colab_url": self.colab_url,
                "token": self.token, "port": self.local_port, "reused": self.reused,
                "remote_pid": self.server.pid, "remote_sock": self.server.sock,
                "remote_port": self.server.port, "version": self.server.version,
                "warnings": list(self.warnings), "on_ctrl_c": self.on_ctrl_c,
                "forwards": [{"local": f"http://127.0.0.1:{local}/", "remote_port": remote}
                             for local, remote in self.forwards]}


@dataclass(frozen=True)
class Live:
    """The live status line of one host."""

    tunnel: Status
    kernels: int | None = None
    gpu_used: int | None = None
    gpu_total: int | None = None


class Reporter(Protocol):
    # what the reporter imports for its first print, loaded while ssh logs in (see LOADED_LATE)
    modules: tuple[str, ...]

    def event(self, host: str, event: dict[str, Any]) -> None: ...
    def ready(self, runtime: Runtime) -> None: ...
    def live(self, host: str, live: Live) -> None: ...
    def note(self, host: str, text: str) -> None: ...


async def up(cfg: UpConfig, reporter: Reporter) -> None:
    """Prepare, start or find the server, open the tunnel, report, and supervise until cancelled.

    One connection to the host for all of it (the backend's :meth:`~Backend.link`), ended
    with ``up``.
    """
    check_ports(cfg)  # fail before any SSH round trip
    host = cfg.backend.host
    link = cfg.backend.link(_on_prompt(host, reporter))
    try:
        loading = asyncio.create_task(asyncio.to_thread(load, (*LOADED_LATE, *reporter.modules)))
        try:
            notes = await link.start()
        finally:
            await asyncio.wait({loading})  # (bounded: then no other thread imports)
        for note in notes:
            reporter.note(host, note)
        await _up(cfg, reporter)
    finally:
        await link.aclose()  # bounded; the last, after the forward and a job are gone


def load(modules: Sequence[str]) -> None:
    """Import ``modules`` (in a worker thread while ssh logs in: see :data:`LOADED_LATE`)."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:  # the first real use says so
            log.debug("cannot import %s", name, exc_info=True)


def check_ports(cfg: UpConfig) -> None:
    """Every local port ``up`` will listen on is free (the server's, then each --forward's)."""
    check_local_port(cfg.local_port)
    locals_ = [cfg.local_port, *(local for local, _ in cfg.forwards)]
    if len(set(locals_)) != len(locals_):
        raise ConfigError("two forwards use the same local port",
                          hint="Give each --forward REMOTE:LOCAL its own LOCAL, other than "
                               "--port.")
    for local, remote in cfg.forwards:
        try:
            check_local_port(local)
        except PortInUseError as e:
            raise PortInUseError(f"--forward {remote}:{local}: local port {local} is already "
                                 "in use", hint=f"Pick a free one: --forward {remote}:LOCAL.",
                                 port=local) from e


def _on_prompt(host: str, reporter: Reporter) -> Callable[[bool], None]:
    """The progress line pauses while the connection asks the user something."""
    def on_prompt(waiting: bool) -> None:
        reporter.event(host, {"event": "prompt", "state": "start" if waiting else "done"})

    return on_prompt


async def _up(cfg: UpConfig, reporter: Reporter) -> None:
    backend = cfg.backend
    host = backend.host
    try:
        placement = await backend.start(lambda e: reporter.event(host, e),
                                        lambda text: reporter.note(host, text))
        tunnel, placement = await _open(cfg, placement, reporter)
    except BaseException:
        await _bounded(backend.abandon(), host)
        raise
    result = placement.result
    runtime = Runtime(host, cfg.local_port, result.server, result.reused, result.warnings,
                      backend.on_ctrl_c(), forwards=cfg.forwards)
    tunnel.restart_server = lambda: _restart(backend, runtime, reporter)
    record = attached_path(host)
    try:
        _write_private(record, {"host": host, "port": cfg.local_port, "pid": os.getpid(),
                                "start": _start(os.getpid()), "boot_id": identity.boot_id()})
        reporter.ready(runtime)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(tunnel.run())
            tg.create_task(_watch(runtime, tunnel, reporter))
            tg.create_task(backend.watch(runtime.info, lambda text: reporter.note(host, text)))
    finally:
        record.unlink(missing_ok=True)
        await tunnel.aclose()
        await _bounded(backend.abandon(), host)


async def _bounded(step: Awaitable[None], host: str) -> None:
    """A clean-up step on the way out: bounded, and never hiding why we are leaving."""
    try:
        await asyncio.wait_for(step, ABANDON_DEADLINE)
    except (TetherError, asyncio.TimeoutError) as e:
        log.warning("cleaning up on %s failed: %s", host, e)


# -- what runs here: the local port each attached `tether up` holds, for `tether doctor` -------

def local_state_dir(create: bool = False) -> Path:
    """``$XDG_RUNTIME_DIR/tether-local``, else ``~/.cache/tether/tether-local``; ``create``:
    made (or tightened) 0700, and so is ``~/.cache/tether`` above it."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    top = Path(runtime or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tether"))
    path = top / "tether-local"
    return private_dir(path, None if runtime else top) if create else path


def host_file(kind: str, host: str) -> Path:
    """The laptop's file of ``kind`` about ``host`` (``up``: the attached `up`; ``runtime``:
    what `up` recorded, :mod:`tether.runtimes`)."""
    return local_state_dir() / f"{kind}-{hashlib.sha256(host.encode()).hexdigest()[:16]}.json"


def attached_path(host: str) -> Path:
    return host_file("up", host)


def _start(pid: int) -> float:
    import psutil

    try:
        return identity.started(psutil.Process(pid))
    except psutil.Error:
        return 0.0


def _write_private(path: Path, data: dict[str, Any]) -> None:
    local_state_dir(create=True)
    write_private(path, json.dumps(data))


def attached_port(host: str) -> int | None:
    """The local port of the `tether up` attached to ``host`` right now (None if there is none;
    a record whose process is gone or was replaced by another with its pid is removed)."""
    path = attached_path(host)
    try:
        data = json.loads(path.read_text())
        pid, port = int(data["pid"]), int(data["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if data.get("boot_id") != identity.boot_id() \
            or not identity.same_start(_start(pid), float(data.get("start") or -1)):
        path.unlink(missing_ok=True)
        return None
    return port


async def _open(cfg: UpConfig, placement: Placement,
                reporter: Reporter) -> tuple[Forwarder, Placement]:
    """The first tunnel; where sshd refuses socket forwarding, the backend may move the server
    to a loopback port."""
    host = cfg.backend.host
    tunnel = _tunnel(cfg, placement, reporter)
    t0 = time.monotonic()
    label = f"opening the tunnel on 127.0.0.1:{cfg.local_port}"
    reporter.event(host, {"event": "step", "key": "tunnel", "state": "start", "label": label})
    try:
        await tunnel.open()
    except TunnelError as e:
        moved = None
        if e.data.get("socket_refused"):
            moved = await cfg.backend.socket_refused(lambda ev: reporter.event(host, ev))
        if moved is None:
            raise
        placement = moved
        tunnel = _tunnel(cfg, placement, reporter)
        await tunnel.open()
    reporter.event(host, {"event": "step", "key": "tunnel", "state": "done", "label": label,
                          "seconds": round(time.monotonic() - t0, 2)})
    return tunnel, placement


async def _restart(backend: Backend, runtime: Runtime, reporter: Reporter) -> Forward:
    """The server behind the tunnel is gone: start it again with the same token (same URL).

    A server that had died (crash, kill, reboot) took its kernels with it: the user is told
    which, since the URL that comes back is the same.
    """
    host = backend.host
    placement = await backend.restart(runtime.token, lambda e: reporter.event(host, e))
    server = placement.result.server
    if server.pid != runtime.server.pid or server.instance != runtime.server.instance:
        reporter.note(host, f"the server on {host} had stopped (pid {runtime.server.pid}) and "
                            f"was started again on the same URL; {kernels_fate(runtime, server)}.")
        runtime.seen = {k: v for k, v in runtime.seen.items() if k in server.adopted}
        runtime.server = server
    log.info("server on %s restarted (pid %s)", host, server.pid)
    return placement.forward(runtime.local_port)


def kernels_fate(runtime: Runtime, server: ServerInfo) -> str:
    """What became of the kernels seen before the server was replaced (a new server adopts
    those still alive: tether.remote.adopt)."""
    kept = [path or kid[:8] for kid, path in runtime.seen.items() if kid in server.adopted]
    lost = [path or kid[:8] for kid, path in runtime.seen.items() if kid not in server.adopted]
    lost += [name for name in server.lost if name not in lost]
    parts = []
    if kept or server.adopted:
        parts.append(f"its kernels kept running ({', '.join(kept)})" if kept
                     else f"{len(server.adopted)} kernel(s) kept running")
    if lost:
        parts.append(f"kernels lost: {', '.join(lost)}")
    return "; ".join(parts) or "no kernel was running"


def _tunnel(cfg: UpConfig, placement: Placement, reporter: Reporter) -> Forwarder:
    host = cfg.backend.host
    return cfg.backend.forwarder(placement, cfg.local_port, placement.result.server.token,
                                 cfg.forwards, on_status=lambda s: reporter.live(host, Live(s)))


async def _watch(runtime: Runtime, tunnel: Forwarder, reporter: Reporter) -> None:
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
    if isinstance(kernels, list):  # who would be lost if the server died
        runtime.seen.clear()
        runtime.seen.update({str(k.get("id")): str(k.get("path") or "") for k in kernels
                             if isinstance(k, dict)})
    used = sum(int(g.get("memory_used") or 0) for g in gpus) if gpus else None
    total = sum(int(g.get("memory_total") or 0) for g in gpus) if gpus else None
    return Live(status, len(kernels) if isinstance(kernels, list) else None, used, total)


async def up_many(configs: Sequence[UpConfig], reporter: Reporter) -> None:
    """Several hosts at once, each with its own local port; one failing stops them all."""
    ports = [c.local_port for c in configs]
    if len(set(ports)) != len(ports):
        raise ConfigError("two hosts were given the same local port",
                          hint="Give each host its own --port.")
    async with asyncio.TaskGroup() as tg:
        for cfg in configs:
            tg.create_task(up(cfg, reporter))


async def down(backend: Backend) -> Report:
    """End the runtime; report what was stopped and what is left."""
    return await backend.stop()


async def status(backend: Backend) -> Report:
    return await backend.status()


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str = ""
    hint: str = ""
    warn: bool = False  # works, with a limit the user may want to lift (the hint says how)


async def doctor(backend: Backend, local_port: int | None,
                 up_command: str = "") -> list[Check]:
    """SSH, Python, disk, GPU driver, environment, ports, then Colab's requests via a tunnel.

    ``backend`` logs in to the host (a VM, or a cluster's login node) and finds the running
    runtime there (in attach mode: the doctor starts nothing). ``up_command`` is the
    `tether up` line for this host that fixes can name.
    """
    link = backend.link(lambda waiting: None)
    try:
        t0 = time.monotonic()
        try:
            await link.start()
        except SSHError as e:
            return [Check("ssh", False, e.message, e.hint)]
        return await _doctor(backend, link, local_port, up_command, t0)
    finally:
        await link.aclose()


async def _doctor(backend: Backend, link: Link, local_port: int | None, up_command: str,
                  t0: float) -> list[Check]:
    host = backend.host
    checks: list[Check] = []
    try:
        probe = await backend.probe()
    except SSHError as e:
        return [Check("ssh", False, e.message, e.hint)]
    except TetherError as e:
        return [Check("ssh", True, f"{time.monotonic() - t0:.2f} s"),
                Check("python", False, e.message, e.hint)]
    checks.append(Check("ssh", True, f"{host} answered in {time.monotonic() - t0:.2f} s"))
    detail, _ = await link.auth()
    checks.append(Check("auth", True, detail))
    checks += _probe_checks(host, probe,
                            up_command or bootstrap.tether_command(backend.target, "up"))
    checks.append(_port_check(host, local_port))
    try:
        running = await backend.running()
    except TetherError as e:
        return [*checks, Check("server", False, e.message, e.hint)]
    checks.append(Check("server", bool(running), running or "no server running",
                        f"Start one with `{up_command or 'tether up ' + host}`."))
    if running:
        checks += await _replay_checks(backend)
    return checks


def _disk_check(host: str, probe: dict[str, Any], up_command: str) -> Check:
    """Room for tether's files, and a folder it can write: a read-only home has free space."""
    problem = probe.get("root_problem")
    if not isinstance(problem, dict):
        free = int(probe.get("free_bytes") or 0)
        return Check("disk", True, f"{free / (1 << 30):.1f} GiB free under {probe.get('root')}")
    fix = str(problem.get("cache_fix") or "")
    if problem.get("kind") in bootstrap.CACHE_KINDS or fix:
        hint = bootstrap.cache_hint(up_command, host, fix)
    else:
        hint = str(problem.get("hint") or "")
    return Check("disk", False, str(problem.get("message", "")).replace("HOST", host),
                 hint.replace("HOST", host))


def _probe_checks(host: str, probe: dict[str, Any], up_command: str) -> list[Check]:
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
        _disk_check(host, probe, up_command),
        gpu,
        Check("environment", bool(probe.get("env_ready")), str(probe.get("env")),
              f"`tether up {host}` prepares it."),
        # either answer is fine: without an index, `up` sends the laptop's wheels
        Check("index", True, bootstrap.index_reach(host, probe.get("index") or {})),
    ]


def _port_check(host: str, port: int | None) -> Check:
    """The port the user's attached `tether up` holds for ``host``, else whether ``port`` (or
    the default) is free for one."""
    attached = attached_port(host)
    if attached is not None and port in (None, attached):
        return Check("local port", True, f"127.0.0.1:{attached} is the tunnel of the `tether up` "
                                         f"attached to {host}")
    port = port or DEFAULT_PORT
    try:
        check_local_port(port)
    except TetherError as e:
        return Check("local port", False, f"127.0.0.1:{port} is taken by another program",
                     f"`tether up {host} --port N` with a free N ({e.message}).")
    return Check("local port", True, f"127.0.0.1:{port} is free for `tether up {host}`")


async def _replay_checks(backend: Backend) -> list[Check]:
    from tether.replay import replay

    def quiet(_: Any) -> None:
        pass

    try:
        placement = await backend.start(quiet, quiet)
    except TetherError as e:
        return [Check("server", False, e.message, e.hint)]
    server = placement.result.server
    tunnel = backend.forwarder(placement, free_port(), server.token)
    forward = tunnel.forward
    try:
        await tunnel.open()
    except TetherError as e:
        return [Check("tunnel", False, e.message, e.hint)]
    try:
        found = await replay(f"http://127.0.0.1:{forward.local_port}", server.token)
        verified = await _verified_release_check(forward.local_port, server.token)
    finally:
        await tunnel.aclose()
    return [Check("tunnel", True, forward.spec),
            *(Check(c.name, c.ok, c.detail, c.hint) for c in found), verified]


async def _verified_release_check(port: int, token: str) -> Check:
    """Whether a release can be verified there: a cgroup per kernel (else a process that left
    its kernel's group with `env -i setsid` goes unseen), and how to get one."""
    try:
        reply = await _http.get(port, "/tether/api/kernels", token)
    except _http.NoAnswer as e:
        return Check("verified release", False, e.message)
    cgroup = (reply.body or {}).get("server", {}).get("cgroup") if reply.ok else None
    if cgroup:
        return Check("verified release", True, f"a cgroup per kernel under {cgroup}")
    return Check("verified release", True, "no kernel cgroup here: releases end what they find "
                 "but cannot prove nothing escaped", "Start the server in a delegated cgroup: "
                 "`systemd-run --user --scope -p Delegate=yes tether serve` on the host "
                 "(docs/kernels-and-gpu.md#verified-release-a-cgroup-per-kernel).", warn=True)
