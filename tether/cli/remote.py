"""``tether up | attach | down | status | doctor HOST``: a remote runtime over the user's ssh."""

from __future__ import annotations

import asyncio
import functools
import shlex
import sys
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from tether import _ssh, backends, runtimes, session
from tether import cli as ui  # ui.err, ui.out: rich is imported on the first print
from tether.backends import NODE_ACCESS, Backend, Report
from tether.bootstrap import Consent, ConsentNeeded, RemoteOptions, cache_hint, tether_command
from tether.cli import (
    F,
    Terminated,
    _escape,
    cli,
    json_option,
    make_target,
    print_json,
    run,
    shared_ssh_options,
)
from tether.cli.serve import LNA_HINT, serve, serve_options
from tether.config import check_origin
from tether.errors import ConfigError, RuntimeEndedError, TetherError
from tether.tunnel import State

if TYPE_CHECKING:
    from rich.status import Status

T = TypeVar("T")


def ssh_options(f: F) -> F:
    """The shared ssh options, plus the remote Python that builds tether's environment."""
    f = click.option("--remote-python", default="python3", show_default=True,
                     help="Python on the remote that builds tether's environment.")(f)
    return shared_ssh_options(f)


class ConsoleReporter:
    """Progress per step with timings, then the URL, then one live status line per host."""

    modules: tuple[str, ...] = ("rich.console", "rich.status", "rich.markup")  # while ssh logs in

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.spinner: Status | None = None
        self.lines: dict[str, str] = {}
        self.states: dict[str, State] = {}
        self.ready_hosts: list[str] = []
        self.runtimes: dict[str, session.Runtime] = {}
        self.prompting = False  # ssh asks the user something at the terminal: no spinner
        self.on_ready: Callable[[str], None] = lambda host: None
        self.shown = ""

    @functools.cached_property
    def tty(self) -> bool:
        return ui.err.is_terminal

    def _show(self, text: str) -> None:
        self.shown = text
        if not self.tty or self.prompting:
            return
        if self.spinner is None:
            from rich.status import Status

            self.spinner = Status(text, console=ui.err)
            self.spinner.start()
        else:
            self.spinner.update(text)

    def close(self) -> None:
        if self.spinner is not None:
            self.spinner.stop()
            self.spinner = None

    def event(self, host: str, event: dict[str, Any]) -> None:
        if event.get("event") == "prompt":
            self._prompt(event.get("state") == "start")
            return
        if event.get("event") == "queue" and not self.tty:  # a job waiting: say so, once a state
            ui.err.print(f"{host}: {event.get('label')}")
        if event.get("event") != "step":
            return
        label, state = event.get("label", event.get("key")), event.get("state")
        if state == "start":
            self._show(f"{host}: {label}")
        elif state in ("done", "fail"):
            mark = "[green]✓[/]" if state == "done" else "[red]✗[/]"
            ui.err.print(f"{mark} {host}: {label} [dim]{event.get('seconds', 0):.2f} s[/]")

    def _prompt(self, waiting: bool) -> None:
        """ssh may ask for a password now: the line goes (it is transient) and comes back after,
        so the prompt is on a line of its own."""
        self.prompting = waiting
        if waiting:
            self.close()
        elif self.shown:
            self._show(self.shown)

    def ready(self, runtime: session.Runtime) -> None:
        self.close()
        self.on_ready(runtime.host)
        self.shown = ""  # (the steps are done: a prompt after this brings back no step's line)
        self.ready_hosts.append(runtime.host)
        self.runtimes[runtime.host] = runtime
        self.announce(runtime)

    def announce(self, runtime: session.Runtime) -> None:
        """What the user reads once the runtime is ready: the URL to paste into Colab."""
        for warning in runtime.warnings:
            warning = warning.replace("HOST", runtime.host)
            ui.err.print(f"[yellow]note:[/] {runtime.host}: {warning}")
        if self.as_json:
            print_json(runtime.to_json())
            return
        where = "running server" if runtime.reused else "new server"
        ui.err.print(f"[green]Colab runtime ready[/] on {runtime.host} ({where}, remote pid "
                     f"{runtime.server.pid}). In Colab: Connect > Connect to a local "
                     "runtime, and paste:")
        ui.out.print(runtime.colab_url)
        ui.err.print(LNA_HINT)
        ui.err.print(f"GPUs, kernels and Release buttons: http://127.0.0.1:{runtime.local_port}"
                     f"/tether/?token=… (same token), or `tether open {runtime.host}`")
        for local, remote in runtime.forwards:
            ui.err.print(f"Forwarded: port {remote} on {runtime.host} → http://127.0.0.1:{local}/")
        ui.err.print(runtime.on_ctrl_c)

    def note(self, host: str, text: str) -> None:
        self.close()
        if self.as_json:
            print_json({"host": host, "note": text})
        else:
            ui.err.print(f"[yellow]note:[/] {_escape(text)}")

    def live(self, host: str, live: session.Live) -> None:
        t = live.tunnel
        runtime = self.runtimes.get(host)
        info = {**runtime.info, "forwards": runtime.forwards} if runtime else {}
        width = ui.err.width - 2 if self.tty else 10_000  # a live line fits (- the spinner)
        self.lines[host] = status_line(host, live, info, width)
        if self.tty:
            self._show("\n".join(self.lines.values()))
        elif self.states.get(host) is not t.state and not self.as_json:
            ui.err.print(self.lines[host])
        self.states[host] = t.state


def status_line(host: str, live: session.Live, info: dict[str, Any], width: int) -> str:
    """``host: tunnel up · kernels 2 · ...`` in at most ``width`` columns: what does not fit is
    dropped a whole field at a time, the least needed first, never cut (a job id cut to "job 1"
    names another job)."""
    t = live.tunnel
    parts = [(9, f"tunnel {t.state.value}"), (2, f"reconnects {t.reconnects}")]
    if live.kernels is not None:
        parts.append((6, f"kernels {live.kernels}"))
    if live.gpu_total:
        parts.append((5, f"GPU {(live.gpu_used or 0) >> 20} / {live.gpu_total >> 20} MiB"))
    if info.get("job"):
        parts.append((8, f"job {info['job']}"))
    if info.get("left"):
        parts.append((7, str(info["left"])))
    for local, remote in info.get("forwards") or ():
        parts.append((3, f"{remote}→127.0.0.1:{local}"))
    if t.state is State.RECONNECTING and t.last_error:
        parts.append((4, t.last_error.splitlines()[-1][:60]))

    def line() -> str:
        return f"{host}: " + " · ".join(text for _, text in parts)

    while len(parts) > 1 and len(line()) > width:
        parts.remove(min(parts, key=lambda part: part[0]))
    return line()


# serve options that `up` handles itself, or that make no sense on the remote
_NOT_FORWARDED = {"port", "as_json", "sock", "token_file", "ip", "allow_remote", "origins",
                  "notebook_dir", "idle_timeout", "offline"}


def serve_args(values: dict[str, Any]) -> tuple[str, ...]:
    """The remote `tether serve` flags for the serve options given here (non-default only)."""
    args: list[str] = []
    for param in serve.params:
        if not isinstance(param, click.Option) or param.name in _NOT_FORWARDED \
                or param.name not in values or values[param.name] == param.default:
            continue
        flag, value = param.opts[0], values[param.name]
        if param.is_flag:
            args += [flag] if value else []
        elif param.multiple:
            for v in value:
                args += [flag, str(v)]
        elif value is not None:
            args += [flag, str(value)]
    return tuple(args)


def remote_options(**kw: Any) -> RemoteOptions:
    origins = kw.get("origins") or ()
    notebook_dir = kw.get("notebook_dir")
    return RemoteOptions(
        remote_python=kw["remote_python"], kernel_python=kw.get("kernel_python"),
        conda_env=kw.get("conda_env"), install_kernel_deps=kw.get("install_kernel_deps"),
        remote_port=kw.get("remote_port"), origins=tuple(origins),
        notebook_dir=str(notebook_dir) if notebook_dir else None,
        idle_timeout=kw.get("idle_timeout", 3600), serve_args=serve_args(kw),
        offline=bool(kw.get("offline")), purge=bool(kw.get("purge")))


def slurm_options(f: F) -> F:
    """``--slurm`` and the scheduler's options (the runtime as a batch job)."""
    options = [
        click.option("--slurm", is_flag=True,
                     help="HOST is a Slurm login node: run the runtime as a batch job there."),
        click.option("--gpus", type=click.IntRange(0), default=None, metavar="N",
                     help="With --slurm: GPUs for the job (sbatch --gpus)."),
        click.option("--partition", metavar="P", help="With --slurm: the partition."),
        click.option("--time", "walltime", metavar="T",
                     help="With --slurm: the walltime, as sbatch takes it (e.g. 4:00:00)."),
        click.option("--account", metavar="A", help="With --slurm: the account to charge."),
        click.option("--sbatch-arg", "sbatch_args", multiple=True, metavar="ARG",
                     help="With --slurm: one more sbatch argument, verbatim (repeatable), "
                          "e.g. --sbatch-arg=--constraint=a100."),
        click.option("--keep", is_flag=True,
                     help="With --slurm: leave the job running when this command ends "
                          "(`tether attach HOST --slurm` finds it); default: cancel it."),
        click.option("--node-access", type=click.Choice(NODE_ACCESS), default="auto",
                     show_default=True,
                     help="With --slurm: jump = ssh -J to the node and a Unix socket there; "
                          "forward = a port on the node through the login node (token only)."),
        click.option("--on-walltime", metavar="COMMAND",
                     help="With --slurm: shell command the job runs once when its walltime is "
                          "near, after every kernel was released (e.g. copy checkpoints)."),
        click.option("--walltime-signal", type=int, default=300, show_default=True,
                     metavar="SECONDS",
                     help="With --slurm: release the kernels this long before the walltime."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def forward_option(f: F) -> F:
    return click.option(
        "--forward", "forwards", multiple=True, metavar="REMOTE[:LOCAL]", callback=_forwards,
        help="Also carry the remote's loopback port REMOTE to 127.0.0.1:LOCAL here (default: "
             "the same number) through the same healed tunnel, e.g. --forward 6006 for "
             "TensorBoard; repeatable. For a Slurm job, the port on its node.")(f)


def _forwards(ctx: click.Context, param: click.Parameter,
              values: tuple[str, ...]) -> tuple[tuple[int, int], ...]:
    """``REMOTE[:LOCAL]`` -> (local, remote); a usage error names the value and the form."""
    pairs = []
    for value in values:
        remote, _, local = value.partition(":")
        try:
            ports = int(remote), int(local or remote)
        except ValueError:
            raise click.BadParameter(f"{value!r}: expected REMOTE[:LOCAL], two port numbers "
                                     "(e.g. 6006 or 6006:16006)") from None
        if not all(1 <= port <= 65535 for port in ports):
            raise click.BadParameter(f"{value!r}: ports go from 1 to 65535")
        pairs.append((ports[1], ports[0]))
    return tuple(pairs)


def make_backend(host: str, kw: dict[str, Any], opts: RemoteOptions, attach: bool = False,
                 consent: Consent | None = None, recorded: bool = True) -> Backend:
    """The one place that decides where the runtime runs: the flags, else (``recorded``) what
    `tether up` recorded for ``host``."""
    if recorded:
        kw = _as_recorded(host, kw)
    target = make_target(host, kw["ssh_config"], kw["ssh_opts"], kw["batch"])
    name = "slurm" if kw.get("slurm") else backends.DEFAULT
    return backends.create(name, target, opts, kw, attach=attach, consent=consent)


def _forget_ended(error: TetherError, configs: list[session.UpConfig]) -> None:
    """A runtime that ended for good (its job) leaves nothing for later commands to find."""
    if isinstance(error, RuntimeEndedError):
        runtimes.forget(str(error.data.get("host") or configs[0].backend.host))


def _as_recorded(host: str, kw: dict[str, Any]) -> dict[str, Any]:
    """``kw`` with the backend `tether up HOST` recorded, said once; ``kw`` where none."""
    record, config, options = runtimes.implied(host, bool(kw.get("slurm")), kw["ssh_config"],
                                               tuple(kw["ssh_opts"]))
    if record is None:
        return kw
    ui.err.print(runtimes.said(record))
    access = kw.get("node_access") or "auto"
    return {**kw, "slurm": True, "ssh_config": config, "ssh_opts": options,
            "node_access": record.backend.get("node_access") if access == "auto" else access}


def _up(configs: list[session.UpConfig], reporter: ConsoleReporter) -> None:
    hosts = ", ".join(c.backend.host for c in configs)
    targets = {c.backend.host: c.backend.target for c in configs}  # the user's, as given

    def remember(host: str) -> None:  # ready: later commands find it without its flags
        backend = next(c.backend for c in configs if c.backend.host == host)
        target = targets[host]
        runtimes.remember(runtimes.RuntimeRecord(host, backend.record(), target.config_file,
                                                 tuple(target.options)))

    reporter.on_ready = remember
    try:
        run(lambda: session.up_many(configs, reporter))
    except (KeyboardInterrupt, Terminated):
        reporter.close()
        backend = configs[0].backend
        again = shlex.join(["tether", *sys.argv[1:]])  # the command as typed: every option
        cancelled = configs[0].backend.leaving()
        if cancelled:
            for host in targets:
                runtimes.forget(host)
        if not reporter.ready_hosts:
            ui.err.print(cancelled or f"Interrupted before {hosts} was ready; `{again}` again "
                                      "resumes where this stopped.")
            sys.exit(130)
        if cancelled:
            ui.err.print(cancelled)
            sys.exit(0)
        if len(configs) == 1:
            hint = (f"`{command_for('attach', backend)}` reconnects (same URL); "
                    f"`{command_for('down', backend)}` stops them.")
        else:
            hint = "`tether attach HOST` reconnects (same URL); `tether down HOST` stops them."
        ui.err.print(f"Detached from {hosts}: the server and its kernels keep running there. "
                     f"{hint}")
        sys.exit(0)
    except TetherError as e:
        _forget_ended(e, configs)
        raise _cache_hint(e, configs)
    except BaseExceptionGroup as group:  # TaskGroup: report the first real error
        reporter.close()
        first = _first_error(group)
        if first is not None:
            _forget_ended(first, configs)
            raise _cache_hint(first, configs) from None
        raise
    finally:
        reporter.close()


def command_for(command: str, backend: Backend) -> str:
    """The tether command line for ``backend``'s runtime, with the user's own -F and -o options
    (and the backend's flags, --slurm for a job: without it, attach and down would look for a
    server on the login node and find none)."""
    return tether_command(backend.target, command, *backend.flags())


def _cache_hint(error: TetherError, configs: list[session.UpConfig]) -> TetherError:
    """A fix that names TETHER_REMOTE_CACHE: with the `tether up` line the host's backend needs
    (--slurm for a job)."""
    for c in configs:
        if "cache_fix" in error.data and c.backend.host == error.data.get("host"):
            error.hint = cache_hint(command_for("up", c.backend), c.backend.host,
                                    str(error.data["cache_fix"]))
    return error


def check_up_options(hosts: tuple[str, ...], port: int, origins: tuple[str, ...],
                     kw: dict[str, Any]) -> None:
    """Every option of ``up`` checked here, before any SSH round trip (usage errors: exit 2)."""
    last = port + max(len(hosts), 1) - 1
    if not 1 <= port <= 65535 or last > 65535:
        raise ConfigError(f"--port {port}: the local port must be between 1 and 65535"
                          + (f" (with {len(hosts)} hosts, up to {last})" if len(hosts) > 1
                             else ""), hint="Pick a free port, e.g. --port 9999.")
    remote_port = kw.get("remote_port")
    if remote_port is not None and not 0 <= remote_port <= 65535:
        raise ConfigError(f"--remote-port {remote_port}: must be between 0 and 65535",
                          hint="0 lets the remote pick a free loopback port.")
    for origin in origins:
        check_origin(origin)
    for name in ("idle_timeout", "gpu_idle_timeout", "stop_after_idle"):
        if (kw.get(name) or 0) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0 seconds",
                              hint="0 turns it off.")
    if kw.get("on_idle") and not kw.get("stop_after_idle"):
        raise ConfigError("--on-idle needs --stop-after-idle SECONDS",
                          hint="The hook runs once the server has had no kernels for that long.")
    grace = kw.get("kill_grace")
    if grace is not None and not 0 < grace <= 300:
        raise ConfigError(f"--kill-grace {grace}: must be between 0 and 300 seconds")
    if kw.get("kernel_python") and kw.get("conda_env"):
        raise ConfigError("give --kernel-python or --conda-env, not both")


def _first_error(group: BaseExceptionGroup[Any]) -> TetherError | None:
    for e in group.exceptions:
        if isinstance(e, TetherError):
            return e
        if isinstance(e, BaseExceptionGroup):
            found = _first_error(e)
            if found is not None:
                return found
    return None


def consent_prompt(reporter: ConsoleReporter) -> Consent | None:
    """Ask once, at the terminal, before ipykernel is installed into the user's own Python."""
    if not _ssh.interactive_default():
        return None

    async def ask(question: ConsentNeeded) -> bool:
        reporter.close()  # the spinner would overwrite the prompt
        return await asyncio.to_thread(click.confirm, question.question, err=True)

    return ask


@cli.command()
@click.argument("hosts", nargs=-1, metavar="[HOST]...")
@serve_options
@ssh_options
@click.option("--kernel-python", metavar="PATH", help="Remote Python the kernels run in.")
@click.option("--conda-env", metavar="NAME", help="Remote conda env the kernels run in.")
@click.option("--install-kernel-deps/--no-install-kernel-deps", default=None,
              help="Install ipykernel and psutil into the kernel's Python if missing "
                   "(asked when interactive).")
@click.option("--remote-port", type=int, default=None, metavar="N",
              help="Serve on 127.0.0.1:N on the remote instead of a Unix socket (0: any).")
@click.option("--offline", is_flag=True,
              help="Prepare HOST from wheels this machine sends, as for a host with no package "
                   "index (detected by itself otherwise).")
@forward_option
@slurm_options
@click.pass_context
def up(ctx: click.Context, /, hosts: tuple[str, ...], port: int, origins: tuple[str, ...],
       notebook_dir: Path | None, idle_timeout: int, as_json: bool,
       forwards: tuple[tuple[int, int], ...], **kw: Any) -> None:
    """Prepare HOST, start a runtime there, tunnel it here and print the Colab URL.

    HOST is anything your `ssh` understands (an alias from ~/.ssh/config, user@host, ...).
    Several hosts get consecutive local ports from --port. With no HOST, serve on this machine.
    """
    if not hosts:
        if kw.get("slurm"):
            raise ConfigError("--slurm needs the cluster's login node",
                              hint="`tether up LOGIN --slurm` (LOGIN as your ssh knows it).")
        if forwards:
            raise ConfigError("--forward needs a HOST: here, the ports are already local",
                              hint="`tether up HOST --forward 6006` carries HOST's port 6006.")
        local = {k: v for k, v in kw.items() if k in {p.name for p in serve.params}}
        ctx.invoke(serve, port=port, origins=origins, notebook_dir=notebook_dir,
                   idle_timeout=idle_timeout, as_json=as_json, **local)
        return
    check_up_options(hosts, port, origins, {"idle_timeout": idle_timeout, **kw})
    opts = remote_options(origins=origins, notebook_dir=notebook_dir, idle_timeout=idle_timeout,
                          **kw)
    reporter = ConsoleReporter(as_json)
    ask = consent_prompt(reporter)
    if forwards and len(hosts) > 1:
        raise ConfigError("--forward with several hosts: which host's port is ambiguous",
                          hint="Run one `tether up HOST --forward ...` per host.")
    configs = [session.UpConfig(make_backend(h, kw, opts, consent=ask, recorded=False), port + i,
                                forwards) for i, h in enumerate(hosts)]
    _up(configs, reporter)


@cli.command()
@click.argument("host")
@click.option("--port", type=click.IntRange(1, 65535), default=9999, show_default=True,
              help="Local port.")
@json_option
@ssh_options
@click.option("--slurm", is_flag=True, help="HOST is a Slurm login node: attach to our job.")
@forward_option
def attach(host: str, port: int, as_json: bool, forwards: tuple[tuple[int, int], ...],
           **kw: Any) -> None:
    """Tunnel to the server already running on HOST (same URL and token as before)."""
    backend = make_backend(host, kw, remote_options(**kw), attach=True)
    _up([session.UpConfig(backend, port, forwards)], ConsoleReporter(as_json))


@cli.command()
@click.argument("host")
@json_option
@ssh_options
@click.option("--slurm", is_flag=True, help="HOST is a Slurm login node: cancel our jobs.")
@click.option("--purge", is_flag=True,
              help="Also remove tether's environments, uv and the wheels sent to HOST.")
def down(host: str, as_json: bool, **kw: Any) -> None:
    """Shut down the kernels and the server on HOST; nothing of tether's is left running."""
    backend = make_backend(host, kw, remote_options(**kw))
    report = run(lambda: session.down(backend))
    runtimes.forget(host)  # what ran there is ended (or the report says what could not be)
    _show(report, as_json, ui.err.print)


def _show(report: Report, as_json: bool, say: Callable[[str], None]) -> None:
    if as_json:
        print_json(dict(report.data))
    else:
        for line in report.lines:
            say(line)
    if report.problem is not None and not as_json:
        raise report.problem
    if report.problem is not None:
        raise SystemExit(report.problem.exit_code)


@cli.command()
@click.argument("host")
@json_option
@ssh_options
@click.option("--slurm", is_flag=True, help="HOST is a Slurm login node: our jobs there.")
def status(host: str, as_json: bool, **kw: Any) -> None:
    """The runtime on HOST: server, kernels, GPU memory."""
    backend = make_backend(host, kw, remote_options(**kw))
    _show(run(lambda: session.status(backend)), as_json, ui.out.print)


@cli.command()
@click.argument("host")
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help="Local port to check (default: the one an attached `tether up HOST` uses, "
                   "else 9999).")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@ssh_options
@click.option("--slurm", is_flag=True, help="HOST is a Slurm login node: check our job there.")
def doctor(host: str, port: int | None, as_json: bool, **kw: Any) -> None:
    """Check SSH, Python, GPU driver, ports, and replay Colab's requests through a tunnel."""
    backend = make_backend(host, kw, remote_options(**kw), attach=True)
    checks = run(lambda: session.doctor(backend, port, up_command=command_for("up", backend)))
    if as_json:
        print_json([c.__dict__ for c in checks])
    else:
        for c in checks:
            mark = "[red]✗[/]" if not c.ok else "[yellow]![/]" if c.warn else "[green]✓[/]"
            ui.out.print(f"{mark} {c.name}: {c.detail}" + (
                f"\n    → {c.hint}" if (not c.ok or c.warn) and c.hint else ""))
    if not all(c.ok for c in checks):
        sys.exit(1)
