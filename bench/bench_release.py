#!/usr/bin/env python3
"""Time from shutdown request to a verified release, and count leaked processes.

Each round starts a kernel running the child matrix of docs/kernel-gpu-lifecycle.md (plain,
setsid, SIGTERM-ignoring, ``nohup &`` orphan, multiprocessing daemon and non-daemon), then ends
it one of three ways:

- ``stock DELETE``:   ``DELETE /api/sessions/<id>`` on a stock jupyter_server (LocalProvisioner,
                      tether's extension off): Jupyter's own "Close and Halt";
- ``tether DELETE``:  the same request on ``tether serve`` (the sweeping provisioner cleans up);
- ``tether release``: the ``tether release KERNEL`` command on the server's machine, which
                      returns once the release is verified.

with psutil in the kernel and without (hidden by a ``psutil.py`` raising ImportError). A process
counts as leaked if it still runs (zombies excluded) 1 s after the request returned; leaked
processes are then killed by pid. Prints a table and writes JSON to bench/results/.

    python bench/bench_release.py [--rounds 3] [--grace 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from kernel_client import Api, alive_pids, kill_pids, make_kernelspecs, matrix_code  # noqa: E402

SETTLE = 1.0
READY_DEADLINE = 90.0


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], api: Api, runtime: Path) -> None:
        self.proc, self.api, self.runtime = proc, api, runtime

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _wait_file(runtime: Path, pattern: str, proc: subprocess.Popen[bytes]) -> dict:
    deadline = time.monotonic() + READY_DEADLINE
    while time.monotonic() < deadline:
        for path in runtime.glob(pattern):
            try:
                return json.loads(path.read_text())
            except ValueError:
                pass  # being written
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        time.sleep(0.1)
    raise RuntimeError("server not ready in time")


def start_stock(root: Path, env: dict[str, str]) -> Server:
    runtime = root / "stock-runtime"
    token = secrets.token_hex(24)
    config = root / "stock_config.json"
    config.write_text(json.dumps({
        "ServerApp": {"jpserver_extensions": {"tether.remote": False}, "open_browser": False,
                      "ip": "127.0.0.1", "port": 0, "port_retries": 0,
                      "allow_root": os.geteuid() == 0, "root_dir": str(root)},
        "IdentityProvider": {"token": token},
        "KernelProvisionerFactory": {"default_provisioner_name": "local-provisioner"},
    }))
    config.chmod(0o600)
    proc = subprocess.Popen([sys.executable, "-m", "jupyter_server", f"--config={config}"],
                            env={**env, "JUPYTER_RUNTIME_DIR": str(runtime)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    info = _wait_file(runtime, "jpserver-*.json", proc)
    return Server(proc, Api(f"http://127.0.0.1:{info['port']}", token), runtime)


def start_tether(root: Path, env: dict[str, str], grace: float) -> Server:
    runtime = root / "tether-runtime"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether", "serve", "--json", "--port", "0", "--notebook-dir",
         str(root), "--kill-grace", str(grace)],
        env={**env, "JUPYTER_RUNTIME_DIR": str(runtime)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    info = _wait_file(runtime, "tether-*.json", proc)
    return Server(proc, Api(info["url"].rstrip("/"), info["token"]), runtime)


async def prepare(server: Server, kernel: str, name: str) -> tuple[dict, dict[str, int]]:
    session = await server.api.new_session(name, kernel)
    channel = await server.api.connect(session["kernel"]["id"])
    try:
        out = await channel.execute(matrix_code(), timeout=120)
    finally:
        channel.close()
    return session, json.loads(out.strip().splitlines()[-1])


async def delete(server: Server, session: dict) -> dict:
    await server.api.call("DELETE", f"/api/sessions/{session['id']}", timeout=120)
    return {}


async def cli_release(server: Server, session: dict) -> dict:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tether", "release", session["kernel"]["id"], "--json",
        env={**os.environ, "JUPYTER_RUNTIME_DIR": str(server.runtime)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    result = json.loads(out) if out.strip() else {"error": err.decode()[-300:]}
    return {"exit": proc.returncode, "server_seconds": result.get("kernels", [{}])[0].get("seconds")}


async def one_round(method: str, server: Server, kernel: str, name: str) -> dict:
    session, pids = await prepare(server, kernel, name)
    started = time.monotonic()
    extra = await (cli_release if method == "tether release" else delete)(server, session)
    seconds = time.monotonic() - started
    await asyncio.sleep(SETTLE)  # the measurement itself: who is still there a moment later
    leaked = {what: pid for what, pid in pids.items() if pid in alive_pids([pid])}
    kill_pids(list(leaked.values()))
    return {"method": method, "psutil": kernel == "python3", "seconds": round(seconds, 3),
            "leaked": sorted(leaked), "leaked_count": len(leaked), "children": len(pids) - 1,
            **extra}


def table(rows: list[dict], grace: float) -> str:
    lines = [f"{'path':<16} {'psutil':<7} {'rounds':>6} {'median s':>9} {'max s':>7} "
             f"{'leaked':>7}  leaked kinds",
             "-" * 80]
    groups: dict[tuple[str, bool], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["psutil"]), []).append(r)
    for (method, has_psutil), rs in groups.items():
        times = [r["seconds"] for r in rs]
        kinds = sorted({k for r in rs for k in r["leaked"]})
        lines.append(f"{method:<16} {'yes' if has_psutil else 'no':<7} {len(rs):>6} "
                     f"{statistics.median(times):>9.2f} {max(times):>7.2f} "
                     f"{sum(r['leaked_count'] for r in rs):>7}  {', '.join(kinds) or '-'}")
    lines.append(f"goal: 0 leaked on every tether path, release < grace + 1 s = {grace + 1:.1f} s")
    return "\n".join(lines)


async def main(rounds: int, grace: float) -> int:
    with tempfile.TemporaryDirectory(prefix="tether-bench-") as tmp:
        root = Path(tmp)
        env = {**os.environ, **make_kernelspecs(root)}
        stock = start_stock(root, env)
        tether = start_tether(root, env, grace)
        rows = []
        try:
            for i in range(rounds):
                for method, server in (("stock DELETE", stock), ("tether DELETE", tether),
                                       ("tether release", tether)):
                    for kernel in ("python3", "nopsutil"):
                        name = f"{method.replace(' ', '-')}-{kernel}-{i}.ipynb"
                        rows.append(await one_round(method, server, kernel, name))
                        print(json.dumps(rows[-1]), file=sys.stderr)
        finally:
            stock.stop()
            tether.stop()
    text = table(rows, grace)
    print(text)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = results / f"release-{stamp}.json"
    out.write_text(json.dumps({
        "when": stamp, "grace": grace, "rounds": rounds, "settle": SETTLE,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "rows": rows, "table": text}, indent=1))
    print(f"results: {out}")
    tether_leaks = sum(r["leaked_count"] for r in rows if r["method"] != "stock DELETE")
    return 1 if tether_leaks else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--grace", type=float, default=2.0)
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.rounds, args.grace)))
