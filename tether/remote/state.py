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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
from jupyter_core.paths import jupyter_runtime_dir, secure_write

from tether import identity
from tether.errors import ServerNotFoundError

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
        data["origins"] = tuple(data.get("origins", ()))
        return cls(**data)


def state_path(pid: int | None = None, runtime_dir: str | None = None) -> Path:
    return Path(runtime_dir or jupyter_runtime_dir()) / f"{PREFIX}{pid or os.getpid()}.json"


def write_state(state: ServerState, runtime_dir: str | None = None) -> Path:
    path = state_path(state.pid, runtime_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with secure_write(str(path)) as f:  # 0600, owner checked
        json.dump(state.to_json(), f, indent=2)
    return path


def remove_state(pid: int | None = None, runtime_dir: str | None = None) -> None:
    state_path(pid, runtime_dir).unlink(missing_ok=True)


def running_servers(runtime_dir: str | None = None) -> list[ServerState]:
    """Every live tether server of this user, newest first; stale files are removed."""
    found: list[ServerState] = []
    for path in Path(runtime_dir or jupyter_runtime_dir()).glob(f"{PREFIX}*.json"):
        try:
            state = ServerState.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as e:
            log.debug("skipping unreadable state file %s: %s", path, e)
            continue
        if not _alive(state):
            log.debug("removing stale state file %s", path)
            path.unlink(missing_ok=True)
            continue
        found.append(state)
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


# an older server records only psutil's create time, which moves with the wall clock
CREATE_TIME_SLACK = 1.5


def _alive(state: ServerState) -> bool:
    """Whether the server that wrote the file still runs (pid and, when recorded, start)."""
    try:
        proc = psutil.Process(state.pid)
        if state.boot_start:
            if state.boot_id != identity.boot_id() \
                    or not identity.same_start(identity.started(proc), state.boot_start):
                return False  # the machine rebooted, or the pid was reused by another process
        elif state.create_time and abs(proc.create_time() - state.create_time) > CREATE_TIME_SLACK:
            return False
        return bool(proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False
