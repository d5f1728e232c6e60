"""bench/irc.py (issue 20): the IRC peer bench runs end to end on a tiny load against
chatproto's IRC gateway and twisted.words, and its ratios and CPU-per-message figures
are computed from the right numbers.  No figure is asserted (performance lives in
bench/, not in tests); only that every message was delivered and counted."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def _load(name: str) -> ModuleType:
    """Import bench/NAME.py (the bench scripts import each other from bench/)."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod


def _run(server: str, rep: int, rate: int, us: float, **kw: Any) -> dict[str, Any]:
    return {
        "server": server,
        "workload": "dm",
        "rep": rep,
        "deliveries_per_s": rate,
        "p50_ms": 1.0,
        "p99_ms": 2.0,
        "server_us_per_delivery": us,
        "main_thread_us_per_delivery": us,
        **kw,
    }


def test_ratios_are_taken_per_repetition() -> None:
    irc = _load("irc")
    runs = [
        _run("chatproto", 1, 10_000, 50.0),
        _run("twisted.words", 1, 40_000, 10.0),
        _run("chatproto", 2, 20_000, 40.0),
        _run("twisted.words", 2, 40_000, 8.0),
        {"server": "ngircd", "workload": "dm", "rep": 1, "error": "BenchError: gone"},
    ]
    s = irc.summarize(runs, "dm")
    q = s["ratios"]["chatproto/twisted.words"]
    assert q["rate_per_rep"] == [0.25, 0.5]
    assert q["rate"] == 0.375
    assert q["cpu_per_rep"] == [0.2, 0.2]
    assert "chatproto/ngircd" not in s["ratios"]  # its only run failed
    assert s["servers"]["chatproto"]["server_us_per_delivery"] == 45.0


def test_cpu_used_survives_threads_that_exit() -> None:
    fanout = _load("irc_fanout")

    def sample(tasks: dict[str, int], ticks: float) -> Any:
        s = object.__new__(fanout.CpuSample)
        s.pid, s.tasks, s.ticks_s, s.main_ticks_s = 7, tasks, ticks, 0.0
        return s

    a = sample({"7": 1_000_000_000, "8": 500_000_000}, 10.0)
    # thread 9 started during the run: counted from zero, nanosecond figures
    b = sample({"7": 1_250_000_000, "8": 500_000_000, "9": 100_000_000}, 10.35)
    assert fanout.cpu_used(a, b) == (0.35, 0.25)
    # thread 8 exited idle: the survivors' nanoseconds, since the ticks agree
    c = sample({"7": 1_250_000_000}, 10.26)
    assert fanout.cpu_used(a, c) == (0.25, 0.25)
    # thread 8 exited after working: the process's ticks keep its time
    d = sample({"7": 1_250_000_000}, 10.5)
    assert fanout.cpu_used(a, d) == (0.5, 0.25)


def test_run_py_us_per_msg() -> None:
    run = _load("run")
    r = run.add_us_per_msg(
        {
            "delivered": 20_000,
            "duration_s": 2.0,
            "realm_cpu_pct": 50.0,
            "realm_main_thread_cpu_pct": 40.0,
        }
    )
    assert (r["realm_us_per_msg"], r["reactor_us_per_msg"]) == (50.0, 40.0)
    r = run.add_us_per_msg({"delivered": 0, "duration_s": 2.0, "realm_cpu_pct": 50.0})
    assert r["realm_us_per_msg"] is None


def test_irc_bench_end_to_end(tmp_path: Path) -> None:
    """A tiny run over loopback: 3 DM pairs and a 6-member channel, both servers (more
    users than one address may register by default: the bench's realm lifts that)."""
    out = tmp_path / "irc.json"
    cmd = [
        sys.executable,
        str(BENCH / "irc.py"),
        "--servers",
        "chatproto,words",
        "--repeat",
        "1",
        "--pairs",
        "3",
        "--messages",
        "30",
        "--window",
        "7",
        "--members",
        "6",
        "--channel-messages",
        "20",
        "--channel-window",
        "5",
        "--timeout",
        "60",
        "--json",
        str(out),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "storage.synchronous = FULL" in p.stdout
    assert "ratio chatproto/twisted.words" in p.stdout
    data = json.loads(out.read_text())
    runs = data["runs"]
    assert {(r["server"], r["workload"]) for r in runs} == {
        ("chatproto", "dm"),
        ("twisted.words", "dm"),
        ("chatproto", "channel"),
        ("twisted.words", "channel"),
    }
    for r in runs:
        assert "error" not in r, r
        assert r["complete"], r
        assert r["deliveries"] == (3 * 30 if r["workload"] == "dm" else 6 * 20), r
        assert r["server_us_per_delivery"] >= 0, r  # clock ticks may round to 0


def test_run_py_paced_rates() -> None:
    run = _load("run")
    assert run.paced_rates("half", 30_000.0) == [15_000.0]
    assert run.paced_rates("1000, half,", 8_000.0) == [1000.0, 4000.0]
    assert run.paced_rates("", 8_000.0) == []


def test_run_py_paced_dm_end_to_end(tmp_path: Path) -> None:
    """bench/run.py's open-loop DM run (issue 20's latency at half load) over loopback:
    a tiny closed-loop run, then one paced at 'half' and one at 100 sends/s; each
    delivers about its rate and reports its latency."""
    out = tmp_path / "latest.json"
    cmd = [
        sys.executable,
        str(BENCH / "run.py"),
        "--pairs",
        "2",
        "--window",
        "4",
        "--duration",
        "1",
        "--fanout",
        "",
        "--skip-memory",
        "--skip-tls",
        "--skip-ref",
        "--rates",
        "half,100",
        "--json",
        str(out),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    dm = json.loads(out.read_text())["dm"]
    paced = {k: v for k, v in dm.items() if " paced " in k}
    assert len(paced) == 2, list(dm)
    slow = dm["dm pairs=2 paced 100/s"]
    assert slow["rate"] == 100 and 50 <= slow["delivered_per_s"] <= 150, slow
    assert slow["send_errors"] == 0 and slow["latency_ms_p99"] > 0


@pytest.mark.skipif(
    not (shutil.which("cc") or shutil.which("gcc")) and not os.environ.get("CI"),
    reason="no C compiler (under CI=true this runs)",
)
def test_paced_summary_gives_medians_per_config_and_rate() -> None:
    """bench/paced.py's last lines: per config and rate, the medians of its runs (a
    single run of a shared machine swings too much to compare)."""
    paced = _load("paced")

    def r(p99: float, commit: float) -> dict[str, Any]:
        keys = ("delivered_per_s", "latency_ms_p50", "realm_us_per_msg", "reactor_us_per_msg")
        return dict.fromkeys(keys, 1.0) | {
            "latency_ms_p99": p99,
            "commit_ms": commit,
            "queued_ms": 1.0,
            "writing_ms": commit / 2,
            "handoff_ms": 2.0,
        }

    rows = [("A", 500.0, r(p, c)) for p, c in ((40.0, 9.0), (90.0, 30.0), (50.0, 10.0))]
    rows += [("B", 500.0, r(44.0, 8.0)), ("A", 0.0, r(1.0, 2.0))]
    lines = paced.summary(rows).splitlines()
    assert lines[0] == "medians:"
    assert lines[1].startswith("  A 500/s: 3 runs,") and "p99 50.0 ms" in lines[1]
    assert "commit 10.0 ms (q/w/h 1.0/5.0/2.0)" in lines[1]
    assert lines[2].startswith("  B 500/s: 1 runs,") and "p99 44.0 ms" in lines[2]
    assert lines[3].startswith("  A 0/s: 1 runs,") and len(lines) == 4


def test_paced_with_the_c_generator_end_to_end(tmp_path: Path) -> None:
    """bench/paced.py --cgen (bench/dmgen.c drives the connections loadgen.py logged
    in) over loopback: paced at 200 sends/s it delivers about that, every send
    answered, and reports latency and the generator's CPU; closed loop (rate 0) it
    delivers too."""
    cmd = [sys.executable, str(BENCH / "paced.py"), "--cgen", "--rate", "200,0"]
    cmd += ["--runs", "1", "--pairs", "2", "--window", "64", "--duration", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [line.split() for line in p.stdout.splitlines() if line.startswith("A ")]
    assert [row[1] for row in rows] == ["200", "0"], p.stdout
    (_, _, paced, p50, p99, *_, phases, _sync, _items, _other), (_, _, closed, *_) = rows
    assert 100 <= float(paced) <= 250, p.stdout  # (a loaded machine may lag a little)
    assert 0 < float(p50) <= float(p99), p.stdout
    queued, writing, handoff = map(float, phases.split("/"))  # (the realm's metrics)
    assert writing > 0 and queued >= 0 and handoff >= 0, p.stdout
    medians = p.stdout.split("medians:\n", 1)[1].splitlines()
    assert [m.split(":")[0] for m in medians] == ["  A 200/s", "  A 0/s"], p.stdout
    assert float(closed) > 0, p.stdout
    out = p.stdout + p.stderr
    assert "dmgen: error" not in out, out[-3000:]
