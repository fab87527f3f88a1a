"""The one exception tree of tether.

Library code raises these; only the CLI prints them (one line each) and picks the exit code.
Foreign errors (``OSError``, subprocess failures, timeouts, HTTP errors) are translated where
they enter, and each exception carries the data a user needs to act::

    TetherError                      base; ``str(e)`` is the one-line message, ``hint`` what to do
    ├── ConfigError                  bad flag, origin, path or token source
    ├── ServerError                  the local/remote Jupyter server
    │   ├── PortInUseError           the port is taken (we never move to another one silently)
    │   ├── ServerNotFoundError      no running tether server where one was expected
    │   └── ServerStartError         did not become ready before its deadline (log tail attached)
    ├── SSHError                     the OpenSSH client failed (host, command, exit status, stderr)
    │   ├── HostUnreachableError
    │   └── AuthenticationError
    ├── RemoteEnvironmentError       remote without Python, disk space or package index access
    ├── TunnelError                  the forward could not be (re)established
    │   ├── ForeignListenerError     something that is not our server answers on the local port
    │   └── TokenRejectedError       a tether server answers but refuses our token (replaced)
    └── ReleaseError                 processes still alive / holding the GPU after a release
"""

from __future__ import annotations

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
        return f"{self.message} {self.hint}".strip() if self.hint else self.message


class ConfigError(TetherError):
    exit_code = 2


class ServerError(TetherError):
    pass


class PortInUseError(ServerError):
    pass


class ServerNotFoundError(ServerError):
    pass


class ServerStartError(ServerError):
    pass


class SSHError(TetherError):
    exit_code = 255


class HostUnreachableError(SSHError):
    pass


class AuthenticationError(SSHError):
    pass


class RemoteEnvironmentError(TetherError):
    pass


class TunnelError(TetherError):
    pass


class ForeignListenerError(TunnelError):
    pass


class TokenRejectedError(TunnelError):
    pass


class ReleaseError(TetherError):
    exit_code = 3
