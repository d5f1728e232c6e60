# A chatproto realm hosted inside another Twisted application.  -*- python -*-
#
#   twistd -ny examples/embedded.tac
#
# One MultiService holds: the RealmService (SQLite in $CHATPROTO_DATA, default
# ./example-data), the chatproto ClientFactory on TCP 127.0.0.1:$CHATPROTO_PORT
# (default 7430) and a twisted.web status page on 127.0.0.1:$CHATPROTO_WEB_PORT
# (default 7431): the realm's name, the online users and the public groups.
# Port 0 picks a free port; the log says which ("... listening on 127.0.0.1:PORT").
# CHATPROTO_CHEAP_ARGON2=1 makes password hashing cheap (tests only: never in production).

from __future__ import annotations

import html
import json
import os

from twisted.application import service
from twisted.internet import endpoints, reactor
from twisted.logger import Logger
from twisted.web import resource, server

from chatproto.config import Config
from chatproto.protocol import ClientFactory
from chatproto.realm import RealmService
from chatproto.store.sqlite import SQLiteStore
from chatproto.tap import ListenerService

INTERFACE = "127.0.0.1"


class StatusPage(resource.Resource):
    """``/``: an HTML status page; ``/status.json``: the same as JSON."""

    isLeaf = True

    def __init__(self, realm: RealmService) -> None:
        super().__init__()
        self.realm = realm

    def status(self) -> dict:
        return {
            "realm": self.realm.realm,
            "online": [u["user"] for u in self.realm.who()],
            "groups": [
                {"group": g["group"], "topic": g.get("topic", ""), "members": g["members"]}
                for g in self.realm.list_groups()
            ],
        }

    def render_GET(self, request: server.Request) -> bytes:
        status = self.status()
        if request.path == b"/status.json":
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(status).encode()
        if request.path != b"/":
            request.setResponseCode(404)
            return b"not found"
        esc = html.escape
        users = "".join(f"<li>{esc(u)}</li>" for u in status["online"]) or "<li>nobody</li>"
        groups = (
            "".join(
                f"<li>{esc(g['group'])} ({g['members']} members) {esc(g['topic'])}</li>"
                for g in status["groups"]
            )
            or "<li>none</li>"
        )
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return (
            f"<!doctype html><title>chatproto {esc(status['realm'])}</title>"
            f"<h1>Realm {esc(status['realm'])}</h1>"
            f"<h2>Online ({len(status['online'])})</h2><ul>{users}</ul>"
            f"<h2>Public groups</h2><ul>{groups}</ul>"
        ).encode()


class WebService(service.Service):
    """Serves ``site`` on a TCP port for as long as the service runs; logs the port."""

    log = Logger()

    def __init__(self, port: int, site: server.Site) -> None:
        self.endpoint = endpoints.TCP4ServerEndpoint(reactor, port, interface=INTERFACE)
        self.site = site
        self.port = None

    def privilegedStartService(self) -> None:
        service.Service.privilegedStartService(self)
        result: list = []
        self.endpoint.listen(self.site).addBoth(result.append)
        if not hasattr(result[0], "getHost"):
            raise SystemExit(f"embedded.tac: cannot listen for the web page: {result[0].value}")
        self.port = result[0]
        self.log.info(
            "status page on http://{host}:{port}/", host=INTERFACE, port=self.port.getHost().port
        )

    def stopService(self):
        service.Service.stopService(self)
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None


def make_config() -> Config:
    cfg = Config(data_dir=os.environ.get("CHATPROTO_DATA", "example-data"))
    if os.environ.get("CHATPROTO_CHEAP_ARGON2") == "1":
        cfg.auth.argon2_time_cost = 1
        cfg.auth.argon2_memory_cost = 1024
        cfg.auth.argon2_parallelism = 1
    cfg.check()
    return cfg


cfg = make_config()
top = service.MultiService()
# The realm first: it starts before the listeners and stops after them.
realm = RealmService(cfg, SQLiteStore(cfg.database_path, reactor), reactor)
realm.setServiceParent(top)
chat_port = int(os.environ.get("CHATPROTO_PORT", "7430"))
ListenerService(
    reactor, f"tcp:{chat_port}:interface={INTERFACE}", ClientFactory(realm)
).setServiceParent(top)
web = server.Site(StatusPage(realm))
web.noisy = False
WebService(int(os.environ.get("CHATPROTO_WEB_PORT", "7431")), web).setServiceParent(top)

application = service.Application("chatproto-embedded")
top.setServiceParent(application)
