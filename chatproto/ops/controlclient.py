"""The control channel's client: what ``chatrealmctl`` uses to reach a running realm.

A blocking client (``chatrealmctl`` is a plain command, with no reactor): Twisted's
own ``twisted.protocols.amp.AMP`` encodes the commands and decodes the answers,
over an ordinary ``socket`` read until each answer is in.  :func:`connect` tells the
two cases ``chatrealmctl`` acts on apart: :class:`NotRunning` (no socket, or nobody
listening on it: the realm is stopped, so the store may be changed directly) and
:class:`Unreachable` (a realm listens, but will not or cannot be talked to: the
store must not be changed behind its back).
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.protocols import amp
from twisted.python.failure import Failure

from chatproto.config import Config
from chatproto.ops import commands as c

__all__ = ["ControlClient", "NotRunning", "Unreachable", "connect"]

#: Seconds an answer may take (a drain takes its grace on top).
TIMEOUT = 30.0


class NotRunning(Exception):
    """No realm listens on the control socket."""


class Unreachable(Exception):
    """A realm listens on the control socket but cannot be operated from here."""


class _SocketTransport:
    """The little of ``ITransport`` that AMP writes to."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.disconnecting = False

    def write(self, data: bytes) -> None:
        self._sock.sendall(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self._sock.sendall(b"".join(data))

    def loseConnection(self) -> None:
        self.disconnecting = True

    def getPeer(self) -> Any:
        return None

    def getHost(self) -> Any:
        return None


class ControlClient:
    """One authenticated connection to a running realm; :meth:`call` sends a command
    and waits for its answer."""

    def __init__(self, sock: socket.socket, path: str) -> None:
        self.path = path
        self.realm = ""
        self._sock = sock
        self._amp = amp.AMP()
        self._amp.makeConnection(_SocketTransport(sock))  # type: ignore[arg-type]
        self._closed = False

    def call(self, command: type[amp.Command], timeout: float = TIMEOUT, **kw: Any) -> Any:
        """The answer (a dict) to ``command``; raises
        :class:`chatproto.ops.commands.ControlError` for a refusal of the realm's,
        :class:`Unreachable` when the connection fails or the answer takes more than
        ``timeout`` seconds."""
        if self._closed:
            raise Unreachable("the connection to the realm is closed")
        outcome: list[Any] = []
        self._amp.callRemote(command, **kw).addBoth(outcome.append)
        self._sock.settimeout(timeout)
        while not outcome:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                self.close()
                raise Unreachable(f"no answer from the realm within {timeout:g} s") from None
            except OSError as e:
                self.close()
                raise Unreachable(f"the connection to the realm failed: {e}") from None
            if not data:
                self._closed = True
                self._amp.connectionLost(Failure(ConnectionDone()))
                break
            self._amp.dataReceived(data)
        result = outcome[0]
        if isinstance(result, Failure):
            if result.check(c.ControlError, c.NotAuthenticated):
                raise result.value  # type: ignore[misc]
            if result.check(ConnectionDone, amp.ConnectionLost):
                raise Unreachable("the realm closed the connection")
            raise Unreachable(f"the realm failed: {result.getErrorMessage()}")
        return result

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(cfg: Config, timeout: float = TIMEOUT) -> ControlClient:
    """An authenticated connection to the realm ``cfg`` describes, if it runs.

    Raises :class:`NotRunning` when it does not (no socket file, or a socket nobody
    listens on: left by a realm that was killed), and :class:`Unreachable` when it
    runs but cannot be operated from here (the socket or its token file belong to
    another user, the token is refused).

    A realm run as workers of a cluster (on PostgreSQL; docs/scale-out.md) has one
    socket per worker, ``<socket>.<worker>``: the first of those on this machine that
    answers is the one reached (the worker tells the others what it changed)."""
    if not cfg.control.enabled:
        raise NotRunning("the control channel is off ([control] enabled = false)")
    path = cfg.control_socket
    if cfg.worker is not None or cfg.storage.backend != "postgresql":
        return _connect(path, timeout)
    try:
        return _connect(path, timeout)
    except NotRunning as e:
        not_running = e
    for worker_path in worker_sockets(path):
        try:
            return _connect(worker_path, timeout)
        except NotRunning:
            continue
    raise not_running


def worker_sockets(path: str) -> list[str]:
    """The control sockets of a cluster's workers beside ``path`` (the realm's
    socket): ``<path>.<worker>``, sorted by worker name."""
    import glob
    import stat

    found = []
    for candidate in sorted(glob.glob(glob.escape(path) + ".*")):
        try:
            if stat.S_ISSOCK(os.stat(candidate).st_mode):
                found.append(candidate)
        except OSError:
            continue
    return found


def _connect(path: str, timeout: float) -> ControlClient:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        sock.close()
        raise NotRunning(f"nothing listens on {path} ({e.strerror})") from None
    except PermissionError:
        sock.close()
        raise Unreachable(
            f"permission denied on {path}: run chatrealmctl as the user the realm runs as"
        ) from None
    except OSError as e:
        sock.close()
        if e.errno in (errno.ENOTSOCK, errno.ECONNREFUSED):
            raise NotRunning(f"nothing listens on {path} ({e.strerror})") from None
        raise Unreachable(f"cannot connect to {path}: {e.strerror or e}") from None
    client = ControlClient(sock, path)
    try:
        with open(path + ".token", encoding="utf-8") as f:
            token = f.read().strip()
    except PermissionError:
        client.close()
        raise Unreachable(
            f"permission denied on {path}.token: run chatrealmctl as the user the realm runs as"
        ) from None
    except OSError as e:
        client.close()
        raise Unreachable(f"cannot read {path}.token: {e.strerror or e}") from None
    try:
        answer = client.call(c.Authenticate, timeout=timeout, token=token)
    except c.NotAuthenticated:
        client.close()
        raise Unreachable(f"the realm refused the token in {path}.token") from None
    client.realm = answer["realm"]
    return client
