"""The life-cycle API, under ``<base_url>/tether/api/`` (token required, like every API).

- ``GET  kernels``                 kernels with process trees, RSS, GPU memory, state, connections,
                                   last activity and notebook; GPUs; foreign GPU holders; orphans
- ``POST kernels/<id>/release``    ``{"force": bool, "background": bool}``: release one kernel
                                   (``background``: answer 202 at once, as the kernel's own
                                   ``tether.release()`` does: it dies during the request)
- ``POST release``                 ``{"force": bool, "stop_server": bool}``: release everything

and the status page at ``<base_url>/tether/`` that drives them from a browser.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

import tornado.web
from jupyter_core.utils import ensure_async
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.utils import url_path_join

from tether.remote import release as rel
from tether.remote.lifecycle import DEFAULT_GRACE, ServerContext, server_context

log = logging.getLogger(__name__)
NAMESPACE = "tether/api"
SETTINGS_KEY = "tether_lifecycle"


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
        self.idle_watcher: Any = None  # tether.remote.idle.IdleWatcher, when one is configured

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
        inv = await asyncio.to_thread(self._inventory)
        return {kid: rel.kernel_memory(rows) for kid, rows in inv["kernels"].items()}

    def _inventory(self) -> dict[str, Any]:
        return rel.inventory(self.records(), self.ctx)

    async def listing(self) -> dict[str, Any]:
        inv = await asyncio.to_thread(self._inventory)
        sessions = await self.sessions_by_kernel()
        kernels = []
        for kid in list(self.km.list_kernel_ids()):
            try:
                model = self.km.kernel_model(kid)
            except (KeyError, tornado.web.HTTPError):
                continue  # shut down meanwhile
            procs = inv["kernels"].get(kid, [])
            rss, gpu_bytes = rel.kernel_memory(procs)
            session = sessions.get(kid, {})
            kernels.append({**model, "path": session.get("path"), "session": session.get("id"),
                            "pid": getattr(self.km.get_kernel(kid).provisioner, "pid", None),
                            "rss": rss, "gpu_memory": gpu_bytes, "processes": procs,
                            "gpus": sorted({i for p in procs for i in p["gpus"]})})
        return {"server": {"pid": os.getpid(), "instance": self.ctx.instance},
                "kernels": kernels, "gpus": inv["gpus"], "foreign": inv["foreign"],
                "orphans": self.orphans}


class _Handler(APIHandler):
    @property
    def lifecycle(self) -> Lifecycle:
        lifecycle: Lifecycle = self.settings[SETTINGS_KEY]
        return lifecycle

    def body(self) -> dict[str, Any]:
        data = self.get_json_body() if self.request.body else {}
        if not isinstance(data, dict):
            raise tornado.web.HTTPError(400, "a JSON object is expected")
        return data

    def write_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(json.dumps(data))


class KernelsHandler(_Handler):
    _track_activity = False  # looking (``tether ps``) does not keep an idle server alive

    @tornado.web.authenticated
    async def get(self) -> None:
        self.write_json(await self.lifecycle.listing())


class ReleaseKernelHandler(_Handler):
    @tornado.web.authenticated
    async def post(self, kernel_id: str) -> None:
        body = self.body()
        if kernel_id not in self.lifecycle.km:
            raise tornado.web.HTTPError(404, f"no kernel {kernel_id}")
        force = bool(body.get("force"))
        releaser = self.lifecycle.releaser
        if body.get("background"):
            releaser.spawn(releaser.release(kernel_id, force), f"release {kernel_id}")
            self.write_json({"kernel": kernel_id, "message": f"releasing kernel {kernel_id}: it "
                             "shuts down now, with every process it started"}, 202)
            return
        outcome = await releaser.release(kernel_id, force)
        self.write_json(outcome.to_json())


class ReleaseAllHandler(_Handler):
    @tornado.web.authenticated
    async def post(self) -> None:
        body = self.body()
        result = await self.lifecycle.releaser.release_all(force=bool(body.get("force")))
        stop = bool(body.get("stop_server"))
        result["server_stopping"] = stop
        self.write_json(result)
        if stop:
            log.info("release --all asked the server to stop")
            serverapp = self.lifecycle.serverapp
            serverapp.io_loop.add_callback(serverapp.stop)


PAGE = Path(__file__).with_name("page") / "index.html"


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
        self.finish(PAGE.read_bytes())


def handlers(base_url: str) -> list[tuple[str, type[tornado.web.RequestHandler]]]:
    api = url_path_join(base_url, NAMESPACE)
    return [
        (url_path_join(base_url, "tether/?"), StatusPageHandler),
        (url_path_join(api, "kernels"), KernelsHandler),
        (url_path_join(api, r"kernels/(?P<kernel_id>[\w-]+)/release"), ReleaseKernelHandler),
        (url_path_join(api, "release"), ReleaseAllHandler),
    ]
