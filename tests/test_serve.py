"""`tether serve`: safe defaults, clear one-line errors, clean stop."""

from __future__ import annotations

import http.client
import json
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import start_server, stop_server
from tether import identity
from tether.replay import ColabClient



def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tether", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_port_in_use_is_one_line_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = run_cli("serve", "--port", str(port), "--notebook-dir", str(tmp_path),
                       env={"JUPYTER_RUNTIME_DIR": str(tmp_path / "rt")})
    line = one_line_error(proc)
    assert f"port {port}" in line and "--port" in line


def test_refuses_non_loopback_without_the_loud_flag(tmp_path):
    line = one_line_error(run_cli("serve", "--ip", "0.0.0.0"))
    assert "not a loopback address" in line and "--i-know-this-exposes-the-server" in line
    assert run_cli("serve", "--ip", "0.0.0.0").returncode == 2


@pytest.mark.parametrize("bad", ["short", "x" * 20])
def test_weak_token_refused(bad):
    line = one_line_error(run_cli("serve", env={"TETHER_TOKEN": bad}))
    assert "too weak" in line


def test_bad_origin_refused():
    line = one_line_error(run_cli("serve", "--origin", "https://*.example.com"))
    assert "invalid origin" in line


def test_missing_notebook_dir(tmp_path):
    line = one_line_error(run_cli("serve", "--notebook-dir", str(tmp_path / "nope"), "--port", "0"))
    assert "does not exist" in line


async def test_token_file_socket_and_state_file(tmp_path):
    token = secrets.token_hex(24)
    tf = tmp_path / "token"
    tf.write_text(token + "\n")
    tf.chmod(0o600)
    sock = tmp_path / "run" / "tether.sock"
    srv = start_server(tmp_path, "--sock", str(sock), "--token-file", str(tf))
    try:
        assert srv.info["sock"] == str(sock) and srv.info["token"] == token
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        state = srv.runtime_dir / f"tether-{srv.proc.pid}.json"
        assert stat.S_IMODE(state.stat().st_mode) == 0o600
        assert json.loads(state.read_text())["sock"] == str(sock)
        # the token is never on the command line of the server
        cmdline = " ".join(psutil.Process(srv.proc.pid).cmdline())
        assert token not in cmdline
        assert unix_get(sock, "/api/status", token) == 200
        assert unix_get(sock, "/api/status", "c" * 48) == 403
    finally:
        assert stop_server(srv) == 0
    assert not state.exists()


def unix_get(sock: Path, path: str, token: str) -> int:
    class Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(10)
            self.sock.connect(str(sock))

    conn = Conn("localhost")
    conn.request("GET", path, headers={"Authorization": f"token {token}"})
    status = conn.getresponse().status
    conn.close()
    return status


async def test_sigint_stops_cleanly_and_kernels_die_and_token_never_logged(tmp_path):
    log = tmp_path / "server.log"
    with log.open("w") as f:
        env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "tether", "-vv", "serve", "--json", "--port", "0",
             "--notebook-dir", str(tmp_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=f, text=True, env=env,
            start_new_session=True)
        info = json.loads(proc.stdout.readline())
        async with ColabClient(info["url"], info["token"]) as c:
            session = await c.create_session()
            assert (await c.execute(session["kernel"]["id"], "print('hi')")).stdout == "hi\n"
            await c.request("GET", f"/api/status?token={info['token']}")  # logged URL
        kernels = psutil.Process(proc.pid).children(recursive=True)
        assert kernels
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    _, alive = psutil.wait_procs(kernels, timeout=5)
    assert not alive
    text = log.read_text()
    assert "Shutting down 1 kernel" in text  # a graceful stop, not a KeyboardInterrupt
    assert "GET /api/status" in text  # the request was logged...
    assert info["token"] not in text  # ...without the token


def test_sock_over_a_regular_file_is_refused_and_the_file_kept(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    proc = run_cli("serve", "--sock", str(notes), "--notebook-dir", str(tmp_path),
                   env={"JUPYTER_RUNTIME_DIR": str(tmp_path / "rt")})
    line = one_line_error(proc)
    assert proc.returncode == 2
    assert "not a socket" in line and "--sock" in line
    assert notes.read_text() == "my notes\n"


def test_sock_of_another_user_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to make a socket owned by another user")
    path = tmp_path / "theirs.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))  # bound, never listening: it would look stale
    os.chown(path, 65534, 65534)
    proc = run_cli("serve", "--sock", str(path), "--notebook-dir", str(tmp_path),
                   env={"JUPYTER_RUNTIME_DIR": str(tmp_path / "rt")})
    assert "another user" in one_line_error(proc) and proc.returncode == 2
    assert stat.S_ISSOCK(path.lstat().st_mode)


def test_stale_socket_of_ours_is_replaced(tmp_path):
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))  # closed without listening: what a crashed server leaves
    with socket.socket(socket.AF_UNIX) as s, pytest.raises(ConnectionRefusedError):
        s.connect(str(path))  # stale: nobody answers on it
    srv = start_server(tmp_path, "--sock", str(path))
    try:
        assert srv.info["sock"] == str(path)
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600
        with socket.socket(socket.AF_UNIX) as s:  # the new server answers on the same path
            s.settimeout(30)
            s.connect(str(path))
            s.sendall(b"GET /api HTTP/1.0\r\n\r\n")
            assert s.recv(64).startswith(b"HTTP/1.1 200")
    finally:
        assert stop_server(srv) == 0


def test_token_file_readable_by_others_is_refused(tmp_path):
    tf = tmp_path / "token"
    tf.write_text(secrets.token_hex(24))
    tf.chmod(0o644)
    proc = run_cli("serve", "--token-file", str(tf))
    line = one_line_error(proc)
    assert proc.returncode == 2 and f"chmod 600 {tf}" in line


@pytest.mark.parametrize("bad", ["a" * 48, "0123456789abcdef" * 3, "abab" * 12])
def test_low_entropy_token_refused(tmp_path, bad):
    tf = tmp_path / "token"
    tf.write_text(bad)
    tf.chmod(0o600)
    proc = run_cli("serve", "--token-file", str(tf))
    assert "too weak" in one_line_error(proc) and proc.returncode == 2
    assert "too weak" in one_line_error(run_cli("serve", env={"TETHER_TOKEN": bad}))


def test_a_wall_clock_moved_by_ntp_leaves_the_server_found(tmp_path, monkeypatch):
    """btime in /proc/stat (which psutil adds to every create time) moves when NTP slews or
    steps the clock: the live server must still be found, and its state file kept."""
    from psutil import _pslinux

    from tether.remote.state import running_servers

    srv = start_server(tmp_path)
    try:
        path = srv.runtime_dir / f"tether-{srv.proc.pid}.json"
        btime = _pslinux.boot_time()
        for moved in (1.0, -1.0, 3600.0):
            monkeypatch.setattr(_pslinux, "boot_time", lambda m=moved: btime + m)
            assert [s.pid for s in running_servers(str(srv.runtime_dir))] == [srv.proc.pid]
            assert path.exists()
    finally:
        assert stop_server(srv) == 0


def test_state_file_names_instance_and_start_time_and_a_reused_pid_is_stale(tmp_path):
    from tether.remote.state import ServerState, running_servers, write_state

    srv = start_server(tmp_path)
    try:
        state = json.loads((srv.runtime_dir / f"tether-{srv.proc.pid}.json").read_text())
        proc = psutil.Process(srv.proc.pid)
        assert state["create_time"] == pytest.approx(proc.create_time(), abs=0.05)
        assert state["boot_start"] == identity.started(proc)
        assert state["boot_id"] == identity.boot_id()
        assert state["instance"].startswith(f"{srv.proc.pid}.")
        kernel_env_instance = state["instance"]
        assert "cgroup" in state
        assert [s.pid for s in running_servers(str(srv.runtime_dir))] == [srv.proc.pid]
    finally:
        assert stop_server(srv) == 0
    # the pid of a live process that is not the server (this test), with the server's old file
    me = psutil.Process()
    stale = ServerState.from_json({**state, "pid": me.pid})  # the server's start, not mine
    path = write_state(stale, str(srv.runtime_dir))
    assert running_servers(str(srv.runtime_dir)) == [] and not path.exists()
    # an old file without the new keys is still read (its pid alone decides)
    old = {k: v for k, v in state.items()
           if k not in ("instance", "create_time", "boot_start", "boot_id", "cgroup")}
    path = write_state(ServerState.from_json({**old, "pid": me.pid}), str(srv.runtime_dir))
    assert [s.pid for s in running_servers(str(srv.runtime_dir))] == [me.pid]
    assert kernel_env_instance
    path.unlink()


async def test_with_two_servers_a_command_that_acts_asks_which(tmp_path):
    from tests.kernel_client import Api

    shared = tmp_path / "runtime"
    a = start_server(tmp_path / "a", env={"JUPYTER_RUNTIME_DIR": str(shared)})
    b = start_server(tmp_path / "b", env={"JUPYTER_RUNTIME_DIR": str(shared)})
    env = {"JUPYTER_RUNTIME_DIR": str(shared), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    try:
        ka = (await Api(a.url, a.token).new_session("a.ipynb"))["kernel"]["id"]
        kb = (await Api(b.url, b.token).new_session("b.ipynb"))["kernel"]["id"]
        for acting in (["release", "--all", "--stop-server"], ["open", "--print-url"]):
            asked = run_cli(*acting, env=env)
            line = one_line_error(asked)
            assert asked.returncode == 2 and "2 tether servers" in line, asked.stderr
            assert f"port {a.port}" in line and f"port {b.port}" in line and "--server" in line
        assert a.proc.poll() is None and b.proc.poll() is None
        ids = {k["id"] for s in (a, b) for k in await Api(s.url, s.token).call("GET", "/api/kernels")}
        assert ids == {ka, kb}, "nothing was released"
        read = run_cli("ps", env=env)
        assert read.returncode == 0 and "--server" in read.stderr, read.stderr
        assert json.loads(run_cli("ps", "--json", env=env).stdout)["read_from"]["others"] == 1
        chosen = run_cli("release", "--all", "--server", str(a.port), "--json", env=env)
        assert chosen.returncode == 0, chosen.stderr
        assert [k["kernel"] for k in json.loads(chosen.stdout)["kernels"]] == [ka]
        assert [k["id"] for k in await Api(b.url, b.token).call("GET", "/api/kernels")] == [kb]
        assert run_cli("release", "--all", "--server", "1", env=env).returncode == 1
    finally:
        stop_server(a)
        stop_server(b)


def test_open_writes_its_redirect_private_and_removes_it_once_read(tmp_path):
    """`tether open`'s redirect file holds the token: 0600 in a 0700 folder even where the folder
    and the file existed with looser modes (and ~/.cache/tether too), never written through a
    link, and gone once the browser has read it."""
    home = tmp_path / "home"
    top = home / ".cache" / "tether"
    folder = top / "tether-local"
    folder.mkdir(parents=True)
    top.chmod(0o755)
    folder.chmod(0o755)
    redirect = folder / "open-page.html"
    victim = tmp_path / "victim"
    victim.write_text("mine")
    redirect.symlink_to(victim)  # whoever planted a link: it is replaced, not followed
    seen = tmp_path / "seen"
    browser = tmp_path / "browser"
    browser.write_text(f'#!/bin/sh\nf="${{1#file://}}"\n'
                       f'stat -c "%a %F" "$f" "$(dirname "$f")" > {seen}\ncat "$f" >> {seen}\n')
    browser.chmod(0o755)
    srv = start_server(tmp_path)
    env = {"JUPYTER_RUNTIME_DIR": str(srv.runtime_dir), "HOME": str(home), "BROWSER": str(browser),
           "XDG_RUNTIME_DIR": "", "XDG_CACHE_HOME": ""}
    try:
        opened = run_cli("open", env=env)
        assert opened.returncode == 0, opened.stderr
        modes = seen.read_text().splitlines()
        assert modes[:2] == ["600 regular file", "700 directory"], modes
        assert srv.token in seen.read_text() and srv.token not in opened.stderr
        assert not redirect.exists() and not redirect.is_symlink(), "removed once read"
        assert stat.S_IMODE(top.stat().st_mode) == 0o700
        assert victim.read_text() == "mine"
    finally:
        assert stop_server(srv) == 0
