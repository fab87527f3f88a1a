"""Where a runtime runs: one small interface, chosen once by the CLI.

:class:`~tether.backends.direct.DirectHost` is a machine you SSH into (the server runs there,
detached); :class:`~tether.backends.slurm.SlurmJob` is a batch job submitted through a cluster's
login node. :mod:`tether.session` drives either through :class:`Backend` and never asks which
one it holds. A Kubernetes pod would be a third implementation: start = create the pod and wait
for it, the tunnel = ``kubectl port-forward`` instead of ``ssh -L``, stop = delete it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from tether import _ssh
from tether.bootstrap import UpResult
from tether.contract import RestartResult
from tether.kernels import Kernels

OnEvent = Callable[[dict[str, Any]], None]
OnNote = Callable[[str], None]


@dataclass(frozen=True)
class Placement:
    """A server that runs, and how the tunnel reaches it."""

    result: UpResult
    target: _ssh.SSHTarget  # the ssh that carries the forward
    remote_host: str = "127.0.0.1"  # where a TCP forward ends, as the far end of ``target`` sees it


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

    def share(self, target: _ssh.SSHTarget) -> None:
        """From now on log in through ``target``: the same host over the one connection that
        ``up`` holds (:mod:`tether._master`)."""
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
        Puts what the live status line shows (e.g. ``time_left``) in ``info``."""
        ...

    async def abandon(self) -> None:
        """Ctrl-C before the runtime was ready: undo what must not outlive ``up``."""
        ...

    def on_ctrl_c(self) -> str:
        """What Ctrl-C does to the ready runtime, as one sentence for the ready text."""
        ...

    def record(self) -> dict[str, Any]:
        """What later commands need to find this runtime without its flags (`up` keeps it on
        the laptop: :mod:`tether.runtimes`): ``{"kind": NAME, ...}``, or {} for the default."""
        ...

    async def stop(self) -> dict[str, Any]:
        """End the runtime; report what was stopped and what is left."""
        ...

    async def status(self) -> dict[str, Any]:
        ...

    async def running(self) -> str:
        """What runs there, in a few words ("" if nothing): for ``tether doctor``."""
        ...

    def kernels(self) -> Kernels:
        """The life-cycle client for this runtime's server (``ps``, ``release``)."""
        ...
