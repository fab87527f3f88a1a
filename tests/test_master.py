"""One connection per ``tether up`` (tether._master), against the real sshd of the test bed.

The password host is driven in a real terminal (tmux): the password is typed with send-keys and
the screen read with capture-pane, so what is counted is what a person sees.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.fixtures_ssh import Prepared
from tests.sshd import SSHBed, free_port, kill_user_processes, password_user

pytestmark = pytest.mark.timeout(900)

PROMPT = "'s password:"
SCREEN_DEADLINE = 60.0
COLD_DEADLINE = 600.0
HEAL_DEADLINE = 30.0


def _wait(check: Callable[[], object], deadline: float, what: str) -> object:
    end = time.monotonic() + deadline
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < end, f"no {what} within {deadline:.0f} s"
        time.sleep(0.05)


class Terminal:
    """One tmux session of our own (its own server socket), running one command."""

    def __init__(self, dir: Path, argv: list[str], env: dict[str, str]) -> None:
        self.sock = str(dir / "tmux.sock")
        line = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(argv)
        # the exit status stays on the screen; the pane stays open for reading it
        shell = f"{line}; echo \"[exit $?]\"; sleep 600"
        self._tmux("new-session", "-d", "-s", "t", "-x", "200", "-y", "50", shell)  # (run by sh)

    def _tmux(self, *args: str) -> str:
        done = subprocess.run(["tmux", "-S", self.sock, *args], capture_output=True, text=True,
                              timeout=30, check=True)
        return done.stdout

    def screen(self) -> str:
        """Everything the terminal showed, history included, wrapped lines joined."""
        return self._tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "t")

    def send(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "t", *keys)

    def prompts(self) -> int:
        return self.screen().count(PROMPT)

    def wait(self, pattern: str, deadline: float = SCREEN_DEADLINE) -> re.Match[str]:
        found = _wait(lambda: re.search(pattern, self.screen()), deadline, repr(pattern))
        assert isinstance(found, re.Match)
        return found

    def pid(self) -> int:
        """The pid of the shell running the command."""
        return int(self._tmux("list-panes", "-t", "t", "-F", "#{pane_pid}").strip())

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.sock, "kill-server"], capture_output=True, timeout=30)


@pytest.fixture
def terminals(tmp_path: Path) -> Iterator[Callable[[list[str], dict[str, str]], Terminal]]:
    if not shutil.which("tmux"):
        pytest.skip("needs tmux (scripts/setup test installs it)")
    opened: list[Terminal] = []
    short = Path(tempfile.mkdtemp(prefix="tmx-"))  # (the socket path must be short)

    def open_(argv: list[str], env: dict[str, str]) -> Terminal:
        term = Terminal(short, argv, env)
        opened.append(term)
        return term

    yield open_
    for term in opened:
        term.close()
    shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def pw(testbed: SSHBed) -> Iterator[tuple[str, Path]]:
    """The password of ``pwhost``'s user (new each test) and its home; its processes are ended
    afterwards (`tether down` would ask for the password)."""
    password = "p" + secrets.token_urlsafe(12)  # never a leading "-", which tmux reads as a flag
    user = password_user(password)
    yield password, Path(user.pw_dir)
    kill_user_processes(user.pw_uid)


@pytest.fixture
def runtime() -> Iterator[Path]:
    """An XDG_RUNTIME_DIR short enough to hold tether's ControlMaster socket."""
    path = Path(tempfile.mkdtemp(prefix="rt-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _masters(marker: str) -> list[psutil.Process]:
    """tether's ControlMaster processes whose command line holds ``marker``."""
    found = []
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if p.info["name"] == "ssh" and "-M" in cmd and any(marker in a for a in cmd):
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except psutil.Error:
                pass
    return found


def _answers(port: int, token: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}",
                                    timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _prompt_lines(screen: str) -> list[str]:
    return [line for line in screen.splitlines() if PROMPT in line]


def _server_pid(home: Path) -> int:
    states = list((home / ".cache" / "tether" / "runtime").glob("tether-*.json"))
    assert states, "no server state file"
    return int(states[0].name.removeprefix("tether-").removesuffix(".json"))


def test_password_host_asks_once_and_heals_without_asking(
        testbed: SSHBed, pw: tuple[str, Path], runtime: Path,
        terminals: Callable[[list[str], dict[str, str]], Terminal]) -> None:
    password, home = pw
    port = free_port()
    argv = [sys.executable, "-m", "tether", "up", "pwhost", "-F", str(testbed.config),
            "--port", str(port), "--no-install-kernel-deps"]
    term = terminals(argv, {"XDG_RUNTIME_DIR": str(runtime)})
    term.wait(re.escape(PROMPT))
    term.send(password, "Enter")
    url = term.wait(rf"http://127\.0\.0\.1:{port}/\?token=([0-9a-f]+)", COLD_DEADLINE)
    token = url.group(1)
    screen = term.screen()
    before_url = screen[:screen.index(url.group(0))]
    assert before_url.count(PROMPT) == 1, screen  # one prompt, then the URL
    # the prompt is a line of its own: ssh's words only, no spinner or progress drawn into it
    assert all(re.fullmatch(r"\S+@\S+'s password: *", line) for line in _prompt_lines(screen)), \
        screen
    assert f"ssh-copy-id -F {testbed.config} pwhost" in screen, screen  # said once, runnable
    assert screen.count("ssh-copy-id") == 1, screen
    copy_id = shlex.split(re.search(r"`(ssh-copy-id [^`]+)`", screen).group(1))  # type: ignore[union-attr]
    mine = runtime / "home"  # ssh-copy-id works in ~/.ssh, which a fresh machine may lack
    (mine / ".ssh").mkdir(parents=True, mode=0o700)
    dry = subprocess.run([copy_id[0], "-n", "-f", "-i", str(testbed.dir / "id_test.pub"),
                          *copy_id[1:]], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "HOME": str(mine)})
    assert dry.returncode == 0 and "Would have added" in dry.stdout + dry.stderr, dry  # parses
    assert _answers(port, token)

    # the server dies: started again through the connection tether holds, no prompt
    server = psutil.Process(_server_pid(home))
    server.kill()
    server.wait(10)
    _wait(lambda: _answers(port, token) and _server_pid(home) != server.pid, HEAL_DEADLINE,
          "URL after the server was killed")
    assert term.prompts() == 1, term.screen()

    # the connection itself is lost (the master killed): one prompt, then the same URL
    masters = _masters(str(runtime))
    assert len(masters) == 1
    masters[0].kill()
    _wait(lambda: term.prompts() == 2, SCREEN_DEADLINE, "second prompt")
    assert not _answers(port, token)
    term.send(password, "Enter")
    _wait(lambda: _answers(port, token), HEAL_DEADLINE, "URL after the master was lost")
    screen = term.screen()
    assert screen.count(PROMPT) == 2, screen
    assert all(re.fullmatch(r"\S+@\S+'s password: *", line) for line in _prompt_lines(screen)), \
        screen

    term.send("C-c")
    term.wait(r"\[exit 0\]", 30)
    _wait(lambda: not _masters(str(runtime)), 5, "end of the master")
    assert not list(runtime.glob("tether-[0-9]*")), list(runtime.iterdir())


def test_doctor_names_a_typed_password(
        testbed: SSHBed, pw: tuple[str, Path], runtime: Path,
        terminals: Callable[[list[str], dict[str, str]], Terminal]) -> None:
    argv = [sys.executable, "-m", "tether", "doctor", "pwhost", "-F", str(testbed.config)]
    term = terminals(argv, {"XDG_RUNTIME_DIR": str(runtime)})
    term.wait(re.escape(PROMPT))
    term.send(pw[0], "Enter")
    term.wait(r"\[exit \d+\]", 120)
    screen = term.screen()
    assert screen.count(PROMPT) == 1, screen  # every check over the one connection
    assert re.search(r"auth: password \(one connection of tether's", screen), screen
    assert "ssh-copy-id" in screen


# -- key authentication: the master goes with `up`, whichever way it ends -------------------------

def _up(testbed: SSHBed, runtime: Path, host: str, *args: str,
        config: Path | None = None) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "tether", "-v", "up", host, "-F", str(config or testbed.config),
            "--json", *args]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)})


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_master_ends_with_up(prepared: Prepared, testbed: SSHBed, runtime: Path,
                             how: str) -> None:
    port = free_port()
    proc = _up(testbed, runtime, "gpubox", "--port", str(port))
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("{"), proc.stderr
        sockets = list(runtime.glob("tether-*/m"))
        assert len(sockets) == 1 and sockets[0].is_socket()
        assert len(_masters(str(runtime))) == 1
        proc.send_signal(signal.SIGINT if how == "SIGINT" else signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0, err
    assert "ControlMaster" in err and "publickey" in err, err
    assert "started before the command line loaded" in err, err  # tether._login's, adopted
    _wait(lambda: not _masters(str(runtime)), 3, "end of the master")
    assert not list(runtime.glob("tether-[0-9]*")), list(runtime.iterdir())
    with socket.socket() as s:  # the forward went with it
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_master_ends_with_an_error(testbed: SSHBed, runtime: Path) -> None:
    proc = _up(testbed, runtime, "nopython", "--port", str(free_port()))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "ControlMaster" in err and "python" in err.splitlines()[-1].lower(), err
    assert not _masters(str(runtime))
    assert not list(runtime.glob("tether-[0-9]*")), list(runtime.iterdir())


def test_an_early_login_nobody_adopts_is_ended(testbed: SSHBed, runtime: Path) -> None:
    """`tether up HOST` starts its login before it parses; a command that then fails to parse
    (a wrong --port) ends that ssh and its folder, and says only the usage error."""
    proc = _up(testbed, runtime, "gpubox", "--port", "nine")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert err.startswith("error: Invalid value for '--port'") and len(err.splitlines()) == 1
    assert not _masters(str(runtime))
    assert not list(runtime.glob("tether-[0-9]*")), list(runtime.iterdir())


def test_the_users_own_control_path_is_theirs(prepared: Prepared, testbed: SSHBed,
                                              runtime: Path, tmp_path: Path) -> None:
    theirs = Path(tempfile.mkdtemp(prefix="cm-"))  # short: a socket path
    config = tmp_path / "ssh_config"
    config.write_text(f"Host cmhost\n  HostName 127.0.0.1\n  Port {testbed.target.port}\n"
                      f"  ControlMaster auto\n  ControlPath {theirs}/%C\n  ControlPersist 60\n"
                      + testbed.config.read_text())
    port = free_port()
    proc = _up(testbed, runtime, "cmhost", "--port", str(port), config=config)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("{"), proc.stderr
        assert [p for p in theirs.iterdir() if p.is_socket()], "their master was not used"
        assert not list(runtime.glob("tether-[0-9]*")) and not _masters(str(runtime))
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        with socket.socket() as s:  # tether's forward is gone; their master is theirs
            assert s.connect_ex(("127.0.0.1", port)) != 0
        check = subprocess.run(["ssh", "-F", str(config), "-O", "check", "cmhost"],
                               capture_output=True, timeout=10)
        assert check.returncode == 0, check.stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        subprocess.run(["ssh", "-F", str(config), "-O", "exit", "cmhost"], capture_output=True,
                       timeout=10)
        shutil.rmtree(theirs, ignore_errors=True)


def test_doctor_reports_the_key(prepared: Prepared, testbed: SSHBed, runtime: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "tether", "doctor", "gpubox", "-F",
                           str(testbed.config), "--json"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120,
                          env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)})
    checks = {c["name"]: c for c in json.loads(done.stdout)}
    assert checks["auth"]["detail"].startswith("publickey (one connection of tether's"), checks
    assert not list(runtime.glob("tether-[0-9]*"))
