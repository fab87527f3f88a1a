#!/usr/bin/env python3
"""Benchmark ``tether up LOGIN --slurm`` against the direct SSH path to the same machine.

One run, interleaved rounds, on the idle test cluster (tests/slurm.py: a real slurmctld and
slurmd on this machine) behind the real sshd test bed (tests/sshd.py):

- **direct**: ``tether up gpubox`` (the server started on the host itself, over SSH) until
  its URL line, then ``tether down gpubox``;
- **slurm**: ``tether up gpubox --slurm`` (prepare on the login node, ``sbatch``, the job
  starts ``tether serve`` on the node, ``ssh -J`` to it) until its URL line, then ``tether down
  gpubox --slurm``.

The goal (issue 8): the Slurm path within 2 s of the direct one, so that the scheduler, not
tether, is what costs. Needs root, openssh-server and Slurm (``scripts/setup test``). Prints a
Markdown table and writes ``bench/results/slurm-<time>.json``.
Usage: ``python bench/bench_slurm.py [-n 5]``.
"""

from __future__ import annotations

import argparse
import json
import select
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.slurm import start_cluster  # noqa: E402
from tests.sshd import SSHBed, free_port, kill_user_processes, start_testbed  # noqa: E402

DEADLINE = 180.0
COLD_DEADLINE = 900.0


def tether(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "tether", *args, "-F", str(config)]


def time_up(config: Path, *args: str, deadline: float = DEADLINE) -> float:
    """Seconds until ``tether up ... --json`` prints its URL line (it checks the URL first)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(tether(config, "up", "gpubox", "--json", "--port", str(free_port()),
                                   *args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    ready, _, _ = select.select([proc.stdout], [], [], deadline)
    line = proc.stdout.readline() if ready else ""
    seconds = time.perf_counter() - t0
    proc.send_signal(signal.SIGINT)  # a Slurm job without --keep is cancelled by this
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    if not line:
        raise RuntimeError(f"tether up {' '.join(args)} failed: {proc.stderr.read()[-2000:]}")
    return seconds


def down(config: Path, *args: str) -> None:
    subprocess.run(tether(config, "down", "gpubox", *args), capture_output=True, timeout=120,
                   stdin=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=5, help="rounds (default 5)")
    args = parser.parse_args()
    bed: SSHBed = start_testbed()
    cluster = start_cluster()
    try:
        kill_user_processes(bed.user.pw_uid)
        config = bed.dir / "ssh_config_slurm"
        config.write_text(f"Include {bed.config}\nHost {cluster.host}\n  HostName 127.0.0.1\n"
                          f"  Port {bed.target.port}\n")
        time_up(config, deadline=COLD_DEADLINE)  # prepares the environment once (not timed)
        down(config)
        results: dict[str, list[float]] = {"direct": [], "slurm": []}
        for _ in range(args.n):
            results["direct"].append(time_up(config))
            down(config)
            cluster.wait_idle()
            results["slurm"].append(time_up(config, "--slurm", "--gpus", "1"))
            down(config, "--slurm")
            cluster.wait_idle()
    finally:
        cluster.stop()
        bed.stop()
        kill_user_processes(bed.user.pw_uid)
        shutil.rmtree(bed.dir, ignore_errors=True)
    direct, slurm = (statistics.median(results[k]) for k in ("direct", "slurm"))
    print("| path | median | min | max |\n|---|---|---|---|")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):.2f} s | {min(values):.2f} s | "
              f"{max(values):.2f} s |")
    print(f"\nslurm - direct: {slurm - direct:+.2f} s (goal: within 2 s); "
          f"ratio {slurm / direct:.2f}x")
    out = HERE / "results" / f"slurm-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"rounds": args.n, "seconds": results}, indent=2))


if __name__ == "__main__":
    main()
