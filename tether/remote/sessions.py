"""Sessions that outlive their server, with the kernels they belong to (tether.remote.adopt)."""

from __future__ import annotations

import logging
from typing import Any

from jupyter_server.services.sessions.sessionmanager import SessionManager

from tether.remote import adopt

log = logging.getLogger(__name__)


class KeptSessionManager(SessionManager):
    """jupyter_server's session manager, with each kernel's sessions kept in its file: a server
    that adopts the kernel gives the notebook the same session (same id, same path)."""

    runtime_dir = ""  # set by the extension (a hand-started server keeps no sessions)

    async def save_session(self, session_id: str, path: str | None = None,
                           name: str | None = None, type: str | None = None,
                           kernel_id: str | None = None) -> Any:
        model = await super().save_session(  # type: ignore[no-untyped-call]
            session_id, path=path, name=name, type=type, kernel_id=kernel_id)
        self.remember(kernel_id)
        return model

    async def update_session(self, session_id: str, **kwargs: Any) -> None:
        before = self._kernel_of(session_id)
        await super().update_session(session_id, **kwargs)  # type: ignore[no-untyped-call]
        for kernel_id in {before, self._kernel_of(session_id)}:
            self.remember(kernel_id)

    async def delete_session(self, session_id: str) -> None:
        kernel_id = self._kernel_of(session_id)
        await super().delete_session(session_id)  # type: ignore[no-untyped-call]
        self.remember(kernel_id)

    def _kernel_of(self, session_id: str) -> str | None:
        row = self.cursor.execute("SELECT kernel_id FROM session WHERE session_id=?",
                                  [session_id]).fetchone()
        return str(row[0]) if row else None

    def sessions_of(self, kernel_id: str) -> tuple[dict[str, Any], ...]:
        rows = self.cursor.execute("SELECT session_id, path, name, type FROM session "
                                   "WHERE kernel_id=?", [kernel_id]).fetchall()
        return tuple({"session_id": r[0], "path": r[1], "name": r[2], "type": r[3]}
                     for r in rows)

    def remember(self, kernel_id: str | None) -> None:
        if self.runtime_dir and kernel_id:
            try:
                adopt.update(self.runtime_dir, kernel_id, sessions=self.sessions_of(kernel_id))
            except OSError as e:
                log.warning("kernel %s: cannot keep its sessions: %s", kernel_id, e)
