"""A release that says "verified" is for sure: kernel cgroups, and an interrupt that keeps to the
safe-kill rule. Real servers, real kernels, the machine's real cgroup v2 (skipped without one)."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
from pathlib import Path

import psutil
import pytest
from conftest import start_server, stop_server
from kernel_client import Api, alive_pids, kill_pids, make_kernelspecs, wait_dead

from tether.remote import cgroups

# Drops the marker (env -i) and leaves the process group (setsid): only a cgroup still finds it
ESCAPE = ("import subprocess, time\n"
          "subprocess.run(['env', '-i', 'setsid', 'sh', '-c', 'sleep 1003 & echo $! > {out}'])\n")
from tests.sshd import OTHER_USER  # noqa: E402


def escaped_pid(out: Path) -> int:
    return int(out.read_text().split()[0])


def cgroups_usable() -> bool:
    own = cgroups.own_cgroup()
    return bool(own) and os.access(own, os.W_OK)


def no_cgroup_config(tmp: Path) -> dict[str, str]:
    conf = tmp / "jupyter-config"
    conf.mkdir(exist_ok=True)
    (conf / "jupyter_server_config.json").write_text(
        json.dumps({"Tether": {"kernel_cgroups": False}}))
    return {"JUPYTER_CONFIG_DIR": str(conf)}


async def kernel_running(api: Api, code: str, kernel: str = "python3") -> tuple[str, str]:
    session = await api.new_session("cg.ipynb", kernel)
    kid = session["kernel"]["id"]
    channel = await api.connect(kid)
    out = await channel.execute(code)
    channel.close()
    return kid, out


@pytest.mark.skipif(not cgroups_usable(), reason="no writable cgroup v2 here")
async def test_escaped_process_does_not_survive_release_and_it_is_verified(tmp_path):
    # what a SIGKILLed server leaves: its (empty) cgroups, named by its dead instance id
    stale = os.path.join(cgroups.own_cgroup(), "tether-1.100.deadbeef")
    os.makedirs(os.path.join(stale, "kernel-x"), exist_ok=True)
    srv = start_server(tmp_path, "--kill-grace", "1")
    api = Api(srv.url, srv.token)
    out = tmp_path / "escaped.pid"
    pids: list[int] = []
    try:
        state = json.loads((srv.runtime_dir / f"tether-{srv.proc.pid}.json").read_text())
        assert state["cgroup"] and os.path.isdir(state["cgroup"])
        assert not os.path.exists(stale), "a dead server's empty cgroups are removed at start"
        kid, _ = await kernel_running(api, ESCAPE.format(out=out))
        pids.append(escaped_pid(out))
        cg = os.path.join(state["cgroup"], f"kernel-{kid}")
        assert pids[0] in cgroups.members(cg), "the escapee is still in the kernel's cgroup"
        assert "TETHER_KERNEL_MARKER" not in psutil.Process(pids[0]).environ()
        outcome = await api.call("POST", f"/tether/api/kernels/{kid}/release", {})
        assert outcome["released"] is True and outcome["verified"] is True, outcome
        assert outcome["unverified_reason"] == ""
        assert await wait_dead(pids, 5) == []
        assert not os.path.exists(cg), "the kernel's cgroup is removed"
    finally:
        kill_pids(alive_pids(pids))
        stop_server(srv)
    assert not os.path.exists(state["cgroup"]), "the server's cgroup dir goes with it"


async def test_without_a_cgroup_the_release_says_it_could_not_verify(tmp_path):
    srv = start_server(tmp_path, "--kill-grace", "1", env=no_cgroup_config(tmp_path))
    api = Api(srv.url, srv.token)
    out = tmp_path / "escaped.pid"
    pids: list[int] = []
    try:
        state = json.loads((srv.runtime_dir / f"tether-{srv.proc.pid}.json").read_text())
        assert state["cgroup"] == ""
        kid, _ = await kernel_running(api, ESCAPE.format(out=out))
        pids.append(escaped_pid(out))
        outcome = await api.call("POST", f"/tether/api/kernels/{kid}/release", {})
        # what could be found was ended; the escapee could not be, and the report says so
        assert outcome["released"] is True and outcome["verified"] is False
        assert outcome["unverified_reason"].startswith("no kernel cgroup")
        assert alive_pids(pids) == pids
        everything = await api.call("POST", "/tether/api/release", {})
        assert everything["verified"] is False
        assert everything["unverified_reason"].startswith("no kernel cgroup")
    finally:
        kill_pids(alive_pids(pids))
        stop_server(srv)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
async def test_release_interrupt_spares_another_users_process_in_the_group(tmp_path):
    """As root: a kernel's child running as another user, left in the kernel's process group.
    The sweep refuses to touch it (not provably ours without a cgroup); the interrupt that
    precedes the release must not kill it either (a plain killpg did)."""
    try:
        pwd.getpwnam(OTHER_USER)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/sh", OTHER_USER], check=True, timeout=30)
    # the kernel without psutil: ipykernel's own child clean-up (psutil) would end it first
    srv = start_server(tmp_path, "--kill-grace", "1",
                       env={**no_cgroup_config(tmp_path), **make_kernelspecs(tmp_path)})
    api = Api(srv.url, srv.token)
    pids: list[int] = []
    try:
        code = ("import os, subprocess\n"
                f"p = subprocess.Popen(['sleep', '1011'], user={OTHER_USER!r}, env={{}})\n"
                "q = subprocess.Popen(['sleep', '1012'])\n"
                "r = subprocess.Popen(['env', '-i', 'sleep', '1014'])\n"
                "print(p.pid, q.pid, r.pid, os.getpgid(p.pid) == os.getpgid(r.pid) == os.getpgid(0))\n")
        kid, printed = await kernel_running(api, code, "nopsutil")
        other, mine, unmarked, same_group = printed.split()
        pids += [int(other), int(mine), int(unmarked)]
        assert same_group == "True"
        outcome = await api.call("POST", f"/tether/api/kernels/{kid}/release", {})
        assert await wait_dead([int(mine)], 5) == []
        assert alive_pids([int(other)]) == [int(other)], "another user's process was signalled"
        assert alive_pids([int(unmarked)]) == [int(unmarked)], "an unmarked one was signalled"
        reasons = {r["pid"]: r["reason"] for r in outcome["leftovers"]}
        assert reasons.keys() == {int(other), int(unmarked)}
        assert "another user" in reasons[int(other)] and "marker" in reasons[int(unmarked)]
        assert outcome["verified"] is False
    finally:
        kill_pids(alive_pids(pids))
        stop_server(srv)


MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""


def test_cgroup_v2_mount_and_own_path_are_parsed():
    assert cgroups._mountinfo_v2(MOUNTINFO) == "/sys/fs/cgroup/unified"
    assert cgroups._mountinfo_v2(MOUNTINFO.replace("cgroup2 cgroup2", "ext4 /dev/x")) == ""
    unified = "31 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    assert cgroups._mountinfo_v2(unified) == "/sys/fs/cgroup"
    own = "4:memory:/process_api/x\n0::/user.slice/user-1000.slice/user@1000.service/app.slice\n"
    assert cgroups._own_path(own) == "/user.slice/user-1000.slice/user@1000.service/app.slice"
    assert cgroups._own_path("4:memory:/x\n1:name=systemd:/\n") is None  # cgroup v1 only


@pytest.mark.skipif(not cgroups_usable(), reason="no writable cgroup v2 here")
@pytest.mark.parametrize("how", ["cgroup.kill", "frozen"])
def test_wrapper_starts_the_command_inside_the_cgroup_and_empty_kills_what_escaped(tmp_path, how):
    """``frozen``: the path for kernels older than Linux 5.14 (no cgroup.kill)."""
    import select

    parent = cgroups.server_dir(f"test-{os.getpid()}")
    assert parent
    path = cgroups.kernel_dir(parent, "k1")
    try:
        # the setsid child is forked before "ready" is printed
        cmd = cgroups.wrap(["sh", "-c", "setsid sleep 1013 & echo ready; wait"], path)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert select.select([proc.stdout], [], [], 30)[0] and proc.stdout.readline() == "ready\n"
        members = cgroups.members(path)
        assert proc.pid in members and len(members) == 2  # the shell (was the wrapper) + sleep
        assert cgroups.populated(path)
        if how == "frozen":
            cgroups._kill_frozen(path)
            assert cgroups.wait_empty(path, 5.0)
        else:
            assert sorted(cgroups.empty(path, 5.0)) == sorted(members)
        assert not cgroups.populated(path) and alive_pids(members) == []
        proc.wait(5)
    finally:
        cgroups.empty(path, 5.0)
        assert cgroups.remove(parent)
    assert not os.path.exists(parent)
