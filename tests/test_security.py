"""The server under attack and on a shared machine: logs, origins, kernel sockets."""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import READY_DEADLINE

ORIGIN = "https://colab.research.google.com"


def start_logged(tmp: Path, *verbosity: str) -> tuple[subprocess.Popen[str], dict, Path]:
    """``tether [-vv] serve --json`` with its whole stderr in a file (as the remote server.log)."""
    log = tmp / "server.log"
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp / "rt")}
    with log.open("w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tether", *verbosity, "serve", "--json", "--port", "0",
             "--notebook-dir", str(tmp)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=f, text=True, env=env,
            start_new_session=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], READY_DEADLINE)
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        raise RuntimeError(f"tether serve did not become ready: {log.read_text()[-2000:]}")
    return proc, json.loads(line), log


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def call(port: int, method: str, path: str, body: str | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body, headers or {})
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


@pytest.mark.parametrize("verbosity", [(), ("-vv",)], ids=["default", "debug"])
def test_no_token_in_any_log_line(tmp_path, verbosity):
    proc, info, log = start_logged(tmp_path, *verbosity)
    token, port = info["token"], info["port"]
    try:
        q = f"token={token}"
        assert call(port, "GET", f"/api/contents/missing.ipynb?{q}")[0] == 404
        assert call(port, "POST", f"/tether/api/release?{q}", "not json",
                    {"Content-Type": "application/json"})[0] == 400
        assert call(port, "POST", f"/tether/api/kernels/nosuch/release?{q}", "{}")[0] == 404
        assert call(port, "GET", "/api/contents/missing2.ipynb",
                    headers={"Authorization": f"token {token}"})[0] == 404
        # a foreign page holding the URL: refused, and the refusal is logged without it
        assert call(port, "POST", f"/api/shutdown?{q}", "x",
                    {"Origin": "https://evil.example", "Content-Type": "text/plain"})[0] == 403
        # the bridge's auth URL carries the token percent-encoded inside a query
        auth = f"http%3A%2F%2F127.0.0.1%3A{port}%2F%3Ftoken%3D{token}"
        assert call(port, "GET", f"/http_over_websocket?jupyter_http_over_ws_auth_url={auth}")[0] \
            in (400, 403, 404)
        assert call(port, "GET", "/api/kernels?token=" + "f" * 48)[0] == 403  # a wrong one
    finally:
        stop(proc)
    text = log.read_text()
    assert "missing.ipynb" in text, "the failed request was logged (else this proves nothing)"
    if verbosity:
        assert "DEBUG" in text and "missing2.ipynb" in text
    assert token not in text
    assert "f" * 48 not in text  # any token= value, not only the right one


@pytest.fixture(scope="module")
def logged_server(tmp_path_factory):
    proc, info, log = start_logged(tmp_path_factory.mktemp("sec"))
    yield info
    stop(proc)


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://127.0.0.1:1",
                                    "https://colab.research.google.com.evil.example"])
def test_foreign_origin_gets_no_action_token_or_not(logged_server, origin):
    token, port = logged_server["token"], logged_server["port"]
    for path in (f"/api/shutdown?token={token}", "/api/shutdown"):
        status, _ = call(port, "POST", path, "x",
                         {"Origin": origin, "Content-Type": "text/plain",
                          "Authorization": f"token {token}"})
        assert status == 403
    status, body = call(port, "POST", "/api/sessions",
                        json.dumps({"path": "x.ipynb", "type": "notebook",
                                    "kernel": {"name": "python3"}}),
                        {"Origin": origin, "Authorization": f"token {token}"})
    assert status == 403
    # nothing was done: the server answers and has no kernel
    status, body = call(port, "GET", "/api/kernels", headers={"Authorization": f"token {token}"})
    assert status == 200 and json.loads(body) == []
    # a preflight is still answered 204, without a grant
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("OPTIONS", "/api/sessions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Private-Network": "true"})
    reply = conn.getresponse()
    reply.read()
    conn.close()
    assert reply.status == 204 and reply.getheader("Access-Control-Allow-Origin") is None


def test_foreign_origin_cannot_open_a_kernel_websocket(logged_server):
    token, port = logged_server["token"], logged_server["port"]
    status, body = call(port, "POST", "/api/kernels", "{}",
                        {"Authorization": f"token {token}"})  # no Origin: a Jupyter client
    assert status == 201
    kid = json.loads(body)["id"]
    try:
        upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                   "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                   "Authorization": f"token {token}"}
        status, _ = call(port, "GET", f"/api/kernels/{kid}/channels",
                         headers={**upgrade, "Origin": "https://evil.example"})
        assert status == 403
        status, _ = call(port, "GET", f"/api/kernels/{kid}/channels",
                         headers={**upgrade, "Origin": ORIGIN})
        assert status == 101
    finally:
        call(port, "DELETE", f"/api/kernels/{kid}", headers={"Authorization": f"token {token}"})


def test_own_origin_and_no_origin_and_colab_are_served(logged_server):
    token, port = logged_server["token"], logged_server["port"]
    auth = {"Authorization": f"token {token}"}
    own = f"http://127.0.0.1:{port}"  # the status page, as the browser loaded it
    for headers in ({}, {"Origin": own}, {"Origin": ORIGIN}):
        status, body = call(port, "POST", "/tether/api/release", "{}", {**auth, **headers})
        assert status == 200, (headers, body)
        assert json.loads(body)["released"] is True
    # the same page seen through a tunnel on another local port: Host names the origin
    status, _ = call(port, "POST", "/tether/api/release", "{}",
                     {**auth, "Host": "localhost:9999", "Origin": "http://localhost:9999"})
    assert status == 200


from tests.sshd import OTHER_USER  # noqa: E402
PROBE = ("import socket, sys\n"
         "s = socket.socket(socket.AF_UNIX)\n"
         "try:\n    s.connect(sys.argv[1])\nexcept OSError as e:\n    print(type(e).__name__)\n"
         "else:\n    print('connected')\n")


def other_user() -> int:
    import pwd

    try:
        return pwd.getpwnam(OTHER_USER).pw_uid
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/sh", OTHER_USER], check=True, timeout=30)
        return pwd.getpwnam(OTHER_USER).pw_uid


def probe(path: str, user: int | None) -> str:
    out = subprocess.run(["/usr/bin/python3", "-c", PROBE, path], user=user, capture_output=True,
                         text=True, timeout=30, cwd="/")
    return out.stdout.strip() or out.stderr.strip()


async def running_kernel(info: dict) -> tuple[str, dict, int]:
    from tests.kernel_client import Api

    api = Api(info["url"].rstrip("/"), info["token"])
    session = await api.new_session("ipc.ipynb")
    kid = session["kernel"]["id"]
    channel = await api.connect(kid)
    code = ("import os; k = get_ipython().kernel\n"
            "print(os.getpid(), getattr(k.iopub_thread, '_pipe_port', 0))")
    pid, pipe_port = map(int, (await channel.execute(code)).split())
    channel.close()
    return kid, api, pid, pipe_port


def listening_tcp(pids: list[int]) -> list[tuple[int, object]]:
    found = []
    for pid in pids:
        for conn in psutil.Process(pid).net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN or conn.type == 2:  # TCP listen, or any UDP
                found.append((pid, conn.laddr))
    return found


async def test_kernels_listen_on_no_tcp_port_and_other_users_cannot_connect(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    uid = other_user()
    proc, info, _ = start_logged(tmp_path)
    try:
        kid, api, kernel_pid, pipe_port = await running_kernel(info)
        # every TCP socket listening in the server's tree is the server's own port (ipykernel's
        # IOPub pipe for forked children included: tether's launcher moves it to ipc too)
        tree = [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]
        assert kernel_pid in tree and pipe_port == 0
        assert [(pid, addr.port) for pid, addr in listening_tcp(tree)] == [(proc.pid, info["port"])]
        conn_file = json.loads((tmp_path / "rt" / f"kernel-{kid}.json").read_text())
        assert conn_file["transport"] == "ipc"
        iopub = f"{conn_file['ip']}-{conn_file['iopub_port']}"
        assert os.path.exists(iopub)
        runtime = os.path.dirname(iopub)
        assert os.stat(runtime).st_mode & 0o077 == 0, "the sockets' directory is private"
        assert probe(iopub, None) == "connected"  # the control: its owner can
        assert probe(iopub, uid) == "PermissionError"
        pipe = f"{conn_file['ip']}-p"
        assert probe(pipe, None) == "connected" and probe(pipe, uid) == "PermissionError"
        # output of a forked child still arrives, through the pipe on its Unix socket
        channel = await api.connect(kid)
        out = await channel.execute(
            "import multiprocessing as mp\n"
            "p = mp.get_context('fork').Process(target=print, args=('from the child',))\n"
            "p.start(); p.join()")
        channel.close()
        assert "from the child" in out
        await api.call("DELETE", f"/api/kernels/{kid}")
    finally:
        stop(proc)


async def test_ipc_sockets_move_to_a_short_private_dir_when_the_path_is_too_long(tmp_path):
    deep = tmp_path / ("r" * 60) / "runtime"
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(deep)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether", "serve", "--json", "--port", "0", "--notebook-dir",
         str(tmp_path)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, env=env,
        start_new_session=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], READY_DEADLINE)
        info = json.loads(proc.stdout.readline())
        kid, api, _, _ = await running_kernel(info)
        conn_file = json.loads((deep / f"kernel-{kid}.json").read_text())
        prefix = conn_file["ip"]
        assert len(prefix) + 3 <= 107 and not prefix.startswith(str(deep))
        assert os.stat(os.path.dirname(prefix)).st_mode & 0o777 == 0o700
        await api.call("DELETE", f"/api/kernels/{kid}")
    finally:
        stop(proc)
    assert not os.path.exists(os.path.dirname(prefix)), "removed with the server"
