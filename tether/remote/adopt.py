"""Kernels that outlive their server, and the server that adopts them.

A kernel is started independent of its server (no ``JPY_PARENT_PID``: ipykernel does not poll
for its parent) and leaves a 0600 file in ``<runtime dir>/tether-kernels/`` (0700): its id,
kernelspec, pid and start (since boot, with the boot id), marker, process group, cgroup, the
connection file's contents and its sessions (notebook path). The file goes when the kernel is
shut down on purpose (release, cull, DELETE, ``down``); it stays when the server ends by
SIGTERM, a crash or ``kill -9``.

A server that starts in that runtime dir adopts each kernel whose server is gone: only a
process that is still the one recorded (pid, start, boot, uid) and carries the recorded marker
and kernel id in the environment it was started with; its kernel manager then polls and
signals that process instead of a child of its own (:class:`AdoptedProcess`), under the same
kernel id, with the same sessions. Kernels that died meanwhile are reported once: their files
are removed when reported. See docs/kernels-and-gpu.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import psutil

from tether import identity
from tether.remote import sweep
from tether.remote.sweep import KERNEL_ID_ENV, MARKER_ENV, KernelRecord

log = logging.getLogger(__name__)

KERNELS_DIR = "tether-kernels"  # (not tether-*.json: state.scan reads those as servers)
LOCK_NAME = ".lock"


@dataclass(frozen=True)
class KeptKernel:
    """What a later server needs to verify and adopt a kernel (one 0600 file per kernel)."""

    kernel_id: str
    kernel_name: str
    pid: int
    started: float  # since boot (tether.identity.started)
    boot_id: str
    marker: str
    pgid: int | None = None
    cgroup: str = ""
    instance: str = ""  # the instance id in the kernel's environment (the server that started it)
    owner: str = ""  # the instance id of the server that manages it now
    connection: dict[str, Any] = field(default_factory=dict)  # the connection file's contents
    sessions: tuple[dict[str, Any], ...] = ()  # session_id, path, name, type

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KeptKernel:
        data = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        data["sessions"] = tuple(data.get("sessions") or ())
        return cls(**data)

    def record(self) -> KernelRecord:
        """What the sweep and the release know the kernel's processes by."""
        return KernelRecord(self.kernel_id, self.pid, self.pgid, self.marker, self.started,
                            cgroup=self.cgroup)

    @property
    def label(self) -> str:
        """The kernel in the user's words: its notebook, else its id's start."""
        paths = [str(s.get("path") or "") for s in self.sessions]
        return next((p for p in paths if p), self.kernel_id[:8])


def folder(runtime_dir: str, create: bool = False) -> str:
    path = os.path.join(runtime_dir, KERNELS_DIR)
    if create:
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
    return path


def _path(runtime_dir: str, kernel_id: str) -> str:
    return os.path.join(folder(runtime_dir), f"{kernel_id}.json")


def write(runtime_dir: str, kept: KeptKernel) -> None:
    """Write the kernel's file anew (0600, never through a link; renamed into place)."""
    path = _path(runtime_dir, kept.kernel_id)
    folder(runtime_dir, create=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(kept.to_json(), f)
    os.replace(tmp, path)


def read(runtime_dir: str, kernel_id: str) -> KeptKernel | None:
    path = _path(runtime_dir, kernel_id)
    try:
        if os.stat(path).st_uid != os.getuid():
            return None
        with open(path) as f:
            return KeptKernel.from_json(json.load(f))
    except (OSError, ValueError, TypeError, AttributeError) as e:
        if not isinstance(e, FileNotFoundError):
            log.warning("unreadable kernel file %s: %s", path, e)
        return None


def read_all(runtime_dir: str) -> list[KeptKernel]:
    try:
        names = sorted(n for n in os.listdir(folder(runtime_dir)) if n.endswith(".json"))
    except OSError:
        return []
    found = (read(runtime_dir, n[:-len(".json")]) for n in names)
    return [k for k in found if k is not None]


def remove(runtime_dir: str, kernel_id: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_path(runtime_dir, kernel_id))


def update(runtime_dir: str, kernel_id: str, **changes: Any) -> None:
    """Change fields of a kernel's file, if it has one (a kernel shut down has none)."""
    kept = read(runtime_dir, kernel_id)
    if kept is not None:
        write(runtime_dir, replace(kept, **changes))


@contextlib.contextmanager
def locked(runtime_dir: str) -> Iterator[None]:
    """One server at a time claims kernels (two starting together must not adopt one twice)."""
    fd = os.open(os.path.join(folder(runtime_dir, create=True), LOCK_NAME),
                 os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def verify(kept: KeptKernel, uid: int) -> psutil.Process | None:
    """The kernel's process, if it is still the one recorded; None otherwise.

    By what tether recorded only: pid and start since boot in the same boot, this user's, not
    a zombie, and the marker and kernel id in the environment it was started with."""
    if kept.boot_id != identity.boot_id() or kept.pid <= 1:
        return None
    try:
        proc = psutil.Process(kept.pid)
        if not identity.same_start(identity.started(proc), kept.started):
            return None
    except psutil.Error:
        return None
    if not sweep.alive(proc) or not sweep.same_uid(proc, uid):
        return None
    env = sweep.environ_of(proc)
    if env.get(MARKER_ENV) != kept.marker or env.get(KERNEL_ID_ENV) != kept.kernel_id:
        return None
    return proc


@dataclass
class Claim:
    adopt: list[KeptKernel] = field(default_factory=list)
    lost: list[KeptKernel] = field(default_factory=list)


def claim(runtime_dir: str, instance: str, uid: int, owner_alive: Any) -> Claim:
    """The kernels a server that is gone left in ``runtime_dir``: those to adopt (now owned by
    ``instance``) and those that died meanwhile (their files removed: reported once).

    Kernels of a server that still runs (``owner_alive(owner)``) are its own, never taken."""
    found = Claim()
    with locked(runtime_dir):
        for kept in read_all(runtime_dir):
            if kept.owner == instance or (kept.owner and owner_alive(kept.owner)):
                continue
            if verify(kept, uid) is None:
                remove(runtime_dir, kept.kernel_id)
                found.lost.append(kept)
                continue
            kept = replace(kept, owner=instance)
            write(runtime_dir, kept)
            found.adopt.append(kept)
    return found


def connection_file(runtime_dir: str, kept: KeptKernel) -> str:
    """Put the kernel's connection file back where its kernel manager reads it (0600)."""
    path = os.path.join(runtime_dir, f"kernel-{kept.kernel_id}.json")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(kept.connection, f, indent=1)
    return path


class AdoptedProcess:
    """The ``Popen`` a ``LocalProvisioner`` expects, for a kernel that is not our child: it is
    polled and signalled through psutil (which refuses a pid reused since)."""

    stdin = stdout = stderr = None
    returncode: int | None = None

    def __init__(self, proc: psutil.Process) -> None:
        self.proc = proc
        self.pid = proc.pid

    def poll(self) -> int | None:
        if self.returncode is None and not sweep.alive(self.proc):
            self.returncode = -signal.SIGKILL  # not our child: its status is its parent's
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        sweep.wait_gone([self.proc], sweep.KILL_WAIT if timeout is None else timeout)
        return self.poll()

    def send_signal(self, signum: int) -> None:
        try:
            self.proc.send_signal(signum)
        except psutil.NoSuchProcess:
            raise ProcessLookupError(f"kernel process {self.pid} is gone") from None
        except psutil.Error as e:
            raise OSError(str(e)) from e

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


async def adopt(serverapp: Any, ctx: Any) -> tuple[list[KeptKernel], list[KeptKernel]]:
    """Adopt the kernels a gone server of this runtime dir left; (adopted, lost)."""
    import asyncio

    from tether.remote.lifecycle import instance_alive

    runtime_dir = ctx.runtime_dir
    found = await asyncio.to_thread(claim, runtime_dir, ctx.instance, ctx.guard.uid,
                                    instance_alive)
    for kept in found.lost:
        log.warning("kernel %s (%s) ended while no server ran; its state is lost",
                    kept.kernel_id, kept.label)
    adopted = []
    km, sm = serverapp.kernel_manager, serverapp.session_manager
    for kept in found.adopt:
        try:
            await _adopt_one(km, sm, ctx, kept)
        except Exception:  # the one boundary per kernel: the others are still adopted
            log.exception("kernel %s could not be adopted; it keeps running (`tether down` "
                          "ends it)", kept.kernel_id)
            ctx.adopting.pop(kept.kernel_id, None)
            continue
        adopted.append(kept)
        log.info("adopted kernel %s (%s, pid %d)", kept.kernel_id, kept.label, kept.pid)
    return adopted, found.lost


async def _adopt_one(km: Any, sm: Any, ctx: Any, kept: KeptKernel) -> None:
    ctx.adopting[kept.kernel_id] = kept
    ctx.adopted_instances.add(kept.instance)
    await km.start_kernel(kernel_id=kept.kernel_id, kernel_name=kept.kernel_name)
    kernel = km.get_kernel(kept.kernel_id)
    kernel.execution_state = "idle"  # what it does is unknown until it next says
    for s in kept.sessions:
        await sm.save_session(s["session_id"], path=s.get("path"), name=s.get("name"),
                              type=s.get("type"), kernel_id=kept.kernel_id)


def detach(km: Any) -> list[str]:
    """The server ends but its kernels stay: nothing of theirs is removed on the way out (the
    connection file would go with the kernel manager), nothing restarts them."""
    kept = []
    for kernel_id in list(km.list_kernel_ids()):
        kernel = km.get_kernel(kernel_id)
        kernel.stop_restarter()
        kernel._connection_file_written = False  # (its __del__ would remove the file)
        kept.append(kernel_id)
    return kept
