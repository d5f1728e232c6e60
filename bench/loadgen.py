"""Load generator for the chatproto realm benchmark (run by bench/run.py).

Raw asyncio sockets with hand-rolled framing (4-byte big-endian length + UTF-8 JSON),
so the generator costs as little CPU as possible next to the realm under test.

Sub-commands (each prints one JSON object as the last line of stdout):

    dm     --port P --pairs N --duration S [--window W]    DM throughput and latency
    fanout --port P --members N --duration S [--window W]  group fan-out throughput/latency
    idle  --port P --counts 1000,5000 [--tls]            RSS per idle logged-in connection

Both take ``--pid`` (the realm's pid) to read its RSS / CPU time from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import json
import os
import resource
import shutil
import signal
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_hdr = struct.Struct("!I")
_unpack_from = _hdr.unpack_from
_pack = _hdr.pack
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_loads = json.loads

PASSWORD = "bench-password-123"
TIMEOUT = 30.0  # any single request / login step


def split_frames(buf: bytearray, data: bytes) -> list[bytes]:
    """Add ``data`` to a connection's ``buf`` and take the whole frames out of it (their
    payloads, in order)."""
    buf += data
    n = len(buf)
    off = 0
    frames = []
    while n - off >= 4:
        (ln,) = _unpack_from(buf, off)
        end = off + 4 + ln
        if end > n:
            break
        frames.append(bytes(buf[off + 4 : end]))
        off = end
    if off:
        del buf[:off]
    return frames


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """utime + stime of a process (all threads) or of one thread, in seconds."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def system_busy_seconds() -> float:
    """CPU seconds all processes spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    total = sum(v[:8])  # user nice system idle iowait irq softirq steal
    return (total - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


class ProtoError(Exception):
    pass


class Conn(asyncio.Protocol):
    """One client connection: framing, request ids, coalesced acks."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: Any = None
        self.buf = bytearray()
        self.next_id = 1
        self.waiting: dict[int, Callable[[dict[str, Any]], None]] = {}
        self.on_msg: Callable[[dict[str, Any]], None] | None = None
        self.synced: asyncio.Future[int] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.ack_pos = 0
        self.acked = 0
        self.auto_ack = True
        #: Shared {payload: decoded frame} cache (fan-out: every member gets the same
        #: bytes for a group item, so it is decoded once per item, not once per member).
        self.cache: dict[bytes, dict[str, Any]] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        err = {"type": "error", "code": "connection_lost", "message": str(exc)}
        waiting, self.waiting = self.waiting, {}
        for cb in waiting.values():
            cb(err)
        if not self.synced.done():
            self.synced.set_exception(ProtoError("connection lost before synced"))
            self.synced.exception()  # mark retrieved: nobody may be waiting (register)

    def data_received(self, data: bytes) -> None:
        frames = split_frames(self.buf, data)
        cache = self.cache
        if cache is None:
            for payload in frames:
                self.handle(_loads(payload))
        else:
            for payload in frames:
                obj = cache.get(payload)
                if obj is None:
                    obj = _loads(payload)
                    if obj["type"] == "msg":
                        if len(cache) >= 8192:
                            cache.clear()
                        cache[payload] = obj
                self.handle(obj)
        if self.auto_ack and self.ack_pos > self.acked:
            self.acked = self.ack_pos
            self.write({"type": "ack", "pos": self.ack_pos})

    def handle(self, obj: dict[str, Any]) -> None:
        t = obj["type"]
        if t == "msg":
            pos = obj["pos"]
            if pos > self.ack_pos:
                self.ack_pos = pos
            if self.on_msg is not None:
                self.on_msg(obj)
        elif t == "result" or t == "error":
            cb = self.waiting.pop(obj.get("id"), None)  # type: ignore[arg-type]
            if cb is not None:
                cb(obj)
            elif t == "error":
                print(f"loadgen: unsolicited error {obj}", file=sys.stderr)
        elif t == "synced":
            if not self.synced.done():
                self.synced.set_result(obj.get("pos", 0))
        elif t == "ping":
            self.write({"type": "pong"})

    # output
    def write(self, obj: dict[str, Any]) -> None:
        payload = _dumps(obj).encode()
        self.transport.write(_pack(len(payload)) + payload)

    def call(self, obj: dict[str, Any], cb: Callable[[dict[str, Any]], None]) -> None:
        rid = self.next_id
        self.next_id += 1
        obj["id"] = rid
        self.waiting[rid] = cb
        self.write(obj)

    async def request(self, obj: dict[str, Any]) -> dict[str, Any]:
        fut: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        self.call(obj, lambda r: fut.done() or fut.set_result(r))
        reply = await asyncio.wait_for(fut, TIMEOUT)
        if reply["type"] == "error":
            raise ProtoError(f"{obj['type']}: {reply.get('code')}: {reply.get('message')}")
        return reply

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect(port: int, tls: ssl.SSLContext | None) -> Conn:
    loop = asyncio.get_running_loop()
    _t, proto = await asyncio.wait_for(
        loop.create_connection(
            lambda: Conn(loop),
            "127.0.0.1",
            port,
            ssl=tls,
            server_hostname="localhost" if tls else None,
        ),
        TIMEOUT,
    )
    await proto.request({"type": "hello", "version": 1})
    return proto


async def login(
    port: int, user: str, tls: ssl.SSLContext | None = None, device: str = "bench"
) -> Conn:
    c = await connect(port, tls)
    await c.request({"type": "login", "user": user, "password": PASSWORD, "device": device})
    await asyncio.wait_for(c.synced, TIMEOUT)
    return c


async def register_all(
    port: int, users: list[str], concurrency: int = 8, tls: ssl.SSLContext | None = None
) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def one(u: str) -> None:
        async with sem:
            c = await connect(port, tls)
            try:
                await c.request({"type": "register", "user": u, "password": PASSWORD})
            finally:
                c.close()

    await asyncio.gather(*(one(u) for u in users))


async def gather_bounded(factories: list[Callable[[], Any]], concurrency: int) -> list[Any]:
    sem = asyncio.Semaphore(concurrency)

    async def run(f: Callable[[], Any]) -> Any:
        async with sem:
            return await f()

    return await asyncio.gather(*(run(f) for f in factories))


def percentile(sorted_vals: list[float], q: float) -> float | None:
    if not sorted_vals:
        return None
    k = min(len(sorted_vals) - 1, max(0, round(q / 100 * (len(sorted_vals) - 1))))
    return sorted_vals[k]


# ------------------------------------------------------------------------------------
# DM throughput


def cpu_sample(pid: int, child: int | None = None) -> dict[str, float]:
    """CPU seconds used so far by the realm (``pid``: all threads, and its main
    thread), by the load generator (this process, and ``child``, a process of its
    own that generates: see ``--cgen``) and by the whole machine."""
    return {
        "realm": cpu_seconds(pid) if pid else 0.0,
        "main": cpu_seconds(pid, pid) if pid else 0.0,
        "mine": time.process_time() + (cpu_seconds(child) if child else 0.0),
        "system": system_busy_seconds(),
    }


async def measured_window(args: argparse.Namespace, st: dict[str, Any]) -> tuple[float, dict]:
    """Warm up, then measure for ``args.duration`` (``st["measuring"]`` is True meanwhile).

    Returns the window's length and the CPU seconds used in it by the realm (all
    threads and its main thread), by this process and by the whole machine.
    """
    await asyncio.sleep(args.warmup)
    sample = functools.partial(cpu_sample, args.pid)
    before = sample()
    w0 = time.perf_counter()
    if args.profile_signals:
        os.kill(args.pid, signal.SIGUSR1)  # twistd_wrapper: start profiling
    st["measuring"] = True
    await asyncio.sleep(args.duration)
    st["measuring"] = False
    if args.profile_signals:
        os.kill(args.pid, signal.SIGUSR2)  # stop profiling
    elapsed = time.perf_counter() - w0
    after = sample()
    st["running"] = False
    used = {k: after[k] - before[k] for k in before}
    used["pid"] = bool(args.pid)
    return elapsed, used


def window_stats(
    st: dict[str, Any],
    lat: list[int],
    elapsed: float,
    cpu: dict[str, Any],
    latency_ms: tuple[float, float, float, float] | None = None,
) -> dict[str, Any]:
    """The figures every measurement reports: rates, latency percentiles (of
    ``lat``, in ns; or ``latency_ms``, p50/p90/p99/max taken elsewhere), CPU shares."""
    if latency_ms is None:
        lat.sort()
        ms = [x / 1e6 for x in lat]
        latency_ms = (
            percentile(ms, 50) or 0,
            percentile(ms, 90) or 0,
            percentile(ms, 99) or 0,
            ms[-1] if ms else 0,
        )
    p50, p90, p99, top = latency_ms
    pid = cpu["pid"]
    return {
        "duration_s": round(elapsed, 3),
        "delivered": st["delivered"],
        "delivered_per_s": round(st["delivered"] / elapsed, 1),
        "send_acks_per_s": round(st["acks"] / elapsed, 1),
        "latency_ms_p50": round(p50, 2),
        "latency_ms_p90": round(p90, 2),
        "latency_ms_p99": round(p99, 2),
        "latency_ms_max": round(top, 2),
        "send_errors": st["errors"],
        "realm_cpu_pct": round(100 * cpu["realm"] / elapsed, 1) if pid else None,
        "realm_main_thread_cpu_pct": round(100 * cpu["main"] / elapsed, 1) if pid else None,
        "loadgen_cpu_pct": round(100 * cpu["mine"] / elapsed, 1),
        # Everything else on the machine (other processes, kernel softirq): should be ~0.
        "other_cpu_pct": round(100 * (cpu["system"] - cpu["realm"] - cpu["mine"]) / elapsed, 1)
        if pid
        else None,
    }


async def run_dm(args: argparse.Namespace) -> dict[str, Any]:
    n = args.pairs
    prefix = f"b{os.getpid() % 100000}n{n}w{args.window}"
    senders = [f"{prefix}s{i}" for i in range(n)]
    receivers = [f"{prefix}r{i}" for i in range(n)]
    t0 = time.perf_counter()
    if not args.no_register:
        await register_all(args.port, senders + receivers)
    t_reg = time.perf_counter() - t0
    s_conns = await gather_bounded([lambda u=u: login(args.port, u) for u in senders], 32)
    r_conns = await gather_bounded([lambda u=u: login(args.port, u) for u in receivers], 32)
    t_setup = time.perf_counter() - t0

    pad = "x" * max(0, args.body - 20)
    if args.cgen:
        out = await run_dm_c(args, s_conns, r_conns, receivers, pad)
        out.update(setup_s=round(t_setup, 2), register_s=round(t_reg, 2))
        return out
    st = {
        "measuring": False,
        "running": True,
        "delivered": 0,
        "acks": 0,
        "errors": 0,
        "echo": 0,
        "behind": 0,
    }
    lat: list[int] = []
    inflight = [0]
    perf_ns = time.perf_counter_ns

    paced = args.rate > 0
    senders_send: list[Callable[[], None]] = []
    s_inflight = [0] * n

    lean = args.lean

    def make_sender(c: Conn, to: str, i: int) -> None:
        msg_to = to
        if lean:
            senders_send.append(lean_sender(c, to, i))
            return

        def on_result(r: dict[str, Any]) -> None:
            inflight[0] -= 1
            s_inflight[i] -= 1
            if r["type"] == "error":
                st["errors"] += 1
                if st["errors"] <= 5:
                    print(f"loadgen: send error {r}", file=sys.stderr)
                if r.get("code") == "connection_lost":
                    return
            elif st["measuring"]:
                st["acks"] += 1
            if st["running"] and not paced:
                send()

        def send() -> None:
            inflight[0] += 1
            s_inflight[i] += 1
            c.call({"type": "send", "to": msg_to, "body": f"{perf_ns()} {pad}"}, on_result)

        def on_echo(m: dict[str, Any]) -> None:
            st["echo"] += 1

        c.on_msg = on_echo
        senders_send.append(send)
        if not paced:
            for _ in range(args.window):
                send()

    async def pace() -> None:
        """Open loop: ``args.rate`` sends per second in all, round robin over the
        senders, whatever the answers (a sender with ``window`` unanswered skips its
        turn: counted as ``behind``), checked every millisecond."""
        start = time.perf_counter()
        due_sent = 0
        k = 0
        while st["running"]:
            due = int((time.perf_counter() - start) * args.rate)
            while due_sent < due:
                j = k % n
                k += 1
                due_sent += 1
                if s_inflight[j] < args.window:
                    senders_send[j]()
                elif st["measuring"]:
                    st["behind"] += 1
            await asyncio.sleep(0.001)

    def lean_ack(c: Conn, frames: list[bytes], out: list[bytes]) -> None:
        """Ack the last ``msg`` of a read, as Conn does, read off its bytes."""
        for payload in reversed(frames):
            if payload.startswith(b'{"type":"msg","pos":'):
                pos = int(payload[20 : payload.index(b",", 20)])
                if pos > c.acked:
                    c.acked = pos
                    p = b'{"type":"ack","pos":%d}' % pos
                    out.append(_pack(len(p)) + p)
                return

    def lean_other(c: Conn, payload: bytes, out: list[bytes]) -> None:
        if payload.startswith(b'{"type":"ping"'):
            out.append(_pack(15) + b'{"type":"pong"}')
        elif payload.startswith(b'{"type":"error"'):
            st["errors"] += 1
            if st["errors"] <= 5:
                print(f"loadgen: error {payload[:300]!r}", file=sys.stderr)

    def lean_sender(c: Conn, to: str, i: int) -> Callable[[], None]:
        """The sender of ``--lean``: frames read and written as bytes (no JSON), the
        sends a read's results call for written at once, one write."""
        head = b'{"type":"send","to":"%s","body":"' % to.encode()
        tail = b" " + pad.encode() + b'","id":%d}'
        rid = [1 << 20]

        def frame() -> bytes:
            rid[0] += 1
            p = head + b"%d" % perf_ns() + tail % rid[0]
            return _pack(len(p)) + p

        def send() -> None:
            inflight[0] += 1
            s_inflight[i] += 1
            c.transport.write(frame())

        def data_received(data: bytes) -> None:
            out: list[bytes] = []
            done = 0
            frames = split_frames(c.buf, data)
            for payload in frames:
                if payload.startswith(b'{"type":"result"'):
                    done += 1
                elif payload.startswith(b'{"type":"msg"'):
                    st["echo"] += 1
                else:
                    if payload.startswith(b'{"type":"error"'):
                        done += 1
                    lean_other(c, payload, out)
            if done:
                inflight[0] -= done
                s_inflight[i] -= done
                if st["measuring"]:
                    st["acks"] += done
                if st["running"] and not paced:
                    inflight[0] += done
                    s_inflight[i] += done
                    out.extend(frame() for _ in range(done))
            lean_ack(c, frames, out)
            if out:
                c.transport.write(b"".join(out))

        c.data_received = data_received  # type: ignore[method-assign]
        if not paced:
            inflight[0] += args.window
            s_inflight[i] += args.window
            c.transport.write(b"".join(frame() for _ in range(args.window)))
        return send

    def lean_receiver(c: Conn, frm_prefix: str) -> None:
        frm = b'"from":"' + frm_prefix.encode()

        def data_received(data: bytes) -> None:
            out: list[bytes] = []
            frames = split_frames(c.buf, data)
            measuring = st["measuring"]
            now = perf_ns()
            for payload in frames:
                if payload.startswith(b'{"type":"msg"'):
                    if measuring and frm in payload:
                        k = payload.index(b'"body":"') + 8
                        st["delivered"] += 1
                        lat.append(now - int(payload[k : payload.index(b" ", k)]))
                else:
                    lean_other(c, payload, out)
            lean_ack(c, frames, out)
            if out:
                c.transport.write(b"".join(out))

        c.data_received = data_received  # type: ignore[method-assign]

    def make_receiver(c: Conn, frm_prefix: str) -> None:
        if lean:
            lean_receiver(c, frm_prefix)
            return

        def on_msg(m: dict[str, Any]) -> None:
            if st["measuring"] and m["from"].startswith(frm_prefix):
                now = perf_ns()
                st["delivered"] += 1
                lat.append(now - int(m["body"].split(" ", 1)[0]))

        c.on_msg = on_msg

    for i in range(n):
        make_receiver(r_conns[i], senders[i] + "@")
    for i in range(n):
        make_sender(s_conns[i], receivers[i], i)
    pacer = asyncio.ensure_future(pace()) if paced else None

    elapsed, cpu = await measured_window(args, st)
    if pacer is not None:
        await pacer
    deadline = time.perf_counter() + 15
    while inflight[0] > 0 and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    drained = inflight[0] <= 0
    for c in s_conns + r_conns:
        c.close()
    await asyncio.sleep(0.2)

    return {
        "pairs": n,
        "window": args.window,
        "rate": args.rate,
        "behind": st["behind"],
        "body_bytes": len(f"{perf_ns()} {pad}"),
        **window_stats(st, lat, elapsed, cpu),
        "drained": drained,
        "setup_s": round(t_setup, 2),
        "register_s": round(t_reg, 2),
    }


def build_dmgen() -> str:
    """bench/dmgen.c compiled once per version of its source (cached in the temp dir)."""
    src = Path(__file__).resolve().parent / "dmgen.c"
    text = src.read_bytes()
    out = Path(tempfile.gettempdir()) / f"chatproto-dmgen-{hashlib.sha256(text).hexdigest()[:16]}"
    if not out.exists():
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise SystemExit("loadgen: --cgen needs a C compiler (cc or gcc on PATH)")
        tmp = out.with_suffix(f".{os.getpid()}")
        subprocess.run([cc, "-O2", "-o", str(tmp), str(src)], check=True)
        os.replace(tmp, out)
    return str(out)


async def run_dm_c(
    args: argparse.Namespace, s_conns: list[Conn], r_conns: list[Conn], to: list[str], pad: str
) -> dict[str, Any]:
    """``dm --cgen``: the connections logged in here are handed to bench/dmgen.c, which
    paces the sends and reads the answers as the lean generator does, for a fraction of
    its CPU (the realm under test shares the machine's cores with it)."""
    binary = build_dmgen()
    await asyncio.sleep(0.3)  # presence and the like, sent after the logins, read here
    conns = [c for pair in zip(s_conns, r_conns, strict=True) for c in pair]
    for c in conns:
        c.transport.pause_reading()
    if any(c.buf for c in conns):
        raise SystemExit("loadgen: a connection holds part of a frame at the hand-over")
    fds = [os.dup(c.transport.get_extra_info("socket").fileno()) for c in conns]
    argv = [binary, str(args.rate), str(args.warmup), str(args.duration)]
    argv += [str(args.window), pad, str(len(s_conns))]
    for i in range(len(s_conns)):
        argv += [str(fds[2 * i]), str(fds[2 * i + 1]), to[i]]
    proc = subprocess.Popen(argv, pass_fds=fds, stdout=subprocess.PIPE, text=True)
    for fd in fds:
        os.close(fd)
    loop = asyncio.get_running_loop()
    assert proc.stdout is not None
    lines = []
    marks: dict[str, Any] = {}
    while True:
        line = (await loop.run_in_executor(None, proc.stdout.readline)).strip()
        if not line:
            break
        if line in ("W0", "W1"):
            marks[line] = (time.perf_counter(), cpu_sample(args.pid, proc.pid))
            if args.profile_signals and args.pid:
                os.kill(args.pid, signal.SIGUSR1 if line == "W0" else signal.SIGUSR2)
        else:
            lines.append(line)
    if proc.wait() != 0 or not lines or len(marks) != 2:
        raise SystemExit(f"loadgen: dmgen failed (exit status {proc.returncode})")
    delivered, acks, errors, behind, left, *ns = (int(x) for x in lines[-1].split())
    (t0, before), (t1, after) = marks["W0"], marks["W1"]
    elapsed = t1 - t0
    used = {k: after[k] - before[k] for k in before}
    st = {"delivered": delivered, "acks": acks, "errors": errors}
    p50, p90, p99, top = (x / 1e6 for x in ns)
    stats = window_stats(st, [], elapsed, {**used, "pid": bool(args.pid)}, (p50, p90, p99, top))
    for c in conns:
        c.close()
    await asyncio.sleep(0.2)
    return {
        "pairs": len(s_conns),
        "window": args.window,
        "rate": args.rate,
        "behind": behind,
        "body_bytes": len(f"{time.perf_counter_ns()} {pad}"),
        **stats,
        "drained": left <= 0,
        "generator": "dmgen.c",
    }


# ------------------------------------------------------------------------------------
# Group fan-out


async def run_fanout(args: argparse.Namespace) -> dict[str, Any]:
    """One sender pipelining ``window`` sends into a group of ``members`` receivers.

    The group has members + 1 users (the sender created it and is its owner); each
    receiver is its own user with one connection.  Every connection acks the highest
    ``pos`` once per read.
    """
    n = args.members
    prefix = f"f{os.getpid() % 100000}n{n}w{args.window}"
    sender = f"{prefix}s"
    members = [f"{prefix}m{i}" for i in range(n)]
    group = f"#{prefix}"
    t0 = time.perf_counter()
    await register_all(args.port, [sender, *members], concurrency=args.concurrency)
    t_reg = time.perf_counter() - t0
    s_conn = await login(args.port, sender)
    m_conns = await gather_bounded(
        [lambda u=u: login(args.port, u) for u in members], args.concurrency
    )
    t_login = time.perf_counter() - t0 - t_reg
    cache: dict[bytes, dict[str, Any]] = {}
    for c in m_conns:
        c.cache = cache
    created = await s_conn.request({"type": "create_group", "group": group})
    gaddr = created["group"]
    joins = await gather_bounded(
        [lambda c=c: c.request({"type": "join", "group": gaddr}) for c in m_conns],
        args.concurrency,
    )
    last_join = max(j["pos"] for j in joins)
    # Wait until every member has seen every join event (the set-up traffic is out).
    deadline = time.perf_counter() + 120
    while any(c.ack_pos < last_join for c in m_conns) and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    t_setup = time.perf_counter() - t0
    sender_id = f"{sender}@"

    pad = "x" * max(0, args.body - 20)
    st = {"measuring": False, "running": True, "delivered": 0, "acks": 0, "errors": 0, "echo": 0}
    lat: list[int] = []
    lat_append = lat.append
    inflight = [0]
    last_pos = [0]
    perf_ns = time.perf_counter_ns

    def on_result(r: dict[str, Any]) -> None:
        inflight[0] -= 1
        if r["type"] == "error":
            st["errors"] += 1
            if st["errors"] <= 5:
                print(f"loadgen: send error {r}", file=sys.stderr)
            if r.get("code") == "connection_lost":
                return
        else:
            if r["pos"] > last_pos[0]:
                last_pos[0] = r["pos"]
            if st["measuring"]:
                st["acks"] += 1
        if st["running"]:
            send()

    def send() -> None:
        inflight[0] += 1
        s_conn.call({"type": "send", "to": gaddr, "body": f"{perf_ns()} {pad}"}, on_result)

    def on_echo(m: dict[str, Any]) -> None:
        st["echo"] += 1

    def on_msg(m: dict[str, Any]) -> None:
        if st["measuring"] and m["kind"] == "text" and m["from"].startswith(sender_id):
            t = m.get("_t")
            if t is None:  # decoded once per item (shared cache), so parse once too
                t = m["_t"] = int(m["body"].split(" ", 1)[0])
            st["delivered"] += 1
            lat_append(perf_ns() - t)

    s_conn.on_msg = on_echo
    for c in m_conns:
        c.on_msg = on_msg
    for _ in range(args.window):
        send()

    elapsed, cpu = await measured_window(args, st)
    # Drain: sends in flight, then every member caught up with the last committed item.
    t_stop = time.perf_counter()
    deadline = t_stop + 60
    while inflight[0] > 0 and time.perf_counter() < deadline:
        await asyncio.sleep(0.02)
    while any(c.ack_pos < last_pos[0] for c in m_conns) and time.perf_counter() < deadline:
        await asyncio.sleep(0.02)
    drain_s = time.perf_counter() - t_stop
    drained = inflight[0] <= 0 and all(c.ack_pos >= last_pos[0] for c in m_conns)
    alive = sum(1 for c in m_conns if not c.lost.done())
    for c in [s_conn, *m_conns]:
        c.close()
    await asyncio.sleep(0.2)

    return {
        "members": n,
        "window": args.window,
        "body_bytes": len(f"{perf_ns()} {pad}"),
        **window_stats(st, lat, elapsed, cpu),
        "drained": drained,
        "drain_s": round(drain_s, 2),
        "members_alive_at_end": alive,
        "register_s": round(t_reg, 2),
        "login_s": round(t_login, 2),
        "setup_s": round(t_setup, 2),
    }


# ------------------------------------------------------------------------------------
# Idle connections: memory


def client_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def run_idle(args: argparse.Namespace) -> dict[str, Any]:
    tls = client_tls() if args.tls else None
    counts = sorted(int(x) for x in args.counts.split(","))
    nusers = args.users
    prefix = f"i{os.getpid() % 100000}{'t' if args.tls else 'p'}"
    users = [f"{prefix}u{i}" for i in range(nusers)]
    await register_all(args.port, users, tls=tls)

    conns: list[Conn] = []

    async def open_to(total: int) -> float:
        t0 = time.perf_counter()
        start = len(conns)
        new = await gather_bounded(
            [lambda i=i: login(args.port, users[i % nusers], tls) for i in range(start, total)],
            args.concurrency,
        )
        conns.extend(new)
        return time.perf_counter() - t0

    # Warm up: first TLS context use, first sessions, interned strings, etc.
    await open_to(min(args.warm, counts[0]))
    for c in conns:
        c.close()
    await asyncio.gather(*(asyncio.wait_for(c.lost, TIMEOUT) for c in conns))
    conns.clear()
    await asyncio.sleep(args.settle)
    base = rss_kib(args.pid)
    points = []
    for total in counts:
        took = await open_to(total)
        await asyncio.sleep(args.settle)
        rss = rss_kib(args.pid)
        points.append(
            {
                "conns": total,
                "rss_kib": rss,
                "delta_kib": rss - base,
                "kib_per_conn": round((rss - base) / total, 2),
                "logins_per_s": round((total - (points[-1]["conns"] if points else 0)) / took, 1),
            }
        )
    alive = sum(1 for c in conns if not c.lost.done())
    for c in conns:
        c.close()
    await asyncio.sleep(0.5)
    return {
        "tls": bool(args.tls),
        "users": nusers,
        "baseline_rss_kib": base,
        "points": points,
        "alive_at_end": alive,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    # options of every throughput measurement
    measured = argparse.ArgumentParser(add_help=False)
    measured.add_argument("--port", type=int, required=True)
    measured.add_argument("--pid", type=int, default=0)
    measured.add_argument("--duration", type=float, default=10.0)
    measured.add_argument("--warmup", type=float, default=1.0)
    measured.add_argument("--body", type=int, default=100)
    measured.add_argument(
        "--profile-signals",
        action="store_true",
        help="SIGUSR1/SIGUSR2 the realm (--pid) around the measurement window",
    )
    d = sub.add_parser("dm", parents=[measured])
    d.add_argument("--pairs", type=int, default=10)
    d.add_argument("--window", type=int, default=64)
    d.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="open loop: this many sends per second in all (window: the most in flight "
        "per sender); default 0: closed loop, each answer sends the next",
    )
    d.add_argument("--no-register", action="store_true")
    d.add_argument(
        "--lean",
        action="store_true",
        help="once logged in, read and write frames as bytes (no JSON decoding) and "
        "write the sends a read's results call for at once: a cheaper generator, for "
        "rates the JSON one cannot reach",
    )
    d.add_argument(
        "--cgen",
        action="store_true",
        help="once logged in, hand the connections to bench/dmgen.c (compiled with cc on "
        "first use): the lean generator's work for a fraction of its CPU",
    )
    f = sub.add_parser("fanout", parents=[measured])
    f.add_argument("--members", type=int, default=10)
    f.add_argument("--window", type=int, default=32)
    f.add_argument("--concurrency", type=int, default=64, help="concurrent registers/logins")
    i = sub.add_parser("idle")
    i.add_argument("--port", type=int, required=True)
    i.add_argument("--pid", type=int, required=True)
    i.add_argument("--counts", default="1000,5000")
    i.add_argument("--users", type=int, default=50)
    i.add_argument("--tls", action="store_true")
    i.add_argument("--concurrency", type=int, default=48)
    i.add_argument("--settle", type=float, default=1.5)
    i.add_argument(
        "--warm", type=int, default=20, help="connections opened and closed before the baseline"
    )
    args = p.parse_args()
    raise_fd_limit()
    fn = {"dm": run_dm, "fanout": run_fanout, "idle": run_idle}[args.cmd]
    result = asyncio.run(fn(args))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
