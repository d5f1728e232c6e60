"""Federation for one realm (:class:`FederationService`): the listener for inbound
links, one :class:`chatproto.federation.peer.PeerLink` per peer realm, the policy for
inbound links (refusals, penalties for misbehaving peers, presence of a realm gone
silent), and the status file ``chatrealmctl peers`` reads."""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from chatproto.admission import Admission
from chatproto.config import Federation
from chatproto.federation.inbound import MAX_LINKS_PER_REALM, InboundFactory, InboundProtocol
from chatproto.federation.peer import PeerLink
from chatproto.federation.tls import FederationTLS, peer_refusal

__all__ = [
    "CLOSE_GRACE",
    "KEY_WAIT",
    "PRESENCE_SILENCE",
    "PRUNE_EVERY",
    "REQUEST_TTL",
    "STATUS_FILE",
    "FederationService",
    "read_status",
]

#: Seconds without an inbound link from a realm after which the presence we heard of
#: its users is forgotten (they are shown offline until the link is back).
PRESENCE_SILENCE = 60.0
#: Seconds a link closed at shutdown has to close cleanly before it is aborted.
CLOSE_GRACE = 2.0
#: The status file ``chatrealmctl peers`` reads, in the data directory.
STATUS_FILE = "federation-status.json"
#: Seconds a transaction waits for the keys of a realm whose user wrote one of its
#: items (relayed by a group's home realm) while a link to that realm is made.
KEY_WAIT = 30.0
#: Seconds a group request sent to another realm is remembered for its answer (the
#: event in which the user acts) at least; three times ``give_up_after`` if longer.
REQUEST_TTL = 30 * 86400.0
#: Seconds between two looks for idle links to forget when a new realm finds
#: ``max_peers`` links (see :meth:`FederationService.admit`).
PRUNE_EVERY = 1.0


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
        #: when :meth:`admit` last looked for idle links to forget, at the bound
        self._pruned_at = -PRUNE_EVERY
        #: realms whose items are being bounced for want of a place (see :meth:`wake`)
        self._refusing: set[str] = set()
        #: realms a handshake was made with since start (see :meth:`proven`)
        self.reached: set[str] = set()
        #: who holds the places of links to realms never reached: a local user, or
        #: a peer realm for its requests' (see :meth:`admit`) -> those realms
        self.held: dict[str, set[str]] = {}
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
            # (a quarter of give_up_unreached if shorter: a realm never reached
            # frees its place within 1.25 times that)
            spans = [t for t in (self.cfg.give_up_after, self.cfg.give_up_unreached) if t]
            every = min(3600.0, max(1.0, min(spans or [3600.0]) / 4))
            self._sweep = LoopingCall(self.give_up)
            self._sweep.clock = self.clock
            self._sweep.start(every, now=False).addErrback(
                lambda f: self.log.failure("federation: giving up on old items", f)
            )

    @inlineCallbacks
    def give_up(self) -> Any:
        """Bounce what cannot be delivered: everything queued for a realm no longer
        allowed, or with no link and none to be had (``max_peers``: ``peer_denied``),
        and items older than ``give_up_after`` for a realm
        whose link has been down that long (``peer_unreachable``) -- or older than
        ``give_up_unreached`` for a realm never reached, so that the place of a
        made-up realm comes back within the hour, not the week; forget group
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
                if realm not in self.links:  # queued with no link (see wake)
                    if not self.admit(realm):
                        yield self._bounce(realm)
                        continue
                    self.link(realm).wake(counts[realm])
                link = self.links[realm]
                down = link.down_since
                limit, never = cfg.give_up_after, ""
                if not link.reached and cfg.give_up_unreached:
                    if not limit or cfg.give_up_unreached < limit:
                        limit, never = cfg.give_up_unreached, " (it never answered)"
                if not limit or down is None or now - down < limit:
                    continue
                days = limit / 86400
                span = f"{days:g} days" if days >= 1 else f"{limit:g} seconds"
                last = f" (last error: {link.last_error})" if link.last_error else ""
                yield link.give_up(
                    now - limit,
                    "peer_unreachable",
                    f"{realm} could not be reached for {span}{never}{last}",
                )
            # A request whose answer never came: a later answer is not accepted.
            ttl = max(REQUEST_TTL, 3 * (cfg.give_up_after or 0))
            yield self.realm.store.expire_requests(now - ttl)
            self.prune(keep_reading=True)
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
        has something to send).  Callers acting for a client or a peer ask
        :meth:`admit` first: this one makes a link whatever their number."""
        link = self.links.get(realm)
        if link is None:
            link = self.links[realm] = PeerLink(self, realm)
        return link

    def proven(self, realm: str) -> bool:
        """Whether ``realm`` was ever reached: a handshake with it (either way) since
        start, its signing keys known (announced in a handshake, kept in the store
        across restarts), or a static peer (the operator vouches for it).  A realm
        never reached may be made up: the links to such realms are charged to whoever
        named them (see :meth:`admit`) and their items given up on sooner
        (``give_up_unreached``)."""
        return (
            realm in self.reached
            or self.realm.peer_keys.known(realm)
            or self.cfg.peer(realm) is not None
        )

    def reached_realm(self, realm: str) -> None:
        """A handshake with ``realm`` was made (our link welcomed, or its hello
        accepted): it is proven, and its link's place is no one's any more."""
        if realm in self.reached:
            return
        self.reached.add(realm)
        link = self.links.get(realm)
        if link is not None:
            link.reached = True
            self.release(link)

    def holder(self, user: str) -> str:
        """Who is charged for the links ``user`` makes to realms never reached: a
        local user themself; for a user of another realm (a peer's request), their
        realm -- one peer cannot make more such links than one user can.  A bare
        realm name (``want_keys``) stands for that peer realm."""
        where = user.rpartition("@")[2]
        return user if where == self.realm.realm else where

    def _charge(self, link: PeerLink, holder: str) -> None:
        link.holder = holder
        self.held.setdefault(holder, set()).add(link.realm)

    def release(self, link: PeerLink) -> None:
        """``link`` no longer holds a place of its holder: its realm was proven, its
        link forgotten, or everything queued for it given up on (a request naming
        it again charges it again: see :meth:`admit`)."""
        holder, link.holder = link.holder, None
        if holder is not None:
            held = self.held.get(holder)
            if held is not None:
                held.discard(link.realm)
                if not held:
                    del self.held[holder]

    def _forget(self, realm: str) -> None:
        self.release(self.links.pop(realm))

    def _room(self, holder: str) -> bool:
        """Whether ``holder`` may take one more place for a realm never reached:
        fewer than ``max_peers_per_user``, after forgetting its links that have
        nothing to do (at most that many to look at)."""
        held = self.held.get(holder)
        bound = self.cfg.max_peers_per_user
        if held is None or len(held) < bound:
            return True
        for realm in sorted(held):
            link = self.links.get(realm)
            if link is not None and self._idle(link):
                self._forget(realm)
        return len(self.held.get(holder, ())) < bound

    def admit(self, realm: str, user: str | None = None) -> bool:
        """Whether this realm may keep state for ``realm``: True when it has a link
        to it, or makes one now (idle) because fewer than ``[federation] max_peers``
        realms have one; False past the bound.

        The bound is what keeps open federation (an empty ``allow`` list) finite: each
        realm named by a client or a peer (a recipient, an invitee, a group's home, a
        read marker, an item's author) costs a link (outbox cursor, retries, DNS and
        TLS work, metrics labels).  The link is made here, before the item that wants
        it is committed, so that sends racing for the last places cannot all pass.
        Idle links with nothing to send are forgotten (:meth:`prune`), so the count
        goes down again; at the bound they are looked for at once (at most once per
        :data:`PRUNE_EVERY` seconds).

        ``user`` (a local user's request, or a remote user's through its realm: see
        :meth:`holder`) is charged for a link to a realm never reached (see
        :meth:`proven`), at most ``[federation] max_peers_per_user`` of them, so one
        user cannot take every place with made-up realms: the place is theirs until
        the realm answers, or the link is forgotten (its items delivered or given up
        on, ``give_up_unreached``).  A realm with a link costs nothing more (one
        lookup, the send path's case), unless its link is to a realm never reached
        and no one holds it yet."""
        link = self.links.get(realm)
        if link is not None:
            if user is None or link.reached or link.holder is not None:
                return True
            who = self.holder(user)
            if not self._room(who):
                return False
            self._charge(link, who)
            return True
        holder: str | None = None
        if user is not None and not self.proven(realm):
            holder = self.holder(user)
            if not self._room(holder):
                return False
        if len(self.links) >= self.cfg.max_peers:
            now = self.clock.seconds()
            if now - self._pruned_at >= PRUNE_EVERY:
                self._pruned_at = now
                self.prune()
            if len(self.links) >= self.cfg.max_peers:
                return False
        link = self.link(realm)
        if holder is not None:
            self._charge(link, holder)
        return True

    def refusal(self, realm: str | None = None, user: str | None = None) -> str:
        """Why :meth:`admit` said no to ``user`` for ``realm`` (a ``peer_denied``
        message)."""
        if user is not None and realm is not None and not self.proven(realm):
            held = len(self.held.get(self.holder(user), ()))
            if held >= self.cfg.max_peers_per_user:
                return (
                    f"{realm} has never been reached from here, and {held} other such "
                    "realms wait for your messages already (federation.max_peers_per_user):"
                    " try again once they are delivered or bounced"
                )
        return (
            f"this realm federates with at most {self.cfg.max_peers} other realms at a "
            "time (federation.max_peers)"
        )

    def prune(self, keep_reading: bool = False) -> int:
        """Forget the links that have nothing to do: idle (no connection, no attempt),
        nothing queued or wanted, no outbox delete pending; never a static peer's
        (``[[federation.peers]]``, listed from start).  A read marker waiting for the
        peer to be reachable goes with its link (``keep_reading``: keep such a link).
        A realm forgotten gets a new link when something is for it again (its outbox
        is read from its start).  Returns the number of links forgotten."""
        gone = [realm for realm, link in self.links.items() if self._idle(link, keep_reading)]
        for realm in gone:
            self._forget(realm)
        if gone:
            self.log.info("federation: dropped {n} idle links", n=len(gone))
            self.status_changed()
        return len(gone)

    def idled(self, link: PeerLink) -> None:
        """``link`` went idle (its connection closed): forget it unless it is wanted
        again or holds read markers (see :meth:`prune`)."""
        if self.links.get(link.realm) is link and self._idle(link):
            self._forget(link.realm)
            self.status_changed()

    def _idle(self, link: PeerLink, keep_reading: bool = True) -> bool:
        """Whether ``link`` may be forgotten: not a static peer's, nothing to do
        (:meth:`PeerLink.removable`), and (with ``keep_reading``) no read marker
        waiting for it."""
        return (
            self.cfg.peer(link.realm) is None
            and link.removable()
            and not (keep_reading and link.has_reading())
        )

    def _bounce(self, realm: str) -> Deferred[Any]:
        """Give up on what is queued for ``realm``, which has no link and gets none
        (``max_peers``): its senders get ``peer_denied``."""
        return PeerLink(self, realm).give_up(None, "peer_denied", self.refusal())

    def wake(self, realm: str, n: int = 1) -> None:
        """``n`` items for ``realm`` were committed to the outbox.  Past
        ``max_peers`` (an item queued by a path that did not ask :meth:`admit`, or
        by another worker of a cluster) they bounce to their senders
        (``peer_denied``) instead of making a link."""
        if not self.running:
            return
        if self.admit(realm):
            self.link(realm).wake(n)
        elif realm not in self._refusing:
            self._refusing.add(realm)
            d = self._bounce(realm)
            d.addErrback(
                lambda f: self.log.failure("federation: bouncing items for {realm}", f, realm=realm)
            )
            d.addBoth(lambda _: self._refusing.discard(realm))

    def announce(self) -> list[dict[str, str]]:
        """The ``keys`` our ``hello`` and ``welcome`` carry: this realm's signing keys."""
        signing = self.realm.signing
        return signing.announce() if signing is not None else []

    def want_keys(self, realm: str, by: str | None = None) -> Deferred[bool]:
        """Learn ``realm``'s signing keys over a link of our own with it: fires with
        True once we hold its keys as it announces them now (at once when a link
        with it is up: it announced them in its hello or welcome), or with False
        if no link with it is up within :data:`KEY_WAIT` seconds.  ``by``: the peer
        realm whose transaction wants them (a link to a realm never reached is
        charged to it: see :meth:`admit`)."""
        if any(p.peer_realm == realm and p.is_up() for p in self.inbound):
            return succeed(True)
        if not self.running or not self.admit(realm, by):
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
        conversation, or typing in a group; chatproto.realm.reading) for ``realm``
        (an allowed peer), for the local user it is ``from`` (see :meth:`admit`)."""
        sender = frame.get("from")
        if self.running and self.admit(realm, sender if isinstance(sender, str) else None):
            self.link(realm).reading(frame)

    def presence(self, realms: set[str], frame: dict[str, Any]) -> None:
        """A presence frame for ``realms`` (allowed peers).  An idle link connects
        (unless the frame says offline): the frame is lost if it is not up yet, but a
        link that becomes ready sends who is online (``RealmService.presence_for``).

        Presence alone makes no link to a realm never reached (:meth:`proven`): a
        user with contacts on made-up realms would otherwise have their links made
        again each time they come online.  Once such a realm is reached (a message
        for it is delivered, or it connects to us), its link sends who is online."""
        if not self.running:
            return
        links = self.links
        for realm in realms:
            if (realm in links or self.proven(realm)) and self.admit(realm):
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
        reason = peer_refusal(transport, realm, self.cfg)
        if reason is not None:
            return "untrusted_peer", reason
        links = sum(1 for p in self.inbound if p.claimed == realm and not p.closed)
        if links >= MAX_LINKS_PER_REALM:
            return "rate_limited", f"{links} links from {realm} are open already"
        return "untrusted_peer", None

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
        self.reached_realm(realm)
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
