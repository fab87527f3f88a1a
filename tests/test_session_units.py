"""``session.up`` through a fake backend (as httpx's ``MockTransport`` is for its transports):
the orchestrator's own logic without sshd. The backend seam is all it uses, so a backend that
"runs" a small tornado server in this process, and a forwarder that serves it on the local
port, stand in for the host and the tunnel. The real ones are tested against a real sshd and
Slurm (tests/test_up.py, tests/test_slurm.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import tornado.httpserver
import tornado.web

from tether import _ssh, session
from tether.backends import Placement, Report
from tether.contract import ServerInfo, UpResult
from tether.errors import ConfigError, PortInUseError, RemoteEnvironmentError, TetherError
from tether.kernels import Kernels
from tether.tunnel import Forward, State, Status, free_port

DEADLINE = 10.0


class FakeServer:
    """What a tether server answers to ``up``: its build info, status and kernels."""

    def __init__(self, pid: int, kernels: list[dict[str, Any]]) -> None:
        self.pid, self.kernels = pid, kernels
        owner = self

        class Build(tornado.web.RequestHandler):
            def get(self) -> None:
                self.write({"release_tag": "tether-test"})

        class Status(tornado.web.RequestHandler):
            def get(self) -> None:
                self.write({"started": "now"})

        class Kernels(tornado.web.RequestHandler):
            def get(self) -> None:
                self.write(json.dumps({"kernels": owner.kernels, "gpus": [
                    {"memory_used": 1 << 30, "memory_total": 16 << 30}]}))

        self.app = tornado.web.Application([(r"/api/colab/build-info", Build),
                                            (r"/api/status", Status),
                                            (r"/tether/api/kernels", Kernels)])
        self.http: tornado.httpserver.HTTPServer | None = None

    def listen(self, port: int) -> None:
        self.http = tornado.httpserver.HTTPServer(self.app)
        self.http.listen(port, "127.0.0.1")

    def close(self) -> None:
        if self.http is not None:
            self.http.stop()
            self.http = None


@dataclass
class FakeForwarder:
    """The tunnel: serves the placement's server on the local port; ``drop()`` is a lost
    server, healed as the real tunnel heals it (``restart_server``)."""

    backend: FakeBackend
    forward: Forward
    extra: tuple[tuple[int, int], ...]
    on_status: Callable[[Status], None]
    status: Status = field(default_factory=lambda: Status(State.CONNECTING))
    restart_server: Callable[[], Any] | None = None
    dropped: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False

    async def open(self) -> None:
        self.backend.server.listen(self.forward.local_port)
        self.status = Status(State.UP)
        self.on_status(self.status)

    async def run(self) -> None:
        while True:
            await self.dropped.wait()
            self.dropped.clear()
            self.backend.server.close()
            self.status = Status(State.RECONNECTING, reconnects=self.status.reconnects + 1)
            self.on_status(self.status)
            assert self.restart_server is not None
            self.forward = await self.restart_server()
            await self.open()

    async def aclose(self) -> None:
        self.backend.server.close()
        self.closed = True


@dataclass
class FakeLink:
    notes: list[str]
    closed: bool = False

    async def start(self) -> list[str]:
        return self.notes

    async def aclose(self) -> None:
        self.closed = True

    async def auth(self) -> tuple[str, bool]:
        return "publickey", False


@dataclass
class FakeBackend:
    fail: TetherError | None = None
    notes: list[str] = field(default_factory=list)
    server: FakeServer = field(default_factory=lambda: FakeServer(100, [
        {"id": "k1", "path": "train.ipynb"}]))
    links: list[FakeLink] = field(default_factory=list)
    forwarders: list[FakeForwarder] = field(default_factory=list)
    abandoned: int = 0
    adopts: bool = False  # a restarted server adopts the kernels (tether.remote.adopt)

    @property
    def host(self) -> str:
        return "fakehost"

    @property
    def target(self) -> _ssh.SSHTarget:
        return _ssh.SSHTarget("fakehost")

    def flags(self) -> tuple[str, ...]:
        return ("--fake",)

    def link(self, on_prompt: Callable[[bool], None]) -> FakeLink:
        self.links.append(FakeLink(self.notes))
        return self.links[-1]

    def forwarder(self, placement: Placement, local_port: int, token: str,
                  extra: Sequence[tuple[int, int]] = (),
                  on_status: Callable[[Status], None] | None = None) -> FakeForwarder:
        self.forwarders.append(FakeForwarder(self, placement.forward(local_port), tuple(extra),
                                             on_status or (lambda s: None)))
        return self.forwarders[-1]

    def _placement(self, adopted: tuple[str, ...] = ()) -> Placement:
        info = ServerInfo(pid=self.server.pid, token="t0k3n", sock="/r/s.sock", adopted=adopted)
        return Placement(UpResult(info, reused=False), self.target)

    async def probe(self) -> dict[str, Any]:
        return {}

    async def start(self, on_event: Any, on_note: Any) -> Placement:
        if self.fail is not None:
            raise self.fail
        on_event({"event": "step", "key": "start", "state": "done", "label": "started"})
        return self._placement()

    async def restart(self, token: str, on_event: Any) -> Placement:
        kernels = self.server.kernels if self.adopts else []  # else the kernel is gone
        self.server = FakeServer(self.server.pid + 1, kernels)
        return self._placement(tuple(k["id"] for k in kernels))

    async def socket_refused(self, on_event: Any) -> Placement | None:
        return None

    async def watch(self, info: dict[str, Any], on_note: Any) -> None:
        info["job"] = "7"
        await asyncio.Event().wait()

    async def abandon(self) -> None:
        self.abandoned += 1

    def on_ctrl_c(self) -> str:
        return "Ctrl-C detaches."

    def leaving(self) -> str:
        return ""

    def record(self) -> dict[str, Any]:
        return {}

    async def stop(self) -> Report:
        return Report({})

    async def status(self) -> Report:
        return Report({})

    async def running(self) -> str:
        return ""

    def kernels(self) -> Kernels:
        raise NotImplementedError


@dataclass
class Recorder:
    """A :class:`session.Reporter` that keeps everything, and wakes waiters."""

    modules = ("json",)

    events: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    lives: list[session.Live] = field(default_factory=list)
    runtime: session.Runtime | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def event(self, host: str, event: dict[str, Any]) -> None:
        self.events.append(event)

    def ready(self, runtime: session.Runtime) -> None:
        self.runtime = runtime
        self.changed.set()

    def live(self, host: str, live: session.Live) -> None:
        self.lives.append(live)
        self.changed.set()

    def note(self, host: str, text: str) -> None:
        self.notes.append(text)
        self.changed.set()

    async def until(self, what: Callable[[], bool]) -> None:
        async with asyncio.timeout(DEADLINE):
            while not what():
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture(autouse=True)
def _fast_status(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session, "STATUS_INTERVAL", 0.02)


async def test_up_reports_ready_supervises_and_cleans_up_on_cancel() -> None:
    backend, reporter = FakeBackend(notes=["typed a password"]), Recorder()
    port, extra = free_port(), free_port()
    cfg = session.UpConfig(backend, port, ((extra, 6006),))
    task = asyncio.ensure_future(session.up(cfg, reporter))
    try:
        await reporter.until(lambda: any(live.kernels == 1 for live in reporter.lives))
        runtime = reporter.runtime
        assert runtime is not None and runtime.colab_url == f"http://127.0.0.1:{port}/?token=t0k3n"
        assert runtime.to_json()["forwards"] == [{"local": f"http://127.0.0.1:{extra}/",
                                                  "remote_port": 6006}]
        assert backend.forwarders[0].extra == ((extra, 6006),)
        assert reporter.notes == ["typed a password"]
        assert session.attached_port("fakehost") == port  # `doctor` and `open` find it
        live = next(live for live in reporter.lives if live.kernels == 1)
        assert (live.gpu_used, live.gpu_total) == (1 << 30, 16 << 30)
        assert runtime.info == {"job": "7"} and runtime.kernels_seen == ["train.ipynb"]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert backend.links[0].closed and backend.forwarders[0].closed
    assert backend.abandoned == 1  # on the way out, bounded
    assert session.attached_port("fakehost") is None


@contextlib.asynccontextmanager
async def running_up(backend: FakeBackend, reporter: Recorder) -> AsyncIterator[None]:
    """``session.up`` running, its status line showing the kernel; cancelled on the way out."""
    task = asyncio.ensure_future(session.up(session.UpConfig(backend, free_port()), reporter))
    try:
        await reporter.until(lambda: any(live.kernels == 1 for live in reporter.lives))
        yield
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def died(backend: FakeBackend, reporter: Recorder) -> str:
    """The server behind the tunnel dies: the note ``up`` gives once it is back."""
    backend.forwarders[0].dropped.set()
    await reporter.until(lambda: any("was started again" in n for n in reporter.notes))
    return next(n for n in reporter.notes if "was started again" in n)


async def test_a_server_that_died_comes_back_with_its_kernels_adopted() -> None:
    backend, reporter = FakeBackend(adopts=True), Recorder()
    async with running_up(backend, reporter):
        note = await died(backend, reporter)
        assert "its kernels kept running (train.ipynb)" in note and "lost" not in note, note
        assert reporter.runtime is not None and reporter.runtime.kernels_seen == ["train.ipynb"]


async def test_a_server_that_died_is_restarted_on_the_same_url_and_its_kernels_named() -> None:
    backend, reporter = FakeBackend(), Recorder()
    async with running_up(backend, reporter):
        note = await died(backend, reporter)
        assert "kernels lost: train.ipynb" in note, note
        assert reporter.runtime is not None and reporter.runtime.server.pid == 101
        await reporter.until(lambda: reporter.lives[-1].kernels == 0)


async def test_a_failed_start_abandons_and_closes_the_link() -> None:
    backend = FakeBackend(fail=RemoteEnvironmentError("no Python 3.11 on fakehost"))
    reporter = Recorder()
    with pytest.raises(RemoteEnvironmentError):
        await session.up(session.UpConfig(backend, free_port()), reporter)
    assert backend.abandoned >= 1 and backend.links[0].closed and not backend.forwarders
    assert reporter.runtime is None and session.attached_port("fakehost") is None


async def test_taken_local_ports_are_refused_before_any_connection() -> None:
    backend = FakeBackend()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"--forward 6006:{busy}: local port {busy}"):
            await session.up(session.UpConfig(backend, free_port(), ((busy, 6006),)),
                             Recorder())
        with pytest.raises(PortInUseError, match=f"local port {busy} is already in use"):
            await session.up(session.UpConfig(backend, busy), Recorder())
    port = free_port()
    with pytest.raises(ConfigError, match="same local port"):
        await session.up(session.UpConfig(backend, port, ((port, 6006),)), Recorder())
    assert backend.links == []  # nothing was connected
