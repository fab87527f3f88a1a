"""The command line's own logic, no server: argument checks, kernel ids, errors across SSH."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from tether import errors
from tether.cli import kernels as cli_kernels
from tether.errors import ConfigError, HostUnreachableError, KernelNotFoundError, TetherError
from tether.kernels import RemoteKernels, resolve


def tether(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tether", *args], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=60)


def test_resolve_by_prefix_or_notebook():
    kernels = [{"id": "abcd-1", "path": "a.ipynb"}, {"id": "abce-2", "path": "b.ipynb"}]
    assert resolve(["abcd", "b.ipynb"], kernels) == ["abcd-1", "abce-2"]
    with pytest.raises(KernelNotFoundError, match="2 kernels match 'abc'"):
        resolve(["abc"], kernels)
    with pytest.raises(KernelNotFoundError) as caught:
        resolve(["nosuchkernel"], kernels)
    assert caught.value.exit_code == 2


def test_idle_is_human():
    now = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
    ago = (now - timedelta(seconds=7325)).isoformat().replace("+00:00", "Z")
    assert cli_kernels.idle_for(ago, now) == "2h02m"
    assert cli_kernels.idle_for(None, now) == "-"


def test_error_and_hint_read_as_two_sentences():
    e = HostUnreachableError("cannot reach gpubox: Name or service not known",
                             hint="Check the host name.")
    assert str(e) == "cannot reach gpubox: Name or service not known. Check the host name."
    assert str(TetherError("done.", hint="Next.")) == "done. Next."


def test_an_error_keeps_its_class_across_the_hop():
    sent = errors.ServerNotFoundError("no server", hint="start one", host="h", pids=[1])
    back = errors.from_json(json.loads(json.dumps(sent.to_json())))
    assert type(back) is errors.ServerNotFoundError
    assert (back.message, back.hint, back.data) == ("no server", "start one",
                                                     {"host": "h", "pids": [1]})
    assert errors.from_json({"kernels": []}) is None
    unknown = errors.from_json({"error": {"type": "NoSuchClass", "message": "m"}})
    assert type(unknown) is TetherError


async def test_remote_kernels_run_the_remote_tether_with_json():
    calls = []

    async def runner(args):
        calls.append(args)
        return 3, '{"released": false, "kernels": []}\n'

    result = await RemoteKernels("gpubox", runner).release(["k1"], False, True, False)
    assert calls == [["release", "--json", "k1", "--force"]]
    assert result == {"released": False, "kernels": []}


async def test_a_remote_error_is_raised_here_as_the_same_class():
    async def no_server(args):
        return 1, json.dumps(errors.ServerNotFoundError("x", hint="tether serve").to_json())

    with pytest.raises(errors.ServerNotFoundError, match="no tether server is running on gpubox"
                                                         r".*tether up gpubox"):
        await RemoteKernels("gpubox", no_server).listing()

    async def not_found(args):
        return 2, json.dumps(KernelNotFoundError("no kernel matches 'zz'").to_json())

    with pytest.raises(KernelNotFoundError):
        await RemoteKernels("gpubox", not_found).release(["zz"], False, False, False)


@pytest.mark.parametrize("args, needle", [
    (["release"], "name the kernels to release, or give --all"),
    (["release", "abcd", "ef01", "--all"], "not both"),
    (["release", "abcd", "--stop-server"], "--stop-server goes with --all"),
])
def test_release_usage_mistakes_exit_2_with_one_line(args, needle):
    done = tether(*args)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], done.stderr


@pytest.mark.parametrize("names, host_option, here, everything, expected", [
    (("gpubox", "scratch.ipynb"), None, False, False, ("gpubox", ("scratch.ipynb",))),
    (("gpubox",), None, False, True, ("gpubox", ())),
    (("scratch.ipynb",), None, False, False, (None, ("scratch.ipynb",))),
    ((), None, False, True, (None, ())),
    (("a", "b"), None, True, False, (None, ("a", "b"))),
    (("a", "b"), "gpubox", False, False, ("gpubox", ("a", "b"))),  # -H: the earlier spelling
])
def test_release_reads_host_first_where_there_is_one(names, host_option, here, everything,
                                                     expected) -> None:
    from tether.cli.kernels import release_target

    assert release_target(names, host_option, here, everything) == expected


def test_json_errors_are_json(tmp_path):
    done = subprocess.run([sys.executable, "-m", "tether", "ps", "--json"], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                               "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt")})
    assert done.returncode == 1
    assert json.loads(done.stdout)["error"]["type"] == "ServerNotFoundError"
    assert "`tether ps HOST`" in done.stderr


def test_usage_errors_are_config_errors():
    assert issubclass(KernelNotFoundError, ConfigError) and ConfigError.exit_code == 2


@pytest.mark.parametrize("args, needle", [
    (["up", "gpubox", "--port", "0"], "--port 0: the local port must be between 1 and 65535"),
    (["up", "gpubox", "--port", "70000"], "--port 70000"),
    (["up", "a", "b", "--port", "65535"], "with 2 hosts, up to 65536"),
    (["up", "gpubox", "--remote-port", "-1"], "--remote-port -1"),
    (["up", "gpubox", "--origin", "https://*.example.com"], "invalid origin"),
    (["up", "gpubox", "--idle-timeout", "-5"], "--idle-timeout must be >= 0"),
    (["up", "gpubox", "--on-idle", "true"], "--on-idle needs --stop-after-idle"),
    (["up", "gpubox", "--kill-grace", "0"], "--kill-grace 0.0"),
    (["up", "gpubox", "--kernel-python", "/x", "--conda-env", "y"], "not both"),
    (["attach", "gpubox", "--port", "70000"], "70000 is not in the range"),
    (["doctor", "gpubox", "--port", "x"], "'x' is not a valid integer"),
    (["ps", "a", "-H", "b"], "two hosts given"),
    (["up", "--slurm"], "--slurm needs the cluster's login node"),
    (["up", "gpubox", "--gpus", "1"], "--gpus goes with --slurm"),
    (["up", "gpubox", "--node-access", "forward"], "--node-access goes with --slurm"),
    (["up", "gpubox", "--slurm", "--node-access", "sideways"], "'sideways' is not one of"),
    (["up", "gpubox", "--slurm", "--walltime-signal", "5"], "--walltime-signal 5"),
    (["up", "gpubox", "--slurm", "--gpus", "-1"], "-1 is not in the range"),
    (["ps", "--slurm"], "--slurm needs the login node"),
    (["up", "gpubox", "--forward", "tensorboard"], "expected REMOTE[:LOCAL]"),
    (["up", "gpubox", "--forward", "6006:0"], "ports go from 1 to 65535"),
    (["attach", "gpubox", "--forward", "6006:x"], "expected REMOTE[:LOCAL]"),
    (["up", "--forward", "6006"], "--forward needs a HOST"),
    (["up", "a", "b", "--forward", "6006"], "--forward with several hosts"),
    (["release", "a", "b", "--here", "-H", "c"], "--here and -H"),
    (["release", "gpubox", "a", "--all"], "not both"),
])
def test_bad_options_fail_before_any_ssh_with_one_line(args, needle):
    """Nothing is started: these fail in the argument checks (an unknown host would take ssh)."""
    done = tether(*args)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], done.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in done.stderr


def test_no_arguments_prints_the_help_not_an_error() -> None:
    done = tether()
    assert done.returncode == 2 and "error" not in (done.stdout + done.stderr).lower()
    assert done.stdout.startswith("Usage: tether") and "Commands:" in done.stdout


@pytest.mark.parametrize("where", [["-v", "ps", "--json"], ["ps", "-v", "--json"],
                                   ["ps", "--json", "-vv"]])
def test_verbose_goes_before_or_after_the_subcommand(tmp_path, where) -> None:
    done = subprocess.run([sys.executable, "-m", "tether", *where], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=60,
                          env={**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"),
                               "HOME": str(tmp_path)})
    assert "No such option" not in done.stderr, done.stderr
    assert json.loads(done.stdout)["error"]["type"] == "ServerNotFoundError", done.stdout


def test_status_line_drops_whole_fields_to_fit_never_digits() -> None:
    """At 80 columns the line was cut mid-field ("job 1" for job 12): now whole fields go, the
    least needed first, and the job id and time left stay."""
    from tether.cli.remote import status_line
    from tether.session import Live
    from tether.tunnel import State, Status

    live = Live(Status(State.RECONNECTING, reconnects=12, last_error="ssh: connect to host "
                       "login.cluster.example.org port 22: Connection timed out"),
                kernels=3, gpu_used=40_000 << 20, gpu_total=81_920 << 20)
    from tether.backends.slurm import duration

    info = {"job": "12345678", "left": f"{duration(3 * 3600 + 125, coarse=True)} left"}
    full = status_line("login.cluster.example.org", live, info, 10_000)
    fields = set(full.split(": ", 1)[1].split(" · "))
    assert {"job 12345678", "3 h 2 min left", "kernels 3", "reconnects 12"} <= fields, full
    for width in (120, 78, 66, 40):
        line = status_line("login.cluster.example.org", live, info, width)
        assert len(line) <= max(width, len("login.cluster.example.org: tunnel reconnecting"))
        shown = line.split(": ", 1)[1].split(" · ")
        assert set(shown) <= fields, line  # whole fields only
        assert "tunnel reconnecting" in shown, line
        assert ("job 12345678" in shown) == (width >= 66), line
    assert status_line("h", live, info, 78) != full  # something had to go at 78
    # --forward: each extra port on the line, the first to go when it is short
    forwarded = status_line("h", live, {**info, "forwards": ((16006, 6006),)}, 10_000)
    assert "6006→127.0.0.1:16006" in forwarded.split(" · "), forwarded
    assert "6006→" not in status_line("h", live, {**info, "forwards": ((16006, 6006),)}, 78)


@pytest.mark.parametrize("value", ["relative/cache", "~/cache", "/tmp/a\nb"])
@pytest.mark.parametrize("args", [["up", "gpubox"], ["attach", "gpubox"], ["status", "gpubox"],
                                  ["down", "gpubox"], ["doctor", "gpubox"],
                                  ["ps", "-H", "gpubox"], ["up", "login", "--slurm"]])
def test_a_bad_remote_cache_fails_before_any_ssh(args, value):
    done = subprocess.run([sys.executable, "-m", "tether", *args], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=60,
                          env={**os.environ, "TETHER_REMOTE_CACHE": value})
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: TETHER_REMOTE_CACHE={value!r}: "
                                                   "expected an absolute path"), done.stderr


def in_fresh_python(code: str) -> Any:
    """What ``code``, run in a new interpreter (nothing imported yet), prints as JSON."""
    return json.loads(subprocess.run([sys.executable, "-c", "import json, sys\n" + code],
                                     capture_output=True, text=True, check=True).stdout)


def test_serve_imports_neither_the_ssh_side_nor_rich() -> None:
    """Commands load lazily: every command is in the map, and `serve` pulls in only its own."""
    loaded, registered, mapped = in_fresh_python(
        "from tether.cli import COMMANDS, cli, load_commands\n"
        "cli.get_command(None, 'serve')\n"
        "loaded = sorted(sys.modules)\n"
        "load_commands()\n"
        "print(json.dumps([loaded, sorted(cli.commands), sorted(COMMANDS)]))\n")
    assert registered == mapped
    heavy = ("rich", "tether.session", "tether.bootstrap", "tether._ssh", "tether.tunnel",
             "tether._wheels", "tether.backends", "tether.cli.remote", "tether.cli.kernels")
    assert not [m for m in loaded if m.split(".")[0] == "rich" or m.startswith(heavy)]


def test_up_reaches_its_login_before_the_heavy_libraries_and_loads_them_meanwhile() -> None:
    """Everything `up` runs before its ControlMaster starts (the command, the backend, the
    session, the reporter) leaves tornado's HTTP client, rich, psutil and the package metadata
    unimported; `session.load`, run while ssh logs in, brings each of them in."""
    modules, before, after = in_fresh_python(
        "from tether.cli import cli\n"
        "cli.get_command(None, 'up')\n"
        "import tether.backends.direct, tether.backends.ssh, tether._master\n"
        "from tether import session\n"
        "from tether.cli.remote import ConsoleReporter\n"
        "modules = (*session.LOADED_LATE, *ConsoleReporter(as_json=True).modules)\n"
        "before = sorted(sys.modules)\n"
        "session.load(modules)\n"
        "print(json.dumps([modules, before, sorted(sys.modules)]))\n")
    heavy = ("tornado", "rich", "psutil", "importlib.metadata")
    assert not [m for m in before if m.startswith(heavy)]
    assert set(modules) <= set(after)
    assert {m.split(".")[0] for m in modules} >= {"tornado", "rich", "psutil", "importlib"}


def test_a_runtime_record_is_private_and_flags_win(tmp_path, monkeypatch) -> None:
    """What `up` records for a host: 0600, found again by host; an explicit --slurm or ssh
    options given now win over the recorded ones; a plain host leaves no record."""
    import stat as stat_mod

    from tether import runtimes

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    record = runtimes.RuntimeRecord("login", {"kind": "slurm", "job": "42"}, "/cfg", ("A=b",))
    runtimes.remember(record)
    path = next(tmp_path.glob("tether-local/runtime-*.json"))
    assert stat_mod.S_IMODE(path.stat().st_mode) == 0o600
    assert runtimes.recall("login") == record and runtimes.recall("other") is None
    assert runtimes.implied("login", False, None, ()) == (record, "/cfg", ("A=b",))
    assert runtimes.implied("login", False, "/mine", ()) == (record, "/mine", ())
    assert runtimes.implied("login", True, None, ()) == (None, None, ())  # --slurm given
    runtimes.remember(runtimes.RuntimeRecord("login", {}))  # a host runtime replaces it
    assert runtimes.recall("login") is None and not path.exists()
