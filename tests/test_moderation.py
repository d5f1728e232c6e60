"""Moderation (issue 18): realm admins (``chatrealmctl grant-admin``) and abuse reports
(``report``), over StringTransport for the protocol rules, and over loopback TCP with
the client library, the ``chatproto`` CLI, the TUI's controller and ``chatrealmctl``
through the control channel and on the store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from chatproto import client, ctl, ctlmoderation
from chatproto.client import RemoteError
from chatproto.envelope import Envelope
from chatproto.ratelimit import UserBuckets
from chatproto.realm.moderation import REPORT_BURST, REPORT_RATE
from chatproto.testing import frame, frames, make_test_realm
from tests.conftest import until
from tests.test_cli import run_cli
from tests.test_control import PW, Running, _write_config, short_dir  # noqa: F401
from tests.test_reading import logged_in_clear
from tests.test_tui_loopback import PASSWORD, logged_in, notices, register

PASS = "correct horse battery"


def _ask(proto: Any, transport: Any, clock: Clock, **req: Any) -> dict[str, Any]:
    data = frame({"id": 7, **req})
    for i in range(len(data)):  # one byte at a time
        proto.dataReceived(data[i : i + 1])
    clock.advance(0)
    replies = [f for f in frames(transport) if f.get("id") == 7]
    assert len(replies) == 1, replies
    return replies[0]


@pytest.fixture
def moderated() -> Any:
    clock = Clock()
    realm = make_test_realm(clock)
    for name in ("alice", "bob", "carol", "dave"):
        realm.create_user(name, PASS)
    realm.moderation.grant("alice")
    conns = {
        name: logged_in_clear(realm, clock, name, password=PASS)
        for name in ("alice", "bob", "carol")
    }
    return realm, clock, conns


def test_a_report_is_stored_with_what_the_message_was(moderated: Any) -> None:
    _realm, clock, c = moderated
    sent = _ask(*c["carol"], clock, type="send", to="bob", body="buy cheap pills")
    msg_id = sent["msg_id"]
    reply = _ask(*c["bob"], clock, type="report", msg_id=msg_id, reason="spam")
    assert reply["type"] == "result" and reply["report"] == 1
    # not one's own, not one one cannot read, not one that does not exist
    own = _ask(*c["carol"], clock, type="report", msg_id=msg_id, reason="x")
    assert (own["type"], own["code"]) == ("error", "bad_request")
    for who, mid in (("alice", msg_id), ("bob", "no-such-id")):
        err = _ask(*c[who], clock, type="report", msg_id=mid, reason="spam")
        assert (err["type"], err["code"]) == ("error", "not_found")
    # no message id (PROTOCOL.md, "Text shown to others"): refused before any look-up
    for mid in ("a\x1b[2Jb", "a b", "a\u202eb", "m" * 129, "", 5):
        err = _ask(*c["bob"], clock, type="report", msg_id=mid, reason="spam")
        assert (err["type"], err["code"]) == ("error", "bad_request"), mid
    for bad in ({"reason": ""}, {"reason": "a\x1bb"}, {"reason": "r" * 401}, {"reason": 5}):
        err = _ask(*c["bob"], clock, type="report", msg_id=msg_id, **bad)
        assert err["code"] == "bad_request", bad
    # the admin reads it; everyone else is refused
    page = _ask(*c["alice"], clock, type="reports")
    [rep] = page["reports"]
    assert {k: rep[k] for k in ("id", "reporter", "msg_id", "reason", "sender", "recipient")} == {
        "id": 1,
        "reporter": "bob@localhost",
        "msg_id": msg_id,
        "reason": "spam",
        "sender": "carol@localhost",
        "recipient": "bob@localhost",
    }
    assert rep["excerpt"] == "buy cheap pills" and rep["pos"] == sent["pos"]
    for who in ("bob", "carol"):
        err = _ask(*c[who], clock, type="reports")
        assert (err["type"], err["code"]) == ("error", "forbidden")
    err = _ask(*c["alice"], clock, type="reports", limit=0)
    assert err["code"] == "bad_request"


def test_group_messages_are_reported_by_members_only(moderated: Any) -> None:
    _realm, clock, c = moderated
    assert _ask(*c["carol"], clock, type="create_group", group="#dev")["type"] == "result"
    assert _ask(*c["bob"], clock, type="join", group="#dev")["type"] == "result"
    sent = _ask(*c["carol"], clock, type="send", to="#dev", body="rude words")
    assert _ask(*c["bob"], clock, type="report", msg_id=sent["msg_id"], reason="rude")["report"]
    err = _ask(*c["alice"], clock, type="report", msg_id=sent["msg_id"], reason="rude")
    assert err["code"] == "not_found"  # alice is no member: admin or not


def test_reports_are_rate_limited_per_user(moderated: Any) -> None:
    realm, clock, c = moderated
    ids = [
        _ask(*c["carol"], clock, type="send", to="bob", body=f"m{i}")["msg_id"] for i in range(7)
    ]
    for mid in ids[:REPORT_BURST]:
        assert _ask(*c["bob"], clock, type="report", msg_id=mid, reason="spam")["type"] == "result"
    err = _ask(*c["bob"], clock, type="report", msg_id=ids[5], reason="spam")
    assert err["code"] == "rate_limited" and err["retry_after"] > 0
    clock.advance(1 / REPORT_RATE)
    assert _ask(*c["bob"], clock, type="report", msg_id=ids[5], reason="spam")["type"] == "result"
    assert realm.stats.refused["report"] == 1


def test_an_admin_suspends_from_a_client_and_others_may_not(moderated: Any) -> None:
    realm, clock, c = moderated
    err = _ask(*c["bob"], clock, type="suspend", user="carol")
    assert (err["type"], err["code"]) == ("error", "forbidden")
    err = _ask(*c["alice"], clock, type="suspend", user="alice")
    assert err["code"] == "bad_request"
    reply = _ask(*c["alice"], clock, type="suspend", user="carol", reason="spam")
    assert (reply["user"], reply["closed"]) == ("carol@localhost", 1)
    carol_transport = c["carol"][1]
    assert carol_transport.disconnecting
    assert frames(carol_transport)[-1]["code"] == "account_suspended"
    err = _ask(*c["bob"], clock, type="unsuspend", user="carol")
    assert err["code"] == "forbidden"
    reply = _ask(*c["alice"], clock, type="unsuspend", user="carol")
    assert (reply["user"], reply["was_suspended"]) == ("carol@localhost", True)
    # the role belongs to the account: revoked, alice is refused too
    realm.moderation.revoke("alice")
    err = _ask(*c["alice"], clock, type="reports")
    assert err["code"] == "forbidden"


@pytest_twisted.inlineCallbacks
def test_report_and_reports_over_loopback_client_cli_and_tui(server: Any) -> Any:
    realm, _factory, addr = server
    yield register(addr, "alice", "bob", "carol")
    yield realm.moderation.grant("alice")
    carol = yield client.connect(_reactor, addr, "carol", PASSWORD)
    bob = yield client.connect(_reactor, addr, "bob", PASSWORD)
    tui = yield logged_in(addr, "bob")
    try:
        first = yield carol.send("bob", "first spam")
        second = yield carol.send("bob", "second spam")
        rid = yield bob.report(first["msg_id"], "spam")
        assert rid == 1
        with pytest.raises(RemoteError) as e:
            yield bob.reports()
        assert e.value.code == "forbidden"
        # the CLI
        second_id = second["msg_id"]
        out, err, code = yield run_cli(addr, "bob", "report", second_id, "more", "spam")
        assert (code, out) == (0, f"reported {second_id} (report 2)\n"), err
        out, err, code = yield run_cli(addr, "carol", "reports")
        assert code == 1 and "forbidden" in err
        out, err, code = yield run_cli(addr, "alice", "reports")
        assert code == 0, err
        assert out.splitlines()[0].startswith(
            f"#2 bob@localhost reports {second_id} (carol@localhost to bob@localhost): more spam"
        )
        # the TUI: /report the latest message from someone else here
        tui.open("carol@localhost")
        yield until(lambda: len(tui.model.conversations["carol@localhost"].items) == 2)
        yield tui.run("/report abusive")
        assert (
            notices(tui, "carol@localhost")[-1] == "reported the latest message of carol (report 3)"
        )
        admin = yield client.connect(_reactor, addr, "alice", PASSWORD)
        page = yield admin.reports(limit=2)
        assert [(r["id"], r["reason"]) for r in page] == [(3, "abusive"), (2, "more spam")]
        assert page[0]["excerpt"] == "second spam"
        yield admin.close()
    finally:
        yield tui.stop()
        yield bob.close()
        yield carol.close()


@pytest_twisted.inlineCallbacks
def test_ctl_grants_admins_and_lists_reports_running_or_not(
    tmp_path: Path,
    short_dir: Path,  # noqa: F811
    capsys: Any,
    monkeypatch: Any,
) -> Any:
    conf = _write_config(tmp_path, short_dir / "control.sock")
    r = Running(conf)
    try:
        for name in ("alice", "bob", "carol"):
            yield r.realm.create_user(name, PW)
        status = yield r.ctl("grant-admin", "alice")
        out, err = capsys.readouterr()
        assert (status, out) == (0, "alice@localhost is a realm admin by the running realm\n"), err
        assert r.realm.moderation.is_admin("alice@localhost")
        status = yield r.ctl("grant-admin", "ghost")
        _, err = capsys.readouterr()
        assert (status, err) == (1, "chatrealmctl: no user ghost@localhost\n")
        status = yield r.ctl("admins")
        assert (status, capsys.readouterr().out) == (0, "alice@localhost\n")
        status = yield r.ctl("reports")
        assert (status, capsys.readouterr().out) == (0, "no reports\n")
        port = r.port("ClientFactory")
        carol = yield client.connect(_reactor, f"tcp:127.0.0.1:{port}", "carol", PW)
        bob = yield client.connect(_reactor, f"tcp:127.0.0.1:{port}", "bob", PW)
        for i in range(REPORT_BURST):
            sent = yield carol.send("bob", f"spam {i}\nline two")
            yield bob.report(sent["msg_id"], f"reason {i}")
        yield bob.close()
        yield carol.close()
        monkeypatch.setattr(ctlmoderation, "_REPORTS_PAGE", 2)  # 3 reports: 2 pages
        status = yield r.ctl("reports", "--limit", "3")
        out, err = capsys.readouterr()
        lines = out.splitlines()
        assert status == 0 and len(lines) == 6, err
        assert lines[0].startswith("#5 ") and lines[0].endswith(": reason 4")
        assert lines[1] == "    spam 4 line two"
        # a body's CR, BS, BEL, NUL and bidi override do not reach the terminal raw
        carol = yield client.connect(_reactor, f"tcp:127.0.0.1:{port}", "carol", PW)
        bob = yield client.connect(_reactor, f"tcp:127.0.0.1:{port}", "bob", PW)
        sent = yield carol.send("bob", "ok\rFAKE\x08\x07\x00\u202egnp.exe")
        r.realm.moderation.report_limit = UserBuckets(1000, 1000)  # bob used his burst
        yield bob.report(sent["msg_id"], "spoof")
        yield bob.close()
        yield carol.close()
        status = yield r.ctl("reports", "--limit", "1")
        out, err = capsys.readouterr()
        assert status == 0, err
        assert out.splitlines()[1] == "    ok\u240dFAKE\u2408\u2407\u2400\ufffdgnp.exe"
        status = yield r.ctl("revoke-admin", "alice")
        out, _ = capsys.readouterr()
        assert out == "alice@localhost is no longer a realm admin by the running realm\n"
        assert not r.realm.moderation.is_admin("alice@localhost")
        # a deleted admin (alice: created at position 0) is no admin any more
        status = yield r.ctl("grant-admin", "alice")
        status = yield r.ctl("deluser", "alice")
        capsys.readouterr()
        status = yield r.ctl("admins")
        assert (status, capsys.readouterr().out) == (0, "no realm admins\n")
    finally:
        yield r.stop()
    for argv, expected in (
        (["grant-admin", "bob"], "bob@localhost is a realm admin in the store"),
        (["admins"], "bob@localhost"),
        (["revoke-admin", "carol"], ""),
    ):
        status = yield deferToThread(ctl.main, ["--config", str(conf), *argv])
        out, err = capsys.readouterr()
        if expected:
            assert status == 0 and out.startswith(expected), err
        else:
            assert (status, err) == (1, "chatrealmctl: carol@localhost is not a realm admin\n")
    status = yield deferToThread(ctl.main, ["--config", str(conf), "reports", "--limit", "100"])
    out, _ = capsys.readouterr()
    assert status == 0 and len(out.splitlines()) == 2 * (REPORT_BURST + 1)
    # the next start reads the admins from the store
    r = Running(conf)
    try:
        yield until(lambda: r.realm.moderation.is_admin("bob@localhost"))
    finally:
        yield r.stop()


@pytest.mark.parametrize("how", ["realm", "another process"])
def test_a_deleted_account_is_no_admin_and_not_suspended(how: str) -> None:
    clock = Clock()
    realm = make_test_realm(clock)
    realm.create_user("alice", PASS)  # the first account: created at position 0
    realm.create_user("bob", PASS)
    realm.moderation.grant("alice")
    realm.admin.suspend("bob")
    clock.advance(0)
    assert realm.moderation.list_admins() == ["alice@localhost"]
    assert realm.accounts.floor_of("alice") == 0
    for name in ("alice", "bob"):
        if how == "realm":
            realm.delete_user(name)
        else:  # chatrealmctl on the store, or another worker: the realm re-reads it
            realm.store.delete_user(name, f"{name}@localhost")
            realm.accounts.refresh(name)
    clock.advance(0)
    assert realm.moderation.list_admins() == []
    assert not realm.moderation.is_admin("alice@localhost")
    assert "bob" not in realm.admin.suspended


def test_a_realm_admin_deletes_any_message_of_a_local_user(moderated: Any) -> None:
    realm, clock, c = moderated
    sent = _ask(*c["carol"], clock, type="send", to="bob", body="nasty words")
    frames(c["bob"][1])
    dave = logged_in_clear(realm, clock, "dave", password=PASS)
    err = _ask(*dave, clock, type="delete", msg_id=sent["msg_id"])
    assert err["code"] == "not_found"  # an ordinary user: as if it did not exist
    reply = _ask(*c["alice"], clock, type="delete", msg_id=sent["msg_id"])
    assert reply["type"] == "result", reply
    for who in ("bob", "carol"):  # both parties see the delete, in the sender's name
        items = [f for f in frames(c[who][1]) if f.get("type") == "msg"]
        assert [(f["kind"], f["from"], f["meta"]) for f in items] == [
            ("delete", "carol@localhost", {"ref": sent["msg_id"]})
        ]
    stored: list[Any] = []
    realm.store.stored_item(sent["msg_id"]).addCallback(stored.append)
    assert stored[0].body == "" and stored[0].meta.get("deleted") is True
    err = _ask(*c["alice"], clock, type="delete", msg_id=sent["msg_id"])
    assert err["code"] == "not_found"  # deleted already
    # in a group the admin is not in
    assert _ask(*c["carol"], clock, type="create_group", group="#dev")["type"] == "result"
    g = _ask(*c["carol"], clock, type="send", to="#dev", body="spam in a group")
    assert _ask(*c["alice"], clock, type="delete", msg_id=g["msg_id"])["type"] == "result"
    # a message of another realm's user is not this realm's to delete
    remote = Envelope("r-1", "text", "eve@elsewhere.example", "bob@localhost", 1.0, "hi")
    realm.store.append([remote])
    err = _ask(*c["alice"], clock, type="delete", msg_id="r-1")
    assert err["code"] == "forbidden"


def test_moderation_requests_check_fields_then_the_role(moderated: Any) -> None:
    """PROTOCOL.md, "Moderation requests": bad_request first, then forbidden."""
    _realm, clock, c = moderated
    for conn, req, code in (
        (c["bob"], {"type": "reports", "limit": 0}, "bad_request"),
        (c["bob"], {"type": "reports", "before": 0}, "bad_request"),
        (c["bob"], {"type": "reports", "limit": 101}, "bad_request"),
        (c["bob"], {"type": "reports"}, "forbidden"),
        (c["bob"], {"type": "suspend", "user": "carol", "reason": "r" * 401}, "bad_request"),
        (c["bob"], {"type": "suspend", "user": "carol", "reason": "a\x1bb"}, "bad_request"),
        (c["bob"], {"type": "unsuspend"}, "bad_request"),
        (c["bob"], {"type": "unsuspend", "user": "carol"}, "forbidden"),
        (c["bob"], {"type": "suspend", "user": "carol", "reason": 5}, "bad_request"),
        (c["bob"], {"type": "suspend", "user": "carol"}, "forbidden"),
        (c["alice"], {"type": "reports", "before": 0}, "bad_request"),
        (c["alice"], {"type": "unsuspend", "user": "x@elsewhere.example"}, "bad_address"),
    ):
        reply = _ask(*conn, clock, **req)
        assert (reply["type"], reply["code"]) == ("error", code), req
    reply = _ask(*c["alice"], clock, type="unsuspend", user="ghost")
    assert (reply["type"], reply["was_suspended"]) == ("result", False)


def test_an_admins_unsuspend_logs_a_checked_address_only(moderated: Any, log_watch: Any) -> None:
    """The user field of unsuspend went into the log before it was checked: a line
    break in it made a log line of the admin's choosing."""
    _realm, clock, c = moderated
    forged = "x\n2026-01-01T00:00:00+0000 [-] login root device x from 10.0.0.1"
    reply = _ask(*c["alice"], clock, type="unsuspend", user=forged)
    assert (reply["type"], reply["code"]) == ("error", "bad_address")
    assert not any("login root" in line for line in log_watch.lines)
    reply = _ask(*c["alice"], clock, type="unsuspend", user="CAROL")
    assert reply["type"] == "result"
    assert any(
        "realm admin alice@localhost lifts the suspension of carol@localhost" in line
        for line in log_watch.lines
    )
