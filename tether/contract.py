"""Every fact both ends of the SSH hop must agree on, in one place.

The laptop (:mod:`tether.bootstrap`, the backends) and the remote side (the stdlib seed
:mod:`tether._seed`, then :mod:`tether.host` run from tether's environment) read these names
from here, never spell them again: the folder layout on the remote, the environment variables
that mark tether's processes, the exit codes of the remote command, the Slurm job's name and
comment, the kinds of failure, and the shape of each answer (with :data:`PROTOCOL`, its
version). The seed runs before tether is installed, so it gets the values it needs in its
parameters (:func:`seed_params`); everything else imports them.

Each answer is parsed once, where it enters the laptop (:meth:`ServerInfo.from_payload`,
:meth:`UpResult.from_payload`, :func:`check_protocol`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field


from tether import __version__
from tether.errors import RemoteEnvironmentError

# typing and pathlib are not imported at run time: tether.host pays each import on every call
TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

# The version of the answers below: both ends send and check it (a laptop and a remote of
# different tethers say so instead of misreading each other).
PROTOCOL = 1

# -- the remote command's exit codes ------------------------------------------------------------
NO_PYTHON = 97  # the remote python (--remote-python) is not there
NO_TETHER = 96  # the remote `tether` is not installed (never prepared, or another version)
FAILED = 3  # the seed or the host module failed and said why (an "error" event)

# -- environment variables ------------------------------------------------------------------------
LAUNCH_ENV = "TETHER_LAUNCH"  # on every process of a server tether launched (its launch id)
INSTANCE_ENV = "TETHER_SERVER_INSTANCE"  # set by the server on each of its kernels
KERNEL_MARKER_ENV = "TETHER_KERNEL_MARKER"  # one kernel's processes
KERNEL_ID_ENV = "TETHER_KERNEL_ID"
STATE_ENV = "TETHER_SERVER_STATE"  # a kernel's path to its server's state file
# A runtime dir that is the only place to look for servers: the Slurm backend runs the remote
# tether inside its job with the job's own dir, so that a server of the login node's is not in
# scope (`release --slurm` means the job's kernels).
SCOPE_ENV = "TETHER_RUNTIME_SCOPE"
MARKERS = (LAUNCH_ENV, INSTANCE_ENV)  # what `down` looks for in a process's environment

# -- Slurm: how a runtime's job is named and marked (the backend submits it so; `down --purge`
# on a login node recognises our jobs by it) --------------------------------------------------
SLURM_JOB_NAME = "tether-runtime"
SLURM_COMMENT = "tether:"

# -- failure kinds (the "kind" of an error event) -------------------------------------------------
CACHE_KINDS = ("read-only", "not-writable", "cache-owner")  # another folder fixes these
START_KINDS = ("start",)
NO_SERVER_KINDS = ("no-server", "stopped")
KERNEL_PYTHON = "kernel-python"

# -- the actions: which run in the stdlib seed alone, which need tether's environment ------------
SEED_ACTIONS = ("probe",)
HOST_ACTIONS = ("up", "prepare", "status", "down", "restart")


@dataclass(frozen=True)
class RemoteLayout:
    """Where tether keeps its files on a remote host: the one definition of that layout.

    The seed and the host module get it in their parameters; ``_ssh`` (shell expression) and
    ``tether ps`` on the host itself (:meth:`root`) derive their paths from it. The root is
    ``$XDG_CACHE_HOME/tether``, else ``~/.cache/tether``: it is resolved where it is used, so
    every other entry is relative to it (``{version}`` is tether's version, ``{launch}`` a
    launch id). ``TETHER_REMOTE_CACHE`` on the laptop sets that variable for every remote
    command (:attr:`tether._ssh.SSHTarget.remote_env`).
    """

    cache_var: str = "XDG_CACHE_HOME"
    cache_default: str = ".cache"  # under the home directory
    dirname: str = "tether"
    env: str = "env-{version}"
    runtime: str = "runtime"  # JUPYTER_RUNTIME_DIR of the server: state files, kernel files
    jupyter_path: str = "jupyter"
    token_file: str = "token"
    server_log: str = "server.log"
    install_log: str = "install.log"
    socket: str = "runtime/tether.sock"
    launch_record: str = "runtime/launch-{launch}.json"  # 0600: launch id and options
    wheels: str = "wheels"  # wheels the laptop sent (uv's; all of them for a host offline)
    uv: str = "uv"  # uv unpacked from its wheel, one folder per version
    uv_cache: str = "uv-cache"  # UV_CACHE_DIR of tether's installs: ~/.cache/uv is never used
    marker: str = "tether-env.json"  # in the environment: how and from what it was made
    lock: str = "lock"
    slurm: str = "slurm"  # one folder per Slurm job (its runtime dir)

    def root(self, environ: Mapping[str, str] | None = None, home: Path | None = None) -> Path:
        """The root on this machine, from ``environ`` (default: this process's)."""
        from pathlib import Path

        env = os.environ if environ is None else environ
        cache = env.get(self.cache_var) or str((home or Path.home()) / self.cache_default)
        return Path(cache) / self.dirname

    def path(self, name: str, environ: Mapping[str, str] | None = None) -> Path:
        """An entry (``runtime``, ``token_file``, ...) resolved on this machine."""
        return self.root(environ) / str(getattr(self, name)).format(version=__version__)

    def root_expr(self) -> str:
        """The root as a POSIX shell expression, for commands run on the remote."""
        return f'"${{{self.cache_var}:-$HOME/{self.cache_default}}}/{self.dirname}"'

    def params(self) -> dict[str, str]:
        return asdict(self)


REMOTE_LAYOUT = RemoteLayout()


def seed_params() -> dict[str, Any]:
    """What the seed needs of this module, sent in its parameters (it cannot import tether)."""
    return {"protocol": PROTOCOL, "layout": REMOTE_LAYOUT.params(),
            "exit_failed": FAILED, "markers": list(MARKERS),
            "slurm": {"job_name": SLURM_JOB_NAME, "comment": SLURM_COMMENT}}


# -- the answers ----------------------------------------------------------------------------------
# Every line the remote prints is one JSON object: progress events ({"event": "step", ...}),
# then one final {"event": "result", "protocol": PROTOCOL, ...} or {"event": "error", ...}.

# What a server's description holds (the token only where ``up`` answers).
PUBLIC_KEYS = ("pid", "token", "port", "sock", "version", "started", "root_dir", "base_url",
               "instance", "create_time", "adopted", "lost")

if TYPE_CHECKING:  # the shapes, for the type checker (TypedDicts are plain dicts at run time)
    from typing import TypedDict

    class Failure(TypedDict, total=False):
        """An ``error`` event: ``message`` and ``hint`` name the host ``HOST``."""

        event: str
        protocol: int
        kind: str
        message: str
        hint: str
        folder: str  # the folder that cannot be used (CACHE_KINDS, "disk")
        cache_fix: str  # a folder the remote found usable for TETHER_REMOTE_CACHE
        log_tail: str
        log: str


    class ServerPayload(TypedDict, total=False):
        """A server as the remote describes it (``up``: with its token; ``status``: without)."""

        pid: int
        token: str
        port: int | None
        sock: str | None
        version: str | None
        started: float | None
        root_dir: str | None
        base_url: str | None
        instance: str | None
        create_time: float | None
        adopted: list[str]  # ids of the kernels it took over from the server before it
        lost: list[str]  # kernels (notebook, else id) that had ended while no server ran


    class StaleEntry(TypedDict):
        """A state file that named a process no longer its server (removed)."""

        file: str
        pid: int
        why: str


    class LeftEntry(TypedDict):
        """A process ``down`` could not end."""

        pid: int
        name: str
        what: str
        why: str


    class UpPayload(TypedDict, total=False):
        event: str
        protocol: int
        server: ServerPayload
        reused: bool
        kernel_python: str
        stale: list[StaleEntry]
        warnings: list[str]
        need_wheel: bool  # a cold remote: plan the install from ``probe`` and send the wheel
        probe: dict[str, Any]
        need_consent: dict[str, Any]  # {"python", "missing"}: ask the user first
        prepared: bool  # `prepare`
        env: str
        root: str
        restarted: list[int]  # `restart`: the pids of the servers it replaced
        old_version: str | None  # `restart`: the tether version the replaced server ran
        kernels_before: list[str]  # `restart`: the kernels kept for the new server


    class StatusPayload(TypedDict, total=False):
        event: str
        protocol: int
        servers: list[dict[str, Any]]  # ServerPayload without the token, plus status/kernels/...
        stale: list[StaleEntry]
        unverified: list[StaleEntry]
        env_ready: bool
        root: str
        disk_bytes: int
        envs: list[str]
        installed: dict[str, Any]
        need_wheel: bool
        probe: dict[str, Any]


    class DownPayload(TypedDict, total=False):
        event: str
        protocol: int
        stopped: list[int]
        strays: list[int]
        forced: list[int]
        stale: list[StaleEntry]
        left: list[LeftEntry]
        purged: dict[str, Any]
        removed_envs: list[str]
        need_wheel: bool
        probe: dict[str, Any]


def older(version: str, than: str) -> bool:
    """Whether tether ``version`` is older than ``than`` (release numbers; unknown: no)."""
    def parts(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in v.split("+")[0].split(".") if x.isdigit())

    return bool(version and than and parts(version) < parts(than))


def skew_error(host: str, theirs: object) -> RemoteEnvironmentError:
    return RemoteEnvironmentError(
        f"{host} answered in another form (protocol {theirs}) than this tether speaks "
        f"(protocol {PROTOCOL})",
        hint=f"Run `tether down {host}`, then `tether up {host}` (both sides of tether "
             "must be the same version).", host=host)


def check_protocol(host: str, answer: Mapping[str, Any]) -> None:
    """An answer of another protocol is refused where it enters (an error event is read anyway:
    its message is all it carries)."""
    if answer.get("event") == "result" and answer.get("protocol") != PROTOCOL:
        raise skew_error(host, answer.get("protocol"))


@dataclass(frozen=True)
class ServerInfo:
    """A running remote server, as the remote reported it (parsed once, where it enters)."""

    pid: int
    token: str = field(repr=False)
    sock: str = ""
    port: int = 0
    version: str = ""
    started: float = 0.0
    instance: str = ""
    root_dir: str = ""
    adopted: tuple[str, ...] = ()  # kernel ids it took over from the server before it
    lost: tuple[str, ...] = ()  # kernels that had ended while no server ran (said once)

    @classmethod
    def from_payload(cls, host: str, data: Any) -> ServerInfo:
        """Validate a ``server`` object; anything malformed is one clear error."""
        try:
            pid, token = int(data["pid"]), str(data["token"])
            sock, port = str(data.get("sock") or ""), int(data.get("port") or 0)
        except (KeyError, TypeError, ValueError) as e:
            raise RemoteEnvironmentError(
                f"{host} described its server in a form this tether does not understand",
                hint=f"Run `tether down {host}`, then `tether up {host}` (both sides of tether "
                     "must be the same version).", host=host) from e
        if not token or (not sock and not 0 < port < 65536):
            raise RemoteEnvironmentError(f"{host} reported a server without a token or address",
                                         hint=f"Run `tether up {host}` again.", host=host)
        return cls(pid, token, sock, port, str(data.get("version") or ""),
                   float(data.get("started") or 0.0), str(data.get("instance") or ""),
                   str(data.get("root_dir") or ""), _strings(data.get("adopted")),
                   _strings(data.get("lost")))

    @property
    def address(self) -> str:
        """What the tunnel forwards to: the Unix socket, else the loopback port."""
        return self.sock or f"127.0.0.1:{self.port}"


def _strings(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in value) if isinstance(value, list) else ()


@dataclass(frozen=True)
class UpResult:
    """What ``up`` found or started on a host."""

    server: ServerInfo
    reused: bool
    warnings: tuple[str, ...] = ()
    kernel_python: str = ""

    @classmethod
    def from_payload(cls, host: str, result: Mapping[str, Any]) -> UpResult:
        warnings = result.get("warnings") or ()
        return cls(ServerInfo.from_payload(host, result.get("server")),
                   bool(result.get("reused")),
                   tuple(str(w).replace("HOST", host) for w in warnings),
                   str(result.get("kernel_python") or ""))


@dataclass(frozen=True)
class RestartResult:
    """What ``restart`` did on a host: the new server, and what became of the kernels."""

    server: ServerInfo
    replaced: tuple[int, ...] = ()  # pids of the servers it stopped (none: it only started one)
    old_version: str = ""
    kernels_before: tuple[str, ...] = ()  # ids of the kernels that were running
    warnings: tuple[str, ...] = ()

    @property
    def kept(self) -> tuple[str, ...]:
        return self.server.adopted

    @property
    def lost(self) -> tuple[str, ...]:
        """Kernels that were running and did not come back (ids where no notebook is known)."""
        missing = [k for k in self.kernels_before if k not in self.server.adopted]
        return (*self.server.lost, *(k[:8] for k in missing if k[:8] not in self.server.lost))

    @classmethod
    def from_payload(cls, host: str, result: Mapping[str, Any]) -> RestartResult:
        replaced = result.get("restarted")
        return cls(ServerInfo.from_payload(host, result.get("server")),
                   tuple(int(p) for p in replaced) if isinstance(replaced, list) else (),
                   str(result.get("old_version") or ""), _strings(result.get("kernels_before")),
                   tuple(str(w).replace("HOST", host) for w in result.get("warnings") or ()))
