"""Item signatures (chatproto/signing.py): the test vector PROTOCOL.md shows, the key
file, the ring of peers' keys, and what the announcements and signatures accept.

Run ``python tests/test_signing.py`` to print the example block for PROTOCOL.md
("Signatures")."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from chatproto import wire
from chatproto.envelope import Envelope
from chatproto.errors import ChatError
from chatproto.signing import (
    KEY_FILE,
    MAX_KEYS,
    KeyFileError,
    KeyRing,
    SigningKeys,
    canonical,
    key_id,
    parse_keys,
    parse_sig,
    rotate,
    verify_all,
)
from chatproto.store.memory import MemoryStore
from tests.conftest import fired

ROOT = Path(__file__).resolve().parent.parent

#: RFC 8032, section 7.1, TEST 1: a published Ed25519 key (never use it for real).
SEED = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"
PUBLIC = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
ITEM = Envelope(
    id="0192f3a7c1e5b2d4f6a8c0e2b4d6f8a0b2c",
    kind="text",
    sender="alice@a.example",
    recipient="#dev@h.example",
    ts=1764093000.25,
    body="héllo ✓",
)
#: Ed25519 signatures are deterministic: this is the signature of ITEM with SEED.
SIGNATURE = (
    "mo1p8JF2nSGAZrk0oEr7Ba9bJn9GNcv+M2AkUgOqQCtt/6y66bzdACi9zGTYGfbz07tdW+MxG285pc4Ajn2VBg=="
)


def example_keys() -> SigningKeys:
    return SigningKeys(Ed25519PrivateKey.from_private_bytes(bytes.fromhex(SEED)))


def hexdump(data: bytes) -> str:
    from tests.test_docs import hexdump as dump

    return dump(data)


def example_block() -> str:
    """The example of PROTOCOL.md, "Signatures", computed."""
    keys = example_keys()
    item = {**ITEM.to_item(), "sig": keys.sign(ITEM)}
    return "\n".join(
        [
            f"seed (secret):   {SEED}",
            f"public key:      {keys.public.hex()}",
            f"announced:       {wire.encode(keys.announce()[0]).decode()}",
            f"item:            {wire.encode(ITEM.to_item()).decode()}",
            "canonical bytes:",
            hexdump(canonical(ITEM)),
            f"signed item:     {wire.encode(item).decode()}",
        ]
    )


def test_the_signature_test_vector() -> None:
    keys = example_keys()
    assert keys.public.hex() == PUBLIC  # the RFC's public key: the seed is read right
    assert keys.id == key_id(bytes.fromhex(PUBLIC)) == "21fe31dfa154a261"
    data = canonical(ITEM)
    # the fields, each with its 4-byte length: "chatproto item signature v1", the id...
    assert data[:4] == b"\x00\x00\x00\x1b" and data[4:31] == b"chatproto item signature v1"
    assert data.endswith(b"#dev@h.example\x00\x00\x00\x0ah\xc3\xa9llo \xe2\x9c\x93")
    assert keys.sign(ITEM) == {"key": "21fe31dfa154a261", "ed25519": SIGNATURE}
    assert verify_all([(keys.public, SIGNATURE, data)]) == [True]


def test_protocol_md_shows_the_test_vector() -> None:
    doc = (ROOT / "PROTOCOL.md").read_text(encoding="utf-8")
    assert example_block() in doc, "regenerate the example: python tests/test_signing.py"


def test_every_signed_field_counts_and_file_id_does_not() -> None:
    keys = example_keys()
    changes: list[dict[str, Any]] = [
        {"id": ITEM.id + "x"},
        {"kind": "file", "meta": {"sha256": "0" * 64, "size": 1, "name": "a", "media_type": "t"}},
        {"sender": "mallory@a.example"},
        {"recipient": "#other@h.example"},
        {"body": "hello ✓"},
    ]
    for change in changes:
        other = Envelope(**{**_fields(ITEM), **change})
        assert verify_all([(keys.public, SIGNATURE, canonical(other))]) == [False], change
    meta = {"file_id": "f" * 32, "sha256": "0" * 64, "size": 5, "name": "a.txt", "media_type": "t"}
    item = Envelope(**{**_fields(ITEM), "kind": "file", "body": "a.txt", "meta": meta})
    sig = keys.sign(item)["ed25519"]
    elsewhere = Envelope(**{**_fields(item), "meta": {**meta, "file_id": "g" * 32}})
    assert verify_all([(keys.public, sig, canonical(elsewhere))]) == [True]
    for k, v in (("sha256", "1" * 64), ("size", 6), ("name", "b.txt"), ("media_type", "u")):
        changed = Envelope(**{**_fields(item), "meta": {**meta, k: v}})
        assert verify_all([(keys.public, sig, canonical(changed))]) == [False], k
    # ts is not signed: a realm may store an item with its own clock (out of window)
    assert canonical(Envelope(**{**_fields(ITEM), "ts": 1764093999.0})) == canonical(ITEM)


def _fields(env: Envelope) -> dict[str, Any]:
    return {
        "id": env.id,
        "kind": env.kind,
        "sender": env.sender,
        "recipient": env.recipient,
        "ts": env.ts,
        "body": env.body,
        "meta": env.meta,
    }


# the key file ------------------------------------------------------------------------


def test_the_key_file_is_made_owner_only_and_read_back(tmp_path: Path) -> None:
    path = str(tmp_path / "data" / KEY_FILE)
    keys = SigningKeys.load(path, 100.0)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = SigningKeys.load(path, 200.0)
    assert (again.id, again.public) == (keys.id, keys.public)
    assert again.sign(ITEM) == keys.sign(ITEM)
    with pytest.raises(KeyFileError, match="no key file"):
        SigningKeys.load(str(tmp_path / "none.json"), 0.0, create=False)


def test_a_key_file_open_to_others_or_broken_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / KEY_FILE)
    SigningKeys.load(path, 0.0)
    os.chmod(path, 0o640)
    with pytest.raises(KeyFileError, match=r"open to group or others .*chmod 600"):
        SigningKeys.load(path, 0.0)
    for text in ("not json", '{"keys": 5}', '{"keys": []}', '{"keys": [{"private": "!!"}]}'):
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o600)
        with pytest.raises(KeyFileError):
            SigningKeys.load(path, 0.0)


def test_rotation_keeps_old_keys_announced_until_forgotten(tmp_path: Path) -> None:
    path = str(tmp_path / KEY_FILE)
    first = SigningKeys.load(path, 1.0)
    new, kept = rotate(path, 2.0)
    assert kept == [first.id] and new != first.id
    second = SigningKeys.load(path, 3.0)
    assert second.id == new
    assert [k["id"] for k in second.announce()] == [new, first.id]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(path) as f:
        entries = json.load(f)["keys"]
    assert "private" in entries[0] and "private" not in entries[1]  # retired: public only
    assert entries[1]["retired"] == 2.0
    _, kept = rotate(path, 4.0)
    assert kept == [new, first.id]
    newest, kept = rotate(path, 5.0, forget_old=True)
    assert kept == []
    assert [k["id"] for k in SigningKeys.load(path, 6.0).announce()] == [newest]
    for _ in range(2 * MAX_KEYS):  # at most MAX_KEYS are kept, newest first
        rotate(path, 7.0)
    assert len(SigningKeys.load(path, 8.0).announce()) == MAX_KEYS


# peers' keys -------------------------------------------------------------------------


def test_the_ring_keeps_each_realms_latest_announcement(tmp_path: Path) -> None:
    clock = Clock()
    store = MemoryStore()
    ring = KeyRing(store, clock)
    keys = example_keys()
    fired(ring.learn("a.example", parse_keys(keys.announce())))
    assert ring.lookup("a.example", keys.id) == keys.public
    assert ring.lookup("b.example", keys.id) is None
    # cached in the store: a new ring (a restart) knows them
    later = KeyRing(store, clock)
    fired(later.load())
    assert later.lookup("a.example", keys.id) == keys.public
    # a new announcement replaces the old one: a key no longer announced is gone
    other = SigningKeys(Ed25519PrivateKey.generate())
    fired(later.learn("a.example", parse_keys(other.announce())))
    assert later.lookup("a.example", keys.id) is None
    assert later.lookup("a.example", other.id) == other.public


def test_waiting_for_a_realms_keys(tmp_path: Path) -> None:
    clock = Clock()
    ring = KeyRing(MemoryStore(), clock)
    got: list[bool] = []
    ring.wait("a.example", 30.0).addCallback(got.append)
    clock.advance(10)
    ring.learn("a.example", parse_keys(example_keys().announce()))
    assert got == [True]
    ring.wait("b.example", 30.0).addCallback(got.append)
    clock.advance(30)
    assert got == [True, False]
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("x", "a list"),
        ([{}] * (MAX_KEYS + 1), "at most"),
        ([{"id": "x"}], "exactly id and ed25519"),
        ([{"id": "0" * 16, "ed25519": "@@@"}], "base64"),
        ([{"id": "0" * 16, "ed25519": "AAAA"}], "32 bytes"),
        ([{"id": "0" * 16, "ed25519": "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="}], "not its"),
    ],
)
def test_bad_announcements_are_refused(raw: Any, message: str) -> None:
    with pytest.raises(ChatError, match=message) as e:
        parse_keys(raw)
    assert e.value.code == "bad_request"


@given(
    st.recursive(
        st.none() | st.text() | st.integers(), lambda c: st.lists(c) | st.dictionaries(st.text(), c)
    )
)
def test_any_announcement_or_sig_is_a_value_or_a_clean_error(raw: Any) -> None:
    for parse in (parse_keys, parse_sig):
        try:
            parse(raw)
        except ChatError as e:
            assert e.code == "bad_request"


def test_a_sig_has_exactly_a_key_id_and_64_bytes() -> None:
    good = {"key": "21fe31dfa154a261", "ed25519": SIGNATURE}
    assert parse_sig(good) == good
    for bad in (
        {"key": "21fe31dfa154a261"},
        {**good, "extra": 1},
        {**good, "key": "21FE31DFA154A261"},
        {**good, "ed25519": SIGNATURE[:-4]},
        {**good, "ed25519": 5},
    ):
        with pytest.raises(ChatError):
            parse_sig(bad)


if __name__ == "__main__":
    sys.stdout.write(example_block() + "\n")


def test_chatrealmctl_rotate_key(tmp_path: Path, capsys: Any) -> None:
    from chatproto import ctl

    data = str(tmp_path / "data")
    assert ctl.main(["-d", data, "rotate-key"]) == 0
    out = capsys.readouterr().out
    first = SigningKeys.load(os.path.join(data, KEY_FILE), 0.0, create=False)
    assert f"new signing key {first.id}" in out and "(there was none)" in out
    assert ctl.main(["-d", data, "rotate-key"]) == 0
    out = capsys.readouterr().out
    second = SigningKeys.load(os.path.join(data, KEY_FILE), 0.0, create=False)
    assert f"new signing key {second.id}" in out
    assert f"still announced, for items signed before: {first.id}" in out
    assert "restart the realm" in out
    assert ctl.main(["-d", data, "rotate-key", "--forget-old"]) == 0
    assert "older keys forgotten" in capsys.readouterr().out
    assert len(SigningKeys.load(os.path.join(data, KEY_FILE), 0.0).announce()) == 1
    os.chmod(os.path.join(data, KEY_FILE), 0o644)
    assert ctl.main(["-d", data, "rotate-key"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("chatrealmctl: ") and "chmod 600" in err and "Traceback" not in err


def test_a_realm_makes_its_key_on_first_start_and_refuses_one_open_to_others(
    tmp_path: Path,
) -> None:
    from chatproto.config import Config
    from chatproto.realm import RealmService
    from chatproto.testing import InlineHasher, make_test_realm

    cfg = Config(realm="a.example", data_dir=str(tmp_path / "data"))
    cfg.federation.enabled = True
    realm = make_test_realm(Clock(), cfg)
    path = os.path.join(cfg.data_dir, KEY_FILE)
    assert realm.signing is not None and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = make_test_realm(Clock(), cfg)  # a restart: the same key
    assert again.signing is not None and again.signing.id == realm.signing.id
    os.chmod(path, 0o604)
    clock = Clock()
    broken = RealmService(cfg, MemoryStore(), clock, clock=clock, hasher=InlineHasher())
    with pytest.raises(SystemExit, match=r"chatrealm: federation signing keys: .*chmod 600"):
        broken.privilegedStartService()
    # without federation there is no key at all
    plain = make_test_realm(Clock(), Config(realm="b.example", data_dir=str(tmp_path / "b")))
    assert plain.signing is None and not os.path.exists(str(tmp_path / "b" / KEY_FILE))
