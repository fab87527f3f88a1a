"""The user's own OpenSSH client, driven as subprocesses.

Everything in the user's SSH setup keeps working because tether never speaks SSH itself: config
files and ``Include``, ``ProxyJump``/``ProxyCommand``, agents, certificates, ``ControlMaster``
where the user has it (never required: the Windows client has none). ``-F FILE`` and
``-o KEY=VALUE`` pass through. Host keys are checked as the user's config says; tether never
turns checking off.

Remote commands are argv lists, joined with :func:`shlex.join` into the one string OpenSSH sends
(the remote login shell splits it again). Secrets travel on stdin or in files, never in argv.

Other modules use :func:`check_output` ("run this argv on HOST, give me stdout") and
:func:`remote_tether_argv` (the argv prefix of the remote ``tether`` executable that ``tether up``
installs).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tether import __version__
from tether.errors import AuthenticationError, HostUnreachableError, SSHError

log = logging.getLogger(__name__)

# OpenSSH exits 255 for its own errors; anything else is the remote command's status.
SSH_FAILED = 255
DEFAULT_TIMEOUT = 60.0
STDERR_TAIL = 800
# Keep-alives: a dead path (laptop asleep, Wi-Fi gone) is noticed in ~15 s, then reconnected.
KEEPALIVE = ("ServerAliveInterval=5", "ServerAliveCountMax=3")

_UNREACHABLE = (
    "could not resolve hostname", "connection refused", "connection timed out",
    "no route to host", "network is unreachable", "connection closed by",
    "connection reset", "operation timed out", "name or service not known",
    "kex_exchange_identification", "proxy", "broken pipe",
)
_AUTH = ("permission denied", "too many authentication failures", "host key verification failed",
         "no matching host key", "remote host identification has changed")


@dataclass(frozen=True)
class SSHTarget:
    """A host as the user's ``ssh`` understands it, plus the options to pass through."""

    host: str
    config_file: str | None = None
    options: tuple[str, ...] = ()
    interactive: bool = False
    ssh: str = field(default_factory=lambda: shutil.which("ssh") or "ssh")

    def argv(self, *extra: str, command: Sequence[str] | None = None) -> list[str]:
        """The local ``ssh`` argv; ``command`` is a remote argv, quoted for the remote shell."""
        args = [self.ssh]
        if self.config_file:
            args += ["-F", self.config_file]
        for opt in self.options:
            args += ["-o", opt]
        if not self.interactive:
            # no prompt can be answered: fail at once instead of hanging on a hidden one
            args += ["-o", "BatchMode=yes"]
        args += [*extra, "--", self.host]
        if command is not None:
            args.append(shlex.join(command))
        return args


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


async def spawn(target: SSHTarget, argv: list[str], *,
                stdin: int | None = asyncio.subprocess.PIPE,
                stdout: int | None = asyncio.subprocess.PIPE) -> asyncio.subprocess.Process:
    """Start a local ssh process; a missing ``ssh`` binary is an :class:`SSHError`."""
    log.debug("spawn %s", shlex.join(a if len(a) < 300 else a[:300] + "...'" for a in argv))
    try:
        return await asyncio.create_subprocess_exec(
            *argv, stdin=stdin, stdout=stdout, stderr=asyncio.subprocess.PIPE,
            # Non-interactive: Ctrl-C reaches only tether, which ends its children itself.
            # Interactive: ssh keeps the terminal so passphrase and 2FA prompts reach the user.
            start_new_session=sys.platform != "win32" and not target.interactive,
        )
    except OSError as e:
        raise SSHError(f"cannot run {argv[0]}: {e.strerror}",
                       hint="Install an OpenSSH client (`ssh` must be on PATH).") from e


async def terminate(proc: asyncio.subprocess.Process, timeout: float = 3.0) -> None:
    """End a child: SIGTERM, then SIGKILL after ``timeout``; always reaped."""
    if proc.returncode is None:
        try:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), timeout)
        except ProcessLookupError:
            pass
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
    else:
        await proc.wait()


async def run(target: SSHTarget, command: Sequence[str], *, input: bytes | None = None,
              timeout: float = DEFAULT_TIMEOUT, check: bool = True) -> Completed:
    """Run ``command`` (an argv) on the target; raise an :class:`SSHError` on failure."""
    argv = target.argv(command=command)
    proc = await spawn(target, argv)
    try:
        out, err = await asyncio.wait_for(proc.communicate(input), timeout)
    except asyncio.TimeoutError as e:
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


def remote_root_expr() -> str:
    """Shell expression for tether's directory under the remote user's cache directory."""
    return '"${XDG_CACHE_HOME:-$HOME/.cache}/tether"'


def remote_tether_argv(*args: str) -> list[str]:
    """argv running the ``tether`` that ``tether up`` installed on the remote, with ``args``.

    The remote runtime directory is set so that remote commands find the server's state file.
    """
    script = (f"r={remote_root_expr()}; JUPYTER_RUNTIME_DIR=\"$r/runtime\" "
              f"exec \"$r/env-{__version__}/bin/tether\" \"$@\"")
    return ["sh", "-c", script, "tether", *args]


def interactive_default() -> bool:
    """Prompts (passphrases, 2FA) can reach the user only when stdin is a terminal."""
    try:
        return os.isatty(0)
    except OSError:
        return False
