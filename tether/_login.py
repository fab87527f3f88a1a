"""Where tether's ssh logins start, with the standard library only: the host as the user's ssh
sees it (:class:`SSHTarget`), the ControlMaster's command and folder, and the early login of
``tether up HOST``.

Early login: the command line needs about 0.1 s of imports (asyncio, click, the rest of
tether) before it has parsed its arguments, and the master's login then takes about 0.2 s. So
``tether up HOST`` starts the master's ``ssh`` before any of that (:func:`start`, from the
console script's entry, :mod:`tether.__main__`), from a guess of the target read off the
arguments; the login runs while the rest loads. It never prompts (``BatchMode``): where the
host wants a password or a 2FA code, it fails at once and ``up`` logs in as always, with the
one prompt. When :mod:`tether._master` connects, it adopts that ssh (:func:`take`) only if its
target, as the real parse built it, gives the same ``ssh`` argv (prompts aside); otherwise, and
whatever way the command ends without adopting it, the early ssh is ended (:func:`discard`,
also from :func:`tether._ssh.kill_all`). The guess reads only ``up`` with HOST first and
``-F``/``-o``/``--batch``; anything else (``--help`` too) it does not try.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

CONFIG_TIMEOUT = 10.0  # ``ssh -G``
END_WAIT = 3.0  # a master's ssh (early or not): SIGTERM, then SIGKILL after this
# sun_path holds 104 bytes on macOS and the BSDs (108 on Linux); ssh binds a temporary name
# (ControlPath + ".XXXXXXXXXXXXXXXX") before it renames it into place.
SOCKET_MAX = 100
# Keep-alives: a dead path (laptop asleep, Wi-Fi gone) is noticed in ~15 s, then reconnected.
KEEPALIVE = ("ServerAliveInterval=5", "ServerAliveCountMax=3")
VERBOSITY = re.compile(r"-v+|--verbose")


@dataclass(frozen=True)
class SSHTarget:
    """A host as the user's ``ssh`` understands it, plus the options to pass through."""

    host: str
    config_file: str | None = None
    options: tuple[str, ...] = ()
    interactive: bool = False
    ssh: str = field(default_factory=lambda: shutil.which("ssh") or "ssh")
    # NAME=VALUE pairs every remote command runs with (``env NAME=VALUE command``): the one place
    # that sets e.g. XDG_CACHE_HOME for tether's files there, since sshd seldom accepts SendEnv
    remote_env: tuple[tuple[str, str], ...] = ()
    # the ControlPath of tether's own ControlMaster to this host (tether._master): every ssh
    # then runs over that one authenticated connection and never prompts itself
    control_path: str = ""

    @property
    def prompts(self) -> bool:
        """Whether an ssh of this target may ask the user (a passphrase, a password, 2FA)."""
        return self.interactive and not self.control_path

    def argv(self, *extra: str, command: Sequence[str] | None = None) -> list[str]:
        """The local ``ssh`` argv; ``command`` is a remote argv, quoted for the remote shell."""
        args = [self.ssh]
        if self.config_file:
            args += ["-F", self.config_file]
        for opt in self.options:
            args += ["-o", opt]
        if self.control_path:
            args += ["-o", "ControlMaster=no", "-o", f"ControlPath={self.control_path}"]
        if not self.prompts:
            # no prompt can be answered (or, through the master, none is needed): fail at once
            # instead of hanging on a hidden one (a mux client whose master is gone connects
            # directly, and must not ask for a password into the spinner's line)
            args += ["-o", "BatchMode=yes"]
        args += [*extra, "--", self.host]
        if command is not None:
            if self.remote_env:
                command = ["env", *(f"{k}={v}" for k, v in self.remote_env), *command]
            args.append(shlex.join(command))
        return args


def interactive_default() -> bool:
    """Prompts (passphrases, 2FA) can reach the user only when stdin is a terminal."""
    try:
        return os.isatty(0)
    except OSError:
        return False


class NoMux(Exception):
    """ssh cannot run a ControlMaster here (the reason is the message)."""


def runtime_dir() -> str:
    """A new 0700 folder for one master's socket and log, with a path short enough for it."""
    tops = (os.environ.get("XDG_RUNTIME_DIR"), tempfile.gettempdir(), "/tmp")
    for top in tops:
        # + "/tether-<pid>-XXXXXXXX" + "/m" + ssh's ".XXXXXXXXXXXXXXXX"
        if top and os.path.isdir(top) and len(os.fsencode(top)) + 24 + 10 + 17 <= SOCKET_MAX:
            try:
                return tempfile.mkdtemp(prefix=f"tether-{os.getpid()}-", dir=top)
            except OSError:
                continue
    raise NoMux("no folder with a short enough path for a Unix socket")


def master_argv(target: SSHTarget, folder: str) -> list[str]:
    """The ControlMaster's ssh: socket ``m`` and log ``log`` in ``folder``, no command, and
    ``ControlPersist=no``: it ends with its parent's ``ssh -O exit`` or signal."""
    return target.argv("-M", "-N", "-T", "-S", os.path.join(folder, "m"),
                       "-E", os.path.join(folder, "log"), "-o", "ControlPersist=no",
                       "-o", "LogLevel=VERBOSE", *(a for opt in KEEPALIVE for a in ("-o", opt)))


def spawn_master(target: SSHTarget, folder: str) -> subprocess.Popen[bytes]:
    """Start the ControlMaster's ssh (its own early errors go to the same log)."""
    with open(os.path.join(folder, "log"), "ab") as log:
        return subprocess.Popen(master_argv(target, folder), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=log,
                                # as tether._ssh.spawn: a prompt needs the terminal's session
                                start_new_session=sys.platform != "win32" and not target.prompts)


def parse_config(text: str) -> dict[str, str]:
    """``ssh -G``'s output as {lowercase key: first value}."""
    config: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        config.setdefault(key.lower(), value.strip())
    return config


def users_master(config: dict[str, str]) -> bool:
    """Whether the user's config sets a ControlMaster or ControlPath of their own."""
    return config.get("controlmaster", "false") != "false" \
        or config.get("controlpath", "none") != "none"


# -- the early login of `tether up HOST` ------------------------------------------------------

@dataclass
class Early:
    """A ControlMaster ssh started before the command line loaded, for ``target``."""

    target: SSHTarget
    folder: str
    proc: subprocess.Popen[bytes]


_early: list[Early] = []  # at most one: `up` with one HOST
held: list[int] = []  # signals received before the command's event loop took them over
running: set[subprocess.Popen[bytes]] = set()  # every master ssh started (ended: removed)


def guess(args: Sequence[str]) -> SSHTarget | None:
    """The target of ``tether up HOST [options]`` as far as the arguments say it plainly: HOST
    first, then ``-F``/``--ssh-config``, ``-o``/``--ssh-option`` and ``--batch`` in any of
    click's spellings; None for anything else (another command, no HOST first, ``--``)."""
    words = [a for a in args if not VERBOSITY.fullmatch(a)]
    if len(words) < 2 or words[0] != "up" or words[1].startswith("-") \
            or {"-h", "--help"} & set(words):
        return None
    config: str | None = None
    options: list[str] = []
    batch = False
    rest = iter(words[2:])
    for word in rest:
        if word == "--":
            return None
        name, eq, value = word.partition("=")
        if word in ("-F", "--ssh-config", "-o", "--ssh-option"):
            value = next(rest, "")
        elif eq and name in ("--ssh-config", "--ssh-option"):
            word = name
        elif word[:2] in ("-F", "-o") and not word.startswith("--"):
            word, value = word[:2], word[2:]
        elif word == "--batch":
            batch = True
            continue
        else:
            continue
        if word in ("-F", "--ssh-config"):
            config = value
        else:
            options.append(value)
    return SSHTarget(words[1], config, tuple(options),
                     interactive=not batch and interactive_default())


def start(args: Sequence[str]) -> bool:
    """``tether up HOST``: start the ControlMaster's ssh now, where tether would start its own
    (``ssh -G`` first: the user's own ControlMaster settings are theirs); whether it did.
    Quiet: any doubt, and nothing is started; :mod:`tether._master` then logs in as always.
    From the guess on, SIGINT and SIGTERM are held (:func:`hold_signals`)."""
    target = guess(args)
    if target is None or sys.platform == "win32":
        return False
    hold_signals()  # from before the first ssh: no signal can leave one behind
    target = replace(target, interactive=False)  # BatchMode: it never prompts
    try:
        done = subprocess.run(target.argv("-G"), stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=CONFIG_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if done.returncode != 0 or users_master(parse_config(done.stdout.decode(errors="replace"))):
        return False
    try:
        folder = runtime_dir()
    except NoMux:
        return False
    try:
        _early.append(Early(target, folder, spawn_master(target, folder)))
    except OSError:
        shutil.rmtree(folder, ignore_errors=True)
        return False
    return True


def hold_signals() -> None:
    """SIGINT and SIGTERM are held (:data:`held`) until the command's event loop takes them
    over (:func:`tether.cli.run` then acts on them at once): a signal while the command line
    loads ends ``up`` as one a moment later would, the early ssh with it, with the same words
    and status. Everything before the loop is quick (imports and the parse)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, frame: held.append(signum))


def take(target: SSHTarget) -> Early | None:
    """The early ssh, if it was started for what ``target`` runs (the same ssh argv, but for
    ``BatchMode``: the early one never prompts)."""
    for early in list(_early):
        if early.target.argv() == replace(target, interactive=False).argv():
            _early.remove(early)
            return early
    return None


def kill_all() -> None:
    """SIGKILL every master ssh still running, and any early one (the last resort on exit)."""
    discard(grace=0)
    for proc in list(running):
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        running.discard(proc)


def discard(grace: float = END_WAIT) -> None:
    """End an early ssh nobody adopted (SIGTERM, SIGKILL after ``grace``) and remove its
    folder."""
    while _early:
        early = _early.pop()
        if early.proc.poll() is None:
            early.proc.terminate() if grace else early.proc.kill()
            try:
                early.proc.wait(grace or None)
            except subprocess.TimeoutExpired:
                early.proc.kill()
                early.proc.wait()
        shutil.rmtree(early.folder, ignore_errors=True)
