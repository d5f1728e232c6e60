"""Addresses: the one place where names are parsed, checked and normalised.

A user address is ``name@realm``; a bare ``name`` means the local realm.  A group
address is ``#name@realm`` (or ``#name``), so it can never be mistaken for a user.

Rules (documented in PROTOCOL.md, "Addresses"):

- names are NFKC-normalised then case-folded; 1 to 32 characters from ``a-z``, ``0-9``,
  ``.``, ``_`` and ``-``; they start with a letter or a digit;
- realm names are ASCII DNS names (IDNA names in their ``xn--`` form): lower-cased,
  one trailing dot dropped, labels of ``a-z0-9-`` (1-63 chars, not
  starting or ending with ``-``), at most 253 characters; ``localhost`` is allowed;
- whether an address is local is decided only by comparing its realm with the local
  realm's name, so every code path already works for remote addresses.
"""

from __future__ import annotations

import re
import unicodedata

import attrs

from chatproto.errors import ChatError

__all__ = [
    "GUEST_PREFIX",
    "Address",
    "normalise_name",
    "normalise_realm",
    "parse",
    "reserved_name",
    "user",
]

MAX_NAME = 32
MAX_REALM = 253
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}\Z")
_LABEL_RE = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)\Z")


@attrs.frozen
class Address:
    """A normalised address; ``str()`` gives its canonical form."""

    name: str
    realm: str
    group: bool = False
    #: The canonical form, made once: the send path uses it for every message (a
    #: string made once also keeps its hash for the dictionaries it is looked up in).
    _text: str = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        text = f"{'#' if self.group else ''}{self.name}@{self.realm}"
        object.__setattr__(self, "_text", text)

    def __str__(self) -> str:
        return self._text

    def is_local(self, realm: str) -> bool:
        return self.realm == realm


#: The account names of IRC guests (chatproto.realm.guests) start with this; no
#: account anyone registers may.
GUEST_PREFIX = "guest-"


def reserved_name(name: str) -> bool:
    """Whether normalised account name ``name`` has the form kept for guests."""
    return name.startswith(GUEST_PREFIX)


def normalise_name(name: str) -> str:
    """Return the canonical form of a user or group name, or raise ``bad_address``."""
    if not isinstance(name, str):
        raise ChatError("bad_address", "a name must be a string")
    folded = unicodedata.normalize("NFKC", name).casefold()
    if not _NAME_RE.match(folded):
        raise ChatError(
            "bad_address",
            f"invalid name {name[:40]!r}: 1-{MAX_NAME} characters of a-z 0-9 . _ -, "
            "starting with a letter or digit",
        )
    return folded


def normalise_realm(realm: str) -> str:
    """Return the canonical form of a realm (DNS) name, or raise ``bad_address``."""
    if not isinstance(realm, str) or not realm.isascii():
        raise ChatError("bad_address", "a realm must be an ASCII DNS name (use IDNA/punycode)")
    folded = realm.lower()
    if folded.endswith("."):
        folded = folded[:-1]
    if (
        not folded
        or len(folded) > MAX_REALM
        or not all(_LABEL_RE.match(label) for label in folded.split("."))
    ):
        raise ChatError("bad_address", f"invalid realm name {realm[:60]!r}")
    return folded


def parse(text: str, local_realm: str, *, group: bool | None = False) -> Address:
    """Parse ``name``, ``name@realm``, ``#name`` or ``#name@realm``.

    ``group=False`` accepts only user addresses, ``group=True`` only group addresses and
    ``group=None`` either.  A missing realm means ``local_realm``.
    """
    if not isinstance(text, str) or not text:
        raise ChatError("bad_address", "an address must be a non-empty string")
    is_group = text.startswith("#")
    if group is not None and is_group != group:
        kind = "group" if group else "user"
        raise ChatError("bad_address", f"{text[:60]!r} is not a {kind} address")
    body = text[1:] if is_group else text
    name, sep, realm = body.partition("@")
    if sep and not realm:
        raise ChatError("bad_address", f"{text[:60]!r} has an empty realm")
    return Address(
        normalise_name(name),
        normalise_realm(realm) if sep else local_realm,
        is_group,
    )


def user(text: str, local_realm: str) -> Address:
    """Parse a user address (see :func:`parse`)."""
    return parse(text, local_realm, group=False)
