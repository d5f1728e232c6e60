"""IRC peers: chatproto's IRC gateway, twisted.words and ngircd on the same IRC load.

    python bench/irc.py                          # DMs and a 200-member channel, 2 repetitions
    python bench/irc.py --repeat 3 --pairs 50 --messages 2000
    python bench/irc.py --workloads dm --servers chatproto,words --synchronous NORMAL
    python bench/irc.py --profile /tmp/irc-prof  # cProfile chatproto's reactor thread

One load generator (this process: non-blocking sockets, ``selectors``, ``bytes.count``)
drives each server with two workloads:

- ``dm``: P pairs (``--pairs``, 50); sender u<2i> writes M (``--messages``, 2000)
  ``PRIVMSG u<2i+1> :<seq> <send-time-ns>`` lines to its partner, keeping at most
  ``--window`` (100) sent but not yet received by that partner;
- ``channel``: R members (``--members``, 200) and one sender join ``#bench``; the sender
  writes ``--channel-messages`` (2000) ``PRIVMSG #bench`` lines, at most
  ``--channel-window`` (500) in flight as seen by the first member (bench/irc_fanout.py's
  workload).

Per run: deliveries/s (delivered lines / (last delivery - first send)); p50/p99 latency
(for each read of each receiver, the age of the newest message in that read); the
server's CPU time during the run (all threads, and the main = reactor thread, from
``/proc/PID/task/*/schedstat``) divided by the lines delivered: ``us/msg``, the figure
that holds still on a busy machine; the load generator's CPU seconds; and ``other%``,
the CPU the rest of the machine used meanwhile (of one core).

Every run starts a fresh server: chatproto as ``twistd -n chatrealm`` with ``[irc]
enabled`` (``storage.synchronous = FULL`` by default, the realm default: each message is
committed durably before it is delivered; ``--synchronous NORMAL`` to compare);
twisted.words as ``twistd -n words --irc-port ... --auth memory:... --group bench`` (in
memory, no storage); ngircd (``/usr/sbin/ngircd``, Debian package) when installed.  The
order of the servers alternates between repetitions.  Ratios are chatproto/peer, taken
per repetition (the runs of one repetition are minutes apart at most) and reported as
their median: ``rate`` compares deliveries/s, ``CPU`` compares deliveries per server CPU
second (peer us/msg / chatproto us/msg).  Results go to ``bench/results/irc-latest.json``
(and a time-stamped copy).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import selectors
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from irc_fanout import (
    PASSWORD,
    BenchError,
    ChatprotoServer,
    Conn,
    CpuSample,
    NgircdServer,
    Server,
    cpu_used,
    free_port,
    interrupt_on_sigterm,
    kill_children,
    run_workload,
    spawn,
    system_busy_ns,
    wait_port,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
NAMES = {"chatproto": "chatproto", "words": "twisted.words", "ngircd": "ngircd"}


def log(msg: str) -> None:
    print(f"[irc {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class WordsServer(Server):
    """Twisted's own chat server: ``twistd -n words`` with an IRC port, nothing stored.

    Its accounts come from ``--auth memory:u0:PW:u1:PW...`` (the ``file:`` checker cannot
    log an IRC user in on Python 3: it compares the file's bytes with the str name);
    ``--group bench`` creates the channel (the realm creates no group on JOIN), through
    bench/twistd_wrapper.py ``--words-groups``, which fixes that option on Python 3.
    """

    name = "twisted.words"
    password = PASSWORD

    def __init__(self, tmp: Path, users: int, profile: str | None) -> None:
        self.port = free_port()
        self.log = tmp / "words.log"
        auth = "memory:" + ":".join(f"u{i}:{PASSWORD}" for i in range(users))
        wrapper = [sys.executable, str(HERE / "twistd_wrapper.py"), "--words-groups"]
        if profile:
            wrapper += ["--profile", profile, "--profile-signals"]
        cmd = [
            *wrapper,
            "--",
            "-n",
            "--pidfile=",
            f"--logfile={self.log}",
            "words",
            "--irc-port",
            f"tcp:{self.port}:interface=127.0.0.1",
            "--auth",
            auth,
            "--group",
            "bench",
            "--hostname",
            "bench.words",
        ]
        with open(tmp / "words.out", "wb") as out:
            self.proc = spawn(cmd, cwd=tmp, stdout=out, stderr=out)
        wait_port(self.port, self.proc, self.log)
        self.profiling = bool(profile)

    def profile(self, on: bool) -> None:
        if self.profiling:
            import signal

            os.kill(self.proc.pid, signal.SIGUSR1 if on else signal.SIGUSR2)


# the DM workload -------------------------------------------------------------------------


class Sender:
    def __init__(self, conn: Conn, partner: Conn) -> None:
        self.conn = conn
        self.partner = partner
        self.sent = 0
        self.pending = b""
        self.line = b"PRIVMSG " + partner.nick.encode() + b" :%d %d\r\n"


def read_lines(c: Conn, data: bytes, pattern: bytes) -> tuple[int, bytes | None]:
    """Count ``pattern`` in the complete lines of ``c.tail + data``; the newest one."""
    data = c.tail + data
    end = data.rfind(b"\n") + 1
    c.tail = data[end:]
    got = data.count(pattern, 0, end)
    if not got:
        return 0, None
    start = data.rfind(pattern, 0, end)
    return got, data[start + len(pattern) : data.index(b"\r", start)]


def run_dms(
    server: Server, pairs: int, messages: int, window: int, timeout: float
) -> dict[str, Any]:
    """P pairs, each sender keeping ``window`` PRIVMSGs in flight to its partner."""
    conns = [Conn(server.port, f"u{i}", server.password) for i in range(2 * pairs)]
    for c in conns:
        c.expect(b" 001 ")
    time.sleep(0.5)
    for c in conns:
        c.drain()  # non-blocking from here on
    senders = [Sender(conns[2 * i], conns[2 * i + 1]) for i in range(pairs)]
    patterns = {}
    sel = selectors.DefaultSelector()
    for s in senders:
        r = s.partner
        patterns[r] = b" PRIVMSG " + r.nick.encode() + b" :"
        sel.register(r.sock, selectors.EVENT_READ, r)
        sel.register(s.conn.sock, selectors.EVENT_READ, None)
    lat: list[float] = []
    done = 0
    cpu0 = CpuSample(server.proc.pid)
    sys0 = system_busy_ns()
    me0 = time.process_time()
    server.profile(True)
    t0 = time.perf_counter()
    last = t0
    deadline = time.monotonic() + timeout
    while done < pairs and time.monotonic() < deadline:
        blocked = False
        for s in senders:
            if not s.pending and s.sent < messages:
                room = window - (s.sent - s.partner.count)
                if room > 0:
                    k = min(room, messages - s.sent)
                    now = time.perf_counter_ns()
                    line = s.line
                    s.pending = b"".join([line % (s.sent + j, now) for j in range(k)])
                    s.sent += k
            if s.pending:
                try:
                    n = s.conn.sock.send(s.pending)
                    s.pending = s.pending[n:]
                except BlockingIOError:
                    pass
                blocked = blocked or bool(s.pending)
        for key, _ in sel.select(0.001 if blocked else 0.005):
            c = key.data
            if c is None:  # a sender: discard what it gets (numerics; no pings at 1 h)
                try:
                    key.fileobj.recv(1 << 16)  # type: ignore[union-attr]
                except BlockingIOError:
                    pass
                continue
            try:
                data = c.sock.recv(1 << 20)
            except BlockingIOError:
                continue
            if not data:
                raise BenchError(f"{server.name}: {c.nick} was disconnected after {c.count} DMs")
            now_ns = time.perf_counter_ns()
            got, newest = read_lines(c, data, patterns[c])
            if got:
                before = c.count
                c.count += got
                assert newest is not None
                lat.append((now_ns - int(newest.split()[1])) / 1e6)
                if before < messages <= c.count:
                    done += 1
                    last = time.perf_counter()
    server.profile(False)
    elapsed = last - t0
    cpu, cpu_main = cpu_used(cpu0, CpuSample(server.proc.pid))
    system = system_busy_ns() - sys0
    me = time.process_time() - me0
    wall = time.perf_counter() - t0
    total = sum(min(s.partner.count, messages) for s in senders)
    for c in conns:
        c.sock.close()
    sel.close()
    lat.sort()

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")

    return {
        "pairs": pairs,
        "messages": messages,
        "window": window,
        "complete": done == pairs,
        "deliveries": total,
        "seconds": round(elapsed, 3),
        "deliveries_per_s": round(total / elapsed) if elapsed > 0 else 0,
        "p50_ms": round(pct(0.50), 2),
        "p99_ms": round(pct(0.99), 2),
        "server_cpu_s": round(cpu, 3),
        "server_main_thread_cpu_s": round(cpu_main, 3),
        "deliveries_per_cpu_s": round(total / cpu) if cpu > 0 else 0,
        "server_us_per_delivery": round(cpu * 1e6 / total, 2) if total else None,
        "main_thread_us_per_delivery": round(cpu_main * 1e6 / total, 2) if total else None,
        "loadgen_cpu_s": round(me, 2),
        "other_cpu_pct": round(100 * (system / 1e9 - cpu - me) / wall, 1) if wall > 0 else None,
    }


# orchestration ---------------------------------------------------------------------------


def start(key: str, tmp: Path, users: int, args: argparse.Namespace, profile: str | None) -> Server:
    if key == "chatproto":
        return ChatprotoServer(tmp, users, profile, synchronous=args.synchronous)
    if key == "words":
        return WordsServer(tmp, users, None)
    return NgircdServer(tmp, args.ngircd)


def one_run(key: str, workload: str, rep: int, args: argparse.Namespace) -> dict[str, Any]:
    profile = None
    if args.profile and key == "chatproto":
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        profile = str(Path(args.profile) / f"chatproto-{workload}-{rep}.prof")
    users = 2 * args.pairs if workload == "dm" else args.members + 1
    with tempfile.TemporaryDirectory(prefix="irc-bench-") as tmp:
        server = start(key, Path(tmp), users, args, profile)
        try:
            if workload == "dm":
                r = run_dms(server, args.pairs, args.messages, args.window, args.timeout)
            else:
                r = run_workload(
                    server,
                    args.members,
                    args.channel_messages,
                    args.channel_window,
                    args.timeout,
                )
                r.pop("server", None)
        finally:
            server.stop()
    r = {"server": NAMES[key], "workload": workload, "rep": rep, **r}
    r["load_avg_1m"] = round(os.getloadavg()[0], 2)
    if profile:
        r["profile"] = profile
    return r


COLS = (
    f"  {'rep':<4}{'server':<15}{'msgs/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'seconds':>9}"
    f"{'CPU s':>8}{'us/msg':>8}{'reactor us/msg':>15}{'lg CPU s':>9}{'other%':>8}  complete"
)


def row(r: dict[str, Any]) -> str:
    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    return (
        f"  {r['rep']:<4}{r['server']:<15}{r['deliveries_per_s']:>10,}{r['p50_ms']:>9.1f}"
        f"{r['p99_ms']:>9.1f}{r['seconds']:>9.2f}{r['server_cpu_s']:>8.2f}"
        f"{f(r['server_us_per_delivery'], '.2f'):>8}"
        f"{f(r['main_thread_us_per_delivery'], '.2f'):>15}{r['loadgen_cpu_s']:>9.2f}"
        f"{f(r.get('other_cpu_pct'), '.0f'):>8}  {r['complete']}"
    )


def summarize(runs: list[dict[str, Any]], workload: str) -> dict[str, Any]:
    """Medians per server, and chatproto/peer ratios per repetition (and their median)."""
    mine = [r for r in runs if r["workload"] == workload and "error" not in r]
    out: dict[str, Any] = {"servers": {}, "ratios": {}}
    for name in NAMES.values():
        rs = [r for r in mine if r["server"] == name]
        if not rs:
            continue
        out["servers"][name] = {
            k: round(statistics.median(r[k] for r in rs), 2)
            for k in (
                "deliveries_per_s",
                "p50_ms",
                "p99_ms",
                "server_us_per_delivery",
                "main_thread_us_per_delivery",
            )
        }
    for peer in ("twisted.words", "ngircd"):
        rate, cpu = [], []
        for rep in sorted({r["rep"] for r in mine}):
            c = [r for r in mine if r["rep"] == rep and r["server"] == "chatproto"]
            p = [r for r in mine if r["rep"] == rep and r["server"] == peer]
            if c and p and p[0]["deliveries_per_s"] and c[0]["server_us_per_delivery"]:
                rate.append(c[0]["deliveries_per_s"] / p[0]["deliveries_per_s"])
                cpu.append(p[0]["server_us_per_delivery"] / c[0]["server_us_per_delivery"])
        if rate:
            out["ratios"][f"chatproto/{peer}"] = {
                "rate": round(statistics.median(rate), 3),
                "rate_per_rep": [round(x, 3) for x in rate],
                "cpu": round(statistics.median(cpu), 3),
                "cpu_per_rep": [round(x, 3) for x in cpu],
            }
    return out


def report(runs: list[dict[str, Any]], args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    lines: list[str] = []
    summary: dict[str, Any] = {}
    titles = {
        "dm": f"IRC DMs: {args.pairs} pairs x {args.messages} PRIVMSGs, window {args.window} "
        "per sender",
        "channel": f"IRC channel: {args.members} members, {args.channel_messages} PRIVMSGs, "
        f"window {args.channel_window}",
    }
    for workload in args.workloads:
        rs = [r for r in runs if r["workload"] == workload]
        if not rs:
            continue
        lines.append("")
        lines.append(
            f"{titles[workload]} (chatproto storage.synchronous = {args.synchronous}; "
            "msgs/s = lines delivered per second; us/msg = server CPU per delivered line)"
        )
        lines.append(COLS)
        for r in rs:
            if "error" in r:
                lines.append(f"  {r['rep']:<4}{r['server']:<15}failed: {r['error'][:200]}")
            else:
                lines.append(row(r))
        s = summary[workload] = summarize(runs, workload)
        for name, m in s["servers"].items():
            lines.append(
                f"  {'med':<4}{name:<15}{m['deliveries_per_s']:>10,.0f}{m['p50_ms']:>9.1f}"
                f"{m['p99_ms']:>9.1f}{'':>17}{m['server_us_per_delivery']:>8.2f}"
                f"{m['main_thread_us_per_delivery']:>15.2f}"
            )
        for pair, q in s["ratios"].items():
            lines.append(
                f"  ratio {pair}: {q['rate']:.2f}x msgs/s (per repetition "
                f"{', '.join(f'{x:.2f}' for x in q['rate_per_rep'])}), "
                f"{q['cpu']:.2f}x msgs per server CPU second "
                f"({', '.join(f'{x:.2f}' for x in q['cpu_per_rep'])})"
            )
    return "\n".join(lines), summary


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--servers", default="chatproto,words,ngircd", help="default: all three")
    ap.add_argument("--workloads", default="dm,channel", help="dm, channel or both (default)")
    ap.add_argument("--repeat", type=int, default=2, help="repetitions (default 2)")
    ap.add_argument("--pairs", type=int, default=50, help="DM pairs (default 50)")
    ap.add_argument("--messages", type=int, default=2000, help="DMs per sender (default 2000)")
    ap.add_argument("--window", type=int, default=100, help="DMs in flight per sender (100)")
    ap.add_argument("--members", type=int, default=200, help="channel members (default 200)")
    ap.add_argument(
        "--channel-messages", type=int, default=2000, help="channel PRIVMSGs (default 2000)"
    )
    ap.add_argument(
        "--channel-window", type=int, default=500, help="channel PRIVMSGs in flight (500)"
    )
    ap.add_argument(
        "--synchronous",
        default="FULL",
        choices=("FULL", "NORMAL"),
        help="chatproto storage.synchronous (default FULL, the realm default)",
    )
    ap.add_argument("--ngircd", default=shutil.which("ngircd") or "/usr/sbin/ngircd")
    ap.add_argument("--timeout", type=float, default=120, help="seconds per run at most (120)")
    ap.add_argument(
        "--profile", metavar="DIR", help="cProfile chatproto's reactor thread, one file per run"
    )
    ap.add_argument("--json", help="results file (default bench/results/irc-latest.json)")
    args = ap.parse_args()
    keys = [k.strip() for k in args.servers.split(",") if k.strip()]
    bad = [k for k in keys if k not in NAMES]
    if bad or not keys:
        sys.exit(f"irc: --servers takes chatproto, words, ngircd (got {args.servers!r})")
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not args.workloads or any(w not in ("dm", "channel") for w in args.workloads):
        sys.exit("irc: --workloads takes dm, channel or dm,channel")
    if args.repeat < 1 or args.pairs < 1 or args.messages < 1 or args.members < 1:
        sys.exit("irc: --repeat, --pairs, --messages and --members must be at least 1")
    if "ngircd" in keys and not os.access(args.ngircd, os.X_OK):
        log(f"ngircd not found at {args.ngircd} (apt-get install ngircd): skipping it")
        keys.remove("ngircd")
    interrupt_on_sigterm()
    runs: list[dict[str, Any]] = []
    log(
        f"servers {', '.join(NAMES[k] for k in keys)}; chatproto storage.synchronous = "
        f"{args.synchronous}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    )
    try:
        for rep in range(1, args.repeat + 1):
            order = keys if rep % 2 else keys[::-1]
            for workload in args.workloads:
                for key in order:
                    try:
                        r = one_run(key, workload, rep, args)
                    except (BenchError, OSError) as e:
                        kill_children()
                        r = {"server": NAMES[key], "workload": workload, "rep": rep}
                        r["error"] = f"{type(e).__name__}: {e}"
                        log(f"rep {rep} {workload} {NAMES[key]}: FAILED {r['error'][:500]}")
                    else:
                        log(
                            f"rep {rep} {workload} {r['server']}: "
                            f"{r['deliveries_per_s']:,} msgs/s, "
                            f"{r['server_us_per_delivery']} us/msg, p99 {r['p99_ms']} ms, "
                            f"complete {r['complete']}, load {r['load_avg_1m']}"
                        )
                    runs.append(r)
    except KeyboardInterrupt:
        kill_children()
        sys.exit("irc: interrupted; servers killed")
    finally:
        kill_children()
    text, summary = report(runs, args)
    print(text)
    out = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "settings": {
            k: getattr(args, k)
            for k in (
                "servers",
                "workloads",
                "repeat",
                "pairs",
                "messages",
                "window",
                "members",
                "channel_messages",
                "channel_window",
                "synchronous",
                "timeout",
            )
        },
        "runs": runs,
        "summary": summary,
    }
    RESULTS.mkdir(exist_ok=True)
    path = Path(args.json) if args.json else RESULTS / "irc-latest.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    if not args.json:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        (RESULTS / f"irc-{stamp}.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
