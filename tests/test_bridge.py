"""The legacy HTTP-over-WebSocket bridge (tether.remote.bridge), against a real ``tether serve``.

A tornado websocket client plays Colab's legacy frontend: Origin https://colab.research.google.com
and the token inside ``jupyter_http_over_ws_auth_url``, as Colab sends it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import tornado.httpclient
import tornado.netutil
import tornado.websocket
from conftest import RunningServer, stop_server

from tether.remote import bridge

COLAB = "https://colab.research.google.com"
WAIT = 30.0  # seconds any single step may take (kernel start on a loaded 2-core machine)

WS = tornado.websocket.WebSocketClientConnection


# --------------------------------------------------------------------------- client helpers


class UnixResolver(tornado.netutil.Resolver):
    def initialize(self, path: str) -> None:
        self.path = path

    async def resolve(self, host: str, port: int, family: Any = 0) -> list[tuple[int, Any]]:
        return [(socket.AF_UNIX, self.path)]


def ws_base(server: RunningServer) -> tuple[str, tornado.netutil.Resolver | None]:
    if server.info.get("sock"):
        return "ws://localhost/", UnixResolver(path=server.info["sock"])
    return f"ws://127.0.0.1:{server.port}/", None


def auth_url(server: RunningServer, token: str | None = None) -> str:
    return f"http://localhost:{server.port}/?token={token or server.token}"


async def connect(
    server: RunningServer,
    path: str = "http_over_websocket",
    *,
    origin: str | None = COLAB,
    token: str | None = "",
    query: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> WS:
    """Open a bridge socket the way Colab does; ``token=None`` sends no credentials at all."""
    base, resolver = ws_base(server)
    params = dict(query or {})
    if token is not None:
        params[bridge.AUTH_URL_PARAM] = auth_url(server, token)
    sep = "&" if "?" in path else "?"
    url = base + path + (sep + urlencode(params) if params else "")
    all_headers = dict(headers or {})
    if origin is not None:
        all_headers["Origin"] = origin
    request = tornado.httpclient.HTTPRequest(url, headers=all_headers, request_timeout=WAIT)
    return await asyncio.wait_for(
        tornado.websocket.websocket_connect(request, resolver=resolver), WAIT
    )


async def read_frame(ws: WS) -> dict[str, Any]:
    return json.loads(await read_text(ws))  # type: ignore[no-any-return]


async def read_text(ws: WS) -> str | bytes:
    message = await asyncio.wait_for(ws.read_message(), WAIT)
    assert message is not None, f"socket closed: {ws.close_code} {ws.close_reason}"
    return message


async def wait_closed(ws: WS) -> tuple[int | None, str | None]:
    while await asyncio.wait_for(ws.read_message(), WAIT) is not None:
        pass
    return ws.close_code, ws.close_reason


async def send(ws: WS, message_id: Any, method: str, path: str, **extra: Any) -> None:
    await ws.write_message(
        json.dumps({"message_id": message_id, "method": method, "path": path, **extra})
    )


async def collect(ws: WS, message_id: Any) -> tuple[list[dict[str, Any]], bytes]:
    """All frames of one reply (asserting no other reply interleaves), and its body."""
    frames: list[dict[str, Any]] = []
    while True:
        frame = await read_frame(ws)
        assert frame.get("message_id") == message_id, frame
        frames.append(frame)
        if frame["done"]:
            break
    body = b"".join(base64.b64decode(f.get("data", "")) for f in frames)
    return frames, body


async def call(ws: WS, method: str, path: str, **extra: Any) -> tuple[dict[str, Any], bytes]:
    message_id = uuid.uuid4().hex
    await send(ws, message_id, method, path, **extra)
    frames, body = await collect(ws, message_id)
    return frames[0], body


def start_verbose_server(tmp: Path, *args: str) -> RunningServer:
    """``tether -vv serve --json ARGS``: like conftest's start_server, logging at DEBUG."""
    root, runtime = tmp / "notebooks", tmp / "runtime"
    root.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "tether",
        "-vv",
        "serve",
        "--json",
        "--notebook-dir",
        str(root),
        *args,
    ]
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 60.0)
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        raise RuntimeError(f"tether serve did not become ready (exit {proc.poll()})")
    return RunningServer(proc, json.loads(line), root, runtime)


@pytest.fixture
async def sock(server: RunningServer) -> AsyncIterator[WS]:
    ws = await connect(server)
    yield ws
    ws.close()


# --------------------------------------------------------------------------- the protocol


async def test_get_status_and_kernelspecs(sock: WS) -> None:
    first, body = await call(sock, "GET", "/api/status")
    assert first["status"] == 200 and first["statusText"] == "OK" and first["done"] is True
    assert first["headers"]["Content-Type"].startswith("application/json")
    assert "started" in json.loads(body)

    first, body = await call(sock, "GET", "/api/kernelspecs")
    assert first["status"] == 200
    assert "python3" in json.loads(body)["kernelspecs"]


async def test_requests_run_as_the_sockets_user(sock: WS) -> None:
    users = []
    for _ in range(2):
        first, body = await call(sock, "GET", "/api/me")
        assert first["status"] == 200 and "Set-Cookie" not in first["headers"]
        users.append(json.loads(body)["identity"]["username"])
    assert users[0] == users[1]


async def test_empty_body_reply_has_no_data(sock: WS, server: RunningServer) -> None:
    (server.root / "gone.txt").write_text("x")
    first, body = await call(sock, "DELETE", "/api/contents/gone.txt")
    assert first["status"] == 204 and first["done"] is True
    assert "data" not in first and body == b""


async def colab_replay(server: RunningServer) -> None:
    """What Colab's legacy frontend does: session, kernel channels, execute, delete."""
    ws = await connect(server)
    try:
        model = {
            "path": "replay.ipynb",
            "type": "notebook",
            "name": "",
            "kernel": {"name": "python3"},
        }
        first, body = await call(ws, "POST", "/api/sessions", body=json.dumps(model))
        assert first["status"] == 201, body
        session = json.loads(body)
        kernel_id = session["kernel"]["id"]

        channels = await connect(
            server,
            f"http_over_websocket/proxied_ws/api/kernels/{kernel_id}/channels",
            query={"session_id": session["id"]},
        )
        try:
            msg_id = uuid.uuid4().hex
            request = {
                "header": {
                    "msg_id": msg_id,
                    "msg_type": "execute_request",
                    "session": session["id"],
                    "username": "colab",
                    "version": "5.3",
                },
                "parent_header": {},
                "metadata": {},
                "channel": "shell",
                "buffers": [],
                "content": {
                    "code": "print('hello from the bridge')",
                    "silent": False,
                    "store_history": True,
                    "user_expressions": {},
                    "allow_stdin": False,
                },
            }
            await channels.write_message(json.dumps(request))
            # shell and iopub are separate channels: wait for the reply and for iopub's idle
            stream_text, reply, idle = "", None, False
            while reply is None or not idle:
                message = json.loads(await read_text(channels))
                if message.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                if message["msg_type"] == "stream":
                    stream_text += message["content"]["text"]
                elif message["msg_type"] == "execute_reply":
                    reply = message
                elif message["msg_type"] == "status":
                    idle = message["content"]["execution_state"] == "idle"
            assert reply["content"]["status"] == "ok"
            assert "hello from the bridge" in stream_text
        finally:
            channels.close()

        first, _ = await call(ws, "DELETE", f"/api/sessions/{session['id']}")
        assert first["status"] == 204
        first, body = await call(ws, "GET", "/api/kernels")
        assert kernel_id not in [k["id"] for k in json.loads(body)]
    finally:
        ws.close()


async def test_colab_legacy_replay(server: RunningServer) -> None:
    await colab_replay(server)


async def test_binary_body_round_trip(sock: WS, server: RunningServer) -> None:
    data = os.urandom(1024 * 1024)
    model = {"type": "file", "format": "base64", "content": base64.b64encode(data).decode()}
    body_base64 = base64.b64encode(json.dumps(model).encode()).decode()
    first, body = await call(sock, "PUT", "/api/contents/blob.bin", body_base64=body_base64)
    assert first["status"] in (200, 201), body

    message_id = 42
    await send(sock, message_id, "GET", "/files/blob.bin")
    frames, body = await collect(sock, message_id)
    assert body == data
    assert len(frames) == len(data) // bridge.CHUNK_SIZE
    assert all(len(base64.b64decode(f["data"])) <= bridge.CHUNK_SIZE for f in frames)
    assert set(frames[0]) == {"message_id", "status", "statusText", "headers", "data", "done"}
    assert all(set(f) == {"message_id", "data", "done"} for f in frames[1:])
    assert [f["done"] for f in frames] == [False] * (len(frames) - 1) + [True]


async def test_slow_request_does_not_block_fast_one(sock: WS, server: RunningServer) -> None:
    (server.root / "big.bin").write_bytes(os.urandom(16 * 1024 * 1024))
    await send(sock, "slow", "GET", "/files/big.bin")
    await send(sock, "fast", "GET", "/api/status")
    done_order: list[str] = []
    while len(done_order) < 2:
        frame = await read_frame(sock)
        if frame["done"]:
            done_order.append(frame["message_id"])
    assert done_order == ["fast", "slow"]


async def test_diagnose(server: RunningServer) -> None:
    ws = await connect(server, "http_over_websocket/diagnose")
    await ws.write_message("probe-1")
    assert await read_frame(ws) == {
        "message_id": "probe-1",
        "extension_version": "0.0.7",
        "has_authentication_cookie": True,
        "is_outdated_extension": False,
    }
    ws.close()

    ws = await connect(
        server, "http_over_websocket/diagnose", token=None, query={"min_version": "0.1"}
    )
    await ws.write_message("probe-2")
    reply = await read_frame(ws)
    assert reply["has_authentication_cookie"] is False and reply["is_outdated_extension"] is True
    ws.close()


async def test_relay_propagates_closes_both_ways(server: RunningServer, sock: WS) -> None:
    first, body = await call(sock, "POST", "/api/kernels", body=json.dumps({"name": "python3"}))
    assert first["status"] == 201, body
    kernel_id = json.loads(body)["id"]
    relay_path = f"http_over_websocket/proxied_ws/api/kernels/{kernel_id}/channels"

    async def connections() -> int:
        _, model = await call(sock, "GET", f"/api/kernels/{kernel_id}")
        return int(json.loads(model)["connections"])

    async def until_connections(n: int) -> None:
        async with asyncio.timeout(WAIT):
            while await connections() != n:
                await asyncio.sleep(0.05)  # polling the server's own count, bounded by WAIT

    # client -> server: closing the bridge socket closes the server's kernel websocket
    relay = await connect(server, relay_path, query={"session_id": "s1"})
    await until_connections(1)
    relay.close()
    await until_connections(0)

    first, _ = await call(sock, "DELETE", f"/api/kernels/{kernel_id}")
    assert first["status"] == 204

    # server -> client: a terminal's websocket closes when its shell exits (a kernel's stays
    # open after the kernel is deleted), and the bridge socket closes with it
    output, code = await run_in_terminal(server, sock, "echo relayed-$((6*7)); exit")
    assert "relayed-42" in output
    assert code is not None and bridge.sendable_close_code(code, -1) == code


async def run_in_terminal(
    server: RunningServer, sock: WS, command: str, headers: dict[str, str] | None = None
) -> tuple[str, int | None]:
    """Run ``command`` in a new terminal through the relay; its output and the close code."""
    first, body = await call(sock, "POST", "/api/terminals", body="{}")
    assert first["status"] == 200, body
    name = json.loads(body)["name"]
    path = f"http_over_websocket/proxied_ws/terminals/websocket/{name}"
    relay = await connect(server, path, headers=headers)
    await relay.write_message(json.dumps(["stdin", command + "\r"]))
    output = ""
    while (message := await asyncio.wait_for(relay.read_message(), WAIT)) is not None:
        kind, *payload = json.loads(message)
        output += payload[0] if kind == "stdout" else ""
    return output, relay.close_code


async def test_relay_to_unknown_kernel_closes_with_4404(server: RunningServer) -> None:
    relay = await connect(
        server, f"http_over_websocket/proxied_ws/api/kernels/{uuid.uuid4()}/channels"
    )
    code, _ = await wait_closed(relay)
    assert code == 4404


async def test_in_flight_requests_are_bounded(sock: WS, server: RunningServer) -> None:
    (server.root / "one.bin").write_bytes(os.urandom(1024 * 1024))
    total = bridge.MAX_IN_FLIGHT + 4
    for i in range(total):
        await send(sock, i, "GET", "/files/one.bin")
    finished: dict[int, int] = {}
    while len(finished) < total:
        frame = await read_frame(sock)
        if "status" in frame:
            finished.setdefault(frame["message_id"], frame["status"])
        if frame["done"]:
            finished[frame["message_id"]] = finished.get(frame["message_id"], 0)
    statuses = sorted(finished.values())
    assert 503 in statuses and set(statuses) == {200, 503}


# --------------------------------------------------------------------------- malformed input


async def test_bad_json_gets_error_frame_and_socket_stays_usable(sock: WS) -> None:
    expected = {"done": True, "status": 400, "statusText": "JSON input is required."}
    await sock.write_message("{not json")
    assert await read_frame(sock) == expected
    await sock.write_message(b"\xff\xfe", binary=True)
    assert await read_frame(sock) == expected
    await sock.write_message("[" * 100_000)
    assert await read_frame(sock) == expected
    first, _ = await call(sock, "GET", "/api/status")
    assert first["status"] == 200


async def test_missing_keys(sock: WS) -> None:
    await sock.write_message(json.dumps({"message_id": 7, "method": "GET"}))
    frame = await read_frame(sock)
    assert frame["message_id"] == 7 and frame["status"] == 400 and frame["done"] is True
    assert frame["statusText"].startswith(
        "Invalid request. The body must contain the following keys: "
    )
    first, _ = await call(sock, "GET", "/api/status")
    assert first["status"] == 200


@pytest.mark.parametrize(
    "frame",
    [
        {"message_id": 1, "method": "GET", "path": "http://127.0.0.1:1/"},
        {"message_id": 1, "method": "GE T", "path": "/api/status"},
        {"message_id": 1, "method": "PUT", "path": "/api/contents/x", "body_base64": "!!"},
        {"message_id": 1, "method": "PUT", "path": "/api/contents/x", "body": {"a": 1}},
        {"message_id": 1, "method": "PUT", "path": "/api/contents/x", "body": "\ud800"},
        {"message_id": 1, "method": "GET", "path": "/api/\udfff"},
    ],
)
async def test_invalid_fields(sock: WS, frame: dict[str, Any]) -> None:
    await sock.write_message(json.dumps(frame))
    reply = await read_frame(sock)
    assert reply["status"] == 400 and reply["message_id"] == 1
    assert reply["statusText"].startswith("Invalid request.")


async def test_oversize_frame_closes_the_socket(server: RunningServer, sock: WS) -> None:
    # the server may hang up before the frame is through: it reads no more than the limit
    with contextlib.suppress(tornado.websocket.WebSocketClosedError):
        await sock.write_message("x" * (bridge.DEFAULT_MAX_MESSAGE_SIZE + 1))
    code, _ = await wait_closed(sock)
    # 1009 when the close frame gets here before the connection is reset (tornado aborts it)
    assert code in (1009, None)
    ws = await connect(server)
    assert (await call(ws, "GET", "/api/status"))[0]["status"] == 200
    ws.close()


@pytest.mark.parametrize(
    ("min_version", "code", "reason"),
    [
        (
            "0.0.8",
            4426,
            "Requested version (0.0.8) > Current version (0.0.7). Please upgrade this package.",
        ),
        (
            "0.1.0",
            4426,
            "Requested version (0.1) > Current version (0.0.7). Please upgrade this package.",
        ),
        ("seven", 4400, 'Invalid "min_version" provided: seven'),
    ],
)
async def test_min_version_rejected(
    server: RunningServer, min_version: str, code: int, reason: str
) -> None:
    ws = await connect(server, query={"min_version": min_version})
    assert await wait_closed(ws) == (code, reason)


@pytest.mark.parametrize("min_version", ["0.0.7", "0.0.6", "0.0.7b1"])
async def test_min_version_accepted(server: RunningServer, min_version: str) -> None:
    ws = await connect(server, query={"min_version": min_version})
    first, _ = await call(ws, "GET", "/api/status")
    assert first["status"] == 200
    ws.close()


# --------------------------------------------------------------------------- security


@pytest.mark.parametrize(
    "path", ["http_over_websocket", "http_over_websocket/proxied_ws/api/events/subscribe"]
)
@pytest.mark.parametrize("token", [None, "wrong-token"])
async def test_unauthenticated_socket_closed(
    server: RunningServer, path: str, token: str | None
) -> None:
    ws = await connect(server, path, token=token)
    if path == "http_over_websocket":
        with contextlib.suppress(tornado.websocket.WebSocketClosedError):  # closed already
            await send(ws, 1, "GET", "/api/status")  # must never be answered
    code, _ = await wait_closed(ws)
    assert code == bridge.CLOSE_UNAUTHENTICATED


@pytest.mark.parametrize(
    "path",
    [
        "http_over_websocket",
        "http_over_websocket/diagnose",
        "http_over_websocket/proxied_ws/api/events/subscribe",
    ],
)
async def test_foreign_origin_rejected(server: RunningServer, path: str) -> None:
    with pytest.raises(tornado.httpclient.HTTPClientError) as info:
        await connect(server, path, origin="https://evil.example")
    assert info.value.code == 403


async def test_token_query_and_header_also_authenticate(server: RunningServer) -> None:
    ws = await connect(server, token=None, query={"token": server.token})
    assert (await call(ws, "GET", "/api/status"))[0]["status"] == 200
    ws.close()
    ws = await connect(server, token=None, headers={"Authorization": f"token {server.token}"})
    assert (await call(ws, "GET", "/api/status"))[0]["status"] == 200
    ws.close()


async def test_forged_host_never_reaches_another_server(server: RunningServer) -> None:
    hits: list[bytes] = []

    async def decoy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hits.append(await reader.read(4096))
        writer.write(
            b'HTTP/1.1 200 OK\r\nContent-Length: 15\r\nConnection: close\r\n\r\n{"decoy": true}'
        )
        await writer.drain()
        writer.close()

    listener = await asyncio.start_server(decoy, "127.0.0.1", 0)
    decoy_port = listener.sockets[0].getsockname()[1]
    try:
        ws = await connect(server, headers={"Host": f"127.0.0.1:{decoy_port}"})
        first, body = await call(ws, "GET", "/api/status")
        assert first["status"] == 200 and "started" in json.loads(body)
        first, body = await call(ws, "GET", f"/http://127.0.0.1:{decoy_port}/x")
        assert first["status"] == 404
        # the relay too connects to the server's own address, not to the Host header's
        forged = {"Host": f"127.0.0.1:{decoy_port}"}
        output, _ = await run_in_terminal(server, ws, "echo via-$((40+2)); exit", forged)
        assert "via-42" in output
        ws.close()
        assert hits == []
    finally:
        listener.close()
        await listener.wait_closed()


async def test_close_cancels_in_flight_requests(server: RunningServer) -> None:
    (server.root / "big2.bin").write_bytes(os.urandom(16 * 1024 * 1024))
    ws = await connect(server)
    await send(ws, "big", "GET", "/files/big2.bin")
    await read_frame(ws)  # the reply has started
    ws.close()
    # the server is still fine, and a new socket works
    ws = await connect(server)
    assert (await call(ws, "GET", "/api/status"))[0]["status"] == 200
    ws.close()


async def test_unix_socket_server_and_tokens_never_logged(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The whole replay against a ``--sock`` server logging at DEBUG; the token never shows."""
    srv = start_verbose_server(tmp_path, "--sock", str(tmp_path / "s" / "jupyter.sock"))
    try:
        await colab_replay(srv)
        # failures get logged with their URIs: make some, carrying the real token
        with pytest.raises(tornado.httpclient.HTTPClientError):
            await connect(srv, origin="https://evil.example")
        ws = await connect(srv, query={"min_version": "9.9"})
        await wait_closed(ws)
        ws = await connect(srv)
        await call(ws, "GET", f"/api/nothing-here?token={srv.token}")
        ws.close()
    finally:
        stop_server(srv)
    log = capfd.readouterr().err
    assert "GET /api/status" in log or "/api/sessions" in log, "the server did not log at DEBUG"
    assert srv.token not in log


# --------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.7", "0.0.7"),
        ("0.1.0", "0.1"),
        ("1.0a1", "1.0a1"),
        ("01.2", "1.2"),
        ("0.0.7b2", "0.0.7b2"),
    ],
)
def test_version_round_trip(text: str, expected: str) -> None:
    key = bridge.parse_version(text)
    assert key is not None and bridge.format_version(key) == expected


def test_version_order_and_outdated() -> None:
    assert bridge.is_outdated("0.0.8") and bridge.is_outdated("1.0a1")
    assert not bridge.is_outdated("0.0.7") and not bridge.is_outdated("0.0.7a9")
    assert not bridge.is_outdated("junk") and not bridge.is_outdated(None)


def test_close_helpers() -> None:
    assert len(bridge.close_reason("é" * 200).encode()) <= 123
    assert [
        bridge.sendable_close_code(c, 1011) for c in (None, 1000, 1005, 1006, 400, 4404, 5000)
    ] == [1011, 1000, 1011, 1011, 1011, 4404, 1011]
    assert bridge.token_from_auth_url("http://localhost:8888/?token=abc&x=1") == "abc"
    assert bridge.token_from_auth_url("http://localhost:8888/tree") == ""


async def test_large_puts_do_not_stay_in_memory(tmp_path: Path) -> None:
    """15 MiB uploads through the bridge: the server's RSS comes back (it once kept each PUT
    for two minutes, through timer handles holding the handler's context)."""
    import psutil
    from conftest import start_server

    srv = start_server(tmp_path)
    try:
        ws = await connect(srv)
        raw = os.urandom(11 * 1024 * 1024)
        model = json.dumps({"type": "file", "format": "base64",
                            "content": base64.b64encode(raw).decode()})  # a 15 MiB body
        proc = psutil.Process(srv.proc.pid)
        assert (await call(ws, "PUT", "/api/contents/up0.bin", body=model))[0]["status"] == 201
        start = proc.memory_info().rss
        for i in range(12):
            frame, _ = await call(ws, "PUT", f"/api/contents/up{i % 2}.bin", body=model)
            assert frame["status"] in (200, 201)
        growth = proc.memory_info().rss - start
        assert growth < 50 * 2**20, f"server grew {growth / 2**20:.0f} MiB"
        assert (srv.root / "up1.bin").read_bytes() == raw
        ws.close()
    finally:
        stop_server(srv)
