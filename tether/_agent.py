# mypy: ignore-errors
# (a standalone script for any remote Python >= 3.6: stdlib only, no annotations on purpose)
"""The remote half of ``tether up``: one short-lived script run by the remote's own ``python3``.

It is sent as the argument of ``python3 -c`` (stdin carries tether's wheel when one is needed) and
must run on any Python >= 3.6 with the standard library only: it runs before tether's environment
exists. It never imports tether. Every line it prints is one JSON object: progress events, then a
final ``result`` or ``error``. Actions:

``up``      probe; create or reuse ``<cache>/tether/env-<version>``; reuse a running server or
            start one detached (``systemd-run --user`` with lingering, else ``setsid``), on a 0600
            Unix socket (or a loopback port) with the token in a 0600 file; wait for its state
            file with a deadline.
``status``  the running servers, with kernels and GPU memory read over their socket.
``down``    stop the servers (SIGTERM: kernels are shut down), then end every process of this
            user that carries a server's launch or instance marker; report what could not be.
``probe``   what ``tether doctor`` needs: OS, Python, disk, GPU driver, environment, servers.
``index``   whether the host reaches its package index (``tether doctor``).

``up`` and ``prepare`` first make sure the root is this user's, writable and 0700 (else a
``read-only``, ``not-writable`` or ``cache-owner`` failure naming the folder, and a writable
folder elsewhere for the laptop's TETHER_REMOTE_CACHE). A cold one then checks the free space a
fresh environment needs and answers ``need_wheel`` with what the laptop needs to plan the
install, before anything is sent: platform (OS, libc, architecture, Python), whether the
package index answers (a bounded TCP connect), the wheels already cached here. The second call streams tether's wheel,
then the files named in ``incoming`` (uv's wheel; on a host with no index every pinned wheel),
each checked against its sha256. The environment is made with the shipped ``uv`` where it runs,
else with ``venv`` and ``pip``; both install the same pins (``--constraint``), from the index
or, offline, from the received wheels only (``--no-index``). The marker records installer,
source and pins; environments prepared earlier are removed once no live server runs from them.

A process is tether's only by what tether recorded, never by its command line: a server by
the pid and start time in its state file (``tether-<pid>.json``: a state file whose pid is
gone or now another process is stale, and removed), or by the launch id the agent puts in its
environment (``TETHER_LAUNCH``, kept in a 0600 launch record with the options it was started
with); its kernels and their children by that launch id or the server's instance id
(``TETHER_SERVER_INSTANCE``), inherited through the environment. A child started with an
emptied environment (``env -i``) carries neither and is not found without a cgroup.
"""

import errno
import fcntl
import hashlib
import json
import os
import platform
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import time

# The layout of tether's files on this host comes from bootstrap.REMOTE_LAYOUT (params
# "layout"); these defaults only serve a caller that sends none.
DEFAULT_LAYOUT = {"cache_var": "XDG_CACHE_HOME", "cache_default": ".cache", "dirname": "tether",
                  "env": "env-{version}", "runtime": "runtime", "jupyter_path": "jupyter",
                  "token_file": "token", "server_log": "server.log",
                  "install_log": "install.log", "socket": "runtime/tether.sock",
                  "launch_record": "runtime/launch-{launch}.json", "wheels": "wheels",
                  "uv": "uv", "uv_cache": "uv-cache"}
# Every process of a server tether launched carries this (kernels inherit the server's
# environment); the id is recorded in the launch record, so `down` finds orphans of a crash.
LAUNCH_ENV = "TETHER_LAUNCH"
INSTANCE_ENV = "TETHER_SERVER_INSTANCE"  # set by the server on each of its kernels
# Free space a fresh environment needs where the root is (checked before the laptop sends
# anything). Measured 2026-12 (tether 0.1.0, CPython 3.11, x86_64, `du -s` after a cold `tether
# up` into an empty XDG_CACHE_HOME): from the index, env-* 105 MiB + uv's cache 102 + uv's
# wheel 17 + uv unpacked 37 = 261 MiB; offline, 105 + 95 + the wheels sent 35 + 37 = 272 MiB.
# (uv hard-links its cache into the env, so on one file system du counts 173 / 184 MiB; pip
# instead of uv: env-* 162 MiB, about 234 in all.) Asked: the unshared sums plus about 15 %.
NEED_BYTES = {"index": 300 << 20, "offline": 315 << 20}
LOCK_DEADLINE = 900.0
STOP_DEADLINE = 25.0
STRAY_DEADLINE = 5.0
PROBE_TIMEOUT = 30.0
# Start times read from /proc are exact to a clock tick; psutil computes them the same way.
START_TOLERANCE = 0.5
DEFAULT_IDLE_TIMEOUT = 3600
POLL = 0.02

PARAMS = {}
LAYOUT = dict(DEFAULT_LAYOUT)
VERSION = ROOT = ENV = RUNTIME = JUPYTER_PATH = MARKER = TOKEN_FILE = SERVER_LOG = ""
INSTALL_LOG = SOCKET = ""
LAUNCH_RECORD = ""
READY_DEADLINE = 60.0


def configure(params, environ=None):
    """Set the parameters and the paths of this run (a test may call it with its own)."""
    global PARAMS, VERSION, ROOT, ENV, RUNTIME, JUPYTER_PATH, MARKER, TOKEN_FILE, SERVER_LOG
    global INSTALL_LOG, SOCKET, LAUNCH_RECORD, READY_DEADLINE, LAYOUT
    environ = os.environ if environ is None else environ
    layout = LAYOUT = dict(DEFAULT_LAYOUT, **(params.get("layout") or {}))
    PARAMS, VERSION = params, params["version"]
    cache = environ.get(layout["cache_var"]) or os.path.join(
        environ.get("HOME") or os.path.expanduser("~"), layout["cache_default"])
    ROOT = os.path.join(cache, layout["dirname"])

    def at(key):
        return os.path.join(ROOT, layout[key])

    ENV = os.path.join(ROOT, layout["env"].format(version=VERSION))
    RUNTIME, JUPYTER_PATH, TOKEN_FILE = at("runtime"), at("jupyter_path"), at("token_file")
    SERVER_LOG, INSTALL_LOG, SOCKET = at("server_log"), at("install_log"), at("socket")
    LAUNCH_RECORD = at("launch_record")
    MARKER = os.path.join(ENV, "tether-env.json")
    READY_DEADLINE = float(params.get("ready_deadline", 60))


class Fail(Exception):
    def __init__(self, kind, message, hint="", **data):
        Exception.__init__(self, message)
        self.kind, self.message, self.hint, self.data = kind, message, hint, data


def emit(event, **data):
    data["event"] = event
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


class Step(object):
    def __init__(self, key, label):
        self.key, self.label = key, label

    def __enter__(self):
        self.t0 = time.monotonic()
        emit("step", key=self.key, label=self.label, state="start")
        return self

    def __exit__(self, kind, value, tb):
        state = "fail" if kind else "done"
        emit("step", key=self.key, label=self.label, state=state,
             seconds=round(time.monotonic() - self.t0, 2))


def tail(path, limit=1500):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def ensure_dir(path):
    os.makedirs(path, mode=0o700, exist_ok=True)


def write_private(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


# -- probing ---------------------------------------------------------------------------------

def check_python():
    need = tuple(int(x) for x in PARAMS.get("requires_python", "3.9").split("."))
    if sys.version_info[:len(need)] < need:
        have = "%d.%d" % sys.version_info[:2]
        raise Fail("python", "%s is Python %s; tether needs Python >= %s"
                   % (sys.executable, have, ".".join(map(str, need))),
                   hint="Install a newer one on HOST (e.g. `sudo apt-get install python3 "
                        "python3-venv`) or pass --remote-python PATH.")


def existing(path):
    """``path``, or its nearest folder above that exists (what a mkdir -p would write into)."""
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def free_bytes(path):
    return shutil.disk_usage(existing(path)).free


def need_bytes(offline):
    return NEED_BYTES["offline" if offline else "index"]


def disk_problem(offline):
    """Too little free space for a fresh environment, as a Fail (None: enough)."""
    free, need = free_bytes(ROOT), need_bytes(offline)
    if free >= need:
        return None
    return Fail("disk", "%s on HOST has %d MiB free; a fresh environment needs about %d MiB there"
                % (ROOT, free >> 20, need >> 20),
                hint="Free %d MiB there (e.g. `ssh HOST rm -rf ~/.cache/pip`)."
                % ((need - free + (1 << 20) - 1) >> 20),
                folder=ROOT, cache_fix=writable_elsewhere(need))


def check_disk(offline):
    """Checked before the laptop sends anything (uv alone is 17 MiB)."""
    problem = disk_problem(offline)
    if problem is not None:
        raise problem


# -- the root: writable, ours, private ----------------------------------------------------------

# Where a root can go when the usual one cannot be written (TETHER_REMOTE_CACHE on the laptop).
ELSEWHERE = ("$TMPDIR/tether-u{uid}", "/scratch/{user}", "/tmp/tether-u{uid}")
WHY = {"read-only": "is on a read-only file system",
       "not-writable": "is not writable by {user} (permission denied)"}


def user_name():
    try:
        import pwd
        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return os.environ.get("USER") or str(os.getuid())


def unwritable(path):
    """Why this user cannot create or write ``path``: "read-only", "not-writable" or ""."""
    base = existing(path)
    try:
        if os.statvfs(base).f_flag & os.ST_RDONLY:
            return "read-only"
    except (OSError, AttributeError):
        pass
    return "" if os.access(base, os.W_OK | os.X_OK) else "not-writable"


def cache_fail(kind, folder):
    """The root cannot be written: say which folder and why, and where tether could go."""
    return Fail(kind, "%s on HOST %s" % (folder, WHY[kind].format(user=user_name())),
                hint="Point tether at a folder you can write there: run `TETHER_REMOTE_CACHE=DIR "
                     "tether up HOST` on this machine.",
                folder=folder, cache_fix=writable_elsewhere())


def probe_write(folder):
    """Whether a file can really be made in ``folder`` (os.access does not see every mount)."""
    import tempfile
    try:
        fd, path = tempfile.mkstemp(prefix=".tether-probe-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(path)
    return True


def writable_elsewhere(need=0):
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
            st = os.stat(folder)
            usable = st.st_uid == os.getuid() and probe_write(folder)
        else:
            parent = os.path.dirname(folder)
            usable = os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK) \
                and probe_write(parent)
        if usable and free_bytes(folder) >= need:
            return folder
    return ""


def root_problem():
    """What stands in the way of tether's files at ROOT, as a Fail (None: nothing). Reads only:
    ``tether doctor`` asks it too."""
    for path in (ROOT, RUNTIME):
        if not os.path.exists(path):
            continue
        st = os.stat(path)
        if st.st_uid != os.getuid():
            return Fail("cache-owner", "%s on HOST belongs to uid %d, not to %s"
                        % (path, st.st_uid, user_name()),
                        hint="Point tether at a folder of your own there: run "
                             "`TETHER_REMOTE_CACHE=DIR tether up HOST` on this machine.",
                        folder=path, cache_fix=writable_elsewhere())
    kind = unwritable(ROOT)
    return cache_fail(kind, ROOT) if kind else None


def ensure_root():
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


def cache_error(e):
    """A write under the root that the file system refused, as the Fail that says so."""
    kinds = {errno.EROFS: "read-only", errno.EACCES: "not-writable", errno.EPERM: "not-writable"}
    if e.errno not in kinds:
        return None
    return cache_fail(kinds[e.errno], ROOT)


def gpu_info(query):
    smi = shutil.which("nvidia-smi")
    if not smi:
        return {"nvidia_smi": None}
    if not query:
        return {"nvidia_smi": smi}
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.used,memory.total,driver_version",
                              "--format=csv,noheader,nounits"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, timeout=20, universal_newlines=True)
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


def probe(query_gpu=False):
    info = {
        "os": platform.system(), "release": platform.release(), "machine": platform.machine(),
        "python": sys.executable, "python_version": "%d.%d.%d" % sys.version_info[:3],
        "root": ROOT, "env": ENV, "free_bytes": free_bytes(ROOT), "need_bytes": need_bytes(False),
        "env_ready": read_marker() is not None,
        "systemd_run": bool(shutil.which("systemd-run")),
    }
    problem = root_problem() or disk_problem(offline=False)
    if problem is not None:  # for `tether doctor`: why tether cannot keep its files there
        info["root_problem"] = dict(problem.data, kind=problem.kind, message=problem.message,
                                    hint=problem.hint)
    info.update(gpu_info(query_gpu))
    return info


# -- the environment ---------------------------------------------------------------------------

def read_marker():
    try:
        with open(MARKER) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def env_python():
    return os.path.join(ENV, "bin", "python")


def env_current():
    marker = read_marker()
    return marker is not None and marker.get("wheel_sha256") == PARAMS["wheel_sha256"] \
        and os.path.exists(env_python())


def lock_root():
    ensure_dir(ROOT)
    fd = os.open(os.path.join(ROOT, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + LOCK_DEADLINE
    waited = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if not waited:
            emit("step", key="lock", label="waiting for another tether on this host", state="start")
            waited = True
        if time.monotonic() > deadline:
            raise Fail("lock", "another tether process holds %s/lock" % ROOT,
                       hint="Wait for it to finish, or stop it.")
        time.sleep(0.2)


def run_logged(argv, what, kind, hint, env=None):
    """Run a long step, logging to install.log; end it if the SSH connection goes away.

    The laptop keeps our stdin open until it has our result, so EOF on stdin means it is gone
    (Ctrl-C, network): stop instead of finishing work nobody waits for.
    """
    # The child holds the write end of a pipe: its exit wakes the select below at once (the
    # timeout only covers a grandchild that keeps the pipe open after the child is gone).
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


def wait_logged(proc, done_r, what):
    """Wait for ``proc``; stop it if our stdin ends (the laptop went away)."""
    watch = [done_r] + ([sys.stdin] if not sys.stdin.closed else [])
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


def index_hint():
    return ("The remote cannot install from the package index: give it access (e.g. "
            "`ssh HOST pip config set global.index-url URL` for a mirror, or set "
            "HTTPS_PROXY in its shell profile), or run `tether up HOST --offline` to send "
            "the packages from this machine.")


# -- where packages come from: the remote's index, or wheels the laptop sent ----------------------

INDEX_CHECK_TIMEOUT = 3.0
DEFAULT_INDEX = "https://pypi.org/simple/"
PIP_CONFIGS = ("/etc/xdg/pip/pip.conf", "/etc/pip.conf", "~/.pip/pip.conf",
               "~/.config/pip/pip.conf")


def pip_settings(environ=None):
    """The index settings pip would use here ({"index_url", "extra", "find_links", "cert"}):
    uv does not read pip's configuration, so the agent hands them to it."""
    import configparser
    environ = os.environ if environ is None else environ
    found = {}
    paths = [os.path.expanduser(p) for p in PIP_CONFIGS]
    if environ.get("PIP_CONFIG_FILE"):
        paths.append(environ["PIP_CONFIG_FILE"])
    for path in paths:
        if not os.path.isfile(path):
            continue
        parser = configparser.RawConfigParser()
        try:
            parser.read(path)
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue
        for section in ("global", "install"):
            if parser.has_section(section):
                for key in ("index-url", "extra-index-url", "find-links", "cert"):
                    if parser.has_option(section, key):
                        found[key] = parser.get(section, key)
    for key in ("index-url", "extra-index-url", "find-links", "cert"):
        value = environ.get("PIP_" + key.upper().replace("-", "_"))
        if value:
            found[key] = value
    return {"index_url": found.get("index-url", "").strip(),
            "extra": found.get("extra-index-url", "").split(),
            "find_links": found.get("find-links", "").split(),
            "cert": found.get("cert", "").strip()}


def _split_url(url):
    scheme, _, rest = url.partition("://")
    hostport = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    host, sep, port = hostport.rpartition(":") if hostport.count(":") == 1 else ("", "", "")
    if not sep:
        host, port = hostport, ""
    return scheme.lower(), host.strip("[]"), int(port) if port.isdigit() else (
        443 if scheme.lower() == "https" else 80)


def index_check(settings=None, timeout=INDEX_CHECK_TIMEOUT):
    """Can this host reach its package index? A bounded TCP connect to the index (or to the
    HTTPS proxy in the environment): {"url", "reachable", "why", "seconds"}."""
    settings = settings or pip_settings()
    url = settings["index_url"] or os.environ.get("UV_DEFAULT_INDEX") \
        or os.environ.get("UV_INDEX_URL") or DEFAULT_INDEX
    t0 = time.monotonic()
    scheme, host, port = _split_url(url)
    if scheme == "file":
        ok = os.path.isdir(url[len("file://"):])
        return {"url": url, "reachable": ok, "why": "" if ok else "no such directory",
                "seconds": 0.0}
    proxy = os.environ.get("https_proxy") or os.environ.get("HTTPS_PROXY") or ""
    if proxy and scheme == "https":
        _, host, port = _split_url(proxy if "://" in proxy else "http://" + proxy)
    result = {}

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result["why"] = ""
        except (OSError, ValueError) as e:
            result["why"] = str(e) or e.__class__.__name__

    # getaddrinfo has no timeout of its own: the connect runs in a thread we stop waiting for
    import threading
    worker = threading.Thread(target=connect)
    worker.daemon = True
    worker.start()
    worker.join(timeout + 0.5)
    why = result.get("why", "no answer within %.0f s" % timeout)
    return {"url": url, "reachable": not why, "why": why,
            "seconds": round(time.monotonic() - t0, 3)}


def libc():
    try:
        name, _, version = os.confstr("CS_GNU_LIBC_VERSION").partition(" ")
        if name == "glibc":
            return "glibc", version
    except (AttributeError, ValueError, OSError):
        pass
    try:
        if any(n.startswith("ld-musl-") for n in os.listdir("/lib")):
            return "musl", "1.2"
    except OSError:
        pass
    return "", ""


def wheels_dir():
    return os.path.join(ROOT, LAYOUT.get("wheels", "wheels"))


def uv_root():
    return os.path.join(ROOT, LAYOUT.get("uv", "uv"))


def uv_cache_dir():
    """uv's cache for tether's installs: under the root, so `down --purge` removes it and the
    user's own uv cache (~/.cache/uv) is never read or written."""
    return os.path.join(ROOT, LAYOUT.get("uv_cache", "uv-cache"))


# uv writes bytecode for every module it installs (about 2,400 files: 4 CPU s, spread over the
# cores) only where that pays: without it the server's first start compiles what it imports,
# one core, about 2 s (and the first kernel about 0.8 s more). Measured 2026-12, 2 cores: 2.3 s
# to compile all, 2.4 s vs 0.5 s for the first start.
COMPILE_MIN_CPUS = 4


def usable_cpus():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cached_wheels():
    try:
        return sorted(n for n in os.listdir(wheels_dir()) if n.endswith(".whl"))
    except OSError:
        return []


def install_probe(offline):
    """What the laptop needs to plan a cold preparation: platform, index, cached files."""
    info = probe()
    name, version = libc()
    info.update(libc=name, libc_version=version,
                implementation={"cpython": "cp", "pypy": "pp"}.get(sys.implementation.name,
                                                                   sys.implementation.name),
                have=cached_wheels())
    info["index"] = {"url": "", "reachable": False, "why": "--offline", "seconds": 0.0} \
        if offline else index_check()
    return info


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            digest.update(chunk)
    return digest.hexdigest()


def receive_files():
    """Read the files the laptop streams after tether's wheel into the wheel cache, each
    checked against its sha256 and renamed into place only then."""
    incoming = PARAMS.get("incoming") or []
    if not incoming:
        return
    ensure_dir(wheels_dir())
    total = sum(int(e["size"]) for e in incoming)
    with Step("receive", "receiving %d wheel%s (%.1f MiB), each checked by sha256"
              % (len(incoming), "s" if len(incoming) != 1 else "", total / 1048576.0)):
        for entry in incoming:
            receive_file(entry)


def receive_file(entry):
    name, size = os.path.basename(entry["file"]), int(entry["size"])
    dest = os.path.join(wheels_dir(), name)
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


def check_needed():
    """Every wheel the install takes from the cache is there and matches the lock."""
    for entry in PARAMS.get("need") or []:
        path = os.path.join(wheels_dir(), os.path.basename(entry["file"]))
        if not os.path.isfile(path) or sha256_file(path) != entry["sha256"]:
            remove_quietly(path)
            raise Fail("transfer", "the cached %s on HOST is missing or does not match its "
                       "sha256 (removed)" % entry["file"], hint="Run `tether up HOST` again.")


# -- uv: shipped as a wheel, unpacked into the cache, used where it runs ------------------------

def uv_path(version):
    return os.path.join(uv_root(), version, "uv")


def unpack_uv(spec):
    """The uv executable from its wheel (cached per version); "" when it cannot run here."""
    import zipfile
    path = uv_path(spec["version"])
    if not os.path.exists(path):
        ensure_dir(os.path.dirname(path))
        wheel = os.path.join(wheels_dir(), os.path.basename(spec["file"]))
        try:
            with zipfile.ZipFile(wheel) as zf:
                member = next(n for n in zf.namelist() if n.endswith(".data/scripts/uv"))
                tmp = path + ".part"
                with zf.open(member) as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
        except (OSError, StopIteration, zipfile.BadZipFile) as e:
            log_line("uv: cannot unpack %s: %s" % (wheel, e))
            return ""
        os.chmod(tmp, 0o700)
        os.rename(tmp, path)
    return path if uv_runs(path) else ""


def uv_runs(path):
    try:
        out = subprocess.run([path, "--version"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=20,
                             universal_newlines=True)
    except (OSError, subprocess.TimeoutExpired) as e:
        log_line("uv cannot run here (%s); using pip" % e)
        return False
    if out.returncode != 0:
        log_line("uv cannot run here (exit %d: %s); using pip"
                 % (out.returncode, out.stdout.strip()[-300:]))
        return False
    return True


def log_line(text):
    with open(INSTALL_LOG, "ab") as log:
        log.write((text + "\n").encode())


def source_flags(installer, offline):
    """Where the installer takes packages from: the laptop's wheels only, or the index that
    pip's own configuration names (uv is told, since it does not read pip.conf)."""
    if offline:
        flags = ["--no-index", "--find-links", wheels_dir()]
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


def installer_env(installer, offline):
    env = dict(os.environ)
    env["UV_CACHE_DIR"] = uv_cache_dir()  # also for a uv that updates an env pip made
    if installer == "uv":
        cert = pip_settings()["cert"]
        if cert and not env.get("SSL_CERT_FILE"):
            env["SSL_CERT_FILE"] = cert
        env["UV_NO_PROGRESS"] = "1"
    elif offline:
        env["PIP_CONFIG_FILE"] = os.devnull  # only the wheels sent: no find-links from pip.conf
    return env


def where(offline):
    return "from the laptop's wheels (offline)" if offline else "from the index"


def install_argv(installer, uv, python, offline, pins):
    if installer == "uv":
        argv = [uv, "pip", "install", "--python", python]
        if usable_cpus() >= COMPILE_MIN_CPUS:
            argv.append("--compile-bytecode")
    else:
        argv = [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
                "--progress-bar", "off"]
    if pins:
        argv += ["--constraint", pins]
    return argv + source_flags(installer, offline)


def pins_path():
    return os.path.join(ENV, "tether-pins.txt")


def create_env(wheel):
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
    if pins:
        with open(pins_path(), "w") as f:
            f.write("\n".join(pins) + "\n")
    install_wheel(wheel, deps=True, installer=installer, uv=uv)


def install_wheel(wheel, deps, installer="pip", uv=""):
    path = os.path.join(ROOT, PARAMS["wheel_name"])
    write_private(path, wheel)
    offline = bool(PARAMS.get("offline")) and deps
    label = ("installing tether and its dependencies with %s %s" % (installer, where(offline))
             if deps else "updating tether")
    pins = pins_path() if deps and os.path.exists(pins_path()) else ""
    argv = install_argv(installer, uv, env_python(), offline, pins)
    if not deps:
        argv = [env_python(), "-m", "pip", "install", "--disable-pip-version-check",
                "--no-input", "--no-deps", "--force-reinstall"] if not uv_in_env() else \
            [uv_in_env(), "pip", "install", "--python", env_python(), "--no-deps", "--reinstall"]
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
                  "python": "%d.%d.%d" % sys.version_info[:3]}
    marker.update(version=VERSION, wheel_sha256=PARAMS["wheel_sha256"], created=time.time())
    write_private(MARKER, json.dumps(marker).encode())


def uv_in_env():
    """The uv that prepared this environment, where it still runs ("" otherwise)."""
    uv = (read_marker() or {}).get("uv") or ""
    return uv if uv and os.access(uv, os.X_OK) else ""


def read_wheel():
    size = int(PARAMS.get("wheel_size", 0))
    data = sys.stdin.buffer.read(size) if size else b""
    if size and (len(data) != size or hashlib.sha256(data).hexdigest() != PARAMS["wheel_sha256"]):
        raise Fail("transfer", "the wheel arrived incomplete (%d of %d bytes)" % (len(data), size))
    return data


def env_updatable():
    """An environment of this version exists: a new wheel of tether goes into it (no deps)."""
    return read_marker() is not None and os.path.exists(env_python())


def need_wheel():
    """What the laptop needs to plan the install; checked first: the disk has room for it."""
    info = install_probe(bool(PARAMS.get("offline")))
    if not env_updatable():
        check_disk(offline=bool(PARAMS.get("offline")) or not info["index"]["reachable"])
    return {"need_wheel": True, "probe": info}


def prepare_env():
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
        remove_old_envs()
    finally:
        os.close(fd)
    return True


# -- old environments and disk use ----------------------------------------------------------------

def env_dirs():
    """{path: marker or None} of every tether environment under the root (any version)."""
    prefix = LAYOUT["env"].split("{", 1)[0]
    found = {}
    try:
        names = os.listdir(ROOT)
    except OSError:
        return found
    for name in names:
        path = os.path.join(ROOT, name)
        if name.startswith(prefix) and os.path.isdir(path) and not os.path.islink(path):
            try:
                with open(os.path.join(path, "tether-env.json")) as f:
                    found[path] = json.load(f)
            except (OSError, ValueError):
                found[path] = None
    return found


def remove_old_envs():
    """Remove the environments prepared before this one that no live server runs from
    (a server reports its version; its environment is env-<that version>). Holds the lock."""
    current = read_marker()
    if current is None:
        return []
    in_use = set(os.path.realpath(os.path.join(ROOT, LAYOUT["env"].format(version=s.get(
        "version", "")))) for s in servers())
    removed = []
    for path, marker in env_dirs().items():
        if os.path.realpath(path) in in_use or os.path.realpath(path) == os.path.realpath(ENV):
            continue
        if marker is not None and float(marker.get("created") or 0) >= float(
                current.get("created") or 0):
            continue  # prepared by a newer tether since: not ours to judge
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def disk_bytes(path):
    total = 0
    for top, dirs, files in os.walk(path):
        for name in files + dirs:
            try:
                st = os.lstat(os.path.join(top, name))
            except OSError:
                continue
            total += st.st_blocks * 512  # what the quota counts, not the apparent size
    return total


def live_jobs():
    """Ids (the nonce of their comment) of our Slurm jobs still queued or running from this
    home: they run from its environment, kernelspecs and job folder ([] where no Slurm)."""
    if not shutil.which("squeue"):
        return []
    try:
        slurm = PARAMS.get("slurm") or {}
        comment = slurm.get("comment") or "tether:"
        out = subprocess.run(["squeue", "--me", "-h", "-n", slurm.get("job_name") or
                              "tether-runtime", "-o", "%k"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, timeout=20, universal_newlines=True)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip()[len(comment):] for line in out.stdout.splitlines()
            if line.strip().startswith(comment)]


def purge():
    """Everything of tether's under the root, then the root itself: environments, uv, uv's
    cache, the wheels, logs, runtime files and kernelspecs (after `down` stopped the servers).
    A Slurm job of ours still queued or running keeps what it runs from: `purge` is about this
    host's runtime, and `down --slurm` ends the jobs."""
    before = disk_bytes(ROOT)
    jobs = live_jobs()
    keep = {"lock", "slurm", "jupyter"} | {n for n in os.listdir(ROOT) if n.startswith("env-")} \
        if jobs else {"lock"}
    fd = lock_root()
    try:
        if jobs:
            for name in os.listdir(os.path.join(ROOT, "slurm")):
                if name not in jobs:
                    shutil.rmtree(os.path.join(ROOT, "slurm", name), ignore_errors=True)
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
    remove_quietly(os.path.join(ROOT, "lock"))
    try:
        os.rmdir(ROOT)  # not when another tether put something there meanwhile
    except OSError:
        pass
    return {"removed_bytes": max(0, before - disk_bytes(ROOT))}


def login_shell(command, timeout=20):
    shell = os.environ.get("SHELL") or "/bin/sh"
    try:
        out = subprocess.run([shell, "-lc", command], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             timeout=timeout, universal_newlines=True)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout


def conda_python(name):
    listing = login_shell("conda env list --json 2>/dev/null || mamba env list --json")
    candidates = []
    try:
        candidates = json.loads(listing[listing.index("{"):]).get("envs", [])
    except ValueError:
        pass
    for prefix in ("/anaconda", "/opt/conda", "~/miniconda3", "~/anaconda3", "~/miniforge3",
                   "~/mambaforge", "~/micromamba", "/opt/miniconda3"):
        prefix = os.path.expanduser(prefix)
        candidates += [prefix, os.path.join(prefix, "envs", name)]
    for prefix in candidates:
        if os.path.basename(prefix) == name or (name == "base" and "/envs/" not in prefix):
            python = os.path.join(prefix, "bin", "python")
            if os.access(python, os.X_OK):
                return python
    raise Fail("kernel-python", "no conda environment named %r on HOST" % name,
               hint="List them with `ssh HOST conda env list`, or pass --kernel-python PATH.")


def default_python():
    for line in reversed(login_shell("command -v python3").splitlines()):
        if line.startswith("/"):
            return line.strip()
    return ""


def working_python(python):
    """The version ("3.11") of ``python``, or "" when it does not run as a Python."""
    code = "import sys; sys.stdout.write('tether-probe %d.%d' % sys.version_info[:2])"
    try:
        out = subprocess.run([python, "-c", code], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             timeout=PROBE_TIMEOUT, universal_newlines=True)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    words = out.stdout.split()
    return words[1] if out.returncode == 0 and len(words) == 2 and words[0] == "tether-probe" \
        else ""


def missing_modules(python, modules):
    code = "import importlib.util,sys; print(' '.join(m for m in %r " \
           "if importlib.util.find_spec(m) is None))" % (list(modules),)
    try:
        out = subprocess.run([python, "-c", code], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             timeout=60, universal_newlines=True)
    except (OSError, subprocess.TimeoutExpired):
        return list(modules)
    return out.stdout.split() if out.returncode == 0 else list(modules)


KERNEL_MODULES = ("ipykernel", "psutil")


KERNEL_MIN_PYTHON = (3, 8)  # ipykernel's own floor


def check_kernel_version(python, given):
    """A Python that runs, and is recent enough for ipykernel; else a Fail naming ``given``."""
    version = working_python(python)
    if not version:
        raise Fail("kernel-python", "%s is not a working Python on HOST (`%s -c` did not run)"
                   % (given, given),
                   hint="Give --kernel-python the python of an environment that runs "
                        "(check with `ssh HOST %s -V`)." % given)
    if tuple(int(x) for x in version.split(".")) < KERNEL_MIN_PYTHON:
        raise Fail("kernel-python", "%s is Python %s; kernels need Python >= %s"
                   % (given, version, ".".join(map(str, KERNEL_MIN_PYTHON))),
                   hint="Give --kernel-python a newer python on HOST.")


def explicit_kernel_python():
    """The --kernel-python given, checked: an executable that runs as a Python."""
    given = PARAMS["kernel_python"]
    python = os.path.expanduser(given)
    if not os.path.isfile(python) or not os.access(python, os.X_OK):
        raise Fail("kernel-python", "%s is not an executable on HOST" % given,
                   hint="Give --kernel-python the full path of your environment's python "
                        "(`ssh HOST which python` inside it shows it).")
    check_kernel_version(python, given)
    return python


def kernel_python(warnings):
    """(python, None) for the interpreter kernels run in, with ipykernel present; or
    (python, question) when installing ipykernel there needs the user's consent first."""
    chosen = bool(PARAMS.get("kernel_python") or PARAMS.get("conda_env"))
    if PARAMS.get("kernel_python"):
        python = explicit_kernel_python()
    elif PARAMS.get("conda_env"):
        python = conda_python(PARAMS["conda_env"])
        check_kernel_version(python, python)
    else:
        python = default_python()
        if python and not working_python(python):
            python = ""
    missing = missing_modules(python, KERNEL_MODULES) if python else list(KERNEL_MODULES)
    if python and not missing:
        return python, None
    consent = PARAMS.get("install_kernel_deps")
    if python and consent:
        install_kernel_deps(python, missing)
        return python, None
    if python and chosen:
        if consent is None:  # not asked yet: the caller asks the user
            return python, {"python": python, "missing": missing}
        raise Fail("kernel-python", "%s has no %s, and installing them was declined"
                   % (python, "/".join(missing)),
                   hint="Run `%s -m pip install %s` on HOST, or pass another --kernel-python."
                   % (python, " ".join(missing)))
    warnings.append("kernels run in tether's own environment: %s has no ipykernel (pass "
                    "--install-kernel-deps to add it, or --kernel-python / --conda-env)"
                    % (python or "the login shell's python3"))
    return env_python(), None


def install_kernel_deps(python, missing):
    """ipykernel and psutil into the user's Python: the same installer, pins and source as
    tether's environment (uv where it runs; the laptop's wheels on a host with no index)."""
    marker = read_marker() or {}
    offline = marker.get("source") == "laptop" or bool(PARAMS.get("offline"))
    uv = uv_in_env()
    installer = "uv" if uv and uv_runs(uv) else "pip"
    # The pins were resolved for the remote's python3: they fit another Python of that version
    same = working_python(python) == ".".join(str(marker.get("python", "")).split(".")[:2])
    pins = pins_path() if same and os.path.exists(pins_path()) else ""
    if offline and not same:
        raise Fail("kernel-python", "%s is not the Python version the laptop sent wheels for "
                   "(%s), and HOST reaches no package index" % (python, marker.get("python")),
                   hint="Install ipykernel and psutil there yourself, or pass a --kernel-python "
                        "of Python %s." % marker.get("python"))
    label = "installing %s into %s with %s %s" % (" and ".join(missing), python, installer,
                                                   where(offline))
    with Step("kernel-deps", label):
        run_logged(install_argv(installer, uv, python, offline, pins) + missing,
                   "%s install %s" % (installer, " ".join(missing)), "kernel",
                   "Install them yourself (`%s -m pip install %s`) or pass another "
                   "--kernel-python." % (python, " ".join(missing)),
                   env=installer_env(installer, offline))


def write_kernelspec(python):
    path = os.path.join(JUPYTER_PATH, "kernels", "python3")
    ensure_dir(path)
    spec = {"argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (tether: %s)" % python, "language": "python",
            "metadata": {"debugger": True, "tether": {"python": python}}}
    with open(os.path.join(path, "kernel.json"), "w") as f:
        json.dump(spec, f, indent=1)


# -- processes: identified by what tether recorded, never by their command line --------------

_BOOT_TIME = []


def boot_time():
    if not _BOOT_TIME:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    _BOOT_TIME.append(float(line.split()[1]))
                    break
    return _BOOT_TIME[0]


def proc_facts(pid):
    """(state letter, start time in seconds since the epoch, uid, start in clock ticks since
    boot) of a process; None if it is gone.

    The start time is psutil's ``create_time``: field 22 of /proc/PID/stat (clock ticks since
    boot) over SC_CLK_TCK, plus btime from /proc/stat. btime moves when the wall clock is
    stepped; the ticks do not, so the agent pins the servers it launched by ticks and boot id.
    """
    if pid <= 0:
        return None
    try:
        uid = os.stat("/proc/%d" % pid).st_uid
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the name may hold spaces and ')'
        ticks = int(fields[19])
        start = ticks / float(os.sysconf("SC_CLK_TCK")) + boot_time()
    except (OSError, ValueError, IndexError):
        return None
    return fields[0], start, uid, ticks


def boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def proc_name(pid):
    try:
        with open("/proc/%d/comm" % pid) as f:
            return f.read().strip()
    except OSError:
        return "?"


def marks(pid):
    """The tether markers in a process's environment ({} if unreadable)."""
    try:
        with open("/proc/%d/environ" % pid, "rb") as f:
            raw = f.read()
    except OSError:
        return {}
    found = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key in (b"TETHER_LAUNCH", b"TETHER_SERVER_INSTANCE"):
            found[key.decode()] = value.decode("utf-8", "replace")
    return found


def gone(facts):
    return facts is None or facts[0] in ("Z", "X", "x")  # a zombie has ended already


def own_lineage():
    """This process and its ancestors: never ours to end, whatever their environment says."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            with open("/proc/%d/stat" % pid) as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


class Target(object):
    """One process to end, pinned by its start time (and a pidfd where the system has them),
    so a pid reused by another process is never signalled."""

    def __init__(self, pid, start, what):
        self.pid, self.start, self.what = pid, start, what
        self.name = proc_name(pid)
        self.why = ""
        self.fd = None
        if hasattr(os, "pidfd_open"):
            try:
                self.fd = os.pidfd_open(pid)
            except OSError:
                self.fd = None

    def alive(self):
        # Checked after the pidfd is opened: while the start time matches, the pidfd (and the
        # pid) is the process we judged.
        facts = proc_facts(self.pid)
        return not gone(facts) and abs(facts[1] - self.start) <= START_TOLERANCE

    def signal(self, sig):
        if not self.alive():
            return
        try:
            if self.fd is not None and hasattr(signal, "pidfd_send_signal"):
                signal.pidfd_send_signal(self.fd, sig)
            else:
                os.kill(self.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            self.why = "not permitted to signal it"
        except OSError as e:
            self.why = "cannot signal it: %s" % e

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def report(self, why=""):
        return {"pid": self.pid, "name": self.name, "what": self.what,
                "why": why or self.why or "still running after SIGKILL"}


def wait_gone(targets, seconds):
    """The targets still alive after ``seconds`` (polled: they are not our children)."""
    deadline = time.monotonic() + seconds
    left = [t for t in targets if t.alive()]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [t for t in left if t.alive()]
    return left


def end(targets, grace):
    """SIGTERM, wait up to ``grace`` s, SIGKILL, wait again; returns (forced, survivors)."""
    for t in targets:
        t.signal(signal.SIGTERM)
    forced = wait_gone(targets, grace)
    for t in forced:
        t.signal(signal.SIGKILL)
    return forced, wait_gone(forced, STRAY_DEADLINE)


def user_processes(skip):
    """(pid, start time, markers) of each live process of this user, but those in ``skip``."""
    uid = os.getuid()
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in skip:
            facts = proc_facts(int(name))
            if not gone(facts) and facts[2] == uid:
                yield int(name), facts[1], marks(int(name))


def marked_processes(ids, skip):
    """This user's processes whose environment carries one of ``ids`` (launch or instance)."""
    return [Target(pid, start, "process of a tether server")
            for pid, start, m in user_processes(skip)
            if m.get(LAUNCH_ENV) in ids or m.get(INSTANCE_ENV) in ids]


# -- launch records and state files ------------------------------------------------------------

def launch_path(launch):
    return LAUNCH_RECORD.replace("{launch}", launch)


def read_launches():
    """{launch id: record} of the servers the agent launched here (0600 files of ours)."""
    found = {}
    folder = os.path.dirname(LAUNCH_RECORD)
    prefix, _, suffix = os.path.basename(LAUNCH_RECORD).partition("{launch}")
    try:
        names = os.listdir(folder)
    except OSError:
        return found
    for name in names:
        launch = name[len(prefix):len(name) - len(suffix)] if suffix else name[len(prefix):]
        if not (name.startswith(prefix) and name.endswith(suffix) and launch.isalnum()):
            continue
        try:
            path = os.path.join(folder, name)
            if os.stat(path).st_uid != os.getuid():
                continue
            with open(path) as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("launch") == launch:
            found[launch] = record
    return found


def asked_options():
    """The options of this `up` that shape a server (recorded at launch, compared on reuse)."""
    explicit = PARAMS.get("kernel_python")
    notebook_dir = PARAMS.get("notebook_dir")
    return {"notebook_dir": os.path.expanduser(notebook_dir) if notebook_dir else None,
            "idle_timeout": int(PARAMS.get("idle_timeout", DEFAULT_IDLE_TIMEOUT)),
            "serve_args": list(PARAMS.get("serve_args") or []),
            "origins": sorted(PARAMS.get("origins") or []),
            "kernel_python": os.path.expanduser(explicit) if explicit else None,
            "conda_env": PARAMS.get("conda_env"), "remote_port": PARAMS.get("remote_port")}


def record_launch(launch, python):
    ensure_dir(RUNTIME)
    record = {"launch": launch, "started": time.time(), "kernel_python_used": python,
              "options": asked_options()}
    write_private(launch_path(launch), json.dumps(record).encode())


def prune_launches():
    """Forget the launches no process carries any more (crashed servers and their orphans
    gone): `down` needs only the records of what may still run."""
    launches = read_launches()
    if not launches:
        return
    carried = set(m.get(LAUNCH_ENV) for _, _, m in user_processes(own_lineage()))
    for launch in launches:
        if launch not in carried:
            forget_launch(launch)


def pin_launch(launch, pid):
    """Add the server's pid and start (ticks since boot, boot id) to its launch record."""
    facts = proc_facts(pid)
    records = read_launches()
    if gone(facts) or launch not in records:
        return
    records[launch]["server"] = {"pid": pid, "start_ticks": facts[3], "boot_id": boot_id()}
    write_private(launch_path(launch), json.dumps(records[launch]).encode())


def pinned_by_launch(pid, facts, launches):
    """True/False when a launch record names ``pid`` (is it that server?); None when none does."""
    pins = [r["server"] for r in launches.values()
            if isinstance(r.get("server"), dict) and r["server"].get("pid") == pid]
    if not pins:
        return None
    here = boot_id()
    return any(p.get("start_ticks") == facts[3] and p.get("boot_id") == here for p in pins)


def forget_launch(launch):
    try:
        os.unlink(launch_path(launch))
    except OSError:
        pass


def state_files():
    """(path, state) of each readable server state file (``tether-<pid>.json``)."""
    found = []
    try:
        names = os.listdir(RUNTIME)
    except OSError:
        return found
    for name in names:
        if not (name.startswith("tether-") and name.endswith(".json")):
            continue
        path = os.path.join(RUNTIME, name)
        try:
            with open(path) as f:
                state = json.load(f)
            state["pid"] = int(state.get("pid") or 0)
        except (OSError, ValueError, TypeError, AttributeError):
            continue
        state["_file"] = path
        found.append((path, state))
    return found


def recorded_start(state):
    """The server's start time as its state file records it, or None (an older server).

    ``create_time`` is psutil's; the instance id ``pid.created.nonce`` holds it in 1/100 s.
    """
    if state.get("create_time") is not None:
        try:
            return float(state["create_time"])
        except (TypeError, ValueError):
            return None
    pid, _, rest = str(state.get("instance") or "").partition(".")
    created = rest.partition(".")[0]
    if pid == str(state["pid"]) and created.isdigit():
        return int(created) / 100.0
    return None


LIVE, STALE, UNVERIFIED = "live", "stale", "unverified"


def judge(state, launches):
    """(verdict, why): is the process named by a state file the server that wrote it?"""
    pid = state["pid"]
    facts = proc_facts(pid)
    if gone(facts):
        return STALE, "its process %d is gone" % pid
    if facts[2] != os.getuid():
        return STALE, "pid %d now belongs to another user" % pid
    pinned = pinned_by_launch(pid, facts, launches)
    if pinned:
        return LIVE, ""
    if state.get("boot_start"):  # the server's start since boot: unmoved by the wall clock
        if state.get("boot_id") != boot_id():
            return STALE, "the machine rebooted after server %d started" % pid
        if abs(facts[3] / float(os.sysconf("SC_CLK_TCK")) - float(state["boot_start"])) < 0.005:
            return LIVE, ""
        return STALE, "pid %d is now another process (%s, started %s)" \
            % (pid, proc_name(pid), stamp(facts[1]))
    want = recorded_start(state)  # an older server: psutil's create time, which btime moves
    if want is not None:
        if abs(facts[1] - want) <= START_TOLERANCE:
            return LIVE, ""
        return STALE, "pid %d is now another process (%s, started %s; the server started %s)" \
            % (pid, proc_name(pid), stamp(facts[1]), stamp(want))
    if pinned is False:
        return STALE, "pid %d is now another process (%s, started %s)" \
            % (pid, proc_name(pid), stamp(facts[1]))
    if marks(pid).get(LAUNCH_ENV) in launches:
        return LIVE, ""
    return UNVERIFIED, ("pid %d runs, but its state file records no start time and the "
                        "process carries no launch marker of ours" % pid)


def stamp(seconds):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


_stale = []  # stale state files removed during this run (reported by every action)


def scan_servers():
    """{"live": verified servers newest first, "unverified": [...]}; stale files removed."""
    launches = read_launches()
    live, unverified = [], []
    for path, state in state_files():
        verdict, why = judge(state, launches)
        if verdict == LIVE:
            live.append(state)
            continue
        entry = {"file": path, "pid": state["pid"], "instance": state.get("instance"),
                 "why": why}
        if verdict == STALE:
            try:
                os.unlink(path)
            except OSError:
                pass
            _stale.append(entry)
        else:
            entry["state"] = state
            unverified.append(entry)
    live.sort(key=lambda s: s.get("started", 0), reverse=True)
    return {"live": live, "unverified": unverified}


def servers():
    return scan_servers()["live"]


def stale_report():
    return [{k: e[k] for k in ("file", "pid", "why")} for e in _stale]


# -- starting a server -------------------------------------------------------------------------

def serve_argv(token_file):
    argv = [os.path.join(ENV, "bin", "tether"), "serve", "--token-file", token_file,
            "--idle-timeout", str(PARAMS.get("idle_timeout", DEFAULT_IDLE_TIMEOUT))]
    if PARAMS.get("remote_port") is not None:
        argv += ["--port", str(PARAMS["remote_port"])]
    else:
        argv += ["--sock", SOCKET]
    for origin in PARAMS.get("origins", []):
        argv += ["--origin", origin]
    if PARAMS.get("notebook_dir"):
        argv += ["--notebook-dir", os.path.expanduser(PARAMS["notebook_dir"])]
    return argv + list(PARAMS.get("serve_args") or [])


def lingering():
    user = os.environ.get("USER") or os.environ.get("LOGNAME") or ""
    return os.path.exists("/var/lib/systemd/linger/" + user)


def launch(argv, env):
    """Start the server so that it outlives this SSH connection; returns its pid if known."""
    with open(SERVER_LOG, "wb") as log:
        os.fchmod(log.fileno(), 0o600)
    # Without lingering, systemd stops the user's manager (and its units) at logout.
    if shutil.which("systemd-run") and lingering() and os.environ.get("XDG_RUNTIME_DIR"):
        unit = ["systemd-run", "--user", "--quiet", "--collect",
                "--unit", "tether-server-%d" % int(time.time()),
                "-p", "StandardOutput=null", "-p", "StandardError=append:" + SERVER_LOG,
                "-p", "KillMode=mixed", "-p", "WorkingDirectory=" + os.path.expanduser("~")]
        unit += ["--setenv=%s=%s" % (k, env[k])
                 for k in ("JUPYTER_RUNTIME_DIR", "JUPYTER_PATH", LAUNCH_ENV)]
        if subprocess.call(unit + argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=30) == 0:
            return None
    with open(SERVER_LOG, "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=log, env=env, cwd=os.path.expanduser("~"),
                                start_new_session=True, close_fds=True)
    return proc


def wait_ready(proc, started, launch_id):
    deadline = time.monotonic() + READY_DEADLINE
    while time.monotonic() < deadline:
        for state in servers():
            if marks(state["pid"]).get(LAUNCH_ENV) == launch_id \
                    or state.get("started", 0) >= started - 1:
                return state
        if proc is not None and proc.poll() is not None:
            forget_launch(launch_id)
            raise Fail("start", "the server exited with status %d before it was ready"
                       % proc.returncode, log_tail=tail(SERVER_LOG), log=SERVER_LOG)
        time.sleep(POLL)
    raise Fail("start", "the server was not ready after %.0f s" % READY_DEADLINE,
               log_tail=tail(SERVER_LOG), log=SERVER_LOG)


def valid_token_file():
    try:
        st = os.stat(TOKEN_FILE)
        with open(TOKEN_FILE) as f:
            token = f.read().strip()
    except OSError:
        return False
    return st.st_uid == os.getuid() and st.st_mode & 0o077 == 0 and len(token) >= 32 \
        and all(c in "0123456789abcdef" for c in token)


def start_server(python):
    ensure_dir(RUNTIME)
    write_kernelspec(python)
    # A token left by a server that died (crash, reboot) is reused, so the URL stays the same;
    # `tether down` removes it.
    if not valid_token_file():
        write_private(TOKEN_FILE, secrets.token_hex(24).encode())
    if PARAMS.get("remote_port") is None and len(SOCKET) > 100:
        raise Fail("start", "the socket path %s is too long for a Unix socket" % SOCKET,
                   hint="Set a shorter XDG_CACHE_HOME on HOST, or pass --remote-port N.")
    prune_launches()
    launch_id = secrets.token_hex(16)
    record_launch(launch_id, python)
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=RUNTIME, JUPYTER_PATH=JUPYTER_PATH)
    env[LAUNCH_ENV] = launch_id
    started = time.time()
    with Step("start", "starting the server"):
        state = wait_ready(launch(serve_argv(TOKEN_FILE), env), started, launch_id)
    pin_launch(launch_id, state["pid"])
    return state


def public(state):
    keys = ("pid", "token", "port", "sock", "version", "started", "root_dir", "base_url",
            "instance", "create_time")
    return {k: state.get(k) for k in keys}


def check_token(want):
    """A restart asked by a supervising `up`: only if the server was not stopped on purpose.

    `tether down` removes the token file. A server that ends by itself on purpose (idle,
    `release --all --stop-server`, SIGTERM) removes its state file on the way out; one that
    crashed leaves it behind (and one that is merely frozen is still alive).
    """
    token = ""
    if valid_token_file():
        with open(TOKEN_FILE) as f:
            token = f.read().strip()
    if hashlib.sha256(token.encode()).hexdigest() != want:
        raise Fail("stopped", "the server was stopped (`tether down`); not starting it again")
    if not any(state.get("token") == token for _, state in state_files()):
        raise Fail("stopped", "the server stopped on its own (idle, or asked to stop); not "
                   "starting it again")


# -- options asked of a running server ----------------------------------------------------------

OPTION_FLAGS = (("notebook_dir", "--notebook-dir"), ("idle_timeout", "--idle-timeout"),
                ("origins", "--origin"), ("kernel_python", "--kernel-python"),
                ("conda_env", "--conda-env"), ("remote_port", "--remote-port"))


def serve_flags(args):
    """{"--flag": [values]} of `tether serve` options given as an argv list."""
    flags, current = {}, None
    for arg in args:
        if arg.startswith("--"):
            current, sep, value = arg.partition("=")
            flags.setdefault(current, [])
            if sep:
                flags[current].append(value)
        elif current is not None:
            flags[current].append(arg)
    return flags


def given(key, value):
    """Whether the user asked for this option (defaults are not a request)."""
    if key == "idle_timeout":
        return value != DEFAULT_IDLE_TIMEOUT
    return value not in (None, "", [])


def same_path(a, b):
    return a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b)


def differing_options(asked, record):
    """The flags given to this `up` that the running server was not launched with."""
    running = record.get("options") or {}
    names = []
    for key, flag in OPTION_FLAGS:
        want = asked.get(key)
        if not given(key, want):
            continue
        if key == "kernel_python":
            if not same_path(want, record.get("kernel_python_used") or running.get(key)):
                names.append(flag)
        elif key == "notebook_dir":
            if not same_path(want, running.get(key)):
                names.append(flag)
        elif want != running.get(key):
            names.append(flag)
    want_flags = serve_flags(asked.get("serve_args") or [])
    have_flags = serve_flags(running.get("serve_args") or [])
    names += [f for f in sorted(want_flags) if want_flags[f] != have_flags.get(f)]
    return names


def given_flags(asked):
    names = [flag for key, flag in OPTION_FLAGS if given(key, asked.get(key))]
    return names + sorted(serve_flags(asked.get("serve_args") or []))


def option_warnings(state):
    """One warning when this `up` asks for options the reused server does not run with."""
    asked = asked_options()
    record = read_launches().get(marks(state["pid"]).get(LAUNCH_ENV) or "")
    how = "they apply to a new server only: run `tether down HOST`, then `tether up HOST` " \
          "with them again"
    if record is None:
        names = given_flags(asked)
        if not names:
            return []
        return ["the server already running on HOST was not started by `tether up`, so %s "
                "may not be what it runs with; %s" % (", ".join(names), how)]
    names = differing_options(asked, record)
    if not names:
        return []
    return ["the server already running on HOST runs with other %s than asked; %s"
            % (", ".join(names), how)]


def stale_warnings():
    return ["a tether server on HOST had stopped without cleaning up (%s): its state file "
            "was removed, and kernels it ran are lost" % e["why"] for e in _stale]


def action_up():
    check_python()
    if PARAMS.get("token_sha256"):
        check_token(PARAMS["token_sha256"])
    if PARAMS.get("attach"):
        running = servers()
        if not running:
            raise Fail("no-server", "no tether server is running on HOST",
                       hint="Start one with `tether up HOST`.")
        return {"server": public(running[0]), "reused": True, "stale": stale_report()}
    ensure_root()
    if not prepare_env():
        return need_wheel()
    running = servers()
    if running:
        return {"server": public(running[0]), "reused": True, "stale": stale_report(),
                "warnings": stale_warnings() + option_warnings(running[0])}
    warnings = []
    python, question = kernel_python(warnings)
    if question is not None:
        return {"need_consent": question, "stale": stale_report()}
    fd = lock_root()
    try:
        scan = scan_servers()
        running = scan["live"]
        if not running:
            check_unverified(scan["unverified"])
        state = running[0] if running else start_server(python)
    finally:
        os.close(fd)
    return {"server": public(state), "reused": bool(running), "kernel_python": python,
            "stale": stale_report(), "warnings": stale_warnings() + warnings}


def check_unverified(unverified):
    """A server tether cannot verify (an older tether's) is neither reused nor ended: say so
    where it holds the socket a new server needs."""
    for entry in unverified:
        if PARAMS.get("remote_port") is None and entry["state"].get("sock") == SOCKET:
            raise Fail("start", "pid %d serves tether's socket %s, but cannot be verified as a "
                       "tether server: its state file records no start time and it carries no "
                       "launch marker" % (entry["pid"], SOCKET),
                       hint="If it is a server of an older tether, stop it (`ssh HOST kill %d`), "
                            "then run `tether up HOST` again." % entry["pid"])


# -- status and down ---------------------------------------------------------------------------

class UnixHTTP(object):
    def __init__(self, state):
        self.state = state

    def get(self, path):
        raw = ("GET %s HTTP/1.0\r\nHost: localhost\r\nAuthorization: token %s\r\n\r\n"
               % (path, self.state["token"])).encode()
        if self.state.get("sock"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address = self.state["sock"]
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = ("127.0.0.1", int(self.state["port"]))
        s.settimeout(10)
        try:
            s.connect(address)
            s.sendall(raw)
            chunks = []
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            s.close()
        head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
        text = body.decode("utf-8", "replace")
        if text.startswith(")]}'"):
            text = text.split("\n", 1)[1]
        return json.loads(text)


def describe(state):
    info = public(state)
    info.pop("token")
    client = UnixHTTP(state)
    try:
        info["status"] = client.get("/api/status")
        info["kernels"] = client.get("/api/kernels")
        info["resources"] = client.get("/api/colab/resources")
    except (OSError, ValueError) as e:
        info["error"] = str(e)
    return info


def action_status():
    scan = scan_servers()
    return {"servers": [describe(s) for s in scan["live"]], "stale": stale_report(),
            "unverified": [{k: e[k] for k in ("file", "pid", "why")} for e in scan["unverified"]],
            "env_ready": read_marker() is not None, "root": ROOT, "disk_bytes": disk_bytes(ROOT),
            "envs": sorted(os.path.basename(p) for p in env_dirs()),
            "installed": {k: (read_marker() or {}).get(k) for k in ("installer", "source")}}


def stop_servers(live):
    """SIGTERM the verified servers (each shuts its kernels down), bounded; then SIGKILL."""
    targets = []
    for state in live:
        facts = proc_facts(state["pid"])
        if not gone(facts):
            targets.append(Target(state["pid"], facts[1], "tether server"))
    targets = [t for t in targets if t.alive()]
    forced, survivors = end(targets, STOP_DEADLINE)
    return targets, forced, survivors


def remove_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def action_down():
    """End exactly this user's tether servers and every process that carries their markers.

    A process is ours by what tether recorded: the server's pid and start time (state file),
    the launch id the agent set in its environment (launch record), the instance id the server
    sets in its kernels' environment. Never by its command line. A child started with an
    emptied environment (``env -i``) carries no marker and cannot be found this way.
    """
    scan = scan_servers()
    launches = read_launches()
    ids = set(launches)
    ids.update(e["instance"] for e in _stale if e.get("instance"))
    ids.update(s["instance"] for s in scan["live"] if s.get("instance"))
    servers_, forced, survivors = stop_servers(scan["live"])
    for state in scan["live"]:  # a server that had to be killed leaves its state file
        remove_quietly(state["_file"])
    skip = own_lineage() | set(t.pid for t in survivors)
    strays = marked_processes(ids, skip)
    stray_forced, stray_survivors = end(strays, STRAY_DEADLINE)
    left = [t.report() for t in survivors + stray_survivors]
    left += [{"pid": e["pid"], "name": proc_name(e["pid"]), "what": "unverified server",
              "why": e["why"]} for e in scan["unverified"]]
    still_marked = set()
    for t in survivors + stray_survivors:
        m = marks(t.pid)
        still_marked.update(v for v in (m.get(LAUNCH_ENV), m.get(INSTANCE_ENV)) if v)
    for launch in launches:
        if launch not in still_marked:
            forget_launch(launch)
    remove_quietly(TOKEN_FILE)
    if not any(e["state"].get("sock") == SOCKET for e in scan["unverified"]):
        remove_quietly(SOCKET)
    for t in servers_ + strays:
        t.close()
    result = {"stopped": [t.pid for t in servers_], "strays": [t.pid for t in strays],
              "forced": [t.pid for t in forced + stray_forced], "stale": stale_report(),
              "left": left}
    if PARAMS.get("purge") and not left:
        result["purged"] = purge()
    elif os.path.isdir(ROOT):
        fd = lock_root()
        try:
            result["removed_envs"] = remove_old_envs()
        finally:
            os.close(fd)
    return result


def action_probe():
    """For `tether doctor`: the host's facts, and whether it reaches its package index (else a
    cold `up` prepares it from wheels the laptop sends)."""
    info = probe(query_gpu=True)
    info["index"] = index_check()
    info["python_ok"] = True
    try:
        check_python()
    except Fail as e:
        info["python_ok"], info["python_error"] = False, e.message
    info["kernel_python"] = PARAMS.get("kernel_python") or default_python()
    info["servers"] = [public(s) for s in servers()]
    for s in info["servers"]:
        s.pop("token")
    info["stale"] = stale_report()
    return info


def action_prepare():
    """The environment and kernelspec only, no server: a batch job starts it (Slurm)."""
    check_python()
    ensure_root()
    if not prepare_env():
        return need_wheel()
    warnings = []
    python, question = kernel_python(warnings)
    if question is not None:
        return {"need_consent": question}
    write_kernelspec(python)
    return {"prepared": True, "env": ENV, "root": ROOT, "kernel_python": python,
            "warnings": warnings}


ACTIONS = {"up": action_up, "status": action_status, "down": action_down, "probe": action_probe,
           "prepare": action_prepare}


def main():
    configure(json.loads(sys.argv[1]))
    try:
        try:
            emit("result", **ACTIONS[PARAMS["action"]]())
        except OSError as e:  # checked up front; a file system can still turn read-only later
            inside = str(e.filename or "").startswith(ROOT + os.sep) or e.filename == ROOT
            raise (cache_error(e) if inside else None) or e
    except Fail as e:
        emit("error", kind=e.kind, message=e.message, hint=e.hint, **e.data)
        sys.exit(3)


if __name__ == "__main__":
    main()
