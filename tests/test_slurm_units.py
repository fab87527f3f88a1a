"""The Slurm backend's pure parts: what Slurm prints, the job script, the sbatch arguments."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime

import pytest

from tether.backends import slurm
from tether.bootstrap import RemoteOptions
from tether.errors import ConfigError

# recorded from Slurm 22.05 (`scontrol -o show job 3`), trimmed
PENDING = ("JobId=3 JobName=tether-runtime UserId=tether-remote(1001) GroupId=tether-remote(1001) "
           "Priority=4294901757 JobState=PENDING Reason=Resources Dependency=(null) "
           "RunTime=00:00:00 TimeLimit=04:00:00 SubmitTime=2026-12-01T21:11:12 "
           "StartTime=2026-12-01T21:21:13 EndTime=2026-12-02T01:21:13 NodeList=(null) "
           "Comment=tether:0f3c9a1b2d4e5f60 TresPerJob=gres:gpu:1")
RUNNING = ("JobId=4 JobName=tether-runtime JobState=RUNNING Reason=None RunTime=1-02:03:04 "
           "TimeLimit=2-00:00:00 StartTime=2026-12-01T21:11:13 NodeList=gpu07 "
           "Comment=tether:abc WorkDir=/home/me/my notebooks")


def test_scontrol_lines_parse_with_spaces_in_values():
    fields = slurm.parse_scontrol(RUNNING)
    assert fields["JobState"] == "RUNNING" and fields["NodeList"] == "gpu07"
    assert fields["WorkDir"] == "/home/me/my notebooks"


@pytest.mark.parametrize("text, seconds", [
    ("04:00:00", 14400), ("1-02:03:04", 93784), ("10:00", 600), ("5", 300),
    ("UNLIMITED", None), ("", None)])
def test_durations(text, seconds):
    assert slurm.parse_duration(text) == seconds


def test_job_info_of_a_pending_and_a_running_job():
    pending = slurm.JobInfo.from_scontrol("3", PENDING)
    assert (pending.state, pending.reason, pending.node, pending.nonce) == (
        "PENDING", "Resources", "", "0f3c9a1b2d4e5f60")
    assert not pending.ended and pending.time_left == 14400
    assert "queued: PENDING (Resources), expected start 2026-12-01T21:21:13 (the cluster's " \
        "clock), waited 1m05s" in slurm.describe_wait(pending, 65)
    running = slurm.JobInfo.from_scontrol("4", RUNNING)
    assert running.time_left == 2 * 86400 - 93784
    gone = slurm.JobInfo.from_scontrol("5", "slurm_load_jobs error: Invalid job id specified")
    assert gone.state == "GONE" and gone.ended


def test_sbatch_arguments_pass_the_users_flags_verbatim():
    opts = slurm.SlurmOptions(gpus=2, partition="a100", time="4:00:00", account="lab",
                              sbatch_args=("--constraint=a100", "--mem=64G"))
    assert opts.sbatch("tether-runtime", "tether:x") == [
        "--job-name=tether-runtime", "--comment=tether:x", "--signal=B:USR1@300", "--gpus=2",
        "--partition=a100", "--time=4:00:00", "--account=lab", "--constraint=a100", "--mem=64G"]
    with pytest.raises(ConfigError):
        slurm.SlurmOptions(node_access="sideways")


@pytest.mark.parametrize("mode", ["jump", "forward"])
def test_the_job_script_is_valid_sh_and_keeps_the_token_out(mode):
    opts = RemoteOptions(notebook_dir="~/my notebooks", serve_args=("--stop-after-idle", "600"))
    script = slurm.job_script("abc", opts, slurm.SlurmOptions(on_walltime="cp a b"), mode)
    assert subprocess.run(["sh", "-n"], input=script, text=True).returncode == 0
    assert "trap walltime USR1" in script and "( cp a b )" in script
    assert ("--sock" in script) == (mode == "jump")
    assert ("--i-know-this-exposes-the-server" in script) == (mode == "forward")
    assert """--notebook-dir "$HOME"/'my notebooks'""" in script
    # the job's 0600 token file (every server of the job serves the same URL), never the token
    assert "--token-file \"$d/token\"" in script and "--token " not in script
    assert "trap 'again=1;" in script and "USR2" in script


@pytest.mark.parametrize(("args", "says"), [
    (["--time", "abc"], "--time abc: not a Slurm time limit"),
    (["--time", "00:02:00"], "not longer than --walltime-signal 300 s"),
    (["--time", "5", "--walltime-signal", "300"], "not longer than --walltime-signal 300 s"),
    (["--sbatch-arg=--job-name=mine"], "tether sets --job-name itself"),
    (["--sbatch-arg=--comment=mine"], "tether sets --comment itself"),
    (["--sbatch-arg=-Jmine"], "tether sets -J itself"),
    (["--sbatch-arg=--signal=B:USR1@10"], "tether sets --signal itself"),
])
def test_slurm_options_tether_cannot_honour_are_refused_before_any_ssh(tmp_path, args, says):
    # a host that cannot resolve: the refusal must come before any SSH is tried
    done = subprocess.run([sys.executable, "-m", "tether", "up", "nohost.invalid", "--slurm",
                           *args], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env={**os.environ, "HOME": str(tmp_path)}, timeout=60)
    assert done.returncode == 2 and says in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_walltime_longer_than_the_signal_and_other_sbatch_args_pass() -> None:
    opts = slurm.SlurmOptions(time="00:06:00", sbatch_args=("--exclusive", "-N1", "--mem=4G"))
    assert "--time=00:06:00" in opts.sbatch("tether", "c")


def test_expected_start_is_shown_in_the_laptops_time_zone():
    """Our commands ask Slurm for epoch seconds (SLURM_TIME_FORMAT=%s): the laptop shows them as
    "in 12 min, 14:05" in its own zone, however the cluster's clock is set."""
    now = 1_796_000_000.0
    at = int(now + 12 * 60 + 10)
    pending = slurm.JobInfo.from_scontrol("3", PENDING.replace(
        "StartTime=2026-12-01T21:21:13", f"StartTime={at}"))
    local = time.strftime("%H:%M", time.localtime(at))
    assert f"expected start in 12 min, {local}, waited 5s" in slurm.describe_wait(pending, 5, now)
    assert slurm.expected_start(str(int(now + 3 * 3600)), now).startswith("in 3 h, ")
    assert slurm.expected_start(str(int(now + 50 * 3600)), now).startswith("in 2 d 2 h, ")
    assert slurm.expected_start(str(int(now + 5)), now) == "any moment"
    assert slurm.expected_start("Unknown", now) == ""
    iso = slurm.iso_start(str(at))
    assert datetime.fromisoformat(iso).timestamp() == at  # --json: ISO with the offset
    assert slurm.expected_start(iso, now) == slurm.expected_start(str(at), now)



async def test_the_node_is_reached_with_the_login_nodes_options_and_remote_cache(
        tmp_path) -> None:
    from tether import _ssh

    config = tmp_path / "config"
    config.write_text("Host *\n  User u\n")
    login = _ssh.SSHTarget("login", str(config), ("Port=2222",), ssh="ssh",
                           remote_env=(("XDG_CACHE_HOME", "/scratch/u"),))
    node = await slurm.SlurmJob(login, RemoteOptions())._node_target("node1")
    assert node.host == "node1" and node.remote_env == login.remote_env
    assert node.options == ("Port=2222", "ProxyJump=login")
    assert node.argv(command=["true"])[-1] == "env XDG_CACHE_HOME=/scratch/u true"


def test_a_restart_keeps_the_options_it_is_not_given():
    """`tether restart LOGIN --slurm` gives the options it is given; the others are those the
    job's server runs with, read back from its serve script's options line."""
    first = RemoteOptions(idle_timeout=600, origins=("https://x.example",), notebook_dir="~/nb",
                          serve_args=("--stop-after-idle", "900"), conda_env="torch")
    script = slurm.serve_script("abc", first, "forward")
    line = next(ln for ln in script.splitlines() if ln.startswith("# tether-options: "))
    running = json.loads(line.removeprefix("# tether-options: "))
    assert running["mode"] == "forward"
    kept = slurm.restart_options(RemoteOptions(), running)
    assert (kept.idle_timeout, kept.origins, kept.notebook_dir, kept.serve_args,
            kept.conda_env) == (600, ("https://x.example",), "~/nb", ("--stop-after-idle", "900"),
                                "torch")
    changed = slurm.restart_options(RemoteOptions(idle_timeout=7200, kernel_python="/py"),
                                    running)
    assert (changed.idle_timeout, changed.kernel_python, changed.conda_env) == (7200, "/py",
                                                                                None)
    assert "--idle-timeout 600" in script and '--token-file "$d/token"' in script


# a stand-in for `tether serve` (the job script's loop is what is tested): it writes its state
# file, removes it when it ends on purpose (SIGTERM), leaves it when killed
FAKE_SERVE = """import os, signal, sys
d = os.environ["JUPYTER_RUNTIME_DIR"]
state = os.path.join(d, "tether-%d.json" % os.getpid())
with open(state, "w") as f:
    f.write("{}")
with open(os.path.join(d, "served"), "a") as f:
    f.write("%d %s\\n" % (os.getpid(), " ".join(sys.argv[1:])))
def term(*_):
    os.unlink(state)
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
while True:
    signal.pause()
"""


def _served(d, count: int, deadline: float = 20.0) -> list[tuple[int, str]]:
    end = time.monotonic() + deadline
    while time.monotonic() < end:  # bounded: the job script starts servers by itself
        try:
            lines = (d / "served").read_text().splitlines()
        except FileNotFoundError:
            lines = []
        if len(lines) >= count:
            return [(int(ln.split()[0]), ln) for ln in lines]
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} servers started")


def test_the_job_script_restarts_a_killed_server_and_on_usr2_but_ends_with_one_stopped(
        tmp_path):
    """The job script's loop, run by sh with a stand-in server: kill -9 -> a new server;
    USR2 -> the new serve script's server; a server that ends on purpose ends the job."""
    from tether import __version__

    root = tmp_path / "tether"
    env = root / f"env-{__version__}" / "bin"
    env.mkdir(parents=True)
    (env / "python").symlink_to(sys.executable)
    (env / "tether").write_text(f"#!{sys.executable}\n{FAKE_SERVE}")
    (env / "tether").chmod(0o700)
    d = root / "slurm" / "abc"
    d.mkdir(parents=True)
    job = d / "job.sh"
    job.write_text(slurm.job_script("abc", RemoteOptions(), slurm.SlurmOptions(), "jump"))
    proc = subprocess.Popen(["sh", str(job)], env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)},
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        first = _served(d, 1)[0][0]
        os.kill(first, signal.SIGKILL)
        second, line = _served(d, 2)[1]
        assert not (d / f"tether-{first}.json").exists() and "--idle-timeout 3600" in line
        (d / "serve.next").write_text(slurm.serve_script("abc", RemoteOptions(idle_timeout=7200),
                                                         "jump"))
        os.kill(proc.pid, signal.SIGUSR2)  # what `scancel --batch --signal=USR2` sends
        third, line = _served(d, 3)[2]
        assert "--idle-timeout 7200" in line and '"idle_timeout":7200' in (
            d / "serve.sh").read_text()
        assert not (d / f"tether-{second}.json").exists(), "the old server ended by SIGTERM"
        os.kill(third, signal.SIGTERM)  # on purpose: the job ends with it
        assert proc.wait(20) == 0
        assert len(_served(d, 3)) == 3 and "starting it again" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


async def test_attaching_to_a_job_whose_server_is_older_names_tether_restart() -> None:
    from tether import _ssh, __version__
    from tether.contract import ServerInfo

    job = slurm.SlurmJob(_ssh.SSHTarget("login"), RemoteOptions(), attach=True, mode="forward")
    running = slurm.JobInfo("12", "RUNNING", node="n1")
    old = await job._placement(ServerInfo(pid=7, token="t", port=4000, version="0.0.1"), running)
    assert old.remote_host == "n1" and len(old.result.warnings) == 1
    assert "runs tether 0.0.1, older than this one" in old.result.warnings[0]
    assert "`tether restart HOST --slurm`" in old.result.warnings[0]
    same = await job._placement(ServerInfo(pid=7, token="t", port=4000, version=__version__),
                                running)
    assert same.result.warnings == ()
