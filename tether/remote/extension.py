"""The jupyter_server extension: makes any Jupyter server in this environment Colab-ready.

Enabled automatically on install (``etc/jupyter/jupyter_server_config.d/tether.json``), so a
``jupyter server`` or ``jupyter lab`` started by hand gets the same CORS, preflight, ``/api/colab``,
bridge and life-cycle endpoints as ``tether serve``.
"""

from __future__ import annotations

import atexit
import os
import re
import time
from typing import Any

from traitlets import Bool, List, Unicode
from traitlets.config import LoggingConfigurable

from tether import __version__
from tether.config import COLAB_ORIGIN, check_origin
from tether.remote import bridge, colab
from tether.remote.state import ServerState, remove_state, write_state


# ``tether serve`` puts a callable here to learn when the server is bound and its state written
READY_CALLBACK = "tether_on_ready"


class Tether(LoggingConfigurable):
    """Settings of the tether extension (``c.Tether.*`` in a Jupyter config file)."""

    origins = List(
        Unicode(),
        default_value=[COLAB_ORIGIN],
        help="Exact browser origins allowed to use this server (CORS and websockets).",
    ).tag(config=True)

    bridge = Bool(
        True, help="Serve the legacy HTTP-over-WebSocket protocol (jupyter_http_over_ws 0.0.7)."
    ).tag(config=True)


def origin_pattern(origins: list[str]) -> str:
    """An anchored regex matching exactly these origins (jupyter_server takes one pattern)."""
    return "^(" + "|".join(re.escape(o) for o in origins) + ")$"


def server_state(serverapp: Any, origins: list[str]) -> ServerState:
    base = serverapp.connection_url
    if not serverapp.sock:
        host = "[::1]" if ":" in serverapp.ip else "127.0.0.1"
        base = f"http://{host}:{serverapp.port}{serverapp.base_url}"
    return ServerState(
        pid=os.getpid(),
        url=base,
        token=serverapp.identity_provider.token,
        port=0 if serverapp.sock else serverapp.port,
        sock=serverapp.sock or "",
        base_url=serverapp.base_url,
        root_dir=os.path.abspath(serverapp.root_dir),
        version=__version__,
        origins=tuple(origins),
        started=time.time(),
    )


def _load_jupyter_server_extension(serverapp: Any) -> None:
    settings = Tether(parent=serverapp)
    origins = [check_origin(o) for o in settings.origins]
    web_app = serverapp.web_app
    # jupyter_server checks Origin on websockets and non-GET requests from these settings;
    # tether's list wins over anything wider set by hand.
    web_app.settings["allow_origin"] = ""
    web_app.settings["allow_origin_pat"] = re.compile(origin_pattern(origins))
    web_app.settings["allow_credentials"] = True
    colab.install_cors(web_app, origins)

    base_url = serverapp.base_url
    handlers = colab.handlers(base_url)
    if settings.bridge:
        handlers += bridge.handlers(base_url)
    web_app.add_handlers(".*$", handlers)

    serverapp.log.info("tether %s: Colab-ready for %s", __version__, ", ".join(origins))


async def _start_jupyter_server_extension(serverapp: Any) -> None:
    # Runs once the loop is up and the port is bound (port 0 is resolved by then).
    origins = Tether(parent=serverapp).origins
    runtime_dir = serverapp.runtime_dir
    state = server_state(serverapp, origins)
    write_state(state, runtime_dir)
    atexit.register(remove_state, state.pid, runtime_dir)
    on_ready = serverapp.web_app.settings.get(READY_CALLBACK)
    if on_ready is not None:
        on_ready(state)
