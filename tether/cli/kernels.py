"""``tether ps [HOST]`` and ``tether release [HOST] [KERNEL ...|--all]``.

On the VM (no HOST) they talk to the local tether server found through its state file. With a
HOST they run the same command with ``--json`` on the remote (``ssh HOST -- <remote tether> ...``
through :mod:`tether._ssh`) and show its answer here, so both ends print the same thing.
``release`` exits 0 when everything was freed, 3 (:class:`ReleaseError`) when something is left.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, TypeVar

import click
from rich.table import Table

from tether.cli import cli, err, make_target, out, print_json, run, shared_ssh_options
from tether.errors import ReleaseError, ServerError, ServerNotFoundError, TetherError

MIB = 1024 * 1024
RELEASE_TIMEOUT = 120.0  # the server bounds each step; this only guards against a hung server
_KERNEL_SHAPE = re.compile(r"^[0-9a-f]{4,8}(-[0-9a-f-]{0,28})?$")


# --- where the server is ----------------------------------------------------------------------


class Backend(Protocol):
    async def listing(self) -> dict[str, Any]: ...

    async def release(self, kernels: Sequence[str], everything: bool, force: bool,
                      stop_server: bool) -> dict[str, Any]: ...


def _runtime_dirs() -> list[str | None]:
    """The default Jupyter runtime dir, then the one ``tether up`` uses on a remote."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return [None, str(Path(cache) / "tether" / "runtime")]


def find_local_server() -> dict[str, Any]:
    from tether.remote.state import find_server

    for runtime_dir in _runtime_dirs():
        try:
            return asdict(find_server(runtime_dir))
        except ServerNotFoundError:
            continue
    raise ServerNotFoundError("no running tether server for this user on this machine",
                              hint="Start one with `tether serve` (or `tether up HOST` from "
                                   "your laptop), or name the HOST.")


class LocalBackend:
    """The server on this machine, over its port or Unix socket (stdlib HTTP, token header)."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    async def call(self, method: str, path: str, body: Any = None,
                   timeout: float = RELEASE_TIMEOUT) -> Any:
        from tether.remote.kernel_helper import ApiError, api_request

        try:
            return await asyncio.to_thread(api_request, self.state, method, path, body, timeout)
        except ApiError as e:
            raise ServerError(str(e), status=e.status) from e

    async def listing(self) -> dict[str, Any]:
        data: dict[str, Any] = await self.call("GET", "kernels", timeout=30)
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


def resolve(wanted: Sequence[str], kernels: list[dict[str, Any]]) -> list[str]:
    """Kernel ids for ``wanted``: ids, unique id prefixes, or notebook paths."""
    ids = []
    for key in wanted:
        hits = [k["id"] for k in kernels if k["id"].startswith(key) or k.get("path") == key]
        if len(hits) != 1:
            what = "no kernel" if not hits else f"{len(hits)} kernels"
            raise TetherError(f"{what} match {key!r}", hint="See `tether ps` for the ids.")
        ids.append(hits[0])
    return list(dict.fromkeys(ids))


Runner = Callable[[list[str]], Awaitable[tuple[int, str]]]


class RemoteBackend:
    """The server on HOST: runs the remote ``tether ... --json`` through ``runner``.

    ``runner`` takes the arguments of the remote ``tether`` and returns (exit status, stdout);
    :func:`ssh_runner` is the one for real hosts.
    """

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    async def _json(self, args: list[str]) -> dict[str, Any]:
        status, text = await self.runner(args)
        try:
            data: dict[str, Any] = json.loads(text.strip().splitlines()[-1])
        except (ValueError, IndexError) as e:
            raise ServerError(f"the remote `tether {' '.join(args)}` failed (exit {status})",
                              hint="Is a runtime up there? Try `tether status HOST`.") from e
        if "error" in data and "kernels" not in data:
            raise ServerError(str(data["error"]), hint=str(data.get("hint", "")))
        return data

    async def listing(self) -> dict[str, Any]:
        return await self._json(["ps", "--json"])

    async def release(self, kernels: Sequence[str], everything: bool, force: bool,
                      stop_server: bool) -> dict[str, Any]:
        args = ["release", "--json", *kernels]
        args += ["--all"] if everything else []
        args += ["--force"] if force else []
        args += ["--stop-server"] if stop_server else []
        return await self._json(args)


def ssh_runner(host: str, ssh_config: str | None, ssh_opts: tuple[str, ...], batch: bool) -> Runner:
    """Run the remote ``tether`` that ``tether up`` installed, through the user's ssh."""
    from tether import _ssh

    target = make_target(host, ssh_config, ssh_opts, batch)

    async def run(args: list[str]) -> tuple[int, str]:
        done = await _ssh.run(target, _ssh.remote_tether_argv(*args), timeout=RELEASE_TIMEOUT,
                              check=False)
        if done.returncode == _ssh.SSH_FAILED or (done.returncode and not done.stdout.strip()):
            raise _ssh.ssh_error(target, f"tether {' '.join(args)}", done.returncode, done.stderr)
        return done.returncode, done.text

    return run


def backend_for(host: str | None, ssh: dict[str, Any]) -> Backend:
    if host is None:
        return LocalBackend(find_local_server())
    return RemoteBackend(ssh_runner(host, ssh.get("ssh_config"), tuple(ssh.get("ssh_opts", ())),
                                    bool(ssh.get("batch"))))


def split_host(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """``[HOST] [KERNEL ...]``: the first argument is a HOST unless it looks like a kernel id
    (hex, at least 4 characters, uuid-like) or a notebook path (``*.ipynb``)."""
    if args and not _KERNEL_SHAPE.match(args[0]) and not args[0].endswith(".ipynb"):
        return args[0], list(args[1:])
    return None, list(args)


# --- showing it -------------------------------------------------------------------------------


def mib(n: int | None) -> str:
    return "?" if n is None else f"{n / MIB:,.0f}"


def idle_for(last_activity: str | None, now: datetime | None = None) -> str:
    if not last_activity:
        return "-"
    then = datetime.fromisoformat(last_activity.replace("Z", "+00:00"))
    seconds = int(((now or datetime.now(timezone.utc)) - then).total_seconds())
    if seconds < 120:
        return f"{max(seconds, 0)}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def ps_table(data: dict[str, Any]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in ("KERNEL", "NOTEBOOK", "STATE", "IDLE", "RSS MiB", "GPU MiB", "GPUS", "PROCS",
                 "CONN"):
        table.add_column(name, justify="right" if "MiB" in name or name in ("PROCS", "CONN")
                         else "left")
    for k in data["kernels"]:
        table.add_row(k["id"][:8], k.get("path") or "-", k.get("execution_state", "?"),
                      idle_for(k.get("last_activity")), mib(k.get("rss")),
                      mib(k.get("gpu_memory")),
                      ",".join(str(i) for i in k.get("gpus", [])) or "-",
                      str(len(k.get("processes", []))),
                      str(k.get("connections", 0)))
    return table


def show_ps(data: dict[str, Any]) -> None:
    if data["kernels"]:
        out.print(ps_table(data))
    else:
        err.print("no kernels")
    for g in data.get("gpus", []):
        err.print(f"GPU {g['index']} {g['name']}: {mib(g['memory_used'])} / "
                  f"{mib(g['memory_total'])} MiB used, {g['utilization']} % busy")
    for f in data.get("foreign", []):
        owner = f"of kernel {f['kernel'][:8]}, " if f.get("kernel") else ""
        err.print(f"[yellow]foreign GPU holder:[/] pid {f['pid']} ({owner}{f['user']}, "
                  f"{f['name']}, state {f['status']}, {mib(f['gpu_memory'])} MiB)")
    for o in data.get("orphans", []):
        err.print(f"[yellow]left by a crashed server:[/] pid {o['pid']} ({o['name']})")


def _leftover_line(row: dict[str, Any]) -> str:
    reset = " [bold]needs a GPU reset[/]" if row.get("needs_gpu_reset") else ""
    return (f"  pid {row['pid']} {row['name']} user {row['user']} state {row['status']} "
            f"GPU {mib(row.get('gpu_memory'))} MiB: {row.get('reason', '')}{reset}")


def show_release(result: dict[str, Any]) -> None:
    outcomes = [*result.get("kernels", [])]
    if result.get("stray"):
        outcomes.append(result["stray"])
    for o in outcomes:
        ended = len(o["terminated"]) + len(o["killed"])
        what = f"kernel {o['kernel'][:8]}" if o["kernel"] else "other processes of the server"
        if o["kernel"] is None and not ended and not o["leftovers"]:
            continue
        line = f"{what}: {ended} process(es) ended"
        if o["killed"]:
            line += f" ({len(o['killed'])} needed SIGKILL)"
        err.print(f"{'[green]released[/]' if o['released'] else '[red]NOT freed[/]'} {line} "
                  f"in {o['seconds']:.1f} s")
        if o.get("error"):
            err.print(f"  {o['error']}")
        for row in o["leftovers"]:
            err.print(_leftover_line(row))
        for row in o.get("foreign", []):
            err.print("[yellow]foreign GPU holder[/] (not killed; --force ends it):")
            err.print(_leftover_line({**row, "reason": "not ours"}))
        if o.get("forced"):
            err.print(f"  --force ended {o['forced']}")
    if not outcomes:
        err.print("no kernels")


# --- commands ---------------------------------------------------------------------------------


F = TypeVar("F", bound=Callable[..., Any])


@cli.command()
@click.argument("host", required=False)
@shared_ssh_options
@click.option("--json", "as_json", is_flag=True, help="Print the server's JSON answer.")
def ps(host: str | None, as_json: bool, **ssh: Any) -> None:
    """Kernels with notebook, state, idle time, RSS and GPU memory (on HOST, or here)."""
    data = run(lambda: backend_for(host, ssh).listing())
    if as_json:
        print_json(data)
    else:
        show_ps(data)


@cli.command()
@click.argument("args", nargs=-1, metavar="[HOST] [KERNEL]...")
@click.option("--all", "everything", is_flag=True, help="Every kernel, and every other process "
              "the server started.")
@click.option("--force", is_flag=True, help="Also end GPU holders that are not provably ours "
              "(never the server, its ancestors or system daemons).")
@click.option("--stop-server", is_flag=True, help="With --all: stop the server afterwards.")
@shared_ssh_options
@click.option("--json", "as_json", is_flag=True, help="Print the server's JSON answer.")
def release(args: tuple[str, ...], everything: bool, force: bool, stop_server: bool,
            as_json: bool, **ssh: Any) -> None:
    """Shut kernels down for sure and free their memory and GPU; verify it.

    KERNEL is an id, a unique id prefix, or a notebook path. The first argument is taken as
    HOST unless it looks like a kernel id or ends in .ipynb. Exit status 0: everything was
    freed; 3: something is left (listed).
    """
    host, kernels = split_host(args)
    if bool(kernels) == everything:
        raise TetherError("name the kernels to release, or --all",
                          hint="See `tether ps` for the ids.")
    if stop_server and not everything:
        raise TetherError("--stop-server goes with --all")
    result = run(lambda: backend_for(host, ssh).release(kernels, everything, force, stop_server))
    if as_json:
        print_json(result)
    else:
        show_release(result)
    if not result.get("released"):
        if as_json:
            raise SystemExit(ReleaseError.exit_code)
        raise ReleaseError("some processes or GPU memory could not be freed (listed above)",
                           hint="--force ends foreign GPU holders; D/Z processes need a GPU "
                                "reset or a reboot.")
