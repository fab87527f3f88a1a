#!/usr/bin/env python3
"""Benchmark ``tether up`` against a real sshd on loopback (compare ratios within one run).

Figures (shared/docs/performance.md has the anchors and goals):

- time to URL on a prepared remote: ``tether up HOST`` until its URL line (printed only once the
  URL answers), with the server to start, and with a server already running (reuse);
- the floor: a hand-written ``ssh HOST 'setsid jupyter server ...'`` + ``ssh -f -N -L`` script
  with the same environment, until ``/api/status`` answers; one round of the three at a time,
  so the machine's load moves them alike (the host is prepared: the first ``up`` waits for
  what is installed after the server's start);
- jupyter-forward against the same sshd, where it can run (``--jupyter-forward VENV``);
- cold preparation to URL on a fresh remote user (a home that never saw tether), side by side:
  uv from the index, pip from the index (uv's folder on a noexec mount, so uv cannot run), and an
  air-gapped host (sshd in a network namespace with only ``lo``) prepared from the laptop's
  warm wheel cache; once more with uv and an empty laptop cache (resolve + download), with the
  laptop resolving with uv and with pip (``TETHER_RESOLVER=pip``), and the resolution alone;
- reconnect: the tunnel's ssh killed, and separately the sshd processes of the connection
  killed, until the URL answers again (goal <= 3 s);
- request round trip (``GET /api/status``, kept-alive connection) through tether's tunnel vs a
  plain ``ssh -L`` to the same server (goal <= 1.1x).

Needs root and openssh-server (it starts the test bed of ``tests/sshd.py``). Prints a Markdown
table and writes ``bench/results/up-<time>.json``. Usage: ``python bench/bench_up.py [-n 5]``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.sshd import (  # noqa: E402
    Airgap,
    SSHBed,
    free_port,
    kill_user_processes,
    start_airgap,
    start_testbed,
)

DEADLINE = 60.0
COLD_DEADLINE = 900.0


def tether(bed: SSHBed, *args: str) -> list[str]:
    return [sys.executable, "-m", "tether", *args, "-F", str(bed.config)]


class Up:
    """``tether up --json`` in the background; ``seconds`` until its URL line."""

    def __init__(self, bed: SSHBed, host: str = "gpubox", deadline: float = DEADLINE) -> None:
        self.port = free_port()
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(tether(bed, "up", host, "--json", "--port", str(self.port)),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], deadline)
        line = self.proc.stdout.readline() if ready else ""
        self.seconds = time.perf_counter() - t0
        if not line:
            self.stop()
            raise RuntimeError(f"tether up failed: {self.proc.stderr.read()[-2000:]}")  # type: ignore[union-attr]
        self.info = json.loads(line)

    def tunnel_pid(self) -> int:
        return next(c.pid for c in psutil.Process(self.proc.pid).children() if c.name() == "ssh")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def down(bed: SSHBed) -> None:
    subprocess.run(tether(bed, "down", "gpubox"), capture_output=True, timeout=120, check=True)


def wait_status(port: int, token: str, deadline: float = DEADLINE) -> float:
    """Seconds until GET /api/status answers 200 on 127.0.0.1:port (polled every 10 ms)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/api/status", headers={"Authorization": f"token {token}"})
            if conn.getresponse().status == 200:
                return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.01)
    raise RuntimeError(f"port {port} did not answer in {deadline} s")


def wait_installed_later(bed: SSHBed, deadline: float = COLD_DEADLINE) -> None:
    """Until the packages installed after the server's start (``later`` in the env's marker)
    are in the environment, as on a host where a first ``up`` ran to its end."""
    env = bed.tether_root / "env-0.1.0"
    later = json.loads((env / "tether-env.json").read_text()).get("later") or []
    wanted = [p.replace("-", "_").replace("==", "-") + ".dist-info" for p in later]
    t0 = time.perf_counter()
    while not all(any(env.glob(f"lib/python*/site-packages/{w}")) for w in wanted):
        if time.perf_counter() - t0 > deadline:
            raise RuntimeError(f"{', '.join(later)} not installed after {deadline} s")
        time.sleep(0.2)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# -- the figures -------------------------------------------------------------------------------

def time_to_url(bed: SSHBed, n: int) -> dict[str, list[float]]:
    """``n`` rounds, each: ``tether up`` with the server to start, ``tether up`` with it
    running, and the hand-written recipe, interleaved so that the machine's load moves all
    three alike."""
    fresh, reuse, recipe = [], [], []
    for _ in range(n):
        down(bed)
        up = Up(bed)
        fresh.append(up.seconds)
        up.stop()
        up = Up(bed)
        reuse.append(up.seconds)
        up.stop()
        recipe.append(hand_written_once(bed))
    return {"fresh": fresh, "reuse": reuse, "recipe": recipe}


def hand_written_once(bed: SSHBed) -> float:
    """The floor: start jupyter server detached over ssh, forward, poll until it answers."""
    env = bed.tether_root / "env-0.1.0"
    down(bed)
    port, local = free_port(), free_port()
    token = secrets.token_hex(24)
    remote = (f"setsid nohup {env}/bin/jupyter server --no-browser --ip=127.0.0.1 "
              f"--port={port} --ServerApp.port_retries=0 --IdentityProvider.token={token} "
              f"> /dev/null 2>&1 < /dev/null &")
    t0 = time.perf_counter()
    subprocess.run([*bed.ssh_argv(), remote], check=True, timeout=60)
    tunnel = subprocess.Popen(["ssh", "-F", str(bed.config), "-N", "-o",
                               "ExitOnForwardFailure=yes", "-L",
                               f"127.0.0.1:{local}:127.0.0.1:{port}", "gpubox"])
    wait_status(local, token)
    seconds = time.perf_counter() - t0
    tunnel.terminate()
    tunnel.wait(10)
    kill_jupyter(bed)
    return seconds


def kill_jupyter(bed: SSHBed) -> None:
    for p in psutil.process_iter(["uids", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["uids"] and p.info["uids"].real == bed.user.pw_uid and "jupyter" in cmd:
            p.kill()


def reconnect(bed: SSHBed, n: int) -> dict[str, list[float]]:
    up = Up(bed)
    tunnel_kill, sshd_kill = [], []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            psutil.Process(up.tunnel_pid()).kill()
            wait_status(up.port, up.info["token"])
            tunnel_kill.append(time.perf_counter() - t0)
            time.sleep(0.3)  # let the new connection settle before the next kill
            victims = []
            for pid in bed.target.connection_pids():
                proc = psutil.Process(pid)
                victims += [proc, *proc.children(recursive=True)]
            t0 = time.perf_counter()
            for v in victims:
                v.kill()
            time.sleep(0.05)  # the old forward may answer until the kill lands
            wait_status(up.port, up.info["token"])
            sshd_kill.append(time.perf_counter() - t0)
            time.sleep(0.3)
    finally:
        up.stop()
    return {"tunnel_killed": tunnel_kill, "sshd_killed": sshd_kill}


def round_trips(port: int, token: str, n: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Authorization": f"token {token}"}
    times = []
    for i in range(n + 20):
        t0 = time.perf_counter()
        conn.request("GET", "/api/status", headers=headers)
        conn.getresponse().read()
        if i >= 20:  # warm-up
            times.append(time.perf_counter() - t0)
    conn.close()
    return times


def tunnel_vs_plain(bed: SSHBed, n: int) -> dict[str, list[float]]:
    up = Up(bed)
    try:
        local = free_port()
        target = up.info["remote_sock"] or f"127.0.0.1:{up.info['remote_port']}"
        plain = subprocess.Popen(["ssh", "-F", str(bed.config), "-N", "-L",
                                  f"127.0.0.1:{local}:{target}", "gpubox"])
        try:
            wait_status(local, up.info["token"])
            result: dict[str, list[float]] = {"tether": [], "plain": []}
            for _ in range(3):  # interleaved, so load changes hit both alike
                result["tether"] += round_trips(up.port, up.info["token"], n // 3)
                result["plain"] += round_trips(local, up.info["token"], n // 3)
            return result
        finally:
            plain.terminate()
            plain.wait(10)
    finally:
        up.stop()


def cold_once(gap: Airgap, host: str, env: dict[str, str] | None = None,
              fresh: bool = True) -> tuple[float, str]:
    """A fresh home, then `tether up HOST` until its URL line: (seconds, installer line)."""
    if fresh:
        gap.reset_home()
    argv = [sys.executable, "-m", "tether", "up", host, "--json", "--port", str(free_port()),
            "-F", str(gap.config)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    assert proc.stdout is not None and proc.stderr is not None
    ready, _, _ = select.select([proc.stdout], [], [], COLD_DEADLINE)
    line = proc.stdout.readline() if ready else ""
    seconds = time.perf_counter() - t0
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    err = proc.stderr.read()
    subprocess.run([sys.executable, "-m", "tether", "down", host, "-F", str(gap.config)],
                   capture_output=True, timeout=120)
    if not line:
        raise RuntimeError(f"cold `tether up {host}` failed: {err[-2000:]}")
    how = next((x for x in err.splitlines() if "installing tether" in x), "?")
    return seconds, how


PIP_CACHE = "pip-bench-cache"


def plain_pip_once(gap: Airgap, pins: list[str], pip_cache: Path | None) -> float:
    """The baseline of the issue: on a fresh home, `python3 -m venv` + `pip install` of the same
    pinned packages over one ssh command, pip's cache warm (``pip_cache`` put back first)."""
    gap.reset_home()
    if pip_cache is not None:
        shutil.copytree(pip_cache, gap.home / PIP_CACHE, symlinks=True)
        subprocess.run(["chown", "-R", f"{gap.user.pw_uid}:{gap.user.pw_gid}",
                        str(gap.home / PIP_CACHE)], check=True, timeout=120)
    # pip's cache named, whatever pip's configuration here says about caching
    script = ("python3 -m venv ~/plain-venv && ~/plain-venv/bin/pip install --quiet "
              f"--disable-pip-version-check --cache-dir ~/{PIP_CACHE} "
              + " ".join(shlex.quote(p) for p in pins))
    t0 = time.perf_counter()
    done = subprocess.run(["ssh", "-F", str(gap.config), "airgap-online", script],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=COLD_DEADLINE)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"plain pip install failed: {done.stderr[-2000:]}")
    return seconds


def plain_pip(gap: Airgap, rounds: int) -> list[float]:
    """``rounds`` plain installs after one that warms pip's cache (kept aside between homes)."""
    import asyncio
    import platform as host
    from tether import _wheels
    target = _wheels.Platform("Linux", host.machine(), "glibc", host.libc_ver()[1],
                              "%d.%d" % sys.version_info[:2])
    pins = asyncio.run(_wheels.lock_for(target)).pins()
    plain_pip_once(gap, pins, None)
    with tempfile.TemporaryDirectory(prefix="tether-bench-pip-") as keep:
        cache: Path | None = Path(keep) / "pip"
        if (gap.home / PIP_CACHE).is_dir():
            shutil.copytree(gap.home / PIP_CACHE, cache, symlinks=True)  # type: ignore[arg-type]
        else:  # every file came from a local index or find-links: pip caches none of them
            cache = None
        return [plain_pip_once(gap, pins, cache) for _ in range(rounds)]


def cold_paths(bed: SSHBed, rounds: int) -> dict[str, list[float]]:
    """uv, pip and offline cold preparations, interleaved, each on a fresh remote home."""
    gap = start_airgap(bed)
    times: dict[str, list[float]] = {"uv": [], "pip": [], "offline": [], "uv_empty_laptop": [],
                                     "uv_empty_laptop_pip_resolve": []}
    try:
        cold_once(gap, "airgap")  # the laptop's lock and wheel cache warm, as after a first use
        for _ in range(rounds):
            times["uv"].append(cold_once(gap, "airgap-online")[0])
            gap.reset_home()
            with gap.uv_cannot_run():
                seconds, how = cold_once(gap, "airgap-online", fresh=False)
            assert "with pip" in how, how
            times["pip"].append(seconds)
            seconds, how = cold_once(gap, "airgap")
            assert "offline" in how, how
            times["offline"].append(seconds)
        for resolver in ("uv", "pip"):  # the laptop resolves with uv, then as before uv
            # a laptop that never ran tether: no lock, no wheels, no packed uv, no uv cache
            with tempfile.TemporaryDirectory(prefix="tether-bench-wheels-") as empty:
                seconds, _ = cold_once(gap, "airgap-online", {
                    "TETHER_WHEEL_CACHE": empty, "UV_CACHE_DIR": f"{empty}/uv-cache",
                    "TETHER_RESOLVER": resolver})
            times["uv_empty_laptop" if resolver == "uv" else "uv_empty_laptop_pip_resolve"] \
                .append(seconds)
        times.update(resolve_only())
        times["plain_pip"] = plain_pip(gap, rounds)
    finally:
        gap.stop()
    return times


def resolve_only() -> dict[str, list[float]]:
    """The laptop's resolution alone (this machine's platform, empty lock cache), uv vs pip."""
    import asyncio
    import platform as host
    from tether import _wheels
    target = _wheels.Platform("Linux", host.machine(), "glibc", host.libc_ver()[1],
                              "%d.%d" % sys.version_info[:2])
    times: dict[str, list[float]] = {"resolve_uv": [], "resolve_pip": []}
    saved = {k: os.environ.get(k) for k in (_wheels.CACHE_ENV, _wheels.RESOLVER_ENV)}
    try:
        for resolver in ("uv", "pip"):
            with tempfile.TemporaryDirectory(prefix="tether-bench-locks-") as empty:
                os.environ.update({_wheels.CACHE_ENV: empty, _wheels.RESOLVER_ENV: resolver})
                t0 = time.perf_counter()
                asyncio.run(_wheels.lock_for(target))
                times[f"resolve_{resolver}"].append(time.perf_counter() - t0)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return times


def jupyter_forward(bed: SSHBed, venv: Path, n: int) -> list[float] | str:
    """jupyter-forward (Fabric/paramiko) against the same sshd, if it can be made to run."""
    exe = venv / "bin" / "jupyter-forward"
    if not exe.exists():
        return f"not installed in {venv}"
    _jupyter_forward_shims(bed)
    host = f"{bed.user.pw_name}@127.0.0.1:{bed.target.port}"
    times = []
    for _ in range(n):
        down(bed)
        kill_jupyter(bed)
        t0 = time.perf_counter()
        # no -F flag: it gets user, port and key on its command line
        proc = subprocess.Popen([str(exe), host, "-i", str(bed.dir / "id_test"),
                                 "--conda-env", "tether", "--port", str(free_port())],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        url = ""
        while time.perf_counter() - t0 < DEADLINE:
            ready, _, _ = select.select([proc.stdout], [], [], 1)
            line = proc.stdout.readline() if ready else ""
            if "token=" in line and "http" in line:
                url = line
                break
            if proc.poll() is not None:
                break
        if not url:
            proc.kill()
            return "did not print a URL"
        times.append(time.perf_counter() - t0)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        kill_jupyter(bed)
    return times


def _jupyter_forward_shims(bed: SSHBed) -> None:
    """It runs `source activate ENV && jupyter lab`, and exits unless --conda-env is given:
    a no-op `activate` and a `jupyter lab` -> `jupyter server` shim in the remote ~/bin."""
    env = bed.tether_root / "env-0.1.0" / "bin"
    bin_dir = bed.home / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "jupyter").write_text(
        f'#!/bin/sh\nif [ "$1" = lab ]; then shift; exec {env}/jupyter server "$@"; fi\n'
        f'exec {env}/jupyter "$@"\n')
    (bin_dir / "jupyter").chmod(0o755)
    (bin_dir / "activate").write_text("# conda-style activation: nothing to do\n")
    for path in (bin_dir, bin_dir / "jupyter", bin_dir / "activate"):
        shutil.chown(path, bed.user.pw_uid, bed.user.pw_gid)


def cold_only(bed: SSHBed, rounds: int, lines: list[str], results: dict[str, object],
              report: bool = True) -> None:
    times = cold_paths(bed, rounds)
    results["cold"] = times
    lines.append(row("cold preparation -> URL, uv from the index", times["uv"]))
    lines.append(row("cold preparation -> URL, pip from the index (uv cannot run)", times["pip"]))
    lines.append(row("cold preparation -> URL, air-gapped, from the laptop's cache",
                     times["offline"]))
    lines.append(row("cold preparation -> URL, uv, laptop cache empty", times["uv_empty_laptop"]))
    lines.append(row("the same, the laptop resolving with pip (TETHER_RESOLVER=pip, as before)",
                     times["uv_empty_laptop_pip_resolve"]))
    lines.append(row("plain `python3 -m venv` + `pip install` of the same pins (pip cache "
                     "warm): the baseline", times["plain_pip"]))
    lines.append(row("the laptop's resolution alone, uv", times["resolve_uv"]))
    lines.append(row("the laptop's resolution alone, pip", times["resolve_pip"]))
    uv = median(times["uv"])
    results["cold_ratios"] = {"uv_vs_pip": uv / median(times["pip"]),
                              "offline_vs_uv": median(times["offline"]) / uv,
                              "empty_laptop_vs_pip": median(times["uv_empty_laptop"])
                              / median(times["pip"]),
                              "empty_laptop_vs_plain_pip": median(times["uv_empty_laptop"])
                              / median(times["plain_pip"]),
                              "warm_laptop_vs_plain_pip": uv / median(times["plain_pip"])}
    if not report:  # main() prints the whole table
        return
    print("\n".join(lines))
    for k, v in results["cold_ratios"].items():  # type: ignore[attr-defined]
        goal = {"uv_vs_pip": "<= 0.3x", "empty_laptop_vs_plain_pip": "<= 0.35x (0.25x)",
                "offline_vs_uv": "<= 1.3x"}.get(k, "-")
        print(f"- {k}: {v:.2f}x (goal: {goal})")
    out = HERE / "results" / f"up-cold-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


# -- report ------------------------------------------------------------------------------------

def row(what: str, xs: list[float], unit: float = 1.0, fmt: str = "{:.2f} s") -> str:
    xs = sorted(x * unit for x in xs)
    p90 = xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]
    return (f"| {what} | {fmt.format(median(xs))} | {fmt.format(xs[0])}-{fmt.format(xs[-1])} | "
            f"{fmt.format(p90)} | {len(xs)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-n", type=int, default=5, help="repetitions of each timing")
    ap.add_argument("--requests", type=int, default=600, help="round trips per path")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold preparations")
    ap.add_argument("--cold-rounds", type=int, default=1,
                    help="rounds of the three cold preparations (uv, pip, offline)")
    ap.add_argument("--only-cold", action="store_true", help="only the cold preparations")
    ap.add_argument("--jupyter-forward", type=Path, metavar="VENV",
                    help="a venv with jupyter-forward installed")
    args = ap.parse_args()

    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # a laptop writes its bytecode
    bed = start_testbed()
    kill_user_processes(bed.user.pw_uid)
    results: dict[str, object] = {"load_start": os.getloadavg()[0]}
    print(f"load average at the start: {os.getloadavg()[0]:.2f} (1 min)", flush=True)
    lines = ["| what | median | range | p90 | n |", "|---|---|---|---|---|"]
    try:
        if args.only_cold:
            cold_only(bed, args.cold_rounds, lines, results)
            return
        # the first up prepares the remote if needed (the cold figure is measured below), and
        # stays until what it installs after the server's start is in: a prepared host
        first = Up(bed, deadline=COLD_DEADLINE)
        wait_installed_later(bed)
        first.stop()
        ssh_true = []
        for _ in range(args.n):
            t0 = time.perf_counter()
            subprocess.run([*bed.ssh_argv(), "true"], check=True, timeout=30)
            ssh_true.append(time.perf_counter() - t0)
        lines.append(row("`ssh HOST true` (one SSH connection)", ssh_true))
        urls = time_to_url(bed, args.n)
        lines.append(row("`tether up`, prepared remote, server to start", urls["fresh"]))
        lines.append(row("`tether up`, server already running", urls["reuse"]))
        floor = urls.pop("recipe")
        lines.append(row("hand-written `ssh` + `jupyter server` + `ssh -L` (floor)", floor))
        results.update(ssh_true=ssh_true, up=urls, hand_written=floor)
        if args.jupyter_forward:
            jf = jupyter_forward(bed, args.jupyter_forward, args.n)
            results["jupyter_forward"] = jf
            lines.append(row("jupyter-forward", jf) if isinstance(jf, list)
                         else f"| jupyter-forward | {jf} | | | |")
        rec = reconnect(bed, args.n)
        lines.append(row("reconnect: tunnel ssh killed -> URL answers", rec["tunnel_killed"]))
        lines.append(row("reconnect: sshd connection killed -> URL answers", rec["sshd_killed"]))
        rtt = tunnel_vs_plain(bed, args.requests)
        lines.append(row("`GET /api/status` through tether's tunnel", rtt["tether"], 1000,
                         "{:.2f} ms"))
        lines.append(row("`GET /api/status` through a plain `ssh -L`", rtt["plain"], 1000,
                         "{:.2f} ms"))
        results.update(reconnect=rec, round_trip=rtt)
        if not args.no_cold:
            cold_only(bed, args.cold_rounds, lines, results, report=False)
    finally:
        subprocess.run(tether(bed, "down", "gpubox"), capture_output=True, timeout=120)
        kill_jupyter(bed)
        for shim in ("bin/jupyter", "bin/activate"):
            (bed.home / shim).unlink(missing_ok=True)
        shutil.rmtree(bed.home / ".jupyter_forward", ignore_errors=True)
        bed.stop()
        kill_user_processes(bed.user.pw_uid)
        shutil.rmtree(bed.dir, ignore_errors=True)

    ratios = {
        "up_fresh_vs_floor": median(urls["fresh"]) / median(floor),
        "up_reuse_vs_floor": median(urls["reuse"]) / median(floor),
        "round_trip_tether_vs_plain": median(rtt["tether"]) / median(rtt["plain"]),
    }
    results["ratios"] = ratios
    print("\n".join(lines))
    print()
    goals = {"up_fresh_vs_floor": "<= 0.5x", "empty_laptop_vs_plain_pip": "<= 0.35x (0.25x)",
             "offline_vs_uv": "<= 1.3x", "round_trip_tether_vs_plain": "<= 1.1x"}
    for k, v in [*ratios.items(), *dict(results.get("cold_ratios") or {}).items()]:
        print(f"- {k}: {v:.2f}x" + (f" (goal {goals[k]})" if k in goals else ""))
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f} (1 min)")
    out = HERE / "results" / f"up-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\n(raw figures: {out})")


if __name__ == "__main__":
    main()
