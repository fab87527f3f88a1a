"""GPU facts: NVML through nvidia-ml-py, ``nvidia-smi`` as fallback, nothing on a GPU-less box.

Parsers are pure functions fed with recorded outputs in the tests; the I/O around them is thin.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass

log = logging.getLogger(__name__)

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


def _from_nvml() -> list[GpuInfo] | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None  # no driver: not an error on a CPU machine
    try:
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
    except pynvml.NVMLError as e:
        log.warning("NVML query failed, falling back to nvidia-smi: %s", e)
        return None
    finally:
        pynvml.nvmlShutdown()


def _from_smi() -> list[GpuInfo]:
    exe = nvidia_smi()
    if not exe:
        return []
    try:
        out = subprocess.run(
            [exe, f"--query-gpu={SMI_QUERY}", "--format=csv,nounits,noheader"],
            capture_output=True, text=True, timeout=SMI_TIMEOUT, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("nvidia-smi failed: %s", e)
        return []
    return parse_nvidia_smi_csv(out)


def query_gpus() -> list[GpuInfo]:
    """Every GPU this machine has, with memory and utilisation; [] without a GPU or driver.

    Blocking (NVML calls, or a subprocess): call it through ``asyncio.to_thread`` on a server.
    """
    if os.environ.get(NVIDIA_SMI_ENV):
        return _from_smi()
    gpus = _from_nvml()
    return gpus if gpus is not None else _from_smi()
