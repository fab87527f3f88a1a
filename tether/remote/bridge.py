"""The legacy HTTP-over-WebSocket protocol ("the bridge"), wire-compatible with
jupyter_http_over_ws 0.0.7 (docs/colab-runtime.md, section 4), on jupyter_server >= 2.

Endpoints under ``base_url``:

- ``http_over_websocket``: each JSON text frame is one HTTP request (``message_id``, ``method``,
  ``path``, ``body`` or ``body_base64``); the reply comes back as frames of at most 64 KiB of
  base64 body, the first with ``status``/``statusText``/``headers``, the last with ``done: true``.
- ``http_over_websocket/diagnose``: echoes each text frame with the extension version.
- ``http_over_websocket/proxied_ws/<path>``: relays to the server's own websocket at ``<path>``.

What this does differently from the original, on purpose:

- Requests are dispatched in-process through the server's own tornado ``Application``: the
  ``Host`` header routes nothing, so the bridge can only ever reach this server (the original
  fetched ``http://<Host header>/<path>``, an open proxy). Only the socket's credentials travel
  with a request, never the client's other headers. The relay connects to the server's own
  bound address (port on loopback or its Unix socket), never to the ``Host`` header.
- The socket itself is authenticated: the token comes from the ``jupyter_http_over_ws_auth_url``
  query parameter (the URL the user pasted; it is never fetched) or from anything jupyter_server
  accepts (``token`` query, ``Authorization`` header, login cookie). Its requests then run as
  the user who opened it. ``diagnose`` alone answers without credentials (it tells nothing else).
- The Origin is checked against the extension's allow-list even for token-authenticated sockets
  (jupyter_server skips that check for tokens).
- Close codes are legal (the original closed with 400, which browsers never see). The 4xxx codes
  mirror HTTP statuses: 4401 not authenticated, 4400 unparseable ``min_version``, 4426 newer
  ``min_version`` than implemented, 4000 + status when the relayed websocket refused us; 1011 when
  the relay target cannot be reached.
- Requests on one socket run concurrently, each as its own task owned by the socket (cancelled
  when it closes); replies of different ``message_id`` may interleave, frames of one reply never
  reorder.
- Frame size is bounded (``websocket_max_message_size``, default :data:`DEFAULT_MAX_MESSAGE_SIZE`),
  and a malformed frame gets an error frame while the socket stays usable.
- Replies stream: frames go out one at a time as the socket takes them, so memory does not grow
  with the body.

The relay negotiates no websocket subprotocol, as the original: kernel channels speak jupyter's
legacy JSON frames through it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit

import tornado.httpclient
import tornado.httputil
import tornado.netutil
import tornado.web
import tornado.websocket
from jupyter_server.base.handlers import JupyterHandler
from jupyter_server.base.websocket import WebSocketMixin
from jupyter_server.utils import url_path_join
from tornado.concurrent import Future, future_set_result_unless_cancelled
from tornado.iostream import StreamClosedError

from tether.remote import colab

log = logging.getLogger(__name__)

HANDLER_VERSION = "0.0.7"
CHUNK_SIZE = 64 * 1024  # raw body bytes per reply frame, as in the original
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024
MAX_IN_FLIGHT = 64  # concurrent requests per socket; more get a 503 error frame
REQUEST_IDLE_TIMEOUT = 120.0  # seconds a bridged request may make no progress
RELAY_CONNECT_TIMEOUT = 20.0

MIN_VERSION_PARAM = "min_version"
AUTH_URL_PARAM = "jupyter_http_over_ws_auth_url"
PATH = "/http_over_websocket"
DIAGNOSE_PATH = PATH + "/diagnose"
PROXIED_PREFIX = PATH + "/proxied_ws/"

CLOSE_BAD_VERSION = 4400
CLOSE_UNAUTHENTICATED = 4401
CLOSE_OUTDATED = 4426
CLOSE_RELAY_FAILED = 1011
_MAX_CLOSE_REASON = 123  # bytes: a close frame's payload is at most 125, 2 of them the code

REQUIRED_KEYS = ("message_id", "method", "path")
TEXT_JSON_REQUIRED = "JSON input is required."
TEXT_MISSING_KEYS = (
    "Invalid request. The body must contain the following keys: {required}. Got: {got}"
)
TEXT_UNCAUGHT = "Uncaught server-side exception. Check logs for additional details."
TEXT_BUSY = "Too many concurrent requests on this socket."
TEXT_TIMEOUT = "The request made no progress for {seconds:.0f} s and was abandoned."

# The Host of in-process requests: loopback, so jupyter_server's DNS-rebinding check passes.
_INTERNAL_HOST = "127.0.0.1"
_METHOD_RE = re.compile(r"[A-Z]{1,16}")
_PATH_RE = re.compile(r"/[^\x00-\x20\x7f]*")
# distutils' StrictVersion, which the original used: N.N[.N][(a|b)N]
_VERSION_RE = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?(?:([ab])(\d+))?", re.ASCII)

_VersionKey = tuple[int, int, int, int, str, int]


# --------------------------------------------------------------------------- versions


def parse_version(text: str) -> _VersionKey | None:
    """A sortable key for a StrictVersion-style string, or None if it is not one."""
    m = _VERSION_RE.fullmatch(text)
    if m is None:
        return None
    major, minor, patch, pre, pre_n = m.groups()
    # a pre-release sorts before its final release: 0 < 1 in the fourth place
    return (int(major), int(minor), int(patch or 0), 0 if pre else 1, pre or "", int(pre_n or 0))


def format_version(key: _VersionKey) -> str:
    """``str(StrictVersion(...))``: a zero patch level is dropped ("0.1.0" -> "0.1")."""
    major, minor, patch, final, pre, pre_n = key
    text = f"{major}.{minor}" if patch == 0 else f"{major}.{minor}.{patch}"
    return text if final else f"{text}{pre}{pre_n}"


_parsed = parse_version(HANDLER_VERSION)
assert _parsed is not None
_CURRENT: _VersionKey = _parsed


def version_rejection(min_version: str | None) -> tuple[int, str] | None:
    """The (close code, reason) for a ``min_version`` this bridge cannot serve, else None."""
    if min_version is None:
        return None
    key = parse_version(min_version)
    if key is None:
        return CLOSE_BAD_VERSION, f'Invalid "min_version" provided: {min_version}'
    if key > _CURRENT:
        return CLOSE_OUTDATED, (
            f"Requested version ({format_version(key)}) > Current version ({HANDLER_VERSION}). "
            "Please upgrade this package."
        )
    return None


def is_outdated(min_version: str | None) -> bool:
    """True if the client asked for a newer protocol than this one (for ``diagnose``)."""
    rejection = version_rejection(min_version)
    return rejection is not None and rejection[0] == CLOSE_OUTDATED


def close_reason(text: str) -> str:
    """``text`` cut to what fits a close frame (a longer reason breaks the frame)."""
    raw = text.encode("utf-8")[:_MAX_CLOSE_REASON]
    return raw.decode("utf-8", errors="ignore")


def sendable_close_code(code: int | None, default: int) -> int:
    """``code`` if an endpoint may send it in a close frame (RFC 6455, 7.4), else ``default``."""
    if code is not None and (1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999):
        return code
    return default


def token_from_auth_url(auth_url: str) -> str:
    """The ``token`` query parameter of the URL the user pasted into Colab ('' if none)."""
    try:
        return parse_qs(urlsplit(auth_url).query).get("token", [""])[0]
    except ValueError:
        return ""


# --------------------------------------------------------------------------- request frames


class FrameError(Exception):
    """A request frame this bridge cannot serve; becomes one error frame on the socket."""

    def __init__(self, status: int, text: str, message_id: Any = None) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.message_id = message_id


@dataclass(frozen=True)
class BridgeRequest:
    """One HTTP request carried by a request frame."""

    message_id: Any
    method: str
    path: str
    body: bytes


def parse_request_frame(message: str | bytes) -> BridgeRequest:
    """Validate one request frame; raise :class:`FrameError` with the original's texts."""
    try:
        contents = json.loads(message)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        raise FrameError(400, TEXT_JSON_REQUIRED) from e
    if not isinstance(contents, dict) or not all(k in contents for k in REQUIRED_KEYS):
        got = contents.keys() if isinstance(contents, dict) else {}.keys()
        required = "{" + ", ".join(repr(k) for k in REQUIRED_KEYS) + "}"
        message_id = contents.get("message_id") if isinstance(contents, dict) else None
        raise FrameError(400, TEXT_MISSING_KEYS.format(required=required, got=got), message_id)
    message_id = contents["message_id"]
    method = str(contents["method"]).upper()
    if not _METHOD_RE.fullmatch(method):
        raise FrameError(400, 'Invalid request. "method" must be an HTTP method name.', message_id)
    path = contents["path"]
    if not isinstance(path, str) or not _PATH_RE.fullmatch(path) or not _is_utf8(path):
        raise FrameError(
            400, 'Invalid request. "path" must be a string starting with "/".', message_id
        )
    return BridgeRequest(message_id, method, path, _request_body(contents, message_id))


def _request_body(contents: dict[str, Any], message_id: Any) -> bytes:
    # body_base64 wins when non-empty: it carries bytes that are not UTF-8 (uploads)
    encoded = contents.get("body_base64")
    if encoded:
        try:
            return base64.b64decode(encoded, validate=True)
        except (TypeError, ValueError, binascii.Error) as e:
            text = 'Invalid request. "body_base64" must be a base64 string.'
            raise FrameError(400, text, message_id) from e
    body = contents.get("body")
    if body is None:
        return b""
    if not isinstance(body, str) or not _is_utf8(body):
        raise FrameError(400, 'Invalid request. "body" must be a string.', message_id)
    return body.encode("utf-8")


def _is_utf8(text: str) -> bool:
    # JSON can carry lone surrogates ("\ud800"), which no UTF-8 encoder accepts
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def error_frame(status: int, text: str, message_id: Any = None) -> dict[str, Any]:
    """The one frame that answers a request the bridge could not serve."""
    frame: dict[str, Any] = {"done": True, "status": status, "statusText": text}
    if message_id is not None:
        frame["message_id"] = message_id
    return frame


# --------------------------------------------------------------------------- in-process dispatch


@dataclass(frozen=True)
class _Context:
    """What ``HTTPServerRequest`` reads from a connection's ``context``."""

    remote_ip: str | None
    protocol: str


SendFrame = Callable[[bytes], Awaitable[None]]  # one JSON text frame, already encoded


def _fail_quietly(future: Future[None]) -> None:
    """Fail a write's future; handlers that never await their writes must not log about it."""
    if not future.done():
        future.set_exception(StreamClosedError())
        future.exception()  # marks it retrieved: asyncio would log it when collected


class ReplyStream(tornado.httputil.HTTPConnection):
    """The connection of one in-process request: turns the response into reply frames.

    The handler's writes are queued by reference; :meth:`pump`, run by the request's task,
    cuts them into frames of :data:`CHUNK_SIZE` bytes and sends them one at a time, each after
    the previous one has gone to the socket. A write's future resolves once its bytes are sent,
    so a handler that awaits ``flush()`` (file downloads) is paced by the client, and a handler
    that writes a whole body at once (the contents API) costs its own buffer plus one frame,
    never a second, base64 copy of the body. Up to one frame of bytes is held back so that the
    last frame can carry ``done: true``, as the original did.
    """

    def __init__(self, message_id: Any, send: SendFrame, context: _Context) -> None:
        self.context = context
        self.on_progress: Callable[[], None] = lambda: None
        self._message_id = message_id
        self._send = send
        self._meta: dict[str, Any] | None = None
        self._queue: asyncio.Queue[tuple[bytes, Future[None]] | None] = asyncio.Queue()
        self._closed = False
        self._close_callback: Callable[[], None] | None = None

    def set_close_callback(self, callback: Callable[[], None] | None) -> None:
        """Called by tornado's RequestHandler; we call it back if the socket goes away."""
        self._close_callback = callback

    def write_headers(
        self,
        start_line: tornado.httputil.RequestStartLine | tornado.httputil.ResponseStartLine,
        headers: tornado.httputil.HTTPHeaders,
        chunk: bytes | None = None,
    ) -> Future[None]:
        assert isinstance(start_line, tornado.httputil.ResponseStartLine)
        self._meta = {
            "status": start_line.code,
            "statusText": start_line.reason,
            "headers": dict(headers),  # repeated headers are joined with "," as in the original
        }
        return self.write(chunk or b"")

    def write(self, chunk: bytes) -> Future[None]:
        sent: Future[None] = Future()
        if self._closed:
            _fail_quietly(sent)
        else:
            self.on_progress()
            self._queue.put_nowait((chunk, sent))
        return sent

    def finish(self) -> None:
        if not self._closed:
            self._queue.put_nowait(None)

    async def pump(self) -> None:
        """Send the reply as frames until the handler has finished and the last frame is out."""
        held = b""
        while (item := await self._queue.get()) is not None:
            chunk, sent = item
            data = held + chunk if held else chunk
            view, offset = memoryview(data), 0
            while len(data) - offset > CHUNK_SIZE:
                await self._emit(view[offset : offset + CHUNK_SIZE], done=False)
                offset += CHUNK_SIZE
            held = bytes(view[offset:])
            future_set_result_unless_cancelled(sent, None)
        await self._emit(held, done=True)

    def abort(self) -> None:
        """The socket or the request task is gone: fail the handler's writes, stop further ones."""
        if self._closed:
            return
        self._closed = True
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None:
                _fail_quietly(item[1])
        callback, self._close_callback = self._close_callback, None
        if callback is not None:
            callback()

    async def _emit(self, data: bytes | memoryview, *, done: bool) -> None:
        frame: dict[str, Any] = {"message_id": self._message_id}
        if self._meta is not None:
            frame.update(self._meta)
            self._meta = None
        frame["done"] = done
        encoded = json.dumps(frame).encode()
        if data:
            # base64 never needs JSON escaping: splicing it in spares json a scan of 87 KiB a
            # frame, the largest server-side cost of a download after base64 itself
            encoded = b"".join((b'{"data": "', base64.b64encode(data), b'", ', encoded[1:]))
        await self._send(encoded)
        self.on_progress()


async def dispatch(
    app: tornado.web.Application, request: tornado.httputil.HTTPServerRequest, body: bytes
) -> None:
    """Run ``request`` through ``app`` as its HTTP server would (``HTTP1ServerConnection``)."""
    delegate = app.find_handler(request)
    start_line = tornado.httputil.RequestStartLine(
        request.method or "GET", request.uri or "/", request.version
    )
    ready = delegate.headers_received(start_line, request.headers)
    if ready is not None:
        await ready  # a streaming-body handler is prepared
    if body:
        ready = delegate.data_received(body)
        if ready is not None:
            await ready
    delegate.finish()


# --------------------------------------------------------------------------- handlers


class _BridgeSocket(WebSocketMixin, tornado.websocket.WebSocketHandler, JupyterHandler):
    """Authentication, origin and size rules shared by the bridge's three websockets."""

    def set_default_headers(self) -> None:
        pass  # JupyterHandler's page headers (CSP...) mean nothing on a 101

    def get_compression_options(self) -> dict[str, Any] | None:
        return self.settings.get("websocket_compression_options", None)

    @property
    def max_message_size(self) -> int:
        return int(self.settings.get("websocket_max_message_size") or DEFAULT_MAX_MESSAGE_SIZE)

    def prepare(self, *args: Any, **kwargs: Any) -> Any:
        self._adopt_auth_url_token()
        return super().prepare(*args, **kwargs)

    def _adopt_auth_url_token(self) -> None:
        # Colab passes the URL the user pasted; its token authenticates the socket exactly as
        # an Authorization header would. The URL itself is never fetched.
        if self.get_query_argument("token", "") or "Authorization" in self.request.headers:
            return
        token = token_from_auth_url(self.get_query_argument(AUTH_URL_PARAM, ""))
        if token:
            self.request.headers["Authorization"] = f"token {token}"

    def check_origin(self, origin_to_satisfy_tornado: str = "") -> bool:
        """The server's one origin rule (``colab.refused_origin``), and an Origin is required.

        A foreign origin never gets here (the app's first rules answer it 403); jupyter_server
        would otherwise let any origin through once a token matches. The bridge is a browser
        protocol, a whole API behind one socket: a socket without an Origin is refused too.
        """
        origin = self.request.headers.get("Origin")
        allowed = self.settings.get(colab.ORIGINS_KEY, frozenset())
        if origin is None or colab.refused_origin(self.request, allowed) is not None:
            log.warning("bridge: refused websocket from origin %r (%s)", origin, self.request.path)
            return False
        return True

    def admit(self) -> bool:
        """Close the socket with 4401 unless it is authenticated; call first in ``open``."""
        if self.current_user is not None:
            return True
        log.warning("bridge: unauthenticated websocket from %s closed", self.request.remote_ip)
        self.close(
            CLOSE_UNAUTHENTICATED,
            "Authentication required: connect with the URL and token the server printed.",
        )
        return False

    def forwarded_credentials(self) -> dict[str, str]:
        """The headers that authenticate this socket's requests to the server: nothing else of
        the client's travels. The token when the socket used one, else its cookies."""
        if self.token_authenticated and self.token:
            credentials = {"Authorization": f"token {self.token}"}
            login = self._login_cookie()
            if login:
                credentials["Cookie"] = login
            return credentials
        cookie = self.request.headers.get("Cookie")
        if not cookie:
            return {}
        credentials = {"Cookie": cookie}
        xsrf = self.get_cookie("_xsrf")
        if xsrf:
            # the socket passed the origin check, which is what XSRF protection is for
            credentials["X-XSRFToken"] = xsrf
        return credentials

    def _login_cookie(self) -> str:
        """The socket's user as jupyter's signed login cookie ('' without a cookie secret).

        With it, every request of the socket runs as the user who opened it; with the token
        alone jupyter_server would mint a new anonymous user and sign a new cookie for each
        request (about a tenth of a small request's time).
        """
        user = self.current_user
        if user is None or not self.settings.get("cookie_secret"):
            return ""
        provider = self.identity_provider
        try:
            # the name depends on the Host of the request that reads it: the internal one
            name = provider.get_cookie_name(_HostOnly(_INTERNAL_HOST))  # type: ignore[arg-type]
            value = self.create_signed_value(name, provider.user_to_cookie(user))
        except (AttributeError, TypeError, ValueError):
            log.debug(
                "bridge: no login cookie from %s; token only",
                type(provider).__name__,
                exc_info=True,
            )
            return ""
        return f"{name}={value.decode()}"

    def _request_summary(self) -> str:
        # tornado logs this on errors; the query holds the auth URL and its token
        return f"{self.request.method} {self.request.path} ({self.request.remote_ip})"


@dataclass(frozen=True)
class _HostOnly:
    """Stands in for a handler where only ``handler.request.host`` is read."""

    host: str

    @property
    def request(self) -> _HostOnly:
        return self


def _allow_unauthenticated(method: Callable[..., Any]) -> Callable[..., Any]:
    # jupyter_server >= 2.13 answers 403 before the upgrade unless a method is marked so; the
    # bridge upgrades and closes with 4401 and a reason instead, which a browser can show.
    setattr(method, "__allow_unauthenticated", True)
    return method


class _IdleTimer:
    """Expires ``deadline`` once no progress was reported for ``idle`` seconds.

    One timer for the whole request, re-armed from its own callback. Re-arming it from the
    handler's writes (``Timeout.reschedule``) made a timer handle per write, each holding a copy
    of the context it was made in: the handler's, where jupyter_server's ``CallContext`` keeps
    the handler, its request and its body. A cancelled handle stays in the loop's heap until
    its time: every 15 MiB PUT through the bridge stayed in memory for two minutes.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, deadline: asyncio.Timeout,
                 idle: float) -> None:
        self._loop = loop
        self._deadline = deadline
        self._idle = idle
        self._last = loop.time()
        self._handle: asyncio.TimerHandle | None = loop.call_at(self._last + idle, self._check)

    def progress(self) -> None:
        self._last = self._loop.time()

    def _check(self) -> None:
        due = self._last + self._idle
        if self._loop.time() >= due:
            self._handle = None
            self._deadline.reschedule(self._loop.time())  # expires now: the request is cancelled
        else:
            self._handle = self._loop.call_at(due, self._check)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class HttpOverWebSocketHandler(_BridgeSocket):
    """``/http_over_websocket``: HTTP requests as JSON frames, served in-process."""

    def initialize(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self._admitted = False
        self._credentials: dict[str, str] = {}

    @_allow_unauthenticated
    async def get(self, *args: Any, **kwargs: Any) -> None:
        await super().get(*args, **kwargs)

    def open(self, *args: Any, **kwargs: Any) -> None:
        super().open(*args, **kwargs)
        if not self.admit():
            return
        rejection = version_rejection(self.get_query_argument(MIN_VERSION_PARAM, None))
        if rejection is not None:
            code, reason = rejection
            log.warning("bridge: rejected connection: %r", reason)
            self.close(code, close_reason(reason))
            return
        self._credentials = self.forwarded_credentials()
        self._admitted = True

    def on_message(self, message: str | bytes) -> None:
        if not self._admitted:
            return
        try:
            request = parse_request_frame(message)
        except FrameError as e:
            log.info("bridge: bad request frame: %r", e.text)
            self._send_error(e.status, e.text, e.message_id)
            return
        if len(self._tasks) >= MAX_IN_FLIGHT:
            self._send_error(503, TEXT_BUSY, request.message_id)
            return
        task = asyncio.ensure_future(self._serve(request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def on_close(self) -> None:
        self._admitted = False
        for task in list(self._tasks):
            task.cancel()

    def _send(self, frame: bytes) -> Future[None]:
        return self.write_message(frame)  # bytes, binary=False: a text frame, no re-encoding

    def _send_error(self, status: int, text: str, message_id: Any) -> None:
        with contextlib.suppress(tornado.websocket.WebSocketClosedError):  # nobody left to tell
            self._send(json.dumps(error_frame(status, text, message_id)).encode())

    def _build_request(
        self, request: BridgeRequest, stream: ReplyStream
    ) -> tornado.httputil.HTTPServerRequest:
        headers = tornado.httputil.HTTPHeaders({"Host": _INTERNAL_HOST, **self._credentials})
        if request.body:
            # jupyter_server's API handlers read JSON bodies whatever the type; only form types
            # would be parsed by tornado, and the bridge never sends those
            headers["Content-Type"] = "application/json"
        start_line = tornado.httputil.RequestStartLine(request.method, request.path, "HTTP/1.1")
        return tornado.httputil.HTTPServerRequest(
            headers=headers, connection=stream, start_line=start_line
        )

    async def _serve(self, request: BridgeRequest) -> None:
        """One request, start to last frame; the boundary where its failures are answered."""
        context = _Context(self.request.remote_ip, self.request.protocol)
        stream = ReplyStream(request.message_id, self._send, context)
        loop = asyncio.get_running_loop()
        try:
            http_request = self._build_request(request, stream)
        except tornado.httputil.HTTPInputError:
            self._send_error(
                400, 'Invalid request. "path" could not be parsed.', request.message_id
            )
            return
        try:
            async with asyncio.timeout(None) as deadline:
                idle = _IdleTimer(loop, deadline, REQUEST_IDLE_TIMEOUT)
                stream.on_progress = idle.progress
                try:
                    await dispatch(self.application, http_request, request.body)
                    await stream.pump()
                finally:
                    idle.cancel()
        except asyncio.CancelledError:
            stream.abort()
            raise
        except TimeoutError:
            stream.abort()
            log.warning(
                "bridge: %s %s made no progress, abandoned", request.method, http_request.path
            )
            self._send_error(
                504, TEXT_TIMEOUT.format(seconds=REQUEST_IDLE_TIMEOUT), request.message_id
            )
        except (tornado.websocket.WebSocketClosedError, StreamClosedError):
            stream.abort()  # the socket went away mid-reply
        except Exception:
            stream.abort()
            log.exception("bridge: %s %s failed", request.method, http_request.path)
            self._send_error(500, TEXT_UNCAUGHT, request.message_id)


class DiagnoseHandler(_BridgeSocket):
    """``/http_over_websocket/diagnose``: lets a client tell why the bridge does not work.

    Open without a token (the origin is still checked): it reveals only the protocol version
    and whether this socket carries working credentials (``has_authentication_cookie``, which
    in the original meant "an ``_xsrf`` cookie is present").
    """

    @_allow_unauthenticated
    async def get(self, *args: Any, **kwargs: Any) -> None:
        await super().get(*args, **kwargs)

    def on_message(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            return
        reply = {
            "message_id": message,
            "extension_version": HANDLER_VERSION,
            "has_authentication_cookie": self.current_user is not None
            or bool(self.get_cookie("_xsrf")),
            "is_outdated_extension": is_outdated(self.get_query_argument(MIN_VERSION_PARAM, None)),
        }
        self.write_message(json.dumps(reply))


class _UnixResolver(tornado.netutil.Resolver):
    """Resolves any host to the server's own Unix socket (``ServerApp.sock``)."""

    def initialize(self, path: str) -> None:
        self._path = path

    async def resolve(
        self, host: str, port: int, family: socket.AddressFamily = socket.AF_UNSPEC
    ) -> list[tuple[int, Any]]:
        return [(socket.AF_UNIX, self._path)]


def _loopback_host(ip: str) -> str:
    """Where this server can reach itself, given the address it bound."""
    if ip in ("", "0.0.0.0", "*", "localhost"):
        return "127.0.0.1"
    if ip == "::":
        return "[::1]"
    return f"[{ip}]" if ":" in ip else ip


class ProxiedWebSocketHandler(_BridgeSocket):
    """``/http_over_websocket/proxied_ws/<path>``: relays to the server's own ``/<path>``
    websocket (kernel channels), text and binary frames both ways, closes propagated."""

    def initialize(self) -> None:
        self._upstream: tornado.websocket.WebSocketClientConnection | None = None
        self._pump: asyncio.Task[None] | None = None
        self._client_gone = False

    @_allow_unauthenticated
    async def get(self, *args: Any, **kwargs: Any) -> None:
        await super().get(*args, **kwargs)

    async def open(self, *args: Any, **kwargs: Any) -> None:
        super().open()
        if not self.admit():
            return
        try:
            upstream = await tornado.websocket.websocket_connect(
                self._upstream_request(),
                max_message_size=self.max_message_size,
                resolver=self._resolver(),
            )
        except tornado.httpclient.HTTPClientError as e:
            log.warning("bridge: relay to %s refused: %s", self._target_path(), e.code)
            self.close(sendable_close_code(4000 + e.code, CLOSE_RELAY_FAILED), close_reason(str(e)))
            return
        except (OSError, TimeoutError, tornado.websocket.WebSocketError) as e:
            log.warning("bridge: relay to %s failed: %s", self._target_path(), e)
            self.close(CLOSE_RELAY_FAILED, "Could not reach the server's websocket.")
            return
        if self._client_gone:
            upstream.close(1001, "client went away")
            return
        self._upstream = upstream
        self._pump = asyncio.ensure_future(self._relay_from_upstream(upstream))

    async def on_message(self, message: str | bytes) -> None:
        # awaited by tornado before it reads the next frame: the upstream paces the client
        if self._upstream is None:
            return
        try:
            await self._upstream.write_message(message, binary=isinstance(message, bytes))
        except tornado.websocket.WebSocketClosedError:
            self.close(CLOSE_RELAY_FAILED, "The server's websocket closed.")

    def on_close(self) -> None:
        self._client_gone = True
        if self._pump is not None:
            self._pump.cancel()
        if self._upstream is not None:
            code = sendable_close_code(self.close_code, 1000)
            self._upstream.close(code, close_reason(self.close_reason or ""))

    async def _relay_from_upstream(
        self, upstream: tornado.websocket.WebSocketClientConnection
    ) -> None:
        while (message := await upstream.read_message()) is not None:
            try:
                await self.write_message(message, binary=isinstance(message, bytes))
            except tornado.websocket.WebSocketClosedError:
                return
        code = sendable_close_code(upstream.close_code, CLOSE_RELAY_FAILED)
        self.close(code, close_reason(upstream.close_reason or ""))

    def _target_path(self) -> str:
        prefix = url_path_join(self.base_url, PROXIED_PREFIX)
        # the raw (still percent-encoded) path, not tornado's decoded path argument
        return url_path_join(self.base_url, self.request.path[len(prefix) :])

    def _upstream_request(self) -> tornado.httpclient.HTTPRequest:
        serverapp = self.settings["serverapp"]
        query = [
            (k, v)
            for k, v in parse_qsl(self.request.query, keep_blank_values=True)
            if k not in (AUTH_URL_PARAM, "token")  # credentials travel as headers, not in logs
        ]
        scheme = "wss" if serverapp.certfile else "ws"
        netloc = (
            "localhost" if serverapp.sock else f"{_loopback_host(serverapp.ip)}:{serverapp.port}"
        )
        url = f"{scheme}://{netloc}{self._target_path()}"
        if query:
            url += "?" + urlencode(query)
        return tornado.httpclient.HTTPRequest(
            url,
            headers=self.forwarded_credentials(),
            connect_timeout=RELAY_CONNECT_TIMEOUT,
            request_timeout=RELAY_CONNECT_TIMEOUT,
            # our own server on loopback: its certificate names its public host, not this one
            validate_cert=False,
        )

    def _resolver(self) -> tornado.netutil.Resolver | None:
        sock = self.settings["serverapp"].sock
        return _UnixResolver(path=sock) if sock else None


def handlers(base_url: str) -> list[tuple[str, type[tornado.web.RequestHandler]]]:
    """The bridge's routes under ``base_url``."""
    return [
        (url_path_join(base_url, PATH), HttpOverWebSocketHandler),
        (url_path_join(base_url, DIAGNOSE_PATH), DiagnoseHandler),
        (url_path_join(base_url, PROXIED_PREFIX) + ".+", ProxiedWebSocketHandler),
    ]
