"""The remote half of tether: runs on the GPU machine, inside jupyter_server.

Nothing under ``tether.remote`` imports the local side (``tether.cli``, ``tether._ssh``,
``tether.tunnel``, ``tether.session``); a test enforces it.
"""

from __future__ import annotations

TYPE_CHECKING = False  # (typing is not imported at run time: tether.host pays per SSH call)
if TYPE_CHECKING:
    from typing import Any


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    return [{"module": "tether.remote.extension"}]
