"""The one exception tree of tether.

Library code raises these; only the CLI prints them (one line each) and picks the exit code.
Foreign errors (``OSError``, subprocess failures, timeouts, HTTP errors) are translated where
they enter, and each exception carries the data a user needs to act::

    TetherError                      base; ``str(e)`` is the one-line message, ``hint`` what to do
    ├── ConfigError                  a usage mistake: bad flag, origin, path or token (exit 2)
    │   └── KernelNotFoundError      no kernel (or several) match what was named
    ├── ServerError                  the local/remote Jupyter server
    │   ├── PortInUseError           the port is taken (we never move to another one silently)
    │   ├── ServerNotFoundError      no running tether server where one was expected
    │   │   └── RuntimeEndedError    the runtime ended for good (its job: nothing to attach to)
    │   │       └── SlurmJobEndedError  the Slurm job ended (state and reason attached)
    │   └── ServerStartError         did not become ready before its deadline (log tail attached)
    ├── SSHError                     the OpenSSH client failed (host, command, exit status, stderr)
    │   ├── HostUnreachableError
    │   └── AuthenticationError
    ├── RemoteEnvironmentError       remote without Python, disk space or package index access
    ├── SlurmError                   not a Slurm login node, a refused submission, a stuck job
    ├── TunnelError                  the forward could not be (re)established
    │   ├── ForeignListenerError     something that is not our server answers on the local port
    │   └── TokenRejectedError       a tether server answers but refuses our token (replaced)
    └── ReleaseError                 processes still alive / holding the GPU after a release

An error keeps its class across the SSH hop: the remote ``tether ... --json`` prints
:meth:`TetherError.to_json`, and :func:`from_json` raises the same class here.
"""

from __future__ import annotations

TYPE_CHECKING = False  # (typing is not imported at run time: tether.host pays per SSH call)
if TYPE_CHECKING:
    from typing import Any


class TetherError(Exception):
    """Base of every error tether raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str = "", **data: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.data = data

    def __str__(self) -> str:
        """One line: the error, then the hint, as sentences."""
        if not self.hint:
            return self.message
        return f"{sentence(self.message)} {self.hint}"

    def to_json(self) -> dict[str, Any]:
        """What crosses the SSH hop (``--json`` output of a failed remote command)."""
        data = {k: v for k, v in self.data.items() if _plain(v)}
        return {"error": {"type": type(self).__name__, "message": self.message,
                          "hint": self.hint, "data": data}}


def sentence(text: str) -> str:
    """``text`` ending as a sentence (so that a hint after it reads as the next one)."""
    text = text.rstrip()
    return text if not text or text[-1] in ".!?:" else text + "."


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, list, dict))


def from_json(payload: dict[str, Any]) -> TetherError | None:
    """The error a remote ``tether --json`` reported, as the same class here (None if none)."""
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        return None
    cls = _classes().get(str(error.get("type")), TetherError)
    data = error.get("data")
    if not isinstance(data, dict):
        data = {}
    return cls(str(error.get("message") or "the remote command failed"),
               hint=str(error.get("hint") or ""), **data)


def _classes() -> dict[str, type[TetherError]]:
    found: dict[str, type[TetherError]] = {}
    pending: list[type[TetherError]] = [TetherError]
    while pending:
        cls = pending.pop()
        found[cls.__name__] = cls
        pending += cls.__subclasses__()
    return found


class ConfigError(TetherError):
    exit_code = 2


class KernelNotFoundError(ConfigError):
    pass


class ServerError(TetherError):
    pass


class PortInUseError(ServerError):
    pass


class ServerNotFoundError(ServerError):
    pass


class ServerStartError(ServerError):
    pass


class RuntimeEndedError(ServerNotFoundError):
    pass


class SlurmJobEndedError(RuntimeEndedError):
    pass


class SSHError(TetherError):
    exit_code = 255


class HostUnreachableError(SSHError):
    pass


class AuthenticationError(SSHError):
    pass


class RemoteEnvironmentError(TetherError):
    pass


class SlurmError(TetherError):
    pass


class TunnelError(TetherError):
    pass


class ForeignListenerError(TunnelError):
    pass


class TokenRejectedError(TunnelError):
    pass


class ReleaseError(TetherError):
    exit_code = 3
