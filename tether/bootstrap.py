"""Prepare a remote without sudo, idempotently, and start (or find) its server.

The remote side is :mod:`tether._seed`, a small standard-library script run by the remote's own
``python3`` over one SSH connection per call (its source is the inline argument: it must stay
small), which hands over to :mod:`tether.host` in tether's environment once that is current. On a
prepared remote ``up`` is a single call; a cold one needs a second call that carries tether's
wheel on stdin. The wheel is built here from the installed package, so both sides always run the
same code; what both sides agree on is :mod:`tether.contract`.

Between the two calls the laptop plans the install from the remote's answer (platform, index
reachable or not, wheels it already has): the pinned set for that platform comes from
:mod:`tether._wheels` (resolved once, cached here), this laptop's own uv is sent along where it
runs there (else the host fetches uv's pinned wheel, or gets it from here when offline), and on
a host with no index (or ``--offline``) every pinned wheel is streamed too, each verified by
sha256.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import os
import shlex
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from tether import __version__, contract
from tether import _seed, _ssh
from tether.config import COLAB_ORIGIN, REMOTE_CACHE_ENV
from tether.contract import CACHE_KINDS as CACHE_KINDS
from tether.contract import NO_PYTHON as NO_PYTHON
from tether.contract import NO_TETHER as NO_TETHER
from tether.contract import REMOTE_LAYOUT as REMOTE_LAYOUT
from tether.contract import SCOPE_ENV as SCOPE_ENV
from tether.contract import RemoteLayout as RemoteLayout
from tether.contract import ServerInfo as ServerInfo
from tether.contract import UpResult as UpResult
from tether.errors import (
    ConfigError,
    RemoteEnvironmentError,
    ServerNotFoundError,
    ServerStartError,
    SSHError,
    TetherError,
)

log = logging.getLogger(__name__)

# The remote command: find the interpreter, then run the seed with it (argv: python, src, params)
_PREFIX = (f'command -v "$1" >/dev/null 2>&1 || exit {NO_PYTHON}; '
           'exec "$1" -c "$2" "$3"')
WHEEL_TAG = "py3-none-any"
SERVER_CONFIG = {"ServerApp": {"jpserver_extensions": {"tether.remote": True}}}
# Cold preparation installs from the package index: minutes on a slow link.
INSTALL_TIMEOUT = 1800.0
CALL_TIMEOUT = 120.0
SEND_CHUNK = 1 << 20
LOG_LINES = 12

Event = dict[str, Any]
OnEvent = Callable[[Event], None]


@dataclass(frozen=True)
class Wheel:
    name: str
    data: bytes = field(repr=False)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass(frozen=True)
class RemoteOptions:
    """What the remote side of ``up`` needs: the server's options and the kernel's Python."""

    remote_python: str = "python3"
    kernel_python: str | None = None
    conda_env: str | None = None
    install_kernel_deps: bool | None = None
    remote_port: int | None = None
    origins: tuple[str, ...] = ()
    notebook_dir: str | None = None
    idle_timeout: int = 3600
    serve_args: tuple[str, ...] = ()  # further `tether serve` options, passed on as given
    offline: bool = False  # prepare from this machine's wheels even if the host has an index
    purge: bool = False  # `down`: also remove every environment, uv and the wheel cache


@dataclass(frozen=True)
class ConsentNeeded:
    """The kernel's Python lacks packages kernels need; installing them needs the user's yes.

    Given to the ``consent`` callback of :func:`up`; ``yes`` runs ``up`` again with
    ``install_kernel_deps=True``.
    """

    host: str
    python: str
    missing: tuple[str, ...]

    @property
    def question(self) -> str:
        return (f"{self.python} on {self.host} has no {' or '.join(self.missing)}. "
                f"Install {' and '.join(self.missing)} there?")

    @property
    def hint(self) -> str:
        return (f"Run again with --install-kernel-deps to install them there, or run "
                f"`{self.python} -m pip install {' '.join(self.missing)}` on {self.host}.")


Consent = Callable[[ConsentNeeded], Awaitable[bool]]


# -- the wheel ---------------------------------------------------------------------------------

def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest},{len(data)}"


def _package_files() -> list[tuple[str, bytes]]:
    root = Path(__file__).parent
    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root.parent).as_posix()
        if path.is_file() and "__pycache__" not in rel and path.suffix not in (".pyc", ".pyo"):
            files.append((rel, path.read_bytes()))
    return files


def _dist_files() -> list[tuple[str, bytes]]:
    from importlib import metadata

    dist = metadata.distribution("tether")
    info = f"tether-{__version__}.dist-info"
    meta = (dist.read_text("METADATA") or "").encode()
    entry_points = (dist.read_text("entry_points.txt") or "").encode()
    wheel = f"Wheel-Version: 1.0\nGenerator: tether\nRoot-Is-Purelib: true\nTag: {WHEEL_TAG}\n"
    config = json.dumps(SERVER_CONFIG, indent=2).encode()
    return [
        (f"tether-{__version__}.data/data/etc/jupyter/jupyter_server_config.d/tether.json", config),
        (f"{info}/METADATA", meta),
        (f"{info}/WHEEL", wheel.encode()),
        (f"{info}/entry_points.txt", entry_points),
    ]


@dataclass(frozen=True)
class WheelId:
    """What the remote checks its environment against: the wheel's name and sha256."""

    name: str
    sha256: str


def _stamp() -> str:
    """What the wheel is built from: the package's files by name, size and mtime, and the
    dist-info's text."""
    from importlib import metadata

    root = Path(__file__).parent
    entries = []
    for top, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(n for n in files if not n.endswith((".pyc", ".pyo"))):
            info = os.stat(os.path.join(top, name))
            entries.append([os.path.relpath(os.path.join(top, name), root), info.st_size,
                            info.st_mtime_ns])
    dist = metadata.distribution("tether")
    blob = json.dumps([__version__, entries, dist.read_text("METADATA"),
                       dist.read_text("entry_points.txt")])
    return hashlib.sha256(blob.encode()).hexdigest()


@lru_cache(maxsize=1)
def wheel_id() -> WheelId:
    """The name and sha256 of tether's wheel, not built again where the package's files are
    those of the last build on this laptop (:func:`_stamp`, kept in its cache): what a warm
    ``up``, ``status`` or ``down`` needs, for a few ms instead of building it (20-70 ms)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tether"
    path, stamp = base / "wheel-id.json", _stamp()
    try:
        known = json.loads(path.read_text())
        if known.get("stamp") == stamp:
            return WheelId(str(known["name"]), str(known["sha256"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    wheel = build_wheel()
    try:
        base.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"stamp": stamp, "name": wheel.name, "sha256": wheel.sha256}))
        os.replace(tmp, path)
    except OSError as e:
        log.debug("cannot keep the wheel's id in %s: %s", path, e)
    return WheelId(wheel.name, wheel.sha256)


@lru_cache(maxsize=1)
def build_wheel() -> Wheel:
    """tether's wheel, built in memory from the running package (same bytes for same files)."""
    import zipfile

    files = _package_files() + _dist_files()
    record = "".join(f"{name},{_record_hash(data)}\n" for name, data in files)
    record += f"tether-{__version__}.dist-info/RECORD,,\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in [*files, (f"tether-{__version__}.dist-info/RECORD", record.encode())]:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return Wheel(f"tether-{__version__}-{WHEEL_TAG}.whl", buf.getvalue())


def requires_python() -> str:
    from importlib import metadata

    spec = str((metadata.metadata("tether").get_all("Requires-Python") or [">=3.9"])[0])
    return spec.replace(">=", "").split(",")[0].strip()


@lru_cache(maxsize=1)
def seed_source() -> str:
    """The seed's source: what the remote ``python3 -c`` runs (sent inline, so capped). Its
    module docstring, and its comments where no quote precedes them on their line, are left
    out (fewer bytes, the same line numbers in a traceback; a test checks the code is the
    same)."""
    from importlib import resources

    lines = resources.files("tether").joinpath("_seed.py").read_text().splitlines()
    end = next(i for i, line in enumerate(lines) if i and line.endswith('"""'))
    lines[:end + 1] = [""] * (end + 1)  # the module docstring: for the reader here
    for i, line in enumerate(lines):
        code, sep, _ = line.partition("#")
        if sep and "'" not in code and '"' not in code:
            lines[i] = code.rstrip()
    return "\n".join(lines) + "\n"


# -- calling the remote side -------------------------------------------------------------------

# Linux refuses one argument over 128 KiB (MAX_ARG_STRLEN); the whole remote command is one
# argument of `sh -c` on the far side of ssh. The seed stays well under it (tested).
INLINE_LIMIT = 48 << 10


def remote_command(python: str, params: dict[str, Any]) -> list[str]:
    """``sh -c SCRIPT sh PYTHON SEED PARAMS [SHA ACTION]``: the seed on the remote's Python.

    Where nothing comes on stdin and tether's environment of this very build is there (its
    marker names the wheel's sha256), the shell execs :mod:`tether.host` at once, as the seed
    would: a warm ``up``, ``status`` or ``down`` starts one interpreter, not two."""
    if params.get("action") not in contract.HOST_ACTIONS or params.get("wheel_size") \
            or params.get("plan_size"):
        return ["sh", "-c", _PREFIX, "sh", python, seed_source(), json.dumps(params)]
    layout = REMOTE_LAYOUT
    env = f"{layout.root_expr()}/{layout.env.format(version=__version__)}"
    # the marker is one line of JSON; `read` and `case` are built in (no grep to start)
    ready = (f'e={env}; m=; read -r m 2>/dev/null < "$e/{layout.marker}"; case "$m" in '
             f'*\\"$4\\"*) [ -x "$e/bin/python" ] && '
             f'exec "$e/bin/python" -I -c {shlex.quote(_seed.HOST_MAIN)} "$5" "$3";; esac; ')
    script = _PREFIX.replace("; exec", f"; {ready}exec", 1)
    return ["sh", "-c", script, "sh", python, seed_source(), json.dumps(params),
            str(params["wheel_sha256"]), str(params["action"])]


def _params(action: str, opts: RemoteOptions, wheel: Wheel | WheelId,
            **extra: Any) -> dict[str, Any]:
    return {
        "action": action, "version": __version__, "requires_python": requires_python(),
        "wheel_sha256": wheel.sha256, "wheel_name": wheel.name,
        "kernel_python": opts.kernel_python, "conda_env": opts.conda_env,
        "install_kernel_deps": opts.install_kernel_deps, "remote_port": opts.remote_port,
        "origins": [o for o in opts.origins if o != COLAB_ORIGIN],
        "notebook_dir": opts.notebook_dir, "idle_timeout": opts.idle_timeout,
        "serve_args": list(opts.serve_args), "offline": opts.offline, "purge": opts.purge,
        **contract.seed_params(), **extra,
    }


# What each remote action does, in the user's words (for messages).
_WHAT = {"up": "preparing {host}", "prepare": "preparing {host}",
         "down": "stopping tether on {host}", "status": "reading the status of {host}",
         "probe": "checking {host}", "restart": "restarting the server on {host}"}


def index_reach(host: str, index: Mapping[str, Any]) -> str:
    """What the seed's index check (in ``probe``, the same bounded connect a cold ``up``
    makes) means for ``host``, in one line for ``tether doctor``."""
    url = str(index.get("url") or "the package index")
    if index.get("reachable"):
        return f"{host} reaches the index ({url}, {float(index.get('seconds') or 0):.2f} s)"
    return (f"no index: the laptop will send the wheels (offline preparation); {host} cannot "
            f"reach {url}: {index.get('why') or 'no answer'}")


def call_input(action: str, opts: RemoteOptions, *, wheel_data: bytes = b"",
               plan: Mapping[str, Any] | None = None,
               **extra: Any) -> tuple[dict[str, Any], bytes]:
    """(the seed's parameters, sent inline; what goes to its stdin before the files).

    The install plan (pins, the wheels needed and sent: it grows with the lock) travels on
    stdin, ahead of the wheel, so that the inline command keeps its size whatever the lock."""
    head = json.dumps(plan).encode() if plan else b""
    params = _params(action, opts, build_wheel() if wheel_data else wheel_id(),
                     wheel_size=len(wheel_data),
                     plan_size=len(head), **extra)
    return params, head + wheel_data


async def call_remote(target: _ssh.SSHTarget, opts: RemoteOptions, action: str, *,
                      on_event: OnEvent | None = None, wheel_data: bytes = b"",
                      plan: Mapping[str, Any] | None = None, files: Sequence[Path] = (),
                      timeout: float = CALL_TIMEOUT, **extra: Any) -> dict[str, Any]:
    """Run one action on the remote (the seed, then :mod:`tether.host`); stream its events;
    return its result, checked to be of this tether's protocol.

    ``wheel_data`` (tether's wheel), then each of ``files``, go to the seed's stdin."""
    params, data = call_input(action, opts, wheel_data=wheel_data, plan=plan, **extra)
    command = remote_command(opts.remote_python, params)
    what = _WHAT.get(action, action + " on {host}").format(host=target.host)
    proc = await _ssh.spawn(target, target.argv(command=command))
    try:
        return await asyncio.wait_for(
            _converse(target, proc, data, files, on_event or (lambda e: None),
                      what=what, python=opts.remote_python), timeout)
    except asyncio.TimeoutError as e:
        raise SSHError(f"{what} took more than {timeout:.0f} s", host=target.host,
                       hint=f"Check that `ssh {target.host}` answers quickly, then try again."
                       ) from e
    finally:
        await _ssh.terminate(proc)


async def _converse(target: _ssh.SSHTarget, proc: asyncio.subprocess.Process, data: bytes,
                    files: Sequence[Path], on_event: OnEvent, *, what: str,
                    python: str) -> dict[str, Any]:
    assert proc.stdin and proc.stdout and proc.stderr
    async with asyncio.TaskGroup() as tg:  # on cancel, the stderr reader is cancelled too
        stderr_task = tg.create_task(proc.stderr.read())
        # the events are read while we send: the seed reports progress as files arrive
        events_task = tg.create_task(_events(proc.stdout, on_event))
        try:
            await _send(proc.stdin, data, files)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the remote ended early; its exit status says why
        final = await events_task
        # stdin stays open until the result: the remote takes EOF as "the laptop is gone"
        proc.stdin.close()
        status = await proc.wait()
    return _outcome(target, status, final, stderr_task.result(), what=what, python=python)


async def _send(stdin: asyncio.StreamWriter, data: bytes, files: Sequence[Path]) -> None:
    if data:
        stdin.write(data)
        await stdin.drain()
    for path in files:  # streamed: a few MiB in memory at a time, whatever the total
        with open(path, "rb") as f:
            while chunk := f.read(SEND_CHUNK):
                stdin.write(chunk)
                await stdin.drain()


async def _events(stdout: asyncio.StreamReader, on_event: OnEvent) -> Event | None:
    async for raw in stdout:
        event = _parse(raw)
        if event is None:
            continue
        if event.get("event") in ("result", "error"):
            return event
        on_event(event)
    return None


def _parse(raw: bytes) -> Event | None:
    try:
        event = json.loads(raw)
    except ValueError:
        log.debug("the remote said %r", raw[:200])
        return None
    return event if isinstance(event, dict) else None


def _outcome(target: _ssh.SSHTarget, status: int, final: Event | None, stderr: bytes, *,
             what: str = "", python: str = "python3") -> dict[str, Any]:
    if status == NO_PYTHON:
        raise _no_python(target.host, python)
    if final is not None and final["event"] == "error":
        raise _remote_error(target, final)
    if final is None or status != 0:
        raise _no_answer(target, what or f"the remote step on {target.host}", python, status,
                         stderr)
    contract.check_protocol(target.host, final)
    return final


def _no_python(host: str, python: str) -> RemoteEnvironmentError:
    install = (f"Install it (e.g. `ssh {host} sudo apt-get install -y python3 python3-venv`) "
               "or pass --remote-python PATH.")
    if python == "python3":
        return RemoteEnvironmentError(f"{host} has no python3 on its PATH.", hint=install,
                                      host=host, python=python)
    where = "an executable" if "/" in python else "on the PATH"
    return RemoteEnvironmentError(
        f"--remote-python {python} is not {where} on {host}.",
        hint=f"Give the full path of a Python >= {requires_python()} there (`ssh {host} "
             "command -v python3` shows one), or leave out --remote-python.",
        host=host, python=python)


def _no_answer(target: _ssh.SSHTarget, what: str, python: str, status: int,
               stderr: bytes) -> SSHError:
    """ssh ended without the remote's result: ssh's own failure, or a remote Python that broke."""
    error = _ssh.ssh_error(target, what, status, stderr)
    if type(error) is not SSHError:  # cannot reach or log in: already in the user's words
        return error
    last = str(error.data.get("stderr", "")).strip().splitlines()
    said = f": {last[-1]}" if last else ""
    hint = (f"Check that `ssh {target.host} {python} -V` prints Python >= {requires_python()}."
            if status != _ssh.SSH_FAILED else
            f"Check that `ssh {target.host}` works in a terminal, then try again.")
    return SSHError(f"{what} failed: the remote ended with exit status {status} before "
                    f"answering{said}.", hint=hint, **error.data)


def _remote_error(target: _ssh.SSHTarget, event: Event) -> TetherError:
    host = target.host
    kind = event.get("kind", "")
    said = _sentence(str(event.get("message", "a remote step failed")))
    # The remote names the host HOST where a sentence needs it; otherwise say where it failed.
    message = said.replace("HOST", host) if "HOST" in said else f"{host}: {said}"
    hint = str(event.get("hint", "")).replace("HOST", host)
    log_tail = str(event.get("log_tail", ""))
    data = {"host": host, "kind": kind, "log_tail": log_tail}
    if log_tail:  # the user sees why without logging in: the last lines of the remote log
        lines = "\n".join("    " + line for line in log_tail.splitlines()[-LOG_LINES:])
        message = f"{message}\n  remote log (tail):\n{lines}\n "
    if kind in contract.START_KINDS:
        log_path = str(event.get("log") or REMOTE_LAYOUT.server_log)
        return ServerStartError(
            message, hint=hint or f"Fix that and run `tether up {host}` again (full log: "
                                  f"{log_path} on {host}).", **data)
    if kind in contract.NO_SERVER_KINDS:
        return ServerNotFoundError(message, hint=f"`tether up {host}` starts one.", **data)
    if kind == contract.KERNEL_PYTHON:  # a --kernel-python or --conda-env that cannot be used
        return ConfigError(message, hint=hint, **data)
    fix = str(event.get("cache_fix") or "")
    if kind in CACHE_KINDS or (kind == "disk" and fix):
        hint = cache_hint(tether_command(target, "up"), host, fix)
        data.update(folder=str(event.get("folder") or ""), cache_fix=fix)
    return RemoteEnvironmentError(message, hint=hint, **data)


def tether_command(target: _ssh.SSHTarget, command: str, *extra: str) -> str:
    """``tether COMMAND HOST ...`` as the user runs it for ``target``: with its -F and -o."""
    args = ["tether", command, target.host, *extra]
    if target.config_file:
        args += ["-F", target.config_file]
    for opt in target.options:
        args += ["-o", opt]
    return shlex.join(args)


def cache_hint(command: str, host: str, folder: str) -> str:
    """The fix for a remote where tether's folder cannot be used: ``command`` (a ``tether up``
    line) again with TETHER_REMOTE_CACHE set to ``folder``, one the remote found writable."""
    if folder:
        return (f"Run `{REMOTE_CACHE_ENV}={shlex.quote(folder)} {command}` to keep tether's "
                f"files in {folder} on {host} instead.")
    return (f"Run `{REMOTE_CACHE_ENV}=DIR {command}` with DIR a folder you can write on {host} "
            "(none of $TMPDIR, /scratch/$USER, /tmp was).")


def _sentence(text: str) -> str:
    """Error and hint are printed one after the other: each ends as a sentence."""
    text = text.strip()
    return text if not text or text[-1] in ".!?:" else text + "."


async def up(target: _ssh.SSHTarget, opts: RemoteOptions, *, on_event: OnEvent | None = None,
             attach: bool = False, consent: Consent | None = None,
             **extra: Any) -> UpResult:
    """Make sure a server runs on the remote (preparing it first if needed); return it.

    Where the kernel's Python lacks ipykernel, ``consent`` is asked (a :class:`ConsentNeeded`);
    without one, or on a no, that is a :class:`ConfigError` whose hint says what to run.
    """
    result = await _with_consent(target, opts, "up", on_event, consent, attach=attach, **extra)
    return UpResult.from_payload(target.host, result)


async def restart(target: _ssh.SSHTarget, opts: RemoteOptions, *,
                  on_event: OnEvent | None = None,
                  consent: Consent | None = None) -> contract.RestartResult:
    """A new server on the remote (this tether's version, ``opts`` over the running one's
    options) that adopts the running server's kernels; same token and socket."""
    result = await _with_consent(target, opts, "restart", on_event, consent)
    return contract.RestartResult.from_payload(target.host, result)


async def prepare(target: _ssh.SSHTarget, opts: RemoteOptions, *,
                  on_event: OnEvent | None = None, consent: Consent | None = None) -> str:
    """Prepare the environment and kernelspec, start nothing (a batch job will); the kernels'
    Python."""
    result = await _with_consent(target, opts, "prepare", on_event, consent)
    return str(result.get("kernel_python") or "")


async def _with_consent(target: _ssh.SSHTarget, opts: RemoteOptions, action: str,
                        on_event: OnEvent | None, consent: Consent | None,
                        **extra: Any) -> dict[str, Any]:
    result = await _up_once(target, opts, action, on_event=on_event, **extra)
    if isinstance(result, ConsentNeeded):
        if consent is None or not await consent(result):
            raise ConfigError(f"{result.python} on {target.host} has no "
                              f"{' or '.join(result.missing)}.", hint=result.hint,
                              host=target.host, python=result.python)
        opts = RemoteOptions(**{**opts.__dict__, "install_kernel_deps": True})
        result = await _up_once(target, opts, action, on_event=on_event, **extra)
        if isinstance(result, ConsentNeeded):  # asked once per run: cannot happen twice
            raise RemoteEnvironmentError(f"installing into {result.python} on {target.host} "
                                         "did not take.", host=target.host)
    return result


async def run_action(target: _ssh.SSHTarget, opts: RemoteOptions, action: str, *,
                     on_event: OnEvent | None = None, **extra: Any) -> dict[str, Any]:
    """One remote action that needs tether's environment (``status``, ``down``; ``up`` and
    ``prepare`` through :func:`up`/:func:`prepare`): where the remote has none of this
    version and it is needed, the wheel is sent (a second call) and the action goes on."""
    result = await call_remote(target, opts, action, on_event=on_event, **extra)
    if result.get("need_wheel"):
        wheel = build_wheel()
        plan, files = await install_plan(target.host, result.get("probe") or {}, opts, on_event)
        if on_event:
            size = len(wheel.data) + sum(p.stat().st_size for p in files)
            more = f" and {len(files)} file{'s' if len(files) != 1 else ''}" if files else ""
            on_event({"event": "step", "key": "ship", "state": "done", "seconds": 0,
                      "label": f"sending {wheel.name}{more} ({size / 2**20:.1f} MiB)"})
        result = await call_remote(target, opts, action, on_event=on_event,
                                   wheel_data=wheel.data, plan=plan, files=files,
                                   timeout=INSTALL_TIMEOUT, **extra)
    return result


async def _up_once(target: _ssh.SSHTarget, opts: RemoteOptions, action: str, *,
                   on_event: OnEvent | None, **extra: Any) -> dict[str, Any] | ConsentNeeded:
    result = await run_action(target, opts, action, on_event=on_event, **extra)
    question = result.get("need_consent")
    if isinstance(question, dict):
        return ConsentNeeded(target.host, str(question.get("python", "")),
                             tuple(str(m) for m in question.get("missing") or ()))
    result["warnings"] = [str(w).replace("HOST", target.host)
                          for w in result.get("warnings") or ()]
    return result


async def install_plan(host: str, probe: Mapping[str, Any], opts: RemoteOptions,
                       on_event: OnEvent | None) -> tuple[dict[str, Any], list[Path]]:
    """(seed parameters, files to stream) for a cold preparation of ``host``.

    The pins always come from this machine's lock; on a host that reaches no index (or with
    ``--offline``) every pinned wheel is sent as well, except those it has. uv: this laptop's
    own binary where it runs there (:func:`tether._wheels.laptop_uv`), else a host with an
    index fetches the wheel the lock pins itself, else the laptop sends that wheel.
    """
    from tether import _wheels  # (a cold preparation only: a warm `up` does not import it)

    index = probe.get("index") or {}
    offline = opts.offline or not index.get("reachable", True)
    if offline and not opts.offline and on_event:
        on_event({"event": "step", "key": "index", "state": "done",
                  "seconds": float(index.get("seconds") or 0),
                  "label": f"{host} reaches no package index ({index.get('why') or 'no answer'})"
                           ": preparing it from this machine"})
    platform = _wheels.Platform.from_probe(probe)

    async def lock_or_error() -> _wheels.Lock | _wheels.LaptopIndexError:
        try:
            return await _wheels.lock_for(platform, on_event)
        except _wheels.LaptopIndexError as e:
            return e

    async with asyncio.TaskGroup() as tg:  # this laptop's uv is packed while the lock resolves
        mine = tg.create_task(asyncio.to_thread(_wheels.laptop_uv, platform))
        locking = tg.create_task(lock_or_error())
    lock, own = locking.result(), mine.result()
    if isinstance(lock, _wheels.LaptopIndexError):
        e = lock
        if offline:
            raise _wheels.LaptopIndexError(
                f"{host} reaches no package index, and {e.message[0].lower()}{e.message[1:]}",
                hint=e.hint, host=host, **e.data) from e
        log.warning("%s: %s; the remote resolves with pip from its index", host, e)
        return {"offline": False}, []  # the remote's own pip, unpinned: better than nothing
    uv, exact = lock.uv, lock.resolver == "uv"
    wanted = [*lock.installs] if offline else []
    if offline and not exact and uv is not None:
        wanted.append(uv)  # the remote resolves tether's own dependencies, uv among them
    spec: dict[str, Any] | None = None
    extra: list[tuple[str, Path, str]] = []  # (file, path, sha256) sent ahead of the wheels
    if own is not None and own.version in (probe.get("have_uv") or ()):
        spec = {"kind": "binary", "version": own.version}  # unpacked there already
    elif own is not None:
        spec = {"kind": "binary", "version": own.version, "file": own.file,
                "sha256": own.sha256, "binary_sha256": own.binary_sha256}
        extra.append((own.file, own.path, own.sha256))
    elif uv is not None and not offline and uv.url.startswith(("https://", "http://")):
        spec = {"kind": "fetch", "version": uv.version, "file": uv.file, "sha256": uv.sha256,
                "url": uv.url}
    elif uv is not None:
        spec = {"kind": "wheel", "version": uv.version, "file": uv.file, "sha256": uv.sha256}
        wanted += [] if uv in wanted else [uv]
    paths = await _wheels.fetch(wanted, on_event)
    have = set(probe.get("have") or ())
    send = [(p.file, paths[p.file], p.sha256) for p in wanted if p.file not in have]
    send = extra + send
    plan = {
        "offline": offline, "pins": lock.pins(), "lock": lock.key, "uv": spec,
        "exact": exact,
        "need": [{"file": p.file, "sha256": p.sha256} for p in wanted],
        "incoming": [{"file": file, "size": path.stat().st_size, "sha256": sha}
                     for file, path, sha in send],
    }
    return plan, [path for _, path, _ in send]


# -- where tether lives on a remote, seen from the laptop and from the remote's own CLI ----------

def remote_tether_argv(*args: str) -> list[str]:
    """argv running the ``tether`` that ``tether up`` installed on the remote, with ``args``.

    The remote runtime directory is set so that remote commands find the server's state file.
    """
    layout = REMOTE_LAYOUT
    env = layout.env.format(version=__version__)
    script = (f"r={layout.root_expr()}; t=\"$r/{env}/bin/tether\"; "
              f"[ -x \"$t\" ] || exit {NO_TETHER}; "
              f"JUPYTER_RUNTIME_DIR=\"$r/{layout.runtime}\" exec \"$t\" \"$@\"")
    return ["sh", "-c", script, "tether", *args]


def local_runtime_dirs() -> list[str | None]:
    """Where servers of this user on this machine keep their state: Jupyter's default runtime
    dir (``tether serve``), then the one ``tether up`` gives the servers it starts (only
    ``$TETHER_RUNTIME_SCOPE`` where that is set)."""
    if os.environ.get(SCOPE_ENV):
        return [os.environ[SCOPE_ENV]]
    return [None, str(REMOTE_LAYOUT.path("runtime"))]
