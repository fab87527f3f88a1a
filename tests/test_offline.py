"""Cold preparation against real sshd: uv from the index, the pip fallback, an air-gapped host.

The air-gapped host is an sshd in a network namespace that has only a loopback interface,
reached through a ProxyCommand relay running in that namespace; its user (``tether-airgap``)
gets a home that has never seen tether before each test. The laptop side is this process's
machine, which reaches the package index (it resolves and caches the wheels).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

from tests.fixtures_ssh import UpProcess
from tests.sshd import Airgap, SSHBed, free_port, in_netns, start_airgap
from tether import __version__, _wheels
from tether.replay import ColabClient

pytestmark = pytest.mark.timeout(600)

COLD_DEADLINE = 300.0
ENV = f"env-{__version__}"


@pytest.fixture(scope="module")
def airgap(testbed: SSHBed) -> Iterator[Airgap]:
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2 (ip netns)")
    try:
        gap = start_airgap(testbed)
    except (subprocess.CalledProcessError, RuntimeError) as e:
        pytest.skip(f"cannot make a network namespace here: {e}")
    try:
        yield gap
    finally:
        tether(gap, "down", "airgap")
        tether(gap, "down", "airgap-online")
        gap.stop()


def argv(gap: Airgap, command: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "tether", command, *args, "-F", str(gap.config)]


def tether(gap: Airgap, command: str, *args: str,
           timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv(gap, command, *args), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def cold_up(gap: Airgap, host: str, *args: str) -> UpProcess:
    """A cold ``tether up HOST --json`` until its URL line; stopped; (process, its stderr)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv(gap, "up", host, "--json", "--port", str(free_port()), *args),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    up = UpProcess(proc)
    assert proc.stdout is not None
    line = ""
    if select.select([proc.stdout], [], [], COLD_DEADLINE)[0]:
        line = proc.stdout.readline()
    up.seconds = time.monotonic() - t0
    if line:
        up.info = json.loads(line)
    return up


def finish(up: UpProcess) -> str:
    up.stop()
    return up.stderr()


def marker(gap: Airgap) -> dict:
    return json.loads((gap.tether_root / ENV / "tether-env.json").read_text())


def lock_pins(key: str) -> dict[str, str]:
    lock = _wheels.read_lock(key)
    assert lock is not None, f"no lock {key} in {_wheels.cache_dir()}"
    return {p.name: p.version for p in lock.installs}


async def runs_code(up: UpProcess) -> None:
    async with ColabClient(up.url, up.token) as c:
        session = await c.create_session("offline.ipynb")
        reply = await c.execute(session["kernel"]["id"], "6 * 7")
        assert reply.result == "42"


def fake_old_env(gap: Airgap) -> Path:
    """An environment as an older tether left it (prepared earlier, no server runs from it)."""
    old = gap.tether_root / "env-0.0.1"
    old.mkdir(parents=True)
    (old / "tether-env.json").write_text(json.dumps({"version": "0.0.1", "created": 1.0}))
    for path in (gap.home / ".cache", gap.tether_root, old, old / "tether-env.json"):
        os.chown(path, gap.user.pw_uid, gap.user.pw_gid)
    return old


def assert_uv_cache_is_tethers(gap: Airgap) -> None:
    """uv's cache is tether's own, under its root; the user's ~/.cache/uv is never made."""
    cache = gap.tether_root / "uv-cache"
    assert cache.is_dir() and any(cache.iterdir()), "uv's cache is not under tether's root"
    assert not (gap.home / ".cache" / "uv").exists(), "tether wrote to the user's uv cache"
    log = (gap.tether_root / "install.log").read_text()
    assert "--compile-bytecode" in log or len(os.sched_getaffinity(0)) < 4


def assert_sent_own_uv(gap: Airgap, m: dict) -> None:
    """The laptop's own uv ran the install (no uv wheel downloaded, here or there), and the lock
    its uv resolved went in as it stands: not resolved again, no uv package in the env."""
    log = (gap.tether_root / "install.log").read_text()
    assert "--no-deps -r" in log, log[-2000:]
    assert m["uv"] == str(gap.tether_root / "uv" / metadata.version("uv") / "uv")
    assert not list((gap.tether_root / ENV).glob("lib/python*/site-packages/uv")), \
        "the uv package was installed into tether's environment"


def assert_later_installed(gap: Airgap, m: dict) -> None:
    """jedi and parso, left out before the server's start, are installed after it (in the
    background, by uv; bounded wait), pinned as the lock says."""
    assert sorted(p.split("==")[0] for p in m["later"]) == ["jedi", "parso"], m
    site = next((gap.tether_root / ENV / "lib").glob("python*/site-packages"))
    infos = [site / ("%s-%s.dist-info" % tuple(p.split("=="))) for p in m["later"]]
    deadline = time.monotonic() + 120
    while not all(i.is_dir() for i in infos) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(i.is_dir() for i in infos), (gap.tether_root / "install.log").read_text()[-2000:]
    assert "tether-later.txt" in (gap.tether_root / "install.log").read_text()


def left_in_home(gap: Airgap) -> list[str]:
    """Every path under the home that /etc/skel did not put there."""
    skel = {str(p.relative_to("/etc/skel")) for p in Path("/etc/skel").rglob("*")}
    return sorted(str(p.relative_to(gap.home)) for p in gap.home.rglob("*")
                  if str(p.relative_to(gap.home)) not in skel)


PINS: dict[str, dict[str, str]] = {}


async def test_cold_up_with_uv(airgap: Airgap) -> None:
    airgap.reset_home()
    old = fake_old_env(airgap)
    up = cold_up(airgap, "airgap-online")
    try:
        assert up.info, finish(up)
        await runs_code(up)
    finally:
        err = finish(up)
    assert "with uv from the index" in err, err
    assert "creating the environment (uv)" in err
    m = marker(airgap)
    assert (m["installer"], m["source"]) == ("uv", "index")
    assert m["pins"] == lock_pins(m["lock"]) and "jupyter_server" in {k.replace("-", "_")
                                                                      for k in m["pins"]}
    assert not old.exists(), "the older environment was not removed"
    assert_uv_cache_is_tethers(airgap)
    assert_sent_own_uv(airgap, m)
    assert_later_installed(airgap, m)
    PINS["uv"] = m["pins"]
    print(f"cold up with uv: {up.seconds:.1f} s")
    assert up.seconds < 120


async def test_pip_fallback_where_uv_cannot_run(airgap: Airgap) -> None:
    """uv's folder on a noexec mount: the kernel refuses to run it, so pip installs."""
    airgap.reset_home()
    with airgap.uv_cannot_run():
        up = cold_up(airgap, "airgap-online")
        try:
            assert up.info, finish(up)
        finally:
            err = finish(up)
        assert tether(airgap, "down", "airgap-online").returncode == 0
    assert "with pip from the index" in err, err
    assert "creating the environment (pip)" in err
    m = marker(airgap)
    assert m["installer"] == "pip"
    assert "uv cannot run here" in (airgap.tether_root / "install.log").read_text()
    if "uv" in PINS:
        assert m["pins"] == PINS["uv"], "pip and uv installed different versions"
    print(f"cold up with pip: {up.seconds:.1f} s")


async def test_airgapped_host_prepared_from_the_laptop(airgap: Airgap) -> None:
    # the namespace has no route and no interface but lo: nothing there reaches an index
    assert in_netns(airgap.netns, "ip", "-o", "route", "show").stdout.strip() == ""
    links = in_netns(airgap.netns, "ip", "-o", "link", "show").stdout.strip().splitlines()
    assert [line.split(":")[1].strip() for line in links] == ["lo"]
    reach = in_netns(airgap.netns, "python3", "-c",
                     "import socket; socket.create_connection(('pypi.org', 443), 3)")
    assert reach.returncode != 0
    airgap.reset_home()
    up = cold_up(airgap, "airgap")
    try:
        assert up.info, finish(up)
        await runs_code(up)
    finally:
        err = finish(up)
    assert "airgap reaches no package index" in err, err
    assert "from the laptop's wheels (offline)" in err
    m = marker(airgap)
    assert (m["installer"], m["source"]) == ("uv", "laptop")
    assert m["pins"] == lock_pins(m["lock"])
    if "uv" in PINS:
        assert m["pins"] == PINS["uv"]
    log = (airgap.tether_root / "install.log").read_text()
    installs = [line for line in log.splitlines() if line.startswith("$ ") and " install " in line]
    assert installs and all("--no-index" in line and "--offline" in line for line in installs)
    assert_uv_cache_is_tethers(airgap)
    assert_sent_own_uv(airgap, m)
    assert_later_installed(airgap, m)
    print(f"cold up, air-gapped: {up.seconds:.1f} s")

    # the kernel's own Python gets ipykernel and psutil the same way (offline, pinned)
    venv = airgap.home / "kenv"
    subprocess.run(["su", "-", airgap.user.pw_name, "-c",
                    f"/usr/bin/python3 -m venv --without-pip {venv}"], check=True, timeout=60)
    assert tether(airgap, "down", "airgap").returncode == 0
    up = cold_up(airgap, "airgap", "--kernel-python", str(venv / "bin" / "python"),
                    "--install-kernel-deps")
    try:
        assert up.info, finish(up)
        await runs_code(up)
    finally:
        err = finish(up)
    assert f"installing ipykernel and psutil into {venv}/bin/python with uv from the " \
           "laptop's wheels (offline)" in err, err
    check = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import ipykernel, psutil; print(ipykernel.__version__)"],
                           capture_output=True, text=True, timeout=60)
    assert check.stdout.strip() == m["pins"]["ipykernel"]


def test_doctor_says_whether_the_host_reaches_the_index(airgap: Airgap) -> None:
    """The same bounded connect a cold `up` makes: the air-gapped host is told apart."""
    for host, want in (("airgap", "no index: the laptop will send the wheels (offline "
                                  "preparation); airgap cannot reach "),
                       ("airgap-online", "airgap-online reaches the index (")):
        doctor = tether(airgap, "doctor", host, "--json", "--port", str(free_port()))
        checks = [c for c in json.loads(doctor.stdout)]
        names = [c["name"] for c in checks]
        assert names.index("environment") < names.index("index") < names.index("local port")
        index = checks[names.index("index")]
        assert index["ok"] and index["detail"].startswith(want), (host, index)
    text = tether(airgap, "doctor", "airgap", "--port", str(free_port())).stdout
    assert "✓ index: no index: the laptop will send the wheels (offline preparation)" in text


def test_status_shows_disk_and_down_purge_removes_envs(airgap: Airgap) -> None:
    status = tether(airgap, "status", "airgap")
    assert status.returncode == 0, status.stderr
    assert f"MiB used under {airgap.tether_root} (1 environment: {ENV})" in status.stdout
    down = tether(airgap, "down", "airgap", "--purge")
    assert down.returncode == 0, down.stderr
    assert "nothing of tether's is left there" in down.stderr, down.stderr
    # nothing of tether's under the home: its root (envs, uv, uv's cache, wheels, logs,
    # runtime, kernelspecs) is gone, and the user's own uv cache was never made
    assert not airgap.tether_root.exists()
    left = left_in_home(airgap)
    print("left in the home after down --purge:", sorted({p.split("/")[0] for p in left}))
    assert not [p for p in left if "tether" in p or p.startswith(".cache/uv")], left
    # what is left is the user's: ~/.cache (now empty), IPython's history of the kernels run
    # (~/.ipython), and the venv this test made for --kernel-python (tether installed ipykernel
    # there only on request), and jupyter_core's marker that it found no old IPython config
    # to migrate (~/.jupyter/migrated, written by any Jupyter app once ~/.ipython exists)
    assert not any((airgap.home / ".cache").iterdir())
    assert {p.split("/")[0] for p in left} <= {".cache", ".ipython", ".jupyter", "kenv"}, \
        sorted({p.split("/")[0] for p in left})
    assert [p for p in left if p.startswith(".jupyter")] in ([], [".jupyter", ".jupyter/migrated"])
    after = tether(airgap, "status", "airgap", "--json")
    assert json.loads(after.stdout)["envs"] == []


def test_platform_tags_follow_the_remotes_libc_and_python() -> None:
    """What pip is told about a remote: every tag its libc accepts, its Python and ABI."""
    glibc = _wheels.Platform("Linux", "x86_64", "glibc", "2.28", "3.12")
    tags = glibc.platform_tags()
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_29_x86_64" not in tags
    assert {"manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"} <= set(tags)
    args = glibc.pip_args()
    assert args[args.index("--python-version") + 1] == "3.12" and "cp312" in args
    old = _wheels.Platform("Linux", "aarch64", "glibc", "2.12", "3.9")
    assert "manylinux2014_aarch64" not in old.platform_tags()
    musl = _wheels.Platform("Linux", "x86_64", "musl", "1.2", "3.11").platform_tags()
    assert musl == ["musllinux_1_2_x86_64", "musllinux_1_1_x86_64", "musllinux_1_0_x86_64"]
    assert _wheels.lock_key(glibc, ["a"]) != _wheels.lock_key(old, ["a"])
    with pytest.raises(_wheels.LaptopIndexError):
        _wheels.Platform("Darwin", "arm64", "", "", "3.11").platform_tags()


@pytest.mark.parametrize("resolver", ["uv", "pip"])
def test_a_laptop_without_index_or_cache_names_what_to_download(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, resolver: str) -> None:
    """No index (pip pointed at an empty one, no network allowed) and an empty cache: one
    error whose hint is the pip download to run elsewhere and the folder for its files."""
    import asyncio
    monkeypatch.setenv(_wheels.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(_wheels.RESOLVER_ENV, resolver)
    empty = tmp_path / "index"
    empty.mkdir()
    monkeypatch.setenv("PIP_INDEX_URL", empty.as_uri())
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    platform = _wheels.Platform("Linux", "x86_64", "glibc", "2.36", "3.11")
    with pytest.raises(_wheels.LaptopIndexError) as e:
        asyncio.run(_wheels.lock_for(platform, requirements=["click>=8.1", "uv"]))
    assert "could not resolve the packages for a remote (linux x86_64 glibc 2.36, Python 3.11)" \
        in e.value.message
    hint = e.value.hint
    assert hint.startswith("On a machine that reaches a package index, run `pip download -d ")
    assert f"put the files in {tmp_path / 'cache' / 'wheels'}" in hint
    assert "--platform manylinux_2_36_x86_64" in hint and "'click>=8.1' uv`" in hint
    assert not (tmp_path / "cache" / "locks").exists()  # nothing half-written


def test_offline_flag_prepares_a_host_that_has_an_index_from_the_laptop(airgap: Airgap) -> None:
    airgap.reset_home()
    up = cold_up(airgap, "airgap-online", "--offline")
    try:
        assert up.info, finish(up)
    finally:
        err = finish(up)
    assert "reaches no package index" not in err  # asked for, not detected
    assert "with uv from the laptop's wheels (offline)" in err, err
    assert (marker(airgap)["source"], marker(airgap)["installer"]) == ("laptop", "uv")
    assert tether(airgap, "down", "airgap-online", "--purge").returncode == 0
