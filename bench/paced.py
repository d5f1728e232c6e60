"""Paced private messages, A/B: latency and where a message's time goes.

    python bench/paced.py --rate 30000                       # one realm config, 3 runs
    python bench/paced.py --rate 30000 --b performance.switch_interval=0
    python bench/paced.py --rate 10000,30000 --runs 2 --set storage.synchronous='"NORMAL"'
    python bench/paced.py --rate 30000 --b-tree ../other-checkout   # code A/B
    python bench/paced.py --rate 0 --pairs 1 --window 1   # closed loop: one in flight

Each run starts a fresh realm (bench/run.py's config and ``Server``) with a ``[metrics]``
listener, and the byte-level load generator (``loadgen.py dm --lean``) at ``--pairs``
(50) paced at RATE sends per second in all (open loop: each sender's frames come one per
read, as from many clients).  With ``--b``, a second config (the first plus those
settings) runs alternately with the first, run by run, so both see the same minutes of a
noisy machine.  Per run it prints delivered DMs/s, p50/p99 latency (send to delivery, the
load generator's clock), realm CPU per DM (all threads / reactor thread), and from the
realm's own metrics the mean group commit (its submission to its results, the writer's
queue included) and its phases (``q/w/h``: queued for the writer thread, writing,
handed back to the event loop), the mean COMMIT (SQLite: the fsync) and items per
commit; then, per config and rate, the medians of its runs (compare those: one run of a
shared machine swings by half).

``--set``/``--b`` take ``section.key=VALUE`` with VALUE in TOML (strings quoted).
``--cgen`` hands the logged-in connections to bench/dmgen.c (``loadgen.py dm --cgen``,
compiled with ``cc`` on first use): the same pacing and answers as the lean generator
for ~8 us of CPU per DM instead of ~15-23, and a faster reader, so the realm gets one
ack per delivery as from clients that keep up (the lean generator, loaded, batches
them).

``--b-tree DIR`` runs config B's realm from another checkout (its ``chatproto`` first on
``PYTHONPATH``; the same Python and dependencies), to compare two versions of the code.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # (bench/run.py: the realm config, Server, loadgen)

#: A group commit's phases, as the realm's metrics tell them (docs/operator-guide.md),
#: and the name of each one's sum of seconds there.
PHASES = ("queued", "writing", "handoff")
PHASE_SUMS = {p: f'chatproto_store_commit_phase_seconds_sum{{phase="{p}"}}' for p in PHASES}

#: The realm's metrics read around each run (sums and counts of histograms).
METRICS = (
    "chatproto_store_commit_items_count",
    "chatproto_store_commit_items_sum",
    "chatproto_store_commit_seconds_sum",
    "chatproto_store_sync_seconds_sum",
    *PHASE_SUMS.values(),
)


def sections(settings: list[str]) -> str:
    """TOML for ``section.key=VALUE`` settings, grouped by section."""
    by: dict[str, list[str]] = {}
    for s in settings:
        key, eq, value = s.partition("=")
        section, dot, name = key.partition(".")
        if not (eq and dot and section and name and value):
            raise SystemExit(f"paced: a setting is section.key=VALUE, not {s!r}")
        by.setdefault(section, []).append(f"{name} = {value}")
    return "".join(f"\n[{sec}]\n" + "\n".join(lines) + "\n" for sec, lines in by.items())


def metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in METRICS:
            out[name] = float(value)
    return out


def one_run(
    work: Path, label: str, extra: str, rate: float, args: argparse.Namespace
) -> dict[str, Any]:
    tree = args.b_tree if label == "B" and args.b_tree else None
    if tree:
        os.environ["PYTHONPATH"] = str(Path(tree).resolve())
    else:
        os.environ.pop("PYTHONPATH", None)
    server = run.Server(
        work,
        f"{label}-{int(rate)}-{time.monotonic_ns()}",
        performance='\n[metrics]\nlisten = "tcp:0:interface=127.0.0.1"\n' + extra,
    )
    server.start()
    try:
        # (both listeners log "listening on ... (tcp:0:...)": told apart by factory)
        port = metrics_port = 0
        deadline = time.monotonic() + 30
        while not (port and metrics_port):
            text = server.logfile.read_text(errors="replace")
            client = re.search(r"ClientFactory starting on (\d+)", text)
            ops = re.search(r"OpsSite starting on (\d+)", text)
            if client and ops:
                port, metrics_port = int(client.group(1)), int(ops.group(1))
            elif time.monotonic() > deadline:
                server.fail("did not start its client and metrics listeners within 30 s")
            else:
                time.sleep(0.05)
        # the counters over the whole run: warm-up and set-up are a small part of them
        before = metrics(metrics_port)
        r = run.loadgen(
            "dm",
            "--port",
            port,
            "--pid",
            server.pid,
            "--pairs",
            args.pairs,
            "--window",
            args.window,
            "--duration",
            args.duration,
            "--rate",
            rate,
            "--cgen" if args.cgen else "--lean",
            timeout=args.duration + 180,
        )
        after = metrics(metrics_port)
    finally:
        server.stop()
    run.add_us_per_msg(r)
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in METRICS}
    n = d["chatproto_store_commit_items_count"] or 1
    r["commit_ms"] = 1000 * d["chatproto_store_commit_seconds_sum"] / n
    r["sync_ms"] = 1000 * d["chatproto_store_sync_seconds_sum"] / n
    r["items_per_commit"] = d["chatproto_store_commit_items_sum"] / n
    for p, key in PHASE_SUMS.items():  # (0 from a realm that does not tell them: an older tree)
        r[f"{p}_ms"] = 1000 * d[key] / n
    # the load generator's own CPU per delivered DM: it shares the machine's cores
    r["gen_us_per_msg"] = round(1e4 * r["loadgen_cpu_pct"] / max(r["delivered_per_s"], 1.0), 1)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--rate", default="30000", help="sends per second, comma-separated (default 30000)"
    )
    ap.add_argument("--pairs", type=int, default=50)
    ap.add_argument(
        "--window", type=int, default=64, help="most sends in flight per sender (default 64)"
    )
    ap.add_argument("--duration", type=float, default=10.0, help="seconds measured per run")
    ap.add_argument("--runs", type=int, default=3, help="runs per config and rate (default 3)")
    ap.add_argument("--set", action="append", default=[], help="section.key=VALUE for both configs")
    ap.add_argument("--b", action="append", default=[], help="section.key=VALUE for config B")
    ap.add_argument("--b-tree", help="a checkout whose code config B's realm runs")
    ap.add_argument(
        "--cgen",
        action="store_true",
        help="the load generator's hot loop in C (bench/dmgen.c), not the lean Python one",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work dir (realm logs)")
    args = ap.parse_args()
    rates = [float(x) for x in args.rate.split(",") if x]
    base = sections(args.set)
    configs = [("A", base)] + ([("B", base + sections(args.b))] if args.b or args.b_tree else [])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    work = Path(tempfile.mkdtemp(prefix="chatbench-paced-"))
    rows = []
    try:
        for rate in rates:
            for i in range(args.runs):
                for label, extra in configs:
                    r = one_run(work, label, extra, rate, args)
                    rows.append((label, rate, r))
                    run.log(
                        f"{label} {rate:.0f}/s run {i + 1}: {r['delivered_per_s']:.0f} DMs/s, "
                        f"p50 {r['latency_ms_p50']} ms, p99 {r['latency_ms_p99']} ms, "
                        f"{r['realm_us_per_msg']} us/DM (reactor {r['reactor_us_per_msg']}, "
                        f"generator {r['gen_us_per_msg']}), "
                        f"commit {r['commit_ms']:.1f} ms (queued {r['queued_ms']:.1f}, writing "
                        f"{r['writing_ms']:.1f}, handoff {r['handoff_ms']:.1f}; COMMIT "
                        f"{r['sync_ms']:.1f}), "
                        f"{r['items_per_commit']:.1f} items/commit, behind {r['behind']}, "
                        f"other CPU {r['other_cpu_pct']}%"
                    )
    finally:
        run.kill_children()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            run.log(f"kept {work}")
    for label, extra in configs:
        tree = f" (code: {args.b_tree})" if label == "B" and args.b_tree else ""
        print(f"{label}: {extra.strip() or '(the defaults)'}{tree}".replace("\n", " "))
    print(
        f"{'':3} {'rate':>7} {'DMs/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'us/DM':>6} "
        f"{'reactor':>7} {'gen':>5} {'commit ms':>9} {'q/w/h ms':>14} {'COMMIT':>6} "
        f"{'items':>6} {'other%':>6}"
    )
    for label, rate, r in rows:
        print(
            f"{label:3} {rate:7.0f} {r['delivered_per_s']:8.0f} {r['latency_ms_p50']:7.1f} "
            f"{r['latency_ms_p99']:7.1f} {r['realm_us_per_msg']:6.1f} "
            f"{r['reactor_us_per_msg']:7.1f} {r['gen_us_per_msg']:5.1f} "
            f"{r['commit_ms']:9.1f} "
            f"{'/'.join(format(r[f'{p}_ms'], '.1f') for p in PHASES):>14} "
            f"{r['sync_ms']:6.1f} "
            f"{r['items_per_commit']:6.1f} {r['other_cpu_pct']:6.1f}"
        )
    print(summary(rows))


def summary(rows: list[tuple[str, float, dict[str, Any]]]) -> str:
    """Medians per config and rate (the runs of one config swing 1.5x on a shared
    machine: compare medians of alternated runs, not single runs): DMs/s, p50, p99,
    realm us/DM and the commit's phases."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for label, rate, r in rows:
        groups.setdefault((label, rate), []).append(r)
    lines = ["medians:"]
    for (label, rate), rs in groups.items():

        def med(key: str, rs: list[dict[str, Any]] = rs) -> float:
            return float(statistics.median(float(r[key]) for r in rs))

        phases = "/".join(f"{med(f'{p}_ms'):.1f}" for p in PHASES)
        lines.append(
            f"  {label} {rate:.0f}/s: {len(rs)} runs, {med('delivered_per_s'):.0f} DMs/s, "
            f"p50 {med('latency_ms_p50'):.1f} ms, p99 {med('latency_ms_p99'):.1f} ms, "
            f"{med('realm_us_per_msg'):.1f} us/DM (reactor {med('reactor_us_per_msg'):.1f}), "
            f"commit {med('commit_ms'):.1f} ms (q/w/h {phases})"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
