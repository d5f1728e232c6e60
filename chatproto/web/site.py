"""The web listener's HTTP side: the static client, the session API and the gateway.

:class:`WebSite` is a ``twisted.web`` site listening on the ``[web]`` endpoints (see
:mod:`chatproto.tap`).  It serves

- ``/`` and ``/static/...``: the browser client, plain files shipped inside the
  package (``chatproto/web/static``; no build step);
- ``POST /api/login``, ``POST /api/register``, ``POST /api/logout`` and
  ``GET /api/session``: the browser's session, as JSON.  Login checks the password in
  the realm (same throttling as a native login) and puts the realm's session token in
  an ``HttpOnly``, ``SameSite=Strict`` cookie, so page scripts never hold a credential;
- ``/ws``: the WebSocket gateway (:mod:`chatproto.web.gateway`);
- ``POST /files?to=...&name=...&sha256=...`` (the body is the file's bytes) and
  ``GET /files/<file_id>`` (with ``Range``): file transfer over plain HTTP, through the
  realm's file service (``realm.files``: its limits, quotas and permission checks).
  An upload's size is checked from ``Content-Length`` before the body is read (a
  refused body is discarded as it arrives, never stored); twisted.web keeps an accepted
  body in a temporary file, from which it is copied to the realm block by block in a
  thread.  Any other request's body is kept up to the API's bound (``MAX_API_BODY``),
  the rest discarded as it arrives.  A download streams the requested range from disk
  as the client reads it.

Every response carries a strict Content-Security-Policy (scripts and styles from this
origin only, no inline code, no framing) and ``nosniff``.  State-changing requests and
the WebSocket handshake are refused unless their ``Origin`` is allowed (same origin,
or ``[web] origins``).  The site translates; the realm decides.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

from twisted.internet.defer import inlineCallbacks, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import static
from twisted.web.http import RESPONSES, HTTPChannel, parse_qs
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from chatproto import wire
from chatproto.admission import Ticket
from chatproto.config import Web
from chatproto.errors import ChatError
from chatproto.realm import RealmService
from chatproto.web.gateway import SESSION_COOKIE, ChatWebSocketFactory, GatewayResource

__all__ = [
    "CSP",
    "STATIC_DIR",
    "WebSite",
    "http_status",
    "origin_allowed",
]

STATIC_DIR = Path(__file__).parent / "static"

#: The Content-Security-Policy of every response.  Scripts, styles and connections
#: (fetch, WebSocket) only to this origin; no inline script or style; no plugins; the
#: page cannot be framed.  Message text is put in the page with textContent only, so
#: the policy is a second line of defence, not the first.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; media-src 'self' blob:; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)

_HEADERS = {
    b"content-security-policy": CSP.encode(),
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"x-frame-options": b"DENY",
    b"cross-origin-opener-policy": b"same-origin",
}

#: Error code -> HTTP status for the JSON API (codes as in PROTOCOL.md).
_STATUS = {
    "bad_request": 400,
    "bad_address": 400,
    "auth_failed": 401,
    "registration_closed": 403,
    "forbidden": 403,
    "not_member": 403,
    "no_such_user": 404,
    "no_such_group": 404,
    "no_such_file": 404,
    "no_such_upload": 404,
    "quota_exceeded": 413,
    "checksum_mismatch": 422,
    "limit_reached": 429,
    "user_exists": 409,
    "too_large": 413,
    "rate_limited": 429,
    "internal_error": 500,
}

#: Largest JSON body of an API request (a name and a password fit easily).
MAX_API_BODY = 16384

#: Seconds a refused upload's connection stays open after its answer, its write side
#: closed, so that the client reads the answer before the rest of the body it sends
#: is refused by a reset (a "lingering close").
LINGER = 5.0


#: Reason phrases twisted.web does not know (it would send "Unknown Status").
_PHRASES = {422: b"Unprocessable Content", 429: b"Too Many Requests"}


def http_status(code: str) -> int:
    return _STATUS.get(code, 400)


def origin_allowed(
    origin: str | bytes | None, host: str | bytes | None, secure: bool, allowed: list[str]
) -> bool:
    """Whether a request with this ``Origin`` may act on the session.

    With ``allowed`` (``[web] origins``) the origin must be one of them; otherwise it
    must be this site's own origin: the scheme of the connection and the ``Host`` the
    browser asked for.  A missing or ``null`` origin is refused.
    """
    if isinstance(origin, bytes):
        origin = origin.decode("latin-1")
    if isinstance(host, bytes):
        host = host.decode("latin-1")
    if not origin or origin == "null":
        return False
    origin = origin.rstrip("/").lower()
    if allowed:
        return origin in (a.rstrip("/").lower() for a in allowed)
    if not host:
        return False
    return origin == f"{'https' if secure else 'http'}://{host.strip().lower()}"


class _Assets(static.File):
    """Static files without directory listings (nor a directory's index.html)."""

    indexNames: list[str] = []

    contentTypes = {
        **static.File.contentTypes,
        ".js": "text/javascript; charset=utf-8",
        ".css": "text/css; charset=utf-8",
        ".html": "text/html; charset=utf-8",
        ".svg": "image/svg+xml",
    }

    def directoryListing(self) -> IResource:
        return notFound()


class _Root(Resource):
    """``/`` is the page; everything else is a named child."""

    def __init__(self, index: Resource) -> None:
        super().__init__()
        self._index = index

    def getChild(self, path: bytes, request: Any) -> IResource:
        if path == b"":
            return self._index
        return notFound()


class _Api(Resource):
    """A JSON endpoint: ``handle(request, body)`` gives a dict (or a Deferred of one)."""

    isLeaf = True
    log = Logger()

    def __init__(self, site: WebSite) -> None:
        super().__init__()
        self.site = site

    def render(self, request: Any) -> Any:
        """Another method than this API's (GET, HEAD, POST) is a JSON ``bad_request``
        (400), like every answer of the API, not Twisted's HTML 501 page."""
        if request.method not in (b"GET", b"HEAD", b"POST"):
            request.setHeader(b"cache-control", b"no-store")
            method = request.method.decode("ascii", "replace")[:16]
            return self._error(request, 400, "bad_request", f"{method} is not a request here")
        return super().render(request)

    def render_POST(self, request: Any) -> Any:
        request.setHeader(b"cache-control", b"no-store")
        origin = request.getHeader(b"origin")
        if origin is not None and not self.site.origin_ok(
            origin, request.getHeader(b"host"), request.isSecure()
        ):
            return self._error(request, 403, "forbidden", "origin not allowed")
        ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if ctype != b"application/json":
            return self._error(request, 415, "bad_request", "send application/json")
        raw = request.content.read(MAX_API_BODY + 1)
        if len(raw) > MAX_API_BODY:
            return self._error(request, 413, "too_large", "request body too large")
        try:
            body = wire.parse_json(raw) if raw.strip() else {}
        except ChatError as e:
            return self._error(request, 400, "bad_request", e.message)
        if not isinstance(body, dict):
            return self._error(request, 400, "bad_request", "send a JSON object")
        return self._run(request, body)

    def render_GET(self, request: Any) -> Any:
        request.setHeader(b"cache-control", b"no-store")
        return self._run(request, None)

    def _run(self, request: Any, body: dict[str, Any] | None) -> Any:
        d = maybeDeferred(self.handle, request, body)
        d.addCallbacks(self._ok, self._failed, callbackArgs=(request,), errbackArgs=(request,))
        return NOT_DONE_YET

    def handle(self, request: Any, body: dict[str, Any] | None) -> Any:
        raise ChatError("bad_request", "method not allowed")

    def _ok(self, result: dict[str, Any], request: Any) -> None:
        self._finish(request, 200, {"type": "result", **result})

    def _failed(self, failure: Failure, request: Any) -> None:
        if failure.check(ChatError):
            err: Any = failure.value
            if err.code == "rate_limited" and "retry_after" in err.extra:
                request.setHeader(b"retry-after", str(max(1, round(err.extra["retry_after"]))))
            frame = {"type": "error", "code": err.code, "message": err.message, **err.extra}
            self._finish(request, http_status(err.code), frame)
        else:
            self.log.failure("web request {uri} failed", failure, uri=request.uri)
            self._finish(
                request, 500, {"type": "error", "code": "internal_error", "message": "failed"}
            )

    def _error(self, request: Any, status: int, code: str, message: str) -> bytes:
        request.setResponseCode(status, _PHRASES.get(status))
        request.setHeader(b"content-type", b"application/json")
        return wire.encode({"type": "error", "code": code, "message": message})

    def _finish(self, request: Any, status: int, obj: dict[str, Any]) -> None:
        if _gone(request) or request.finished:
            return
        request.setResponseCode(status, _PHRASES.get(status))
        request.setHeader(b"content-type", b"application/json")
        request.write(wire.encode(obj))
        request.finish()


class _NoSuchRequest(_Api):
    """A path under ``/api/`` that names no request: a JSON ``bad_request`` (400)."""

    def handle(self, request: Any, body: dict[str, Any] | None) -> Any:
        raise ChatError("bad_request", "no such request")


class _ApiRoot(Resource):
    """``/api/``: the JSON requests by name; any other name is :class:`_NoSuchRequest`."""

    def __init__(self, site: WebSite) -> None:
        super().__init__()
        self._missing = _NoSuchRequest(site)

    def getChild(self, path: bytes, request: Any) -> IResource:
        return self._missing

    def render(self, request: Any) -> Any:
        return self._missing.render(request)


def _gone(request: Any) -> bool:
    """The client of ``request`` went away: nothing may be written to it any more
    (Twisted's ``Request.connectionLost`` drops the request's ``channel``)."""
    return request.channel is None


def _text(body: dict[str, Any] | None, name: str, required: bool = True) -> Any:
    value = (body or {}).get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise ChatError("bad_request", f"field {name!r} must be a string")
    return value


class _Login(_Api):
    """``POST /api/login {"user","password","device"?}``: sets the session cookie."""

    def handle(self, request: Any, body: dict[str, Any] | None) -> Any:
        if body is None:
            raise ChatError("bad_request", "POST the credentials")
        user = _text(body, "user")
        password = _text(body, "password")
        device = _text(body, "device", required=False) or "web"
        peer = request.getClientAddress()
        d = self.site.realm.issue_token(user, password, device, getattr(peer, "host", "?"))

        def issued(result: tuple[str, Any]) -> dict[str, Any]:
            token, addr = result
            self.site.set_cookie(request, token)
            return {"user": str(addr), "device": device}

        return d.addCallback(issued)


class _Register(_Api):
    """``POST /api/register {"user","password"}``: in-band registration, as native."""

    def handle(self, request: Any, body: dict[str, Any] | None) -> Any:
        if body is None:
            raise ChatError("bad_request", "POST the account")
        peer = getattr(request.getClientAddress(), "host", "?")
        d = self.site.realm.register(_text(body, "user"), _text(body, "password"), peer)
        return d.addCallback(lambda addr: {"user": str(addr)})


class _Logout(_Api):
    """``POST /api/logout {"everywhere"?}``: the token stops working, open sessions
    close.  With ``"everywhere": true``, every browser login of the account ends (and
    the web sessions opened with them): "log out everywhere"."""

    def handle(self, request: Any, body: dict[str, Any] | None) -> Any:
        if body is None:
            raise ChatError("bad_request", "POST to log out")
        everywhere = body.get("everywhere", False)
        if not isinstance(everywhere, bool):
            raise ChatError("bad_request", "field 'everywhere' must be a boolean")
        token = self.site.token_of(request)
        user = self.site.realm.token_user(token) if everywhere else None
        if token:
            self.site.realm.revoke_token(token)
            self.site.ws.close_token(token)
        self.site.set_cookie(request, "", max_age=0)
        if user is None:
            return {}
        d = self.site.realm.admin.revoke_logins(user.name, None, "you logged out everywhere")
        return d.addCallback(lambda r: {"logins_ended": r[1] + 1})


class _Session(_Api):
    """``GET /api/session``: who the cookie logs in (401 when nobody); renews it."""

    def handle(self, request: Any, body: dict[str, Any] | None) -> Any:
        token = self.site.token_of(request)
        record = self.site.realm.tokens.check(token)
        if token is None or record is None:
            raise ChatError("auth_failed", "not logged in")
        self.site.set_cookie(request, token)
        return {"user": f"{record.user}@{self.site.realm.realm}", "device": record.device}


#: Bytes of an upload's body copied to the realm per step (read in a thread).
UPLOAD_BLOCK = 256 * 1024

#: Media types a download keeps; anything else is served as application/octet-stream.
#: Every download is an attachment with a sandboxing CSP whatever its type.
_SAFE_MEDIA = re.compile(
    r"(image/(png|jpeg|gif|webp|avif)|audio/[a-z0-9.+-]+|video/[a-z0-9.+-]+"
    r"|application/(pdf|zip|gzip|octet-stream)|text/plain)"
)
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class RangeNotSatisfiable(Exception):
    """A ``Range`` outside the file (HTTP 416)."""


def parse_range(header: bytes | None, size: int) -> tuple[int, int] | None:
    """The ``(offset, length)`` a ``Range`` header asks of ``size`` bytes.

    ``None``: no usable range (absent, malformed, or several ranges: serve it all).
    Raises :class:`RangeNotSatisfiable` (416).  Only single byte ranges are honoured.
    """
    if not header:
        return None
    m = _RANGE.fullmatch(header.decode("latin-1").strip())
    if m is None or (not m.group(1) and not m.group(2)):
        return None
    # A number of more than 18 digits is larger than any file (and int() refuses
    # more than 4300 digits): read it as 10**18.
    first, last = (g if len(g) <= 18 else "1" + "0" * 18 for g in (m.group(1), m.group(2)))
    if not first:  # the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable()
        return max(0, size - n), min(n, size)
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        raise RangeNotSatisfiable()
    return start, end - start + 1


def _disposition(name: str) -> bytes:
    ascii_name = re.sub(r"[^A-Za-z0-9._ -]", "_", name) or "file"
    return (
        f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name, safe='')}"
    ).encode("latin-1")


def _content_length(request: Any) -> int | None:
    raw = request.getHeader(b"content-length")
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


class _Discard:
    """The body of a refused upload: read from the network, thrown away."""

    def write(self, data: bytes) -> None:
        pass

    def seek(self, *args: Any) -> int:
        return 0

    def read(self, *args: Any) -> bytes:
        return b""

    def tell(self) -> int:
        return 0

    def close(self) -> None:
        pass


class _Capped(io.BytesIO):
    """A request body kept in memory up to ``cap`` bytes; what follows is read from
    the network and thrown away (the API refuses a body past its bound anyway)."""

    def __init__(self, cap: int) -> None:
        super().__init__()
        self._cap = cap

    def write(self, data: Any) -> int:
        room = self._cap - self.getbuffer().nbytes
        if room > 0:
            super().write(bytes(data[:room]))
        return len(data)


class WebRequest(Request):
    """A request whose body limits are checked before its body is read: an upload's
    from its headers (refused: discarded as it arrives), any other's as the API's
    bound (``MAX_API_BODY``): twisted.web would keep a body of 100 KB or more, or of
    no stated length, whole in a temporary file, whoever sends it."""

    refused: tuple[int, str, str] | None = None
    #: An upload not refused from its headers (see _Channel.allHeadersReceived).
    is_upload = False
    #: Its offer to the realm, made before its body is read: fires with the Upload.
    offered: Any = None
    #: Its body is in and it is being handled (the channel no longer answers early).
    rendering = False

    def gotLength(self, length: int | None) -> None:
        channel: Any = self.channel
        site = getattr(channel, "site", None)
        path = (getattr(channel, "_path", b"") or b"").split(b"?")[0]
        method = getattr(channel, "_command", b"")
        if isinstance(site, WebSite) and method == b"POST" and path.rstrip(b"/") == b"/files":
            self.refused = site.upload_refusal(self, length)
            if self.refused is not None:
                self.content = _Discard()
                return
            self.is_upload = True
            super().gotLength(length)
            return
        if length is None or length > MAX_API_BODY:
            self.content = _Capped(MAX_API_BODY + 1)
            return
        super().gotLength(length)


def _offer_upload(site: WebSite, request: Any, user: str, path: bytes, size: int) -> Any:
    """The realm's offer of the upload ``request`` announces (``files.offer``: its
    fields, the size, the recipient, the number of unfinished uploads and the
    quota), from the request line's query and the headers alone, so it is made
    before the body is read."""
    query = parse_qs(path.partition(b"?")[2], 1)  # (bytes, as twisted.web's args)

    def arg(name: str) -> Any:
        # Read as strictly as a JSON text is (wire.parse_json): a value given
        # twice, or that is not UTF-8, is refused, not guessed at or repaired
        # (a name with U+FFFD for its bad bytes would be stored as the name).
        values = query.get(name.encode())
        if not values:
            return None
        if len(values) > 1:
            raise ChatError("bad_request", f"{name!r} is given twice")
        try:
            return values[0].decode("utf-8")
        except UnicodeDecodeError:
            raise ChatError("bad_request", f"{name!r} is not UTF-8") from None

    def offer() -> Any:
        media = (request.getHeader(b"content-type") or b"").split(b";")[0].strip()
        to, name, sha256 = arg("to"), arg("name"), arg("sha256")
        media_type = media.decode("latin-1").lower() or None
        return site.realm.files.offer(user, to, name, size, sha256, media_type)

    return maybeDeferred(offer)


class _Files(_Api):
    """``POST /files`` (upload) and ``GET /files/<file_id>`` (download, ranges)."""

    def render_POST(self, request: Any) -> Any:
        request.setHeader(b"cache-control", b"no-store")
        if request.postpath not in ([], [b""]):
            return self._error(request, 404, "bad_request", "POST to /files")
        refused = getattr(request, "refused", None)
        if refused is None:  # not seen before the body (another request class)
            refused = self.site.upload_refusal(request, _content_length(request))
        if refused is not None:
            return self._error(request, *refused)
        return self._run(request, {})

    def handle(self, request: Any, body: dict[str, Any] | None) -> Any:
        user = self.site.user_of(request)
        if user is None:
            raise ChatError("auth_failed", "not logged in")
        return self._upload(request, user)

    @inlineCallbacks
    def _upload(self, request: Any, user: str) -> Any:
        files = self.site.realm.files
        request.rendering = True  # (the channel no longer answers it early)
        offered = getattr(request, "offered", None)
        if offered is None:  # (not made before the body: an empty one, see allHeadersReceived)
            size = _content_length(request)
            if size is None:
                raise ChatError("bad_request", "send Content-Length")
            offered = _offer_upload(self.site, request, user, request.uri, size)
        up = yield offered
        try:
            offset = 0
            content = request.content
            content.seek(0)
            while True:
                data = yield files.store.run(content.read, UPLOAD_BLOCK)
                if not data:
                    break
                yield files.write(user, up.upload_id, offset, data)
                offset += len(data)
            info, env = yield files.finish(user, up.upload_id)
        except BaseException:
            if up.upload_id in files.uploads:
                files.cancel(user, up.upload_id).addErrback(lambda _: None)
            raise
        return {"file": info.to_wire(), "pos": env.pos, "msg_id": env.id}

    def render_GET(self, request: Any) -> Any:
        user = self.site.user_of(request)
        if user is None:
            return self._error(request, 401, "auth_failed", "not logged in")
        if len(request.postpath) < 1 or not request.postpath[0]:
            return self._error(request, 404, "no_such_file", "GET /files/<file id>")
        file_id = request.postpath[0].decode("latin-1")
        d = self._download(request, user, file_id)
        d.addErrback(self._failed, request)
        return NOT_DONE_YET

    @inlineCallbacks
    def _download(self, request: Any, user: str, file_id: str) -> Any:
        files = self.site.realm.files
        info = yield files.info(user, file_id)
        try:
            wanted = parse_range(request.getHeader(b"range"), info.size)
        except RangeNotSatisfiable:
            request.setHeader(b"content-range", f"bytes */{info.size}".encode())
            raise
        offset, length = wanted if wanted is not None else (0, info.size)
        download = yield files.open_download(user, file_id, offset, length)
        if _gone(request):  # the client went away meanwhile
            download.close()
            return
        media = info.media_type
        if not _SAFE_MEDIA.fullmatch(media):
            media = "application/octet-stream"
        request.setHeader(b"content-type", media.encode())
        request.setHeader(b"content-disposition", _disposition(info.name))
        request.setHeader(b"content-security-policy", b"sandbox; default-src 'none'")
        request.setHeader(b"accept-ranges", b"bytes")
        request.setHeader(b"etag", f'"{info.sha256}"'.encode())
        request.setHeader(b"cache-control", b"private, no-cache")
        request.setHeader(b"content-length", str(length).encode())
        if wanted is not None:
            request.setResponseCode(206)
            end = offset + length - 1
            request.setHeader(b"content-range", f"bytes {offset}-{end}/{info.size}".encode())
        if request.method == b"HEAD" or length == 0:
            download.close()
            request.finish()
            return
        try:
            yield download.start(request)
        except ChatError:
            # Its file was deleted (see Download): before the first byte, the error
            # is the answer (404 no_such_file); past it, the status line is sent:
            # the connection closes short of the Content-Length, which tells the
            # browser the download failed, and no more of the bytes go out.
            if not request.startedWriting:
                for name in (b"content-length", b"content-range", b"content-disposition"):
                    request.responseHeaders.removeHeader(name)
                raise
            request.loseConnection()
            return
        except Exception:
            return  # the client went away: nothing to answer
        if not _gone(request) and not request.finished:
            request.finish()

    def _failed(self, failure: Failure, request: Any) -> None:
        if failure.check(RangeNotSatisfiable):
            self._finish(
                request,
                416,
                {"type": "error", "code": "bad_request", "message": "range not satisfiable"},
            )
            return
        super()._failed(failure, request)

    render_HEAD = render_GET


class _Channel(HTTPChannel):
    """An HTTP connection of the web listener.  It counts among the realm's
    unauthenticated connections (:mod:`chatproto.admission`) while it is open, as a
    native one does until its login: HTTP has no login, and one byte a minute keeps a
    connection alive, so uncounted connections could take every file descriptor of
    the realm.  Past the bounds it is aborted at once.  A connection that becomes a
    WebSocket stops counting as this (its session counts until it logs in)."""

    site: WebSite
    _ticket: Ticket | None = None
    #: The abort of a refused upload's connection, LINGER seconds after its answer.
    _linger: Any = None
    #: The client of the upload being offered asked to be told to go on.
    _continue = False
    #: The connection is gone (an offer that completes then has no body coming).
    _lost = False

    def connectionMade(self) -> None:
        super().connectionMade()
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        ticket = self.site.realm.unauthenticated.admit(getattr(peer, "host", str(peer)))
        if ticket is None:
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self._ticket = ticket

    def connectionLost(self, reason: Any = None) -> None:
        self._lost = True
        self.release_admission()
        linger, self._linger = self._linger, None
        if linger is not None and linger.active():
            linger.cancel()
        for request in self.requests:
            self._drop_offer(request)
        super().connectionLost(reason)

    def _drop_offer(self, request: Any) -> None:
        """An upload offered before its body, which will never come in whole (the
        connection went): the realm's unfinished upload goes (it counted against the
        quota)."""
        up = getattr(request, "upload", None)
        if up is not None and not request.rendering:
            files = self.site.realm.files
            if up.upload_id in files.uploads:
                files.cancel(up.user, up.upload_id).addErrback(lambda _: None)

    def release_admission(self) -> None:
        """Stop counting this connection (it closed, or is now a WebSocket)."""
        ticket, self._ticket = self._ticket, None
        if ticket is not None:
            ticket.release()

    def _refused(self) -> tuple[int, str, str] | None:
        return getattr(self._last_request(), "refused", None)

    def _last_request(self) -> Any:
        return self.requests[-1] if self.requests else None

    def _send100Continue(self) -> None:
        # (HTTPChannel asks every client that expects it to go on: not for an
        # upload refused, which is answered at once instead, nor before the
        # realm has accepted the offer of one: see allHeadersReceived)
        if getattr(self._last_request(), "is_upload", False):
            self._continue = True
        elif self._refused() is None:
            super()._send100Continue()  # type: ignore[misc]

    def allHeadersReceived(self) -> None:
        """An upload is checked before its body is read, as PROTOCOL.md says, and a
        refused one answered now, not once its body is in (a client may wait for
        the answer before sending, ``Expect: 100-continue``, or stop after it).
        Refused from its headers (:meth:`WebSite.upload_refusal`): at once.  Else
        the connection is not read while the realm checks the offer (fields, size,
        recipient, quota); refused, it is answered then; accepted, the body is read
        (after ``100 Continue``, if asked).  A refused upload's connection then
        closes, the body announced unread: its write side at once, after the
        answer, and the rest once the client stops sending, or after ``LINGER``
        seconds."""
        self._continue = False
        super().allHeadersReceived()
        request: Any = self.requests[-1]
        if self.length == 0:  # (no body: answered as usual)
            return
        refused = self._refused()
        if refused is not None:
            self._answer_early(*refused)
        elif request.is_upload:
            self._offer_first(request)

    def _offer_first(self, request: Any) -> None:
        transport: Any = self.transport
        size = self.length
        if size is None:  # (refused by upload_refusal: 411)
            return
        user = self.site.user_of(request)
        transport.pauseProducing()
        d = _offer_upload(self.site, request, user or "", self._path, size)
        request.offered = d

        def accepted(up: Any) -> Any:
            request.upload = up
            if self._lost:  # gone while the realm checked: no body will come
                self._drop_offer(request)
                return up
            if self._continue:
                transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            transport.resumeProducing()
            return up

        def refused(f: Failure) -> Any:
            if request.rendering:
                return f  # (the request's own answer says it)
            if not self._lost:
                if f.check(ChatError):
                    err: Any = f.value
                    self._answer_early(http_status(err.code), err.code, err.message, err.extra)
                else:
                    _Api.log.failure("web request {uri} failed", f, uri=self._path)
                    self._answer_early(500, "internal_error", "failed")
            return None

        d.addCallbacks(accepted, refused)

    def _answer_early(
        self, status: int, code: str, message: str, extra: dict[str, Any] | None = None
    ) -> None:
        """Answer the request whose body is being (or about to be) read with an
        error, and close without reading that body (see allHeadersReceived)."""
        body = wire.encode({"type": "error", "code": code, "message": message, **(extra or {})})
        phrase = _PHRASES.get(status) or RESPONSES.get(status, b"Error")
        head = [b"HTTP/1.1 %d %s" % (status, phrase)]
        head += [b"%s: %s" % item for item in _HEADERS.items()]
        head += [
            b"cache-control: no-store",
            b"content-type: application/json",
            b"content-length: %d" % len(body),
            b"connection: close",
        ]
        transport: Any = self.transport
        transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        # What the client still sends is dropped unread; closing with it unread would
        # reset the connection, which can destroy the answer before the client reads
        # it: the write side closes now, the rest when the client closes (or later).
        drop = lambda data: None  # noqa: E731
        self.dataReceived = self.rawDataReceived = self.lineReceived = drop  # type: ignore[method-assign]
        self.setTimeout(None)
        self.persistent = False
        half_close = getattr(transport, "loseWriteConnection", None)
        if half_close is None:
            transport.loseConnection()
            return
        half_close()
        self._linger = self.callLater(LINGER, transport.abortConnection)
        transport.resumeProducing()  # (read, to drop, what the client still sends)


class WebSite(Site):
    """The web listener of one realm (see the module docstring)."""

    def __init__(
        self,
        realm: RealmService,
        config: Web | None = None,
        clock: Any = None,
        static_dir: Path = STATIC_DIR,
    ) -> None:
        self.realm = realm
        self.web = config if config is not None else realm.config.web
        self.ws = ChatWebSocketFactory(realm, self.origin_ok, clock)
        root = _Root(_Assets(str(static_dir / "index.html")))
        root.putChild(b"static", _Assets(str(static_dir)))
        api = _ApiRoot(self)
        api.putChild(b"login", _Login(self))
        api.putChild(b"register", _Register(self))
        api.putChild(b"logout", _Logout(self))
        api.putChild(b"session", _Session(self))
        root.putChild(b"api", api)
        root.putChild(b"ws", GatewayResource(self.ws))
        root.putChild(b"files", _Files(self))
        self.root = root
        super().__init__(root, requestFactory=WebRequest)
        self.protocol = _Channel  # type: ignore[assignment]
        self.displayTracebacks = False

    def origin_ok(self, origin: Any, host: Any, secure: bool) -> bool:
        return origin_allowed(origin, host, secure, self.web.origins)

    def user_of(self, request: Any) -> str | None:
        """The canonical address the request's session cookie logs in, or None."""
        addr = self.realm.token_user(self.token_of(request))
        return None if addr is None else str(addr)

    def upload_refusal(self, request: Any, length: int | None) -> tuple[int, str, str] | None:
        """Why an upload is refused before its body is read (status, code, message),
        from its headers alone: origin, session, Content-Length against the realm's
        file size limit.  The quota and the recipient are the realm's to check."""
        if not self.origin_ok(
            request.getHeader(b"origin"), request.getHeader(b"host"), request.isSecure()
        ):
            return 403, "forbidden", "origin not allowed"
        if self.user_of(request) is None:
            return 401, "auth_failed", "not logged in"
        if length is None:
            return 411, "bad_request", "send Content-Length"
        limit = self.realm.config.files.max_file_size
        if length > limit:
            return 413, "too_large", f"the file is {length} bytes; the limit is {limit}"
        return None

    def token_of(self, request: Any) -> str | None:
        value = request.getCookie(SESSION_COOKIE.encode())
        return value.decode("latin-1") if value else None

    def set_cookie(self, request: Any, token: str, max_age: int | None = None) -> None:
        """The session cookie, with the attributes spelled as PROTOCOL.md shows
        them (``HttpOnly; SameSite=Strict; Path=/``, ``Secure`` over HTTPS):
        twisted.web's ``addCookie`` writes ``SameSite=strict``, which browsers read
        alike but a client comparing with the documentation does not."""
        age = round(self.web.session_ttl) if max_age is None else max_age
        cookie = f"{SESSION_COOKIE}={token}; Max-Age={age}; HttpOnly; SameSite=Strict; Path=/"
        if request.isSecure():
            cookie += "; Secure"
        request.cookies.append(cookie.encode("ascii"))

    def getResourceFor(self, request: Any) -> Any:
        for name, value in _HEADERS.items():
            request.setHeader(name, value)
        return super().getResourceFor(request)

    def startFactory(self) -> None:
        super().startFactory()
        self.ws.sessions.doStart()

    def stopFactory(self) -> None:
        self.ws.sessions.doStop()
        super().stopFactory()
