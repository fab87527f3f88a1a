"""The life-cycle API, under ``<base_url>/tether/api/`` (token required, like every API).

- ``GET  kernels[?max_age=S]``     kernels with process trees, RSS, CPU %, GPU memory and
                                   utilisation, state, connections, last activity, notebook, and
                                   what the idle policy will do; GPUs with 10 minutes of history;
                                   host memory and disk; uptime; Slurm walltime; foreign GPU
                                   holders; orphans. ``max_age`` (the page: 1): the process and
                                   GPU part may be that many seconds old (shared by every caller)
- ``POST kernels/<id>/release``    ``{"force": bool, "background": bool}``: release one kernel
                                   (``background``: answer 202 at once, as the kernel's own
                                   ``tether.release()`` does: it dies during the request); the
                                   outcome says what was ``freed`` (pids, RSS, GPU bytes)
- ``POST release``                 ``{"force": bool, "stop_server": bool}``: release everything

Interrupt and restart are jupyter_server's own ``POST /api/kernels/<id>/interrupt|restart``.

and the status page at ``<base_url>/tether/`` that drives them from a browser.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

import tornado.web
from jupyter_core.utils import ensure_async
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.utils import url_path_join

from tether import identity
from tether.remote import release as rel
from tether.remote.idle import IdlePolicy, KernelFacts, KernelMonitor, holds_gpu
from tether.remote.lifecycle import DEFAULT_GRACE, ServerContext, server_context

log = logging.getLogger(__name__)
NAMESPACE = "tether/api"
SETTINGS_KEY = "tether_lifecycle"
MAX_AGE_LIMIT = 5.0  # seconds a caller may accept as the age of the shared snapshot
RELEASE_SNAPSHOT_AGE = 2.0  # what a kernel held, for "freed", may be this old
SCONTROL_TIMEOUT = 10.0
SLURM_RECHECK = 60.0  # the job's end time can move (scontrol update): read it again this often


class Lifecycle:
    """The server side of ``ps``/``release``: one per server, kept in the web app's settings."""

    def __init__(self, serverapp: Any, grace: float = DEFAULT_GRACE,
                 verify_timeout: float = rel.VERIFY_TIMEOUT,
                 ctx: ServerContext | None = None) -> None:
        self.serverapp = serverapp
        self.ctx = ctx or server_context()
        self.releaser = rel.Releaser(serverapp.kernel_manager, self.delete_kernel, self.ctx,
                                     grace=grace, verify_timeout=verify_timeout)
        self.orphans: list[dict[str, Any]] = []  # found by the reaper at start
        # (adopted, lost): kernels of a gone server (tether.remote.adopt), once done
        self.adoption: tuple[list[Any], list[Any]] | None = None
        self.idle_watcher: Any = None  # tether.remote.idle.IdleWatcher, when one is configured
        self.policy = IdlePolicy(0.0, 0.0)  # set by the extension from the culler's knobs
        self.monitor: KernelMonitor | None = None  # the GPU-aware idle policy, once started
        self.started = time.time()
        self._snapshot: tuple[float, dict[str, Any]] | None = None
        self._pending: asyncio.Future[dict[str, Any]] | None = None
        self._cpu: dict[int, tuple[float, float, float]] = {}  # pid -> (created, cpu s, when)
        self._cpu_lock = threading.Lock()
        self._slurm = SlurmClock(os.environ)

    @property
    def km(self) -> Any:
        return self.serverapp.kernel_manager

    async def sessions_by_kernel(self) -> dict[str, dict[str, Any]]:
        sessions = await ensure_async(self.serverapp.session_manager.list_sessions())
        return {s["kernel"]["id"]: s for s in sessions if s.get("kernel")}

    async def delete_kernel(self, kernel_id: str) -> None:
        """What Jupyter's own "Close and Halt" does: delete the session, else the kernel."""
        session = (await self.sessions_by_kernel()).get(kernel_id)
        if session is not None:
            await ensure_async(self.serverapp.session_manager.delete_session(session["id"]))
        else:
            await ensure_async(self.km.shutdown_kernel(kernel_id))

    def records(self) -> dict[str, Any]:
        found = {}
        for kid in list(self.km.list_kernel_ids()):
            try:
                record = self.releaser.record(kid, remember=False)
            except KeyError:
                continue
            if record is not None:
                found[kid] = record
        return found

    async def usage(self) -> dict[str, tuple[int, int]]:
        """kernel id -> (RSS bytes, GPU bytes), for ``/api/colab/resources``."""
        inv = await self.snapshot()
        return {kid: rel.kernel_memory(rows) for kid, rows in inv["kernels"].items()}

    async def snapshot(self, max_age: float = 0.0) -> dict[str, Any]:
        """Process trees, GPUs, CPU use and host facts; at most ``max_age`` seconds old.

        With ``max_age`` every caller within that age (pages refreshing each second, the idle
        monitor) shares one inventory, taken in a thread: the loop never blocks on it.
        """
        if max_age > 0:
            if self._snapshot is not None and time.monotonic() - self._snapshot[0] <= max_age:
                return self._snapshot[1]
            if self._pending is not None:
                return await asyncio.shield(self._pending)
        pending: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        if max_age > 0:
            self._pending = pending
        try:
            taken = await asyncio.to_thread(self._take, self.records())
        except asyncio.CancelledError:
            pending.cancel()
            raise
        except Exception as e:
            pending.set_exception(e)
            pending.exception()  # retrieved: the waiters (if any) get it too
            raise
        finally:
            if self._pending is pending:
                self._pending = None
        self._snapshot = (time.monotonic(), taken)
        pending.set_result(taken)
        return taken

    def _take(self, records: dict[str, Any]) -> dict[str, Any]:
        inv = rel.inventory(records, self.ctx)
        now = time.time()
        with self._cpu_lock:  # callers that want a fresh inventory may take two at once
            inv["cpu"] = {kid: self._cpu_percent(rows, now) for kid, rows in inv["kernels"].items()}
            seen = {row["pid"] for rows in inv["kernels"].values() for row in rows}
            for pid in set(self._cpu) - seen:
                del self._cpu[pid]
        inv["started"] = {kid: r.started for kid, r in records.items()}
        inv["host"] = host_facts(self.serverapp.root_dir)
        inv["slurm"] = self._slurm.read(now)
        inv["taken"] = now
        return inv

    def _cpu_percent(self, rows: list[dict[str, Any]], now: float) -> float:
        """CPU % of a process tree since the previous look (since each process began, at first)."""
        total = 0.0
        for row in rows:
            try:
                proc = psutil.Process(row["pid"])
                with proc.oneshot():
                    created = identity.started(proc)
                    times = proc.cpu_times()
            except psutil.Error:
                continue
            used = times.user + times.system
            was = self._cpu.get(row["pid"])
            if was is None or was[0] != created:
                was = (created, 0.0, created)
            self._cpu[row["pid"]] = (created, used, now)
            if now > was[2]:
                total += 100.0 * (used - was[1]) / (now - was[2])
        return round(total, 1)

    def kernel_facts(self, snapshot: dict[str, Any]) -> dict[str, KernelFacts]:
        """What the idle policy looks at, for every kernel still known to the manager."""
        monitor = self.monitor
        facts = {}
        for kid, rows in snapshot["kernels"].items():
            try:
                model = self.km.kernel_model(kid)
            except (KeyError, tornado.web.HTTPError):
                continue  # shut down meanwhile
            facts[kid] = KernelFacts(
                state=str(model.get("execution_state", "")),
                connections=int(model.get("connections", 0)),
                last_activity=_epoch(model.get("last_activity")),
                holds_gpu=holds_gpu(rows),
                gpu_busy=bool(monitor and (monitor.gpu_utilization(rows) or 0) > 0),
                gpu_busy_at=monitor.gpu_busy_at.get(kid, 0.0) if monitor else 0.0,
                util_known=bool(monitor and monitor.util is not None))
        return facts

    async def listing(self, max_age: float = 0.0) -> dict[str, Any]:
        inv = await self.snapshot(max_age)
        sessions = await self.sessions_by_kernel()
        monitor = self.monitor
        now = time.time()
        verdicts = monitor.verdicts(inv, now) if monitor else {}
        kernels = []
        for kid in list(self.km.list_kernel_ids()):
            try:
                model = self.km.kernel_model(kid)
            except (KeyError, tornado.web.HTTPError):
                continue  # shut down meanwhile
            procs = inv["kernels"].get(kid, [])
            rss, gpu_bytes = rel.kernel_memory(procs)
            session = sessions.get(kid, {})
            started = inv["started"].get(kid)
            uptime = round(identity.age(started), 1) if started else None
            verdict = verdicts.get(kid)
            kernels.append({**model, "path": session.get("path"), "session": session.get("id"),
                            "pid": getattr(self.km.get_kernel(kid).provisioner, "pid", None),
                            "rss": rss, "gpu_memory": gpu_bytes, "processes": procs,
                            "gpus": sorted({i for p in procs for i in p["gpus"]}),
                            # epoch (the record's start counts from boot)
                            "started": round(now - uptime, 1) if uptime is not None else None,
                            "uptime": uptime,
                            "cpu_percent": inv["cpu"].get(kid),
                            "gpu_utilization": monitor.gpu_utilization(procs) if monitor else None,
                            "idle": verdict.to_json(now) if verdict else None})
        policy = monitor.policy if monitor else None
        return {"server": {"pid": os.getpid(), "instance": self.ctx.instance,
                           "cgroup": self.ctx.cgroup,  # "" where releases cannot be verified
                           "started": self.started, "uptime": round(now - self.started, 1),
                           "idle_timeout": policy.idle_timeout if policy else 0,
                           "gpu_idle_timeout": policy.gpu_idle_timeout if policy else 0,
                           "sampled": inv["taken"]},
                "host": inv["host"], "slurm": _slurm_left(inv["slurm"], now),
                "kernels": kernels, "gpus": inv["gpus"], "foreign": inv["foreign"],
                "gpu_history": {"interval": monitor.interval if monitor else None,
                                "samples": list(monitor.history) if monitor else []},
                "orphans": self.orphans}

    async def release_logged(self, kernel_id: str, reason: str, force: bool = False) -> dict[str, Any]:
        """The verified release (the buttons, ``tether release``, the idle policy), with what
        it freed, logged."""
        before = (await self.snapshot(RELEASE_SNAPSHOT_AGE))["kernels"].get(kernel_id, [])
        outcome = (await self.releaser.release(kernel_id, force)).to_json()
        outcome["freed"] = freed(before, outcome)
        log_freed(kernel_id, reason, outcome)
        return outcome

    async def release_all_logged(self, reason: str, force: bool = False) -> dict[str, Any]:
        before = (await self.snapshot(RELEASE_SNAPSHOT_AGE))["kernels"]
        result = await self.releaser.release_all(force=force)
        for outcome in result["kernels"]:
            outcome["freed"] = freed(before.get(outcome["kernel"], []), outcome)
            log_freed(outcome["kernel"], reason, outcome)
        return result


def freed(before: list[dict[str, Any]], outcome: dict[str, Any]) -> dict[str, Any]:
    """What a release gave back: the processes it ended, and their RSS and GPU memory."""
    left = {r["pid"] for r in outcome.get("leftovers", [])}
    gone = [r for r in before if r["pid"] not in left]
    pids = {r["pid"] for r in gone} | set(outcome.get("terminated", [])) | \
        set(outcome.get("killed", []))
    rss, gpu_bytes = rel.kernel_memory(gone)
    return {"pids": sorted(pids - left), "rss": rss, "gpu_memory": gpu_bytes}


def log_freed(kernel_id: str, reason: str, outcome: dict[str, Any]) -> None:
    f = outcome["freed"]
    log.warning("kernel %s released (%s): %s; %d process(es) ended %s, %d MiB of GPU memory "
                "and %d MiB of RAM freed", kernel_id, reason,
                "clean" if outcome["released"] else f"{len(outcome['leftovers'])} leftover(s)",
                len(f["pids"]), f["pids"], f["gpu_memory"] // rel.MIB, f["rss"] // rel.MIB)


def _epoch(iso: Any) -> float:
    if isinstance(iso, datetime):
        return iso.timestamp()
    if not iso:
        return 0.0
    return datetime.fromisoformat(str(iso).replace("Z", "+00:00")).timestamp()


def host_facts(root_dir: str) -> dict[str, Any]:
    mem = psutil.virtual_memory()
    path = os.path.abspath(os.path.expanduser(root_dir or "."))
    try:
        disk = psutil.disk_usage(path)
        used, total = disk.used, disk.total
    except OSError:
        used = total = 0
    # the page's title and header: two tabs for two hosts (a Slurm job's node) differ
    return {"name": socket.gethostname(), "memory_total": mem.total,
            "memory_used": mem.total - mem.available, "disk_path": path, "disk_total": total,
            "disk_used": used}


def parse_scontrol_end(text: str) -> float | None:
    """``EndTime=`` of ``scontrol show job -o ID`` (the cluster's local time), as epoch."""
    for field in text.split():
        key, _, value = field.partition("=")
        if key == "EndTime":
            try:
                return datetime.fromisoformat(value).timestamp()
            except ValueError:
                return None  # "Unknown", "None"
    return None


class SlurmClock:
    """The Slurm job this server runs in, and when its walltime ends (None outside a job)."""

    def __init__(self, environ: Any) -> None:
        self.job = str(environ.get("SLURM_JOB_ID", ""))
        end = str(environ.get("SLURM_JOB_END_TIME", ""))
        self.end: float | None = float(end) if end.isdigit() else None
        self._fixed = self.end is not None
        self._checked = 0.0

    def read(self, now: float) -> dict[str, Any] | None:
        """Blocking (``scontrol``, bounded): call it from a thread."""
        if not self.job:
            return None
        if not self._fixed and now - self._checked >= SLURM_RECHECK:
            self._checked = now
            try:
                out = subprocess.run(["scontrol", "show", "job", "-o", self.job],
                                     capture_output=True, text=True, timeout=SCONTROL_TIMEOUT,
                                     check=True).stdout
                self.end = parse_scontrol_end(out)
            except (OSError, subprocess.SubprocessError) as e:
                log.info("scontrol show job %s failed: %s", self.job, e)
        return {"job_id": self.job, "end_time": self.end}


def _slurm_left(job: dict[str, Any] | None, now: float) -> dict[str, Any] | None:
    if job is None:
        return None
    end = job["end_time"]
    return {**job, "seconds_left": None if end is None else max(0.0, round(end - now))}


class _Handler(APIHandler):
    @property
    def lifecycle(self) -> Lifecycle:
        lifecycle: Lifecycle = self.settings[SETTINGS_KEY]
        return lifecycle

    def body(self) -> dict[str, Any]:
        data = self.get_json_body() if self.request.body else {}
        if not isinstance(data, dict):
            raise tornado.web.HTTPError(400, "a JSON object is expected")
        for name in ("force", "background", "stop_server"):  # JSON true/false, nothing truthy
            if not isinstance(data.get(name, False), bool):
                raise tornado.web.HTTPError(
                    400, f"{name!r} must be JSON true or false, not {data[name]!r}")
        return data

    def write_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(json.dumps(data))


class KernelsHandler(_Handler):
    _track_activity = False  # looking (``tether ps``) does not keep an idle server alive

    @tornado.web.authenticated
    async def get(self) -> None:
        try:
            max_age = min(MAX_AGE_LIMIT, max(0.0, float(self.get_argument("max_age", "0"))))
        except ValueError as e:
            raise tornado.web.HTTPError(400, "max_age is a number of seconds") from e
        self.write_json(await self.lifecycle.listing(max_age))


class ReleaseKernelHandler(_Handler):
    @tornado.web.authenticated
    async def post(self, kernel_id: str) -> None:
        body = self.body()
        if kernel_id not in self.lifecycle.km:
            raise tornado.web.HTTPError(404, f"no kernel {kernel_id}")
        force = body.get("force", False)
        releaser = self.lifecycle.releaser
        if body.get("background"):
            releaser.spawn(self.lifecycle.release_logged(kernel_id, "asked by the kernel", force),
                           f"release {kernel_id}")
            self.write_json({"kernel": kernel_id, "message": f"releasing kernel {kernel_id}: it "
                             "shuts down now, with every process it started"}, 202)
            return
        self.write_json(await self.lifecycle.release_logged(kernel_id, "asked", force))


class ReleaseAllHandler(_Handler):
    @tornado.web.authenticated
    async def post(self) -> None:
        body = self.body()
        result = await self.lifecycle.release_all_logged("release all", body.get("force", False))
        stop = body.get("stop_server", False)
        result["server_stopping"] = stop
        self.write_json(result)
        if stop:
            log.info("release --all asked the server to stop")
            serverapp = self.lifecycle.serverapp
            serverapp.io_loop.add_callback(serverapp.stop)


PAGE = Path(__file__).with_name("page") / "index.html"
# the page is one file: nothing from elsewhere (the VM may have no internet), no framing
PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'")


class StatusPageHandler(JupyterHandler):
    """``<base_url>/tether/?token=...``: the kernels and GPUs, with the buttons Colab lacks.

    A static page (no CDN); its script calls the API above with the token from its own URL.
    """

    _track_activity = False  # looking at the page does not keep an idle server alive

    @tornado.web.authenticated
    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header("Referrer-Policy", "no-referrer")  # the URL carries the token
        self.set_header("Content-Security-Policy", PAGE_CSP)
        self.finish(PAGE.read_bytes())


def handlers(base_url: str) -> list[tuple[str, type[tornado.web.RequestHandler]]]:
    api = url_path_join(base_url, NAMESPACE)
    return [
        (url_path_join(base_url, "tether/?"), StatusPageHandler),
        (url_path_join(api, "kernels"), KernelsHandler),
        (url_path_join(api, r"kernels/(?P<kernel_id>[\w-]+)/release"), ReleaseKernelHandler),
        (url_path_join(api, "release"), ReleaseAllHandler),
    ]
