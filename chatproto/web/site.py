"""The web listener's HTTP side: the static client, the session API and the gateway.

:class:`WebSite` is a ``twisted.web`` site listening on the ``[web]`` endpoints (see
:mod:`chatproto.tap`).  It serves

- ``/`` and ``/static/...``: the browser client, plain files shipped inside the
  package (``chatproto/web/static``; no build step);
- ``POST /api/login``, ``POST /api/register``, ``POST /api/logout`` and
  ``GET /api/session``: the browser's session, as JSON.  Login checks the password in
  the realm (same throttling as a native login) and puts the realm's session token in
  an ``HttpOnly``, ``SameSite=Strict`` cookie, so page scripts never hold a credential;
- ``/ws``: the WebSocket gateway (:mod:`chatproto.web.gateway`).

Every response carries a strict Content-Security-Policy (scripts and styles from this
origin only, no inline code, no framing) and ``nosniff``.  State-changing requests and
the WebSocket handshake are refused unless their ``Origin`` is allowed (same origin,
or ``[web] origins``).  The site translates; the realm decides.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import static
from twisted.web.resource import NoResource, Resource
from twisted.web.server import NOT_DONE_YET, Site

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
    "user_exists": 409,
    "too_large": 413,
    "rate_limited": 429,
    "internal_error": 500,
}

#: Largest JSON body of an API request (a name and a password fit easily).
MAX_API_BODY = 16384


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

    def directoryListing(self) -> Resource:
        return NoResource()


class _Root(Resource):
    """``/`` is the page; everything else is a named child."""

    def __init__(self, index: Resource) -> None:
        super().__init__()
        self._index = index

    def getChild(self, path: bytes, request: Any) -> Resource:
        if path == b"":
            return self._index
        return NoResource()


class _Api(Resource):
    """A JSON endpoint: ``handle(request, body)`` gives a dict (or a Deferred of one)."""

    isLeaf = True
    log = Logger()

    def __init__(self, site: WebSite) -> None:
        super().__init__()
        self.site = site

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
            body = json.loads(raw.decode("utf-8")) if raw.strip() else {}
        except (UnicodeDecodeError, ValueError):
            return self._error(request, 400, "bad_request", "malformed JSON")
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
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"type": "error", "code": code, "message": message}).encode()

    def _finish(self, request: Any, status: int, obj: dict[str, Any]) -> None:
        if request._disconnected or request.finished:
            return
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.write(json.dumps(obj, ensure_ascii=False).encode("utf-8"))
        request.finish()


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
        d = self.site.realm.register(_text(body, "user"), _text(body, "password"))
        return d.addCallback(lambda addr: {"user": str(addr)})


class _Logout(_Api):
    """``POST /api/logout``: the token stops working, open sessions close."""

    def handle(self, request: Any, body: dict[str, Any] | None) -> Any:
        if body is None:
            raise ChatError("bad_request", "POST to log out")
        token = self.site.token_of(request)
        if token:
            self.site.realm.revoke_token(token)
            self.site.ws.close_token(token)
        self.site.set_cookie(request, "", max_age=0)
        return {}


class _Session(_Api):
    """``GET /api/session``: who the cookie logs in (401 when nobody); renews it."""

    def handle(self, request: Any, body: dict[str, Any] | None) -> Any:
        token = self.site.token_of(request)
        record = self.site.realm.tokens.check(token)
        if token is None or record is None:
            raise ChatError("auth_failed", "not logged in")
        self.site.set_cookie(request, token)
        return {"user": f"{record.user}@{self.site.realm.realm}", "device": record.device}


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
        api = Resource()
        api.putChild(b"login", _Login(self))
        api.putChild(b"register", _Register(self))
        api.putChild(b"logout", _Logout(self))
        api.putChild(b"session", _Session(self))
        root.putChild(b"api", api)
        root.putChild(b"ws", GatewayResource(self.ws))
        self.root = root
        super().__init__(root)
        self.displayTracebacks = False

    def origin_ok(self, origin: Any, host: Any, secure: bool) -> bool:
        return origin_allowed(origin, host, secure, self.web.origins)

    def token_of(self, request: Any) -> str | None:
        value = request.getCookie(SESSION_COOKIE.encode())
        return value.decode("latin-1") if value else None

    def set_cookie(self, request: Any, token: str, max_age: int | None = None) -> None:
        request.addCookie(
            SESSION_COOKIE,
            token,
            path="/",
            max_age=str(round(self.web.session_ttl) if max_age is None else max_age),
            secure=request.isSecure(),
            httpOnly=True,
            sameSite="strict",
        )

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
