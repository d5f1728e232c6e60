"""The realm's configuration: defaults, the TOML file, and checks.

Everything has a default, so ``twistd -n chatrealm`` runs with no file at all.  A TOML
file (``--config``) overrides the defaults and command-line options override the file.
``config/realm.example.toml`` documents every key; a test keeps the two in step.
"""

from __future__ import annotations

import math
import os
import re
import sys
from typing import Any

import attrs

from chatproto.address import normalise_name, normalise_realm
from chatproto.errors import ChatError
from chatproto.store import MAX_DEVICES
from chatproto.wire import MAX_INT  # (the largest integer a key takes: hello sends limits)

__all__ = [
    "DEFAULT_FEDERATION_PORT",
    "DEFAULT_LISTEN",
    "DEFAULT_PORT",
    "DEFAULT_TLS_PORT",
    "IRC",
    "TLS",
    "Auth",
    "Cluster",
    "Config",
    "ConfigError",
    "Control",
    "Federation",
    "Files",
    "Limits",
    "Metrics",
    "Peer",
    "Performance",
    "Storage",
    "Web",
    "from_dict",
    "known_keys",
    "load",
]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_PORT = 7420
DEFAULT_TLS_PORT = 7421
DEFAULT_FEDERATION_PORT = 7422
DEFAULT_LISTEN = f"tcp:{DEFAULT_PORT}:interface=127.0.0.1"
DEFAULT_IRC_LISTEN = "tcp:6667:interface=127.0.0.1"
#: The longest UNIX socket path (sun_path holds 108 bytes with the final NUL on Linux).
MAX_SOCKET_PATH = 107
#: A PostgreSQL schema name the store accepts (created if missing; quoted anyway).
_SCHEMA = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class ConfigError(Exception):
    """A configuration problem, with a message that names the key and the fix."""


@attrs.define
class Limits:
    max_frame: int = 65536
    max_body: int = 16384
    send_rate: float = 50.0
    send_burst: int = 100
    group_change_rate: float = 1.0
    group_change_burst: int = 60
    login_timeout: float = 30.0
    keepalive_interval: float = 60.0
    max_output_buffer: int = 4 * 1024 * 1024
    history_page: int = 200
    max_sessions_per_user: int = 32
    #: Devices (the ``device`` of a login) per user whose acks the store keeps; the ack
    #: of a new device past it forgets those with the lowest acks (IStore.set_ack).
    max_devices_per_user: int = MAX_DEVICES
    max_members_per_group: int = 10000
    max_groups_per_user: int = 200
    #: Client connections (native, TLS, WebSocket, IRC) not logged in yet, overall and
    #: from one address; past either, a new connection is aborted at once.  0: no bound.
    max_unauthenticated: int = 512
    max_unauthenticated_per_address: int = 32


@attrs.define
class Auth:
    allow_registration: bool = True
    free_failures_per_account: int = 3
    free_failures_per_address: int = 10
    failure_delay: float = 1.0
    max_failure_delay: float = 60.0
    failure_window: float = 900.0
    #: In-band registrations one client address may make at once (0: no bound), and
    #: the seconds after which it may make one more.
    registrations_per_address: int = 5
    registration_interval: float = 30.0
    argon2_time_cost: int = 3
    argon2_memory_cost: int = 65536
    argon2_parallelism: int = 2


@attrs.define
class Files:
    """File transfer limits and retention (see chatproto/files.py)."""

    max_file_size: int = 256 * 1024 * 1024
    quota_per_user: int = 1024 * 1024 * 1024
    chunk_size: int = 32768
    max_uploads_per_user: int = 8
    upload_expiry: float = 86400.0
    retention_days: float = 30.0
    cleanup_interval: float = 3600.0


@attrs.define
class Storage:
    backend: str = "sqlite"
    synchronous: str = "FULL"
    dsn: str = ""
    schema: str = "public"


@attrs.define
class TLS:
    certificate: str = ""
    private_key: str = ""
    port: int = DEFAULT_TLS_PORT
    interface: str = "127.0.0.1"


@attrs.define
class Web:
    """The optional web listener: a browser client and its WebSocket gateway."""

    #: Endpoint descriptions for the web listener (plain HTTP); empty: no web listener.
    listen: list[str] = attrs.field(factory=list)
    #: Port of an HTTPS listener using the [tls] certificate (on [tls] interface); 0: none.
    tls_port: int = 0
    #: Allowed Origin values (e.g. "https://chat.example.org"); empty: same origin only.
    origins: list[str] = attrs.field(factory=list)
    #: Seconds a browser session (its cookie's token) lives after its last use.
    session_ttl: float = 1209600.0


@attrs.define
class IRC:
    """The IRC gateway (chatproto.irc): off unless ``enabled``."""

    enabled: bool = False
    listen: list[str] = attrs.field(factory=lambda: [DEFAULT_IRC_LISTEN])
    tls_port: int = 6697
    tls_interface: str = "127.0.0.1"
    server_name: str = ""
    motd: str = ""
    flood_rate: float = 2.0
    flood_burst: int = 20
    #: Let clients without an account in, each with a temporary one (see docs/irc.md).
    guests: bool = False
    #: Guests at once, and per client address.
    guests_max: int = 100
    guests_per_address: int = 5
    #: A guest's own send limit (messages per second after a burst).
    guest_send_rate: float = 1.0
    guest_send_burst: int = 10
    #: Realm admins who may OPER (account names); empty: every realm admin.
    opers: list[str] = attrs.field(factory=list)


@attrs.define
class Metrics:
    """The operations listener (chatproto.ops): /metrics, /health and /ready."""

    #: Endpoint descriptions; empty: no operations listener (and no metrics kept).
    listen: list[str] = attrs.field(factory=list)


@attrs.define
class Control:
    """The control channel (chatproto.ops.control): ``chatrealmctl`` talks to the
    running realm over a UNIX socket."""

    enabled: bool = True
    #: The socket's path; "" = ``control.sock`` in the data directory.
    socket: str = ""


@attrs.define
class Peer:
    """One entry of ``[[federation.peers]]``: how to reach and trust a peer realm."""

    realm: str
    #: "HOST:PORT" to connect to; "" = discover (DNS SRV, else realm name + 7422).
    endpoint: str = ""
    #: "sha256:<hex>" of the peer's certificate (colons allowed); "" = CA trust only.
    fingerprint: str = ""


@attrs.define
class Federation:
    enabled: bool = False
    port: int = DEFAULT_FEDERATION_PORT
    interface: str = "127.0.0.1"
    certificate: str = ""
    private_key: str = ""
    ca: str = ""
    allow: list[str] = attrs.field(factory=list)
    deny: list[str] = attrs.field(factory=list)
    peers: list[Peer] = attrs.field(factory=list)
    retry_initial: float = 1.0
    retry_max: float = 300.0
    #: Seconds without a byte from a peer before a link pings it; three times that
    #: and the connection is aborted (then retried with backoff).  0: off.
    keepalive: float = 30.0
    #: Seconds a peer may stay unreachable before queued items older than this are
    #: given up on and bounced to their senders (0: never give up).
    give_up_after: float = 7 * 86400.0
    batch_size: int = 500
    window: int = 4
    max_frame: int = 4 * 1024 * 1024
    #: Seconds a link with nothing to send (no queued item, no online user with a
    #: contact on the peer) stays connected before it idles; 0: links never idle.
    idle_after: float = 60.0
    #: Inbound connections that have not said a valid hello yet, overall and from one
    #: address; past either, a new connection is aborted at once.  0: no bound.
    max_unauthenticated: int = 64
    max_unauthenticated_per_address: int = 8
    #: Peer realms this realm keeps state for at once (a link: its outbox cursor,
    #: retries, DNS look-ups, metrics): a user's send, invite, read marker... that
    #: would add one more is refused (``peer_denied``).  Open federation (empty
    #: ``allow``) would otherwise let one client make a link per made-up realm.
    max_peers: int = 1000
    #: Of those, the links to realms never reached (no handshake ever: a made-up
    #: name, say) one local user may hold at once (a peer realm, for the links its
    #: requests make); past it that user's request naming one more is refused
    #: (``peer_denied``), others are not.  A realm that answered once is no one's.
    max_peers_per_user: int = 20
    #: Seconds a realm never reached may stay so before the items queued for it are
    #: given up on and bounced (``peer_unreachable``), so its place frees up; a
    #: realm reached once keeps ``give_up_after``.  0: ``give_up_after`` for all.
    give_up_unreached: float = 3600.0

    def peer(self, realm: str) -> Peer | None:
        for p in self.peers:
            if p.realm == realm:
                return p
        return None

    def allows(self, realm: str) -> bool:
        """Whether this realm federates with ``realm`` (deny wins; empty allow = all)."""
        if realm in self.deny:
            return False
        return not self.allow or realm in self.allow


@attrs.define
class Cluster:
    """Several worker processes serving one realm (docs/scale-out.md): used when the
    realm runs with ``--worker NAME``, on the PostgreSQL store."""

    #: The Redis server of the bus (wake-ups, session directory, presence): HOST:PORT.
    redis: str = "127.0.0.1:6379"
    #: Prefix of every Redis key and channel (several realms can share one Redis).
    redis_prefix: str = "chatproto"
    #: The worker that sends federation (its outbox links); "" = none sends.
    federation_sender: str = ""
    #: Seconds between catch-ups from the store when the bus says nothing (a worker
    #: that missed wake-ups still delivers within this).
    poll_interval: float = 1.0
    #: Seconds between a worker's heartbeats; a worker silent for 3 of them is gone.
    heartbeat: float = 2.0
    #: Where file blobs live, shared by every worker ("" = <data_dir>/files).
    files_dir: str = ""
    #: Seconds to wait for PostgreSQL or Redis at start-up before giving up.
    connect_timeout: float = 5.0


#: ``gc.set_threshold`` values ``[performance] gc_thresholds`` may give: each at least 1
#: (a 0 would turn a generation's collections off: cycles would pile up); the first at
#: most 1,000,000 net allocations, the others at most 1,000 collections of the younger
#: generation.
GC_THRESHOLD_BOUNDS = ((1, 1_000_000), (1, 1_000), (1, 1_000))

#: The ``[performance] switch_interval`` values allowed besides 0: from 50 us (below, the
#: threads would spend their time handing the GIL over) to 100 ms.
SWITCH_INTERVAL_BOUNDS = (0.00005, 0.1)

#: The ``[performance] coalesce_wait`` values allowed besides 0: from 0.5 ms (below,
#: a wait gathers next to nothing) to 50 ms (above, it is a latency of its own).
COALESCE_WAIT_BOUNDS = (0.0005, 0.05)


@attrs.define
class Performance:
    """Settings of the Python process a realm runs in (chatproto.collector), applied by
    ``twistd chatrealm`` at start-up, not by an embedding application unless it asks."""

    #: ``gc.set_threshold(gen0, gen1, gen2)`` at start-up; [] = leave Python's own.
    gc_thresholds: list[int] = attrs.field(factory=lambda: [20000, 10, 10])
    #: Once the realm has loaded its state: ``gc.collect()`` then ``gc.freeze()``.
    gc_freeze: bool = True
    #: ``sys.setswitchinterval`` at start-up, in seconds; 0 = leave Python's own (5 ms).
    switch_interval: float = 0.0005
    #: The most seconds the reactor waits before polling again after a busy iteration
    #: (chatproto.pacing); 0 = poll again at once.
    coalesce_wait: float = 0.004


@attrs.define
class Config:
    realm: str = "localhost"
    data_dir: str = "chatrealm-data"
    listen: list[str] = attrs.field(factory=lambda: [DEFAULT_LISTEN])
    #: "module:callable" names, each called with the RealmService at start-up.
    plugins: list[str] = attrs.field(factory=list)
    limits: Limits = attrs.field(factory=Limits)
    auth: Auth = attrs.field(factory=Auth)
    storage: Storage = attrs.field(factory=Storage)
    tls: TLS = attrs.field(factory=TLS)
    web: Web = attrs.field(factory=Web)
    irc: IRC = attrs.field(factory=IRC)
    federation: Federation = attrs.field(factory=Federation)
    files: Files = attrs.field(factory=Files)
    metrics: Metrics = attrs.field(factory=Metrics)
    control: Control = attrs.field(factory=Control)
    cluster: Cluster = attrs.field(factory=Cluster)
    performance: Performance = attrs.field(factory=Performance)
    #: The worker this process is (``--worker NAME``); None: a single-process realm.
    worker: str | None = None

    @property
    def database_path(self) -> str:
        return os.path.join(self.data_dir, "realm.sqlite3")

    @property
    def control_socket(self) -> str:
        """Where the control channel's UNIX socket is (``[control] socket``, else
        ``control.sock`` in the data directory); its token is beside it (+ ".token")."""
        path = self.control.socket or os.path.join(self.data_dir, "control.sock")
        if self.worker is not None:  # one socket per worker of a cluster
            path = f"{path}.{self.worker}"
        return path

    @property
    def files_path(self) -> str:
        """Where file blobs and partial uploads live (created on first upload); a
        cluster's workers share ``[cluster] files_dir`` when it is set."""
        if self.worker is not None and self.cluster.files_dir:
            return self.cluster.files_dir
        return os.path.join(self.data_dir, "files")

    def listen_descriptions(self) -> list[str]:
        """The endpoint descriptions to listen on, TLS included when certs are given."""
        from chatproto.tls import server_description

        out = list(self.listen)
        if self.tls.certificate:
            out.append(
                server_description(
                    self.tls.certificate,
                    self.tls.private_key or self.tls.certificate,
                    self.tls.port,
                    self.tls.interface,
                )
            )
        return out

    def web_descriptions(self) -> list[str]:
        """The web listener's endpoint descriptions, HTTPS included when configured."""
        from chatproto.tls import server_description

        out = list(self.web.listen)
        if self.web.tls_port and self.tls.certificate:
            out.append(
                server_description(
                    self.tls.certificate,
                    self.tls.private_key or self.tls.certificate,
                    self.web.tls_port,
                    self.tls.interface,
                )
            )
        return out

    def irc_descriptions(self) -> list[str]:
        """The IRC gateway's endpoint descriptions (none when it is disabled): its
        ``listen`` list, plus TLS on ``tls_port`` with the realm's certificate."""
        from chatproto.tls import server_description

        if not self.irc.enabled:
            return []
        out = list(self.irc.listen)
        if self.tls.certificate and self.irc.tls_port:
            out.append(
                server_description(
                    self.tls.certificate,
                    self.tls.private_key or self.tls.certificate,
                    self.irc.tls_port,
                    self.irc.tls_interface,
                )
            )
        return out

    def check(self, files: bool = True) -> None:
        """Raise :class:`ConfigError` for values that cannot work.

        ``files=False`` leaves out the checks of the certificate and key files the
        configuration names (``chatrealmctl gen-certs`` is what makes them)."""
        try:
            self.realm = normalise_realm(self.realm)
        except ChatError as e:
            raise ConfigError(f"realm.name: {e.message}") from None
        if not self.data_dir:  # (not the working directory: an unset variable, say)
            raise ConfigError("realm.data_dir: an empty directory name")
        lim = self.limits
        if not 1024 <= lim.max_frame <= 64 * 1024 * 1024:
            raise ConfigError("limits.max_frame must be between 1024 and 67108864")
        if not 1 <= lim.max_body <= lim.max_frame - 512:
            raise ConfigError("limits.max_body must be at least 1 and below max_frame - 512")
        for key in (
            "send_rate",
            "send_burst",
            "group_change_rate",
            "group_change_burst",
            "login_timeout",
            "keepalive_interval",
            "max_output_buffer",
            "history_page",
            "max_sessions_per_user",
            "max_devices_per_user",
            "max_members_per_group",
            "max_groups_per_user",
        ):
            if getattr(lim, key) <= 0:
                raise ConfigError(f"limits.{key} must be positive")
        for key in ("max_unauthenticated", "max_unauthenticated_per_address"):
            if getattr(lim, key) < 0:
                raise ConfigError(f"limits.{key} must be >= 0 (0: no bound)")
        # A timer this short turns into a busy loop (a ping per connection, a clean-up
        # pass, a poll of the store... every few microseconds) rather than a setting.
        for name, value in (
            ("limits.login_timeout", lim.login_timeout),
            ("limits.keepalive_interval", lim.keepalive_interval),
            ("files.cleanup_interval", self.files.cleanup_interval),
        ):
            if value < 1:
                raise ConfigError(f"{name} must be at least 1 (second), not {value}")
        if lim.max_groups_per_user > 400:
            # one sub-query per group in the backlog query; SQLite caps compound selects
            raise ConfigError("limits.max_groups_per_user must be at most 400")
        f = self.files
        for key in (
            "max_file_size",
            "quota_per_user",
            "chunk_size",
            "max_uploads_per_user",
            "upload_expiry",
            "retention_days",
            "cleanup_interval",
        ):
            if getattr(f, key) <= 0:
                raise ConfigError(f"files.{key} must be positive")
        if not 1024 <= f.chunk_size <= lim.max_frame - 64:
            raise ConfigError("files.chunk_size must be between 1024 and limits.max_frame - 64")
        self._check_storage()
        self._check_cluster()
        self._check_performance()
        if self.storage.synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ConfigError("storage.synchronous must be FULL, NORMAL or EXTRA")
        self.storage.synchronous = self.storage.synchronous.upper()
        if not 0 <= self.tls.port <= 65535:
            raise ConfigError("tls.port must be between 0 and 65535")
        a = self.auth
        # (argon2 takes 32-bit values; past these a hash hangs a thread or fails at
        # every login, and parallelism is the size of the hashing thread pool)
        if not 1 <= a.argon2_time_cost <= 1000:
            raise ConfigError("auth.argon2_time_cost must be between 1 and 1000")
        if not 1 <= a.argon2_parallelism <= 64:
            raise ConfigError("auth.argon2_parallelism must be between 1 and 64")
        if not 8 * a.argon2_parallelism <= a.argon2_memory_cost <= 4 * 1024 * 1024:
            raise ConfigError(
                "auth.argon2_memory_cost must be between 8 * argon2_parallelism and "
                "4194304 (KiB: 4 GiB)"
            )
        for key in ("failure_delay", "max_failure_delay", "failure_window"):
            if getattr(a, key) <= 0:
                raise ConfigError(f"auth.{key} must be positive")
        if a.free_failures_per_account < 0 or a.free_failures_per_address < 0:
            raise ConfigError("auth.free_failures_* must be >= 0")
        if a.registrations_per_address < 0 or a.registration_interval <= 0:
            raise ConfigError(
                "auth.registrations_per_address must be >= 0 (0: no bound) and "
                "auth.registration_interval positive (seconds)"
            )
        irc = self.irc
        if not 0 <= irc.tls_port <= 65535:
            raise ConfigError("irc.tls_port must be between 0 and 65535 (0: no TLS listener)")
        if irc.guests_max < 0 or irc.guests_per_address < 0:
            raise ConfigError("irc.guests_max and irc.guests_per_address must be >= 0")
        if irc.guest_send_rate <= 0 or irc.guest_send_burst < 1:
            raise ConfigError("irc.guest_send_rate must be > 0, guest_send_burst >= 1")
        if irc.flood_rate < 0 or irc.flood_burst < 1:
            raise ConfigError("irc.flood_rate must be >= 0 (0: no limit), flood_burst >= 1")
        if any(c in irc.server_name for c in " !@*?,:") or len(irc.server_name) > 63:
            raise ConfigError("irc.server_name must be a host-like name (no spaces, ! @ * ? , :)")
        try:
            irc.opers = [normalise_name(n) for n in irc.opers]
        except ChatError as e:
            raise ConfigError(f"irc.opers: {e.message}") from None
        if irc.enabled and not self.irc_descriptions():
            raise ConfigError("irc.enabled but nothing to listen on: give irc.listen")
        for path in (self.tls.certificate, self.tls.private_key):
            if files and path and not os.path.exists(path):
                raise ConfigError(f"tls: file {path!r} does not exist")
        w = self.web
        if not 0 <= w.tls_port <= 65535:
            raise ConfigError("web.tls_port must be between 0 and 65535")
        if w.tls_port and not self.tls.certificate:
            raise ConfigError("web.tls_port needs tls.certificate (and tls.private_key)")
        if w.tls_port and w.tls_port == self.tls.port:
            raise ConfigError("web.tls_port must differ from tls.port")
        if w.session_ttl <= 0:
            raise ConfigError("web.session_ttl must be positive")
        for origin in w.origins:
            if not origin.startswith(("http://", "https://")) or origin.count("/") != 2:
                raise ConfigError(
                    f"web.origins: {origin!r} is not an origin like https://chat.example.org"
                )
        if self.control.enabled and len(os.fsencode(self.control_socket)) > MAX_SOCKET_PATH:
            raise ConfigError(
                f"control: the socket path {self.control_socket!r} is longer than a UNIX "
                f"socket path may be ({MAX_SOCKET_PATH} bytes): set control.socket to a "
                "shorter path (or a data_dir with a shorter path)"
            )
        if not self.listen_descriptions() and not self.web_descriptions():
            raise ConfigError(
                "nothing to listen on: give realm.listen, tls.certificate or web.listen"
            )
        self._check_federation(files)

    def _check_storage(self) -> None:
        s = self.storage
        if s.backend not in ("sqlite", "postgresql"):
            raise ConfigError(f"storage.backend {s.backend!r}: 'sqlite' or 'postgresql'")
        if s.backend != "postgresql":
            return
        if not s.dsn.strip():
            raise ConfigError(
                'storage.backend "postgresql" needs storage.dsn (e.g. '
                '"host=127.0.0.1 dbname=chat user=chat")'
            )
        if not _SCHEMA.fullmatch(s.schema):
            raise ConfigError(
                "storage.schema must be a lower-case SQL name (a-z, 0-9, _; at most 63)"
            )
        try:
            from psycopg.conninfo import conninfo_to_dict
        except ImportError:
            raise ConfigError(
                "storage.backend \"postgresql\" needs psycopg: pip install 'chatproto[postgresql]'"
            ) from None
        try:
            conninfo_to_dict(s.dsn)
        except Exception as e:
            raise ConfigError(f"storage.dsn is not a valid PostgreSQL DSN: {e}") from None

    def _check_performance(self) -> None:
        for key, zero, (low, high) in (
            ("coalesce_wait", "poll again at once", COALESCE_WAIT_BOUNDS),
            ("switch_interval", "Python's own", SWITCH_INTERVAL_BOUNDS),
        ):
            seconds = getattr(self.performance, key)
            if seconds != 0 and not low <= seconds <= high:
                raise ConfigError(
                    f"performance.{key} must be 0 ({zero}) or between {low:g} and {high:g} "
                    f"seconds, not {seconds:g}"
                )
        thresholds = self.performance.gc_thresholds
        if not thresholds:
            return
        if len(thresholds) != 3:
            raise ConfigError(
                "performance.gc_thresholds must be three integers [gen0, gen1, gen2] "
                "(e.g. [20000, 10, 10]), or [] for Python's own"
            )
        for i, (value, (low, high)) in enumerate(zip(thresholds, GC_THRESHOLD_BOUNDS, strict=True)):
            if not low <= value <= high:
                raise ConfigError(
                    f"performance.gc_thresholds[{i}] must be between {low} and {high}, not "
                    f"{value}" + (" (0 would stop collecting cycles)" if value == 0 else "")
                )

    def _check_cluster(self) -> None:
        c = self.cluster
        host, _, port = c.redis.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"cluster.redis must be HOST:PORT, not {c.redis!r}")
        if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", c.redis_prefix):
            raise ConfigError("cluster.redis_prefix: 1-64 of A-Z a-z 0-9 _ . : -")
        for key in ("poll_interval", "heartbeat", "connect_timeout"):
            if not getattr(c, key) > 0:
                raise ConfigError(f"cluster.{key} must be > 0")
        for key in ("poll_interval", "heartbeat"):  # (shorter: a busy loop)
            if getattr(c, key) < 0.1:
                raise ConfigError(f"cluster.{key} must be at least 0.1 (second)")
        if self.worker is None:
            return
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,31}", self.worker):
            raise ConfigError(
                "--worker: a name of 1-32 of a-z 0-9 _ - (starting with a letter or digit)"
            )
        if self.storage.backend != "postgresql":
            raise ConfigError(
                '--worker needs the PostgreSQL store ([storage] backend = "postgresql"): '
                "workers share one database"
            )
        if self.irc.guests:
            raise ConfigError(
                "irc.guests is for a single-process realm: a worker keeps its guests' "
                "nicks to itself, and deletes left-over guest accounts at start"
            )

    def _check_federation(self, files: bool) -> None:
        f = self.federation
        try:
            f.allow = [normalise_realm(r) for r in f.allow]
            f.deny = [normalise_realm(r) for r in f.deny]
            for peer in f.peers:
                peer.realm = normalise_realm(peer.realm)
        except ChatError as e:
            raise ConfigError(f"federation: {e.message}") from None
        if not 0 <= f.port <= 65535:
            raise ConfigError("federation.port must be between 0 and 65535")
        if f.retry_initial <= 0 or f.retry_max < f.retry_initial:
            raise ConfigError("federation: need 0 < retry_initial <= retry_max")
        if f.keepalive < 0 or 0 < f.keepalive < 0.1:
            raise ConfigError("federation.keepalive must be 0 (off) or at least 0.1 (second)")
        if f.idle_after < 0:
            raise ConfigError("federation.idle_after must be >= 0 (0: links never idle)")
        if f.give_up_after < 0:
            raise ConfigError("federation.give_up_after must be >= 0 (0: never give up)")
        if f.batch_size < 1 or f.window < 1:
            raise ConfigError("federation.batch_size and federation.window must be >= 1")
        if not 65536 <= f.max_frame <= 64 * 1024 * 1024:
            raise ConfigError("federation.max_frame must be between 65536 and 67108864")
        for key in ("max_unauthenticated", "max_unauthenticated_per_address"):
            if getattr(f, key) < 0:
                raise ConfigError(f"federation.{key} must be >= 0 (0: no bound)")
        if not 1 <= f.max_peers <= 1_000_000:
            raise ConfigError("federation.max_peers must be between 1 and 1000000")
        if not 1 <= f.max_peers_per_user <= 1_000_000:
            raise ConfigError("federation.max_peers_per_user must be between 1 and 1000000")
        if f.give_up_unreached < 0:
            raise ConfigError("federation.give_up_unreached must be >= 0 (0: as give_up_after)")
        if len(f.peers) > f.max_peers:
            raise ConfigError(
                f"federation.peers lists {len(f.peers)} realms; max_peers is {f.max_peers}"
            )
        seen = set()
        for peer in f.peers:
            if peer.realm in seen:
                raise ConfigError(f"federation.peers: {peer.realm} is listed twice")
            seen.add(peer.realm)
            if peer.realm == self.realm:
                raise ConfigError("federation.peers: a realm is not its own peer")
            if peer.endpoint:
                host, _, port = peer.endpoint.rpartition(":")
                if not host or not port.isdigit() or not 0 < int(port) < 65536:
                    raise ConfigError(
                        f"federation.peers {peer.realm}: endpoint must be HOST:PORT, "
                        f"not {peer.endpoint!r}"
                    )
            if peer.fingerprint:
                from chatproto.tls import normalise_fingerprint

                try:
                    peer.fingerprint = normalise_fingerprint(peer.fingerprint)
                except ValueError as e:
                    raise ConfigError(f"federation.peers {peer.realm}: {e}") from None
        if not f.enabled:
            return
        if not f.certificate:
            raise ConfigError(
                "federation.certificate is required when federation is enabled "
                "(chatrealmctl gen-certs makes one)"
            )
        if not f.ca and not any(p.fingerprint for p in f.peers):
            raise ConfigError(
                "federation: no trust configured: set federation.ca (a CA bundle) "
                "or a fingerprint for each peer"
            )
        if not files:
            return
        for path in (f.certificate, f.private_key, f.ca):
            if path and not os.path.exists(path):
                raise ConfigError(f"federation: file {path!r} does not exist")
        from chatproto.tls import certificate_names

        try:
            names = certificate_names(f.certificate)
        except ValueError as e:
            raise ConfigError(f"federation.certificate: {e}") from None
        if self.realm not in names:
            raise ConfigError(
                f"federation.certificate names {', '.join(names) or 'nothing'}, "
                f"not this realm ({self.realm})"
            )


#: Table name in the TOML file -> attribute of :class:`Config` holding that section.
_SECTIONS = {
    "limits": Limits,
    "auth": Auth,
    "storage": Storage,
    "tls": TLS,
    "web": Web,
    "irc": IRC,
    "federation": Federation,
    "files": Files,
    "metrics": Metrics,
    "control": Control,
    "cluster": Cluster,
    "performance": Performance,
}
_REALM_KEYS = {
    "name": "realm",
    "data_dir": "data_dir",
    "listen": "listen",
    "plugins": "plugins",
}


def known_keys() -> set[str]:
    """Every dotted key the loader accepts (used to check the documentation).

    ``federation.peers`` is an array of tables, each with the keys of :class:`Peer`.
    """
    keys = {f"realm.{k}" for k in _REALM_KEYS}
    for section, cls in _SECTIONS.items():
        keys |= {f"{section}.{a.name}" for a in attrs.fields(cls)}
    return keys


_LIST_KEYS = {"allow", "deny"}


def _federation_from_dict(values: dict[str, Any], target: Federation) -> dict[str, Any]:
    """Apply the list-valued federation keys; return the scalar ones for the generic
    loader."""
    rest = {}
    for key, value in values.items():
        if key in _LIST_KEYS:
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise ConfigError(f"federation.{key} must be a list of realm names")
            setattr(target, key, list(value))
        elif key == "peers":
            if not isinstance(value, list):
                raise ConfigError("federation.peers must be an array of tables ([[...]])")
            peers = []
            for entry in value:
                if not isinstance(entry, dict) or not isinstance(entry.get("realm"), str):
                    raise ConfigError('each [[federation.peers]] needs realm = "NAME"')
                for k, v in entry.items():
                    if k not in ("realm", "endpoint", "fingerprint"):
                        raise ConfigError(f"unknown key federation.peers.{k}")
                    if not isinstance(v, str):
                        raise ConfigError(f"federation.peers.{k} must be a string")
                peers.append(Peer(**entry))
            target.peers = peers
        else:
            rest[key] = value
    return rest


def from_dict(data: dict[str, Any], base: Config | None = None) -> Config:
    """Apply a parsed TOML document to ``base`` (defaults if None); unknown keys fail."""
    config = base if base is not None else Config()
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{section!r} must be a table ([{section}])")
        if section == "realm":
            for key, value in values.items():
                if key not in _REALM_KEYS:
                    raise ConfigError(f"unknown key realm.{key}")
                if key in ("listen", "plugins"):
                    if isinstance(value, str):
                        value = [value]
                    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                        raise ConfigError(f"realm.{key} must be a list of strings")
                elif not isinstance(value, str):
                    raise ConfigError(f"realm.{key} must be a string")
                setattr(config, _REALM_KEYS[key], value)
            continue
        if section not in _SECTIONS:
            raise ConfigError(f"unknown section [{section}]")
        target = getattr(config, section)
        if section == "federation":
            values = _federation_from_dict(values, target)
        types = {a.name: a.type for a in attrs.fields(type(target))}
        for key, value in values.items():
            if key not in types:
                raise ConfigError(f"unknown key {section}.{key}")
            want = types[key]
            if want == "list[str]":
                if isinstance(value, str):
                    value = [value]
                if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                    raise ConfigError(f"{section}.{key} must be a list of strings")
                setattr(target, key, value)
                continue
            if want == "list[int]":
                if not (
                    isinstance(value, list)
                    and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
                ):
                    raise ConfigError(f"{section}.{key} must be a list of integers")
                setattr(target, key, value)
                continue
            want = {"int": int, "float": float, "bool": bool, "str": str}.get(want, want)  # type: ignore[arg-type]
            ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                value, ok = float(value), True
            if not ok:
                raise ConfigError(f"{section}.{key} must be {getattr(want, '__name__', want)}")
            if want is int and not -MAX_INT <= value <= MAX_INT:
                # TOML integers have no bound here; past 2**53 - 1 they are no JSON
                # number for hello's clients, and past 2**63 no SQL one (a LIMIT)
                raise ConfigError(f"{section}.{key} must be within ±{MAX_INT} (2**53 - 1)")
            if want is float and not math.isfinite(value):
                # TOML has nan and inf: nan passes every "must be positive" check
                raise ConfigError(f"{section}.{key} must be a finite number, not {value}")
            setattr(target, key, value)
    return config


def load(path: str | None) -> Config:
    """Load a config file (or the defaults for ``None``); call ``check()`` after any
    overrides (command-line options) have been applied."""
    config = Config()
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} not found") from None
        except OSError as e:  # a directory, no permission, an I/O error
            raise ConfigError(f"config file {path!r} cannot be read: {e.strerror}") from None
        except UnicodeDecodeError as e:  # TOML is UTF-8
            raise ConfigError(f"{path}: invalid TOML: not UTF-8 (byte {e.start})") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        from_dict(data, config)
    return config
