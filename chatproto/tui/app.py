"""Entry point of ``chatproto tui``: urwid's main loop on the Twisted reactor.

urwid is used with its ``TwistedEventLoop``: the terminal's file descriptor is one more
reader on the reactor, beside the realm connection, so network callbacks and key
presses run on one thread with no locking and the client library's Deferreds are used
as they are.  (Textual and prompt_toolkit run on asyncio; with them the Twisted client
would need the asyncio reactor and two event-loop idioms in one program.)

:class:`App` switches between the login form and the chat screen, saves the login
(never the password) on success, redraws once per reactor turn after model changes,
and closes the connection (acks flushed) on ``/quit``, Ctrl-C or SIGTERM.  Twisted's
log goes to ``--log FILE`` or nowhere: the screen is the only output.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import urwid
from twisted.internet.defer import Deferred
from twisted.logger import globalLogBeginner, textFileLogObserver

from chatproto.tui import settings as settings_mod
from chatproto.tui.controller import ChatController, LoginError
from chatproto.tui.model import ChatModel
from chatproto.tui.view import PALETTE, ChatView, LoginView

__all__ = ["App", "main", "run"]


class App:
    """The running client: one model, one controller, two screens."""

    def __init__(
        self,
        reactor: Any,
        settings: settings_mod.Settings,
        settings_path: str | None,
        *,
        password: str = "",
        screen: Any = None,
        remember: bool = True,
    ) -> None:
        self.reactor = reactor
        self.settings = settings
        self.settings_path = settings_path
        self.model = ChatModel()
        self.controller = ChatController(
            reactor,
            self.model,
            on_quit=self.quit,
            conversations_path=settings_mod.state_path if remember else None,
            downloads=settings.downloads or settings_mod.download_dir(),
        )
        values = {
            "server": settings.server,
            "user": settings.user,
            "password": password,
            "realm": settings.realm,
            "ca": settings.ca,
        }
        self.login = LoginView(values, self.submit)
        self.chat = ChatView(self.model, self.controller)
        self.model.subscribe(self._changed)
        self._redraw: Any = None
        self.loop = urwid.MainLoop(
            self.login,
            PALETTE,
            screen=screen,
            event_loop=urwid.TwistedEventLoop(reactor, manage_reactor=True),
            handle_mouse=False,
            unhandled_input=self._unhandled,
        )
        self._stopping = False

    def _unhandled(self, key: Any) -> bool:
        if key in ("ctrl c",):
            self.quit()
            return True
        return False

    def _changed(self) -> None:
        # Coalesce: a backlog of a thousand items is one refresh, one draw.
        if self._redraw is None:
            self._redraw = self.reactor.callLater(0, self._draw)

    def _draw(self) -> None:
        self._redraw = None
        if self.loop.widget is self.chat and self.model.connection == "failed":
            # The realm refused a reconnect for good (password changed, account gone).
            self.login.set_message(self.model.connection_detail, error=True)
            self.loop.widget = self.login
        if self.loop.widget is self.chat:
            self.chat.refresh()
        if self.loop.screen.started:
            self.loop.draw_screen()

    def submit(self, values: dict[str, Any]) -> Deferred[None]:
        """Log in with the form's values; on success show the chat screen."""
        self.login.busy = True
        self.login.set_message(f"connecting to {values['server']} ...")
        self._changed()
        d = self.controller.login(
            values["server"],
            values["user"],
            values["password"],
            realm=values["realm"],
            ca=values["ca"],
            device=self.settings.device or "tui",
            register=bool(values["register"]),
        )

        def ok(_: Any) -> None:
            self.login.busy = False
            self.login.fields["password"].set_edit_text("")
            self.settings.server = values["server"]
            self.settings.user = values["user"]
            self.settings.realm = values["realm"]
            self.settings.ca = values["ca"]
            if self.settings_path is not None:
                try:
                    settings_mod.save(self.settings_path, self.settings)
                except OSError as e:
                    self.model.notice(f"cannot save {self.settings_path}: {e.strerror or e}")
            self.model.notice(
                f"logged in as {self.model.me}. /help lists the commands; "
                "Ctrl-N/Ctrl-P switch conversations."
            )
            self.loop.widget = self.chat
            self._changed()

        def failed(failure: Any) -> None:
            self.login.busy = False
            text = str(failure.value) if failure.check(LoginError) else repr(failure.value)
            self.login.set_message(text, error=True)
            self._changed()

        return d.addCallbacks(ok, failed)

    def quit(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        d = self.controller.stop()
        d.addBoth(lambda _: self.reactor.stop() if self.reactor.running else None)

    def run(self) -> None:
        def on_shutdown() -> Any:
            # Ctrl-C (SIGINT) or SIGTERM stop the reactor: close the connection first.
            self._stopping = True
            return self.controller.stop()

        self.reactor.addSystemEventTrigger("before", "shutdown", on_shutdown)
        self.reactor.callWhenRunning(_no_flow_control)
        self.loop.run()


def _no_flow_control() -> None:
    """Let Ctrl-S and Ctrl-Q through as keys instead of freezing the terminal (XON/XOFF).

    urwid has saved the terminal's settings when it started the screen and restores
    them on exit, this change included.
    """
    try:
        import termios

        attrs = termios.tcgetattr(sys.stdin.fileno())
        attrs[0] &= ~termios.IXON
        termios.tcsetattr(sys.stdin.fileno(), termios.TCSANOW, attrs)
    except (ImportError, OSError, ValueError):
        pass  # not a POSIX terminal: flow control stays as it was


def run(args: argparse.Namespace) -> int:
    """Run the TUI for parsed ``chatproto`` arguments; returns the exit status."""
    from chatproto import cli

    path = args.config or settings_mod.config_path()
    try:
        settings = settings_mod.load(path)
    except ValueError as e:
        sys.stderr.write(f"chatproto: {e}\n")
        return 2
    # Options given on the command line win over the remembered ones.
    # (--server and --device have defaults of their own in the parser: "given" means
    # different from those.)
    given = {
        "server": args.server if args.server != cli.DEFAULT_SERVER else None,
        "user": args.user,
        "realm": args.realm,
        "ca": args.ca,
        "device": args.device if args.device != "cli" else None,
    }
    for name, value in given.items():
        if value:
            setattr(settings, name, value)
    if not sys.stdin.isatty() or not sys.stdout.isatty():
        sys.stderr.write("chatproto: tui needs a terminal\n")
        return 2
    if args.log:
        try:
            log: Any = open(args.log, "a", encoding="utf-8")  # open until exit
        except OSError as e:
            sys.stderr.write(f"chatproto: --log {args.log}: {e.strerror or e}\n")
            return 2
        observer: Any = textFileLogObserver(log)
    else:
        observer = lambda event: None  # noqa: E731
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    from twisted.internet import reactor

    app = App(
        reactor,
        settings,
        path,
        password=os.environ.get("CHATPROTO_PASSWORD", ""),
        screen=urwid.raw_display.Screen(bracketed_paste_mode=True),
    )
    app.run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``chatproto-tui``: the same as ``chatproto tui``."""
    from chatproto import cli

    return cli.main(["tui", *(sys.argv[1:] if argv is None else argv)])
