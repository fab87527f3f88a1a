"""The state file a running server leaves so other tether commands can find it.

``<jupyter runtime dir>/tether-<pid>.json``, mode 0600, holding the URL, token, port or socket,
the pid with its start (since boot, with the boot's id: see :mod:`tether.identity`), the
server's instance id (which its kernels carry in their environment as
``TETHER_SERVER_INSTANCE``) and the parent directory of its kernels' cgroups.
Readers skip (and delete) files whose process is gone: a pid is only the server's while the
process with that pid started when the file says (pids are reused).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass


import psutil

from tether import identity
from tether.contract import LAUNCH_ENV
from tether.errors import ServerNotFoundError

TYPE_CHECKING = False  # (typing and pathlib are not imported at run time: tether.host pays
if TYPE_CHECKING:  # each import on every SSH call)
    from pathlib import Path
    from typing import Any

log = logging.getLogger(__name__)
PREFIX = "tether-"


@dataclass(frozen=True)
class ServerState:
    """Where a running tether-enabled server listens, and how to authenticate to it."""

    pid: int
    url: str
    token: str
    port: int
    sock: str
    base_url: str
    root_dir: str
    version: str
    origins: tuple[str, ...] = ()
    started: float = 0.0
    instance: str = ""  # lifecycle.server_context().instance: kernels carry it
    create_time: float = 0.0  # psutil's create time of the server process (0: unknown)
    boot_start: float = 0.0  # identity.started() of the server process: its identity (0: unknown)
    boot_id: str = ""  # identity.boot_id() when it started
    cgroup: str = ""  # the cgroup v2 directory holding one cgroup per kernel ("" if none)
    adopted: tuple[str, ...] = ()  # ids of the kernels it took over from a server that ended
    lost: tuple[str, ...] = ()  # kernels (notebook or id) that had ended while no server ran

    @property
    def colab_url(self) -> str:
        """The line to paste into Colab's "Connect to a local runtime" dialog."""
        return f"{self.url.rstrip('/')}/?token={self.token}"

    @property
    def status_url(self) -> str:
        """The status page: kernels, GPU memory and Release buttons."""
        return f"{self.url.rstrip('/')}/tether/?token={self.token}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServerState:
        data = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("origins", "adopted", "lost"):
            data[key] = tuple(data.get(key, ()))
        return cls(**data)


def jupyter_runtime_dir() -> str:
    from jupyter_core.paths import jupyter_runtime_dir as runtime_dir  # ~30 ms: when needed

    return str(runtime_dir())


def state_path(pid: int | None = None, runtime_dir: str | None = None) -> Path:
    from pathlib import Path

    return Path(runtime_dir or jupyter_runtime_dir()) / f"{PREFIX}{pid or os.getpid()}.json"


def write_state(state: ServerState, runtime_dir: str | None = None) -> Path:
    path = state_path(state.pid, runtime_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    from jupyter_core.paths import secure_write

    with secure_write(str(path)) as f:  # 0600, owner checked
        json.dump(state.to_json(), f, indent=2)
    return path


def remove_state(pid: int | None = None, runtime_dir: str | None = None) -> None:
    state_path(pid, runtime_dir).unlink(missing_ok=True)


def running_servers(runtime_dir: str | None = None) -> list[ServerState]:
    """Every live tether server of this user, newest first; stale files are removed (a server
    whose start is not recorded counts as live: :data:`UNVERIFIED`)."""
    found: list[ServerState] = []
    for entry in scan(runtime_dir or jupyter_runtime_dir()):
        if entry.verdict == STALE:
            continue
        try:
            found.append(ServerState.from_json(entry.data))
        except (TypeError, ValueError) as e:
            log.debug("skipping unreadable state file %s: %s", entry.path, e)
    return sorted(found, key=lambda s: s.started, reverse=True)


def find_server(runtime_dir: str | None = None, *, port: int | None = None) -> ServerState:
    """The one server a command should talk to (the newest, or the one on ``port``)."""
    servers = [s for s in running_servers(runtime_dir) if port is None or s.port == port]
    if not servers:
        where = f" on port {port}" if port else ""
        raise ServerNotFoundError(
            f"no running tether server{where} for this user",
            hint="Start one with `tether serve`.",
        )
    return servers[0]


# -- is the process a state file names the server that wrote it? --------------------------------

LIVE, STALE, UNVERIFIED = "live", "stale", "unverified"
# an older server records only psutil's create time, which moves with the wall clock
CREATE_TIME_SLACK = 1.5
if TYPE_CHECKING:
    Launches = Mapping[str, Mapping[str, Any]]  # launch id -> launch record (tether.host)


@dataclass(frozen=True)
class Entry:
    """One state file, judged: ``data`` as read (``pid`` an int), the verdict and why."""

    path: str
    data: dict[str, Any]
    verdict: str
    why: str = ""


def scan(runtime_dir: str, launches: Launches | None = None, *,
         remove_stale: bool = True) -> list[Entry]:
    """Every readable ``tether-<pid>.json`` in ``runtime_dir``, judged (stale ones removed)."""
    found = []
    try:
        names = sorted(n for n in os.listdir(runtime_dir)
                       if n.startswith(PREFIX) and n.endswith(".json"))
    except OSError:
        names = []
    for path in (os.path.join(runtime_dir, n) for n in names):
        try:
            with open(path) as f:
                data = json.load(f)
            data["pid"] = int(data.get("pid") or 0)
        except (OSError, ValueError, TypeError, AttributeError) as e:
            log.debug("skipping unreadable state file %s: %s", path, e)
            continue
        verdict, why = judge(data, launches or {})
        if verdict == STALE and remove_stale:
            log.debug("removing stale state file %s: %s", path, why)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        found.append(Entry(path, data, verdict, why))
    return found


def judge(data: Mapping[str, Any], launches: Launches) -> tuple[str, str]:
    """(verdict, why): is the process named by a state file the server that wrote it?

    By what tether recorded, never by a command line: the launch record's pin (start since
    boot and boot id), else the start the server recorded (since boot, or psutil's create
    time, or the one in its instance id), else the launch marker in its environment.
    """
    pid = int(data.get("pid") or 0)
    try:
        proc = psutil.Process(pid) if pid > 0 else None
        if proc is None or proc.status() == psutil.STATUS_ZOMBIE:
            return STALE, f"its process {pid} is gone"
        uid, start, created = proc.uids().real, identity.started(proc), proc.create_time()
    except psutil.Error:
        return STALE, f"its process {pid} is gone"
    if uid != os.getuid():
        return STALE, f"pid {pid} now belongs to another user"
    other = f"pid {pid} is now another process ({_name(proc)}, started {_stamp(created)}"
    pinned = _pinned(pid, start, launches)
    if pinned:
        return LIVE, ""
    if data.get("boot_start"):  # the server's start since boot: unmoved by the wall clock
        if data.get("boot_id") != identity.boot_id():
            return STALE, f"the machine rebooted after server {pid} started"
        if identity.same_start(start, float(data["boot_start"])):
            return LIVE, ""
        return STALE, other + ")"
    want = recorded_start(data)
    if want is not None:
        if abs(created - want) <= CREATE_TIME_SLACK:
            return LIVE, ""
        return STALE, other + f"; the server started {_stamp(want)})"
    if pinned is False:
        return STALE, other + ")"
    if _environ(proc).get(LAUNCH_ENV) in launches:
        return LIVE, ""
    return UNVERIFIED, (f"pid {pid} runs, but its state file records no start time and the "
                        "process carries no launch marker of ours")


def recorded_start(data: Mapping[str, Any]) -> float | None:
    """psutil's create time as a state file records it (an older server: in its instance id
    ``pid.created.nonce``, in 1/100 s), or None."""
    if data.get("create_time"):
        try:
            return float(data["create_time"])
        except (TypeError, ValueError):
            return None
    pid, _, rest = str(data.get("instance") or "").partition(".")
    created = rest.partition(".")[0]
    if pid == str(data.get("pid")) and created.isdigit():
        return int(created) / 100.0
    return None


def _pinned(pid: int, start: float, launches: Launches) -> bool | None:
    """True/False when a launch record pins ``pid`` (is it that server?); None when none does."""
    pins = [r["server"] for r in launches.values()
            if isinstance(r.get("server"), dict) and r["server"].get("pid") == pid]
    if not pins:
        return None
    here = identity.boot_id()
    return any(p.get("boot_id") == here
               and identity.same_start(float(p.get("boot_start") or 0), start) for p in pins)


def _environ(proc: psutil.Process) -> dict[str, str]:
    try:
        return dict(proc.environ())
    except (psutil.Error, OSError):
        return {}


def _name(proc: psutil.Process) -> str:
    try:
        return str(proc.name())
    except psutil.Error:
        return "?"


def _stamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))
