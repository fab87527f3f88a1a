"""Start a Colab-ready jupyter_server in this process (the engine of ``tether serve``)."""

from __future__ import annotations

import errno
import importlib.abc
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from traitlets.config import Config

from tether.config import DEFAULT_CULL_INTERVAL, DEFAULT_SHUTDOWN_WAIT, ServeConfig
from tether.errors import ConfigError, PortInUseError, ServerStartError
from tether.remote import redact
from tether.remote.extension import READY_CALLBACK, origin_pattern
from tether.remote.state import ServerState, running_servers

log = logging.getLogger(__name__)

TOKEN_ENV = "JUPYTER_TOKEN"
# The optional format checkers of jsonschema, imported through jupyter_events: rfc3987_syntax
# compiles a grammar for ~1.25 s at import (jupyter_server#1559), the others (arrow through
# isoduration) cost ~30 ms more of every start. No event schema of jupyter_server uses a
# format, jsonschema treats each as optional, and nothing else in tether's environment
# imports them.
SLOW_OPTIONAL_MODULES = ("rfc3987_syntax", "isoduration", "fqdn", "jsonpointer",
                         "rfc3339_validator", "rfc3986_validator", "uri_template", "webcolors")
SOCKET_PROBE_TIMEOUT = 2.0  # a live server accepts at once; a stale socket refuses at once


class _Unimportable(importlib.abc.MetaPathFinder):
    def __init__(self, names: Sequence[str]) -> None:
        self.names = frozenset(names)

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
        if fullname.split(".")[0] in self.names:
            raise ImportError(f"{fullname} is disabled in tether's server for start-up speed")
        return None


def skip_slow_imports() -> None:
    if not any(isinstance(f, _Unimportable) for f in sys.meta_path):
        sys.meta_path.insert(0, _Unimportable(SLOW_OPTIONAL_MODULES))


def check_port_free(ip: str, port: int) -> None:
    """Raise PortInUseError if ``ip:port`` is taken: Jupyter must never move to another port."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                owner = next((srv for srv in running_servers() if srv.port == port), None)
                what = f"tether's own server (pid {owner.pid})" if owner else "another program"
                raise PortInUseError(
                    f"port {port} on {ip} is already in use by {what}",
                    hint="Stop it or pick another port with --port N.",
                    port=port,
                ) from e
            raise ConfigError(f"cannot listen on {ip}:{port}: {e.strerror}") from e


def check_socket_path(sock: Path) -> None:
    """Make ``sock`` free to listen on: only a stale socket of ours is ever removed.

    Anything else at the path (a regular file, a directory, another user's socket, a socket a
    server still answers on) is the user's and is left alone: an error says what to do.
    """
    try:
        st = sock.lstat()
    except FileNotFoundError:
        sock.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        return
    except OSError as e:
        raise ConfigError(f"cannot use --sock {sock}: {e.strerror}") from e
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(
            f"--sock {sock} exists and is not a socket; tether never replaces it",
            hint="Pick a path that does not exist yet, e.g. --sock /tmp/tether-$USER.sock.",
        )
    if st.st_uid != os.geteuid():
        raise ConfigError(
            f"--sock {sock} is a socket of another user (uid {st.st_uid})",
            hint="Pick a path of your own with --sock PATH.",
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(SOCKET_PROBE_TIMEOUT)
        try:
            s.connect(str(sock))
        except (ConnectionRefusedError, FileNotFoundError):
            sock.unlink(missing_ok=True)  # nothing listens: a stale socket of a server of ours
            return
        except OSError as e:
            raise ConfigError(f"cannot use --sock {sock}: {e.strerror or e}") from e
    raise PortInUseError(
        f"socket {sock} is already served by another process",
        hint="Stop that server or pick another path with --sock PATH.",
    )


def jupyter_config(cfg: ServeConfig) -> Config:
    """The traitlets config for a tether server: jupyter_server's own knobs, set in one place."""
    c = Config()
    app = c.ServerApp
    app.open_browser = False
    app.port_retries = 0
    app.allow_root = os.geteuid() == 0
    app.allow_origin_pat = origin_pattern(list(cfg.origins))
    app.allow_credentials = True
    app.jpserver_extensions = {"tether.remote": True}
    # each kernel's sessions kept beside it, for the server that adopts it (tether.remote.adopt)
    app.session_manager_class = "tether.remote.sessions.KeptSessionManager"
    app.log_level = cfg.log_level
    if cfg.sock is not None:
        app.sock = str(cfg.sock)
        app.sock_mode = "0600"
    else:
        app.ip = cfg.ip
        app.port = cfg.port
    if cfg.allow_remote_access:
        app.allow_remote_access = True
    if cfg.notebook_dir is not None:
        app.root_dir = str(cfg.notebook_dir)
    c.Tether.origins = list(cfg.origins)
    # Idle policy and shutdown (docs/kernel-gpu-lifecycle.md): never cull a busy kernel or an
    # open tab; give kernels time to let go of the GPU.
    km = c.MappingKernelManager
    km.cull_idle_timeout = cfg.idle_timeout
    km.cull_interval = (min(DEFAULT_CULL_INTERVAL, max(1, cfg.idle_timeout // 2))
                        if cfg.idle_timeout else DEFAULT_CULL_INTERVAL)
    km.cull_connected = False
    km.cull_busy = False
    c.KernelManager.shutdown_wait_time = DEFAULT_SHUTDOWN_WAIT
    # ZMQ over loopback TCP lets every local user read a kernel's iopub (code and output):
    # Unix sockets in the 0700 runtime dir instead (the provisioner picks a short enough path)
    c.KernelManager.transport = "ipc"
    # The extension makes the sweeping provisioner the default (docs/kernel-gpu-lifecycle.md).
    c.SweepingProvisioner.grace = cfg.kill_grace
    c.Tether.gpu_idle_timeout = cfg.gpu_idle_timeout  # sooner, for kernels holding GPU memory
    c.Tether.stop_after_idle = cfg.stop_after_idle
    c.Tether.on_idle = cfg.on_idle or ""
    c.Tether.reap = cfg.reap
    return c


def _stop_on_sigint(app: Any) -> None:
    """First Ctrl-C: graceful stop (kernels shut down); second: the default, immediate exit.

    jupyter_server only handles SIGINT when stdin is a terminal (and then asks for confirmation);
    without one, Python's KeyboardInterrupt would end the loop without shutting kernels down.
    """

    def graceful(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        app.stop(from_signal=True)

    signal.signal(signal.SIGINT, graceful)


def serve(cfg: ServeConfig, on_ready: Callable[[ServerState], None]) -> None:
    """Run a tether server until it is stopped (Ctrl-C or SIGTERM); kernels are shut down."""
    skip_slow_imports()  # before the first import of jupyter_server, or it is too late
    from jupyter_server.serverapp import ServerApp

    if cfg.notebook_dir is not None and not cfg.notebook_dir.is_dir():
        raise ConfigError(
            f"notebook directory {cfg.notebook_dir} does not exist",
            hint="Create it or pass another --notebook-dir.",
        )
    if cfg.sock is not None:
        check_socket_path(cfg.sock)
    else:
        check_port_free(cfg.ip, cfg.port)
    redact.install(cfg.token)  # before anything can log it
    app = ServerApp.instance(config=jupyter_config(cfg))
    # The token goes in through the environment, read once at initialize and removed at once:
    # a traitlets Config would be logged verbatim at debug level, and kernels inherit os.environ.
    os.environ[TOKEN_ENV] = cfg.token
    try:
        app.initialize(argv=[])
    except SystemExit as e:  # jupyter_server exits on bind and config errors
        raise ServerStartError("the Jupyter server failed to start", hint="See the log above.") from e
    finally:
        os.environ.pop(TOKEN_ENV, None)

    app.web_app.settings[READY_CALLBACK] = on_ready
    _stop_on_sigint(app)
    try:
        app.start()
    finally:
        ServerApp.clear_instance()
