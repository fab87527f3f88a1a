"""Keep secrets out of every log line the server writes, whatever the verbosity.

jupyter_server scrubs ``token=`` from its access log, but tornado's own warning for a failed
request (``404 GET /api/contents/x?token=...``, ``tornado.general``) logs the raw URI, and
debug logging prints more. Rather than chase each logger and handler (jupyter's ``ServerApp``
handler, the CLI's root handler, any added later), the redaction sits where records are made:
a wrapper around the process's log record factory rewrites a record before any handler sees
it. It removes ``token=`` values (also URL-encoded, as inside the bridge's auth URL), the
credential of ``Authorization`` headers, and each registered secret wherever it appears.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

PLACEHOLDER = "[secret]"
# token=VALUE, also percent-encoded once or twice (an auth URL inside a query)
_QUERY_RE = re.compile(r"(?i)((?:token|auth)(?:=|%3D|%253D))[^&\s'\"#;,)]+")
# Authorization: token VALUE / "Authorization": "Bearer VALUE"
_HEADER_RE = re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?(?:token|bearer|basic)\s+)[^\s'\"]+")
MIN_SECRET_LEN = 8  # shorter strings would blank out ordinary words

_lock = threading.Lock()
_secrets: frozenset[str] = frozenset()
_installed = False


def redact(text: str) -> str:
    """``text`` with every known secret and credential-looking value replaced."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, PLACEHOLDER)
    text = _QUERY_RE.sub(r"\1" + PLACEHOLDER, text)
    return _HEADER_RE.sub(r"\1" + PLACEHOLDER, text)


def _scrub(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: logging reports it later; keep no raw args
        message = f"{record.msg!r} % {record.args!r}"
    clean = redact(message)
    if clean != message:
        record.msg, record.args = clean, None
    if record.exc_info and not record.exc_text:
        # formatters reuse exc_text: a traceback's messages and locals' reprs are scrubbed too
        record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


def install(secret: str = "") -> None:
    """Redact in every record made from now on; ``secret`` is removed wherever it appears."""
    global _secrets, _installed
    with _lock:
        if len(secret) >= MIN_SECRET_LEN:
            _secrets = _secrets | {secret}
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            _scrub(record)
            return record

        logging.setLogRecordFactory(factory)
        _installed = True
