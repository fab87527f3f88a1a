"""tether._http and the server checks of tether.tunnel, against a real ``tether serve``."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import threading
import time

import pytest

from tests.conftest import RunningServer
from tether import _http, tunnel
from tether.errors import TokenRejectedError, TunnelError


def test_get_and_post_json(server: RunningServer) -> None:
    async def main() -> None:
        status = await _http.get(server.port, "/api/status", server.token)
        assert status.ok and "started" in status.body
        build = await _http.get(server.port, "/api/colab/build-info", server.token)
        assert build.body == {"release_tag": "tether-0.1.0"}  # the XSSI prefix is gone
        made = await _http.post(server.port, "/api/contents", server.token, {"type": "notebook"})
        assert made.code == 201 and made.body["name"].endswith(".ipynb")
        refused = await _http.get(server.port, "/api/status", "not-the-token")
        assert refused.code == 403

    asyncio.run(main())


def test_a_tether_server_refusing_the_token_is_told_apart(server: RunningServer) -> None:
    asyncio.run(tunnel.verify_own_server(server.port, server.token))
    with pytest.raises(TokenRejectedError, match="restarted with a new token"):
        asyncio.run(tunnel.verify_own_server(server.port, "f" * 48, host="gpubox"))


def _no_answer(port: int, timeout: float = 1.0) -> tuple[str, float]:
    t0 = time.monotonic()
    with pytest.raises(_http.NoAnswer) as info:
        asyncio.run(_http.get(port, "/api/status", "t", timeout=timeout))
    assert isinstance(info.value, TunnelError) and info.value.data["port"] == port
    return info.value.data["reason"], time.monotonic() - t0


def test_nothing_answers_refused_closed_or_silent() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert _no_answer(port)[0] == "refused"

    with socket.socket() as silent:  # accepts (backlog) and never answers: a frozen path
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        reason, seconds = _no_answer(silent.getsockname()[1], timeout=1.0)
        assert reason == "timeout" and seconds < 3

    with socket.socket() as closing:  # accepts and closes: ssh when the remote end is gone
        closing.bind(("127.0.0.1", 0))
        closing.listen(8)
        closing.settimeout(10)

        def close_each() -> None:
            try:
                conn, _ = closing.accept()
                conn.recv(1024)
                conn.close()
            except OSError:
                pass

        thread = threading.Thread(target=close_each, daemon=True)
        thread.start()
        assert _no_answer(closing.getsockname()[1], timeout=5.0)[0] == "closed"
        thread.join(10)


def test_a_connection_reset_is_one_error_not_a_traceback(caplog) -> None:
    """A server that ends mid-request (a Slurm job cancelled by Ctrl-C) resets the connection:
    that is NoAnswer, and nothing else is logged at WARNING or above (tornado also logged it
    as an ERROR with a traceback on its application log)."""
    import struct

    async def main() -> None:
        accepted: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")  # the request is in: the server dies now
            await accepted.put(writer)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            fetch = asyncio.ensure_future(_http.get(port, "/api/status", "t", timeout=10))
            writer = await asyncio.wait_for(accepted.get(), 10)
            writer.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
            writer.transport.abort()
            with pytest.raises(_http.NoAnswer, match="reset"):
                await fetch

    async def late() -> None:
        """What tornado does, now and then, once the fetch has failed (1 run in 4 of a Ctrl-C
        of `up --slurm`): it sets the reset on an internal future that was cancelled, and logs
        that. Done here by tornado's own function, deterministically."""
        from tornado.concurrent import future_set_exc_info

        for exc in (ConnectionResetError(104, "Connection reset by peer"), ValueError("bug")):
            internal = asyncio.get_running_loop().create_future()
            internal.cancel()
            try:
                raise exc
            except Exception:
                future_set_exc_info(internal, sys.exc_info())

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
        asyncio.run(late())
    said = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.exc_info[1].args for r in said if r.exc_info] == [("bug",)], caplog.text  # only
