"""Files on the laptop that only their user may read: tether's folders and the files in them.

Creating a folder with ``mode=0o700`` does nothing to one that already exists (made 0755 by
another tool, or by an older tether), and ``O_CREAT`` keeps the mode of an existing file: so each
folder is checked and tightened, and each file is written anew, never through a link.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tether.errors import ConfigError

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def private_dir(path: Path, upto: Path | None = None) -> Path:
    """Make ``path`` (and each folder between ``upto`` and it) exist as 0700 and this user's.

    A folder of another user is refused: nothing of tether's goes where someone else decides
    who reads it."""
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    folders = [path]
    if upto is not None and upto in path.parents:
        folders += [p for p in path.parents if p == upto or upto in p.parents]
    for folder in folders:
        info = folder.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            raise ConfigError(f"{folder} is not a folder of yours",
                              hint=f"Move it away (`mv {folder} {folder}.old`) and run the "
                                   "command again.")
        if stat.S_IMODE(info.st_mode) & 0o077:
            os.chmod(folder, PRIVATE_DIR)
    return path


def write_private(path: Path, data: str) -> None:
    """Write ``path`` as a new 0600 file (an existing file or link of that name is replaced)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, PRIVATE_FILE)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), PRIVATE_FILE)  # whatever the umask
        f.write(data)
