"""Kernels end with everything they started, on every path (docs/kernel-gpu-lifecycle.md).

One real ``tether serve`` for the module, real ipykernel kernels running the child matrix (plain,
setsid, SIGTERM-ignoring, ``nohup &`` orphan, multiprocessing daemon and non-daemon, a setsid
holder of a temp file standing in for ``/dev/nvidia0``), with and without psutil in the kernel.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import RunningServer, start_server, stop_server
from kernel_client import Api, alive_pids, kill_pids, make_kernelspecs, matrix_code, wait_dead

FAKE_SMI = Path(__file__).parent / "fixtures" / "fake_nvidia_smi.py"
UUID0 = "GPU-5e1f9c6a-2b7d-8f4e-1a3c-9d0b7e6f5a41"
GRACE = 2.0
KERNELS = ("python3", "nopsutil")  # psutil in the kernel, and hidden from it


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("lifecycle")
    (root / "dev").mkdir()
    (root / "dev" / "nvidia0").write_bytes(b"")
    smi = root / "smi"
    smi.mkdir()
    for name in ("query-gpu", "query-gpu-uuid", "query-compute-apps"):
        (smi / f"{name}.csv").write_text((FAKE_SMI.parent / "nvidia-smi" / f"{name}.csv").read_text())
    return {"TETHER_NVIDIA_DEVICES": str(root / "dev" / "nvidia[0-9]*"),
            "TETHER_NVIDIA_SMI": str(FAKE_SMI), "FAKE_NVIDIA_SMI_DIR": str(smi),
            "ROOT": str(root), **make_kernelspecs(root)}


@pytest.fixture(scope="module")
def srv(env) -> RunningServer:
    server = start_server(Path(env["ROOT"]), "--kill-grace", str(GRACE), env=env)
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def api(srv) -> Api:
    return Api(srv.url, srv.token)


@pytest.fixture
def device(env) -> str:
    return str(Path(env["ROOT"]) / "dev" / "nvidia0")


@pytest.fixture
def cleanup():
    """Pids a test saw; whatever of them survives the test is killed (each by its pid)."""
    seen: list[int] = []
    yield seen
    kill_pids(alive_pids(seen))


async def start_matrix(api: Api, kernel: str, path: str, device: str = "") -> tuple[dict, dict]:
    """A session on ``kernel`` running the child matrix: (session model, {what: pid})."""
    session = await api.new_session(path, kernel)
    channel = await api.connect(session["kernel"]["id"])
    try:
        out = await channel.execute(matrix_code(device))
    finally:
        channel.close()
    return session, json.loads(out.strip().splitlines()[-1])


async def kernel_gone(api: Api, kernel_id: str, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if kernel_id not in {k["id"] for k in await api.call("GET", "/api/kernels")}:
            return True
        await asyncio.sleep(0.2)
    return False


async def sigkill_kernel(api, session, pids):
    os.kill(pids["kernel"], signal.SIGKILL)  # the restarter notices and restarts: a sweep
    assert await wait_dead(pids, 20) == []
    kid = session["kernel"]["id"]
    deadline = time.monotonic() + 60  # a restart is a full kernel start: slow on 2 loaded cores
    while time.monotonic() < deadline:  # deleting a restarting kernel is a 500 in jupyter_server
        listing = await api.call("GET", "/tether/api/kernels")
        kernel = next(k for k in listing["kernels"] if k["id"] == kid)
        if kernel["pid"] not in (None, pids["kernel"]):
            # the new kernel may not have said "idle" yet: running a cell proves it is up
            channel = await api.connect(kid)
            try:
                await channel.execute("pass", timeout=deadline - time.monotonic())
            finally:
                channel.close()
            return
        await asyncio.sleep(0.2)
    raise AssertionError("the kernel was not restarted")


async def exit_in_cell(api, session, pids):
    # exit() hangs the kernel (joins its multiprocessing child): tether release ends it all
    channel = await api.connect(session["kernel"]["id"])
    await channel.execute("exit()", wait=False)
    channel.close()
    outcome = await api.call("POST", f"/tether/api/kernels/{session['kernel']['id']}/release", {})
    assert outcome["released"], outcome


async def release_api(api, session, pids):
    kid = session["kernel"]["id"]
    outcome = await api.call("POST", f"/tether/api/kernels/{kid}/release", {})
    assert outcome["released"], outcome
    assert outcome["seconds"] < GRACE + 3.0  # the goal is grace + 1 s; slack for a busy CI box
    assert set(pids.values()) <= set(outcome["terminated"] + outcome["killed"])


PATHS = {
    "delete-kernel": lambda api, s, p: api.call("DELETE", f"/api/kernels/{s['kernel']['id']}"),
    "delete-session": lambda api, s, p: api.call("DELETE", f"/api/sessions/{s['id']}"),
    "restart": lambda api, s, p: api.call("POST", f"/api/kernels/{s['kernel']['id']}/restart", {}),
    "kernel-sigkill": sigkill_kernel,
    "exit-then-release": exit_in_cell,
    "release": release_api,
}


@pytest.mark.parametrize("path", list(PATHS))
async def test_every_path_leaves_nothing(api, device, cleanup, path):
    async def one(kernel: str) -> list[int]:
        session, pids = await start_matrix(api, kernel, f"{path}-{kernel}.ipynb", device)
        cleanup.extend(pids.values())
        await PATHS[path](api, session, pids)
        left = await wait_dead(pids, 15)
        if path in ("restart", "kernel-sigkill"):
            await api.call("DELETE", f"/api/sessions/{session['id']}")
        return left

    survivors = await asyncio.gather(*(one(k) for k in KERNELS))
    assert survivors == [[], []]


async def test_listing_maps_processes_gpu_and_notebook(api, srv, env, device, cleanup):
    session, pids = await start_matrix(api, "python3", "listing.ipynb", device)
    cleanup.extend(pids.values())
    kid = session["kernel"]["id"]
    # the driver (fake nvidia-smi) says the setsid child has 2 GiB on GPU 0
    (Path(env["FAKE_NVIDIA_SMI_DIR"]) / "query-compute-apps.csv").write_text(
        f"{pids['setsid']}, {UUID0}, 2048\n")
    try:
        listing = await api.call("GET", "/tether/api/kernels")
        resources = await api.call("GET", "/api/colab/resources")
        ps = subprocess.run([sys.executable, "-m", "tether", "ps"], capture_output=True,
                            text=True, timeout=60,
                            env={**os.environ, "JUPYTER_RUNTIME_DIR": str(srv.runtime_dir)})
    finally:
        (Path(env["FAKE_NVIDIA_SMI_DIR"]) / "query-compute-apps.csv").write_text("")
    kernel = next(k for k in listing["kernels"] if k["id"] == kid)
    assert kernel["path"] == "listing.ipynb" and kernel["pid"] == pids["kernel"]
    assert kernel["execution_state"] == "idle" and "last_activity" in kernel
    rows = {p["pid"]: p for p in kernel["processes"]}
    assert set(pids.values()) <= set(rows), "orphan, setsid and fork children are all listed"
    assert rows[pids["gpu_holder"]]["gpus"] == [0]  # found through /proc/*/fd
    assert rows[pids["setsid"]]["gpu_memory"] == 2048 * 1024 * 1024  # through the driver
    assert kernel["gpu_memory"] == 2048 * 1024 * 1024 and kernel["gpus"] == [0]
    assert kernel["rss"] > 20 * 1024 * 1024
    assert [g["name"] for g in listing["gpus"]] == ["NVIDIA H100 80GB HBM3"] * 2
    used = {k["uuid"]: k["usedBytes"] for k in resources["memory"]["kernels"]}
    assert abs(used[kid] - kernel["rss"]) < 0.25 * kernel["rss"]

    assert ps.returncode == 0, ps.stderr
    line = next(ln for ln in ps.stdout.splitlines() if ln.startswith(kid[:8]))
    assert "listing.ipynb" in line and "2,048" in line
    await api.call("DELETE", f"/api/sessions/{session['id']}")
    assert await wait_dead(pids) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="the root case of the safe-kill rule")
async def test_as_root_an_unmarked_process_in_the_group_survives_and_is_reported(srv, api,
                                                                                cleanup):
    """Without kernel cgroups. With one, the process is provably the kernel's (only root could
    have put it in the kernel's cgroup): it is ended, and the release is verified."""
    state = json.loads((srv.runtime_dir / f"tether-{srv.proc.pid}.json").read_text())
    session, pids = await start_matrix(api, "nopsutil", "unmarked.ipynb")
    cleanup.extend(pids.values())
    channel = await api.connect(session["kernel"]["id"])
    # in the kernel's process group, without the marker (a cleared environment), deaf to the
    # interrupt and to SIGTERM; only the recorded group says it is ours, which is not enough
    deaf = ("import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
            "time.sleep(600)")
    out = await channel.execute(
        "import subprocess, sys\n"
        f"p = subprocess.Popen(['env', '-i', sys.executable, '-c', {deaf!r}], stdout=subprocess.PIPE)\n"
        "assert p.stdout.readline().strip() == b'ready'\nprint(p.pid)")
    channel.close()
    unmarked = int(out.strip())
    cleanup.append(unmarked)
    outcome = await api.call("POST", f"/tether/api/kernels/{session['kernel']['id']}/release", {})
    if state["cgroup"]:
        assert outcome["released"] and outcome["verified"], outcome
        assert await wait_dead([unmarked, *pids.values()]) == []
        return
    assert not outcome["released"]
    assert [(r["pid"], r["reason"]) for r in outcome["leftovers"]] == [
        (unmarked, "running as root without our marker")]
    assert alive_pids([unmarked]) == [unmarked]
    assert await wait_dead(pids) == []


async def test_in_notebook_release_with_and_without_tether_installed(api, cleanup):
    async def one(kernel: str, code: str, shim: bool) -> list[int]:
        session, pids = await start_matrix(api, kernel, f"self-{kernel}.ipynb")
        cleanup.extend(pids.values())
        channel = await api.connect(session["kernel"]["id"])
        try:
            out = await channel.execute(code)
        finally:
            channel.close()
        assert "releasing kernel" in out
        assert ("_kernel_shim" in out) == shim, out  # which tether served it
        assert await kernel_gone(api, session["kernel"]["id"])
        return await wait_dead(pids)

    real = "import tether; print(tether.__file__); tether.release()"
    shim = "%load_ext tether\nimport tether; print(tether.__file__)\n%release"
    assert await asyncio.gather(one("python3", real, False), one("notether", shim, True)) == [
        [], []]


async def test_release_all_reports_foreign_holders_and_never_ends_them(api, srv, device, cleanup):
    session, pids = await start_matrix(api, "nopsutil", "all.ipynb", device)
    cleanup.extend(pids.values())
    foreign = subprocess.Popen(  # same uid, no marker, holds the GPU: not ours
        [sys.executable, "-c", f"f = open({device!r}, 'rb'); print('ready', flush=True); "
         "import time; time.sleep(600)"], stdout=subprocess.PIPE, text=True,
        start_new_session=True)
    cleanup.append(foreign.pid)
    assert foreign.stdout.readline().strip() == "ready"
    listing = await api.call("GET", "/tether/api/kernels")
    assert [f["pid"] for f in listing["foreign"]] == [foreign.pid]

    cli_env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(srv.runtime_dir)}
    cmd = [sys.executable, "-m", "tether", "release", "--all", "--json"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=cli_env, timeout=120)
    assert first.returncode == 3, first.stderr  # the GPU is not free: someone else holds it
    result = json.loads(first.stdout)
    assert [k["released"] for k in result["kernels"]] == [True]
    assert [f["pid"] for f in result["stray"]["foreign"]] == [foreign.pid]
    assert foreign.poll() is None, "a foreign holder is reported, never killed without --force"
    assert await wait_dead(pids) == []
    said = subprocess.run(cmd[:-1], capture_output=True, text=True, env=cli_env, timeout=120)
    assert said.returncode == 3 and "listed above" in said.stderr  # ... and it is listed:
    assert f"pid {foreign.pid}" in said.stderr or str(foreign.pid) in said.stderr, said.stderr
    hint = f"`kill {foreign.pid}` ends it"
    assert hint in said.stderr, said.stderr

    # --force widens a release within its scope only: a GPU holder of no kernel is the user's
    forced = subprocess.run(cmd + ["--force"], capture_output=True, text=True, env=cli_env,
                            timeout=120)
    assert forced.returncode == 3, forced.stdout + forced.stderr
    assert foreign.poll() is None, "--force ended a process that is no kernel's"
    # the command printed works as printed
    assert subprocess.run(["sh", "-c", f"kill {foreign.pid}"], timeout=30).returncode == 0
    assert foreign.wait(10) is not None


async def test_force_release_of_one_kernel_ends_that_kernel_only(api, srv, device, cleanup):
    """`release KERNEL --force` widens to that kernel's processes, never to another kernel of
    the server nor (as root) to another user's process holding the GPU."""
    import pwd

    from tests.sshd import OTHER_USER
    try:
        pwd.getpwnam(OTHER_USER)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/sh", OTHER_USER], check=True, timeout=30)
    hold = f"f = open({device!r}, 'rb'); x = 42; import os; print(os.getpid())"
    kids, pids = [], []
    for path in ("a.ipynb", "b.ipynb"):
        kid = (await api.new_session(path))["kernel"]["id"]
        channel = await api.connect(kid)
        try:
            pids.append(int((await channel.execute(hold)).strip().splitlines()[-1]))
        finally:
            channel.close()
        kids.append(kid)
    fd = os.open(device, os.O_RDONLY)  # the other user's process inherits the open device
    try:
        other = subprocess.Popen(["sleep", "600"], user=OTHER_USER, pass_fds=[fd],
                                 start_new_session=True)
    finally:
        os.close(fd)
    cleanup.extend([*pids, other.pid])
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(srv.runtime_dir)}
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "tether", "release", "a.ipynb", "--force",
                         "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode in (0, 3), done.stderr
    assert await wait_dead([pids[0]]) == []
    assert other.poll() is None, "another user's process was ended"
    channel = await api.connect(kids[1])
    try:
        assert (await channel.execute("print(x)")).strip().splitlines()[-1] == "42"
    finally:
        channel.close()
    assert psutil_alive(pids[1])
    await api.call("DELETE", f"/api/kernels/{kids[1]}")


def psutil_alive(pid: int) -> bool:
    return alive_pids([pid]) == [pid]


@pytest.mark.parametrize("field", ["force", "background", "stop_server"])
async def test_release_api_takes_true_or_false_only(api, field):
    kid = (await api.new_session(f"strict-{field}.ipynb"))["kernel"]["id"]
    try:
        for path in (f"/tether/api/kernels/{kid}/release", "/tether/api/release"):
            for wrong in ("false", 1, None, [True]):
                with pytest.raises(AssertionError) as refused:
                    await api.call("POST", path, {field: wrong})
                assert "HTTP 400" in str(refused.value) and field in str(refused.value)
        assert kid in {k["id"] for k in await api.call("GET", "/api/kernels")}, "nothing released"
    finally:
        await api.call("DELETE", f"/api/kernels/{kid}")


async def test_a_kernel_with_a_child_ends_on_sigterm_without_waiting_out_the_grace(api, srv):
    """ipykernel's shutdown waited for its zombie children (a child tether's sweep ended
    meanwhile) until SIGKILL at the end of the grace; the common case needs no SIGKILL."""
    kid = (await api.new_session("child.ipynb"))["kernel"]["id"]
    channel = await api.connect(kid)
    try:
        await channel.execute("import subprocess; p = subprocess.Popen(['sleep', '600'])")
    finally:
        channel.close()
    result = await api.call("POST", f"/tether/api/kernels/{kid}/release", {})
    assert result["released"] and result["killed"] == [], result
    assert len(result["terminated"]) == 2, result
