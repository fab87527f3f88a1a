"""In-notebook release: ``import tether; tether.release()``, or ``%load_ext tether`` + ``%release``.

The clean replacement for ``exit()``: asks the server to delete this very kernel with the sweep
(every child, setsid and orphan included). Standard library only, in one file, because it also
runs in kernels of the user's own Python where tether is not installed: the server's provisioner
puts a mini ``tether`` package that loads this file on the kernel's ``PYTHONPATH``, together with
the kernel id and the path of the server's 0600 state file (URL or Unix socket, token).

The same small HTTP client (TCP or Unix socket, token in a header, never in a URL) serves the
``tether ps``/``tether release`` commands on the server's machine.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import urllib.parse
from typing import Any

KERNEL_ID_ENV = "TETHER_KERNEL_ID"
STATE_ENV = "TETHER_SERVER_STATE"
API = "tether/api"
TIMEOUT = 10.0

__all__ = ["ApiError", "api_request", "load_ipython_extension", "release"]


try:  # with tether installed, its one exception tree; in a kernel without it, plain Exception
    from tether.errors import ServerError as _Base
except ImportError:  # loaded by the kernel shim: no tether.errors there
    _Base = Exception  # type: ignore[misc, assignment]


class ApiError(_Base):
    """A request to the server failed (``status`` 0: no answer at all)."""

    def __init__(self, message: str, status: int = 0, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def _connection(state: dict[str, Any], timeout: float) -> tuple[http.client.HTTPConnection, str]:
    """A connection to the server described by ``state``, and its base path."""
    if state.get("sock"):
        return _UnixConnection(state["sock"], timeout), state.get("base_url") or "/"
    url = urllib.parse.urlsplit(state["url"])
    conn_cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    return conn_cls(url.hostname or "127.0.0.1", url.port, timeout=timeout), url.path or "/"


def api_request(state: dict[str, Any], method: str, path: str, body: Any = None,
                timeout: float = TIMEOUT) -> Any:
    """``method`` on ``<base_url>/tether/api/<path>`` with the token; the decoded JSON reply."""
    return request(state, method, f"{API}/{path.lstrip('/')}", body, timeout)


def request(state: dict[str, Any], method: str, path: str, body: Any = None,
            timeout: float = TIMEOUT) -> Any:
    """``method`` on ``<base_url>/<path>`` of the server with the token; the decoded JSON
    reply (Colab's ``)]}'`` prefix stripped). The one client of the server's machine: kernels,
    ``tether ps``/``release``, ``tether.host``'s status."""
    conn, base = _connection(state, timeout)
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"token {state['token']}", "Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, f"{base.rstrip('/')}/{path.lstrip('/')}", data, headers)
        reply = conn.getresponse()
        raw = reply.read()
    except OSError as e:
        raise ApiError(f"the tether server did not answer: {e}") from e
    finally:
        conn.close()
    if raw.startswith(b")]}'"):
        raw = raw.partition(b"\n")[2]
    try:
        decoded = json.loads(raw) if raw else None
    except ValueError:
        decoded = raw.decode(errors="replace")
    if reply.status >= 400:
        message = decoded.get("message") if isinstance(decoded, dict) else None
        raise ApiError(f"{method} {path}: HTTP {reply.status} {message or reply.reason}",
                       reply.status, decoded)
    return decoded


def _server_state() -> dict[str, Any]:
    path = os.environ.get(STATE_ENV)
    if not path:
        raise ApiError("this kernel was not started by a tether server "
                       "(no $TETHER_SERVER_STATE): use the notebook's Shut Down instead")
    try:
        with open(path) as f:
            state: dict[str, Any] = json.load(f)
    except (OSError, ValueError) as e:
        raise ApiError(f"cannot read the server's state file {path}: {e}") from e
    return state


def release(force: bool = False) -> str:
    """Shut this kernel down for good and free its memory and GPU.

    Every process the kernel started goes too (children, ``setsid`` ones, orphans); the server
    verifies that nothing of the kernel holds the GPU any more. The kernel dies shortly after
    this returns: run it last. Returns the server's acknowledgement (shown as the
    cell's output).
    """
    kernel_id = os.environ.get(KERNEL_ID_ENV)
    if not kernel_id:
        raise ApiError("no $TETHER_KERNEL_ID: this kernel was not started by a tether server")
    # The server interrupts a kernel before it shuts it down: here that would land in this very
    # cell, while it reads the server's answer. This kernel is going away: let it be.
    previous = _ignore_sigint()
    try:
        reply = api_request(_server_state(), "POST", f"kernels/{kernel_id}/release",
                            {"background": True, "force": bool(force)})
    except BaseException:
        _restore_sigint(previous)
        raise
    message = f"releasing kernel {kernel_id}: it shuts down now, with every process it started"
    if isinstance(reply, dict) and reply.get("message"):
        message = str(reply["message"])
    return message


def _ignore_sigint() -> Any:
    try:
        return signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: signals cannot be handled here anyway
        return None


def _restore_sigint(previous: Any) -> None:
    if previous is not None:
        try:
            signal.signal(signal.SIGINT, previous)
        except ValueError:
            pass


def _release_magic(line: str = "") -> str:
    return release(force=line.strip() in ("--force", "-f"))


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext tether``: registers ``%release`` (``%release --force`` kills foreign holders)."""
    ipython.register_magic_function(_release_magic, "line", "release")
