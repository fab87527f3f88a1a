"""Package boundaries: the remote half never pulls in the local side."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import tether.remote

LOCAL_SIDE = ("tether.cli", "tether._ssh", "tether.tunnel", "tether.session", "tether.bootstrap",
              "click", "rich")


def test_remote_never_imports_the_local_side():
    modules = [m.name for m in pkgutil.walk_packages(tether.remote.__path__, "tether.remote.")
               if "shim" not in m.name]
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                       text=True, check=True).stdout)
    leaked = [m for m in loaded if m.split(".")[0] in LOCAL_SIDE or m.startswith(LOCAL_SIDE)]
    assert not leaked


def test_public_api_is_small():
    import tether

    assert set(tether.__all__) == {"TetherError", "__version__", "release", "load_ipython_extension"}
