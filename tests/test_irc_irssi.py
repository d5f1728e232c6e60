"""End to end: a real irssi (Debian's), driven in tmux, against a realm on loopback.

irssi logs in with SASL PLAIN, joins a channel, talks in it and in a DM with a native
protocol user, and sees the native user's answers.  The screen is read with
``tmux capture-pane``.  Skipped when irssi or tmux is missing, except under CI (where
.ci/run installs them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor

from chatproto.client import connect
from chatproto.irc import IRCFactory
from chatproto.protocol import ClientFactory
from tests.conftest import fast_config, make_realm, until

HAVE_TOOLS = bool(shutil.which("irssi") and shutil.which("tmux"))
pytestmark = pytest.mark.skipif(
    not HAVE_TOOLS and not os.environ.get("CI"), reason="irssi and tmux are not installed"
)

PW = "irssi-password"

IRSSI_CONFIG = """
servers = (
  {{
    address = "127.0.0.1";
    chatnet = "realm";
    port = "{port}";
    use_tls = "no";
    autoconnect = "yes";
  }}
);
chatnets = {{
  realm = {{
    type = "IRC";
    sasl_mechanism = "PLAIN";
    sasl_username = "alice";
    sasl_password = "{password}";
  }};
}};
settings = {{
  core = {{ real_name = "Alice"; user_name = "alice"; nick = "alice"; }};
  "irc/core" = {{ cmd_queue_speed = "10msec"; cmds_max_at_once = "50"; }};
  "fe-common/core" = {{ autocreate_query_level = "MSGS"; }};
}};
"""


class Tmux:
    """One tmux server (its own socket) running irssi."""

    def __init__(self, tmp_path: Any) -> None:
        self.socket = str(tmp_path / "tmux.sock")

    def run(self, *args: str) -> str:
        out = subprocess.run(
            ["tmux", "-S", self.socket, *args], capture_output=True, text=True, timeout=10
        )
        return out.stdout

    def screen(self) -> str:
        self.last = self.run("capture-pane", "-p", "-J", "-S", "-200", "-t", "irc")
        return self.last

    def keys(self, text: str) -> None:
        self.run("send-keys", "-t", "irc", "-l", text)
        self.run("send-keys", "-t", "irc", "Enter")


@pytest_twisted.inlineCallbacks
def test_irssi_in_tmux(tmp_path: Any) -> Any:
    cfg = fast_config(tmp_path)
    cfg.irc.enabled = True
    cfg.irc.flood_rate = 0.0
    cfg.irc.motd = "chatproto e2e"
    realm = make_realm(cfg)
    yield realm.startService()
    yield realm.create_user("alice", PW)
    irc_factory = IRCFactory(realm)
    irc_port = _reactor.listenTCP(0, irc_factory, interface="127.0.0.1")
    native = ClientFactory(realm)
    native_port = _reactor.listenTCP(0, native, interface="127.0.0.1")
    home = tmp_path / "irssi"
    home.mkdir()
    (home / "config").write_text(IRSSI_CONFIG.format(port=irc_port.getHost().port, password=PW))
    tmux = Tmux(tmp_path)
    got: list[dict[str, Any]] = []
    bob = None
    try:
        tmux.run(
            "new-session", "-d", "-s", "irc", "-x", "160", "-y", "50",
            f"TERM=screen irssi --home={home}",
        )  # fmt: skip
        yield until(lambda: "chatproto e2e" in tmux.screen(), timeout=20)  # MOTD: logged in
        assert "alice" in [s.user.name for ss in realm.sessions.online.values() for s in ss]
        bob = yield connect(
            _reactor,
            f"tcp:127.0.0.1:{native_port.getHost().port}",
            "bob",
            "bob-password",
            register=True,
            on_message=got.append,
        )
        yield bob.synced
        # A channel: irssi creates it, bob joins natively, both talk.
        tmux.keys("/join #e2e")
        yield until(lambda: "#e2e@localhost" in realm.groups.groups, timeout=20)
        # irssi's channel sync (MODE, WHO, ban list) gets every reply it waits for.
        yield until(lambda: "Join to #e2e was synced" in tmux.screen(), timeout=20)
        yield bob.join("#e2e@localhost")
        yield until(lambda: "bob" in tmux.screen() and "has joined" in tmux.screen(), timeout=20)
        tmux.keys("hello from irssi")
        yield until(lambda: any(m.get("body") == "hello from irssi" for m in got), timeout=20)
        yield bob.send("#e2e@localhost", "native says hi")
        yield until(lambda: "native says hi" in tmux.screen(), timeout=20)
        # A DM both ways.
        tmux.keys("/msg bob private words")
        yield until(
            lambda: any(
                m.get("body") == "private words" and m.get("to") == "bob@localhost" for m in got
            ),
            timeout=20,
        )
        yield bob.send("alice", "private answer")
        tmux.keys("/query bob")  # the DM is in its own window: show it
        yield until(lambda: "private answer" in tmux.screen(), timeout=20)
        tmux.keys("/quit bye")
        yield until(lambda: not irc_factory.connections, timeout=20)
    except Exception:
        print(getattr(tmux, "last", "(no screen)"))
        raise
    finally:
        tmux.run("kill-server")
        if bob is not None:
            yield bob.close()
        for proto in list(irc_factory.connections):
            proto.transport.abortConnection()
        yield irc_port.stopListening()
        yield native_port.stopListening()
        yield realm.stopService()
