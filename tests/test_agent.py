"""The remote side: the seed (tether._seed) and the host module (tether.host). What `down`
ends (and never ends), stale state files, the launch record, options that differ from the
running server's, and the remote's messages.

The first part runs their functions here, on real processes, with a private layout; the
second runs ``tether up``/``down`` against the real sshd test bed as the non-root remote user.
"""

from __future__ import annotations

import json
import os
import select
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tether import _seed, bootstrap, contract, host
from tether.remote import state as states

Start = Callable[..., subprocess.Popen]


@pytest.fixture
def seed(tmp_path: Path) -> Iterator[Any]:
    """The seed module (and so tether.host), configured for a private root under ``tmp_path``."""
    params = {"version": "9.9.9", **contract.seed_params()}
    _seed.configure(params, environ={"XDG_CACHE_HOME": str(tmp_path), "HOME": str(tmp_path)})
    os.makedirs(_seed.RUNTIME)
    host._stale.clear()
    yield _seed
    host._stale.clear()


def wait_started(p: subprocess.Popen) -> psutil.Process:
    """A child is ours to inspect once it has exec'ed (its environ is the new program's)."""
    proc = psutil.Process(p.pid)
    deadline = time.monotonic() + 10
    while proc.cmdline()[:1] != [p.args[0]] and time.monotonic() < deadline:  # type: ignore[index]
        time.sleep(0.01)
    return proc


def write_state(seed: Any, pid: int, **extra: Any) -> Path:
    path = Path(seed.RUNTIME) / f"tether-{pid}.json"
    path.write_text(json.dumps({"pid": pid, "token": "t" * 48, "started": time.time(), **extra}))
    path.chmod(0o600)
    return path


def write_launch(seed: Any, launch: str, **options: Any) -> None:
    record = {"launch": launch, "started": time.time(), "kernel_python_used": "/usr/bin/python3",
              "options": options}
    Path(host.launch_path(launch)).write_text(json.dumps(record))


def judge(data: dict[str, Any], launches: dict[str, Any] | None = None) -> tuple[str, str]:
    return states.judge(data, launches or {})


# -- identity ----------------------------------------------------------------------------------

def test_a_state_file_is_trusted_by_pid_and_start_time(seed: Any, procs: Start) -> None:
    child = procs("sleep", "30")
    created = psutil.Process(child.pid).create_time()
    assert judge({"pid": child.pid, "create_time": created})[0] == states.LIVE
    verdict, why = judge({"pid": child.pid, "create_time": created - 1000})
    assert verdict == states.STALE and f"pid {child.pid} is now another process" in why
    # the instance id of a server carries its start time too (1/100 s)
    instance = f"{child.pid}.{int(created * 100)}.abcd1234"
    assert judge({"pid": child.pid, "instance": instance})[0] == states.LIVE
    old = f"{child.pid}.{int((created - 50) * 100)}.abcd1234"
    assert judge({"pid": child.pid, "instance": old})[0] == states.STALE
    # no start time and no launch marker: neither trusted nor thrown away
    assert judge({"pid": child.pid})[0] == states.UNVERIFIED
    child.kill()
    child.wait(10)
    verdict, why = judge({"pid": child.pid, "create_time": created})
    assert verdict == states.STALE and "is gone" in why


def test_a_state_file_is_trusted_by_start_since_boot_whatever_the_wall_clock_did(
        seed: Any, procs: Start) -> None:
    from tether import identity

    child = procs("sleep", "30")
    state = {"pid": child.pid, "boot_start": identity.started(psutil.Process(child.pid)),
             "boot_id": identity.boot_id(), "create_time": 1.0}  # create time: far off (NTP)
    assert judge(state)[0] == states.LIVE
    verdict, why = judge({**state, "boot_start": state["boot_start"] - 0.01})
    assert verdict == states.STALE and f"pid {child.pid} is now another process" in why
    verdict, why = judge({**state, "boot_id": "another-boot"})
    assert verdict == states.STALE and "rebooted" in why


def test_a_state_file_without_start_time_is_trusted_by_our_launch_marker(
        seed: Any, procs: Start) -> None:
    marked = wait_started(procs("sleep", "30", env={"TETHER_LAUNCH": "feedf00d"}))
    assert judge({"pid": marked.pid}, {"feedf00d": {}})[0] == states.LIVE
    assert judge({"pid": marked.pid}, {"0ther": {}})[0] == states.UNVERIFIED


def test_the_kernels_python_is_looked_up_beside_the_server_and_bounded(
        seed: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --kernel-python/--conda-env/--install-kernel-deps the lookup runs while the
    server starts: what it finds (and its note) comes back; one that hangs (a login shell
    waiting on something) costs at most PROBE_TIMEOUT, then tether's own Python, said."""
    seed.PARAMS.update(kernel_python=None, conda_env=None, install_kernel_deps=None)
    assert host.looked_up()
    seed.PARAMS["install_kernel_deps"] = True
    assert not host.looked_up()  # installing into the user's Python is asked first
    seed.PARAMS["install_kernel_deps"] = None
    notes: list[str] = []
    alone: list[str] = []
    assert host.kernel_python_beside(notes) == host.kernel_python(alone)[0] != ""
    assert notes == alone  # the same answer and the same note as a lookup before the start
    release = __import__("threading").Event()
    monkeypatch.setattr(host, "kernel_python", lambda w: (release.wait(30), ("/x", None))[1])
    monkeypatch.setattr(host, "PROBE_TIMEOUT", 0.2)
    notes = []
    t0 = time.monotonic()
    try:
        assert host.kernel_python_beside(notes) == seed.env_python()
    finally:
        release.set()
    assert time.monotonic() - t0 < 5
    assert notes == ["kernels run in tether's own environment: finding the login shell's "
                     "python3 took more than 0.2 s"]


def test_a_server_tether_launched_is_pinned_by_its_start_since_boot_and_boot_id(
        seed: Any, procs: Start) -> None:
    """Immune to a stepped wall clock: the start since boot does not move."""
    launch = "c" * 32
    write_launch(seed, launch)
    server = wait_started(procs("sleep", "30", env={"TETHER_LAUNCH": launch}))
    host.pin_launch(launch, server.pid, "/usr/bin/python3")
    launches = host.read_launches()
    assert launches[launch]["server"]["boot_id"] == states.identity.boot_id() != ""
    skewed = {"pid": server.pid, "create_time": server.create_time() + 3600}
    assert judge(skewed, launches)[0] == states.LIVE
    launches[launch]["server"]["boot_start"] -= 0.01  # the pid is another process now
    assert judge({"pid": server.pid}, launches)[0] == states.STALE
    launches[launch]["server"]["boot_start"] += 0.01
    launches[launch]["server"]["boot_id"] = "an-earlier-boot"
    assert judge({"pid": server.pid}, launches)[0] == states.STALE


def test_scan_removes_and_reports_stale_files_only(seed: Any, procs: Start) -> None:
    reused = procs("sleep", "30")
    live = procs("sleep", "30")
    unverified = procs("sleep", "30")
    stale = write_state(seed, reused.pid,
                        create_time=psutil.Process(reused.pid).create_time() - 3600)
    good = write_state(seed, live.pid, create_time=psutil.Process(live.pid).create_time())
    unknown = write_state(seed, unverified.pid)
    scan = host.scan_servers()
    assert [s["pid"] for s in scan.live] == [live.pid]
    assert [e["pid"] for e in scan.unverified] == [unverified.pid]
    assert [e["pid"] for e in host.stale_report()] == [reused.pid]
    assert not stale.exists() and good.exists() and unknown.exists()
    assert reused.poll() is None  # judged, never signalled


# -- the root: ours, private, writable; room for an environment -----------------------------------

def test_a_root_left_open_is_made_private_and_one_not_ours_is_refused(seed: Any) -> None:
    for path in (seed.ROOT, seed.RUNTIME):
        os.chmod(path, 0o755)  # as something else (an admin's script, a tar) may leave them
    seed.ensure_root()
    assert [stat.S_IMODE(os.stat(p).st_mode) for p in (seed.ROOT, seed.RUNTIME)] == [0o700] * 2
    os.chown(seed.RUNTIME, 65534, 65534)
    with pytest.raises(seed.Fail) as e:
        seed.ensure_root()
    assert e.value.kind == "cache-owner"
    assert e.value.message.startswith(f"{seed.RUNTIME} on HOST belongs to uid 65534, not to ")
    assert "TETHER_REMOTE_CACHE=" in e.value.hint


def test_a_folder_elsewhere_is_offered_tmpdir_first(seed: Any, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    assert seed.writable_elsewhere() == f"{tmpdir}/tether-u{os.getuid()}"
    monkeypatch.delenv("TMPDIR")
    assert seed.writable_elsewhere() == f"/tmp/tether-u{os.getuid()}"
    assert seed.writable_elsewhere(need=1 << 60) == ""  # no folder has an exbibyte free


def test_too_little_disk_is_said_before_anything_is_sent(seed: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    free = seed.free_bytes(seed.ROOT)
    monkeypatch.setitem(seed.NEED_BYTES, "offline", free + (1 << 40))
    seed.PARAMS.update(action="up", requires_python="3.6", wheel_sha256="0" * 64, offline=True)
    with pytest.raises(seed.Fail) as e:
        seed.run("up")  # the first call: no wheel on stdin yet, so nothing was sent
    assert e.value.kind == "disk"
    need = (free + (1 << 40)) >> 20
    assert e.value.message.startswith(f"{seed.ROOT} on HOST has ")  # (free: it moves)
    assert e.value.message.endswith(f" MiB free; a fresh environment needs about {need} MiB there")
    monkeypatch.setitem(seed.NEED_BYTES, "offline", free // 2)
    assert seed.run("up")["need_wheel"] is True


def test_status_and_down_need_this_builds_environment_only_where_something_may_run(
        seed: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(seed.NEED_BYTES, "offline", 0)
    seed.PARAMS.update(requires_python="3.11", wheel_sha256="0" * 64, offline=True, purge=True)
    status = seed.run("status")  # nothing recorded: answered by the seed alone
    assert status["servers"] == [] and status["env_ready"] is False
    down = seed.run("down")
    assert down["stopped"] == down["strays"] == down["left"] == [] and "purged" in down
    assert not os.path.exists(seed.ROOT)  # --purge: the whole folder
    os.makedirs(seed.RUNTIME)
    write_state(seed, os.getpid())  # a state file: judged and ended by this tether's own code
    for action in ("status", "down"):
        assert seed.run(action)["need_wheel"] is True


# -- down --------------------------------------------------------------------------------------

def test_down_ends_exactly_what_tether_recorded(seed: Any, procs: Start,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "STRAY_DEADLINE", 2.0)
    env_dir = Path(seed.ENV) / "lib"
    env_dir.mkdir(parents=True)
    (env_dir / "sweep.py").write_text("x = 1\n")
    launch = "0123456789abcdef0123456789abcdef"
    write_launch(seed, launch)
    # a server of ours (launched with the marker, its state file with its start time)
    server = procs(sys.executable, "-c", "import time; time.sleep(60)",
                   env={"TETHER_LAUNCH": launch})
    write_state(seed, server.pid, create_time=psutil.Process(server.pid).create_time())
    # an orphan of a crashed server: its state file is stale, its instance is on the orphan
    dead = procs("true")
    dead.wait(10)
    instance = f"{dead.pid}.12345.deadbeef"
    write_state(seed, dead.pid, instance=instance, create_time=1.0)
    orphan = wait_started(procs("sleep", "60", env={"TETHER_SERVER_INSTANCE": instance},
                                start_new_session=True))
    # a kernel's child that ignores SIGTERM
    stubborn = procs(sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                     "signal.SIG_IGN); print('ready', flush=True); time.sleep(60)",
                     env={"TETHER_LAUNCH": launch}, stdout=subprocess.PIPE, text=True)
    assert select.select([stubborn.stdout], [], [], 10)[0] and stubborn.stdout.readline()
    # not ours: names tether's directories; another reuses a dead server's pid
    tail = procs("tail", "-f", str(env_dir / "sweep.py"), stdout=subprocess.DEVNULL)
    reused = procs("sleep", "60")
    write_state(seed, reused.pid, instance=f"{reused.pid}.1.cafe",
                create_time=psutil.Process(reused.pid).create_time() - 7200)
    Path(seed.at("token_file")).write_text("a" * 48)

    result = host.action_down()

    assert result["stopped"] == [server.pid]
    assert sorted(result["strays"]) == sorted([orphan.pid, stubborn.pid])
    assert stubborn.pid in result["forced"] and result["left"] == []
    assert sorted(e["pid"] for e in result["stale"]) == sorted([dead.pid, reused.pid])
    assert server.wait(5) == -signal.SIGTERM and stubborn.wait(5) == -signal.SIGKILL
    assert not orphan.is_running() or orphan.status() == psutil.STATUS_ZOMBIE
    assert tail.poll() is None and reused.poll() is None
    assert list(Path(seed.RUNTIME).iterdir()) == []  # state files, launch record
    assert not Path(seed.at("token_file")).exists()


def test_down_reports_what_it_could_not_end(seed: Any, procs: Start) -> None:
    unverified = procs("sleep", "30")
    write_state(seed, unverified.pid)  # an older server: no start time, no marker
    result = host.action_down()
    assert result["stopped"] == [] and unverified.poll() is None
    assert result["left"] == [{"pid": unverified.pid, "name": "sleep", "what": "unverified server",
                               "why": judge({"pid": unverified.pid})[1]}]


# -- options of a reused server ----------------------------------------------------------------

def test_options_that_differ_from_the_running_servers(seed: Any) -> None:
    running = {"kernel_python_used": "/usr/bin/python3",
               "options": {"notebook_dir": "/srv/nb", "idle_timeout": 3600,
                           "serve_args": ["--stop-after-idle", "20", "--reap"], "origins": [],
                           "kernel_python": None, "conda_env": None, "remote_port": None}}
    same = dict(running["options"])
    assert host.differing_options(same, running) == []
    # options left at their defaults ask for nothing
    assert host.differing_options({"idle_timeout": 3600, "serve_args": []}, running) == []
    asked = dict(same, notebook_dir="/srv/other", idle_timeout=60, kernel_python="/usr/bin/python3",
                 serve_args=["--stop-after-idle=30", "--on-idle", "poweroff", "--reap"])
    assert host.differing_options(asked, running) == [
        "--notebook-dir", "--idle-timeout", "--on-idle", "--stop-after-idle"]


def test_reuse_warning_names_the_options_and_the_way_to_apply_them(seed: Any,
                                                                   procs: Start) -> None:
    launch = "abcdef0123456789abcdef0123456789"
    write_launch(seed, launch, notebook_dir="/srv/nb", idle_timeout=3600, serve_args=[])
    server = wait_started(procs("sleep", "30", env={"TETHER_LAUNCH": launch}))
    seed.PARAMS.update(notebook_dir="/srv/other", serve_args=["--stop-after-idle", "20"])
    try:
        [warning] = host.option_warnings({"pid": server.pid})
    finally:
        seed.PARAMS.pop("notebook_dir")
        seed.PARAMS.pop("serve_args")
    assert "--notebook-dir, --stop-after-idle" in warning
    assert "`tether restart HOST` with them" in warning
    assert host.option_warnings({"pid": server.pid}) == []


# -- messages ----------------------------------------------------------------------------------

def test_kernel_python_is_checked_before_pip_is_suggested(seed: Any) -> None:
    seed.PARAMS["kernel_python"] = "/bin/false"
    try:
        with pytest.raises(seed.Fail) as e:
            host.kernel_python([])
        assert e.value.message == "/bin/false is not a working Python on HOST (`/bin/false -c` " \
                                  "did not run)"
        assert "-m pip" not in e.value.hint
        seed.PARAMS["kernel_python"] = "/nope/python"
        with pytest.raises(seed.Fail) as e:
            host.kernel_python([])
        assert e.value.message == "/nope/python is not an executable on HOST"
    finally:
        seed.PARAMS.pop("kernel_python")


def test_a_python_without_ipykernel_asks_for_consent_not_an_error(seed: Any,
                                                                  tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")],
                   check=True, timeout=120)
    python = str(tmp_path / "bare" / "bin" / "python")
    seed.PARAMS["kernel_python"] = python
    try:
        assert host.kernel_python([]) == (python, {"python": python,
                                                    "missing": ["ipykernel", "psutil"]})
    finally:
        seed.PARAMS.pop("kernel_python")


def test_remote_errors_read_as_sentences_with_the_real_host() -> None:
    from tether import _ssh
    from tether.errors import ConfigError, RemoteEnvironmentError, SSHError

    target = _ssh.SSHTarget("gpubox")
    e = bootstrap._remote_error(target, {"kind": "kernel-python", "message":
                                        "/bin/false is not a working Python on HOST",
                                        "hint": "Check with `ssh HOST /bin/false -V`."})
    assert isinstance(e, ConfigError) and e.exit_code == 2
    assert str(e) == ("/bin/false is not a working Python on gpubox. "
                      "Check with `ssh gpubox /bin/false -V`.")
    e = bootstrap._no_python("gpubox", "/nope")
    assert isinstance(e, RemoteEnvironmentError)
    assert e.message == "--remote-python /nope is not an executable on gpubox."
    assert bootstrap._no_python("gpubox", "python3").message == \
        "gpubox has no python3 on its PATH."
    e = bootstrap._no_answer(target, "preparing gpubox", "/bin/false", 1, b"")
    assert type(e) is SSHError and "agent" not in str(e) and "tether remote" not in str(e)
    assert str(e).startswith("preparing gpubox failed: the remote ended with exit status 1")


def test_the_remote_layout_is_defined_once() -> None:
    layout = bootstrap.REMOTE_LAYOUT
    assert layout.root_expr() == '"${XDG_CACHE_HOME:-$HOME/.cache}/tether"'
    assert layout.root_expr() in bootstrap.remote_tether_argv("ps")[2]
    home = Path("/home/u")
    assert layout.root({}, home=home) == home / ".cache" / "tether"
    assert layout.root({"XDG_CACHE_HOME": "/scratch/c"}) == Path("/scratch/c/tether")
    params = {"version": "1.2.3", **contract.seed_params()}
    _seed.configure(params, environ={"HOME": "/home/u"})
    assert (_seed.ROOT, _seed.ENV, _seed.RUNTIME, _seed.at("token_file")) == (
        "/home/u/.cache/tether", "/home/u/.cache/tether/env-1.2.3",
        "/home/u/.cache/tether/runtime", "/home/u/.cache/tether/token")
    assert _seed.at("socket") == "/home/u/.cache/tether/runtime/tether.sock"
    assert str(layout.path("socket", {"HOME": "/home/u"})).endswith("/tether/runtime/tether.sock")
    # the names both ends agree on are defined once, in the contract
    from tether.remote import kernel_helper, sweep

    assert sweep.INSTANCE_ENV == contract.INSTANCE_ENV and sweep.MARKER_ENV == \
        contract.KERNEL_MARKER_ENV
    # kernel_helper also runs in kernels without tether (stdlib only): the same values
    assert (kernel_helper.KERNEL_ID_ENV, kernel_helper.STATE_ENV) == (contract.KERNEL_ID_ENV,
                                                                      contract.STATE_ENV)


def test_a_consent_question_is_a_value_the_caller_answers() -> None:
    question = bootstrap.ConsentNeeded("gpubox", "/opt/ds/bin/python", ("ipykernel", "psutil"))
    assert question.question == ("/opt/ds/bin/python on gpubox has no ipykernel or psutil. "
                                 "Install ipykernel and psutil there?")
    assert "--install-kernel-deps" in question.hint and "gpubox" in question.hint


# -- against the real sshd test bed, as the non-root remote user -------------------------------

ssh_tests = pytest.mark.timeout(600)


def as_remote_user(testbed: Any, *argv: str) -> subprocess.Popen:
    """A process of the remote user that is not tether's (started here, not over SSH)."""
    user = testbed.user
    return subprocess.Popen(list(argv), user=user.pw_uid, group=user.pw_gid, extra_groups=[],
                            cwd=user.pw_dir, env={"HOME": user.pw_dir, "PATH": "/usr/bin:/bin"},
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def down_json(testbed: Any) -> dict[str, Any]:
    from tests.fixtures_ssh import run_tether

    r = run_tether(testbed, "down", "gpubox", "--json")
    assert r.returncode == 0, r.stderr
    result: dict[str, Any] = json.loads(r.stdout)
    return result


def started_server(testbed: Any, *args: str) -> dict[str, Any]:
    from tests.fixtures_ssh import start_up
    from tests.sshd import free_port

    up = start_up(testbed, "gpubox", "--port", str(free_port()), *args)
    up.stop()
    assert up.info, up.stderr()
    return up.info


def stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)


@ssh_tests
async def test_down_ends_a_crashed_servers_orphans_and_spares_a_tail_of_its_files(
        prepared: Any, testbed: Any) -> None:
    from tests.fixtures_ssh import start_up
    from tests.sshd import free_port
    from tether.replay import ColabClient

    down_json(testbed)
    up = start_up(testbed, "gpubox", "--port", str(free_port()))
    try:
        assert up.info, up.stderr()
        async with ColabClient(up.url, up.token) as c:
            kernel = (await c.create_session("orphan.ipynb"))["kernel"]["id"]
            started = await c.execute(kernel, "import subprocess\nsubprocess.Popen(['sleep', "
                                              "'1001'], start_new_session=True).pid")
    finally:
        up.stop()
    orphan = psutil.Process(int(started.result))
    watched = next((testbed.tether_root / "env-0.1.0").rglob("sweep.py"))
    tail = as_remote_user(testbed, "tail", "-f", str(watched))
    try:
        server = psutil.Process(up.info["remote_pid"])
        server.kill()  # a crash: its kernel's child lives on, with the server's markers
        server.wait(10)
        assert orphan.is_running()
        result = down_json(testbed)
        assert orphan.pid in result["strays"] and result["left"] == []
        assert [e["pid"] for e in result["stale"]] == [server.pid]
        assert not orphan.is_running() or orphan.status() == psutil.STATUS_ZOMBIE
        assert tail.poll() is None, "down ended a process that only names a tether path"
        assert not list((testbed.tether_root / "runtime").glob("launch-*.json"))
    finally:
        stop(tail)


@ssh_tests
def test_a_reused_pid_is_never_signalled_and_up_starts_a_fresh_server(
        prepared: Any, testbed: Any) -> None:
    import shutil

    down_json(testbed)
    info = started_server(testbed)
    runtime = testbed.tether_root / "runtime"
    server = psutil.Process(info["remote_pid"])
    state = json.loads((runtime / f"tether-{server.pid}.json").read_text())
    state.setdefault("create_time", server.create_time())  # (until every server records it)
    server.kill()
    server.wait(10)
    impostor = as_remote_user(testbed, "sleep", "600")

    def reuse_pid() -> Path:
        """What a reboot or a long uptime does: the dead server's pid is now another process."""
        (runtime / f"tether-{server.pid}.json").unlink(missing_ok=True)
        path = runtime / f"tether-{impostor.pid}.json"
        path.write_text(json.dumps({**state, "pid": impostor.pid}))
        path.chmod(0o600)
        shutil.chown(path, testbed.user.pw_uid, testbed.user.pw_gid)
        return path

    try:
        stale = reuse_pid()
        result = down_json(testbed)
        assert result["stopped"] == [] and impostor.pid not in result["strays"]
        assert [e["pid"] for e in result["stale"]] == [impostor.pid]
        assert "is now another process (sleep" in result["stale"][0]["why"]
        assert not stale.exists() and impostor.poll() is None

        reuse_pid()
        fresh = started_server(testbed)
        assert fresh["reused"] is False and fresh["remote_pid"] != impostor.pid
        assert any("stopped without cleaning up" in w for w in fresh["warnings"])
        assert impostor.poll() is None
    finally:
        stop(impostor)
        down_json(testbed)


@ssh_tests
def test_reusing_a_server_with_other_options_warns_once(prepared: Any, testbed: Any) -> None:
    down_json(testbed)
    first = started_server(testbed, "--stop-after-idle", "7200")
    try:
        again = started_server(testbed, "--stop-after-idle", "600",
                               "--notebook-dir", str(testbed.home))
        assert again["reused"] is True and again["remote_pid"] == first["remote_pid"]
        [warning] = again["warnings"]
        assert "--notebook-dir, --stop-after-idle" in warning
        assert "`tether restart gpubox` with them" in warning
        assert started_server(testbed, "--stop-after-idle", "7200")["warnings"] == []
        assert started_server(testbed)["warnings"] == []  # asking for nothing differs from nothing
    finally:
        down_json(testbed)


@ssh_tests
def test_messages_for_a_remote_or_kernel_python_that_is_not_one(prepared: Any,
                                                                testbed: Any) -> None:
    from tests.fixtures_ssh import run_tether
    from tests.sshd import free_port

    down_json(testbed)
    r = run_tether(testbed, "up", "gpubox", "--port", str(free_port()), "--remote-python", "/nope")
    assert r.returncode == 1
    assert "--remote-python /nope is not an executable on gpubox." in r.stderr
    assert "no python3" not in r.stderr
    r = run_tether(testbed, "up", "gpubox", "--port", str(free_port()),
                   "--kernel-python", "/bin/false")
    assert r.returncode == 2, r.stderr
    assert "/bin/false is not a working Python on gpubox" in r.stderr
    assert "-m pip" not in r.stderr and "HOST" not in r.stderr
    assert not list((testbed.tether_root / "runtime").glob("tether-*.json"))


OLD_PYTHONS = sorted(Path("/root/.pyenv/versions").glob("3.[7-9].*/bin/python3")) + sorted(
    Path("/root/.pyenv/versions").glob("3.10.*/bin/python3"))


@pytest.mark.skipif(not OLD_PYTHONS, reason="no Python 3.7-3.10 on this machine")
@pytest.mark.parametrize("python", OLD_PYTHONS, ids=lambda p: p.parent.parent.name)
def test_the_seed_on_an_old_python_says_so_in_one_message(tmp_path: Path, python: Path) -> None:
    """The seed needs Python >= 3.11 but still parses and answers on Python >= 3.7: one JSON
    error the laptop shows (not a traceback)."""
    params = bootstrap._params("up", bootstrap.RemoteOptions(), bootstrap.build_wheel())
    out = subprocess.run([str(python), "-I", "-c", bootstrap.seed_source(), json.dumps(params)],
                         capture_output=True, text=True, timeout=60,
                         env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode == contract.FAILED, out.stderr
    error = json.loads(out.stdout.splitlines()[-1])
    version = python.parent.parent.name.rsplit(".", 1)[0]
    assert error["event"] == "error" and error["kind"] == "python"
    assert error["message"] == f"{python} is Python {version}; tether needs Python >= 3.11"
    assert not (tmp_path / ".cache").exists()


def test_an_unverified_server_on_our_socket_is_named_not_ended(seed: Any, procs: Start) -> None:
    older = procs("sleep", "30")
    write_state(seed, older.pid, sock=seed.at("socket"))  # an older tether's: no start time
    unverified = host.scan_servers().unverified
    with pytest.raises(seed.Fail) as e:
        host.check_unverified(unverified)
    assert f"pid {older.pid} serves tether's socket" in e.value.message
    assert f"`ssh HOST kill {older.pid}`" in e.value.hint and older.poll() is None


PYTHON2 = Path("/root/.pyenv/versions/2.7.18/bin/python")


@pytest.mark.skipif(not PYTHON2.exists(), reason="no Python 2.7 on this machine")
def test_a_kernel_python_too_old_for_ipykernel(seed: Any) -> None:
    seed.PARAMS["kernel_python"] = str(PYTHON2)
    try:
        with pytest.raises(seed.Fail) as e:
            host.kernel_python([])
    finally:
        seed.PARAMS.pop("kernel_python")
    assert e.value.message == f"{PYTHON2} is Python 2.7; kernels need Python >= 3.8"


def test_launch_records_are_kept_while_a_process_carries_them(seed: Any, procs: Start) -> None:
    alive, dead = "a" * 32, "b" * 32
    write_launch(seed, alive)
    write_launch(seed, dead)
    wait_started(procs("sleep", "30", env={"TETHER_LAUNCH": alive}))
    host.prune_launches()
    assert sorted(host.read_launches()) == [alive]


@ssh_tests
async def test_consent_is_asked_through_a_callback_then_acted_on(prepared: Any,
                                                                  testbed: Any) -> None:
    from tether import _ssh
    from tether.errors import ConfigError

    down_json(testbed)
    ds = f"{testbed.home}/consent-env"
    subprocess.run([*testbed.ssh_argv(), "python3", "-m", "venv", "--clear", ds], check=True,
                   timeout=120)
    target = _ssh.SSHTarget("gpubox", str(testbed.config))
    opts = bootstrap.RemoteOptions(kernel_python=f"{ds}/bin/python", remote_port=0)
    asked: list[bootstrap.ConsentNeeded] = []

    def answer(yes: bool) -> bootstrap.Consent:
        async def consent(question: bootstrap.ConsentNeeded) -> bool:
            asked.append(question)
            return yes
        return consent

    with pytest.raises(ConfigError) as e:
        await bootstrap.up(target, opts, consent=answer(False))
    assert "--install-kernel-deps" in e.value.hint and "kind" not in e.value.data
    assert asked == [bootstrap.ConsentNeeded("gpubox", f"{ds}/bin/python",
                                             ("ipykernel", "psutil"))]
    try:
        result = await bootstrap.up(target, opts, consent=answer(True))
        assert len(asked) == 2 and result.kernel_python == f"{ds}/bin/python"
        assert result.reused is False and result.server.pid
    finally:
        down_json(testbed)


# -- a remote whose home is read-only: said as such, with a fix that works as printed ------------

@pytest.fixture
def rohome(testbed: Any) -> Iterator[Any]:
    from tests.sshd import read_only_home

    with read_only_home(testbed) as ro:
        yield ro


def rohome_tether(ro: Any, command: str, *args: str, cache: str = "",
                  timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TETHER_REMOTE_CACHE"}
    if cache:
        env["TETHER_REMOTE_CACHE"] = cache
    return subprocess.run([sys.executable, "-m", "tether", command, *args, "-F", str(ro.config)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env,
                          timeout=timeout)


@ssh_tests
def test_a_read_only_home_is_said_with_a_fix_that_works_as_printed(rohome: Any) -> None:
    import shlex

    from tests.fixtures_ssh import UpProcess
    from tests.sshd import free_port

    r = rohome_tether(rohome, "up", "rohome", "--port", str(free_port()))
    assert r.returncode == 1, r.stderr
    [line] = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith(f"error: {rohome.tether_root} on rohome is on a read-only file "
                           "system. Run `"), line
    fix = line.split("`")[1]
    assert fix == f"TETHER_REMOTE_CACHE={rohome.elsewhere} tether up rohome -F {rohome.config}"
    assert "sending" not in r.stderr and "OSError" not in r.stderr and "-V" not in r.stderr

    # the fix as printed (plus a free port and --json for this test): a cold up in that folder
    assignment, _, *args = shlex.split(fix)
    cache = assignment.split("=", 1)[1]
    env = {**os.environ, "TETHER_REMOTE_CACHE": cache}
    proc = subprocess.Popen([sys.executable, "-m", "tether", *args, "--port", str(free_port()),
                             "--json"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    up = UpProcess(proc)
    assert proc.stdout is not None
    if select.select([proc.stdout], [], [], 600)[0]:
        up.info = json.loads(proc.stdout.readline() or "{}")
    up.stop()
    assert up.info.get("url"), up.stderr()
    root = rohome.elsewhere / "tether"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700 and root.stat().st_uid == rohome.user.pw_uid
    status = rohome_tether(rohome, "status", "rohome", "--json", cache=cache)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["root"] == str(root)
    assert len(json.loads(status.stdout)["servers"]) == 1
    down = rohome_tether(rohome, "down", "rohome", "--json", cache=cache)
    assert down.returncode == 0 and len(json.loads(down.stdout)["stopped"]) == 1, down.stderr
    assert not rohome.tether_root.exists()


@ssh_tests
def test_doctor_says_a_read_only_home_is_read_only(rohome: Any) -> None:
    r = rohome_tether(rohome, "doctor", "rohome", "--json")
    assert r.returncode == 1, r.stderr
    disk = {c["name"]: c for c in json.loads(r.stdout)}["disk"]
    assert disk["ok"] is False
    assert disk["detail"] == f"{rohome.tether_root} on rohome is on a read-only file system"
    assert disk["hint"] == (f"Run `TETHER_REMOTE_CACHE={rohome.elsewhere} tether up rohome -F "
                            f"{rohome.config}` to keep tether's files in {rohome.elsewhere} on "
                            "rohome instead.")


@ssh_tests
async def test_a_root_left_open_by_something_else_is_made_private(testbed: Any) -> None:
    from tether import _ssh

    root, runtime = testbed.tether_root, testbed.tether_root / "runtime"
    runtime.mkdir(parents=True, exist_ok=True)
    for path in (root.parent, root, runtime):
        os.chown(path, testbed.user.pw_uid, testbed.user.pw_gid)
    root.chmod(0o755)
    runtime.chmod(0o755)
    target = _ssh.SSHTarget("gpubox", str(testbed.config))
    await bootstrap.call_remote(target, bootstrap.RemoteOptions(), "prepare")
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o700


def test_uv_searches_every_index_as_pip_and_the_lock_did(seed: Any) -> None:
    """The laptop's lock is resolved over every index (pip's way); uv on the remote stops at the
    first index that has a package unless told otherwise, and a pin only a later index has
    (tornado 6.6.1 beside a mirror with 6.5.10 here) would not be found."""
    online = seed.install_argv("uv", "/uv", "/py", False, "/pins")
    at = online.index("--index-strategy")
    assert online[at + 1] == "unsafe-best-match"
    assert "--index-strategy" not in seed.install_argv("uv", "/uv", "/py", True, "/pins")
    assert "--index-strategy" not in seed.install_argv("pip", "", "/py", False, "/pins")


def test_a_complete_lock_is_installed_as_it_stands(seed: Any) -> None:
    """A lock the laptop's uv resolved for this host is the whole set: installed with
    --no-deps (not resolved a second time here, and without the uv package: the host runs the
    uv it was sent); a pip lock stays constraints over the remote's own resolution."""
    exact = seed.install_argv("uv", "/uv", "/py", False, "/pins", True)
    assert exact[exact.index("--no-deps") + 1:][:2] == ["-r", "/pins"]
    assert "--constraint" not in exact
    loose = seed.install_argv("uv", "/uv", "/py", False, "/pins")
    assert "--no-deps" not in loose and loose[loose.index("--constraint") + 1] == "/pins"


def test_the_seed_is_sent_without_its_comments() -> None:
    """The inline seed leaves its comments out (bytes under the cap) and keeps its lines."""
    import ast

    sent = bootstrap.seed_source()
    with open(_seed.__file__) as f:
        source = f.read()
    assert len(sent) < len(source) and "#" not in "".join(
        line for line in sent.splitlines() if not ('"' in line or "'" in line))
    assert len(sent.splitlines()) == len(source.splitlines())
    tree = ast.parse(source)
    assert ast.get_docstring(tree) and ast.get_docstring(ast.parse(sent)) is None
    tree.body = tree.body[1:]  # the module docstring
    assert ast.dump(ast.parse(sent)) == ast.dump(tree)


def test_uv_from_the_laptops_own_binary(seed: Any) -> None:
    """This laptop's uv, where the remote accepts its wheel's platform tag, is sent compressed
    and unpacked there to the very binary (sha256 checked); a mismatch leaves nothing."""
    import platform as host_platform
    import shutil as sh

    from tether import _wheels

    here = _wheels.Platform("Linux", host_platform.machine(), "glibc",
                            host_platform.libc_ver()[1], "%d.%d" % sys.version_info[:2])
    own = _wheels.laptop_uv(here)
    if own is None:
        pytest.skip("the uv package here is not a manylinux wheel's")
    assert _wheels.laptop_uv(_wheels.Platform("Darwin", "arm64", "", "", "3.11")) is None
    assert _wheels.laptop_uv(_wheels.Platform("Linux", "x86_64", "glibc", "2.12", "3.11")) \
        is None  # uv's manylinux_2_17 binary does not run on glibc 2.12
    spec = {"kind": "binary", "version": own.version, "file": own.file,
            "sha256": own.sha256, "binary_sha256": own.binary_sha256}
    os.makedirs(seed.at("wheels"))
    sh.copy(own.path, seed.at("wheels"))
    uv = seed.unpack_uv(spec)
    assert uv and _wheels.file_sha256(Path(uv)) == own.binary_sha256
    assert not os.path.exists(os.path.join(seed.at("wheels"), own.file))  # unpacked, removed
    assert seed.unpacked_uv() == [own.version]

    sh.copy(own.path, seed.at("wheels"))
    bad = dict(spec, version="0.0.1", binary_sha256="0" * 64)
    assert seed.unpack_uv(bad) == ""
    assert not os.listdir(os.path.join(seed.at("uv"), "0.0.1"))
    assert "does not match its sha256" in open(seed.INSTALL_LOG).read()


def test_an_online_host_fetches_uv_itself(seed: Any, tmp_path: Path) -> None:
    """Where the laptop's uv does not run on the host, a host with an index fetches the wheel
    the lock pins (its URL), checked by sha256; a wrong one is not used."""
    import hashlib
    import http.server
    import threading
    import zipfile

    served = tmp_path / "served"
    served.mkdir()
    wheel = served / "uv-0.0.2-py3-none-manylinux_2_17_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("uv-0.0.2.data/scripts/uv", "#!/bin/sh\necho uv 0.0.2\n")
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    def handler(*args: Any) -> Quiet:
        return Quiet(*args, directory=str(served))

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{wheel.name}"
        spec = {"kind": "fetch", "version": "0.0.2", "file": wheel.name, "sha256": sha,
                "url": url}
        os.makedirs(os.path.dirname(seed.INSTALL_LOG), exist_ok=True)
        assert seed.unpack_uv(dict(spec, version="0.0.3", sha256="0" * 64)) == ""
        assert not os.path.exists(os.path.join(seed.at("wheels"), wheel.name))
        uv = seed.unpack_uv(spec)
    finally:
        server.shutdown()
        server.server_close()
    assert uv == os.path.join(seed.at("uv"), "0.0.2", "uv")
    assert subprocess.run([uv, "--version"], capture_output=True, text=True).stdout \
        == "uv 0.0.2\n"
    assert os.path.exists(os.path.join(seed.at("wheels"), wheel.name))  # kept: `have` next time


def test_bytecode_of_the_first_start_is_written_last_first(tmp_path: Path) -> None:
    """While a fresh environment's server compiles its imports first to last, the host writes
    them last to first; it stops where a module is compiled already, or once the server is up."""
    import importlib.util
    import threading

    (tmp_path / "tether").mkdir()
    names = ["a.py", "pkg/b.py", "gone.py", "c.py"]
    (tmp_path / "tether" / "first-imports.txt").write_text("# order\n" + "\n".join(names))
    (tmp_path / "pkg").mkdir()
    for name in ("a.py", "pkg/b.py", "c.py"):
        (tmp_path / name).write_text(f"X = {name!r}\n")

    def cached(name: str) -> Path:
        return Path(importlib.util.cache_from_source(str(tmp_path / name)))

    done = threading.Event()
    done.set()
    host.compile_first_imports(done, str(tmp_path))
    assert not any(cached(n).exists() for n in names)  # the server was up first
    cached("c.py").parent.mkdir()
    cached("c.py").write_bytes(b"")  # the server got there first: they met
    host.compile_first_imports(threading.Event(), str(tmp_path))
    assert not cached("a.py").exists() and not cached("pkg/b.py").exists()
    cached("c.py").unlink()
    host.compile_first_imports(threading.Event(), str(tmp_path))
    assert all(cached(n).exists() for n in ("a.py", "pkg/b.py", "c.py"))


def test_the_first_imports_list_is_this_environments() -> None:
    """tether/first-imports.txt (bench/first_imports.py) names what this environment has: a
    list gone stale after a dependency change would compile little."""
    import sysconfig

    listed = [line for line in (Path(host.__file__).parent / "first-imports.txt").read_text()
              .splitlines() if line and not line.startswith("#")]
    roots = [Path(sysconfig.get_paths()["purelib"]), Path(host.__file__).parent.parent]
    found = [n for n in listed if any((root / n).exists() for root in roots)]
    assert len(listed) > 300 and len(found) >= 0.9 * len(listed)
    assert "jupyter_server/serverapp.py" in listed and "tether/remote/server.py" in listed
