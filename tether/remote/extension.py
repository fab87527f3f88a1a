"""The jupyter_server extension: makes any Jupyter server in this environment Colab-ready.

Enabled automatically on install (``etc/jupyter/jupyter_server_config.d/tether.json``), so a
``jupyter server`` or ``jupyter lab`` started by hand gets the same CORS, preflight, ``/api/colab``,
bridge and life-cycle endpoints as ``tether serve``.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

import psutil
from traitlets import Bool, Float, Int, List, Unicode
from traitlets.config import LoggingConfigurable

from tether import __version__, identity
from tether.config import COLAB_ORIGIN, check_origin
from tether.remote import adopt, api, bridge, cgroups, colab, lifecycle, redact
from tether.remote.idle import IdlePolicy, KernelMonitor
from tether.remote.state import ServerState, remove_state, state_path, write_state


# ``tether serve`` puts a callable here to learn when the server is bound and its state written
READY_CALLBACK = "tether_on_ready"


class Tether(LoggingConfigurable):
    """Settings of the tether extension (``c.Tether.*`` in a Jupyter config file)."""

    origins = List(
        Unicode(),
        default_value=[COLAB_ORIGIN],
        help="Exact browser origins allowed to use this server (CORS and websockets).",
    ).tag(config=True)

    bridge = Bool(
        True, help="Serve the legacy HTTP-over-WebSocket protocol (jupyter_http_over_ws 0.0.7)."
    ).tag(config=True)

    sweep_kernels = Bool(
        True, help="Make tether's sweeping provisioner the default (unless one is configured)."
    ).tag(config=True)

    reap = Bool(
        False, help="At start, kill (not only report) processes left by a crashed tether server."
    ).tag(config=True)

    stop_after_idle = Int(
        0, help="Stop the server after this many seconds with no kernels and no activity; 0: never."
    ).tag(config=True)

    on_idle = Unicode(
        "", help="Shell command run once when the server has been idle for stop_after_idle "
        "seconds, before it stops (e.g. power off or deallocate the VM)."
    ).tag(config=True)

    ipc_kernels = Bool(
        True, help="Kernels listen on Unix sockets in a private directory (ZMQ ipc transport), "
        "never on a TCP port that every local user can connect to."
    ).tag(config=True)

    kernel_cgroups = Bool(
        True, help="Start each kernel in a cgroup v2 of its own where this user may create "
        "one, so that a release ends every process the kernel started."
    ).tag(config=True)

    gpu_idle_timeout = Int(
        1800, help="Seconds before an idle kernel that holds GPU memory is released (sooner than "
        "MappingKernelManager.cull_idle_timeout, which then applies to the others); a kernel "
        "whose processes use a GPU is never idle. 0: the general timeout for every kernel."
    ).tag(config=True)

    keep_kernels = Bool(
        True, help="Kernels outlive the server when it ends by SIGTERM or a crash, and the next "
        "server of this runtime dir adopts them (inside a Slurm job too: the job script starts "
        "the next one; the kernels still end with the job). Off: SIGTERM shuts the kernels "
        "down."
    ).tag(config=True)

    verify_timeout = Float(
        30.0, help="Seconds a release waits for the kernel's GPU memory to be given back."
    ).tag(config=True)


def origin_pattern(origins: list[str]) -> str:
    """An anchored regex matching exactly these origins (jupyter_server takes one pattern)."""
    return "^(" + "|".join(re.escape(o) for o in origins) + ")$"


def server_state(serverapp: Any, origins: list[str], adopted: Sequence[adopt.KeptKernel] = (),
                 lost: Sequence[adopt.KeptKernel] = ()) -> ServerState:
    ctx = lifecycle.server_context()
    base = serverapp.connection_url
    if not serverapp.sock:
        host = "[::1]" if ":" in serverapp.ip else "127.0.0.1"
        base = f"http://{host}:{serverapp.port}{serverapp.base_url}"
    return ServerState(
        pid=os.getpid(),
        url=base,
        token=serverapp.identity_provider.token,
        port=0 if serverapp.sock else serverapp.port,
        sock=serverapp.sock or "",
        base_url=serverapp.base_url,
        root_dir=os.path.abspath(serverapp.root_dir),
        version=__version__,
        origins=tuple(origins),
        started=time.time(),
        instance=ctx.instance,
        create_time=psutil.Process().create_time(),
        boot_start=identity.started(psutil.Process()),
        boot_id=identity.boot_id(),
        cgroup=ctx.cgroup,
        adopted=tuple(k.kernel_id for k in adopted),
        lost=tuple(k.label for k in lost),
    )


def _load_jupyter_server_extension(serverapp: Any) -> None:
    # a hand-started server too: no log line of this process shows its token from now on
    redact.install(serverapp.identity_provider.token)
    settings = Tether(parent=serverapp)
    origins = [check_origin(o) for o in settings.origins]
    web_app = serverapp.web_app
    # jupyter_server checks Origin on websockets and non-GET requests from these settings;
    # tether's list wins over anything wider set by hand.
    web_app.settings["allow_origin"] = ""
    web_app.settings["allow_origin_pat"] = re.compile(origin_pattern(origins))
    web_app.settings["allow_credentials"] = True
    colab.install_cors(web_app, origins)

    base_url = serverapp.base_url
    handlers = colab.handlers(base_url)
    if settings.bridge:
        handlers += bridge.handlers(base_url)
    web_app.add_handlers(".*$", handlers)
    _load_lifecycle(serverapp, settings)

    serverapp.log.info("tether %s: Colab-ready for %s", __version__, ", ".join(origins))


def _load_lifecycle(serverapp: Any, settings: Tether) -> None:
    """Sweeping provisioner as the default, the life-cycle API, the kernels' way back to us."""
    from jupyter_client.provisioning.factory import KernelProvisionerFactory

    factory = KernelProvisionerFactory.instance(parent=serverapp)
    explicit = "default_provisioner_name" in serverapp.config.get("KernelProvisionerFactory", {})
    if settings.sweep_kernels and not explicit and not os.environ.get(
        KernelProvisionerFactory.default_provisioner_name_env
    ):
        factory.default_provisioner_name = lifecycle.PROVISIONER_NAME
    ctx = lifecycle.server_context()
    ctx.state_file = str(state_path(os.getpid(), serverapp.runtime_dir))
    ctx.runtime_dir = str(serverapp.runtime_dir)
    ctx.ipc_kernels = settings.ipc_kernels
    if settings.kernel_cgroups and not ctx.cgroup:
        ctx.cgroup = cgroups.server_dir(ctx.instance)
        if ctx.cgroup:
            atexit.register(_remove_cgroups, ctx)
            cgroups.remove_stale(ctx.cgroup, lifecycle.instance_alive)
    ctx.independent = settings.keep_kernels
    if ctx.independent:
        _keep_kernels(serverapp, ctx)
    serverapp.log.info("tether: kernel cgroups %s", ctx.cgroup or "unavailable")
    grace = serverapp.config.get("SweepingProvisioner", {}).get("grace", lifecycle.DEFAULT_GRACE)
    web_app = serverapp.web_app
    service = api.Lifecycle(serverapp, grace=float(grace),
                            verify_timeout=settings.verify_timeout, ctx=ctx)
    web_app.settings[api.SETTINGS_KEY] = service
    web_app.add_handlers(".*$", api.handlers(serverapp.base_url))
    service.policy = _take_over_culling(serverapp.kernel_manager, settings)
    if ctx.independent:
        _adopt_before_listening(serverapp, service)


ADOPT_DEADLINE = 120.0


def _adopt_before_listening(serverapp: Any, service: api.Lifecycle) -> None:
    """Adopt the kernels a gone server left before this one answers a request: a client that
    comes back (Colab) must find its session, or it starts a new kernel. The server binds its
    socket once its loop runs; here the loop is not running yet (where it already runs, an
    embedded server, adoption waits for the extension's start)."""
    import asyncio

    try:
        asyncio.get_running_loop()
        return
    except RuntimeError:
        pass
    try:
        service.adoption = serverapp.io_loop.run_sync(
            lambda: adopt.adopt(serverapp, service.ctx), timeout=ADOPT_DEADLINE)
    except TimeoutError:
        serverapp.log.warning("tether: adopting the kernels of the server before took over "
                              "%.0f s; those not adopted keep running (`tether down` ends them)",
                              ADOPT_DEADLINE)
        service.adoption = ([], [])


def _remove_cgroups(ctx: lifecycle.ServerContext) -> None:
    if not (ctx.keep_kernels and ctx.records):  # kept kernels stay in theirs
        cgroups.remove(ctx.cgroup)


def _keep_kernels(serverapp: Any, ctx: lifecycle.ServerContext) -> None:
    """SIGTERM ends the server, not its kernels (a later server adopts them); every other way
    to stop it (Ctrl-C of `tether serve`, ``/api/shutdown``, ``release --all --stop-server``,
    idle) still shuts them down first. Sessions are kept with the kernels where the server
    runs tether's session manager (``tether serve`` does)."""
    from tether.remote.sessions import KeptSessionManager

    if isinstance(serverapp.session_manager, KeptSessionManager):
        serverapp.session_manager.runtime_dir = ctx.runtime_dir
    shutdown_all = serverapp.cleanup_kernels

    async def cleanup_kernels() -> None:
        if not ctx.keep_kernels:
            await shutdown_all()
            return
        kept = adopt.detach(serverapp.kernel_manager)
        serverapp.log.info("tether: %d kernel(s) keep running for the next server: %s",
                           len(kept), ", ".join(kept) or "-")

    def on_sigterm(signum: int, frame: Any) -> None:
        ctx.keep_kernels = True
        serverapp._signal_stop(signum, frame)

    serverapp.cleanup_kernels = cleanup_kernels
    if threading.current_thread() is threading.main_thread():  # (signals go to that one)
        signal.signal(signal.SIGTERM, on_sigterm)


def _take_over_culling(km: Any, settings: Tether) -> IdlePolicy:
    """tether's monitor culls instead of jupyter_server's, from the same knobs, knowing GPUs.

    Jupyter's culler starts with the first kernel (after this): with its timeout at 0 it never
    does, and every cull is tether's verified release.
    """
    policy = IdlePolicy(idle_timeout=float(km.cull_idle_timeout),
                        gpu_idle_timeout=float(settings.gpu_idle_timeout),
                        cull_busy=bool(km.cull_busy), cull_connected=bool(km.cull_connected))
    km.cull_idle_timeout = 0
    return policy


async def _start_jupyter_server_extension(serverapp: Any) -> None:
    # Runs once the loop is up and the port is bound (port 0 is resolved by then).
    settings = Tether(parent=serverapp)
    runtime_dir = serverapp.runtime_dir
    service: api.Lifecycle = serverapp.web_app.settings[api.SETTINGS_KEY]
    if service.adoption is None and service.ctx.independent:  # (an embedded server)
        service.adoption = await adopt.adopt(serverapp, service.ctx)
    adopted, lost = service.adoption or ([], [])
    state = server_state(serverapp, settings.origins, adopted, lost)
    write_state(state, runtime_dir)
    atexit.register(remove_state, state.pid, runtime_dir)
    await _reap(service, settings.reap, frozenset(k.marker for k in adopted))
    on_ready = serverapp.web_app.settings.get(READY_CALLBACK)
    if on_ready is not None:
        on_ready(state)
    service.monitor = KernelMonitor(service, service.policy, spawn=service.releaser.spawn)
    service.monitor.start()
    if settings.stop_after_idle > 0:
        from tether.remote.idle import IdleWatcher

        service.idle_watcher = IdleWatcher(serverapp, settings.stop_after_idle, settings.on_idle,
                                           spawn=service.releaser.spawn)
        service.idle_watcher.start()
    elif settings.on_idle:
        serverapp.log.warning("tether: on_idle is ignored without stop_after_idle")


async def _reap(service: api.Lifecycle, kill: bool, kept: frozenset[str]) -> None:
    """Report (and with ``reap`` kill) what a crashed tether server of this user left behind."""
    import asyncio

    from tether.remote import release

    ctx = service.ctx
    runtime_dir = os.path.dirname(ctx.state_file) if ctx.state_file else None
    orphans = await asyncio.to_thread(lifecycle.find_orphans, ctx.guard, ctx.instance,
                                      runtime_dir, kept)
    if not orphans:
        return
    rows = await asyncio.to_thread(release.leftover_rows, orphans, {})
    pids = [r["pid"] for r in rows]
    if kill:
        result = await asyncio.to_thread(lifecycle.reap, orphans, ctx.guard, service.releaser.grace)
        lifecycle.log.warning("reaped %d process(es) left by a crashed tether server: %s",
                              len(result.terminated) + len(result.killed), pids)
        rows = await asyncio.to_thread(release.leftover_rows, orphans, {})
    else:
        lifecycle.log.warning("%d process(es) left by a crashed tether server: %s "
                              "(tether serve --reap ends them)", len(rows), pids)
    service.orphans = rows
