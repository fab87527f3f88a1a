"""The command line: the only place that prints, exits, configures logging or runs the loop.

Commands live in small modules beside this one, one per area (``serve``, ``remote``,
``kernels``); library code raises :class:`tether.errors.TetherError`, which ends here as one
line on stderr and an exit status.

``tether serve`` is on the path of every ``up``: a command's module is imported only when that
command runs (:class:`_LazyGroup`), and rich only when something prints through :data:`out` or
:data:`err`, so the server imports neither the SSH side nor rich (bench/bench_serve.py).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import re
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from tether import __version__
from tether.config import remote_cache
from tether.errors import ConfigError, TetherError, sentence

if TYPE_CHECKING:
    from rich.console import Console

    from tether import _ssh

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger(__name__)

# stdout carries results (the URL, --json); everything for humans goes to stderr. Made on first
# use (module __getattr__, PEP 562): importing rich costs a start of `tether serve` ~30 ms.
if TYPE_CHECKING:
    out: Console
    err: Console
else:
    def __getattr__(name: str) -> Any:
        if name not in ("out", "err"):
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        from rich.console import Console

        console = Console(stderr=name == "err", highlight=False, soft_wrap=True)
        globals()[name] = console
        return console


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, sort_keys=True))


class _Output:
    """Whether the running command was asked for ``--json`` (then errors are JSON too)."""

    json = False


def json_option(f: F) -> F:
    """``--json``: results, and errors (same class on the other side of an SSH hop), as JSON."""

    def remember(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
        _Output.json = _Output.json or value
        return value

    return click.option("--json", "as_json", is_flag=True, callback=remember,
                        help="Print one JSON object instead of text.")(f)


def fail(error: TetherError) -> NoReturn:
    if _Output.json:
        print_json(error.to_json())
    _console("err").print(f"[bold red]error:[/] {_escape(str(error))}", markup=True)
    sys.exit(error.exit_code)


def _console(name: str) -> Console:
    return getattr(sys.modules[__name__], name)  # type: ignore[no-any-return]


# Which module defines each command; imported when the command runs (or for the help).
COMMANDS = {"serve": "serve", "up": "remote", "attach": "remote", "down": "remote",
            "status": "remote", "doctor": "remote", "ps": "kernels", "release": "kernels",
            "open": "kernels", "restart": "restart"}


class _LazyGroup(click.Group):
    """A group whose commands' modules are imported only when needed (see COMMANDS)."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            importlib.import_module(f"tether.cli.{COMMANDS[cmd_name]}")
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        load_commands()
        return super().list_commands(ctx)


def load_commands() -> None:
    """Import every command's module (the help lists them all)."""
    for module in sorted(set(COMMANDS.values())):
        importlib.import_module(f"tether.cli.{module}")


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tether")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.pass_context
def cli(ctx: click.Context, verbose: int) -> None:
    """Turn any machine you can SSH into into a Colab-ready Jupyter runtime."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.obj = {"log_level": level}


class Terminated(Exception):
    """SIGTERM arrived; treated like Ctrl-C."""


# After a signal, the work is cancelled again this often until it has ended: on Python 3.11 a
# cancellation that meets a finishing ``wait_for`` can be swallowed (CPython gh-86296).
RECANCEL_INTERVAL = 1.0


def run(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """The one ``asyncio.run``. SIGINT and SIGTERM cancel the work, so children always end.

    The first signal cancels: every ``finally`` runs its bounded teardown (no ssh is left),
    then :class:`KeyboardInterrupt` (SIGINT) or :class:`Terminated` (SIGTERM) is raised here.
    A second signal kills tether's ssh children at once, which makes the rest of the teardown
    immediate. The handlers stay until the loop is gone, so no signal lands in asyncio's own
    shutdown (no "Event loop is closed" on the way out).
    """
    from tether import _login, _ssh

    received: list[int] = []

    async def main() -> T:
        loop = asyncio.get_running_loop()
        signalled = loop.create_future()

        def on_signal(signum: int) -> None:
            received.append(signum)
            if not signalled.done():
                signalled.set_result(None)
            else:
                _ssh.kill_all()

        if sys.platform != "win32":
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, on_signal, signum)
        for held in _login.held:  # (while the command line loaded: tether.__main__)
            on_signal(held)
        _login.held.clear()
        work = asyncio.ensure_future(make())
        try:
            await asyncio.wait({work, signalled}, return_when=asyncio.FIRST_COMPLETED)
            while not work.done():
                work.cancel()
                await asyncio.wait({work}, timeout=RECANCEL_INTERVAL)
        finally:
            work.cancel()
            # last resort: nothing this run started outlives it (pipes closed inside the loop)
            _ssh.kill_all()
            await _ssh.reap_all(timeout=2.0)
        if not received:
            return work.result()
        if not work.cancelled() and work.exception() is not None:
            log.debug("after the signal: %r", work.exception())
        if received[0] == signal.SIGTERM:
            raise Terminated()
        raise KeyboardInterrupt()

    return asyncio.run(main())


def shared_ssh_options(f: F) -> F:
    """-F, -o and --batch: how to reach HOST with the user's own ssh."""
    options = [
        click.option("-F", "--ssh-config", type=click.Path(dir_okay=False),
                     help="ssh config file, passed to ssh as -F."),
        click.option("-o", "--ssh-option", "ssh_opts", multiple=True, metavar="KEY=VALUE",
                     help="ssh option, passed to ssh as -o (repeatable)."),
        click.option("--batch", is_flag=True,
                     help="Never prompt (ssh BatchMode); the default when stdin is not a terminal."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def make_target(host: str, ssh_config: str | None, ssh_opts: tuple[str, ...],
                batch: bool) -> _ssh.SSHTarget:
    from tether import _ssh

    for opt in ssh_opts:
        if "=" not in opt and " " not in opt:
            raise ConfigError(f"-o {opt}: expected KEY=VALUE")
    cache = remote_cache()  # checked before any ssh runs (exit 2)
    return _ssh.SSHTarget(host, ssh_config, ssh_opts,
                          interactive=not batch and _ssh.interactive_default(),
                          remote_env=(("XDG_CACHE_HOME", cache),) if cache else ())


VERBOSITY = re.compile(r"-v+|--verbose")


def _verbosity_first(args: list[str]) -> list[str]:
    """``-v`` is the group's option: also where users put it, after the subcommand."""
    end = args.index("--") if "--" in args else len(args)
    flags = [a for a in args[:end] if VERBOSITY.fullmatch(a)]
    return [*flags, *(a for a in args[:end] if not VERBOSITY.fullmatch(a)), *args[end:]]


def main() -> None:
    """Console-script entry point."""
    try:
        cli.main(args=_verbosity_first(sys.argv[1:]), standalone_mode=False, prog_name="tether")
    except click.exceptions.NoArgsIsHelpError as e:  # plain `tether`: the help, not an error
        click.echo(e.ctx.get_help() if e.ctx is not None else e.format_message())
        sys.exit(2)
    except TetherError as e:
        fail(e)
    except click.exceptions.Abort:
        _console("err").print("aborted")
        sys.exit(130)
    except click.UsageError as e:  # one line, like every other error (click prints a block)
        command = e.ctx.command_path if e.ctx is not None else "tether"
        if _Output.json:
            print_json(ConfigError(e.format_message()).to_json())
        _console("err").print(f"[bold red]error:[/] {_escape(sentence(e.format_message()))} "
                              f"`{_escape(command)} -h` lists the options.", markup=True)
        sys.exit(2)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
