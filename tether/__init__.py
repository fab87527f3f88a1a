"""tether: any machine you can SSH into as a Colab-ready Jupyter runtime.

The public API is small on purpose: the version, and :func:`release` for use inside a
notebook (``import tether; tether.release()``), the clean replacement for ``exit()``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from tether.errors import TetherError

__all__ = ["TetherError", "__version__", "release", "load_ipython_extension"]


def release(force: bool = False) -> str:
    """Release this kernel (in a notebook): the clean replacement for ``exit()``; see
    :func:`tether.remote.kernel_helper.release`. Imported when called: ``import tether`` stays
    light for every command that does not (its HTTP client costs ~40 ms to import)."""
    from tether.remote.kernel_helper import release as _release

    return _release(force)


def load_ipython_extension(ipython: object) -> None:
    """``%load_ext tether`` registers the ``%release`` magic."""
    from tether.remote.kernel_helper import load_ipython_extension as _load

    _load(ipython)
