"""Addresses: examples of the rules, and properties over arbitrary text (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatproto import address
from chatproto.address import Address, normalise_name, normalise_realm, parse
from chatproto.errors import ChatError

LOCAL = "localhost"

names = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,31}", fullmatch=True)
labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", fullmatch=True)
realms = st.lists(labels, min_size=1, max_size=4).map(".".join).filter(lambda r: len(r) <= 253)
#: Any code point, lone surrogates included.
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=80)
#: Text made of the characters addresses are built of, and of their look-alikes.
near_text = st.text(
    st.sampled_from("aZ09._-@#.-\N{FULLWIDTH LATIN SMALL LETTER A}\u0130\u00df\u212a\uff03\uff20 "),
    max_size=40,
)
texts = st.one_of(any_text, near_text)


def bad_address(fn, *args, **kw) -> ChatError:  # type: ignore[no-untyped-def]
    with pytest.raises(ChatError) as info:
        fn(*args, **kw)
    assert info.value.code == "bad_address"
    return info.value


# examples ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Alice", Address("alice", "localhost")),
        ("ALICE@Example.ORG", Address("alice", "example.org")),
        ("alice@example.org.", Address("alice", "example.org")),
        ("bob.smith_2-x@xn--caf-dma.example", Address("bob.smith_2-x", "xn--caf-dma.example")),
        ("\uff21\uff4c\uff49\uff43\uff45", Address("alice", "localhost")),  # fullwidth
        ("STRA\u00dfE", Address("strasse", "localhost")),
        ("9lives", Address("9lives", "localhost")),
        ("a" * 32, Address("a" * 32, "localhost")),
    ],
)
def test_user_examples(text: str, expected: Address) -> None:
    assert parse(text, LOCAL) == expected
    assert address.user(text, LOCAL) == expected
    assert str(expected) == f"{expected.name}@{expected.realm}"


def test_group_examples() -> None:
    g = parse("#Team@Example.org", LOCAL, group=True)
    assert g == Address("team", "example.org", group=True)
    assert str(g) == "#team@example.org"
    assert parse("#team", LOCAL, group=None) == Address("team", LOCAL, group=True)
    assert parse("team", LOCAL, group=None) == Address("team", LOCAL, group=False)
    bad_address(parse, "#x", LOCAL)  # group=False: user addresses only
    bad_address(parse, "#x", LOCAL, group=False)
    bad_address(parse, "x", LOCAL, group=True)
    bad_address(parse, "\uff03x", LOCAL, group=None)  # fullwidth '#' is no group marker


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a" * 33,
        "\uff41" * 33,  # 33 fullwidth letters fold to 33 ASCII ones
        "-alice",
        ".alice",
        "_alice",
        "al ice",
        "al/ice",
        "alice@",
        "@example.org",
        "alice@-bad.example",
        "alice@bad-.example",
        "alice@ex..ample",
        "alice@exa_mple.org",
        "alice@caf\u00e9.example",
        "alice@\uff45xample.org",
        "alice@" + "a" * 64,
        "alice@" + ".".join(["a" * 63] * 4),  # 255 characters
        "alice@example.org..",
        "a@b@c",
        "#",
        "#@example.org",
    ],
)
def test_rejected(text: str) -> None:
    bad_address(parse, text, LOCAL, group=None)


def test_realm_examples() -> None:
    assert normalise_realm("Example.ORG.") == "example.org"
    assert normalise_realm("localhost") == "localhost"
    assert normalise_realm("a-b.c0") == "a-b.c0"
    long_ok = ".".join(["a" * 63] * 3 + ["a" * 61])
    assert len(long_ok) == 253 and normalise_realm(long_ok) == long_ok
    for bad in ("", ".", "-a.org", "a-.org", "a..org", "caf\u00e9.org", "a b", "a" * 64):
        bad_address(normalise_realm, bad)


def test_non_strings_are_bad_addresses() -> None:
    for value in (None, 42, b"alice", ["alice"]):
        bad_address(normalise_name, value)
        bad_address(normalise_realm, value)
        bad_address(parse, value, LOCAL)


# properties -------------------------------------------------------------------------


@given(name=names, realm=st.one_of(st.none(), realms), group=st.booleans())
def test_valid_addresses_round_trip(name: str, realm: str | None, group: bool) -> None:
    text = ("#" if group else "") + name + ("" if realm is None else "@" + realm)
    addr = parse(text, LOCAL, group=group)
    assert addr == Address(name, realm or LOCAL, group)
    assert parse(str(addr), "elsewhere.example", group=group) == addr
    assert parse(str(addr), LOCAL, group=None) == addr


@given(text=texts, group=st.sampled_from([None, False, True]))
@settings(max_examples=300)
def test_parse_any_text(text: str, group: bool | None) -> None:
    try:
        addr = parse(text, LOCAL, group=group)
    except ChatError as e:
        assert e.code == "bad_address"
        return
    assert parse(str(addr), "elsewhere.example", group=group) == addr
    assert addr.group == text.startswith("#")
    if group is not None:
        assert addr.group == group
    # the other kind is refused: users and groups are never confused
    bad_address(parse, str(addr), LOCAL, group=not addr.group)


@given(text=texts)
@settings(max_examples=300)
def test_normalise_name_any_text(text: str) -> None:
    try:
        name = normalise_name(text)
    except ChatError as e:
        assert e.code == "bad_address"
        return
    assert normalise_name(name) == name  # idempotent
    assert 1 <= len(name) <= address.MAX_NAME and name.isascii()


@given(text=st.one_of(texts, realms))
@settings(max_examples=300)
def test_normalise_realm_any_text(text: str) -> None:
    try:
        realm = normalise_realm(text)
    except ChatError as e:
        assert e.code == "bad_address"
        return
    assert normalise_realm(realm) == realm
    assert realm.isascii() and realm == realm.lower() and not realm.endswith(".")


@given(name=names)
def test_names_are_idempotent(name: str) -> None:
    assert normalise_name(name) == name
    assert normalise_name(name.upper()) == name
