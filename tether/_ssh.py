"""The user's own OpenSSH client, driven as subprocesses.

Everything in the user's SSH setup keeps working because tether never speaks SSH itself: config
files and ``Include``, ``ProxyJump``/``ProxyCommand``, agents, certificates, the user's own
``ControlMaster`` where they have one. Otherwise ``tether up`` holds a ControlMaster of its own
for its lifetime (:mod:`tether._master`; never required: the Windows client has none). ``-F FILE`` and
``-o KEY=VALUE`` pass through. Host keys are checked as the user's config says; tether never
turns checking off.

Remote commands are argv lists, joined with :func:`shlex.join` into the one string OpenSSH sends
(the remote login shell splits it again). Secrets travel on stdin or in files, never in argv.

Other modules use :func:`run` and :func:`check_output` ("run this argv on HOST, give me
stdout"); where tether lives on the remote is :data:`tether.bootstrap.REMOTE_LAYOUT`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tether import _login
from tether._login import SSHTarget as SSHTarget
from tether._login import interactive_default as interactive_default
from tether.errors import AuthenticationError, HostUnreachableError, SSHError

log = logging.getLogger(__name__)

# OpenSSH exits 255 for its own errors; anything else is the remote command's status.
SSH_FAILED = 255
DEFAULT_TIMEOUT = 60.0
STDERR_TAIL = 800
KEEPALIVE = _login.KEEPALIVE  # a dead path is noticed in ~15 s, then reconnected
# Once ssh has exited, what its pipes still have to say arrives within this (see _Protocol).
PIPE_GRACE = 0.5
STREAM_LIMIT = 2 ** 16
POLL = 0.005  # a plain child's exit (the ControlMaster's ssh), where there is no pidfd: polled

_UNREACHABLE = (
    "could not resolve hostname", "connection refused", "connection timed out",
    "no route to host", "network is unreachable", "connection closed by",
    "connection reset", "operation timed out", "name or service not known",
    "kex_exchange_identification", "proxy", "broken pipe",
)
_AUTH = ("permission denied", "too many authentication failures", "host key verification failed",
         "no matching host key", "remote host identification has changed")


@dataclass(frozen=True)
class Completed:
    argv: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")


def stderr_tail(stderr: bytes, limit: int = STDERR_TAIL) -> str:
    text = stderr.decode(errors="replace").strip()
    return text[-limit:]


def ssh_error(target: SSHTarget, command: str, status: int, stderr: bytes) -> SSHError:
    """The right :class:`SSHError` for a failed ``ssh`` run (status 255 is OpenSSH's own)."""
    tail = stderr_tail(stderr)
    low = tail.lower()
    data: dict[str, Any] = {"host": target.host, "command": command, "status": status,
                            "stderr": tail}
    last = tail.splitlines()[-1] if tail else f"exit status {status}"
    if status == SSH_FAILED and any(s in low for s in _AUTH):
        return AuthenticationError(
            f"cannot log in to {target.host}: {last}",
            hint=f"Check that `ssh {target.host}` works in a terminal (keys, agent, known_hosts).",
            **data)
    if status == SSH_FAILED and any(s in low for s in _UNREACHABLE):
        return HostUnreachableError(
            f"cannot reach {target.host}: {last}",
            hint=f"Check the host name and network; `ssh -v {target.host}` shows where it stops.",
            **data)
    return SSHError(f"`{command}` on {target.host} failed (exit {status}): {last}", **data)


class _Protocol(asyncio.subprocess.SubprocessStreamProtocol):
    """Streams as usual, plus: once ssh has exited, its pipes end within ``PIPE_GRACE``.

    A ``ProxyCommand`` (or a ControlPersist master) inherits ssh's stderr and may outlive ssh,
    stopped or hung: waiting for EOF on that pipe would wait forever, and so would
    :meth:`asyncio.subprocess.Process.wait`, which also waits for every pipe to close. Closing
    our ends a little after the exit turns that into EOF: readers get what was written.
    """

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=limit, loop=loop)
        self.exited: asyncio.Future[None] = loop.create_future()
        self._process: asyncio.SubprocessTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert isinstance(transport, asyncio.SubprocessTransport)
        self._process = transport

    def process_exited(self) -> None:
        super().process_exited()
        if not self.exited.done():
            self.exited.set_result(None)
        # (not cancelled on connection_lost: the stream protocol also calls that when stdin ends)
        asyncio.get_running_loop().call_later(PIPE_GRACE, self._close_pipes)

    def _close_pipes(self) -> None:
        transport = self._process
        if transport is not None and not transport.is_closing():
            transport.close()


# Every ssh started here whose pipes are not yet closed: for the last-resort kill and cleanup on
# the way out (ssh runs in its own session, so a terminal's Ctrl-C does not reach it).
_children: set[asyncio.subprocess.Process] = set()


async def spawn(target: SSHTarget, argv: list[str], *,
                stdin: int | None = asyncio.subprocess.PIPE,
                stdout: int | None = asyncio.subprocess.PIPE,
                stderr: int | None = asyncio.subprocess.PIPE) -> asyncio.subprocess.Process:
    """Start a local ssh process; a missing ``ssh`` binary is an :class:`SSHError`.

    ``wait()`` on the result returns within ``PIPE_GRACE`` of ssh's exit, whoever else holds
    its pipes. End it with :func:`terminate` (bounded, always reaped, pipes closed).
    """
    log.debug("spawn %s", shlex.join(a if len(a) < 300 else a[:300] + "...'" for a in argv))
    loop = asyncio.get_running_loop()
    try:
        transport, protocol = await loop.subprocess_exec(
            lambda: _Protocol(STREAM_LIMIT, loop), *argv,
            stdin=stdin, stdout=stdout, stderr=stderr,
            # Non-interactive: Ctrl-C reaches only tether, which ends its children itself.
            # Interactive: ssh keeps the terminal so passphrase and 2FA prompts reach the user.
            start_new_session=sys.platform != "win32" and not target.prompts,
        )
    except OSError as e:
        raise SSHError(f"cannot run {argv[0]}: {e.strerror}",
                       hint="Install an OpenSSH client (`ssh` must be on PATH).") from e
    proc = asyncio.subprocess.Process(transport, protocol, loop)
    _children.add(proc)
    return proc


def exited(proc: asyncio.subprocess.Process) -> asyncio.Future[None]:
    """A future done when ``proc`` (started by :func:`spawn`) has exited, pipes or not."""
    protocol = proc._protocol  # type: ignore[attr-defined]
    assert isinstance(protocol, _Protocol), "not started by _ssh.spawn"
    return protocol.exited


async def wait_exit(proc: asyncio.subprocess.Process | subprocess.Popen[bytes],
                    timeout: float) -> bool:
    """Wait (bounded) for ``proc`` to exit; True if it has. Never waits on its pipes. A
    ControlMaster's ssh is a plain child (:mod:`tether._login`): see :func:`_popen_exit`."""
    if isinstance(proc, subprocess.Popen):
        return await _popen_exit(proc, timeout)
    if proc.returncode is not None:
        return True
    done, _ = await asyncio.wait({exited(proc)}, timeout=timeout)
    return bool(done)


async def _popen_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """:func:`wait_exit` for a plain child: woken by its pidfd where the system has them
    (Linux >= 5.3), as asyncio's own child watcher is; else polled, less often as it waits."""
    if proc.poll() is not None:
        return True
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        fd = -1
    if fd >= 0:
        gone: asyncio.Future[None] = loop.create_future()

        def readable() -> None:  # (the fd stays readable: once is enough)
            if not gone.done():
                gone.set_result(None)

        loop.add_reader(fd, readable)
        try:
            await asyncio.wait({gone}, timeout=timeout)
        finally:
            loop.remove_reader(fd)
            os.close(fd)
        return proc.poll() is not None
    deadline, pause = loop.time() + timeout, POLL
    while proc.poll() is None:
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(min(pause, max(0.0, deadline - loop.time())))
        pause = min(pause * 2, 0.1)
    return True


async def terminate(proc: asyncio.subprocess.Process, timeout: float = 3.0) -> None:
    """End a child: SIGTERM, then SIGKILL after ``timeout``; reaped and its pipes closed.

    Bounded (twice ``timeout`` and ``PIPE_GRACE``) even when a grandchild holds the pipes. A cancellation
    of the caller is held back until the child is gone, then re-raised: no ssh outlives this.
    """
    task = asyncio.ensure_future(_terminate(proc, timeout))
    cancelled = False
    try:
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                cancelled = True
    finally:
        _close(proc)
    if cancelled:
        raise asyncio.CancelledError


async def _terminate(proc: asyncio.subprocess.Process, timeout: float) -> None:
    if proc.returncode is None:
        _signal(proc, kill=False)
        if not await wait_exit(proc, timeout):
            _signal(proc, kill=True)
            await wait_exit(proc, timeout)
    if proc.returncode is not None:
        # let readers take what is still in the pipes (the protocol ends them in PIPE_GRACE)
        waiter = asyncio.ensure_future(proc.wait())
        try:
            await asyncio.wait({waiter}, timeout=PIPE_GRACE + 0.5)
        finally:
            waiter.cancel()


def _signal(proc: asyncio.subprocess.Process, kill: bool) -> None:
    try:
        proc.kill() if kill else proc.terminate()
    except ProcessLookupError:
        pass


def _close(proc: asyncio.subprocess.Process) -> None:
    # Only after the exit (or a kill that did not show): closing earlier would let Popen.poll()
    # reap the child behind the child watcher's back ("Unknown child process pid").
    transport = proc._transport  # type: ignore[attr-defined]
    if proc.returncode is not None:
        _children.discard(proc)
        if not transport.is_closing():
            transport.close()


async def reap_all(timeout: float) -> None:
    """Wait (bounded) for every ssh started here to exit, and close its pipes."""
    procs = list(_children)
    running = {exited(p) for p in procs if not exited(p).done()}
    if running:
        await asyncio.wait(running, timeout=timeout)
    for proc in procs:
        _close(proc)


def kill_all() -> list[int]:
    """SIGKILL every ssh started here that is still running (the last resort on exit), the
    early login of ``up`` (:mod:`tether._login`) too where nothing adopted it."""
    _login.kill_all()
    pids = []
    for proc in list(_children):
        if proc.returncode is None:
            _signal(proc, kill=True)
            pids.append(proc.pid)
    return pids


async def run(target: SSHTarget, command: Sequence[str], *, input: bytes | None = None,
              timeout: float = DEFAULT_TIMEOUT, check: bool = True) -> Completed:
    """Run ``command`` (an argv) on the target; raise an :class:`SSHError` on failure."""
    argv = target.argv(command=command)
    proc = await spawn(target, argv)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate(input)
    except TimeoutError as e:
        raise SSHError(f"`{shlex.join(command)[:80]}` on {target.host} took more than "
                       f"{timeout:.0f} s", host=target.host) from e
    finally:
        await terminate(proc)
    assert proc.returncode is not None
    if check and proc.returncode != 0:
        raise ssh_error(target, shlex.join(command)[:200], proc.returncode, err)
    return Completed(argv, proc.returncode, out, err)


async def check_output(target: SSHTarget, command: Sequence[str], *,
                       timeout: float = DEFAULT_TIMEOUT) -> str:
    """Run ``command`` on the target and return its stdout as text."""
    return (await run(target, command, timeout=timeout)).text


