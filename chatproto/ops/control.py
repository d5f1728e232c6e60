"""The control channel's server: AMP on a UNIX socket in the data directory.

:class:`ControlService` (a child of :class:`chatproto.ops.service.Operations`) listens
on ``[control] socket`` (``<data_dir>/control.sock``) with mode 0600 and a PID lock
beside it (a second realm on the same data directory fails to start; a socket left
by a killed realm is replaced), and writes a fresh random token to
``<socket>.token`` (mode 0600) at every start.  Three locks on the door:

1. the socket file's permission bits: only its owner (and root) may connect;
2. the peer's credentials (``SO_PEERCRED``, where the system has it): a connection
   from another user than the realm's (or root) is closed at once;
3. the token: every command but :class:`chatproto.ops.commands.Authenticate` (with
   the token) is refused with ``NOT_AUTHENTICATED`` until it has succeeded, and a
   wrong token closes the connection.

:class:`ControlProtocol` translates commands into calls on the realm
(:class:`chatproto.realm.admin.Admin`, ``RealmService.delete_user``) and on the
process (:meth:`Operations.reload_tls`, :meth:`Operations.drain`); domain refusals
travel as ``CHAT_ERROR`` ``"<code>: <message>"``.
"""

from __future__ import annotations

import hmac
import os
import secrets
import socket
import stat
import struct
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from chatproto import address
from chatproto.errors import ChatError
from chatproto.ops import commands as c

__all__ = ["ControlFactory", "ControlProtocol", "ControlService", "peer_uid"]

#: Control connections open at once (an operator's tool needs one).
MAX_CONNECTIONS = 16


def peer_uid(transport: Any) -> int | None:
    """The user id of the process at the other end of a UNIX socket connection, or
    None where the system cannot say (no ``SO_PEERCRED``, not a socket)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    get = getattr(transport, "getHandle", None)
    sock = get() if get is not None else None
    if not isinstance(sock, socket.socket):
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _refusal(e: ChatError) -> c.ControlError:
    return c.ControlError(f"{e.code}: {e.message}")


def _translated(d: Deferred[Any]) -> Deferred[Any]:
    def failed(f: Failure) -> Failure:
        if f.check(ChatError):
            raise _refusal(f.value)  # type: ignore[arg-type]
        return f

    return d.addErrback(failed)


class ControlProtocol(amp.AMP):
    """One ``chatrealmctl`` connection (see the module docstring)."""

    log = Logger()
    factory: ControlFactory
    transport: Any

    def __init__(self) -> None:
        super().__init__()
        self.authenticated = False
        self._stop_after = False

    def connectionMade(self) -> None:
        super().connectionMade()
        f = self.factory
        uid = peer_uid(self.transport)
        if uid is not None and uid not in (os.geteuid(), 0):
            self.log.warn("control: refused a connection from user id {uid}", uid=uid)
            self.transport.abortConnection()
            return
        if len(f.connections) >= MAX_CONNECTIONS:
            self.log.warn("control: more than {n} connections; refused one", n=MAX_CONNECTIONS)
            self.transport.abortConnection()
            return
        f.connections.add(self)

    def connectionLost(self, reason: Failure | None = None) -> None:
        super().connectionLost(reason)  # type: ignore[arg-type]
        self.factory.connections.discard(self)
        if self._stop_after:
            self.factory.ops.stop_process()

    def _check(self) -> None:
        if not self.authenticated:
            raise c.NotAuthenticated("authenticate first (with the token in <socket>.token)")

    @property
    def _realm(self) -> Any:
        return self.factory.ops.realm

    @c.Authenticate.responder
    def authenticate(self, token: str) -> dict[str, Any]:
        expected = self.factory.token
        if not expected or not hmac.compare_digest(token.encode(), expected.encode()):
            self.log.warn("control: a connection gave a wrong token")
            raise c.NotAuthenticated("wrong token")
        self.authenticated = True
        return {"realm": self._realm.realm, "pid": os.getpid()}

    @c.Status.responder
    def status(self) -> dict[str, Any]:
        self._check()
        realm = self._realm
        return {
            "realm": realm.realm,
            "pid": os.getpid(),
            "sessions": len(realm.sessions.all()),
            "users_online": len(realm.sessions.online),
            "draining": self.factory.ops.draining,
        }

    @c.ListSessions.responder
    def list_sessions(self, offset: int, limit: int) -> dict[str, Any]:
        self._check()
        if offset < 0 or not 0 < limit <= c.PAGE:
            raise c.ControlError(f"bad_request: offset >= 0 and 0 < limit <= {c.PAGE}")
        every = self._realm.admin.sessions()
        return {"sessions": every[offset : offset + limit], "total": len(every)}

    @c.ListLogins.responder
    def list_logins(self, user: str, offset: int, limit: int) -> dict[str, Any]:
        self._check()
        if offset < 0 or not 0 < limit <= c.PAGE:
            raise c.ControlError(f"bad_request: offset >= 0 and 0 < limit <= {c.PAGE}")
        try:
            every = self._realm.admin.logins(user or None)
        except ChatError as e:
            raise _refusal(e) from None
        return {"logins": every[offset : offset + limit], "total": len(every)}

    @c.RevokeLogins.responder
    def revoke_logins(self, user: str, logins: list[str]) -> Deferred[dict[str, Any]]:
        self._check()
        d = self._account(user)
        d.addCallback(
            lambda _: self._realm.admin.revoke_logins(
                user, logins or None, "an operator ended this browser login"
            )
        )
        d.addCallback(lambda r: {"user": r[0], "ended": r[1], "closed": r[2]})
        return _translated(d)

    @c.GrantAdmin.responder
    def grant_admin(self, user: str) -> Deferred[dict[str, Any]]:
        self._check()
        d = maybeDeferred(self._realm.moderation.grant, user)
        return _translated(d.addCallback(lambda u: {"user": u}))

    @c.RevokeAdmin.responder
    def revoke_admin(self, user: str) -> Deferred[dict[str, Any]]:
        self._check()
        d = maybeDeferred(self._realm.moderation.revoke, user)
        return _translated(d.addCallback(lambda r: {"user": r[0], "was_admin": r[1]}))

    @c.ListAdmins.responder
    def list_admins(self) -> dict[str, Any]:
        self._check()
        return {"admins": self._realm.moderation.list_admins()}

    @c.ListReports.responder
    def list_reports(self, before: int, limit: int) -> Deferred[dict[str, Any]]:
        self._check()
        # a page of 8 reports (excerpts of 1000 characters) stays under AMP's 64 KiB
        if before < 0 or not 0 < limit <= 8:
            raise c.ControlError("bad_request: before >= 0 and 0 < limit <= 8")
        d = maybeDeferred(self._realm.moderation.reports, None, before or None, limit)
        return _translated(d.addCallback(lambda rows: {"reports": rows}))

    def _account(self, user: str) -> Deferred[Any]:
        """Fails with ``no_such_user`` unless local account ``user`` exists: an
        operator's typo is an error, not "0 sessions ended"."""

        @inlineCallbacks
        def check() -> Any:
            addr = address.user(user, self._realm.realm)
            if addr.realm == self._realm.realm and not (
                yield self._realm.accounts.exists(addr.name)
            ):
                raise ChatError("no_such_user", f"no user {addr}")

        return maybeDeferred(check)

    @c.Kick.responder
    def kick(self, user: str, reason: str) -> Deferred[dict[str, Any]]:
        self._check()
        d = self._account(user)
        d.addCallback(lambda _: self._realm.admin.kick(user, reason))
        d.addCallback(lambda r: {"user": r[0], "closed": r[1]})
        return _translated(d)

    @c.Suspend.responder
    def suspend(self, user: str, reason: str) -> Deferred[dict[str, Any]]:
        self._check()
        d = maybeDeferred(self._realm.admin.suspend, user, reason)
        d.addCallback(lambda r: {"user": r[0], "closed": r[1]})
        return _translated(d)

    @c.Unsuspend.responder
    def unsuspend(self, user: str) -> Deferred[dict[str, Any]]:
        self._check()
        d = maybeDeferred(self._realm.admin.unsuspend, user)
        d.addCallback(lambda r: {"user": r[0], "was_suspended": r[1]})
        return _translated(d)

    @c.DeleteUser.responder
    def delete_user(self, user: str) -> Deferred[dict[str, Any]]:
        self._check()
        d = maybeDeferred(self._realm.admin.delete_user, user)
        d.addCallback(lambda r: {"user": r[0], "existed": r[1], "closed": r[2]})
        return _translated(d)

    @c.SetPassword.responder
    def set_password(self, user: str, password: str) -> Deferred[dict[str, Any]]:
        self._check()
        d = maybeDeferred(self._realm.admin.set_password, user, password)
        d.addCallback(lambda r: {"user": r[0], "closed": r[1]})
        return _translated(d)

    @c.ReloadTLS.responder
    def reload_tls(self) -> dict[str, Any]:
        self._check()
        try:
            reloaded = self.factory.ops.reload_tls()
        except ValueError as e:
            raise c.ControlError(f"bad_request: {e}") from None
        return {"listeners": [{"description": d, "fingerprint": fp} for d, fp in reloaded]}

    @c.Drain.responder
    def drain(self, grace: float) -> Deferred[dict[str, Any]]:
        self._check()
        if not 0 <= grace <= 3600:
            raise c.ControlError("bad_request: grace must be between 0 and 3600 seconds")
        if self.factory.ops.draining:
            raise c.ControlError("bad_request: the realm is draining already")

        def drained(closed: int) -> dict[str, Any]:
            # The answer goes out, then this connection closes and the process stops.
            self._stop_after = True
            self.factory.ops.clock.callLater(0, self.transport.loseConnection)
            return {"closed": closed}

        return self.factory.ops.drain(grace).addCallback(drained)


class ControlFactory(Factory):
    """Builds :class:`ControlProtocol` for one realm process; holds its
    :class:`Operations`, the token and the open connections."""

    protocol = ControlProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(self, ops: Any, token: str) -> None:
        self.ops = ops
        self.token = token
        self.connections: set[ControlProtocol] = set()


class ControlService(Service):
    """Listens on the control socket while the realm runs (see the module docstring)."""

    name = "control"
    log = Logger()

    def __init__(self, ops: Any, reactor: Any, path: str) -> None:
        self.ops = ops
        self.reactor = reactor
        self.path = path
        self.token_path = path + ".token"
        self.factory = ControlFactory(ops, "")
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        self._listen()

    def startService(self) -> None:
        self._listen()
        Service.startService(self)

    def _listen(self) -> None:
        if self.port is not None:
            return
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"chatrealm: control socket: cannot make {directory}: {e}") from None
        _clear_stale(self.path)
        endpoint = UNIXServerEndpoint(self.reactor, self.path, mode=0o600, wantPID=True)
        result: list[Any] = []
        endpoint.listen(self.factory).addBoth(result.append)
        outcome = result[0] if result else None
        if not IListeningPort.providedBy(outcome):
            why = getattr(outcome, "value", outcome)
            if "lock" in str(why).lower():
                why = "another realm is running with this socket (its lock is held)"
            raise SystemExit(f"chatrealm: cannot listen on the control socket {self.path}: {why}")
        self.port = outcome
        token = secrets.token_urlsafe(32)
        try:
            _write_private(self.token_path, token + "\n")
        except OSError as e:
            self.port.stopListening()
            self.port = None
            raise SystemExit(f"chatrealm: cannot write {self.token_path}: {e}") from None
        self.factory.token = token
        self.log.info("control socket {path} (owner only)", path=self.path)

    def stopService(self) -> Any:
        Service.stopService(self)
        port, self.port = self.port, None
        self.factory.token = ""
        try:
            os.unlink(self.token_path)
        except OSError:
            pass
        if port is not None:
            return port.stopListening()
        return None


def _clear_stale(path: str) -> None:
    """Remove a socket left at ``path`` by a realm that was killed (nobody listens on
    it); stop start-up if a realm listens on it."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return  # nothing there (or not a socket: binding will say so)
    except OSError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(5)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    except OSError:
        return  # binding will say what is wrong
    finally:
        probe.close()
    raise SystemExit(
        f"chatrealm: another realm is running with the control socket {path} "
        "(stop it first, or give this realm another data_dir or [control] socket)"
    )


def _write_private(path: str, text: str) -> None:
    """Write ``text`` to ``path``, readable by its owner only, replacing it whole."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
