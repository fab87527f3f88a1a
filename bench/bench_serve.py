#!/usr/bin/env python3
"""How soon ``tether serve`` answers after its start, against a plain ``jupyter server``.

Each variant is started ``-n`` times, interleaved (one of each per round, in a shuffled order),
on a free loopback port; the clock starts just before the process is spawned. Two figures per
start:

- ``ready``: until tether's one JSON line (``serve --json``) is read;
- ``first 200``: until the first ``GET /api/status`` (token in the header) answers 200, probed
  every 2 ms from a second connection (the bench polls; a test would not).

Variants (the same Python and jupyter_server, in the same run):

- ``python -c pass``: the interpreter alone, the floor;
- ``jupyter server``: ``python -m jupyter_server`` with tether's extension disabled, as shipped;
- ``jupyter server, rfc3987 off``: the same with ``rfc3987_syntax`` unimportable, as tether
  does (jupyter_server#1559);
- ``tether serve``: with the bytecode of the environment already written (a prepared host);
- ``tether serve from DIR`` (``--ref DIR``, repeatable): the tether package in DIR, for a
  before/after in one run;
- ``tether serve, no .pyc``: every module compiled from source at start (an empty
  ``PYTHONPYCACHEPREFIX`` per start), which is a host's first start when the installer wrote no
  bytecode (``uv pip install`` without ``--compile-bytecode``) and the environment is read-only
  for the server's user, and the very first start otherwise.

Also the CPU seconds each server process had used when it first answered (from /proc: far less
moved by the machine's load than the wall time). Prints a Markdown table (median, min, max;
ratios of medians to ``jupyter server``) and writes
``bench/results/serve-<time>.json``. ``--importtime`` also prints the slowest cumulative imports
of one ``tether serve`` start. Usage: ``python bench/bench_serve.py [-n 7] [--importtime]``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import secrets
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEADLINE = 60.0
PROBE_EVERY = 0.002
NO_RFC = ("import sys, importlib.abc\n"
          "class U(importlib.abc.MetaPathFinder):\n"
          "    def find_spec(self, n, p, t=None):\n"
          "        if n.split('.')[0] == 'rfc3987_syntax': raise ImportError(n)\n"
          "sys.meta_path.insert(0, U())\n"
          "from jupyter_server.serverapp import main\n"
          "sys.exit(main())\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status_ok(port: int, token: str) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/api/status", headers={"Authorization": f"token {token}"})
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (less moved by the machine's load than
    wall time: on 2 busy cores a start can wait for a core longer than it computes)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(argv: list[str], env: dict[str, str], port: int, token: str,
          json_line: bool) -> dict[str, float]:
    """Spawn, wait for the first 200 (and the JSON line), stop; seconds since the spawn."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    assert proc.stdout is not None
    out: dict[str, float] = {}
    try:
        if argv[-1] == "pass":
            proc.wait(DEADLINE)
            return {"first_200": time.perf_counter() - t0, "cpu": float("nan")}
        while "first_200" not in out:
            if time.perf_counter() - t0 > DEADLINE or proc.poll() is not None:
                raise RuntimeError(f"{argv[:4]} did not answer (exit {proc.poll()})")
            if json_line and "ready" not in out:
                ready, _, _ = select.select([proc.stdout], [], [], PROBE_EVERY)
                if ready and proc.stdout.readline():
                    out["ready"] = time.perf_counter() - t0
            if status_ok(port, token):
                out["first_200"] = time.perf_counter() - t0
                out["cpu"] = cpu_seconds(proc.pid)
            elif not json_line or "ready" in out:
                time.sleep(PROBE_EVERY)
        if json_line and "ready" not in out:
            ready, _, _ = select.select([proc.stdout], [], [], DEADLINE)
            if ready and proc.stdout.readline():
                out["ready"] = time.perf_counter() - t0
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def variants(tmp: Path, refs: list[Path]) -> dict[str, Callable[[int, str], tuple[list[str], dict[str, str]]]]:
    py = sys.executable
    root = tmp / "notebooks"
    root.mkdir(exist_ok=True)
    base = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp / "runtime")}
    base.pop("PYTHONPYCACHEPREFIX", None)
    base.pop("PYTHONDONTWRITEBYTECODE", None)
    off = "--ServerApp.jpserver_extensions=tether.remote=False"

    def plain(port: int, token: str) -> tuple[list[str], dict[str, str]]:
        return ([py, "-m", "jupyter_server", "--no-browser", f"--port={port}", "--ip=127.0.0.1", "--allow-root",
                 f"--ServerApp.root_dir={root}", off], {**base, "JUPYTER_TOKEN": token})

    def plain_no_rfc(port: int, token: str) -> tuple[list[str], dict[str, str]]:
        argv, env = plain(port, token)
        return [py, "-c", NO_RFC, *argv[3:]], env

    def serve(port: int, token: str) -> tuple[list[str], dict[str, str]]:
        return ([py, "-m", "tether", "serve", "--json", "--port", str(port),
                 "--notebook-dir", str(root)], {**base, "TETHER_TOKEN": token})

    def serve_no_pyc(port: int, token: str) -> tuple[list[str], dict[str, str]]:
        argv, env = serve(port, token)
        prefix = tempfile.mkdtemp(prefix="pyc-", dir=tmp)
        return argv, {**env, "PYTHONPYCACHEPREFIX": prefix}

    def floor(port: int, token: str) -> tuple[list[str], dict[str, str]]:
        return [py, "-c", "pass"], base

    def at(ref: Path) -> Callable[[int, str], tuple[list[str], dict[str, str]]]:
        def serve_ref(port: int, token: str) -> tuple[list[str], dict[str, str]]:
            argv, env = serve(port, token)
            return argv, {**env, "PYTHONPATH": str(ref)}
        return serve_ref

    found: dict[str, Callable[[int, str], tuple[list[str], dict[str, str]]]] = {
        "python -c pass": floor, "jupyter server": plain,
        "jupyter server, rfc3987 off": plain_no_rfc, "tether serve": serve,
        "tether serve, no .pyc": serve_no_pyc}
    for ref in refs:
        found[f"tether serve from {ref}"] = at(ref)
    return found


def importtime(tmp: Path) -> list[tuple[int, str]]:
    token = secrets.token_hex(16)
    port = free_port()
    argv, env = variants(tmp, [])["tether serve"](port, token)
    argv = [argv[0], "-X", "importtime", *argv[1:]]
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout is not None and proc.stderr is not None
    select.select([proc.stdout], [], [], DEADLINE)
    proc.terminate()
    _, errors = proc.communicate(timeout=30)
    rows = []
    for line in errors.splitlines():
        if line.startswith("import time:") and "|" in line and "cumulative" not in line:
            _, cum, name = line.split("|")
            if not name.startswith("  "):  # top level only: the cumulative figures add up
                rows.append((int(cum), name.strip()))
    return sorted(rows, reverse=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=7, help="starts per variant (default 7)")
    ap.add_argument("--importtime", action="store_true", help="list the slowest imports too")
    ap.add_argument("--ref", type=Path, action="append", default=[], metavar="DIR",
                    help="also start the tether package in DIR (put first on PYTHONPATH), e.g. "
                         "an older checkout: `git archive REV tether | tar -x -C DIR`")
    args = ap.parse_args()
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as t:
        tmp = Path(t)
        kinds = variants(tmp, [r.resolve() for r in args.ref])
        for name in kinds:
            if name.startswith("tether serve") and "no .pyc" not in name:  # .pyc written
                warm, token = free_port(), secrets.token_hex(16)
                start(*kinds[name](warm, token), warm, token, True)
        order = list(kinds)
        shuffle = random.Random(16).shuffle
        for _ in range(args.n):
            shuffle(order)  # no variant always follows the same one
            for name in order:
                make = kinds[name]
                port, token = free_port(), secrets.token_hex(16)
                argv, env = make(port, token)
                results.setdefault(name, []).append(
                    start(argv, env, port, token, json_line=name.startswith("tether")))
        imports = importtime(tmp) if args.importtime else []

    base = statistics.median(r["first_200"] for r in results["jupyter server"])
    base_cpu = statistics.median(r["cpu"] for r in results["jupyter server"])
    print(f"| start until the first 200 (n={args.n}) | median s | min | max | x jupyter server "
          "| CPU s, median | x jupyter server | JSON line, median s |")
    print("|---|---|---|---|---|---|---|---|")
    summary: dict[str, dict[str, float]] = {}
    for name in kinds:
        runs = results[name]
        xs = [r["first_200"] for r in runs]
        med, cpu = statistics.median(xs), statistics.median(r["cpu"] for r in runs)
        ready = statistics.median(r["ready"] for r in runs) if "ready" in runs[0] else None
        summary[name] = {"median": med, "min": min(xs), "max": max(xs), "ratio": med / base,
                         "cpu": cpu, "cpu_ratio": cpu / base_cpu}
        if ready is not None:
            summary[name]["ready"] = ready
        print(f"| {name} | {med:.3f} | {min(xs):.3f} | {max(xs):.3f} | {med / base:.2f} "
              f"| {cpu:.2f} | {cpu / base_cpu:.2f} | {'' if ready is None else f'{ready:.3f}'} |")
    if imports:
        total = sum(c for c, _ in imports)
        print(f"\ntop-level imports of one `tether serve` start: {total / 1e6:.3f} s in all")
        for cum, name in imports[:15]:
            print(f"  {cum / 1e3:8.1f} ms  {name}")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    path = out / time.strftime("serve-%Y%m%d-%H%M%S.json")
    path.write_text(json.dumps({"n": args.n, "python": platform.python_version(),
                                "summary": summary, "runs": results,
                                "imports_us": imports[:40]}, indent=1))
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
