"""``tether ps HOST`` and ``tether release HOST`` from the laptop, through a real sshd, against a
runtime that ``tether up`` started as a non-root remote user."""

from __future__ import annotations

import asyncio
import json

import pytest
from kernel_client import Api, matrix_code, wait_dead

from tests.fixtures_ssh import Prepared, run_tether, start_up
from tests.sshd import SSHBed

pytestmark = pytest.mark.timeout(600)


async def test_ps_and_release_through_ssh(prepared: Prepared, testbed: SSHBed) -> None:
    up = start_up(testbed, "gpubox")
    assert up.info, up.stop() and up.stderr()
    try:
        api = Api(up.url, up.token)
        session = await api.new_session("remote.ipynb")
        kid = session["kernel"]["id"]
        channel = await api.connect(kid)
        try:
            out = await channel.execute(matrix_code(), timeout=120)
        finally:
            channel.close()
        pids = json.loads(out.strip().splitlines()[-1])

        ps = await asyncio.to_thread(run_tether, testbed, "ps", "gpubox", "--json")
        assert ps.returncode == 0, ps.stderr
        kernel = next(k for k in json.loads(ps.stdout)["kernels"] if k["id"] == kid)
        assert kernel["path"] == "remote.ipynb"
        assert set(pids.values()) <= {p["pid"] for p in kernel["processes"]}
        table = await asyncio.to_thread(run_tether, testbed, "ps", "gpubox")
        assert "remote.ipynb" in table.stdout, table.stderr

        released = await asyncio.to_thread(run_tether, testbed, "release", "gpubox", kid[:8])
        assert released.returncode == 0, released.stdout + released.stderr
        assert "released" in released.stderr
        assert await wait_dead(pids) == []
        after = await asyncio.to_thread(run_tether, testbed, "ps", "gpubox", "--json")
        assert kid not in {k["id"] for k in json.loads(after.stdout)["kernels"]}
    finally:
        up.stop()
