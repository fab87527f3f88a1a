"""Kernels that outlive their server: kill -9, SIGTERM, a new server adopts them, over SSH
`tether restart` (tether/remote/adopt.py, docs/kernels-and-gpu.md)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import RunningServer, start_server, stop_server
from tests.fixtures_ssh import CHECK, STATE
from tests.kernel_client import Api, alive_pids, kill_pids, wait_dead

pytestmark = pytest.mark.timeout(600)



def api(server: RunningServer) -> Api:
    return Api(server.url, server.token)


async def run(server: RunningServer, kernel_id: str, code: str) -> str:
    ch = await api(server).connect(kernel_id)
    try:
        return (await ch.execute(code)).strip()
    finally:
        ch.close()


async def with_state(server: RunningServer, path: str = "kept.ipynb") -> tuple[dict, int]:
    session = await api(server).new_session(path)
    return session, int(await run(server, session["kernel"]["id"], STATE))


def kill9(server: RunningServer) -> None:
    server.proc.kill()
    server.proc.wait(10)


def kept_files(server: RunningServer) -> list[str]:
    return sorted(p.stem for p in (server.runtime_dir / "tether-kernels").glob("*.json"))


async def test_kill9_mid_cell_then_the_next_server_adopts_the_kernel(tmp_path: Path) -> None:
    first = start_server(tmp_path)
    pids: list[int] = []
    try:
        session, pid = await with_state(first)
        pids.append(pid)
        kid = session["kernel"]["id"]
        ch = await api(first).connect(kid)
        await ch.execute("print('started', flush=True); time.sleep(1); x += 0", wait=False)
        kill9(first)  # mid-cell: the cell's output may be lost, the kernel's state is not
        ch.close()
        ticks = [0]
        second = start_server(tmp_path)
        try:
            assert second.info["adopted"] == [kid] and second.info["lost"] == []
            kernels = await api(second).call("GET", "/api/kernels")
            assert [k["id"] for k in kernels] == [kid]
            sessions = await api(second).call("GET", "/api/sessions")
            assert [(s["id"], s["path"], s["kernel"]["id"]) for s in sessions] == \
                [(session["id"], "kept.ipynb", kid)]
            x, same, counting, ticks[0] = (await run(second, kid, CHECK)).split()
            assert (x, same, counting) == ("42", str(pid), "True")
            listing = await api(second).call("GET", "/tether/api/kernels")
            assert [k["pid"] for k in listing["kernels"]] == [pid] and listing["orphans"] == []
        finally:
            stop_server(second)  # Ctrl-C: kernels shut down, adopted ones too
        assert await wait_dead([pid]) == []
        assert kept_files(second) == []
    finally:
        kill_pids(pids)


async def test_sigterm_leaves_the_kernels_and_a_release_ends_an_adopted_one(tmp_path: Path,
                                                                           ) -> None:
    from tests.kernel_client import matrix_code

    first = start_server(tmp_path)
    pids: dict[str, int] = {}
    try:
        session = await api(first).new_session("matrix.ipynb")
        kid = session["kernel"]["id"]
        pids = json.loads((await run(first, kid, matrix_code())).splitlines()[-1])
        assert stop_server(first, signum=signal.SIGTERM) == 0
        assert alive_pids(pids) == list(pids.values()), "SIGTERM ends the server, not the kernel"
        assert kept_files(first) == [kid]
        second = start_server(tmp_path)
        try:
            assert second.info["adopted"] == [kid]
            released = await api(second).call("POST", f"/tether/api/kernels/{kid}/release", {})
            assert released["released"], released
            assert await wait_dead(pids, 15) == [], "every process the kernel started ends"
            assert await api(second).call("GET", "/api/kernels") == []
        finally:
            stop_server(second)
        assert kept_files(second) == []
    finally:
        kill_pids(list(pids.values()))


async def test_an_adopted_kernel_is_interrupted_and_restarted_like_any(tmp_path: Path) -> None:
    first = start_server(tmp_path)
    pids: list[int] = []
    try:
        session, pid = await with_state(first)
        pids.append(pid)
        kid = session["kernel"]["id"]
        kill9(first)
        second = start_server(tmp_path)
        try:
            ch = await api(second).connect(kid)
            try:
                cell = asyncio.ensure_future(ch.execute("time.sleep(60)", timeout=30))
                await asyncio.sleep(0.5)  # (the cell has started; it fails within 30 s anyway)
                await api(second).call("POST", f"/api/kernels/{kid}/interrupt")
                with pytest.raises(AssertionError, match="KeyboardInterrupt"):
                    await cell
                # ipykernel aborts what comes right after a failed cell (stop_on_error: an
                # aborted cell prints nothing, adopted kernel or not): ask again, bounded
                outs = [(await ch.execute("print(x)", timeout=30)).strip()]
                while outs[-1] != "42" and len(outs) < 20:
                    outs.append((await ch.execute("print(x)", timeout=30)).strip())
                assert outs[-1] == "42", f"interrupted, state kept: {outs}"
            finally:
                ch.close()
            await api(second).call("POST", f"/api/kernels/{kid}/restart")
            assert await wait_dead([pid]) == []
            new_pid = int(await run(second, kid, "import os; print(os.getpid())"))
            pids.append(new_pid)
            assert await run(second, kid, "print('x' in globals())") == "False"
            kept = json.loads((second.runtime_dir / "tether-kernels" / f"{kid}.json")
                              .read_text())
            assert kept["pid"] == new_pid and [s["session_id"] for s in kept["sessions"]] == \
                [session["id"]], "a restarted kernel outlives its server too"
        finally:
            stop_server(second)
    finally:
        kill_pids(pids)


async def test_a_kernel_that_died_meanwhile_is_reported_once(tmp_path: Path) -> None:
    first = start_server(tmp_path)
    session, pid = await with_state(first)
    kill9(first)
    os.kill(pid, signal.SIGKILL)
    assert await wait_dead([pid]) == []
    second = start_server(tmp_path)
    try:
        assert second.info["lost"] == ["kept.ipynb"] and second.info["adopted"] == []
        assert await api(second).call("GET", "/api/sessions") == []
    finally:
        stop_server(second)
    third = start_server(tmp_path)
    stop_server(third)
    assert third.info["lost"] == [], "said once"


async def test_a_process_that_is_not_the_recorded_kernel_is_never_adopted(tmp_path: Path,
                                                                         procs) -> None:
    first = start_server(tmp_path)
    session, pid = await with_state(first)
    kid = session["kernel"]["id"]
    kill9(first)
    path = first.runtime_dir / "tether-kernels" / f"{kid}.json"
    kept = json.loads(path.read_text())
    os.kill(pid, signal.SIGKILL)
    assert await wait_dead([pid]) == []
    # a process of this user with the kernel's pid and start recorded, but not its marker
    impostor = procs("sleep", "600")
    kept.update(pid=impostor.pid, started=_started(impostor.pid))
    path.write_text(json.dumps(kept))
    second = start_server(tmp_path)
    try:
        assert second.info["adopted"] == [] and second.info["lost"] == ["kept.ipynb"]
    finally:
        stop_server(second)
    assert impostor.poll() is None, "never signalled"


def _started(pid: int) -> float:
    from tether import identity

    return identity.started(psutil.Process(pid))


async def test_a_colab_client_reconnects_to_the_adopted_kernel(tmp_path: Path) -> None:
    """What Colab does when its runtime comes back: its open websocket closed, it finds the
    notebook's session again and reconnects with the same client session id."""
    from tether.replay import ColabClient, execute_request, replay

    first = start_server(tmp_path)
    pids: list[int] = []
    try:
        session, pid = await with_state(first, "colab.ipynb")
        pids.append(pid)
        kid, client_session = session["kernel"]["id"], "colab-client-1"
        async with ColabClient(first.url, first.token) as c:
            ws = await c.connect_kernel(kid, client_session)
            kill9(first)

            async def dropped() -> None:  # what was on its way (kernel_info's status) first
                while await ws.read_message() is not None:
                    pass

            await asyncio.wait_for(dropped(), 10)  # Colab sees it drop
        second = start_server(tmp_path, "--port", str(first.port))  # the same URL
        try:
            async with ColabClient(second.url, second.token) as c:
                assert (await c.preflight("/api/sessions", "POST")).code < 300
                sessions = await c.get_json("/api/sessions")
                mine = [s for s in sessions if s["path"] == "colab.ipynb"]
                assert [(s["id"], s["kernel"]["id"]) for s in mine] == [(session["id"], kid)]
                assert "memory" in await c.get_json("/api/colab/resources")
                ws = await c.connect_kernel(kid, client_session)
                try:
                    await ws.write_message(json.dumps(execute_request("m1", "print(x)",
                                                                      client_session)))
                    out = []
                    while (raw := await asyncio.wait_for(ws.read_message(), 30)) is not None:
                        msg = json.loads(raw)
                        if msg.get("parent_header", {}).get("msg_id") != "m1":
                            continue
                        if msg["msg_type"] == "stream":
                            out.append(msg["content"]["text"])
                        if msg["msg_type"] == "status" and \
                                msg["content"]["execution_state"] == "idle":
                            break
                    assert "".join(out).strip() == "42"
                finally:
                    ws.close()
            # Colab's whole sequence still passes beside the adopted kernel, which it leaves be
            checks = await replay(second.url, second.token)
            assert all(ch.ok for ch in checks), [ch for ch in checks if not ch.ok]
            assert [k["id"] for k in await api(second).call("GET", "/api/kernels")] == [kid]
        finally:
            stop_server(second)
    finally:
        kill_pids(pids)


# -- a GPU holder: still accounted, and released by the next server's idle policy --------------

async def test_an_adopted_gpu_holder_is_accounted_then_released_when_idle(tmp_path: Path) -> None:
    from tests.test_lifecycle_idle import UUID0, fake_gpus, replace

    smi, env = fake_gpus(tmp_path)
    first = start_server(tmp_path, env=env)
    pids: list[int] = []
    try:
        session, pid = await with_state(first, "holder.ipynb")
        pids.append(pid)
        kid = session["kernel"]["id"]
        replace(smi / "query-compute-apps.csv", f"{pid}, {UUID0}, 2048\n")
        kill9(first)
        second = start_server(tmp_path, "--gpu-idle-timeout", "3", "--kill-grace", "1", env=env)
        try:
            assert second.info["adopted"] == [kid]
            listing = await api(second).call("GET", "/tether/api/kernels")
            [kernel] = listing["kernels"]
            assert kernel["gpu_memory"] == 2048 * 1024 ** 2 and kernel["gpus"] == [0]
            assert listing["foreign"] == [], "its GPU memory is the kernel's, not a stranger's"
            # no client, no GPU work: the next server's idle policy releases it
            assert await wait_dead([pid], 30) == []
            deadline = time.monotonic() + 10
            while await api(second).call("GET", "/api/kernels") and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert await api(second).call("GET", "/api/kernels") == []
        finally:
            stop_server(second)
    finally:
        kill_pids(pids)


# -- over SSH: the "done when" ---------------------------------------------------------

async def test_over_ssh_kill9_and_restart_keep_the_kernel_then_nothing_is_left(prepared,
                                                                            testbed) -> None:
    from tests.fixtures_ssh import run_tether, same_kernel, start_up, wait_no_user_processes
    from tests.sshd import free_port
    from tether.replay import ColabClient

    assert run_tether(testbed, "down", "gpubox").returncode == 0
    up = start_up(testbed, "gpubox", "--port", str(free_port()))
    try:
        assert up.info, up.stderr()
        async with ColabClient(up.url, up.token, timeout=30) as c:
            session = await c.create_session("kept.ipynb")
            kid = session["kernel"]["id"]
            pid = int((await c.execute(kid, STATE)).stdout)
        seen = 0
        for how in ("kill -9", "tether restart"):
            if how == "kill -9":
                server = psutil.Process(up.info["remote_pid"])
                server.kill()
                server.wait(10)
            else:
                done = await asyncio.to_thread(run_tether, testbed, "restart", "gpubox",
                                               "--idle-timeout", "7200", "--json")
                assert done.returncode == 0, done.stderr
                result = json.loads(done.stdout)
                assert result["kept"] == [kid] and result["lost"] == [], result
            seen = await same_kernel(up.url, up.token, kid, session["id"], pid, seen, how, 60)
        listing = json.loads((await asyncio.to_thread(
            run_tether, testbed, "ps", "gpubox", "--json")).stdout)
        assert listing["server"]["idle_timeout"] == 7200, "the restart took the new option"
        released = await asyncio.to_thread(run_tether, testbed, "release", "gpubox",
                                           "--all", "--json")
        assert released.returncode == 0, released.stderr
        assert alive_pids([pid]) == []
    finally:
        up.stop()
    assert run_tether(testbed, "down", "gpubox").returncode == 0
    assert wait_no_user_processes(testbed) == []


def test_up_says_when_the_running_server_is_older_than_this_tether(prepared, testbed) -> None:
    from tests.fixtures_ssh import run_tether, start_up
    from tests.sshd import free_port

    first = start_up(testbed, "gpubox", "--port", str(free_port()))
    first.stop()
    assert first.info, first.stderr()
    state_file = testbed.tether_root / "runtime" / f"tether-{first.info['remote_pid']}.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "version": "0.0.1"}))  # as an older tether's
    again = start_up(testbed, "gpubox", "--port", str(free_port()))
    again.stop()
    assert again.info["reused"] is True, again.stderr()
    [warning] = [w for w in again.info["warnings"] if "older" in w]
    assert "tether 0.0.1" in warning and "`tether restart gpubox`" in warning
    assert run_tether(testbed, "down", "gpubox").returncode == 0
