"""The remote side of ``tether up``/``status``/``down``/``prepare``, run from tether's own
environment once the stdlib seed (:mod:`tether._seed`) has made it current:
``ENV/bin/python -I -m tether.host ACTION PARAMS_JSON`` (the seed execs it; same stdout, one
JSON object a line, the final one a ``result`` of :data:`tether.contract.PROTOCOL` or an
``error``).

``up``      reuse the newest live server, or start one detached (``systemd-run --user`` with
            lingering, else ``setsid``), on a 0600 Unix socket (or a loopback port) with the
            token in a 0600 file; wait for its state file with a deadline.
``prepare`` the kernelspec only (a Slurm job starts the server itself).
``status``  the live servers, with kernels and GPU memory read over their socket.
``down``    stop the servers (SIGTERM: kernels are shut down), then end every process of this
            user that carries a server's launch or instance marker; report what could not be.

A process is tether's only by what tether recorded, never by its command line: a server by
its state file, judged by :func:`tether.remote.state.judge` (pid and start; a stale file is
removed), or by the launch id put in its environment (``TETHER_LAUNCH``, kept in a 0600 launch
record with the options it was started with, and pinned to the server's start); its kernels
and their children by that launch id or the server's instance id (``TETHER_SERVER_INSTANCE``).
Processes are ended by :mod:`tether.remote.sweep` (psutil refuses a reused pid).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import psutil

from tether import _seed as seed
from tether import identity
from tether.contract import INSTANCE_ENV, LAUNCH_ENV, PUBLIC_KEYS, older
from tether.remote import adopt, cgroups, sweep
from tether.remote import state as states

Fail, Step = seed.Fail, seed.Step
STOP_DEADLINE = 25.0
STRAY_DEADLINE = 5.0
PROBE_TIMEOUT = 30.0
DEFAULT_IDLE_TIMEOUT = 3600
POLL = 0.005  # a stat or a listdir: cheap, and a start is found ~10 ms sooner than at 20 ms
COMPILE_JOIN = 5.0
KERNEL_MODULES = ("ipykernel", "psutil")
KERNEL_MIN_PYTHON = (3, 8)  # ipykernel's own floor
LIVE, STALE, UNVERIFIED = states.LIVE, states.STALE, states.UNVERIFIED
TYPE_CHECKING = False  # typing is not imported at run time: every import is paid per call
if TYPE_CHECKING:
    import threading
    from typing import Any

    from tether.contract import StaleEntry

    Record = dict[str, Any]

_stale: list[dict[str, Any]] = []  # stale state files removed during this run (reported)


def params() -> dict[str, Any]:
    return seed.PARAMS


# -- launch records ---------------------------------------------------------------------------------

def launch_path(launch: str) -> str:
    return seed.at("launch_record").replace("{launch}", launch)


def read_launches() -> dict[str, Record]:
    """{launch id: record} of the servers tether launched here (0600 files of ours)."""
    found: dict[str, Record] = {}
    template = seed.at("launch_record")
    folder = os.path.dirname(template)
    prefix, _, suffix = os.path.basename(template).partition("{launch}")
    try:
        names = os.listdir(folder)
    except OSError:
        return found
    for name in names:
        launch = name[len(prefix):len(name) - len(suffix)]
        if not (name.startswith(prefix) and name.endswith(suffix) and launch.isalnum()):
            continue
        path = os.path.join(folder, name)
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
        except OSError:
            continue
        record = seed.read_json(path)
        if isinstance(record, dict) and record.get("launch") == launch:
            found[launch] = record
    return found


def asked_options() -> dict[str, Any]:
    """The options of this `up` that shape a server (recorded at launch, compared on reuse)."""
    p = params()
    explicit, notebook_dir = p.get("kernel_python"), p.get("notebook_dir")
    return {"notebook_dir": os.path.expanduser(notebook_dir) if notebook_dir else None,
            "idle_timeout": int(p.get("idle_timeout", DEFAULT_IDLE_TIMEOUT)),
            "serve_args": list(p.get("serve_args") or []),
            "origins": sorted(p.get("origins") or []),
            "kernel_python": os.path.expanduser(explicit) if explicit else None,
            "conda_env": p.get("conda_env"), "remote_port": p.get("remote_port")}


def record_launch(launch: str, python: str) -> None:
    seed.ensure_dir(seed.RUNTIME)
    record = {"launch": launch, "started": time.time(), "kernel_python_used": python,
              "options": asked_options()}
    seed.write_private(launch_path(launch), json.dumps(record).encode())


def launches_carried(launches: Record) -> set[str]:
    """The launch ids among ``launches`` that a live process of this user still carries."""
    procs = sweep.carrying({LAUNCH_ENV: set(launches)}, sweep.Guard.here())
    return {sweep.environ_of(p).get(LAUNCH_ENV, "") for p in procs}


def prune_launches() -> None:
    """Forget the launches no process carries any more (crashed servers and their orphans
    gone): `down` needs only the records of what may still run."""
    launches = read_launches()
    if launches:
        carried = launches_carried(launches)
        for launch in launches:
            if launch not in carried:
                forget_launch(launch)


def pin_launch(launch: str, pid: int, python: str) -> None:
    """Add the server's pid and start (since boot, with the boot id) and the kernels' Python
    to its launch record."""
    records = read_launches()
    try:
        start = identity.started(psutil.Process(pid))
    except psutil.Error:
        return
    if launch in records:
        records[launch]["server"] = {"pid": pid, "boot_start": start,
                                     "boot_id": identity.boot_id()}
        records[launch]["kernel_python_used"] = python
        seed.write_private(launch_path(launch), json.dumps(records[launch]).encode())


def forget_launch(launch: str) -> None:
    seed.remove_quietly(launch_path(launch))


def marks(pid: int) -> dict[str, str]:
    """The tether markers in a process's environment ({} if unreadable)."""
    try:
        env = sweep.environ_of(psutil.Process(pid))
    except psutil.Error:
        return {}
    return {k: env[k] for k in (LAUNCH_ENV, INSTANCE_ENV) if k in env}


# -- the servers' state files -------------------------------------------------------------------

@dataclass
class Scan:
    live: list[Record] = field(default_factory=list)  # verified servers, newest first
    unverified: list[Record] = field(default_factory=list)


def scan_servers() -> Scan:
    """The state files judged (:func:`tether.remote.state.judge`); stale ones removed and kept
    for the report."""
    found = Scan()
    for entry in states.scan(seed.RUNTIME, read_launches()):
        data = dict(entry.data, _file=str(entry.path))
        if entry.verdict == LIVE:
            found.live.append(data)
            continue
        report = {"file": str(entry.path), "pid": data["pid"], "instance": data.get("instance"),
                  "why": entry.why}
        if entry.verdict == STALE:
            _stale.append(report)
        else:
            found.unverified.append(dict(report, state=data))
    found.live.sort(key=lambda s: float(s.get("started") or 0), reverse=True)
    return found


def servers() -> list[Record]:
    return scan_servers().live


def stale_report() -> list[StaleEntry]:
    return [{"file": e["file"], "pid": e["pid"], "why": e["why"]} for e in _stale]


def public(state: Record) -> dict[str, Any]:
    return {k: state.get(k) for k in PUBLIC_KEYS}


# -- the kernels' Python ---------------------------------------------------------------------------

def login_shell(command: str, timeout: float = 20) -> str:
    shell = os.environ.get("SHELL") or "/bin/sh"
    try:
        out = subprocess.run([shell, "-lc", command], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             timeout=timeout, text=True)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout


def conda_python(name: str) -> str:
    listing = login_shell("conda env list --json 2>/dev/null || mamba env list --json")
    candidates: list[str] = []
    try:
        candidates = list(json.loads(listing[listing.index("{"):]).get("envs", []))
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
    raise Fail("kernel-python", f"no conda environment named {name!r} on HOST",
               hint="List them with `ssh HOST conda env list`, or pass --kernel-python PATH.")


def default_python() -> str:
    for line in reversed(login_shell("command -v python3").splitlines()):
        if line.startswith("/"):
            return line.strip()
    return ""


def working_python(python: str) -> str:
    """The version ("3.11") of ``python``, or "" when it does not run as a Python."""
    code = "import sys; sys.stdout.write('tether-probe %d.%d' % sys.version_info[:2])"
    try:
        out = subprocess.run([python, "-c", code], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             timeout=PROBE_TIMEOUT, text=True)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    words = out.stdout.split()
    ok = out.returncode == 0 and len(words) == 2 and words[0] == "tether-probe"
    return words[1] if ok else ""


def missing_modules(python: str, modules: tuple[str, ...]) -> list[str]:
    code = ("import importlib.util,sys; print(' '.join(m for m in %r "
            "if importlib.util.find_spec(m) is None))" % (list(modules),))
    try:
        out = subprocess.run([python, "-c", code], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             timeout=60, text=True)
    except (OSError, subprocess.TimeoutExpired):
        return list(modules)
    return out.stdout.split() if out.returncode == 0 else list(modules)


def check_kernel_version(python: str, given: str) -> None:
    """A Python that runs, and is recent enough for ipykernel; else a Fail naming ``given``."""
    version = working_python(python)
    if not version:
        raise Fail("kernel-python", f"{given} is not a working Python on HOST "
                   f"(`{given} -c` did not run)",
                   hint="Give --kernel-python the python of an environment that runs "
                        f"(check with `ssh HOST {given} -V`).")
    if tuple(int(x) for x in version.split(".")) < KERNEL_MIN_PYTHON:
        raise Fail("kernel-python", f"{given} is Python {version}; kernels need Python >= "
                   + ".".join(map(str, KERNEL_MIN_PYTHON)),
                   hint="Give --kernel-python a newer python on HOST.")


def explicit_kernel_python(given: str) -> str:
    """The --kernel-python given, checked: an executable that runs as a Python."""
    python = os.path.expanduser(given)
    if not os.path.isfile(python) or not os.access(python, os.X_OK):
        raise Fail("kernel-python", f"{given} is not an executable on HOST",
                   hint="Give --kernel-python the full path of your environment's python "
                        "(`ssh HOST which python` inside it shows it).")
    check_kernel_version(python, given)
    return python


def kernel_python(warnings: list[str]) -> tuple[str, dict[str, Any] | None]:
    """(python, None) for the interpreter kernels run in, with ipykernel present; or
    (python, question) when installing ipykernel there needs the user's consent first."""
    p = params()
    chosen = bool(p.get("kernel_python") or p.get("conda_env"))
    if p.get("kernel_python"):
        python = explicit_kernel_python(str(p["kernel_python"]))
    elif p.get("conda_env"):
        python = conda_python(str(p["conda_env"]))
        check_kernel_version(python, python)
    else:
        python = default_python()
        if python and not working_python(python):
            python = ""
    missing = missing_modules(python, KERNEL_MODULES) if python else list(KERNEL_MODULES)
    if python and not missing:
        return python, None
    consent = p.get("install_kernel_deps")
    if python and consent:
        install_kernel_deps(python, missing)
        return python, None
    if python and chosen:
        if consent is None:  # not asked yet: the caller asks the user
            return python, {"python": python, "missing": missing}
        raise Fail("kernel-python", f"{python} has no {'/'.join(missing)}, and installing "
                   "them was declined",
                   hint=f"Run `{python} -m pip install {' '.join(missing)}` on HOST, or pass "
                        "another --kernel-python.")
    warnings.append("kernels run in tether's own environment: %s has no ipykernel (pass "
                    "--install-kernel-deps to add it, or --kernel-python / --conda-env)"
                    % (python or "the login shell's python3"))
    return seed.env_python(), None


def looked_up() -> bool:
    """Whether the kernels' Python is found by tether alone (no --kernel-python, --conda-env
    or --install-kernel-deps): a lookup that only reads, never asks and never fails."""
    p = params()
    return not (p.get("kernel_python") or p.get("conda_env") or p.get("install_kernel_deps"))


def chosen_kernel_python(warnings: list[str]) -> tuple[str, dict[str, Any] | None]:
    """:func:`kernel_python` where the user chose it (checked before any server starts);
    ("", None) where tether finds it, beside the server's start (:func:`start_server`)."""
    return kernel_python(warnings) if not looked_up() else ("", None)


def kernel_python_beside(warnings: list[str]) -> str:
    """:func:`kernel_python` in a thread while the caller's server starts (bounded)."""
    import threading

    found: list[str] = []
    finder = threading.Thread(target=lambda: found.append(kernel_python(warnings)[0]),
                              daemon=True)
    finder.start()
    finder.join(PROBE_TIMEOUT)
    if not found:
        warnings.append("kernels run in tether's own environment: finding the login shell's "
                        "python3 took more than %g s" % PROBE_TIMEOUT)
    return found[0] if found else seed.env_python()


def install_kernel_deps(python: str, missing: list[str]) -> None:
    """ipykernel and psutil into the user's Python: the same installer, pins and source as
    tether's environment (uv where it runs; the laptop's wheels on a host with no index)."""
    marker = seed.read_marker() or {}
    offline = marker.get("source") == "laptop" or bool(params().get("offline"))
    uv = seed.uv_in_env()
    installer = "uv" if uv and seed.uv_runs(uv) else "pip"
    # The pins were resolved for the remote's python3: they fit another Python of that version
    same = working_python(python) == ".".join(str(marker.get("python", "")).split(".")[:2])
    pins = seed.pins_path() if same and os.path.exists(seed.pins_path()) else ""
    if offline and not same:
        raise Fail("kernel-python", f"{python} is not the Python version the laptop sent wheels "
                   f"for ({marker.get('python')}), and HOST reaches no package index",
                   hint="Install ipykernel and psutil there yourself, or pass a --kernel-python "
                        f"of Python {marker.get('python')}.")
    names = " ".join(missing)
    with Step("kernel-deps", f"installing {' and '.join(missing)} into {python} with "
              f"{installer} {seed.where(offline)}"):
        seed.run_logged(seed.install_argv(installer, uv, python, offline, pins) + missing,
                        f"{installer} install {names}", "kernel",
                        f"Install them yourself (`{python} -m pip install {names}`) or pass "
                        "another --kernel-python.", env=seed.installer_env(installer, offline))


def write_kernelspec(python: str) -> None:
    path = os.path.join(seed.at("jupyter_path"), "kernels", "python3")
    seed.ensure_dir(path)
    spec = {"argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"Python 3 (tether: {python})", "language": "python",
            "metadata": {"debugger": True, "tether": {"python": python}}}
    with open(os.path.join(path, "kernel.json"), "w") as f:
        json.dump(spec, f, indent=1)


# -- old environments --------------------------------------------------------------------------------

def remove_old_envs() -> list[str]:
    """Remove the environments prepared before this one that no live server runs from (a
    server reports its version; its environment is env-<that version>), none while a Slurm job
    of ours is queued or running from this home. Holds the lock."""
    current = seed.read_marker()
    if current is None:
        return []
    env = seed.LAYOUT["env"]
    in_use = {os.path.realpath(os.path.join(seed.ROOT, env.format(version=s.get("version", ""))))
              for s in servers()}
    running = kernel_executables()
    old = []
    for path, marker in seed.env_dirs().items():
        real = os.path.realpath(path)
        if real in in_use or real == os.path.realpath(seed.ENV) \
                or any(exe.startswith(real + os.sep) for exe in running):
            continue  # (an adopted kernel may run from an older environment)
        if isinstance(marker, dict) and float(marker.get("created") or 0) >= float(
                current.get("created") or 0):
            continue  # prepared by a newer tether since: not ours to judge
        old.append(path)
    if old and seed.live_jobs():  # a job's server and kernels may run from any (on its node)
        return []
    import shutil

    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


def kernel_executables() -> list[str]:
    """The programs the kernels that outlive servers run (real paths)."""
    found = []
    for kernel in adopt.read_all(seed.RUNTIME):
        proc = adopt.verify(kernel, os.getuid())
        if proc is None:
            continue
        try:
            found.append(os.path.realpath(proc.exe()))
        except psutil.Error:
            continue
    return found


def remove_old_envs_locked() -> list[str]:
    fd = seed.lock_root()
    try:
        return remove_old_envs()
    finally:
        os.close(fd)


# -- starting a server -------------------------------------------------------------------------------

def serve_argv(token_file: str) -> list[str]:
    p = params()
    argv = [os.path.join(seed.ENV, "bin", "tether"), "serve", "--token-file", token_file,
            "--idle-timeout", str(p.get("idle_timeout", DEFAULT_IDLE_TIMEOUT))]
    if p.get("remote_port") is not None:
        argv += ["--port", str(p["remote_port"])]
    else:
        argv += ["--sock", seed.at("socket")]
    for origin in p.get("origins") or []:
        argv += ["--origin", origin]
    if p.get("notebook_dir"):
        argv += ["--notebook-dir", os.path.expanduser(p["notebook_dir"])]
    return argv + list(p.get("serve_args") or [])


def lingering() -> bool:
    user = os.environ.get("USER") or os.environ.get("LOGNAME") or ""
    return os.path.exists("/var/lib/systemd/linger/" + user)


def launch(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes] | None:
    """Start the server so that it outlives this SSH connection; its process where known."""
    log_path = seed.at("server_log")
    with open(log_path, "wb") as log:
        os.fchmod(log.fileno(), 0o600)
    import shutil

    # Without lingering, systemd stops the user's manager (and its units) at logout.
    if shutil.which("systemd-run") and lingering() and os.environ.get("XDG_RUNTIME_DIR"):
        unit = ["systemd-run", "--user", "--quiet", "--collect",
                "--unit", "tether-server-%d" % int(time.time()),
                "-p", "StandardOutput=null", "-p", "StandardError=append:" + log_path,
                # KillMode=process: the unit's end leaves the kernels (tether.remote.adopt)
                "-p", "KillMode=process", "-p", "WorkingDirectory=" + os.path.expanduser("~")]
        unit += [f"--setenv={k}={env[k]}" for k in ("JUPYTER_RUNTIME_DIR", "JUPYTER_PATH",
                                                     LAUNCH_ENV)]
        if subprocess.call(unit + argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=30) == 0:
            return None
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=log, env=env, cwd=os.path.expanduser("~"),
                                start_new_session=True, close_fds=True)


def wait_ready(proc: subprocess.Popen[bytes] | None, started: float, launch_id: str) -> Record:
    deadline = time.monotonic() + float(params().get("ready_deadline", 60))
    log_path = seed.at("server_log")
    while time.monotonic() < deadline:
        for state in servers():
            if marks(state["pid"]).get(LAUNCH_ENV) == launch_id \
                    or float(state.get("started") or 0) >= started - 1:
                return state
        if proc is not None and proc.poll() is not None:
            forget_launch(launch_id)
            raise Fail("start", f"the server exited with status {proc.returncode} before it "
                       "was ready", log_tail=seed.tail(log_path), log=log_path)
        time.sleep(POLL)
    raise Fail("start", "the server was not ready after %.0f s"
               % float(params().get("ready_deadline", 60)),
               log_tail=seed.tail(log_path), log=log_path)


def read_token() -> str:
    """The token of the file a server was started with ("" unless it is ours, 0600, sound)."""
    path = seed.at("token_file")
    try:
        st = os.stat(path)
        with open(path) as f:
            token = f.read().strip()
    except OSError:
        return ""
    sound = len(token) >= 32 and all(c in "0123456789abcdef" for c in token)
    return token if st.st_uid == os.getuid() and not st.st_mode & 0o077 and sound else ""


def start_server(python: str, warnings: list[str]) -> tuple[Record, str]:
    """Start the server and wait until it is ready. Without ``python`` (the kernels' Python not
    chosen by the user), it is looked up while the server starts: the lookup only reads (a
    login shell, two probes), and it ends long before the server, so the kernelspec is written
    before the server can take a request; ``warnings`` get what it found. The server's state
    and the kernels' Python."""
    import secrets
    import threading

    seed.ensure_dir(seed.RUNTIME)
    if python:
        write_kernelspec(python)
    # A token left by a server that died (crash, reboot) is reused, so the URL stays the same;
    # `tether down` removes it.
    if not read_token():
        seed.write_private(seed.at("token_file"), secrets.token_hex(24).encode())
    sock = seed.at("socket")
    if params().get("remote_port") is None and len(sock) > 100:
        raise Fail("start", f"the socket path {sock} is too long for a Unix socket",
                   hint="Set a shorter XDG_CACHE_HOME on HOST, or pass --remote-port N.")
    prune_launches()
    launch_id = secrets.token_hex(16)
    record_launch(launch_id, python)
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=seed.RUNTIME, JUPYTER_PATH=seed.at("jupyter_path"))
    env[LAUNCH_ENV] = launch_id
    started = time.time()
    with Step("start", "starting the server"):
        done = threading.Event()
        helper = threading.Thread(target=compile_first_imports, args=(done,), daemon=True)
        helper.start()
        try:
            proc = launch(serve_argv(seed.at("token_file")), env)
            if not python:
                python = kernel_python_beside(warnings)
                write_kernelspec(python)
            state = wait_ready(proc, started, launch_id)
        finally:
            done.set()
            helper.join(COMPILE_JOIN)  # it stops after the module it is compiling
    pin_launch(launch_id, state["pid"], python)
    install_later(launch_id)
    return state, python


def install_later(launch_id: str) -> None:
    """What the seed left for after the server's start (:data:`tether._seed.LATER`), installed
    in the background with the server's launch marker (so `down` ends it with the server);
    nothing where it is installed already."""
    marker = seed.read_marker() or {}
    site = os.path.join(seed.ENV, "lib", "python%d.%d" % sys.version_info[:2], "site-packages")
    missing = [p for p in marker.get("later") or () if not os.path.isdir(os.path.join(
        site, "%s-%s.dist-info" % tuple(p.replace("-", "_").split("==", 1))))]
    uv = seed.uv_in_env()
    if not missing or not uv:
        return
    offline = marker.get("source") == "laptop"
    argv = seed.install_argv("uv", uv, seed.env_python(), offline, seed.pins_path("later"), True)
    env = dict(seed.installer_env("uv", offline), **{LAUNCH_ENV: launch_id})
    with open(seed.INSTALL_LOG, "ab") as log:
        log.write(("\n$ %s  (after the server's start)\n" % " ".join(argv)).encode())
        log.flush()
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                         start_new_session=True, close_fds=True)


def compile_first_imports(done: threading.Event, site: str = "") -> None:
    """Bytecode for what the server's first start imports (``tether/first-imports.txt``),
    written from the last module to the first while that start compiles from the first: on a
    fresh environment (uv writes none where there are few cores) the two meet about halfway.
    Ends at the first module already compiled (where they met, or a prepared host), or once
    the server is up."""
    import importlib.util
    import py_compile

    site = site or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        with open(os.path.join(site, "tether", "first-imports.txt")) as f:
            names = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    except OSError:
        return
    for name in reversed(names):
        source = os.path.join(site, name)
        cached = importlib.util.cache_from_source(source)
        if done.is_set() or os.path.exists(cached):
            return
        try:
            py_compile.compile(source, cached, doraise=True)
        except (py_compile.PyCompileError, OSError):
            continue  # not in this environment (another platform's module): the next one


def check_token(want: str) -> None:
    """A restart asked by a supervising `up`: only if the server was not stopped on purpose.

    `tether down` removes the token file. A server that ends by itself on purpose (idle,
    `release --all --stop-server`, SIGTERM) removes its state file on the way out; one that
    crashed leaves it behind (and one that is merely frozen is still alive).
    """
    import hashlib

    token = read_token()
    if hashlib.sha256(token.encode()).hexdigest() != want:
        raise Fail("stopped", "the server was stopped (`tether down`); not starting it again")
    runtime = seed.RUNTIME
    if not any(e.data.get("token") == token for e in states.scan(runtime, remove_stale=False)):
        raise Fail("stopped", "the server stopped on its own (idle, or asked to stop); not "
                   "starting it again")


def check_unverified(unverified: list[Record]) -> None:
    """A server tether cannot verify (an older tether's) is neither reused nor ended: say so
    where it holds the socket a new server needs."""
    sock = seed.at("socket")
    for entry in unverified:
        if params().get("remote_port") is None and entry["state"].get("sock") == sock:
            raise Fail("start", f"pid {entry['pid']} serves tether's socket {sock}, but cannot "
                       "be verified as a tether server: its state file records no start time "
                       "and it carries no launch marker",
                       hint=f"If it is a server of an older tether, stop it (`ssh HOST kill "
                            f"{entry['pid']}`), then run `tether up HOST` again.")


# -- options asked of a running server ---------------------------------------------------------------

OPTION_FLAGS = (("notebook_dir", "--notebook-dir"), ("idle_timeout", "--idle-timeout"),
                ("origins", "--origin"), ("kernel_python", "--kernel-python"),
                ("conda_env", "--conda-env"), ("remote_port", "--remote-port"))


def serve_flags(args: list[str]) -> dict[str, list[str]]:
    """{"--flag": [values]} of `tether serve` options given as an argv list."""
    flags: dict[str, list[str]] = {}
    current: str | None = None
    for arg in args:
        if arg.startswith("--"):
            current, sep, value = arg.partition("=")
            flags.setdefault(current, [])
            if sep:
                flags[current].append(value)
        elif current is not None:
            flags[current].append(arg)
    return flags


def given(key: str, value: Any) -> bool:
    """Whether the user asked for this option (defaults are not a request)."""
    if key == "idle_timeout":
        return bool(value != DEFAULT_IDLE_TIMEOUT)
    return value not in (None, "", [])


def same_path(a: Any, b: Any) -> bool:
    return a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b)


def differing_options(asked: Record, record: Record) -> list[str]:
    """The flags given to this `up` that the running server was not launched with."""
    running = record.get("options") or {}
    names = []
    for key, flag in OPTION_FLAGS:
        want = asked.get(key)
        if not given(key, want):
            continue
        if key == "kernel_python":
            differs = not same_path(want, record.get("kernel_python_used") or running.get(key))
        elif key == "notebook_dir":
            differs = not same_path(want, running.get(key))
        else:
            differs = want != running.get(key)
        if differs:
            names.append(flag)
    want_flags = serve_flags(asked.get("serve_args") or [])
    have_flags = serve_flags(running.get("serve_args") or [])
    return names + [f for f in sorted(want_flags) if want_flags[f] != have_flags.get(f)]


def option_warnings(state: Record) -> list[str]:
    """One warning when this `up` asks for options the reused server does not run with."""
    asked = asked_options()
    record = read_launches().get(marks(state["pid"]).get(LAUNCH_ENV) or "")
    how = ("they apply to a new server only: `tether restart HOST` with them starts one that "
           "keeps the running kernels")
    if record is None:
        names = [flag for key, flag in OPTION_FLAGS if given(key, asked.get(key))]
        names += sorted(serve_flags(asked.get("serve_args") or []))
        if not names:
            return []
        return [f"the server already running on HOST was not started by `tether up`, so "
                f"{', '.join(names)} may not be what it runs with; {how}"]
    names = differing_options(asked, record)
    if not names:
        return []
    return [f"the server already running on HOST runs with other {', '.join(names)} than "
            f"asked; {how}"]


def version_warnings(state: Record) -> list[str]:
    """One warning when the reused server runs an older tether than the laptop's."""
    running, laptop = str(state.get("version") or ""), str(params().get("version") or "")
    if not older(running, laptop):
        return []
    return [f"the server on HOST runs tether {running}, older than this one ({laptop}); "
            "`tether restart HOST` starts the new one without losing the running kernels"]


def stale_warnings() -> list[str]:
    return [f"a tether server on HOST had stopped without cleaning up ({e['why']}): its state "
            "file was removed, and kernels it ran are lost" for e in _stale]


# -- the actions ---------------------------------------------------------------------------------------

def action_up() -> dict[str, Any]:
    p = params()
    if p.get("token_sha256"):
        fd = seed.lock_root()  # (a `tether restart` holds it while it replaces the server)
        try:
            check_token(str(p["token_sha256"]))
        finally:
            os.close(fd)
    if p.get("attach"):
        running = servers()
        if not running:
            raise Fail("no-server", "no tether server is running on HOST",
                       hint="Start one with `tether up HOST`.")
        return {"server": public(running[0]), "reused": True, "stale": stale_report()}
    seed.ensure_root()  # (again where the shell handed over without the seed: it is cheap)
    if p.get("installed"):
        remove_old_envs_locked()
    running = servers()
    if running:
        return {"server": public(running[0]), "reused": True, "stale": stale_report(),
                "warnings": stale_warnings() + option_warnings(running[0])
                + version_warnings(running[0])}
    warnings: list[str] = []
    python, question = chosen_kernel_python(warnings)
    if question is not None:
        return {"need_consent": question, "stale": stale_report()}
    fd = seed.lock_root()
    try:
        scan = scan_servers()
        if not scan.live:
            check_unverified(scan.unverified)
        if scan.live:
            state = scan.live[0]
        else:
            state, python = start_server(python, warnings)
    finally:
        os.close(fd)
    return {"server": public(state), "reused": bool(scan.live), "kernel_python": python,
            "stale": stale_report(), "warnings": stale_warnings() + warnings}


def action_prepare() -> dict[str, Any]:
    """The environment and kernelspec only, no server: a batch job starts it (Slurm)."""
    seed.ensure_root()
    if params().get("installed"):
        remove_old_envs_locked()
    warnings: list[str] = []
    python, question = kernel_python(warnings)
    if question is not None:
        return {"need_consent": question}
    write_kernelspec(python)
    return {"prepared": True, "env": seed.ENV, "root": seed.ROOT, "kernel_python": python,
            "warnings": warnings}


def describe(state: Record) -> dict[str, Any]:
    from tether.remote.kernel_helper import ApiError, request  # (status only: ~40 ms)

    info = public(state)
    info.pop("token")
    try:
        info["status"] = request(state, "GET", "api/status")
        info["kernels"] = request(state, "GET", "api/kernels")
        info["resources"] = request(state, "GET", "api/colab/resources")
    except ApiError as e:
        info["error"] = str(e)
    return info


def action_status() -> dict[str, Any]:
    scan = scan_servers()
    return {"servers": [describe(s) for s in scan.live], "stale": stale_report(),
            "unverified": [{k: e[k] for k in ("file", "pid", "why")} for e in scan.unverified],
            "env_ready": seed.read_marker() is not None, "root": seed.ROOT,
            "disk_bytes": seed.disk_bytes(seed.ROOT), "envs": seed.env_dirs_names(),
            "installed": seed.installed()}


def _name(pid: int) -> str:
    try:
        return str(psutil.Process(pid).name())
    except psutil.Error:
        return "?"


def _end(procs: list[psutil.Process], grace: float, what: str
         ) -> tuple[list[int], list[dict[str, Any]]]:
    """End ``procs`` (sweep.terminate); (pids that needed SIGKILL, reports of the survivors)."""
    result = sweep.terminate(procs, grace)
    ended = set(result.terminated) | set(result.killed)
    left = [{"pid": p.pid, "name": _name(p.pid), "what": what,
             "why": "still running after SIGKILL"} for p in result.survivors]
    seen = ended | {p.pid for p in result.survivors}
    left += [{"pid": p.pid, "name": _name(p.pid), "what": what,  # AccessDenied on SIGTERM
              "why": "not permitted to signal it"}
             for p in procs if p.pid not in seen and sweep.alive(p)]
    return result.killed + [p.pid for p in result.survivors], left


def action_down() -> dict[str, Any]:
    """End exactly this user's tether servers and every process that carries their markers.

    A process is ours by what tether recorded: the server's pid and start (state file), the
    launch id put in its environment (launch record), the instance id the server sets in its
    kernels' environment. Never by its command line. A child started with an emptied
    environment (``env -i``) carries no marker and cannot be found this way.
    """
    scan = scan_servers()
    launches = read_launches()
    kept = adopt.read_all(seed.RUNTIME)  # kernels that outlived a server: theirs too
    ids = set(launches) | {str(e["instance"]) for e in _stale if e.get("instance")}
    ids |= {str(s["instance"]) for s in scan.live if s.get("instance")}
    ids |= {k.instance for k in kept if k.instance}
    servers_ = sweep.processes([s["pid"] for s in scan.live])
    forced, left = _end(servers_, STOP_DEADLINE, "tether server")
    for state in scan.live:  # a server that had to be killed leaves its state file
        seed.remove_quietly(state["_file"])
    guard = sweep.Guard.here()
    guard = sweep.Guard(guard.uid, guard.protected | {e["pid"] for e in left})
    strays = sweep.carrying({LAUNCH_ENV: ids, INSTANCE_ENV: ids}, guard)
    stray_forced, stray_left = _end(strays, STRAY_DEADLINE, "process of a tether server")
    left += stray_left
    end_kept(kept)
    still_marked = {v for e in left for v in marks(e["pid"]).values()}
    left += [{"pid": e["pid"], "name": _name(e["pid"]), "what": "unverified server",
              "why": e["why"]} for e in scan.unverified]
    for launch in launches:
        if launch not in still_marked:
            forget_launch(launch)
    seed.remove_quietly(seed.at("token_file"))
    if not any(e["state"].get("sock") == seed.at("socket") for e in scan.unverified):
        seed.remove_quietly(seed.at("socket"))
    result: dict[str, Any] = {
        "stopped": [p.pid for p in servers_], "strays": [p.pid for p in strays],
        "forced": forced + stray_forced, "stale": stale_report(), "left": left}
    if params().get("purge") and not left:
        result["purged"] = seed.purge()
    elif os.path.isdir(seed.ROOT):
        result["removed_envs"] = remove_old_envs_locked()
    return result


def end_kept(kept: list[adopt.KeptKernel]) -> None:
    """What is left in the kernels' own cgroups (a child that shed every marker), then their
    files: no later server adopts a kernel `down` ended."""
    for kernel in kept:
        if kernel.cgroup:
            cgroups.empty(kernel.cgroup, sweep.KILL_WAIT)
            cgroups.remove(kernel.cgroup)
        adopt.remove(seed.RUNTIME, kernel.kernel_id)


# -- restart: a new server that adopts the running one's kernels -------------------------------------

RESTART_KEYS = ("notebook_dir", "idle_timeout", "serve_args", "origins", "remote_port")


def restart_params(record: Record | None) -> None:
    """The options the running server was launched with, where this restart gives none."""
    p = params()
    options = (record or {}).get("options") or {}
    for key in RESTART_KEYS:
        if not given(key, p.get(key)) and given(key, options.get(key)):
            p[key] = options[key]
    used = (record or {}).get("kernel_python_used") or options.get("kernel_python")
    # (tether's own environment is chosen anew: the old one goes with its version)
    if not p.get("kernel_python") and not p.get("conda_env") and used \
            and not os.path.realpath(used).startswith(os.path.realpath(seed.ROOT) + os.sep):
        p["kernel_python"] = used


def stop_for_restart(live: list[Record]) -> list[int]:
    """SIGTERM: the servers end, their kernels stay for the new one (SIGKILL after the
    deadline: the kernels stay then too); their state files go."""
    procs = sweep.processes([s["pid"] for s in live])
    _, left = _end(procs, STOP_DEADLINE, "tether server")
    if left:
        raise Fail("restart", f"the running server (pid {left[0]['pid']}) could not be stopped: "
                   f"{left[0]['why']}", hint="Stop it by hand (`ssh HOST kill PID`), then run "
                   "`tether restart HOST` again.")
    for state in live:
        seed.remove_quietly(state["_file"])
    return [p.pid for p in procs]


def action_restart() -> dict[str, Any]:
    """A new server for the runtime (new options, or this tether's version) that adopts the
    kernels of the one running: same token and socket (an attached `up` keeps its URL)."""
    seed.ensure_root()
    if params().get("installed"):
        remove_old_envs_locked()
    fd = seed.lock_root()  # a supervising `up` that lost its server waits for the new one
    try:
        scan = scan_servers()
        if not scan.live:
            check_unverified(scan.unverified)
        old = scan.live[0] if scan.live else None
        restart_params(read_launches().get(marks(old["pid"]).get(LAUNCH_ENV) or "")
                       if old else None)
        warnings: list[str] = []
        python, question = chosen_kernel_python(warnings)
        if question is not None:
            return {"need_consent": question, "stale": stale_report()}
        before = [k.kernel_id for k in adopt.read_all(seed.RUNTIME)]
        stopped = stop_for_restart(scan.live)
        state, python = start_server(python, warnings)
    finally:
        os.close(fd)
    return {"server": public(state), "reused": False, "kernel_python": python,
            "restarted": stopped, "old_version": old.get("version") if old else None,
            "kernels_before": before, "stale": stale_report(),
            "warnings": stale_warnings() + warnings}


ACTIONS = {"up": action_up, "prepare": action_prepare, "status": action_status,
           "down": action_down, "restart": action_restart}


def main(argv: list[str]) -> int:
    """``python -m tether.host ACTION PARAMS_JSON``: one action; its exit status."""
    action, raw = argv
    seed.configure(json.loads(raw))
    _stale.clear()
    try:
        try:
            seed.emit("result", **ACTIONS[action]())
        except OSError as e:  # a file system can still turn read-only while we run
            root = seed.ROOT
            inside = str(e.filename or "").startswith(root + os.sep) or e.filename == root
            raise (seed.cache_error(e) if inside else None) or e
    except Fail as e:
        seed.emit("error", kind=e.kind, message=e.message, hint=e.hint, **e.data)
        return seed.FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
