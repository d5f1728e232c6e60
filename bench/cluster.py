#!/usr/bin/env python
# ruff: noqa: E501
"""Scale-out figures: one command, figures at the end (issue 16).

    python bench/cluster.py [--dsn DSN] [--redis HOST:PORT] [--duration 8] [--workers 1,2]

Runs, in one session and on one machine, the same DM and group fan-out loads
(bench/loadgen.py) against:

- the SQLite single process (``twistd -n chatrealm``, the default store);
- N workers (``--worker w1`` ... ``wN``) on PostgreSQL and Redis, sharing one port
  through SO_REUSEPORT, for each N of ``--workers`` (a new schema and Redis prefix each).

For each: delivered messages/s, send->deliver latency p50/p99, and the CPU of *all*
realm processes per delivered message (from /proc, over the loadgen run, set-up
included: the workers' CPU summed, PostgreSQL's and Redis's not counted -- they are
reported beside as "db CPU" from the machine's total).  Figures, not a test; bench/
README.md says what they mean.  Needs PostgreSQL and Redis (defaults: the tests').
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from loadgen import cpu_seconds, system_busy_seconds  # noqa: E402
from run import CONFIG, PY, Server, drop_schema, kill_children, loadgen, log, twistd_path  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Workers:
    """N worker processes of one realm on PostgreSQL + Redis, on one shared port."""

    def __init__(self, work: Path, n: int, dsn: str, redis: str) -> None:
        self.dir = work / f"workers{n}"
        self.dir.mkdir(parents=True)
        self.n = n
        self.dsn = dsn
        self.schema = f"bench_{os.getpid()}_{secrets.token_hex(3)}"
        self.port = free_port()
        self.procs: list[subprocess.Popen[Any]] = []
        cfg = CONFIG.format(data_dir=self.dir / "data", synchronous="FULL")
        cfg = cfg.replace('[storage]\nsynchronous = "FULL"\n', "")
        cfg += (
            f'\n[storage]\nbackend = "postgresql"\ndsn = {json.dumps(dsn)}\nschema = "{self.schema}"\n'
            f'\n[control]\nenabled = false\n\n[cluster]\nredis = "{redis}"\n'
            f'redis_prefix = "bench-{self.schema}"\n'
        )
        self.config = self.dir / "realm.toml"
        self.config.write_text(cfg)

    def start(self, timeout: float = 60.0) -> None:
        from run import _children

        for i in range(1, self.n + 1):
            logfile = self.dir / f"w{i}.log"
            cmd = [
                PY,
                twistd_path(),
                "-n",
                "--pidfile=",
                f"--logfile={logfile}",
                "chatrealm",
                "--config",
                str(self.config),
                "--worker",
                f"w{i}",
                "--listen",
                f"tcp:{self.port}:interface=127.0.0.1",
            ]
            p = subprocess.Popen(
                cmd,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.dir,
            )
            _children.append(p)
            self.procs.append(p)
            deadline = time.monotonic() + timeout
            while True:  # one at a time: the first creates the schema
                text = logfile.read_text(errors="replace") if logfile.exists() else ""
                if f"cluster: worker w{i} of realm" in text:
                    break
                if p.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(f"bench: worker w{i} did not start:\n{text[-4000:]}")
                time.sleep(0.05)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        drop_schema(self.dsn, self.schema)


def measured(kind: str, port: int, pids: list[int], duration: float, **opts: Any) -> dict[str, Any]:
    """One loadgen run; CPU of every realm process over it, per delivered message."""
    args: list[Any] = [kind, "--port", port, "--pid", pids[0], "--duration", duration]
    for k, v in opts.items():
        args += [f"--{k}", v]
    before = sum(cpu_seconds(p) for p in pids)
    busy0, t0 = system_busy_seconds(), time.monotonic()
    r = loadgen(*args, timeout=duration + 600)
    spent = sum(cpu_seconds(p) for p in pids) - before
    wall = time.monotonic() - t0
    busy = system_busy_seconds() - busy0
    n = r.get("delivered") or 0
    r["all_realm_cpu_s"] = round(spent, 2)
    r["realm_us_per_msg_all"] = round(spent * 1e6 / n, 1) if n else None
    r["machine_busy_pct"] = round(busy * 100 / wall, 1) if wall else None
    log(
        f"  {kind} {opts}: {r['delivered_per_s']:.0f} delivered/s, p50 {r['latency_ms_p50']} ms, "
        f"p99 {r['latency_ms_p99']} ms, realm CPU {spent:.1f} s over the run "
        f"({r['realm_us_per_msg_all']} us/msg incl. set-up), machine busy {r['machine_busy_pct']}%"
    )
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--dsn",
        default=os.environ.get(
            "CHATPROTO_TEST_PG_DSN", "host=127.0.0.1 port=5432 dbname=test user=postgres"
        ),
    )
    ap.add_argument("--redis", default="127.0.0.1:6379")
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--members", type=int, default=100)
    args = ap.parse_args()
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "runs": {}}
    work = Path(tempfile.mkdtemp(prefix="chatproto-bench-cluster-"))
    try:
        log("SQLite, single process")
        srv = Server(work, "sqlite")
        srv.start()
        try:
            results["runs"]["sqlite 1 process"] = {
                "dm": measured("dm", srv.ports["tcp"], [srv.pid], args.duration, pairs=args.pairs),
                "fanout": measured(
                    "fanout", srv.ports["tcp"], [srv.pid], args.duration, members=args.members
                ),
            }
        finally:
            srv.stop()
        for n in (int(x) for x in args.workers.split(",")):
            log(f"PostgreSQL + Redis, {n} worker(s) on one shared port")
            w = Workers(work, n, args.dsn, args.redis)
            w.start()
            try:
                results["runs"][f"postgresql {n} worker(s)"] = {
                    "dm": measured("dm", w.port, w.pids, args.duration, pairs=args.pairs),
                    "fanout": measured(
                        "fanout", w.port, w.pids, args.duration, members=args.members
                    ),
                }
            finally:
                w.stop()
    finally:
        kill_children()
    print()
    print(
        f"{'run':<26} {'DM/s':>8} {'DM p50':>7} {'DM us/msg':>10} {'fan-out/s':>10} {'fo p50':>7} {'fo us/msg':>10}"
    )
    for name, r in results["runs"].items():
        d, f = r["dm"], r["fanout"]
        print(
            f"{name:<26} {d['delivered_per_s']:>8.0f} {d['latency_ms_p50']!s:>7} {d['realm_us_per_msg_all']!s:>10} "
            f"{f['delivered_per_s']:>10.0f} {f['latency_ms_p50']!s:>7} {f['realm_us_per_msg_all']!s:>10}"
        )
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "cluster-latest.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
