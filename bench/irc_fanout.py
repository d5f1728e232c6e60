"""IRC fan-out: the chatproto IRC gateway and ngircd side by side, same workload.

    python bench/irc_fanout.py                       # R=100 members, M=20000 messages
    python bench/irc_fanout.py --members 10,100,500 --messages 20000 --window 2000
    python bench/irc_fanout.py --skip-ngircd --profile /tmp/irc.prof

Workload (identical for both servers): R receiver connections and one sender join one
channel; the sender sends M ``PRIVMSG #bench :<seq> <send-time-ns>`` lines, keeping at
most ``--window`` messages in flight (sent but not yet seen by the first receiver); every
receiver counts the PRIVMSG lines it gets.  Printed per server:

- deliveries/s: R * M / (time of the last delivery - time of the first send);
- p50/p99 latency (ms): for each read of each receiver, the age of the newest message in
  that read (send time to receipt);
- server CPU seconds used during the run (``/proc/PID/stat``) and deliveries per server
  CPU second (less sensitive to other load on the machine than deliveries/s), and the
  ratios chatproto/ngircd of both.

chatproto runs as ``twistd -n chatrealm`` with ``[irc] enabled`` (flood limit off,
``limits.send_rate`` 1e9, ``storage.synchronous = NORMAL``: every message is still
committed to SQLite before it is delivered).  Users register over the native protocol
(cheap argon2) and log in over IRC with PASS.  ngircd (Debian's ``/usr/sbin/ngircd``)
runs from a temporary config with ``MaxPenaltyTime = 0`` (no penalty, i.e. no flood
limit), ``MaxConnectionsIP = 0``, no PAM/ident/DNS.  The load generator is this process
(non-blocking sockets and ``selectors``; counting with ``bytes.count``).  Both servers
and the load generator share the machine's cores: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "bench-password"
CHANNEL = b"#bench"
PATTERN = b" PRIVMSG #bench :"


class BenchError(Exception):
    """A run that cannot go on (a server exited, a client was disconnected...)."""


# Every server process this bench started; kill_children() ends them all (their own
# process groups: twistd and ngircd run with start_new_session=True).
CHILDREN: list[subprocess.Popen[Any]] = []


def spawn(cmd: list[str], **kw: Any) -> subprocess.Popen[Any]:
    """Start a server in a process group of its own, remembered for kill_children()."""
    proc = subprocess.Popen(cmd, start_new_session=True, stdin=subprocess.DEVNULL, **kw)
    CHILDREN.append(proc)
    return proc


def kill_children() -> None:
    for proc in list(CHILDREN):
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        CHILDREN.remove(proc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[Any], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise BenchError(f"server exited ({proc.returncode}); log:\n{text}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    text = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    raise BenchError(f"server did not listen on {port} in {timeout} s; log:\n{text}")


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """CPU time of a process, all its threads, or of one thread (utime + stime, in
    clock ticks: 10 ms resolution)."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuSample:
    """CPU time of a server process at one moment, for :func:`cpu_used`.

    ``tasks``: ns on CPU per thread from ``/proc/PID/task/*/schedstat`` (nanosecond
    resolution; ``/proc/PID/stat`` counts 10 ms ticks, too coarse for an ngircd run
    of 0.2 s of CPU); ``ticks_s``: utime + stime of the whole process from
    ``/proc/PID/stat``, which keeps the time of threads that have exited.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.ticks_s = cpu_seconds(pid)
        self.main_ticks_s = cpu_seconds(pid, pid)
        self.tasks: dict[str, int] = {}
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                self.tasks[task.name] = int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            self.tasks = {}  # a thread went away mid-read, or no schedstat: ticks only


def cpu_used(a: CpuSample, b: CpuSample) -> tuple[float, float]:
    """(all threads, main thread) CPU seconds from sample ``a`` to sample ``b``.

    The schedstat figures of the threads still there in ``b`` (threads started in
    between count from zero): exact, nanoseconds.  A thread that exited took its
    schedstat with it (chatproto's password-hashing pool lets idle threads go), so that
    sum is only a lower bound; the process's clock ticks (``/proc/PID/stat``, which keep
    the time of exited threads, +-1 tick) decide: when they exceed the lower bound by
    more than two ticks, the exited thread did work in the window and the ticks are the
    figure.
    """
    main = str(a.pid)
    ticks = b.ticks_s - a.ticks_s
    if main not in a.tasks or main not in b.tasks:
        return ticks, b.main_ticks_s - a.main_ticks_s
    main_s = (b.tasks[main] - a.tasks[main]) / 1e9
    lower = (sum(b.tasks.values()) - sum(v for t, v in a.tasks.items() if t in b.tasks)) / 1e9
    if a.tasks.keys() <= b.tasks.keys() or ticks - lower <= 2 / os.sysconf("SC_CLK_TCK"):
        return lower, main_s
    return ticks, main_s


def system_busy_ns() -> int:
    """CPU time all processes spent busy (all cores), from /proc/stat, in ns (10 ms ticks)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    ticks = sum(v[:8]) - v[3] - v[4]  # user nice system idle iowait irq softirq steal
    return int(ticks * 1e9 / os.sysconf("SC_CLK_TCK"))


# servers ------------------------------------------------------------------------------


class Server:
    name = ""
    proc: subprocess.Popen[Any]
    port = 0
    password: str | None = None

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self.proc in CHILDREN:
            CHILDREN.remove(self.proc)

    def profile(self, on: bool) -> None:
        pass


class ChatprotoServer(Server):
    name = "chatproto"
    password = PASSWORD

    def __init__(
        self, tmp: Path, users: int, profile: str | None, synchronous: str = "NORMAL"
    ) -> None:
        self.synchronous = synchronous
        self.port = free_port()
        self.native = free_port()
        conf = tmp / "realm.toml"
        conf.write_text(
            f"""
[realm]
data_dir = "{tmp / "data"}"
listen = ["tcp:{self.native}:interface=127.0.0.1"]
[limits]
send_rate = 1e9
send_burst = 1000000000
max_sessions_per_user = 1000000
max_members_per_group = 1000000
keepalive_interval = 3600.0
max_unauthenticated_per_address = 0
max_unauthenticated = 100000
login_timeout = 3600.0
max_output_buffer = 1073741824
[auth]
argon2_time_cost = 1
registrations_per_address = 0
argon2_memory_cost = 1024
argon2_parallelism = 1
free_failures_per_address = 1000000
[storage]
synchronous = "{synchronous}"
[irc]
enabled = true
listen = ["tcp:{self.port}:interface=127.0.0.1"]
flood_rate = 0.0
"""
        )
        self.log = tmp / "realm.log"
        wrapper = [sys.executable, str(ROOT / "bench" / "twistd_wrapper.py")]
        if profile:
            wrapper += ["--profile", profile, "--profile-signals"]
        twistd = [*wrapper, "--", "-n", "--pidfile=", f"--logfile={self.log}", "chatrealm"]
        self.proc = spawn([*twistd, "--config", str(conf)], cwd=tmp)
        wait_port(self.port, self.proc, self.log)
        wait_port(self.native, self.proc, self.log)
        self.register(users)

    def register(self, users: int) -> None:
        """Accounts u0..u<users-1> through the native protocol's register request."""
        s = socket.create_connection(("127.0.0.1", self.native), timeout=30)
        buf = b""

        def request(obj: dict[str, Any]) -> dict[str, Any]:
            nonlocal buf
            payload = json.dumps(obj).encode()
            s.sendall(struct.pack("!I", len(payload)) + payload)
            while True:
                if len(buf) >= 4:
                    (n,) = struct.unpack("!I", buf[:4])
                    if len(buf) >= 4 + n:
                        frame, buf = json.loads(buf[4 : 4 + n]), buf[4 + n :]
                        if frame.get("id") == obj["id"]:
                            return frame
                        continue
                chunk = s.recv(65536)
                if not chunk:
                    raise BenchError("realm closed the registration connection")
                buf += chunk

        request({"type": "hello", "version": 1, "id": 0})
        for i in range(users):
            r = request({"type": "register", "id": i + 1, "user": f"u{i}", "password": PASSWORD})
            if r.get("type") != "result" and r.get("code") != "user_exists":
                raise BenchError(f"register u{i}: {r}")
        s.close()

    def profile(self, on: bool) -> None:
        os.kill(self.proc.pid, signal.SIGUSR1 if on else signal.SIGUSR2)


class NgircdServer(Server):
    name = "ngircd"

    def __init__(self, tmp: Path, binary: str) -> None:
        self.port = free_port()
        conf = tmp / "ngircd.conf"
        (tmp / "motd").write_text("bench\n")
        conf.write_text(
            f"""
[Global]
Name = bench.ngircd
Info = bench
Ports = {self.port}
Listen = 127.0.0.1
MotdFile = {tmp / "motd"}
PidFile = {tmp / "ngircd.pid"}
[Limits]
MaxConnections = 0
MaxConnectionsIP = 0
MaxJoins = 0
MaxNickLength = 32
MaxPenaltyTime = 0
PingTimeout = 3600
PongTimeout = 3600
[Options]
DNS = no
Ident = no
PAM = no
"""
        )
        self.log = tmp / "ngircd.log"
        with open(self.log, "wb") as out:
            self.proc = spawn([binary, "-n", "-f", str(conf)], stdout=out, stderr=subprocess.STDOUT)
        wait_port(self.port, self.proc, self.log)


# load -----------------------------------------------------------------------------------


class Conn:
    def __init__(self, port: int, nick: str, password: str | None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.nick = nick
        self.tail = b""
        self.count = 0
        login = b"PASS %s\r\n" % password.encode() if password else b""
        self.sock.sendall(login + f"NICK {nick}\r\nUSER {nick} 0 * :bench\r\n".encode())

    def expect(self, needle: bytes, timeout: float = 30) -> None:
        """Read (blocking) until ``needle`` has been seen."""
        self.sock.settimeout(timeout)
        data = self.tail
        while needle not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise BenchError(
                    f"{self.nick}: connection closed while waiting for {needle!r}: {data[-500:]!r}"
                )
            data = data[-4096:] + chunk
            if b"PING " in chunk:
                for line in chunk.split(b"\r\n"):
                    if line.startswith(b"PING "):
                        self.sock.sendall(b"PONG " + line[5:] + b"\r\n")
        self.tail = b""

    def drain(self) -> None:
        self.sock.setblocking(False)
        try:
            while self.sock.recv(1 << 20):
                pass
        except BlockingIOError:
            pass


def run_workload(
    server: Server, members: int, messages: int, window: int, timeout: float = 120
) -> dict[str, Any]:
    sender = Conn(server.port, "u0", server.password)
    sender.expect(b" 001 ")
    sender.sock.sendall(b"JOIN #bench\r\n")
    sender.expect(b" 366 ")
    receivers = []
    for i in range(1, members + 1):
        c = Conn(server.port, f"u{i}", server.password)
        receivers.append(c)
    for c in receivers:
        c.expect(b" 001 ")
        c.sock.sendall(b"JOIN #bench\r\n")
    for c in receivers:
        c.expect(b" 366 ")
    time.sleep(0.5)
    for c in [sender, *receivers]:
        c.drain()
    sel = selectors.DefaultSelector()
    for c in receivers:
        c.sock.setblocking(False)
        sel.register(c.sock, selectors.EVENT_READ, c)
    sender.sock.setblocking(False)
    probe = receivers[0]
    lat: list[float] = []
    sent = 0
    pending = b""
    done = 0
    cpu0 = CpuSample(server.proc.pid)
    sys0 = system_busy_ns()
    me0 = sum(os.times()[:2])
    server.profile(True)
    t0 = time.perf_counter()
    deadline = time.monotonic() + timeout
    last = t0
    while done < len(receivers):
        if time.monotonic() > deadline:
            break
        if pending:
            try:
                n = sender.sock.send(pending)
                pending = pending[n:]
            except BlockingIOError:
                pass
        elif sent < messages and sent - probe.count < window:
            k = min(window - (sent - probe.count), messages - sent, 200)
            now = time.perf_counter_ns()
            pending = b"".join(b"PRIVMSG #bench :%d %d\r\n" % (sent + j, now) for j in range(k))
            sent += k
            continue
        for key, _ in sel.select(0.005):
            c = key.data
            try:
                data = c.sock.recv(1 << 20)
            except BlockingIOError:
                continue
            if not data:
                raise BenchError(
                    f"{server.name}: {c.nick} was disconnected after {c.count} messages"
                )
            now_ns = time.perf_counter_ns()
            data = c.tail + data
            end = data.rfind(b"\n") + 1
            c.tail = data[end:]
            got = data.count(PATTERN, 0, end)
            if got:
                before = c.count
                c.count += got
                start = data.rfind(PATTERN, 0, end)
                fields = data[start + len(PATTERN) : data.index(b"\r", start)].split()
                lat.append((now_ns - int(fields[1])) / 1e6)
                if before < messages <= c.count:
                    done += 1
                    last = time.perf_counter()
        # keep the sender's input drained (numerics, pings)
        try:
            while sender.sock.recv(1 << 16):
                pass
        except BlockingIOError:
            pass
    server.profile(False)
    elapsed = last - t0
    cpu, cpu_main = cpu_used(cpu0, CpuSample(server.proc.pid))
    system = (system_busy_ns() - sys0) / 1e9
    wall = time.perf_counter() - t0
    me = sum(os.times()[:2]) - me0
    total = sum(min(c.count, messages) for c in receivers)
    for c in [sender, *receivers]:
        c.sock.close()
    lat.sort()

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")

    return {
        "server": server.name,
        "members": members,
        "messages": messages,
        "window": window,
        "complete": done == len(receivers),
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
        # CPU of everything else on the machine during the run, % of one core
        "other_cpu_pct": round(100 * (system - cpu - me) / wall, 1) if wall > 0 else None,
    }


def interrupt_on_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt, so ``finally: kill_children()`` runs."""

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)


def main() -> None:
    interrupt_on_sigterm()
    try:
        _main()
    except BenchError as e:
        sys.exit(f"irc_fanout: {e}")
    except KeyboardInterrupt:
        sys.exit("irc_fanout: interrupted; servers killed")
    finally:
        kill_children()


def _main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--members", default="100", help="comma-separated R values (default 100)")
    ap.add_argument("--messages", type=int, default=20000, help="M (default 20000)")
    ap.add_argument("--window", type=int, default=1000, help="messages in flight (default 1000)")
    ap.add_argument("--skip-ngircd", action="store_true")
    ap.add_argument("--skip-chatproto", action="store_true")
    ap.add_argument("--ngircd", default=shutil.which("ngircd") or "/usr/sbin/ngircd")
    ap.add_argument("--profile", help="cProfile the realm's reactor thread during the runs")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    sizes = [int(x) for x in args.members.split(",") if x]
    results: list[dict[str, Any]] = []
    have_ngircd = os.path.exists(args.ngircd) and not args.skip_ngircd
    if not have_ngircd and not args.skip_ngircd:
        print(f"ngircd not found at {args.ngircd}: measuring chatproto only")
    for members in sizes:
        row: dict[str, dict[str, Any]] = {}
        if not args.skip_chatproto:
            with tempfile.TemporaryDirectory(prefix="irc-bench-") as tmp:
                server: Server = ChatprotoServer(Path(tmp), members + 1, args.profile)
                try:
                    row["chatproto"] = run_workload(server, members, args.messages, args.window)
                finally:
                    server.stop()
        if have_ngircd:
            with tempfile.TemporaryDirectory(prefix="irc-bench-") as tmp:
                server = NgircdServer(Path(tmp), args.ngircd)
                try:
                    row["ngircd"] = run_workload(server, members, args.messages, args.window)
                finally:
                    server.stop()
        results.extend(row.values())
        print(
            f"\nIRC fan-out: R={members} members, M={args.messages} messages, window {args.window}"
        )
        print(
            f"  {'server':<10} {'deliveries/s':>13} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'seconds':>8} {'server CPU s':>13} {'per CPU s':>10} {'us/deliv':>9} "
            f"{'loadgen CPU s':>14}  complete"
        )
        for r in row.values():
            print(
                f"  {r['server']:<10} {r['deliveries_per_s']:>13,} {r['p50_ms']:>8} "
                f"{r['p99_ms']:>8} {r['seconds']:>8} {r['server_cpu_s']:>13} "
                f"{r['deliveries_per_cpu_s']:>10,} {r['server_us_per_delivery']:>9} "
                f"{r['loadgen_cpu_s']:>14}  {r['complete']}"
            )
        if "chatproto" in row and "ngircd" in row and row["ngircd"]["deliveries_per_s"]:
            ratio = row["chatproto"]["deliveries_per_s"] / row["ngircd"]["deliveries_per_s"]
            c, n = row["chatproto"]["deliveries_per_cpu_s"], row["ngircd"]["deliveries_per_cpu_s"]
            print(
                f"  ratio chatproto/ngircd: {ratio:.2f} (deliveries/s), "
                f"{c / n if n else 0:.2f} (deliveries per server CPU second)"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
