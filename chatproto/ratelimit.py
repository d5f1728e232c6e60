"""Rate limiting with injected time: a token bucket and a failure throttle.

Neither reads a clock: callers pass ``now`` (from the realm's injected clock), so tests
drive them with ``twisted.internet.task.Clock``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

from twisted.internet.defer import Deferred, succeed

__all__ = [
    "ConnectionBuckets",
    "FailureThrottle",
    "TokenBucket",
    "UserBuckets",
]


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float, cost: float = 1.0) -> float:
        """Take ``cost`` tokens; return 0 on success, else seconds until it would work."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate

    def refund(self, cost: float = 1.0) -> None:
        """Give back ``cost`` tokens taken for something that did not happen."""
        self.tokens = min(self.burst, self.tokens + cost)

    def full(self, now: float) -> bool:
        """Whether the bucket has refilled completely by ``now`` (it can be forgotten:
        a new one would be the same)."""
        return self.tokens + (now - self.stamp) * self.rate >= self.burst


class ConnectionBuckets:
    """Token buckets per connection (a session), one per kind of request (``what``),
    made full on first use and forgotten with the connection (weakly keyed)."""

    def __init__(self) -> None:
        self._buckets: weakref.WeakKeyDictionary[object, dict[str, TokenBucket]] = (
            weakref.WeakKeyDictionary()
        )

    def bucket(self, conn: object, what: str, rate: float, burst: float, now: float) -> TokenBucket:
        """``conn``'s bucket for ``what`` (``rate`` and ``burst`` make a new one)."""
        buckets = self._buckets.setdefault(conn, {})
        bucket = buckets.get(what)
        if bucket is None:
            bucket = buckets[what] = TokenBucket(rate, burst, now)
        return bucket

    def __len__(self) -> int:
        """How many connections have buckets."""
        return len(self._buckets)


class UserBuckets:
    """A :class:`TokenBucket` per key (a user), made full on first use and forgotten
    once full again (:meth:`prune`).  :meth:`take` answers with a Deferred so that a
    worker of a cluster can swap in buckets kept in Redis
    (:class:`chatproto.cluster.bus.RedisBuckets`) where every worker counts."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, key: str, now: float) -> Deferred[float]:
        """Take a token of ``key``'s bucket: fires with 0, or the seconds until one."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        return succeed(bucket.take(now))

    def prune(self, now: float) -> None:
        """Forget the buckets that are full again."""
        for key, bucket in list(self._buckets.items()):
            if bucket.full(now):
                del self._buckets[key]


class FailureThrottle:
    """Slows down repeated failures per key (an account, an address).

    After ``free`` failures inside ``window`` seconds, each further attempt must wait
    ``delay * 2 ** (extra failures - 1)`` seconds (capped at ``max_delay``) after the
    last failure.  Success clears the key.  Old entries are dropped by :meth:`prune`.
    """

    def __init__(self, free: int, delay: float, max_delay: float, window: float) -> None:
        self.free = free
        self.delay = delay
        self.max_delay = max_delay
        self.window = window
        self._entries: dict[str, tuple[int, float]] = {}
        #: Told of each change, ``("failed" | "succeeded", key, now)``: the workers of a
        #: cluster share their throttles this way (chatproto.cluster.worker).
        self.listener: Callable[[str, str, float], None] | None = None

    def wait(self, key: str, now: float) -> float:
        """Seconds ``key`` must still wait before its next attempt (0 if none)."""
        entry = self._entries.get(key)
        if entry is None:
            return 0.0
        count, last = entry
        if now - last > self.window:
            del self._entries[key]
            return 0.0
        extra = count - self.free
        if extra <= 0:
            return 0.0
        pause = min(self.max_delay, self.delay * 2 ** (extra - 1))
        return max(0.0, last + pause - now)

    def failed(self, key: str, now: float) -> None:
        self.apply("failed", key, now)
        if self.listener is not None:
            self.listener("failed", key, now)

    def succeeded(self, key: str) -> None:
        self.apply("succeeded", key, 0.0)
        if self.listener is not None:
            self.listener("succeeded", key, 0.0)

    def apply(self, event: str, key: str, now: float) -> None:
        """Record a failure or a success (of this process, or one another worker
        reports) without telling :attr:`listener`."""
        if event == "succeeded":
            self._entries.pop(key, None)
            return
        count, last = self._entries.get(key, (0, now))
        if now - last > self.window:
            count = 0
        self._entries[key] = (count + 1, max(now, last))

    def prune(self, now: float) -> None:
        stale = [k for k, (_, last) in self._entries.items() if now - last > self.window]
        for k in stale:
            del self._entries[k]

    def __len__(self) -> int:
        return len(self._entries)
