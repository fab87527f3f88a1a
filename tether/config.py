"""Configuration: frozen dataclasses, resolved once (CLI > environment > defaults).

Inside Jupyter, settings are traitlets (see ``tether.remote.extension``); this module only builds
what the command line asks for and hands it down.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tether.errors import ConfigError

COLAB_ORIGIN = "https://colab.research.google.com"
DEFAULT_PORT = 9999
TOKEN_ENV = "TETHER_TOKEN"
# Where tether keeps its files on a remote, given on the laptop: every remote command carries it
# as XDG_CACHE_HOME (a read-only home; sshd seldom accepts XDG_CACHE_HOME from the client).
REMOTE_CACHE_ENV = "TETHER_REMOTE_CACHE"
MIN_TOKEN_BITS = 128
MIN_DISTINCT_CHARS = 8

# Defaults that suit GPU users (docs/kernel-gpu-lifecycle.md): an idle notebook frees its GPU
# after an hour, an open tab or a running training loop is never culled.
DEFAULT_IDLE_TIMEOUT = 3600
DEFAULT_GPU_IDLE_TIMEOUT = 1800  # an idle kernel holding GPU memory: sooner
DEFAULT_CULL_INTERVAL = 300
DEFAULT_SHUTDOWN_WAIT = 10.0
DEFAULT_KILL_GRACE = 5.0  # SIGTERM -> SIGKILL when a kernel's processes are swept


def new_token() -> str:
    """A fresh 192-bit token, URL-safe (hex)."""
    return secrets.token_hex(24)


def check_origin(origin: str) -> str:
    """Return ``origin`` if it is a bare ``scheme://host[:port]`` origin, else raise."""
    scheme, sep, rest = origin.partition("://")
    if not sep or scheme not in ("http", "https") or not rest or "/" in rest or "*" in origin:
        raise ConfigError(
            f"invalid origin {origin!r}",
            hint="Give an exact origin such as https://colab.research.google.com (no path, no wildcard).",
        )
    return origin


def remote_cache(environ: Mapping[str, str] | None = None) -> str | None:
    """``$TETHER_REMOTE_CACHE``: the folder every remote command gets as ``XDG_CACHE_HOME``
    (tether's files then live in ``DIR/tether`` there); None when unset."""
    value = (os.environ if environ is None else environ).get(REMOTE_CACHE_ENV, "")
    if not value:
        return None
    if not value.startswith("/") or any(c in value for c in "\n\r\0"):
        raise ConfigError(f"{REMOTE_CACHE_ENV}={value!r}: expected an absolute path on the "
                          "remote, on one line",
                          hint=f"Set it to a folder on the remote such as /tmp/tether-cache, "
                               f"or unset it (`unset {REMOTE_CACHE_ENV}`) for ~/.cache there.")
    return value


def read_token(token_file: Path | None) -> str:
    """The token from ``token_file``, else ``$TETHER_TOKEN``, else a fresh one. Never from argv."""
    if token_file is not None:
        token = _read_token_file(token_file)
        source = str(token_file)
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
        source = f"${TOKEN_ENV}"
        if not token:
            return new_token()
    check_token(token, source)
    return token


def _read_token_file(token_file: Path) -> str:
    try:
        mode = token_file.stat().st_mode
        if mode & 0o077:
            raise ConfigError(
                f"token file {token_file} is readable by other users (mode {stat.S_IMODE(mode):o})",
                hint=f"Run `chmod 600 {token_file}` and try again.",
            )
        return token_file.read_text().strip()
    except OSError as e:
        raise ConfigError(f"cannot read token file {token_file}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"token file {token_file} is not text") from e


def check_token(token: str, source: str) -> None:
    """Refuse a token that is short, malformed or of obviously low entropy."""
    # hex: 4 bits a character; anything else: assume at least 5 bits (base32/64 alphabets)
    bits = len(token) * (4 if all(c in "0123456789abcdef" for c in token.lower()) else 5)
    weak = bits < MIN_TOKEN_BITS or _low_entropy(token)
    if weak or not token.isprintable() or " " in token:
        raise ConfigError(
            f"the token from {source} is too weak or malformed",
            hint="Use at least 32 random hex characters, e.g. "
                 "`python3 -c 'import secrets; print(secrets.token_hex(24))'`.",
        )


def _low_entropy(token: str) -> bool:
    """A token no random generator makes: few distinct characters, or a repeated pattern.

    32 random hex characters show about 14 of the 16 digits; fewer than 8 (``aaaa...``,
    ``abab...``) happens by chance with odds below 1e-9. A token made of one short piece
    repeated (``0123456789abcdef`` three times) is as guessable as the piece.
    """
    if len(set(token)) < MIN_DISTINCT_CHARS:
        return True
    return any(token == (token[:n] * (len(token) // n + 1))[: len(token)]
               for n in range(1, len(token) // 2 + 1))


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``tether serve`` needs to start a Colab-ready server."""

    port: int = DEFAULT_PORT
    sock: Path | None = None
    ip: str = "127.0.0.1"
    allow_remote_access: bool = False
    origins: tuple[str, ...] = (COLAB_ORIGIN,)
    notebook_dir: Path | None = None
    token: str = field(default_factory=new_token, repr=False)
    idle_timeout: int = DEFAULT_IDLE_TIMEOUT
    gpu_idle_timeout: int = DEFAULT_GPU_IDLE_TIMEOUT
    stop_after_idle: int = 0
    on_idle: str | None = None
    kill_grace: float = DEFAULT_KILL_GRACE
    reap: bool = False
    log_level: int = logging.WARNING

    def __post_init__(self) -> None:
        for origin in self.origins:
            check_origin(origin)
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is out of range", hint="Pick a port in 1-65535.")
        if self.ip not in ("127.0.0.1", "localhost", "::1") and not self.allow_remote_access:
            raise ConfigError(
                f"refusing to listen on {self.ip}: it is not a loopback address",
                hint="Use an SSH tunnel, or pass --i-know-this-exposes-the-server if you really mean it.",
            )
        if min(self.idle_timeout, self.gpu_idle_timeout, self.stop_after_idle) < 0:
            raise ConfigError("idle timeouts must be >= 0 seconds (0 turns them off)")
        if self.on_idle and not self.stop_after_idle:
            raise ConfigError(
                "--on-idle needs --stop-after-idle SECONDS",
                hint="The hook runs once the server has had no kernels for that long.",
            )
        if not 0 < self.kill_grace <= 300:
            raise ConfigError("--kill-grace must be between 0 and 300 seconds")
