"""The control channel's commands: AMP over a UNIX socket in the data directory.

``chatrealmctl`` (:mod:`chatproto.ops.controlclient`) sends these to the running realm
(:mod:`chatproto.ops.control`).  The first command of a connection must be
:class:`Authenticate`, with the token the realm wrote to ``control.token`` in its data
directory (owner-only): anything else before it is refused with
``NOT_AUTHENTICATED`` and the connection closed.

A realm rule that refuses (no such user, a bad password) travels as the error
``CHAT_ERROR`` whose description is ``"<code>: <message>"`` (the codes of
:data:`chatproto.errors.CODES`).  AMP values are at most 65535 bytes, so lists come in
pages (:class:`ListSessions`).
"""

from __future__ import annotations

from twisted.protocols import amp

__all__ = [
    "PAGE",
    "Authenticate",
    "ControlError",
    "DeleteUser",
    "Drain",
    "GrantAdmin",
    "Kick",
    "ListAdmins",
    "ListLogins",
    "ListReports",
    "ListSessions",
    "NotAuthenticated",
    "ReloadTLS",
    "RevokeAdmin",
    "RevokeLogins",
    "SetPassword",
    "Status",
    "Suspend",
    "Unsuspend",
]

#: Most sessions one ListSessions page holds (a page stays well under AMP's 64 KiB).
PAGE = 100


class NotAuthenticated(Exception):
    """A command before :class:`Authenticate`, or a wrong token."""


class ControlError(Exception):
    """A refusal of the realm's: ``str(e)`` is ``"<code>: <message>"``."""


_ERRORS: dict[type[Exception], bytes] = {
    NotAuthenticated: b"NOT_AUTHENTICATED",
    ControlError: b"CHAT_ERROR",
}
_FATAL: dict[type[Exception], bytes] = {NotAuthenticated: b"NOT_AUTHENTICATED"}


class Authenticate(amp.Command):
    """Prove the right to operate the realm: the token from ``control.token``."""

    arguments = [(b"token", amp.Unicode())]
    response = [(b"realm", amp.Unicode()), (b"pid", amp.Integer())]
    errors = _ERRORS
    fatalErrors = _FATAL


class Status(amp.Command):
    """What the realm is doing right now."""

    arguments = []  # type: ignore[var-annotated]
    response = [
        (b"realm", amp.Unicode()),
        (b"pid", amp.Integer()),
        (b"sessions", amp.Integer()),
        (b"users_online", amp.Integer()),
        (b"draining", amp.Boolean()),
    ]
    errors = _ERRORS
    fatalErrors = _FATAL


class ListSessions(amp.Command):
    """A page of the logged-in sessions, ordered by user then opening time."""

    arguments = [(b"offset", amp.Integer()), (b"limit", amp.Integer())]
    response = [
        (
            b"sessions",
            amp.AmpList(
                [
                    (b"user", amp.Unicode()),
                    (b"device", amp.Unicode()),
                    (b"protocol", amp.Unicode()),
                    (b"peer", amp.Unicode()),
                    (b"opened_at", amp.Float()),
                    (b"quiet", amp.Boolean()),
                ]
            ),
        ),
        (b"total", amp.Integer()),
    ]
    errors = _ERRORS
    fatalErrors = _FATAL


class ListLogins(amp.Command):
    """A page of the live browser logins (session tokens) of ``user`` (empty: every
    user's), ordered by user then last use.  ``login`` is the id that names one."""

    arguments = [
        (b"user", amp.Unicode()),
        (b"offset", amp.Integer()),
        (b"limit", amp.Integer()),
    ]
    response = [
        (
            b"logins",
            amp.AmpList(
                [
                    (b"user", amp.Unicode()),
                    (b"login", amp.Unicode()),
                    (b"device", amp.Unicode()),
                    (b"created", amp.Float()),
                    (b"last_used", amp.Float()),
                ]
            ),
        ),
        (b"total", amp.Integer()),
    ]
    errors = _ERRORS
    fatalErrors = _FATAL


class RevokeLogins(amp.Command):
    """End browser logins of a local user: those named in ``logins`` (empty: all of
    them), and the web sessions opened with them."""

    arguments = [(b"user", amp.Unicode()), (b"logins", amp.ListOf(amp.Unicode()))]
    response = [
        (b"user", amp.Unicode()),
        (b"ended", amp.Integer()),
        (b"closed", amp.Integer()),
    ]
    errors = _ERRORS
    fatalErrors = _FATAL


class GrantAdmin(amp.Command):
    """Make a local account a realm admin (stored)."""

    arguments = [(b"user", amp.Unicode())]
    response = [(b"user", amp.Unicode())]
    errors = _ERRORS
    fatalErrors = _FATAL


class RevokeAdmin(amp.Command):
    """Take the realm admin role away."""

    arguments = [(b"user", amp.Unicode())]
    response = [(b"user", amp.Unicode()), (b"was_admin", amp.Boolean())]
    errors = _ERRORS
    fatalErrors = _FATAL


class ListAdmins(amp.Command):
    """The realm admins."""

    arguments = []  # type: ignore[var-annotated]
    response = [(b"admins", amp.ListOf(amp.Unicode()))]
    errors = _ERRORS
    fatalErrors = _FATAL


class ListReports(amp.Command):
    """A page of abuse reports, newest first (``before``: a report id, 0: the newest)."""

    arguments = [(b"before", amp.Integer()), (b"limit", amp.Integer())]
    response = [
        (
            b"reports",
            amp.AmpList(
                [
                    (b"id", amp.Integer()),
                    (b"reporter", amp.Unicode()),
                    (b"msg_id", amp.Unicode()),
                    (b"reason", amp.Unicode()),
                    (b"ts", amp.Float()),
                    (b"sender", amp.Unicode()),
                    (b"recipient", amp.Unicode()),
                    (b"pos", amp.Integer()),
                    (b"excerpt", amp.Unicode()),
                ]
            ),
        )
    ]
    errors = _ERRORS
    fatalErrors = _FATAL


class Kick(amp.Command):
    """End every session of a local user now (native, web, IRC); they may log in
    again."""

    arguments = [(b"user", amp.Unicode()), (b"reason", amp.Unicode())]
    response = [(b"user", amp.Unicode()), (b"closed", amp.Integer())]
    errors = _ERRORS
    fatalErrors = _FATAL


class Suspend(amp.Command):
    """Suspend a local account: its sessions end now and it cannot log in (anywhere)
    until :class:`Unsuspend`; messages to it are refused."""

    arguments = [(b"user", amp.Unicode()), (b"reason", amp.Unicode())]
    response = [(b"user", amp.Unicode()), (b"closed", amp.Integer())]
    errors = _ERRORS
    fatalErrors = _FATAL


class Unsuspend(amp.Command):
    """Lift a suspension."""

    arguments = [(b"user", amp.Unicode())]
    response = [(b"user", amp.Unicode()), (b"was_suspended", amp.Boolean())]
    errors = _ERRORS
    fatalErrors = _FATAL


class DeleteUser(amp.Command):
    """Delete a local account the way the realm does (``RealmService.delete_user``)."""

    arguments = [(b"user", amp.Unicode())]
    response = [
        (b"user", amp.Unicode()),
        (b"existed", amp.Boolean()),
        (b"closed", amp.Integer()),
    ]
    errors = _ERRORS
    fatalErrors = _FATAL


class SetPassword(amp.Command):
    """Set a local user's password; their sessions and browser logins end."""

    arguments = [(b"user", amp.Unicode()), (b"password", amp.Unicode())]
    response = [(b"user", amp.Unicode()), (b"closed", amp.Integer())]
    errors = _ERRORS
    fatalErrors = _FATAL


class ReloadTLS(amp.Command):
    """Read the certificate and key files of every TLS listener again; new
    connections get the new certificate, open ones keep theirs."""

    arguments = []  # type: ignore[var-annotated]
    response = [
        (
            b"listeners",
            amp.AmpList([(b"description", amp.Unicode()), (b"fingerprint", amp.Unicode())]),
        )
    ]
    errors = _ERRORS
    fatalErrors = _FATAL


class Drain(amp.Command):
    """Stop taking connections and stop the realm cleanly: ``/ready`` answers 503 at
    once; after ``grace`` seconds the listeners close, sessions are told
    ``shutting_down``, commits in flight finish, and the process exits."""

    arguments = [(b"grace", amp.Float())]
    response = [(b"closed", amp.Integer())]
    errors = _ERRORS
    fatalErrors = _FATAL
