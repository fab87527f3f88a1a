"""A real OpenSSH test bed on loopback: two sshd (a target and a bastion), a non-root remote user.

Used by the SSH fixtures and by ``bench/bench_up.py``. Needs root (to add the user and run sshd)
and ``/usr/sbin/sshd`` (``apt-get install -y openssh-server``). Every process is stopped by pid.

The host ``relayed`` is the target reached through a ``ProxyCommand`` relay (stdin/stdout <->
TCP, one relay process per ssh connection) that a test can freeze: SIGSTOP sends no RST and no
FIN, as when Wi-Fi drops or a laptop sleeps. :meth:`SSHBed.freeze_path` also makes every new
relay stop itself at once (the network stays down) until :meth:`SSHBed.thaw_path`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

SSHD = "/usr/sbin/sshd"
# ``TETHER_TEST_BED=NAME`` gives a test run its own users, lock and network namespace (a short
# name: user names are at most 32 characters), so that runs in separate checkouts (or pytest
# workers) do not wait for each other; Slurm stays one at a time (tests/slurm.py).
BED = os.environ.get("TETHER_TEST_BED", "")


def bed_name(base: str) -> str:
    """``base`` for this test bed (users, namespaces, locks)."""
    return f"{base}-{BED}" if BED else base


REMOTE_USER = bed_name("tether-remote")
NOPYTHON_USER = bed_name("tether-nopy")
OTHER_USER = bed_name("tether-other")  # a second Unix user on the same machine
PASSWORD_USER = bed_name("tether-pw")  # logs in with a password only (host ``pwhost``)
READY_DEADLINE = 15.0
# One test bed at a time per name: they share the remote user, whose processes a starting
# bed ends. Concurrent pytest runs (or a bench) wait here instead of killing each other's work.
LOCK = Path(tempfile.gettempdir()) / f"{bed_name('tether-sshbed')}.lock"
LOCK_DEADLINE = 900.0

SSHD_CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {dir}/host_ed25519
PidFile {dir}/sshd-{port}.pid
AuthorizedKeysFile {dir}/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
AllowStreamLocalForwarding {streamlocal}
PermitRootLogin prohibit-password
LogLevel VERBOSE
Match User {password_user}
  PasswordAuthentication yes
  PubkeyAuthentication no
"""

CLIENT_CONFIG = """\
Host gpubox
  HostName 127.0.0.1
  Port {port}
Host nosock
  HostName 127.0.0.1
  Port {nosock_port}
Host bastion
  HostName 127.0.0.1
  Port {bastion_port}
Host behind
  HostName 127.0.0.1
  Port {port}
  ProxyJump bastion
Host badauth
  HostName 127.0.0.1
  Port {port}
  User tether-nobody
Host pwhost
  HostName 127.0.0.1
  Port {port}
  User {password_user}
  PubkeyAuthentication no
  PreferredAuthentications password,keyboard-interactive
Host nopython
  HostName 127.0.0.1
  Port {port}
  User {nopython_user}
Host relayed
  HostName 127.0.0.1
  Port {port}
  ProxyCommand {python} {dir}/relay.py %h %p {dir}/path-frozen
Host unreachable
  HostName 127.0.0.1
  Port {closed_port}
  ConnectTimeout 5
Host *
  User {user}
  IdentityFile {dir}/id_test
  IdentitiesOnly yes
  UserKnownHostsFile {dir}/known_hosts
  StrictHostKeyChecking yes
  ServerAliveInterval 5
"""


# The ProxyCommand of ``relayed``. Its stderr is ssh's (inherited), so a frozen relay that
# outlives its ssh holds that pipe open: the stuck-ProxyCommand case.
RELAY = """\
import os, signal, socket, sys, threading
host, port, flag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if os.path.exists(flag):
    os.kill(os.getpid(), signal.SIGSTOP)  # the path is down: hang as a dead network does
sock = socket.create_connection((host, port))
def upstream():
    try:
        while True:
            data = os.read(0, 65536)
            if not data:
                break
            sock.sendall(data)
    except OSError:
        pass
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
threading.Thread(target=upstream, daemon=True).start()
try:
    while True:
        data = sock.recv(65536)
        if not data:
            break
        os.write(1, data)
except OSError:
    pass
"""


def free_ports(n: int) -> int:
    """The first of ``n`` consecutive free ports, below the kernel's ephemeral range (where an
    outgoing connection could take the second one between the check and its use)."""
    import random

    for _ in range(200):
        first = random.randrange(20000, 32000 - n)
        try:
            for port in range(first, first + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise RuntimeError(f"no {n} consecutive free ports found")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_user(name: str = REMOTE_USER) -> pwd.struct_passwd:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], check=True, timeout=30)
    # useradd leaves the account locked ("!"), which sshd refuses even for keys without PAM
    subprocess.run(["usermod", "-p", "*", name], check=True, timeout=30)
    return pwd.getpwnam(name)


def password_user(password: str) -> pwd.struct_passwd:
    """The user of ``pwhost``, whose only way in is ``password`` (sshd: ``Match User``)."""
    user = ensure_user(PASSWORD_USER)
    subprocess.run(["chpasswd"], input=f"{PASSWORD_USER}:{password}".encode(), check=True,
                   timeout=30)
    return user


def kill_user_processes(uid: int, timeout: float = 10.0) -> list[int]:
    """End every process of ``uid`` (left over from an earlier run), by pid."""
    procs = [p for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == uid]
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return [p.pid for p in procs]


@dataclass
class Sshd:
    port: int
    proc: subprocess.Popen[bytes]

    def connection_pids(self) -> list[int]:
        """The sshd processes serving connections (children of the listener)."""
        try:
            return [c.pid for c in psutil.Process(self.proc.pid).children()]
        except psutil.Error:
            return []

    def stop(self) -> None:
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            children = []
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        for c in children:
            try:
                c.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(children, timeout=5)


@dataclass
class SSHBed:
    dir: Path
    user: pwd.struct_passwd
    config: Path
    target: Sshd
    bastion: Sshd
    nosock: Sshd
    daemons: list[Sshd] = field(default_factory=list)
    lock_fd: int = -1

    @property
    def home(self) -> Path:
        return Path(self.user.pw_dir)

    @property
    def tether_root(self) -> Path:
        return self.home / ".cache" / "tether"

    def ssh_argv(self, host: str = "gpubox") -> list[str]:
        return ["ssh", "-F", str(self.config), host]

    def relays(self, ssh_pid: int | None = None) -> list[psutil.Process]:
        """The relay processes of ``relayed`` (of one ssh, if given), stopped ones too."""
        script = str(self.dir / "relay.py")
        found = []
        for p in psutil.process_iter(["cmdline", "ppid"]):
            if script in (p.info["cmdline"] or []) and (ssh_pid is None
                                                        or p.info["ppid"] == ssh_pid):
                found.append(p)
        return found

    def freeze_relays(self, ssh_pid: int | None = None) -> list[int]:
        """SIGSTOP the relays (of one ssh): their connections hang, silently."""
        return _signal(self.relays(ssh_pid), signal.SIGSTOP)

    def freeze_path(self) -> list[int]:
        """The whole path goes silent: the live relays and every new one stop."""
        (self.dir / "path-frozen").touch()
        return self.freeze_relays()

    def new_path(self) -> None:
        """A new path (another network): new relays work, the stopped ones stay stopped."""
        (self.dir / "path-frozen").unlink(missing_ok=True)

    def thaw_path(self) -> list[int]:
        """The path is back: no new relay stops, and the stopped ones go on."""
        (self.dir / "path-frozen").unlink(missing_ok=True)
        return _signal(self.relays(), signal.SIGCONT)

    def restart_target(self, down_for: float = 0.0) -> None:
        """Stop the target's sshd (listener and connections), then start it on the same port."""
        port = self.target.port
        index = self.daemons.index(self.target)
        self.target.stop()
        if down_for:
            time.sleep(down_for)  # the fault itself: the port refuses connections meanwhile
        self.target = _start_sshd(self.dir, port)
        self.daemons[index] = self.target

    def kill_connections(self) -> list[int]:
        """Kill the sshd processes serving every connection to the target (monitor and session
        child): a dropped network, as seen from the server side."""
        victims = []
        for pid in self.target.connection_pids():
            try:
                proc = psutil.Process(pid)
                victims += [proc, *proc.children(recursive=True)]
            except psutil.Error:
                pass
        for p in victims:
            try:
                p.kill()
            except psutil.Error:
                pass
        return [p.pid for p in victims]

    def user_pids(self) -> list[int]:
        uid = self.user.pw_uid
        return [p.pid for p in psutil.process_iter(["uids"])
                if p.info["uids"] and p.info["uids"].real == uid]

    def stop(self) -> None:
        self.thaw_path()  # a stopped relay ends (SIGHUP from its ssh) once it runs again
        for relay in self.relays():
            try:
                relay.kill()
            except psutil.Error:
                pass
        for d in self.daemons:
            d.stop()
        if self.lock_fd >= 0:
            os.close(self.lock_fd)  # releases the flock
            self.lock_fd = -1


def _signal(procs: list[psutil.Process], sig: int) -> list[int]:
    done = []
    for p in procs:
        try:
            p.send_signal(sig)
            done.append(p.pid)
        except psutil.Error:
            pass
    return done


def flock_wait(deadline: float = LOCK_DEADLINE, path: Path = LOCK) -> int:
    """An exclusive flock on ``path``, waited for (bounded); released by closing the fd."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    end = time.monotonic() + deadline
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > end:
                os.close(fd)
                raise RuntimeError(f"another test bed held {path} for {deadline:.0f} s")
            time.sleep(0.2)


def _start_sshd(dir: Path, port: int, streamlocal: bool = True) -> Sshd:
    cfg = dir / f"sshd_config-{port}"
    cfg.write_text(SSHD_CONFIG.format(port=port, dir=dir, password_user=PASSWORD_USER,
                                      streamlocal="yes" if streamlocal else "no"))
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(cfg)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=open(dir / f"sshd-{port}.log", "wb"))
    deadline = time.monotonic() + READY_DEADLINE
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited: {(dir / f'sshd-{port}.log').read_text()[-500:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return Sshd(port, proc)
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise RuntimeError(f"sshd on port {port} did not start in {READY_DEADLINE} s")


def _nopython_user(dir: Path) -> None:
    """A user whose PATH has a shell and coreutils but no python3: a remote 'without Python'.

    Debian's bash reads ~/.bashrc for commands run by sshd, so the PATH is set there.
    """
    bin_dir = dir / "nopython-bin"
    bin_dir.mkdir()
    for tool in ("sh", "bash", "cat", "mkdir", "dirname", "env", "uname", "id"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    user = ensure_user(NOPYTHON_USER)
    (Path(user.pw_dir) / ".bashrc").write_text(f"export PATH={bin_dir}\n")


def start_testbed() -> SSHBed:
    if os.geteuid() != 0 or not os.path.exists(SSHD):
        raise RuntimeError("the SSH test bed needs root and /usr/sbin/sshd (openssh-server)")
    lock_fd = flock_wait()
    try:
        return _start_testbed(lock_fd)
    except BaseException:
        os.close(lock_fd)
        raise


def _start_testbed(lock_fd: int) -> SSHBed:
    user = ensure_user()
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    dir = Path(tempfile.mkdtemp(prefix="tether-sshd-"))
    dir.chmod(0o755)  # sshd reads authorized_keys as the remote user
    keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", ""]
    subprocess.run([*keygen, "-f", str(dir / "host_ed25519")], check=True, timeout=30)
    subprocess.run([*keygen, "-f", str(dir / "id_test")], check=True, timeout=30)
    shutil.copy(dir / "id_test.pub", dir / "authorized_keys")
    (dir / "authorized_keys").chmod(0o644)
    _nopython_user(dir)
    ports = [free_port() for _ in range(3)]
    host_key = (dir / "host_ed25519.pub").read_text().split()[:2]
    (dir / "known_hosts").write_text(
        "".join(f"[127.0.0.1]:{p} {' '.join(host_key)}\n" for p in ports))
    config = dir / "ssh_config"
    (dir / "relay.py").write_text(RELAY)
    config.write_text(CLIENT_CONFIG.format(
        port=ports[0], bastion_port=ports[1], nosock_port=ports[2], closed_port=free_port(),
        dir=dir, user=user.pw_name, nopython_user=NOPYTHON_USER, python=sys.executable,
        password_user=PASSWORD_USER))
    daemons: list[Sshd] = []
    try:
        daemons.append(_start_sshd(dir, ports[0]))
        daemons.append(_start_sshd(dir, ports[1]))
        daemons.append(_start_sshd(dir, ports[2], streamlocal=False))
    except BaseException:
        for d in daemons:
            d.stop()
        raise
    return SSHBed(dir, user, config, daemons[0], daemons[1], daemons[2], daemons, lock_fd)


# -- an air-gapped host: sshd in a network namespace with only a loopback interface ------------

AIRGAP_USER = bed_name("tether-airgap")
AIRGAP_NETNS = bed_name("tether-airgap")
AIRGAP_KEY_ALIAS = "tether-airgap"

# The ProxyCommand: stdin/stdout <-> TCP, run inside the namespace (nc/socat are not installed)
AIRGAP_RELAY = """\
import socket, sys, threading
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
def up():
    while True:
        data = sys.stdin.buffer.read1(65536)
        if not data:
            s.shutdown(socket.SHUT_WR)
            return
        s.sendall(data)
threading.Thread(target=up, daemon=True).start()
while True:
    data = s.recv(65536)
    if not data:
        break
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
"""

AIRGAP_CONFIG = """\
Host airgap
  HostName 127.0.0.1
  Port {port}
  HostKeyAlias {alias}
  ProxyCommand ip netns exec {netns} {python} {dir}/airgap-relay.py %h %p
Host airgap-online
  HostName 127.0.0.1
  Port {online_port}
Host *
  User {user}
  IdentityFile {dir}/id_test
  IdentitiesOnly yes
  UserKnownHostsFile {dir}/known_hosts_airgap
  StrictHostKeyChecking yes
  ServerAliveInterval 5
"""


def in_netns(netns: str, *argv: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@dataclass
class Airgap:
    """``airgap``: an sshd whose network namespace has only ``lo`` (the remote reaches no index,
    nor anything else); ``airgap-online``: the same user through the bed's ordinary sshd."""

    dir: Path
    config: Path
    netns: str
    sshd: Sshd
    user: pwd.struct_passwd

    @property
    def home(self) -> Path:
        return Path(self.user.pw_dir)

    @property
    def tether_root(self) -> Path:
        return self.home / ".cache" / "tether"

    def reset_home(self) -> None:
        """A home that has never seen tether: the user's processes ended, the home made anew
        from /etc/skel."""
        kill_user_processes(self.user.pw_uid)
        shutil.rmtree(self.home, ignore_errors=True)
        shutil.copytree("/etc/skel", self.home, symlinks=True)
        for top, dirs, files in os.walk(self.home):
            for name in [top, *(os.path.join(top, n) for n in dirs + files)]:
                os.lchown(name, self.user.pw_uid, self.user.pw_gid)
        self.home.chmod(0o750)

    @contextlib.contextmanager
    def uv_cannot_run(self) -> Iterator[Path]:
        """uv's folder under tether's root on a ``noexec`` tmpfs: the kernel refuses to run the
        uv unpacked there (as on hosts whose home or cache is mounted noexec)."""
        uv_dir = self.tether_root / "uv"
        uv_dir.mkdir(parents=True, exist_ok=True)
        for path in (self.home / ".cache", self.tether_root, uv_dir):
            os.chown(path, self.user.pw_uid, self.user.pw_gid)
        subprocess.run(["mount", "-t", "tmpfs", "-o",
                        f"noexec,mode=0700,uid={self.user.pw_uid},gid={self.user.pw_gid}",
                        "tether-noexec", str(uv_dir)], check=True, timeout=30)
        try:
            yield uv_dir
        finally:
            kill_user_processes(self.user.pw_uid)  # nothing may hold the mount
            subprocess.run(["umount", "-l", str(uv_dir)], check=True, timeout=30)

    def stop(self) -> None:
        self.sshd.stop()
        kill_user_processes(self.user.pw_uid)
        subprocess.run(["ip", "netns", "delete", self.netns], capture_output=True, timeout=30)


def _start_netns_sshd(dir: Path, netns: str, port: int) -> Sshd:
    cfg = dir / f"sshd_config-{netns}"
    cfg.write_text(SSHD_CONFIG.format(port=port, dir=dir, streamlocal="yes",
                                      password_user=PASSWORD_USER))
    log = dir / f"sshd-{netns}.log"
    # `ip netns exec` execs sshd in place: the pid is sshd's, and all it starts lives there
    proc = subprocess.Popen(["ip", "netns", "exec", netns, SSHD, "-D", "-e", "-f", str(cfg)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=open(log, "wb"))
    probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), 1).close()"
    deadline = time.monotonic() + READY_DEADLINE
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd in {netns} exited: {log.read_text()[-500:]}")
        if in_netns(netns, "python3", "-c", probe).returncode == 0:
            return Sshd(port, proc)
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"sshd in {netns} did not start in {READY_DEADLINE} s")


def start_airgap(bed: SSHBed, netns: str = AIRGAP_NETNS) -> Airgap:
    """The air-gapped host next to a running bed (its keys, its lock); root and iproute2."""
    subprocess.run(["ip", "netns", "delete", netns], capture_output=True, timeout=30)
    subprocess.run(["ip", "netns", "add", netns], check=True, capture_output=True, timeout=30)
    try:
        in_netns(netns, "ip", "link", "set", "lo", "up").check_returncode()
        user = ensure_user(AIRGAP_USER)
        (bed.dir / "airgap-relay.py").write_text(AIRGAP_RELAY)
        port = free_port()
        host_key = " ".join((bed.dir / "host_ed25519.pub").read_text().split()[:2])
        (bed.dir / "known_hosts_airgap").write_text(
            f"{AIRGAP_KEY_ALIAS} {host_key}\n[127.0.0.1]:{bed.target.port} {host_key}\n")
        config = bed.dir / "ssh_config_airgap"
        config.write_text(AIRGAP_CONFIG.format(
            port=port, alias=AIRGAP_KEY_ALIAS, netns=netns, python=shutil.which("python3"),
            dir=bed.dir, online_port=bed.target.port, user=user.pw_name))
        sshd = _start_netns_sshd(bed.dir, netns, port)
    except BaseException:
        subprocess.run(["ip", "netns", "delete", netns], capture_output=True, timeout=30)
        raise
    return Airgap(bed.dir, config, netns, sshd, user)


# -- a host whose home is read-only: a user whose home is a read-only bind mount of itself ------

ROHOME_USER = bed_name("tether-rohome")


@dataclass
class ReadOnlyHome:
    """``rohome``: the bed's sshd, logged in as a user whose home (so ``~/.cache``) is mounted
    read-only, as on hosts with a shared read-only home. ``config`` holds the bed's hosts too."""

    config: Path
    user: pwd.struct_passwd

    @property
    def home(self) -> Path:
        return Path(self.user.pw_dir)

    @property
    def tether_root(self) -> Path:
        return self.home / ".cache" / "tether"

    @property
    def elsewhere(self) -> Path:
        """The folder the seed offers instead (no $TMPDIR, no /scratch here)."""
        return Path(f"/tmp/tether-u{self.user.pw_uid}")

    def stop(self) -> None:
        kill_user_processes(self.user.pw_uid)  # nothing may hold the mount
        subprocess.run(["umount", str(self.home)], capture_output=True, timeout=30)
        shutil.rmtree(self.elsewhere, ignore_errors=True)


@contextlib.contextmanager
def read_only_home(bed: SSHBed) -> Iterator[ReadOnlyHome]:
    """The ``rohome`` host next to a running bed; unmounted and cleaned up afterwards."""
    user = ensure_user(ROHOME_USER)
    home = Path(user.pw_dir)
    shutil.rmtree(home / ".cache", ignore_errors=True)  # (an earlier run's, if it was writable)
    config = bed.dir / "ssh_config_rohome"
    config.write_text(f"Host rohome\n  HostName 127.0.0.1\n  Port {bed.target.port}\n"
                      f"  User {user.pw_name}\n" + bed.config.read_text())
    gone = ReadOnlyHome(config, user)
    gone.stop()  # an earlier run's mount or folder
    subprocess.run(["mount", "--bind", str(home), str(home)], check=True, timeout=30)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(home)], check=True, timeout=30)
        yield gone
    finally:
        gone.stop()
