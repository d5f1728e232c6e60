"""Domain errors of the realm, each carrying the stable machine code the wire uses.

The realm service raises these; protocols turn them into ``error`` frames with the same
``code`` (see PROTOCOL.md, "Errors").  Codes are part of the protocol and never change
meaning once published.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CODES",
    "ChatError",
    "FatalProtocolError",
]

#: Every code the server may send, with a one-line meaning (documented in PROTOCOL.md).
CODES: dict[str, str] = {
    "bad_frame": "the frame is not a UTF-8 JSON object (the connection is closed)",
    "bad_request": "a field is missing, has the wrong type or an invalid value",
    "unknown_type": "the request type is not known to this server",
    "unsupported_version": "the protocol version asked for in hello is not spoken here",
    "hello_required": "the first request must be hello",
    "not_authenticated": "the request needs a logged-in session",
    "already_authenticated": "this connection is already logged in",
    "auth_failed": "unknown user or wrong password",
    "registration_closed": "in-band registration is disabled on this realm",
    "user_exists": "an account with that name already exists",
    "bad_address": "the address is not a valid name or name@realm",
    "no_such_user": "no such user on this realm",
    "remote_realm": "the address belongs to another realm and federation is not enabled",
    "peer_denied": "this realm does not federate with that realm (allow/deny lists)",
    "peer_unreachable": "the peer realm could not be reached for federation.give_up_after "
    "seconds, or give_up_unreached for one never reached (only in bounce items)",
    "untrusted_peer": "federation: the peer's certificate does not prove the realm it claims",
    "forged_sender": "federation: a realm carried an item it may not speak for (a user of "
    "another realm's, or a local user's that they did not send or ask for)",
    "bad_signature": "federation: an item relayed for a user of another realm does not carry "
    "a valid signature of that realm",
    "unknown_key": "federation: the key an item is signed with is not known, and its realm "
    "could not be reached to learn it",
    "no_such_group": "no such group on this realm",
    "group_exists": "a group with that name already exists",
    "not_member": "you (or the user named) are not a member of the group",
    "forbidden": "your role in the group does not allow this (or: only its sender may edit "
    "or delete that message; or: only a realm administrator may)",
    "not_found": "no message with that msg_id that you may read (never stored, deleted, or "
    "in a conversation you are not part of)",
    "already_member": "already a member of the group",
    "banned": "banned from the group",
    "not_invited": "the group is invite-only and you were not invited",
    "group_full": "the group has as many members as the realm (or its own limit) allows",
    "bad_key": "the group needs a key to join, and none or another was given",
    "moderated": "the group is moderated: only voiced members, admins and owners send",
    "limit_reached": "a per-user limit of the realm was reached (e.g. groups per user)",
    "too_many_sessions": "this user has as many sessions open as the realm allows",
    "too_large": "the frame or message body is larger than the announced limit",
    "quota_exceeded": "the file would take you past your storage quota (quota, used given)",
    "no_such_file": "no such file, it expired, or you may not read it",
    "no_such_upload": "no such unfinished upload of yours (finished, cancelled or expired)",
    "bad_offset": "data for an upload must continue at its current offset (offset given)",
    "incomplete": "the upload has not received all its bytes yet (offset given)",
    "checksum_mismatch": "the uploaded bytes do not have the announced sha256 (discarded)",
    "rate_limited": "too many requests; retry after retry_after seconds",
    "timeout": "the connection did not log in or answer pings in time (closed)",
    "slow_reader": "the connection did not read its output fast enough (closed)",
    "shutting_down": "the realm is stopping (closed)",
    "session_ended": "an operator of the realm ended the session (closed)",
    "account_suspended": "the account is suspended by the realm's operators",
    "unavailable": "the realm cannot reach its database or message bus right now; nothing "
    "was stored: retry after retry_after seconds",
    "internal_error": "the server failed to handle the request; it was logged",
}


class ChatError(Exception):
    """An error with a stable wire ``code`` and a human ``message``.

    ``extra`` holds additional fields put on the error frame (``retry_after`` for
    ``rate_limited``, for instance).
    """

    def __init__(self, code: str, message: str | None = None, **extra: Any) -> None:
        if code not in CODES:
            raise ValueError(f"unknown error code {code!r}")
        self.code = code
        self.message = message or CODES[code]
        self.extra = extra
        super().__init__(f"{code}: {self.message}")


class FatalProtocolError(ChatError):
    """A :class:`ChatError` after which the connection is closed."""
