"""On a real NVIDIA GPU: device memory held by a kernel and everything it started comes back.

A hog in a few lines of ``ctypes`` on ``libcuda.so.1`` (no framework needed): the kernel itself
allocates, forks a child after CUDA init (inherited ``/dev/nvidia*`` descriptors, often not in
NVML's list), starts a setsid hog and an orphaned ``nohup`` hog. After ``release`` no recorded pid
lives, NVML lists none of them, and the device's used memory is back to its baseline. Skipped
where there is no driver; runs unchanged where there is one.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import time
from pathlib import Path

import pytest
from conftest import start_server, stop_server
from kernel_client import Api, alive_pids, kill_pids, wait_dead

pytestmark = pytest.mark.gpu

MIB = 1024 * 1024
TOLERANCE = 64 * MIB  # the driver's own bookkeeping moves a little
GRACE = 2.0

HOG = r'''
import ctypes
def cuda_alloc(mib):
    cuda = ctypes.CDLL("libcuda.so.1")
    def ok(status, what):
        if status != 0:
            raise RuntimeError("%s failed with CUresult %d" % (what, status))
    ok(cuda.cuInit(0), "cuInit")
    dev = ctypes.c_int()
    ok(cuda.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
    ctx = ctypes.c_void_p()
    ok(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    ok(cuda.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    ptr = ctypes.c_uint64()
    ok(cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(mib << 20)), "cuMemAlloc_v2")
    return ptr
'''

CELL = HOG + r'''
import json, os, subprocess, sys, time
PY = sys.executable
standalone = HOG_SRC + "\ncuda_alloc(MIBS)\nprint('ready', flush=True)\nimport time\ntime.sleep(3600)"
kernel_mem = cuda_alloc(1024)                  # the kernel itself: 1 GiB
pids = {"kernel": os.getpid()}
child = os.fork()                              # forked after CUDA init: inherited descriptors
if child == 0:
    try:
        time.sleep(3600)
    finally:
        os._exit(0)
pids["forked"] = child
p = subprocess.Popen([PY, "-c", standalone.replace("MIBS", "512")], stdout=subprocess.PIPE, text=True,
                     start_new_session=True)   # a setsid hog: 512 MiB of its own
assert p.stdout.readline().strip() == "ready"
pids["setsid_hog"] = p.pid
script = os.path.join(os.getcwd(), "orphan_hog.py")
with open(script, "w") as f:
    f.write(standalone.replace("MIBS", "256"))
out = subprocess.run("nohup %s %s >/dev/null 2>&1 & echo $!" % (PY, script), shell=True,
                     capture_output=True, text=True).stdout
pids["orphan_hog"] = int(out)                  # an orphan hog: 256 MiB, parent gone
print(json.dumps(pids))
'''


def nvml() -> object:
    try:
        ctypes.CDLL("libcuda.so.1")
        import pynvml

        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() < 1:
            raise RuntimeError("no GPU")
    except Exception as e:  # any failure here means: no usable GPU on this machine
        pytest.skip(f"no NVIDIA GPU and driver here ({e})")
    return pynvml


def used(pynvml) -> int:
    return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used)


def nvml_pids(pynvml) -> set[int]:
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    return {p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}


async def wait_orphan_allocated(pynvml, baseline: int, at_least: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while used(pynvml) < baseline + at_least and time.monotonic() < deadline:
        await asyncio.sleep(0.2)


async def test_release_returns_device_memory_to_baseline(tmp_path: Path):
    pynvml = nvml()
    baseline = used(pynvml)
    srv = start_server(tmp_path, "--kill-grace", str(GRACE))
    pids: dict[str, int] = {}
    try:
        api = Api(srv.url, srv.token)
        session = await api.new_session("gpu.ipynb")
        kid = session["kernel"]["id"]
        channel = await api.connect(kid)
        code = f"HOG_SRC = {HOG!r}\n" + CELL
        out = await channel.execute(code, timeout=180)
        channel.close()
        pids = json.loads(out.strip().splitlines()[-1])
        await wait_orphan_allocated(pynvml, baseline, (1024 + 512 + 256) * MIB)
        assert used(pynvml) >= baseline + (1024 + 512 + 256) * MIB

        listing = await api.call("GET", "/tether/api/kernels")
        kernel = next(k for k in listing["kernels"] if k["id"] == kid)
        holders = {p["pid"] for p in kernel["processes"] if p["gpus"]}
        assert {pids["kernel"], pids["setsid_hog"], pids["orphan_hog"]} <= holders

        outcome = await api.call("POST", f"/tether/api/kernels/{kid}/release", {}, timeout=120)
        assert outcome["released"], outcome
        assert await wait_dead(pids, 10) == []
        assert not nvml_pids(pynvml) & set(pids.values())
        deadline = time.monotonic() + 30
        while used(pynvml) > baseline + TOLERANCE and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert used(pynvml) <= baseline + TOLERANCE, (
            f"{(used(pynvml) - baseline) / MIB:.0f} MiB still held after release")
    finally:
        kill_pids(alive_pids(list(pids.values())))
        stop_server(srv)
        pynvml.nvmlShutdown()
