"""The messaging handler: sending, committing and reading stream items.

A message is checked (body size, rate limit, recipient), committed durably (with its
outbox row when it is for another realm, in the same transaction) and only then routed
to online sessions: an acknowledged send is a committed one.  Sends carrying a client
``nonce`` are idempotent.  History pages are read with the same permissions as
delivery: a group's rule, or the account's floor for private conversations.

This is the hot path of the realm: no generators on the send path; a send batch's
private messages are appended as runs (:class:`SendRun`), each its commit's waiter,
with no Deferred; the general path (groups, replies, tags, lookups) has one per message.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatproto import address
from chatproto.address import Address
from chatproto.envelope import (
    Envelope,
    conversation_key,
    new_message_id,
    new_message_ids,
    new_text,
)
from chatproto.errors import ChatError
from chatproto.realm.sessions import Session
from chatproto.realm.tags import check_tags
from chatproto.relations import check_msg_id
from chatproto.text import check_body

if TYPE_CHECKING:
    from chatproto.realm.service import RealmService

__all__ = [
    "NONCES_PER_USER",
    "NOTICE_META",
    "Messaging",
    "SendRequest",
    "SendRun",
    "text_meta",
]

_log = Logger()

#: The ``meta`` of a text item sent as a notice (IRC's NOTICE): clients show it as a
#: notice and never answer it automatically.
NOTICE_META = {"notice": True}


def text_meta(meta: Any) -> dict[str, Any] | None:
    """The ``meta`` of a text item from another realm, checked: none, or
    ``notice: true`` and/or client ``tags`` (chatproto.realm.tags)."""
    if meta is None:
        return None
    if isinstance(meta, dict) and meta and set(meta) <= {"notice", "tags"}:
        out: dict[str, Any] = {}
        if "notice" in meta:
            if meta["notice"] is not True:
                raise ChatError("bad_request", 'a text item\'s "notice" is true or absent')
            out["notice"] = True
        if "tags" in meta:
            out["tags"] = check_tags(meta["tags"])
        return out
    raise ChatError("bad_request", 'a text item\'s meta holds only "notice" and "tags"')


#: One ``send`` request of a batch: ``(to, body, nonce, notice, reply_to, tags)``
#: (see Messaging.send_batch).
SendRequest = tuple[str, Any, "str | None", bool, "str | None", "dict[str, str] | None"]

#: Send nonces remembered per user for idempotent retries.
NONCES_PER_USER = 1024


#: The "no recipient yet" of send_batch (made once: an Address costs an attrs
#: ``__init__`` and its ``__attrs_post_init__``, per batch, ~70 bytecodes).
_NOWHERE = Address("", "")


def _made(
    commits: list[SendRun], items: list[Envelope]
) -> list[Envelope | Deferred[Envelope] | ChatError]:
    """The outcomes of send_batch's requests so far when each made an envelope: the
    items of the runs appended (``commits``), then those of the run being made."""
    made: list[Envelope | Deferred[Envelope] | ChatError] = []
    for run in commits:
        made.extend(run.items)
    made.extend(items)
    return made


#: What a run's listener gets (see SendRun.listen): its items, or the failure.
RunListener = Callable[..., object]

#: The nonces of a run's sends: ``(nonce, its repeats' waiters, envelope)``.
Remembered = list[tuple[str, list[Deferred[Envelope]], Envelope]]


class SendRun:
    """A run of private messages of one send batch, appended together
    (:meth:`Messaging.send_batch`).

    It is its append's waiter (:class:`chatproto.store.Waiter`): committed, its items are
    routed and its nonces settled, then the outcome goes to the one listener its
    caller gave (:meth:`listen`), without a Deferred or a callback chain per batch
    (the hot path: a paced realm appends one run per message).  :meth:`deferred`
    gives a Deferred to a caller that chains.  A listener's exception is logged,
    never passed on to the store's other waiters."""

    __slots__ = (
        "_args",
        "_err",
        "_listened",
        "_messaging",
        "_ok",
        "_outbox",
        "_remember",
        "_result",
        "items",
    )

    def __init__(
        self,
        messaging: Messaging,
        items: list[Envelope],
        outbox: list[tuple[str, Envelope]],
        remember: Remembered,
    ) -> None:
        self.items = items
        self._messaging = messaging
        self._outbox = outbox
        self._remember = remember
        #: the outcome, once the store gave it and until a listener takes it
        self._result: list[Envelope] | Failure | None = None
        self._ok: RunListener | None = None
        self._err: RunListener | None = None
        self._args: tuple[Any, ...] = ()
        self._listened = False

    def listen(self, ok: RunListener, err: RunListener, *args: Any) -> None:
        """Once the run is committed and routed, ``ok(items, *args)``; if it was not
        stored, ``err(failure, *args)``.  One listener per run (the caller of
        send_batch): called at once if the outcome is already here."""
        if self._listened:  # (before or after the outcome came: it is handed once)
            raise RuntimeError("a send run has one listener")
        self._listened = True
        result = self._result
        if result is not None:
            self._result = None
            self._hand(result, ok, err, args)
        else:
            self._ok, self._err, self._args = ok, err, args

    def deferred(self) -> Deferred[list[Envelope]]:
        """The outcome as a Deferred (for a caller that chains more steps)."""
        d: Deferred[list[Envelope]] = Deferred()
        self.listen(d.callback, d.errback)
        return d

    def callback(self, result: object) -> None:
        """The store: committed."""
        try:
            outcome: list[Envelope] | Failure = self._messaging.run_committed(
                self.items, self._outbox, self._remember
            )
        except Exception:
            outcome = Failure()
        self._settle(outcome)

    def errback(self, fail: Failure | None = None) -> None:
        """The store: nothing of the run was stored."""
        f = fail if fail is not None else Failure()
        self._settle(self._messaging.run_failed(f, self._remember))

    def _settle(self, outcome: list[Envelope] | Failure) -> None:
        ok = self._ok
        if ok is None:
            self._result = outcome
            return
        err = self._err
        self._ok = self._err = None
        self._hand(outcome, ok, err, self._args)

    @staticmethod
    def _hand(
        outcome: list[Envelope] | Failure,
        ok: RunListener,
        err: RunListener | None,
        args: tuple[Any, ...],
    ) -> None:
        try:
            if isinstance(outcome, Failure):
                if err is not None:
                    err(outcome, *args)
            else:
                ok(outcome, *args)
        except Exception:
            _log.failure("the listener of a send run failed")


class Messaging:
    """Sends (from sessions and from extensions), commits and history."""

    def __init__(self, realm: RealmService, known_users: set[str]) -> None:
        self._realm = realm
        self._name = realm.realm
        self._store = realm.store
        self._clock = realm.clock
        self._limits = realm.config.limits
        #: local account names known to exist (a cache the accounts code fills)
        self._known = known_users
        self._addresses: dict[str, Address] = {}
        #: user -> recent send nonces -> the envelope (or the pending Deferred)
        self._nonces: dict[str, OrderedDict[str, Any]] = {}
        #: session -> its sends made while one of its replies is looked up, stored
        #: once it is: ``(to, body, meta, reply_to, Deferred)``
        self._behind_reply: dict[Session, list[tuple[Any, ...]]] = {}

    def new_envelope(
        self,
        sender: str,
        recipient: str,
        kind: str,
        body: str,
        meta: dict[str, Any] | None = None,
        msg_id: str | None = None,
        ts: float | None = None,
    ) -> Envelope:
        """A new stream item.  ``sender`` is always the realm's own idea of who sends
        (a session's user, or a local user named by an extension), never client input.
        ``msg_id`` and ``ts``: drawn for a whole batch (see send_batch), else now."""
        return Envelope(
            id=msg_id or new_message_id(),
            kind=kind,
            sender=sender,
            recipient=recipient,
            ts=self._clock.seconds() if ts is None else ts,
            body=body,
            meta=meta,
        )

    def resolve_user(
        self, text: str, remote_ok: bool = False, by: str | None = None
    ) -> Address | Deferred[Address]:
        """The local user ``text`` names: an Address when known, else a Deferred.

        With ``remote_ok`` (a message's recipient), a user of another realm is returned
        as it is when federation with that realm is allowed (its realm checks it);
        ``by``, the user naming it, is charged for a link to a realm never reached
        (``RealmService.check_remote``).
        Parsed addresses are cached by their spelling (bounded), so the hot path does
        not normalise the same recipient for every message.
        """
        addr = self._addresses.get(text)
        if addr is None:
            addr = address.user(text, self._name)
            if len(self._addresses) >= 65536:
                self._addresses.clear()
            self._addresses[text] = addr
        if addr.realm != self._name:
            if not remote_ok:
                raise ChatError("remote_realm", f"{addr} is on another realm")
            self._realm.check_remote(addr.realm, by)
            return addr
        if addr.name in self._known:
            return addr

        def check(exists: bool) -> Address:
            if not exists:
                raise ChatError("no_such_user", f"no user {addr} on this realm")
            self._known.add(addr.name)
            return addr

        return self._store.user_exists(addr.name).addCallback(check)

    def check_body(self, body: Any) -> str:
        # (send_batch repeats its common case inline, ASCII text within the limit: a
        # change here is made there too; test_send_batch's
        # test_every_request_keeps_its_own_answer holds the two alike)
        if not isinstance(body, str):
            raise ChatError("bad_request", "field 'body' must be a string")
        max_body = self._limits.max_body
        if len(body) * 4 > max_body:  # else no need to encode: at most 4 bytes a char
            size = len(body.encode("utf-8", "surrogatepass"))
            if size > max_body:
                raise ChatError("too_large", f"body is {size} bytes; the limit is {max_body}")
        return check_body(body)

    # sending ------------------------------------------------------------------------

    def send(
        self,
        session: Session,
        to: str,
        body: str,
        nonce: str | None = None,
        notice: bool = False,
        reply_to: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> Deferred[Envelope]:
        """Store a message (to a user or a group), then route it; fires with the
        committed envelope.

        With a ``nonce``, a send repeated by the same user with the same nonce (a client
        retrying after its connection dropped before the result came) is not stored
        again: it gets the first send's envelope.  The realm remembers the last
        :data:`NONCES_PER_USER` nonces of each user, in memory.

        ``notice``: the message is a notice (IRC's NOTICE): stored with
        :data:`NOTICE_META`, so every client can tell it from a message to answer.

        ``reply_to``: the ``msg_id`` of the item of the same conversation this one
        answers (``meta.reply_to``; see :mod:`chatproto.realm.relations`).  Only a
        reply costs a store read before its commit.
        ``tags``: client tags kept with it, ``meta["tags"]`` (chatproto.realm.tags).
        """
        if nonce is not None:
            seen = self._nonces.get(session.user_id)
            if seen is not None and nonce in seen:
                first = seen[nonce]
                if isinstance(first, Envelope):
                    return succeed(first)
                waiter: Deferred[Envelope] = Deferred()  # the first is being stored
                first.append(waiter)
                return waiter
        try:
            # Every field is checked before the send costs a token of the rate limit.
            body = self.check_body(body)
            meta: dict[str, Any] | None = NOTICE_META if notice else None
            if tags is not None:  # a new dict: NOTICE_META is shared
                meta = {**(meta or {}), "tags": check_tags(tags)}
            if reply_to is not None:
                check_msg_id(reply_to, "reply_to")
            self.spend(session, self._clock.seconds())
        except ChatError as e:
            return fail(e)
        waiting = self._behind_reply.get(session)
        if waiting is not None:  # a reply of this session is being looked up: after it
            d: Deferred[Envelope] = Deferred()
            waiting.append((to, body, meta, reply_to, d))
        else:
            d = self._store_send(session, to, body, meta, reply_to)
        if nonce is not None:
            self._remember_nonce(session.user_id, nonce, d)
        return d

    def _store_send(
        self, session: Session, to: str, body: str, meta: dict[str, Any] | None, reply_to: Any
    ) -> Deferred[Envelope]:
        """Store a checked send.  A reply first looks its target up; until it is
        stored, the session's later sends wait (:attr:`_behind_reply`), so that a
        connection's messages take positions in the order they were sent."""
        if reply_to is None:
            return self.send_as(session.user_id, to, body, meta)
        self._behind_reply[session] = []
        return self._reply(session, to, body, meta, reply_to)

    def _release(self, session: Session) -> None:
        """A reply of ``session`` was stored (or refused): store the sends that
        waited for it, in order, until one of them is a reply again."""
        waiting = self._behind_reply.pop(session, [])
        for k, (to, body, meta, reply_to, d) in enumerate(waiting):
            self._store_send(session, to, body, meta, reply_to).chainDeferred(d)
            if session in self._behind_reply:  # a reply again: the rest wait for it
                self._behind_reply[session].extend(waiting[k + 1 :])
                return

    def spend(self, session: Session, now: float) -> None:
        """Take a token of ``session``'s send rate (``rate_limited`` when there is
        none): every send pays one, and so do reactions, edits and deletes.

        send_batch takes its tokens inline, item by item as this does (a change
        here is made there too; the test
        ``test_rate_limit_counts_only_checked_sends_and_the_general_path_in_order``
        holds the two alike)."""
        wait = session.bucket.take(now)
        if wait:
            self._realm.stats.rate_limited("send")
            raise ChatError("rate_limited", "sending too fast", retry_after=round(wait, 3))

    def _check_recipient(self, recipient: Address) -> None:
        """A message may not go to a suspended local account (account_suspended)."""
        admin = self._realm.admin
        if recipient.realm == self._name and admin.suspended:
            if admin.is_suspended(recipient.name):
                raise ChatError("account_suspended", f"{recipient} is suspended")

    @inlineCallbacks
    def _reply(
        self, session: Session, to: str, body: str, meta: dict[str, Any] | None, reply_to: str
    ) -> Any:
        try:
            if to.startswith("#"):
                canonical = self._realm.group_handler.address(to, True, session.user_id)
            else:
                addr = self.resolve_user(to, True, session.user_id)
                if isinstance(addr, Deferred):
                    addr = yield addr
                canonical = str(addr)
            meta = yield self._realm.relations.reply_meta(session, canonical, reply_to, meta)
            stored = self.send_as(session.user_id, canonical, body, meta)
        finally:
            self._release(session)  # (after the reply's own send_as: its position first)
        env = yield stored
        return env

    def send_batch(
        self, session: Session, requests: Sequence[SendRequest]
    ) -> tuple[list[Envelope | Deferred[Envelope] | ChatError], list[SendRun]]:
        """Several sends of one session at once (what one read from its connection
        held), with the rules of :meth:`send` applied to each, in order.

        Returns ``(outcomes, commits)``.  ``outcomes[i]`` answers ``requests[i]``:
        a :class:`ChatError` (refused now), a Deferred (a send taking the general path:
        a group, a reply, client tags, a repeated nonce, a recipient to look up), or an
        Envelope: one of the
        private messages appended together, with one :class:`SendRun` in ``commits``
        per run of them, holding that run's envelopes (its listener hears of them once
        they are committed and delivered, or of the failure if none was stored).  Runs
        are cut at each general-path send, so items are appended in request order
        (their positions follow it).
        """
        user = session.user_id
        # While every request so far made an envelope, the outcomes are the runs' items:
        # their list is made at the first other outcome (see _made), or at the end.
        outcomes: list[Envelope | Deferred[Envelope] | ChatError] | None = None
        items: list[Envelope] = []
        outbox: list[tuple[str, Envelope]] = []
        remember: Remembered = []
        now = self._clock.seconds()
        commits: list[SendRun] = []
        ids = new_message_ids(len(requests))  # (those of refused sends go unused)

        def cut() -> None:
            """Append the run so far: what follows takes its position after it."""
            nonlocal items, outbox, remember
            if items:
                run = SendRun(self, items, outbox, remember)
                self._store.append_to(run, items, outbox)
                commits.append(run)
                items, outbox, remember = [], [], []

        # (Tests against Address, not Deferred: Deferred is an ABC's subclass, and isinstance
        # on it costs a Python-level __instancecheck__ per item.)
        local = self._name
        suspensions = self._realm.admin.suspended  # (no account suspended: no check)
        check = self.check_body
        max_chars = self._limits.max_body // 4  # (a character: at most 4 bytes of UTF-8)
        nonces, behind = self._nonces, self._behind_reply
        late = session in behind  # (a reply of the session is being looked up)
        # The rate limit, taken item by item as spend() takes it, without its calls:
        # the bucket refills (to ``now``) before the first item that reaches it, and
        # again after a send of the general path (which spends at its own time).
        bucket = session.bucket
        filled = False
        # The recipient of the last item, resolved (a batch mostly writes to one peer):
        # a request to it (``to`` spelt the same) is a private message, not a group's.
        last_to: str | None = None
        last_addr = _NOWHERE
        last_text = ""
        remote: str | None = None  # its realm, when not this one
        for k, (to, body, nonce, notice, reply_to, tags) in enumerate(requests):
            if (
                to != last_to
                or nonce is not None
                or reply_to is not None
                or tags is not None
                or late
            ):
                if (
                    to[:1] == "#"
                    or reply_to is not None
                    or tags is not None
                    or (nonce is not None and nonce in nonces.get(user, ()))
                    or late
                ):
                    cut()
                    if outcomes is None:
                        outcomes = _made(commits, [])
                    outcomes.append(self.send(session, to, body, nonce, notice, reply_to, tags))
                    late = session in behind
                    filled = False
                    continue
            try:
                # check_body's checks (bad_request, too_large), its common case inline:
                # ASCII text within the limit at 4 bytes a character, no ESC
                if (
                    type(body) is not str
                    or len(body) > max_chars
                    or not body.isascii()
                    or "\x1b" in body
                ):
                    body = check(body)
                # then the rate limit
                if not filled:
                    bucket.take(now, 0.0)  # (the refill of take(now), taking nothing)
                    filled = True
                tokens = bucket.tokens
                if tokens >= 1.0:
                    bucket.tokens = tokens - 1.0
                else:
                    self.spend(session, now)  # refused: rate_limited, with its wait
                if to != last_to:
                    recipient = self.resolve_user(to, True, user)
                    if not isinstance(recipient, Address):  # to be looked up
                        cut()  # (the general path)
                        meta = NOTICE_META if notice else None
                        d: Deferred[Envelope] = recipient.addCallback(
                            self._store_private_to, user, body, meta
                        )
                        if nonce is not None:
                            self._remember_nonce(user, nonce, d)
                        if outcomes is None:
                            outcomes = _made(commits, [])
                        outcomes.append(d)
                        late = session in behind
                        continue
                    last_to, last_addr, last_text = to, recipient, str(recipient)
                    remote = None if recipient.realm == local else recipient.realm
                if suspensions:
                    self._check_recipient(last_addr)
            except ChatError as e:
                if outcomes is None:
                    outcomes = _made(commits, items)
                outcomes.append(e)
                continue
            # (what new_envelope makes, without its call and the class call)
            env = new_text(ids[k], user, last_text, now, body, NOTICE_META if notice else None)
            if remote is not None:
                outbox.append((remote, env))
            items.append(env)
            if outcomes is not None:
                outcomes.append(env)
            if nonce is not None:
                remember.append((nonce, self._nonce_slot(user, nonce), env))
        if outcomes is None:  # every request made an envelope
            outcomes = _made(commits, items)
        cut()
        return outcomes, commits

    def run_committed(
        self, items: list[Envelope], outbox: list[tuple[str, Envelope]], remember: Remembered
    ) -> list[Envelope]:
        """A :class:`SendRun` was committed: its items (all from one user) are
        routed, woken for their realms, and its nonces settled."""
        realm_ = self._realm
        new_conversation = realm_.presence.new_conversation
        user = items[0].sender
        last = None
        realm_.begin_burst()  # (a group commit is one already; a MemoryStore's is not)
        try:
            for env in items:
                if env.recipient != last:  # the same pair: nothing new
                    last = env.recipient
                    new_conversation(user, last)
            realm_.route_private(items)
            for realm, env in outbox:
                realm_.wake(env, realm)
        finally:
            realm_.end_burst()
        for nonce, waiters, env in remember:
            self._nonce_stored(env, user, nonce, waiters)
        return items

    def run_failed(self, f: Failure, remember: Remembered) -> Failure:
        """Nothing of a :class:`SendRun` was stored: its nonces may be tried again;
        returns the failure its listener hears (a cluster's worker says
        ``unavailable`` for a lost database)."""
        for nonce, waiters, env in remember:
            self._nonce_failed(f, env.sender, nonce, waiters)
        return f

    def _nonce_slot(self, user: str, nonce: str) -> list[Deferred[Envelope]]:
        """Remember that ``user``'s send with ``nonce`` is being stored; its repeats
        wait in the list returned until :meth:`_nonce_stored` or :meth:`_nonce_failed`."""
        seen = self._nonces.setdefault(user, OrderedDict())
        waiters: list[Deferred[Envelope]] = []
        seen[nonce] = waiters
        if len(seen) > NONCES_PER_USER:
            seen.popitem(last=False)
        return waiters

    def _nonce_stored(
        self, env: Envelope, user: str, nonce: str, waiters: list[Deferred[Envelope]]
    ) -> Envelope:
        seen = self._nonces.get(user)
        if seen is not None and seen.get(nonce) is waiters:
            seen[nonce] = env
        for w in waiters:
            w.callback(env)
        return env

    def _nonce_failed(
        self, f: Failure, user: str, nonce: str, waiters: list[Deferred[Envelope]]
    ) -> Failure:
        seen = self._nonces.get(user)
        if seen is not None and seen.get(nonce) is waiters:
            del seen[nonce]  # nothing was stored: a retry may try again
        for w in waiters:
            w.errback(f)
        return f

    def _remember_nonce(self, user: str, nonce: str, d: Deferred[Envelope]) -> None:
        waiters = self._nonce_slot(user, nonce)
        d.addCallbacks(
            self._nonce_stored,
            self._nonce_failed,
            callbackArgs=(user, nonce, waiters),
            errbackArgs=(user, nonce, waiters),
        )

    def forget_nonces(self, user: str) -> None:
        """Forget the send nonces of canonical user address ``user``."""
        self._nonces.pop(user, None)

    def post(self, sender: str, to: str, body: str) -> Deferred[Envelope]:
        """Send ``body`` to ``to`` (a user or ``#group``) as local user ``sender``: the
        same rules as a client's ``send`` except the rate limit."""
        try:
            body = self.check_body(body)
            addr = self.resolve_user(sender)
        except ChatError as e:
            return fail(e)
        if isinstance(addr, Deferred):
            return addr.addCallback(lambda a: self.send_as(str(a), to, body))
        return self.send_as(str(addr), to, body)

    def send_as(
        self, sender: str, to: str, body: str, meta: dict[str, Any] | None = None
    ) -> Deferred[Envelope]:
        """A checked ``body`` from canonical local user ``sender`` to ``to``; ``meta``
        is None, or checked as :func:`text_meta` says (a notice, client tags), or a
        checked reply's."""
        try:
            if to.startswith("#"):
                return self._realm.group_handler.send(sender, to, body, meta)
            recipient = self.resolve_user(to, True, sender)
        except ChatError as e:
            return fail(e)
        if isinstance(recipient, Deferred):
            return recipient.addCallback(lambda r: self._store_private(sender, r, body, meta))
        return self._store_private(sender, recipient, body, meta)

    def _store_private_to(
        self, recipient: Address, sender: str, body: str, meta: dict[str, Any] | None
    ) -> Deferred[Envelope]:
        return self._store_private(sender, recipient, body, meta)

    def _store_private(
        self, sender: str, recipient: Address, body: str, meta: dict[str, Any] | None = None
    ) -> Deferred[Envelope]:
        try:
            self._check_recipient(recipient)
        except ChatError as e:
            return fail(e)
        env = self.new_envelope(sender, str(recipient), "text", body, meta)
        # Durable before anyone hears of it: routing happens after the commit.
        if recipient.realm == self._name:
            return self._store.append([env]).addCallback(self.committed, env)
        # For another realm: the outbox row is committed with the item, so the item is
        # delivered there whatever happens to this process after the commit.
        d = self._store.append([env], [(recipient.realm, env)])
        d.addCallback(self.committed, env)
        return d.addCallback(self._realm.wake, recipient.realm)

    def commit_item(self, env: Envelope) -> Deferred[Envelope]:
        """Store an item the realm's rules have already allowed (a file message, say),
        then route it like a message; fires with it once committed.

        An item for another realm (a user there, or a group with members there) is
        committed with its outbox rows, like a message; a ``file`` item's bytes are
        then fetched from here by each of those realms (see ``receive_remote``).  To a
        group, the sender must still be a member (``not_member``)."""
        groups = self._realm.group_handler
        if env.recipient.startswith("#"):
            try:
                realms = groups.item_realms(env.sender, env.recipient)
            except ChatError as e:
                return fail(e)
            return groups.append(env, realms)
        home = env.recipient.rpartition("@")[2]
        if home != self._name:  # a file for a user on another realm, which fetches it
            d = self._store.append([env], [(home, env)]).addCallback(self.committed, env)
            return d.addCallback(self._realm.wake, home)
        return self._store.append([env]).addCallback(self.committed, env)

    def committed(self, _: object, env: Envelope) -> Envelope:
        """A private item was committed: its two ends become presence partners, and
        it is delivered."""
        self._realm.presence.new_conversation(env.sender, env.recipient)
        self._realm.route(env)
        return env

    # reading ------------------------------------------------------------------------

    @inlineCallbacks
    def history(
        self,
        session: Session,
        peer: str,
        before: int | None,
        after: int | None,
        limit: int | None,
    ) -> Any:
        page = self._limits.history_page
        limit = page if limit is None else limit
        if not 1 <= limit <= page:
            raise ChatError("bad_request", f"limit must be between 1 and {page}")
        if peer.startswith("#"):
            conversation = self._realm.group_handler.address(peer, True, session.user_id)
            # The group's rule decides (not the account's age): under "all" a member
            # reads what was said before they, or their account, existed.
            floor = self._realm.groups.readable_from(conversation, session.user_id)
        else:
            other = address.user(peer, self._name)
            conversation = conversation_key(session.user_id, str(other))
            floor = session.floor
        items = yield self._store.history(conversation, before, after, limit, floor)
        return items
