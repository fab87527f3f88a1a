"""The local side of ``tether up`` without a network: argv, error mapping, wheel, backoff."""

from __future__ import annotations

import asyncio
import io
import json
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tether import _seed, _ssh, bootstrap, contract, tunnel
from tether.errors import AuthenticationError, ForeignListenerError, HostUnreachableError, SSHError


def test_argv_passes_config_and_options_through() -> None:
    t = _ssh.SSHTarget("gpubox", "/x/config", ("ProxyJump=bastion", "Port=2222"), ssh="ssh")
    argv = t.argv("-N", command=["echo", "a b", "$HOME"])
    assert argv[:7] == ["ssh", "-F", "/x/config", "-o", "ProxyJump=bastion", "-o", "Port=2222"]
    assert "BatchMode=yes" in argv  # not interactive: never hang on a hidden prompt
    assert argv[-3:-1] == ["--", "gpubox"]
    assert shlex.split(argv[-1]) == ["echo", "a b", "$HOME"]  # quoted for the remote shell
    assert "StrictHostKeyChecking" not in " ".join(argv)  # never turned off by tether


def test_interactive_leaves_prompts_to_ssh() -> None:
    assert "BatchMode=yes" not in _ssh.SSHTarget("h", interactive=True, ssh="ssh").argv()


@pytest.mark.parametrize(("status", "stderr", "kind"), [
    (255, b"ssh: connect to host 10.0.0.1 port 22: Connection refused", HostUnreachableError),
    (255, b"ssh: Could not resolve hostname nope: Name or service not known", HostUnreachableError),
    (255, b"me@h: Permission denied (publickey).", AuthenticationError),
    (255, b"Host key verification failed.", AuthenticationError),
    (1, b"Permission denied", SSHError),  # the remote command's own status, not ssh's
])
def test_error_mapping(status: int, stderr: bytes, kind: type) -> None:
    e = _ssh.ssh_error(_ssh.SSHTarget("h"), "true", status, stderr)
    assert type(e) is kind
    assert e.data["host"] == "h" and e.data["status"] == status
    assert stderr.decode().strip() in e.data["stderr"]


def test_every_remote_command_carries_the_remote_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    from tether.cli import make_target

    monkeypatch.setenv("TETHER_REMOTE_CACHE", "/scratch/u 1")
    t = make_target("gpubox", None, (), batch=True)
    assert shlex.split(t.argv(command=["sh", "-c", "x"])[-1]) == [
        "env", "XDG_CACHE_HOME=/scratch/u 1", "sh", "-c", "x"]
    assert t.argv("-N")[-1] == "gpubox"  # a tunnel runs no command
    monkeypatch.delenv("TETHER_REMOTE_CACHE")
    assert shlex.split(make_target("gpubox", None, (), True).argv(command=["x"])[-1]) == ["x"]


def test_remote_tether_argv_runs_the_installed_tether() -> None:
    argv = bootstrap.remote_tether_argv("ps", "--json")
    assert argv[:2] == ["sh", "-c"] and argv[-2:] == ["ps", "--json"]
    assert "env-0.1.0/bin/tether" in argv[2] and "JUPYTER_RUNTIME_DIR" in argv[2]


def test_the_wheels_id_is_kept_until_a_file_changes(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A warm call sends the wheel's sha256 without building the wheel: kept in the laptop's
    cache with what it was built from; anything else there is ignored."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    bootstrap.wheel_id.cache_clear()
    built = bootstrap.build_wheel()
    first = bootstrap.wheel_id()
    assert (first.name, first.sha256) == (built.name, built.sha256)
    kept = tmp_path / "tether" / "wheel-id.json"
    assert json.loads(kept.read_text())["sha256"] == built.sha256
    kept.write_text(json.dumps(dict(json.loads(kept.read_text()), stamp="other", sha256="x")))
    bootstrap.wheel_id.cache_clear()
    assert bootstrap.wheel_id().sha256 == built.sha256  # another build's: built again
    kept.write_text("{")
    bootstrap.wheel_id.cache_clear()
    assert bootstrap.wheel_id().sha256 == built.sha256
    bootstrap.wheel_id.cache_clear()


def test_wheel_is_deterministic_and_complete() -> None:
    bootstrap.build_wheel.cache_clear()
    a = bootstrap.build_wheel()
    bootstrap.build_wheel.cache_clear()
    b = bootstrap.build_wheel()
    assert a.sha256 == b.sha256 and a.name == "tether-0.1.0-py3-none-any.whl"
    names = zipfile.ZipFile(io.BytesIO(a.data)).namelist()
    for needed in ("tether/_seed.py", "tether/host.py", "tether/contract.py",
                   "tether/remote/server.py", "tether/cli/serve.py",
                   "tether-0.1.0.dist-info/METADATA", "tether-0.1.0.dist-info/entry_points.txt",
                   "tether-0.1.0.dist-info/RECORD"):
        assert needed in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_the_seed_runs_on_plain_python_and_reports_json(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The seed alone, as the remote runs it: stdlib only, one JSON line; where no environment
    exists and nothing of tether's runs, ``status`` is answered without one."""
    params = bootstrap._params("status", bootstrap.RemoteOptions(), bootstrap.build_wheel())
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-I", "-c", bootstrap.seed_source(), json.dumps(params)],
                         capture_output=True, text=True, env=env, timeout=60)
    result = json.loads(out.stdout.splitlines()[-1])
    assert result == {"event": "result", "protocol": contract.PROTOCOL, "servers": [],
                      "stale": [], "unverified": [], "env_ready": False,
                      "root": f"{tmp_path}/.cache/tether", "envs": [], "disk_bytes": 0,
                      "installed": {"installer": None, "source": None}}


def test_the_bytes_sent_inline_stay_well_under_the_argument_limit() -> None:
    """The whole remote command travels as one argument (Linux refuses one over 128 KiB): the
    seed, and the parameters of a cold second call with a large lock, under 48 KiB."""
    target = _ssh.SSHTarget("gpubox", options=("ControlPath=/tmp/x",))
    pins = [f"package-number-{i}==1.{i}.0" for i in range(150)]
    wheels = [{"file": f"package_number_{i}-1.{i}.0-py3-none-any.whl", "sha256": "0" * 64}
              for i in range(150)]
    plan = {"offline": True, "pins": pins, "need": wheels, "lock": "k" * 64,
            "incoming": [dict(w, size=1 << 20) for w in wheels]}
    params, head = bootstrap.call_input("up", bootstrap.RemoteOptions(), wheel_data=b"w" * 100,
                                        plan=plan)
    assert head == json.dumps(plan).encode() + b"w" * 100  # the plan goes to stdin, first
    assert params["plan_size"] == len(json.dumps(plan)) and "pins" not in params
    inline = target.argv(command=bootstrap.remote_command("python3", params))[-1]
    assert len(inline.encode()) < bootstrap.INLINE_LIMIT == 48 << 10
    assert len(bootstrap.seed_source().encode()) < 40 << 10  # room for parameters


def test_the_seed_is_only_the_standard_library() -> None:
    import ast

    tree = ast.parse(bootstrap.seed_source())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
             for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) and n.module}
    assert names <= set(sys.stdlib_module_names) - {"tether"}, names


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    first = [tunnel._backoff(1) for _ in range(50)]
    assert all(0.18 <= x <= 0.32 for x in first) and len(set(first)) > 1
    assert all(tunnel._backoff(30) <= tunnel.BACKOFF_MAX * 1.25 for _ in range(20))


def test_forward_spec() -> None:
    assert tunnel.Forward(9999, "/run/t.sock").spec == "127.0.0.1:9999:/run/t.sock"
    assert tunnel.Forward(9999, remote_port=8888).spec == "127.0.0.1:9999:127.0.0.1:8888"


def test_foreign_listener_is_an_error() -> None:
    from tests.fixtures_ssh import RemotePage

    with RemotePage(body=b'{"hello": "not jupyter"}') as foreign:
        with pytest.raises(ForeignListenerError):
            asyncio.run(tunnel.verify_own_server(foreign.port, "t" * 48))


def test_serve_options_are_forwarded_to_the_remote_serve() -> None:
    from tether.cli.remote import serve_args

    given = {"stop_after_idle": 600, "on_idle": "sudo poweroff", "reap": True,
             "kill_grace": 5.0, "port": 1234, "as_json": True, "kernel_python": "/x"}
    assert serve_args(given) == ("--stop-after-idle", "600", "--on-idle", "sudo poweroff",
                                 "--reap")


def test_doctor_disk_check_says_read_only_or_short_with_a_fix() -> None:
    from tether import session

    up = "tether up gpubox -F /x/config"
    ok = session._disk_check("gpubox", {"root": "/h/.cache/tether", "free_bytes": 5 << 30}, up)
    assert ok.ok and ok.detail == "5.0 GiB free under /h/.cache/tether"
    ro = session._disk_check("gpubox", {"free_bytes": 5 << 30, "root_problem": {
        "kind": "read-only", "message": "/h/.cache/tether on HOST is on a read-only file system",
        "cache_fix": "/tmp/tether-u7"}}, up)
    assert not ro.ok and ro.detail == "/h/.cache/tether on gpubox is on a read-only file system"
    assert ro.hint.startswith("Run `TETHER_REMOTE_CACHE=/tmp/tether-u7 tether up gpubox -F "
                              "/x/config` to keep")
    short = session._disk_check("gpubox", {"root_problem": {
        "kind": "disk", "message": "/h/.cache/tether on HOST has 12 MiB free; a fresh environment "
        "needs about 300 MiB there", "hint": "Free 288 MiB there (e.g. `ssh HOST rm -rf x`)."}}, up)
    assert not short.ok and "12 MiB free" in short.detail and "300 MiB" in short.detail
    assert short.hint == "Free 288 MiB there (e.g. `ssh gpubox rm -rf x`)."


def test_a_remote_failure_about_its_folder_names_tether_up_with_the_users_options() -> None:
    target = _ssh.SSHTarget("gpubox", "/x/config", ("Port=2222",), ssh="ssh")
    e = bootstrap._remote_error(target, {
        "event": "error", "kind": "not-writable", "hint": "(the seed's)",
        "message": "/h/.cache/tether on HOST is not writable by u (permission denied)",
        "folder": "/h/.cache/tether", "cache_fix": "/scratch/u"})
    assert str(e) == ("/h/.cache/tether on gpubox is not writable by u (permission denied). Run "
                      "`TETHER_REMOTE_CACHE=/scratch/u tether up gpubox -F /x/config -o "
                      "Port=2222` to keep tether's files in /scratch/u on gpubox instead.")
    assert e.data["cache_fix"] == "/scratch/u" and e.exit_code == 1


# -- tether's ControlMaster (tether._master), without a connection ------------------------------

def test_through_the_master_nothing_prompts_and_nothing_becomes_a_master() -> None:
    from tether import _master

    t = _ssh.SSHTarget("h", "/x/cfg", ("Port=2",), interactive=True, ssh="ssh")
    shared = _ssh.SSHTarget("h", "/x/cfg", ("Port=2",), interactive=True, ssh="ssh",
                            control_path="/run/user/0/tether-1-ab/m")
    argv = shared.argv(command=["true"])
    assert argv[argv.index("ControlMaster=no") - 1] == "-o"
    assert "ControlPath=/run/user/0/tether-1-ab/m" in argv
    assert "BatchMode=yes" in argv  # a mux client whose master is gone must not ask into a line
    assert t.prompts and not shared.prompts
    # the command lines tether prints name the user's options, never tether's socket
    assert bootstrap.tether_command(shared, "up") == "tether up h -F /x/cfg -o Port=2"
    assert _master.copy_id_command(shared) == "ssh-copy-id -F /x/cfg -o Port=2 h"
    note = _master.password_note(shared, "password")
    assert "ssh-copy-id -F /x/cfg -o Port=2 h" in note and "key" in note


def test_the_tunnel_through_a_master_spawns_no_ssh_of_its_own() -> None:
    from tether import _master

    master = _master.Master(_ssh.SSHTarget("h", ssh="ssh"))
    master.dir = Path("/tmp/tether-1-ab")
    master.mode = _master.Mode.OWN
    fwd = tunnel.Forward(9999, remote_sock="/r/s")
    assert tunnel.Tunnel(master.target, fwd, "t", master=master).master is master
    # another host's target (a Slurm node) keeps a connection of its own
    other = tunnel.Tunnel(_ssh.SSHTarget("node", ssh="ssh"), fwd, "t", master=master)
    assert other.master is None
    assert "ControlPath=none" in other.argv()


def test_the_socket_folder_is_private_and_short(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    import os

    from tether import _login

    long = tmp_path / ("x" * 120)
    long.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(long))  # too long for a socket: not used
    path = _login.runtime_dir()
    try:
        assert not path.startswith(str(long))
        assert len(os.fsencode(path + "/m")) + 17 <= _login.SOCKET_MAX
        assert os.stat(path).st_mode & 0o777 == 0o700
        assert f"tether-{os.getpid()}-" in path
    finally:
        os.rmdir(path)


@pytest.mark.parametrize(("config", "mode"), [
    ("", "own"),
    ("  ControlMaster auto\n  ControlPath /tmp/%C\n", "user"),
    ("  ControlPath /tmp/cm-%C\n", "user"),
    ("  ControlMaster no\n", "own"),
])
def test_the_users_own_controlmaster_is_theirs(tmp_path: Path,
                                               config: str, mode: str) -> None:
    from tether import _master

    cfg = tmp_path / "config"
    cfg.write_text("Host h\n  HostName 127.0.0.1\n" + config)
    target = _ssh.SSHTarget("h", str(cfg))
    assert asyncio.run(_master.choose_mode(target)).value == mode


def test_the_login_method_is_read_from_the_masters_log() -> None:
    from tether import _master

    log = (b"Warning: Permanently added '[127.0.0.1]:2222' (ED25519) to the list of known hosts.\n"
           b'Authenticated to 127.0.0.1 ([127.0.0.1]:2222) using "keyboard-interactive".\n')
    assert _master._AUTHENTICATED.findall(log) == [b"keyboard-interactive"]
    assert "keyboard-interactive" in _master.TYPED and "publickey" not in _master.TYPED


def test_a_warm_call_goes_straight_to_tether_host_where_the_environment_is_this_build() -> None:
    wheel = bootstrap.build_wheel()
    params = bootstrap._params("up", bootstrap.RemoteOptions(), wheel, wheel_size=0)
    argv = bootstrap.remote_command("python3", params)
    assert argv[-2:] == [wheel.sha256, "up"]
    assert f'exec "$e/bin/python" -I -c {shlex.quote(_seed.HOST_MAIN)} "$5" "$3"' in argv[2]
    assert argv[2].index("exit 97") < argv[2].index("tether.host")  # --remote-python checked
    # a call that sends files, and the seed's own action, run the seed
    for params in (bootstrap._params("up", bootstrap.RemoteOptions(), wheel, wheel_size=9),
                   bootstrap._params("probe", bootstrap.RemoteOptions(), wheel)):
        argv = bootstrap.remote_command("python3", params)
        assert "tether.host" not in argv[2] and len(argv) == 7
    assert _seed.HOST_MAIN == "import sys; from tether.host import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.parametrize("args", [
    ["up", "gpubox"],
    ["-v", "up", "gpubox", "-F", "/c", "--port", "9000", "-o", "A=b", "--ssh-option=C=d",
     "-oE=f", "--json"],
    ["up", "gpubox", "--ssh-config=/d", "--batch", "-vv", "--kernel-python", "/p"],
    ["up", "gpubox", "-F/e", "--forward", "6006", "--slurm", "--gpus", "1"],
])
def test_the_early_login_guesses_the_target_the_command_line_parses(args: list[str]) -> None:
    """tether._login reads `up HOST` and its ssh options off the arguments as click does; the
    ssh it would start is the one tether._master adopts (BatchMode aside: it never prompts)."""
    from dataclasses import replace

    from tether import _login
    from tether.cli import _verbosity_first, cli, make_target

    words = [a for a in _verbosity_first(args) if not _login.VERBOSITY.fullmatch(a)]
    command = cli.get_command(None, "up")  # type: ignore[arg-type]
    assert command is not None
    kw = command.make_context("up", words[1:]).params
    parsed = make_target(kw["hosts"][0], kw["ssh_config"], kw["ssh_opts"], kw["batch"])
    guessed = _login.guess(args)
    assert guessed is not None
    assert replace(guessed, interactive=False).argv() == replace(parsed, interactive=False).argv()
    assert guessed.interactive == parsed.interactive


@pytest.mark.parametrize("args", [
    [], ["up"], ["serve"], ["down", "gpubox"], ["up", "--port", "9000", "gpubox"],
    ["up", "gpubox", "--help"], ["up", "-h"], ["up", "gpubox", "--", "-F", "x"],
])
def test_the_early_login_leaves_anything_else_alone(args: list[str]) -> None:
    from tether import _login

    assert _login.guess(args) is None
    assert not _login.start(args) and _login.take(_ssh.SSHTarget("gpubox")) is None


def test_the_masters_exit_is_seen_at_once_and_a_wait_is_bounded() -> None:
    """The ControlMaster's ssh is a plain child (tether._login): waiting for it ends at its exit
    (a pidfd where the system has them), or after the timeout while it runs."""
    import subprocess
    import time

    async def main() -> tuple[bool, float, bool, float, bool]:
        proc = subprocess.Popen(["sleep", "0.5"])
        t0 = time.monotonic()
        early = await _ssh.wait_exit(proc, 0.1)
        waited = time.monotonic() - t0
        t0 = time.monotonic()
        done = await _ssh.wait_exit(proc, 30)
        return early, waited, done, time.monotonic() - t0, await _ssh.wait_exit(proc, 0)

    early, waited, done, took, again = asyncio.run(main())
    assert not early and 0.09 < waited < 0.4
    assert done and took < 2 and again
