"""Resolving a remote's packages on the laptop, for a remote unlike the laptop.

Real resolutions: tether's own requirements against the index this machine reaches, and a small
index of wheels made here whose metadata differ by platform and Python version. Each lock is
checked against the packages' own metadata (read from the wheels, by HTTP range requests), with
``packaging`` as the independent judge of tags and markers.
"""

from __future__ import annotations

import asyncio
import email.parser
import io
import os
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from packaging import tags
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from tether import _wheels

pytestmark = pytest.mark.timeout(180)

# targets whose markers differ from this laptop's (CPython 3.11 on x86_64)
NEWER_PYTHON = _wheels.Platform("Linux", "x86_64", "glibc", "2.36", "3.13")
ARM = _wheels.Platform("Linux", "aarch64", "glibc", "2.31", "3.12")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(_wheels.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(_wheels.RESOLVER_ENV, raising=False)
    return tmp_path / "cache"


def environment(platform: _wheels.Platform) -> dict[str, str]:
    """PEP 508 marker values of the remote (what the laptop's own values must not replace)."""
    full = f"{platform.python}.0"
    return {"python_version": platform.python, "python_full_version": full,
            "implementation_name": "cpython", "implementation_version": full,
            "platform_python_implementation": "CPython", "platform_system": "Linux",
            "sys_platform": "linux", "os_name": "posix", "platform_machine": platform.machine,
            "platform_release": "", "platform_version": "", "extra": ""}


def supported(platform: _wheels.Platform) -> set[tags.Tag]:
    version = tuple(int(x) for x in platform.python.split("."))
    plats = platform.platform_tags()
    interpreter = f"cp{platform.python.replace('.', '')}"
    return {*tags.cpython_tags(version, [interpreter, "abi3", "none"], plats),
            *tags.compatible_tags(version, interpreter, plats)}


# -- a wheel's metadata, read where it lies ----------------------------------------------------

class RangeFile(io.RawIOBase):
    """A remote file, read by HTTP range requests of at least BLOCK bytes (zipfile needs only
    the end of a wheel and one entry: two requests for most)."""

    BLOCK = 1 << 16

    def __init__(self, url: str) -> None:
        self.url, self.pos, self.blocks = url, 0, list[tuple[int, bytes]]()
        self.size = 0
        self.size = self._fetch(f"-{self.BLOCK}")

    def _fetch(self, spec: str) -> int:
        req = urllib.request.Request(self.url, headers={"Range": f"bytes={spec}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            data: bytes = r.read()
            total = int(r.headers["Content-Range"].rsplit("/", 1)[1])
        start = int(r.headers["Content-Range"].split()[1].split("-")[0])
        self.blocks.append((start, data))
        return total

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = [offset, self.pos + offset, self.size + offset][whence]
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.size if n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        for start, data in self.blocks:
            if start <= self.pos and end <= start + len(data):
                out = data[self.pos - start:end - start]
                self.pos = end
                return out
        self._fetch(f"{self.pos}-{min(self.size, max(end, self.pos + self.BLOCK)) - 1}")
        return self.read(n)


def wheel_metadata(url: str) -> email.message.Message:
    raw: Any = open(url.removeprefix("file://"), "rb") if url.startswith("file://") \
        else RangeFile(url)
    with raw, zipfile.ZipFile(raw) as z:
        name = next(n for n in z.namelist()
                    if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        return email.parser.BytesParser().parsebytes(z.read(name))


def check_against_metadata(lock: _wheels.Lock, platform: _wheels.Platform) -> None:
    """The lock is exactly the closure of its requirements under the remote's markers, each
    version allowed by every requirement on it and each wheel installable there."""
    env, ok_tags = environment(platform), supported(platform)
    pinned = {canonicalize_name(p.name): p for p in lock.packages}
    for p in lock.packages:
        assert tags.parse_tag(p.file.removesuffix(".whl").split("-", 2)[2]) & ok_tags, \
            f"{p.file} does not install on {platform.describe}"
    with ThreadPoolExecutor(16) as pool:
        metas = dict(zip(pinned, pool.map(wheel_metadata, [p.url for p in pinned.values()])))
    reached: set[tuple[str, str]] = set()
    todo = [(Requirement(r), "") for r in lock.requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({**env, "extra": extra}):
            continue
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req} (needed on {platform.describe}) is not in the lock"
        assert req.specifier.contains(pinned[name].version, prereleases=True), \
            f"{pinned[name].pin} does not satisfy {req}"
        meta = metas[name]
        requires_python = SpecifierSet(meta.get("Requires-Python") or "")
        assert requires_python.contains(env["python_full_version"]), (name, requires_python)
        for extra_wanted in ["", *sorted(req.extras)]:
            if (name, extra_wanted) not in reached:
                reached.add((name, extra_wanted))
                todo += [(Requirement(r), extra_wanted) for r in meta.get_all("Requires-Dist")
                         or []]
    names = {n for n, _ in reached}
    assert names == set(pinned), f"in the lock but not needed: {set(pinned) - names}"


def resolve(platform: _wheels.Platform, requirements: list[str] | None = None,
            events: list[dict[str, Any]] | None = None) -> _wheels.Lock:
    on_step = events.append if events is not None else None
    return asyncio.run(_wheels.lock_for(platform, on_step, requirements))


# -- uv's names for a remote -------------------------------------------------------------------

@pytest.mark.parametrize(("platform", "name"), [
    (("x86_64", "glibc", "2.36", "3.11"), "x86_64-manylinux_2_36"),
    (("x86_64", "glibc", "2.29", "3.11"), "x86_64-manylinux_2_28"),  # uv names no 2_29
    (("x86_64", "glibc", "2.45", "3.12"), "x86_64-manylinux_2_40"),
    (("aarch64", "glibc", "2.17", "3.12"), "aarch64-manylinux_2_17"),
    (("aarch64", "musl", "1.2", "3.12"), "aarch64-unknown-linux-musl"),
    (("x86_64", "musl", "1.1", "3.11"), None),  # uv's musl takes musllinux_1_2 wheels
    (("x86_64", "glibc", "2.12", "3.11"), None),
    (("ppc64le", "glibc", "2.36", "3.11"), None),
])
def test_uv_platform_is_the_newest_uv_names_that_the_remote_accepts(
        platform: tuple[str, str, str, str], name: str | None) -> None:
    assert _wheels.Platform("Linux", *platform).uv_platform() == name


def test_pip_index_settings_follow_pip(tmp_path: Path) -> None:
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nindex-url = https://mirror.example/simple\n"
                    "extra-index-url = file:///a/simple file:///b/simple\ntrusted-host = m.example\n"
                    "[install]\nfind-links = /nonexistent\n")
    env = {"HOME": str(tmp_path / "home"), "XDG_CONFIG_DIRS": str(tmp_path / "none"),
           "PIP_CONFIG_FILE": str(conf)}
    settings = _wheels.pip_index_settings(env)
    args = _wheels.uv_index_args(settings)
    assert args[:2] == ["--index-strategy", "unsafe-best-match"]  # every index, as pip does
    assert "--index-url https://mirror.example/simple --extra-index-url file:///a/simple " \
           "--extra-index-url file:///b/simple --allow-insecure-host m.example" in " ".join(args)
    assert "--find-links" not in args  # a folder that is not there
    over = _wheels.pip_index_settings({**env, "PIP_EXTRA_INDEX_URL": ""})
    assert "--extra-index-url" not in _wheels.uv_index_args(over)
    assert _wheels.pip_index_settings({**env, "PIP_CONFIG_FILE": os.devnull}) == {}


# -- tether's requirements, for remotes unlike this laptop -------------------------------------

@pytest.mark.parametrize("platform", [NEWER_PYTHON, ARM], ids=["python3.13", "aarch64-py3.12"])
def test_tether_lock_for_another_remote_matches_the_packages_metadata(
        cache: Path, platform: _wheels.Platform) -> None:
    events: list[dict[str, Any]] = []
    lock = resolve(platform, events=events)
    assert [e["label"] for e in events if e["state"] == "done"] == \
        [f"resolving packages for {platform.describe} (laptop, uv)"]
    names = {canonicalize_name(p.name) for p in lock.packages}
    assert {"jupyter-server", "ipykernel", "psutil", "pyzmq", "uv"} <= names
    assert not names & {"pywin32", "appnope", "exceptiongroup", "pywinpty"}
    native = {canonicalize_name(p.name): p.file for p in lock.packages}
    assert platform.machine in native["psutil"] and platform.machine in native["uv"]
    check_against_metadata(lock, platform)
    assert _wheels.read_lock(lock.key) == lock  # cached per platform and Python


# -- an index made here, whose metadata differ by platform and Python ------------------------

def make_wheel(folder: Path, name: str, tag: str = "py3-none-any",
               requires: tuple[str, ...] = ()) -> None:
    dist = f"{name.replace('-', '_')}-1.0"
    meta = "\n".join(["Metadata-Version: 2.1", f"Name: {name}", "Version: 1.0",
                      *(f"Requires-Dist: {r}" for r in requires)]) + "\n"
    with zipfile.ZipFile(folder / f"{dist}-{tag}.whl", "w") as z:
        z.writestr(f"{dist}.dist-info/METADATA", meta)
        z.writestr(f"{dist}.dist-info/WHEEL", f"Wheel-Version: 1.0\nTag: {tag}\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")


@pytest.fixture
def probe_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path) -> Path:
    folder = tmp_path / "index"
    folder.mkdir()
    make_wheel(folder, "probe", requires=(
        'probe-arm ; platform_machine == "aarch64"', 'probe-new ; python_version >= "3.12"',
        'probe-old ; python_version < "3.12"', 'probe-win ; sys_platform == "win32"',
        'probe-mac ; platform_system == "Darwin"', "probe-native"))
    for name in ("probe-arm", "probe-new", "probe-old", "probe-win", "probe-mac"):
        make_wheel(folder, name)
    for tag in ("cp311-cp311-manylinux_2_17_x86_64", "cp313-cp313-manylinux_2_28_aarch64",
                "cp313-cp313-manylinux_2_17_aarch64", "cp312-abi3-manylinux_2_17_aarch64",
                "py3-none-any"):
        make_wheel(folder, "probe-native", tag)
    for key, value in {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1",
                       "PIP_FIND_LINKS": str(folder)}.items():
        monkeypatch.setenv(key, value)
    return folder


@pytest.mark.parametrize(("platform", "deps", "native"), [
    (_wheels.Platform("Linux", "aarch64", "glibc", "2.31", "3.13"),
     {"probe-arm", "probe-new"}, "cp313-cp313-manylinux_2_28_aarch64"),
    (_wheels.Platform("Linux", "aarch64", "glibc", "2.17", "3.13"),
     {"probe-arm", "probe-new"}, "cp313-cp313-manylinux_2_17_aarch64"),
    (_wheels.Platform("Linux", "aarch64", "glibc", "2.28", "3.12"),
     {"probe-arm", "probe-new"}, "cp312-abi3-manylinux_2_17_aarch64"),
    (_wheels.Platform("Linux", "x86_64", "glibc", "2.36", "3.13"), {"probe-new"}, "py3-none-any"),
    (_wheels.Platform("Linux", "x86_64", "glibc", "2.36", "3.11"),
     {"probe-old"}, "cp311-cp311-manylinux_2_17_x86_64"),
], ids=["arm-py3.13", "arm-glibc2.17", "arm-abi3", "x86-py3.13", "x86-py3.11"])
def test_markers_and_wheels_are_the_remotes(probe_index: Path, platform: _wheels.Platform,
                                            deps: set[str], native: str) -> None:
    lock = resolve(platform, ["probe"])
    files = {canonicalize_name(p.name): p.file for p in lock.packages}
    assert set(files) == {"probe", "probe-native", *deps}
    assert files["probe-native"] == f"probe_native-1.0-{native}.whl"
    check_against_metadata(lock, platform)
    for p in lock.packages:
        assert p.url == (probe_index / p.file).as_uri()
        assert p.sha256 == _wheels.file_sha256(probe_index / p.file)


def test_pip_resolves_where_uv_is_not_used_and_says_so(
        probe_index: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pip's resolver (markers from this laptop: right for a remote like it) gives the lock uv
    gives, and one line says that pip resolved."""
    platform = _wheels.Platform("Linux", "x86_64", "glibc", "2.36", "3.11")
    with_uv = resolve(platform, ["probe"])
    (Path(os.environ[_wheels.CACHE_ENV]) / "locks" / f"{with_uv.key}.json").unlink()
    monkeypatch.setenv(_wheels.RESOLVER_ENV, "pip")
    events: list[dict[str, Any]] = []
    with_pip = resolve(platform, ["probe"], events)
    labels = [e["label"] for e in events if e["state"] == "done"]
    assert labels == [f"resolving with pip, slower: {_wheels.RESOLVER_ENV}=pip",
                      f"resolving packages for {platform.describe} (laptop, pip)"]

    def files(lock: _wheels.Lock) -> set[tuple[str, str, str]]:
        return {(p.file, p.url, p.sha256) for p in lock.packages}
    assert files(with_pip) == files(with_uv)


def test_best_wheel_prefers_what_the_remote_would_install() -> None:
    platform = _wheels.Platform("Linux", "x86_64", "glibc", "2.36", "3.12")
    wheels = [{"url": f"https://x/w-1.0-{t}.whl"} for t in (
        "py3-none-any", "cp310-abi3-manylinux2014_x86_64.manylinux_2_17_x86_64",
        "cp312-cp312-manylinux_2_17_x86_64", "cp312-cp312-manylinux_2_28_x86_64")]
    best = _wheels.best_wheel(platform, wheels)
    assert best is not None and best["url"].endswith("cp312-cp312-manylinux_2_28_x86_64.whl")
    ranks = platform.tag_ranks()
    assert {tags.Tag(*t) for t in ranks} <= supported(platform) | {
        tags.Tag("cp312", "none", "any")}

