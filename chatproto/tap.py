"""``twistd chatrealm``: command-line options and the wiring of a realm process.

:func:`makeService` builds, under one ``MultiService``: the :class:`RealmService`
(store, portal, sessions), one listener per endpoint description (``--listen``,
repeatable; ``ssl:...`` descriptions give TLS), when ``[web]`` asks for it
(``--web``), the web listener (:mod:`chatproto.web`), with ``[federation]
enabled`` the :class:`chatproto.federation.FederationService`, and last the
:class:`chatproto.pacing.LoopPacerService` and
:class:`chatproto.collector.CollectorService` (``[performance]``: the event loop's
coalescing wait, the garbage collector's settings).  The realm starts before the listeners
and stops after them.
"""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

from twisted.application.service import IServiceCollection, MultiService, Service
from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString
from twisted.internet.interfaces import IListeningPort, IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from twisted.python import usage
from zope.interface import implementer

from chatproto import config as configmod
from chatproto import extensions
from chatproto.collector import CollectorService
from chatproto.ops.service import Operations
from chatproto.pacing import LoopPacerService
from chatproto.protocol import ClientFactory
from chatproto.realm import RealmService
from chatproto.store.backend import make_store
from chatproto.tls import fingerprint

__all__ = [
    "ListenerService",
    "Options",
    "ReloadableTLS",
    "build",
    "check_startable",
    "makeService",
]


def check_startable(cfg: configmod.Config) -> list[Any]:
    """What start-up checks of a configuration beyond :meth:`Config.check`, raising
    :class:`ConfigError` (``chatrealmctl check-config`` asks it too, so that a file it
    passes starts): the federation certificate and key fit, the extensions import, and
    every endpoint description parses (nothing listens).  Returns the extensions'
    set-up callables."""
    if cfg.federation.enabled:  # a key that does not fit is reported here
        from chatproto.federation import FederationTLS

        FederationTLS(cfg.federation)
    plugins = extensions.load_all(cfg.plugins)
    from twisted.internet import reactor

    described = (
        cfg.listen_descriptions() + cfg.web_descriptions() + cfg.irc_descriptions()
    ) + cfg.metrics.listen
    for description in described:
        try:
            serverFromString(reactor, description)  # parses; does not listen
        except (ValueError, TypeError, KeyError) as e:
            raise configmod.ConfigError(
                f"bad endpoint description {description!r}: {e} "
                "(escape ':' in values as '\\:', e.g. interface=\\:\\:1)"
            ) from None
    return plugins


class Options(usage.Options):
    synopsis = (
        "[--config FILE] [--listen ENDPOINT ...] [--web ENDPOINT ...] [--realm NAME] "
        "[--data-dir DIR] [--worker NAME]"
    )
    longdesc = (
        "Run a chatproto realm.  With no options: realm 'localhost', SQLite in "
        f"./chatrealm-data, plain TCP on 127.0.0.1:{configmod.DEFAULT_PORT}.  "
        "Options override the config file."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file (see config/realm.example.toml)."],
        ["realm", "r", None, "The realm's name (a DNS name), e.g. example.org."],
        ["data-dir", "d", None, "Directory for the database and files."],
        [
            "worker",
            "w",
            None,
            "Run as worker NAME of a cluster: several processes serve one realm on "
            "PostgreSQL and Redis ([cluster]; docs/scale-out.md).",
        ],
    ]
    optFlags = [
        ["no-register", None, "Disable in-band registration."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["web"] = []

    def opt_listen(self, description: str) -> None:
        """Listen on a Twisted endpoint description (repeatable), e.g. tcp:7420 or
        ssl:7421:privateKey=key.pem:certKey=cert.pem.  Replaces the config's list."""
        self["listen"].append(description)

    opt_l = opt_listen

    def opt_web(self, description: str) -> None:
        """Serve the web client and its WebSocket gateway on a Twisted endpoint
        description (repeatable), e.g. tcp:8080:interface=127.0.0.1.  Replaces the
        config's [web] listen."""
        self["web"].append(description)

    def postOptions(self) -> None:
        try:
            cfg = configmod.load(self["config"])
            # (given but empty -- an unset variable, --realm "$REALM" -- is an error of
            # Config.check, not the default: a realm named localhost would take the
            # accounts, the working directory the data)
            if self["realm"] is not None:
                cfg.realm = self["realm"]
            if self["data-dir"] is not None:
                cfg.data_dir = self["data-dir"]
            if self["listen"]:
                cfg.listen = list(self["listen"])
            if self["web"]:
                cfg.web.listen = list(self["web"])
            if self["no-register"]:
                cfg.auth.allow_registration = False
            if self["worker"] is not None:
                cfg.worker = self["worker"]
            cfg.check()
            self.plugins = check_startable(cfg)
        except configmod.ConfigError as e:
            self._fail(f"configuration: {e}")
        self.realm_config = cfg

    def _fail(self, message: str) -> NoReturn:
        """Report a bad configuration or endpoint.  Under twistd (which makes these
        options a subcommand: ``parent`` is its own options) it is one line on stderr
        and exit status 1: twistd would print its whole usage before a UsageError's
        message, burying it.  Called directly (tests, embedding), a UsageError."""
        if getattr(self, "parent", None) is not None:
            raise SystemExit(f"twistd chatrealm: {message}")
        raise usage.UsageError(message)


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableTLS:
    """The TLS settings of one ``ssl:`` listener, replaceable while it listens.

    Each new connection asks for its TLS connection here, and this asks the current
    ``CertificateOptions``: replacing them (:meth:`ListenerService.reload_tls`) gives
    new connections the new certificate, while open ones keep theirs.
    """

    def __init__(self, options: Any) -> None:
        self.options = options

    def serverConnectionForTLS(self, tlsProtocol: Any) -> Any:
        return self.options.serverConnectionForTLS(tlsProtocol)

    def getContext(self) -> Any:  # the older interface, for reactors without tls
        return self.options.getContext()


class ListenerService(Service):
    """Listens on one endpoint description for as long as the service runs.

    Binding happens in ``privilegedStartService`` (before the reactor runs under
    twistd), so a port that cannot be bound stops start-up with a readable message.
    An ``ssl:`` listener can read its certificate and key again without a restart
    (:meth:`reload_tls`).
    """

    log = Logger()

    def __init__(self, reactor: Any, description: str, factory: Any, shared: bool = False) -> None:
        self.description = description
        self.reactor = reactor
        #: Listen with SO_REUSEPORT (the workers of a cluster share their ports).
        self.shared = shared
        self.endpoint = serverFromString(reactor, description)
        self.factory = factory
        self.port: IListeningPort | None = None
        #: The replaceable TLS settings of an ``ssl:`` listener (else None).
        self.tls: ReloadableTLS | None = None
        if isinstance(self.endpoint, SSL4ServerEndpoint):
            # The endpoint keeps the options its description made in this attribute
            # (Twisted's, not public); we stand in for them to be able to replace them.
            self.tls = ReloadableTLS(self.endpoint._sslContextFactory)
            self.endpoint._sslContextFactory = self.tls

    def load_tls(self) -> Any:
        """Read this ``ssl:`` listener's certificate and key files again and check
        them; returns new options for :meth:`use_tls`.  Raises ``ValueError`` (with a
        message naming the listener) when they cannot be used."""
        if self.tls is None:
            raise ValueError(f"{self.description} is not a TLS listener")
        try:
            fresh: Any = serverFromString(self.reactor, self.description)
            options = fresh._sslContextFactory
            options.getContext()  # the key must match the certificate
        except Exception as e:
            raise ValueError(f"{self.description}: {e or type(e).__name__}") from None
        return options

    def use_tls(self, options: Any) -> str:
        """New connections get ``options`` (from :meth:`load_tls`); returns the
        SHA-256 fingerprint of their certificate."""
        assert self.tls is not None
        self.tls.options = options
        fp = fingerprint(options.certificate.to_cryptography())
        self.log.info(
            "TLS certificate of {description} reloaded: {fp}", description=self.description, fp=fp
        )
        return fp

    def reload_tls(self) -> str:
        """:meth:`load_tls` then :meth:`use_tls`."""
        return self.use_tls(self.load_tls())

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        if self.port is not None:
            return
        result: list[Any] = []
        if self.shared:
            from twisted.internet.defer import maybeDeferred

            from chatproto.cluster.listen import listen_shared

            shared = maybeDeferred(listen_shared, self.endpoint, self.factory, self.reactor)
            shared.addBoth(result.append)
            if result[0] is None:
                result.clear()
        if not result:
            self.endpoint.listen(self.factory).addBoth(result.append)
        if not result:  # an endpoint that listens asynchronously
            raise RuntimeError(f"endpoint {self.description!r} did not listen at once")
        outcome = result[0]
        if not IListeningPort.providedBy(outcome):
            raise SystemExit(f"chatrealm: cannot listen on {self.description}: {outcome.value}")
        self.port = outcome
        self.log.info(
            "chatrealm {realm} listening on {address} ({description})",
            realm=self.factory.realm.realm,
            address=_address(outcome.getHost()),
            description=self.description,
        )

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        Service.startService(self)

    def stopService(self) -> Any:
        Service.stopService(self)
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None


def _address(addr: Any) -> str:
    """``HOST:PORT`` of an IP address, the path of a UNIX socket."""
    if hasattr(addr, "port"):
        return f"{addr.host}:{addr.port}"
    name = getattr(addr, "name", None)
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name or addr)


def build(
    cfg: configmod.Config,
    reactor: Any,
    plugins: list[Any] | None = None,
    collector: bool = False,
) -> tuple[MultiService, RealmService]:
    """Wire a realm process from a checked config; returns (top service, realm).

    Extensions named in ``realm.plugins`` are called with the realm before any
    listener starts (see :mod:`chatproto.extensions`); ``plugins`` passes them already
    loaded (``Options`` loads them to report a bad name as a usage error).
    ``collector``: also apply ``[performance]`` (the garbage collector's settings and
    the event loop's coalescing wait, changes to the whole process) while the services
    run; ``twistd chatrealm`` does, an embedding application does only if it asks
    (:mod:`chatproto.collector`, :mod:`chatproto.pacing`).
    """
    top = MultiService()
    # Created owner only (the store, files, keys and control token are kept there),
    # whatever the umask; an existing directory keeps its mode.
    os.makedirs(cfg.data_dir, mode=0o700, exist_ok=True)
    store = make_store(cfg, reactor)
    realm = RealmService(cfg, store, reactor)
    worker = None
    if cfg.worker is not None:
        from chatproto.cluster.worker import Worker  # Redis only for a cluster

        worker = Worker(realm, reactor)
    realm.setServiceParent(top)
    ops = Operations(realm, reactor)
    ops.setServiceParent(top)
    for setup in plugins if plugins is not None else extensions.load_all(cfg.plugins):
        setup(realm)

    def serve(protocol: str, description: str, factory: Any, connections: Any) -> None:
        listener = ListenerService(reactor, description, factory, shared=worker is not None)
        listener.setServiceParent(top)
        ops.watch(protocol, connections, listener)

    factory = ClientFactory(realm)
    for description in cfg.listen_descriptions():
        serve("native", description, factory, factory)
    web = cfg.web_descriptions()
    if web:
        from chatproto.web import WebSite  # twisted.web and autobahn only when used

        site = WebSite(realm)
        for description in web:
            serve("web", description, site, site.ws.sessions)
    if cfg.irc.enabled:
        from chatproto.irc import IRCFactory

        irc_factory = IRCFactory(realm)
        for description in cfg.irc_descriptions():
            serve("irc", description, irc_factory, irc_factory)
    if cfg.federation.enabled and worker is None:
        from chatproto.federation import FederationService

        FederationService(realm, reactor).setServiceParent(top)
    elif cfg.federation.enabled and worker is not None:
        worker.federation_service().setServiceParent(top)
    if cfg.metrics.listen:
        from chatproto.ops.site import OpsSite  # twisted.web only when used

        ops_site = OpsSite(ops, reactor)
        for description in cfg.metrics.listen:
            ListenerService(reactor, description, ops_site).setServiceParent(top)
    if collector:
        LoopPacerService(cfg.performance, reactor).setServiceParent(top)
        CollectorService(cfg.performance, realm).setServiceParent(top)
    return top, realm


def makeService(options: Options) -> IServiceCollection:
    from twisted.internet import reactor

    top, _realm = build(options.realm_config, reactor, options.plugins, collector=True)
    return top


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run with: twistd -n chatrealm")
