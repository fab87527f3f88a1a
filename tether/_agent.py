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
``down``    stop the servers (SIGTERM: kernels are shut down), then end anything left that
            belongs to tether's directories.
``probe``   what ``tether doctor`` needs: OS, Python, disk, GPU driver, environment, servers.
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

PARAMS = json.loads(sys.argv[1])
VERSION = PARAMS["version"]
ROOT = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tether")
ENV = os.path.join(ROOT, "env-" + VERSION)
RUNTIME = os.path.join(ROOT, "runtime")
JUPYTER_PATH = os.path.join(ROOT, "jupyter")
MARKER = os.path.join(ENV, "tether-env.json")
TOKEN_FILE = os.path.join(ROOT, "token")
SERVER_LOG = os.path.join(ROOT, "server.log")
INSTALL_LOG = os.path.join(ROOT, "install.log")
MIN_FREE_BYTES = 1 << 30
READY_DEADLINE = float(PARAMS.get("ready_deadline", 60))
LOCK_DEADLINE = 900.0
STOP_DEADLINE = 25.0
POLL = 0.02


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
                   hint="Install a newer one on the remote (e.g. `sudo apt-get install python3 "
                        "python3-venv`) or pass --remote-python PATH.")


def free_bytes(path):
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def check_disk():
    free = free_bytes(ROOT)
    if free < MIN_FREE_BYTES:
        raise Fail("disk", "only %d MiB free under %s; tether's environment needs about 1 GiB"
                   % (free >> 20, ROOT),
                   hint="Free some space (e.g. `rm -rf ~/.cache/pip`) or point XDG_CACHE_HOME "
                        "at a larger disk in the remote's shell profile.")


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
        "root": ROOT, "env": ENV, "free_bytes": free_bytes(ROOT),
        "env_ready": read_marker() is not None,
        "systemd_run": bool(shutil.which("systemd-run")),
    }
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


def run_logged(argv, what, kind, hint):
    """Run a long step, logging to install.log; end it if the SSH connection goes away.

    The laptop keeps our stdin open until it has our result, so EOF on stdin means it is gone
    (Ctrl-C, network): stop instead of finishing work nobody waits for.
    """
    with open(INSTALL_LOG, "ab") as log:
        log.write(("\n$ " + " ".join(argv) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    watch = [sys.stdin] if not sys.stdin.closed else []
    while proc.poll() is None:
        ready = select.select(watch, [], [], 0.5)[0] if watch else time.sleep(0.5)
        if ready and not os.read(sys.stdin.fileno(), 1):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise Fail("interrupted", "%s was interrupted: the connection went away" % what)
    if proc.returncode != 0:
        raise Fail(kind, "%s failed (exit %d) on the remote" % (what, proc.returncode),
                   hint=hint, log_tail=tail(INSTALL_LOG))


def index_hint():
    return ("The remote cannot install from the package index: give it access (e.g. "
            "`ssh HOST pip config set global.index-url URL` for a mirror, or set "
            "HTTPS_PROXY in its shell profile), then run `tether up` again.")


def create_env(wheel):
    check_disk()
    if os.path.exists(ENV):  # half-built by an interrupted run: start again from scratch
        shutil.rmtree(ENV)
    with Step("venv", "creating the environment"):
        run_logged([sys.executable, "-m", "venv", ENV], "python3 -m venv", "venv",
                   "Install the venv module on the remote, e.g. `sudo apt-get install "
                   "python3-venv` (or pass --remote-python PATH).")
    install_wheel(wheel, deps=True)


def install_wheel(wheel, deps):
    path = os.path.join(ROOT, PARAMS["wheel_name"])
    write_private(path, wheel)
    label = "installing tether and its dependencies" if deps else "updating tether"
    argv = [env_python(), "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
            "--progress-bar", "off"]
    if not deps:
        argv += ["--no-deps", "--force-reinstall"]
    with Step("install", label):
        run_logged(argv + [path], "pip install", "index", index_hint())
    os.unlink(path)
    marker = {"version": VERSION, "wheel_sha256": PARAMS["wheel_sha256"], "created": time.time()}
    write_private(MARKER, json.dumps(marker).encode())


def read_wheel():
    size = int(PARAMS.get("wheel_size", 0))
    data = sys.stdin.buffer.read(size) if size else b""
    if size and (len(data) != size or hashlib.sha256(data).hexdigest() != PARAMS["wheel_sha256"]):
        raise Fail("transfer", "the wheel arrived incomplete (%d of %d bytes)" % (len(data), size))
    return data


def prepare_env():
    """True when the environment is ready; False when the laptop must send the wheel."""
    if env_current():
        return True
    wheel = read_wheel()
    if not wheel:
        return False
    fd = lock_root()
    try:
        if env_current():  # another run finished it while we waited
            return True
        if read_marker() is not None and os.path.exists(env_python()):
            install_wheel(wheel, deps=False)
        else:
            create_env(wheel)
    finally:
        os.close(fd)
    return True


# -- the kernel's Python -----------------------------------------------------------------------

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
    raise Fail("kernel", "no conda environment named %r on the remote" % name,
               hint="List them with `ssh HOST conda env list`, or pass --kernel-python PATH.")


def default_python():
    for line in reversed(login_shell("command -v python3").splitlines()):
        if line.startswith("/"):
            return line.strip()
    return ""


def has_modules(python, modules):
    code = "import importlib.util,sys; sys.exit(any(importlib.util.find_spec(m) is None " \
           "for m in %r))" % (list(modules),)
    try:
        return subprocess.call([python, "-c", code], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               timeout=60) == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def kernel_python(warnings):
    """The interpreter kernels run in, with ipykernel present (installed only with consent)."""
    explicit = PARAMS.get("kernel_python")
    if explicit:
        python = os.path.expanduser(explicit)
        if not os.access(python, os.X_OK):
            raise Fail("kernel", "--kernel-python %s is not an executable on the remote" % explicit,
                       hint="Give the full path of the python of your environment.")
    elif PARAMS.get("conda_env"):
        python = conda_python(PARAMS["conda_env"])
    else:
        python = default_python()
    if python and has_modules(python, ("ipykernel", "psutil")):
        return python
    consent = PARAMS.get("install_kernel_deps")
    if python and consent:
        with Step("kernel-deps", "installing ipykernel and psutil into " + python):
            run_logged([python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
                        "ipykernel", "psutil"], "pip install ipykernel psutil", "kernel",
                       "Install them yourself (`%s -m pip install ipykernel psutil`) or pass "
                       "another --kernel-python." % python)
        return python
    if python and (explicit or PARAMS.get("conda_env")):
        raise Fail("consent", "%s has no ipykernel/psutil" % python,
                   hint="Run again with --install-kernel-deps to install them there, or run "
                        "`%s -m pip install ipykernel psutil` on the remote." % python,
                   python=python)
    warnings.append("kernels run in tether's own environment: %s has no ipykernel (pass "
                    "--install-kernel-deps to add it, or --kernel-python / --conda-env)"
                    % (python or "the login shell's python3"))
    return env_python()


def write_kernelspec(python):
    path = os.path.join(JUPYTER_PATH, "kernels", "python3")
    ensure_dir(path)
    spec = {"argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (tether: %s)" % python, "language": "python",
            "metadata": {"debugger": True, "tether": {"python": python}}}
    with open(os.path.join(path, "kernel.json"), "w") as f:
        json.dump(spec, f, indent=1)


# -- servers -----------------------------------------------------------------------------------

def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not a server
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def servers():
    found = []
    if not os.path.isdir(RUNTIME):
        return found
    for name in os.listdir(RUNTIME):
        if not (name.startswith("tether-") and name.endswith(".json")):
            continue
        try:
            with open(os.path.join(RUNTIME, name)) as f:
                state = json.load(f)
        except (OSError, ValueError):
            continue
        if alive(int(state.get("pid", 0))):
            found.append(state)
    return sorted(found, key=lambda s: s.get("started", 0), reverse=True)


def serve_argv(token_file):
    argv = [os.path.join(ENV, "bin", "tether"), "serve", "--token-file", token_file,
            "--idle-timeout", str(PARAMS.get("idle_timeout", 3600))]
    if PARAMS.get("remote_port") is not None:
        argv += ["--port", str(PARAMS["remote_port"])]
    else:
        argv += ["--sock", os.path.join(RUNTIME, "tether.sock")]
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
        unit += ["--setenv=%s=%s" % (k, env[k]) for k in ("JUPYTER_RUNTIME_DIR", "JUPYTER_PATH")]
        if subprocess.call(unit + argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=30) == 0:
            return None
    with open(SERVER_LOG, "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=log, env=env, cwd=os.path.expanduser("~"),
                                start_new_session=True, close_fds=True)
    return proc


def wait_ready(proc, started):
    deadline = time.monotonic() + READY_DEADLINE
    while time.monotonic() < deadline:
        for state in servers():
            if state.get("started", 0) >= started - 1:
                return state
        if proc is not None and proc.poll() is not None:
            raise Fail("start", "the server exited with status %d before it was ready"
                       % proc.returncode, log_tail=tail(SERVER_LOG))
        time.sleep(POLL)
    raise Fail("start", "the server was not ready after %.0f s" % READY_DEADLINE,
               log_tail=tail(SERVER_LOG))


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
    sock = os.path.join(RUNTIME, "tether.sock")
    if PARAMS.get("remote_port") is None and len(sock) > 100:
        raise Fail("start", "the socket path %s is too long for a Unix socket" % sock,
                   hint="Set a shorter XDG_CACHE_HOME on the remote, or pass --remote-port N.")
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=RUNTIME, JUPYTER_PATH=JUPYTER_PATH)
    started = time.time()
    with Step("start", "starting the server"):
        state = wait_ready(launch(serve_argv(TOKEN_FILE), env), started)
    return state


def public(state):
    keys = ("pid", "token", "port", "sock", "version", "started", "root_dir", "base_url")
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
    if not any(state.get("token") == token for state in state_files()):
        raise Fail("stopped", "the server stopped on its own (idle, or asked to stop); not "
                   "starting it again")


def state_files():
    """Every server state file, of live servers and of crashed ones alike."""
    found = []
    for name in os.listdir(RUNTIME) if os.path.isdir(RUNTIME) else []:
        if name.startswith("tether-") and name.endswith(".json"):
            try:
                with open(os.path.join(RUNTIME, name)) as f:
                    found.append(json.load(f))
            except (OSError, ValueError):
                continue
    return found


def action_up():
    check_python()
    if PARAMS.get("token_sha256"):
        check_token(PARAMS["token_sha256"])
    if PARAMS.get("attach"):
        running = servers()
        if not running:
            raise Fail("no-server", "no tether server is running on the remote",
                       hint="Start one with `tether up HOST`.")
        return {"server": public(running[0]), "reused": True}
    if not prepare_env():
        return {"need_wheel": True, "probe": probe()}
    running = servers()
    if running:
        warnings = []
        if PARAMS.get("kernel_python") or PARAMS.get("conda_env") or PARAMS.get("remote_port"):
            warnings.append("a server was already running: its kernel Python and socket are "
                            "unchanged (`tether down HOST` first to apply new options)")
        return {"server": public(running[0]), "reused": True, "warnings": warnings}
    warnings = []
    python = kernel_python(warnings)
    fd = lock_root()
    try:
        running = servers()
        state = running[0] if running else start_server(python)
    finally:
        os.close(fd)
    return {"server": public(state), "reused": bool(running), "kernel_python": python,
            "warnings": warnings}


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
    return {"servers": [describe(s) for s in servers()], "env_ready": read_marker() is not None,
            "root": ROOT}


def wait_gone(pids, deadline):
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if alive(p)]
        if pids:
            time.sleep(0.05)
    return pids


def ours():
    """Processes of this user whose command line names tether's directories (kernels too)."""
    found = []
    if not os.path.isdir("/proc"):
        return found
    me, uid = os.getpid(), os.getuid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            if os.stat("/proc/" + name).st_uid != uid:
                continue
            with open("/proc/%s/cmdline" % name, "rb") as f:
                cmd = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        if (ENV in cmd or RUNTIME in cmd) and alive(int(name)):
            found.append(int(name))
    return found


def signal_all(pids, sig):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def action_down():
    stopped = [int(s["pid"]) for s in servers()]
    signal_all(stopped, signal.SIGTERM)
    left = wait_gone(stopped, time.monotonic() + STOP_DEADLINE)
    for pid in left:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
    stray = ours()
    signal_all(stray, signal.SIGTERM)
    stray_left = wait_gone(stray, time.monotonic() + 5)
    signal_all(stray_left, signal.SIGKILL)
    wait_gone(stray_left, time.monotonic() + 5)
    for path in (TOKEN_FILE, os.path.join(RUNTIME, "tether.sock")):
        try:
            os.unlink(path)
        except OSError:
            pass
    return {"stopped": stopped, "forced": left + stray_left, "strays": stray, "left": ours()}


def action_probe():
    info = probe(query_gpu=True)
    info["python_ok"] = True
    try:
        check_python()
    except Fail as e:
        info["python_ok"], info["python_error"] = False, e.message
    info["kernel_python"] = PARAMS.get("kernel_python") or default_python()
    info["servers"] = [public(s) for s in servers()]
    for s in info["servers"]:
        s.pop("token")
    return info


ACTIONS = {"up": action_up, "status": action_status, "down": action_down, "probe": action_probe}


def main():
    try:
        emit("result", **ACTIONS[PARAMS["action"]]())
    except Fail as e:
        emit("error", kind=e.kind, message=e.message, hint=e.hint, **e.data)
        sys.exit(3)


if __name__ == "__main__":
    main()
