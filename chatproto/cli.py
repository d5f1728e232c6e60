"""The ``chatproto`` command: a terminal client built only on :mod:`chatproto.client`.

It sits beside the realm's own ``twistd`` plugin as the smallest useful client: argparse
in :func:`main`, then one coroutine per subcommand run on the reactor with
``twisted.internet.task.react``.  Anything that could block (password prompts,
reading a message body from stdin) happens before the reactor starts.

Groups are addressed as ``#name`` (or ``#name@realm``) wherever a peer is expected
(``send``, ``history``); the group commands (``groups``, ``create``, ``join``,
``leave``, ``invite``, ``kick``, ``ban``, ``unban``, ``topic``, ``role``, ``members``,
``info``, ``delete``) take the group with or without its ``#``.  ``listen`` prints
group events ("bob joined") and presence ("* bob is online") as well as messages.

Acknowledgements are kept per device.  ``listen`` logs in as ``--device`` (default
``cli``) and resumes after that device's last ack, so it sees every message once.  The
one-shot commands (every command but ``listen``) log in as ``<device>-oneshot``
resuming after :data:`chatproto.client.ONESHOT_SINCE`, beyond any real position: the
realm streams them nothing, so they acknowledge nothing.  That matters because the
realm starts a device it has not seen at its user's furthest ack: a one-shot login that
acknowledged the backlog would hide it from the first ``listen``.

``send --reply-to MSG_ID``, ``react MSG_ID EMOJI [--remove]``, ``edit MSG_ID TEXT``
and ``redact MSG_ID`` (delete a message: ``delete`` deletes a group) work on message
ids, which ``history --ids`` shows; history marks messages ``(edited)``,
``(deleted)``, ``(re <id>)`` and ``[👍 2]``, and ``listen`` prints reactions, edits and
deletes as they come ("bob reacted 👍 to <id>").

``send-file PEER PATH`` and ``download FILE_ID [PATH]`` move files with a progress bar
on stderr (when it is a terminal); both resume after an interruption (``--resume
UPLOAD``; ``PATH.part``), and ``listen`` shows a file message with the command that
downloads it.

Exit status: 0 on success, 1 for errors from the realm (printed as
``chatproto: <code>: <message>``) or the network, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import functools
import getpass
import os
import shlex
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import react
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.python.failure import Failure

from chatproto.client import (
    ONESHOT_SINCE,
    ChatClientService,
    ChecksumMismatch,
    Connection,
    ConnectionDone,
    TransferInterrupted,
    WatchedEndpoint,
    connect,
    endpoint_for,
)
from chatproto.deferreds import first_of, next_turn
from chatproto.display import (
    format_message,
    format_presence,
    human_size,
    json_line,
    terminal_label,
    terminal_text,
)
from chatproto.failures import CommandError, explain

DEFAULT_SERVER = "tcp:127.0.0.1:7420"
PASSWORD_ENV = "CHATPROTO_PASSWORD"
USER_ENV = "CHATPROTO_USER"
#: Realm errors after which reconnecting cannot help (as in ChatClientService).
_FATAL_CODES = ("auth_failed", "unsupported_version", "bad_request")
_GROUP_HELP = "the group: name, #name or #name@realm"
#: The statuses a user may set (``offline`` is the realm's to say).
_STATUSES = ("online", "away", "busy")


# argument parsing ------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _position(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a stream position") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Add the connection options; with ``suppress`` they get no defaults.

    The options are accepted both before and after the subcommand: the subcommand
    parsers carry suppressed copies so that they only override what was given.
    """

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--server",
        metavar="ENDPOINT",
        default=default(DEFAULT_SERVER),
        help="tcp:HOST:PORT, tls:HOST:PORT or any Twisted client endpoint "
        f"(default: {DEFAULT_SERVER})",
    )
    parser.add_argument(
        "--user",
        metavar="NAME",
        default=default(os.environ.get(USER_ENV)),
        help=f"account name (default: ${USER_ENV})",
    )
    parser.add_argument(
        "--realm",
        metavar="NAME",
        default=default(None),
        help="name the TLS certificate must carry (default: the host of --server)",
    )
    parser.add_argument(
        "--ca", metavar="FILE", default=default(None), help="PEM certificate to trust for TLS"
    )
    parser.add_argument(
        "--device",
        metavar="NAME",
        default=default("cli"),
        help="device name whose position 'listen' resumes from (default: cli); "
        "one-shot commands use NAME-oneshot",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default(False),
        help="log protocol and connection events to stderr",
    )


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatproto",
        description="Talk to a chatproto realm.  The password is read from "
        f"${PASSWORD_ENV} or prompted for; it is never a command-line option.",
        epilog="Groups: GROUP is 'name', '#name' or '#name@realm'; send and history take "
        "'#name' as PEER.  One-shot commands (all but listen) log in as device "
        "'<device>-oneshot' and take no messages from the stream, so they never move "
        "the position that 'listen' (device '<device>') resumes from.",
    )
    _global_options(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sub.add_parser(
        "register",
        parents=[common],
        help="create the account (asks for the password twice)",
        description="Create the account --user with in-band registration.",
    )

    p = sub.add_parser(
        "send",
        parents=[common],
        help="send a message to a user or a #group",
        description="Send TEXT (words joined by spaces; '-' reads the body from stdin) "
        "to PEER (a user, or a group as '#name') and print the message id and stream "
        "position.",
    )
    p.add_argument("peer", metavar="PEER")
    p.add_argument("text", metavar="TEXT", nargs="+")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument(
        "--reply-to", metavar="MSG_ID", help="the message of this conversation it answers"
    )

    p = sub.add_parser(
        "react",
        parents=[common],
        help="react to a message with an emoji (or take the reaction back)",
        description="Add the reaction EMOJI to message MSG_ID (as 'history --ids' shows "
        "it), or with --remove take it back.",
    )
    p.add_argument("msg_id", metavar="MSG_ID")
    p.add_argument("emoji", metavar="EMOJI")
    p.add_argument("--remove", action="store_true", help="take the reaction back")

    p = sub.add_parser(
        "edit",
        parents=[common],
        help="replace the text of one of your messages",
        description="Replace the text of your message MSG_ID with TEXT (words joined by "
        "spaces; '-' reads it from stdin).  Everyone sees it marked '(edited)'.",
    )
    p.add_argument("msg_id", metavar="MSG_ID")
    p.add_argument("text", metavar="TEXT", nargs="+")

    p = sub.add_parser(
        "redact",
        parents=[common],
        help="delete a message or file (yours; in a group, admins may delete any)",
        description="Delete message or file MSG_ID: the realm wipes its text (or file) "
        "and everyone sees it as deleted.  Yours, or any in a group you are an admin or "
        "owner of.  ('delete' deletes a group.)",
    )
    p.add_argument("msg_id", metavar="MSG_ID")

    p = sub.add_parser(
        "history",
        parents=[common],
        help="show the conversation with a user or a #group",
        description="Print a page of the conversation with PEER (a user, or a group as "
        "'#name'), oldest first.  Group events (joins, kicks, topics) are included.",
    )
    p.add_argument("peer", metavar="PEER")
    p.add_argument("--limit", type=_positive, metavar="N", help="at most N messages")
    page = p.add_mutually_exclusive_group()
    page.add_argument("--before", type=_position, metavar="POS", help="messages before POS")
    page.add_argument("--after", type=_position, metavar="POS", help="messages after POS")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument(
        "--ids", action="store_true", help="start each line with the message id (to react...)"
    )

    p = sub.add_parser(
        "search",
        parents=[common],
        help="search the messages you may read",
        description="Print the messages you may read (those 'history' shows you) whose "
        "text has every word of QUERY, as word beginnings in any case, newest first. "
        "With --in, one conversation only.  A full page ends with a line naming the "
        "--before POS that gives the next one.",
    )
    p.add_argument("query", metavar="QUERY", nargs="+")
    p.add_argument("--in", dest="peer", metavar="PEER", help="only the conversation with PEER")
    p.add_argument("--before", type=_position, metavar="POS", help="messages before POS")
    p.add_argument("--limit", type=_positive, metavar="N", help="at most N messages (max 50)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    p = sub.add_parser(
        "conversations",
        parents=[common],
        help="list your conversations with their unread counts",
        description="List your private conversations and groups, most recent first, with "
        "the number of unread messages (and of mentions of you in groups) and the last "
        "one -- what a new client shows in its sidebar.",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    p = sub.add_parser(
        "listen",
        parents=[common],
        help="print the backlog, then new messages as they arrive",
        description="Print messages and group events not yet acknowledged by --device, "
        "then live ones, and presence changes of your contacts ('* bob is online'), "
        "reconnecting and resuming as needed, until Ctrl-C, SIGTERM or --count.",
    )
    p.add_argument("--count", type=_positive, metavar="N", help="exit after N messages or events")
    p.add_argument(
        "--json",
        action="store_true",
        help='one JSON object per line (presence frames keep their "type": "presence")',
    )
    p.add_argument("--no-presence", action="store_true", help="do not print presence changes")
    p.add_argument(
        "--status",
        choices=_STATUSES,
        help="show this status to your contacts while listening (default: online)",
    )
    p.add_argument("--status-text", metavar="TEXT", default="", help="a note with --status")

    p = sub.add_parser(
        "who",
        parents=[common],
        help="list the users online (or the online members of a group)",
        description="List the users online on the realm, or with GROUP the online "
        "members of that group (members only), with their status.  You are listed too "
        "(this command's own session is quiet: it does not show you online to others); "
        "a last line says when nobody else is online.",
    )
    p.add_argument(
        "group", metavar="GROUP", nargs="?", help="only the online members of this group"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    # groups --------------------------------------------------------------------------

    p = sub.add_parser(
        "groups",
        parents=[common],
        help="list the public groups",
        description="List the public groups of the realm with their topic and size.",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    p = sub.add_parser(
        "create",
        parents=[common],
        help="create a group (you become its owner)",
        description="Create GROUP.  Anyone may join a public group; an --invite-only "
        "group needs an invitation from an admin.",
    )
    p.add_argument("group", metavar="GROUP", help=_GROUP_HELP)
    p.add_argument("--invite-only", action="store_true", help="only invited users may join")
    p.add_argument(
        "--history",
        choices=("joined", "all"),
        help="what members may read: what came after they joined (joined, the default) "
        "or everything since the group was created (all)",
    )
    p.add_argument("--topic", metavar="TEXT", default="", help="the group's topic")

    for name, help_ in (
        ("join", "join a group (public, or invite-only with an invitation)"),
        ("leave", "leave a group"),
        ("delete", "delete a group and remove every member (owners only)"),
    ):
        p = sub.add_parser(name, parents=[common], help=help_, description=help_ + ".")
        p.add_argument("group", metavar="GROUP", help=_GROUP_HELP)

    p = sub.add_parser(
        "invite",
        parents=[common],
        help="invite a user to a group (admins)",
        description="Allow USER to join GROUP (needed for invite-only groups).",
    )
    p.add_argument("group", metavar="GROUP", help=_GROUP_HELP)
    p.add_argument("member", metavar="USER", help="a user: name or name@realm")

    for name, help_ in (
        ("kick", "remove a member from a group (admins); they may join again"),
        ("ban", "remove a user from a group and refuse their joins (admins)"),
    ):
        p = sub.add_parser(name, parents=[common], help=help_, description=help_ + ".")
        p.add_argument("group", metavar="GROUP", help=_GROUP_HELP)
        p.add_argument("member", metavar="USER", help="a user: name or name@realm")
        p.add_argument("--reason", metavar="TEXT", help="shown to the group with the event")

    p = sub.add_parser(
        "unban",
        parents=[common],
        help="lift a ban (admins)",
        description="Let USER join GROUP again.",
    )
    p.add_argument("group", metavar="GROUP", help=_GROUP_HELP)
    p.add_argument("member", metavar="USER", help="a user: name or name@realm")

    p = sub.add_parser(
        "topic",
        parents=[common],
        help="set a group's topic (admins)",
        description="Set the topic of GROUP to TEXT (words joined by spaces; '' clears).",
    )
    p.add_argument("group", metavar="GROUP", help=_GROUP_HELP)
    p.add_argument("text", metavar="TEXT", nargs="+")

    p = sub.add_parser(
        "role",
        parents=[common],
        help="change a member's role (owners)",
        description="Give USER the role ROLE in GROUP.  Admins may invite, kick, ban and "
        "set the topic; owners may also change roles and delete the group.",
    )
    p.add_argument("group", metavar="GROUP", help=_GROUP_HELP)
    p.add_argument("member", metavar="USER", help="a user: name or name@realm")
    p.add_argument("role", metavar="ROLE", choices=("member", "admin", "owner"))

    p = sub.add_parser(
        "members",
        parents=[common],
        help="list the members of a group with their roles",
        description="List the members of GROUP (members only): role and whether online.",
    )
    p.add_argument("group", metavar="GROUP", help=_GROUP_HELP)
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    p = sub.add_parser(
        "info",
        parents=[common],
        help="show a group's topic, settings and your role",
        description="Show the summary of GROUP and your role in it.",
    )
    p.add_argument("group", metavar="GROUP", help=_GROUP_HELP)
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser(
        "status",
        parents=[common],
        help="set your presence status (lasts while connected: see listen --status)",
        description="Set your status (online, away or busy, with an optional TEXT) and "
        "show it to your contacts.  This command's own session is quiet: the status "
        "shows while you have another session open (a TUI, 'listen', IRC...), or from "
        "the next one, and lasts until your last session closes; 'listen --status "
        "STATUS' sets one itself.",
    )
    p.add_argument("status", metavar="STATUS", choices=_STATUSES)
    p.add_argument("text", metavar="TEXT", nargs="*")

    p = sub.add_parser(
        "report",
        parents=[common],
        help="report a message to the realm's admins",
        description="Report the message MSG_ID (its id: 'history --ids' shows it) to "
        "the realm's administrators for REASON (words joined by spaces).",
    )
    p.add_argument("msg_id", metavar="MSG_ID")
    p.add_argument("reason", metavar="REASON", nargs="+")

    p = sub.add_parser(
        "reports",
        parents=[common],
        help="list abuse reports, newest first (realm admins)",
        description="List the abuse reports made on this realm, newest first (realm "
        "administrators only: anyone else gets 'forbidden').",
    )
    p.add_argument("--before", type=int, metavar="ID", help="only reports older than ID")
    p.add_argument("--limit", type=int, metavar="N", help="at most N (default: 100)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    p = sub.add_parser(
        "send-file",
        parents=[common],
        help="send a file to a user or a #group, with a progress bar",
        description="Send the file PATH to PEER (a user, or a group as '#name').  The "
        "realm checks its size and your quota before any byte is sent.  A progress bar "
        "is drawn on stderr when it is a terminal.  If the connection drops, the "
        "command prints how to resume (--resume UPLOAD): only the rest is sent.",
    )
    p.add_argument("peer", metavar="PEER")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--name", metavar="NAME", help="the file name shown (default: PATH's)")
    p.add_argument("--type", metavar="TYPE", help="media type (default: guessed from PATH)")
    p.add_argument("--resume", metavar="UPLOAD", help="continue an interrupted upload")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser(
        "download",
        parents=[common],
        help="download a file (its id is in the file message), with a progress bar",
        description="Download file FILE_ID to PATH (default: the file's name in the "
        "current directory; a directory: the file's name in it).  Bytes go to "
        "PATH.part first: after an interruption the same command fetches only the "
        "rest.  The sha256 is checked before PATH appears.  An existing PATH is "
        "left alone unless --force is given.",
    )
    p.add_argument("file_id", metavar="FILE_ID")
    p.add_argument("path", metavar="PATH", nargs="?", default=".")
    p.add_argument("--json", action="store_true", help="print the file's description as JSON")
    p.add_argument("--force", action="store_true", help="replace PATH if it exists")

    p = sub.add_parser(
        "tui",
        parents=[common],
        help="the full-screen terminal client",
        description="Open the full-screen client (needs chatproto[tui]): a login form "
        "prefilled from the remembered login and these options, then conversations, "
        "groups, presence and commands (/help).  Logs in as device 'tui' unless "
        "--device is given.",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="the remembered login (default: $XDG_CONFIG_HOME/chatproto/tui.toml)",
    )
    p.add_argument("--log", metavar="FILE", help="append the client's log to FILE")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (exits 2 with a usage message on errors, like argparse)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if not args.user and args.command != "tui":
        parser.error(f"--user is required (or set ${USER_ENV})")
    if args.command in ("send", "edit"):
        args.body = None if args.text == ["-"] else " ".join(args.text)
    elif args.command in ("topic", "status"):
        args.text = " ".join(args.text)
    elif args.command == "report":
        args.reason = " ".join(args.reason)
    return args


# input before the reactor runs -------------------------------------------------------


def read_password(user: str, confirm: bool, environ: Any = os.environ) -> str:
    """The password from ``$CHATPROTO_PASSWORD``, else prompted (twice if ``confirm``)."""
    password = environ.get(PASSWORD_ENV)
    if password:
        return str(password)
    try:
        password = getpass.getpass(f"Password for {user}: ")
        if confirm and getpass.getpass("Repeat the password: ") != password:
            raise CommandError("the passwords do not match")
    except EOFError:
        raise CommandError(f"no password: set ${PASSWORD_ENV} or run in a terminal") from None
    if not password:
        raise CommandError("empty password")
    return password


def read_body(stdin: Any) -> str:
    """The message body from stdin, without the final newline ``echo`` adds."""
    body = str(stdin.read())
    return body[:-1] if body.endswith("\n") else body


# output ---------------------------------------------------------------------------


def _say(line: str) -> None:
    """Print a line of output; what it holds from the realm goes to a terminal
    (:func:`chatproto.display.terminal_text`)."""
    sys.stdout.write(terminal_text(line) + "\n")
    sys.stdout.flush()


def _note(line: str) -> None:
    sys.stderr.write(f"chatproto: {terminal_text(line)}\n")
    sys.stderr.flush()


# connections ----------------------------------------------------------------------


def _make_endpoint(reactor: Any, args: argparse.Namespace) -> WatchedEndpoint:
    try:
        inner = endpoint_for(reactor, args.server, args.realm, args.ca)
    except OSError as e:
        raise CommandError(f"--ca {args.ca}: {e.strerror or e}") from None
    except Exception as e:
        raise CommandError(f"bad --server {args.server!r}: {e}", status=2) from None
    return WatchedEndpoint(inner, args.server)


# commands -------------------------------------------------------------------------


async def _oneshot(
    reactor: Any,
    args: argparse.Namespace,
    password: str,
    action: Callable[[Connection, argparse.Namespace], Awaitable[None]],
) -> None:
    endpoint = _make_endpoint(reactor, args)
    try:
        conn = await connect(
            reactor,
            endpoint,
            args.user,
            password,
            device=f"{args.device}-oneshot",
            since=ONESHOT_SINCE,
            ack=False,
            quiet=True,
            register=args.command == "register",
        )
    except Exception as e:
        raise explain(e, args.server, endpoint.reason) from None
    try:
        await action(conn, args)
    except Exception as e:
        raise explain(e, args.server, endpoint.reason) from None
    finally:
        await conn.close()


class ProgressBar:
    """A one-line progress bar on a terminal (``stream``), redrawn at most 10 times a
    second: the name, a bar, the percentage, bytes done of the total and the rate.
    Draws nothing when ``stream`` is not a terminal (scripts get only the final line
    on stdout)."""

    def __init__(self, label: str, stream: Any = None, clock: Any = time.monotonic) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.clock = clock
        self.started = clock()
        self.first: int | None = None
        self._drawn = float("-inf")

    def render(self, done: int, total: int, width: int = 30) -> str:
        if self.first is None:
            self.first = done
        frac = done / total if total else 1.0
        filled = int(frac * width)
        elapsed = max(self.clock() - self.started, 1e-6)
        rate = (done - self.first) / elapsed
        return (
            f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {frac * 100:5.1f}%  "
            f"{human_size(done)}/{human_size(total)}  {human_size(rate)}/s"
        )

    def __call__(self, done: int, total: int) -> None:
        line = self.render(done, total)
        now = self.clock()
        if self.enabled and (now - self._drawn >= 0.1 or done >= total):
            self._drawn = now
            self.stream.write("\r" + line + "\x1b[K")
            self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def _again(args: argparse.Namespace, *extra: str) -> str:
    """The command line the user ran, with ``extra`` options (to resume)."""
    argv = list(getattr(args, "argv", None) or [])
    if "--resume" in argv:  # a resumed run names another upload now
        i = argv.index("--resume")
        del argv[i : i + 2]
    return shlex.join(["chatproto", *argv, *extra])


async def _send_file(
    conn: Connection, args: argparse.Namespace, interrupt: Deferred[None] | None = None
) -> None:
    """Upload with a progress bar.  An interruption says exactly what the realm holds
    and how to go on: Ctrl-C asks the realm (its count, never a guess), a connection
    lost while the realm was finishing says to resume to learn the outcome, and
    resuming an upload the realm posted already says so (it is never posted twice)."""
    if not os.path.isfile(args.path):
        raise CommandError(f"{args.path}: not a file")
    bar = ProgressBar(args.name or os.path.basename(args.path))
    try:
        result = await conn.send_file(
            args.peer,
            args.path,
            name=args.name,
            media_type=args.type,
            progress=bar,
            resume=args.resume,
            interrupt=interrupt,
        )
    except TransferInterrupted as e:
        bar.finish()
        raise _upload_stopped(e, args) from None
    except ValueError as e:
        raise CommandError(str(e)) from None
    bar.finish()
    if result.get("already_posted"):
        _note(f"upload {result['upload']} was posted already; nothing was sent again")
    elif result.get("interrupted_late"):
        _note("interrupted, but the realm had all the bytes: the file is posted")
    if args.json:
        _say(json_line(result))
    else:
        _say(f"file={result['file']} id={terminal_label(result['msg_id'])} pos={result['pos']}")


def _upload_stopped(e: TransferInterrupted, args: argparse.Namespace) -> CommandError:
    if e.upload is None:
        return CommandError("interrupted before any byte was sent; nothing was posted", 130)
    resume = _again(args, "--resume", e.upload)
    if e.finishing:
        return CommandError(
            f"the connection was lost while the realm was finishing upload {e.upload}: it "
            f"may have been posted.  To find out (it is never posted twice): {resume}"
        )
    of = f"{human_size(e.done)} of {human_size(e.size)} ({e.done} of {e.size} bytes)"
    if e.held:
        status = 130 if e.stopped else 1
        return CommandError(
            f"interrupted: the realm holds {of} of upload {e.upload}; nothing was posted.  "
            f"Resume with: {resume}",
            status,
        )
    return CommandError(
        f"connection lost after sending {of} of upload {e.upload} (the realm may hold "
        f"fewer); nothing was posted.  Resume with: {resume}"
    )


async def _download(
    conn: Connection, args: argparse.Namespace, interrupt: Deferred[None] | None = None
) -> None:
    path = args.path
    if os.path.isdir(path):
        # ask for nothing but the description, to learn the file's name
        info = await conn.protocol.request("download", file=args.file_id, length=0)
        name = os.path.basename(info["name"]) or args.file_id
        path = os.path.join(path, name)
    if os.path.exists(path) and not args.force:
        raise CommandError(f"{path} exists: give another PATH, or --force to replace it")
    bar = ProgressBar(os.path.basename(path))
    try:
        info = await conn.download(args.file_id, path, progress=bar, interrupt=interrupt)
    except TransferInterrupted as e:
        bar.finish()
        held = f"{path}.part holds {human_size(e.done)} of {human_size(e.size)}"
        if e.stopped:
            raise CommandError(
                f"interrupted: {held}; run the same command to resume", 130
            ) from None
        raise CommandError(
            f"download interrupted: {held}; run the same command to resume"
        ) from None
    except ChecksumMismatch as e:
        bar.finish()
        raise CommandError(f"{e} (the partial file was removed)") from None
    bar.finish()
    if args.json:
        _say(json_line(info))
    else:
        _say(f"{path}: {human_size(info['size'])}, sha256 {info['sha256']}")


async def _register(conn: Connection, args: argparse.Namespace) -> None:
    _say(f"registered {conn.user}")


async def _send(conn: Connection, args: argparse.Namespace) -> None:
    result = await conn.send(args.peer, args.body, reply_to=args.reply_to)
    if args.json:
        _say(json_line(result))
    else:
        _say(f"id={terminal_label(result['msg_id'])} pos={result['pos']}")


async def _react(conn: Connection, args: argparse.Namespace) -> None:
    result = await conn.react(args.msg_id, args.emoji, remove=args.remove)
    _say(f"{'took back' if args.remove else 'reacted'} {args.emoji} pos={result['pos']}")


async def _edit(conn: Connection, args: argparse.Namespace) -> None:
    result = await conn.edit(args.msg_id, args.body)
    _say(f"edited {args.msg_id} pos={result['pos']}")


async def _redact(conn: Connection, args: argparse.Namespace) -> None:
    result = await conn.delete(args.msg_id)
    _say(f"deleted {args.msg_id} pos={result['pos']}")


async def _history(conn: Connection, args: argparse.Namespace) -> None:
    for msg in await conn.history(args.peer, args.before, args.after, args.limit):
        line = format_message(msg, args.json)
        _say(f"{terminal_label(msg.get('msg_id'))} {line}" if args.ids and not args.json else line)


async def _search(conn: Connection, args: argparse.Namespace) -> None:
    limit = args.limit if args.limit is not None else 20
    found = await conn.search(" ".join(args.query), args.peer, args.before, limit)
    for msg in found:
        _say(format_message(msg, args.json, me=conn.user))
    if len(found) == limit and not args.json:
        _say(f"(more: --before {found[-1]['pos']})")


async def _conversations(conn: Connection, args: argparse.Namespace) -> None:
    listed = await conn.conversations()
    for entry in listed["conversations"]:
        if args.json:
            _say(json_line(entry))
            continue
        counts = f"{entry['unread']} unread" if entry.get("unread") else "read"
        if entry.get("mentions"):
            counts += f", {entry['mentions']} mentioning you"
        last = entry.get("last")
        tail = f"  {format_message(last, False, me=conn.user)}" if last else ""
        _say(f"{entry['with']} ({counts}){tail}")


async def _who(conn: Connection, args: argparse.Namespace) -> None:
    """The realm's answer, plus yourself: this command's own session is quiet (it does
    not make you appear online), so the realm lists you only for your other sessions.
    When nobody else is online, a line says so (text output)."""
    entries = await conn.who(args.group)
    mine = next((e for e in entries if e.get("user") == conn.user), None)
    if mine is None:
        mine = {"user": conn.user, "sessions": 0}
        entries = sorted([*entries, mine], key=lambda e: str(e.get("user")))
    for entry in entries:
        if args.json:
            _say(json_line({**entry, "you": True} if entry is mine else entry))
            continue
        n = entry.get("sessions")
        if entry is mine:
            line = f"{entry['user']} (you" + (f"; {_sessions(n)})" if n else ")")
        elif n is None:  # a group member on another realm: its realm does not say
            online = "" if entry.get("status") else "online, "  # else the status says
            line = f"{entry['user']} ({online}another realm)"
        else:
            line = f"{entry['user']} ({_sessions(n)})"
        if entry.get("status"):
            line += f" {entry['status']}"
            if entry.get("text"):
                line += f": {entry['text']}"
        _say(line)
    if not args.json and len(entries) == 1:
        _say(f"nobody else{' in ' + args.group if args.group else ''} is online")


def _sessions(n: int) -> str:
    return f"{n} session{'' if n == 1 else 's'}"


def _summary(info: dict[str, Any]) -> str:
    n = info.get("members", 0)
    line = (
        f"{info['group']} ({n} member{'' if n == 1 else 's'}, {info.get('visibility', '?')}, "
        f"history {info.get('history', '?')})"
    )
    return line + (f": {info['topic']}" if info.get("topic") else "")


async def _groups(conn: Connection, args: argparse.Namespace) -> None:
    for info in await conn.list_groups():
        _say(json_line(info) if args.json else _summary(info))


async def _create(conn: Connection, args: argparse.Namespace) -> None:
    result = await conn.create_group(
        args.group,
        visibility="invite" if args.invite_only else None,
        history=args.history,
        topic=args.topic,
    )
    _say(f"created {result['group']}")


def _group_done(result: dict[str, Any], done: str) -> None:
    """Report a group change; one on another realm's group is only pending (pos 0):
    that realm decides, and a refusal comes back as a bounce."""
    if result.get("pos") == 0:
        home = str(result.get("group", "")).rpartition("@")[2]
        _say(
            f"{done}: pending until {home} (the group's home realm) confirms; "
            "a refusal comes back as '! not delivered'"
        )
    else:
        _say(done)


async def _join(conn: Connection, args: argparse.Namespace) -> None:
    result = await conn.join(args.group)
    _group_done(result, f"joined {result['group']}")


async def _leave(conn: Connection, args: argparse.Namespace) -> None:
    result = await conn.leave(args.group)
    _group_done(result, f"left {result['group']}")


async def _delete(conn: Connection, args: argparse.Namespace) -> None:
    result = await conn.delete_group(args.group)
    _group_done(result, f"deleted {result['group']}")


async def _invite(conn: Connection, args: argparse.Namespace) -> None:
    result = await conn.invite(args.group, args.member)
    _group_done(result, f"invited {args.member} to {result['group']}")


async def _kick(conn: Connection, args: argparse.Namespace) -> None:
    result = await conn.kick(args.group, args.member, args.reason)
    _group_done(result, f"kicked {args.member} from {result['group']}")


async def _ban(conn: Connection, args: argparse.Namespace) -> None:
    result = await conn.ban(args.group, args.member, args.reason)
    _group_done(result, f"banned {args.member} from {result['group']}")


async def _unban(conn: Connection, args: argparse.Namespace) -> None:
    result = await conn.unban(args.group, args.member)
    _group_done(result, f"unbanned {args.member} from {result['group']}")


async def _topic(conn: Connection, args: argparse.Namespace) -> None:
    result = await conn.set_topic(args.group, args.text)
    _group_done(result, f"topic of {result['group']} set")


async def _role(conn: Connection, args: argparse.Namespace) -> None:
    result = await conn.set_role(args.group, args.member, args.role)
    _group_done(result, f"{args.member} is now {args.role} in {result['group']}")


async def _members(conn: Connection, args: argparse.Namespace) -> None:
    for m in await conn.members(args.group):
        if args.json:
            _say(json_line(m))
        else:
            _say(f"{m['user']} {m['role']}{' (online)' if m.get('online') else ''}")


async def _info(conn: Connection, args: argparse.Namespace) -> None:
    info = await conn.group_info(args.group)
    if args.json:
        _say(json_line(info))
    else:
        _say(_summary(info))
        _say(f"your role: {info.get('role') or 'not a member'}")


async def _status(conn: Connection, args: argparse.Namespace) -> None:
    await conn.set_status(args.status, args.text)
    _say(f"status {args.status} set (shown while a session of yours that is not quiet is open)")


async def _report(conn: Connection, args: argparse.Namespace) -> None:
    rid = await conn.report(args.msg_id, args.reason)
    _say(f"reported {args.msg_id} (report {rid})")


async def _reports(conn: Connection, args: argparse.Namespace) -> None:
    for r in await conn.reports(args.before, args.limit):
        if args.json:
            _say(json_line(r))
        else:
            mid = terminal_label(r["msg_id"])
            _say(
                f"#{r['id']} {r['reporter']} reports {mid} ({r['sender']} to "
                f"{r['recipient']}): {r['reason']} | {r['excerpt'][:80]!r}"
            )


_ONESHOT: dict[str, Callable[[Connection, argparse.Namespace], Awaitable[None]]] = {
    "register": _register,
    "send": _send,
    "react": _react,
    "edit": _edit,
    "redact": _redact,
    "send-file": _send_file,
    "download": _download,
    "history": _history,
    "search": _search,
    "conversations": _conversations,
    "who": _who,
    "groups": _groups,
    "create": _create,
    "join": _join,
    "leave": _leave,
    "delete": _delete,
    "invite": _invite,
    "kick": _kick,
    "ban": _ban,
    "unban": _unban,
    "topic": _topic,
    "role": _role,
    "members": _members,
    "info": _info,
    "status": _status,
    "report": _report,
    "reports": _reports,
}


async def _closed(closed_d: Deferred[None]) -> None:
    # A new Deferred: the protocol's own must keep its result for other callbacks.
    waiter: Deferred[None] = Deferred()

    def closed(result: Any) -> Any:
        waiter.callback(None)
        return result

    closed_d.addBoth(closed)
    await waiter
    raise ConnectionDone("connection closed")


class _ListenService(ChatClientService):
    """A :class:`ChatClientService` that notes reconnects on stderr."""

    def __init__(self, *a: Any, status: tuple[str, str] | None = None, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.stopping = False
        self._reconnecting = False
        #: (status, text) to set on every connection (a status lasts one connection).
        self.status = status

    def _prepare(self, proxy: Any) -> Any:
        def prepared(result: Any) -> Any:
            if self._reconnecting:
                self._reconnecting = False
                _note("reconnected; resuming where it left off")
            if self._built is not None:
                self._built.closed_d.addCallback(self._lost)
            if self.status is not None and self.connection is not None:
                self.connection.set_status(*self.status).addErrback(self._status_failed)
            return result

        return super()._prepare(proxy).addCallback(prepared)

    def logged_in(self, conn: Connection) -> None:
        # the backlog follows: own messages (from other devices) need the address
        self.me = conn.user

    me: str | None = None

    def _status_failed(self, failure: Failure) -> None:
        _note(f"cannot set the status: {explain(failure.value or Exception(), '')}")

    def _lost(self, _: object) -> None:
        if not self.stopping and self.running:
            self._reconnecting = True
            _note("connection lost; reconnecting")


async def _nothing() -> None:
    return None


async def _listen(reactor: Any, args: argparse.Namespace, password: str) -> None:
    endpoint = _make_endpoint(reactor, args)
    received = 0
    service: _ListenService

    def finish() -> None:
        if not service.done.called:
            service.done.callback(None)

    def on_message(msg: dict[str, Any]) -> None:
        nonlocal received
        if args.count is not None and received >= args.count:
            return
        received += 1
        _say(format_message(msg, args.json, me=service.me))
        if args.count is not None and received >= args.count:
            # Read nothing more, so only what was printed gets acknowledged; stop two
            # turns later, after the client library has sent the ack for this one.
            service.pause()
            reactor.callLater(0, reactor.callLater, 0, finish)

    def on_presence(frame: dict[str, Any]) -> None:
        if args.no_presence:
            return
        conn = service.connection
        _say(format_presence(frame, args.json, conn.realm if conn is not None else ""))

    service = _ListenService(
        reactor,
        endpoint,
        args.user,
        password,
        device=args.device,
        on_message=on_message,
        on_presence=on_presence,
        status=(args.status or "online", args.status_text)
        if args.status or args.status_text
        else None,
    )
    # Both fire from inside ClientService's state machine: act on them a turn later.
    first = next_turn(reactor, service.whenConnected(failAfterFailures=1))
    done = next_turn(reactor, service.done)
    service.startService()

    def stop() -> Deferred[None]:
        service.stopping = True
        if not service.running:
            return Deferred.fromCoroutine(_nothing())
        return service.stopService()  # type: ignore[no-any-return]

    shutting_down = False

    def on_shutdown() -> Deferred[None]:
        # Ctrl-C or SIGTERM: close the connection (flushing acks), then end normally.
        nonlocal shutting_down
        shutting_down = True
        finish()
        return stop()

    shutdown = reactor.addSystemEventTrigger("before", "shutdown", on_shutdown)
    try:
        try:
            # --count may be reached in the backlog, before the first login is complete.
            await first_of(first, done)
        except Exception as e:
            raise explain(e, args.server, endpoint.reason) from None
        finally:
            first.addErrback(lambda _: None)  # reported above, or superseded by `done`
        if not done.called:
            _note(f"listening as {service.me} (device {args.device}); Ctrl-C to stop")
        try:
            await done
        except Exception as e:
            raise explain(e, args.server, endpoint.reason) from None
    finally:
        if not shutting_down:
            reactor.removeSystemEventTrigger(shutdown)
        done.addErrback(lambda _: None)  # a login refusal was reported through `first`
        await stop()


#: Seconds a transfer stopped by Ctrl-C (or SIGTERM) gets to ask the realm what it
#: holds and say so, before the command gives up waiting.
INTERRUPT_GRACE = 15.0


class _Interrupted:
    """Ctrl-C (SIGINT) or SIGTERM during a one-shot command: the reactor is stopping.

    With ``wait`` (a transfer: ``send-file``, ``download``) ``interrupt`` fires and the
    command gets up to :data:`INTERRUPT_GRACE` seconds to stop cleanly and say what
    the realm (or the ``.part`` file) holds; any other command just ends.  Either way
    the exit status is 130.
    """

    #: Set when a command was cut short without its own report (main() returns 130).
    cut_short = False

    def __init__(self, reactor: Any, wait: bool) -> None:
        self.reactor = reactor
        self.wait = wait
        self.interrupt: Deferred[None] = Deferred()
        self.fired = False
        self._waiter: Deferred[None] | None = None
        self._timer: Any = None
        self._trigger = reactor.addSystemEventTrigger("before", "shutdown", self._shutdown)

    def _shutdown(self) -> Deferred[None] | None:
        self.fired = True
        self.interrupt.callback(None)
        if not self.wait:
            _Interrupted.cut_short = True
            _note("interrupted")
            return None
        if sys.stderr.isatty():
            sys.stderr.write("\n")  # off the progress bar's line
        _note("interrupted; stopping the transfer (Ctrl-C again does not hurry it)")
        self._timer = self.reactor.callLater(INTERRUPT_GRACE, self._give_up)
        self._waiter = Deferred()
        return self._waiter

    def _give_up(self) -> None:
        _Interrupted.cut_short = True
        _note(f"interrupted; no answer from the realm in {INTERRUPT_GRACE:.0f} s")
        self._release()

    def _release(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._waiter is not None and not self._waiter.called:
            self._waiter.callback(None)

    def done(self) -> None:
        """The command has ended (and reported): shutdown may go on."""
        if not self.fired:
            self.reactor.removeSystemEventTrigger(self._trigger)
        self._release()


async def run(reactor: Any, args: argparse.Namespace, password: str) -> None:
    """Run the parsed command on ``reactor``; raises :class:`CommandError`."""
    if args.command == "listen":
        await _listen(reactor, args, password)
        return
    action = _ONESHOT[args.command]
    transfer = args.command in ("send-file", "download")
    interrupted = _Interrupted(reactor, wait=transfer)
    if transfer:
        action = functools.partial(action, interrupt=interrupted.interrupt)  # type: ignore[call-arg]
    try:
        await _oneshot(reactor, args, password, action)
    except Exception:
        if interrupted.fired:
            raise _stopped(sys.exc_info()[1]) from None
        raise
    finally:
        interrupted.done()


def _stopped(exc: BaseException | None) -> CommandError:
    """What an interrupted command says: its own report, or 'interrupted'."""
    if isinstance(exc, CommandError) and exc.status == 130:
        return exc
    if isinstance(exc, CommandError):
        return CommandError(f"interrupted: {exc}", 130)
    return CommandError("interrupted", 130)


def _react_main(reactor: Any, args: argparse.Namespace, password: str) -> Deferred[None]:
    async def guarded() -> None:
        try:
            await run(reactor, args, password)
        except CommandError as e:
            _note(str(e))
            raise SystemExit(e.status) from None
        except Exception as e:
            _note(str(explain(e, args.server)))
            raise SystemExit(1) from None

    return Deferred.fromCoroutine(guarded())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``chatproto`` command; returns the exit status."""
    try:
        args = parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    if args.command == "tui":
        try:
            from chatproto.tui import app
        except ImportError as e:
            _note(f"the terminal client needs urwid: pip install 'chatproto[tui]' ({e})")
            return 1
        return app.run(args)
    try:
        password = read_password(args.user, confirm=args.command == "register")
        if args.command in ("send", "edit") and args.body is None:
            args.body = read_body(sys.stdin)
    except CommandError as e:
        _note(str(e))
        return e.status
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130
    # Twisted would print logged failures (TLS verification, unhandled Deferreds) as
    # tracebacks; the user gets one line per problem instead, unless --verbose.
    observer: Any = textFileLogObserver(sys.stderr) if args.verbose else lambda event: None
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        react(_react_main, (args, password))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        return 130 if code == 0 and _Interrupted.cut_short else code
    return 0  # pragma: no cover (react always exits)


if __name__ == "__main__":
    sys.exit(main())
