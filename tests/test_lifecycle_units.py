"""The life-cycle pieces that need no server: parsers, fd scan, the safe-kill rule, the sweep,
the kernel shim. Real processes, fake GPU devices."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tether import identity
from tether.config import ServeConfig
from tether.errors import ConfigError
from tether.remote import gpu, lifecycle, sweep
from tether.remote.idle import check_interval

FIXTURES = Path(__file__).parent / "fixtures"
FAKE_SMI = FIXTURES / "fake_nvidia_smi.py"
UUID0 = "GPU-5e1f9c6a-2b7d-8f4e-1a3c-9d0b7e6f5a41"


def ready_python(start, code: str, **kw) -> subprocess.Popen:
    p = start(sys.executable, "-c", code + "\nprint('ready', flush=True)\nimport time\n"
              "time.sleep(600)", stdout=subprocess.PIPE, text=True, **kw)
    assert p.stdout.readline().strip() == "ready"
    return p


# --- GPU accounting ----------------------------------------------------------------------------

def test_parse_compute_apps_maps_uuid_and_missing_memory():
    text = (FIXTURES / "nvidia-smi" / "query-compute-apps.csv").read_text()
    holders = gpu.parse_compute_apps_csv(text, {UUID0: 0})
    assert holders == [
        gpu.GpuHolder(1234567, 0, 4096 * gpu.MIB, "nvidia-smi"),
        gpu.GpuHolder(1234568, 0, None, "nvidia-smi"),
    ]


def test_fake_nvidia_smi_replays_gpus_and_holders(monkeypatch):
    monkeypatch.setenv(gpu.NVIDIA_SMI_ENV, str(FAKE_SMI))
    monkeypatch.setenv(gpu.DEVICE_GLOB_ENV, "/nonexistent/nvidia*")
    gpus = gpu.query_gpus()
    assert [(g.index, g.name, g.memory_used // gpu.MIB) for g in gpus] == [
        (0, "NVIDIA H100 80GB HBM3", 4539), (1, "NVIDIA H100 80GB HBM3", 0)]
    holders = gpu.query_holders()
    assert {(h.pid, h.gpu, h.source) for h in holders} == {
        (1234567, 0, "nvidia-smi"), (1234568, 0, "nvidia-smi")}


def test_fd_scan_finds_a_holder_of_the_stand_in_device(tmp_path, monkeypatch, procs):
    device = tmp_path / "nvidia3"
    device.write_bytes(b"")
    monkeypatch.setenv(gpu.DEVICE_GLOB_ENV, str(tmp_path / "nvidia[0-9]*"))
    holder = ready_python(procs, f"f = open({str(device)!r}, 'rb')")
    found = [h for h in gpu.fd_holders() if h.pid == holder.pid]
    assert found == [gpu.GpuHolder(holder.pid, 3, None, "fd")]
    # the driver's list wins for a pid it knows; an fd-only holder is added
    monkeypatch.setenv(gpu.NVIDIA_SMI_ENV, str(FAKE_SMI))
    assert {h.pid for h in gpu.query_holders()} >= {1234567, holder.pid}


# --- the safe-kill rule and the sweep ----------------------------------------------------------

def test_never_the_server_its_ancestors_pid1_or_others():
    guard = sweep.Guard.here()
    me = psutil.Process()
    assert "ancestors" in sweep.unsafe_reason(me, guard, None)
    assert "ancestors" in sweep.unsafe_reason(psutil.Process(1), guard, None)
    for parent in me.parents():
        assert sweep.unsafe_reason(parent, guard, None)


def test_other_uid_and_deny_list_and_older_than_kernel(procs):
    p = procs("sleep", "600")
    proc = psutil.Process(p.pid)
    other = sweep.Guard(uid=os.geteuid() + 12345, protected=frozenset())
    assert sweep.unsafe_reason(proc, other, None) == "another user's process"
    guard = sweep.Guard(uid=os.geteuid(), protected=frozenset())
    later = identity.started(proc) + 10
    assert "older" in sweep.unsafe_reason(proc, guard, None, not_before=later)
    if os.geteuid() == 0:  # the root case: the marker is required
        assert "marker" in sweep.unsafe_reason(proc, guard, (sweep.MARKER_ENV, "abc"))


def test_a_kernel_is_still_found_after_the_wall_clock_moved(procs, monkeypatch):
    from psutil import _pslinux

    p = procs("sleep", "600", start_new_session=True)
    kernel = psutil.Process(p.pid)
    record = sweep.KernelRecord("k1", p.pid, p.pid, "m", identity.started(kernel))
    btime = _pslinux.boot_time()
    monkeypatch.setattr(_pslinux, "boot_time", lambda: btime + 1)  # NTP moved btime by 1 s
    assert [q.pid for q in sweep.kernel_processes(record, sweep.Guard.here())] == [p.pid]
    assert sweep.signal_kernel(record, sweep.Guard.here(), 0) == [p.pid]


def test_marker_makes_it_ours_even_as_root(procs):
    p = ready_python(procs, "", env={sweep.MARKER_ENV: "m-1"})  # exec'ed: /proc shows its env
    guard = sweep.Guard(uid=os.geteuid(), protected=frozenset())
    assert sweep.unsafe_reason(psutil.Process(p.pid), guard, (sweep.MARKER_ENV, "m-1")) == ""
    assert [q.pid for q in sweep.iter_marked(sweep.MARKER_ENV, "m-1", os.geteuid())] == [p.pid]


def test_terminate_escalates_to_sigkill_within_grace(procs):
    stubborn = ready_python(procs, "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)")
    polite = procs("sleep", "600")
    t0 = time.monotonic()
    result = sweep.terminate([psutil.Process(stubborn.pid), psutil.Process(polite.pid)], grace=0.5)
    elapsed = time.monotonic() - t0
    assert result.killed == [stubborn.pid]
    assert result.terminated == [polite.pid]
    assert not result.survivors
    assert elapsed < 0.5 + 1.0


def test_a_reused_pid_is_never_signalled(procs):
    p = procs("sleep", "600")
    real = psutil.Process(p.pid)
    stale = psutil.Process(p.pid)
    stale._create_time = real.create_time() - 100  # what a snapshot of an older process holds
    stale._ident = (stale.pid, stale._create_time)
    result = sweep.terminate([stale], grace=0.2)
    assert p.poll() is None, "the process that now has this pid was signalled"
    assert not result.killed


def test_sweep_kernel_spares_unmarked_and_ends_marked(procs):
    marker = "kernel-marker-xyz"
    marked = ready_python(procs, "", env={sweep.MARKER_ENV: marker}, start_new_session=True)
    unmarked = procs("sleep", "600", start_new_session=True)
    kernel = psutil.Process(marked.pid)
    record = sweep.KernelRecord("k1", 999_999_999, None, marker, identity.started(kernel) - 1)
    result = sweep.sweep_kernel(record, sweep.Guard.here(), grace=1.0)
    assert result.terminated == [marked.pid]
    assert marked.wait(5) is not None
    assert unmarked.poll() is None


def test_wait_gone_is_bounded(procs):
    p = procs("sleep", "600")
    t0 = time.monotonic()
    assert [q.pid for q in sweep.wait_gone([psutil.Process(p.pid)], 0.3)] == [p.pid]
    assert time.monotonic() - t0 < 1.0


# --- the provisioner's pieces -------------------------------------------------------------------

def test_kernel_env_appends_the_shim_once():
    ctx = lifecycle.ServerContext("1.2.3", sweep.Guard.here(), state_file="/x/tether-1.json")
    env = lifecycle.kernel_env({"PYTHONPATH": "/user/path"}, "kid", "mark", ctx)
    again = lifecycle.kernel_env(env, "kid", "mark2", ctx)
    assert again["PYTHONPATH"] == os.pathsep.join(["/user/path", str(lifecycle.SHIM_DIR)])
    assert again[sweep.MARKER_ENV] == "mark2"
    assert again["TETHER_SERVER_STATE"] == "/x/tether-1.json"
    assert again[sweep.KERNEL_ID_ENV] == "kid"


def test_instance_alive_guards_pid_reuse():
    me = lifecycle.new_instance_id()
    assert lifecycle.instance_alive(me)
    pid, created, nonce = me.split(".")
    assert not lifecycle.instance_alive(f"{pid}.{int(created) - 500}.{nonce}")
    assert not lifecycle.instance_alive("999999999.1.x")


def test_shim_defers_to_a_real_tether():
    env = {**os.environ, "PYTHONPATH": str(lifecycle.SHIM_DIR)}
    out = subprocess.run([sys.executable, "-c", "import tether; print(tether.__file__)"],
                         env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == str(Path(lifecycle.__file__).parents[1] / "__init__.py")


def test_shim_serves_release_without_tether(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(lifecycle.SHIM_DIR)}
    env.pop("TETHER_KERNEL_ID", None)
    code = ("import tether, sys; assert 'site-packages' not in tether.__file__; "
            "print(tether.release.__module__, tether.load_ipython_extension.__name__)\n"
            "try:\n tether.release()\nexcept Exception as e: print(type(e).__name__)")
    # -S: no site-packages, hence no installed (editable) tether: the user's own Python
    out = subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True,
                         text=True, timeout=60, check=True, cwd=tmp_path).stdout.split()
    assert out == ["tether._kernel_helper", "load_ipython_extension", "ApiError"]


# --- configuration and the command line ----------------------------------------------------------

def test_on_idle_needs_a_period():
    with pytest.raises(ConfigError):
        ServeConfig(on_idle="true")
    assert ServeConfig(on_idle="true", stop_after_idle=60).on_idle == "true"
    assert check_interval(2) == 0.5 and check_interval(3600) == 60


def test_a_gpu_context_left_by_a_dead_process_needs_a_reset(monkeypatch):
    from tether.remote.release import leftover_rows

    monkeypatch.setenv(gpu.NVIDIA_SMI_ENV, str(FAKE_SMI))  # lists pid 1234567: no such process
    monkeypatch.setenv(gpu.DEVICE_GLOB_ENV, "/nonexistent/nvidia*")
    rows = leftover_rows([], {}, [1234567])
    assert [(r["pid"], r["status"], r["gpu_memory"] // gpu.MIB, r["needs_gpu_reset"])
            for r in rows] == [(1234567, "gone", 4096, True)]
