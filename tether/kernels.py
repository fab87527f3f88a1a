"""The life-cycle client: list and release the kernels of a tether server, here or on a host.

Library code under the CLI and beside :mod:`tether.session`. On the server's own machine it
talks to the server found through its 0600 state file (port or Unix socket, token in a header).
For a HOST it runs the remote ``tether ps|release --json`` over the user's ssh and parses the
answer; a remote failure comes back as the same :mod:`tether.errors` class it was there.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from typing import Any, Protocol

from tether import _ssh, bootstrap
from tether.errors import (ConfigError, KernelNotFoundError, ServerError, ServerNotFoundError,
                           from_json)

RELEASE_TIMEOUT = 120.0  # the server bounds each step; this only guards against a hung server
LISTING_TIMEOUT = 30.0


class Kernels(Protocol):
    """Where the kernels are: this machine's server, or the one on a host."""

    async def listing(self) -> dict[str, Any]: ...

    async def release(self, kernels: Sequence[str], everything: bool, force: bool,
                      stop_server: bool) -> dict[str, Any]: ...

    async def page(self) -> dict[str, Any]:
        """The server's address (empty for a socket-only server) and token."""
        ...


def local_servers() -> list[dict[str, Any]]:
    """Every live tether server of this user on this machine (state files), newest first."""
    from tether.remote.state import running_servers

    # the two folders are one where JUPYTER_RUNTIME_DIR names tether's (as on a host `up` uses)
    found = {(s.pid, s.instance): asdict(s) for d in bootstrap.local_runtime_dirs()
             for s in running_servers(d)}
    return sorted(found.values(), key=lambda s: s["started"], reverse=True)


def describe_server(state: dict[str, Any]) -> str:
    where = f"socket {state['sock']}" if state.get("sock") else f"port {state['port']}"
    started = time.strftime("%H:%M", time.localtime(state.get("started") or 0))
    return f"{where} (pid {state['pid']}, started {started}, {state.get('root_dir', '?')})"


def server_key(state: dict[str, Any]) -> str:
    """What ``--server`` takes to name this server: its port, or its socket's path."""
    return str(state["sock"] or state["port"])


def find_local_server(server: str | None = None, acting: bool = False) -> dict[str, Any]:
    """The tether server of this user on this machine that a command means: the one named by
    ``server`` (port or socket), else the only one; with several, the newest for a command that
    only reads, and for one that acts (``acting``) an error listing them."""
    servers = local_servers()
    if server is not None:
        servers = [s for s in servers if server in (str(s["port"]), s["sock"])]
        if not servers:
            raise ServerNotFoundError(f"no tether server of this user here on {server}",
                                      hint="`tether ps` names the servers that run here.")
    if not servers:
        raise ServerNotFoundError("no running tether server for this user on this machine",
                                  hint="Start one with `tether serve`, or name the machine it "
                                       "runs on: `tether ps HOST`, `tether release HOST ...`.")
    if acting and len(servers) > 1:
        listed = "; ".join(describe_server(s) for s in servers)
        raise ConfigError(f"{len(servers)} tether servers of this user run here: {listed}",
                          hint=f"Say which with --server PORT|SOCKET (e.g. --server "
                               f"{server_key(servers[0])}).")
    return {**servers[0], "others": len(servers) - 1}


def resolve(wanted: Sequence[str], kernels: list[dict[str, Any]]) -> list[str]:
    """Kernel ids for ``wanted``: ids, unique id prefixes, or notebook paths."""
    ids = []
    for key in wanted:
        hits = [k["id"] for k in kernels if k["id"].startswith(key) or k.get("path") == key]
        if len(hits) != 1:
            what = "no kernel matches" if not hits else f"{len(hits)} kernels match"
            raise KernelNotFoundError(f"{what} {key!r}",
                                      hint="`tether ps` lists the kernels with their ids.")
        ids.append(hits[0])
    return list(dict.fromkeys(ids))


class LocalKernels:
    """The server on this machine, over its port or Unix socket."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    async def call(self, method: str, path: str, body: Any = None,
                   timeout: float = RELEASE_TIMEOUT) -> Any:
        from tether.remote.kernel_helper import ApiError, api_request

        try:
            return await asyncio.to_thread(api_request, self.state, method, path, body, timeout)
        except ApiError as e:
            raise ServerError(str(e), status=e.status) from e

    async def page(self) -> dict[str, Any]:
        return {"url": self.state.get("url") or "", "token": self.state["token"]}

    async def listing(self) -> dict[str, Any]:
        data: dict[str, Any] = await self.call("GET", "kernels", timeout=LISTING_TIMEOUT)
        # which server this is, where others run too (a command that only reads names it)
        data["read_from"] = {"server": server_key(self.state), "pid": self.state["pid"],
                             "others": self.state.get("others", 0)}
        return data

    async def release(self, kernels: Sequence[str], everything: bool, force: bool,
                      stop_server: bool) -> dict[str, Any]:
        if everything:
            data: dict[str, Any] = await self.call(
                "POST", "release", {"force": force, "stop_server": stop_server})
            return data
        ids = resolve(kernels, (await self.listing())["kernels"])
        started = time.monotonic()
        outcomes = await asyncio.gather(*(
            self.call("POST", f"kernels/{kid}/release", {"force": force}) for kid in ids))
        return {"released": all(o["released"] for o in outcomes), "kernels": list(outcomes),
                "seconds": round(time.monotonic() - started, 3)}


Runner = Callable[[list[str]], Awaitable[tuple[int, str]]]


class RemoteKernels:
    """The server on a host: runs the remote ``tether ... --json`` through ``runner``.

    ``runner`` takes the arguments of the remote ``tether`` and returns (exit status, stdout);
    :func:`ssh_runner` is the one for real hosts.
    """

    def __init__(self, host: str, runner: Runner, extra: Sequence[str] = ()) -> None:
        self.host = host
        self.runner = runner
        self.extra = list(extra)  # options for every remote command (--server)

    async def _json(self, args: list[str]) -> dict[str, Any]:
        status, text = await self.runner([*args, *self.extra])
        try:
            data: dict[str, Any] = json.loads(text.strip().splitlines()[-1])
        except (ValueError, IndexError) as e:
            raise ServerError(f"`tether {args[0]}` on {self.host} gave no answer (exit {status})",
                              hint=f"`tether status {self.host}` shows whether a runtime is up "
                                   "there.", host=self.host) from e
        error = from_json(data)
        if isinstance(error, ServerNotFoundError):
            raise ServerNotFoundError(f"no tether server is running on {self.host}",
                                      hint=f"Start one with `tether up {self.host}`.",
                                      host=self.host)
        if error is not None:
            raise error
        return data

    async def listing(self) -> dict[str, Any]:
        return await self._json(["ps", "--json"])

    async def page(self) -> dict[str, Any]:
        """The remote server's page address and token (``tether open``), over ssh's stdout."""
        return await self._json(["open", "--json"])

    async def release(self, kernels: Sequence[str], everything: bool, force: bool,
                      stop_server: bool) -> dict[str, Any]:
        args = ["release", "--json", *kernels]
        args += ["--all"] if everything else []
        args += ["--force"] if force else []
        args += ["--stop-server"] if stop_server else []
        return await self._json(args)


def ssh_runner(target: _ssh.SSHTarget) -> Runner:
    """Run the remote ``tether`` that ``tether up`` installed, through the user's ssh."""

    async def run(args: list[str]) -> tuple[int, str]:
        done = await _ssh.run(target, bootstrap.remote_tether_argv(*args),
                              timeout=RELEASE_TIMEOUT, check=False)
        if done.returncode == bootstrap.NO_TETHER:
            raise ServerNotFoundError(f"tether is not set up on {target.host}",
                                      hint=f"Start a runtime there with `tether up "
                                           f"{target.host}`.", host=target.host)
        if done.returncode == _ssh.SSH_FAILED or (done.returncode and not done.stdout.strip()):
            raise _ssh.ssh_error(target, f"tether {args[0]}", done.returncode, done.stderr)
        return done.returncode, done.text

    return run


def kernels_for(target: _ssh.SSHTarget | None, server: str | None = None,
                acting: bool = False) -> Kernels:
    """The kernels on ``target``, or on this machine when it is None (``server``: which one,
    by port or socket, where several run)."""
    if target is None:
        return LocalKernels(find_local_server(server, acting))
    return RemoteKernels(target.host, ssh_runner(target),
                         ["--server", server] if server else [])

