"""What the backends that log in with the user's OpenSSH share: the one connection ``up``
holds (:mod:`tether._master`), the supervised ``ssh -L`` tunnel (:mod:`tether.tunnel`) and the
remote probe. Only backends build ssh commands; :mod:`tether.session` asks them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from tether import _master, _ssh, bootstrap
from tether.backends import OnPrompt, Placement, forwards_of
from tether.tunnel import Status, Tunnel


class _Login(Protocol):
    """What an ssh backend has: how it logs in, and how to log in through a connection."""

    _link: SSHLink | None

    @property
    def target(self) -> _ssh.SSHTarget: ...

    @property
    def opts(self) -> bootstrap.RemoteOptions: ...

    def share(self, target: _ssh.SSHTarget) -> None: ...


class SSHLink:
    """One ControlMaster for the life of ``up`` (or ``doctor``); the backend logs in through
    it from :meth:`start` on."""

    def __init__(self, owner: _Login, on_prompt: OnPrompt) -> None:
        self.owner = owner
        self.master = _master.Master(owner.target, on_prompt)

    async def start(self) -> list[str]:
        await self.master.start()
        self.owner.share(self.master.target)
        if self.master.auth_method in _master.TYPED:
            return [_master.password_note(self.master.base, self.master.auth_method)]
        return []

    async def aclose(self) -> None:
        await self.master.aclose()

    async def auth(self) -> tuple[str, bool]:
        master = self.master
        method = master.auth_method
        if master.mode is not _master.Mode.OWN:
            method = await _master.auth_method(master.base)
        if not method:
            return ("a connection of your own ControlMaster carried it"
                    if master.mode is _master.Mode.USER else "not known"), False
        shared = {_master.Mode.OWN: "one connection of tether's for all commands",
                  _master.Mode.USER: "your ControlMaster settings",
                  _master.Mode.NONE: "one connection per command (this ssh has no "
                                     "ControlMaster)"}
        detail = f"{method} ({shared[master.mode]})"
        if method in _master.TYPED:
            return detail + ": " + _master.password_note(master.base, method), True
        return detail, False


class OverSSH:
    """Mixin of the ssh backends (each has ``target``, ``opts`` and ``share``)."""

    _link: SSHLink | None = None

    def link(self: _Login, on_prompt: OnPrompt) -> SSHLink:
        link = SSHLink(self, on_prompt)
        self._link = link
        return link

    def forwarder(self, placement: Placement, local_port: int, token: str,
                  extra: Sequence[tuple[int, int]] = (),
                  on_status: Callable[[Status], None] | None = None) -> Tunnel:
        master = self._link.master if self._link is not None else None
        return Tunnel(placement.target, placement.forward(local_port), token,
                      on_status=on_status, master=master, extra=forwards_of(extra, placement))

    async def probe(self: _Login) -> dict[str, Any]:
        return await bootstrap.call_remote(self.target, self.opts, "probe")
