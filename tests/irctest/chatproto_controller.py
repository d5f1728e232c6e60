"""irctest controller for the chatproto IRC gateway (see tests/irctest/README.md).

Every test gets a fresh realm (``twistd -n chatrealm``) with the IRC gateway on the
port irctest chose.  Accounts: the first ``NICK`` a test client sends creates a realm
account of that name (native ``register`` request) and ``PASS`` is sent before it, so
the gateway logs the nick in.  With CHATPROTO_IRCTEST_GUESTS=1 the gateway runs with
``[irc] guests = true`` and nothing is injected.

Env: CHATPROTO_TWISTD (twistd of a venv with chatproto installed; default: the
``twistd`` on PATH), CHATPROTO_SRC (run another checkout's code: put on PYTHONPATH).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import struct
import time
from pathlib import Path
from typing import Any

from irctest import client_mock
from irctest.basecontrollers import (
    BaseServerController,
    DirectoryBasedController,
    NotImplementedByController,
)

TWISTD = os.environ.get("CHATPROTO_TWISTD") or shutil.which("twistd") or "twistd"
GUESTS = os.environ.get("CHATPROTO_IRCTEST_GUESTS") == "1"
DEFAULT_PASSWORD = "irctest-password"

_current: ChatprotoController | None = None
#: Every realm process started: killed when the worker exits, so that a test that
#: ends without the controller's kill (a failing set-up) leaves no realm running.
_started: list = []


def _kill_started() -> None:
    for proc in _started:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


atexit.register(_kill_started)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Native:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""
        self.ids = 0
        self.request({"type": "hello", "version": 1})

    def request(self, obj: dict) -> dict:
        self.ids += 1
        obj = {**obj, "id": self.ids}
        payload = json.dumps(obj).encode()
        self.sock.sendall(struct.pack("!I", len(payload)) + payload)
        while True:
            if len(self.buf) >= 4:
                (n,) = struct.unpack("!I", self.buf[:4])
                if len(self.buf) >= 4 + n:
                    frame, self.buf = json.loads(self.buf[4 : 4 + n]), self.buf[4 + n :]
                    if frame.get("id") == obj["id"]:
                        return frame
                    continue
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("realm closed the native connection")
            self.buf += chunk


_orig_send = client_mock.ClientMock.sendLine


def _send_line(self: Any, line: Any) -> None:
    ctl = _current
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    if (
        ctl is not None
        and not GUESTS
        and not getattr(self, "_cp_pass_sent", False)
        and text.upper().startswith("NICK ")
    ):
        nick = text.split()[1] if len(text.split()) > 1 else ""
        nick = nick.lstrip(":")
        self._cp_pass_sent = True
        if nick:
            ctl.ensure_account(nick)
            _orig_send(self, f"PASS {ctl.account_password}")
    _orig_send(self, line)


client_mock.ClientMock.sendLine = _send_line  # type: ignore[method-assign]


class ChatprotoController(BaseServerController, DirectoryBasedController):
    software_name = "chatproto"
    supported_sasl_mechanisms: set[str] = {"PLAIN"}
    supports_sts = False

    def run(
        self,
        hostname: str,
        port: int,
        *,
        password: str | None,
        ssl: bool,
        run_services: bool,
        faketime: str | None,
        websocket_hostname: str | None,
        websocket_port: int | None,
    ) -> None:
        global _current
        if websocket_hostname is not None or websocket_port is not None:
            raise NotImplementedByController("Websocket")
        if ssl:
            raise NotImplementedByController("TLS")
        assert self.proc is None
        self.create_config()
        assert self.directory
        self.port = port
        self.hostname = hostname
        self.native_port = _free_port()
        self.account_password = password or DEFAULT_PASSWORD
        self.accounts: set = set()
        self._native: _Native | None = None
        d = Path(self.directory)
        guests = ""
        if GUESTS:  # irctest connects many clients from one address, and floods
            guests = (
                "guests = true\nguests_per_address = 1000\n"
                "guest_send_rate = 1e9\nguest_send_burst = 1000000000"
            )
        (d / "realm.toml").write_text(f"""
[realm]
name = "my.little.server"
data_dir = "{d / "data"}"
listen = ["tcp:{self.native_port}:interface=127.0.0.1"]
[limits]
send_rate = 1e9
send_burst = 1000000000
[auth]
argon2_time_cost = 1
registrations_per_address = 0
argon2_memory_cost = 1024
argon2_parallelism = 1
free_failures_per_address = 1000000
[storage]
synchronous = "NORMAL"
[irc]
enabled = true
server_name = "My.Little.Server"
listen = ["tcp:{port}:interface={hostname}"]
tls_port = 0
flood_rate = 0.0
motd = "irctest"
{guests}
""")
        env = None
        if os.environ.get("CHATPROTO_SRC"):  # run another checkout's code
            env = {**os.environ, "PYTHONPATH": os.environ["CHATPROTO_SRC"]}
        argv = [TWISTD, "-n", "--pidfile=", f"--logfile={d / 'realm.log'}"]
        argv += ["chatrealm", "--config", str(d / "realm.toml")]
        self.proc = self.execute(argv, cwd=str(d), env=env)
        _started.append(self.proc)
        _current = self

    def wait_for_port(self) -> None:
        if not self.port_open:
            deadline = time.time() + 60
            while True:
                self.check_is_alive()
                try:
                    socket.create_connection(("127.0.0.1", self.native_port), timeout=1).close()
                    break
                except OSError:
                    if time.time() > deadline:
                        raise
                    time.sleep(0.05)
        super().wait_for_port()

    def ensure_account(self, nick: str) -> None:
        key = nick.lower()
        if key in self.accounts:
            return
        self.accounts.add(key)
        if self._native is None:
            self._native = _Native(self.native_port)
        try:
            register = {"type": "register", "user": nick, "password": self.account_password}
            self._native.request(register)
        except Exception:
            pass

    def kill(self) -> None:
        global _current
        if self._native_sock_open():
            try:
                self._native.sock.close()  # type: ignore[union-attr]
            except OSError:
                pass
        if _current is self:
            _current = None
        super().kill()

    def _native_sock_open(self) -> bool:
        return getattr(self, "_native", None) is not None


def get_irctest_controller_class() -> type:
    return ChatprotoController
