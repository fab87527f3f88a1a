"""``tether ps [HOST]`` and ``tether release [HOST] KERNEL...|--all``.

Without a host they talk to the tether server on this machine; with ``HOST`` they run the same
command with ``--json`` there (:mod:`tether.kernels`) and show its answer here, so both ends
print the same thing. ``release`` exits 0 when everything was freed, 3
(:class:`ReleaseError`) when something is left or could not be verified.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from tether.cli import (
    cli,
    err,
    json_option,
    make_target,
    out,
    print_json,
    run,
    shared_ssh_options,
)
from tether.errors import ConfigError, ReleaseError, SSHError
from tether.kernels import Kernels, kernels_for

MIB = 1024 * 1024


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


def seconds(n: float) -> str:
    n = int(n)
    return f"{n}s" if n < 120 else f"{n // 60}m" if n < 7200 else f"{n // 3600}h{n % 3600 // 60:02d}m"


def release_in(policy: dict[str, Any] | None) -> str:
    """When the idle policy releases the kernel ("in 42m", "in 12m (GPU)"), or why it keeps it."""
    if not policy:
        return "-"
    if policy.get("release_in") is None:
        return {"no idle timeout": "never"}.get(policy["reason"], f"kept: {policy['reason']}")
    gpu = " (GPU)" if "GPU" in policy["reason"] else ""
    return f"in {seconds(policy['release_in'])}{gpu}"


def ps_table(data: dict[str, Any]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in ("KERNEL", "NOTEBOOK", "STATE", "IDLE", "RSS MiB", "GPU MiB", "GPUS", "PROCS",
                 "CONN", "RELEASE"):
        table.add_column(name, justify="right" if "MiB" in name or name in ("PROCS", "CONN")
                         else "left")
    for k in data["kernels"]:
        table.add_row(k["id"][:8], k.get("path") or "-", k.get("execution_state", "?"),
                      idle_for(k.get("last_activity")), mib(k.get("rss")),
                      mib(k.get("gpu_memory")),
                      ",".join(str(i) for i in k.get("gpus", [])) or "-",
                      str(len(k.get("processes", []))),
                      str(k.get("connections", 0)), release_in(k.get("idle")))
    return table


def show_ps(data: dict[str, Any]) -> None:
    if data["kernels"]:
        # piped (grep, a file): the natural width, never rich's default 80 columns that
        # would cut the notebook paths
        wide = out if out.is_terminal else Console(file=out.file, width=250, highlight=False)
        wide.print(ps_table(data))
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
    server = data.get("server", {})
    if "idle_timeout" in server:
        general, on_gpu = server["idle_timeout"], server["gpu_idle_timeout"]
        err.print(f"idle kernels are released after {seconds(general) if general else 'never'}, "
                  f"those holding GPU memory after {seconds(on_gpu) if on_gpu else 'the same'}")


def _leftover_line(row: dict[str, Any]) -> str:
    reset = " [bold]needs a GPU reset[/]" if row.get("needs_gpu_reset") else ""
    return (f"  pid {row['pid']} {row['name']} user {row['user']} state {row['status']} "
            f"GPU {mib(row.get('gpu_memory'))} MiB: {row.get('reason', '')}{reset}")


def _forcible(row: dict[str, Any], host: str | None) -> str:
    """What ends a GPU holder that is no kernel's: never tether (it is not in any release's
    scope), the user, by the command printed, where it is theirs."""
    if not row.get("forcible", True):
        return "another user's: tether never ends it"
    where = f" on {host}" if host else ""
    return f"yours, but no kernel's: `kill {row['pid']}`{where} ends it"


def show_release(result: dict[str, Any], host: str | None = None) -> None:
    outcomes = [*result.get("kernels", [])]
    if result.get("stray"):
        outcomes.append(result["stray"])
    for o in outcomes:
        ended = len(o["terminated"]) + len(o["killed"])
        what = f"kernel {o['kernel'][:8]}" if o["kernel"] else "other processes of the server"
        if o["kernel"] is None and not ended and not o["leftovers"] and not o.get("foreign"):
            continue
        line = f"{what}: {ended} process(es) ended"
        if o.get("released") and o.get("verified") is False and o["kernel"]:
            line += " (not verified)"
        if o["killed"]:
            line += f" ({len(o['killed'])} needed SIGKILL)"
        err.print(f"{'[green]released[/]' if o['released'] else '[red]NOT freed[/]'} {line} "
                  f"in {o['seconds']:.1f} s")
        if o.get("error"):
            err.print(f"  {o['error']}")
        for row in o["leftovers"]:
            err.print(_leftover_line(row))
        for row in o.get("foreign", []):
            err.print(f"[yellow]GPU holder of no kernel[/] (not killed; {_forcible(row, host)}):")
            err.print(_leftover_line({**row, "reason": "not ours"}))
        if o.get("forced"):
            err.print(f"  --force ended {o['forced']}")
    if not outcomes:
        err.print("no kernels")
    if result.get("released") and not _verified(result):
        reason = result.get("unverified_reason") or next(
            (o.get("unverified_reason") for o in outcomes if o.get("unverified_reason")), "")
        err.print(f"[yellow]not verified:[/] {reason}" if reason else "[yellow]not verified[/]",
                  "(docs/kernels-and-gpu.md#verified-release-a-cgroup-per-kernel)"
                  if reason.startswith("no kernel cgroup") else "")


def _verified(result: dict[str, Any]) -> bool:
    if "verified" in result:
        return bool(result["verified"])
    return all(o.get("verified", True) for o in result.get("kernels", []))


# --- commands ---------------------------------------------------------------------------------


F = TypeVar("F", bound=Callable[..., Any])


def server_option(f: F) -> F:
    return click.option("--server", metavar="PORT|SOCKET",
                        help="Which tether server, where several of yours run on that machine "
                             "(its port, or its socket's path).")(f)


def host_option(f: F) -> F:
    f = server_option(f)
    f = click.option("--slurm", is_flag=True,
                     help="HOST is a Slurm login node: the runtime of our job there.")(f)
    return click.option("-H", "--host", "host_option", metavar="HOST",
                        help="Same as the HOST argument (the earlier spelling, accepted until "
                             "the next release).")(f)


def kernels_at(host: str | None, ssh: dict[str, Any], acting: bool = False) -> Kernels:
    slurm = ssh.pop("slurm", False)
    server = ssh.pop("server", None)
    if host is None:
        if slurm:
            raise ConfigError("--slurm needs the login node",
                              hint="Name it first: `tether ps LOGIN --slurm`.")
        return kernels_for(None, server, acting)
    if slurm and server:
        raise ConfigError("--server and --slurm: a job runs one server",
                          hint="Leave --server out.")
    config, options = ssh["ssh_config"], tuple(ssh["ssh_opts"])
    if not server:  # what `tether up HOST` recorded: a Slurm job needs no --slurm
        from tether import runtimes

        record, config, options = runtimes.implied(host, slurm, config, options)
        if record is not None:
            err.print(runtimes.said(record))
            slurm = True
    target = make_target(host, config, options, ssh["batch"])
    if slurm:
        from tether import backends
        from tether.bootstrap import RemoteOptions

        return backends.create("slurm", target, RemoteOptions()).kernels()
    return kernels_for(target, server, acting)


@cli.command()
@click.argument("host", required=False)
@host_option
@shared_ssh_options
@json_option
def ps(host: str | None, host_option: str | None, as_json: bool, **ssh: Any) -> None:
    """Kernels with notebook, state, idle time, RSS and GPU memory (on HOST, or here)."""
    if host and host_option and host != host_option:
        raise ConfigError(f"two hosts given ({host} and -H {host_option})",
                          hint="Name one, as the argument (-H is its earlier spelling).")
    where = host or host_option
    data = run(lambda: kernels_at(where, ssh).listing())
    if as_json:
        print_json(data)
        return
    show_ps(data)
    read = data.get("read_from") or {}
    if read.get("others"):
        err.print(f"(the server on {read['server']}, pid {read['pid']}; {read['others']} other "
                  f"tether server(s) of yours run here: --server PORT|SOCKET chooses)")


@cli.command()
@click.argument("names", nargs=-1, metavar="[HOST] KERNEL...")
@host_option
@click.option("--here", is_flag=True, help="The kernels are on this machine: every argument is "
              "a KERNEL (needed for several of them).")
@click.option("--all", "everything", is_flag=True, help="Every kernel, and every other process "
              "the server started.")
@click.option("--force", is_flag=True, help="Also end what survived, within the same scope: "
              "with KERNEL, that kernel's own processes; with --all, the server's (never a GPU "
              "holder of no kernel, another user's process, the server or its ancestors).")
@click.option("--stop-server", is_flag=True, help="With --all: stop the server afterwards.")
@shared_ssh_options
@json_option
def release(names: tuple[str, ...], host_option: str | None, here: bool, everything: bool,
            force: bool, stop_server: bool, as_json: bool, **ssh: Any) -> None:
    """Shut kernels down for sure and free their memory and GPU; verify it.

    `tether release HOST KERNEL...` or `tether release HOST --all` acts on HOST's runtime;
    one KERNEL alone, or --here, on this machine's. KERNEL is an id, a unique id prefix, or a
    notebook path. Exit status 0: everything was freed; 3: something is left (listed).
    """
    host, kernels = release_target(names, host_option, here, everything)
    if kernels and everything:
        raise ConfigError("name kernels or give --all, not both",
                          hint="`tether ps` lists the kernels with their ids.")
    if not kernels and not everything:
        raise ConfigError("name the kernels to release, or give --all",
                          hint="`tether ps` lists the kernels with their ids.")
    if stop_server and not everything:
        raise ConfigError("--stop-server goes with --all",
                          hint="`tether release --all --stop-server` frees everything and stops "
                               "the server.")
    try:
        result = run(lambda: kernels_at(host, ssh, acting=True).release(
            list(kernels), everything, force, stop_server))
    except SSHError as e:
        if host is not None and not host_option and len(names) > 1:  # HOST read from names
            e.hint = (e.hint + " " if e.hint else "") + (
                f"If {host} is a kernel on this machine: `tether release --here "
                f"{shlex.join(names)}`.")
        raise
    if as_json:
        print_json(result)
    else:
        show_release(result, host)
    if not result.get("released"):
        if as_json:
            raise SystemExit(ReleaseError.exit_code)
        raise ReleaseError("some processes or GPU memory could not be freed (listed above)",
                           hint="--force ends what is left of what you named (a GPU holder of "
                                "no kernel is listed with the command that ends it); D/Z "
                                "processes need a GPU reset or a reboot.")


def release_target(names: tuple[str, ...], host_option: str | None, here: bool,
                   everything: bool) -> tuple[str | None, tuple[str, ...]]:
    """(HOST or None for this machine, the kernels) from `release`'s arguments: HOST comes
    first where there is one (with KERNELs after it, or alone with --all); a single KERNEL,
    or --here, is this machine's; -H HOST is the earlier spelling."""
    if here and host_option:
        raise ConfigError("--here and -H: name one place",
                          hint="-H HOST releases on HOST; --here on this machine.")
    if host_option or here:
        return host_option, names
    if everything and len(names) == 1:
        return names[0], ()
    if len(names) >= 2 and not everything:
        return names[0], names[1:]
    return None, names


@cli.command("open")
@click.argument("host", required=False)
@click.option("--print-url", is_flag=True,
              help="Print the page's address (it holds the token) instead of opening a browser.")
@server_option
@click.option("--slurm", is_flag=True, help="HOST is a Slurm login node: our job's page (not "
              "needed after `tether up HOST --slurm`).")
@shared_ssh_options
@json_option
def open_page(host: str | None, print_url: bool, server: str | None, as_json: bool,
              **ssh: Any) -> None:
    """Open the runtime's page (GPUs, kernels, Release buttons) here, or HOST's through its
    `tether up` tunnel."""
    from tether.kernels import find_local_server

    if host is not None and server is not None:
        raise ConfigError("--server chooses among this machine's servers, not HOST's",
                          hint=f"`tether open {host}` opens the page of the `tether up {host}` "
                               "running here.")
    if host is None:
        if ssh.get("slurm"):
            raise ConfigError("--slurm needs the login node: `tether open LOGIN --slurm`")
        state = find_local_server(server, acting=True)
        if state.get("sock") and not as_json:  # (--json: what `tether open HOST` asks here)
            raise ConfigError("this machine's tether server listens on a Unix socket only",
                              hint="Open its page from your laptop: `tether open HOST` (through "
                                   "`tether up HOST` where it runs, else a tunnel of its own).")
        url, token = str(state.get("url") or ""), str(state["token"])
    else:
        from tether.session import attached_port

        port = attached_port(host)
        if port is None:  # no `up` here: a forward of its own, for the page
            _open_own(host, ssh, print_url, as_json)
            return
        url, token = _tunnelled(host, port, ssh)
    page = f"{url.rstrip('/')}/tether/?token={token}" if url else ""
    if as_json:
        print_json({"url": url, "token": token, "status_url": page})
    elif print_url:
        out.print(page, soft_wrap=True)
    else:
        _browse(page)


def _open_own(host: str, ssh: dict[str, Any], print_url: bool, as_json: bool) -> None:
    """HOST's page through a tunnel of this command's own (as `tether attach HOST` on a free
    local port), until Ctrl-C: what runs there keeps running."""
    from tether import session
    from tether.cli.remote import ConsoleReporter, _up, make_backend, remote_options
    from tether.tunnel import free_port

    class PageReporter(ConsoleReporter):
        def announce(self, runtime: session.Runtime) -> None:
            page = f"{runtime.url}tether/?token={runtime.token}"
            if as_json:
                print_json({"url": runtime.url, "token": runtime.token, "status_url": page})
            elif print_url:
                out.print(page, soft_wrap=True)
            else:
                _browse(page)
            err.print(f"No `tether up {host}` runs here: this command holds the page's tunnel "
                      f"(127.0.0.1:{runtime.local_port}); Ctrl-C closes it, the runtime keeps "
                      "running.")

    kw = {**ssh, "remote_python": "python3", "server": None}
    backend = make_backend(host, kw, remote_options(**kw), attach=True)
    _up([session.UpConfig(backend, free_port())], PageReporter(as_json))


def _tunnelled(host: str, port: int, ssh: dict[str, Any]) -> tuple[str, str]:
    """The local end of ``tether up HOST``'s tunnel (``port``), and the token of the server
    behind it."""
    kernels = kernels_at(host, {**ssh, "server": None})  # the job's, for a Slurm runtime
    remote = run(lambda: kernels.page())
    return f"http://127.0.0.1:{port}/", str(remote["token"])


BROWSER_READ_DEADLINE = 20.0  # a browser that starts cold takes seconds to load the file
READ_POLL = 0.05


def _wait_read(path: Path, before: float, deadline: float) -> bool:
    """Whether the browser read ``path`` within ``deadline`` s: its access time moves past
    ``before`` (the file was dated back to then, so that the first read moves it under relatime
    too). Where access times are off (noatime), False at once: the file stays, 0600, until the
    next `tether open`."""
    import os
    import time

    if os.statvfs(path).f_flag & os.ST_NOATIME:
        return False
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            if path.stat().st_atime > before + 30:
                return True
        except FileNotFoundError:
            return False
        time.sleep(READ_POLL)  # polling a file's state under a deadline: no inotify in stdlib
    return False


def _browse(page: str) -> None:
    """Open ``page`` through a private redirect file, as Jupyter does: the browser's command
    line (visible in ``ps``) never holds the token. The file is 0600 in a 0700 folder and is
    removed once the browser has read it."""
    import html
    import os
    import time
    import webbrowser

    from tether._private import write_private
    from tether.session import local_state_dir

    path = local_state_dir(create=True) / "open-page.html"
    write_private(path, f'<!doctype html><meta http-equiv="refresh" content="0;url='
                        f'{html.escape(page)}"><title>tether</title><p>Opening the tether page…</p>')
    before = time.time() - 60
    os.utime(path, (before, before))
    try:
        if not webbrowser.open(path.as_uri()):
            raise ConfigError("no web browser found to open the page",
                              hint="`tether open --print-url` prints its address.")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if _wait_read(path, before, BROWSER_READ_DEADLINE):
        path.unlink(missing_ok=True)
    err.print(f"opened the runtime's page in your browser ({page.split('?')[0]})")
