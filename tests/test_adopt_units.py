"""What a later server adopts, and what it never does (tether/remote/adopt.py), with real
processes but no server."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from tether import identity
from tether.contract import RestartResult, ServerInfo
from tether.remote import adopt
from tether.remote.sweep import KERNEL_ID_ENV, MARKER_ENV

KID = "0b9e4a52-57a3-4c59-9a53-3f2b6c1d7e80"


@pytest.fixture
def kernel() -> Iterator[subprocess.Popen[bytes]]:
    """A stand-in kernel: a process started with a kernel's marker and id."""
    proc = subprocess.Popen(["sleep", "600"], env={**os.environ, MARKER_ENV: "m1",
                                                    KERNEL_ID_ENV: KID})
    yield proc
    proc.kill()
    proc.wait(10)


def kept_for(proc: subprocess.Popen[bytes], **changes: object) -> adopt.KeptKernel:
    kept = adopt.KeptKernel(KID, "python3", proc.pid, identity.started(psutil.Process(proc.pid)),
                            identity.boot_id(), "m1", instance="1.2.3", owner="1.2.3",
                            connection={"transport": "ipc", "key": "k"},
                            sessions=({"session_id": "s1", "path": "a.ipynb", "name": "a",
                                       "type": "notebook"},))
    return replace(kept, **changes)  # type: ignore[arg-type]


def test_a_kept_kernel_survives_its_file(tmp_path: Path, kernel: subprocess.Popen[bytes]) -> None:
    kept = kept_for(kernel)
    adopt.write(str(tmp_path), kept)
    path = tmp_path / adopt.KERNELS_DIR / f"{KID}.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / adopt.KERNELS_DIR).stat().st_mode & 0o777 == 0o700
    assert adopt.read(str(tmp_path), KID) == kept and kept.label == "a.ipynb"
    adopt.update(str(tmp_path), KID, sessions=())
    assert adopt.read_all(str(tmp_path)) == [replace(kept, sessions=())]
    assert replace(kept, sessions=()).label == KID[:8]


def test_only_the_recorded_process_with_its_marker_is_verified(
        kernel: subprocess.Popen[bytes]) -> None:
    uid = os.getuid()
    assert adopt.verify(kept_for(kernel), uid) is not None
    assert adopt.verify(kept_for(kernel, marker="other"), uid) is None
    assert adopt.verify(kept_for(kernel, kernel_id=KID[::-1]), uid) is None
    assert adopt.verify(kept_for(kernel, started=1.0), uid) is None, "a reused pid"
    assert adopt.verify(kept_for(kernel, boot_id="another-boot"), uid) is None
    me = kept_for(kernel, pid=os.getpid(), started=identity.started(psutil.Process()))
    assert adopt.verify(me, uid) is None, "a process of this user without the marker"
    assert adopt.verify(kept_for(kernel), uid + 1) is None, "not this user's"


def test_claim_takes_the_live_kernels_of_gone_servers_once(tmp_path: Path,
                                                         kernel: subprocess.Popen[bytes]) -> None:
    runtime = str(tmp_path)
    dead = subprocess.Popen(["sleep", "600"], env={**os.environ, MARKER_ENV: "m2"})
    gone = kept_for(dead, kernel_id="dead-kernel", marker="m2")
    dead.kill()
    dead.wait(10)
    adopt.write(runtime, kept_for(kernel))
    adopt.write(runtime, gone)
    adopt.write(runtime, kept_for(kernel, kernel_id="of-a-live-server", owner="live"))

    found = adopt.claim(runtime, "new", os.getuid(), lambda owner: owner == "live")
    assert [k.kernel_id for k in found.adopt] == [KID] and found.adopt[0].owner == "new"
    assert [k.kernel_id for k in found.lost] == ["dead-kernel"]
    assert sorted(k.kernel_id for k in adopt.read_all(runtime)) == [KID, "of-a-live-server"]
    again = adopt.claim(runtime, "new", os.getuid(), lambda owner: owner == "live")
    assert again.adopt == [] and again.lost == [], "adopted and lost ones are said once"


def test_an_adopted_process_is_polled_and_signalled_through_psutil(
        kernel: subprocess.Popen[bytes]) -> None:
    proc = adopt.AdoptedProcess(psutil.Process(kernel.pid))
    assert proc.poll() is None
    proc.kill()
    kernel.wait(10)  # (the test is its parent: reaped here)
    assert proc.wait(5) is not None and proc.poll() is not None
    with pytest.raises(ProcessLookupError):
        proc.terminate()


def test_restart_result_names_the_kernels_that_did_not_come_back() -> None:
    server = ServerInfo(1, "t" * 48, sock="/s", adopted=("k1",), lost=("b.ipynb",))
    result = RestartResult(server, (7,), "0.1.0", ("k1", "k2-long-id"))
    assert result.kept == ("k1",) and result.lost == ("b.ipynb", "k2-long-")


def test_kernels_fate_after_a_new_server() -> None:
    from tether.session import Runtime, kernels_fate

    old = ServerInfo(1, "t" * 48, sock="/s")
    runtime = Runtime("gpubox", 9999, old, True)
    runtime.seen.update({"k1": "train.ipynb", "k2": ""})
    new = replace(old, pid=2, adopted=("k1",), lost=("k2"[:8],))
    assert kernels_fate(runtime, new) == "its kernels kept running (train.ipynb); kernels lost: k2"
    assert kernels_fate(Runtime("gpubox", 9999, old, True), replace(old, pid=2)) == \
        "no kernel was running"


@pytest.mark.parametrize(("running", "laptop", "older"), [
    ("0.1.0", "0.2.0", True), ("0.2.0", "0.10.0", True), ("0.2.0", "0.2.0", False),
    ("0.3.0", "0.2.0", False), ("", "0.2.0", False), ("0.1.0+local", "0.1.1", True)])
def test_a_server_older_than_the_laptop_is_told(running: str, laptop: str, older: bool) -> None:
    from tether.host import older as is_older

    assert is_older(running, laptop) is older
