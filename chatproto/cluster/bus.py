"""The bus of a cluster: Redis (through txredisapi), for what is not the store's.

What goes through it (every key and channel under ``[cluster] redis_prefix``, ``P``):

- wake-ups: channel ``P:stream`` carries "items were committed up to position N";
  a worker hearing it reads the store (:mod:`chatproto.cluster.stream`).  Nothing is
  ever delivered from the bus itself;
- presence: channel ``P:presence`` carries a user's presence changes and the change
  of their number of visible sessions on the worker that publishes; the hash
  ``P:online:W`` is worker W's part of the session directory (user -> visible
  sessions), refreshed with every heartbeat and read back by the others, so a worker
  that missed messages (or one that died) is corrected within a heartbeat;
- workers: ``P:worker:W`` (a JSON description of worker W, expiring after three
  heartbeats) and the set ``P:workers``;
- federation: channel ``P:federation`` tells the federation sender which links to
  wake and which presence to send to other realms;
- rate limits every worker counts (abuse reports per user, registrations per
  client address): the hash ``P:bucket:NAME:KEY`` is a token bucket
  (:class:`RedisBuckets`).

Redis is watched by the heartbeat: when its connections drop, a command fails, or
Redis has not answered a command for :attr:`RedisBus.grace` seconds (three
heartbeats), the bus is *down* (:attr:`RedisBus.up`), the worker refuses sends
(``unavailable``) and goes on delivering by polling the store; when it answers again,
the worker catches up.  One command that times out while Redis answered within the
grace is not an outage: on a machine short of CPU (more workers than cores) an answer
can come late, and refusing every send for it was worse than the late answer.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import txredisapi
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.defer import TimeoutError as CommandTimeout
from twisted.logger import Logger

from chatproto.ratelimit import UserBuckets

__all__ = ["BusUnavailable", "RedisBuckets", "RedisBus", "check_redis"]


class BusUnavailable(Exception):
    """Redis does not answer."""


def check_redis(address: str, timeout: float) -> None:
    """Synchronously check that Redis answers at ``address`` (HOST:PORT): before the
    reactor runs, so that a worker that cannot reach it says so and exits.  Raises
    :class:`BusUnavailable` with a readable message."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"PING\r\n")
            answer = s.recv(64)
    except OSError as e:
        raise BusUnavailable(f"cannot reach Redis at {address} (cluster.redis): {e}") from None
    if not answer.startswith(b"+PONG"):
        first = answer.decode("utf-8", "replace").strip()
        raise BusUnavailable(f"Redis at {address} (cluster.redis) answers {first!r} to PING")


class _Subscriber(txredisapi.SubscriberProtocol):
    """The subscribing connection: (re)subscribes on every connect."""

    def connectionMade(self) -> Any:
        d = super().connectionMade()
        bus = self.factory.bus
        channels = list(bus.handlers)

        def subscribe(_: object) -> Any:
            return self.subscribe(channels)

        if isinstance(d, Deferred):
            d.addCallback(subscribe)
        else:
            subscribe(None)
        bus._subscribed(self)
        return d

    def connectionLost(self, why: Any) -> Any:
        self.factory.bus._unsubscribed(self)
        return super().connectionLost(why)

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.factory.bus._message(channel, message)


class RedisBus:
    """The Redis side of one worker: publish, subscribe, the session directory.

    ``on_change(up)`` is called when Redis stops or starts answering.
    """

    log = Logger()

    def __init__(
        self,
        address: str,
        prefix: str,
        worker: str,
        reactor: Any,
        heartbeat: float,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        host, _, port = address.rpartition(":")
        self.host, self.port = host, int(port)
        self.address = address
        self.prefix = prefix
        self.worker = worker
        self.reactor = reactor
        self.heartbeat = heartbeat
        #: channel (full name) -> callable(message text)
        self.handlers: dict[str, Callable[[str], None]] = {}
        self.up = False
        self._on_change = on_change
        self._conn: Any = None
        self._sub_factory: Any = None
        self._subscriber: Any = None
        #: Seconds a command may take before it fails (:class:`BusUnavailable`).
        self.timeout = max(1.0, heartbeat)
        #: Seconds without an answer from Redis, a command having timed out, after
        #: which Redis is taken as down (a refused or lost connection is at once).
        self.grace = 3 * self.timeout
        #: When Redis last answered a command (reactor seconds).
        self._answered = reactor.seconds()

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def on(self, channel: str, handler: Callable[[str], None]) -> None:
        """Call ``handler(message)`` for every message on ``channel`` (before start)."""
        self.handlers[self.key(channel)] = handler

    # lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Connect (and keep reconnecting) the command and the subscribing
        connections; :attr:`up` once both answer (see :meth:`beat`)."""
        from twisted.internet.endpoints import HostnameEndpoint

        def endpoint() -> Any:
            return HostnameEndpoint(self.reactor, self.host, self.port, timeout=self.timeout)

        commands = txredisapi.RedisFactory(self.address, None, 1, isLazy=True)
        commands.maxDelay = self.heartbeat
        commands.initialDelay = min(commands.initialDelay, self.heartbeat / 2)
        commands.startConnecting(endpoint())
        self._conn = commands.handler
        factory = txredisapi.SubscriberFactory(isLazy=True)
        factory.protocol = _Subscriber
        factory.bus = self  # type: ignore[attr-defined]
        factory.maxDelay = self.heartbeat
        factory.initialDelay = min(factory.initialDelay, self.heartbeat / 2)
        self._sub_factory = factory
        factory.startConnecting(endpoint())

    def stop(self) -> Deferred[Any]:
        ds = []
        if self._sub_factory is not None:
            ds.append(self._sub_factory.disconnect())
        if self._conn is not None:
            ds.append(self._conn.disconnect())
        from twisted.internet.defer import gatherResults

        return gatherResults(ds, consumeErrors=True).addErrback(lambda _: None)

    def _set_up(self, up: bool) -> None:
        if up != self.up:
            self.up = up
            if up:
                self.log.info("cluster: Redis at {address} answers", address=self.address)
            else:
                self.log.warn(
                    "cluster: Redis at {address} does not answer; sends are refused "
                    "(unavailable) and delivery polls the store",
                    address=self.address,
                )
            if self._on_change is not None:
                self._on_change(up)

    def _subscribed(self, proto: Any) -> None:
        self._subscriber = proto

    def _unsubscribed(self, proto: Any) -> None:
        if self._subscriber is proto:
            self._subscriber = None
            self._set_up(False)

    def _message(self, channel: Any, message: Any) -> None:
        if isinstance(channel, bytes):
            channel = channel.decode("utf-8", "replace")
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        handler = self.handlers.get(channel)
        if handler is not None:
            try:
                handler(str(message))
            except Exception:
                self.log.failure("cluster: handling a message on {channel} failed", channel=channel)

    # commands -----------------------------------------------------------------------

    def command(self, name: str, *args: Any) -> Deferred[Any]:
        """Run one Redis command; fails with :class:`BusUnavailable` if Redis does not
        answer within :attr:`timeout` (and the bus is then down)."""
        if self._conn is None:
            from twisted.internet.defer import fail

            return fail(BusUnavailable("the bus is not started"))
        d = self._conn.execute_command(name, *args)
        d.addTimeout(self.timeout, self.reactor)

        def answered(result: Any) -> Any:
            self._answered = self.reactor.seconds()
            return result

        def failed(f: Any) -> Any:
            if not f.check(CommandTimeout):
                self._set_up(False)  # refused, lost, an error: an outage
            elif self.reactor.seconds() - self._answered >= self.grace:
                self._set_up(False)  # no answer for the whole grace: an outage
            else:
                self.log.info(
                    "cluster: Redis at {address} answered no {name} within {timeout} s "
                    "(a loaded machine?); down after {grace} s without an answer",
                    address=self.address,
                    name=name,
                    timeout=self.timeout,
                    grace=self.grace,
                )
            raise BusUnavailable(f"Redis at {self.address}: {f.getErrorMessage()}")

        return d.addCallbacks(answered, failed)

    def publish(self, channel: str, message: str) -> None:
        """Fire and forget: a lost wake-up is made up by the next poll."""
        if not self.up:
            return
        self.command("PUBLISH", self.key(channel), message).addErrback(lambda _: None)

    # locks across workers ----------------------------------------------------------------

    @inlineCallbacks
    def lock(self, name: str, ttl: float = 10.0, wait: float = 5.0) -> Any:
        """Take the cluster-wide lock ``name`` (``P:lock:name``, expiring after
        ``ttl`` seconds whatever happens to its holder); fires with the token to give
        :meth:`unlock`.  Fails with :class:`BusUnavailable` after ``wait`` seconds (or
        when Redis does not answer)."""
        from twisted.internet.task import deferLater

        token = os.urandom(8).hex()
        key = self.key("lock", name)
        deadline = self.reactor.seconds() + wait
        while True:
            taken = yield self.command("SET", key, token, "NX", "PX", int(ttl * 1000))
            if taken is not None:
                return token
            if self.reactor.seconds() > deadline:
                raise BusUnavailable(f"the cluster lock {name} stays taken")
            yield deferLater(self.reactor, 0.02, lambda: None)

    def unlock(self, name: str, token: str) -> Deferred[Any]:
        """Release a lock taken with :meth:`lock` (if it is still ours)."""
        script = (
            "if redis.call('GET', KEYS[1]) == ARGV[1] then "
            "return redis.call('DEL', KEYS[1]) else return 0 end"
        )
        d = self.command("EVAL", script, 1, self.key("lock", name), token)
        return d.addErrback(lambda _: None)  # it expires anyway

    # the worker's heartbeat and the session directory ----------------------------------

    @inlineCallbacks
    def beat(self, description: dict[str, Any], online: dict[str, int]) -> Any:
        """Say this worker is alive (``description``), with its part of the session
        directory (user -> visible sessions here).  Fires with the live workers'
        descriptions ``{name: dict}`` and their directories ``{name: {user: n}}``
        (this worker's own included); fails with :class:`BusUnavailable`."""
        ttl = max(1, int(self.heartbeat * 3 + 0.999))
        me = self.key("worker", self.worker)
        mine = self.key("online", self.worker)
        description = {**description, "pid": os.getpid(), "seen": time.time()}
        yield self.command("SET", me, json.dumps(description), "EX", ttl)
        yield self.command("SADD", self.key("workers"), self.worker)
        yield self.command("DEL", mine)
        if online:
            args: list[Any] = []
            for user, n in online.items():
                args += [user, n]
            yield self.command("HSET", mine, *args)
            yield self.command("EXPIRE", mine, ttl)
        workers, directories = yield self.workers()
        if self._subscriber is not None:
            self._set_up(True)
        return workers, directories

    @inlineCallbacks
    def workers(self) -> Any:
        """``({name: description}, {name: {user: visible sessions}})`` of the live
        workers (those whose description has not expired)."""
        names = yield self.command("SMEMBERS", self.key("workers"))
        workers: dict[str, dict[str, Any]] = {}
        directories: dict[str, dict[str, int]] = {}
        for raw in sorted(names or ()):
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            text = yield self.command("GET", self.key("worker", name))
            if text is None:
                continue
            try:
                workers[name] = json.loads(text)
            except ValueError:
                continue
            online = yield self.command("HGETALL", self.key("online", name))
            if isinstance(online, dict):
                pairs = list(online.items())
            else:  # the raw reply: field, value, field, value...
                flat = list(online or ())
                pairs = list(zip(flat[::2], flat[1::2], strict=True))
            directories[name] = {
                (k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in pairs
            }
        return workers, directories

    def leave(self) -> Deferred[Any]:
        """This worker stops: its description and directory go at once."""
        if not self.up:
            return succeed(None)
        d = self.command("DEL", self.key("worker", self.worker), self.key("online", self.worker))
        return d.addErrback(lambda _: None)


#: A token bucket in a Redis hash, taken atomically: ARGV = rate, burst, now.  Fires
#: with the seconds to wait (0: a token was taken), as a string.
_TAKE = """
local t = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local rate, burst, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens = tonumber(t[1]) or burst
local stamp = tonumber(t[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'stamp', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return tostring(wait)
"""


class RedisBuckets(UserBuckets):
    """:class:`chatproto.ratelimit.UserBuckets` every worker of a cluster counts in:
    one token bucket per key in Redis (``P:bucket:NAME:KEY``, gone once it would be
    full again).  ``now`` must be wall-clock time (the realm's clock): the workers'
    clocks take turns with one bucket.  While Redis does not answer, each worker
    counts in its own buckets (as a single process does) rather than refuse."""

    def __init__(self, bus: RedisBus, name: str, rate: float, burst: float) -> None:
        super().__init__(rate, burst)
        self.bus = bus
        self.name = name

    def take(self, key: str, now: float) -> Deferred[float]:
        d = self.bus.command(
            "EVAL", _TAKE, 1, self.bus.key("bucket", self.name, key), self.rate, self.burst, now
        )

        def answered(wait: Any) -> float:
            if isinstance(wait, bytes):
                wait = wait.decode()
            return max(0.0, float(wait))

        def unavailable(f: Any) -> Deferred[float]:
            f.trap(BusUnavailable)
            return UserBuckets.take(self, key, now)

        return d.addCallbacks(answered, unavailable)
