"""Item signatures across realms: who said it, proven past the realm that relays it.

Where it sits: a group's home realm relays its members' messages and files to the
other member realms.  The link from the home realm proves only that the home realm
sent the item (its certificate), not that the member's realm wrote it; so the realm
of the author signs the item (Ed25519) when it is committed, every relay forwards it
unchanged, and a receiving realm verifies it against the author realm's key, which it
learned over a link with that realm itself (``hello``/``welcome`` over mutual TLS).
The rules of what needs a signature are the realm's (``RealmService.receive_remote``);
this module holds the keys, the canonical bytes and the check.

- :func:`canonical` defines the signed bytes (PROTOCOL.md, "Signatures").
- :class:`SigningKeys` is this realm's key file (``<data_dir>/federation-keys.json``,
  owner-only): the current private key and the public halves of retired ones, all
  announced so that items signed before a rotation still verify.
- :class:`KeyRing` holds the keys peers announced, cached in the store.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
import struct
from collections.abc import Sequence
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from chatproto.errors import ChatError

__all__ = [
    "KEY_FILE",
    "MAX_KEYS",
    "SIG_DOMAIN",
    "KeyFileError",
    "KeyRing",
    "SigningKeys",
    "canonical",
    "key_id",
    "parse_keys",
    "parse_sig",
    "rotate",
    "verify_all",
]

#: The realm's key file, in its data directory.
KEY_FILE = "federation-keys.json"
#: The first field of the signed bytes: what they are, and the scheme's version.
SIG_DOMAIN = "chatproto item signature v1"
#: Keys a realm may announce (its current key and retired ones).
MAX_KEYS = 16
#: The item kinds that are signed (events are never relayed, so never signed).
SIGNED_KINDS = ("text", "file")
#: The ``meta`` fields of a ``file`` item that are signed, in this order (not
#: ``file_id``: each realm may store a file under an id of its own).
FILE_FIELDS = ("sha256", "size", "name", "media_type")


class KeyFileError(Exception):
    """The key file cannot be used (unreadable, malformed, readable by others)."""


# canonical bytes --------------------------------------------------------------------


def _field(text: str) -> bytes:
    data = text.encode("utf-8", "surrogatepass")
    return struct.pack("!I", len(data)) + data


def canonical(env: Any) -> bytes:
    """The bytes an item's signature covers (``env``: an Envelope, or anything with
    ``id``, ``kind``, ``sender``, ``recipient``, ``body``, ``meta``).

    A sequence of fields, each a 4-byte big-endian length then that many bytes of
    UTF-8: :data:`SIG_DOMAIN`, ``id``, ``kind``, ``from``, ``to``, ``body``; for a
    ``file`` item then ``sha256``, ``size`` (decimal), ``name``, ``media_type`` of its
    ``meta``.  Lengths make the encoding unambiguous whatever the strings hold.

    Not ``ts``: a realm stores an item whose ``ts`` is out of its window with its own
    clock (PROTOCOL.md, "Numbers"), and a home realm relays what it stored; the time
    an item was written is bound by its id (which starts with it, for ids this realm
    makes) and its position in each realm's stream."""
    parts = [SIG_DOMAIN, env.id, env.kind, env.sender, env.recipient, env.body]
    kind, meta = env.kind, env.meta or {}
    if kind == "file":
        parts += [str(meta.get(k, "")) for k in FILE_FIELDS]
    elif kind in ("edit", "delete", "reaction"):
        # what it refers to (else a relay could point it at another item)
        parts.append(str(meta.get("ref", "")))
        if kind == "reaction":
            parts += [str(meta.get("emoji", "")), "remove" if meta.get("remove") is True else ""]
    elif kind == "text" and "reply_to" in meta:
        parts.append(str(meta["reply_to"]))
    return b"".join(_field(p) for p in parts)


def key_id(public: bytes) -> str:
    """A key's id: the first 8 bytes of the SHA-256 of its 32 raw bytes, in hex."""
    return hashlib.sha256(public).hexdigest()[:16]


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, size: int, what: str) -> bytes:
    if not isinstance(text, str) or len(text) > 4 * size:
        raise ChatError("bad_request", f"{what} must be base64")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ChatError("bad_request", f"{what} must be base64") from None
    if len(data) != size:
        raise ChatError("bad_request", f"{what} must be {size} bytes")
    return data


def parse_sig(raw: Any) -> dict[str, str]:
    """An item's ``sig`` as received, checked (``bad_request``): ``{"key": <key id>,
    "ed25519": <base64 of the 64-byte signature>}``."""
    if not isinstance(raw, dict) or set(raw) != {"key", "ed25519"}:
        raise ChatError("bad_request", "sig has exactly key and ed25519")
    kid = raw["key"]
    if not isinstance(kid, str) or len(kid) != 16 or not _is_hex(kid):
        raise ChatError("bad_request", "sig.key must be 16 hex digits")
    _unb64(raw["ed25519"], 64, "sig.ed25519")
    return {"key": kid, "ed25519": raw["ed25519"]}


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def parse_keys(raw: Any) -> dict[str, bytes]:
    """The ``keys`` of a ``hello`` or ``welcome``, checked (``bad_request``): a list of
    at most :data:`MAX_KEYS` ``{"id", "ed25519"}`` (raw public key, base64), each id
    the :func:`key_id` of its key.  Returns key id -> raw public key."""
    if not isinstance(raw, list) or len(raw) > MAX_KEYS:
        raise ChatError("bad_request", f"keys must be a list of at most {MAX_KEYS}")
    out: dict[str, bytes] = {}
    for entry in raw:
        if not isinstance(entry, dict) or set(entry) != {"id", "ed25519"}:
            raise ChatError("bad_request", "a key has exactly id and ed25519")
        public = _unb64(entry["ed25519"], 32, "a key's ed25519")
        if entry["id"] != key_id(public):
            raise ChatError("bad_request", f"key id {str(entry['id'])[:20]!r} is not its key's")
        out[entry["id"]] = public
    return out


def verify_all(jobs: Sequence[tuple[bytes, str, bytes]]) -> list[bool]:
    """Check signatures: ``(raw public key, base64 signature, signed bytes)`` each.
    CPU-bound: the realm runs it in a thread for a transaction's worth."""
    out = []
    for public, sig, data in jobs:
        try:
            Ed25519PublicKey.from_public_bytes(public).verify(base64.b64decode(sig), data)
            out.append(True)
        except (InvalidSignature, ValueError):
            out.append(False)
    return out


# this realm's keys ------------------------------------------------------------------


class SigningKeys:
    """This realm's signing key and the public halves of its retired keys.

    The key file is JSON: ``{"keys": [...]}``, the current key first as ``{"id",
    "private", "created"}`` (``private``: the 32-byte Ed25519 seed, base64), then
    retired keys as ``{"id", "public", "created", "retired"}``.  Written owner-only
    (0600), atomically; a file readable by group or others is refused.
    """

    def __init__(self, private: Ed25519PrivateKey, retired: Sequence[bytes] = ()) -> None:
        self._private = private
        self.public = _raw(private.public_key())
        self.id = key_id(self.public)
        self.retired = [p for p in retired if p != self.public]

    def sign(self, env: Any) -> dict[str, str]:
        """The ``sig`` of ``env`` (see :func:`canonical`)."""
        return {"key": self.id, "ed25519": _b64(self._private.sign(canonical(env)))}

    def announce(self) -> list[dict[str, str]]:
        """The ``keys`` of a ``hello`` or ``welcome``: the current key, then retired."""
        keys = [self.public, *self.retired][:MAX_KEYS]
        return [{"id": key_id(p), "ed25519": _b64(p)} for p in keys]

    @classmethod
    def load(cls, path: str, now: float, create: bool = True) -> SigningKeys:
        """The keys in ``path``; with ``create``, a new key is made (and written) if
        the file does not exist.  Raises :class:`KeyFileError`."""
        try:
            data = _read_key_file(path)
        except FileNotFoundError:
            if not create:
                raise KeyFileError(f"no key file {path}") from None
            private = Ed25519PrivateKey.generate()
            _write_key_file(path, [_private_entry(private, now)])
            return cls(private)
        return _from_entries(path, data)


def _private_entry(private: Ed25519PrivateKey, now: float) -> dict[str, Any]:
    seed = private.private_bytes_raw()
    return {"id": key_id(_raw(private.public_key())), "private": _b64(seed), "created": now}


def _read_key_file(path: str) -> list[dict[str, Any]]:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise KeyFileError(f"cannot read {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(
                f"{path} is open to group or others (mode {stat.S_IMODE(mode):04o}): "
                f"it holds the realm's private signing key; chmod 600 it"
            )
        text = f.read(1 << 20)
    try:
        data = json.loads(text)
        keys = data["keys"]
        if not isinstance(keys, list) or not all(isinstance(k, dict) for k in keys):
            raise ValueError("keys is not a list of objects")
    except (ValueError, KeyError, TypeError) as e:
        raise KeyFileError(f"{path} is not a chatproto key file: {e}") from None
    return keys


def _from_entries(path: str, keys: list[dict[str, Any]]) -> SigningKeys:
    try:
        current = keys[0]
        seed = base64.b64decode(current["private"], validate=True)
        private = Ed25519PrivateKey.from_private_bytes(seed)
        retired = [base64.b64decode(k["public"], validate=True) for k in keys[1:]]
        if any(len(p) != 32 for p in retired):
            raise ValueError("a public key is not 32 bytes")
    except (IndexError, KeyError, TypeError, ValueError, binascii.Error) as e:
        raise KeyFileError(
            f"{path}: the current key (first) has no usable private key: {e}"
        ) from None
    return SigningKeys(private, retired)


def _write_key_file(path: str, keys: list[dict[str, Any]]) -> None:
    """Write ``keys`` to ``path`` atomically, readable by the owner only."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"keys": keys}, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rotate(path: str, now: float, forget_old: bool = False) -> tuple[str, list[str]]:
    """Make a new current key in the key file at ``path`` (created if missing); the
    old current key is kept as retired (its public half only) unless ``forget_old``,
    which drops every retired key.  Returns (new key id, retired key ids).  Raises
    :class:`KeyFileError`."""
    try:
        keys = _read_key_file(path)
        _from_entries(path, keys)  # a file we cannot use is not rotated blindly
    except FileNotFoundError:
        keys = []
    retired: list[dict[str, Any]] = []
    if keys and not forget_old:
        old = _from_entries(path, keys)
        retired.append(
            {
                "id": old.id,
                "public": _b64(old.public),
                "created": keys[0].get("created", now),
                "retired": now,
            }
        )
        retired += [k for k in keys[1:] if "public" in k][: MAX_KEYS - 2]
    private = Ed25519PrivateKey.generate()
    entry = _private_entry(private, now)
    _write_key_file(path, [entry, *retired])
    return entry["id"], [k["id"] for k in retired]


# peers' keys ------------------------------------------------------------------------


class KeyRing:
    """The keys each peer realm announced over its own links, by realm and key id.

    Cached in the store (``IStore.peer_keys``), so a realm that restarts verifies
    items of realms it has no link with at the moment.  A realm's announcement
    replaces what was known of it (a key it no longer announces no longer verifies).
    """

    log = Logger()

    def __init__(self, store: Any, clock: Any) -> None:
        self._store = store
        self._clock = clock
        self._keys: dict[str, dict[str, bytes]] = {}
        self._waiters: dict[str, list[Deferred[None]]] = {}

    def load(self) -> Deferred[None]:
        """Read the cached keys from the store."""

        def loaded(cached: dict[str, list[dict[str, str]]]) -> None:
            for realm, keys in cached.items():
                try:
                    self._keys[realm] = parse_keys(keys)
                except ChatError:
                    self.log.warn(
                        "signing: ignored the unusable cached keys of {realm}", realm=realm
                    )

        return self._store.peer_keys().addCallback(loaded)  # type: ignore[no-any-return]

    def known(self, realm: str) -> bool:
        """Whether ``realm`` ever announced its keys to us (it was reached once)."""
        return realm in self._keys

    def lookup(self, realm: str, kid: str) -> bytes | None:
        """The raw public key ``kid`` of ``realm``, if ``realm`` announced it."""
        return self._keys.get(realm, {}).get(kid)

    def learn(self, realm: str, keys: dict[str, bytes]) -> Deferred[None]:
        """``realm`` announced ``keys`` (checked with :func:`parse_keys`) over its own
        link: remember them (in the store too, when they changed) and wake whoever
        waits for them.  Fires once stored."""
        d: Deferred[None] = succeed(None)
        if self._keys.get(realm) != keys:
            self._keys[realm] = dict(keys)
            entries = [{"id": k, "ed25519": _b64(p)} for k, p in keys.items()]
            d = self._store.set_peer_keys(realm, entries)
            d.addErrback(
                lambda f: self.log.failure("signing: storing the keys of {realm}", f, realm=realm)
            )
            self.log.info(
                "signing: keys of {realm}: {ids}", realm=realm, ids=", ".join(keys) or "none"
            )
        for waiter in self._waiters.pop(realm, []):
            waiter.callback(None)
        return d

    def wait(self, realm: str, timeout: float) -> Deferred[bool]:
        """Fires with True when ``realm`` next announces its keys, or with False after
        ``timeout`` seconds."""
        d: Deferred[None] = Deferred()
        self._waiters.setdefault(realm, []).append(d)
        out: Deferred[bool] = Deferred()

        def expire() -> None:
            waiters = self._waiters.get(realm, [])
            if d in waiters:
                waiters.remove(d)
                if not waiters:
                    del self._waiters[realm]
            out.callback(False)

        call = self._clock.callLater(timeout, expire)

        def learned(_: object) -> None:
            if call.active():
                call.cancel()
            out.callback(True)

        d.addCallback(learned)
        return out
