"""The command line: the only place that prints, exits, configures logging or runs the loop.

Commands live in small modules beside this one, one per area (``serve``, ``remote``,
``kernels``); library code raises :class:`tether.errors.TetherError`, which ends here as one
line on stderr and an exit status.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, NoReturn

import click
from rich.console import Console

from tether import __version__
from tether.errors import TetherError

# stdout carries results (the URL, --json); everything for humans goes to stderr
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, sort_keys=True))


def fail(error: TetherError) -> NoReturn:
    err.print(f"[bold red]error:[/] {error}", markup=True)
    sys.exit(error.exit_code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tether")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.pass_context
def cli(ctx: click.Context, verbose: int) -> None:
    """Turn any machine you can SSH into into a Colab-ready Jupyter runtime."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.obj = {"log_level": level}


def main() -> None:
    """Console-script entry point."""
    from tether.cli import serve as _serve  # noqa: F401  (registers commands)

    for name in ("remote", "kernels"):
        try:
            __import__(f"tether.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"tether.cli.{name}":
                raise
    try:
        cli.main(standalone_mode=False, prog_name="tether")
    except TetherError as e:
        fail(e)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
