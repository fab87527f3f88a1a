"""A headless client that talks to a runtime the way Colab's direct mode does.

``tether doctor`` replays this sequence to name what fails, and the tests drive real servers
with it. It sends what the browser sends: the Colab ``Origin``, CORS preflights without a token,
then token-authenticated REST calls and the kernel websocket.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse
from tornado.websocket import WebSocketClientConnection, websocket_connect

from tether.config import COLAB_ORIGIN
from tether.errors import TetherError

log = logging.getLogger(__name__)

XSSI_PREFIX = ")]}'\n"
DEFAULT_TIMEOUT = 30.0


class ReplayError(TetherError):
    """A step of Colab's request sequence failed."""


@dataclass
class ExecResult:
    status: str  # "ok" | "error" | "aborted"
    stdout: str = ""
    stderr: str = ""
    result: str = ""  # text/plain of execute_result
    error: str = ""  # ename: evalue


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""
    hint: str = ""


@dataclass
class ColabClient:
    """Async client for one runtime: ``async with ColabClient(url, token) as c: ...``."""

    base_url: str
    token: str
    origin: str = COLAB_ORIGIN
    timeout: float = DEFAULT_TIMEOUT
    _http: AsyncHTTPClient | None = field(default=None, init=False, repr=False)

    async def __aenter__(self) -> ColabClient:
        self.base_url = self.base_url.rstrip("/")
        self._http = AsyncHTTPClient(force_instance=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            self._http.close()

    def _headers(self, auth: bool = True) -> dict[str, str]:
        headers = {"Origin": self.origin}
        if auth:
            headers["Authorization"] = f"token {self.token}"
        return headers

    async def request(
        self, method: str, path: str, body: Any = None, *, auth: bool = True,
        headers: dict[str, str] | None = None,
    ) -> HTTPResponse:
        """One HTTP request; returns the response whatever its status (never raises on 4xx)."""
        assert self._http is not None, "use `async with ColabClient(...)`"
        data = json.dumps(body) if body is not None and not isinstance(body, str | bytes) else body
        req = HTTPRequest(
            self.base_url + path, method=method, body=data,
            headers={**self._headers(auth), **(headers or {})},
            request_timeout=self.timeout, connect_timeout=self.timeout,
            allow_nonstandard_methods=True, follow_redirects=False,
        )
        try:
            return await self._http.fetch(req, raise_error=False)
        except (OSError, HTTPClientError, asyncio.TimeoutError) as e:
            raise ReplayError(f"{method} {path} failed: {e}", path=path) from e

    async def preflight(self, path: str, method: str = "GET") -> HTTPResponse:
        """A CORS preflight as Chrome sends it: no token, no cookies."""
        return await self.request(
            "OPTIONS", path, auth=False,
            headers={
                "Access-Control-Request-Method": method,
                "Access-Control-Request-Headers": "authorization, content-type",
                "Access-Control-Request-Private-Network": "true",
            },
        )

    async def get_json(self, path: str) -> Any:
        resp = await self.request("GET", path)
        return _json_of(resp, path)

    async def create_session(self, path: str = "tether-check.ipynb", kernel_name: str = "python3") -> dict[str, Any]:
        body = {"path": path, "name": path, "type": "notebook", "kernel": {"name": kernel_name}}
        resp = await self.request("POST", "/api/sessions", body)
        if resp.code != 201:
            raise ReplayError(f"POST /api/sessions answered {resp.code}", status=resp.code)
        return _json_of(resp, "/api/sessions")  # type: ignore[no-any-return]

    async def delete_session(self, session_id: str) -> int:
        return (await self.request("DELETE", f"/api/sessions/{quote(session_id)}")).code

    async def connect_kernel(self, kernel_id: str, session_id: str = "") -> WebSocketClientConnection:
        ws_base = "ws" + self.base_url[len("http"):]
        url = f"{ws_base}/api/kernels/{quote(kernel_id)}/channels?session_id={session_id or uuid.uuid4().hex}"
        req = HTTPRequest(url, headers=self._headers(), connect_timeout=self.timeout,
                          request_timeout=self.timeout)
        try:
            return await asyncio.wait_for(websocket_connect(req), self.timeout)
        except (OSError, HTTPClientError, asyncio.TimeoutError) as e:
            raise ReplayError(f"kernel websocket for {kernel_id} failed: {e}") from e

    async def execute(self, kernel_id: str, code: str) -> ExecResult:
        """Run ``code`` on the kernel over its websocket; wait (bounded) for it to go idle."""
        ws = await self.connect_kernel(kernel_id)
        try:
            msg_id = uuid.uuid4().hex
            await ws.write_message(json.dumps(execute_request(msg_id, code)))
            return await asyncio.wait_for(_collect(ws, msg_id), self.timeout)
        except asyncio.TimeoutError as e:
            raise ReplayError(f"kernel {kernel_id} did not finish {code!r} in {self.timeout:.0f} s") from e
        finally:
            ws.close()


def execute_request(msg_id: str, code: str, session: str = "") -> dict[str, Any]:
    """A Jupyter ``execute_request`` message for the kernel websocket (protocol 5.3)."""
    return {
        "channel": "shell",
        "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "colab",
                   "session": session or uuid.uuid4().hex, "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {},
        "content": {"code": code, "silent": False, "store_history": True,
                    "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
    }


async def _collect(ws: WebSocketClientConnection, msg_id: str) -> ExecResult:
    result = ExecResult(status="")
    idle = False
    while not (idle and result.status):
        raw = await ws.read_message()
        if raw is None:
            raise ReplayError("the kernel websocket closed before the reply")
        if isinstance(raw, bytes):
            continue  # binary-framed protocol is not negotiated; nothing of ours comes this way
        msg = json.loads(raw)
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            if content["name"] == "stdout":
                result.stdout += content["text"]
            else:
                result.stderr += content["text"]
        elif kind in ("execute_result", "display_data"):
            result.result = content["data"].get("text/plain", "")
        elif kind == "error":
            result.error = f"{content['ename']}: {content['evalue']}"
        elif kind == "execute_reply":
            result.status = content["status"]
        elif kind == "status" and content["execution_state"] == "idle":
            idle = True
    return result


def _json_of(resp: HTTPResponse, path: str) -> Any:
    if resp.code >= 400:
        raise ReplayError(f"GET {path} answered {resp.code}", status=resp.code)
    text = resp.body.decode()
    if text.startswith(XSSI_PREFIX):
        text = text[len(XSSI_PREFIX):]
    return json.loads(text)


def _cors_ok(resp: HTTPResponse, origin: str) -> bool:
    return (
        resp.headers.get("Access-Control-Allow-Origin") == origin
        and resp.headers.get("Access-Control-Allow-Credentials") == "true"
    )


async def replay(base_url: str, token: str, *, origin: str = COLAB_ORIGIN,
                 timeout: float = DEFAULT_TIMEOUT) -> list[Check]:
    """Colab's direct-mode sequence, step by step; stops at the first step others depend on."""
    checks: list[Check] = []

    def check(name: str, ok: bool, detail: str = "", hint: str = "") -> bool:
        checks.append(Check(name, ok, detail, "" if ok else hint))
        return ok

    async with ColabClient(base_url, token, origin, timeout) as c:
        try:
            for path in ("/", "/api/kernelspecs", "/api/colab/build-info"):
                resp = await c.preflight(path)
                check(f"preflight {path}", resp.code < 300 and _cors_ok(resp, origin),
                      f"HTTP {resp.code}", "Is this a tether server? Stock Jupyter fails these.")
            pna = await c.preflight("/api/sessions", "POST")
            pna_header = pna.headers.get("Access-Control-Allow-Private-Network")
            check("private network access", pna_header == "true",
                  f"Access-Control-Allow-Private-Network: {pna_header or '(absent)'}",
                  "Older Chrome needs this header; newer Chrome asks the user instead.")
            resp = await c.request("GET", "/api/status")
            if not check("token accepted", resp.code == 200, f"HTTP {resp.code}",
                         "The token in the URL is wrong: copy the URL tether printed again."):
                return checks
            check("CORS grant", _cors_ok(resp, origin),
                  f"Access-Control-Allow-Origin: "
                  f"{resp.headers.get('Access-Control-Allow-Origin') or '(absent)'}",
                  f"The server does not allow {origin}.")
            specs = await c.get_json("/api/kernelspecs")
            if not check("kernelspec python3", "python3" in specs.get("kernelspecs", {}),
                         f"default {specs.get('default')!r}",
                         "Colab asks for `python3`: register your kernel under that name."):
                return checks
            info = await c.get_json("/api/colab/build-info")
            check("/api/colab/build-info", "release_tag" in info, str(info.get("release_tag")))
            res = await c.get_json("/api/colab/resources")
            gpus = res.get("gpus", [])
            check("/api/colab/resources", "memory" in res,
                  f"{len(gpus)} GPU(s), {res.get('memory', {}).get('totalBytes', 0) >> 20} MiB RAM")
            session = await c.create_session()
            try:
                out = await c.execute(session["kernel"]["id"], "print(6 * 7)")
                check("kernel runs code", out.status == "ok" and out.stdout.strip() == "42",
                      out.error or out.stdout.strip(), "The kernel failed; see the server log.")
            finally:
                code = await c.delete_session(session["id"])
                check("session deleted", code == 204, f"HTTP {code}")
        except ReplayError as e:
            check("request sequence", False, str(e), "Is the server up and the tunnel open?")
    return checks
