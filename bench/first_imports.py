#!/usr/bin/env python3
"""Write ``tether/first-imports.txt``: the modules a ``tether serve`` start imports from its
environment, in the order it compiles them, as paths under site-packages.

On a fresh environment (no bytecode: uv writes none on hosts with few cores) the remote writes
their bytecode from the last to the first while the server starts, which compiles from the first
(:func:`tether.host.compile_first_imports`). Run this after a dependency changes what the
server imports; a stale list costs only what it misses. Usage: ``python bench/first_imports.py``.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "tether" / "first-imports.txt"
DEADLINE = 60.0


def first_imports() -> list[str]:
    roots = [Path(sysconfig.get_paths()["purelib"]), HERE.parent]  # site-packages; tether here
    with tempfile.TemporaryDirectory(prefix="tether-first-imports-") as prefix:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = prefix
        proc = subprocess.Popen([sys.executable, "-m", "tether", "serve", "--port", "0",
                                 "--json"], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        assert proc.stdout is not None
        ready = select.select([proc.stdout], [], [], DEADLINE)[0]
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        if not ready:
            raise SystemExit("tether serve printed no JSON line")
        compiled = sorted(Path(prefix).rglob("*.pyc"), key=lambda p: p.stat().st_mtime_ns)
        names = []
        for pyc in compiled:
            source = Path("/", pyc.relative_to(prefix)).parent / (pyc.name.split(".")[0] + ".py")
            for root in roots:
                if source.is_relative_to(root) and source.exists():
                    names.append(source.relative_to(root).as_posix())
                    break
    return names


def main() -> None:
    names = first_imports()
    OUT.write_text("# written by bench/first_imports.py: what `tether serve` compiles at its "
                   "first start, in order\n" + "\n".join(names) + "\n")
    print(f"{OUT}: {len(names)} modules")


if __name__ == "__main__":
    main()
