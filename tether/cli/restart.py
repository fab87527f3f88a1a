"""``tether restart HOST``: a new server for the runtime that keeps the running kernels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from rich.markup import escape

from tether.cli import cli, err, print_json, run
from tether.cli.remote import (
    ConsoleReporter,
    consent_prompt,
    make_backend,
    remote_options,
    ssh_options,
)
from tether.cli.serve import serve_options
from tether.contract import RestartResult


def _without_port(command: click.Command) -> click.Command:
    """The serve options of `up`, but the local port: a restart opens no tunnel."""
    command.params = [p for p in command.params if p.name != "port"]
    return command


@_without_port
@cli.command()
@click.argument("host")
@serve_options
@ssh_options
@click.option("--kernel-python", metavar="PATH", help="Remote Python new kernels run in.")
@click.option("--conda-env", metavar="NAME", help="Remote conda env new kernels run in.")
@click.option("--install-kernel-deps/--no-install-kernel-deps", default=None,
              help="Install ipykernel and psutil into the kernel's Python if missing.")
@click.option("--remote-port", type=int, default=None, metavar="N",
              help="Serve on 127.0.0.1:N on the remote instead of a Unix socket (0: any).")
@click.option("--offline", is_flag=True,
              help="Prepare HOST from wheels this machine sends (no package index there).")
@click.option("--slurm", is_flag=True, help="HOST is a Slurm login node: restart in our job.")
def restart(host: str, origins: tuple[str, ...], notebook_dir: Path | None, idle_timeout: int,
            as_json: bool, **kw: Any) -> None:
    """Start a new server on HOST that keeps the running kernels.

    For new options (those given here; the others stay as they were) or this tether's version
    (installed on HOST first). The URL and token stay the same: Colab and an attached
    `tether up` reconnect by themselves, to the same kernels.
    """
    opts = remote_options(origins=origins, notebook_dir=notebook_dir, idle_timeout=idle_timeout,
                          **kw)
    reporter = ConsoleReporter(as_json)
    backend = make_backend(host, kw, opts, consent=consent_prompt(reporter))
    try:
        result = run(lambda: backend.restart_server(lambda e: reporter.event(host, e)))
    finally:
        reporter.close()
    if as_json:
        print_json({"host": host, "pid": result.server.pid, "version": result.server.version,
                    "replaced": list(result.replaced), "old_version": result.old_version,
                    "kept": list(result.kept), "lost": list(result.lost),
                    "warnings": list(result.warnings)})
        return
    for warning in result.warnings:
        err.print(f"[yellow]note:[/] {host}: {escape(warning)}")
    err.print(summary(host, result))
    if result.lost:
        err.print(f"[yellow]note:[/] {host}: kernels that had ended, or could not be verified "
                  f"as tether's, are not back: {escape(', '.join(result.lost))}")


def summary(host: str, result: RestartResult) -> str:
    new = f"pid {result.server.pid}, tether {result.server.version}"
    if not result.replaced:
        return f"No server was running on {host}; started one ({new})."
    old = ", ".join(map(str, result.replaced))
    was = f" (tether {result.old_version})" if result.old_version else ""
    kept = (f"; {len(result.kept)} kernel(s) kept running" if result.kept
            else "; no kernel was running")
    return f"Restarted the server on {host}: pid {old}{was} -> {new}{kept}; same URL and token."
