"""One authenticated connection per ``tether up``: an OpenSSH ControlMaster of tether's own.

Every ssh that ``up`` runs (the probe, the install, the server's start and restarts) is a client
of this master, so a host that asks for a password asks once per ``up``, and the tunnel's
forward lives in the master too (``ssh -O forward``): OpenSSH hands a forward asked for by a
multiplexed ``ssh -N -L`` to the master and that client exits at once, so there is no separate
tunnel ssh to supervise; the master is it. A lost master (the network really dropped) is
connected again, which costs one prompt where the host takes only a password.

The master is a child of ``up`` (``ssh -M -N``, ``ControlPersist=no``): its socket is in a 0700
folder of its own (``$XDG_RUNTIME_DIR`` or the temp folder, kept short: Unix socket paths end
at ~104 bytes), its log (``-E``) beside it. ``aclose`` ends it with ``ssh -O exit`` (which also
ends every forward) and removes the folder, whichever way ``up`` ends; it never outlives ``up``.

Not used, and today's one-connection-per-command behaviour kept, where the user's config has a
ControlMaster/ControlPath of its own (theirs is used as they set it up; ``ssh -G`` says), and on
Windows, whose OpenSSH has no ControlMaster.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

from tether import _login, _ssh
from tether.errors import AuthenticationError, PortInUseError, SSHError

log = logging.getLogger(__name__)

CONNECT_DEADLINE = 30.0
INTERACTIVE_DEADLINE = 180.0  # a password, passphrase or 2FA prompt may be waiting for the user
CONTROL_TIMEOUT = 5.0  # ``ssh -O ...``: a local round trip to the master
ALIVE_TIMEOUT = 2.5  # a round trip to the host through the master
POLL = 0.005  # a stat or a listdir: cheap, and a start is found ~10 ms sooner than at 20 ms
TYPED = ("password", "keyboard-interactive")  # methods a person types
# The only place OpenSSH says how it logged in is its log (LogLevel VERBOSE): there is no
# machine-readable form of it.
_AUTHENTICATED = re.compile(rb'Authenticated to .* using "([\w@.-]+)"')
# ssh could not create or use the control socket: it goes on without multiplexing
_NO_MUX = (b"disabling multiplexing", b"too long for unix domain socket", b"controlpath",
           b"control socket", b"bad configuration option", b"unsupported option")


class Mode(enum.Enum):
    OWN = "own"  # tether's master: every command and the forward go through it
    USER = "user"  # the user's config has a ControlMaster/ControlPath: theirs, as they set it
    NONE = "none"  # no ControlMaster in this client (Windows), or it could not be used


OnPrompt = Callable[[bool], None]


class Master:
    """``await start()``, use :attr:`target` for every ssh to the host, ``await aclose()``.

    ``on_prompt(True)`` is called before ssh may ask the user something at the terminal (only
    where the target is interactive) and ``on_prompt(False)`` after: a progress line must not be
    drawn while ssh waits for a password.
    """

    def __init__(self, target: _ssh.SSHTarget, on_prompt: OnPrompt | None = None) -> None:
        self.base = target
        self.on_prompt = on_prompt or (lambda waiting: None)
        self.mode = Mode.NONE
        self.auth_method = ""  # as the master logged in: "publickey", "password", ...
        # the master's ssh: a plain child (no pipes), so that the one `up` started before the
        # command line loaded (tether._login) is the same kind of process as any later one
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir: Path | None = None
        self.forwards: set[str] = set()

    @property
    def path(self) -> str:
        return str(self.dir / "m") if self.dir is not None else ""

    @property
    def log_path(self) -> Path | None:
        return self.dir / "log" if self.dir is not None else None

    @property
    def target(self) -> _ssh.SSHTarget:
        """The host as every ssh of ``up`` reaches it: through the master where there is one."""
        if self.mode is Mode.OWN:
            return replace(self.base, control_path=self.path)
        return self.base

    async def start(self) -> None:
        """Decide how to connect, and connect once (the one prompt, if the host asks); adopt
        the login ``up`` started early for this very target (:func:`tether._login.take`)."""
        early = _login.take(self.base)
        self.mode = Mode.OWN if early is not None else await choose_mode(self.base)
        if self.mode is not Mode.OWN:
            log.info("%s: no ControlMaster of tether's (%s)", self.base.host, self.mode.value)
            return
        try:
            self.dir = Path(early.folder if early is not None else _login.runtime_dir())
            if early is None or not await self._adopt(early.proc):
                await self._connect()
        except _login.NoMux as e:
            log.info("%s: ssh cannot multiplex here (%s); one connection per command",
                     self.base.host, e)
            await self.aclose()
            self.mode = Mode.NONE
        except BaseException:
            await self.aclose()
            raise

    async def _adopt(self, proc: subprocess.Popen[bytes]) -> bool:
        """Take the login started before the command line loaded; False (and it is ended)
        where it was refused for want of a prompt (a password, a passphrase, 2FA, a new host
        key: it never prompts), so ``up`` logs in as always. Another failure (the host cannot
        be reached) is the answer a second try would give: raised."""
        try:
            await self._connect(proc)
        except AuthenticationError as e:
            log.info("%s: the early login did not get in (%s); logging in again",
                     self.base.host, e)
            return False
        return True

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def ensure(self) -> None:
        """The master runs: connected again if it was lost (a prompt, where the host asks)."""
        if self.mode is Mode.OWN and not self.running():
            await self._stop()
            await self._connect()

    async def _connect(self, started: subprocess.Popen[bytes] | None = None) -> None:
        """Start the master (or take the one ``started`` early) and wait (bounded) until it
        listens; nothing is left on failure."""
        assert self.dir is not None and self.log_path is not None
        if started is None:
            Path(self.path).unlink(missing_ok=True)  # a socket left by a killed master
        start = 0 if started is not None else _size(self.log_path)
        prompts = self.base.prompts and started is None  # (the early one never prompts)
        deadline = INTERACTIVE_DEADLINE if prompts else CONNECT_DEADLINE
        self.forwards.clear()
        async with self._prompting():
            if started is None:
                log.debug("spawn %s", shlex.join(_login.master_argv(self.base, str(self.dir))))
            self.proc = started or _login.spawn_master(self.base, str(self.dir))
            _login.running.add(self.proc)
            try:
                await self._listening(start, deadline)
            except BaseException:
                await self._stop()
                raise
        found = _AUTHENTICATED.findall(self._log(start))
        self.auth_method = found[-1].decode() if found else ""
        log.info("%s: ControlMaster %s up (pid %s, %s%s)", self.base.host, self.path,
                 self.proc.pid, self.auth_method or "?",
                 ", started before the command line loaded" if started is not None else "")

    async def _listening(self, start: int, deadline: float) -> None:
        assert self.proc is not None
        try:
            async with asyncio.timeout(deadline):
                # ssh binds the socket only once it has logged in (no other readiness signal)
                while not os.path.exists(self.path):
                    if self.proc.poll() is not None:
                        raise self._failed(start)
                    if b"disabling multiplexing" in self._log(start):
                        raise _login.NoMux(_ssh.stderr_tail(self._log(start), 200))
                    await asyncio.sleep(POLL)
        except TimeoutError as e:
            raise SSHError(f"connecting to {self.base.host} took more than {deadline:.0f} s",
                           hint=f"`ssh -v {self.base.host}` shows where it stops.",
                           host=self.base.host) from e

    def _failed(self, start: int) -> Exception:
        assert self.proc is not None and self.proc.returncode is not None
        text = self._log(start)
        if any(s in text.lower() for s in _NO_MUX) and b"permission denied" not in text.lower():
            return _login.NoMux(_ssh.stderr_tail(text, 200))
        return _ssh.ssh_error(self.base, "ssh", self.proc.returncode, text)

    def _log(self, start: int = 0) -> bytes:
        """What the master logged since ``start`` (a byte offset in its log)."""
        if self.log_path is None:
            return b""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(start)
                return f.read()
        except OSError:
            return b""

    def log_size(self) -> int:
        return _size(self.log_path) if self.log_path is not None else 0

    def log_since(self, start: int) -> bytes:
        return self._log(start)

    @contextlib.asynccontextmanager
    async def _prompting(self) -> AsyncIterator[None]:
        """Around a connect that may prompt: one prompt at a time, and the caller told."""
        if not self.base.prompts:
            yield
            return
        async with _prompt_lock():
            self.on_prompt(True)
            try:
                yield
            finally:
                self.on_prompt(False)

    async def alive(self) -> bool:
        """Whether the host answers through the master (its path works), within a bound."""
        if not self.running():
            return False
        try:
            done = await _ssh.run(self.target, ["true"], timeout=ALIVE_TIMEOUT, check=False)
        except SSHError as e:
            log.info("%s: no answer through the ControlMaster: %s", self.base.host, e)
            return False
        return done.returncode == 0

    async def reset(self) -> None:
        """End a master whose path is dead; :meth:`ensure` connects again."""
        await self._stop()

    async def forward(self, spec: str) -> None:
        """``-L spec`` in the master (already there: nothing to do)."""
        if spec in self.forwards:
            return
        done = await self._control("forward", "-L", spec)
        if done.returncode != 0:
            text = done.stderr.decode(errors="replace")
            if "forwarding failed" in text.lower():
                port = int(spec.split(":")[1])
                raise PortInUseError(f"local port {port} is already in use",
                                     hint="Pick another with --port N.", port=port)
            raise _ssh.ssh_error(self.base, f"ssh -O forward -L {spec}", done.returncode,
                                 done.stderr + self._log(max(0, self.log_size() - 400)))
        self.forwards.add(spec)

    async def cancel(self, spec: str) -> None:
        """Remove ``-L spec`` from the master (bounded; a failure is logged)."""
        if spec not in self.forwards:
            return
        self.forwards.discard(spec)
        if self.running():
            try:
                await self._control("cancel", "-L", spec)
            except SSHError as e:
                log.warning("%s: cancelling the forward %s failed: %s", self.base.host, spec, e)

    async def _control(self, command: str, *args: str) -> _ssh.Completed:
        argv = self.target.argv("-O", command, *args)
        proc = await _ssh.spawn(self.target, argv, stdin=asyncio.subprocess.DEVNULL)
        try:
            async with asyncio.timeout(CONTROL_TIMEOUT):
                out, err = await proc.communicate()
        except TimeoutError as e:
            raise SSHError(f"`ssh -O {command}` to {self.base.host} took more than "
                           f"{CONTROL_TIMEOUT:.0f} s", host=self.base.host) from e
        finally:
            await _ssh.terminate(proc)
        assert proc.returncode is not None
        return _ssh.Completed(argv, proc.returncode, out, err)

    async def _stop(self) -> None:
        if self.proc is not None:
            await _end(self.proc)
            _login.running.discard(self.proc)
            self.proc = None
        self.forwards.clear()

    async def aclose(self) -> None:
        """End the master and every forward in it (bounded, also when cancelled meanwhile)."""
        task = asyncio.ensure_future(self._close())
        cancelled = False
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError
        task.result()

    async def _close(self) -> None:
        if self.running():
            try:
                done = await self._control("exit")
                if done.returncode == 0 and self.proc is not None:
                    await _ssh.wait_exit(self.proc, CONTROL_TIMEOUT)
            except SSHError as e:
                log.warning("%s: `ssh -O exit` failed: %s", self.base.host, e)
        await self._stop()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = \
    weakref.WeakKeyDictionary()


def _prompt_lock() -> asyncio.Lock:
    """One prompt at a time on the terminal (``up`` with several hosts)."""
    loop = asyncio.get_running_loop()
    lock = _locks.get(loop)
    if lock is None:
        lock = _locks[loop] = asyncio.Lock()
    return lock


def _size(path: Path | None) -> int:
    try:
        return path.stat().st_size if path is not None else 0
    except OSError:
        return 0


async def _end(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after :data:`tether._login.END_WAIT`; reaped. A cancellation meanwhile ends it
    at once (SIGKILL) before it goes on: no master outlives this."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        await _ssh.wait_exit(proc, _login.END_WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def choose_mode(target: _ssh.SSHTarget) -> Mode:
    """OWN unless the client has no ControlMaster or the user's config sets their own."""
    if sys.platform == "win32":
        return Mode.NONE
    return Mode.USER if _login.users_master(await ssh_config(target)) else Mode.OWN


async def ssh_config(target: _ssh.SSHTarget) -> dict[str, str]:
    """``ssh -G HOST``: the options in effect for the host, after the user's config."""
    argv = target.argv("-G")
    proc = await _ssh.spawn(target, argv, stdin=asyncio.subprocess.DEVNULL)
    try:
        async with asyncio.timeout(_login.CONFIG_TIMEOUT):
            out, _ = await proc.communicate()
    except TimeoutError:
        return {}
    finally:
        await _ssh.terminate(proc)
    return _login.parse_config(out.decode(errors="replace"))


async def auth_method(target: _ssh.SSHTarget) -> str:
    """How ssh logs in to the host now ("" where a connection of the user's own carried it):
    for ``tether doctor`` where there is no master of tether's to ask."""
    verbose = replace(target, options=(*target.options, "LogLevel=VERBOSE"))
    try:
        done = await _ssh.run(verbose, ["true"], timeout=CONNECT_DEADLINE, check=False)
    except SSHError:
        return ""
    found = _AUTHENTICATED.findall(done.stderr)
    return found[-1].decode() if found else ""


def copy_id_command(target: _ssh.SSHTarget) -> str:
    """``ssh-copy-id`` for the host, with the user's -F and -o options, as it can be run."""
    args = ["ssh-copy-id"]
    if target.config_file:
        args += ["-F", target.config_file]
    for opt in target.options:
        args += ["-o", opt]
    return shlex.join([*args, target.host])


def password_note(target: _ssh.SSHTarget, method: str) -> str:
    """What to say, once, when the host was logged in to with something typed."""
    return (f"{target.host} asked for a password ({method}): tether keeps this one "
            f"connection while `up` runs, but a lost connection is healed unattended only with "
            f"a key. `{copy_id_command(target)}` installs yours there (make one with "
            "`ssh-keygen` first if you have none).")
