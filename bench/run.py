#!/usr/bin/env python
# ruff: noqa: E501
"""Benchmark a chatproto realm over loopback: one command, figures at the end.

    python bench/run.py [--quick] [--profile [dm|fanout|both]] [--fanout 10,100,1000]
                        [--skip-memory] [--skip-tls] [--skip-ref] [--postgresql DSN]
                        [--gc-thresholds GEN0,GEN1,GEN2|python] [--no-gc-freeze]

Starts ``twistd -n chatrealm`` as a subprocess on a temporary data dir (cheap argon2,
no send throttling; the garbage collector as ``[performance]`` sets it, its defaults
unless ``--gc-thresholds`` or ``--no-gc-freeze`` say otherwise), drives it with bench/loadgen.py in a separate process, and prints:

- DM throughput with N pipelined sender->receiver pairs (delivered DMs/s, send
  results/s, send->deliver latency p50/p99, realm CPU%);
- unloaded latency (1 pair, 1 message in flight);
- with --postgresql DSN, both again on a realm on PostgreSQL (SQLite vs PostgreSQL);
- group fan-out: one sender pipelining sends into a group of 10, 100, 1000 connected
  members (delivered msgs/s, sends/s, send->deliver latency p50/p99);
- RSS per idle logged-in connection at 1k and 5k connections, plain TCP and TLS;
- a reference point: the same load against bench/refserver.py, a minimal Twisted relay
  with the same wire format but no store, auth or realm logic;
- with --profile, a cProfile of the realm's reactor thread during a DM throughput run
  and/or a fan-out run at the largest group size.

Figures go to bench/results/latest.json.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LOADGEN = HERE / "loadgen.py"
#: ``--lean-loadgen``: the DM runs' load generator reads and writes bytes (loadgen.py --lean)
LEAN_LOADGEN = False
REFSERVER = HERE / "refserver.py"
PY = sys.executable

_children: list[subprocess.Popen[Any]] = []


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


from loadgen import raise_fd_limit  # noqa: E402  (bench/ is on sys.path when run)


def twistd_path() -> str:
    cand = Path(PY).parent / "twistd"
    if cand.exists():
        return str(cand)
    found = shutil.which("twistd")
    if not found:
        sys.exit("bench: cannot find the twistd script (is Twisted installed in this Python?)")
    return found


def kill_children() -> None:
    for p in list(_children):
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        _children.remove(p)


def drop_schema(dsn: str, schema: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def make_cert(directory: Path) -> tuple[Path, Path]:
    """A development CA and a certificate for localhost (chatproto.tls); (key, cert)."""
    from chatproto.tls import write_dev_certs

    paths = write_dev_certs(str(directory / "tls"), "localhost")
    return Path(paths["key"]), Path(paths["cert"])


CONFIG = """\
[realm]
name = "localhost"
data_dir = "{data_dir}"

[auth]
argon2_time_cost = 1
registrations_per_address = 0
argon2_memory_cost = 1024
argon2_parallelism = 1
free_failures_per_address = 1000000

[limits]
send_rate = 1000000000.0
send_burst = 1000000000
max_sessions_per_user = 1000000
max_members_per_group = 1000000  # fan-out groups; each bench user is in one group
keepalive_interval = 3600.0
login_timeout = 120.0
max_unauthenticated = 0  # no bound: the loadgen opens 48-64 connections at once
max_unauthenticated_per_address = 0

[storage]
synchronous = "{synchronous}"
"""


class Server:
    """A realm (or the reference relay) subprocess; always killed on exit."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        *,
        tls: tuple[Path, Path] | None = None,
        profile: Path | None = None,
        ref: bool = False,
        synchronous: str = "FULL",
        switchinterval: float | None = None,
        storage: str = "",
        performance: str = "",
    ) -> None:
        self.switchinterval = switchinterval
        self.performance = performance  # a [performance] section ("": the defaults)
        self.storage = storage  # more [storage] lines (PostgreSQL: backend, dsn, schema)
        self.dir = workdir / name
        self.dir.mkdir(parents=True)
        self.logfile = self.dir / "twistd.log"
        self.tls = tls
        self.profile = profile
        self.ref = ref
        self.synchronous = synchronous
        self.proc: subprocess.Popen[Any] | None = None
        self.ports: dict[str, int] = {}

    def start(self, timeout: float = 30.0) -> None:
        if self.ref:
            cmd = [PY, str(REFSERVER), "--logfile", str(self.logfile)]
        else:
            cfg = self.dir / "realm.toml"
            cfg.write_text(
                CONFIG.format(data_dir=self.dir / "data", synchronous=self.synchronous)
                + self.storage
                + self.performance
            )
            listen = ["--listen", "tcp:0:interface=127.0.0.1"]
            if self.tls:
                k, c = self.tls
                listen += ["--listen", f"ssl:0:interface=127.0.0.1:privateKey={k}:certKey={c}"]
            if self.profile or self.switchinterval:
                prefix = [PY, str(HERE / "twistd_wrapper.py")]
                if self.profile:
                    prefix += ["--profile", str(self.profile), "--profile-signals"]
                if self.switchinterval:
                    prefix += ["--switchinterval", str(self.switchinterval)]
                prefix.append("--")
            else:
                prefix = [PY, twistd_path()]
            cmd = [
                *prefix,
                "-n",
                "--pidfile=",
                f"--logfile={self.logfile}",
                "chatrealm",
                "--config",
                str(cfg),
                *listen,
            ]
        out = open(self.dir / "stdout.log", "wb")
        self.proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=self.dir,
        )
        _children.append(self.proc)
        want = 2 if self.tls else 1
        deadline = time.monotonic() + timeout
        pat = re.compile(r"listening on [\d.]+:(\d+) \((\w+):")
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.fail(f"exited with status {self.proc.returncode} during start-up")
            text = self.logfile.read_text(errors="replace") if self.logfile.exists() else ""
            self.ports = {kind: int(port) for port, kind in pat.findall(text)}
            if len(self.ports) >= want:
                return
            time.sleep(0.05)
        self.fail(f"did not listen within {timeout:.0f}s")

    def fail(self, why: str) -> None:
        self.stop()
        msg = [
            f"bench: {'reference relay' if self.ref else 'realm'} {why}. Command: {self.proc.args if self.proc else '?'}"
        ]
        for f in (self.logfile, self.dir / "stdout.log"):
            if f.exists() and f.stat().st_size:
                msg.append(f"---- {f} ----\n{f.read_text(errors='replace')[-6000:]}")
        raise SystemExit("\n".join(msg))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 20.0) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        try:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"server {p.pid} did not stop in {timeout}s; killing it")
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)
        if p in _children:
            _children.remove(p)


def loadgen(*args: Any, timeout: float) -> dict[str, Any]:
    cmd = [PY, str(LOADGEN), *map(str, args)]
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    _children.append(p)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise SystemExit(
            f"bench: load generator timed out after {timeout}s: {cmd}\n{err[-4000:]}"
        ) from None
    finally:
        if p in _children:
            _children.remove(p)
    if err.strip():
        sys.stderr.write("".join(f"  loadgen: {line}\n" for line in err.strip().splitlines()[-20:]))
    if p.returncode != 0:
        raise SystemExit(f"bench: load generator failed ({p.returncode}): {cmd}\n{err[-4000:]}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    other = result.get("other_cpu_pct")
    if other is not None and other > 15:
        log(
            f"WARNING: {other}% CPU used by other processes during this measurement: "
            "the machine is not quiet, figures are low"
        )
    return result


def add_us_per_msg(r: dict[str, Any]) -> dict[str, Any]:
    """Server CPU per delivered message (us): all threads, and the reactor thread alone.

    CPU% of one core over the window, times the window, over the messages delivered in
    it: less sensitive than msgs/s to what else runs on the machine.
    """
    n, secs = r.get("delivered"), r.get("duration_s")
    for pct, key in (
        ("realm_cpu_pct", "realm_us_per_msg"),
        ("realm_main_thread_cpu_pct", "reactor_us_per_msg"),
    ):
        v = r.get(pct)
        r[key] = round(v * secs * 1e4 / n, 2) if n and secs and v is not None else None
    return r


def dm(
    server: Server,
    pairs: int,
    duration: float,
    window: int = 64,
    warmup: float = 1.0,
    rate: float = 0.0,
) -> dict[str, Any]:
    r = loadgen(
        "dm",
        "--port",
        server.ports["tcp"],
        "--pid",
        server.pid,
        "--pairs",
        pairs,
        "--window",
        window,
        "--duration",
        duration,
        "--warmup",
        warmup,
        "--rate",
        rate,
        *(["--profile-signals"] if server.profile else []),
        *(["--lean"] if LEAN_LOADGEN else []),
        timeout=duration + warmup + 180,
    )
    add_us_per_msg(r)
    paced = f" paced at {rate:.0f}/s (behind {r['behind']})" if rate else ""
    log(
        f"  pairs={pairs} window={window}{paced}: {r['delivered_per_s']:.0f} DMs/s, "
        f"p50 {r['latency_ms_p50']} ms, p99 {r['latency_ms_p99']} ms, realm CPU {r['realm_cpu_pct']}% "
        f"(reactor thread {r['realm_main_thread_cpu_pct']}%), {r['realm_us_per_msg']} us/msg "
        f"(reactor {r['reactor_us_per_msg']}), "
        f"loadgen CPU {r['loadgen_cpu_pct']}%, other CPU {r['other_cpu_pct']}%, errors {r['send_errors']}"
    )
    return r


def paced_rates(spec: str, top: float) -> list[float]:
    """The rates of ``--rates``: numbers, or ``half`` (of ``top``, the closed-loop
    DMs/s)."""
    rates = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        rates.append(top / 2 if item == "half" else float(item))
    return [r for r in rates if r > 0]


def fanout(
    server: Server, members: int, duration: float, window: int = 32, warmup: float = 1.0
) -> dict[str, Any]:
    r = loadgen(
        "fanout",
        "--port",
        server.ports["tcp"],
        "--pid",
        server.pid,
        "--members",
        members,
        "--window",
        window,
        "--duration",
        duration,
        "--warmup",
        warmup,
        *(["--profile-signals"] if server.profile else []),
        timeout=duration + warmup + 600,
    )
    add_us_per_msg(r)
    log(
        f"  members={members} window={window}: {r['delivered_per_s']:.0f} msgs/s delivered, "
        f"{r['send_acks_per_s']:.0f} sends/s, p50 {r['latency_ms_p50']} ms, p99 {r['latency_ms_p99']} ms, "
        f"realm CPU {r['realm_cpu_pct']}% (reactor thread {r['realm_main_thread_cpu_pct']}%), "
        f"{r['realm_us_per_msg']} us/msg (reactor {r['reactor_us_per_msg']}), loadgen CPU {r['loadgen_cpu_pct']}%, other CPU {r['other_cpu_pct']}%, errors {r['send_errors']}, drain {r['drain_s']} s, "
        f"set-up {r['setup_s']} s (register {r['register_s']} s, login {r['login_s']} s)"
    )
    return r


def profile_report(path: Path, top: int = 25) -> str:
    import pstats

    buf = io.StringIO()
    st = pstats.Stats(str(path), stream=buf)
    st.strip_dirs()
    for key in ("cumulative", "tottime"):
        buf.write(f"\n===== top {top} by {key} =====\n")
        st.sort_stats(key).print_stats(top)
    return buf.getvalue()


def performance_section(args: argparse.Namespace) -> str:
    """The realms' ``[performance]`` section from ``--gc-thresholds`` and
    ``--no-gc-freeze`` ("" when neither is given: the realm's defaults)."""
    lines = ""
    if args.gc_thresholds is not None:
        values = [] if args.gc_thresholds == "python" else args.gc_thresholds.split(",")
        lines += f"gc_thresholds = [{', '.join(values)}]\n"
    if args.no_gc_freeze:
        lines += "gc_freeze = false\n"
    return "\n[performance]\n" + lines if lines else ""


def profiled_realm(work: Path, name: str, args: argparse.Namespace) -> tuple[Server, Path]:
    prof = work / f"{name}.prof"
    srv = Server(
        work,
        name,
        profile=prof,
        synchronous=args.synchronous,
        switchinterval=args.switchinterval,
        performance=performance_section(args),
    )
    srv.start(timeout=60)
    return srv, prof


def save_profile(prof: Path, stem: str) -> str | None:
    """Copy the dump to bench/results/STEM.prof, write and print STEM.txt."""
    if not prof.exists():
        log(f"warning: no profile written ({prof})")
        return None
    report = profile_report(prof)
    RESULTS.mkdir(exist_ok=True)
    shutil.copy(prof, RESULTS / f"{stem}.prof")
    out = RESULTS / f"{stem}.txt"
    out.write_text(report)
    print(report)
    return str(out)


def fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def table(results: dict[str, Any]) -> str:
    lines = []
    lines.append(
        "DM throughput (loopback, one load generator process, window = sends in flight per sender)"
    )
    lines.append(
        f"  {'test':<42}{'DMs/s':>10}{'sends/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'realm CPU%':>12}{'reactor%':>10}{'us/msg':>8}{'reactor us/msg':>15}{'lg CPU%':>9}{'other%':>8}"
    )
    for key, r in results["dm"].items():
        lines.append(
            f"  {key:<42}{fmt(r['delivered_per_s'], 0):>10}{fmt(r['send_acks_per_s'], 0):>10}"
            f"{fmt(r['latency_ms_p50'], 2):>9}{fmt(r['latency_ms_p99'], 2):>9}"
            f"{fmt(r['realm_cpu_pct']):>12}{fmt(r['realm_main_thread_cpu_pct']):>10}"
            f"{fmt(r.get('realm_us_per_msg'), 2):>8}{fmt(r.get('reactor_us_per_msg'), 2):>15}"
            f"{fmt(r['loadgen_cpu_pct']):>9}{fmt(r.get('other_cpu_pct')):>8}"
        )
    if results.get("fanout"):
        lines.append("")
        lines.append(
            "Group fan-out (one sender, window = sends in flight; msgs/s = msg frames received by members, sender's echo excluded)"
        )
        lines.append(
            f"  {'test':<42}{'msgs/s':>10}{'sends/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'realm CPU%':>12}{'reactor%':>10}{'us/msg':>8}{'reactor us/msg':>15}{'lg CPU%':>9}{'other%':>8}"
        )
        for key, r in results["fanout"].items():
            lines.append(
                f"  {key:<42}{fmt(r['delivered_per_s'], 0):>10}{fmt(r['send_acks_per_s'], 0):>10}"
                f"{fmt(r['latency_ms_p50'], 2):>9}{fmt(r['latency_ms_p99'], 2):>9}"
                f"{fmt(r['realm_cpu_pct']):>12}{fmt(r['realm_main_thread_cpu_pct']):>10}"
                f"{fmt(r.get('realm_us_per_msg'), 2):>8}{fmt(r.get('reactor_us_per_msg'), 2):>15}"
                f"{fmt(r['loadgen_cpu_pct']):>9}{fmt(r.get('other_cpu_pct')):>8}"
            )
    if results.get("memory"):
        lines.append("")
        lines.append(
            "Idle logged-in connections: realm RSS growth (VmRSS) over a warmed-up baseline"
        )
        lines.append(
            f"  {'transport':<10}{'conns':>8}{'RSS MiB':>10}{'delta MiB':>11}{'KiB/conn':>10}{'logins/s':>10}"
        )
        for kind, m in results["memory"].items():
            for pt in m["points"]:
                lines.append(
                    f"  {kind:<10}{pt['conns']:>8,}{pt['rss_kib'] / 1024:>10.1f}{pt['delta_kib'] / 1024:>11.1f}"
                    f"{pt['kib_per_conn']:>10.1f}{pt['logins_per_s']:>10.0f}"
                )
            lines.append(
                f"  {'':<10}{'(baseline ' + format(m['baseline_rss_kib'] / 1024, '.1f') + ' MiB)':>30}"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="3 s runs, 1k/2k idle conns (smoke test)")
    ap.add_argument(
        "--profile",
        nargs="?",
        const="both",
        choices=("dm", "fanout", "both"),
        help="also profile the realm during a DM run (pairs=max), a fan-out run (largest group), or both (default)",
    )
    ap.add_argument(
        "--fanout",
        default="10,100,1000",
        help="comma-separated group sizes (receiving members) for the fan-out test; '' skips it (default 10,100,1000)",
    )
    ap.add_argument(
        "--fanout-window",
        type=int,
        default=32,
        help="sends in flight for the fan-out sender (default 32)",
    )
    ap.add_argument(
        "--fanout-duration",
        type=float,
        help="seconds per fan-out run (default: --duration)",
    )
    ap.add_argument(
        "--duration", type=float, help="seconds per throughput run (default 10, 3 with --quick)"
    )
    ap.add_argument("--pairs", default="10,50", help="comma-separated pair counts (default 10,50)")
    ap.add_argument(
        "--window", type=int, default=64, help="sends in flight per sender (default 64)"
    )
    ap.add_argument("--conns", help="idle connection counts (default 1000,5000; --quick 1000,2000)")
    ap.add_argument(
        "--synchronous",
        default="FULL",
        help="storage.synchronous (default FULL, the realm default)",
    )
    ap.add_argument(
        "--switchinterval",
        type=float,
        help="run the realms with sys.setswitchinterval(S) (experiment; default: Python's 0.005)",
    )
    ap.add_argument(
        "--postgresql",
        metavar="DSN",
        help="also run the DM throughput on a realm on PostgreSQL (a schema of its own, "
        "dropped after), e.g. 'host=127.0.0.1 dbname=test user=postgres'",
    )
    ap.add_argument(
        "--gc-thresholds",
        help="the realms' [performance] gc_thresholds, GEN0,GEN1,GEN2 or 'python' "
        "(Python's own); default: the realm's default",
    )
    ap.add_argument(
        "--no-gc-freeze",
        action="store_true",
        help="the realms with [performance] gc_freeze = false",
    )
    ap.add_argument(
        "--rates",
        default="half",
        help="open-loop DM runs at pairs=max after the closed-loop ones: comma-separated "
        "sends per second in all, or 'half' (half the DMs/s of the closed-loop run at "
        "pairs=max: issue 20's latency target); '' skips them (default: half)",
    )
    ap.add_argument(
        "--json", help="write the figures to this file (default bench/results/latest.json)"
    )
    ap.add_argument(
        "--lean-loadgen",
        action="store_true",
        help="DM runs: the load generator reads and writes frames as bytes, no JSON "
        "(loadgen.py dm --lean): it reaches rates the default one cannot",
    )
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-tls", action="store_true")
    ap.add_argument("--skip-ref", action="store_true", help="skip the reference relay")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, db)")
    args = ap.parse_args()
    global LEAN_LOADGEN
    LEAN_LOADGEN = args.lean_loadgen
    duration = args.duration or (3.0 if args.quick else 10.0)
    warmup = 0.5 if args.quick else 1.0
    pairs = [int(x) for x in args.pairs.split(",") if x]
    fan_sizes = [int(x) for x in args.fanout.split(",") if x.strip()]
    fan_duration = args.fanout_duration or duration
    conns = args.conns or ("1000,2000" if args.quick else "1000,5000")
    performance = performance_section(args)
    fdlim = raise_fd_limit()
    if fdlim < max(int(c) for c in conns.split(",")) * 2 + 100:
        log(f"warning: fd limit {fdlim} may be too low for {conns} connections")

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    work = Path(tempfile.mkdtemp(prefix="chatbench-"))
    results: dict[str, Any] = {
        "when": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "settings": {
            "switchinterval": args.switchinterval,
            "duration_s": duration,
            "warmup_s": warmup,
            "window": args.window,
            "synchronous": args.synchronous,
            "postgresql": bool(args.postgresql),
            "quick": args.quick,
            "fanout_window": args.fanout_window,
            "fanout_duration_s": fan_duration,
            "performance": performance.strip(),
        },
        "dm": {},
        "fanout": {},
        "memory": {},
        "reference": {},
    }
    try:
        log(f"work dir {work}")
        # 1. throughput on one realm
        realm = Server(
            work,
            "realm-dm",
            synchronous=args.synchronous,
            switchinterval=args.switchinterval,
            performance=performance,
        )
        realm.start()
        log(
            f"realm pid {realm.pid} on tcp port {realm.ports['tcp']}; throughput runs of {duration:.0f}s"
        )
        for n in pairs:
            results["dm"][f"dm pairs={n}"] = dm(realm, n, duration, args.window, warmup)
        top = results["dm"][f"dm pairs={max(pairs)}"]["delivered_per_s"]
        for rate in paced_rates(args.rates, top):
            results["dm"][f"dm pairs={max(pairs)} paced {rate:.0f}/s"] = dm(
                realm, max(pairs), duration, args.window, warmup, rate
            )
        results["dm"]["latency 1 pair, 1 in flight"] = dm(realm, 1, min(duration, 3.0), 1, warmup)
        realm.stop()

        # 1b. the same on PostgreSQL
        if args.postgresql:
            schema = f"chatbench_{os.getpid()}"
            storage = (
                f'backend = "postgresql"\ndsn = {json.dumps(args.postgresql)}\n'
                f'schema = "{schema}"\n'
            )
            try:
                pg = Server(work, "realm-dm-pg", storage=storage, performance=performance)
                pg.start()
                log(f"realm on PostgreSQL pid {pg.pid} (schema {schema})")
                for n in pairs:
                    results["dm"][f"dm pairs={n} postgresql"] = dm(
                        pg, n, duration, args.window, warmup
                    )
                results["dm"]["latency 1 pair, 1 in flight, postgresql"] = dm(
                    pg, 1, min(duration, 3.0), 1, warmup
                )
                pg.stop()
            finally:
                drop_schema(args.postgresql, schema)

        # 2. reference relay
        if not args.skip_ref:
            ref = Server(work, "refserver", ref=True)
            ref.start()
            log(f"reference relay pid {ref.pid} (no store/auth): pairs={max(pairs)}")
            results["reference"][f"pairs={max(pairs)}"] = r = dm(
                ref, max(pairs), duration, args.window, warmup
            )
            results["dm"][f"ref relay pairs={max(pairs)}"] = r
            ref.stop()

        # 3. group fan-out, on a fresh realm (its big groups and presence traffic would
        # otherwise sit in the DM realm)
        if fan_sizes:
            srv = Server(
                work,
                "realm-fanout",
                synchronous=args.synchronous,
                switchinterval=args.switchinterval,
                performance=performance,
            )
            srv.start()
            log(
                f"fan-out: realm pid {srv.pid}, groups of {fan_sizes} members, {fan_duration:.0f}s runs"
            )
            for n in fan_sizes:
                results["fanout"][f"fanout members={n}"] = fanout(
                    srv, n, fan_duration, args.fanout_window, warmup
                )
            srv.stop()

        # 4. memory per idle connection, fresh realm per transport
        if not args.skip_memory:
            kp = make_cert(work)
            kinds = ["tcp"] + ([] if args.skip_tls else ["ssl"])
            for kind in kinds:
                srv = Server(
                    work,
                    f"realm-idle-{kind}",
                    tls=kp if kind != "tcp" else None,
                    synchronous=args.synchronous,
                    switchinterval=args.switchinterval,
                    performance=performance,
                )
                srv.start()
                log(f"idle {kind}: realm pid {srv.pid}, opening {conns} connections")
                m = loadgen(
                    "idle",
                    "--port",
                    srv.ports[kind[:3]],
                    "--pid",
                    srv.pid,
                    "--counts",
                    conns,
                    *(["--tls"] if kind != "tcp" else []),
                    timeout=900,
                )
                label = {"tcp": "TCP", "ssl": "TLS"}[kind]
                results["memory"][label] = m
                for pt in m["points"]:
                    log(
                        f"  {label} {pt['conns']} conns: +{pt['delta_kib'] / 1024:.1f} MiB, "
                        f"{pt['kib_per_conn']:.1f} KiB/conn, {pt['logins_per_s']:.0f} logins/s"
                    )
                srv.stop()

        # 5. profile
        if args.profile in ("dm", "both"):
            n = max(pairs)
            srv, prof = profiled_realm(work, "realm-profile", args)
            log(f"profiling realm pid {srv.pid} under cProfile: pairs={n}")
            results["dm"][f"dm pairs={n} (cProfile)"] = dm(srv, n, duration, args.window, warmup)
            srv.stop(timeout=60)
            results["profile"] = save_profile(prof, "profile")
        if args.profile in ("fanout", "both") and fan_sizes:
            n = max(fan_sizes)
            srv, prof = profiled_realm(work, "realm-profile-fanout", args)
            log(f"profiling realm pid {srv.pid} under cProfile: fan-out members={n}")
            results["fanout"][f"fanout members={n} (cProfile)"] = fanout(
                srv, n, fan_duration, args.fanout_window, warmup
            )
            srv.stop(timeout=60)
            results["profile_fanout"] = save_profile(prof, "profile-fanout")
    except KeyboardInterrupt as e:
        kill_children()
        sys.exit(f"bench: interrupted ({str(e) or 'Ctrl-C'}); realm killed")
    finally:
        kill_children()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"kept {work}")

    if args.json:
        out = Path(args.json)
    else:
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / "latest.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(table(results))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
