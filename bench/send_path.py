"""The realm's send path in one process: CPU per private message, without sockets.

    python bench/send_path.py                 # 50 pairs x 64 in flight, 40 rounds
    python bench/send_path.py --pairs 10 --window 8 --synchronous NORMAL
    python bench/send_path.py --irc           # the same over the IRC gateway (PRIVMSG)

A realm on the SQLite store (a temporary file, ``synchronous = FULL`` by default, the
realm default) with its real writer and reader threads, and 2 x ``pairs`` native
sessions connected to StringTransports (``chatproto.testing``).  Each round, every
sender's ``window`` send frames (encoded beforehand) arrive in one read -- what a busy
client's socket delivers -- and the round ends when every sender has all its results;
each recipient then acks what it got.  Printed: the reactor thread's CPU time and the
process's (reactor + SQLite threads) per delivered DM, from ``time.thread_time`` and
``time.process_time``, and on Linux the SQLite writer thread's alone (its CPU clock):
figures that hold still on a busy machine, unlike rates (``DMs/s`` is printed too, for
what it is worth), and the bytes the process had written to storage per DM (Linux).
No load generator, no kernel: this is the Python of the realm's send path alone
(``bench/run.py`` measures it over loopback).

With ``--irc`` the sessions are IRC connections of the realm's IRC gateway (``PASS``
login), each read holding ``window`` ``PRIVMSG <partner> :<body>`` lines, and a round
ends when every recipient has its ``window`` lines (IRC clients do not ack: the gateway
does, on a timer): the gateway's and the realm's CPU per DM (``bench/irc.py`` measures
it over loopback against twisted.words).

The realm runs with the garbage collector settings a realm gets from ``twistd
chatrealm`` (``[performance]``, chatproto.collector): ``--gc-thresholds`` and
``--no-gc-freeze`` change them (``--gc-thresholds python``: Python's own), and the
collections made during the rounds are printed with the CPU time they took (the thread
CPU time between the collector's start and stop callbacks, whichever thread collected).

With ``--store memory`` the realm runs on a MemoryStore: no SQLite threads, every
commit at once, so the run is deterministic enough for instruction counts, which do not
move with the machine's load: the difference between ``valgrind --tool=callgrind``
runs with ``--rounds R`` and ``--rounds 0`` (``PYTHONHASHSEED=0``), divided by the DMs
of R rounds, is the Python send path's instructions per DM (storage left out).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import threading
import time
from typing import Any

from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from chatproto.collector import CollectorService
from chatproto.config import Config
from chatproto.irc import IRCFactory
from chatproto.protocol import ClientFactory
from chatproto.realm import RealmService
from chatproto.store.memory import MemoryStore
from chatproto.store.sqlite import SQLiteStore
from chatproto.testing import InlineHasher, connect_string_transport, frame


def irc_connect(factory: IRCFactory, name: str, host: str) -> tuple[Any, StringTransport]:
    """An IRC connection of the gateway on a StringTransport, logging in as ``name``."""
    peer = IPv4Address("TCP", host, 40000)
    proto: Any = factory.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer)
    proto.makeConnection(transport)
    proto.dataReceived(f"PASS password1\r\nNICK {name}\r\nUSER {name} 0 * :{name}\r\n".encode())
    return proto, transport


def written_bytes() -> int | None:
    """The bytes this process has had written to storage (Linux: ``write_bytes`` of
    /proc/self/io; the WAL's frames, the checkpoints' pages, the fsync'd commits)."""
    try:
        with open("/proc/self/io") as fh:
            for line in fh:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def thread_cpu(threads: list[Any]) -> float | None:
    """The CPU seconds ``threads`` (the store's writer thread) have used, where the
    platform tells (Linux: each thread's CPU clock)."""
    try:
        return sum(
            time.clock_gettime(time.pthread_getcpuclockid(t.ident)) for t in threads if t.ident
        )
    except (AttributeError, OSError):
        return None


@defer.inlineCallbacks
def run(reactor: Any, args: argparse.Namespace) -> Any:
    tmp = tempfile.mkdtemp(prefix="chatbench-send-")
    try:
        cfg = Config()
        cfg.limits.send_rate = 1e9
        cfg.limits.send_burst = 1e9
        cfg.limits.max_sessions_per_user = 10**6
        cfg.irc.enabled = True
        cfg.irc.flood_rate = 0.0
        if args.gc_thresholds is not None:
            cfg.performance.gc_thresholds = args.gc_thresholds
        cfg.performance.gc_freeze = args.gc_freeze
        cfg.check()
        store: Any
        if args.store == "memory":
            store = MemoryStore()
        else:
            store = SQLiteStore(os.path.join(tmp, "realm.db"), reactor, args.synchronous)
        yield store.open()
        realm = RealmService(cfg, store, reactor, clock=reactor, hasher=InlineHasher())
        realm.startService()
        collector = CollectorService(cfg.performance, realm)
        collector.startService()
        factory = IRCFactory(realm) if args.irc else ClientFactory(realm)
        n = args.pairs
        conns = []
        for i in range(2 * n):
            yield realm.create_user(f"u{i}", "password1")
            # one address per connection: the pre-login limits count per address
            host = f"10.1.{i // 200}.{i % 200 + 1}"
            if args.irc:
                conns.append(irc_connect(factory, f"u{i}", host))
                continue
            p, t = connect_string_transport(realm, factory, host=host)
            p.dataReceived(
                frame({"type": "hello", "version": 1, "id": 1})
                + frame({"type": "login", "id": 2, "user": f"u{i}", "password": "password1"})
            )
            conns.append((p, t))
        ready = b" 001 " if args.irc else b'"synced"'
        deadline = time.monotonic() + 60
        while not all(ready in t.value() for _, t in conns):
            if time.monotonic() > deadline:
                raise SystemExit("send_path: logins did not complete in 60 s")
            yield task.deferLater(reactor, 0.01, lambda: None)
        if args.irc:  # the session goes live after the welcome burst
            yield task.deferLater(reactor, 0.2, lambda: None)
        for _, t in conns:
            t.clear()
        body = "x" * args.body
        if args.irc:
            reads = [
                b"".join(f"PRIVMSG u{i + n} :{body}\r\n".encode() for _ in range(args.window))
                for i in range(n)
            ]
        else:
            reads = [
                b"".join(
                    frame({"type": "send", "id": k, "to": f"u{i + n}", "body": body})
                    for k in range(args.window)
                )
                for i in range(n)
            ]
        delivered = 0
        gc_cpu = GCTimer()
        gc.callbacks.append(gc_cpu)
        c0 = [g["collections"] for g in gc.get_stats()]
        writer = list(getattr(getattr(store, "_writer_pool", None), "threads", ()))
        t0, p0, w0 = time.thread_time(), time.process_time(), time.perf_counter()
        wc0 = thread_cpu(writer)
        wb0 = written_bytes()
        for _ in range(args.rounds):
            for i in range(n):
                conns[i][0].dataReceived(reads[i])
            deadline = time.monotonic() + 60
            if args.irc:
                while not all(
                    conns[i + n][1].value().count(b" PRIVMSG ") >= args.window for i in range(n)
                ):
                    if time.monotonic() > deadline:
                        raise SystemExit("send_path: a round did not complete in 60 s")
                    yield task.deferLater(reactor, 0.0005, lambda: None)
                for i in range(n):
                    conns[i][1].clear()
                    delivered += conns[i + n][1].value().count(b" PRIVMSG ")
                    conns[i + n][1].clear()
                continue
            while not all(
                conns[i][1].value().count(b'"type":"result"') >= args.window for i in range(n)
            ):
                if time.monotonic() > deadline:
                    raise SystemExit("send_path: a round did not complete in 60 s")
                yield task.deferLater(reactor, 0.0005, lambda: None)
            for i in range(n):
                conns[i][1].clear()
                got = conns[i + n][1].value()
                conns[i + n][1].clear()
                delivered += got.count(b'"type":"msg"')
                j = got.rfind(b'"pos":')
                pos = int(got[j + 6 : got.index(b",", j)])
                conns[i + n][0].dataReceived(frame({"type": "ack", "pos": pos}))
        t1, p1, w1 = time.thread_time(), time.process_time(), time.perf_counter()
        wc1 = thread_cpu(writer)
        wb1 = written_bytes()
        c1 = [g["collections"] for g in gc.get_stats()]
        gc.callbacks.remove(gc_cpu)
        expected = args.rounds * n * args.window
        if delivered != expected:
            raise SystemExit(f"send_path: {delivered} DMs delivered, {expected} expected")
        what = "send path (IRC gateway)" if args.irc else "send path"
        where = "MemoryStore" if args.store == "memory" else f"synchronous={args.synchronous}"
        commits = "" if args.store == "memory" else f" in {store.commits} commits"
        print(
            f"{what}: {n} pairs x {args.window} in flight, {args.rounds} rounds, "
            f"{where}: {delivered:,} DMs{commits}"
        )
        if delivered:
            print(f"  reactor thread  {1e6 * (t1 - t0) / delivered:6.1f} us CPU per DM")
            print(f"  whole process   {1e6 * (p1 - p0) / delivered:6.1f} us CPU per DM")
            if writer and wc0 is not None and wc1 is not None:
                print(f"  SQLite writer   {1e6 * (wc1 - wc0) / delivered:6.1f} us CPU per DM")
            if args.store != "memory" and wb0 is not None and wb1 is not None:
                print(f"  written         {(wb1 - wb0) / delivered:6.0f} bytes per DM")
            print(f"  ({delivered / (w1 - w0):,.0f} DMs/s wall clock)")
        print(
            f"  garbage collector: thresholds {gc.get_threshold()}, "
            f"{collector.frozen} objects frozen at start; collections of generation 0/1/2 "
            "during the rounds: " + "/".join(str(b - a) for a, b in zip(c0, c1, strict=True))
        )
        if delivered:
            print(
                f"  garbage collector CPU {1e6 * gc_cpu.total / delivered:6.2f} us per DM "
                f"(reactor thread {1e6 * gc_cpu.reactor / delivered:.2f})"
            )
        collector.stopService()
        realm.stopService()
        yield store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class GCTimer:
    """A ``gc.callbacks`` entry adding up the thread CPU time of each collection."""

    def __init__(self) -> None:
        self.total = 0.0
        self.reactor = 0.0
        self._main = threading.main_thread().ident
        self._started: dict[int | None, float] = {}

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        thread = threading.get_ident()
        if phase == "start":
            self._started[thread] = time.thread_time()
            return
        start = self._started.pop(thread, None)
        if start is not None:
            spent = time.thread_time() - start
            self.total += spent
            if thread == self._main:
                self.reactor += spent


def gc_thresholds(text: str) -> list[int]:
    """``--gc-thresholds``: ``GEN0,GEN1,GEN2``, or ``python`` for Python's own ([])."""
    if text == "python":
        return []
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError("GEN0,GEN1,GEN2 (integers) or 'python'") from None


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--pairs", type=int, default=50)
    ap.add_argument("--window", type=int, default=64, help="sends per sender per read")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--body", type=int, default=40, help="body length in characters")
    ap.add_argument("--synchronous", default="FULL", choices=("FULL", "NORMAL"))
    ap.add_argument(
        "--store",
        default="sqlite",
        choices=("sqlite", "memory"),
        help="memory: no threads, commits at once (for callgrind instruction counts)",
    )
    ap.add_argument("--irc", action="store_true", help="IRC connections (PRIVMSG lines)")
    ap.add_argument(
        "--gc-thresholds",
        type=gc_thresholds,
        help="GEN0,GEN1,GEN2 or 'python' (Python's own); default: the realm's "
        "[performance] gc_thresholds",
    )
    ap.add_argument(
        "--no-gc-freeze",
        dest="gc_freeze",
        action="store_false",
        help="no gc.freeze() after start-up ([performance] gc_freeze = false)",
    )
    args = ap.parse_args()
    task.react(run, (args,))


if __name__ == "__main__":
    main()
