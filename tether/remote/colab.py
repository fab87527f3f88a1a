"""What stock jupyter_server lacks for Colab's direct mode (docs/colab-runtime.md, 2 and 3).

- CORS on every response, for exactly the allowed origins (never ``*``), errors included, so a
  wrong token shows up in the browser as a 403 and not as an opaque CORS failure;
- preflights (``OPTIONS``) answered 2xx without a token on every path, ``/`` and ``/tree``
  included, with ``Access-Control-Allow-Private-Network`` when asked (colabtools#5302, #5506);
- no action for a foreign page: a request whose ``Origin`` is neither allowed nor the server's
  own gets 403 before any handler runs, token or not (jupyter_server serves token-authenticated
  requests from any origin, so a page holding a leaked URL could POST ``text/plain`` to
  ``/api/shutdown``). Clients that send no ``Origin`` (jupyter_client, nbclient, VS Code, tether's
  CLI) are not browsers acting for another site and pass as before;
- Colab's own ``/api/colab/*`` endpoints, so its resource monitor shows RAM, disk and GPUs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from typing import Any

import psutil
import tornado.httputil
import tornado.routing
import tornado.web
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join

from tether import __version__
from tether.remote import gpu

log = logging.getLogger(__name__)

XSSI_PREFIX = ")]}'\n"
ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
DEFAULT_ALLOW_HEADERS = "accept, authorization, content-type, x-xsrftoken, x-requested-with"
PREFLIGHT_MAX_AGE = "600"
ORIGINS_KEY = "tether_origins"  # web_app.settings: the exact origins allowed


def cors_headers(origin: str | None, allowed: frozenset[str]) -> dict[str, str]:
    """The CORS grant for ``origin``: empty unless it is exactly one of ``allowed``."""
    if origin is None or origin not in allowed:
        return {}
    return {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Credentials": "true"}


class CorsTransform(tornado.web.OutputTransform):
    """Adds the exact-origin CORS grant and ``Vary: Origin`` to every response of the app."""

    def __init__(self, request: tornado.httputil.HTTPServerRequest, allowed: frozenset[str]):
        super().__init__(request)
        self._origin = request.headers.get("Origin")
        self._allowed = allowed

    def transform_first_chunk(
        self, status_code: int, headers: tornado.httputil.HTTPHeaders, chunk: bytes, finishing: bool
    ) -> tuple[int, tornado.httputil.HTTPHeaders, bytes]:
        grant = cors_headers(self._origin, self._allowed)
        if grant:
            for name, value in grant.items():
                headers[name] = value
        elif "Access-Control-Allow-Origin" in headers:
            # jupyter_server's own allow_origin settings never widen what tether allows
            del headers["Access-Control-Allow-Origin"]
            headers.pop("Access-Control-Allow-Credentials", None)
        if "Origin" not in headers.get_list("Vary"):
            headers.add("Vary", "Origin")
        return status_code, headers, chunk


def own_origin(request: tornado.httputil.HTTPServerRequest) -> str:
    """The origin of pages this server served itself (the status page), as the browser used it.

    Through a tunnel that is the laptop's ``http://127.0.0.1:PORT``, not the server's bind
    address: the Host the browser sent names it. A DNS-rebinding page passes this test, and is
    then refused by jupyter_server's Host check (``allow_remote_access``) and by the token.
    """
    return f"{request.protocol}://{request.host}".lower()


def refused_origin(request: tornado.httputil.HTTPServerRequest,
                   allowed: frozenset[str]) -> str | None:
    """The request's ``Origin`` if it is neither allowed nor the server's own, else None."""
    origin = request.headers.get("Origin")
    if origin is None or origin in allowed or origin.lower() == own_origin(request):
        return None
    return origin


class _OptionsMatcher(tornado.routing.Matcher):
    def match(self, request: tornado.httputil.HTTPServerRequest) -> dict[str, Any] | None:
        return {} if request.method == "OPTIONS" else None


class _ForeignOriginMatcher(tornado.routing.Matcher):
    def __init__(self, allowed: frozenset[str]) -> None:
        self._allowed = allowed

    def match(self, request: tornado.httputil.HTTPServerRequest) -> dict[str, Any] | None:
        return {} if refused_origin(request, self._allowed) is not None else None


class ForeignOriginHandler(tornado.web.RequestHandler):
    """403 for every method: a page of another site gets no action, whatever it carries."""

    def prepare(self) -> None:
        log.warning("refused %s %s from origin %r", self.request.method, self.request.path,
                    self.request.headers.get("Origin"))
        self.set_status(403)
        self.set_header("Content-Type", "text/plain; charset=UTF-8")
        self.finish("Forbidden: this origin is not allowed to use the server.\n")

    def check_xsrf_cookie(self) -> None:
        pass  # refused in prepare already

    def _request_summary(self) -> str:
        return f"{self.request.method} {self.request.path} ({self.request.remote_ip})"


class PreflightHandler(tornado.web.RequestHandler):
    """Answers every ``OPTIONS`` with 204, no token needed: preflights never carry credentials."""

    def initialize(self, allowed: frozenset[str]) -> None:
        self._allowed = allowed

    def options(self, *args: Any, **kwargs: Any) -> None:
        origin = self.request.headers.get("Origin")
        self.set_header("Allow", ALLOW_METHODS)
        if cors_headers(origin, self._allowed):
            asked = self.request.headers.get("Access-Control-Request-Headers", "").strip()
            self.set_header("Access-Control-Allow-Methods", ALLOW_METHODS)
            self.set_header("Access-Control-Allow-Headers", asked or DEFAULT_ALLOW_HEADERS)
            self.set_header("Access-Control-Max-Age", PREFLIGHT_MAX_AGE)
            if self.request.headers.get("Access-Control-Request-Private-Network") == "true":
                self.set_header("Access-Control-Allow-Private-Network", "true")
        self.set_status(204)
        self.finish()

    def check_xsrf_cookie(self) -> None:
        pass  # OPTIONS is safe and carries no credentials


def install_cors(web_app: tornado.web.Application, origins: Iterable[str]) -> None:
    """Answer preflights on every path and add the CORS grant to every response."""
    allowed = frozenset(origins)
    web_app.settings[ORIGINS_KEY] = allowed
    router = web_app.default_router
    rules = [tornado.routing.Rule(_OptionsMatcher(), PreflightHandler, {"allowed": allowed}),
             tornado.routing.Rule(_ForeignOriginMatcher(allowed), ForeignOriginHandler)]
    # First rules of the app's router: before any handler (which would 405, demand a token, or
    # act on a foreign page's request)
    router.rules[0:0] = [router.process_rule(rule) for rule in rules]
    # tornado calls each transform with the request; a factory binds the allow-list to it
    web_app.transforms.append(_transform_factory(allowed))  # type: ignore[arg-type]


def _transform_factory(
    allowed: frozenset[str],
) -> Callable[[tornado.httputil.HTTPServerRequest], CorsTransform]:
    def make(request: tornado.httputil.HTTPServerRequest) -> CorsTransform:
        return CorsTransform(request, allowed)

    return make


class ColabHandler(APIHandler):
    """Base of ``/api/colab/*``: authenticated JSON behind Colab's XSSI guard."""

    # Colab polls these every few seconds while a tab is open: looking must never keep an idle
    # server (``--stop-after-idle``) alive, as with the life-cycle API.
    _track_activity = False

    def write_colab(self, body: dict[str, Any]) -> None:
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(XSSI_PREFIX + json.dumps(body))


class BuildInfoHandler(ColabHandler):
    @tornado.web.authenticated
    def get(self) -> None:
        self.write_colab({"release_tag": f"tether-{__version__}"})


class DriveHandler(ColabHandler):
    @tornado.web.authenticated
    def get(self) -> None:
        self.write_colab({"dfs": []})


class ResourcesHandler(ColabHandler):
    @tornado.web.authenticated
    async def get(self) -> None:
        gpus = await asyncio.to_thread(gpu.query_gpus)
        root = self.settings.get("server_root_dir") or os.getcwd()
        lifecycle = self.settings.get("tether_lifecycle")
        usage = await lifecycle.usage() if lifecycle is not None else {}
        self.write_colab(resources(self.kernel_manager, root, gpus, usage))


_ever_used: set[int] = set()


def resources(kernel_manager: Any, root_dir: str, gpus: list[gpu.GpuInfo],
              usage: dict[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    """The body of ``/api/colab/resources`` (shape: docs/colab-runtime.md, section 3)."""
    vm = psutil.virtual_memory()
    disk = shutil.disk_usage(root_dir)
    for g in gpus:
        if g.memory_used > 0:
            _ever_used.add(g.index)
    return {
        "memory": {
            "totalBytes": vm.total,
            "freeBytes": vm.available,
            "kernels": [
                # RSS of the kernel's whole process tree, as `tether ps` and the life-cycle API
                {"uuid": kid, "usedBytes": (usage or {}).get(kid, (0, 0))[0]}
                for kid in kernel_manager.list_kernel_ids()
            ],
        },
        "disks": [
            {
                "filesystem": {
                    "label": _mount_of(root_dir),
                    "totalBytes": disk.total,
                    "usedBytes": disk.used,
                }
            }
        ],
        "gpus": [
            {
                "name": g.name,
                "memoryUsedBytes": g.memory_used,
                "memoryTotalBytes": g.memory_total,
                "gpuUtilization": g.utilization_gpu / 100,
                "memoryUtilization": g.utilization_memory / 100,
                "everUsed": g.index in _ever_used,
            }
            for g in gpus
        ],
    }


def _mount_of(path: str) -> str:
    path = os.path.realpath(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def handlers(base_url: str) -> list[tuple[str, type[tornado.web.RequestHandler]]]:
    return [
        (url_path_join(base_url, "/api/colab/build-info"), BuildInfoHandler),
        (url_path_join(base_url, "/api/colab/resources"), ResourcesHandler),
        (url_path_join(base_url, "/api/colab/drive"), DriveHandler),
    ]
