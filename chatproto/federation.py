"""Federation: realm-to-realm links with mutual TLS and a durable outbox.

Where it sits: :class:`FederationService` runs beside the
:class:`chatproto.realm.RealmService` in ``twistd chatrealm`` when
``[federation] enabled`` is set.  It owns a listener (inbound links,
:class:`InboundProtocol`) and one :class:`PeerLink` per destination realm (outbound,
:class:`OutboundProtocol` under a ``ClientService`` that backs off).  Like every
protocol here it only translates: which items are accepted from a peer, and who may
send what, is decided by the realm (``RealmService.receive_remote``,
``RealmService.send_private``).

Delivery: an item for another realm is committed together with its outbox row
(:meth:`chatproto.store.IStore.append`); the link to that realm reads the outbox in
order and sends it in numbered transactions (``txn``), at most ``window`` unacknowledged
at a time; the receiver stores a transaction durably, then answers ``ack``; only then
is the outbox row deleted.  A connection lost before an ack means the transaction is
sent again; the receiver drops items whose id it has stored (de-duplication), so every
item is stored exactly once and in order.  The outbox lives in the store, so a realm
killed at any moment resumes where it was.

Each direction has its own connection: a realm sends only on the links it opened and
receives only on links opened to it.  A peer that connects to us has its outbound link
kicked: backoff reset and queue flushed at once.

Identity: both ends present their realm certificate (DNS name = realm name).  TLS
accepts any certificate; right after the handshake the application checks it
(:func:`peer_refusal`): the name with ``service_identity``, then a pinned fingerprint
or the chain against the CA bundle.  Doing the check in the application rather than in
OpenSSL gives one log line naming the reason for every refusal.  The wire format is
documented in PROTOCOL.md, "Federation".
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
from typing import Any

import service_identity
from cryptography import x509
from OpenSSL import SSL, crypto
from service_identity.cryptography import verify_certificate_hostname
from twisted.application.internet import ClientService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IConsumer,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from chatproto import address, wire
from chatproto.admission import PREAUTH_MAX_FRAME, Admission, Ticket
from chatproto.config import DEFAULT_FEDERATION_PORT, ConfigError, Federation
from chatproto.envelope import Envelope
from chatproto.errors import CODES, ChatError, FatalProtocolError
from chatproto.ratelimit import TokenBucket
from chatproto.signing import parse_keys
from chatproto.tls import fingerprint
from chatproto.transfer import BLOCK

__all__ = [
    "FEDERATION_VERSION",
    "MAX_TXN_ITEMS",
    "SRV_SERVICE",
    "FederationService",
    "FederationTLS",
    "InboundProtocol",
    "OutboundProtocol",
    "PeerEndpoint",
    "PeerLink",
    "envelope_to_wire",
    "peer_refusal",
]

FEDERATION_VERSION = 1
#: DNS SRV service looked up for a realm without a static endpoint:
#: ``_chatproto-fed._tcp.<realm>``.
SRV_SERVICE = "_chatproto-fed._tcp"
#: Items one transaction may hold; more is a protocol violation (``too_large``).
MAX_TXN_ITEMS = 1000
#: Transactions a peer may have unacknowledged on one inbound connection.
MAX_INFLIGHT = 16
#: Presence frames a peer may send per second on one link (burst: PRESENCE_BURST);
#: each costs this realm a look-up of who to tell, so more is a flood (rate_limited).
PRESENCE_RATE = 200.0
PRESENCE_BURST = 2000.0
#: ``reading`` frames (read markers and typing notices of private conversations,
#: chatproto.realm.reading) a link accepts per second, and at once; past that they are
#: dropped (ephemeral: the next marker says as much), not fatal.
READING_RATE = 100.0
READING_BURST = 1000.0
#: Read markers a link keeps for a peer while it is not up (the latest per pair).
READING_QUEUE = 1000
#: Seconds without an inbound link from a realm after which the presence we heard of
#: its users is forgotten (they are shown offline until the link is back).
PRESENCE_SILENCE = 60.0
#: Seconds a link closed at shutdown has to close cleanly before it is aborted.
CLOSE_GRACE = 2.0
#: The smallest ``max_frame`` a welcome may announce (``[federation] max_frame``'s).
MIN_MAX_FRAME = 65536
#: Seconds a new inbound connection has to complete its hello.
HELLO_TIMEOUT = 30.0
#: The status file ``chatrealmctl peers`` reads, in the data directory.
STATUS_FILE = "federation-status.json"
#: Seconds a transaction waits for the keys of a realm whose user wrote one of its
#: items (relayed by a group's home realm) while a link to that realm is made.
KEY_WAIT = 30.0
#: Seconds a group request sent to another realm is remembered for its answer (the
#: event in which the user acts) at least; three times ``give_up_after`` if longer.
REQUEST_TTL = 30 * 86400.0

#: An error code as a peer may spell it (ours are in chatproto.errors.CODES; a newer
#: peer may have more): anything else in an ack's ``rejected`` reads as internal_error.
_CODE = re.compile(r"[a-z][a-z_]{0,39}")

_VERIFY_ERRORS = {
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate not in the trusted CA bundle",
    19: "self-signed CA certificate not in the trusted CA bundle",
    20: "issuer not in the trusted CA bundle (untrusted CA)",
    21: "unable to verify the first certificate",
}


class LinkLost(ConnectionError):
    """The link a transaction came on closed before it was stored (during a file
    fetch): not an error -- the peer sends the transaction again."""


def _check_version(req: dict[str, Any]) -> None:
    """``version`` of a hello or welcome: the integer 1 (not ``true``, not ``1.0``)."""
    version = req.get("version")
    if type(version) is not int or version != FEDERATION_VERSION:
        raise FatalProtocolError(
            "unsupported_version", f"federation version {FEDERATION_VERSION} only"
        )


def envelope_to_wire(env: Envelope | dict[str, Any]) -> dict[str, Any]:
    """An item as a transaction carries it (no position: positions are per realm).
    A queued request (a dict) goes as it is."""
    if isinstance(env, dict):
        return env
    return env.to_item()


# TLS ---------------------------------------------------------------------------------


def _record_verify(conn: SSL.Connection, cert: Any, errno: int, depth: int, ok: int) -> bool:
    """OpenSSL verify callback: accept, but remember the first chain error on the TLS
    transport so :func:`peer_refusal` can name it."""
    if not ok:
        transport = conn.get_app_data()
        if transport is not None and getattr(transport, "chain_error", None) is None:
            transport.chain_error = _VERIFY_ERRORS.get(errno, f"verify error {errno}")
    return True


@implementer(IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator)
class _Creator:
    def __init__(self, ctx: SSL.Context, server_name: str | None) -> None:
        self._ctx = ctx
        self._server_name = server_name

    def _connection(self, tls_protocol: Any) -> SSL.Connection:
        conn = SSL.Connection(self._ctx, None)
        conn.set_app_data(tls_protocol)
        tls_protocol.chain_error = None
        return conn

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        conn = self._connection(tlsProtocol)
        if self._server_name:
            conn.set_tlsext_host_name(self._server_name.encode("ascii"))
        conn.set_connect_state()
        return conn

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        conn = self._connection(tlsProtocol)
        conn.set_accept_state()
        return conn


class FederationTLS:
    """One OpenSSL context with the realm's certificate, for both directions.

    Both sides ask for the other's certificate (``VERIFY_PEER``) and record chain
    errors instead of failing the handshake; :func:`peer_refusal` decides.
    """

    def __init__(self, cfg: Federation) -> None:
        """Raises :class:`chatproto.config.ConfigError` for files that cannot be used
        (unreadable, not PEM, a key that is not the certificate's, a bad CA bundle)."""
        key_path = cfg.private_key or cfg.certificate
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        try:
            with open(cfg.certificate, "rb") as f:
                cert_pem = f.read()
            with open(key_path, "rb") as f:
                key_pem = f.read()
            ctx.use_certificate(crypto.load_certificate(crypto.FILETYPE_PEM, cert_pem))
            ctx.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem))
            ctx.check_privatekey()
        except (OSError, crypto.Error, SSL.Error) as e:
            raise ConfigError(
                f"federation: cannot use certificate {cfg.certificate} with key {key_path}: {e}"
            ) from None
        if cfg.ca:
            try:
                ctx.load_verify_locations(cfg.ca.encode())
            except (OSError, SSL.Error) as e:
                raise ConfigError(f"federation.ca {cfg.ca}: not a PEM CA bundle ({e})") from None
        ctx.set_verify(SSL.VERIFY_PEER, _record_verify)
        ctx.set_session_id(b"chatproto-federation")
        self.context = ctx

    def client(self, realm: str) -> _Creator:
        return _Creator(self.context, realm)

    def server(self) -> _Creator:
        return _Creator(self.context, None)


def peer_refusal(transport: Any, realm: str, cfg: Federation) -> str | None:
    """Why the TLS peer on ``transport`` may not speak for ``realm``, or None.

    Checks, in order: a certificate was presented; it names ``realm``
    (``service_identity``); it matches the fingerprint pinned for ``realm``, else it
    chains to the CA bundle.  A realm with neither a pin nor a CA bundle is refused.
    """
    peer_cert = transport.getPeerCertificate() if transport is not None else None
    if peer_cert is None:
        return "presented no certificate"
    cert: x509.Certificate = peer_cert.to_cryptography()
    try:
        verify_certificate_hostname(cert, realm)
    except service_identity.VerificationError:
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            names = san.value.get_values_for_type(x509.DNSName)
        except x509.ExtensionNotFound:
            names = []
        return f"certificate is for {', '.join(names) or 'no DNS name'}, not {realm}"
    except service_identity.CertificateError as e:
        return f"certificate unusable: {e}"
    peer = cfg.peer(realm)
    if peer is not None and peer.fingerprint:
        got = fingerprint(cert)
        if got != peer.fingerprint:
            return f"certificate fingerprint {got} is not the pinned {peer.fingerprint}"
        return None
    if not cfg.ca:
        return "no trust for this realm (no CA bundle and no pinned fingerprint)"
    error = getattr(transport, "chain_error", None)
    if error:
        return f"certificate not trusted: {error}"
    return None


# discovery ---------------------------------------------------------------------------


@implementer(IStreamClientEndpoint)
class PeerEndpoint:
    """Where a peer realm listens, found at each attempt: the static ``endpoint`` of
    its ``[[federation.peers]]`` entry, else the DNS SRV record
    ``_chatproto-fed._tcp.<realm>`` (lowest priority, then highest weight), else the
    realm name itself on port 7422.  Connects with TLS expecting ``realm``'s name."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        realm: str,
        static: str,
        creator: Any,
        resolver: Any = None,
    ) -> None:
        self.reactor = reactor
        self.realm = realm
        self.static = static
        self.creator = creator
        self.resolver = resolver
        #: (host, port) of the last attempt, for logs and status.
        self.target: tuple[str, int] | None = None
        #: Called at the start of each attempt (the link's state becomes "connecting").
        self.on_attempt: Any = None
        #: Called with the Failure of an attempt that did not connect.
        self.on_failure: Any = None

    def __repr__(self) -> str:
        where = self.static or f"{self.realm} (SRV or port {DEFAULT_FEDERATION_PORT})"
        return f"federation peer {self.realm} at {where}"

    def resolve(self) -> Deferred[tuple[str, int]]:
        if self.static:
            host, _, port = self.static.rpartition(":")
            return succeed((host.strip("[]"), int(port)))
        resolver = self.resolver
        if resolver is None:
            from twisted.names import client as dns_client

            resolver = dns_client
        default = (self.realm, DEFAULT_FEDERATION_PORT)

        def found(result: Any) -> tuple[str, int]:
            answers = result[0]
            records = [a.payload for a in answers if getattr(a.payload, "port", None)]
            records = [r for r in records if str(r.target) not in ("", ".")]
            if not records:
                return default
            best = sorted(records, key=lambda r: (r.priority, -r.weight))[0]
            return (str(best.target).rstrip("."), int(best.port))

        def none(f: Failure) -> tuple[str, int]:
            return default

        d = resolver.lookupService(f"{SRV_SERVICE}.{self.realm}")
        return d.addCallbacks(found, none)

    def connect(self, factory: Any) -> Deferred[Any]:
        """Resolve, then connect; cancelling the result cancels whichever step is under
        way (ClientService cancels an attempt when it is stopped)."""
        steps: list[Deferred[Any]] = []

        def cancel(_: Deferred[Any]) -> None:
            steps[-1].cancel()

        result: Deferred[Any] = Deferred(cancel)
        if self.on_attempt is not None:
            self.on_attempt()

        def settle(outcome: Any) -> None:
            if not result.called:
                if isinstance(outcome, Failure):
                    if self.on_failure is not None:
                        self.on_failure(outcome)
                    result.errback(outcome)
                else:
                    result.callback(outcome)
            elif not isinstance(outcome, Failure) and hasattr(outcome, "transport"):
                outcome.transport.abortConnection()  # connected after all: not wanted

        def go(target: tuple[str, int]) -> None:
            self.target = target
            inner = HostnameEndpoint(self.reactor, target[0], target[1], timeout=10)
            connecting = wrapClientTLS(self.creator, inner).connect(factory)
            steps.append(connecting)
            connecting.addBoth(settle)

        resolving = self.resolve()
        steps.append(resolving)
        resolving.addCallbacks(go, settle)
        return result


# protocols ---------------------------------------------------------------------------


class _Link(Int32StringReceiver):
    """Framing, decoding and errors shared by both directions."""

    log = Logger()
    transport: Any
    MAX_LENGTH = 4 * 1024 * 1024

    def __init__(self) -> None:
        self.closed = False
        self.peer_realm: str | None = None
        self._clock: Any = None
        self._interval = 0.0
        self._last_rx = 0.0
        self._keepalive_call: Any = None

    def send(self, obj: dict[str, Any]) -> None:
        if not self.closed:
            self.sendString(wire.encode(obj))

    # keepalive: a peer that vanished without closing (a half-open connection, a
    # frozen host) would otherwise hold a link "up" forever with nothing acknowledged.

    def start_keepalive(self, clock: Any, interval: float) -> None:
        """Ping the peer after ``interval`` seconds without a byte from it (once the
        link is up), and abort the connection after three intervals: the link then
        reconnects with backoff.  0: off."""
        self._clock = clock
        self._interval = interval
        self._last_rx = clock.seconds()
        if interval > 0:
            self._keepalive_call = clock.callLater(interval, self._keepalive)

    def stop_keepalive(self) -> None:
        if self._keepalive_call is not None and self._keepalive_call.active():
            self._keepalive_call.cancel()
        self._keepalive_call = None

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return  # closing: nothing more is read (or buffered)
        if self._clock is not None:
            self._last_rx = self._clock.seconds()
        Int32StringReceiver.dataReceived(self, data)

    def _keepalive(self) -> None:
        self._keepalive_call = None
        if self.closed:
            return
        idle = self._clock.seconds() - self._last_rx
        if idle >= 3 * self._interval:
            reason = f"no frame for {idle:.0f} seconds"
            self.log.warn(
                "federation: {peer} is silent ({reason}); closing the link",
                peer=self.peer_realm or self._addr(),
                reason=reason,
            )
            self.closed = True
            self.silent(reason)
            self.transport.abortConnection()
            return
        stalled = self.stalled(3 * self._interval)
        if stalled is not None:
            self.fail("timeout", stalled)
            return
        if idle >= self._interval and self.is_up():
            self.send({"type": "ping"})
        self._keepalive_call = self._clock.callLater(self._interval, self._keepalive)

    def is_up(self) -> bool:
        """Whether the link is past its hello/welcome (pings are sent only then)."""
        return False

    def stalled(self, limit: float) -> str | None:
        """Hook, at each keepalive tick: why the peer, though not silent, has made no
        progress for ``limit`` seconds on something it owes (then: error, close)."""
        return None

    def silent(self, reason: str) -> None:
        """Hook: the peer went silent and the connection is being aborted."""

    def handle_ping(self, req: dict[str, Any]) -> None:
        if not self.is_up():
            raise FatalProtocolError("bad_request", "ping before the link is up")
        self.send({"type": "pong"})

    def handle_pong(self, req: dict[str, Any]) -> None:
        pass  # being received is all a pong is for

    def fail(self, code: str, message: str) -> None:
        """Send an error, close, and tell the owner (backoff for the peer)."""
        if self.closed:
            return
        self.log.warn(
            "federation: closing link with {peer}: {code}: {message}",
            peer=self.peer_realm or self._addr(),
            code=code,
            message=message,
        )
        self.send({"type": "error", "code": code, "message": message})
        self.closed = True
        self.misbehaved(f"{code}: {message}")
        self.transport.loseConnection()

    def misbehaved(self, reason: str) -> None:
        """Hook: the peer broke the protocol (subclasses apply backoff)."""

    def _addr(self) -> str:
        try:
            peer = self.transport.getPeer()
            return f"{peer.host}:{peer.port}"
        except Exception:
            return "?"

    def lengthLimitExceeded(self, length: int) -> None:
        before = "" if self.is_up() else " before the link is up"
        self.fail("too_large", f"frame of {length} bytes; the limit{before} is {self.MAX_LENGTH}")

    def stringReceived(self, payload: bytes) -> None:
        if self.closed:
            return
        try:
            req = wire.decode(payload)
            kind = req["type"]
            handler = getattr(self, f"handle_{kind}", None)
            if handler is None:
                raise FatalProtocolError("unknown_type", f"unknown frame type {kind[:40]!r}")
            handler(req)
        except ChatError as e:
            self.fail(e.code, e.message)
        except Exception:
            self.log.failure("federation: handling a frame from {peer}", peer=self.peer_realm)
            self.fail("internal_error", "the frame could not be handled")

    def peer_keys(self, req: dict[str, Any]) -> dict[str, bytes] | None:
        """The signing keys a ``hello`` or ``welcome`` announces (None: none)."""
        if req.get("keys") is None:
            return None
        try:
            return parse_keys(req["keys"])
        except ChatError as e:
            raise FatalProtocolError(
                "bad_request", f"{req.get('type')} keys: {e.message}"
            ) from None

    def handle_error(self, req: dict[str, Any]) -> None:
        self.log.warn(
            "federation: {peer} closed the link: {code}: {message}",
            peer=self.peer_realm or self._addr(),
            code=str(req.get("code"))[:40],
            message=str(req.get("message"))[:200],
        )
        self.closed = True
        self.refused(str(req.get("code")), str(req.get("message"))[:200])
        self.transport.loseConnection()

    def refused(self, code: str, message: str) -> None:
        """Hook: the peer sent an error frame."""


@implementer(IHandshakeListener)
class InboundProtocol(_Link):
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
        _check_version(req)
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
        self.peer_realm = claimed
        self.state = "ready"
        self.MAX_LENGTH = fed.cfg.max_frame
        if self._ticket is not None:
            self._ticket.release()
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None
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
            raise FatalProtocolError("bad_request", "txn before hello")
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
            _Link.stringReceived(self, payload)
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
            self.transport.pauseProducing()
            written.addBoth(self._resume_reading)

    def _resume_reading(self, result: Any) -> Any:
        if self._reading_paused and not self.closed:
            self._reading_paused = False
            self.transport.resumeProducing()
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
            raise FatalProtocolError("bad_request", "presence before hello")
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
            raise FatalProtocolError("bad_request", "reading before hello")
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


@implementer(IHandshakeListener)
class OutboundProtocol(_Link):
    """A link we opened to a peer to send our outbox: check the peer's certificate,
    ``hello``, wait for ``welcome``, then ``txn`` out and ``ack`` in."""

    factory: OutboundFactory

    def __init__(self) -> None:
        super().__init__()
        #: Fires when the peer welcomed us (cancelled when ClientService gives up).
        self.welcomed: Deferred[OutboundProtocol] = Deferred()
        self._welcome_seen = False
        self._serving = False

    def connectionMade(self) -> None:
        link = self.factory.link
        self.peer_realm = link.realm
        self.MAX_LENGTH = PREAUTH_MAX_FRAME  # until the welcome
        self.start_keepalive(link.fed.clock, link.fed.cfg.keepalive)

    def is_up(self) -> bool:
        return self._welcome_seen

    def silent(self, reason: str) -> None:
        self.factory.link.error(reason)

    def handshakeCompleted(self) -> None:
        link = self.factory.link
        reason = peer_refusal(self.transport, link.realm, link.fed.cfg)
        if reason is not None:
            self.log.warn(
                "federation: refused to send to {realm} at {addr}: {reason}",
                realm=link.realm,
                addr=self._addr(),
                reason=reason,
            )
            link.error(f"refused: {reason}")
            self.closed = True
            self.transport.abortConnection()
            return
        self.send(
            {
                "type": "hello",
                "version": FEDERATION_VERSION,
                "realm": link.fed.realm.realm,
                "keys": link.fed.announce(),
            }
        )

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed = True
        self.stop_keepalive()
        if not self.welcomed.called:
            self.welcomed.errback(reason or Failure(ConnectionError("closed")))
        self.factory.link.lost(self, reason)

    def misbehaved(self, reason: str) -> None:
        self.factory.link.misbehaved(reason)

    def refused(self, code: str, message: str) -> None:
        self.factory.link.error(f"{code}: {message}")

    def handle_welcome(self, req: dict[str, Any]) -> None:
        link = self.factory.link
        if self._welcome_seen:
            raise FatalProtocolError("bad_request", "welcome was already received")
        self._welcome_seen = True
        _check_version(req)
        if req.get("realm") != link.realm:
            raise FatalProtocolError("bad_request", f"welcome from {str(req.get('realm'))[:80]!r}")
        peer_max = req.get("max_frame")
        if peer_max is not None:
            if type(peer_max) is not int or not MIN_MAX_FRAME <= peer_max <= wire.MAX_INT:
                raise FatalProtocolError(
                    "bad_request", f"welcome max_frame: an integer of at least {MIN_MAX_FRAME}"
                )
            link.peer_max_frame = peer_max
        keys = self.peer_keys(req)
        if keys is not None:
            link.fed.realm.peer_keys.learn(link.realm, keys)
        self.MAX_LENGTH = link.fed.cfg.max_frame
        if self.welcomed.called:  # the attempt was abandoned (link stopped or kicked)
            self.closed = True
            self.transport.loseConnection()
            return
        self.welcomed.callback(self)

    def handle_fetch(self, req: dict[str, Any]) -> None:
        """The peer stores a file item we sent and wants its bytes: stream them as
        data frames, then ``fetched`` (or ``fetch_error``).  The realm's file service
        decides what the peer may read."""
        if not self._welcome_seen:
            raise FatalProtocolError("bad_request", "fetch before welcome")
        rid = req.get("id")
        if self._serving or type(rid) is not int or not 0 < rid <= wire.MAX_INT:
            raise FatalProtocolError(
                "bad_request", "one fetch at a time, with an integer id from 1 to 2**53 - 1"
            )
        self._serving = True
        files = self.factory.link.fed.realm.files
        d = files.serve_remote(self.factory.link.realm, req.get("file"))
        d.addCallback(lambda download: download.start(_DataFrames(self)))

        def done(_: object) -> None:
            self._serving = False
            self.send({"type": "fetched", "id": rid})

        def failed(f: Failure) -> None:
            self._serving = False
            if f.check(ChatError):
                err = f.value
                assert isinstance(err, ChatError)
                self.send(
                    {"type": "fetch_error", "id": rid, "code": err.code, "message": err.message}
                )
            elif not self.closed:
                self.log.failure("federation: serving a file to {peer}", f, peer=self.peer_realm)
                self.send(
                    {
                        "type": "fetch_error",
                        "id": rid,
                        "code": "internal_error",
                        "message": "not read",
                    }
                )

        d.addCallbacks(done, failed)

    def handle_ack(self, req: dict[str, Any]) -> None:
        if not self._welcome_seen:
            raise FatalProtocolError("bad_request", "ack before welcome")
        self.factory.link.acked(self, req.get("id"), req.get("rejected") or [])


@implementer(IConsumer)
class _DataFrames:
    """An IConsumer writing what it is given as binary frames (``0x00`` + bytes) on a
    link; the producer is registered on the link's transport (flow control)."""

    def __init__(self, link: _Link) -> None:
        self.link = link

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.link.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.link.transport.unregisterProducer()

    def write(self, data: bytes) -> None:
        if not self.link.closed:
            self.link.sendString(b"\x00" + data)


class OutboundFactory(Factory):
    noisy = False
    protocol = OutboundProtocol  # type: ignore[assignment]

    def __init__(self, link: PeerLink) -> None:
        self.link = link


# links ---------------------------------------------------------------------------------


class PeerLink:
    """The outbound side of one peer realm: its ``ClientService``, its outbox cursor and
    its state for logs and ``chatrealmctl peers``.

    States: ``idle`` (nothing to send: no connection, no attempt, no DNS lookup),
    ``connecting`` (an attempt under way), ``ready`` (welcomed, sending), ``backoff``
    (waiting ``retry_in`` seconds before the next attempt).

    A link is wanted while this realm has something for the peer: queued items, an
    online user with a contact there (their presence), or a wait for the peer's
    signing keys.  It connects when one appears (:meth:`activate`), and closes and
    idles once none has been there for ``[federation] idle_after`` seconds.
    """

    log = Logger()

    def __init__(self, fed: FederationService, realm: str) -> None:
        self.fed = fed
        self.realm = realm
        cfg = fed.cfg
        peer = cfg.peer(realm)
        self.endpoint = PeerEndpoint(
            fed.reactor, realm, peer.endpoint if peer else "", fed.tls.client(realm), fed.resolver
        )
        self.endpoint.on_attempt = self._attempt
        self.endpoint.on_failure = self._connect_failed
        #: Whether ``last_error`` says what went wrong with the attempt under way (it is
        #: replaced by the first reason an attempt gives, kept by the later ones).
        self._attempt_explained = False
        self.state = "idle"
        #: since when the link is wanted and not up (None: up, or idle): for giving up
        self.down_since: float | None = None
        #: when the link last had something to do (see _idle_check)
        self._active_at = fed.clock.seconds()
        #: until when the link is wanted although nothing is queued (a key wait)
        self._wanted_until = 0.0
        self._idle_call: Any = None
        self._idling = False
        self.given_up = 0
        self.proto: OutboundProtocol | None = None
        self.acked_seq = 0  # highest outbox seq the peer acknowledged
        self.sent_seq = 0  # highest outbox seq sent on the current connection
        #: unacknowledged transactions: (txn id, last outbox seq, the items sent)
        self.inflight: collections.deque[tuple[str, int, list[Any]]] = collections.deque()
        self.failures = 0
        self.retry_in: float | None = None
        self.retry_at: float | None = None
        self.last_error = ""
        self.sent_items = 0
        self.rejected_items = 0
        #: the peer's max_frame, from its welcome (0: not told)
        self.peer_max_frame = 0
        self._reading = False
        self._waiting = 0
        self._kicking = False
        self._penalty: Any = None
        self._penalty_level = 0
        #: outbox deletes waiting for bounces to commit (see _settle)
        self._settling: Deferred[Any] | None = None
        self._settle_waiting = 0
        #: read markers waiting for the link to be up (latest per pair), see reading()
        self._reading_out: dict[tuple[Any, Any], dict[str, Any]] = {}
        #: presence frames waiting for the pace (latest per user), see presence()
        self._presence_out: dict[Any, dict[str, Any]] = {}
        self._presence_bucket: TokenBucket | None = None
        self._presence_call: Any = None
        from chatproto.client import WatchedEndpoint

        self.service = ClientService(
            WatchedEndpoint(self.endpoint),
            OutboundFactory(self),
            retryPolicy=self._retry,
            clock=fed.clock,
            prepareConnection=self._prepare,  # type: ignore[arg-type]
        )

    # connection -----------------------------------------------------------------------

    def _retry(self, attempt: int) -> float:
        cfg = self.fed.cfg
        delay = min(cfg.retry_max, cfg.retry_initial * 2 ** max(0, attempt - 1))
        delay *= random.uniform(0.9, 1.1)  # peers do not retry in lock-step
        self.failures = attempt
        self.state = "backoff"
        self.retry_in = delay
        self.retry_at = self.fed.clock.seconds() + delay
        self.log.info(
            "federation: link to {realm} failed ({error}); retry {n} in {delay}s",
            realm=self.realm,
            error=self.last_error or "connection failed",
            n=attempt,
            delay=round(delay, 1),
        )
        self.fed.status_changed()
        return delay

    def error(self, message: str) -> None:
        """What went wrong with the current attempt or link (logs, chatrealmctl peers)."""
        self.last_error = message
        self._attempt_explained = True

    def _connect_failed(self, f: Failure) -> None:
        target = self.endpoint.target
        where = f" to {target[0]}:{target[1]}" if target else ""
        self.error(f"cannot connect{where}: {f.getErrorMessage()}")

    def _attempt(self) -> None:
        self._attempt_explained = False  # the last attempt's reason stays shown until then
        if self.state != "connecting":
            self.state = "connecting"
            self.fed.status_changed()

    def _prepare(self, proxy: Any) -> Deferred[None]:
        # ClientService hands us a proxy of the protocol; ``welcomed`` fires with the
        # protocol itself, which is what later callbacks identify themselves by.
        self.state = "connecting"

        def ready(proto: OutboundProtocol) -> None:
            if self.state == "idle":  # idled meanwhile: the stopping service closes it
                return
            self.proto = proto
            self.state = "ready"
            self.down_since = None
            self.failures = 0
            self.retry_in = self.retry_at = None
            self.last_error = ""
            self.sent_seq = self.acked_seq
            self.inflight.clear()
            self._waiting = max(self._waiting, self.fed.cfg.batch_size)  # read what is queued
            self.log.info("federation: link to {realm} ready", realm=self.realm)
            self.fed.status_changed()
            self.pump()
            # Presence is not queued: the peer heard nothing while it was unreachable,
            # so it gets who is online now among its users' contacts.
            self._presence_bucket = None  # the peer counts afresh per connection
            for frame in self.fed.realm.presence_for(self.realm):
                self.presence(frame)
            waiting, self._reading_out = self._reading_out, {}
            for frame in waiting.values():  # read markers made while it was down
                self.reading(frame)

        return proxy.welcomed.addCallback(ready)  # type: ignore[no-any-return]

    def activate(self, why: str) -> None:
        """There is something to send (``why``, for the log): an idle link starts
        connecting.  Every call counts as activity (the link does not idle for
        ``idle_after`` seconds after it)."""
        self._active_at = self.fed.clock.seconds()
        if self.state != "idle" or not self.fed.running or self._penalty is not None:
            return
        self.log.info(
            "federation: link to {realm} wanted ({why}); connecting", realm=self.realm, why=why
        )
        self.state = "connecting"
        self.down_since = self._active_at
        self.failures = 0
        self._start_service()

    def _start_service(self) -> None:
        if not self.service.running:
            self.service.startService()
        if self._idle_call is None and self.fed.cfg.idle_after > 0:
            self._idle_call = self.fed.clock.callLater(self.fed.cfg.idle_after, self._idle_check)

    def hold(self, seconds: float) -> None:
        """Keep the link wanted for ``seconds`` although nothing may be queued (the
        peer's keys are awaited: they come in its welcome)."""
        self._wanted_until = max(self._wanted_until, self.fed.clock.seconds() + seconds)
        self.activate("its signing keys are needed")

    def wanted(self) -> str | None:
        """Why the link must stay up, or None: it may idle."""
        if self.inflight or self._waiting > 0 or self._reading:
            return "items are queued"
        if self._presence_out:
            return "presence is waiting"
        if self.fed.clock.seconds() < self._wanted_until:
            return "its signing keys are needed"
        if self.fed.realm.presence_wanted(self.realm):
            return "a user with a contact there is online"
        return None

    def _idle_check(self) -> None:
        """Every ``idle_after`` seconds while the link runs: close it and idle when
        nothing has been there for it for that long."""
        self._idle_call = None
        if not self.service.running or self._penalty is not None:
            return
        idle_after = self.fed.cfg.idle_after
        quiet = self.fed.clock.seconds() - self._active_at
        if quiet < idle_after or self.wanted() is not None:
            wait = idle_after - quiet if quiet < idle_after else idle_after
            self._idle_call = self.fed.clock.callLater(max(wait, 0.01), self._idle_check)
            return
        self.log.info(
            "federation: link to {realm} idle (nothing to send for {n}s)",
            realm=self.realm,
            n=round(quiet),
        )
        self._idling = True
        self._drop_presence()
        self.state = "idle"
        self.down_since = self.retry_in = self.retry_at = None
        self.failures = 0

        def stopped(_: object) -> None:
            self._idling = False

        self.service.stopService().addBoth(stopped)
        self.fed.status_changed()

    def stop(self) -> Deferred[None]:
        self._drop_presence()
        if self._penalty is not None and self._penalty.active():
            self._penalty.cancel()
        self._penalty = None
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        if self.state != "idle":
            self.state = "idle"
            self.down_since = None
        if self.service.running:
            return self.service.stopService()  # type: ignore[no-any-return]
        return succeed(None)

    def kick(self) -> None:
        """Connect now: the peer is reachable (it connected to us).  Resets the backoff
        (a restarted ClientService starts from attempt 1) and flushes the queue.

        Only a link waiting out a backoff delay is restarted: one connected or with an
        attempt under way needs nothing, and stopping an attempt half-way would race
        with it."""
        if self.state != "backoff" or self._kicking or self._penalty is not None:
            return
        if not self.service.running:
            return
        self._kicking = True
        self.log.info("federation: {realm} reached us; reconnecting now", realm=self.realm)

        def restart(_: object) -> None:
            self._kicking = False
            if self.fed.running and self.state != "idle":
                self.failures = 0
                self.state = "connecting"
                self._start_service()

        self.service.stopService().addBoth(restart)

    def lost(self, proto: OutboundProtocol, reason: Failure | None) -> None:
        if proto is not self.proto:
            if reason is not None and not self._attempt_explained:
                self.error(reason.getErrorMessage())
            return
        self.proto = None
        self.inflight.clear()
        self._drop_presence()  # the next connection sends the state of then
        self.sent_seq = self.acked_seq
        if self.state == "idle":  # closed by _idle_check or stop(): nothing went wrong
            self.fed.status_changed()
            return
        self.state = "connecting"
        self.down_since = self.fed.clock.seconds()
        self.last_error = reason.getErrorMessage() if reason is not None else "closed"
        self.log.info(
            "federation: link to {realm} lost: {reason}", realm=self.realm, reason=self.last_error
        )
        self.fed.status_changed()

    def misbehaved(self, reason: str) -> None:
        """The peer broke the protocol: stop for a while (doubling, up to retry_max)."""
        self.error(f"peer misbehaved: {reason}")
        if self._penalty is not None or not self.service.running:
            return
        cfg = self.fed.cfg
        self._penalty_level += 1
        delay = min(cfg.retry_max, cfg.retry_initial * 2**self._penalty_level)
        self.state = "backoff"
        self.retry_in = delay
        self.retry_at = self.fed.clock.seconds() + delay

        def resume() -> None:
            self._penalty = None
            if self.fed.running and self.state != "idle":
                self._start_service()

        def stopped(_: object) -> None:
            self._penalty = self.fed.clock.callLater(delay, resume)

        self.service.stopService().addBoth(stopped)
        self.fed.status_changed()

    # sending ----------------------------------------------------------------------------

    def wake(self, n: int = 1) -> None:
        """``n`` new items were queued for this realm."""
        self._waiting += n
        self.activate("items are queued")
        self.pump()

    def pump(self) -> None:
        """Send queued items while the window has room (one outbox read at a time).

        While a transaction is unacknowledged, the next is sent only once a full batch
        is waiting: under load items accumulate into large transactions (the peer
        commits each in one go) instead of a stream of small ones, and an idle link
        still sends a lone item at once.  ``_waiting`` counts items queued since the
        last read (an estimate: wakes, or a full batch when the queue is unknown).
        """
        proto = self.proto
        cfg = self.fed.cfg
        if proto is None or self._reading or len(self.inflight) >= cfg.window:
            return
        if self._waiting <= 0 or (self.inflight and self._waiting < cfg.batch_size):
            return
        self._reading = True
        counted = self._waiting
        d = self.fed.realm.store.outbox_read(self.realm, self.sent_seq, cfg.batch_size)

        def got(rows: list[tuple[int, Any]]) -> None:
            self._reading = False
            if proto is not self.proto:  # the connection changed while reading
                self.pump()
                return
            self._waiting -= counted  # what was queued during the read still counts
            if len(rows) == cfg.batch_size:
                self._waiting = max(self._waiting, cfg.batch_size)  # there may be more
            if rows:
                rows = self._fit(rows)
                size = self._oversized(rows[0][1]) if len(rows) == 1 else 0
                if size:
                    self._drop_oversized(rows[0], size)
                    return
                first, last = rows[0][0], rows[-1][0]
                txn = f"{first}-{last}"
                sent = [e for _, e in rows]
                items = [envelope_to_wire(e) for e in sent]
                proto.send({"type": "txn", "id": txn, "items": items})
                self._active_at = self.fed.clock.seconds()
                self.inflight.append((txn, last, sent))
                self.sent_seq = last
                self.sent_items += len(rows)
            self.pump()

        def failed(f: Failure) -> None:
            self._reading = False
            self.log.failure("federation: reading the outbox for {realm}", f, realm=self.realm)

        d.addCallback(got).addErrback(failed)

    def _fit(self, rows: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
        """The first of ``rows`` that make a ``txn`` frame within ``max_frame`` (the
        peer would close the link on a longer one, and the same transaction would be
        sent again for ever).  The rest stays queued for the next transaction.

        A cheap upper bound first (a body character is at most 6 bytes of JSON);
        only a batch that might be too long is encoded, and halved until it fits.  A
        single item longer than the limit is left alone (see _drop_oversized)."""
        limit = self.max_frame() - 1024
        bound = 0
        for _, e in rows:
            if isinstance(e, Envelope):
                bound += 6 * len(e.body) + (4096 if e.meta else 1024) + (256 if e.sig else 0)
            else:  # a request, or a copy of an item of its own (a group snapshot)
                bound += len(wire.encode(e)) + 64
        if bound <= limit:
            return rows

        def size(part: list[tuple[int, Any]]) -> int:
            items = [envelope_to_wire(e) for _, e in part]
            return len(wire.encode({"type": "txn", "id": "0-0", "items": items})) + 48

        while len(rows) > 1 and size(rows) > limit:
            rows = rows[: len(rows) // 2]
            self._waiting = max(self._waiting, self.fed.cfg.batch_size)  # the rest waits
        return rows

    def max_frame(self) -> int:
        """The longest frame both ends accept: ours, or the peer's (from its welcome)
        when smaller."""
        peer = self.peer_max_frame
        mine: int = self.fed.cfg.max_frame
        return min(mine, peer) if peer else mine

    def _oversized(self, item: Any) -> int:
        """The frame size of a transaction of ``item`` alone when it is over
        ``max_frame`` (no peer with our limit would take it), else 0.  Computed only
        when the cheap bound says it might be."""
        limit = self.max_frame() - 1024
        if isinstance(item, Envelope) and 6 * len(item.body) + 4096 <= limit:
            return 0
        size = len(wire.encode({"type": "txn", "id": "0-0", "items": [envelope_to_wire(item)]}))
        return size + 48 if size + 48 > limit else 0

    def _drop_oversized(self, row: tuple[int, Any], size: int) -> None:
        """An item too large for any transaction would close the link each time it is
        sent, for ever: bounce it to its sender (``too_large``) and drop it from the
        outbox instead -- once the transactions before it are acknowledged, so the
        delete takes nothing that is still in flight."""
        if self.inflight:
            self._waiting = max(self._waiting, 1)  # read it again after the next ack
            return
        seq, item = row
        why = f"{size} bytes in a federation frame; the limit is {self.max_frame()}"
        self.log.warn(
            "federation: item too large for {realm} dropped: {why}", realm=self.realm, why=why
        )
        self.rejected_items += 1
        self.acked_seq = self.sent_seq = seq
        self._settle(seq, [(item, "too_large", why)])
        self.fed.status_changed()
        self._waiting = max(self._waiting, 1)
        self.pump()

    def acked(self, proto: OutboundProtocol, txn: Any, rejected: list[Any]) -> None:
        if proto is not self.proto:
            return
        if not self.inflight or self.inflight[0][0] != txn:
            proto.fail("bad_request", f"ack for {str(txn)[:40]!r}, which is not the oldest txn")
            return
        _, last, sent = self.inflight.popleft()
        self._active_at = self.fed.clock.seconds()
        self.acked_seq = last
        self._penalty_level = 0
        bounces = []
        if rejected and isinstance(rejected, list):
            by_id = {
                (e.id if isinstance(e, Envelope) else e.get("id")): e
                for e in sent
                if isinstance(e, Envelope | dict)
            }
            for r in rejected[:MAX_TXN_ITEMS]:
                if not isinstance(r, dict):
                    continue
                self.rejected_items += 1
                code, message = r.get("code"), r.get("message")
                code = code if isinstance(code, str) and _CODE.fullmatch(code) else "internal_error"
                message = message[:200] if isinstance(message, str) else ""
                self.log.warn(
                    "federation: {realm} rejected item {id}: {code}: {message}",
                    realm=self.realm,
                    id=str(r.get("id"))[:64],
                    code=code,
                    message=message,
                )
                item = by_id.get(r.get("id")) if isinstance(r.get("id"), str) else None
                if item is not None:
                    bounces.append((item, code, message))
        self._settle(last, bounces)
        self.fed.status_changed()  # counts for chatrealmctl peers (written twice a second)
        self.pump()

    def _settle(self, last: int, bounces: list[tuple[Any, str, str]]) -> None:
        """Delete the outbox rows up to ``last`` (acknowledged), after committing the
        bounces of the transaction's rejected items: a realm killed in between sends
        the transaction again and bounces it then (once: bounce ids derive from the
        item ids).  Settlements run in ack order: a later delete never overtakes an
        earlier transaction's bounces."""
        realm, store = self.fed.realm, self.fed.realm.store

        def logged(f: Failure, what: str) -> None:
            self.log.failure("federation: {what} for {peer}", f, what=what, peer=self.realm)

        def delete(_: object = None) -> Deferred[Any]:
            return store.outbox_ack(self.realm, last).addErrback(logged, "outbox ack")

        if self._settling is None and not bounces:
            delete()
            return

        def step(_: object) -> Deferred[Any]:
            d = realm.bounce(self.realm, bounces) if bounces else succeed(None)
            return d.addErrback(logged, "bouncing rejected items").addCallback(delete)

        def done(result: object) -> object:
            self._settle_waiting -= 1
            if self._settle_waiting == 0:
                self._settling = None
            return result

        if self._settling is None:
            self._settling = succeed(None)
        self._settle_waiting += 1
        self._settling.addCallback(step).addBoth(done)

    @inlineCallbacks
    def give_up(self, before: float | None, code: str, why: str) -> Any:
        """Drop the queued items committed before ``before`` (all of them: None),
        oldest first, after bouncing each to its sender (``code``, ``why``).

        Only while the link is down: nothing is in flight then, and the outbox read is
        held (``_reading``) so no transaction can start meanwhile.  Bounces are
        committed before the rows go (a crash in between bounces again, once).  Fires
        with the number of items given up on."""
        if self.proto is not None or self.inflight or self._reading:
            return 0
        cfg, store = self.fed.cfg, self.fed.realm.store
        dropped = 0
        self._reading = True
        try:
            while self.proto is None:
                rows = yield store.outbox_read(self.realm, self.acked_seq, cfg.batch_size)
                old = []
                for seq, item in rows:
                    ts = item.ts if isinstance(item, Envelope) else item.get("ts", 0)
                    if before is not None and not (isinstance(ts, int | float) and ts < before):
                        break
                    old.append((seq, item))
                if not old:
                    break
                yield self.fed.realm.bounce(self.realm, [(item, code, why) for _, item in old])
                last = old[-1][0]
                yield store.outbox_ack(self.realm, last)
                self.acked_seq = self.sent_seq = max(self.acked_seq, last)
                dropped += len(old)
                if len(old) < len(rows) or len(rows) < cfg.batch_size:
                    break
        finally:
            self._reading = False
        if dropped:
            self.given_up += dropped
            self.log.warn(
                "federation: gave up on {n} items for {realm}: {code}: {why}",
                n=dropped,
                realm=self.realm,
                code=code,
                why=why,
            )
            self.fed.status_changed()
        self.pump()
        return dropped

    def presence(self, frame: dict[str, Any]) -> None:
        """Ephemeral: sent only when the link is up (presence is not stored).  A
        link that is not up drops the frame, and connects unless it says ``offline``
        (an idle link's peer has no one of ours online): once up, it sends who is
        online then (``RealmService.presence_for``).

        Paced at half the rate the peer accepts (PRESENCE_RATE, PRESENCE_BURST): past
        that, frames wait, the latest per user replacing an older one, so a burst (a
        link coming up, a join to a large group) reaches the peer a little later
        instead of being refused as a flood."""
        if self.proto is None:
            if frame.get("status") != "offline":
                self.activate("a user with a contact there is online")
            return
        self._active_at = self.fed.clock.seconds()
        self._presence_out.pop(frame.get("user"), None)  # re-inserted last
        self._presence_out[frame.get("user")] = frame
        if self._presence_call is None:
            self._send_presence()

    def reading(self, frame: dict[str, Any]) -> None:
        """A read marker or typing notice for the peer (ephemeral): sent if the link is
        up; else a read marker waits (the latest per pair, bounded) and the link
        connects, and a typing notice is dropped (it would be stale)."""
        proto = self.proto
        if proto is not None and self.state == "ready":
            self._active_at = self.fed.clock.seconds()
            proto.send(frame)
            return
        if frame.get("kind") != "read":
            return
        key = (frame.get("from"), frame.get("to"))
        self._reading_out.pop(key, None)
        if len(self._reading_out) < READING_QUEUE:
            self._reading_out[key] = frame
        self.activate("a read marker for a user there")

    def _send_presence(self) -> None:
        self._presence_call = None
        proto = self.proto
        if proto is None:
            self._presence_out.clear()
            return
        clock = self.fed.clock
        now = clock.seconds()
        if self._presence_bucket is None:
            self._presence_bucket = TokenBucket(PRESENCE_RATE / 2, PRESENCE_BURST / 2, now)
        while self._presence_out:
            wait = self._presence_bucket.take(now)
            if wait:
                # At least 10 ms: a wait below the clock's resolution would come back
                # at the same instant, with the same shortfall, for ever.
                self._presence_call = clock.callLater(max(wait, 0.01), self._send_presence)
                return
            user = next(iter(self._presence_out))
            proto.send(self._presence_out.pop(user))

    def _drop_presence(self) -> None:
        self._presence_out.clear()
        if self._presence_call is not None and self._presence_call.active():
            self._presence_call.cancel()
        self._presence_call = None

    def status(self) -> dict[str, Any]:
        return {
            "realm": self.realm,
            "state": self.state,
            "failures": self.failures,
            "retry_in": round(self.retry_in, 3) if self.retry_in is not None else None,
            "retry_at": self.retry_at,
            "last_error": self.last_error,
            "inflight": len(self.inflight),
            "sent_items": self.sent_items,
            "rejected_items": self.rejected_items,
            "given_up": self.given_up,
            "target": ":".join(map(str, self.endpoint.target)) if self.endpoint.target else "",
        }


# the service -----------------------------------------------------------------------------


class FederationService(MultiService):
    """Federation for one realm: the listener, the links, and the status file.

    ``reactor`` listens and connects; ``clock`` times backoff (a ``task.Clock`` in
    tests); ``resolver`` answers ``lookupService`` (default: ``twisted.names``).
    Sets ``realm.federation`` to itself: the realm calls :meth:`wake` after committing
    items for another realm, and :meth:`presence` for presence changes.
    """

    log = Logger()

    def __init__(
        self,
        realm: Any,
        reactor: Any,
        clock: Any = None,
        resolver: Any = None,
        status_path: str | None = None,
    ) -> None:
        super().__init__()
        self.setName("federation")
        self.realm = realm
        self.cfg: Federation = realm.config.federation
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.resolver = resolver
        self.tls = FederationTLS(self.cfg)
        self.links: dict[str, PeerLink] = {}
        self.inbound: set[InboundProtocol] = set()
        self.factory = InboundFactory(self)
        #: Inbound connections before their hello (see chatproto.admission).
        self.unauthenticated = Admission(
            "federation",
            self.cfg.max_unauthenticated,
            self.cfg.max_unauthenticated_per_address,
            self.clock,
        )
        self.port: Any = None
        #: realm -> (refuse hellos until, level): backoff for misbehaving peers
        self._penalties: dict[str, tuple[float, int]] = {}
        #: realm -> the call that forgets its users' presence (see inbound_closed)
        self._silence: dict[str, Any] = {}
        self._stopped = False
        self.status_path = (
            status_path
            if status_path is not None
            else os.path.join(realm.config.data_dir, STATUS_FILE)
        )
        self._status_call: Any = None
        self._sweep: LoopingCall | None = None
        realm.federation = self

    # lifecycle ----------------------------------------------------------------------------

    def listen(self) -> None:
        if self.port is not None:
            return
        wrapped = TLSMemoryBIOFactory(self.tls.server(), False, self.factory)
        try:
            self.port = self.reactor.listenTCP(self.cfg.port, wrapped, interface=self.cfg.interface)
        except CannotListenError as e:
            raise SystemExit(
                f"chatrealm: cannot listen for federation on "
                f"{self.cfg.interface}:{self.cfg.port}: {e.socketError}"
            ) from None
        host = self.port.getHost()
        self.log.info(
            "federation for {realm} listening on {host}:{port}",
            realm=self.realm.realm,
            host=host.host,
            port=host.port,
        )

    def privilegedStartService(self) -> None:
        MultiService.privilegedStartService(self)
        self.listen()

    def startService(self) -> None:
        MultiService.startService(self)
        self._stopped = False
        self.listen()
        # Links connect when they have something to send (their queue is resumed
        # below; presence and key waits come later): static peers are listed, idle.
        for peer in self.cfg.peers:
            if self.cfg.allows(peer.realm):
                self.link(peer.realm)
        for link in list(self.links.values()):  # started again after a stop
            if self.realm.presence_wanted(link.realm):
                link.activate("a user with a contact there is online")
        self.status_changed()
        # Resume every queue left by the last run (even one killed with SIGKILL).
        self.realm.store.outbox_counts().addCallback(self._resume).addErrback(
            lambda f: self.log.failure("federation: reading the outbox", f)
        )
        if self._sweep is None:
            # every hour (more often for short give_up_after), never at start: links
            # get their first attempts before anything is given up on
            every = min(3600.0, max(1.0, (self.cfg.give_up_after or 3600.0) / 4))
            self._sweep = LoopingCall(self.give_up)
            self._sweep.clock = self.clock
            self._sweep.start(every, now=False).addErrback(
                lambda f: self.log.failure("federation: giving up on old items", f)
            )

    @inlineCallbacks
    def give_up(self) -> Any:
        """Bounce what cannot be delivered: everything queued for a realm no longer
        allowed (``peer_denied``), and items older than ``give_up_after`` for a realm
        whose link has been down that long (``peer_unreachable``); forget group
        requests older than :data:`REQUEST_TTL`.  Runs periodically; a failure is
        logged and the next run tries again."""
        cfg = self.cfg
        now = self.clock.seconds()
        try:
            counts = yield self.realm.store.outbox_counts()
            for realm in sorted(counts):
                if not self.running:
                    return
                if not cfg.allows(realm):
                    link = self.links.get(realm) or PeerLink(self, realm)
                    yield link.give_up(
                        None, "peer_denied", f"this realm no longer federates with {realm}"
                    )
                    continue
                link = self.link(realm)
                down = link.down_since
                if not cfg.give_up_after or down is None or now - down < cfg.give_up_after:
                    continue
                days = cfg.give_up_after / 86400
                span = f"{days:g} days" if days >= 1 else f"{cfg.give_up_after:g} seconds"
                last = f" (last error: {link.last_error})" if link.last_error else ""
                yield link.give_up(
                    now - cfg.give_up_after,
                    "peer_unreachable",
                    f"{realm} could not be reached for {span}{last}",
                )
            # A request whose answer never came: a later answer is not accepted.
            ttl = max(REQUEST_TTL, 3 * (cfg.give_up_after or 0))
            yield self.realm.store.expire_requests(now - ttl)
        except Exception:
            self.log.failure("federation: giving up on old items")

    def _resume(self, counts: dict[str, int]) -> None:
        for realm, n in sorted(counts.items()):
            if self.running and self.cfg.allows(realm):
                self.log.info("federation: {n} items queued for {realm}", n=n, realm=realm)
                self.link(realm).wake()

    def stopService(self) -> Deferred[Any]:
        MultiService.stopService(self)
        self._stopped = True  # links closing now start no presence timers
        if self._sweep is not None and self._sweep.running:
            self._sweep.stop()
        self._sweep = None
        waits = [link.stop() for link in self.links.values()]
        waits += [proto.close(self.clock, CLOSE_GRACE) for proto in list(self.inbound)]
        if self.port is not None:
            port, self.port = self.port, None
            waits.append(port.stopListening())
        if self._status_call is not None and self._status_call.active():
            self._status_call.cancel()
        self._status_call = None
        for call in self._silence.values():
            if call.active():
                call.cancel()
        self._silence.clear()
        return gatherResults(waits)

    # what the realm calls -------------------------------------------------------------------

    def link(self, realm: str) -> PeerLink:
        """The link to ``realm`` (made idle if there was none: it connects when it
        has something to send)."""
        link = self.links.get(realm)
        if link is None:
            link = self.links[realm] = PeerLink(self, realm)
        return link

    def wake(self, realm: str, n: int = 1) -> None:
        """``n`` items for ``realm`` were committed to the outbox."""
        if self.running:
            self.link(realm).wake(n)

    def announce(self) -> list[dict[str, str]]:
        """The ``keys`` our ``hello`` and ``welcome`` carry: this realm's signing keys."""
        signing = self.realm.signing
        return signing.announce() if signing is not None else []

    def want_keys(self, realm: str) -> Deferred[bool]:
        """Learn ``realm``'s signing keys over a link of our own with it: fires with
        True once we hold its keys as it announces them now (at once when a link
        with it is up: it announced them in its hello or welcome), or with False
        if no link with it is up within :data:`KEY_WAIT` seconds."""
        if any(p.peer_realm == realm and p.is_up() for p in self.inbound):
            return succeed(True)
        if not self.running:
            return succeed(False)
        link = self.link(realm)
        if link.state == "ready":
            return succeed(True)
        waiting = self.realm.peer_keys.wait(realm, KEY_WAIT)
        self.log.info("federation: asking {realm} for its keys", realm=realm)
        link.hold(KEY_WAIT)
        link.kick()
        return waiting

    def reading(self, realm: str, frame: dict[str, Any]) -> None:
        """A ``reading`` frame (a read marker or typing notice of a private
        conversation, chatproto.realm.reading) for ``realm`` (an allowed peer)."""
        if self.running:
            self.link(realm).reading(frame)

    def presence(self, realms: set[str], frame: dict[str, Any]) -> None:
        """A presence frame for ``realms`` (allowed peers).  An idle link connects
        (unless the frame says offline): the frame is lost if it is not up yet, but a
        link that becomes ready sends who is online (``RealmService.presence_for``)."""
        if not self.running:
            return
        for realm in realms:
            self.link(realm).presence(frame)

    # inbound policy ---------------------------------------------------------------------------

    def inbound_refusal(self, realm: str, transport: Any) -> tuple[str, str | None]:
        """(error code, reason) for refusing an inbound link claiming ``realm``."""
        if realm == self.realm.realm:
            return "untrusted_peer", f"{realm} is this realm's own name"
        if not self.cfg.allows(realm):
            return "peer_denied", f"federation with {realm} is not allowed here"
        until = self._penalties.get(realm, (0.0, 0))[0]
        now = self.clock.seconds()
        if until > now:
            return "rate_limited", f"misbehaved recently; retry after {until - now:.0f}s"
        return "untrusted_peer", peer_refusal(transport, realm, self.cfg)

    def penalise(self, realm: str, reason: str) -> None:
        _, level = self._penalties.get(realm, (0.0, 0))
        delay = min(self.cfg.retry_max, self.cfg.retry_initial * 2**level)
        self._penalties[realm] = (self.clock.seconds() + delay, level + 1)
        self.log.warn(
            "federation: {realm} misbehaved ({reason}); refused for {delay}s",
            realm=realm,
            reason=reason,
            delay=round(delay, 1),
        )

    def clean(self, realm: str) -> None:
        """A transaction from ``realm`` went through: forget its past misbehaviour."""
        self._penalties.pop(realm, None)

    def peer_connected(self, realm: str) -> None:
        """A link from ``realm`` is up: our link to it, if waiting out a backoff,
        retries at once.  An idle one stays idle (it has nothing to send)."""
        link = self.links.get(realm)
        if link is not None:
            link.kick()
        call = self._silence.pop(realm, None)
        if call is not None and call.active():
            call.cancel()
        self.status_changed()

    def inbound_closed(self, realm: str) -> None:
        """An inbound link from ``realm`` closed.  Its users' presence comes only on
        such a link: if none is back within PRESENCE_SILENCE seconds (a restart, a
        blip), the realm's users whose presence we heard are told offline to the local
        users (the link's return sends who is online again)."""
        if (
            self._stopped
            or realm in self._silence
            or any(p.peer_realm == realm and p.is_up() for p in self.inbound)
        ):
            return
        self._silence[realm] = self.clock.callLater(PRESENCE_SILENCE, self._silent, realm)

    def _silent(self, realm: str) -> None:
        self._silence.pop(realm, None)
        if not any(p.peer_realm == realm and p.is_up() for p in self.inbound):
            self.realm.remote_realm_silent(realm)

    # status --------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        inbound = sorted({p.peer_realm for p in self.inbound if p.peer_realm})
        return {
            "realm": self.realm.realm,
            "time": self.clock.seconds(),
            "pid": os.getpid(),
            "links": [self.links[r].status() for r in sorted(self.links)],
            "inbound": inbound,
        }

    def status_changed(self) -> None:
        """Write the status file soon (at most twice a second), off the reactor thread."""
        if not self.status_path or (self._status_call is not None and self._status_call.active()):
            return

        def write() -> None:
            self._status_call = None
            data = json.dumps(self.status(), indent=1)
            path = self.status_path
            pool = getattr(self.reactor, "getThreadPool", None)
            if pool is None:  # a test clock standing in for the reactor
                _write_atomic(path, data)
                return
            deferToThreadPool(self.reactor, pool(), _write_atomic, path, data).addErrback(
                lambda f: self.log.failure("federation: writing {path}", f, path=path)
            )

        self._status_call = self.clock.callLater(0.5, write)


def _write_atomic(path: str, data: str) -> None:
    tmp = f"{path}.tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(data)
    os.replace(tmp, path)


def read_status(path: str) -> dict[str, Any] | None:
    """The status a running realm last wrote (for ``chatrealmctl peers``), or None."""
    try:
        with open(path, encoding="utf-8") as f:
            data: dict[str, Any] = json.load(f)
            return data
    except (OSError, ValueError):
        return None
