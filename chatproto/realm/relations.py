"""The relations handler: replies, reactions, edits and deletes for the realm.

The rules of what refers to what are in :mod:`chatproto.relations`; this handler
applies them to a user's request: it finds the item named (one store read: only these
requests pay it, never a plain ``send``), checks that the user may read it -- the same
rule as ``history``: a party of the private conversation after the account's floor,
or a member of the group who may read the group's history at that position -- and
that they may change it, then commits the new item like any other (so it reaches the
same audience, the other realms and the backlogs).  Anything the user may not read is
``not_found``, as if it did not exist; what they may read but not change is
``forbidden``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredLock, fail, inlineCallbacks
from twisted.logger import Logger

from chatproto.envelope import Envelope
from chatproto.errors import ChatError
from chatproto.realm.sessions import Session
from chatproto.relations import (
    MAX_CHANGES,
    REF_KINDS,
    TARGET_KINDS,
    check_emoji,
    check_msg_id,
    ref_meta,
    ref_of,
)

if TYPE_CHECKING:
    from chatproto.realm.service import RealmService

__all__ = ["Relations", "may_delete", "named_ref", "readable_by", "refer_to"]

#: Ids of items deleted by this process, remembered so that an edit or a reaction
#: checked against the item before its delete was committed is refused (bounded).
_DELETED_REMEMBERED = 65536


def readable_by(env: Envelope, user: str, floor: int, group_floor: Any) -> bool:
    """Whether ``user`` (whose account sees items after ``floor``) may read stored
    item ``env``; ``group_floor(group, user)`` is the position after which a member
    reads a group (``not_member`` if not one)."""
    if env.recipient.startswith("#"):
        try:
            return bool(env.pos > group_floor(env.recipient, user))
        except ChatError:
            return False
    return user in (env.sender, env.recipient) and env.pos > floor


def named_ref(env: Envelope) -> Any:
    """The id ``env`` refers to: a reaction's, edit's or delete's ``meta.ref``, a
    reply's ``meta.reply_to`` (None if none)."""
    return ref_of(env) if env.kind in REF_KINDS else (env.meta or {}).get("reply_to")


def refer_to(env: Envelope, item_id: str) -> None:
    """Make ``env`` (a reaction, edit or delete, or a reply) refer to ``item_id``:
    from another realm, it named the item by the id that realm knows, and the item
    is stored here under an alternate one (what the stores' views, deletes and
    counts join on)."""
    key = "ref" if env.kind in REF_KINDS else "reply_to"
    env.meta = {**(env.meta or {}), key: item_id}


def may_delete(env: Envelope, user: str, role: str | None) -> bool:
    """The sender may delete their item; in a group, so may its admins and owners
    (``role``: the user's role in the item's group, None outside one)."""
    return env.sender == user or (env.recipient.startswith("#") and role in ("admin", "owner"))


class Relations:
    """Replies, reactions, edits and deletes requested by local users."""

    log = Logger()

    def __init__(self, realm: RealmService) -> None:
        self._realm = realm
        self._store = realm.store
        self._clock = realm.clock
        self._deleted: OrderedDict[str, None] = OrderedDict()
        #: (item id, user) -> the turn of that user's edits and reactions to it
        self._changing: dict[tuple[str, str], DeferredLock] = {}

    # finding the item ---------------------------------------------------------------

    def target(self, session: Session, msg_id: Any, field: str = "msg_id") -> Deferred[Envelope]:
        """The stored item ``msg_id`` names, if the session's user may read it and
        it is a message or a file that is not deleted; else ``not_found``."""
        try:
            msg_id = check_msg_id(msg_id, field)
        except ChatError as e:
            return fail(e)
        user, floor = session.user_id, session.floor

        def check(env: Envelope | None) -> Envelope:
            if (
                env is None
                or env.id in self._deleted
                or not readable_by(env, user, floor, self._realm.groups.readable_from)
            ):
                raise ChatError("not_found", f"no message {msg_id} that you may read")
            if env.kind not in TARGET_KINDS:
                raise ChatError("bad_request", f"{msg_id} is a {env.kind} item, not a message")
            if env.meta is not None and env.meta.get("deleted") is True:
                raise ChatError("not_found", f"message {msg_id} was deleted")
            return env

        return self._store.stored_item(msg_id).addCallback(check)

    @staticmethod
    def conversation_of(env: Envelope, user: str) -> str:
        """Where ``user``'s item about ``env`` goes: its group, or the other party
        of its private conversation (``user`` themself for a note to self)."""
        if env.recipient.startswith("#"):
            return env.recipient
        return env.recipient if env.sender == user else env.sender

    # requests -----------------------------------------------------------------------

    def _spend(self, session: Session) -> None:
        """These requests cost a token of the sender's ``send`` bucket."""
        self._realm.messages.spend(session, self._clock.seconds())

    def _commit(
        self, user: str, target: Envelope, kind: str, body: str, meta: dict[str, Any]
    ) -> Deferred[Envelope]:
        """Commit ``user``'s item about ``target`` in its conversation."""
        env = self._realm.messages.new_envelope(
            user, self.conversation_of(target, user), kind, body, meta
        )
        return self._realm.messages.commit_item(env)

    def _change(
        self, session: Session, target: Envelope, kind: str, body: str, meta: dict[str, Any]
    ) -> Deferred[Envelope]:
        """Commit an edit or a reaction of ``session``'s user to ``target``, unless
        they made :data:`MAX_CHANGES` to it already (``limit_reached``).  One user's
        changes to one item are counted and committed one after the other, so that
        requests in flight at once cannot all slip under the bound (nor be refused
        for each other)."""
        key = (target.id, session.user_id)
        lock = self._changing.get(key)
        if lock is None:
            lock = self._changing[key] = DeferredLock()

        def counted(stored: int) -> Deferred[Envelope]:
            if stored >= MAX_CHANGES:
                raise ChatError(
                    "limit_reached",
                    f"you made {MAX_CHANGES} edits and reactions to {target.id} already",
                )
            return self._commit(session.user_id, target, kind, body, meta)

        def turn() -> Deferred[Envelope]:
            return self._store.ref_count(target.id, session.user_id).addCallback(counted)

        def done(result: Any) -> Any:
            if not lock.locked and not lock.waiting:
                self._changing.pop(key, None)
            return result

        return lock.run(turn).addBoth(done)  # type: ignore[no-any-return]

    def react(
        self, session: Session, msg_id: Any, emoji: Any, remove: bool = False
    ) -> Deferred[Envelope]:
        """Add (or with ``remove``, take back) ``session``'s user's reaction
        ``emoji`` to an item they may read; fires with the committed ``reaction``
        item.  Adding a reaction one has (or removing one one has not) is stored all
        the same and changes nothing."""
        try:
            msg_id = check_msg_id(msg_id)
            emoji = check_emoji(emoji)
            self._spend(session)
        except ChatError as e:
            return fail(e)
        return self.target(session, msg_id).addCallback(
            lambda t: self._change(
                session, t, "reaction", "", ref_meta("reaction", t.id, emoji, remove)
            )
        )

    def edit(self, session: Session, msg_id: Any, body: Any) -> Deferred[Envelope]:
        """Replace the text of one's own text message; fires with the ``edit`` item
        (its ``body`` the new text)."""
        try:
            msg_id = check_msg_id(msg_id)
            body = self._realm.messages.check_body(body)
            self._spend(session)
        except ChatError as e:
            return fail(e)

        def check(t: Envelope) -> Any:
            if t.sender != session.user_id:
                raise ChatError("forbidden", "only its sender may edit a message")
            if t.kind != "text":
                raise ChatError("bad_request", "only text messages can be edited")
            return self._change(session, t, "edit", body, ref_meta("edit", t.id))

        return self.target(session, msg_id).addCallback(check)

    def delete(self, session: Session, msg_id: Any) -> Deferred[Envelope]:
        """Delete a message or file: its sender may, and in a group its admins and
        owners.  Fires with the committed ``delete`` item; by then the store has
        wiped the item (see chatproto.relations), and a file's bytes go once no
        other file holds them."""
        try:
            msg_id = check_msg_id(msg_id)
            self._spend(session)
        except ChatError as e:
            return fail(e)
        user = session.user_id
        if self._realm.moderation.is_admin(user):
            d = self._store.stored_item(msg_id)
            return d.addCallback(self._admin_delete, session, msg_id)

        def check(t: Envelope) -> Any:
            if not self._may_delete(t, user):
                raise ChatError(
                    "forbidden", "only its sender, or an admin of its group, may delete it"
                )
            self.deleting(t.id)
            meta = dict(t.meta or {})  # (as it is before the commit wipes it)
            d = self._commit(user, t, "delete", "", ref_meta("delete", t.id))
            return d.addCallback(self.deleted, t, meta)

        return self.target(session, msg_id).addCallback(check)

    def _admin_delete(self, t: Envelope | None, session: Session, msg_id: str) -> Any:
        """A realm admin deletes item ``t`` (issue 18): one they may delete as a user
        is deleted as theirs; any other message or file of a user of this realm, in
        any conversation, is deleted in its sender's name (the ``delete`` item's
        sender is the message's, so every party -- and every other realm, which accepts
        a sender's delete of their own item -- sees it as the sender's).  Logged."""
        user = session.user_id
        if (
            t is None
            or t.id in self._deleted
            or t.kind not in TARGET_KINDS
            or (t.meta is not None and t.meta.get("deleted") is True)
        ):
            raise ChatError("not_found", f"no message {msg_id}")
        readable = readable_by(t, user, session.floor, self._realm.groups.readable_from)
        if readable and self._may_delete(t, user):
            author = user
        elif t.sender.endswith("@" + self._realm.realm):
            author = t.sender
        else:
            raise ChatError(
                "forbidden", "a realm admin deletes the messages of this realm's users only"
            )
        self.deleting(t.id)
        if author != user:
            self.log.info(
                "realm admin {admin} deleted {msg} of {sender} (to {to})",
                admin=user,
                msg=t.id,
                sender=t.sender,
                to=t.recipient,
            )
        meta = dict(t.meta or {})  # (as it is before the commit wipes it)
        d = self._commit(author, t, "delete", "", ref_meta("delete", t.id))
        return d.addCallback(self.deleted, t, meta)

    def _may_delete(self, t: Envelope, user: str) -> bool:
        """:func:`may_delete` with ``user``'s role in ``t``'s group as this realm
        knows it (None outside a group, or in a group it does not hold)."""
        role = None
        if t.recipient.startswith("#"):
            group = self._realm.groups.groups.get(t.recipient)
            role = group.role_of(user) if group is not None else None
        return may_delete(t, user, role)

    def deleting(self, msg_id: str) -> None:
        """An item is being deleted: edits and reactions checked from now on are
        refused (they would be stored after the delete)."""
        self._deleted[msg_id] = None
        if len(self._deleted) > _DELETED_REMEMBERED:
            self._deleted.popitem(last=False)

    # from other realms -------------------------------------------------------------

    @inlineCallbacks
    def check_remote(self, env: Envelope) -> Any:
        """An ``edit``, ``delete`` or ``reaction``, or a reply (a text with
        ``meta.reply_to``), from another realm (already checked by
        :mod:`chatproto.realm.remote` to come from a realm that may carry it): the
        item it refers to must be stored here, of the same conversation, readable by
        its sender by this realm's state (a member of the group who may read it
        there, or a party of the private conversation), and for an edit theirs; for a
        delete theirs, or its sender an admin or owner of the group here.

        Fires with the item referred to, or None when ``env`` is stored already (a
        transaction sent again: the store skips it); fails with ``not_found`` or
        ``forbidden``, as for a local user.  The item referred to is found by the id
        its peer knows it by, in ``env``'s conversation (see
        :meth:`chatproto.store.IStore.stored_item_in`): its ``id`` may be an
        alternate one, which ``env`` must then be stored referring to
        (:func:`refer_to`)."""
        had = yield self._store.stored_item(env.id)
        if had is not None and (had.sender, had.recipient) == (env.sender, env.recipient):
            return None
        ref = named_ref(env)
        # By the id the peer knows, in this conversation: the item may be stored here
        # under an alternate id (its id was taken by another conversation's item).
        t = (yield self._store.stored_item_in(ref, env.conversation)) if ref is not None else None
        if (
            t is None
            or t.conversation != env.conversation
            or t.kind not in TARGET_KINDS
            or (t.meta is not None and t.meta.get("deleted") is True)
            or t.id in self._deleted
            or not readable_by(t, env.sender, 0, self._realm.groups.readable_from)
        ):
            raise ChatError("not_found", f"no message {ref} that {env.sender} may read here")
        if env.kind == "edit" and (t.sender != env.sender or t.kind != "text"):
            raise ChatError("forbidden", f"{env.sender} may not edit {ref}")
        if env.kind == "delete":
            if not self._may_delete(t, env.sender):
                raise ChatError("forbidden", f"{env.sender} may not delete {ref}")
        elif (
            env.kind in REF_KINDS and (yield self._store.ref_count(t.id, env.sender)) >= MAX_CHANGES
        ):
            raise ChatError("limit_reached", f"{env.sender} made {MAX_CHANGES} changes to {ref}")
        return t

    def deleted(self, env: Any, target: Envelope, meta: dict[str, Any] | None = None) -> Any:
        """The delete of ``target`` is committed: a file's downloads in progress stop,
        and its bytes go if no file refers to them any more (quota is counted from the
        file records, freed already).  ``meta``: the target's as it was before the
        delete (a store may have wiped the very object it holds); default its own."""
        meta = meta if meta is not None else target.meta
        if target.kind == "file" and meta is not None:
            file_id = meta.get("file_id")
            if isinstance(file_id, str):
                self._realm.files.withdraw(file_id)
            sha = meta.get("sha256")
            if isinstance(sha, str):
                d = self._realm.files.drop_blob(sha)
                d.addErrback(
                    lambda f: self.log.failure(
                        "removing the bytes {sha} of a deleted file", f, sha=sha
                    )
                )
        return env

    def reply_meta(
        self, session: Session, to: str, reply_to: Any, meta: dict[str, Any] | None
    ) -> Deferred[dict[str, Any]]:
        """The ``meta`` of a reply from ``session``'s user to ``to`` (canonical: a
        user or a group) answering item ``reply_to``, which they must be able to read
        (``not_found``) and which must be of that conversation (``bad_request``)."""

        def check(t: Envelope) -> dict[str, Any]:
            if self.conversation_of(t, session.user_id) != to:
                raise ChatError("bad_request", "reply_to names a message of another conversation")
            return {**(meta or {}), "reply_to": t.id}

        return self.target(session, reply_to, "reply_to").addCallback(check)
