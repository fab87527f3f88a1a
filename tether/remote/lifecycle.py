"""Kernel life cycle: the sweeping provisioner, the server's identity, and the reaper.

:class:`SweepingProvisioner` is a ``LocalProvisioner`` that puts a unique marker in each kernel's
launch environment and, after every shutdown, restart, auto-restart or cull (jupyter_client
calls ``cleanup`` on all of them), ends every process of the kernel: its recorded process group,
its recorded descendants and whatever carries the marker (docs/kernel-gpu-lifecycle.md). It is
the default provisioner of servers tether configures, so no kernelspec needs editing.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from jupyter_client.provisioning.local_provisioner import LocalProvisioner
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from traitlets import Float

from tether import identity
from tether.errors import ConfigError
from tether.remote import adopt, cgroups, sweep
from tether.remote.sweep import INSTANCE_ENV, KERNEL_ID_ENV, MARKER_ENV, Guard, KernelRecord

log = logging.getLogger(__name__)

PROVISIONER_NAME = "tether-provisioner"
STATE_ENV = "TETHER_SERVER_STATE"  # the server's 0600 state file: url or socket, and token
DEFAULT_GRACE = 5.0
SHIM_DIR = Path(__file__).parent / "_kernel_shim"


@dataclass
class ServerContext:
    """What kernels launched by this server process share: identity, guard, state file."""

    instance: str
    guard: Guard
    state_file: str = ""
    records: dict[str, KernelRecord] = field(default_factory=dict)  # kernel id -> live record
    cgroup: str = ""  # cgroup v2 directory of this server's kernel cgroups ("" where none)
    ipc_kernels: bool = True  # kernels' ZMQ sockets as files in a 0700 directory, not TCP
    short_ipc_dir: str = ""  # a private dir for them when the runtime dir's path is too long
    runtime_dir: str = ""  # where kernels leave their files for a later server (tether.remote.adopt)
    adopting: dict[str, adopt.KeptKernel] = field(default_factory=dict)  # kernel id -> to adopt
    adopted_instances: set[str] = field(default_factory=set)  # what adopted kernels carry
    keep_kernels: bool = False  # the server ends, its kernels do not (SIGTERM)
    independent: bool = True  # kernels may outlive the server (c.Tether.keep_kernels)

    def instances(self) -> set[str]:
        """The instance ids this server's kernels carry: its own and adopted kernels'."""
        return {self.instance, *self.adopted_instances}


_context: ServerContext | None = None


def new_instance_id(pid: int | None = None) -> str:
    """``pid.created.nonce``: lets a later server tell whether the one that wrote it still runs."""
    proc = psutil.Process(pid)
    return f"{proc.pid}.{round(identity.started(proc) * 100)}.{secrets.token_hex(4)}"


def server_context() -> ServerContext:
    """This process's context (created on first use, so a hand-started server gets one too)."""
    global _context
    if _context is None:
        _context = ServerContext(instance=new_instance_id(), guard=Guard.here())
    return _context


def instance_alive(instance: str) -> bool:
    """Whether the server that minted ``instance`` is still running (pid reuse guarded)."""
    pid, _, rest = instance.partition(".")
    created, _, _ = rest.partition(".")
    try:
        proc = psutil.Process(int(pid))
        return round(identity.started(proc) * 100) == int(created) and sweep.alive(proc)
    except (ValueError, psutil.Error):
        return False  # (a zombie is gone: no parent reaped it yet, e.g. a container's pid 1)


def kernel_env(env: dict[str, str], kernel_id: str, marker: str,
               ctx: ServerContext) -> dict[str, str]:
    """The launch environment of a kernel: markers, and what ``tether.release()`` needs."""
    env = dict(env)
    env.pop("JPY_PARENT_PID", None)  # a kernel outlives its server (ipykernel polls this pid)
    env[MARKER_ENV] = marker
    env[KERNEL_ID_ENV] = kernel_id
    env[INSTANCE_ENV] = ctx.instance
    if ctx.state_file:
        env[STATE_ENV] = ctx.state_file
    # Last on PYTHONPATH: a mini ``tether`` package that defers to a real install if the
    # kernel's Python has one (see _kernel_shim/tether/__init__.py).
    path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(SHIM_DIR)]
    env["PYTHONPATH"] = os.pathsep.join([*path, str(SHIM_DIR)])
    return env


# sun_path holds 108 bytes with the terminating NUL; jupyter_client appends "-<n>" to the prefix
MAX_UNIX_PATH = 107
IPC_SUFFIX_LEN = 3


def _private_dir(path: str) -> bool:
    """A directory only this user can enter (what keeps other users off the kernel sockets)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return st.st_uid == os.geteuid() and not st.st_mode & 0o077


def ipc_prefix(connection_file: str, kernel_id: str, ctx: ServerContext) -> str:
    """Where a kernel's ipc sockets go: beside its connection file, if that directory is private
    and its path short enough for Unix sockets, else in a private directory of this server."""
    prefix = os.path.splitext(connection_file)[0] + "-ipc"
    if _private_dir(os.path.dirname(prefix)) and len(prefix) + IPC_SUFFIX_LEN <= MAX_UNIX_PATH:
        return prefix
    if not ctx.short_ipc_dir:
        base = os.environ.get("XDG_RUNTIME_DIR", "")
        if not (base and _private_dir(base) and len(base) < 40):
            base = tempfile.gettempdir()
        ctx.short_ipc_dir = tempfile.mkdtemp(prefix="tether-ipc-", dir=base)  # 0700, ours
        atexit.register(_remove_dir, ctx.short_ipc_dir)
    prefix = os.path.join(ctx.short_ipc_dir, kernel_id)
    if len(prefix) + IPC_SUFFIX_LEN > MAX_UNIX_PATH:
        raise ConfigError(f"no directory short enough for the kernel's Unix sockets ({prefix})",
                          hint="Set TMPDIR to a short directory, e.g. /tmp.")
    return prefix


def _remove_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        os.rmdir(path)  # empty once every kernel's ipc files are cleaned up


def use_ipc(km: Any, kernel_id: str, ctx: ServerContext) -> None:
    """Switch a kernel manager to the ipc transport (kernels then listen on no TCP port)."""
    if km.transport == "tcp" and not ctx.ipc_kernels:
        return
    km.transport = "ipc"
    km.cache_ports = False  # the port cache binds TCP ports
    km.ip = ipc_prefix(km.connection_file, kernel_id, ctx)


PIPE_LAUNCHER = Path(__file__).with_name("_pipe_launch.py")


def ipc_launcher(cmd: list[str], km: Any) -> list[str]:
    """``python -m ipykernel_launcher ARGS`` as ``python _pipe_launch.py ADDR ARGS``: the
    kernel's IOPub pipe on a Unix socket too. Any other kernel command is left as it is."""
    if km.transport != "ipc" or cmd[1:3] != ["-m", "ipykernel_launcher"]:
        return cmd
    return [cmd[0], str(PIPE_LAUNCHER), f"ipc://{km.ip}-p", *cmd[3:]]


class SweepingProvisioner(LocalProvisioner):
    """A ``LocalProvisioner`` that leaves nothing of a kernel behind."""

    grace = Float(
        DEFAULT_GRACE, config=True,
        help="Seconds between SIGTERM and SIGKILL when a kernel's processes are swept.",
    )

    record: KernelRecord | None = None

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        ctx = server_context()
        kept = ctx.adopting.get(self.kernel_id)
        if kept is not None:
            return await self._pre_adopt(kept, **kwargs)
        use_ipc(self.parent, self.kernel_id, ctx)
        self._marker = secrets.token_hex(16)
        base = kwargs.get("env") or dict(os.environ)
        kwargs["env"] = kernel_env(base, self.kernel_id, self._marker, ctx)
        result: dict[str, Any] = await super().pre_launch(**kwargs)
        return result

    async def _pre_adopt(self, kept: adopt.KeptKernel, **kwargs: Any) -> dict[str, Any]:
        """A kernel a gone server left: its manager reads the connection it was started with."""
        km: Any = self.parent
        km.connection_file = await asyncio.to_thread(
            adopt.connection_file, server_context().runtime_dir, kept)
        km.load_connection_file()
        km._connection_file_written = True  # (removed again when the kernel is shut down)
        self.connection_info = km.get_connection_info()
        kwargs.pop("extra_arguments", None)
        result: dict[str, Any] = await KernelProvisionerBase.pre_launch(self, cmd=[], **kwargs)
        return result

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> Any:
        ctx = server_context()
        kept = ctx.adopting.pop(self.kernel_id, None)
        if kept is not None:
            return await self._adopt(kept)
        cmd = ipc_launcher(cmd, self.parent)
        cgroup = await asyncio.to_thread(cgroups.kernel_dir, ctx.cgroup, self.kernel_id) \
            if ctx.cgroup else ""
        if cgroup:
            cmd = cgroups.wrap(cmd, cgroup)
        # independent: no JPY_PARENT_PID, so the kernel outlives its server (adopted later)
        info = await super().launch_kernel(cmd, **{**kwargs, "independent": ctx.independent})
        try:
            started = identity.started(psutil.Process(self.pid))
        except psutil.Error:
            started = 0.0
        self.record = KernelRecord(self.kernel_id, int(self.pid or 0), self.pgid, self._marker,
                                   started, cgroup=cgroup)
        server_context().records[self.kernel_id] = self.record
        await asyncio.to_thread(self._keep, self.record)
        log.debug("kernel %s launched: pid %s, pgid %s", self.kernel_id, self.pid, self.pgid)
        return info

    def _keep(self, record: KernelRecord) -> None:
        """The kernel's file for a later server (sessions kept across a restart of the kernel)."""
        ctx = server_context()
        if not ctx.runtime_dir or not record.started or not ctx.independent:
            return
        km: Any = self.parent
        try:
            with open(km.connection_file) as f:
                connection = json.load(f)
            before = adopt.read(ctx.runtime_dir, self.kernel_id)
            adopt.write(ctx.runtime_dir, adopt.KeptKernel(
                self.kernel_id, str(km.kernel_name), record.pid, record.started,
                identity.boot_id(), record.marker, record.pgid, record.cgroup, ctx.instance,
                ctx.instance, connection, before.sessions if before else ()))
        except (OSError, ValueError) as e:
            log.warning("kernel %s will not outlive its server: %s", self.kernel_id, e)

    async def _adopt(self, kept: adopt.KeptKernel) -> Any:
        """Take over the recorded process instead of starting one (verified again: it may
        have ended since the claim)."""
        proc = await asyncio.to_thread(adopt.verify, kept, server_context().guard.uid)
        if proc is None:
            raise ProcessLookupError(f"kernel {self.kernel_id} ended before it was adopted")
        self.process = adopt.AdoptedProcess(proc)  # type: ignore[assignment]
        self.pid, self.pgid = kept.pid, kept.pgid
        self._marker = kept.marker
        self.record = await asyncio.to_thread(sweep.snapshot_descendants, kept.record())
        server_context().records[self.kernel_id] = self.record
        return self.connection_info

    def remember_descendants(self) -> None:
        """Record the kernel's children while it still lives (orphans lose their parent)."""
        if self.record is not None:
            self.record = sweep.snapshot_descendants(self.record)
            server_context().records[self.kernel_id] = self.record

    async def shutdown_requested(self, restart: bool = False) -> None:
        await asyncio.to_thread(self.remember_descendants)
        await super().shutdown_requested(restart=restart)

    async def send_signal(self, signum: int) -> None:
        """The kernel and the safe members of its group, never a bare ``killpg`` (as root that
        reached another user's process in the group, one the sweep had refused to touch)."""
        await asyncio.to_thread(self.remember_descendants)
        record = self.record
        if record is None:
            await super().send_signal(signum)
            return
        await asyncio.to_thread(sweep.signal_kernel, record, server_context().guard, signum)

    async def cleanup(self, restart: bool = False) -> None:
        record, self.record = self.record, None
        try:
            if record is not None:
                result = await asyncio.to_thread(
                    sweep.sweep_kernel, record, server_context().guard, self.grace
                )
                if result.survivors or result.refused:
                    log.warning("kernel %s: %d process(es) survived its sweep, %d refused",
                                record.kernel_id, len(result.survivors), len(result.refused))
        finally:
            ctx = server_context()
            ctx.records.pop(self.kernel_id, None)
            if ctx.runtime_dir and not restart:  # shut down on purpose: no later server adopts it
                adopt.remove(ctx.runtime_dir, self.kernel_id)
            km = self.parent
            if km is not None and km.transport == "ipc":
                # jupyter_client removes the five channel sockets; the pipe is ours to remove
                with contextlib.suppress(OSError):
                    os.unlink(f"{km.ip}-p")
            await super().cleanup(restart=restart)


def find_orphans(guard: Guard, own_instance: str, runtime_dir: str | None = None,
                 kept: frozenset[str] = frozenset()) -> list[psutil.Process]:
    """Processes of this user left by a tether server that is gone (crashed or killed).

    With ``runtime_dir``, only those of servers that kept their state there: one tether
    setup never touches another's (a second install, a test run beside a real server).
    Processes of a kernel this server adopted (its marker among ``kept``) are its own.
    """
    orphans = []
    for proc in psutil.process_iter():
        if proc.pid in guard.protected or not sweep.same_uid(proc, guard.uid):
            continue
        env = sweep.environ_of(proc)
        instance = env.get(INSTANCE_ENV)
        if not instance or instance == own_instance or instance_alive(instance) \
                or env.get(MARKER_ENV) in kept:
            continue
        if runtime_dir is not None and os.path.dirname(env.get(STATE_ENV, "")) != runtime_dir:
            continue
        if sweep.alive(proc):
            orphans.append(proc)
    return orphans


def reap(orphans: list[psutil.Process], guard: Guard, grace: float) -> sweep.SweepResult:
    """End orphans under the safe-kill rule (each carries a dead server's instance marker)."""
    result = sweep.SweepResult()
    by_instance: dict[str, list[psutil.Process]] = {}
    for proc in orphans:
        by_instance.setdefault(sweep.environ_of(proc).get(INSTANCE_ENV, ""), []).append(proc)
    for instance, group in by_instance.items():
        if not instance:
            continue
        safe, refused = sweep.split_safe(group, guard, (INSTANCE_ENV, instance))
        part = sweep.terminate(safe, grace)
        part.refused = refused
        result.merge(part)
    return result
