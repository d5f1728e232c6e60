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

The modules, each importing only those before it:

- :mod:`chatproto.federation.tls`: the OpenSSL context and the check of a peer's
  certificate;
- :mod:`chatproto.federation.discovery`: where a peer realm listens (static endpoint,
  DNS SRV);
- :mod:`chatproto.federation.link`: framing, errors and keepalive shared by both
  directions, and the limits of the link protocol;
- :mod:`chatproto.federation.inbound`: links opened to us (``hello``, ``txn`` ->
  ``ack``, file fetches);
- :mod:`chatproto.federation.outbound`: links we open (``welcome``, ``ack``, serving
  file fetches);
- :mod:`chatproto.federation.peer`: :class:`PeerLink`, the outbound side of one peer
  realm (connection state, outbox cursor, transactions in flight, presence pacing);
- :mod:`chatproto.federation.service`: :class:`FederationService`, the listener, the
  links and the status file ``chatrealmctl peers`` reads.
"""

from chatproto.federation.discovery import SRV_SERVICE, PeerEndpoint
from chatproto.federation.inbound import (
    HELLO_TIMEOUT,
    MAX_INFLIGHT,
    MAX_LINKS_PER_REALM,
    InboundFactory,
    InboundProtocol,
    LinkLost,
)
from chatproto.federation.link import (
    FEDERATION_VERSION,
    MAX_TXN_ITEMS,
    MIN_MAX_FRAME,
    PRESENCE_BURST,
    PRESENCE_RATE,
    READING_BURST,
    READING_RATE,
    envelope_to_wire,
)
from chatproto.federation.outbound import OutboundFactory, OutboundProtocol
from chatproto.federation.peer import READING_QUEUE, PeerLink
from chatproto.federation.service import (
    CLOSE_GRACE,
    KEY_WAIT,
    PRESENCE_SILENCE,
    REQUEST_TTL,
    STATUS_FILE,
    FederationService,
    read_status,
)
from chatproto.federation.tls import FederationTLS, peer_refusal

__all__ = [
    "CLOSE_GRACE",
    "FEDERATION_VERSION",
    "HELLO_TIMEOUT",
    "KEY_WAIT",
    "MAX_INFLIGHT",
    "MAX_LINKS_PER_REALM",
    "MAX_TXN_ITEMS",
    "MIN_MAX_FRAME",
    "PRESENCE_BURST",
    "PRESENCE_RATE",
    "PRESENCE_SILENCE",
    "READING_BURST",
    "READING_QUEUE",
    "READING_RATE",
    "REQUEST_TTL",
    "SRV_SERVICE",
    "STATUS_FILE",
    "FederationService",
    "FederationTLS",
    "InboundFactory",
    "InboundProtocol",
    "LinkLost",
    "OutboundFactory",
    "OutboundProtocol",
    "PeerEndpoint",
    "PeerLink",
    "envelope_to_wire",
    "peer_refusal",
    "read_status",
]
