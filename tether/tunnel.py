"""A supervised ``ssh -N -L``: one local port to the remote server, restarted when it dies.

The forward is the user's own ``ssh`` with ``ExitOnForwardFailure`` and keep-alives. When it
exits (network gone, laptop slept, sshd killed) it is started again with exponential backoff and
jitter; the local port, URL and token stay the same. Before the port is reported usable, tether
checks that what answers there is its own server, authenticated with the token: a foreign
listener is an error, never a silent success.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import json
import logging
import random
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from tether import _ssh
from tether.errors import (
    ForeignListenerError,
    PortInUseError,
    ServerNotFoundError,
    SSHError,
    TetherError,
    TunnelError,
)

log = logging.getLogger(__name__)

CONNECT_DEADLINE = 30.0
INTERACTIVE_DEADLINE = 180.0  # a passphrase or 2FA prompt may be waiting for the user
HTTP_TIMEOUT = 10.0
POLL = 0.02
BACKOFF_FIRST = 0.25
BACKOFF_MAX = 30.0
# ssh connects but the server does not answer this many times in a row: restart the server
SERVER_FAILURES = 2
XSSI_PREFIX = b")]}'\n"


class State(enum.Enum):
    CONNECTING = "connecting"
    UP = "up"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


@dataclass(frozen=True)
class Status:
    state: State
    reconnects: int = 0
    since: float = 0.0
    last_error: str = ""


@dataclass(frozen=True)
class Forward:
    """``127.0.0.1:local_port`` here to a Unix socket or a port on the remote side."""

    local_port: int
    remote_sock: str = ""
    remote_port: int = 0
    remote_host: str = "127.0.0.1"  # as the ssh's far end sees it (a node, through a login node)

    @property
    def spec(self) -> str:
        remote = self.remote_sock or f"{self.remote_host}:{self.remote_port}"
        return f"127.0.0.1:{self.local_port}:{remote}"


def check_local_port(port: int) -> None:
    """Raise :class:`PortInUseError` if 127.0.0.1:``port`` cannot be bound here."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if sys.platform != "win32":  # on Windows SO_REUSEADDR would let us bind a taken port
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PortInUseError(
                    f"local port {port} is already in use",
                    hint="Stop what uses it (another `tether up`?) or pick another with --port N.",
                    port=port) from e
            raise TunnelError(f"cannot use local port {port}: {e.strerror}", port=port) from e


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def http_get(port: int, path: str, token: str,
                   timeout: float = HTTP_TIMEOUT) -> tuple[int, Any]:
    """A minimal GET to 127.0.0.1:``port``; returns (status, decoded JSON or None)."""
    async def fetch() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n"
                         f"Authorization: token {token}\r\n\r\n".encode())
            await writer.drain()
            return await reader.read()
        finally:
            writer.close()

    raw = await asyncio.wait_for(fetch(), timeout)
    head, _, body = raw.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0, None
    body = body[len(XSSI_PREFIX):] if body.startswith(XSSI_PREFIX) else body
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


async def verify_own_server(port: int, token: str, version: str = "") -> None:
    """Raise unless tether's own server, with this token, answers on ``port``."""
    try:
        status, body = await http_get(port, "/api/colab/build-info", token)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
        raise TunnelError(f"nothing answers through the tunnel on port {port}: {e}",
                          port=port) from e
    if status == 0 and body is None:
        raise TunnelError(f"the tunnel on port {port} closed the connection: the remote "
                          "server is not reachable through it", port=port)
    tag = body.get("release_tag", "") if isinstance(body, dict) else ""
    if status != 200 or not str(tag).startswith("tether-"):
        raise ForeignListenerError(
            f"something other than this tether server answers on 127.0.0.1:{port} "
            f"(HTTP {status})",
            hint="Another program or Jupyter holds that port: stop it or pick --port N.",
            port=port)


class Tunnel:
    """One supervised forward. ``await open()`` once, then ``await run()`` until cancelled."""

    def __init__(self, target: _ssh.SSHTarget, forward: Forward, token: str,
                 on_status: Callable[[Status], None] | None = None,
                 restart_server: Callable[[], Awaitable[Forward]] | None = None) -> None:
        self.target = target
        self.restart_server = restart_server
        self.forward = forward
        self.token = token
        self.on_status = on_status or (lambda s: None)
        self.status = Status(State.CONNECTING, since=time.time())
        self.proc: asyncio.subprocess.Process | None = None
        self._stderr = b""
        # reads the current ssh's stderr to its end (ssh exits -> EOF); owned, awaited here
        self._stderr_task: asyncio.Future[bytes] | None = None

    def argv(self) -> list[str]:
        options = ["-o", "ExitOnForwardFailure=yes"]
        if sys.platform != "win32":
            # A forward added through a ControlMaster outlives the client that asked for it,
            # so the supervised forward gets its own connection (other commands still share).
            options += ["-o", "ControlMaster=no", "-o", "ControlPath=none"]
        for keepalive in _ssh.KEEPALIVE:
            options += ["-o", keepalive]
        return self.target.argv("-N", "-T", *options, "-L", self.forward.spec)

    def _set(self, state: State, error: str = "", reconnects: int | None = None) -> None:
        self.status = replace(self.status, state=state, since=time.time(), last_error=error,
                              reconnects=self.status.reconnects if reconnects is None
                              else reconnects)
        self.on_status(self.status)

    async def open(self) -> None:
        """Start the forward and check the server behind it; raises on the first failure."""
        check_local_port(self.forward.local_port)
        await self._connect()
        self._set(State.UP)

    async def _connect(self) -> None:
        await self._stop()
        self.proc = await _ssh.spawn(self.target, self.argv(), stdin=asyncio.subprocess.DEVNULL,
                                     stdout=asyncio.subprocess.DEVNULL)
        deadline = INTERACTIVE_DEADLINE if self.target.interactive else CONNECT_DEADLINE
        try:
            await asyncio.wait_for(self._listening(), deadline)
        except asyncio.TimeoutError as e:
            await self._stop()
            raise TunnelError(f"the tunnel to {self.target.host} was not up after "
                              f"{deadline:.0f} s", host=self.target.host) from e
        try:
            await verify_own_server(self.forward.local_port, self.token)
        except TunnelError as e:
            await self._stop()
            if self._stderr_task is not None:
                self._stderr = await self._stderr_task
            # sshd answers "open failed" both for a forbidden socket forward
            # (AllowStreamLocalForwarding no) and a missing socket; the server was just seen
            # ready on that socket, so the first is the likely cause.
            first = self.status.state is State.CONNECTING
            if first and self.forward.remote_sock and b"open failed" in self._stderr:
                raise TunnelError(
                    f"{self.target.host}'s sshd refuses to forward the server's Unix socket",
                    hint=f"Serve on a loopback port there instead: `tether down "
                         f"{self.target.host}`, then `tether up {self.target.host} "
                         f"--remote-port 0`.",
                    host=self.target.host, socket_refused=True) from e
            raise

    async def _listening(self) -> None:
        """Wait until ssh listens on the local port (it binds only after authentication)."""
        assert self.proc is not None and self.proc.stderr is not None
        stderr = asyncio.ensure_future(self.proc.stderr.read())
        self._stderr_task = stderr
        while True:
            if self.proc.returncode is not None or stderr.done():
                await self.proc.wait()
                self._stderr = await stderr
                self._raise_exit()
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.forward.local_port)
            except OSError:
                await asyncio.sleep(POLL)
                continue
            writer.close()
            return

    def _raise_exit(self) -> None:
        assert self.proc is not None and self.proc.returncode is not None
        text = self._stderr.decode(errors="replace")
        if "Address already in use" in text or "cannot listen to port" in text:
            raise PortInUseError(f"local port {self.forward.local_port} is already in use",
                                 hint="Pick another with --port N.", port=self.forward.local_port)
        raise _ssh.ssh_error(self.target, "ssh -N -L " + self.forward.spec,
                             self.proc.returncode, self._stderr)

    async def run(self) -> None:
        """Supervise: whenever ssh exits, start it again (backoff with jitter), forever."""
        attempt = 0
        while True:
            assert self.proc is not None
            await self.proc.wait()
            self._stderr = await self._stderr_task if self._stderr_task else b""
            log.info("tunnel to %s exited (%s): %s", self.target.host, self.proc.returncode,
                     _ssh.stderr_tail(self._stderr, 200))
            self._set(State.RECONNECTING, _ssh.stderr_tail(self._stderr, 200),
                      reconnects=self.status.reconnects + 1)
            server_failures = 0
            while True:
                if attempt:
                    await asyncio.sleep(_backoff(attempt))
                attempt += 1
                try:
                    await self._connect()
                except (ForeignListenerError, SSHError, PortInUseError) as e:
                    log.info("reconnect to %s failed: %s", self.target.host, e)
                    self._set(State.RECONNECTING, str(e))
                    continue
                except TunnelError as e:  # ssh is fine, the server behind it does not answer
                    log.info("reconnect to %s failed: %s", self.target.host, e)
                    self._set(State.RECONNECTING, str(e))
                    server_failures += 1
                    if server_failures >= SERVER_FAILURES and await self._restart_server():
                        server_failures, attempt = 0, 0
                    continue
                attempt = 0
                self._set(State.UP)
                break

    async def _restart_server(self) -> bool:
        """Start the remote server again (same token, so the same URL); False if that failed."""
        if self.restart_server is None:
            return False
        try:
            self.forward = await self.restart_server()
        except ServerNotFoundError:
            raise  # stopped on purpose (`tether down`): supervision ends
        except TetherError as e:
            log.warning("restarting the server on %s failed: %s", self.target.host, e)
            self._set(State.RECONNECTING, str(e))
            return False
        return True

    def kick(self) -> None:
        """End the current ssh (the supervisor reconnects): for a forward that looks stuck."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()

    async def _stop(self) -> None:
        if self.proc is not None:
            await _ssh.terminate(self.proc)

    async def aclose(self) -> None:
        await self._stop()
        self._set(State.CLOSED)



def _backoff(attempt: int) -> float:
    """0.25 s, 0.5 s, 1 s ... up to 30 s, each with +-25 % jitter (full restarts never align)."""
    base = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (attempt - 1))
    return float(base * random.uniform(0.75, 1.25))
