"""The remote's first step: the small standard-library script that runs before tether's
environment exists, as the argument of the remote ``python3 -c`` (the bytes sent inline are
capped: tests/test_ssh_units.py). It never imports tether.

It checks the Python, probes the host (``probe``: the facts ``tether doctor`` and the install
plan need), makes sure the root is this user's, writable and 0700, and, where the environment
``<root>/env-<version>`` is missing or of another build, answers ``need_wheel`` with the
platform, whether the package index answers and the wheels cached here. The laptop's second
call streams tether's wheel, then the files named in ``incoming`` (the laptop's uv binary, or
uv's wheel; offline, every pinned wheel), each checked by sha256 (an online host may fetch uv's
pinned wheel itself). The environment is made with the shipped uv where it runs, else ``venv``
+ pip, from the laptop's lock (as it stands where uv resolved it, else ``--constraint``), from
the index or, offline, from the received wheels only.

Then it hands over: ``ENV/bin/python -I -m tether.host ACTION PARAMS`` (exec, same stdout)
does ``up``, ``prepare``, ``status`` and ``down``, typed, with psutil (:mod:`tether.host`).
Where no environment exists and nothing of tether's runs, ``status`` and ``down`` answer here.
:mod:`tether.host` imports this module for what both need (paths, errors, install commands).

Every line printed is one JSON object: progress events, then one ``result`` (with the
protocol version of :mod:`tether.contract`) or ``error``. The values both ends agree on come in
the parameters (:func:`tether.contract.seed_params`).
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and sys.version_info < (3, 11):  # one message, on Python >= 3.7
    import json as _j
    _need = _j.loads(sys.argv[1]).get("requires_python", "3.11")
    print(_j.dumps({"event": "error", "kind": "python", "message": "%s is Python %d.%d; tether "
                    "needs Python >= %s" % ((sys.executable,) + sys.version_info[:2] + (_need,)),
                    "hint": "Install a newer one on HOST (e.g. `sudo apt-get install python3 "
                    "python3-venv`) or pass --remote-python PATH."}))
    sys.exit(3)

import errno  # noqa: E402
import fcntl  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import select  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

TYPE_CHECKING = False  # (typing is not imported at run time: every import is paid per call)
if TYPE_CHECKING:
    from typing import Any, NoReturn

# Free space a fresh environment needs where the root is (checked before the laptop sends
# anything). Measured (tether 0.1.0, CPython 3.11, x86_64, `du -sm` after a cold `tether up`
# into an empty XDG_CACHE_HOME), 2026-12-08, from the index with the laptop's own uv sent:
# env-* 104 MiB + uv's cache 84 + uv unpacked 37 + tether's wheel 1 = 226 MiB; 2026-12-06,
# offline: 105 + 95 + the wheels sent 35 + 37 = 272 MiB. Asked: the sums plus about 15 %.
NEED_BYTES = {"index": 260 << 20, "offline": 315 << 20}
LOCK_DEADLINE = 900.0
INDEX_CHECK_TIMEOUT = 3.0
DEFAULT_INDEX = "https://pypi.org/simple/"
PIP_CONFIGS = ("/etc/xdg/pip/pip.conf", "/etc/pip.conf", "~/.pip/pip.conf",
               "~/.config/pip/pip.conf")
# uv compiles bytecode at install only where that pays (2,400 files, 4 CPU s): on fewer cores
# the server's first start compiles what it imports (measured 2026-12, 2 cores: 2.3 s to
# compile all, 2.4 s vs 0.5 s for the first start).
COMPILE_MIN_CPUS = 4
# Installed once the server answers (a cold `up` with uv): jedi, IPython's completion engine,
# is 56 % of the environment's 10,000 files; a kernel started before it is there completes
# without it (measured 2026-12: uv's install 40-55 % shorter without these two).
LATER = ("jedi", "parso")
# Where a root can go when the usual one cannot be written (TETHER_REMOTE_CACHE on the laptop).
ELSEWHERE = ("$TMPDIR/tether-u{uid}", "/scratch/{user}", "/tmp/tether-u{uid}")
WHY = {"read-only": "is on a read-only file system",
       "not-writable": "is not writable by {user} (permission denied)"}
FAILED = 3

PARAMS: dict[str, Any] = {}
LAYOUT: dict[str, str] = {}
VERSION = ROOT = ENV = RUNTIME = MARKER = INSTALL_LOG = ""


def configure(params: dict[str, Any], environ: "dict[str, str] | None" = None) -> None:
    """Set the parameters and the paths of this run (a test may call it with its own)."""
    global PARAMS, LAYOUT, VERSION, ROOT, ENV, RUNTIME, MARKER, INSTALL_LOG, FAILED
    env = dict(os.environ) if environ is None else environ
    PARAMS, LAYOUT, VERSION = params, dict(params["layout"]), str(params["version"])
    FAILED = int(params.get("exit_failed") or 3)
    cache = env.get(LAYOUT["cache_var"]) or os.path.join(
        env.get("HOME") or os.path.expanduser("~"), LAYOUT["cache_default"])
    ROOT = os.path.join(cache, LAYOUT["dirname"])
    ENV = os.path.join(ROOT, LAYOUT["env"].format(version=VERSION))
    RUNTIME, INSTALL_LOG = at("runtime"), at("install_log")
    MARKER = os.path.join(ENV, LAYOUT["marker"])


def at(key: str) -> str:
    """An entry of the layout under the root."""
    return os.path.join(ROOT, LAYOUT[key])


class Fail(Exception):
    """A failure the laptop shows: ``kind`` (tether.contract), message and hint naming HOST."""

    def __init__(self, kind: str, message: str, hint: str = "", **data: Any) -> None:
        Exception.__init__(self, message)
        self.kind, self.message, self.hint, self.data = kind, message, hint, data


def emit(event: str, **data: Any) -> None:
    data["event"] = event
    if event == "result":
        data["protocol"] = PARAMS.get("protocol")
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


class Step:
    """A progress event at the start and at the end of a step."""

    def __init__(self, key: str, label: str) -> None:
        self.key, self.label, self.t0 = key, label, 0.0

    def __enter__(self) -> "Step":
        self.t0 = time.monotonic()
        emit("step", key=self.key, label=self.label, state="start")
        return self

    def __exit__(self, kind: object, value: object, tb: object) -> None:
        emit("step", key=self.key, label=self.label, state="fail" if kind else "done",
             seconds=round(time.monotonic() - self.t0, 2))


def tail(path: str, limit: int = 1500) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def ensure_dir(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)


def write_private(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# -- Python, disk, the root ------------------------------------------------------------------------

def check_python() -> None:
    need = tuple(int(x) for x in str(PARAMS.get("requires_python", "3.11")).split("."))
    if sys.version_info[:len(need)] < need:
        raise Fail("python", "%s is Python %d.%d; tether needs Python >= %s"
                   % (sys.executable, sys.version_info[0], sys.version_info[1],
                      ".".join(map(str, need))),
                   hint="Install a newer one on HOST (e.g. `sudo apt-get install python3 "
                        "python3-venv`) or pass --remote-python PATH.")


def existing(path: str) -> str:
    """``path``, or its nearest folder above that exists (what a mkdir -p would write into)."""
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def free_bytes(path: str) -> int:
    import shutil

    return shutil.disk_usage(existing(path)).free


def need_bytes(offline: bool) -> int:
    return NEED_BYTES["offline" if offline else "index"]


def disk_problem(offline: bool) -> "Fail | None":
    """Too little free space for a fresh environment, as a Fail (None: enough)."""
    free, need = free_bytes(ROOT), need_bytes(offline)
    if free >= need:
        return None
    return Fail("disk", "%s on HOST has %d MiB free; a fresh environment needs about %d MiB there"
                % (ROOT, free >> 20, need >> 20),
                hint="Free %d MiB there (e.g. `ssh HOST rm -rf ~/.cache/pip`)."
                % ((need - free + (1 << 20) - 1) >> 20),
                folder=ROOT, cache_fix=writable_elsewhere(need))


def user_name() -> str:
    try:
        import pwd
        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return os.environ.get("USER") or str(os.getuid())


def unwritable(path: str) -> str:
    """Why this user cannot create or write ``path``: "read-only", "not-writable" or ""."""
    base = existing(path)
    try:
        if os.statvfs(base).f_flag & os.ST_RDONLY:
            return "read-only"
    except OSError:
        pass
    return "" if os.access(base, os.W_OK | os.X_OK) else "not-writable"


def cache_fail(kind: str, folder: str) -> Fail:
    """The root cannot be written: say which folder and why, and where tether could go."""
    return Fail(kind, "%s on HOST %s" % (folder, WHY[kind].format(user=user_name())),
                hint="Point tether at a folder you can write there: run `TETHER_REMOTE_CACHE=DIR "
                     "tether up HOST` on this machine.",
                folder=folder, cache_fix=writable_elsewhere())


def probe_write(folder: str) -> bool:
    """Whether a file can really be made in ``folder`` (os.access does not see every mount)."""
    path = os.path.join(folder, ".tether-probe-%d-%d" % (os.getpid(), time.monotonic_ns()))
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError:
        return False
    os.unlink(path)
    return True


def writable_elsewhere(need: int = 0) -> str:
    """A folder this user can write with ``need`` bytes free, for TETHER_REMOTE_CACHE ("" if
    none): $TMPDIR, then /scratch/$USER, then /tmp (a folder of the user's own in each)."""
    tmpdir = os.environ.get("TMPDIR") or ""
    for pattern in ELSEWHERE:
        if pattern.startswith("$TMPDIR") and not tmpdir.startswith("/"):
            continue
        folder = os.path.normpath(pattern.replace("$TMPDIR", tmpdir).format(
            uid=os.getuid(), user=user_name()))
        if os.path.realpath(os.path.join(folder, LAYOUT["dirname"])) == os.path.realpath(ROOT):
            continue
        if pattern.startswith("/scratch") and not os.path.isdir(folder):
            continue  # a scratch folder is the site's to make, not ours
        if os.path.isdir(folder):
            usable = os.stat(folder).st_uid == os.getuid() and probe_write(folder)
        else:
            parent = os.path.dirname(folder)
            usable = os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK) \
                and probe_write(parent)
        if usable and free_bytes(folder) >= need:
            return folder
    return ""


def root_problem() -> "Fail | None":
    """What stands in the way of tether's files at ROOT (None: nothing). Reads only."""
    for path in (ROOT, RUNTIME):
        if os.path.exists(path) and os.stat(path).st_uid != os.getuid():
            return Fail("cache-owner", "%s on HOST belongs to uid %d, not to %s"
                        % (path, os.stat(path).st_uid, user_name()),
                        hint="Point tether at a folder of your own there: run "
                             "`TETHER_REMOTE_CACHE=DIR tether up HOST` on this machine.",
                        folder=path, cache_fix=writable_elsewhere())
    kind = unwritable(ROOT)
    return cache_fail(kind, ROOT) if kind else None


def ensure_root() -> None:
    """The root and its runtime folder exist, are this user's, are writable and are 0700
    (tightened where something else left them open: they hold the token and launch records)."""
    problem = root_problem()
    if problem is not None:
        raise problem
    try:
        ensure_dir(ROOT)
        for path in (ROOT, RUNTIME):
            if os.path.isdir(path) and os.stat(path).st_mode & 0o077:
                os.chmod(path, 0o700)
        if not probe_write(ROOT):
            raise OSError(errno.EACCES, "cannot write", ROOT)
    except OSError as e:
        raise cache_error(e) or e


def cache_error(e: OSError) -> "Fail | None":
    """A write under the root that the file system refused, as the Fail that says so."""
    kinds = {errno.EROFS: "read-only", errno.EACCES: "not-writable", errno.EPERM: "not-writable"}
    return cache_fail(kinds[e.errno], ROOT) if e.errno in kinds else None


def lock_root() -> int:
    """The root's lock (flock), waited for with a deadline; the caller closes the fd."""
    ensure_dir(ROOT)
    fd = os.open(at("lock"), os.O_RDWR | os.O_CREAT, 0o600)
    deadline, waited = time.monotonic() + LOCK_DEADLINE, False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
        if not waited:
            emit("step", key="lock", label="waiting for another tether on this host", state="start")
            waited = True
        if time.monotonic() > deadline:
            os.close(fd)
            raise Fail("lock", "another tether process holds %s/lock" % ROOT,
                       hint="Wait for it to finish, or stop it.")
        time.sleep(0.2)


# -- probing -----------------------------------------------------------------------------------------

def gpu_info() -> dict[str, Any]:
    import shutil

    smi = shutil.which("nvidia-smi")
    if not smi:
        return {"nvidia_smi": None}
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.used,memory.total,driver_version",
                              "--format=csv,noheader,nounits"], capture_output=True, timeout=20,
                             text=True)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"nvidia_smi": smi, "error": str(e)}
    if out.returncode != 0:
        return {"nvidia_smi": smi, "error": (out.stderr or out.stdout).strip()[-300:]}
    gpus = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4:
            gpus.append({"name": parts[0], "memory_used_mib": parts[1],
                         "memory_total_mib": parts[2], "driver": parts[3]})
    return {"nvidia_smi": smi, "gpus": gpus}


def probe() -> dict[str, Any]:
    import shutil

    import platform  # (here: tether.host, which imports this module, has no use for it)

    info: dict[str, Any] = {
        "os": platform.system(), "release": platform.release(), "machine": platform.machine(),
        "python": sys.executable, "python_version": "%d.%d.%d" % sys.version_info[:3],
        "root": ROOT, "env": ENV, "free_bytes": free_bytes(ROOT), "need_bytes": need_bytes(False),
        "env_ready": read_marker() is not None, "systemd_run": bool(shutil.which("systemd-run")),
    }
    problem = root_problem() or disk_problem(offline=False)
    if problem is not None:  # for `tether doctor`: why tether cannot keep its files there
        info["root_problem"] = dict(problem.data, kind=problem.kind, message=problem.message,
                                    hint=problem.hint)
    return info


def pip_settings(environ: "dict[str, str] | None" = None) -> dict[str, Any]:
    """The index settings pip would use here ({"index_url", "extra", "find_links", "cert"}):
    uv does not read pip's configuration, so the seed hands them to it."""
    import configparser
    env = dict(os.environ) if environ is None else environ
    found: dict[str, str] = {}
    paths = [os.path.expanduser(p) for p in PIP_CONFIGS]
    if env.get("PIP_CONFIG_FILE"):
        paths.append(env["PIP_CONFIG_FILE"])
    keys = ("index-url", "extra-index-url", "find-links", "cert")
    for path in paths:
        if not os.path.isfile(path):
            continue
        parser = configparser.RawConfigParser()
        try:
            parser.read(path)
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue
        for section in ("global", "install"):
            for key in keys:
                if parser.has_option(section, key):
                    found[key] = parser.get(section, key)
    for key in keys:
        value = env.get("PIP_" + key.upper().replace("-", "_"))
        if value:
            found[key] = value
    return {"index_url": found.get("index-url", "").strip(),
            "extra": found.get("extra-index-url", "").split(),
            "find_links": found.get("find-links", "").split(),
            "cert": found.get("cert", "").strip()}


def split_url(url: str) -> tuple[str, str, int]:
    scheme, _, rest = url.partition("://")
    hostport = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    host, sep, port = hostport.rpartition(":") if hostport.count(":") == 1 else ("", "", "")
    if not sep:
        host, port = hostport, ""
    default = 443 if scheme.lower() == "https" else 80
    return scheme.lower(), host.strip("[]"), int(port) if port.isdigit() else default


def index_check(timeout: float = INDEX_CHECK_TIMEOUT) -> dict[str, Any]:
    """Can this host reach its package index? A bounded TCP connect to the index (or to the
    HTTPS proxy in the environment): {"url", "reachable", "why", "seconds"}."""
    url = pip_settings()["index_url"] or os.environ.get("UV_DEFAULT_INDEX") \
        or os.environ.get("UV_INDEX_URL") or DEFAULT_INDEX
    t0 = time.monotonic()
    scheme, host, port = split_url(url)
    if scheme == "file":
        ok = os.path.isdir(url[len("file://"):])
        return {"url": url, "reachable": ok, "why": "" if ok else "no such directory",
                "seconds": 0.0}
    proxy = os.environ.get("https_proxy") or os.environ.get("HTTPS_PROXY") or ""
    if proxy and scheme == "https":
        _, host, port = split_url(proxy if "://" in proxy else "http://" + proxy)
    result: dict[str, str] = {}

    def connect() -> None:
        import socket

        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result["why"] = ""
        except (OSError, ValueError) as e:
            result["why"] = str(e) or e.__class__.__name__

    # getaddrinfo has no timeout of its own: the connect runs in a thread we stop waiting for
    import threading
    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    why = result.get("why", "no answer within %.0f s" % timeout)
    return {"url": url, "reachable": not why, "why": why,
            "seconds": round(time.monotonic() - t0, 3)}


def libc() -> tuple[str, str]:
    try:
        name, _, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").partition(" ")
        if name == "glibc":
            return "glibc", version
    except (ValueError, OSError):
        pass
    try:
        if any(n.startswith("ld-musl-") for n in os.listdir("/lib")):
            return "musl", "1.2"
    except OSError:
        pass
    return "", ""


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cached_wheels() -> list[str]:
    try:
        return sorted(n for n in os.listdir(at("wheels")) if n.endswith(".whl"))
    except OSError:
        return []


def unpacked_uv() -> list[str]:
    try:
        return sorted(v for v in os.listdir(at("uv")) if os.path.exists(at("uv") + "/%s/uv" % v))
    except OSError:
        return []


def need_wheel() -> dict[str, Any]:
    """What the laptop needs to plan a cold preparation (platform, index, cached files);
    checked first: the disk has room for it."""
    offline = bool(PARAMS.get("offline"))
    info = probe()
    name, version = libc()
    impl = sys.implementation.name
    info.update(libc=name, libc_version=version, have=cached_wheels(), have_uv=unpacked_uv(),
                implementation={"cpython": "cp", "pypy": "pp"}.get(impl, impl))
    info["index"] = {"url": "", "reachable": False, "why": "--offline", "seconds": 0.0} \
        if offline else index_check()
    if not env_updatable():
        problem = disk_problem(offline or not info["index"]["reachable"])
        if problem is not None:
            raise problem
    return {"need_wheel": True, "probe": info}


# -- receiving files -------------------------------------------------------------------------------

def sha256_file(path: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_wheel() -> bytes:
    import hashlib

    size = int(PARAMS.get("wheel_size", 0))
    data = sys.stdin.buffer.read(size) if size else b""
    if size and (len(data) != size or hashlib.sha256(data).hexdigest() != PARAMS["wheel_sha256"]):
        raise Fail("transfer", "the wheel arrived incomplete (%d of %d bytes)" % (len(data), size))
    return data


def receive_files() -> None:
    """Read the files the laptop streams after tether's wheel into the wheel cache, each
    checked against its sha256 and renamed into place only then."""
    incoming = PARAMS.get("incoming") or []
    if not incoming:
        return
    ensure_dir(at("wheels"))
    total = sum(int(e["size"]) for e in incoming)
    with Step("receive", "receiving %d file%s (%.1f MiB), each checked by sha256"
              % (len(incoming), "s" if len(incoming) != 1 else "", total / 1048576.0)):
        for entry in incoming:
            receive_file(entry)


def receive_file(entry: dict[str, Any]) -> None:
    import hashlib

    name, size = os.path.basename(entry["file"]), int(entry["size"])
    dest = os.path.join(at("wheels"), name)
    tmp = dest + ".part"
    digest, left = hashlib.sha256(), size
    with open(tmp, "wb") as f:
        while left:
            chunk = sys.stdin.buffer.read(min(left, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    if left or digest.hexdigest() != entry["sha256"]:
        remove_quietly(tmp)
        raise Fail("transfer", "%s arrived incomplete or altered (%d of %d bytes)"
                   % (name, size - left, size), hint="Run `tether up HOST` again.")
    os.rename(tmp, dest)


def check_needed() -> None:
    """Every wheel the install takes from the cache is there and matches the lock."""
    for entry in PARAMS.get("need") or []:
        path = os.path.join(at("wheels"), os.path.basename(entry["file"]))
        if not os.path.isfile(path) or sha256_file(path) != entry["sha256"]:
            remove_quietly(path)
            raise Fail("transfer", "the cached %s on HOST is missing or does not match its "
                       "sha256 (removed)" % entry["file"], hint="Run `tether up HOST` again.")


# -- installing: uv where it runs, else pip; from the index or the laptop's wheels ----------------

def log_line(text: str) -> None:
    with open(INSTALL_LOG, "ab") as log:
        log.write((text + "\n").encode())


def run_logged(argv: list[str], what: str, kind: str, hint: str,
               env: "dict[str, str] | None" = None) -> None:
    """Run a long step, logging to install.log; end it if the SSH connection goes away (the
    laptop keeps our stdin open until it has our result: EOF means Ctrl-C or the network)."""
    # The child holds the write end of a pipe: its exit wakes the select below at once.
    done_r, done_w = os.pipe()
    with open(INSTALL_LOG, "ab") as log:
        log.write(("\n$ " + " ".join(argv) + "\n").encode())
        log.flush()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    env=env, pass_fds=(done_w,))
        finally:
            os.close(done_w)
    try:
        wait_logged(proc, done_r, what)
    finally:
        os.close(done_r)
    if proc.returncode != 0:
        raise Fail(kind, "%s failed (exit %d) on HOST" % (what, proc.returncode),
                   hint=hint, log_tail=tail(INSTALL_LOG))


def wait_logged(proc: "subprocess.Popen[bytes]", done_r: int, what: str) -> None:
    """Wait for ``proc``; stop it if our stdin ends (the laptop went away)."""
    watch: list[Any] = [done_r] + ([sys.stdin] if not sys.stdin.closed else [])
    while proc.poll() is None:
        ready = select.select(watch, [], [], 0.5)[0]
        if done_r in ready:  # EOF: the child is exiting (or closed the pipe and runs on)
            os.read(done_r, 1)
            watch.remove(done_r)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
            continue
        if ready and not os.read(sys.stdin.fileno(), 1):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise Fail("interrupted", "%s was interrupted: the connection went away" % what)


def index_hint() -> str:
    return ("The remote cannot install from the package index: give it access (e.g. "
            "`ssh HOST pip config set global.index-url URL` for a mirror, or set "
            "HTTPS_PROXY in its shell profile), or run `tether up HOST --offline` to send "
            "the packages from this machine.")


def uv_runs(path: str) -> bool:
    try:
        out = subprocess.run([path, "--version"], stdin=subprocess.DEVNULL, capture_output=True,
                             timeout=20, text=True)
    except (OSError, subprocess.TimeoutExpired) as e:
        log_line("uv cannot run here (%s); using pip" % e)
        return False
    if out.returncode != 0:
        log_line("uv cannot run here (exit %d: %s); using pip"
                 % (out.returncode, (out.stdout + out.stderr).strip()[-300:]))
    return out.returncode == 0


def unpack_uv(spec: dict[str, Any]) -> str:
    """The uv executable (cached per version): the laptop's own binary as sent (deflate), or from
    uv's wheel, sent or fetched here from the lock's URL; "" when it cannot run here."""
    import hashlib
    import shutil
    import zipfile
    import zlib
    path = os.path.join(at("uv"), spec["version"], "uv")
    if not os.path.exists(path):
        ensure_dir(os.path.dirname(path))
        source = os.path.join(at("wheels"), os.path.basename(spec.get("file") or "uv"))
        tmp = path + ".part"
        try:
            if spec.get("kind") == "fetch":
                with Step("uv", "fetching uv %s from the index" % spec["version"]):
                    fetch(spec["url"], source, spec["sha256"])
            with open(tmp, "wb") as out:
                if spec.get("kind") == "binary":
                    unpack, digest = zlib.decompressobj(-15), hashlib.sha256()
                    with open(source, "rb") as f:
                        for chunk in [*iter(lambda: f.read(1 << 20), b""), None]:
                            data = unpack.decompress(chunk) if chunk else unpack.flush()
                            digest.update(data)
                            out.write(data)
                    remove_quietly(source)
                    if digest.hexdigest() != spec["binary_sha256"]:
                        raise ValueError("the binary does not match its sha256")
                else:
                    with zipfile.ZipFile(source) as zf:
                        member = next(n for n in zf.namelist() if n.endswith(".data/scripts/uv"))
                        with zf.open(member) as src:
                            shutil.copyfileobj(src, out, 1 << 20)
        except (OSError, StopIteration, ValueError, zipfile.BadZipFile, zlib.error) as e:
            log_line("uv: cannot unpack %s: %s" % (source, e))
            remove_quietly(tmp)
            return ""
        os.chmod(tmp, 0o700)
        os.rename(tmp, path)
    return path if uv_runs(path) else ""


def fetch(url: str, dest: str, sha256: str) -> None:
    """``url`` into ``dest``, checked by sha256 (pip's cert, else the system's)."""
    import hashlib
    import ssl
    import urllib.request
    context = ssl.create_default_context(cafile=pip_settings()["cert"] or None)
    digest, tmp = hashlib.sha256(), dest + ".part"
    ensure_dir(os.path.dirname(dest))
    with urllib.request.urlopen(url, timeout=60, context=context) as resp, \
            open(tmp, "wb") as out:
        for chunk in iter(lambda: resp.read(1 << 20), b""):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != sha256:
        remove_quietly(tmp)
        raise ValueError("%s does not match the lock's sha256" % url)
    os.rename(tmp, dest)


def source_flags(installer: str, offline: bool) -> list[str]:
    """Where the installer takes packages from: the laptop's wheels only, or the index that
    pip's own configuration names (uv is told, since it does not read pip.conf)."""
    if offline:
        flags = ["--no-index", "--find-links", at("wheels")]
        return flags + (["--offline", "--no-config"] if installer == "uv" else [])
    if installer != "uv":
        return []
    # pip takes each package from whichever index has the best version, as the laptop's lock
    # was resolved; uv by default stops at the first index that has the package at all
    settings, flags = pip_settings(), ["--index-strategy", "unsafe-best-match"]
    if settings["index_url"]:
        flags += ["--index-url", settings["index_url"]]
    for url in settings["extra"]:
        flags += ["--extra-index-url", url]
    for link in settings["find_links"]:
        if "://" in link or os.path.isdir(link):
            flags += ["--find-links", link]
    return flags


def installer_env(installer: str, offline: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["UV_CACHE_DIR"] = at("uv_cache")  # also for a uv that updates an env pip made
    if installer == "uv":
        cert = pip_settings()["cert"]
        if cert and not env.get("SSL_CERT_FILE"):
            env["SSL_CERT_FILE"] = cert
        env["UV_NO_PROGRESS"] = "1"
    elif offline:
        env["PIP_CONFIG_FILE"] = os.devnull  # only the wheels sent: no find-links from pip.conf
    return env


def where(offline: bool) -> str:
    return "from the laptop's wheels (offline)" if offline else "from the index"


def install_argv(installer: str, uv: str, python: str, offline: bool, pins: str,
                 exact: bool = False) -> list[str]:
    """The install command; ``exact``: the pins are the whole set, resolved for this host
    (the laptop's uv did it), installed as they are (nothing resolved again, uv left out)."""
    if installer == "uv":
        argv = [uv, "pip", "install", "--python", python]
        if usable_cpus() >= COMPILE_MIN_CPUS:
            argv.append("--compile-bytecode")
    else:
        argv = [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
                "--progress-bar", "off"]
    if pins:
        argv += ["--no-deps", "-r", pins] if exact else ["--constraint", pins]
    return argv + source_flags(installer, offline)


def env_python() -> str:
    return os.path.join(ENV, "bin", "python")


def pins_path(kind: str = "pins") -> str:
    """The lock's pins (``pins``); those installed before the server starts (``now``) and
    after (``later``), where the install is split."""
    return os.path.join(ENV, "tether-%s.txt" % kind)


def read_marker() -> "dict[str, Any] | None":
    marker = read_json(MARKER)
    return marker if isinstance(marker, dict) else None


def env_current() -> bool:
    marker = read_marker()
    return marker is not None and marker.get("wheel_sha256") == PARAMS.get("wheel_sha256") \
        and os.path.exists(env_python())


def env_updatable() -> bool:
    """An environment of this version exists: a new wheel of tether goes into it (no deps)."""
    return read_marker() is not None and os.path.exists(env_python())


def uv_in_env() -> str:
    """The uv that prepared this environment, where it still runs ("" otherwise)."""
    uv = str((read_marker() or {}).get("uv") or "")
    return uv if uv and os.access(uv, os.X_OK) else ""


def create_env(wheel: bytes) -> None:
    import shutil

    if os.path.exists(ENV):  # half-built by an interrupted run: start again from scratch
        shutil.rmtree(ENV)
    uv = unpack_uv(PARAMS["uv"]) if PARAMS.get("uv") else ""
    installer = "uv" if uv else "pip"
    with Step("venv", "creating the environment (%s)" % installer):
        if uv:
            run_logged([uv, "venv", "--quiet", "--no-config", "--python", sys.executable,
                        "--python-preference", "only-system", "--no-python-downloads", ENV],
                       "uv venv", "venv", "Pass --remote-python PATH with a working Python.",
                       env=installer_env("uv", False))
        else:
            run_logged([sys.executable, "-m", "venv", ENV], "python3 -m venv", "venv",
                       "Install the venv module on HOST, e.g. `sudo apt-get install "
                       "python3-venv` (or pass --remote-python PATH).")
    pins = PARAMS.get("pins") or []
    split = bool(uv and PARAMS.get("exact") and PARAMS.get("action") == "up")
    later = [p for p in pins if p.split("==")[0] in LATER] if split else []
    for kind, lines in (("pins", pins), ("now", [p for p in pins if p not in later]),
                        ("later", later)):
        if lines and (kind == "pins" or later):
            with open(pins_path(kind), "w") as f:
                f.write("\n".join(lines) + "\n")
    install_wheel(wheel, deps=True, installer=installer, uv=uv)


def install_wheel(wheel: bytes, deps: bool, installer: str = "pip", uv: str = "") -> None:
    path = os.path.join(ROOT, PARAMS["wheel_name"])
    write_private(path, wheel)
    offline = bool(PARAMS.get("offline")) and deps
    label = ("installing tether and its dependencies with %s %s" % (installer, where(offline))
             if deps else "updating tether")
    pins = ""
    for kind in ("now", "pins"):
        if deps and not pins and os.path.exists(pins_path(kind)):
            pins = pins_path(kind)
    argv = install_argv(installer, uv, env_python(), offline, pins, bool(PARAMS.get("exact")))
    if not deps:
        argv = [uv_in_env(), "pip", "install", "--python", env_python(), "--no-deps",
                "--reinstall"] if uv_in_env() else \
            [env_python(), "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
             "--no-deps", "--force-reinstall"]
    with Step("install", label):
        run_logged(argv + [path], "%s install" % installer if deps else "reinstalling tether",
                   "index", "Look at %s on HOST." % INSTALL_LOG if offline else index_hint(),
                   env=installer_env(installer, offline))
    os.unlink(path)
    marker = read_marker() or {}
    if deps:
        marker = {"installer": installer, "source": "laptop" if offline else "index",
                  "pins": dict(p.split("==", 1) for p in PARAMS.get("pins") or []),
                  "lock": PARAMS.get("lock", ""), "uv": uv,
                  "later": [p for p in PARAMS.get("pins") or [] if pins == pins_path("now")
                            and p.split("==")[0] in LATER],
                  "python": "%d.%d.%d" % sys.version_info[:3]}
    marker.update(version=VERSION, wheel_sha256=PARAMS["wheel_sha256"], created=time.time())
    write_private(MARKER, json.dumps(marker).encode())


def prepare_env() -> bool:
    """True when the environment is ready; False when the laptop must send the wheel."""
    if env_current():
        return True
    wheel = read_wheel()
    if not wheel:
        return False
    fd = lock_root()
    try:
        receive_files()
        if env_current():  # another run finished it while we waited
            return True
        if env_updatable():
            install_wheel(wheel, deps=False)
        else:
            check_needed()
            create_env(wheel)
        PARAMS["installed"] = True  # tether.host then removes the environments it replaced
    finally:
        os.close(fd)
    return True


# -- what `down --purge` and `status` read or remove without tether's environment ------------------

def env_dirs() -> dict[str, Any]:
    """{path: marker or None} of every tether environment under the root (any version)."""
    prefix, found = LAYOUT["env"].split("{", 1)[0], {}
    try:
        names = os.listdir(ROOT)
    except OSError:
        return {}
    for name in names:
        path = os.path.join(ROOT, name)
        if name.startswith(prefix) and os.path.isdir(path) and not os.path.islink(path):
            found[path] = read_json(os.path.join(path, LAYOUT["marker"]))
    return found


def disk_bytes(path: str) -> int:
    total = 0
    for top, dirs, files in os.walk(path):
        for name in files + dirs:
            try:
                total += os.lstat(os.path.join(top, name)).st_blocks * 512  # what quotas count
            except OSError:
                continue
    return total


def live_jobs() -> list[str]:
    """Nonces (in their comment) of our Slurm jobs still queued or running from this home:
    they run from its environment, kernelspecs and job folder ([] where no Slurm)."""
    import shutil

    if not shutil.which("squeue"):
        return []
    slurm = PARAMS.get("slurm") or {}
    comment = str(slurm.get("comment") or "tether:")
    try:
        out = subprocess.run(["squeue", "--me", "-h", "-n", str(slurm.get("job_name")), "-o",
                              "%k"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, timeout=20, text=True)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip()[len(comment):] for line in out.stdout.splitlines()
            if line.strip().startswith(comment)]


def purge() -> dict[str, Any]:
    """Everything of tether's under the root, then the root itself (after `down` stopped the
    servers). A Slurm job of ours still queued or running keeps what it runs from."""
    import shutil

    if not os.path.isdir(ROOT):
        return {"removed_bytes": 0}
    before, jobs = disk_bytes(ROOT), live_jobs()
    keep = {LAYOUT["lock"]}
    if jobs:  # (and the uv the kept environments are updated with: they have no pip)
        keep |= {LAYOUT["slurm"], LAYOUT["jupyter_path"], LAYOUT["uv"]} | set(env_dirs_names())
    fd = lock_root()
    try:
        if jobs and os.path.isdir(at("slurm")):
            for name in os.listdir(at("slurm")):
                if name not in jobs:
                    shutil.rmtree(os.path.join(at("slurm"), name), ignore_errors=True)
        for name in os.listdir(ROOT):
            path = os.path.join(ROOT, name)
            if name in keep:
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                remove_quietly(path)
    finally:
        os.close(fd)
    if jobs:
        return {"removed_bytes": max(0, before - disk_bytes(ROOT)), "kept_for_jobs": jobs}
    remove_quietly(at("lock"))
    try:
        os.rmdir(ROOT)  # not when another tether put something there meanwhile
    except OSError:
        pass
    return {"removed_bytes": max(0, before - disk_bytes(ROOT))}


def env_dirs_names() -> list[str]:
    return sorted(os.path.basename(p) for p in env_dirs())


def installed() -> dict[str, Any]:
    marker = read_marker() or {}
    return {k: marker.get(k) for k in ("installer", "source")}


def recorded() -> bool:
    """Whether tether recorded anything that may run here (state files, launch records)."""
    try:
        return any(n.endswith(".json") for n in os.listdir(RUNTIME))
    except OSError:
        return False


# -- the actions -------------------------------------------------------------------------------------

# `python -m tether.host` as `-c`: runpy and importlib.util are not imported (a few ms a call)
HOST_MAIN = "import sys; from tether.host import main; sys.exit(main(sys.argv[1:]))"
PLAN_KEYS = ("pins", "need", "incoming", "uv", "lock", "plan_size", "wheel_size", "exact")


def hand_over(action: str) -> NoReturn:
    """Run the rest from tether's environment: ``python -I -m tether.host ACTION PARAMS``
    (spelled with ``-c``: :data:`HOST_MAIN`).

    ``-I``: the home folder (the cwd of an SSH command) is not on its path."""
    python = env_python()
    sys.stdout.flush()
    params = {k: v for k, v in PARAMS.items() if k not in PLAN_KEYS}  # done with: not in argv
    os.execv(python, [python, "-I", "-c", HOST_MAIN, action, json.dumps(params)])


def nothing_here(action: str) -> dict[str, Any]:
    """``status``/``down`` where tether's environment is not current and nothing recorded may
    run: the answer needs no process table."""
    if action == "status":
        return {"servers": [], "stale": [], "unverified": [],
                "env_ready": read_marker() is not None, "root": ROOT,
                "disk_bytes": disk_bytes(ROOT), "envs": env_dirs_names(),
                "installed": installed()}
    result: dict[str, Any] = {"stopped": [], "strays": [], "forced": [], "stale": [], "left": []}
    if PARAMS.get("purge"):
        result["purged"] = purge()
    return result


def action_probe() -> dict[str, Any]:
    """For `tether doctor`: the host's facts, its GPUs, whether it reaches its package index."""
    info = probe()
    info.update(gpu_info(), index=index_check(), python_ok=True)
    try:
        check_python()
    except Fail as e:
        info["python_ok"], info["python_error"] = False, e.message
    return info


def run(action: str) -> dict[str, Any]:
    if action == "probe":
        return action_probe()
    check_python()
    if action in ("status", "down"):
        if env_current():
            hand_over(action)
        if not recorded():
            return nothing_here(action)
        # else the environment is made current first (the laptop sends the wheel): what may
        # run here is judged and ended by this tether's own code
    elif PARAMS.get("attach") and not env_updatable():  # a server runs from an environment
        raise Fail("no-server", "no tether server is running on HOST",
                   hint="Start one with `tether up HOST`.")
    ensure_root()
    if not prepare_env():
        return need_wheel()
    hand_over(action)


def main() -> None:
    configure(json.loads(sys.argv[1]))
    if PARAMS.get("plan_size"):  # the install plan comes first on stdin (it grows with the lock)
        PARAMS.update(json.loads(sys.stdin.buffer.read(int(PARAMS["plan_size"]))))
    try:
        try:
            emit("result", **run(str(PARAMS["action"])))
        except OSError as e:  # checked up front; a file system can still turn read-only later
            inside = str(e.filename or "").startswith(ROOT + os.sep) or e.filename == ROOT
            raise (cache_error(e) if inside else None) or e
    except Fail as e:
        emit("error", kind=e.kind, message=e.message, hint=e.hint, **e.data)
        sys.exit(FAILED)


if __name__ == "__main__":
    main()
