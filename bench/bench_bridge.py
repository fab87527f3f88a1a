#!/usr/bin/env python3
"""Benchmark tether's HTTP-over-WebSocket bridge against direct HTTP and the original extension.

One run, one machine, everything on loopback (compare ratios, not absolute times):

- latency of a small request (``GET /api/status``), median and p90: directly over a kept-alive
  HTTP connection, through tether's bridge, and through the original jupyter_http_over_ws 0.0.8
  (notebook 6.5.7, tornado 6.4.2, in its own venv built by ``bench/_baseline.sh``) both with the
  token in an ``Authorization`` header on the socket (its fastest path) and with the auth URL, as
  Colab sends it (the original then re-fetches that URL before every request);
- throughput of a 50 MiB download (``/files/``), directly and through tether's bridge;
- tether server's peak RSS (psutil, sampled every 2 ms) while serving small requests and a
  50 MiB download through the bridge, and, on fresh servers, a 50 MiB file through the contents
  API (which jupyter_server itself builds in memory as one base64 JSON document);
- tether server's RSS before and after 30 PUTs of 15 MiB through the bridge (a fresh server;
  the goal: back within 50 MiB of where it started).

Prints a table and writes bench/results/bridge-<time>.json. Needs no network once the baseline
venv exists (``--no-baseline`` skips it). Usage: ``python bench/bench_bridge.py [-n 1000]``.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import secrets
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psutil
import websocket  # websocket-client: a dependency of jupyter_server

HERE = Path(__file__).resolve().parent
ORIGIN = "https://colab.research.google.com"
READY_DEADLINE = 90.0
BIG = 50 * 1024 * 1024

Get = Callable[[str], bytes]


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    token: str
    root: Path


# --------------------------------------------------------------------------- servers


def start_tether(tmp: Path) -> Server:
    root = tmp / "tether-root"
    root.mkdir(exist_ok=True)
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp / "tether-runtime")}
    cmd = [
        sys.executable,
        "-m",
        "tether",
        "serve",
        "--json",
        "--port",
        "0",
        "--notebook-dir",
        str(root),
    ]
    log = open(tmp / "tether.log", "ab")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=log, env=env, start_new_session=True
    )
    log.close()
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], READY_DEADLINE)
    line = proc.stdout.readline() if ready else b""
    if not line:
        stop(proc)
        raise SystemExit(f"tether serve did not start; see {tmp / 'tether.log'}")
    info = json.loads(line)
    return Server("tether", proc, info["port"], info["token"], root)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def baseline_venv(path: Path | None) -> Path:
    out = subprocess.run(
        [str(HERE / "_baseline.sh"), *([str(path)] if path else [])],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def start_original(tmp: Path, venv: Path) -> Server:
    root = tmp / "original-root"
    root.mkdir(exist_ok=True)
    port, token = free_port(), secrets.token_hex(24)
    cmd = [
        str(venv / "bin" / "jupyter-notebook"),
        f"--NotebookApp.allow_origin={ORIGIN}",
        f"--NotebookApp.token={token}",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--port-retries=0",
        "--no-browser",
        "--allow-root",
        "--NotebookApp.nbserver_extensions={'jupyter_http_over_ws': True}",
        f"--notebook-dir={root}",
    ]
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp / "original-runtime")}
    log = open(tmp / "original.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)
    log.close()
    server = Server("original", proc, port, token, root)
    wait_ready(server)
    return server


def wait_ready(server: Server) -> None:
    """Poll the JSON status endpoint until it answers, within READY_DEADLINE."""
    deadline = time.monotonic() + READY_DEADLINE
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise SystemExit(f"{server.name} server exited with {server.proc.returncode}")
        try:
            direct_client(server)("/api/status")
            return
        except (OSError, http.client.HTTPException):
            time.sleep(0.2)  # polling a status endpoint, bounded by the deadline
    stop(server.proc)
    raise SystemExit(f"{server.name} server not ready after {READY_DEADLINE:.0f} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


# --------------------------------------------------------------------------- clients


def direct_client(server: Server) -> Get:
    """GET over one kept-alive HTTP/1.1 connection, token in the Authorization header."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    headers = {"Authorization": f"token {server.token}"}

    def get(path: str) -> bytes:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"GET {path}: {response.status}")
        return body

    return get


def bridge_client(server: Server, *, auth: str = "url") -> Get:
    """GET through ``/http_over_websocket``, one request at a time, chunks reassembled.

    ``auth="url"``: the token inside ``jupyter_http_over_ws_auth_url``, as Colab sends it;
    ``auth="header"``: an ``Authorization`` header on the socket's handshake.
    """
    url = f"ws://127.0.0.1:{server.port}/http_over_websocket?min_version=0.0.7"
    headers = []
    if auth == "url":
        auth_url = f"http://127.0.0.1:{server.port}/?token={server.token}"
        url += "&jupyter_http_over_ws_auth_url=" + quote(auth_url, safe="")
    else:
        headers.append(f"Authorization: token {server.token}")
    # websocket-client validates UTF-8 in pure Python (0.4 MB/s) unless told not to
    ws = websocket.create_connection(
        url, origin=ORIGIN, header=headers, timeout=60, skip_utf8_validation=True
    )
    counter = iter(range(1, 1 << 62))

    def get(path: str) -> bytes:
        message_id = next(counter)
        ws.send(json.dumps({"message_id": message_id, "method": "GET", "path": path}))
        parts = []
        while True:
            _, raw = ws.recv_data()
            frame = json.loads(raw)
            if frame.get("message_id") != message_id:
                raise RuntimeError(f"unexpected frame {str(frame)[:200]}")
            if "status" in frame and frame["status"] != 200:
                raise RuntimeError(f"GET {path} through the bridge: {frame['status']}")
            if "data" in frame:
                parts.append(base64.b64decode(frame["data"]))
            if frame["done"]:
                return b"".join(parts)

    return get


# --------------------------------------------------------------------------- measurements


def latencies(get: Get, path: str, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        get(path)
        samples.append((time.perf_counter() - t0) * 1000)
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "median_ms": statistics.median(ordered),
        "p90_ms": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
    }


def throughput(get: Get, path: str, size: int, repeats: int, server_pid: int) -> dict[str, float]:
    """MB/s of a download, and the CPU seconds the server and this client spent on each."""
    server = psutil.Process(server_pid)
    rates, server_cpu, client_cpu = [], [], []
    for _ in range(repeats):
        s0, c0, t0 = server.cpu_times(), time.process_time(), time.perf_counter()
        body = get(path)
        elapsed = time.perf_counter() - t0
        s1 = server.cpu_times()
        client_cpu.append(time.process_time() - c0)
        server_cpu.append(s1.user + s1.system - s0.user - s0.system)
        if len(body) != size:
            raise RuntimeError(f"{path}: got {len(body)} bytes, expected {size}")
        rates.append(size / elapsed / 1e6)
    return {
        "median_MBps": statistics.median(rates),
        "best_MBps": max(rates),
        "repeats": repeats,
        "server_cpu_s": statistics.median(server_cpu),
        "client_cpu_s": statistics.median(client_cpu),
    }


@contextmanager
def peak_rss(pid: int, interval: float = 0.002) -> Iterator[dict[str, int]]:
    """Sample the RSS of ``pid`` in a thread; the dict gets ``before`` and ``peak`` (bytes)."""
    proc = psutil.Process(pid)
    result = {"before": proc.memory_info().rss, "peak": 0}
    stopping = threading.Event()

    def sample() -> None:
        while not stopping.is_set():
            result["peak"] = max(result["peak"], proc.memory_info().rss)
            stopping.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stopping.set()
        thread.join(5)
        result["peak"] = max(result["peak"], proc.memory_info().rss)
        result["growth"] = result["peak"] - result["before"]


def write_big_file(root: Path, name: str = "big.bin") -> str:
    with open(root / name, "wb") as f:
        for _ in range(BIG // (1 << 20)):
            f.write(os.urandom(1 << 20))
    return name


# --------------------------------------------------------------------------- the run


def run_latency(servers: dict[str, Server], n: int, rounds: int) -> dict[str, dict[str, float]]:
    """Interleaved rounds, so that load drift hits every variant alike."""
    clients: dict[str, Get] = {
        "direct": direct_client(servers["tether"]),
        "tether bridge": bridge_client(servers["tether"]),
    }
    if "original" in servers:
        clients["original direct"] = direct_client(servers["original"])
        clients["original bridge (header)"] = bridge_client(servers["original"], auth="header")
        clients["original bridge (auth URL)"] = bridge_client(servers["original"], auth="url")
    samples: dict[str, list[float]] = {name: [] for name in clients}
    for get in clients.values():
        latencies(get, "/api/status", 20)  # warm-up
    for _ in range(rounds):
        for name, get in clients.items():
            per_round = n // rounds if "auth URL" not in name else max(1, n // rounds // 4)
            samples[name] += latencies(get, "/api/status", per_round)
    return {name: summary(s) for name, s in samples.items()}


def run_memory_contents(tmp: Path) -> dict[str, dict[str, int]]:
    """50 MiB through the contents API, each on a fresh server (RSS never shrinks much)."""
    out = {}
    path = "/api/contents/big.bin?type=file&format=base64&content=1"
    for variant in ("direct", "tether bridge"):
        sub = tmp / variant.replace(" ", "-")
        sub.mkdir()
        server = start_tether(sub)
        try:
            write_big_file(server.root)
            get = direct_client(server) if variant == "direct" else bridge_client(server)
            get("/api/status")
            with peak_rss(server.proc.pid) as rss:
                body = get(path)
            assert len(base64.b64decode(json.loads(body)["content"])) == BIG
            out[variant] = rss
        finally:
            stop(server.proc)
    return out


PUT_RAW = 11 * 1024 * 1024  # base64 in a contents model: a 15 MiB PUT body


def bridge_put(server: Server) -> Callable[[str, str], int]:
    """PUT through ``/http_over_websocket`` (the body as a string, as Colab uploads)."""
    auth_url = f"http://127.0.0.1:{server.port}/?token={server.token}"
    url = (f"ws://127.0.0.1:{server.port}/http_over_websocket?min_version=0.0.7"
           f"&jupyter_http_over_ws_auth_url={quote(auth_url, safe='')}")
    ws = websocket.create_connection(url, origin=ORIGIN, timeout=120, skip_utf8_validation=True)
    counter = iter(range(1, 1 << 62))

    def put(path: str, body: str) -> int:
        message_id = next(counter)
        ws.send(json.dumps({"message_id": message_id, "method": "PUT", "path": path,
                            "body": body}))
        status = 0
        while True:
            frame = json.loads(ws.recv())
            status = frame.get("status", status)
            if frame["done"]:
                return int(status)

    return put


def run_memory_puts(tmp: Path, count: int = 30) -> dict[str, int]:
    """RSS of a fresh server before and after ``count`` PUTs of 15 MiB through the bridge."""
    sub = tmp / "puts"
    sub.mkdir()
    server = start_tether(sub)
    try:
        put = bridge_put(server)
        model = json.dumps({"type": "file", "format": "base64",
                            "content": base64.b64encode(os.urandom(PUT_RAW)).decode()})
        proc = psutil.Process(server.proc.pid)
        put("/api/contents/warm.bin", model)
        before, peak = proc.memory_info().rss, 0
        for i in range(count):
            if put(f"/api/contents/up{i % 3}.bin", model) not in (200, 201):
                raise RuntimeError("PUT through the bridge failed")
            peak = max(peak, proc.memory_info().rss)
        after = proc.memory_info().rss
    finally:
        stop(server.proc)
    return {"puts": count, "body_bytes": len(model), "before": before, "peak": peak,
            "after": after, "growth": after - before}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "-n", "--requests", type=int, default=1000, help="small requests per variant"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="50 MiB downloads per variant")
    parser.add_argument("--venv", type=Path, help="baseline venv (default bench/.venv-baseline)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the original extension")
    parser.add_argument(
        "--no-contents", action="store_true", help="skip the contents-API memory runs"
    )
    args = parser.parse_args()

    results: dict[str, object] = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with tempfile.TemporaryDirectory(prefix="bench-bridge-") as tmp_name:
        tmp = Path(tmp_name)
        servers = {"tether": start_tether(tmp)}
        try:
            if not args.no_baseline:
                servers["original"] = start_original(tmp, baseline_venv(args.venv))
            results["latency"] = run_latency(servers, args.requests, args.rounds)
            tether = servers["tether"]
            name = write_big_file(tether.root)
            direct, bridged = direct_client(tether), bridge_client(tether)
            tp = {
                "direct": throughput(direct, f"/files/{name}", BIG, args.repeats, tether.proc.pid),
                "tether bridge": throughput(
                    bridged, f"/files/{name}", BIG, args.repeats, tether.proc.pid
                ),
            }
            if "original" in servers:
                original = servers["original"]
                write_big_file(original.root, name)
                for variant, get in (
                    ("original direct", direct_client(original)),
                    ("original bridge (header)", bridge_client(original, auth="header")),
                ):
                    tp[variant] = throughput(
                        get, f"/files/{name}", BIG, args.repeats, original.proc.pid
                    )
            results["throughput"] = tp
            with peak_rss(tether.proc.pid) as small:
                latencies(bridged, "/api/status", 200)
            with peak_rss(tether.proc.pid) as big:
                bridged(f"/files/{name}")
            results["rss_bridge_files"] = {"small requests": small, "50 MiB download": big}
        finally:
            for server in servers.values():
                stop(server.proc)
        if not args.no_contents:
            results["rss_contents_api"] = run_memory_contents(tmp)
        results["rss_bridge_puts"] = run_memory_puts(tmp)

    report(results)
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / f"bridge-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten: {out}")


def report(results: dict[str, object]) -> None:
    lat: dict[str, dict[str, float]] = results["latency"]  # type: ignore[assignment]
    direct = lat["direct"]["median_ms"]
    print(f"GET /api/status round trip ({lat['direct']['n']} requests per variant unless shown)")
    print(f"{'variant':<28} {'n':>5} {'median ms':>10} {'p90 ms':>8} {'x direct':>9}")
    for name, s in lat.items():
        print(
            f"{name:<28} {s['n']:>5} {s['median_ms']:>10.2f} {s['p90_ms']:>8.2f}"
            f" {s['median_ms'] / direct:>9.2f}"
        )
    ratios: dict[str, float] = {
        "bridge / direct (median)": lat["tether bridge"]["median_ms"] / direct
    }
    for base in ("original bridge (header)", "original bridge (auth URL)"):
        if base in lat:
            ratios[f"{base} / tether bridge"] = (
                lat[base]["median_ms"] / lat["tether bridge"]["median_ms"]
            )
    tp: dict[str, dict[str, float]] = results["throughput"]  # type: ignore[assignment]
    print(f"\n50 MiB download via /files/ ({tp['direct']['repeats']} runs, median)")
    print(
        f"{'variant':<28} {'MB/s':>6} {'best':>6} {'server cpu s':>13} {'client cpu s':>13}"
        f" {'MB per server cpu s':>20}"
    )
    for name, t in tp.items():
        print(
            f"{name:<28} {t['median_MBps']:>6.0f} {t['best_MBps']:>6.0f} {t['server_cpu_s']:>13.3f}"
            f" {t['client_cpu_s']:>13.3f} {BIG / 1e6 / max(t['server_cpu_s'], 1e-3):>20.0f}"
        )
    ratios["bridge / direct (throughput)"] = (
        tp["tether bridge"]["median_MBps"] / tp["direct"]["median_MBps"]
    )
    if "original bridge (header)" in tp:
        ratios["tether bridge / original bridge (throughput)"] = (
            tp["tether bridge"]["median_MBps"] / tp["original bridge (header)"]["median_MBps"]
        )
    print("\ntether server RSS through the bridge (MiB)")
    for title, key in (
        ("/files/ (streamed)", "rss_bridge_files"),
        ("contents API, fresh servers", "rss_contents_api"),
    ):
        rows: dict[str, dict[str, int]] = results.get(key) or {}  # type: ignore[assignment]
        for name, r in rows.items():
            print(
                f"{title:<28} {name:<16} before {r['before'] / 2**20:7.1f}"
                f"  peak {r['peak'] / 2**20:7.1f}"
                f"  growth {r['growth'] / 2**20:7.1f}"
            )
    puts: dict[str, int] | None = results.get("rss_bridge_puts")  # type: ignore[assignment]
    if puts:
        print(f"{puts['puts']} PUTs of {puts['body_bytes'] / 2**20:.0f} MiB, fresh server"
              f"      before {puts['before'] / 2**20:7.1f}  peak {puts['peak'] / 2**20:7.1f}"
              f"  after {puts['after'] / 2**20:7.1f}  growth {puts['growth'] / 2**20:7.1f}"
              "  (goal: < 50)")
    print("\nratios")
    for name, value in ratios.items():
        print(f"  {name:<44} {value:6.2f}")
    results["ratios"] = ratios


if __name__ == "__main__":
    main()
