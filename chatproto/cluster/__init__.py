"""Several worker processes serving one realm (issue 16; docs/scale-out.md).

A worker (``twistd chatrealm --worker NAME``) is the single-process realm with the
cluster side of its seams swapped in (:mod:`chatproto.cluster.worker`): delivery read
from the store by position (:mod:`chatproto.cluster.stream`), presence across workers
(:mod:`chatproto.cluster.presence`), the Redis bus (:mod:`chatproto.cluster.bus`) and
listening ports shared with ``SO_REUSEPORT`` (:mod:`chatproto.cluster.listen`).  A
single-process realm imports none of it.
"""
