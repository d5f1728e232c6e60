"""chatproto.ratelimit's buckets per connection (their users are tested over
connections: test_blackbox_rates, test_blackbox_presence, test_blackbox_limits)."""

from __future__ import annotations

import gc

from chatproto.ratelimit import ConnectionBuckets


class Conn:
    """A stand-in connection: any object that can be weakly referenced."""


def test_a_connection_has_a_bucket_per_kind_kept_until_it_goes() -> None:
    buckets = ConnectionBuckets()
    a, b = Conn(), Conn()
    assert len(buckets) == 0
    first = buckets.bucket(a, "typing", 1.0, 2, 0.0)
    assert buckets.bucket(a, "typing", 5.0, 9, 1.0) is first  # kept: rate of the first
    assert (first.rate, first.burst) == (1.0, 2)
    assert [first.take(0.0), first.take(0.0), first.take(0.0)] == [0.0, 0.0, 1.0]
    assert buckets.bucket(a, "mark_read", 1.0, 2, 0.0) is not first
    other = buckets.bucket(b, "typing", 1.0, 2, 0.0)
    assert other is not first and other.take(0.0) == 0.0  # b's own, full
    del a
    gc.collect()
    assert len(buckets) == 1  # a's buckets went with it
