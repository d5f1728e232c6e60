"""Inbound federation links: a peer realm connects, says ``hello`` (its certificate
is checked against the realm it claims), then sends ``txn`` frames, each answered by
``ack`` once its items are durable (the realm decides what is accepted:
``RealmService.receive_remote``); the bytes of a file item are fetched from the peer
over the same link.  Presence and ``reading`` frames are paced here."""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from zope.interface import implementer

from chatproto import address
from chatproto.admission import PREAUTH_MAX_FRAME, Ticket
from chatproto.errors import CODES, ChatError, FatalProtocolError
from chatproto.federation.link import (
    FEDERATION_VERSION,
    MAX_TXN_ITEMS,
    PRESENCE_BURST,
    PRESENCE_RATE,
    READING_BURST,
    READING_RATE,
    LinkProtocol,
    check_version,
)
from chatproto.ratelimit import TokenBucket
from chatproto.transfer import BLOCK

if TYPE_CHECKING:
    from chatproto.federation.service import FederationService

__all__ = [
    "HELLO_TIMEOUT",
    "MAX_INFLIGHT",
    "MAX_LINKS_PER_REALM",
    "InboundFactory",
    "InboundProtocol",
    "LinkLost",
]

#: Transactions a peer may have unacknowledged on one inbound connection.
MAX_INFLIGHT = 16
#: Inbound links one peer realm may have at once (a realm needs one; the others are
#: ones it gave up on that this side has not seen go yet).  Each link has its own
#: presence, reading and transaction limits, so more would multiply them.
MAX_LINKS_PER_REALM = 4
#: Seconds a new inbound connection has to complete its hello.
HELLO_TIMEOUT = 30.0


class LinkLost(ConnectionError):
    """The link a transaction came on closed before it was stored (during a file
    fetch): not an error -- the peer sends the transaction again."""


@implementer(IHandshakeListener)
class InboundProtocol(LinkProtocol):
    """A link opened to us by a peer realm: ``hello`` -> ``welcome``, then ``txn``
    frames, each answered by ``ack`` once its items are durable.  Transactions are
    handled in order (the next is checked while the last is committed: see
    :meth:`_next`), so acks and stored order follow the peer's order."""

    factory: InboundFactory

    def __init__(self) -> None:
        super().__init__()
        self.state = "hello"
        #: Transactions received and not started, then started and not acknowledged.
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._started: collections.deque[dict[str, Any]] = collections.deque()
        #: The transaction whose items are being checked (at most one at a time).
        self._feeding: dict[str, Any] | None = None
        self._starting = False
        self._timeout: Any = None
        #: The file being fetched from the peer: (request id, blob, Deferred).
        self._fetching: tuple[int, Any, Deferred[None]] | None = None
        self._fetches = 0
        self._reading_paused = False
        self._presence_bucket: TokenBucket | None = None
        self._reading_bucket: TokenBucket | None = None
        self._fetch_progress = 0.0
        self._on_closed: list[Deferred[None]] = []
        #: Counts this connection among the unauthenticated until its hello.
        self._ticket: Ticket | None = None
        #: The realm its accepted hello named (``peer_realm`` once welcomed).
        self.claimed: str | None = None

    def close(self, clock: Any, grace: float) -> Deferred[None]:
        """Close the link cleanly (TLS close_notify: the peer sees a closed link, not a
        lost one), aborting it if it is not closed within ``grace`` seconds; fires once
        it is closed."""
        d: Deferred[None] = Deferred()
        if self.state == "closed":  # lost already
            d.callback(None)
            return d
        self._on_closed.append(d)
        abort = clock.callLater(grace, self.transport.abortConnection)
        d.addBoth(lambda r: abort.cancel() if abort.active() else None)
        self.transport.loseConnection()
        return d

    def connectionMade(self) -> None:
        fed = self.factory.fed
        host = getattr(self.transport.getPeer(), "host", "?")
        self._ticket = fed.unauthenticated.admit(host)
        if self._ticket is None:  # too many waiting for their hello: not even TLS
            self.closed = True
            self.transport.abortConnection()
            return
        self.MAX_LENGTH = PREAUTH_MAX_FRAME  # until a valid hello
        self.start_flow()
        fed.inbound.add(self)
        self._timeout = fed.clock.callLater(HELLO_TIMEOUT, self._hello_timeout)
        self.start_keepalive(fed.clock, fed.cfg.keepalive)

    def is_up(self) -> bool:
        return self.state == "ready"

    def stalled(self, limit: float) -> str | None:
        """A file fetch with no byte for ``limit`` seconds while the peer answers pings
        (a peer holding the transaction, and its link, hostage).  Not while we have
        paused reading ourselves (our disk is behind)."""
        if self._fetching is None or self._reading_paused:
            return None
        waited = self.factory.fed.clock.seconds() - self._fetch_progress
        if waited < limit:
            return None
        return f"the file fetch made no progress for {waited:.0f} seconds"

    def _hello_timeout(self) -> None:
        self._timeout = None
        if self.state == "hello":
            self.fail("timeout", f"no hello within {HELLO_TIMEOUT:g} seconds")

    def handshakeCompleted(self) -> None:
        pass  # the certificate is checked against the realm the hello claims

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed = True
        self.state = "closed"
        self.stop_keepalive()
        if self._ticket is not None:
            self._ticket.release()
        fed = self.factory.fed
        fed.inbound.discard(self)
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None
        fetching, self._fetching = self._fetching, None
        if fetching is not None:
            fetching[2].errback(LinkLost("the link closed during a file fetch"))
        if self.peer_realm is not None:
            self.log.info(
                "federation: inbound link from {peer} closed: {reason}",
                peer=self.peer_realm,
                reason=reason.getErrorMessage() if reason is not None else "closed",
            )
            fed.status_changed()
            fed.inbound_closed(self.peer_realm)
        waiters, self._on_closed = self._on_closed, []
        for d in waiters:
            d.callback(None)

    def misbehaved(self, reason: str) -> None:
        if self.peer_realm is not None:
            self.factory.fed.penalise(self.peer_realm, reason)

    def handle_hello(self, req: dict[str, Any]) -> None:
        fed = self.factory.fed
        if self.state != "hello":
            raise FatalProtocolError("bad_request", "hello was already received")
        check_version(req)
        try:
            claimed = address.normalise_realm(req.get("realm"))  # type: ignore[arg-type]
        except ChatError as e:
            raise FatalProtocolError("bad_request", f"hello realm: {e.message}") from None
        code, reason = fed.inbound_refusal(claimed, self.transport)
        keys = self.peer_keys(req) if reason is None else None
        if reason is not None:
            self.log.warn(
                "federation: refused inbound link from {addr} claiming {realm}: {reason}",
                addr=self._addr(),
                realm=claimed,
                reason=reason,
            )
            self.send({"type": "error", "code": code, "message": reason})
            self.closed = True
            self.transport.loseConnection()
            return
        self.claimed = claimed
        if self._ticket is not None:
            self._ticket.release()
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None
        # Nothing the peer sends is taken before the realm has loaded its state (a
        # suspension, a group, the peers' keys): the welcome waits for it, and the
        # peer sends nothing before its welcome.
        self.state = "starting"
        d = fed.realm.when_started()
        d.addCallback(lambda _: self._welcome(claimed, keys))
        d.addErrback(self._unexpected, "welcoming")

    def _unexpected(self, f: Failure, what: str) -> None:
        self.log.failure("federation: {what} {peer}", f, what=what, peer=self.peer_realm)
        self.fail("internal_error", f"{what} failed")

    def _welcome(self, claimed: str, keys: dict[str, bytes] | None) -> None:
        """The realm has started: the link from ``claimed`` is up."""
        if self.closed:
            return
        fed = self.factory.fed
        self.peer_realm = claimed
        self.state = "ready"
        self.MAX_LENGTH = fed.cfg.max_frame
        self.send(
            {
                "type": "welcome",
                "version": FEDERATION_VERSION,
                "realm": fed.realm.realm,
                "max_frame": fed.cfg.max_frame,
                "keys": fed.announce(),
            }
        )
        if keys is not None:
            fed.realm.peer_keys.learn(claimed, keys)
        self.log.info(
            "federation: inbound link from {peer} ({addr})", peer=claimed, addr=self._addr()
        )
        fed.peer_connected(claimed)

    def handle_txn(self, req: dict[str, Any]) -> None:
        if self.state != "ready":
            raise FatalProtocolError("bad_request", "txn before the welcome")
        txn = req.get("id")
        items = req.get("items")
        if not isinstance(txn, str) or not 0 < len(txn) <= 64:
            raise FatalProtocolError("bad_request", "txn id must be a string of 1-64 chars")
        if not isinstance(items, list):
            raise FatalProtocolError("bad_request", "txn items must be a list")
        if len(items) > MAX_TXN_ITEMS:
            raise FatalProtocolError(
                "too_large", f"{len(items)} items in a txn; the limit is {MAX_TXN_ITEMS}"
            )
        if len(self._queue) + len(self._started) >= MAX_INFLIGHT:
            self.factory.fed.realm.stats.rate_limited("federation_txn")
            raise FatalProtocolError(
                "rate_limited", f"more than {MAX_INFLIGHT} transactions awaiting ack"
            )
        self._queue.append(req)
        self._next()

    def _next(self) -> None:
        """Start the next transaction once the one before has handed all its items to
        the store (``queued``), not only once it is committed: the store commits in
        call order, so both may share a group commit (one fsync) and acks still go
        out in order; an item is still acked only after its commit.  Requests, files
        and lookups inside a transaction are awaited before it counts as queued, so
        the next one is checked against their effects."""
        if self._starting:  # called back from a transaction started below
            return
        self._starting = True
        try:
            while self._feeding is None and self._queue and not self.closed:
                self._start(self._queue.popleft())
        finally:
            self._starting = False

    def _start(self, req: dict[str, Any]) -> None:
        fed = self.factory.fed
        assert self.peer_realm is not None
        self._feeding = req
        self._started.append(req)

        def queued() -> None:
            if self._feeding is req:
                self._feeding = None
                self._next()

        def done(rejected: list[dict[str, Any]]) -> None:
            if self.closed:
                return
            assert self._started and self._started[0] is req, "acks out of order"
            self._started.popleft()
            ack: dict[str, Any] = {"type": "ack", "id": req["id"]}
            if rejected:
                ack["rejected"] = rejected
            self.send(ack)
            fed.clean(self.peer_realm or "")
            queued()

        def failed(f: Failure) -> None:
            if f.check(LinkLost):  # a normal event: the peer sends the transaction again
                self.log.info(
                    "federation: link from {peer} lost while storing txn {txn} ({why}); "
                    "it will be sent again",
                    peer=self.peer_realm,
                    txn=req["id"],
                    why=f.getErrorMessage(),
                )
                return
            self.log.failure("federation: storing a txn from {peer}", f, peer=self.peer_realm)
            if not self.closed:
                self.send({"type": "error", "code": "internal_error", "message": "not stored"})
                self.closed = True
                self.transport.loseConnection()

        d = fed.realm.receive_remote(self.peer_realm, req["items"], fetch=self.fetch, queued=queued)
        d.addCallbacks(done, failed)

    # fetching a file's bytes from the peer (see RealmService.receive_remote) ----------

    def fetch(self, file_id: str, blob: Any) -> Deferred[None]:
        """Ask the peer for the bytes of ``file_id`` (a file item of the transaction
        being stored) and write them to ``blob``; fires when all have arrived."""
        self._fetches += 1
        d: Deferred[None] = Deferred()
        self._fetching = (self._fetches, blob, d)
        self._fetch_progress = self.factory.fed.clock.seconds()
        self.send({"type": "fetch", "id": self._fetches, "file": file_id})
        return d

    def stringReceived(self, payload: bytes) -> None:
        if payload[:1] != b"\x00":
            LinkProtocol.stringReceived(self, payload)
            return
        if self.closed:
            return
        fetching = self._fetching
        if fetching is None:
            self.fail("bad_frame", "a data frame with no fetch in progress")
            return
        self._fetch_progress = self._last_rx
        try:
            written = fetching[1].write(payload[1:])
        except ChatError as e:
            self.fail(e.code, e.message)
            return
        if fetching[1].writer.pending > 4 * BLOCK and not self._reading_paused:
            self._reading_paused = True  # the disk is behind: stop reading the peer
            self.hold_reading("disk")
            written.addBoth(self._resume_reading)

    def _resume_reading(self, result: Any) -> Any:
        if self._reading_paused and not self.closed:
            self._reading_paused = False
            self.release_reading("disk")
        return result

    def _fetch_reply(self, req: dict[str, Any]) -> tuple[Any, Deferred[None]]:
        fetching = self._fetching
        if fetching is None or req.get("id") != fetching[0]:
            raise FatalProtocolError("bad_request", "a reply to no fetch in progress")
        self._fetching = None
        return fetching[1], fetching[2]

    def handle_fetched(self, req: dict[str, Any]) -> None:
        _blob, d = self._fetch_reply(req)
        d.callback(None)

    def handle_fetch_error(self, req: dict[str, Any]) -> None:
        _blob, d = self._fetch_reply(req)
        code = req.get("code")
        code = code if code in CODES else "internal_error"
        d.errback(ChatError(code, str(req.get("message"))[:200]))

    def handle_presence(self, req: dict[str, Any]) -> None:
        if self.state != "ready":
            raise FatalProtocolError("bad_request", "presence before the welcome")
        assert self.peer_realm is not None
        now = self.factory.fed.clock.seconds()
        if self._presence_bucket is None:
            self._presence_bucket = TokenBucket(PRESENCE_RATE, PRESENCE_BURST, now)
        if self._presence_bucket.take(now):
            self.factory.fed.realm.stats.rate_limited("federation_presence")
            raise FatalProtocolError(
                "rate_limited", f"more than {PRESENCE_RATE:g} presence frames a second"
            )
        self.factory.fed.realm.remote_presence(
            self.peer_realm, req.get("user"), req.get("status"), req.get("text", "")
        )

    def handle_reading(self, req: dict[str, Any]) -> None:
        """A read marker or typing notice of one of the peer's users (ephemeral):
        past READING_RATE a second, dropped."""
        if self.state != "ready":
            raise FatalProtocolError("bad_request", "reading before the welcome")
        assert self.peer_realm is not None
        realm = self.factory.fed.realm
        now = self.factory.fed.clock.seconds()
        if self._reading_bucket is None:
            self._reading_bucket = TokenBucket(READING_RATE, READING_BURST, now)
        if self._reading_bucket.take(now):
            realm.stats.rate_limited("federation_reading")
            return
        realm.reading.remote(self.peer_realm, req)


class InboundFactory(Factory):
    noisy = False  # the link's own log lines say what matters
    protocol = InboundProtocol  # type: ignore[assignment]

    def __init__(self, fed: FederationService) -> None:
        self.fed = fed
