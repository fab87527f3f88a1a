"""``tether serve``: a Colab-ready runtime on this machine."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from tether.cli import F, cli, print_json
from tether.config import (
    COLAB_ORIGIN,
    DEFAULT_GPU_IDLE_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_KILL_GRACE,
    DEFAULT_PORT,
    TOKEN_ENV,
    ServeConfig,
    read_token,
)

if TYPE_CHECKING:
    from tether.remote.state import ServerState

LNA_HINT = (
    "Chrome may ask to let colab.research.google.com access devices on your local network: "
    "allow it, or the connection fails."
)


def say(line: str) -> None:
    """One line for humans, on stderr."""
    click.echo(line, err=True)


def serve_options(f: F) -> F:
    """The options shared by ``serve`` and ``up`` (which forwards them to the remote serve)."""
    options = [
        click.option("--port", type=int, default=DEFAULT_PORT, show_default=True,
                     help="Port on 127.0.0.1 (never moved to another one if taken)."),
        click.option("--origin", "origins", multiple=True, metavar="ORIGIN",
                     help=f"Extra exact browser origin to allow, besides {COLAB_ORIGIN}."),
        click.option("--notebook-dir", type=click.Path(path_type=Path, file_okay=False),
                     help="Directory the notebooks live in (default: the current one)."),
        click.option("--idle-timeout", type=int, default=DEFAULT_IDLE_TIMEOUT, show_default=True,
                     help="Seconds before an idle kernel with no open tab is shut down; 0: never."),
        click.option("--gpu-idle-timeout", type=int, default=DEFAULT_GPU_IDLE_TIMEOUT,
                     show_default=True, metavar="SECONDS",
                     help="Sooner, for an idle kernel that holds GPU memory (one whose processes "
                          "use a GPU is never idle); 0: --idle-timeout for every kernel."),
        click.option("--stop-after-idle", type=int, default=0, metavar="SECONDS",
                     help="Stop the server after this long with no kernels; 0 (default): never."),
        click.option("--on-idle", metavar="COMMAND",
                     help="Shell command run once when --stop-after-idle fires, before the server "
                          "stops, e.g. 'sudo poweroff' or "
                          "'az login --identity && az vm deallocate -g RG -n VM --no-wait'."),
        click.option("--kill-grace", type=float, default=DEFAULT_KILL_GRACE, show_default=True,
                     metavar="SECONDS",
                     help="When a kernel is shut down: SIGTERM to its leftover processes, SIGKILL "
                          "after this long."),
        click.option("--reap", is_flag=True,
                     help="At start, kill the processes a crashed tether server left behind "
                          "(they are always reported)."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@cli.command()
@click.pass_context
@serve_options
@click.option("--sock", type=click.Path(path_type=Path, dir_okay=False),
              help="Listen on this Unix socket (mode 0600) instead of a port.")
@click.option("--token-file", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="Read the token from this file (else $TETHER_TOKEN, else a fresh one).")
@click.option("--ip", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--i-know-this-exposes-the-server", "allow_remote", is_flag=True,
              help="Allow a non-loopback --ip. Anyone who can reach it can try the token.")
def serve(
    ctx: click.Context,
    port: int,
    origins: tuple[str, ...],
    notebook_dir: Path | None,
    idle_timeout: int,
    gpu_idle_timeout: int,
    stop_after_idle: int,
    on_idle: str | None,
    kill_grace: float,
    reap: bool,
    as_json: bool,
    sock: Path | None,
    token_file: Path | None,
    ip: str,
    allow_remote: bool,
) -> None:
    """Start a Colab-ready Jupyter server here and print the URL to paste into Colab."""
    from tether.remote.server import serve as run_server

    cfg = ServeConfig(
        port=port,
        sock=sock.absolute() if sock else None,
        ip=ip,
        allow_remote_access=allow_remote,
        origins=tuple(dict.fromkeys((COLAB_ORIGIN, *origins))),
        notebook_dir=notebook_dir.absolute() if notebook_dir else None,
        token=read_token(token_file),
        idle_timeout=idle_timeout,
        gpu_idle_timeout=gpu_idle_timeout,
        stop_after_idle=stop_after_idle,
        on_idle=on_idle,
        kill_grace=kill_grace,
        reap=reap,
        log_level=ctx.obj["log_level"],
    )
    os.environ.pop(TOKEN_ENV, None)  # kernels inherit the environment: keep the token out of it
    # click, not rich, prints here: ready() runs on the server's loop before its first request
    if os.geteuid() == 0:
        say(click.style("warning:", fg="yellow") + " running as root; kernels will run as root too.")

    def ready(state: ServerState) -> None:
        if as_json:
            print_json({**state.to_json(), "colab_url": state.colab_url,
                        "status_url": state.status_url})
            return
        if state.adopted:
            say(f"Kept {len(state.adopted)} kernel(s) of the server before this one running "
                "(same ids and sessions).")
        if state.lost:
            say(f"Kernels that had ended while no server ran: {', '.join(state.lost)}.")
        if state.sock:
            say(f"Jupyter server ready on socket {state.sock} (pid {state.pid}).")
            say("Forward it to a local port, e.g. with `tether up HOST` from your laptop.")
            return
        say(click.style("Colab runtime ready", fg="green") + f" (pid {state.pid}). In Colab: "
            "Connect > Connect to a local runtime, and paste:")
        click.echo(state.colab_url)
        say(LNA_HINT)
        say(f"Kernels, GPU memory and Release buttons: {state.url.rstrip('/')}/tether/"
            "?token=… (same token)")
        say("Ctrl-C stops the server and shuts its kernels down (SIGTERM leaves them running "
            "for the next server).")

    run_server(cfg, ready)
