"""tether: any machine you can SSH into as a Colab-ready Jupyter runtime.

The public API is small on purpose: the version, and :func:`release` for use inside a
notebook (``import tether; tether.release()``), the clean replacement for ``exit()``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from tether.errors import TetherError
from tether.remote.kernel_helper import release

__all__ = ["TetherError", "__version__", "release", "load_ipython_extension"]


def load_ipython_extension(ipython: object) -> None:
    """``%load_ext tether`` registers the ``%release`` magic."""
    from tether.remote.kernel_helper import load_ipython_extension as _load

    _load(ipython)
