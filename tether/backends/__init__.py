"""Where a runtime runs: one small interface, chosen once, by name, through :func:`create`.

:class:`~tether.backends.direct.DirectHost` (``host``) is a machine you SSH into (the server
runs there, detached); :class:`~tether.backends.slurm.SlurmJob` (``slurm``) is a batch job
submitted through a cluster's login node. :mod:`tether.session` and the CLI drive either
through :class:`Backend` and never ask which one they hold: the backend holds the connection
``up`` keeps (:meth:`Backend.link`), builds the tunnel (:meth:`Backend.forwarder`), runs the
remote side, and words its own reports, hints and flags.

A Kubernetes backend is the test of this seam, and would be a third entry in :data:`BACKENDS`
with nothing changed outside this package: ``link`` checks ``kubectl`` can reach the cluster;
``start`` creates the pod (the server as its command, the token from a Secret) and waits for
it, with ``on_event`` steps as a job's; the forwarder supervises ``kubectl port-forward
pod/NAME LOCAL:PORT`` (extra forwards as more ``LOCAL:PORT`` pairs), probed and restarted as
:class:`~tether.tunnel.Tunnel` does ssh; ``kernels`` runs ``tether ps/release`` through
``kubectl exec``; ``stop`` deletes the pod; ``record`` names the namespace and pod for later
commands; ``flags`` is ``("--k8s",)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tether import _ssh
from tether.bootstrap import Consent, RemoteOptions, UpResult
from tether.contract import RestartResult
from tether.errors import ConfigError, TetherError
from tether.kernels import Kernels
from tether.tunnel import Forward, Status

OnEvent = Callable[[dict[str, Any]], None]
OnNote = Callable[[str], None]
OnPrompt = Callable[[bool], None]  # True: the connection waits for the user (a password)

# name -> "module:class", imported only when chosen (as uvicorn's config maps its loops)
BACKENDS: dict[str, str] = {
    "host": "tether.backends.direct:DirectHost",
    "slurm": "tether.backends.slurm:SlurmJob",
}
DEFAULT = "host"
NODE_ACCESS = ("auto", "jump", "forward")  # how a Slurm job's node is reached (--node-access)


@dataclass(frozen=True)
class Placement:
    """A server that runs, and how the tunnel reaches it."""

    result: UpResult
    target: _ssh.SSHTarget  # the ssh that carries the forward
    remote_host: str = "127.0.0.1"  # where a TCP forward ends, as the far end of ``target`` sees it

    def forward(self, local_port: int, remote_port: int = 0) -> Forward:
        """``local_port`` here to the server (or, given ``remote_port``, to that port beside
        it: the user's ``--forward``)."""
        if remote_port:
            return Forward(local_port, remote_port=remote_port, remote_host=self.remote_host)
        server = self.result.server
        return Forward(local_port, server.sock, server.port, self.remote_host)


@dataclass(frozen=True)
class Report:
    """What ``down`` or ``status`` found, typed once for every backend: ``data`` is the
    ``--json`` answer, ``lines`` what a person reads, ``problem`` an error to raise after the
    lines (something could not be ended)."""

    data: Mapping[str, Any]
    lines: tuple[str, ...] = ()
    problem: TetherError | None = None


class Link(Protocol):
    """The one connection ``up`` (or ``doctor``) holds for its whole life."""

    async def start(self) -> list[str]:
        """Connect (may prompt); what the user should know about it, as notes."""
        ...

    async def aclose(self) -> None:
        """End it and everything that went through it (bounded)."""
        ...

    async def auth(self) -> tuple[str, bool]:
        """How the connection logged in, in a few words, and whether it was typed (a
        password): for ``doctor``."""
        ...


class Forwarder(Protocol):
    """The supervised tunnel to a placement (:class:`~tether.tunnel.Tunnel` for ssh)."""

    forward: Forward
    status: Status
    restart_server: Callable[[], Any] | None

    async def open(self) -> None: ...
    async def run(self) -> None: ...
    async def aclose(self) -> None: ...


class Backend(Protocol):
    """A place to run a tether server."""

    @property
    def host(self) -> str:
        """The name the user gave (a VM, or a cluster's login node)."""
        ...

    @property
    def target(self) -> _ssh.SSHTarget:
        """How tether logs in to :attr:`host` (the VM, or the cluster's login node)."""
        ...

    def flags(self) -> tuple[str, ...]:
        """The flags that choose this backend on a tether command line (``--slurm``), for the
        commands tether prints as hints."""
        ...

    def link(self, on_prompt: OnPrompt) -> Link:
        """The connection ``up`` holds; every later step of this backend goes through it."""
        ...

    def forwarder(self, placement: Placement, local_port: int, token: str,
                  extra: Sequence[tuple[int, int]] = (),
                  on_status: Callable[[Status], None] | None = None) -> Forwarder:
        """The tunnel from ``local_port`` here to the placement's server, and from each
        (local, remote) of ``extra`` to that port beside it."""
        ...

    async def probe(self) -> dict[str, Any]:
        """What the remote is (Python, disk, GPU, index): for ``doctor``."""
        ...

    async def start(self, on_event: OnEvent, on_note: OnNote) -> Placement:
        """Prepare, then start the server or find the running one."""
        ...

    async def restart(self, token: str, on_event: OnEvent) -> Placement:
        """The server behind the tunnel is gone: bring it back with the same token, or raise
        (:class:`~tether.errors.ServerNotFoundError`: stopped on purpose, supervision ends)."""
        ...

    async def restart_server(self, on_event: OnEvent) -> RestartResult:
        """`tether restart`: a new server (this tether's version, the backend's options over the
        running one's) that adopts the running server's kernels, on the same URL and token."""
        ...

    async def socket_refused(self, on_event: OnEvent) -> Placement | None:
        """sshd refused to forward the server's Unix socket: a placement on a port, if any."""
        ...

    async def watch(self, info: dict[str, Any], on_note: OnNote) -> None:
        """Runs beside the tunnel until cancelled; raises when the runtime ended for good.
        Puts what the live status line shows in ``info`` (``left``: a few words such as
        "3 h 10 min left"; ``job``)."""
        ...

    async def abandon(self) -> None:
        """Ctrl-C before the runtime was ready: undo what must not outlive ``up``."""
        ...

    def on_ctrl_c(self) -> str:
        """What Ctrl-C does to the ready runtime, as one sentence for the ready text."""
        ...

    def leaving(self) -> str:
        """What ``up`` ending here (Ctrl-C) undid, as one sentence; "" when the runtime stays
        for ``attach``."""
        ...

    def record(self) -> dict[str, Any]:
        """What later commands need to find this runtime without its flags (`up` keeps it on
        the laptop: :mod:`tether.runtimes`): ``{"kind": NAME, ...}``, or {} for the default."""
        ...

    async def stop(self, purge: bool = False) -> Report:
        """End the runtime (``purge``: and remove tether's files there)."""
        ...

    async def status(self) -> Report:
        ...

    async def running(self) -> str:
        """What runs there, in a few words ("" if nothing): for ``tether doctor``."""
        ...

    def kernels(self) -> Kernels:
        """The life-cycle client for this runtime's server (``ps``, ``release``)."""
        ...


class Factory(Protocol):
    """A backend class: its options, and the constructor :func:`create` calls."""

    OPTIONS: frozenset[str]  # the CLI options only this backend takes (their parameter names)
    WHAT: str  # what it runs the runtime as, for a hint ("a Slurm job on that login node")

    def create(self, target: _ssh.SSHTarget, opts: RemoteOptions, options: Mapping[str, Any],
               attach: bool, consent: Consent | None) -> Backend: ...


def factory(name: str) -> Factory:
    try:
        module, _, cls = BACKENDS[name].partition(":")
    except KeyError:
        raise ConfigError(f"no backend named {name!r}",
                          hint=f"One of: {', '.join(sorted(BACKENDS))}.") from None
    found: Factory = getattr(importlib.import_module(module), cls)
    return found


def create(name: str, target: _ssh.SSHTarget, opts: RemoteOptions,
           options: Mapping[str, Any] | None = None, *, attach: bool = False,
           consent: Consent | None = None) -> Backend:
    """The backend ``name`` for ``target``; ``options`` are the CLI's values by parameter
    name. An option that belongs to another backend is refused (a usage error)."""
    options = options or {}
    for other in BACKENDS:
        if other == name:
            continue
        theirs = factory(other)
        given = sorted(opt for opt in theirs.OPTIONS
                       if options.get(opt) not in (None, False, (), "auto"))
        if given:
            flag = "--" + ("time" if given[0] == "walltime" else given[0].replace("_", "-"))
            raise ConfigError(f"{flag} goes with --{other}",
                              hint=f"`tether up {target.host} --{other} ...` runs the runtime "
                                   f"as {theirs.WHAT}.")
    return factory(name).create(target, opts, options, attach, consent)


def forwards_of(extra: Sequence[tuple[int, int]], placement: Placement) -> list[Forward]:
    return [placement.forward(local, remote) for local, remote in extra]
