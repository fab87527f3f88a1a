#!/usr/bin/env python3
"""What one refresh of the runtime's page costs the server, with 20 kernels, and whether it
blocks the event loop.

Starts ``tether serve`` with ``--kernels`` real ipykernel kernels, then for each GPU source
(``none``: no NVML, no nvidia-smi, as on a CPU box; ``nvidia-smi``: the recorded-output replayer
of tests/fixtures, a Python process per query, slower than the real binary) requests
``GET /tether/api/kernels`` ``--refreshes`` times, one after another:

- ``fresh``: ``max_age=0`` (``tether ps``): a full inventory every time;
- ``page``:  ``max_age=1``, once a second, as the page does: the inventory is shared.

It reports the server process's CPU time per refresh (its threads included, the monitor's own
sampling too; the nvidia-smi children separately), the wall time of a request, and, in a second
run of as many refreshes, the worst latency of a trivial request (``GET /api/status``) sent
every 10 ms meanwhile, against the same without refreshes: if an inventory ran on the loop,
that latency would grow by its duration. Writes JSON to bench/results/.

    python bench/bench_page.py [--kernels 20] [--refreshes 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from conftest import RunningServer, start_server, stop_server  # noqa: E402
from kernel_client import Api  # noqa: E402

FAKE_SMI = HERE.parent / "tests" / "fixtures" / "fake_nvidia_smi.py"
PING_EVERY = 0.01


def gpu_env(root: Path, source: str) -> dict[str, str]:
    if source == "none":
        return {"TETHER_NVIDIA_SMI": "",
                "TETHER_NVIDIA_DEVICES": str(root / "none" / "nvidia[0-9]*")}
    smi = root / "smi"
    smi.mkdir(exist_ok=True)
    for name in ("query-gpu.csv", "query-gpu-uuid.csv", "query-compute-apps.csv", "pmon.txt"):
        (smi / name).write_text((FAKE_SMI.parent / "nvidia-smi" / name).read_text())
    return {"TETHER_NVIDIA_SMI": str(FAKE_SMI), "FAKE_NVIDIA_SMI_DIR": str(smi),
            "TETHER_NVIDIA_DEVICES": str(root / "none" / "nvidia[0-9]*")}


def cpu(proc: psutil.Process) -> tuple[float, float]:
    """(the server's own CPU seconds, its waited-for children's)."""
    t = proc.cpu_times()
    return t.user + t.system, t.children_user + t.children_system


async def pinger(api: Api, stop: asyncio.Event, worst: list[float]) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        await api.call("GET", "/api/status")
        worst.append(time.perf_counter() - t0)
        try:
            await asyncio.wait_for(stop.wait(), PING_EVERY)
        except asyncio.TimeoutError:
            pass


async def refreshes(api: Api, server: psutil.Process, n: int, path: str,
                    pace: float) -> dict[str, float]:
    walls = []
    own0, kids0 = cpu(server)
    t0 = time.perf_counter()
    for _ in range(n):
        t1 = time.perf_counter()
        listing = await api.call("GET", path)
        walls.append(time.perf_counter() - t1)
        if pace:
            await asyncio.sleep(max(0.0, pace - walls[-1]))  # the page's one-second pace
    own1, kids1 = cpu(server)
    return {"kernels": len(listing["kernels"]), "seconds": time.perf_counter() - t0,
            "cpu_ms": 1000 * (own1 - own0) / n, "children_cpu_ms": 1000 * (kids1 - kids0) / n,
            "wall_ms_median": 1000 * statistics.median(walls), "wall_ms_max": 1000 * max(walls)}


async def measure(api: Api, server: psutil.Process, n: int, path: str,
                  pace: float) -> dict[str, float]:
    """CPU and wall time of ``n`` refreshes alone; then the loop's latency during as many."""
    result = await refreshes(api, server, n, path, pace)
    stop, pings = asyncio.Event(), []
    ping = asyncio.ensure_future(pinger(api, stop, pings))
    await refreshes(api, server, n, path, pace)
    stop.set()
    await ping
    return {**result, "ping_ms_max": 1000 * max(pings),
            "ping_ms_median": 1000 * statistics.median(pings)}


async def baseline(api: Api, server: psutil.Process, seconds: float = 5.0) -> dict[str, float]:
    """With nothing asked: the monitor's own sampling, and the loop's latency."""
    own0, _ = cpu(server)
    await asyncio.sleep(seconds)
    own1, _ = cpu(server)
    stop, pings = asyncio.Event(), []
    ping = asyncio.ensure_future(pinger(api, stop, pings))
    await asyncio.sleep(seconds / 2)
    stop.set()
    await ping
    return {"cpu_ms_per_s": 1000 * (own1 - own0) / seconds, "ping_ms_max": 1000 * max(pings),
            "ping_ms_median": 1000 * statistics.median(pings)}


async def one_source(source: str, kernels: int, refreshes: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # long idle timeouts: nothing is culled while we measure
        srv: RunningServer = start_server(root, "--idle-timeout", "0", "--gpu-idle-timeout", "0",
                                          env=gpu_env(root, source))
        try:
            api = Api(srv.url, srv.token)
            for i in range(0, kernels, 4):  # a few at a time: 2 shared cores
                await asyncio.gather(*(api.new_session(f"nb{j}.ipynb")
                                       for j in range(i, min(i + 4, kernels))))
            server = psutil.Process(srv.proc.pid)
            await api.call("GET", "/tether/api/kernels")  # warm up
            quiet = await baseline(api, server)
            fresh = await measure(api, server, refreshes, "/tether/api/kernels", 0.0)
            page = await measure(api, server, refreshes, "/tether/api/kernels?max_age=1", 1.0)
            return {"source": source, "idle": quiet, "fresh": fresh, "page": page}
        finally:
            await api.call("POST", "/tether/api/release", {})
            stop_server(srv)


async def main(kernels: int, refreshes: int) -> int:
    rows = [await one_source(s, kernels, refreshes) for s in ("none", "nvidia-smi")]
    print(f"{'GPU source':<11} {'path':<6} {'kernels':>7} {'cpu ms':>7} {'smi cpu ms':>10} "
          f"{'wall ms':>8} {'wall max':>8} {'ping max':>8} {'idle ping max':>13} "
          f"{'idle cpu ms/s':>13}")
    for r in rows:
        for path in ("fresh", "page"):
            m = r[path]
            print(f"{r['source']:<11} {path:<6} {m['kernels']:>7} {m['cpu_ms']:>7.1f} "
                  f"{m['children_cpu_ms']:>10.1f} {m['wall_ms_median']:>8.1f} "
                  f"{m['wall_ms_max']:>8.1f} {m['ping_ms_max']:>8.1f} "
                  f"{r['idle']['ping_ms_max']:>13.1f} {r['idle']['cpu_ms_per_s']:>13.1f}")
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    out = results / f"page-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(),
                               "kernels": kernels, "refreshes": refreshes, "rows": rows},
                              indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", type=int, default=20)
    parser.add_argument("--refreshes", type=int, default=20)
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.kernels, args.refreshes)))
