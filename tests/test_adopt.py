"""Kernels that outlive their server: kill -9, SIGTERM, a new server adopts them
(tether/remote/adopt.py, docs/kernels-and-gpu.md)."""

from __future__ import annotations

import asyncio
from pathlib import Path


from tests.conftest import RunningServer, start_server, stop_server
from tests.kernel_client import Api, alive_pids, kill_pids, wait_dead

COUNTER = ("import threading, time\nx = 42\nticks = [0]\n"
           "def _count():\n    while True:\n        ticks[0] += 1\n        time.sleep(0.05)\n"
           "threading.Thread(target=_count, daemon=True).start()\nimport os; print(os.getpid())")


def api(server: RunningServer) -> Api:
    return Api(server.url, server.token)


async def kernel_with_state(server: RunningServer, path: str = "kept.ipynb") -> tuple[dict, int]:
    session = await api(server).new_session(path)
    ch = await api(server).connect(session["kernel"]["id"])
    try:
        pid = int((await ch.execute(COUNTER)).strip())
    finally:
        ch.close()
    return session, pid


async def run(server: RunningServer, kernel_id: str, code: str) -> str:
    ch = await api(server).connect(kernel_id)
    try:
        return (await ch.execute(code)).strip()
    finally:
        ch.close()


def kill9(server: RunningServer) -> None:
    server.proc.kill()
    server.proc.wait(10)


def test_kill9_then_adopted(tmp_path: Path) -> None:
    first = start_server(tmp_path)
    pids: list[int] = []
    try:
        session, pid = asyncio.run(kernel_with_state(first))
        pids.append(pid)
        kid = session["kernel"]["id"]
        kill9(first)
        assert alive_pids([pid]) == [pid]
        second = start_server(tmp_path)
        try:
            assert second.info.get("adopted") == [kid]
            kernels = asyncio.run(api(second).call("GET", "/api/kernels"))
            assert [k["id"] for k in kernels] == [kid]
            sessions = asyncio.run(api(second).call("GET", "/api/sessions"))
            assert [(s["id"], s["path"]) for s in sessions] == [(session["id"], "kept.ipynb")]
            out = asyncio.run(run(second, kid, "import os, time; t = ticks[0]; time.sleep(0.3); "
                                               "print(x, os.getpid() == %d, ticks[0] > t)" % pid))
            assert out == "42 True True"
        finally:
            stop_server(second)
        assert asyncio.run(wait_dead([pid])) == []
    finally:
        kill_pids(pids)
