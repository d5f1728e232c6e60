"""The outbound side of one peer realm (:class:`PeerLink`): its connection under a
``ClientService`` that backs off, its cursor in the durable outbox, the transactions in
flight and their acks (rejected items bounce to their senders), giving up on items
that cannot be delivered, and the pacing of presence and read markers."""

from __future__ import annotations

import collections
import random
import re
from typing import TYPE_CHECKING, Any

from twisted.application.internet import ClientService
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatproto import wire
from chatproto.envelope import Envelope
from chatproto.federation.discovery import PeerEndpoint
from chatproto.federation.link import (
    MAX_TXN_ITEMS,
    PRESENCE_BURST,
    PRESENCE_RATE,
    envelope_to_wire,
)
from chatproto.federation.outbound import OutboundFactory, OutboundProtocol
from chatproto.ratelimit import TokenBucket
from chatproto.text import label_problem, log_shown

if TYPE_CHECKING:
    from chatproto.federation.service import FederationService

__all__ = ["READING_QUEUE", "RESERVED", "PeerLink"]

#: Read markers a link keeps for a peer while it is not up (the latest per pair).
READING_QUEUE = 1000
#: Seconds a new link is kept although nothing is queued yet: the item it was made
#: for is being committed (``FederationService.admit``).
RESERVED = 10.0

#: An error code as a peer may spell it (ours are in chatproto.errors.CODES; a newer
#: peer may have more): anything else in an ack's ``rejected`` reads as internal_error.
_CODE = re.compile(r"[a-z][a-z_]{0,39}")


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
        #: whether the realm was ever reached (``FederationService.proven``)
        self.reached = fed.proven(realm)
        #: who holds this link's place while the realm was never reached (a local
        #: user, or a peer realm), or None (``FederationService.admit``)
        self.holder: str | None = None
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
            self.fed.reached_realm(self.realm)
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
        # (not for a realm never reached: presence alone makes no link to it, see
        # FederationService.presence -- a made-up realm's link idles once its items
        # are given up on, though its user stays online)
        if self.reached and self.fed.realm.presence_wanted(self.realm):
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
            self.fed.idled(self)

        self.service.stopService().addBoth(stopped)
        self.fed.status_changed()

    def removable(self) -> bool:
        """Whether the service may forget this link (see ``FederationService.prune``):
        idle and stopped, nothing queued or awaited, no outbox delete pending, and not
        made in the last :data:`RESERVED` seconds (a link made for an item being
        committed, not woken yet).

        Unlike :meth:`wanted` it does not ask whether a user's presence wants the
        link (a scan of the realm's groups, too dear for every link at the bound): a
        link forgotten is made again by the next presence frame for its realm."""
        return (
            self.state == "idle"
            and not self.service.running
            and not self._idling
            and not self._kicking
            and self._penalty is None
            and self._settling is None
            and self.proto is None
            and not self.inflight
            and self._waiting <= 0
            and not self._reading
            and not self._presence_out
            and self.fed.clock.seconds() >= max(self._wanted_until, self._active_at + RESERVED)
        )

    def has_reading(self) -> bool:
        """Whether read markers wait for the link to be up."""
        return bool(self._reading_out)

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
                if label_problem(message) is not None:  # it goes in our user's bounce
                    message = ""
                self.log.warn(
                    "federation: {realm} rejected item {id}: {code}: {message}",
                    realm=self.realm,
                    id=log_shown(r.get("id")),
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
        waiting = self._waiting  # wakes during the reads below stay counted
        drained = False  # the queue was read to its end and all of it dropped
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
                    drained = not rows
                    break
                yield self.fed.realm.bounce(self.realm, [(item, code, why) for _, item in old])
                last = old[-1][0]
                yield store.outbox_ack(self.realm, last)
                self.acked_seq = self.sent_seq = max(self.acked_seq, last)
                dropped += len(old)
                if len(old) < len(rows) or len(rows) < cfg.batch_size:
                    drained = len(old) == len(rows)
                    break
        finally:
            self._reading = False
        if drained and self.proto is None:
            # Nothing is left queued: the link (down, retrying) may idle and be
            # forgotten instead of retrying for ever for items it no longer has, and
            # the place it held for a user (a realm never reached) is theirs again.
            self._waiting = max(0, self._waiting - waiting)
            self.fed.release(self)
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
