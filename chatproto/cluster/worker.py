"""One worker of a cluster: the realm's handlers, with the seams that cross workers.

``twistd chatrealm --worker NAME`` builds the same realm as a single process, on the
PostgreSQL store, and hands it a :class:`Worker`, which swaps in the cluster side of
each seam the handlers already ask through:

- delivery: the realm's ``route`` gives each committed item to the
  :class:`chatproto.cluster.stream.StreamReader`, which delivers every worker's items
  to the local sessions in position order, from the store; a wake-up on the bus says
  when to read;
- presence: :class:`chatproto.cluster.presence.ClusterPresence`;
- sends: :class:`ClusterMessaging` refuses them (``unavailable``) while PostgreSQL or
  Redis does not answer, and makes a send with a ``nonce`` idempotent across workers
  (its message id comes from the user and the nonce: a retry elsewhere finds the
  first in the store);
- federation: every worker receives; one (``[cluster] federation_sender``) runs the
  outbound links, and the others pass their wake-ups, presence and ``reading``
  frames to it over the bus (:mod:`chatproto.cluster.federation`);
- accounts' standing: a suspension, the admin role, browser logins, a deletion or
  sessions ended by an operator (``chatrealmctl``, which reaches one worker, or a
  realm admin) is made in the store and in the memory of the worker it reaches;
  that worker says so on the bus (channel ``standing``: the account, what to re-read,
  which sessions to end), and every other worker re-reads it from the store and
  ends its own sessions of the account (:meth:`chatproto.realm.admin.Admin.follow`).
  The store is the truth: a worker that missed such messages (Redis was away)
  re-reads suspensions, admins and browser logins when Redis answers again;
- rate limits: abuse reports per user and registrations per client address are
  counted in Redis (:class:`chatproto.cluster.bus.RedisBuckets`) by every worker.

Nothing of this runs in a single-process realm.
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Iterable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, DeferredLock, fail, inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatproto.cluster.bus import BusUnavailable, RedisBuckets, RedisBus, check_redis
from chatproto.cluster.presence import ClusterPresence
from chatproto.cluster.stream import StreamReader
from chatproto.envelope import Envelope
from chatproto.errors import ChatError
from chatproto.ratelimit import UserBuckets
from chatproto.realm.admin import STANDING
from chatproto.realm.groups import GroupHandler
from chatproto.realm.messaging import Messaging, SendRequest
from chatproto.realm.sessions import Notice, Session
from chatproto.store.grouprealms import GroupFanout, GroupRealms

__all__ = ["ClusterGroupHandler", "ClusterMessaging", "Worker", "nonce_id"]

#: ``retry_after`` of an ``unavailable`` error (seconds).
RETRY_AFTER = 1.0


def nonce_id(realm: str, user: str, nonce: str) -> str:
    """The id of the message ``user`` sends with ``nonce`` (35 hex digits, like
    :func:`chatproto.envelope.new_message_id`): the same on every worker."""
    digest = hashlib.sha256(f"chatproto nonce\0{realm}\0{user}\0{nonce}".encode()).hexdigest()
    return digest[:35]


class ClusterMessaging(Messaging):
    """Messaging on a worker: sends refused while the worker is degraded, and nonces
    that hold across workers (see the module docstring)."""

    def __init__(self, realm: Any, known: set[str], worker: Worker) -> None:
        super().__init__(realm, known)
        self._worker = worker
        self._id_hint: str | None = None

    def new_envelope(
        self,
        sender: str,
        recipient: str,
        kind: str,
        body: str,
        meta: dict[str, Any] | None = None,
        msg_id: str | None = None,
        ts: float | None = None,
    ) -> Envelope:
        env = super().new_envelope(sender, recipient, kind, body, meta, msg_id, ts)
        if self._id_hint is not None:
            env.id, self._id_hint = self._id_hint, None
        return env

    def send(  # type: ignore[override]
        self, session: Session, to: str, body: str, nonce: str | None = None, *more: Any
    ) -> Deferred[Envelope]:
        """:meth:`Messaging.send` (``more``: its other arguments, passed on as they
        are), refused while the worker is degraded."""
        problem = self._worker.problem()
        if problem is not None:
            return fail(ChatError("unavailable", problem, retry_after=RETRY_AFTER))
        if to.startswith("#"):  # the group's members as the other workers made them
            d = self._worker.stream.catch_up()
            d.addCallback(lambda _: self._send(session, to, body, nonce, more))
            return d.addErrback(self._unavailable)
        return self._send(session, to, body, nonce, more)

    def send_batch(self, session: Session, requests: Sequence[SendRequest]) -> Any:
        """:meth:`Messaging.send_batch`, refused while the worker is degraded; a batch
        with a nonce takes :meth:`send` for each request (a nonce's message id must be
        the same on every worker); a run's commit that meets a lost database says
        ``unavailable``."""
        problem = self._worker.problem()
        if problem is not None:
            err = ChatError("unavailable", problem, retry_after=RETRY_AFTER)
            return [err] * len(requests), []
        if any(req[2] is not None for req in requests):
            return [self.send(session, to, *rest) for to, *rest in requests], []
        return super().send_batch(session, requests)

    def run_failed(self, f: Failure, remember: Any) -> Failure:
        """A run's commit that meets a lost database says ``unavailable``."""
        f = super().run_failed(f, remember)
        try:
            return self._unavailable(f)  # type: ignore[no-any-return]
        except ChatError:
            return Failure()

    def _send(
        self, session: Session, to: str, body: str, nonce: str | None, more: tuple[Any, ...]
    ) -> Deferred[Envelope]:
        # more = (notice, reply_to, tags...): a reply reads the store before its
        # envelope is made, so its id stays random (its nonce holds on this worker)
        replying = len(more) > 1 and more[1] is not None
        if nonce is None or replying:
            return super().send(session, to, body, nonce, *more).addErrback(self._unavailable)
        if not to.startswith("#"):
            # Resolve first, so that the send below reaches new_envelope at once and
            # the id is this send's (a Deferred here means an unknown recipient).
            try:
                resolved = self.resolve_user(to, True, session.user_id)
            except ChatError:
                resolved = None  # the send below reports it
            if isinstance(resolved, Deferred):
                return resolved.addCallback(lambda _: self._send(session, to, body, nonce, more))
        ident = nonce_id(self._name, session.user_id, nonce)
        self._id_hint = ident
        try:
            d = super().send(session, to, body, nonce, *more)
        finally:
            self._id_hint = None
        return d.addErrback(self._repeated, ident, session.user_id)

    def _repeated(self, f: Failure, ident: str, user: str) -> Any:
        """A nonce's message id is taken: the first send (on another worker, maybe
        one that died before answering) stored it; answer with it."""
        import psycopg

        if not f.check(psycopg.errors.UniqueViolation):
            return self._unavailable(f)

        def found(env: Envelope | None) -> Envelope:
            if env is None or env.sender != user:
                f.raiseException()
            assert env is not None
            return env

        return self._store.stored_item(ident).addCallback(found)

    def _unavailable(self, f: Failure) -> Any:
        import psycopg

        if f.check(psycopg.OperationalError, psycopg.InterfaceError):
            self._worker.store_failed(f.value)
            raise ChatError(
                "unavailable",
                "the realm's database does not answer: the message may not be stored; "
                "send it again with the same nonce",
                retry_after=RETRY_AFTER,
            )
        return f


class ClusterGroupHandler(GroupHandler):
    """Group changes on a worker: one at a time per group across the workers, each
    checked once this worker has applied what the others committed before (see
    :meth:`chatproto.cluster.stream.StreamReader.catch_up`).

    An item of one of our groups is checked against the group as this worker knows
    it; another worker may commit, meanwhile, the join of a user of a new realm (or
    the leave of a realm's last member) at a position before the item's.  So the
    realms it goes to are chosen by the store, in the item's transaction: a change of
    a group's other realms is committed with a record of them (:meth:`realms_changed`),
    and an item with a note asking for the realms recorded at its position
    (:meth:`fanout`; see :mod:`chatproto.store.grouprealms`)."""

    def __init__(self, realm: Any, worker: Worker) -> None:
        super().__init__(realm)
        self._worker = worker
        self._queues: dict[str, DeferredLock] = {}

    def realms_changed(self, addr: str, realms: set[str]) -> list[tuple[str, Any]]:
        return [("", GroupRealms(addr, tuple(sorted(realms))))]

    def fanout(self, env: Envelope, realms: Iterable[str], origin: str = "") -> list[Any]:
        if self._realm.federation is None:
            return []  # (no other realm)
        return [("", GroupFanout(env.recipient, env, tuple(sorted(realms)), origin))]

    @inlineCallbacks
    def change(
        self, actor: str, event: str, group: str, args: dict[str, Any], item_id: str | None = None
    ) -> Any:
        """One change at a time per group across the cluster (a Redis lock), checked
        once this worker has applied every change committed before."""
        problem = self._worker.problem()
        if problem is not None:
            raise ChatError("unavailable", problem, retry_after=RETRY_AFTER)
        addr = self.address(group, True, actor)
        bus = self._worker.bus
        # This worker's changes of one group queue here first, so only one of them at
        # a time asks Redis for the cluster's lock (100 joins at once poll it once).
        queue = self._queues.get(addr)
        if queue is None:
            queue = self._queues[addr] = DeferredLock()
        yield queue.acquire()
        try:
            try:
                token = yield bus.lock(f"group:{addr}")
            except BusUnavailable as e:
                raise ChatError("unavailable", str(e), retry_after=RETRY_AFTER) from None
            try:
                yield self._worker.stream.catch_up()
                env = yield super().change(actor, event, group, args, item_id)
            finally:
                bus.unlock(f"group:{addr}", token)
        finally:
            queue.release()
            if not queue.locked and not queue.waiting:
                self._queues.pop(addr, None)
        return env


class Worker:
    """The cluster side of one worker process (see the module docstring).

    Created by :func:`chatproto.tap.build` for ``--worker NAME`` before the realm
    starts; the realm calls :meth:`check_services` before the reactor runs,
    :meth:`realm_started` once its state is loaded, :meth:`committed` for each item
    it commits and :meth:`realm_stopping` first when it stops.
    """

    log = Logger()

    def __init__(self, realm: Any, reactor: Any) -> None:
        cfg = realm.config
        cluster = cfg.cluster
        self.name: str = cfg.worker
        self.realm = realm
        self.reactor = reactor
        self.config = cluster
        self.sender = cluster.federation_sender == self.name
        self._suffix = "@" + realm.realm
        self.bus = RedisBus(
            cluster.redis,
            cluster.redis_prefix,
            self.name,
            reactor,
            cluster.heartbeat,
            on_change=self._bus_changed,
        )
        self.stream = StreamReader(
            realm,
            realm.store,
            realm.clock,
            cluster.poll_interval,
            on_error=self.store_failed,
            on_ok=self.store_ok,
        )
        self._store_error: str | None = None
        self._beat = LoopingCall(self.heartbeat)
        self._beat.clock = realm.clock
        self._announced = 0
        self._announcing = False
        #: The live workers as the last heartbeat saw them: name -> description.
        self.workers: dict[str, dict[str, Any]] = {}
        realm.presence = ClusterPresence(
            realm.realm,
            realm.sessions,
            realm.groups,
            realm.store,
            lambda: realm.federation,
            realm.realms_of,
            worker=self.name,
            publish=lambda message: self.bus.publish("presence", message),
        )
        realm.messages = ClusterMessaging(realm, realm.accounts.known, self)
        realm.group_handler = ClusterGroupHandler(realm, self)
        self.bus.on("stream", self._heard_stream)
        self.bus.on("presence", realm.presence.heard)
        self.bus.on("federation", self._heard_federation)
        self.bus.on("throttle", self._heard_throttle)
        self.bus.on("notice", self._heard_notice)
        self.bus.on("standing", self._heard_standing)
        realm.sessions.relay = self._relay_notice

        def shared(name: str, limit: UserBuckets) -> RedisBuckets:
            return RedisBuckets(self.bus, name, limit.rate, limit.burst)

        realm.moderation.report_limit = shared("report", realm.moderation.report_limit)
        realm.accounts.register_limit = shared("register", realm.accounts.register_limit)
        for kind, throttle in realm.accounts.throttles.items():
            throttle.listener = self._throttle_listener(kind)
        realm.cluster = self

    # start and stop --------------------------------------------------------------------

    def check_services(self) -> None:
        """Before the reactor runs: Redis must answer (PostgreSQL is checked by
        opening the store), else say which and exit non-zero."""
        try:
            check_redis(self.config.redis, self.config.connect_timeout)
        except BusUnavailable as e:
            raise SystemExit(f"chatrealm: worker {self.name}: {e}") from None

    def federation_service(self) -> Any:
        """This worker's federation service (with ``[federation] enabled``): links
        and listener on the sender, the listener alone elsewhere
        (chatproto.cluster.federation)."""
        from chatproto.cluster.federation import ReceivingFederation, SendingFederation

        if self.sender:
            return SendingFederation(self.realm, self.reactor)
        return ReceivingFederation(
            self.realm,
            self.reactor,
            self.name,
            lambda message: self.bus.publish("federation", message),
        )

    def realm_started(self) -> None:
        self.bus.start()
        self.stream.start(self.realm.store.visible or 0)
        self._beat.start(self.config.heartbeat, now=True)
        self.log.info(
            "cluster: worker {name} of realm {realm} started (Redis {redis}{role})",
            name=self.name,
            realm=self.realm.realm,
            redis=self.config.redis,
            role=", federation sender" if self.sender else "",
        )

    @inlineCallbacks
    def realm_stopping(self) -> Any:
        if self._beat.running:
            self._beat.stop()
        yield self.stream.stop()
        yield self.bus.leave()
        yield self.bus.stop()

    # health ------------------------------------------------------------------------------

    def problem(self) -> str | None:
        """Why sends are refused now, or None."""
        if self._store_error is not None:
            return f"the realm's database does not answer ({self._store_error})"
        if not self.bus.up:
            return f"the realm's message bus (Redis at {self.config.redis}) does not answer"
        return None

    def store_failed(self, error: BaseException | None) -> None:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        self._store_error = first[:200]
        if not self.stream.failing:
            self.stream.suspect()  # it says when the store answers again

    def store_ok(self) -> None:
        self._store_error = None

    # delivery ----------------------------------------------------------------------------

    def committed(self, env: Envelope, users: Any) -> None:
        """The realm committed ``env`` (audience ``users``): deliver it through the
        stream, and wake the other workers (once per reactor turn)."""
        self.stream.committed(env, users)
        if env.pos > self._announced:
            self._announced = env.pos
            if not self._announcing:
                self._announcing = True
                self.reactor.callLater(0, self._announce)

    def until_routed(self, pos: int) -> Deferred[None] | None:
        """See :meth:`chatproto.realm.RealmService.until_routed`."""
        return self.stream.until_routed(pos)

    def _announce(self) -> None:
        self._announcing = False
        self.bus.publish("stream", str(self._announced))

    def _heard_stream(self, message: str) -> None:
        try:
            pos = int(message)
        except ValueError:
            return
        self.stream.wake(pos)

    def _relay_notice(self, users: list[str], notice: Notice) -> None:
        """An ephemeral notice (typing, read markers, client tags...) for ``users``:
        their sessions on the other workers get it too.  The presence of local users
        is ClusterPresence's to tell (it decides what "offline" means)."""
        data = notice.data
        if data.get("type") == "presence" and str(data.get("user", "")).endswith(self._suffix):
            return
        self.bus.publish("notice", json.dumps({"w": self.name, "u": users, "d": data}))

    def _heard_notice(self, message: str) -> None:
        try:
            m = json.loads(message)
            users, data = m["u"], m["d"]
            if m["w"] == self.name or not isinstance(users, list) or not isinstance(data, dict):
                return
        except (ValueError, KeyError, TypeError):
            return
        sessions = self.realm.sessions
        relay, sessions.relay = sessions.relay, None  # (not passed on again)
        try:
            sessions.notify([str(u) for u in users], Notice(data))
        finally:
            sessions.relay = relay

    def standing_changed(
        self, name: str, reload: Sequence[str], end: tuple[str, str] | None
    ) -> None:
        """Local account ``name``'s standing changed on this worker (see
        :meth:`chatproto.realm.service.RealmService.standing_changed`): the other
        workers re-read ``reload`` from the store and end their sessions of it."""
        message = {"w": self.name, "u": name, "r": list(reload), "e": list(end) if end else None}
        self.bus.publish("standing", json.dumps(message))

    def _heard_standing(self, message: str) -> Any:
        """Another worker changed an account's standing: follow it from the store."""
        try:
            m = json.loads(message)
            name, reload, end = m["u"], m["r"], m["e"]
            if m["w"] == self.name or not isinstance(name, str) or not isinstance(reload, list):
                return None
            if end is not None:
                code, why = end
                end = (str(code), str(why))
        except (ValueError, KeyError, TypeError):
            return None
        wanted = [str(r) for r in reload if r in STANDING]
        d = self.realm.admin.follow(name, wanted, end)
        d.addErrback(
            lambda f: self.log.failure("cluster: following {user}'s standing", f, user=name)
        )
        return d

    def _bus_changed(self, up: bool) -> None:
        """Redis answers again: re-read what standing messages may have been missed
        (suspensions, admins, browser logins; the sessions a suspension or an ended
        login closed elsewhere are closed here now)."""
        if up and self.realm.running:
            d = self.realm.admin.catch_up()
            d.addErrback(lambda f: self.log.failure("cluster: re-reading suspensions", f))

    def _throttle_listener(self, kind: str) -> Any:
        def changed(event: str, key: str, now: float) -> None:
            message = {"w": self.name, "k": kind, "e": event, "key": key, "t": now}
            self.bus.publish("throttle", json.dumps(message))

        return changed

    def _heard_throttle(self, message: str) -> None:
        """A login failure (or success) on another worker counts here too."""
        try:
            m = json.loads(message)
            throttle = self.realm.accounts.throttles[m["k"]]
            if m["w"] != self.name and m["e"] in ("failed", "succeeded"):
                throttle.apply(m["e"], str(m["key"]), float(m["t"]))
        except (ValueError, KeyError, TypeError):
            return

    def _heard_federation(self, message: str) -> None:
        fed = self.realm.federation
        if not self.sender or fed is None:
            return
        try:
            m = json.loads(message)
        except ValueError:
            return
        if isinstance(m.get("wake"), str):
            fed.wake(m["wake"])
        elif isinstance(m.get("presence"), list) and isinstance(m.get("data"), dict):
            fed.presence(set(m["presence"]), m["data"])
        elif isinstance(m.get("reading"), str) and isinstance(m.get("data"), dict):
            fed.reading(m["reading"], m["data"])

    # the heartbeat -----------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """This worker, for the others and for ``chatrealmctl cluster status``."""
        sessions = self.realm.sessions.all()
        return {
            "host": socket.gethostname(),
            "sessions": len(sessions),
            "users": len(self.realm.sessions.online),
            "delivered": self.stream.delivered,
            "safe": self.stream.safe,
            "federation_sender": self.sender,
            "degraded": self.problem(),
        }

    @inlineCallbacks
    def heartbeat(self) -> Any:
        online = dict(self.realm.presence.visible)
        try:
            workers, directories = yield self.bus.beat(self.describe(), online)
        except BusUnavailable:
            return
        except Exception:
            self.log.failure("cluster: heartbeat failed")
            return
        if not self.bus.up:
            return
        self.workers = workers
        self.realm.presence.directory(directories)
        self.stream.wake()  # catch up on what the bus may have missed
