"""The one local HTTP client: JSON to and from a tether server on ``127.0.0.1:PORT``.

tornado's :class:`~tornado.simple_httpclient.SimpleAsyncHTTPClient` (already a dependency)
with bounded connect and request timeouts. The token goes in the ``Authorization`` header,
never in the URL (URLs end up in logs). Colab's ``)]}'`` XSSI prefix is stripped.

Every answer with an HTTP status is a :class:`Reply`, whatever the status; no answer at all
(refused, closed, timed out) is a :class:`NoAnswer`, a :class:`~tether.errors.TunnelError`
carrying ``port``, ``path`` and ``reason``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from tether.errors import TunnelError

log = logging.getLogger(__name__)


class _ResetOnceFilter(logging.Filter):
    """tornado reports a connection reset by the server twice: as the fetch's exception (which
    :func:`request` turns into :class:`NoAnswer`) and as an ERROR with a traceback on its
    application log ("Exception after Future was cancelled", an internal read future). The
    second says nothing new and, where the server went on purpose (a Slurm job cancelled by
    Ctrl-C), reads as a crash: it is logged at DEBUG here instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.msg == "Exception after Future was cancelled" \
                and isinstance(exc, ConnectionError):
            log.debug("tornado: %s after the fetch ended: %r", record.msg, exc)
            return False
        return True


logging.getLogger("tornado.application").addFilter(_ResetOnceFilter())

TIMEOUT = 10.0
XSSI_PREFIX = b")]}'\n"
MAX_BODY = 16 << 20


@dataclass(frozen=True)
class Reply:
    """An HTTP answer: its status and its body decoded as JSON (None when it is not JSON)."""

    code: int
    body: Any = None

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300


class NoAnswer(TunnelError):
    """Nothing answered: ``reason`` is ``"refused"``, ``"closed"`` or ``"timeout"``."""


async def request(port: int, method: str, path: str, token: str, *, body: Any = None,
                  timeout: float = TIMEOUT) -> Reply:
    """``method path`` to 127.0.0.1:``port`` with the token; raises :class:`NoAnswer`."""
    from tornado.httpclient import HTTPClientError, HTTPRequest
    from tornado.simple_httpclient import (HTTPStreamClosedError, HTTPTimeoutError,
                                           SimpleAsyncHTTPClient)

    headers = {"Authorization": f"token {token}"} if token else {}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    elif method == "POST":
        data = b""
    req = HTTPRequest(f"http://127.0.0.1:{port}{path}", method=method, headers=headers,
                      body=data, connect_timeout=timeout, request_timeout=timeout,
                      follow_redirects=False, decompress_response=True)
    client = SimpleAsyncHTTPClient(force_instance=True, max_body_size=MAX_BODY)
    try:
        # The client's own deadline covers connect and answer; this one is the backstop.
        # (asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation.)
        async with asyncio.timeout(timeout + 1):
            response = await client.fetch(req, raise_error=False)
    except (HTTPTimeoutError, TimeoutError) as e:
        raise _no_answer(port, method, path, "timeout", f"no answer in {timeout:g} s") from e
    except HTTPStreamClosedError as e:
        raise _no_answer(port, method, path, "closed", "the connection was closed") from e
    except ConnectionRefusedError as e:
        raise _no_answer(port, method, path, "refused", "connection refused") from e
    except (OSError, HTTPClientError) as e:
        raise _no_answer(port, method, path, "closed", str(e) or type(e).__name__) from e
    finally:
        client.close()
    return Reply(response.code, _decode(response.body or b""))


def _no_answer(port: int, method: str, path: str, reason: str, what: str) -> NoAnswer:
    return NoAnswer(f"nothing answers on 127.0.0.1:{port} ({method} {path}: {what})",
                    port=port, path=path, reason=reason)


def _decode(raw: bytes) -> Any:
    if raw.startswith(XSSI_PREFIX):
        raw = raw[len(XSSI_PREFIX):]
    try:
        return json.loads(raw)
    except ValueError:
        return None


async def get(port: int, path: str, token: str, *, timeout: float = TIMEOUT) -> Reply:
    return await request(port, "GET", path, token, timeout=timeout)


async def post(port: int, path: str, token: str, body: Any = None, *,
               timeout: float = TIMEOUT) -> Reply:
    return await request(port, "POST", path, token, body=body, timeout=timeout)
