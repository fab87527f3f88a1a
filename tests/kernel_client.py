"""A minimal Jupyter client for tests and the benchmark: REST over HTTP, code over the websocket.

Stands in for Colab: sessions through ``/api/sessions``, cells through
``/api/kernels/<id>/channels`` with the token in a header and Colab's Origin.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tornado.websocket import WebSocketClientConnection

from tether.replay import XSSI_PREFIX, ColabClient, execute_request

# The child matrix of docs/kernel-gpu-lifecycle.md, printed as {"what": pid}; the stubborn
# child ignores SIGINT (the interrupt) as well as SIGTERM, so only SIGKILL ends it. DEVICE is the
# stand-in for /dev/nvidia0 held open by a setsid child (fd-holder detection).
CHILD_MATRIX = r'''
import json, multiprocessing as mp, os, subprocess, sys, time
PY = sys.executable
def _ready(cmd, **kw):
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, **kw)
    assert p.stdout.readline().strip() == "ready"
    return p.pid
pids = {"kernel": os.getpid()}
pids["plain"] = subprocess.Popen(["sleep", "1001"]).pid
pids["setsid"] = subprocess.Popen(["sleep", "1002"], start_new_session=True).pid
pids["ignores_term"] = _ready([PY, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); signal.signal(signal.SIGINT, signal.SIG_IGN); print('ready', flush=True); time.sleep(1003)"])
pids["orphan"] = int(subprocess.run("nohup sleep 1004 >/dev/null 2>&1 & echo $!", shell=True, capture_output=True, text=True).stdout)
_ctx = mp.get_context("fork")
_p = _ctx.Process(target=time.sleep, args=(1005,)); _p.start(); pids["mp"] = _p.pid
_d = _ctx.Process(target=time.sleep, args=(1006,), daemon=True); _d.start(); pids["mp_daemon"] = _d.pid
if DEVICE:
    pids["gpu_holder"] = _ready([PY, "-c", f"import time; f = open({DEVICE!r}, 'rb'); print('ready', flush=True); time.sleep(1007)"], start_new_session=True)
print(json.dumps(pids))
'''


def matrix_code(device: str = "") -> str:
    return f"DEVICE = {device!r}\n" + CHILD_MATRIX


@dataclass
class Api:
    """REST calls that must succeed (4xx/5xx raise), and kernel channels, over tether.replay."""

    url: str  # http://127.0.0.1:PORT (no trailing slash)
    token: str

    async def call(self, method: str, path: str, body: Any = None, timeout: float = 60) -> Any:
        async with ColabClient(self.url, self.token, timeout=timeout) as client:
            reply = await client.request(method, path, body if body is not None else (
                b"" if method in ("POST", "PUT", "PATCH") else None),
                headers={"Content-Type": "application/json"})
        if reply.code >= 400:
            raise AssertionError(f"{method} {path}: HTTP {reply.code} {reply.body!r}")
        text = reply.body.decode() if reply.body else ""
        return json.loads(text.removeprefix(XSSI_PREFIX)) if text else None

    async def new_session(self, path: str, kernel: str = "python3") -> dict[str, Any]:
        return await self.call("POST", "/api/sessions", {
            "path": path, "name": path, "type": "notebook", "kernel": {"name": kernel}})

    async def connect(self, kernel_id: str) -> KernelChannel:
        session = uuid.uuid4().hex
        conn = await ColabClient(self.url, self.token).connect_kernel(kernel_id, session)
        return KernelChannel(conn, session)


class KernelChannel:
    def __init__(self, conn: WebSocketClientConnection, session: str) -> None:
        self.conn = conn
        self.session = session

    def close(self) -> None:
        self.conn.close()

    async def execute(self, code: str, timeout: float = 60, wait: bool = True) -> str:
        """Run ``code``; its stdout (error text raises). ``wait=False``: send and return."""
        msg_id = uuid.uuid4().hex
        self.conn.write_message(json.dumps(execute_request(msg_id, code, self.session)))
        if not wait:
            return ""
        return await asyncio.wait_for(self._collect(msg_id), timeout)

    async def _collect(self, msg_id: str) -> str:
        out: list[str] = []
        while True:
            raw = await self.conn.read_message()
            if raw is None:
                raise AssertionError("kernel websocket closed: " + "".join(out))
            msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                out.append(content["text"])
            elif kind == "execute_result":
                out.append(content["data"].get("text/plain", ""))
            elif kind == "error":
                raise AssertionError("cell failed: " + "\n".join(content["traceback"]))
            elif kind == "status" and content["execution_state"] == "idle":
                return "".join(out)


# --- process checks shared by the life-cycle tests and the benchmark ---------------------------

# Each pid a test names, pinned to the process it named when first seen (its start time): pids
# are reused (pid_max is 32768 here), and a reused pid must count as gone, never be killed.
# tests/conftest.py empties this before each test.
PINNED: dict[int, object] = {}


def _pinned(pid: int):  # -> psutil.Process
    import psutil

    proc = PINNED.get(pid)
    if proc is None:
        proc = PINNED[pid] = psutil.Process(pid)  # raises NoSuchProcess if already gone
    return proc


def alive_pids(pids: dict[str, int] | list[int]) -> list[int]:
    """The pids that still run as the process first seen with that pid (a zombie has let go of
    everything: it counts as gone, and so does a pid now reused by another process)."""
    import psutil

    values = list(pids.values()) if isinstance(pids, dict) else list(pids)
    found = []
    for pid in values:
        try:
            proc = _pinned(pid)
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(pid)
        except psutil.Error:
            continue
    return found


async def wait_dead(pids: dict[str, int] | list[int], timeout: float = 15.0) -> list[int]:
    """Wait (bounded) until none of ``pids`` runs; the survivors."""
    import time

    deadline = time.monotonic() + timeout
    while (left := alive_pids(pids)) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return left


def kill_pids(pids: list[int]) -> None:
    """Test clean-up: SIGKILL processes a test started (each by its pid)."""
    import psutil

    for pid in pids:
        try:
            proc = _pinned(pid)
            if proc.is_running():  # the process the test started, not one that reused its pid
                proc.kill()
        except psutil.Error:
            continue


def write_kernelspec(jupyter_path: Path, name: str, argv: list[str], env: dict[str, str]) -> None:
    spec_dir = jupyter_path / "kernels" / name
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps(
        {"argv": argv, "display_name": name, "language": "python", "env": env}))


def make_kernelspecs(root: Path) -> dict[str, str]:
    """Kernelspecs for the matrix: without psutil (a psutil.py that raises ImportError on the
    kernel's PYTHONPATH), and without tether (its install path removed from sys.path, as in a
    user's own Python). Returns the environment that makes a server see them."""
    import sys

    import tether

    jupyter_path = root / "share" / "jupyter"
    hide = root / "hide-psutil"
    hide.mkdir(parents=True, exist_ok=True)
    (hide / "psutil.py").write_text("raise ImportError('psutil hidden for this test')\n")
    base = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    write_kernelspec(jupyter_path, "nopsutil", base, {"PYTHONPATH": str(hide)})
    install = str(Path(tether.__file__).resolve().parents[1])
    launcher = (f"import sys; sys.path[:] = [p for p in sys.path if p != {install!r}]; "
                "sys.modules.pop('tether', None); "
                "from ipykernel import kernelapp; kernelapp.launch_new_instance()")
    write_kernelspec(jupyter_path, "notether", [sys.executable, "-c", launcher, "-f",
                                                "{connection_file}"], {})
    return {"JUPYTER_PATH": str(jupyter_path)}
