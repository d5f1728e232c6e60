"""File transfer over TLS: one upload and one download through a realm, side by side
with ``openssl s_server``/``s_client`` moving the same bytes (this machine's practical
limit for TLS on loopback), and the realm's memory while it moves them.

    python bench/files.py [--size MIB] [--chunk BYTES] [--json]

Starts ``twistd -n chatrealm`` (TLS listener only, a development certificate, files
limits raised to fit ``--size``) in a temporary directory, registers two users with the
client library (in this process), then times:

- upload: ``Connection.send_file`` from the first data frame to the ``file_finish``
  result (the file's bytes verified and stored, its message committed); the client's
  own sha256 pass before the offer is reported apart;
- download: ``Connection.download`` from the request to the verified, renamed file;
- openssl: ``s_client`` fetching the same file from ``s_server -WWW`` (``GET /FILE``),
  from the client's start until every byte has been read.  (Pushing a file with
  ``s_client < FILE`` to ``s_server`` is not used: OpenSSL 3.0's s_client closes at
  stdin's end before sending a large file.)

The realm's resident memory (VmRSS) is sampled every 20 ms; the figure is the peak
during the transfers minus the value before them.  The realm and this client share the
machine (and, on a shared CI box, the CPUs with everything else): figures vary from run
to run, so compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

MiB = 1024 * 1024
PASSWORD = "bench-password"

CONFIG = """\
[realm]
name = "localhost"
data_dir = "{data_dir}"
listen = []

[auth]
argon2_time_cost = 1
registrations_per_address = 0
argon2_memory_cost = 1024
argon2_parallelism = 1

[limits]
max_frame = {max_frame}
keepalive_interval = 3600.0

[storage]
synchronous = "NORMAL"

[files]
max_file_size = {max_size}
quota_per_user = {quota}
chunk_size = {chunk}

[tls]
certificate = "{cert}"
private_key = "{key}"
port = 0
"""


def log(msg: str) -> None:
    print(f"[files-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_realm(work: Path, certs: dict[str, str], size: int, chunk: int) -> Any:
    cfg = work / "realm.toml"
    cfg.write_text(
        CONFIG.format(
            data_dir=work / "data",
            max_frame=max(65536, chunk + 64),
            max_size=size + MiB,
            quota=4 * (size + MiB),
            chunk=chunk,
            cert=certs["cert"],
            key=certs["key"],
        )
    )
    logfile = work / "twistd.log"
    twistd = shutil.which("twistd", path=str(Path(sys.executable).parent)) or "twistd"
    cmd = [sys.executable, twistd, "-n", "--pidfile=", f"--logfile={logfile}", "chatrealm"]
    cmd += ["--config", str(cfg)]
    proc = subprocess.Popen(
        cmd, cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"realm exited during start-up; see {logfile}")
        text = logfile.read_text(errors="replace") if logfile.exists() else ""
        m = re.search(r"listening on [\d.]+:(\d+)", text)
        if m:
            return proc, int(m.group(1))
        time.sleep(0.05)
    proc.kill()
    sys.exit("realm did not listen within 30 s")


def _listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port`` (from /proc/net/tcp, without
    connecting)."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.split(":")[1], 16) == port:
                return True
    return False


def openssl_transfer(certs: dict[str, str], path: Path) -> float:
    """Seconds for ``openssl s_client`` to fetch ``path`` from ``openssl s_server -WWW``
    over TLS on loopback (the bytes are counted: all must arrive)."""
    port = free_port()
    server = subprocess.Popen(
        ["openssl", "s_server", "-accept", str(port), "-cert", certs["cert"], "-key",
         certs["key"], "-naccept", "1", "-WWW", "-quiet"],
        cwd=path.parent, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        # s_server accepts exactly one connection (-naccept 1): no probing it; wait
        # until it has bound its port
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not _listening(port):
            time.sleep(0.02)
        t0 = time.perf_counter()
        client = subprocess.Popen(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-quiet", "-ign_eof",
             "-CAfile", certs["ca"]],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert client.stdin is not None and client.stdout is not None
        client.stdin.write(f"GET /{path.name} HTTP/1.0\r\n\r\n".encode())
        client.stdin.close()
        got = 0
        while block := client.stdout.read(1 << 20):
            got += len(block)
        client.wait(600)
        elapsed = time.perf_counter() - t0
        if got < path.stat().st_size:
            sys.exit(f"openssl s_client received {got} bytes of {path.stat().st_size}")
        return elapsed
    finally:
        if server.poll() is None:
            server.kill()


def run_clients(port: int, certs: dict[str, str], path: Path, pid: int, report: Path) -> None:
    """The client side (in its own process: ``react`` exits it); figures to ``report``."""
    from twisted.internet import task
    from twisted.internet.defer import ensureDeferred

    from chatproto.client import connect

    out: dict[str, Any] = {}

    async def main(reactor: Any) -> None:
        server = f"tls:127.0.0.1:{port}"
        kw = {"realm": "localhost", "ca": certs["ca"], "register": True}
        alice = await connect(reactor, server, "alice", PASSWORD, **kw)
        bob = await connect(reactor, server, "bob", PASSWORD, **kw)
        size = path.stat().st_size
        base = rss(pid)
        peak = [base]
        sampler = task.LoopingCall(lambda: peak.append(max(peak[-1], rss(pid))))
        sampler.start(0.02)
        t0 = time.perf_counter()
        first: list[float] = []

        def progress(done: int, total: int) -> None:
            if not first:
                first.append(time.perf_counter())

        result = await alice.send_file("bob", str(path), progress=progress)
        t1 = time.perf_counter()
        out["upload_s"] = t1 - first[0]
        out["client_hash_and_offer_s"] = first[0] - t0
        dst = path.with_suffix(".down")
        t2 = time.perf_counter()
        await bob.download(result["file"], str(dst))
        out["download_s"] = time.perf_counter() - t2
        sampler.stop()
        out["rss_before_mib"] = base / MiB
        out["rss_peak_increase_mib"] = (max(peak) - base) / MiB
        out["download_ok"] = dst.stat().st_size == size
        dst.unlink()
        await alice.close()
        await bob.close()
        report.write_text(json.dumps(out))

    task.react(lambda reactor: ensureDeferred(main(reactor)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="MiB to move (default 256)")
    parser.add_argument("--chunk", type=int, default=32768, help="files.chunk_size (default 32768)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:  # the client side, in its own process (react() exits it)
        port, work, pid = args.child
        certs = json.loads((Path(work) / "certs.json").read_text())
        run_clients(int(port), certs, Path(work) / "payload", int(pid), Path(work) / "client.json")
        return

    from chatproto.tls import write_dev_certs

    size = args.size * MiB
    work = Path(tempfile.mkdtemp(prefix="chatproto-files-bench-"))
    realm = None
    try:
        certs = write_dev_certs(str(work / "tls"), "localhost")
        (work / "certs.json").write_text(json.dumps(certs))
        payload = work / "payload"
        with open(payload, "wb") as f:
            for _ in range(args.size):
                f.write(os.urandom(MiB))
        log(f"{args.size} MiB payload written; starting the realm")
        realm, port = start_realm(work, certs, size, args.chunk)
        log(f"realm pid {realm.pid} on TLS port {port}; upload and download")
        child = subprocess.run(
            [sys.executable, __file__, "--child", str(port), str(work), str(realm.pid)],
            timeout=1800,
        )
        if child.returncode not in (0, None) or not (work / "client.json").exists():
            sys.exit(f"client side failed ({child.returncode}); see {work}/twistd.log")
        figures = json.loads((work / "client.json").read_text())
        log("openssl s_server/s_client with the same bytes")
        figures["openssl_s"] = openssl_transfer(certs, payload)
    finally:
        if realm is not None and realm.poll() is None:
            os.killpg(realm.pid, signal.SIGTERM)
            realm.wait(20)
    mb = size / MiB
    up = mb / figures["upload_s"]
    down = mb / figures["download_s"]
    ref = mb / figures["openssl_s"]
    result = {
        "size_mib": args.size,
        "chunk": args.chunk,
        "upload_mib_s": round(up, 1),
        "download_mib_s": round(down, 1),
        "openssl_mib_s": round(ref, 1),
        "upload_ratio": round(up / ref, 3),
        "download_ratio": round(down / ref, 3),
        "client_hash_and_offer_s": round(figures["client_hash_and_offer_s"], 2),
        "realm_rss_before_mib": round(figures["rss_before_mib"], 1),
        "realm_rss_peak_increase_mib": round(figures["rss_peak_increase_mib"], 1),
        "download_ok": figures["download_ok"],
    }
    shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
        return
    print(f"file transfer over TLS on loopback, {args.size} MiB, chunk {args.chunk} bytes")
    print(f"  upload   (realm)     {up:8.1f} MiB/s   {up / ref:6.1%} of openssl")
    print(f"  download (realm)     {down:8.1f} MiB/s   {down / ref:6.1%} of openssl")
    print(f"  openssl s_server -WWW -> s_client {ref:8.1f} MiB/s")
    print(f"  client sha256 + offer before the upload: {result['client_hash_and_offer_s']} s")
    print(
        f"  realm RSS: {result['realm_rss_before_mib']} MiB before, "
        f"+{result['realm_rss_peak_increase_mib']} MiB peak during the transfers"
    )


if __name__ == "__main__":
    main()
