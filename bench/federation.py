#!/usr/bin/env python
"""Benchmark federation: DMs from users on realm A to users on realm B, durable on both.

    python bench/federation.py [--pairs 10] [--window 64] [--duration 10] [--rate 0]
                               [--synchronous FULL] [--keep] [--profile]

Starts two ``twistd -n chatrealm`` subprocesses, ``a.example`` and ``b.example``, with
federation on (mutual TLS on loopback, certificates from ``chatproto.tls``, each a
static peer of the other, SQLite ``synchronous = FULL`` by default on both), then in
this process (asyncio, bench/loadgen.py's client) logs in ``pairs`` senders on A and
``pairs`` receivers on B.  Each sender keeps ``window`` sends in flight to its partner
on B (or, with ``--rate R``, sends R messages/s in total, spread over the senders).
After a 2 s warm-up it counts, for ``duration`` seconds:

- ``delivered/s``: messages received by the recipients on B;
- ``sends/s``: send results on A (the message and its outbox row are committed on A);
- latency p50/p90/p99/max: from the send (timestamp in the body) to its delivery to
  the recipient's connection on B -- through A's commit, A's outbox read, the
  federation transaction, B's commit, and B's routing;
- CPU% of each realm process (and of its reactor thread alone), of this process and
  of everything else on the machine (``other``: should be ~0), each process's CPU
  microseconds per delivered message, and the outbox backlog on A at the end.

Saturated runs (no ``--rate``) measure throughput: the backlog grows when A accepts
faster than the link delivers, and latency then measures queueing.  ``--rate`` below
the saturated figure measures latency at that load.  Figures are printed and written
to bench/results/federation.json.  ``--profile`` runs both realms under
bench/twistd_wrapper.py and cProfiles their reactor threads during the window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from loadgen import (  # noqa: E402
    cpu_seconds,
    gather_bounded,
    login,
    percentile,
    raise_fd_limit,
    register_all,
    system_busy_seconds,
)

from chatproto import tls  # noqa: E402

PY = sys.executable
CONFIG = """\
[realm]
name = "{name}"
data_dir = "{data}"
listen = ["tcp:0:interface=127.0.0.1"]
[auth]
argon2_time_cost = 1
registrations_per_address = 0
argon2_memory_cost = 1024
argon2_parallelism = 1
[limits]
send_rate = 1000000000.0
send_burst = 1000000000
keepalive_interval = 3600.0
[storage]
synchronous = "{synchronous}"
[federation]
enabled = true
port = {fed_port}
certificate = "{cert}"
private_key = "{key}"
ca = "{ca}"
retry_initial = 0.2
retry_max = 2.0
batch_size = {batch}
window = {fed_window}
[[federation.peers]]
realm = "{peer}"
endpoint = "127.0.0.1:{peer_port}"
"""

_children: list[subprocess.Popen[Any]] = []


def log(msg: str) -> None:
    print(f"[bench-fed {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def twistd() -> str:
    cand = Path(PY).parent / "twistd"
    return str(cand) if cand.exists() else shutil.which("twistd") or "twistd"


class Realm:
    def __init__(self, work: Path, name: str) -> None:
        self.name = name
        self.dir = work / name
        self.dir.mkdir(parents=True)
        self.fed_port = free_port()
        self.port = 0
        self.proc: subprocess.Popen[Any] | None = None
        self.prof: Path | None = None

    def start(self, args: argparse.Namespace, peer: Realm, certs: Path) -> None:
        paths = tls.write_dev_certs(str(certs), self.name)
        conf = self.dir / "realm.toml"
        conf.write_text(
            CONFIG.format(
                name=self.name,
                data=self.dir / "data",
                synchronous=args.synchronous,
                fed_port=self.fed_port,
                cert=paths["cert"],
                key=paths["key"],
                ca=paths["ca"],
                batch=args.batch_size,
                fed_window=args.fed_window,
                peer=peer.name,
                peer_port=peer.fed_port,
            )
        )
        logfile = self.dir / "twistd.log"
        cmd = [PY, twistd(), "-n", "--pidfile=", f"--logfile={logfile}", "chatrealm"]
        if args.profile:  # cProfile the reactor thread, on between SIGUSR1 and SIGUSR2
            self.prof = self.dir / "realm.prof"
            wrapper = [PY, str(HERE / "twistd_wrapper.py"), "--profile", str(self.prof)]
            cmd = [*wrapper, "--profile-signals", "--", *cmd[2:]]
        self.proc = subprocess.Popen(
            [*cmd, "--config", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "stderr.log", "wb"),
            start_new_session=True,
            cwd=self.dir,
        )
        _children.append(self.proc)
        deadline = time.monotonic() + 30
        import re

        pat = re.compile(rf"chatrealm {self.name} listening on [\d.]+:(\d+) ")
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited:\n{logfile.read_text()[-4000:]}")
            text = logfile.read_text(errors="replace") if logfile.exists() else ""
            m = pat.search(text)
            if m and "federation for" in text:
                self.port = int(m.group(1))
                return
            time.sleep(0.05)
        raise SystemExit(f"{self.name} did not start:\n{logfile.read_text()[-4000:]}")

    def outbox(self) -> int:
        db = sqlite3.connect(self.dir / "data" / "realm.sqlite3")
        try:
            return int(db.execute("SELECT count(*) FROM outbox").fetchone()[0])
        finally:
            db.close()

    def stop(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)


def kill_children() -> None:
    for p in _children:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


async def run(args: argparse.Namespace, a: Realm, b: Realm) -> dict[str, Any]:
    n = args.pairs
    senders = [f"s{i}" for i in range(n)]
    receivers = [f"r{i}" for i in range(n)]
    dest = a if args.local else b  # --local: the same load without federation
    await register_all(a.port, senders)
    await register_all(dest.port, receivers)
    s_conns = await gather_bounded([lambda u=u: login(a.port, u) for u in senders], 16)
    r_conns = await gather_bounded([lambda u=u: login(dest.port, u) for u in receivers], 16)
    pad = "x" * max(0, args.body - 20)
    perf_ns = time.perf_counter_ns
    st: dict[str, Any] = {"measuring": False, "running": True, "delivered": 0, "acks": 0}
    st["errors"] = 0
    lat: list[int] = []

    def on_msg(m: dict[str, Any]) -> None:
        if st["measuring"] and m["from"].startswith("s"):
            st["delivered"] += 1
            lat.append(perf_ns() - int(m["body"].split(" ", 1)[0]))

    for c in r_conns:
        c.on_msg = on_msg

    def send(c: Any, to: str, again: bool) -> None:
        def on_result(r: dict[str, Any]) -> None:
            if r["type"] == "error":
                st["errors"] += 1
            elif st["measuring"]:
                st["acks"] += 1
            if again and st["running"]:
                send(c, to, True)

        c.call({"type": "send", "to": to, "body": f"{perf_ns()} {pad}"}, on_result)

    for c in s_conns:
        c.on_msg = None
    pacer = None
    if args.rate:
        interval = 0.01

        async def pace() -> None:
            owed = 0.0
            i = 0
            last = time.perf_counter()
            while st["running"]:
                now = time.perf_counter()  # by the clock: a late tick sends more
                owed += args.rate * (now - last)
                last = now
                while owed >= 1:
                    owed -= 1
                    send(s_conns[i % n], f"r{i % n}@{dest.name}", False)
                    i += 1
                await asyncio.sleep(interval)

        pacer = asyncio.ensure_future(pace())
    else:
        for i, c in enumerate(s_conns):
            for _ in range(args.window):
                send(c, f"r{i}@{dest.name}", True)

    await asyncio.sleep(args.warmup)
    cpu0 = cpu_sample(a, b)
    profiled = [r.proc.pid for r in (a, b) if r.prof is not None and r.proc is not None]
    for pid in profiled:
        os.kill(pid, signal.SIGUSR1)
    t0 = time.perf_counter()
    st["measuring"] = True
    await asyncio.sleep(args.duration)
    st["measuring"] = False
    elapsed = time.perf_counter() - t0
    for pid in profiled:
        os.kill(pid, signal.SIGUSR2)
    cpu1 = cpu_sample(a, b)
    st["running"] = False
    if pacer is not None:
        await pacer
    backlog = a.outbox()
    await asyncio.sleep(0.5)
    for c in s_conns + r_conns:
        c.close()
    lat.sort()
    ms = [x / 1e6 for x in lat]
    return {
        "pairs": n,
        "federated": not args.local,
        "window": None if args.rate else args.window,
        "offered_rate": args.rate or None,
        "synchronous": args.synchronous,
        "batch_size": args.batch_size,
        "fed_window": args.fed_window,
        "duration_s": round(elapsed, 2),
        "delivered_per_s": round(st["delivered"] / elapsed, 1),
        "sends_per_s": round(st["acks"] / elapsed, 1),
        "latency_ms_p50": round(percentile(ms, 50) or 0, 2),
        "latency_ms_p90": round(percentile(ms, 90) or 0, 2),
        "latency_ms_p99": round(percentile(ms, 99) or 0, 2),
        "latency_ms_max": round(ms[-1], 2) if ms else 0,
        "send_errors": st["errors"],
        "outbox_backlog_at_end": backlog,
        **cpu_figures(cpu0, cpu1, elapsed, st["delivered"]),
    }


LG = "bench (load generator)"


def save_profile(prof: Path, stem: str, top: int = 30) -> None:
    """Copy a realm's profile to bench/results/STEM.prof and write its top functions
    (by cumulative and by own time) to STEM.txt."""
    import io
    import pstats

    out = HERE / "results"
    out.mkdir(exist_ok=True)
    shutil.copy(prof, out / f"{stem}.prof")
    buf = io.StringIO()
    stats = pstats.Stats(str(prof), stream=buf).strip_dirs()
    for key in ("cumulative", "tottime"):
        buf.write(f"\n===== top {top} by {key} =====\n")
        stats.sort_stats(key).print_stats(top)
    (out / f"{stem}.txt").write_text(buf.getvalue())
    log(f"profile: {out / stem}.txt")


def cpu_sample(a: Realm, b: Realm) -> dict[str, float]:
    """CPU seconds so far: each realm (all threads, and its reactor thread alone), this
    process, and the whole machine."""
    out: dict[str, float] = {}
    for r in (a, b):
        if r.proc is not None:
            out[r.name] = cpu_seconds(r.proc.pid)
            out[f"{r.name} reactor"] = cpu_seconds(r.proc.pid, r.proc.pid)
    out[LG] = time.process_time()
    out["system"] = system_busy_seconds()
    return out


def cpu_figures(
    cpu0: dict[str, float], cpu1: dict[str, float], elapsed: float, delivered: int
) -> dict[str, Any]:
    """CPU% of each process over the window (the realms' reactor threads apart), the
    CPU% of everything else on the machine (should be ~0: other load skews every
    figure), and each process's CPU microseconds per delivered message (steadier
    than msgs/s on a shared machine)."""
    used = {k: cpu1[k] - cpu0[k] for k in cpu0}
    procs = [k for k in used if k != "system" and not k.endswith(" reactor")]
    return {
        "cpu_pct": {k: round(100 * used[k] / elapsed, 1) for k in used if k != "system"},
        "other_cpu_pct": round(100 * (used["system"] - sum(used[k] for k in procs)) / elapsed, 1),
        "cpu_us_per_msg": {
            k: round(1e6 * used[k] / delivered, 1) if delivered else None for k in procs
        },
    }


def summary(r: dict[str, Any]) -> str:
    cpu = r["cpu_pct"]
    per = r["cpu_us_per_msg"]
    realms = ", ".join(
        f"{k} {cpu[k]}% (reactor {cpu.get(k + ' reactor', '-')}%, {per[k]} us/msg)"
        for k in per
        if k != LG
    )
    return (
        f"delivered {r['delivered_per_s']:,.0f} msgs/s, sends {r['sends_per_s']:,.0f}/s, "
        f"p50 {r['latency_ms_p50']} ms, p99 {r['latency_ms_p99']} ms; CPU: {realms}; "
        f"load generator {cpu[LG]}% ({per[LG]} us/msg); other {r['other_cpu_pct']}%; "
        f"outbox backlog {r['outbox_backlog_at_end']}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=10)
    p.add_argument("--window", type=int, default=64, help="sends in flight per sender")
    p.add_argument("--rate", type=float, default=0.0, help="fixed total send rate (msgs/s)")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--body", type=int, default=100)
    p.add_argument("--synchronous", default="FULL", choices=["FULL", "NORMAL"])
    p.add_argument("--batch-size", type=int, default=500, help="[federation] batch_size")
    p.add_argument("--fed-window", type=int, default=4, help="[federation] window")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, databases)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="cProfile both realms' reactor threads during the window (halves throughput); "
        "bench/results/federation-{a,b}.prof and .txt",
    )
    p.add_argument("--local", action="store_true", help="receivers on realm A too: the baseline")
    args = p.parse_args()
    raise_fd_limit()
    work = Path(tempfile.mkdtemp(prefix="chatproto-bench-fed-"))
    a, b = Realm(work, "a.example"), Realm(work, "b.example")
    try:
        a.start(args, b, work / "certs")
        b.start(args, a, work / "certs")
        log(f"realms up: a.example :{a.port}, b.example :{b.port}; measuring {args.duration}s")
        result = asyncio.run(run(args, a, b))
    finally:
        a.stop()
        b.stop()
        kill_children()
        for r in (a, b):
            if r.prof is not None and r.prof.exists():
                save_profile(r.prof, f"federation-{r.name.split('.')[0]}")
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "federation.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    log(summary(result))
    if result["other_cpu_pct"] > 15:
        log(
            f"WARNING: {result['other_cpu_pct']}% CPU used by other processes during the "
            "measurement: the figures are low; re-run on a quiet machine"
        )


if __name__ == "__main__":
    main()
