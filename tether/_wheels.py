"""Wheels for a remote's platform: resolved once on the laptop, pinned, cached, verified.

Preparing a remote installs one pinned set of packages, whichever installer runs there (``uv``,
or ``pip`` where uv cannot run) and wherever the files come from (the remote's index, or this
laptop for a host with no index). The set is resolved here, once per requirement set and remote
platform, by pip's own resolver for the remote's tags (``pip install --dry-run --report``
with ``--platform/--python-version/--implementation/--abi``), and kept as a lock: name, version,
file, URL and sha256 of every wheel, ``uv`` included (tether ships uv's wheel itself, so the
remote needs neither sudo nor a recent pip).

The cache (``$TETHER_WHEEL_CACHE``, else ``<user cache>/tether/wheel-cache``) holds
``locks/<key>.json`` and ``wheels/<file>``; every file is written to a temporary name and
renamed, so an interrupted download leaves nothing that looks complete. A wheel is used only
when its sha256 matches the lock. A laptop that cannot reach an index resolves from the wheels
already in the cache (``--no-index --find-links``); where those do not suffice, the error names
the ``pip download`` to run elsewhere and the folder to put its files in.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from tether.errors import RemoteEnvironmentError

log = logging.getLogger(__name__)

CACHE_ENV = "TETHER_WHEEL_CACHE"
LOCK_SCHEMA = 1
RESOLVE_TIMEOUT = 300.0
DOWNLOAD_TIMEOUT = 120.0  # per file, per read
DOWNLOADS_AT_ONCE = 4
UV = "uv"
CHUNK = 1 << 20
OLDEST_GLIBC = 5  # manylinux1 is glibc 2.5

OnStep = Callable[[dict[str, Any]], None]


class LaptopIndexError(RemoteEnvironmentError):
    """The laptop could not resolve or fetch the wheels a remote needs (no index, no cache)."""


@dataclass(frozen=True)
class Platform:
    """What decides which wheels a remote can install, as its probe reported it."""

    system: str
    machine: str
    libc: str  # "glibc", "musl" or ""
    libc_version: str  # "2.36"
    python: str  # "3.11" (major.minor)
    implementation: str = "cp"

    @classmethod
    def from_probe(cls, probe: Mapping[str, Any]) -> Platform:
        version = str(probe.get("python_version") or "")
        return cls(str(probe.get("os") or ""), str(probe.get("machine") or ""),
                   str(probe.get("libc") or ""), str(probe.get("libc_version") or ""),
                   ".".join(version.split(".")[:2]), str(probe.get("implementation") or "cp"))

    @property
    def describe(self) -> str:
        libc = f" {self.libc} {self.libc_version}".rstrip() if self.libc else ""
        return f"{self.system.lower()} {self.machine}{libc}, Python {self.python}"

    def platform_tags(self) -> list[str]:
        """Every platform tag the remote accepts, newest first (pip does not expand them)."""
        arch = self.machine
        if self.system != "Linux":
            raise LaptopIndexError(
                f"tether prepares Linux remotes only; this one is {self.system} {arch}",
                hint="Use a Linux host, or install tether there yourself (`pip install tether`).")
        if self.libc == "musl":
            minor = int((self.libc_version or "1.2").split(".")[1])
            return [f"musllinux_1_{m}_{arch}" for m in range(minor, -1, -1)]
        major, _, minor_s = (self.libc_version or "2.17").partition(".")
        minor = int(minor_s or 17) if major == "2" else 17
        tags = [f"manylinux_2_{m}_{arch}" for m in range(minor, OLDEST_GLIBC - 1, -1)]
        legacy = {"manylinux2014": 17, "manylinux2010": 12, "manylinux1": 5}
        return tags + [f"{name}_{arch}" for name, need in legacy.items() if minor >= need]

    def pip_args(self) -> list[str]:
        nodot = self.python.replace(".", "")
        args = ["--only-binary=:all:", "--python-version", self.python,
                "--implementation", self.implementation]
        for abi in (f"{self.implementation}{nodot}", "abi3", "none"):
            args += ["--abi", abi]
        for tag in self.platform_tags():
            args += ["--platform", tag]
        return args


@dataclass(frozen=True)
class Pinned:
    """One wheel of a lock."""

    name: str
    version: str
    file: str
    url: str
    sha256: str

    @property
    def pin(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class Lock:
    """The resolved set for one requirement set and platform; ``uv`` is shipped, not installed."""

    key: str
    platform: str
    requirements: tuple[str, ...]
    packages: tuple[Pinned, ...]
    resolved: float = 0.0

    @property
    def uv(self) -> Pinned | None:
        return next((p for p in self.packages if p.name.lower() == UV), None)

    @property
    def installs(self) -> tuple[Pinned, ...]:
        return tuple(p for p in self.packages if p.name.lower() != UV)

    def pins(self) -> list[str]:
        return sorted(p.pin for p in self.installs)

    def to_json(self) -> dict[str, Any]:
        return {"schema": LOCK_SCHEMA, "key": self.key, "platform": self.platform,
                "requirements": list(self.requirements), "resolved": self.resolved,
                "packages": [asdict(p) for p in self.packages]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Lock:
        return cls(str(data["key"]), str(data["platform"]),
                   tuple(str(r) for r in data["requirements"]),
                   tuple(Pinned(**{k: str(p[k]) for k in ("name", "version", "file", "url",
                                                          "sha256")})
                         for p in data["packages"]),
                   float(data.get("resolved") or 0.0))


# -- the cache ---------------------------------------------------------------------------------

def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if env.get(CACHE_ENV):
        return Path(env[CACHE_ENV])
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tether" / "wheel-cache"


def wheels_dir() -> Path:
    return cache_dir() / "wheels"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached(pinned: Pinned) -> Path | None:
    """The cached wheel, if present and matching the lock's hash (a mismatch is removed)."""
    path = wheels_dir() / pinned.file
    if not path.is_file():
        return None
    if file_sha256(path) == pinned.sha256:
        return path
    log.warning("cached %s does not match its sha256; fetching it again", path)
    path.unlink(missing_ok=True)
    return None


# -- resolving ---------------------------------------------------------------------------------

def tether_requirements() -> list[str]:
    """tether's runtime requirements (extras left out), and uv, which tether ships."""
    reqs = [r for r in metadata.requires("tether") or [] if "extra ==" not in r]
    return sorted(reqs) + [UV]


def lock_key(platform: Platform, requirements: Sequence[str]) -> str:
    blob = json.dumps({"schema": LOCK_SCHEMA, "requirements": sorted(requirements),
                       "python": platform.python, "implementation": platform.implementation,
                       "tags": platform.platform_tags()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def read_lock(key: str) -> Lock | None:
    try:
        data = json.loads((cache_dir() / "locks" / f"{key}.json").read_text())
        if data.get("schema") != LOCK_SCHEMA or data.get("key") != key:
            return None
        return Lock.from_json(data)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _pip() -> list[str]:
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    for name in ("pip3", "pip"):
        found = shutil.which(name)
        if found:
            return [found]
    raise LaptopIndexError("preparing a remote needs pip on this machine, to resolve the "
                           "remote's packages", hint="Install pip (`python3 -m ensurepip`).")


async def _run(argv: list[str], timeout: float) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, f"took more than {timeout:.0f} s"
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    lines = [line for line in err.decode(errors="replace").splitlines()
             if not line.startswith("WARNING: Location")]  # absent mirrors listed in pip.conf
    return proc.returncode or 0, "\n".join(lines[-15:])


async def _resolve(platform: Platform, requirements: Sequence[str], offline: bool
                   ) -> tuple[int, str, dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="tether-resolve-") as tmp:
        report = Path(tmp) / "report.json"
        argv = [*_pip(), "install", "--dry-run", "--ignore-installed", "--quiet",
                "--disable-pip-version-check", "--no-input", "--target", str(Path(tmp) / "t"),
                "--report", str(report), *platform.pip_args()]
        if offline:
            argv += ["--no-index", "--find-links", str(wheels_dir())]
        status, err = await _run([*argv, *requirements], RESOLVE_TIMEOUT)
        data = json.loads(report.read_text()) if status == 0 and report.exists() else {}
    return status, err, data


def _lock_from_report(key: str, platform: Platform, requirements: Sequence[str],
                      report: Mapping[str, Any]) -> Lock:
    packages = []
    for item in report.get("install", []):
        info = item.get("download_info") or {}
        url = str(info.get("url") or "")
        sha = str(((info.get("archive_info") or {}).get("hashes") or {}).get("sha256") or "")
        meta = item.get("metadata") or {}
        packages.append(Pinned(str(meta.get("name")), str(meta.get("version")),
                               url.rsplit("/", 1)[-1].split("#")[0], url, sha))
    missing = [p.name for p in packages if not p.sha256 or not p.file.endswith(".whl")]
    if missing:
        raise LaptopIndexError(f"the index gave no wheel with a sha256 for {', '.join(missing)}",
                               hint="Point pip at an index that serves hashes (PyPI does).")
    return Lock(key, platform.describe, tuple(requirements), tuple(packages), time.time())


def download_hint(platform: Platform, requirements: Sequence[str]) -> str:
    argv = ["pip", "download", "-d", str(wheels_dir()), *platform.pip_args(), *requirements]
    return (f"On a machine that reaches a package index, run `{shlex.join(argv)}`, and put the "
            f"files in {wheels_dir()} on this one; or connect this one to an index once.")


async def lock_for(platform: Platform, on_step: OnStep | None = None,
                   requirements: Sequence[str] | None = None) -> Lock:
    """The lock for ``platform``: from the cache, else resolved (index, then cached wheels)."""
    reqs = list(requirements or tether_requirements())
    key = lock_key(platform, reqs)
    found = read_lock(key)
    if found is not None:
        return found
    with _Step(on_step, "resolve", f"resolving packages for {platform.describe} (laptop)"):
        status, err, report = await _resolve(platform, reqs, offline=False)
        if status != 0 and "no such option" in err:
            raise LaptopIndexError("the pip on this machine is too old to resolve packages for "
                                   "a remote (it needs `pip install --report`, pip >= 22.2)",
                                   hint=f"Upgrade it: `{shlex.join(_pip())} install -U pip`.",
                                   stderr=err)
        if status != 0:
            log.info("resolving from the index failed (%s); trying the cached wheels", err)
            status, err2, report = await _resolve(platform, reqs, offline=True)
        if status != 0:
            raise LaptopIndexError(
                f"this machine could not resolve the packages for a remote ({platform.describe})"
                f" from a package index or from its wheel cache: {_last(err)}",
                hint=download_hint(platform, reqs), stderr=err)
        lock = _lock_from_report(key, platform, reqs, report)
    _write_atomic(cache_dir() / "locks" / f"{key}.json",
                  json.dumps(lock.to_json(), indent=1).encode())
    return lock


def _last(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


# -- fetching ----------------------------------------------------------------------------------

def _download(pinned: Pinned) -> Path:
    """Fetch one wheel into the cache (temporary name, hash checked, then renamed)."""
    dest = wheels_dir() / pinned.file
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{pinned.file}.", suffix=".part")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, \
                urllib.request.urlopen(pinned.url, timeout=DOWNLOAD_TIMEOUT) as resp:
            for chunk in iter(lambda: resp.read(CHUNK), b""):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != pinned.sha256:
            raise LaptopIndexError(f"{pinned.file} from {pinned.url} does not match the sha256 "
                                   "the index gave", hint="Try again; if it persists, the index "
                                                          "or a proxy alters the file.")
        os.replace(tmp, dest)
    except (OSError, urllib.error.URLError, ValueError) as e:
        raise LaptopIndexError(f"could not download {pinned.file}: {e}",
                               hint=f"Check this machine's network, or put {pinned.file} in "
                                    f"{wheels_dir()}.", url=pinned.url) from e
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest


async def fetch(wheels: Iterable[Pinned], on_step: OnStep | None = None) -> dict[str, Path]:
    """{file: path} of each wheel, from the cache or downloaded into it (a few at a time)."""
    wanted = list(wheels)
    found = {p.file: path for p in wanted if (path := cached(p)) is not None}
    missing = [p for p in wanted if p.file not in found]
    if not missing:
        return found
    size = f"{len(missing)} wheel{'s' if len(missing) != 1 else ''}"
    with _Step(on_step, "download", f"downloading {size} into the laptop's cache"):
        gate = asyncio.Semaphore(DOWNLOADS_AT_ONCE)

        async def one(p: Pinned) -> None:
            async with gate:
                found[p.file] = await asyncio.to_thread(_download, p)

        async with asyncio.TaskGroup() as tg:
            for p in missing:
                tg.create_task(one(p))
    return found


class _Step:
    """A laptop-side step, reported like the agent's (start, then done/fail with seconds)."""

    def __init__(self, on_step: OnStep | None, key: str, label: str) -> None:
        self.on_step, self.key, self.label = on_step, key, label
        self.t0 = 0.0

    def __enter__(self) -> _Step:
        self.t0 = time.monotonic()
        self._emit("start")
        return self

    def __exit__(self, kind: object, *_: object) -> None:
        self._emit("fail" if kind else "done", round(time.monotonic() - self.t0, 2))

    def _emit(self, state: str, seconds: float | None = None) -> None:
        if self.on_step is not None:
            event: dict[str, Any] = {"event": "step", "key": self.key, "label": self.label,
                                     "state": state}
            if seconds is not None:
                event["seconds"] = seconds
            self.on_step(event)
