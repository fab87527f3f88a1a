"""The runtime as a Slurm batch job, submitted through the cluster's login node.

The environment is prepared once on the login node (a cluster's home is shared with its
nodes). ``sbatch --parsable`` submits a generated job script under a recognisable job name and
comment (``tether-runtime``, ``tether:<id>``), so ``attach`` and ``down`` find our jobs again,
and only ours. The job runs ``tether serve`` on its node and leaves the server's 0600 state file
under ``~/.cache/tether/slurm/<id>/`` in the shared home, never ``/tmp`` or an inherited
``XDG_RUNTIME_DIR``.

Reaching the node (docs/clusters.md):

- ``jump`` (first choice): ``ssh -J LOGIN NODE`` (or the user's own config for NODE) and the
  same ``-L`` to a 0600 Unix socket on the node: nothing listens on the cluster network.
- ``forward``, where SSH to nodes is refused: the server binds a port it picks itself on the
  node's cluster address, and the forward runs ``-L local:NODE:PORT`` through the login node.
  The token in the URL is then the only guard.

The job's life is the runtime's: ``down`` is ``scancel`` verified; ``release --all
--stop-server`` and ``--stop-after-idle`` end the server, which ends the job. Slurm signals the
job shell (``--signal=B:USR1@N``) before the walltime: it releases every kernel and runs the
user's ``--on-walltime`` hook once, before Slurm kills the job.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import secrets
import shlex
import time
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, TypeVar

from tether import __version__, _ssh, bootstrap, contract
from tether.backends import NODE_ACCESS, OnEvent, OnNote, Placement, Report
from tether.backends.ssh import OverSSH
from tether.contract import REMOTE_LAYOUT, RestartResult, ServerInfo, UpResult
from tether.config import COLAB_ORIGIN
from tether.errors import (
    ConfigError,
    ServerNotFoundError,
    SlurmError,
    SlurmJobEndedError,
    SSHError,
    TetherError,
)
from tether.kernels import Kernels, RemoteKernels

log = logging.getLogger(__name__)
T = TypeVar("T")

JOB_NAME = contract.SLURM_JOB_NAME
COMMENT_PREFIX = contract.SLURM_COMMENT
NO_SLURM = 95  # the login node has no sbatch/squeue/scontrol on its PATH
WATCH_INTERVAL = 10.0
READY_DEADLINE = 180.0  # from RUNNING to the server's state file
CANCEL_DEADLINE = 60.0
PROBE_TIMEOUT = 20.0
WARN_BEFORE = (15 * 60, 5 * 60)
# the job shell as a child subreaper (prctl 36, kept across exec; skipped where the C library
# has no prctl), then the job script again
REAPER = ("import ctypes, os, sys; f = getattr(ctypes.CDLL(None), 'prctl', None); "
          "f and f(36, 1, 0, 0, 0); os.execv('/bin/sh', ['sh', sys.argv[1]])")
CRASH_RESTARTS = 20  # servers the job starts again after a crash, in its whole life
ENDED = frozenset({"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "PREEMPTED", "NODE_FAIL",
                   "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "GONE"})


# sbatch options tether gives each job itself (--sbatch-arg may not override them)
OWNED_SBATCH = frozenset({"--job-name", "-J", "--comment", "--signal", "--output", "-o",
                          "--error", "-e", "--chdir", "-D", "--parsable"})
OWNED_SHORT = ("-J", "-o", "-e", "-D")  # also written glued to their value: -Jname


def duration_arg(seconds: int) -> str:
    """A --time comfortably past ``seconds`` (an hour more), as Slurm writes it."""
    total = seconds + 3600
    return f"{total // 3600}:{total % 3600 // 60:02d}:00"


@dataclass(frozen=True)
class SlurmOptions:
    """What the user asks of the scheduler; resource flags go to sbatch verbatim."""

    gpus: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    sbatch_args: tuple[str, ...] = ()
    keep: bool = False
    node_access: str = "auto"
    on_walltime: str | None = None
    walltime_signal: int = 300  # seconds before the end

    def __post_init__(self) -> None:
        if self.node_access not in NODE_ACCESS:
            raise ConfigError(f"--node-access {self.node_access}: expected one of "
                              f"{', '.join(NODE_ACCESS)}")
        if self.gpus is not None and self.gpus < 0:
            raise ConfigError(f"--gpus {self.gpus}: must be >= 0")
        if not 10 <= self.walltime_signal <= 3600:
            raise ConfigError(f"--walltime-signal {self.walltime_signal}: must be between 10 "
                              "and 3600 seconds")
        for arg in self.sbatch_args:
            flag = next((f for f in OWNED_SHORT if arg.startswith(f)), arg.split("=", 1)[0])
            if flag in OWNED_SBATCH:
                raise ConfigError(
                    f"--sbatch-arg={arg}: tether sets {flag} itself (by it, it finds its jobs, "
                    "their log and their walltime signal)",
                    hint="Leave it out: the job is tether's by its name and comment, and "
                         "--walltime-signal sets the signal.")
        if self.time:
            try:
                limit = parse_duration(self.time)
            except ValueError:
                raise ConfigError(f"--time {self.time}: not a Slurm time limit",
                                  hint="Give minutes, MM:SS, HH:MM:SS or D-HH:MM:SS, e.g. "
                                       "--time 2:00:00.") from None
            if limit is not None and limit <= self.walltime_signal:
                raise ConfigError(
                    f"--time {self.time} is not longer than --walltime-signal "
                    f"{self.walltime_signal} s: the kernels would be released as the job starts",
                    hint=f"Ask for more time (e.g. --time {duration_arg(self.walltime_signal)}) "
                         f"or an earlier signal (--walltime-signal {max(10, int(limit) // 5)}).")

    def sbatch(self, name: str, comment: str) -> list[str]:
        args = [f"--job-name={name}", f"--comment={comment}",
                f"--signal=B:USR1@{self.walltime_signal}"]
        if self.gpus:
            args.append(f"--gpus={self.gpus}")
        for flag, value in (("--partition", self.partition), ("--time", self.time),
                            ("--account", self.account)):
            if value:
                args.append(f"{flag}={value}")
        return [*args, *self.sbatch_args]


# -- what Slurm says about a job ---------------------------------------------------------------

_FIELD = re.compile(r"(?:^|\s)([A-Za-z:/]+)=")


def parse_scontrol(line: str) -> dict[str, str]:
    """``scontrol -o show job J``: one line of ``Key=Value`` (values may hold spaces)."""
    keys = list(_FIELD.finditer(line))
    fields = {}
    for this, following in zip(keys, [*keys[1:], None]):
        end = following.start() if following is not None else len(line)
        fields[this.group(1)] = line[this.end():end].strip()
    return fields


def parse_duration(text: str) -> float | None:
    """Slurm's ``[D-]HH:MM:SS``, ``MM:SS`` or minutes, in seconds; None for UNLIMITED."""
    text = text.strip()
    if not text or text.upper() in ("UNLIMITED", "INFINITE", "NONE", "N/A"):
        return None
    days, _, rest = text.rpartition("-")
    parts = [float(p) for p in rest.split(":")]
    if len(parts) == 1:
        seconds = parts[0] * 60
    else:
        while len(parts) < 3:
            parts.insert(0, 0.0)
        seconds = parts[0] * 3600 + parts[1] * 60 + parts[2]
    return seconds + (float(days) * 86400 if days else 0.0)


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    state: str
    reason: str = ""
    node: str = ""
    start: str = ""
    time_limit: float | None = None
    run_time: float = 0.0
    comment: str = ""
    gres: str = ""

    @classmethod
    def from_scontrol(cls, job_id: str, text: str) -> JobInfo:
        line = next((ln for ln in text.splitlines() if ln.startswith("JobId=")), "")
        if not line:  # "Invalid job id specified": ended long enough ago to be forgotten
            return cls(job_id, "GONE")
        f = parse_scontrol(line)
        state = f.get("JobState", "UNKNOWN").split()[0]
        node = f.get("NodeList", "")
        return cls(job_id, state, f.get("Reason", ""), "" if node == "(null)" else node,
                   f.get("StartTime", ""), parse_duration(f.get("TimeLimit", "")),
                   parse_duration(f.get("RunTime", "")) or 0.0, f.get("Comment", ""),
                   f.get("TresPerJob", "") or f.get("TresPerNode", "") or f.get("Gres", ""))

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    @property
    def time_left(self) -> float | None:
        if self.time_limit is None:
            return None
        return max(0.0, self.time_limit - self.run_time)

    @property
    def nonce(self) -> str:
        return self.comment[len(COMMENT_PREFIX):] if self.comment.startswith(COMMENT_PREFIX) \
            else ""


def expected_start(start: str, now: float | None = None) -> str:
    """Slurm's expected start as the laptop's local time ("in 12 min, 14:05"); ``start`` is
    epoch seconds (our commands set ``SLURM_TIME_FORMAT=%s``), or a Slurm that ignored that
    printed its own clock's time, which is shown as it is; "" where Slurm has no estimate."""
    at = _epoch(start)
    if at is None:
        return "" if start in ("", "Unknown", "N/A", "None") else f"{start} (the cluster's clock)"
    left = at - (time.time() if now is None else now)
    if left <= 30:
        return "any moment"
    local = time.localtime(at)
    clock = time.strftime("%H:%M" if left < 20 * 3600 else "%a %d %b %H:%M", local)
    return f"in {duration(left, coarse=True)}, {clock}"


def _epoch(start: str) -> float | None:
    """Epoch seconds of ``start``: digits, or ISO 8601 with an offset (our --json's form)."""
    if start.isdigit():
        return float(start)
    try:
        when = datetime.fromisoformat(start)
    except ValueError:
        return None
    return when.timestamp() if when.tzinfo is not None else None


def iso_start(start: str) -> str:
    """The expected start for --json: ISO 8601 with the laptop's offset ("" if unknown)."""
    if not start.isdigit():
        return "" if start in ("", "Unknown", "N/A", "None") else start
    return datetime.fromtimestamp(int(start)).astimezone().isoformat(timespec="seconds")


def describe_wait(job: JobInfo, waited: float, now: float | None = None) -> str:
    reason = f" ({job.reason})" if job.reason and job.reason != "None" else ""
    when = expected_start(job.start, now)
    start = f", expected start {when}" if when else ""
    return f"job {job.job_id} queued: {job.state}{reason}{start}, waited {duration(waited)}"


def duration(seconds: float, coarse: bool = False) -> str:
    """``1m05s``; ``coarse``: what a person plans by ("12 min", "3 h 20 min", "2 d 4 h")."""
    seconds = int(seconds)
    if not coarse:
        return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
    minutes = max(1, round(seconds / 60))
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


# -- the job script ------------------------------------------------------------------------------

def job_dir_expr(nonce: str) -> str:
    return f"{REMOTE_LAYOUT.root_expr()}/slurm/{nonce}"


def serve_options(opts: bootstrap.RemoteOptions, mode: str) -> dict[str, Any]:
    """The options a job's server runs with, kept in its serve script for `tether restart`
    (which changes those it is given and keeps the others)."""
    return {"mode": mode, "idle_timeout": opts.idle_timeout,
            "origins": [o for o in opts.origins if o != COLAB_ORIGIN],
            "notebook_dir": opts.notebook_dir or "", "serve_args": list(opts.serve_args),
            "kernel_python": opts.kernel_python or "", "conda_env": opts.conda_env or ""}


def restart_options(opts: bootstrap.RemoteOptions, running: Mapping[str, Any]
                    ) -> bootstrap.RemoteOptions:
    """``opts`` (a `tether restart`'s) over the options the job's server runs with: those not
    given stay as they were."""
    changes: dict[str, Any] = {}
    if opts.idle_timeout == bootstrap.RemoteOptions().idle_timeout and running.get("idle_timeout"):
        changes["idle_timeout"] = int(running["idle_timeout"])
    if not [o for o in opts.origins if o != COLAB_ORIGIN] and running.get("origins"):
        changes["origins"] = (*opts.origins, *running["origins"])
    for key in ("notebook_dir", "serve_args"):
        if not getattr(opts, key) and running.get(key):
            changes[key] = tuple(running[key]) if key == "serve_args" else running[key]
    if not opts.kernel_python and not opts.conda_env:
        changes["kernel_python"] = running.get("kernel_python") or None
        changes["conda_env"] = running.get("conda_env") or None
    return dataclasses.replace(opts, **changes)


def serve_script(nonce: str, opts: bootstrap.RemoteOptions, mode: str) -> str:
    """What the job runs as its server: ``tether serve`` of this tether's environment, with the
    job's token file. The job script runs it again after a crash, and a `tether restart` puts a
    new one in its place (new options, a newer tether) before asking the job for a new server."""
    env = REMOTE_LAYOUT.env.format(version=__version__)
    serve = ["--idle-timeout", str(opts.idle_timeout)]
    for origin in opts.origins:
        if origin != COLAB_ORIGIN:
            serve += ["--origin", origin]
    serve += list(opts.serve_args)
    where = ""
    if opts.notebook_dir:  # a leading ~ is the home on the cluster, not the laptop's
        path = opts.notebook_dir
        home, rest = (True, path[2:]) if path.startswith("~/") else (path == "~", "")
        where = (' --notebook-dir "$HOME"' + (f"/{shlex.quote(rest)}" if rest else "")
                 if home else f" --notebook-dir {shlex.quote(path)}")
    if mode == "jump":
        listen = '--sock "$d/tether.sock"'
    else:  # the address the node's name resolves to on the cluster; a port the server picks
        listen = ('--ip "$(getent hosts "${SLURMD_NODENAME:-$(hostname)}" | '
                  'awk \'{print $1; exit}\')" --port 0 --i-know-this-exposes-the-server')
    options = json.dumps(serve_options(opts, mode), separators=(",", ":"))
    return f"""#!/bin/sh
# tether {__version__}: the server of a Slurm job (generated; `tether restart` replaces it)
# tether-options: {options}
r={REMOTE_LAYOUT.root_expr()}
d="$r/slurm/{nonce}"
t="$r/{env}/bin/tether"
# stdout would put the URL with its token in job.log: the state file carries it (0600)
exec "$t" serve --token-file "$d/token" {listen} {shlex.join(serve)}{where} \
  > /dev/null
"""


def job_script(nonce: str, opts: bootstrap.RemoteOptions, slurm: SlurmOptions,
               mode: str) -> str:
    """The batch script: the server (:func:`serve_script`) until it ends on purpose; USR1
    (walltime near) releases kernels; USR2 (`tether restart`) starts the server anew.

    A server that ended on purpose (``release --all --stop-server``, idle, SIGTERM) removed its
    state file: the job ends with it. One that crashed or was killed left its state file: it is
    started again, and adopts the kernels (they outlive it; they never outlive the job, whose
    end Slurm makes the end of every process in it).
    """
    env = REMOTE_LAYOUT.env.format(version=__version__)
    hook = slurm.on_walltime or ""
    hook_line = (f"  ( {hook} ) >> \"$d/walltime.log\" 2>&1 || true\n" if hook else "")
    return f"""#!/bin/sh
# tether {__version__}: a Colab runtime as a Slurm job (generated; see `tether up --slurm`)
r={REMOTE_LAYOUT.root_expr()}
d="$r/slurm/{nonce}"
t="$r/{env}/bin/tether"
# the job's server is the only one in its commands' scope (a login node's own is not)
export JUPYTER_RUNTIME_DIR="$d" {contract.SCOPE_ENV}="$d"
export JUPYTER_PATH="$r/{REMOTE_LAYOUT.jupyter_path}"
unset XDG_RUNTIME_DIR JUPYTER_TOKEN TETHER_TOKEN
if [ ! -x "$t" ]; then
  echo "tether-error: $t is not on $(hostname): the job does not see the login node's home" \\
    "(is it shared with the nodes?)" >&2
  exit 3
fi
# The job's shell adopts what its server leaves (kernels, after a crash): kept in the job's
# process tree, they end with the job however Slurm tracks its processes (proctrack/linuxproc
# follows parents). Same pid after exec: Slurm's signals still come here.
if [ -z "${{TETHER_JOB_REAPER:-}}" ]; then
  TETHER_JOB_REAPER=1 exec "$r/{env}/bin/python" -I -c "{REAPER}" "$0"
fi
unset TETHER_JOB_REAPER
( umask 077; cat > "$d/serve.sh" ) <<'TETHER_SERVE_EOF'
{serve_script(nonce, opts, mode)}TETHER_SERVE_EOF
walltime() {{
  echo "tether: walltime ends soon: releasing every kernel" >&2
  "$t" release --all --json > "$d/walltime.json" 2>> "$d/walltime.log" || true
{hook_line}  echo done > "$d/walltime.done"
}}
trap walltime USR1
pid=""; stop=""; again=""; n=0
trap 'again=1; [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null' USR2
trap 'stop=1; [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null' TERM INT
while [ -z "$stop" ]; do
  if [ -f "$d/serve.next" ]; then  # `tether restart`: its tether releases at the walltime
    mv -f "$d/serve.next" "$d/serve.sh"
    eval "$(grep '^t=' "$d/serve.sh")"
  fi
  sh "$d/serve.sh" &
  pid=$!
  rc=0
  while kill -0 "$pid" 2>/dev/null; do wait "$pid"; rc=$?; done
  if [ -n "$again" ]; then again=""; continue; fi
  [ -f "$d/tether-$pid.json" ] || break  # ended on purpose (or never got ready)
  rm -f "$d/tether-$pid.json"
  n=$((n + 1))
  [ "$n" -gt {CRASH_RESTARTS} ] && {{ echo "tether: the server ended $n times: giving up" >&2; break; }}
  echo "tether: the server (pid $pid) ended with status $rc: starting it again" >&2
done
"""


# -- remote commands -----------------------------------------------------------------------------

# times as epoch seconds (scontrol's StartTime): the laptop shows them in its own time zone
_NEED = ('export SLURM_TIME_FORMAT=%s; '
         'for c in sbatch squeue scontrol scancel; do command -v "$c" >/dev/null 2>&1 '
         f'|| {{ echo "$c" >&2; exit {NO_SLURM}; }}; done')

_SUBMIT = _NEED + """
r=@ROOT@; d="$r/slurm/$1"; shift
umask 077
mkdir -p "$d"
# the job's token: every server the job starts serves the same URL (0600, never in argv)
od -An -N24 -tx1 /dev/urandom | tr -d ' \\n' > "$d/token"
cat > "$d/job.sh"
chmod 700 "$d/job.sh"
exec sbatch --parsable --chdir="$HOME" --output="$d/job.log" "$@" "$d/job.sh"
"""

_POLL = _NEED + """
r=@ROOT@; d="$r/slurm/$1"
scontrol -o show job "$2" 2>&1 || true
echo "@@tether-state"
for f in "$d"/tether-*.json; do [ -f "$f" ] && { cat "$f"; echo; echo "@@"; }; done
echo "@@tether-log"
tail -c 1500 "$d/job.log" 2>/dev/null || true
"""

# Waits on the login node until the job's server is ready or the job ended: one line per change
# (and a heartbeat), so the laptop needs no SSH handshake per look at the queue.
_WAIT = _NEED + """
r=@ROOT@; d="$r/slurm/$1"; j=$2; last=""; n=0
while :; do
  s=$(scontrol -o show job "$j" 2>&1 | head -n 1)
  key=$(printf '%s' "$s" | sed -e 's/RunTime=[^ ]*//')
  st=""
  case "$s" in *JobState=RUNNING*)
    for f in "$d"/tether-*.json; do
      [ -f "$f" ] && [ "$f" != "$d/tether-$3.json" ] && st="$st$(tr -d '\\n' < "$f")@@"
    done;;
  esac
  if [ -n "$st" ] || [ "$key" != "$last" ] || [ "$n" -ge 20 ]; then
    printf '@@job %s\\n@@state %s\\n' "$s" "$st"; last=$key; n=0
  fi
  [ -n "$st" ] && exit 0
  case "$s" in
    JobId=*JobState=PENDING*|JobId=*JobState=RUNNING*|JobId=*JobState=CONFIGURING*) ;;
    *) printf '@@log '; tail -c 1500 "$d/job.log" 2>/dev/null | tr '\\n' '\\r'; echo; exit 0;;
  esac
  n=$((n + 1)); sleep 0.25
done
"""
REPORT_DEADLINE = 30.0  # the waiting script reports at least every 5 s
STREAM_RETRIES = 3

# The options the job's server runs with, and the kernels that would outlive it.
_SERVING = """
r=@ROOT@; d="$r/slurm/$1"
grep -q 'USR2' "$d/job.sh" 2>/dev/null || exit @OLD@
sed -n 's/^# tether-options: //p' "$d/serve.sh" 2>/dev/null | head -n 1
echo "@@kernels"
ls "$d/tether-kernels" 2>/dev/null | sed -n 's/[.]json$//p'
"""

# A new serve script for the job, then USR2 to its batch shell (not to the server or kernels):
# the job script ends its server by SIGTERM (the kernels stay) and starts the new one.
_ASK_RESTART = _NEED + """
r=@ROOT@; d="$r/slurm/$1"
umask 077
cat > "$d/serve.next.tmp" && mv -f "$d/serve.next.tmp" "$d/serve.next"
exec scancel --batch --signal=USR2 "$2"
"""
OLD_JOB = 96  # the job's script starts one server only (an older tether's)

_FIND = _NEED + """
squeue --me -h -n @NAME@ -o "%i|%k|%T" 2>&1
"""


@dataclass
class SlurmJob(OverSSH):
    """A runtime as a Slurm job; ``login`` is the login node, as the user's ssh knows it."""

    OPTIONS: ClassVar[frozenset[str]] = frozenset({
        "gpus", "partition", "walltime", "account", "sbatch_args", "keep", "on_walltime",
        "node_access"})
    WHAT: ClassVar[str] = "a Slurm job on that login node"

    login: _ssh.SSHTarget
    opts: bootstrap.RemoteOptions
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    attach: bool = False
    consent: bootstrap.Consent | None = None
    job: JobInfo | None = None
    mode: str = ""
    ready: bool = False

    @classmethod
    def create(cls, target: _ssh.SSHTarget, opts: bootstrap.RemoteOptions,
               options: Mapping[str, Any], attach: bool,
               consent: bootstrap.Consent | None) -> SlurmJob:
        job = SlurmOptions(
            gpus=options.get("gpus"), partition=options.get("partition"),
            time=options.get("walltime"), account=options.get("account"),
            sbatch_args=tuple(options.get("sbatch_args") or ()),
            keep=bool(options.get("keep")) or attach,
            node_access=options.get("node_access") or "auto",
            on_walltime=options.get("on_walltime"),
            walltime_signal=options.get("walltime_signal") or 300)
        return cls(target, opts, job, attach=attach, consent=consent)

    @property
    def host(self) -> str:
        return self.login.host

    @property
    def target(self) -> _ssh.SSHTarget:
        return self.login

    def flags(self) -> tuple[str, ...]:
        return ("--slurm",)

    def share(self, target: _ssh.SSHTarget) -> None:
        self.login = target

    # -- talking to the login node

    async def _sh(self, script: str, *args: str, input: bytes | None = None,
                  timeout: float = 60.0) -> _ssh.Completed:
        done = await _ssh.run(self.login, ["sh", "-c", script, "sh", *args], input=input,
                              timeout=timeout, check=False)
        if done.returncode == NO_SLURM:
            missing = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["sbatch"]
            raise SlurmError(f"{self.host} has no `{missing[0]}` on its PATH: it is not a Slurm "
                             "login node (or Slurm is not in a non-interactive shell's PATH)",
                             hint=f"Check `ssh {self.host} sbatch --version`; without --slurm, "
                                  "tether runs the runtime on the host itself.", host=self.host)
        if done.returncode == _ssh.SSH_FAILED:
            raise _ssh.ssh_error(self.login, "Slurm", done.returncode, done.stderr)
        return done

    async def poll(self, job_id: str, nonce: str) -> tuple[JobInfo, list[dict[str, Any]], str]:
        done = await self._sh(_POLL.replace("@ROOT@", REMOTE_LAYOUT.root_expr()), nonce, job_id)
        text = done.text
        head, _, rest = text.partition("@@tether-state\n")
        states_text, _, log_tail = rest.partition("@@tether-log\n")
        return JobInfo.from_scontrol(job_id, head), server_states(states_text), log_tail

    async def find_jobs(self) -> list[JobInfo]:
        """Our jobs (name and comment) of this user still in the queue, newest first."""
        done = await self._sh(_FIND.replace("@NAME@", JOB_NAME))
        jobs = []
        for line in done.text.splitlines():
            job_id, _, rest = line.strip().partition("|")
            comment, _, state = rest.partition("|")
            if job_id.isdigit() and comment.startswith(COMMENT_PREFIX):
                jobs.append(JobInfo(job_id, state, comment=comment))
        return sorted(jobs, key=lambda j: int(j.job_id), reverse=True)

    # -- Backend

    async def start(self, on_event: OnEvent, on_note: OnNote) -> Placement:
        if self.attach:
            jobs = [j for j in await self.find_jobs() if j.state in ("RUNNING", "PENDING")]
            if not jobs:
                raise ServerNotFoundError(f"no tether job is queued or running on {self.host}",
                                          hint=f"Start one with `tether up {self.host} --slurm`.",
                                          host=self.host)
            self.job, nonce = jobs[0], jobs[0].nonce
        else:
            node = await self._first_node()  # not a login node: say so before anything else
            prepared = bootstrap.prepare(self.login, self.opts, on_event=on_event,
                                         consent=self.consent)
            _, (self.mode, note) = await both(prepared, self._choose_mode(node))
            nonce = secrets.token_hex(8)
            self.job = await self._submit(nonce, on_event)
            if note:  # once Slurm took the job: a refused one gets Slurm's error alone
                on_note(note)
        return await self._wait_running(self.job.job_id, nonce, on_event, on_note)

    async def _submit(self, nonce: str, on_event: OnEvent) -> JobInfo:
        t0 = time.monotonic()
        label = f"submitting the runtime job on {self.host}"
        on_event({"event": "step", "key": "submit", "state": "start", "label": label})
        script = job_script(nonce, self.opts, self.slurm, self.mode)
        args = self.slurm.sbatch(JOB_NAME, COMMENT_PREFIX + nonce)
        done = await self._sh(_SUBMIT.replace("@ROOT@", REMOTE_LAYOUT.root_expr()), nonce, *args,
                              input=script.encode())
        job_id = done.text.strip().split(";")[0]
        if done.returncode != 0 or not job_id.isdigit():
            said = done.stderr.decode(errors="replace").strip().splitlines()
            message = said[-1] if said else f"exit status {done.returncode}"
            message = message.removeprefix("sbatch: error: ")
            raise SlurmError(f"Slurm on {self.host} refused the job: {message}",
                             hint="Check the resource flags (--gpus, --partition, --time, "
                                  "--account, --sbatch-arg) against `sinfo` there.",
                             host=self.host, stderr="\n".join(said[-5:]))
        on_event({"event": "step", "key": "submit", "state": "done", "label":
                  f"submitted job {job_id} on {self.host}",
                  "seconds": round(time.monotonic() - t0, 2)})
        return JobInfo(job_id, "PENDING", comment=COMMENT_PREFIX + nonce)

    async def _reports(self, job_id: str, nonce: str, skip: str = ""
                       ) -> AsyncIterator[tuple[JobInfo, list[dict[str, Any]], str]]:
        """What the waiting script on the login node reports: (job, server states, log tail);
        ``skip``: the pid of a server whose state file does not count (the one replaced)."""
        script = _WAIT.replace("@ROOT@", REMOTE_LAYOUT.root_expr())
        proc = await _ssh.spawn(self.login, self.login.argv(
            command=["sh", "-c", script, "sh", nonce, job_id, skip]),
            stdin=asyncio.subprocess.DEVNULL)
        assert proc.stdout is not None
        job_line = ""
        try:
            while raw := await asyncio.wait_for(proc.stdout.readline(), REPORT_DEADLINE):
                line = raw.decode(errors="replace").rstrip("\n")
                if line.startswith("@@job "):
                    job_line = line[len("@@job "):]
                elif line.startswith("@@state "):
                    states = server_states(line[len("@@state "):])
                    job = JobInfo.from_scontrol(job_id, job_line)
                    if not job.ended:  # an ended job's report comes with its log, next line
                        yield job, states, ""
                elif line.startswith("@@log "):
                    yield (JobInfo.from_scontrol(job_id, job_line), [],
                           line[len("@@log "):].replace("\r", "\n"))
        except asyncio.TimeoutError:
            log.info("no word on job %s from %s for %.0f s", job_id, self.host, REPORT_DEADLINE)
        finally:
            await _ssh.terminate(proc)
        if proc.returncode == NO_SLURM:
            await self._sh(_NEED)  # raises the one clear error
        if proc.returncode == _ssh.SSH_FAILED:
            stderr = await proc.stderr.read() if proc.stderr else b""
            raise _ssh.ssh_error(self.login, "waiting for the job", proc.returncode, stderr)

    async def _wait_running(self, job_id: str, nonce: str, on_event: OnEvent,
                            on_note: OnNote, skip: str = "", first: bool = True) -> Placement:
        """Until the job's server has written its state file (bounded once the job runs);
        ``skip``: the pid of a server being replaced; ``first``: the job's first server."""
        t0 = time.monotonic()
        running_since: float | None = None
        last_state = ("", "")
        for _ in range(STREAM_RETRIES):
            async for job, states, log_tail in self._reports(job_id, nonce, skip):
                self.job = job
                if job.ended:
                    raise self._ended(job, log_tail, before_ready=first)
                if job.state == "RUNNING" and states:
                    server = ServerInfo.from_payload(self.host, _newest(states))
                    self.mode = "jump" if server.sock else "forward"
                    on_event({"event": "step", "key": "queue", "state": "done",
                              "label": f"job {job_id} running on {job.node}",
                              "seconds": round(time.monotonic() - t0, 2)})
                    placement = await self._placement(server, job)
                    self.ready = True
                    return placement
                if job.state == "RUNNING" and running_since is None:
                    running_since = time.monotonic()
                if running_since is not None and \
                        time.monotonic() - running_since > READY_DEADLINE:
                    raise SlurmError(
                        f"job {job_id} runs on {job.node} but its server was not ready after "
                        f"{READY_DEADLINE:.0f} s",
                        hint=f"See {job_dir_expr(nonce)}/job.log on {self.host}; "
                             f"`tether down {self.host} --slurm` cancels the job.",
                        host=self.host)
                waiting = describe_wait(job, time.monotonic() - t0) if job.state == "PENDING" \
                    else f"job {job_id} {job.state.lower()} on {job.node or '?'}: starting " \
                         "the server"
                on_event({"event": "step", "key": "queue", "state": "start", "label": waiting})
                if (job.state, job.reason) != last_state:
                    on_event({"event": "queue", "job": job_id, "state": job.state,
                              "reason": job.reason, "expected_start": iso_start(job.start),
                              "label": waiting})
                    last_state = (job.state, job.reason)
        raise SlurmError(f"lost track of job {job_id} on {self.host} (the login node stopped "
                         "answering)", hint=f"`tether attach {self.host} --slurm` finds it "
                                            f"again; `tether down {self.host} --slurm` cancels "
                                            "it.",
                         host=self.host)

    def _ended(self, job: JobInfo, log_tail: str, before_ready: bool) -> SlurmJobEndedError:
        said = [ln for ln in log_tail.splitlines() if ln.strip()]
        why = next((ln.split("tether-error: ", 1)[1] for ln in said if "tether-error: " in ln),
                   "")
        when = "before its server was ready" if before_ready else "while attached"
        reason = f" ({job.reason})" if job.reason and job.reason != "None" else ""
        message = f"job {job.job_id} on {self.host} ended {when}: {job.state}{reason}"
        if why:
            message += f": {why}"
        elif said and before_ready:
            message += "\n  job log (tail):\n" + "\n".join("    " + ln for ln in said[-8:])
        return SlurmJobEndedError(message, hint=f"`tether up {self.host} --slurm` submits a "
                                                "new one.", host=self.host, job=job.job_id,
                                  state=job.state)

    async def _placement(self, server: ServerInfo, job: JobInfo) -> Placement:
        warnings = ((f"job {job.job_id}'s server on HOST runs tether {server.version}, older "
                     f"than this one ({__version__}); `tether restart HOST --slurm` starts the "
                     "new one without losing the running kernels",)
                    if self.attach and contract.older(server.version, __version__) else ())
        result = UpResult(server, reused=self.attach, warnings=warnings)
        node = job.node.split(",")[0]
        if self.mode == "jump":
            return Placement(result, await self._node_target(node))
        return Placement(result, self.login, remote_host=node)

    async def _node_target(self, node: str) -> _ssh.SSHTarget:
        """``ssh NODE`` as the user's config has it if it says how to get there, else through
        the login node: over the connection `up` holds to it where there is one (``-W`` through
        the ControlMaster: no second login there, so no second password or 2FA prompt), else
        ``-J LOGIN``."""
        # same options and remote_env; not the login node's ControlMaster (another host)
        base = dataclasses.replace(self.login, host=node, control_path="")
        if await _configured_proxy(base):
            return base
        if self.login.control_path:
            hop = self.login.argv("-W", "@HOST@:@PORT@")  # ssh expands %h and %p, and only them
            command = shlex.join(hop).replace("%", "%%")
            command = command.replace("@HOST@", "%h").replace("@PORT@", "%p")
            return dataclasses.replace(base, options=(*self.login.options,
                                                      f"ProxyCommand={command}"))
        return dataclasses.replace(base, options=(*self.login.options,
                                                  f"ProxyJump={self.login.host}"))

    async def _first_node(self) -> str:
        """A node of the partition (to try SSH to); checks that this is a login node."""
        part = f" -p {shlex.quote(self.slurm.partition)}" if self.slurm.partition else ""
        done = await self._sh(_NEED + f"\nsinfo -h -N -o %N{part} | head -n 1")
        return done.text.strip()

    async def _choose_mode(self, node: str) -> tuple[str, str]:
        """How the laptop reaches the job's node, and the note to give once the job is in."""
        if self.slurm.node_access != "auto":
            return self.slurm.node_access, ""
        if node and await _reachable(await self._node_target(node)):
            return "jump", ""
        why = (f"SSH to the nodes of {self.host} is refused ({node})" if node else
               f"Slurm on {self.host} listed no node to try SSH to")
        return "forward", (
            f"{why}: the runtime listens on a port of its node, reached through the login node; "
            "anyone on the cluster network can reach that port, and the URL's token is the only "
            "guard (--node-access jump if the nodes take SSH once you hold a job there).")

    async def restart(self, token: str, on_event: OnEvent) -> Placement:
        """The server does not answer: the job starts its server again after a crash, and
        `tether restart` asks it for a new one; wait (bounded) for it. The job ended (its
        server stopped on purpose ends it): supervision ends, with why."""
        assert self.job is not None
        placement = await self._wait_running(self.job.job_id, self.job.nonce, on_event,
                                             lambda text: None, first=False)
        if placement.result.server.token != token:  # (the job's token file is fixed)
            raise SlurmError(f"job {self.job.job_id} on {self.host} serves another token",
                             hint=f"Run `tether attach {self.host} --slurm`.", host=self.host)
        return placement

    async def restart_server(self, on_event: OnEvent) -> RestartResult:
        """A new server in our running job: prepared on the login node as `up` does (the home
        is shared), its serve script written beside the job's, then asked of the job script
        (USR2); the kernels outlive the old server and the new one adopts them."""
        job = await self._running_job()
        job, states, _ = await self.poll(job.job_id, job.nonce)
        old = _newest(states) if states else {}
        running, kernels = await self._serving(job.job_id, job.nonce)
        self.opts = restart_options(self.opts, running)
        mode = str(running.get("mode") or ("jump" if old.get("sock") else "forward"))
        await bootstrap.prepare(self.login, self.opts, on_event=on_event, consent=self.consent)
        script = serve_script(job.nonce, self.opts, mode)
        done = await self._sh(_ASK_RESTART.replace("@ROOT@", REMOTE_LAYOUT.root_expr()),
                              job.nonce, job.job_id, input=script.encode())
        if done.returncode != 0:
            raise SlurmError(f"could not signal job {job.job_id} on {self.host}: "
                             f"{done.stderr.decode(errors='replace').strip()[-300:]}",
                             host=self.host)
        self.job = job
        pid = str(old.get("pid") or "")
        placement = await self._wait_running(job.job_id, job.nonce, on_event, lambda text: None,
                                             skip=pid, first=False)
        return RestartResult(placement.result.server, (int(pid),) if pid else (),
                             str(old.get("version") or ""), tuple(kernels))

    async def _running_job(self) -> JobInfo:
        running = [j for j in await self.find_jobs() if j.state == "RUNNING"]
        if not running:
            raise ServerNotFoundError(f"no tether job is running on {self.host}",
                                      hint=f"Start one with `tether up {self.host} --slurm`.",
                                      host=self.host)
        return running[0]

    async def _serving(self, job_id: str, nonce: str) -> tuple[dict[str, Any], list[str]]:
        """The options the job's server runs with; the ids of the kernels it leaves behind."""
        done = await self._sh(_SERVING.replace("@ROOT@", REMOTE_LAYOUT.root_expr())
                              .replace("@OLD@", str(OLD_JOB)), nonce)
        if done.returncode == OLD_JOB:
            raise SlurmError(f"job {job_id} on {self.host} was started by an older tether, "
                             "whose job runs one server only", host=self.host,
                             hint=f"`tether down {self.host} --slurm` then `tether up "
                                  f"{self.host} --slurm` starts a job that can restart it "
                                  "(its kernels end with the old job).")
        head, _, rest = done.text.partition("@@kernels\n")
        try:
            options = json.loads(head.strip() or "{}")
        except ValueError:
            options = {}
        return (options if isinstance(options, dict) else {}), rest.split()

    async def socket_refused(self, on_event: OnEvent) -> Placement | None:
        return None  # the job's socket is the job's: `--node-access forward` is the way

    async def watch(self, info: dict[str, Any], on_note: OnNote) -> None:
        """Walltime on the status line, warnings at 15 and 5 minutes, the end of the job."""
        assert self.job is not None
        warned: set[int] = set()
        info["job"] = self.job.job_id
        while True:
            job, _, log_tail = await self.poll(self.job.job_id, self.job.nonce)
            self.job = job
            if job.ended:
                raise self._ended(job, log_tail, before_ready=False)
            left = job.time_left
            info["left"] = f"{duration(left, coarse=True)} left" if left is not None else ""
            for mark in WARN_BEFORE:
                if left is not None and left <= mark and mark not in warned:
                    warned.update(m for m in WARN_BEFORE if m >= mark)
                    on_note(f"job {job.job_id} on {self.host}: {duration(left)} of walltime left; "
                            "save your work (kernels are released "
                            f"{self.slurm.walltime_signal // 60 or 1} min before the end).")
            await asyncio.sleep(WATCH_INTERVAL)

    def record(self) -> dict[str, Any]:
        return {"kind": "slurm", "job": self.job.job_id if self.job else "",
                "node_access": self.mode or self.slurm.node_access}

    def on_ctrl_c(self) -> str:
        job = f"job {self.job.job_id}" if self.job else "the job"
        if self.slurm.keep:
            return (f"Ctrl-C detaches: {job} keeps running, with the server and kernels, until "
                    "its walltime (the command that stops it is printed then).")
        return (f"Ctrl-C cancels {job}: the server and its kernels end with it (--keep "
                "detaches instead).")

    def leaving(self) -> str:
        if self.slurm.keep:
            return ""
        job = self.job.job_id if self.job else "the job"
        return (f"Cancelled job {job} on {self.host} (its kernels ended with it); with --keep, "
                "Ctrl-C detaches and leaves the job running.")

    async def abandon(self) -> None:
        """Ctrl-C: the job goes unless --keep (a job kept on purpose outlives the laptop)."""
        if self.slurm.keep or self.job is None or self.job.ended:
            return
        await self._cancel([self.job.job_id])

    async def _cancel(self, job_ids: Sequence[str]) -> list[str]:
        """scancel, then wait (bounded) until Slurm lists none of them; the ones left."""
        if not job_ids:
            return []
        await self._sh(_NEED + '\nscancel "$@"', *job_ids)
        deadline = time.monotonic() + CANCEL_DEADLINE
        left = list(job_ids)
        while left and time.monotonic() < deadline:
            jobs = {j.job_id: j for j in await self.find_jobs()}
            left = [j for j in left if j in jobs and jobs[j].state not in ENDED]
            if left:
                await asyncio.sleep(0.5)
        return left

    async def stop(self) -> Report:
        jobs = await self.find_jobs()
        ids = [j.job_id for j in jobs if j.state not in ENDED]
        left = await self._cancel(ids)
        cancelled = [j for j in ids if j not in left]
        lines = []
        if not cancelled and not left:
            lines.append(f"No tether job was queued or running on {self.host}.")
        elif cancelled:
            lines.append(f"Cancelled job(s) {', '.join(cancelled)} on {self.host}; Slurm lists "
                         "none of them any more.")
        problem = TetherError(
            f"job(s) {', '.join(left)} on {self.host} are still listed after scancel",
            hint=f"`ssh {self.host} squeue --me` shows them; ask the admins if they hang in "
                 "COMPLETING.") if left else None
        return Report({"cancelled": cancelled, "left": left,
                       "jobs": [{"job": j.job_id, "state": j.state} for j in jobs]},
                      tuple(lines), problem)

    async def status(self) -> Report:
        jobs = await self._jobs()
        return Report({"jobs": jobs}, _status_lines(self.host, jobs))

    async def _jobs(self) -> list[dict[str, Any]]:
        jobs = []
        for found in await self.find_jobs():
            job, states, _ = await self.poll(found.job_id, found.nonce)
            jobs.append({"job": job.job_id, "state": job.state, "reason": job.reason,
                         "node": job.node, "time_left": job.time_left, "gres": job.gres,
                         "expected_start": iso_start(job.start) if job.state == "PENDING" else "",
                         "server": {k: v for k, v in (_newest(states) if states
                                                      else {}).items() if k != "token"}})
        return jobs

    async def running(self) -> str:
        jobs = [j for j in await self.find_jobs() if j.state == "RUNNING"]
        return f"job {jobs[0].job_id} running" if jobs else ""

    def kernels(self) -> Kernels:
        return RemoteKernels(self.host, self._in_job)

    async def _in_job(self, args: list[str]) -> tuple[int, str]:
        """The remote ``tether`` inside our running job's allocation (``srun --overlap``)."""
        job = await self._running_job()
        env = REMOTE_LAYOUT.env.format(version=__version__)
        script = (f'r={REMOTE_LAYOUT.root_expr()}; '
                  f'JUPYTER_RUNTIME_DIR="$r/slurm/{job.nonce}" '
                  f'{contract.SCOPE_ENV}="$r/slurm/{job.nonce}" exec "$r/{env}/bin/tether" "$@"')
        argv = ["srun", f"--jobid={job.job_id}", "--overlap", "--ntasks=1", "--quiet", "sh",
                "-c", script, "tether", *args]
        done = await _ssh.run(self.login, argv, timeout=120.0, check=False)
        if done.returncode == _ssh.SSH_FAILED or (done.returncode and not done.stdout.strip()):
            raise _ssh.ssh_error(self.login, f"tether {args[0]} in job {job.job_id}",
                                 done.returncode, done.stderr)
        return done.returncode, done.text


def _status_lines(host: str, jobs: list[dict[str, Any]]) -> tuple[str, ...]:
    if not jobs:
        return (f"{host}: no tether job queued or running.",)
    lines = []
    for job in jobs:
        left = job.get("time_left")
        walltime = f", {duration(left)} of walltime left" if left is not None else ""
        where = f" on {job['node']}" if job.get("node") else ""
        reason = f" ({job['reason']})" if job.get("state") == "PENDING" and job.get("reason") \
            else ""
        if job.get("state") == "PENDING" and expected_start(job.get("expected_start", "")):
            reason += f", expected start {expected_start(job['expected_start'])}"
        server = job.get("server") or {}
        served = (f", server pid {server.get('pid')}" if server.get("pid") else "")
        lines.append(f"{host}: job {job['job']} {job['state']}{reason}{where}{walltime}"
                     f"{', ' + job['gres'] if job.get('gres') else ''}{served}")
    return tuple(lines)


def server_states(text: str) -> list[dict[str, Any]]:
    """The server state files the remote scripts print, each ended by ``@@`` (a file caught
    while being written is skipped: the next report has it whole)."""
    states = []
    for chunk in text.split("@@"):
        try:
            state = json.loads(chunk)
        except ValueError:
            continue
        if isinstance(state, dict):
            states.append(state)
    return states


def _newest(states: list[dict[str, Any]]) -> dict[str, Any]:
    return max(states, key=lambda state: float(state.get("started") or 0.0))


async def _configured_proxy(target: _ssh.SSHTarget) -> bool:
    """Whether the user's ssh config says how to reach ``target`` (ProxyJump/ProxyCommand)."""
    argv = target.argv("-G")
    proc = await _ssh.spawn(target, argv, stdin=asyncio.subprocess.DEVNULL)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), PROBE_TIMEOUT)
    except asyncio.TimeoutError:
        return False
    finally:
        await _ssh.terminate(proc)
    for line in out.decode(errors="replace").splitlines():
        key, _, value = line.partition(" ")
        if key in ("proxyjump", "proxycommand") and value.strip() not in ("", "none"):
            return True
    return False


async def _reachable(target: _ssh.SSHTarget) -> bool:
    try:
        done = await _ssh.run(target, ["true"], timeout=PROBE_TIMEOUT, check=False)
    except SSHError:
        return False
    return done.returncode == 0


async def both(first: Awaitable[Any], second: Awaitable[T]) -> tuple[Any, T]:
    """Run two steps at once; the first failure cancels the other and is raised as itself."""
    tasks = [asyncio.ensure_future(first), asyncio.ensure_future(second)]
    try:
        done = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return done[0], done[1]
