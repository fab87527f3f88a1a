"""Wheels for a remote's platform: resolved once on the laptop, pinned, cached, verified.

Preparing a remote installs one pinned set of packages, whichever installer runs there (``uv``,
or ``pip`` where uv cannot run) and wherever the files come from (the remote's index, or this
laptop for a host with no index). The set is resolved here, once per requirement set and remote
platform, and kept as a lock: name, version, file, URL and sha256 of every wheel, ``uv``
included (tether ships uv itself, so the remote needs neither sudo nor a recent pip: this
laptop's own binary where it runs there, :func:`laptop_uv`, else the wheel the lock pins).

The resolver is uv (``uv pip compile --format pylock.toml --python-platform ... --python-version
...``; the ``uv`` package is a dependency of tether, else one on PATH): it evaluates environment
markers for the remote, not for this laptop, and takes well under a second. Where no uv runs here,
or the remote is one uv has no platform name for (glibc < 2.17, musl 1.1, ppc64le, ...), pip's
resolver does it (``pip install --dry-run --report`` with ``--platform/--python-version/
--implementation/--abi``), which is slower and evaluates markers with this laptop's values.
Both read the index settings pip would use here (pip.conf, ``PIP_*``), so both ask one index.

The cache (``$TETHER_WHEEL_CACHE``, else ``<user cache>/tether/wheel-cache``) holds
``locks/<key>.json`` and ``wheels/<file>``; every file is written to a temporary name and
renamed, so an interrupted download leaves nothing that looks complete. A wheel is used only
when its sha256 matches the lock. A laptop that cannot reach an index resolves from the wheels
already in the cache (``--no-index --find-links``); where those do not suffice, the error names
the ``pip download`` to run elsewhere and the folder to put its files in.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import configparser
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import subprocess
import time
import tomllib
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from tether.errors import RemoteEnvironmentError

log = logging.getLogger(__name__)

CACHE_ENV = "TETHER_WHEEL_CACHE"
RESOLVER_ENV = "TETHER_RESOLVER"  # "uv" or "pip"; unset: uv where one runs here, else pip
LOCK_SCHEMA = 2  # 2: the resolver is recorded (a uv lock is installed as it stands)
RESOLVE_TIMEOUT = 300.0
DOWNLOAD_TIMEOUT = 120.0  # per file, per read
DOWNLOADS_AT_ONCE = 4
UV = "uv"
CHUNK = 1 << 20
PIECE = 4 << 20  # compressed on its own, in parallel
OLDEST_GLIBC = 5  # manylinux1 is glibc 2.5
# the glibc minors uv names in --python-platform (uv 0.8 to 0.13: x86_64/aarch64-manylinux_2_N)
UV_GLIBC = (17, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40)
UV_ARCHES = ("x86_64", "aarch64")
UV_OLDEST = (0, 8)  # pylock.toml output, the manylinux_2_3x platforms

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

    def uv_platform(self) -> str | None:
        """uv's ``--python-platform`` for this remote: the newest it names that the remote's
        libc accepts, or None where uv names none (pip's resolver takes over there)."""
        if self.system != "Linux" or self.implementation != "cp" or self.machine not in UV_ARCHES:
            return None
        major, _, minor_s = (self.libc_version or "").partition(".")
        minor = int(minor_s.split(".")[0]) if minor_s.split(".")[0].isdigit() else -1
        if self.libc == "musl":  # uv's musl targets take musllinux_1_2 wheels
            return f"{self.machine}-unknown-linux-musl" if major == "1" and minor >= 2 else None
        if self.libc != "glibc" or major != "2":
            return None
        named = [m for m in UV_GLIBC if m <= minor]
        return f"{self.machine}-manylinux_2_{named[-1]}" if named else None

    def tag_ranks(self) -> dict[tuple[str, str, str], int]:
        """(python, abi, platform) tags the remote installs, most specific first (the order
        pip and uv prefer them in), each with its rank."""
        nodot = self.python.replace(".", "")
        minor = int(self.python.split(".")[1])
        cp, plats = f"cp{nodot}", [*self.platform_tags(), "any"]
        tags = [(cp, cp, p) for p in plats[:-1]]
        tags += [(f"cp3{m}", "abi3", p) for m in range(minor, 1, -1) for p in plats[:-1]]
        tags += [(cp, "none", p) for p in plats[:-1]]
        pys = [f"py{nodot}", "py3", *(f"py3{m}" for m in range(minor - 1, -1, -1))]
        tags += [(py, "none", p) for p in plats[:-1] for py in pys]
        tags += [(cp, "none", "any")] + [(py, "none", "any") for py in pys]
        return {tag: rank for rank, tag in enumerate(tags)}

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
    resolver: str = "pip"  # "uv": resolved for the remote's markers, complete as it stands

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
                "resolver": self.resolver, "packages": [asdict(p) for p in self.packages]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Lock:
        return cls(str(data["key"]), str(data["platform"]),
                   tuple(str(r) for r in data["requirements"]),
                   tuple(Pinned(**{k: str(p[k]) for k in ("name", "version", "file", "url",
                                                          "sha256")})
                         for p in data["packages"]),
                   float(data.get("resolved") or 0.0), str(data.get("resolver") or "pip"))


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


async def _run(argv: list[str], timeout: float, env: Mapping[str, str] | None = None,
               cwd: str | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE, env=env, cwd=cwd)
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


def _pins_from_report(report: Mapping[str, Any]) -> list[Pinned]:
    packages = []
    for item in report.get("install", []):
        info = item.get("download_info") or {}
        url = str(info.get("url") or "")
        sha = str(((info.get("archive_info") or {}).get("hashes") or {}).get("sha256") or "")
        meta = item.get("metadata") or {}
        packages.append(Pinned(str(meta.get("name")), str(meta.get("version")),
                               url.rsplit("/", 1)[-1].split("#")[0], url, sha))
    return _checked(packages)


def _checked(packages: list[Pinned], missing: Sequence[str] = ()) -> list[Pinned]:
    missing = [*missing, *(p.name for p in packages
                           if not p.sha256 or not p.file.endswith(".whl"))]
    if missing:
        raise LaptopIndexError(f"the index gave no wheel with a sha256 for {', '.join(missing)}",
                               hint="Point pip at an index that serves hashes (PyPI does).")
    return packages


async def _resolve_with_pip(platform: Platform, reqs: Sequence[str]) -> list[Pinned]:
    status, err, report = await _resolve(platform, reqs, offline=False)
    if status != 0 and "no such option" in err:
        raise LaptopIndexError("the pip on this machine is too old to resolve packages for "
                               "a remote (it needs `pip install --report`, pip >= 22.2)",
                               hint=f"Upgrade it: `{shlex.join(_pip())} install -U pip`.",
                               stderr=err)
    if status != 0:
        log.info("resolving from the index failed (%s); trying the cached wheels", err)
        status, _, report = await _resolve(platform, reqs, offline=True)
    if status != 0:
        raise _unresolved(platform, reqs, err)
    return _pins_from_report(report)


def _unresolved(platform: Platform, reqs: Sequence[str], err: str) -> LaptopIndexError:
    return LaptopIndexError(
        f"this machine could not resolve the packages for a remote ({platform.describe})"
        f" from a package index or from its wheel cache: {_last(err)}",
        hint=download_hint(platform, reqs), stderr=err)


def download_hint(platform: Platform, requirements: Sequence[str]) -> str:
    argv = ["pip", "download", "-d", str(wheels_dir()), *platform.pip_args(), *requirements]
    return (f"On a machine that reaches a package index, run `{shlex.join(argv)}`, and put the "
            f"files in {wheels_dir()} on this one; or connect this one to an index once.")


# -- resolving with uv -------------------------------------------------------------------------

PIP_KEYS = ("index-url", "extra-index-url", "find-links", "trusted-host", "cert", "client-cert",
            "proxy", "no-index")


def _pip_config_files(environ: Mapping[str, str]) -> list[Path]:
    """pip's configuration files, in the order pip reads them (later ones win)."""
    xdg_dirs = (environ.get("XDG_CONFIG_DIRS") or "/etc/xdg").split(os.pathsep)
    home = Path(environ.get("HOME") or Path.home())
    xdg_home = Path(environ.get("XDG_CONFIG_HOME") or home / ".config")
    paths = [*(Path(d) / "pip" / "pip.conf" for d in reversed(xdg_dirs)), Path("/etc/pip.conf"),
             Path("/Library/Application Support/pip/pip.conf"),
             Path(environ.get("ProgramData") or "C:/ProgramData") / "pip" / "pip.ini",
             home / ".pip" / "pip.conf", xdg_home / "pip" / "pip.conf",
             home / "Library" / "Application Support" / "pip" / "pip.conf",
             Path(environ.get("APPDATA") or home) / "pip" / "pip.ini",
             Path(sys.prefix) / "pip.conf"]
    extra = environ.get("PIP_CONFIG_FILE")
    return [*paths, Path(extra)] if extra else paths


def pip_index_settings(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The index settings pip would use on this machine (its configuration files, then
    ``PIP_*``), so that uv, which does not read pip's configuration, asks the same index."""
    env = os.environ if environ is None else environ
    found: dict[str, str] = {}
    if env.get("PIP_CONFIG_FILE") != os.devnull:  # pip: no configuration files at all
        for path in _pip_config_files(env):
            parser = configparser.RawConfigParser()
            try:
                if not path.is_file() or not parser.read(path):
                    continue
            except (configparser.Error, OSError, UnicodeDecodeError) as e:
                log.info("ignoring %s: %s", path, e)
                continue
            for section in ("global", "install"):
                for key in PIP_KEYS:
                    if parser.has_option(section, key):
                        found[key] = parser.get(section, key)
    for key in PIP_KEYS:
        name = "PIP_" + key.upper().replace("-", "_")
        if name in env:  # set, even empty, overrides the files (as in pip)
            found[key] = env[name]
    return found


def uv_index_args(settings: Mapping[str, str]) -> list[str]:
    """uv's flags for pip's index settings; every index is searched for the best version, as
    pip does (uv's default takes each package from the first index that has it)."""
    if settings.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        args = ["--no-index"]
    else:
        args = ["--index-strategy", "unsafe-best-match"]
        if settings.get("index-url", "").strip():
            args += ["--index-url", settings["index-url"].strip()]
        for url in settings.get("extra-index-url", "").split():
            args += ["--extra-index-url", url]
    for link in settings.get("find-links", "").split():
        if "://" in link or os.path.isdir(link):
            args += ["--find-links", link]
    for host in settings.get("trusted-host", "").split():
        args += ["--allow-insecure-host", host]
    return args


def uv_env(settings: Mapping[str, str]) -> dict[str, str]:
    env = dict(os.environ, UV_NO_PROGRESS="1")
    for key, var in (("cert", "SSL_CERT_FILE"), ("client-cert", "SSL_CLIENT_CERT")):
        if settings.get(key, "").strip() and var not in env:
            env[var] = settings[key].strip()
    if settings.get("proxy", "").strip():
        for var in ("HTTPS_PROXY", "HTTP_PROXY"):
            env.setdefault(var, settings["proxy"].strip())
    return env


@functools.cache
def uv_binary() -> tuple[str, str]:
    """(path, "") of a uv that runs here and writes pylock files, else ("", why not)."""
    try:
        from uv import find_uv_bin
        found = find_uv_bin()
    except (ImportError, FileNotFoundError):
        found = shutil.which(UV) or ""
    if not found:
        return "", "no uv on this machine"
    try:
        out = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL).stdout.split()
        version = tuple(int(x) for x in out[1].split(".")[:2])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as e:
        return "", f"{found} does not run ({e})"
    if version < UV_OLDEST:
        return "", f"{found} is uv {out[1]}, older than {'.'.join(map(str, UV_OLDEST))}"
    return found, ""


def _uv_or_why(platform: Platform) -> tuple[str, str]:
    choice = os.environ.get(RESOLVER_ENV, "").strip().lower()
    if choice == "pip":
        return "", f"{RESOLVER_ENV}=pip"
    if platform.uv_platform() is None:
        return "", f"uv names no platform for {platform.describe}"
    return uv_binary()


async def _uv_compile(uv: str, platform: Platform, reqs: Sequence[str], offline: bool
                      ) -> tuple[int, str, dict[str, Any]]:
    settings = {} if offline else pip_index_settings()
    with tempfile.TemporaryDirectory(prefix="tether-resolve-") as tmp:
        (Path(tmp) / "requirements.in").write_text("\n".join(reqs) + "\n")
        out = Path(tmp) / "pylock.toml"
        argv = [uv, "pip", "compile", "requirements.in", "--output-file", str(out),
                "--format", "pylock.toml", "--python-platform", str(platform.uv_platform()),
                "--python-version", platform.python, "--python", sys.executable,
                "--only-binary", ":all:", "--no-header", "--no-annotate", "--quiet"]
        if offline:
            argv += ["--no-index", "--find-links", str(wheels_dir()), "--offline"]
        else:
            argv += uv_index_args(settings)
        # the temporary folder as cwd: no pyproject.toml or uv.toml of the user's project applies
        status, err = await _run(argv, RESOLVE_TIMEOUT, env=uv_env(settings), cwd=tmp)
        data = tomllib.loads(out.read_text()) if status == 0 and out.is_file() else {}
    return status, err, data


def wheel_tags(file: str) -> set[tuple[str, str, str]]:
    """The (python, abi, platform) tags a wheel's file name declares (expanded)."""
    py, abi, plat = file.removesuffix(".whl").split("-")[-3:]
    return {(p, a, t) for p in py.split(".") for a in abi.split(".") for t in plat.split(".")}


def best_wheel(platform: Platform, wheels: Sequence[Mapping[str, Any]]
               ) -> Mapping[str, Any] | None:
    """The wheel the remote's installer would prefer of those uv listed (all install there)."""
    ranks = platform.tag_ranks()

    def rank(wheel: Mapping[str, Any]) -> int:
        file = str(wheel.get("url") or wheel.get("path") or "").rsplit("/", 1)[-1]
        return min((ranks[t] for t in wheel_tags(file) if t in ranks), default=len(ranks))

    return min(wheels, key=rank, default=None)


def _pins_from_pylock(platform: Platform, pylock: Mapping[str, Any]) -> list[Pinned]:
    packages, missing = [], []
    for item in pylock.get("packages", []):
        wheel = best_wheel(platform, item.get("wheels") or [])
        if wheel is None:
            missing.append(str(item.get("name")))
            continue
        url = str(wheel.get("url") or "")
        if not url and wheel.get("path"):
            url = Path(str(wheel["path"])).resolve().as_uri()
        sha = str((wheel.get("hashes") or {}).get("sha256") or "")
        packages.append(Pinned(str(item.get("name")), str(item.get("version")),
                               url.rsplit("/", 1)[-1].split("#")[0], url, sha))
    return _checked(packages, missing)


async def _resolve_with_uv(uv: str, platform: Platform, reqs: Sequence[str]) -> list[Pinned]:
    status, err, pylock = await _uv_compile(uv, platform, reqs, offline=False)
    if status != 0:
        log.info("resolving from the index with uv failed (%s); trying the cached wheels", err)
        status, _, pylock = await _uv_compile(uv, platform, reqs, offline=True)
    if status != 0:
        raise _unresolved(platform, reqs, err)
    return _pins_from_pylock(platform, pylock)


# -- the lock ----------------------------------------------------------------------------------

async def lock_for(platform: Platform, on_step: OnStep | None = None,
                   requirements: Sequence[str] | None = None) -> Lock:
    """The lock for ``platform``: from the cache, else resolved (index, then cached wheels),
    with uv where one runs here, else with pip (one line says so)."""
    reqs = list(requirements or tether_requirements())
    key = lock_key(platform, reqs)
    found = read_lock(key)
    if found is not None:
        return found
    uv, why = _uv_or_why(platform)
    if not uv and on_step is not None:
        on_step({"event": "step", "key": "resolver", "state": "done", "seconds": 0.0,
                 "label": f"resolving with pip, slower: {why}"})
    label = f"resolving packages for {platform.describe} (laptop, {'uv' if uv else 'pip'})"
    with _Step(on_step, "resolve", label):
        packages = await (_resolve_with_uv(uv, platform, reqs) if uv
                          else _resolve_with_pip(platform, reqs))
        lock = Lock(key, platform.describe, tuple(reqs), tuple(packages), time.time(),
                    "uv" if uv else "pip")
    _write_atomic(cache_dir() / "locks" / f"{key}.json",
                  json.dumps(lock.to_json(), indent=1).encode())
    return lock


def _last(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


# -- this laptop's own uv, for a remote it runs on ---------------------------------------------

@dataclass(frozen=True)
class LaptopUV:
    """The binary of the ``uv`` package installed here, zlib-compressed into the cache (about
    as large as uv's wheel): what a laptop sends a remote it runs on instead of downloading
    uv's wheel for it."""

    version: str
    path: Path
    sha256: str  # of the compressed file, checked as it arrives
    binary_sha256: str  # of the binary, checked once unpacked

    @property
    def file(self) -> str:
        return self.path.name


def laptop_uv(platform: Platform) -> LaptopUV | None:
    """This laptop's uv where its wheel's platform tag is one the remote accepts and the
    binary matches its RECORD; else None (the remote fetches uv, or gets its wheel)."""
    try:
        dist = metadata.distribution(UV)
        accepted = set(platform.platform_tags())
    except (metadata.PackageNotFoundError, LaptopIndexError, ValueError):
        return None
    tags = [line.split(":", 1)[1].strip().rsplit("-", 1)[-1]
            for line in (dist.read_text("WHEEL") or "").splitlines() if line.startswith("Tag:")]
    entry = next((f for f in dist.files or () if f.name == UV and "bin" in f.parts[:-1]), None)
    if entry is None or entry.hash is None or not accepted.intersection(tags):
        return None
    binary = Path(str(dist.locate_file(entry)))
    try:
        digest = file_sha256(binary)
    except OSError:
        return None
    record = base64.urlsafe_b64encode(bytes.fromhex(digest)).rstrip(b"=").decode()
    if record != entry.hash.value:
        log.info("%s does not match uv's RECORD: not sent", binary)
        return None
    packed = cache_dir() / "uv-bin" / f"uv-{dist.version}-{digest[:16]}.deflate"
    try:
        if not packed.is_file():
            _compress(binary, packed)
        return LaptopUV(dist.version, packed, file_sha256(packed), digest)
    except OSError as e:  # a full or read-only cache: the remote gets uv another way
        log.warning("cannot pack %s into %s: %s", binary, packed, e)
        return None


def _compress(source: Path, dest: Path) -> None:
    """``source`` as one raw deflate stream, its pieces compressed on every core at once (as
    pigz does: each piece ends on a byte boundary, so they join into one stream)."""
    data = source.read_bytes()
    pieces = [data[at:at + PIECE] for at in range(0, len(data), PIECE)] or [b""]

    def deflate(i: int) -> bytes:
        packer = zlib.compressobj(1, zlib.DEFLATED, -15)  # 38 -> 17 MiB, ~1 CPU s in all
        last = i == len(pieces) - 1
        return packer.compress(pieces[i]) + packer.flush(zlib.Z_FINISH if last
                                                         else zlib.Z_SYNC_FLUSH)

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # zlib frees the GIL
        _write_atomic(dest, b"".join(pool.map(deflate, range(len(pieces)))))


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
