"""Idle policy, the Unix-socket path, the stop-after-idle hook and the reaper, with real servers."""

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
from conftest import start_server, stop_server
from jupyter_client import BlockingKernelClient
from kernel_client import Api, alive_pids, kill_pids, make_kernelspecs, matrix_code, wait_dead

from tether.remote.kernel_helper import _UnixConnection

IDLE = 3  # --idle-timeout: the culler looks every second


@pytest.fixture
def cleanup():
    seen: list[int] = []
    yield seen
    kill_pids(alive_pids(seen))


async def kernel_ids(api: Api) -> set[str]:
    return {k["id"] for k in await api.call("GET", "/api/kernels")}


async def test_cull_after_colab_disconnects_keeps_busy_and_connected(tmp_path, cleanup):
    srv = start_server(tmp_path, "--idle-timeout", str(IDLE), "--kill-grace", "1",
                       env=make_kernelspecs(tmp_path))
    api = Api(srv.url, srv.token)
    try:
        async def session(path: str, kernel: str = "python3") -> tuple[str, object]:
            s = await api.new_session(path, kernel)
            return s["kernel"]["id"], await api.connect(s["kernel"]["id"])

        (gone, ch1), (gone2, ch4), (busy, ch2), (open_tab, ch3) = await asyncio.gather(
            session("left.ipynb"), session("left-nopsutil.ipynb", "nopsutil"),
            session("training.ipynb"), session("open-tab.ipynb"))
        outs = await asyncio.gather(ch1.execute(matrix_code()), ch4.execute(matrix_code()))
        pids = [pid for out in outs for pid in json.loads(out.strip().splitlines()[-1]).values()]
        cleanup.extend(pids)
        await ch2.execute("import time\nwhile True: time.sleep(0.5)", wait=False)
        await ch3.execute("x = 1")
        for channel in (ch1, ch4, ch2):  # Colab's tab closes: the websocket goes, the kernel stays
            channel.close()
        deadline = time.monotonic() + 6 * IDLE + 10
        while {gone, gone2} & await kernel_ids(api) and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
        assert not {gone, gone2} & await kernel_ids(api), "...until the culler shuts it down"
        assert await wait_dead(pids) == [], "and the cull was swept: no child survives it"
        await asyncio.sleep(IDLE)  # past another cull round
        assert {busy, open_tab} <= await kernel_ids(api), "busy or connected: never culled"
        ch3.close()
    finally:
        stop_server(srv)


def unix_call(sock: str, token: str, method: str, path: str, body: object = None) -> object:
    conn = _UnixConnection(sock, 30)
    try:
        conn.request(method, path, json.dumps(body) if body is not None else None,
                     {"Authorization": f"token {token}", "Content-Type": "application/json"})
        reply = conn.getresponse()
        raw = reply.read()
    finally:
        conn.close()
    assert reply.status < 400, (reply.status, raw)
    return json.loads(raw) if raw else None


async def test_release_from_a_kernel_without_tether_over_a_unix_socket(tmp_path, cleanup):
    """The kernel's own Python lacks tether; the server listens on a socket only."""
    env = make_kernelspecs(tmp_path)
    sock = str(tmp_path / "s" / "tether.sock")
    srv = start_server(tmp_path, "--sock", sock, env=env)
    try:
        session = unix_call(sock, srv.token, "POST", "/api/sessions", {
            "path": "mine.ipynb", "type": "notebook", "kernel": {"name": "notether"}})
        kid = session["kernel"]["id"]
        client = BlockingKernelClient(connection_file=str(srv.runtime_dir / f"kernel-{kid}.json"))
        client.load_connection_file()
        client.start_channels()
        try:
            # ready once it answers (not wait_for_ready: its heartbeat check is flaky under load)
            client.kernel_info()
            assert client.get_shell_msg(timeout=60)["msg_type"] == "kernel_info_reply"
            out: list[str] = []

            def keep(msg: dict) -> None:
                if msg["msg_type"] == "stream":
                    out.append(msg["content"]["text"])

            client.execute_interactive(matrix_code(), timeout=60, output_hook=keep)
            pids = json.loads("".join(out).strip().splitlines()[-1])
            cleanup.extend(pids.values())
            ps = subprocess.run([sys.executable, "-m", "tether", "ps"], capture_output=True,
                                text=True, timeout=60,
                                env={**os.environ, "JUPYTER_RUNTIME_DIR": str(srv.runtime_dir)})
            assert ps.returncode == 0 and "mine.ipynb" in ps.stdout, ps.stderr
            out.clear()
            client.execute_interactive("import tether; print(tether.__file__); tether.release()",
                                       timeout=30, output_hook=keep)
        finally:
            client.stop_channels()
        assert "_kernel_shim" in "".join(out)
        deadline = time.monotonic() + 20
        while unix_call(sock, srv.token, "GET", "/api/kernels") and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert unix_call(sock, srv.token, "GET", "/api/kernels") == []
        assert await wait_dead(pids) == []
    finally:
        stop_server(srv)


def test_stop_after_idle_runs_the_hook_once_then_stops(tmp_path):
    marker = tmp_path / "hook-ran"
    srv = start_server(tmp_path, "--stop-after-idle", "2", "--on-idle",
                       f"echo $TETHER_IDLE_SECONDS >> {marker}")
    try:
        assert srv.proc.wait(30) == 0
    finally:
        stop_server(srv)
    lines = marker.read_text().split()
    assert len(lines) == 1 and int(lines[0]) >= 2


async def test_reaper_reports_then_ends_what_a_crashed_server_left(tmp_path, cleanup):
    first = start_server(tmp_path)
    api = Api(first.url, first.token)
    s = await api.new_session("crash.ipynb")
    channel = await api.connect(s["kernel"]["id"])
    pids = json.loads((await channel.execute(matrix_code())).strip().splitlines()[-1])
    channel.close()
    cleanup.extend(pids.values())
    first.proc.send_signal(signal.SIGKILL)  # the server crashes; its kernel lives on
    first.proc.wait(10)
    assert alive_pids(pids)
    # the kernel dies too while no server runs (a live one would be adopted): its children stay
    os.kill(pids["kernel"], signal.SIGKILL)
    assert await wait_dead([pids["kernel"]]) == []

    second = start_server(tmp_path)  # same runtime dir: same setup
    try:
        listing = await Api(second.url, second.token).call("GET", "/tether/api/kernels")
    finally:
        stop_server(second)
    assert second.info["lost"] == ["crash.ipynb"] and second.info["adopted"] == []
    children = [pid for what, pid in pids.items() if what not in ("kernel", "mp_daemon")]
    assert set(alive_pids(children)) == set(children)
    assert set(children) <= {o["pid"] for o in listing["orphans"]}
    assert set(alive_pids(children)) == set(children), "without --reap they are only reported"

    third = start_server(tmp_path, "--reap", "--kill-grace", "1")
    try:
        assert await wait_dead(pids, 10) == []
    finally:
        stop_server(third)
    assert third.info["lost"] == [], "a kernel that died is reported once"


def replace(path: Path, text: str) -> None:
    """Write a recorded answer whole: a sample never reads half a file."""
    part = path.with_suffix(".part")
    part.write_text(text)
    part.replace(path)


async def seen_computing(api: Api, kid: str, deadline: float) -> bool:
    """Whether the server's sampling saw ``kid`` use a GPU within ``deadline`` s."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        listing = await api.call("GET", "/tether/api/kernels")
        if any(k["id"] == kid and (k.get("gpu_utilization") or 0) > 0
               for k in listing["kernels"]):
            return True
        await asyncio.sleep(0.2)  # polling the server's own sampling, bounded above
    return False


FAKE_SMI = Path(__file__).parent / "fixtures" / "fake_nvidia_smi.py"
PMON_HEADER = ("# gpu         pid   type     sm    mem    enc    dec    jpg    ofa    command\n"
               "# Idx           #    C/G      %      %      %      %      %      %    name\n")
UUID0 = "GPU-5e1f9c6a-2b7d-8f4e-1a3c-9d0b7e6f5a41"


def fake_gpus(root: Path) -> tuple[Path, dict[str, str]]:
    """Recorded nvidia-smi answers in a folder of this test: it says who holds and uses a GPU."""
    smi = root / "smi"
    smi.mkdir()
    for name in ("query-gpu.csv", "query-gpu-uuid.csv"):
        (smi / name).write_text((FAKE_SMI.parent / "nvidia-smi" / name).read_text())
    (smi / "query-compute-apps.csv").write_text("")
    (smi / "pmon.txt").write_text(PMON_HEADER)
    return smi, {"TETHER_NVIDIA_SMI": str(FAKE_SMI), "FAKE_NVIDIA_SMI_DIR": str(smi),
                 "FAKE_NVIDIA_SMI_LIVE_ONLY": "1",
                 "TETHER_NVIDIA_DEVICES": str(root / "no-devices" / "nvidia[0-9]*")}


def pmon_row(pid: int, sm: int) -> str:
    return f"    0 {pid:>10}     C {sm:>6} {sm // 2:>6}      -      -      -      -    python3\n"


async def wait_gone(api: Api, kid: str, timeout: float) -> float:
    """Seconds until the kernel is no longer listed (bounded)."""
    started = time.monotonic()
    while kid in await kernel_ids(api) and time.monotonic() - started < timeout:
        await asyncio.sleep(0.2)
    return time.monotonic() - started


async def test_gpu_aware_idle_keeps_gpu_work_and_frees_idle_gpu_memory_first(tmp_path, cleanup):
    general, on_gpu = 16, 4
    smi, env = fake_gpus(tmp_path)
    srv = start_server(tmp_path, "--idle-timeout", str(general), "--gpu-idle-timeout",
                       str(on_gpu), "--kill-grace", "1", env=env)
    api = Api(srv.url, srv.token)
    try:
        kids, pids = {}, {}
        for name in ("trainer", "holder", "plain"):
            s = await api.new_session(f"{name}.ipynb")
            kids[name] = s["kernel"]["id"]
            channel = await api.connect(kids[name])
            pids[name] = int((await channel.execute("import os; print(os.getpid())")).strip())
            channel.close()  # the tab is gone: only the idle policy decides from now on
        cleanup.extend(pids.values())
        # the driver says: trainer holds 4 GiB and computes (a background thread, no messages);
        # holder keeps 2 GiB and does nothing; plain has no GPU memory at all. A real driver
        # shows both at once; these are two files, each read at its own moment of a sample
        # (pmon first): the trainer must be seen computing before it is seen holding memory,
        # or a sample between the two writes sees an idle holder whose 4 s have long passed
        # (kernels take seconds to start under load) and rightly releases it.
        replace(smi / "pmon.txt", PMON_HEADER + pmon_row(pids["trainer"], 80) +
                pmon_row(pids["holder"], 0))
        assert await seen_computing(api, kids["trainer"], 30), "the sample never saw pmon.txt"
        replace(smi / "query-compute-apps.csv",
                f"{pids['trainer']}, {UUID0}, 4096\n{pids['holder']}, {UUID0}, 2048\n")
        listing = await api.call("GET", "/tether/api/kernels")
        assert listing["server"]["gpu_idle_timeout"] == on_gpu
        assert listing["server"]["idle_timeout"] == general

        await wait_gone(api, kids["holder"], general)
        left = await kernel_ids(api)
        assert kids["holder"] not in left, "an idle GPU holder goes at the GPU timeout"
        assert {kids["plain"], kids["trainer"]} <= left, "...before the general one"
        assert await wait_dead([pids["holder"]]) == []

        await wait_gone(api, kids["plain"], general + 20)
        assert kids["plain"] not in await kernel_ids(api), "an idle non-holder: general timeout"
        await asyncio.sleep(2)  # well past the general timeout for the trainer too
        listing = await api.call("GET", "/tether/api/kernels")
        trainer = next(k for k in listing["kernels"] if k["id"] == kids["trainer"])
        assert trainer["idle"]["reason"] == "using a GPU" and trainer["idle"]["release_at"] is None
        assert trainer["gpu_utilization"] == 80 and trainer["gpu_memory"] == 4096 * 1024 ** 2
        assert trainer["execution_state"] == "idle", "Jupyter alone would call it idle"

        # the training ends: the GPU timeout counts from the last sample that saw it compute
        replace(smi / "pmon.txt", PMON_HEADER + pmon_row(pids["trainer"], 0))
        ended = time.monotonic()
        await wait_gone(api, kids["trainer"], on_gpu + 20)
        assert kids["trainer"] not in await kernel_ids(api)
        assert time.monotonic() - ended >= on_gpu - 1.5
    finally:
        stop_server(srv)


# --- the policy and the parsers, on recorded outputs -------------------------------------------

def test_pmon_parser_finds_columns_by_name():
    from tether.remote.gpu import ProcessUtil, parse_pmon

    recorded = (FAKE_SMI.parent / "nvidia-smi" / "pmon.txt").read_text()
    assert parse_pmon(recorded) == [ProcessUtil(1234567, 0, 87, 41),
                                    ProcessUtil(1234568, 0, 0, 0)]
    older = ("# gpu        pid  type    sm   mem   enc   dec   command\n"
             "# Idx          #   C/G     %     %     %     %   name\n"
             "    1      4242     C     -    12     -     -   python\n")
    assert parse_pmon(older) == [ProcessUtil(4242, 1, 0, 12)] and parse_pmon(older)[0].busy
    assert parse_pmon("") == [] and parse_pmon("garbage\n") == []


def test_policy_never_culls_gpu_work_and_frees_gpu_memory_sooner():
    from tether.remote.idle import IdlePolicy, KernelFacts, decide

    policy = IdlePolicy(idle_timeout=3600, gpu_idle_timeout=1800)
    now = 10_000.0

    def facts(**kw) -> KernelFacts:
        return KernelFacts(**{"state": "idle", "connections": 0, "last_activity": now - 100,
                              "holds_gpu": False, "gpu_busy": False, **kw})

    assert decide(policy, facts(), now).release_at == now - 100 + 3600
    holder = decide(policy, facts(holds_gpu=True), now)
    assert holder.release_at == now - 100 + 1800 and "GPU" in holder.reason
    assert decide(policy, facts(holds_gpu=True, gpu_busy=True), now).release_at is None
    # the GPU's last use counts as activity, whatever the messages said
    assert decide(policy, facts(holds_gpu=True, gpu_busy_at=now - 10), now).release_at == \
        now - 10 + 1800
    assert decide(policy, facts(state="busy"), now).release_at is None
    assert decide(policy, facts(connections=1), now).release_at is None
    assert decide(IdlePolicy(3600, 1800, cull_connected=True), facts(connections=1),
                  now).release_at is not None
    # a holder whose GPU use this machine cannot see might be training: the general timeout
    assert decide(policy, facts(holds_gpu=True, util_known=False), now).timeout == 3600
    assert decide(IdlePolicy(0, 0), facts(holds_gpu=True), now).release_at is None
    assert decide(IdlePolicy(0, 1800), facts(), now).release_at is None
    assert decide(policy, facts(state="dead"), now).due(now)
    assert IdlePolicy(3600, 1800).interval == 5.0 and IdlePolicy(2, 0).interval == 0.5


def test_slurm_end_time_and_ps_column():
    from datetime import datetime

    from tether.cli.kernels import release_in
    from tether.remote.api import SlurmClock, parse_scontrol_end

    line = ("JobId=42 JobName=tether UserId=me(1000) JobState=RUNNING RunTime=00:10:00 "
            "TimeLimit=02:00:00 StartTime=2026-12-01T20:00:00 EndTime=2026-12-01T22:00:00")
    assert parse_scontrol_end(line) == datetime(2026, 12, 1, 22).timestamp()
    assert parse_scontrol_end("JobId=42 EndTime=Unknown") is None
    clock = SlurmClock({"SLURM_JOB_ID": "42", "SLURM_JOB_END_TIME": "1800000000"})
    assert clock.read(0) == {"job_id": "42", "end_time": 1800000000.0}
    assert SlurmClock({}).read(0) is None
    assert release_in({"reason": "idle, holding GPU memory", "release_in": 2520.0}) == "in 42m (GPU)"
    assert release_in({"reason": "using a GPU", "release_in": None}) == "kept: using a GPU"
    assert release_in({"reason": "no idle timeout", "release_in": None}) == "never"


TRAIN = r'''
import ctypes, threading
stop = threading.Event()
def train():  # GPU work in a background thread: the kernel's messages say idle
    ptr = cuda_alloc(256)
    cuda = ctypes.CDLL("libcuda.so.1")
    while not stop.is_set():
        cuda.cuMemsetD8_v2(ptr, 1, ctypes.c_size_t(256 << 20))
        cuda.cuCtxSynchronize()
threading.Thread(target=train, daemon=True).start()
'''


@pytest.mark.gpu
async def test_gpu_aware_idle_on_a_real_gpu(tmp_path):
    """NVML's per-process utilisation, for real: a training thread keeps its kernel; an idle
    holder goes at the GPU timeout."""
    from test_lifecycle_gpu import HOG, nvml

    nvml()
    general, on_gpu = 30, 6
    srv = start_server(tmp_path, "--idle-timeout", str(general), "--gpu-idle-timeout",
                       str(on_gpu), "--kill-grace", "1")
    api = Api(srv.url, srv.token)
    try:
        kids = {}
        for name, code in (("trainer", HOG + TRAIN), ("holder", HOG + "p = cuda_alloc(256)")):
            kids[name] = (await api.new_session(f"{name}.ipynb"))["kernel"]["id"]
            channel = await api.connect(kids[name])
            await channel.execute(code, timeout=120)
            channel.close()
        await wait_gone(api, kids["holder"], general)
        assert kids["holder"] not in await kernel_ids(api)
        await asyncio.sleep(general - on_gpu + 5)
        listing = await api.call("GET", "/tether/api/kernels")
        trainer = next(k for k in listing["kernels"] if k["id"] == kids["trainer"])
        assert trainer["idle"]["reason"] == "using a GPU", trainer
        assert trainer["gpu_utilization"] > 0 and trainer["gpu_memory"] >= 256 * 1024 ** 2
    finally:
        await api.call("POST", "/tether/api/release", {})
        stop_server(srv)
