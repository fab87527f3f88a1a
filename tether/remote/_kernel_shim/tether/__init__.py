# mypy: ignore-errors
# (runs in any kernel Python >= 3.7, not only tether's own: kept plain on purpose)
"""A stand-in ``tether`` for kernels whose Python lacks the real package.

tether's server appends this directory to each kernel's ``PYTHONPATH`` so that
``import tether; tether.release()`` works in any Python. A real tether installed in the kernel's
Python wins: this module looks for it past its own directory and, if found, loads that instead.
Otherwise it serves ``release`` and ``load_ipython_extension`` from the server's
``tether/remote/kernel_helper.py`` (standard library only).
"""

import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HELPER = os.path.join(os.path.dirname(_HERE), "kernel_helper.py")


def _real_tether():
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    try:
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find("tether", None) if find else None
            if spec is not None and spec.origin != __file__:
                return spec
    finally:
        sys.path[:] = saved
    return None


def _load(name, spec):
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_spec = _real_tether()
if _spec is not None and _spec.loader is not None:
    _load("tether", _spec)  # the import system hands out sys.modules["tether"]: the real one
else:
    _helper = _load("tether._kernel_helper",
                    importlib.util.spec_from_file_location("tether._kernel_helper", _HELPER))
    release = _helper.release
    load_ipython_extension = _helper.load_ipython_extension
    __all__ = ["release", "load_ipython_extension"]
