"""One cgroup v2 per kernel, where the machine lets us: a kill that cannot miss a process.

A kernel's processes can drop tether's environment marker (``env -i``) and leave its process
group (``setsid``); what they cannot leave is their cgroup (only its owner can move them out).
So, where this user may create cgroups below the server's own (root, or a subtree delegated to
the user, e.g. by systemd's ``user@.service``), each kernel is started inside
``<mount><server's cgroup>/tether-<instance>/kernel-<id>``: a tiny ``sh`` wrapper writes its own
pid to ``cgroup.procs`` and then execs the kernel, so no process of the kernel ever runs outside
it. The sweep then empties the cgroup (``cgroup.kill`` where the kernel has it, else SIGKILL to
every member while it is frozen) and removes it.

Everything here is blocking (``/sys/fs/cgroup`` reads and bounded waits): call it off the loop.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import time
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

PREFIX = "tether-"
KERNEL_PREFIX = "kernel-"
# The launch wrapper: into the cgroup first, then exec (same pid), so nothing starts outside it
WRAPPER = 'echo $$ > "$1" || exit 125; shift; exec "$@"'
WRAPPER_NAME = "tether-kernel-launch"
NO_CGROUP = "no kernel cgroup here (a process that left the kernel's group would go unseen)"
KILL_ROUNDS = 20


def _mountinfo_v2(text: str) -> str:
    """The mount point of the cgroup2 hierarchy in /proc/self/mountinfo text ("" if none)."""
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if sep and right.split()[:1] == ["cgroup2"] and len(fields) >= 5:
            return fields[4].replace("\\040", " ")
    return ""


def _own_path(text: str) -> str | None:
    """This process's cgroup v2 path from /proc/self/cgroup text (the ``0::/path`` line)."""
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:].strip()
    return None


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def own_cgroup() -> str:
    """The directory of this process's cgroup v2, "" where there is none."""
    mount = _mountinfo_v2(_read("/proc/self/mountinfo"))
    own = _own_path(_read("/proc/self/cgroup"))
    if not mount or own is None or own.endswith(" (deleted)"):
        return ""
    path = os.path.normpath(mount + own)
    return path if os.path.isfile(os.path.join(path, "cgroup.procs")) else ""


def server_dir(instance: str) -> str:
    """Create the parent of this server's kernel cgroups; "" where this user may not."""
    own = own_cgroup()
    # moving a process needs write access to the common ancestor's cgroup.procs: our own
    if not own or not os.access(own, os.W_OK) or not os.access(
            os.path.join(own, "cgroup.procs"), os.W_OK):
        return ""
    path = os.path.join(own, PREFIX + instance)
    try:
        os.mkdir(path)
    except FileExistsError:
        pass
    except OSError as e:
        log.info("no kernel cgroups: cannot create %s: %s", path, e.strerror)
        return ""
    return path


def kernel_dir(parent: str, kernel_id: str) -> str:
    """A fresh, empty cgroup for one kernel under ``parent``; "" if it cannot be made."""
    path = os.path.join(parent, KERNEL_PREFIX + kernel_id)
    if os.path.isdir(path):
        empty(path, 5.0)  # a restart: what the previous kernel left
        remove(path)
    try:
        os.mkdir(path)
    except OSError as e:
        log.warning("kernel %s runs without its cgroup: cannot create %s: %s", kernel_id, path,
                    e.strerror)
        return ""
    return path


def wrap(cmd: list[str], path: str) -> list[str]:
    """The kernel's argv, started inside the cgroup at ``path``."""
    return ["/bin/sh", "-c", WRAPPER, WRAPPER_NAME, os.path.join(path, "cgroup.procs"), *cmd]


def _tree(path: str) -> Iterator[str]:
    """``path`` and every cgroup below it, deepest first (a kernel as root can nest its own)."""
    for root, dirs, _ in os.walk(path, topdown=False):
        for d in dirs:
            yield os.path.join(root, d)
    yield path


def members(path: str) -> list[int]:
    """Pids of every process in the cgroup at ``path`` and below it."""
    pids: list[int] = []
    if not path:
        return pids
    for cg in _tree(path):
        pids += [int(p) for p in _read(os.path.join(cg, "cgroup.procs")).split() if p.isdigit()]
    return pids


def populated(path: str) -> bool:
    """Whether any live process is in the cgroup or below it (False if it is gone)."""
    for line in _read(os.path.join(path, "cgroup.events")).splitlines():
        if line.startswith("populated "):
            return line.split()[1] != "0"
    return False


def _write(path: str, value: str) -> bool:
    try:
        with open(path, "w") as f:
            f.write(value)
        return True
    except OSError:
        return False


def wait_empty(path: str, timeout: float) -> bool:
    """Wait (bounded) until no process is left in the cgroup: cgroup.events wakes poll()."""
    deadline = time.monotonic() + timeout
    try:
        fd = os.open(os.path.join(path, "cgroup.events"), os.O_RDONLY)
    except OSError:
        return not os.path.isdir(path)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI | select.POLLERR)
        while populated(path):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            poller.poll(left * 1000)  # kernfs notifies a change of populated
        return True
    finally:
        os.close(fd)


def empty(path: str, timeout: float) -> list[int]:
    """End every process in the cgroup (bounded); the pids that were in it."""
    if not path or not os.path.isdir(path):
        return []
    found = members(path)
    if not found:
        return []
    if not _write(os.path.join(path, "cgroup.kill"), "1"):
        _kill_frozen(path)
    if not wait_empty(path, timeout):
        log.warning("cgroup %s still has processes after SIGKILL: %s", path, members(path))
    return found


def _kill_frozen(path: str) -> None:
    """No cgroup.kill (Linux < 5.14): freeze, SIGKILL every member, thaw; frozen, none forks."""
    frozen = _write(os.path.join(path, "cgroup.freeze"), "1")
    for _ in range(KILL_ROUNDS):
        pids = members(path)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # a member of our kernel's cgroup: ours
        if not frozen:
            wait_empty(path, 0.05)  # a fork in flight: look again shortly, bounded rounds
        else:
            break  # frozen tasks die on thaw; none could fork in between
    if frozen:
        _write(os.path.join(path, "cgroup.freeze"), "0")


def remove(path: str) -> bool:
    """Remove an emptied cgroup and any below it; False if one is still in use."""
    ok = True
    for cg in _tree(path):
        try:
            os.rmdir(cg)
        except FileNotFoundError:
            continue
        except OSError as e:
            if e.errno != errno.ENOENT:
                log.warning("cannot remove cgroup %s: %s", cg, e.strerror)
                ok = False
    return ok


def remove_stale(parent: str, alive: Callable[[str], bool]) -> list[str]:
    """Remove the empty cgroups that dead servers left beside ``parent`` (this server's).

    A server killed with SIGKILL leaves its ``tether-<instance>`` directory; one still holding
    processes is left alone (``tether down`` empties it from the state file's ``cgroup``)."""
    removed = []
    own = os.path.dirname(parent)
    with contextlib.suppress(OSError):
        for name in os.listdir(own):
            path = os.path.join(own, name)
            if (name.startswith(PREFIX) and path != parent and os.path.isdir(path)
                    and not alive(name[len(PREFIX):]) and not populated(path) and remove(path)):
                removed.append(path)
    return removed
