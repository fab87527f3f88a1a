"""A supervised ``ssh -N -L``: one local port to the remote server (and the user's extra
forwards, ``--forward``), restarted when it dies.

The forward is the user's own ``ssh`` with ``ExitOnForwardFailure`` and keep-alives. When it
exits (network gone, laptop slept, sshd killed) it is started again with exponential backoff and
jitter; the local port, URL and token stay the same. Before the port is reported usable, tether
checks that what answers there is its own server, authenticated with the token: a foreign
listener is an error, never a silent success.

ssh's keep-alives notice a silent path only after 15-20 s, so the tunnel also probes the server
through the forward every 2 s (``GET /api/status``, which is not counted as activity) and ends
an ssh through which nothing answers twice in a row. Every wait is bounded: an attempt by its
deadline, a probe by its timeout, and ssh's stderr is read as it comes, never to its end (a
``ProxyCommand`` that outlives its ssh holds that pipe open; see ``_ssh.spawn``).

Where ``up`` holds a ControlMaster (:mod:`tether._master`), the forward is the master's
(``ssh -O forward``) and the master is the ssh supervised here: a forward that stops answering
while the host still answers through the master is added again (no new login); a master whose
path is dead is ended and connected again (one prompt, where the host takes only a password).
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import random
import re
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

from tether import _http, _master, _ssh
from tether.errors import (
    ForeignListenerError,
    PortInUseError,
    ServerNotFoundError,
    SSHError,
    TetherError,
    TokenRejectedError,
    TunnelError,
)

log = logging.getLogger(__name__)

CONNECT_DEADLINE = 30.0
# Each reconnect attempt: a path that is still frozen must not hold one for long, so the URL
# comes back promptly once the path is back (or a new one exists). Our own deadline, not ssh's
# ConnectTimeout, which stays the user's to set.
RECONNECT_DEADLINE = 12.0
INTERACTIVE_DEADLINE = 180.0  # a passphrase or 2FA prompt may be waiting for the user
VERIFY_TIMEOUT = 5.0
POLL = 0.02
BACKOFF_FIRST = 0.25
# Low on purpose: one ssh attempt every ~2 s costs nothing, and a host that is back (sshd
# restarted, Wi-Fi again) gets its URL back within about 2 s, not after a long backoff step.
BACKOFF_MAX = 2.0
# ssh connects but the server does not answer this many times in a row: restart the server
SERVER_FAILURES = 2
# The health probe through the forward: every PROBE_INTERVAL, a miss is retried at once, and
# PROBE_MISSES in a row end that ssh. A silent drop is so noticed in at most
# PROBE_INTERVAL + PROBE_MISSES * PROBE_TIMEOUT (7 s), well before ssh's keep-alives (15-20 s).
PROBE_INTERVAL = 2.0
PROBE_TIMEOUT = 2.5
PROBE_MISSES = 2
PROBE_PATH = "/api/status"  # not counted as activity by jupyter_server
STDERR_CAP = 64 << 10


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


async def verify_own_server(port: int, token: str, version: str = "", host: str = "") -> None:
    """Raise unless tether's own server, with this token, answers on ``port``.

    :class:`TunnelError` when nothing answers (tunnel or server down: reconnect),
    :class:`TokenRejectedError` when a tether server answers but refuses the token (it was
    replaced by one with a new token), :class:`ForeignListenerError` for anything else.
    """
    try:
        reply = await _http.get(port, "/api/colab/build-info", token, timeout=VERIFY_TIMEOUT)
    except _http.NoAnswer as e:
        raise TunnelError(f"nothing answers through the tunnel on port {port}: the remote "
                          "server is not reachable through it", port=port,
                          reason=e.data.get("reason", "")) from e
    tag = reply.body.get("release_tag", "") if isinstance(reply.body, dict) else ""
    if reply.code == 200 and str(tag).startswith("tether-"):
        return
    if reply.code in (401, 403) and await _is_tether(port):
        raise _token_rejected(host, port)
    raise ForeignListenerError(
        f"something other than this tether server answers on 127.0.0.1:{port} "
        f"(HTTP {reply.code})",
        hint="Another program or Jupyter holds that port: stop it or pick --port N.",
        port=port)


async def _is_tether(port: int) -> bool:
    """A tether server refuses a request without token on its own route; others know no route."""
    try:
        reply = await _http.get(port, "/tether/api/kernels", "", timeout=VERIFY_TIMEOUT)
    except _http.NoAnswer:
        return False
    return reply.code in (401, 403)


def _token_rejected(host: str, port: int) -> TokenRejectedError:
    where = f"on {host}" if host else f"behind 127.0.0.1:{port}"
    return TokenRejectedError(
        f"the server {where} was restarted with a new token",
        hint=f"Run `tether up {host or 'HOST'}` for the new URL.", host=host, port=port)


class Health(enum.Enum):
    UP = "up"
    MISS = "miss"


class _Tail:
    """The last ``STDERR_CAP`` bytes of a stream, read as they come (never to a wait on EOF)."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.data = bytearray()
        self._task = asyncio.ensure_future(self._read(stream))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(4096):
            self.data += chunk
            del self.data[:-STDERR_CAP]

    async def finish(self, timeout: float) -> bytes:
        """What was read, once the stream ended or after ``timeout``; the reader is ended."""
        try:
            await asyncio.wait({self._task}, timeout=timeout)
        finally:
            self._task.cancel()
        return bytes(self.data)


class Tunnel:
    """One supervised forward. ``await open()`` once, then ``await run()`` until cancelled.

    ``run()`` heals every fault it can see: ssh exiting (killed, sshd gone, keep-alives), and
    a forward whose ssh lives on while nothing answers through it (a frozen path, a stuck or
    dead server), seen by a health probe through the forward itself. It ends only with
    :class:`TokenRejectedError` (the server was replaced) or :class:`ServerNotFoundError`
    (stopped on purpose), or when cancelled.
    """

    def __init__(self, target: _ssh.SSHTarget, forward: Forward, token: str,
                 on_status: Callable[[Status], None] | None = None,
                 restart_server: Callable[[], Awaitable[Forward]] | None = None,
                 master: _master.Master | None = None, extra: Sequence[Forward] = ()) -> None:
        self.target = target
        self.extra = tuple(extra)  # more forwards the same ssh carries (healed with it)
        # the forward goes through the master only where the target is the master's
        self.master = master if master is not None and master.path \
            and target.control_path == master.path else None
        self.restart_server = restart_server
        self.forward = forward
        self.token = token
        self.on_status = on_status or (lambda s: None)
        self.status = Status(State.CONNECTING, since=time.time())
        # its own ssh, or (through a master) the master's, a plain child: see tether._login
        self.proc: asyncio.subprocess.Process | subprocess.Popen[bytes] | None = None
        self._stderr: _Tail | None = None

    def argv(self) -> list[str]:
        options = ["-o", "ExitOnForwardFailure=yes"]
        if sys.platform != "win32":
            # A forward added through a ControlMaster outlives the client that asked for it,
            # so the supervised forward gets its own connection (other commands still share).
            options += ["-o", "ControlMaster=no", "-o", "ControlPath=none"]
        for keepalive in _ssh.KEEPALIVE:
            options += ["-o", keepalive]
        own = replace(self.target, control_path="")  # a connection of its own, as said above
        forwards = [arg for f in self.forwards for arg in ("-L", f.spec)]
        return own.argv("-N", "-T", *options, *forwards)

    @property
    def forwards(self) -> tuple[Forward, ...]:
        """The server's forward first, then the extra ones."""
        return (self.forward, *self.extra)

    def _set(self, state: State, error: str = "", reconnects: int | None = None) -> None:
        self.status = replace(self.status, state=state, since=time.time(), last_error=error,
                              reconnects=self.status.reconnects if reconnects is None
                              else reconnects)
        self.on_status(self.status)

    @property
    def _prompts(self) -> bool:
        """Whether connecting may wait for the user (a passphrase, a password, 2FA)."""
        return self.master.base.prompts if self.master is not None else self.target.prompts

    async def open(self) -> None:
        """Start the forward and check the server behind it; raises on the first failure."""
        for forward in self.forwards:
            check_local_port(forward.local_port)
        deadline = INTERACTIVE_DEADLINE if self._prompts else CONNECT_DEADLINE
        try:
            await self._connect(deadline, first=True)
        except Exception:
            if self.master is not None:  # the ports are free again (for a tunnel to a new place)
                for forward in self.forwards:
                    await self.master.cancel(forward.spec)
            raise
        self._set(State.UP)

    async def _connect(self, deadline: float, first: bool = False) -> None:
        """One attempt, bounded by ``deadline``; on any failure (or cancel) no ssh is left."""
        await self._stop()
        if self.master is not None:
            await self._connect_master(self.master, deadline, first)
            return
        self.proc = await _ssh.spawn(self.target, self.argv(), stdin=asyncio.subprocess.DEVNULL,
                                     stdout=asyncio.subprocess.DEVNULL)
        assert self.proc.stderr is not None
        self._stderr = _Tail(self.proc.stderr)
        try:
            await self._establish(deadline, first)
        except BaseException:
            await self._stop()
            raise

    async def _connect_master(self, master: _master.Master, deadline: float,
                              first: bool) -> None:
        """The master connected (again, if it was lost), the forward in it, the server checked.

        A stale forward of an earlier server (another socket or port) is removed first.
        """
        specs = [forward.spec for forward in self.forwards]
        try:
            async with asyncio.timeout(deadline):
                await master.ensure()
                for spec in list(master.forwards):
                    if spec not in specs:
                        await master.cancel(spec)
                mark = master.log_size()
                for spec in specs:
                    await master.forward(spec)
        except TimeoutError as e:
            await master.reset()
            raise TunnelError(f"the tunnel to {self.target.host} was not up after "
                              f"{deadline:.0f} s", host=self.target.host) from e
        self.proc = master.proc

        async def said() -> bytes:  # the forward stays: the next attempt finds it in place
            return master.log_since(mark)

        await self._verify(first, said)

    async def _establish(self, deadline: float, first: bool) -> None:
        try:
            async with asyncio.timeout(deadline):
                await self._listening()
        except TimeoutError as e:
            raise TunnelError(f"the tunnel to {self.target.host} was not up after "
                              f"{deadline:.0f} s", host=self.target.host) from e
        await self._verify(first, self._stop)

    async def _verify(self, first: bool, stop: Callable[[], Awaitable[bytes]]) -> None:
        """The server behind the forward is ours; ``stop`` ends the attempt, returns ssh's say."""
        try:
            await verify_own_server(self.forward.local_port, self.token, host=self.target.host)
        except (TokenRejectedError, ForeignListenerError):
            raise
        except TunnelError as e:
            stderr = await stop()
            # sshd answers "open failed" both for a forbidden socket forward
            # (AllowStreamLocalForwarding no) and a missing socket; the server was just seen
            # ready on that socket, so the first is the likely cause.
            if first and self.forward.remote_sock and b"open failed" in stderr:
                raise TunnelError(
                    f"{self.target.host}'s sshd refuses to forward the server's Unix socket",
                    hint=f"Serve on a loopback port there instead: `tether down "
                         f"{self.target.host}`, then `tether up {self.target.host} "
                         f"--remote-port 0`.",
                    host=self.target.host, socket_refused=True) from e
            raise

    async def _listening(self) -> None:
        """Wait until ssh listens on the local port (it binds only after authentication)."""
        assert self.proc is not None
        while True:
            if self.proc.returncode is not None:
                self._raise_exit(await self._stop())
            try:
                async with asyncio.timeout(1.0):
                    _, writer = await asyncio.open_connection("127.0.0.1",
                                                              self.forward.local_port)
            except (OSError, TimeoutError):
                await _ssh.wait_exit(self.proc, POLL)  # (ssh gives no other readiness signal)
                continue
            writer.close()
            return

    def _raise_exit(self, stderr: bytes) -> None:
        assert self.proc is not None and self.proc.returncode is not None
        text = stderr.decode(errors="replace")
        if "Address already in use" in text or "cannot listen to port" in text:
            said = re.search(r"cannot listen to port: (\d+)", text)
            port = int(said.group(1)) if said else self.forward.local_port
            how = "--port N" if port == self.forward.local_port else "another --forward R:L"
            raise PortInUseError(f"local port {port} is already in use",
                                 hint=f"Pick another with {how}.", port=port)
        raise _ssh.ssh_error(self.target, "ssh -N -L " + self.forward.spec,
                             self.proc.returncode, stderr)

    async def run(self) -> None:
        """Supervise until cancelled: whenever the forward fails, start it again."""
        while True:
            why = await self._hold()
            log.info("tunnel to %s is down: %s", self.target.host, why)
            self._set(State.RECONNECTING, why, reconnects=self.status.reconnects + 1)
            await self._reconnect()
            self._set(State.UP)

    async def _hold(self) -> str:
        """Until the current forward fails (ssh exits, or the probe misses): why it failed."""
        assert self.proc is not None
        proc, misses = self.proc, 0
        while True:
            if await _ssh.wait_exit(proc, PROBE_INTERVAL if misses == 0 else 0):
                stderr = await self._stop()
                if self.master is not None:  # what the master said last, from its log
                    stderr = self.master.log_since(max(0, self.master.log_size() - 400))
                return f"ssh exited ({proc.returncode}): {_ssh.stderr_tail(stderr, 200)}".strip()
            health, path_alive = await self._check(misses > 0)
            if health is Health.UP:
                misses = 0
                continue
            misses += 1
            if misses >= PROBE_MISSES:
                if self.master is not None and not path_alive:
                    await self.master.reset()  # its path is dead: connect again
                    return f"no answer through the connection to {self.target.host}"
                await self._stop()
                return f"no answer through the tunnel in {misses} probes"

    async def _check(self, retry: bool) -> tuple[Health, bool]:
        """A probe through the forward; on a retry with a master, at the same time a round trip
        through the master (is its path alive?), so a dead path costs no extra time."""
        if self.master is None or not retry:
            return await self.probe(), True
        async with asyncio.TaskGroup() as tg:
            probe = tg.create_task(self.probe())
            alive = tg.create_task(self.master.alive())
        return probe.result(), alive.result()

    async def probe(self) -> Health:
        """One health check through the forward, bounded by ``PROBE_TIMEOUT``.

        Raises :class:`TokenRejectedError` when the server there refuses the token.
        """
        try:
            reply = await _http.get(self.forward.local_port, PROBE_PATH, self.token,
                                    timeout=PROBE_TIMEOUT)
        except _http.NoAnswer as e:
            log.debug("probe through the tunnel to %s: %s", self.target.host, e)
            return Health.MISS
        if reply.code in (401, 403) and await _is_tether(self.forward.local_port):
            raise _token_rejected(self.target.host, self.forward.local_port)
        return Health.UP if reply.code == 200 else Health.MISS

    async def _reconnect(self) -> None:
        """Attempts with backoff and jitter until one is up; each attempt is bounded."""
        deadline = INTERACTIVE_DEADLINE if self._prompts else RECONNECT_DEADLINE
        attempt = server_failures = 0
        while True:
            if attempt:
                await asyncio.sleep(_backoff(attempt))
            attempt += 1
            try:
                await self._connect(deadline)
                return
            except TokenRejectedError:
                raise
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

    async def _stop(self) -> bytes:
        """End the current ssh (bounded) and return the tail of its stderr."""
        stderr = b""
        if isinstance(self.proc, asyncio.subprocess.Process):  # (a master is its owner's)
            await _ssh.terminate(self.proc)
        if self._stderr is not None:
            stderr = await self._stderr.finish(2 * _ssh.PIPE_GRACE)
            self._stderr = None
        return stderr

    async def aclose(self) -> None:
        """End the forward (bounded). Not reported through ``on_status``: the caller, who
        closes, says what it means (a detach line, an error), with nothing printed after it."""
        await self._stop()
        if self.master is not None:
            for forward in self.forwards:
                await self.master.cancel(forward.spec)
        self.status = replace(self.status, state=State.CLOSED, since=time.time())


def _backoff(attempt: int) -> float:
    """0.25 s, 0.5 s, 1 s, then 2 s, each with +-25 % jitter (full restarts never align)."""
    base = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (attempt - 1))
    return float(base * random.uniform(0.75, 1.25))
