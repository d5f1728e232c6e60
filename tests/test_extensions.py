"""Extensions named in realm.plugins: loading, observing, posting."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock
from twisted.python import usage

from chatproto import extensions, tap
from chatproto.config import ConfigError
from chatproto.testing import connect_string_transport, frame, frames, make_test_realm
from tests import plugin_for_tests


def test_load_errors_are_readable() -> None:
    for spec, text in [
        ("nocolon", "not 'module:callable'"),
        ("no_such_module_xyz:setup", "cannot import"),
        ("tests.plugin_for_tests:missing", "has no"),
        ("tests.plugin_for_tests:not_callable", "not callable"),
    ]:
        with pytest.raises(ConfigError) as e:
            extensions.load(spec)
        assert text in str(e.value)


def test_bad_plugin_is_a_usage_error(tmp_path: Any) -> None:
    conf = tmp_path / "realm.toml"
    conf.write_text('[realm]\nplugins = ["no_such_module_xyz:setup"]\n')
    with pytest.raises(usage.UsageError) as e:
        tap.Options().parseOptions(["--config", str(conf)])
    assert "cannot import" in str(e.value)


def test_observer_and_post_over_string_transport() -> None:
    clock = Clock()
    realm = make_test_realm(clock)
    extensions.load("tests.plugin_for_tests:setup")(realm)
    realm.create_user("pingbot", "password1")
    realm.create_user("alice", "password1")
    proto, t = connect_string_transport(realm)
    proto.dataReceived(frame({"type": "hello", "version": 1}))
    proto.dataReceived(frame({"type": "login", "user": "alice", "password": "password1"}))
    clock.advance(0)
    frames(t)
    proto.dataReceived(frame({"type": "send", "to": "pingbot", "body": "!ping", "id": 1}))
    clock.advance(0)
    msgs = [f for f in frames(t) if f["type"] == "msg"]
    assert [(m["from"], m["body"]) for m in msgs] == [
        ("alice@localhost", "!ping"),
        ("pingbot@localhost", "pong"),
    ]
    assert [e.body for e in plugin_for_tests.seen[-2:]] == ["!ping", "pong"]
    # post() checks its sender like any send
    failure = realm.post("nobody", "alice", "x")
    assert failure.result.value.code == "no_such_user"
    failure.addErrback(lambda _: None)
    realm.stopService()


def test_build_calls_plugins(tmp_path: Any) -> None:
    from twisted.internet import reactor

    conf = tmp_path / "realm.toml"
    conf.write_text(
        f'[realm]\ndata_dir = "{tmp_path / "data"}"\nplugins = ["tests.plugin_for_tests:setup"]\n'
    )
    opts = tap.Options()
    opts.parseOptions(["--config", str(conf)])
    _top, realm = tap.build(opts.realm_config, reactor)
    assert len(realm.observers) == 1


def test_extensions_can_act_in_groups() -> None:
    clock = Clock()
    realm = make_test_realm(clock)
    realm.create_user("helpbot", "password1")
    created = realm.group_event_as("helpbot", "created", "#help")
    assert created.result.recipient == "#help@localhost"
    posted = realm.post("helpbot", "#help", "ask me anything")
    assert posted.result.sender == "helpbot@localhost"
    refused = realm.group_event_as("helpbot", "joined", "#help")
    assert refused.result.value.code == "already_member"
    refused.addErrback(lambda _: None)
    realm.stopService()


@pytest_twisted.inlineCallbacks
def test_plugin_answers_over_a_real_connection(tmp_path: Any) -> Any:
    """A plugin named in the config, wired by tap.build, answers a client over TCP."""
    from twisted.internet import reactor

    from chatproto.client import connect
    from tests.conftest import until

    conf = tmp_path / "realm.toml"
    conf.write_text(
        f'[realm]\ndata_dir = "{tmp_path / "data"}"\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
        'plugins = ["tests.plugin_for_tests:setup"]\n'
        "[auth]\nargon2_time_cost = 1\nargon2_memory_cost = 1024\nargon2_parallelism = 1\n"
    )
    opts = tap.Options()
    opts.parseOptions(["--config", str(conf)])
    top, realm = tap.build(opts.realm_config, reactor, opts.plugins)
    top.privilegedStartService()
    top.startService()
    listener = next(s for s in top if isinstance(s, tap.ListenerService))
    addr = f"tcp:127.0.0.1:{listener.port.getHost().port}"
    try:
        yield realm.create_user("pingbot", "password1")
        got: list[dict[str, Any]] = []
        alice = yield connect(
            reactor, addr, "alice", "password1", register=True, on_message=got.append
        )
        yield alice.send("pingbot", "!ping")
        yield until(lambda: any(m["body"] == "pong" for m in got))
        assert [(m["from"], m["body"]) for m in got] == [
            ("alice@localhost", "!ping"),
            ("pingbot@localhost", "pong"),
        ]
        yield alice.close()
    finally:
        yield top.stopService()
