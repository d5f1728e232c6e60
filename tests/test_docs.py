"""The documentation must match the code: PROTOCOL.md and config/realm.example.toml.

These tests keep the hand-written documents and the implementation from drifting apart:

- ``config/realm.example.toml`` loads, passes ``check()``, holds exactly the keys of
  :func:`chatproto.config.known_keys` and shows the defaults;
- every error code of :data:`chatproto.errors.CODES` has a row in PROTOCOL.md's error
  table, and the table names no code the server does not have;
- every request type the server handles (``chatproto.protocol._HANDLERS``) is documented;
- the group event names, roles, settings, presence states and group limits in
  PROTOCOL.md are the code's, and the group example transcript is what the server
  sends (replayed on a test realm, ignoring ``msg_id`` and ``ts``);
- the hex dumps in PROTOCOL.md are the exact bytes :func:`chatproto.wire.encode` gives,
  with the 4-byte length prefix; the ``hello`` result example is what the server sends
  with the default configuration;
- the ports and the address examples in PROTOCOL.md are the code's;
- the documented integer range and the lone-surrogate rule are what ``wire`` enforces.

Run ``python tests/test_docs.py`` to print the hex dump blocks for PROTOCOL.md.
"""

from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from chatproto import address, config, groups, realm, wire
from chatproto.config import tomllib
from chatproto.errors import CODES, ChatError
from chatproto.protocol import _HANDLERS, ClientProtocol

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL_MD = ROOT / "PROTOCOL.md"
EXAMPLE_TOML = ROOT / "config" / "realm.example.toml"

#: The example frames of PROTOCOL.md ("Byte-level examples"), in document order.
EXAMPLE_FRAMES: list[dict[str, Any]] = [
    {"type": "hello", "version": 1, "id": 1},
    {"type": "login", "id": 2, "user": "alice", "password": "correct horse", "device": "laptop"},
    {"type": "send", "id": 3, "to": "bob", "body": "héllo ✓"},
    {"type": "ack", "pos": 42},
    {"type": "ping"},
    {"type": "pong"},
]


def frame_bytes(obj: dict[str, Any]) -> bytes:
    """The bytes on the wire for a control frame: length prefix + payload."""
    payload = wire.encode(obj)
    return struct.pack("!I", len(payload)) + payload


def hexdump(data: bytes) -> str:
    """``hexdump -C`` style: offset, 16 bytes in two groups of 8, ASCII column."""
    lines = []
    for off in range(0, len(data), 16):
        chunk = data[off : off + 16]
        left = " ".join(f"{b:02x}" for b in chunk[:8])
        right = " ".join(f"{b:02x}" for b in chunk[8:])
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
        lines.append(f"{off:08x}  {left:<23}  {right:<23}  |{text}|")
    return "\n".join(lines)


def example_block(obj: dict[str, Any]) -> str:
    """One example block as it appears in PROTOCOL.md."""
    return f"frame: {wire.encode(obj).decode('utf-8')}\n{hexdump(frame_bytes(obj))}"


def _doc() -> str:
    return PROTOCOL_MD.read_text(encoding="utf-8")


def _section(doc: str, title: str) -> str:
    """The text of the ``## title`` section (up to the next ``## `` heading)."""
    m = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", doc, re.M | re.S)
    assert m, f"PROTOCOL.md has no '## {title}' section"
    return m.group(1)


def _dotted(table: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for k, v in table.items():
        if isinstance(v, dict):
            keys |= _dotted(v, f"{prefix}{k}.")
        else:
            keys.add(f"{prefix}{k}")
    return keys


# (a) the example configuration ------------------------------------------------------


def test_example_config_loads_and_checks() -> None:
    cfg = config.load(str(EXAMPLE_TOML))
    cfg.check()
    assert cfg.listen_descriptions() == [config.DEFAULT_LISTEN]


def test_two_realm_federation_configs_work_as_the_readme_says(
    tmp_path: Any, monkeypatch: Any, capsys: Any
) -> None:
    """The README's ``chatrealmctl ... gen-certs`` lines, run in a copy of the
    repository's config/, make certificates with which config/federation-{a,b}.toml
    check and point at each other; the README's client lines use their ports."""
    import shlex
    import shutil

    from chatproto import ctl

    monkeypatch.chdir(tmp_path)
    shutil.copytree(ROOT / "config", tmp_path / "config")
    readme = (ROOT / "README.md").read_text()
    gen = [
        shlex.split(line.split("#")[0])
        for line in readme.splitlines()
        if line.startswith("chatrealmctl --config config/federation-") and "gen-certs" in line
    ]
    assert len(gen) == 2
    for argv in gen:
        assert ctl.main(argv[1:]) == 0, capsys.readouterr().err
    a = config.load("config/federation-a.toml")
    b = config.load("config/federation-b.toml")
    for cfg in (a, b):
        cfg.check()
    assert (a.realm, b.realm) == ("a.example", "b.example")
    peer_of_a, peer_of_b = a.federation.peer("b.example"), b.federation.peer("a.example")
    assert peer_of_a is not None and peer_of_b is not None
    assert peer_of_a.endpoint == f"127.0.0.1:{b.federation.port}"
    assert peer_of_b.endpoint == f"127.0.0.1:{a.federation.port}"
    for cfg, name in ((a, "a"), (b, "b")):
        client_port = cfg.listen[0].split(":")[1]
        assert f"twistd -n --pidfile= chatrealm --config config/federation-{name}.toml" in readme
        assert f"chatproto --server tcp:127.0.0.1:{client_port} --user" in readme


def test_example_config_has_every_known_key() -> None:
    with open(EXAMPLE_TOML, "rb") as f:
        data = tomllib.load(f)
    assert _dotted(data) == config.known_keys()


def test_example_config_shows_the_defaults() -> None:
    cfg = config.load(str(EXAMPLE_TOML))
    cfg.check()
    defaults = config.Config()
    defaults.check()
    assert cfg == defaults


# (b) error codes --------------------------------------------------------------------


def _error_table_codes() -> list[str]:
    section = _section(_doc(), "Errors")
    return re.findall(r"^\|\s*`([a-z_]+)`\s*\|", section, re.M)


def test_every_error_code_is_documented() -> None:
    documented = _error_table_codes()
    missing = set(CODES) - set(documented)
    assert not missing, f"error codes missing from PROTOCOL.md's table: {sorted(missing)}"
    assert len(documented) == len(set(documented)), "an error code is listed twice"


def test_error_table_names_only_real_codes() -> None:
    unknown = set(_error_table_codes()) - set(CODES)
    assert not unknown, f"PROTOCOL.md documents codes the server does not have: {unknown}"
    # and every code mentioned in backticks anywhere that looks like one of ours exists
    for code in _error_table_codes():
        ChatError(code)


# (c) request types ------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(_HANDLERS))
def test_every_request_type_is_documented(kind: str) -> None:
    doc = _doc()
    heading = re.compile(rf"^#{{2,4}} .*`{re.escape(kind)}`", re.M)
    assert heading.search(doc), f"PROTOCOL.md has no heading for request type {kind!r}"


def test_documented_requests_are_handled() -> None:
    requests = _section(_doc(), "Requests")
    documented = set(re.findall(r"^### `([a-z_]+)`", requests, re.M))
    assert documented == set(_HANDLERS)


@pytest.mark.parametrize("kind", ["msg", "synced", "presence", "ping", "result", "error"])
def test_server_frames_are_documented(kind: str) -> None:
    assert f'"type":"{kind}"' in _doc() or f"`{kind}`" in _doc()


# (c') groups and presence ----------------------------------------------------------


def test_group_events_are_documented() -> None:
    section = _section(_doc(), "Groups")
    table = re.findall(r"^\|\s*`([a-z_]+)`\s*\|", section.split("### Group events", 1)[1], re.M)
    assert table == list(groups.EVENTS)


def test_roles_settings_and_presence_states_are_the_codes() -> None:
    doc = _doc()
    assert " > ".join(f"`{r}`" for r in reversed(groups.ROLES)) in doc
    for value in (*groups.VISIBILITIES, *groups.HISTORY_RULES):
        assert f'`"{value}"`' in doc, value
    presence = _section(doc, "Presence")
    states = ", ".join(f'`"{s}"`' for s in realm.PRESENCE_STATES[:-1])
    assert f'{states} or `"{realm.PRESENCE_STATES[-1]}"`' in presence
    assert f"at most {groups.MAX_TOPIC} characters" in doc
    assert f"at most {realm.MAX_STATUS_TEXT} characters" in doc


def test_group_limits_in_doc_match_config() -> None:
    limits = _section(_doc(), "Limits and flow control")
    defaults = config.Config().limits
    for key in (
        "max_members_per_group",
        "max_groups_per_user",
        "max_sessions_per_user",
        "max_devices_per_user",
    ):
        m = re.search(rf"^\| `{key}` \| (\d+) \|", limits, re.M)
        assert m and int(m.group(1)) == getattr(defaults, key), key


def _strip(obj: Any) -> Any:
    """A frame without the values that differ between runs (ids, timestamps)."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in ("msg_id", "ts")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def test_group_example_is_what_the_server_sends() -> None:
    """Replay the C: lines of "Example: a group"; compare each connection's S: lines.

    The connection a line belongs to is the first user named in the latest ``#`` line.
    """
    from twisted.internet.task import Clock

    from chatproto.testing import connect_string_transport, frame, frames, make_test_realm

    section = _section(_doc(), "Example: a group")
    block = section.split("```text\n", 1)[1].split("```", 1)[0]
    clock = Clock()
    service = make_test_realm(clock)
    passwords = {"alice": "correct horse", "bob": "battery staple"}
    conns = {}
    for name, password in passwords.items():
        service.create_user(name, password)
        proto, transport = connect_string_transport(service)
        proto.dataReceived(frame({"type": "hello", "version": 1, "id": 1}))
        proto.dataReceived(frame({"type": "login", "id": 2, "user": name, "password": password}))
        clock.advance(0)
        assert [f["type"] for f in frames(transport)] == ["result", "result", "synced"]
        conns[name] = (proto, transport)
    expected: dict[str, list[Any]] = {name: [] for name in conns}
    current = ""
    try:
        for line in block.splitlines():
            if line.startswith("#"):
                named = re.findall(r"\b(alice|bob)\b", line)
                current = named[0] if named else current
            elif line.startswith("C: "):
                conns[current][0].dataReceived(frame(json.loads(line[3:])))
                clock.advance(0)
            elif line.startswith("S: "):
                expected[current].append(_strip(json.loads(line[3:])))
        for name, (_proto, transport) in conns.items():
            assert [_strip(f) for f in frames(transport)] == expected[name], name
    finally:
        service.stopService()


# (d) byte-level examples ------------------------------------------------------------


def _documented_examples() -> list[tuple[str, bytes]]:
    """(json text, bytes) for each ``frame:`` block of PROTOCOL.md."""
    out = []
    for m in re.finditer(r"^frame: (.*)\n((?:[0-9a-f]{8}  .*\n)+)", _doc(), re.M):
        data = bytearray()
        for line in m.group(2).splitlines():
            hexpart = line[10:].split("|", 1)[0]
            data += bytes.fromhex(hexpart)
        out.append((m.group(1), bytes(data)))
    return out


def test_hex_examples_match_the_encoder() -> None:
    examples = _documented_examples()
    assert len(examples) == len(EXAMPLE_FRAMES)
    for (text, data), obj in zip(examples, EXAMPLE_FRAMES, strict=True):
        assert json.loads(text) == obj
        assert text.encode("utf-8") == wire.encode(obj), text
        assert data == frame_bytes(json.loads(text)), f"hex dump of {text} is wrong"
        assert wire.decode(data[4:]) == obj


def test_hex_examples_are_printed_exactly() -> None:
    doc = _doc()
    for obj in EXAMPLE_FRAMES:
        assert example_block(obj) in doc, f"regenerate the example for {obj}"


def test_hello_result_example_is_what_the_server_sends() -> None:
    cfg = config.Config()
    cfg.check()
    proto = ClientProtocol()
    proto.factory = SimpleNamespace(realm=SimpleNamespace(realm=cfg.realm, config=cfg))  # type: ignore[assignment]
    result = proto.handle_hello({"type": "hello", "version": 1, "id": 1})
    expected = wire.result_frame(1, **result).decode("utf-8")
    assert f"S: {expected}" in _doc()


def test_transcript_lines_are_json_frames() -> None:
    lines = re.findall(r"^([CS]): (\{.*\})\s*$", _doc(), re.M)
    assert len(lines) > 20
    for who, text in lines:
        obj = json.loads(text)
        assert isinstance(obj.get("type"), str), text
        if who == "C":
            # the one unknown type in the transcript shows the unknown_type error
            assert obj["type"] in {*_HANDLERS, "frobnicate"}, text
        else:
            assert obj["type"] in ("result", "error", "msg", "synced", "presence", "ping"), text
            if obj["type"] == "error":
                assert obj["code"] in CODES, text


# (e) ports and addresses ------------------------------------------------------------


def test_default_ports() -> None:
    doc = _doc()
    m = re.search(r"DEFAULT_PORT`?\D{0,40}?(\d{2,5})", doc)
    assert m and int(m.group(1)) == config.DEFAULT_PORT
    m = re.search(r"DEFAULT_TLS_PORT`?\D{0,40}?(\d{2,5})", doc)
    assert m and int(m.group(1)) == config.DEFAULT_TLS_PORT
    m = re.search(r"DEFAULT_FEDERATION_PORT`?\D{0,40}?(\d{2,5})", doc)
    assert m and int(m.group(1)) == config.DEFAULT_FEDERATION_PORT
    known = (config.DEFAULT_PORT, config.DEFAULT_TLS_PORT, config.DEFAULT_FEDERATION_PORT)
    for port in re.findall(r"(?<![\d.])74\d\d(?![\d.])", doc):
        assert int(port) in known, port


def test_address_examples() -> None:
    section = _section(_doc(), "Addresses")
    rows = re.findall(r"^\|\s*`([^`]*)`\s*\|\s*(?:`([^`]*)`|(error[^|]*))\s*\|", section, re.M)
    assert len(rows) >= 8
    for text, canonical, error in rows:
        if canonical:
            assert str(address.parse(text, "example.org", group=None)) == canonical, text
        else:
            assert "bad_address" in error, text
            with pytest.raises(ChatError) as info:
                address.parse(text, "example.org", group=None)
            assert info.value.code == "bad_address"


def test_limits_in_doc_match_code() -> None:
    doc = _doc()
    assert f"1 to {address.MAX_NAME} characters" in doc
    assert f"at most {address.MAX_REALM} characters" in doc
    from chatproto.realm import MAX_DEVICE

    assert f"1 to {MAX_DEVICE} characters" in doc
    assert f"`{wire.MAX_INT}`" in doc and f"`-{wire.MAX_INT}`" in doc


def test_integer_range_and_lone_surrogates_are_as_documented() -> None:
    # Integer fields: |n| <= 2**53 - 1, else bad_request.
    assert wire.field({"n": wire.MAX_INT}, "n", int) == wire.MAX_INT
    assert wire.field({"n": -wire.MAX_INT}, "n", int) == -wire.MAX_INT
    for bad in (wire.MAX_INT + 1, -wire.MAX_INT - 1):
        with pytest.raises(ChatError) as info:
            wire.field({"n": bad}, "n", int)
        assert info.value.code == "bad_request"
    # A lone surrogate escape (value or key) is bad_request; a proper pair is fine.
    for text in ('{"type":"ping","x":"\\ud800"}', '{"type":"ping","\\udc00":1}'):
        with pytest.raises(ChatError) as info:
            wire.decode(text.encode())
        assert info.value.code == "bad_request"
    assert wire.decode(b'{"type":"ping","x":"\\ud83d\\ude00"}')["x"] == "\U0001f600"
    assert "\\ud83d\\ude00" in _doc() and "lone surrogate" in _doc()


if __name__ == "__main__":  # pragma: no cover
    for obj in EXAMPLE_FRAMES:
        print("```text")
        print(example_block(obj))
        print("```\n")
    sys.exit(0)
