"""bench/web.py: the web listener's figures, beside the native protocol's.

    python bench/web.py [--duration S] [--window N] [--file-mib M] [--quick]

Starts ``twistd -n chatrealm`` in a subprocess (temp data dir, cheap argon2, no rate
limit) with a native listener and a web listener on 127.0.0.1, then, from this process:

1. DMs alice -> bob for ``--duration`` seconds with ``--window`` sends in flight, once
   over two native connections and once over two WebSockets (cookie login through
   ``POST /api/login``): messages/s delivered to bob, and send-to-delivery latency;
2. a ``--file-mib`` MiB file uploaded with ``POST /files`` and downloaded with
   ``GET /files/<id>`` (MiB/s each way), then a 1 MiB ``Range`` from its middle.

The load generator (this process: autobahn's client, Twisted's HTTP client) shares the
2 cores with the realm, so the figures are a floor for the realm.  Run it on a quiet
machine; see bench/README.md for recorded figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, protocol, task
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.protocols.basic import Int32StringReceiver
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

PY = sys.executable
PASSWORD = "bench password 1"


def twistd() -> list[str]:
    cand = Path(PY).parent / "twistd"
    return [PY, str(cand)] if cand.exists() else [PY, shutil.which("twistd") or "twistd"]


class Realm:
    """A twistd realm with a native and a web listener on 127.0.0.1 (ports from its log)."""

    def __init__(self, profile: str | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="chatproto-bench-web-"))
        cfg = self.dir / "realm.toml"
        cfg.write_text(
            "[realm]\n"
            f'data_dir = "{self.dir / "data"}"\n'
            "[limits]\nsend_rate = 1e9\nsend_burst = 1000000000\n"
            "keepalive_interval = 3600.0\n"
            "[auth]\nargon2_time_cost = 1\nregistrations_per_address = 0\n"
            "argon2_memory_cost = 1024\nargon2_parallelism = 1\n"
            "[files]\nmax_file_size = 1073741824\nquota_per_user = 4294967296\n"
        )
        self.log = self.dir / "twistd.log"
        prefix = twistd()
        if profile:
            prefix = [
                PY,
                str(Path(__file__).parent / "twistd_wrapper.py"),
                "--profile",
                profile,
                "--",
            ]
        self.proc = subprocess.Popen(
            [
                *prefix,
                "-n",
                "--pidfile=",
                f"--logfile={self.log}",
                "chatrealm",
                "--config",
                str(cfg),
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--web",
                "tcp:0:interface=127.0.0.1:backlog=64",
            ],
            start_new_session=True,
        )
        self.native = self.web = 0
        pat = re.compile(r"listening on [\d.]+:(\d+) \((\S+)\)")
        for _ in range(300):
            text = self.log.read_text() if self.log.exists() else ""
            for port, desc in pat.findall(text):
                if "backlog" in desc:
                    self.web = int(port)
                else:
                    self.native = int(port)
            if self.native and self.web:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        sys.exit(f"bench: the realm did not start:\n{text}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


class Peer:
    """Requests with ids and pushed frames, over either transport."""

    def __init__(self) -> None:
        self.next_id = 1
        self.waiting: dict[int, defer.Deferred[dict[str, Any]]] = {}
        self.on_msg: Any = None
        self.synced: defer.Deferred[None] = defer.Deferred()

    def frame(self, obj: dict[str, Any]) -> None:
        kind = obj.get("type")
        if kind in ("result", "error") and obj.get("id") in self.waiting:
            self.waiting.pop(obj["id"]).callback(obj)
        elif kind == "msg" and self.on_msg is not None:
            self.on_msg(obj)
        elif kind == "synced" and not self.synced.called:
            self.synced.callback(None)
        elif kind == "ping":
            self.send_json({"type": "pong"})

    def call(self, type_: str, **fields: Any) -> defer.Deferred[dict[str, Any]]:
        rid = self.next_id
        self.next_id += 1
        d: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self.waiting[rid] = d
        self.send_json({"type": type_, "id": rid, **fields})
        return d

    def send_json(self, obj: dict[str, Any]) -> None:
        raise NotImplementedError


class NativePeer(Peer, Int32StringReceiver):
    MAX_LENGTH = 64 * 1024 * 1024

    def __init__(self) -> None:
        Peer.__init__(self)

    def stringReceived(self, data: bytes) -> None:
        self.frame(json.loads(data))

    def send_json(self, obj: dict[str, Any]) -> None:
        self.sendString(json.dumps(obj, separators=(",", ":")).encode())


class WebPeer(Peer, WebSocketClientProtocol):
    def __init__(self) -> None:
        Peer.__init__(self)
        WebSocketClientProtocol.__init__(self)

    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.frame(json.loads(payload))

    def send_json(self, obj: dict[str, Any]) -> None:
        self.sendMessage(json.dumps(obj, separators=(",", ":")).encode())


@defer.inlineCallbacks
def native_login(port: int, user: str) -> Any:
    peer = yield TCP4ClientEndpoint(_reactor, "127.0.0.1", port).connect(
        protocol.Factory.forProtocol(NativePeer)
    )
    yield peer.call("hello", version=1)
    res = yield peer.call("login", user=user, password=PASSWORD, device="bench-native")
    assert res["type"] == "result", res
    yield peer.synced
    return peer


@defer.inlineCallbacks
def register(port: int, user: str) -> Any:
    base = f"http://127.0.0.1:{port}"
    body = json.dumps({"user": user, "password": PASSWORD}).encode()
    headers = Headers({"content-type": ["application/json"], "origin": [base]})
    r = yield Agent(_reactor).request(
        b"POST", f"{base}/api/register".encode(), headers, FileBodyProducer(_bytes(body))
    )
    yield readBody(r)
    assert r.code == 200, r.code


@defer.inlineCallbacks
def cookie(port: int, user: str) -> Any:
    base = f"http://127.0.0.1:{port}"
    body = json.dumps({"user": user, "password": PASSWORD, "device": "bench-web"}).encode()
    headers = Headers({"content-type": ["application/json"], "origin": [base]})
    r = yield Agent(_reactor).request(
        b"POST", f"{base}/api/login".encode(), headers, FileBodyProducer(_bytes(body))
    )
    yield readBody(r)
    assert r.code == 200, r.code
    return r.headers.getRawHeaders("set-cookie")[0].split(";")[0]


def _bytes(data: bytes) -> Any:
    import io

    return io.BytesIO(data)


@defer.inlineCallbacks
def web_login(port: int, user: str) -> Any:
    c = yield cookie(port, user)
    base = f"http://127.0.0.1:{port}"
    factory = WebSocketClientFactory(
        f"ws://127.0.0.1:{port}/ws", origin=base, headers={"Cookie": c}
    )
    factory.protocol = WebPeer
    factory.opened = defer.Deferred()
    yield TCP4ClientEndpoint(_reactor, "127.0.0.1", port).connect(factory)
    peer = yield factory.opened
    yield peer.call("hello", version=1)
    res = yield peer.call("login")
    assert res["type"] == "result", res
    yield peer.synced
    return peer


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))]


@defer.inlineCallbacks
def dm_run(alice: Peer, bob: Peer, duration: float, window: int) -> Any:
    latencies: list[float] = []
    state = {"sent": 0, "got": 0, "stop": False}
    done: defer.Deferred[None] = defer.Deferred()

    def on_msg(m: dict[str, Any]) -> None:
        if m.get("from", "").startswith("alice@"):
            state["got"] += 1
            latencies.append(time.perf_counter() - float(m["body"]))

    bob.on_msg = on_msg
    alice.on_msg = None

    def send_one(_: Any = None) -> None:
        if state["stop"]:
            if all(d.called for d in alice.waiting.values()) and not done.called:
                done.callback(None)
            return
        state["sent"] += 1
        alice.call("send", to="bob", body=repr(time.perf_counter())).addCallback(send_one)

    start = time.perf_counter()
    got0 = state["got"]
    for _ in range(window):
        send_one()
    yield task.deferLater(_reactor, duration, lambda: None)
    state["stop"] = True
    elapsed = time.perf_counter() - start
    rate = (state["got"] - got0) / elapsed
    yield task.deferLater(_reactor, 0.5, lambda: None)
    return {
        "msgs_per_s": round(rate),
        "p50_ms": round(pct(latencies, 0.5) * 1000, 2),
        "p99_ms": round(pct(latencies, 0.99) * 1000, 2),
    }


class _Count(protocol.Protocol):
    def __init__(self, done: defer.Deferred[int]) -> None:
        self.n = 0
        self.done = done

    def dataReceived(self, data: bytes) -> None:
        self.n += len(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.n)


@defer.inlineCallbacks
def file_run(port: int, mib: int, tmp: Path) -> Any:
    path = tmp / "blob.bin"
    sha = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(mib):
            chunk = os.urandom(1024 * 1024)
            sha.update(chunk)
            f.write(chunk)
    size = mib * 1024 * 1024
    ca = yield cookie(port, "alice")
    cb = yield cookie(port, "bob")
    base = f"http://127.0.0.1:{port}"
    agent = Agent(_reactor)
    headers = Headers(
        {"content-type": ["application/octet-stream"], "origin": [base], "cookie": [ca]}
    )
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        r = yield agent.request(
            b"POST",
            f"{base}/files?to=bob&name=blob.bin&sha256={sha.hexdigest()}".encode(),
            headers,
            FileBodyProducer(f),
        )
        body = yield readBody(r)
    up = time.perf_counter() - t0
    assert r.code == 200, body
    file_id = json.loads(body)["file"]["file"]
    t0 = time.perf_counter()
    r = yield agent.request(b"GET", f"{base}/files/{file_id}".encode(), Headers({"cookie": [cb]}))
    done: defer.Deferred[int] = defer.Deferred()
    r.deliverBody(_Count(done))
    n = yield done
    down = time.perf_counter() - t0
    assert n == size, (n, size)
    mid = size // 2
    t0 = time.perf_counter()
    r = yield agent.request(
        b"GET",
        f"{base}/files/{file_id}".encode(),
        Headers({"cookie": [cb], "range": [f"bytes={mid}-{mid + 2**20 - 1}"]}),
    )
    part = yield readBody(r)
    rng = time.perf_counter() - t0
    assert r.code == 206 and len(part) == 2**20
    return {
        "file_mib": mib,
        "upload_mib_s": round(mib / up, 1),
        "download_mib_s": round(mib / down, 1),
        "range_1mib_ms": round(rng * 1000, 1),
    }


@defer.inlineCallbacks
def main(args: argparse.Namespace) -> Any:
    realm = Realm(args.profile)
    tmp = Path(tempfile.mkdtemp(prefix="chatproto-bench-web-client-"))
    try:
        yield register(realm.web, "alice")
        yield register(realm.web, "bob")
        results: dict[str, Any] = {}
        a = yield native_login(realm.native, "alice")
        b = yield native_login(realm.native, "bob")
        results["dm native"] = yield dm_run(a, b, args.duration, args.window)
        a.transport.loseConnection()
        b.transport.loseConnection()
        a = yield web_login(realm.web, "alice")
        b = yield web_login(realm.web, "bob")
        results["dm websocket"] = yield dm_run(a, b, args.duration, args.window)
        a.sendClose()
        b.sendClose()
        results["files http"] = yield file_run(realm.web, args.file_mib, tmp)
        for name, figures in results.items():
            print(f"{name:14s} " + "  ".join(f"{k}={v}" for k, v in figures.items()))
    finally:
        realm.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--file-mib", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="2 s runs, a 16 MiB file")
    parser.add_argument("--profile", metavar="OUT.prof", help="cProfile the realm into OUT")
    ns = parser.parse_args()
    if ns.quick:
        ns.duration, ns.file_mib = 2.0, 16
    task.react(lambda _r: main(ns))
