"""Colab's direct mode against a real tether server and real ipykernel kernels."""

from __future__ import annotations

import pytest

from tether.config import COLAB_ORIGIN
from tether.replay import ColabClient, replay



async def test_full_replay_passes(server):
    checks = await replay(server.url, server.token)
    failed = [c for c in checks if not c.ok]
    assert not failed, failed
    assert {c.name for c in checks} >= {"preflight /", "kernel runs code", "session deleted"}


@pytest.mark.parametrize("path", ["/", "/tree", "/api/colab/build-info", "/api/kernels/x/channels",
                                  "/api/contents/var/colab/app.log", "/no/such/path"])
async def test_preflight_everywhere_without_token(server, path):
    async with ColabClient(server.url, "wrong-token") as c:
        resp = await c.preflight(path, "POST")
    assert 200 <= resp.code < 300
    assert resp.headers["Access-Control-Allow-Origin"] == COLAB_ORIGIN
    assert resp.headers["Access-Control-Allow-Credentials"] == "true"
    assert resp.headers["Access-Control-Allow-Private-Network"] == "true"
    assert "DELETE" in resp.headers["Access-Control-Allow-Methods"]
    assert resp.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    assert "Origin" in resp.headers.get_list("Vary")


async def test_foreign_origin_gets_no_grant(server):
    async with ColabClient(server.url, server.token, origin="https://evil.example") as c:
        pre = await c.preflight("/api/sessions", "POST")
        resp = await c.request("GET", "/api/status")
    assert "Access-Control-Allow-Origin" not in pre.headers
    assert "Access-Control-Allow-Private-Network" not in pre.headers
    assert "Access-Control-Allow-Origin" not in resp.headers


async def test_no_token_is_403_with_cors(server):
    async with ColabClient(server.url, "0" * 48) as c:
        resp = await c.request("GET", "/api/kernels")
        colab = await c.request("GET", "/api/colab/resources")
    assert resp.code == 403 and colab.code == 403
    # the browser must see the 403, not an opaque CORS failure
    assert resp.headers["Access-Control-Allow-Origin"] == COLAB_ORIGIN


async def test_colab_endpoints_shapes(server):
    async with ColabClient(server.url, server.token) as c:
        raw = await c.request("GET", "/api/colab/resources")
        assert raw.body.startswith(b")]}'\n")
        res = await c.get_json("/api/colab/resources")
        build = await c.get_json("/api/colab/build-info")
        drive = await c.get_json("/api/colab/drive")
        logs = await c.request("GET", "/api/contents/var/colab/app.log")
    assert res["memory"]["totalBytes"] >= res["memory"]["freeBytes"] > 0
    disk = res["disks"][0]["filesystem"]
    assert disk["totalBytes"] > disk["usedBytes"] > 0 and disk["label"]
    assert res["gpus"] == []  # no GPU on this machine
    assert build["release_tag"].startswith("tether-")
    assert drive == {"dfs": []}
    assert logs.code == 404


async def test_resources_count_kernel_memory(server):
    async with ColabClient(server.url, server.token) as c:
        session = await c.create_session("mem.ipynb")
        try:
            out = await c.execute(session["kernel"]["id"], "x = 41\nprint(x + 1)")
            assert out.stdout == "42\n"
            res = await c.get_json("/api/colab/resources")
        finally:
            assert await c.delete_session(session["id"]) == 204
    kernels = {k["uuid"]: k["usedBytes"] for k in res["memory"]["kernels"]}
    assert kernels[session["kernel"]["id"]] > 10 * 1024 * 1024  # a python kernel is > 10 MiB


async def test_kernel_state_kept_across_websockets(server):
    async with ColabClient(server.url, server.token) as c:
        session = await c.create_session("state.ipynb")
        kid = session["kernel"]["id"]
        try:
            await c.execute(kid, "x = 41")
            out = await c.execute(kid, "x + 1")  # a new websocket, as after a reconnect
        finally:
            await c.delete_session(session["id"])
    assert (out.status, out.result) == ("ok", "42")


async def test_hand_started_jupyter_server_is_colab_ready(tmp_path):
    """The extension is enabled on install: a plain `jupyter server` gets it too."""
    import asyncio
    import os
    import subprocess
    import sys

    from tether.remote.state import running_servers

    runtime = tmp_path / "rt"
    token = "cd" * 24
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime), "JUPYTER_TOKEN": token}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter_server", "--port=0", "--no-browser", "--allow-root",
         f"--ServerApp.root_dir={tmp_path}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with asyncio.timeout(60):
            while not (servers := running_servers(str(runtime))):
                assert proc.poll() is None, "jupyter server exited"
                await asyncio.sleep(0.1)  # polling the server's own state file, bounded above
        state = servers[0]
        assert state.pid == proc.pid and state.token == token
        checks = await replay(state.url, token)
        assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    finally:
        proc.terminate()
        proc.wait(30)


async def test_colab_endpoints_are_not_activity(server):
    """Colab's resource monitor polls: looking must not keep an idle server alive."""
    import asyncio

    async with ColabClient(server.url, server.token) as c:
        await c.request("GET", "/api/contents")  # activity: the control, it moves the clock
        before = (await c.get_json("/api/status"))["last_activity"]
        await asyncio.sleep(0.05)  # timestamps must be able to differ
        for path in ("/api/colab/resources", "/api/colab/build-info", "/api/colab/drive"):
            assert (await c.request("GET", path)).code == 200
        assert (await c.get_json("/api/status"))["last_activity"] == before
        await c.request("GET", "/api/contents")
        assert (await c.get_json("/api/status"))["last_activity"] != before
