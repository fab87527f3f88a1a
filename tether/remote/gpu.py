"""GPU facts: NVML through nvidia-ml-py, ``nvidia-smi`` as fallback, nothing on a GPU-less box.

Parsers are pure functions fed with recorded outputs in the tests; the I/O around them is thin.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

NVIDIA_SMI_ENV = "TETHER_NVIDIA_SMI"  # tests point this at a recorded-output replayer
SMI_QUERY = "index,name,memory.used,memory.total,utilization.gpu,utilization.memory"
SMI_TIMEOUT = 10.0
MIB = 1024 * 1024


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_used: int  # bytes
    memory_total: int  # bytes
    utilization_gpu: int  # percent
    utilization_memory: int  # percent
    uuid: str = ""


def parse_nvidia_smi_csv(text: str) -> list[GpuInfo]:
    """Parse ``nvidia-smi --query-gpu=<SMI_QUERY> --format=csv,nounits,noheader``."""
    gpus = []
    for line in text.strip().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 6:
            continue
        index, name, used, total, util, mem_util = fields[:6]
        gpus.append(
            GpuInfo(
                index=int(index),
                name=name,
                memory_used=_int(used) * MIB,
                memory_total=_int(total) * MIB,
                utilization_gpu=_int(util),
                utilization_memory=_int(mem_util),
            )
        )
    return gpus


def _int(text: str) -> int:
    # nvidia-smi prints "[N/A]" or "[Not Supported]" for fields a board lacks
    try:
        return int(float(text))
    except ValueError:
        return 0


def nvidia_smi() -> str | None:
    """The ``nvidia-smi`` to run, or None where there is none."""
    return os.environ.get(NVIDIA_SMI_ENV) or shutil.which("nvidia-smi")


def _smi(exe: str, query: str) -> str | None:
    """One ``nvidia-smi --query-...`` in CSV; None (logged) if it fails."""
    try:
        return subprocess.run(
            [exe, query, "--format=csv,nounits,noheader"],
            capture_output=True, text=True, timeout=SMI_TIMEOUT, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("nvidia-smi %s failed: %s", query, e)
        return None


def _nvml(query: Callable[[Any], T]) -> T | None:
    """Run ``query(pynvml)`` inside an NVML session; None without NVML or a driver, or on error."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None  # no driver: not an error on a CPU machine
    try:
        return query(pynvml)
    except pynvml.NVMLError as e:
        log.warning("NVML query failed, falling back to nvidia-smi: %s", e)
        return None
    finally:
        pynvml.nvmlShutdown()


def _from_nvml() -> list[GpuInfo] | None:
    return _nvml(_nvml_gpus)


def _nvml_gpus(pynvml: Any) -> list[GpuInfo]:
    gpus = []
    for i in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(i)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        try:
            util = pynvml.nvmlDeviceGetUtilizationRates(handle)
            gpu_util, mem_util = int(util.gpu), int(util.memory)
        except pynvml.NVMLError:
            gpu_util = mem_util = 0
        name = pynvml.nvmlDeviceGetName(handle)
        uuid = pynvml.nvmlDeviceGetUUID(handle)
        gpus.append(
            GpuInfo(
                index=i,
                name=name.decode() if isinstance(name, bytes) else name,
                memory_used=int(mem.used),
                memory_total=int(mem.total),
                utilization_gpu=gpu_util,
                utilization_memory=mem_util,
                uuid=uuid.decode() if isinstance(uuid, bytes) else uuid,
            )
        )
    return gpus


def _from_smi() -> list[GpuInfo]:
    exe = nvidia_smi()
    out = _smi(exe, f"--query-gpu={SMI_QUERY}") if exe else None
    return parse_nvidia_smi_csv(out) if out else []


def query_gpus() -> list[GpuInfo]:
    """Every GPU this machine has, with memory and utilisation; [] without a GPU or driver.

    Blocking (NVML calls, or a subprocess): call it through ``asyncio.to_thread`` on a server.
    """
    if os.environ.get(NVIDIA_SMI_ENV):
        return _from_smi()
    gpus = _from_nvml()
    return gpus if gpus is not None else _from_smi()


# --- who holds the GPUs -------------------------------------------------------------------

DEVICE_GLOB_ENV = "TETHER_NVIDIA_DEVICES"  # tests point this at temp files standing in
DEFAULT_DEVICE_GLOB = "/dev/nvidia[0-9]*"
SMI_APPS_QUERY = "pid,gpu_uuid,used_memory"


@dataclass(frozen=True)
class GpuHolder:
    """A process with memory or an open device on a GPU."""

    pid: int
    gpu: int  # index; -1 where unknown
    memory: int | None  # bytes; None where the driver does not say (fd holders, containers)
    source: str  # "nvml", "nvidia-smi" or "fd"


def parse_compute_apps_csv(text: str, uuid_to_index: dict[str, int]) -> list[GpuHolder]:
    """Parse ``nvidia-smi --query-compute-apps=<SMI_APPS_QUERY> --format=csv,nounits,noheader``."""
    holders = []
    for line in text.strip().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 3 or not fields[0].isdigit():
            continue
        used = fields[2]
        memory = _int(used) * MIB if used.replace(".", "").isdigit() else None
        holders.append(GpuHolder(int(fields[0]), uuid_to_index.get(fields[1], -1), memory,
                                 "nvidia-smi"))
    return holders


def device_paths() -> dict[str, int]:
    """The GPU device nodes (real path -> GPU index), ``/dev/nvidiaN`` unless overridden."""
    pattern = os.environ.get(DEVICE_GLOB_ENV) or DEFAULT_DEVICE_GLOB
    paths = {}
    for path in glob.glob(pattern):
        digits = re.search(r"(\d+)$", path)
        paths[os.path.realpath(path)] = int(digits.group(1)) if digits else -1
    return paths


def fd_holders(devices: dict[str, int] | None = None, proc_root: str = "/proc") -> list[GpuHolder]:
    """Processes with a GPU device open, from ``/proc/*/fd`` (what NVML may not list).

    Processes whose descriptors we may not read (other users, when not root) are skipped.
    """
    devices = device_paths() if devices is None else devices
    if not devices:
        return []
    holders = []
    for entry in os.scandir(proc_root):
        if not entry.name.isdigit():
            continue
        seen: set[int] = set()
        try:
            for fd in os.scandir(f"{entry.path}/fd"):
                try:
                    target = os.readlink(fd.path)
                except OSError:
                    continue
                if target in devices:
                    seen.add(devices[target])
        except OSError:
            continue
        holders += [GpuHolder(int(entry.name), index, None, "fd") for index in sorted(seen)]
    return holders


def _holders_nvml() -> list[GpuHolder] | None:
    return _nvml(_nvml_holders)


def _nvml_holders(pynvml: Any) -> list[GpuHolder]:
    holders = []
    for i in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(i)
        procs = list(pynvml.nvmlDeviceGetComputeRunningProcesses(handle))
        try:
            procs += pynvml.nvmlDeviceGetGraphicsRunningProcesses(handle)
        except pynvml.NVMLError:
            pass  # not supported on compute-only boards
        for p in procs:
            used = getattr(p, "usedGpuMemory", None)
            holders.append(GpuHolder(int(p.pid), i, int(used) if used else None, "nvml"))
    return holders


def _holders_smi() -> list[GpuHolder]:
    exe = nvidia_smi()
    if not exe:
        return []
    uuids = {g.uuid: g.index for g in _from_smi_with_uuid(exe)}
    out = _smi(exe, f"--query-compute-apps={SMI_APPS_QUERY}")
    return parse_compute_apps_csv(out, uuids) if out else []


def _from_smi_with_uuid(exe: str) -> list[GpuInfo]:
    gpus = []
    for line in (_smi(exe, "--query-gpu=index,uuid") or "").strip().splitlines():
        index, _, uuid = (f.strip() for f in line.partition(","))
        if index.isdigit():
            gpus.append(GpuInfo(int(index), "", 0, 0, 0, 0, uuid))
    return gpus


def query_holders() -> list[GpuHolder]:
    """Every process holding a GPU: the driver's list (NVML, else nvidia-smi) plus fd holders.

    A pid appears once per GPU; the driver's entry (with memory) wins over a bare fd holder.
    Blocking: call it through ``asyncio.to_thread`` on a server.
    """
    driver = None if os.environ.get(NVIDIA_SMI_ENV) else _holders_nvml()
    if driver is None:
        driver = _holders_smi()
    known = {(h.pid, h.gpu) for h in driver} | {(h.pid, -1) for h in driver if h.gpu == -1}
    return driver + [h for h in fd_holders() if (h.pid, h.gpu) not in known]


# --- who uses the GPUs: per-process utilisation ------------------------------------------------

PMON_ARGS = ("pmon", "-c", "1", "-s", "u")  # one sample of per-process SM/memory utilisation


@dataclass(frozen=True)
class ProcessUtil:
    """How much of a GPU one process used over the last sampling window."""

    pid: int
    gpu: int
    sm: int  # percent of the streaming multiprocessors' time
    memory: int  # percent of the memory controller's time

    @property
    def busy(self) -> bool:
        return self.sm > 0 or self.memory > 0


def parse_pmon(text: str) -> list[ProcessUtil]:
    """Parse ``nvidia-smi pmon -c 1 -s u``: columns are found by name, since drivers add some
    (``jpg``, ``ofa``) between releases; ``-`` (no sample) counts as 0."""
    columns: list[str] = []
    found = []
    for line in text.splitlines():
        fields = line.split()
        if line.startswith("#"):
            if not columns and "pid" in fields:
                columns = fields[1:]
            continue
        if not columns or len(fields) < len(columns) - 1 or not fields[1].isdigit():
            continue
        row = dict(zip(columns, fields))
        found.append(ProcessUtil(int(row["pid"]), int(_int(row.get("gpu", "-1"))),
                                 _int(row.get("sm", "0")), _int(row.get("mem", "0"))))
    return found


def _nvml_process_util(pynvml: Any, since_us: int) -> list[ProcessUtil]:
    found = []
    for i in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(i)
        try:
            samples = pynvml.nvmlDeviceGetProcessUtilization(handle, since_us)
        except pynvml.NVMLError as e:
            # no sample since then: nothing ran (the driver answers SUCCESS or NOT_FOUND)
            if e.value in (pynvml.NVML_SUCCESS, pynvml.NVML_ERROR_NOT_FOUND):
                continue
            raise
        found += [ProcessUtil(int(s.pid), i, int(s.smUtil), int(s.memUtil)) for s in samples]
    return found


def _process_util_smi() -> list[ProcessUtil] | None:
    exe = nvidia_smi()
    if not exe:
        return None
    try:
        out = subprocess.run([exe, *PMON_ARGS], capture_output=True, text=True,
                             timeout=SMI_TIMEOUT, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("nvidia-smi pmon failed: %s", e)
        return None
    return parse_pmon(out)


def query_process_util(since: float) -> list[ProcessUtil] | None:
    """Per-process GPU utilisation since ``since`` (epoch seconds; NVML keeps a window of
    samples), or ``nvidia-smi pmon``'s one-second sample; None where neither can tell.

    Blocking (NVML calls, or a subprocess of about a second): call it through
    ``asyncio.to_thread`` on a server.
    """
    if not os.environ.get(NVIDIA_SMI_ENV):
        found = _nvml(lambda pynvml: _nvml_process_util(pynvml, int(since * 1e6)))
        if found is not None:
            return found
    return _process_util_smi()
