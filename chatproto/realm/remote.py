"""Remote intake: what other realms send this realm, checked before it is stored.

Federation links (:mod:`chatproto.federation`) authenticate a peer realm and carry its
transactions; this handler decides what of them may be stored: the anti-forgery rules
(a realm speaks for its own users; a group's home realm for its group, within the
limits of PROTOCOL.md "What a home realm may assert"), signatures of items relayed for
third realms' users, numeric ranges, membership in the mirror of a group.  Accepted
items are committed (``IStore.append_remote``) and routed like local ones; refused
ones are answered in the transaction's ``ack``.  It also queues this realm's own
requests to other realms' groups (``forward_group_change``) and turns a peer's
refusals into ``bounce`` items for local senders.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, fail, gatherResults, inlineCallbacks, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from chatproto import address, wire
from chatproto.accounts import is_removal_request
from chatproto.address import Address
from chatproto.envelope import Envelope, new_message_id, remote_ts
from chatproto.errors import ChatError
from chatproto.files import new_file_id
from chatproto.groups import (
    ACCOUNT_DELETED,
    EVENTS,
    HISTORY_RULES,
    MAX_TOPIC,
    ROLES,
    SETTINGS,
    VISIBILITIES,
    check_settings,
    check_snapshot,
)
from chatproto.realm.messaging import text_meta
from chatproto.realm.relations import named_ref, refer_to
from chatproto.relations import REF_KINDS, check_msg_id, remote_meta
from chatproto.signing import canonical, parse_sig
from chatproto.signing import verify_all as _verify_all
from chatproto.store import FILE_META
from chatproto.store.grouprealms import queued_realms
from chatproto.text import check_label, log_shown

if TYPE_CHECKING:
    from chatproto.realm.service import RealmService

__all__ = ["MAX_ITEM_ID", "MAX_KEY_FETCHES", "RemoteIntake", "check_item_id"]

#: Arguments a group change may carry (forwarded with a request to a group's realm),
#: with the type of their value: a join's ``key``, a ``set_voice``'s ``voice``, a
#: ``set_group``'s settings (the home realm checks the values as for its own users).
_EVENT_ARGS: dict[str, type] = {
    "user": str,
    "reason": str,
    "topic": str,
    "role": str,
    "visibility": str,
    "voice": bool,
    **SETTINGS,
}
#: The client request that asks for each group event (for bounce texts).
_REQUEST_OF = {
    "joined": "join",
    "left": "leave",
    "invited": "invite",
    "kicked": "kick",
    "banned": "ban",
    "unbanned": "unban",
    "topic": "set_topic",
    "role": "set_role",
    "deleted": "delete_group",
}
#: The kinds of items a peer may send (a request is not an item).
_KINDS = frozenset({"text", "event", "file"}) | REF_KINDS
#: Group events that name another user than their actor (``meta.user``).
_TARGETED = frozenset({"invited", "kicked", "banned", "unbanned", "role", "voice"})
#: Realms whose keys one transaction may make us ask for (see _check_signatures).
MAX_KEY_FETCHES = 4
#: Refusals of a peer's item logged as warnings (a forgery): the others are info.
_FORGERIES = frozenset({"forged_sender", "bad_signature"})


#: The longest id of an item (or request) a peer sends, in characters.
MAX_ITEM_ID = 64


def check_item_id(mid: Any) -> str:
    """The id of an item or request a peer realm sent: a string of 1 to
    :data:`MAX_ITEM_ID` characters that is a ``msg_id`` clients can name (the rule of
    :func:`chatproto.relations.check_msg_id`: no control character, space, line or
    paragraph separator or bidi formatting character); else ``bad_request``.

    The id is stored, delivered to every kind of client, relayed to the group's
    other realms and named by reactions, edits and deletes: one a client could not
    name would make an item no one can act on, and CR/LF or an escape in it reaches
    whatever shows ids."""
    if not isinstance(mid, str) or not 0 < len(mid) <= MAX_ITEM_ID:
        raise ChatError("bad_request", f"item id must be a string of 1-{MAX_ITEM_ID} characters")
    return check_msg_id(mid, "item id")


def _message_meta(kind: str, meta: Any, body: str) -> dict[str, Any] | None:
    """The checked ``meta`` of a text, reaction, edit or delete item from a peer: a
    text's as a local ``send`` makes it (:func:`text_meta`, and a ``reply_to``), the
    others' as :func:`chatproto.relations.remote_meta` says."""
    if kind != "text":
        return remote_meta(kind, meta, body)
    if isinstance(meta, dict) and "reply_to" in meta:
        rest = {k: v for k, v in meta.items() if k != "reply_to"}
        out = text_meta(rest or None) or {}
        out["reply_to"] = check_msg_id(meta["reply_to"], "meta.reply_to")
        return out
    return text_meta(meta)


class RemoteIntake:
    """Items, requests and refusals from peer realms (see the module docstring)."""

    log = Logger()

    def __init__(self, realm: RealmService) -> None:
        self._r = realm
        self.realm = realm.realm
        self._suffix = "@" + realm.realm
        self.store = realm.store
        self.clock = realm.clock
        self.config = realm.config
        self.groups = realm.groups
        self._parsed: dict[tuple[Any, str, bool], Address] = {}

    def _remote_item(self, origin: str, raw: Any) -> tuple[Envelope, bool, Any, str | None]:
        """Check one item a peer realm sent: the Envelope to store, whether this realm
        relays it to the group's other member realms (as the home realm of its group),
        what is left to check against the store (see :meth:`_from_home`), and the
        realm whose signature it must carry (see :meth:`_check_signatures`), or
        ChatError.

        The anti-forgery rules: ``origin`` (authenticated by its certificate) may carry
        messages and files from its own users to users of this realm or to groups whose
        home is this realm (if the sender is a member); and, as the home realm of a
        group, what :meth:`_from_home` allows.  Nothing else: a member realm never
        carries a group's items to another member realm.
        """
        if not isinstance(raw, dict):
            raise ChatError("bad_request", "an item must be an object")
        mid, kind, ts, body = raw.get("id"), raw.get("kind"), raw.get("ts"), raw.get("body")
        mid = check_item_id(mid)
        if kind not in _KINDS:
            raise ChatError("bad_request", f"item kind {str(kind)[:20]!r} is not accepted")
        ts = remote_ts(ts, self.clock.seconds())
        body = self._r.messages.check_body(body)
        sender = self._parse(raw.get("from"), origin, False)
        to = raw.get("to")
        meta = raw.get("meta")
        relay = False
        follow: Any = None
        signer: str | None = None  # the realm whose signature the item must carry
        if isinstance(to, str) and to.startswith("#"):
            group = self._parse(to, self.realm, True)
            recipient = str(group)
            if group.realm == origin:  # the group's home realm: authoritative for it
                meta, follow = self._from_home(origin, sender, recipient, kind, meta, body)
                if kind != "event" and sender.realm not in (origin, self.realm):
                    signer = sender.realm  # relayed: its author's realm proves it
            elif group.realm == self.realm:  # a member on the peer writes to our group
                if sender.realm != origin:
                    raise ChatError(
                        "forged_sender", f"{origin} may not carry messages from {sender}"
                    )
                if kind == "file":
                    meta = _file_meta(meta, body)
                elif kind == "event":
                    raise ChatError(
                        "bad_request",
                        "only messages, files, reactions, edits and deletes "
                        "go to a group's home realm",
                    )
                else:
                    meta = _message_meta(kind, meta, body)
                self.groups.check_speaker(str(recipient), str(sender))
                relay = True  # to the member realms of when it is committed
                signer = origin  # we relay it: it must carry its realm's proof
            else:
                raise ChatError(
                    "forged_sender", f"{origin} may not carry items of {group}, a third realm's"
                )
        else:
            if sender.realm != origin:
                raise ChatError(
                    "forged_sender", f"{origin} may not carry messages from {sender} (its realm)"
                )
            if kind == "file":
                meta = _file_meta(meta, body)
            elif kind == "event":
                raise ChatError("bad_request", "a private item is not an event")
            else:
                meta = _message_meta(kind, meta, body)
            user = self._parse(to, self.realm, False)
            if user.realm != self.realm:
                raise ChatError("bad_address", f"{user} is not on this realm")
            recipient = str(user)  # that the account exists is checked by the caller
        env = Envelope(
            id=mid,
            kind=kind,
            sender=str(sender),
            recipient=recipient,
            ts=ts,
            body=body,
            meta=dict(meta) if isinstance(meta, dict) else None,
        )
        if signer is not None and raw.get("sig") is not None:
            env.sig = parse_sig(raw["sig"])
        return env, relay, follow, signer

    def _from_home(
        self, origin: str, sender: Address, group: str, kind: str, meta: Any, body: str
    ) -> tuple[Any, str | ChatError | None]:
        """Check an item of ``group`` from its home realm ``origin``: its checked
        ``meta``, and what is left to check against the store (``echo``: an item of
        one of our users, which must be one we sent; ``request``: an event in which
        one of our users acts, which must answer a request of theirs we sent; a
        ChatError: the item breaks a rule of the group's state, unless it is stored
        already -- a transaction sent again after what came next changed the state).

        What a home realm may assert (PROTOCOL.md, "What a home realm may assert"):
        the group's items from its members (per our mirror, kept by its events), the
        state of its group (events about anyone but our users, while we have a
        member), and the removal, roles, invitations and bans of our users.  Never a
        word or an act of one of our users they did not ask for: no item from them,
        no join, no leave, no change in their name, no snapshot listing them; and
        nothing of a group we have no member in but what concerns our users.
        """
        local = sender.realm == self.realm
        mirror = self.groups.groups.get(group)
        if kind != "event":
            if kind == "file":
                meta = _file_meta(meta, body)
            else:
                meta = _message_meta(kind, meta, body)
            if local:
                return meta, "echo"
            if mirror is None or (
                str(sender) not in mirror.members
                and not (kind in ("text", "file") and mirror.takes_outsiders())
            ):  # (as Groups.check_speaker lets a non-member send to a group that takes outsiders)
                return meta, ChatError("not_member", f"{sender} is not a member of {group} here")
            return meta, None
        meta = _event_meta(meta)
        event, user = meta["event"], meta.get("user", "")
        if event == "created":
            raise ChatError("bad_request", "a created event is not sent to other realms")
        if event in ("joined", "left") and user != str(sender):
            raise ChatError("bad_request", f"the user of a {event} event is its sender")
        if event in _TARGETED and not user:
            raise ChatError("bad_request", f"a {event} event needs meta.user")
        if "snapshot" in meta:
            if event != "joined" or not local:
                raise ChatError(
                    "bad_request", f"a snapshot comes only with the join of a user of {self.realm}"
                )
            _snapshot(meta["snapshot"])
            if any(u.endswith(self._suffix) for u in meta["snapshot"]["members"]):
                raise ChatError(
                    "forged_sender", f"{origin} may not list users of {self.realm} in a snapshot"
                )
            if mirror is not None:
                return meta, ChatError(
                    "bad_request", f"a snapshot, but {self.realm} has members in {group} already"
                )
        if local:
            return meta, "request"  # it acts for one of our users: did they ask?
        if user.endswith(self._suffix):
            # The home realm removes our users, sets their roles, invites and bans
            # them; it can say nothing they did.
            if event in ("kicked", "role", "voice") and (
                mirror is None or user not in mirror.members
            ):
                return meta, ChatError("not_member", f"{user} is not a member of {group}")
            return meta, None
        if mirror is None:
            return meta, ChatError("no_such_group", f"no user of {self.realm} is in {group}")
        return meta, None

    @inlineCallbacks
    def _follow_up(self, origin: str, env: Envelope, follow: str | ChatError) -> Any:
        """The store half of :meth:`_from_home`: fires with the id of the request
        ``env`` answers (``request``), or None for an item to skip (stored already),
        or fails with a ChatError (``forged_sender``, or the one ``follow`` is)."""
        if follow == "request":
            pending = yield self.store.pending_requests(env.sender, env.recipient)
            answered = _answered(env, pending)
            if answered is not None:
                return answered
        had = yield self.store.stored_item(env.id)
        if had is not None and (had.sender, had.recipient) == (env.sender, env.recipient):
            return None  # sent again (a retried transaction, or ours sent back)
        if isinstance(follow, ChatError):
            raise follow
        if follow == "echo":
            why = f"{self.realm} sent no item {env.id} from {env.sender}"
        else:
            event = (env.meta or {}).get("event")
            why = f"{env.sender} asked for no such change ({event} in {env.recipient})"
        raise ChatError("forged_sender", f"{origin} may not speak for {env.sender}: {why}")

    def _first_hop_reply(self, env: Envelope) -> bool:
        """Whether ``env`` is a reply this realm is the first to judge: a private one,
        or one to a group of ours, whose target must be an item of its conversation
        that its sender may read (the rule of a local ``send``).  A reply the home
        realm of a group relays was judged there: it is stored even where the item it
        answers is not (a member realm keeps the group's items from its first join)."""
        if env.kind != "text" or not env.meta or "reply_to" not in env.meta:
            return False
        return not env.recipient.startswith("#") or env.recipient.endswith(self._suffix)

    def _parse(self, text: Any, default_realm: str, group: bool) -> Address:
        """:func:`address.parse`, cached by spelling (bounded): a peer's transactions
        repeat the same few senders and recipients."""
        key = (text, default_realm, group)
        addr = self._parsed.get(key) if isinstance(text, str) else None
        if addr is None:
            addr = address.parse(text, default_realm, group=group)
            if len(self._parsed) >= 65536:
                self._parsed.clear()
            self._parsed[key] = addr
        return addr

    def _remote_request(self, origin: str, raw: dict[str, Any]) -> Deferred[Envelope | None]:
        """A user of ``origin`` asks for a change to one of our groups (join, leave,
        kick...): the same rules as for a local user, with the requester as actor.

        The event is stored under the request's id, so a request sent again (a
        retried transaction whose ack was lost, or an old one replayed) is known and
        acknowledged, not applied a second time: answered ``already_member`` it would
        bounce a join that was made, and after a leave it would make the user join
        again.  An id taken by another item leaves the event an id of its own."""
        rid = check_item_id(raw.get("id"))
        actor = address.user(raw.get("from"), origin)  # type: ignore[arg-type]
        if actor.realm != origin:
            raise ChatError("forged_sender", f"{origin} may not act for {actor}")
        group = address.parse(raw.get("to"), self.realm, group=True)  # type: ignore[arg-type]
        if group.realm != self.realm:
            raise ChatError("bad_address", f"{group} is not a group of this realm")
        event, args = raw.get("event"), raw.get("args") or {}
        if event not in EVENTS or event == "created":
            raise ChatError("bad_request", f"event {str(event)[:20]!r} cannot be requested")
        if not isinstance(args, dict) or not set(args) <= set(_EVENT_ARGS):
            raise ChatError("bad_request", f"request args: {', '.join(_EVENT_ARGS)}")
        for name, value in args.items():
            kind = _EVENT_ARGS[name]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ChatError("bad_request", f"request arg {name}: a {kind.__name__}")
        if event == "left" and args.get("reason") == ACCOUNT_DELETED:
            # The requester's realm deleted the account: it is the authority on its
            # own accounts, so the standing ends whatever the rules of leave say.
            return self._r.group_handler.end_standing(str(actor), [str(group)])  # type: ignore[no-any-return]
        return self._request_once(rid, str(actor), event, str(group), dict(args))

    @inlineCallbacks
    def _request_once(
        self, rid: str, actor: str, event: str, group: str, args: dict[str, Any]
    ) -> Any:
        """:meth:`_remote_request`'s change, unless its event is stored already."""
        had = yield self.store.stored_item(rid)
        item_id: str | None = rid
        if had is not None:
            if had.kind == "event" and (had.sender, had.recipient) == (actor, group):
                return None  # applied already: the request was sent again
            item_id = None  # the id is another item's
        env = yield self._r.group_handler.change(actor, event, group, args, item_id=item_id)
        return env

    def forward_group_change(
        self, actor: str, event: str, addr: str, args: dict[str, Any]
    ) -> Deferred[Envelope]:
        """A local user's change to a group on another realm: queued durably as a
        request to the group's home realm, which decides.  Fires with a pending
        envelope (position 0); the event itself arrives from the home realm."""
        if event == "created":
            return fail(ChatError("remote_realm", f"{addr} can only be created on its realm"))
        home = addr.rpartition("@")[2]
        request: dict[str, Any] = {
            "id": new_message_id(),
            "kind": "request",
            "from": actor,
            "to": addr,
            "event": event,
            "args": {k: v for k, v in args.items() if k in _EVENT_ARGS and v is not None},
            "ts": self.clock.seconds(),  # for giving up on an unreachable home realm
        }
        pending = {"event": event, "pending": True}
        env = self._r.messages.new_envelope(actor, addr, "event", "", pending)
        env.id = request["id"]

        def queued(_: object) -> Envelope:
            self._r.wake(env, home)
            return env

        return self.store.outbox_enqueue(home, [request]).addCallback(queued)

    @inlineCallbacks
    def receive_remote(
        self, origin: str, items: Sequence[Any], fetch: Any = None, queued: Any = None
    ) -> Any:
        """Store the items of one transaction from peer realm ``origin``, then route
        them like local items (feeds, positions, offline delivery); apply requests
        (a remote user joining one of our groups...) in order with them.

        Items already stored (same id: a retried transaction) are skipped.  Items that
        break a rule are not stored: fires, after the commit, with one
        ``{"id", "code", "message"}`` per rejected item (the peer logs them).

        A ``file`` item is stored once its bytes are here: ``fetch(file_id, blob)``
        (from the link the item came on) streams them from ``origin`` into a
        :class:`chatproto.files.RemoteBlob` and fires when they are all written, so
        recipients always download from their own realm.

        ``queued()``, if given, is called once every item is checked and handed to the
        store, before the last commit: items the caller hands to the store after that
        are committed after these (the link starts on its next transaction then).
        """
        rejected: list[dict[str, Any]] = []
        # items deleted by delete items of the transaction: (the delete's id, the
        # item, its meta as it was: the store may wipe the very object it holds)
        deleted: list[tuple[str, Envelope, dict[str, Any]]] = []
        batch: list[Envelope] = []
        relayed: list[Envelope] = []  # items of batch to relay to member realms
        signed: list[tuple[Envelope, str]] = []  # items of batch to verify, and by whom
        # items of batch that name what they refer to by a peer's id of an item stored
        # here under an alternate id: pointed at that, once their signatures are checked
        pointed: list[tuple[Envelope, str]] = []

        def reject(mid: Any, e: ChatError) -> None:
            mid = mid if isinstance(mid, str) else None
            rejected.append({"id": mid, "code": e.code, "message": e.message})
            log = self.log.warn if e.code in _FORGERIES else self.log.info
            log(
                "federation: rejected item {id} from {origin}: {code}: {message}",
                id=log_shown(mid),
                origin=origin,
                code=e.code,
                message=e.message,
            )

        @inlineCallbacks
        def verified() -> Any:
            """Check the signatures of the batch (one pass, in a thread), and drop the
            items that fail from it before it is stored."""
            nonlocal batch, relayed, signed
            if signed:
                bad = yield self._check_signatures(signed, origin)
                signed = []
                for env in batch:
                    if id(env) in bad:
                        reject(env.id, bad[id(env)])
                batch = [e for e in batch if id(e) not in bad]
                relayed = [e for e in relayed if id(e) not in bad]
            for env, local in pointed:
                refer_to(env, local)
            pointed.clear()

        @inlineCallbacks
        def flush() -> Any:
            nonlocal batch, relayed
            yield verified()
            if batch:
                yield self._store_remote(origin, batch, relayed)
            batch, relayed = [], []

        for raw in items:
            try:
                if isinstance(raw, dict) and raw.get("kind") == "request":
                    yield flush()
                    yield self._remote_request(origin, raw)
                    continue
                env, relay, follow, signer = self._remote_item(origin, raw)
                answers = None
                if follow is not None:
                    answers = yield self._follow_up(origin, env, follow)
                    if answers is None:
                        continue  # stored already
                if not env.recipient.startswith("#"):
                    name = env.recipient.rpartition("@")[0]
                    if name not in self._r.accounts.known:  # e.g. added by chatrealmctl
                        if not (yield self._r.accounts.exists(name)):
                            raise ChatError("no_such_user", f"no user {env.recipient} here")
                    if self._r.admin.is_suspended(name):
                        raise ChatError("account_suspended", f"{env.recipient} is suspended")
                if env.kind in REF_KINDS or self._first_hop_reply(env):
                    # What it refers to must be here (committed: it may be earlier in
                    # this transaction), and its sender allowed to.
                    yield flush()
                    target = yield self._r.relations.check_remote(env)
                    if env.kind == "delete" and target is not None:
                        deleted.append((env.id, target, dict(target.meta or {})))
                    if target is not None and target.id != named_ref(env):
                        pointed.append((env, target.id))
                if env.kind == "file":
                    yield flush()
                    if signer is not None:
                        bad = yield self._check_signatures([(env, signer)], origin)
                        if bad:
                            raise bad[id(env)]
                    yield self._store_remote_file(origin, env, fetch, relay)
                    continue
                batch.append(env)
                if relay:
                    relayed.append(env)
                if signer is not None:
                    signed.append((env, signer))
                if env.kind == "event":
                    # Applied before the next item is checked: that may be a message
                    # from the member who just joined (membership is checked per item).
                    yield flush()
                    if answers is not None:
                        yield self.store.request_done(answers)
            except ChatError as e:
                reject(raw.get("id") if isinstance(raw, dict) else None, e)
        yield verified()
        if batch:
            last = self._store_remote(origin, batch, relayed)
            if queued is not None:
                queued()
            yield last
        refused = {r["id"] for r in rejected}
        for delete_id, target, meta in deleted:
            if delete_id not in refused:  # committed: a file's downloads stop, its bytes go
                self._r.relations.deleted(None, target, meta)
        return rejected

    @inlineCallbacks
    def _check_signatures(self, signed: Sequence[tuple[Envelope, str]], origin: str) -> Any:
        """Verify that each ``(item, realm)`` carries a signature of ``realm``'s
        (:mod:`chatproto.signing`); fires with ``{id(item): ChatError}`` for the items
        that do not (``bad_signature``; ``unknown_key`` when the realm's keys could
        not be had; ``peer_denied`` when we do not federate with it).

        A key we do not know is asked of its realm over a link of our own
        (:meth:`FederationService.want_keys`, charged to ``origin``, the peer whose
        transaction it is, if that realm was never reached): the transaction waits
        for it, up to ``KEY_WAIT`` seconds.  The signatures are checked in a thread, in one go."""
        ring = self._r.peer_keys
        bad: dict[int, ChatError] = {}
        unknown = sorted(
            {a for e, a in signed if e.sig is not None and ring.lookup(a, e.sig["key"]) is None}
        )
        # Each realm asked for its keys costs a connection (and a DNS look-up): a few
        # per transaction, together; the items of any more are refused at once.
        asked = unknown[:MAX_KEY_FETCHES]
        found = yield gatherResults([self._fetch_keys(a, origin) for a in asked])
        unreachable: dict[str, ChatError | None] = dict(zip(asked, found, strict=True))
        for author in unknown[MAX_KEY_FETCHES:]:
            unreachable[author] = ChatError(
                "unknown_key",
                f"no key of {author} is known here; keys of at most {MAX_KEY_FETCHES} "
                "realms are asked for per transaction",
            )
        jobs: list[tuple[bytes, str, bytes]] = []
        checked: list[tuple[Envelope, str]] = []
        for env, author in signed:
            sig = env.sig
            if sig is None:
                bad[id(env)] = ChatError("bad_signature", f"{env.id} is not signed by {author}")
                continue
            key = ring.lookup(author, sig["key"])
            if key is None:
                bad[id(env)] = unreachable.get(author) or ChatError(
                    "bad_signature", f"{author} has no key {sig['key']} (it announces others)"
                )
                continue
            jobs.append((key, sig["ed25519"], canonical(env)))
            checked.append((env, author))
        if jobs:
            results = yield self._crypto(_verify_all, jobs)
            for (env, author), ok in zip(checked, results, strict=True):
                if not ok:
                    kid = (env.sig or {}).get("key")
                    bad[id(env)] = ChatError(
                        "bad_signature", f"{env.id} does not verify with {author}'s key {kid}"
                    )
        return bad

    @inlineCallbacks
    def _fetch_keys(self, author: str, origin: str) -> Any:
        """Get ``author``'s keys over a link with it: fires with None once they are as
        current as they can be, else with the ChatError to reject its items with."""
        if not self.config.federation.allows(author):
            return ChatError("peer_denied", f"this realm does not federate with {author}")
        fed = self._r.federation
        learned = False
        if fed is not None:
            learned = yield fed.want_keys(author, origin)
        if learned:
            return None
        return ChatError(
            "unknown_key", f"no key of {author} is known here and {author} could not be reached"
        )

    def _crypto(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Run CPU-bound ``fn`` in the reactor's thread pool (inline under a test clock
        that has none)."""
        pool = getattr(self._r.reactor, "getThreadPool", None)
        if pool is None:
            return succeed(fn(*args))
        return deferToThreadPool(self._r.reactor, pool(), fn, *args)

    @inlineCallbacks
    def _store_remote_file(self, origin: str, env: Envelope, fetch: Any, relay: bool) -> Any:
        """Fetch the bytes of a ``file`` item from ``origin``, then store the item,
        with ``relay`` outbox rows for the group's other member realms (as its home
        realm: they fetch the bytes from here in turn)."""
        meta = env.meta or {}
        file_id = meta["file_id"]  # what ``origin`` knows the file by
        held = yield self.store.file_info(file_id)
        if held is not None:
            if (held["sender"], held["recipient"], held["sha256"]) == (
                env.sender,
                env.recipient,
                meta["sha256"],
            ):
                return  # stored already (a retried transaction)
            # The id is held by another conversation's file: a peer that saw it (a
            # group's file goes to every member realm) sent it here first.  This file
            # is stored, and served to our users and peers, under an id of our own.
            env.meta = meta = {**meta, "file_id": new_file_id()}
        if fetch is None:
            raise ChatError("bad_request", "files cannot be fetched over this link")
        blob = self._r.files.receive_blob(meta["sha256"], meta["size"])
        try:
            try:
                yield fetch(file_id, blob)
            except Exception:  # not GeneratorExit: a generator closed may not yield
                yield blob.abort()
                raise
            yield blob.finish()
            yield self._store_remote(origin, [env], [env] if relay else [])
        finally:
            blob.release()
        if not env.pos:
            return  # stored already after all (a retry of an item stored under a new id)
        self.log.info(
            "file {file} ({size} bytes) from {origin} for {to} at {pos}",
            file=meta["file_id"],
            size=meta["size"],
            origin=origin,
            to=env.recipient,
            pos=env.pos,
        )

    def _store_remote(
        self, origin: str, batch: list[Envelope], relayed: list[Envelope]
    ) -> Deferred[None]:
        """Commit ``batch`` (items from ``origin``), with outbox rows relaying the
        items of ``relayed`` (to groups of ours) to the other realms of their groups:
        the realms of when they are committed, not of when they were checked (a join
        committed in between comes first; see ``GroupHandler.member_realms``)."""
        handler = self._r.group_handler
        outbox: list[Any] = []
        for env in relayed:
            outbox += handler.fanout(env, sorted(handler.member_realms(env.recipient)), origin)

        def stored(envs: list[Envelope]) -> None:
            self._r.begin_burst()
            try:
                for env in envs:
                    if not env.recipient.startswith("#"):
                        if env.recipient in self._r.sessions.online:  # presence: a new partner
                            self._r.presence.add_partners(env.recipient, (env.sender,))
                        self._r.messages.committed(None, env)
                    elif env.kind == "event":
                        before = self.groups.audience(env)
                        self.groups.apply(env, mirror=not env.recipient.endswith(self._suffix))
                        self._r.route(env, before | self.groups.audience(env))
                        meta = env.meta or {}
                        if meta.get("event") == "joined":
                            self._r.presence.on_join(meta.get("user", ""), env.recipient)
                    else:
                        self._r.group_handler.committed(None, env)
            finally:
                self._r.end_burst()
            for realm in queued_realms(outbox):
                self._r.wake(batch[0], realm)

        return self.store.append_remote(batch, outbox).addCallback(stored)

    def bounce(self, peer: str, rejected: Sequence[tuple[Any, str, str]]) -> Deferred[None]:
        """Tell local senders that peer realm ``peer`` refused their items.

        ``rejected`` lists ``(item, code, message)``: ``item`` is what the outbox sent
        (an :class:`Envelope`, or the dict of a queued group request).  Each item of a
        local user becomes one durable stream item of kind ``bounce`` in that user's
        feed: ``from`` the address the item was for (so clients show it in that
        conversation), ``to`` the user, ``meta`` ``{"id", "code", "realm"}`` (plus
        ``event`` for a refused request).  Its id derives from the refused item's, so
        a transaction refused twice (sent again after a crash) bounces once.  Items
        forwarded for users of other realms are only logged (their realm is told by
        its own link, if at all).  Fires once the bounces are committed and routed.
        """
        batch: list[Envelope] = []
        refused: list[str] = []  # requests that will have no answer
        for item, code, message in rejected:
            mid: Any
            sender: Any
            target: Any
            if isinstance(item, Envelope):
                mid, sender, target, event = item.id, item.sender, item.recipient, None
            elif isinstance(item, dict):
                mid, sender, target = item.get("id"), item.get("from"), item.get("to")
                event = item.get("event")
                if item.get("kind") == "request" and isinstance(mid, str):
                    refused.append(mid)
            else:
                continue
            if not (isinstance(mid, str) and isinstance(sender, str) and isinstance(target, str)):
                continue
            if not sender.endswith(self._suffix) or sender.startswith("#"):
                continue  # not one of our users: nobody here to tell
            if is_removal_request(item):  # the account is gone: nobody to tell either
                self.log.info(
                    "federation: {peer} refused the end of deleted {user} in {group}: {code}",
                    peer=peer,
                    user=sender,
                    group=target,
                    code=code,
                )
                continue
            if event:
                what = f"your {_REQUEST_OF.get(event, event)} request for {target}"
            elif isinstance(item, Envelope) and item.kind == "file":
                what = f"your file {item.body} to {target}"
            else:
                what = f"your message to {target}"
            meta: dict[str, Any] = {"id": mid, "code": code, "realm": peer}
            if event:
                meta["event"] = event
            batch.append(
                Envelope(
                    id=f"{mid}~bounce"[:64],
                    kind="bounce",
                    sender=target,
                    recipient=sender,
                    ts=self.clock.seconds(),
                    body=f"{what} was refused by {peer}: {code}: {message}"[:4000],
                    meta=meta,
                )
            )
        d: Deferred[Any] = succeed(None)
        for rid in refused:
            d.addCallback(self._request_done, rid)
        if not batch:
            return d.addCallback(lambda _: None)

        def stored(envs: list[Envelope]) -> None:
            self._r.begin_burst()
            try:
                for env in envs:
                    self._r.route(env)
            finally:
                self._r.end_burst()

        return d.addCallback(lambda _: self.store.append_remote(batch, [])).addCallback(stored)

    def _request_done(self, _: object, request_id: str) -> Deferred[None]:
        return self.store.request_done(request_id)  # type: ignore[no-any-return]


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _file_meta(meta: Any, body: str) -> dict[str, Any]:
    """The ``meta`` of a ``file`` item from another realm (whose ``body`` is the
    file's name), checked (``bad_request``)."""
    if not isinstance(meta, dict) or set(meta) != set(FILE_META):
        raise ChatError("bad_request", f"a file item's meta has exactly {', '.join(FILE_META)}")
    fid, sha, size = meta["file_id"], meta["sha256"], meta["size"]
    if not isinstance(fid, str) or not re.fullmatch(r"[A-Za-z0-9_-]{16,64}", fid):
        raise ChatError("bad_request", "bad file_id")
    if not isinstance(sha, str) or not _SHA256_HEX.fullmatch(sha):
        raise ChatError("bad_request", "sha256 must be 64 lower-case hex digits")
    if type(size) is not int or not 0 <= size <= wire.MAX_INT:
        raise ChatError("bad_request", "size must be an integer from 0 to 2**53 - 1")
    texts = (meta["name"], meta["media_type"])
    if not all(isinstance(t, str) and 0 < len(t) <= 255 for t in texts):
        raise ChatError("bad_request", "name and media_type must be strings")
    if body != meta["name"]:
        raise ChatError("bad_request", "a file item's body is its name")
    check_label(meta["name"], "a file name")  # shown to our users as a local one is
    check_label(meta["media_type"], "a media type")
    return dict(meta)


#: The ``meta`` of an event item from a group's home realm: each key's longest value
#: (all strings; ``snapshot``, an object, is checked by :func:`_snapshot`).
_EVENT_META = {
    "event": 16,
    "user": address.MAX_NAME + 1 + address.MAX_REALM,
    "topic": MAX_TOPIC,
    "reason": MAX_TOPIC,
    "visibility": 16,
    "history": 16,
    "role": 16,
    "successor": address.MAX_NAME + 1 + address.MAX_REALM,  # a deleted only owner's
}


#: The keys of an event's ``meta`` that are free text shown to users.
_SHOWN_META = frozenset({"topic", "reason"})
#: The keys of an event's ``meta`` that name a user (a canonical user address).
_USER_META = frozenset({"user", "successor"})
#: The keys of an event's ``meta`` with a value from a known few.
_CHOICE_META = {"role": ROLES, "visibility": VISIBILITIES, "history": HISTORY_RULES}


def _event_meta(meta: Any) -> dict[str, Any]:
    """Check the ``meta`` of an event item from a group's home realm (``bad_request``):
    a known event, and only the keys events carry, each a string of bounded length
    (a number, an object or a key of no event could break a member's backlog or a
    gateway rendering the event)."""
    if not isinstance(meta, dict) or meta.get("event") not in EVENTS:
        raise ChatError("bad_request", "an event item needs meta.event")
    # The values that are not strings: a settings event's settings (as set_group
    # checks them), a voice event's voice.
    typed: dict[str, Any] = {}
    if meta["event"] == "settings":
        typed = {k: v for k, v in meta.items() if k in SETTINGS}
        if typed:
            check_settings(typed)
    elif meta["event"] == "voice":
        if not isinstance(meta.get("voice"), bool):
            raise ChatError("bad_request", "a voice event's meta.voice is true or false")
        typed = {"voice": meta["voice"]}
    for key, value in meta.items():
        if key == "snapshot" or key in typed:
            continue
        longest = _EVENT_META.get(key)
        if longest is None:
            raise ChatError("bad_request", f"meta.{str(key)[:20]} is not part of an event")
        if not isinstance(value, str) or len(value) > longest:
            raise ChatError("bad_request", f"meta.{key} must be a string of at most {longest}")
        if key in _SHOWN_META:  # text shown to our users: the rule of local text
            check_label(value, f"meta.{key}")
        elif key in _USER_META:  # written into IRC lines (KICK, MODE), member lists...
            if not _is_user_address(value):
                raise ChatError("bad_request", f"meta.{key} must be a canonical user address")
        elif key in _CHOICE_META and value not in _CHOICE_META[key]:
            raise ChatError(
                "bad_request", f"meta.{key} is not one of {', '.join(_CHOICE_META[key])}"
            )
    return meta


def _is_user_address(text: str) -> bool:
    """Whether ``text`` is a user address in its canonical spelling."""
    try:
        return str(address.user(text, "")) == text
    except ChatError:
        return False


def _snapshot(raw: Any) -> None:
    """Check a group snapshot from its home realm (``bad_request``), addresses too."""
    for user in check_snapshot(raw)["members"]:
        if not _is_user_address(user):
            raise ChatError("bad_request", "snapshot members are canonical user addresses")


def _answered(env: Envelope, requests: Sequence[dict[str, Any]]) -> str | None:
    """The id of the first of ``requests`` (a user's pending requests for the group
    of event ``env``) that ``env`` answers: the same change, with the same target,
    role or topic as asked for."""
    meta = env.meta or {}
    event = meta.get("event")
    for req in requests:
        args = req.get("args") or {}
        if req.get("event") != event or not isinstance(args, dict):
            continue
        if event in _TARGETED and args.get("user") != meta.get("user"):
            continue
        if event == "role" and args.get("role") != meta.get("role"):
            continue
        if event == "topic" and args.get("topic", "") != meta.get("topic", ""):
            continue
        rid = req.get("id")
        if isinstance(rid, str):
            return rid
    return None
