"""What runs for a host, as `tether up` left it: so that later commands need no backend flags.

After ``tether up LOGIN --slurm --keep`` and Ctrl-C, ``tether status LOGIN``, ``down``,
``attach``, ``ps``, ``release``, ``open`` and ``doctor`` find the job without ``--slurm`` (and with
the ssh options ``up`` was given, where they are given none). The record is a 0600 file per host
in the laptop's private state folder: the backend's own description (:meth:`Backend.record`)
plus the ssh options. ``up`` writes it once the runtime is ready; ``down`` and the end of the
runtime (a job cancelled by Ctrl-C, or ended) remove it. A record is a hint, never proof: the
backend still finds its runtime by what it recorded on the remote (a job's comment).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tether._private import write_private


@dataclass(frozen=True)
class RuntimeRecord:
    host: str
    backend: dict[str, Any]  # Backend.record(): {"kind": "slurm", "job": ..., ...}
    ssh_config: str | None = None
    ssh_options: tuple[str, ...] = ()
    written: float = field(default_factory=time.time)

    @property
    def kind(self) -> str:
        return str(self.backend.get("kind", ""))

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "backend": self.backend, "ssh_config": self.ssh_config,
                "ssh_options": list(self.ssh_options), "written": self.written}


def _path(host: str) -> Path:
    from tether.session import host_file

    return host_file("runtime", host)


def remember(record: RuntimeRecord) -> None:
    """Keep ``record`` for its host (a record of nothing special is no record: forgotten)."""
    if not record.kind:
        forget(record.host)
        return
    from tether.session import local_state_dir

    local_state_dir(create=True)
    write_private(_path(record.host), json.dumps(record.to_json()))


def recall(host: str) -> RuntimeRecord | None:
    """The record for ``host``, if `up` left one (an unreadable one counts as none)."""
    try:
        data = json.loads(_path(host).read_text())
        return RuntimeRecord(str(data["host"]), dict(data["backend"]), data.get("ssh_config"),
                             tuple(str(o) for o in data.get("ssh_options") or ()),
                             float(data.get("written") or 0.0))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def forget(host: str) -> None:
    _path(host).unlink(missing_ok=True)


def said(record: RuntimeRecord) -> str:
    """The line a command prints when it acts on what `up` recorded rather than on its flags."""
    return (f"{record.host}: the Slurm job `tether up {record.host} --slurm` started (job "
            f"{record.backend.get('job') or '?'}): acting on it, as with --slurm.")


def implied(host: str, slurm: bool, ssh_config: str | None, ssh_options: tuple[str, ...]
            ) -> tuple[RuntimeRecord | None, str | None, tuple[str, ...]]:
    """For a command that names ``host`` without backend flags: the record `up` left (None if
    the flags were given, or nothing special runs there), and the ssh options to reach it: the
    user's own where given, else those `up` was given."""
    record = None if slurm else recall(host)
    if record is None or record.kind != "slurm":
        return None, ssh_config, ssh_options
    if ssh_config or ssh_options:
        return record, ssh_config, ssh_options
    return record, record.ssh_config, record.ssh_options
