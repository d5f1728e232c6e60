"""Reference point for the benchmark: the cheapest Twisted relay that speaks the realm's
wire format (Int32 frames of JSON) for hello / register / login / send / ack.

No store, no passwords, no validation, no rate limits: ``send`` gets a position from a
counter, is answered, and the ``msg`` frame (encoded once) is written to the
recipient's and the sender's connections.  Its throughput is the ceiling that Twisted +
json + framing allow in one Python process on this machine; the gap to the realm is
what storage, auth and realm logic cost.

    python bench/refserver.py --logfile FILE   (listens on an ephemeral port and logs it)
"""

from __future__ import annotations

import json
import struct
import sys
import time

from twisted.internet import reactor
from twisted.internet.protocol import Factory
from twisted.protocols.basic import Int32StringReceiver

_pack = struct.Struct("!I").pack
_enc = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class Relay(Int32StringReceiver):
    MAX_LENGTH = 65536
    user = None

    def send(self, obj: dict) -> None:
        payload = _enc(obj).encode()
        self.transport.write(_pack(len(payload)) + payload)

    def stringReceived(self, data: bytes) -> None:
        req = json.loads(data)
        t = req["type"]
        f = self.factory
        if t == "send":
            f.pos += 1
            to = req["to"]
            if "@" not in to:
                to += "@localhost"
            msg = {
                "type": "msg",
                "pos": f.pos,
                "msg_id": str(f.pos),
                "kind": "text",
                "from": self.user,
                "to": to,
                "ts": time.time(),
                "body": req["body"],
            }
            self.send(
                {
                    "type": "result",
                    "id": req.get("id"),
                    "pos": f.pos,
                    "msg_id": str(f.pos),
                    "ts": msg["ts"],
                }
            )
            payload = _enc(msg).encode()
            frame = _pack(len(payload)) + payload
            for c in f.online.get(to, ()):
                c.transport.write(frame)
            for c in f.online.get(self.user, ()):
                c.transport.write(frame)
        elif t == "ack" or t == "pong":
            pass
        elif t == "login":
            self.user = req["user"] + "@localhost"
            f.online.setdefault(self.user, []).append(self)
            self.send({"type": "result", "id": req.get("id"), "user": self.user, "device": "x"})
            reactor.callLater(0, self.send, {"type": "synced", "pos": f.pos})
        else:  # hello, register, anything else
            self.send({"type": "result", "id": req.get("id")})

    def connectionLost(self, reason=None) -> None:
        if self.user:
            self.factory.online[self.user].remove(self)


class RelayFactory(Factory):
    protocol = Relay
    noisy = False

    def __init__(self) -> None:
        self.pos = 0
        self.online: dict[str, list[Relay]] = {}


def main() -> None:
    logfile = sys.argv[sys.argv.index("--logfile") + 1]
    port = reactor.listenTCP(0, RelayFactory(), interface="127.0.0.1")
    h = port.getHost()
    with open(logfile, "a") as f:
        f.write(f"refserver listening on {h.host}:{h.port} (tcp:0)\n")
    reactor.run()


if __name__ == "__main__":
    main()
