"""``[performance] coalesce_wait``: the reactor waits a little before polling again
after a busy iteration (chatproto.pacing), bounded by the work just done, by the
setting and by the next timed call; its checks; who applies it."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol
from twisted.internet import reactor as _reactor

from chatproto import tap
from chatproto.config import Performance
from chatproto.pacing import FLOOR, LoopPacer, LoopPacerService
from tests.test_collector import checked
from tests.test_tap import options


class FakeReactor:
    """A reactor's ``doIteration``: records the timeouts it was called with."""

    def __init__(self) -> None:
        self.polls: list[float | None] = []

    def doIteration(self, timeout: float | None) -> None:
        self.polls.append(timeout)


class Clocks:
    """The reactor thread's CPU clock and sleep, driven by the test."""

    def __init__(self) -> None:
        self.cpu = 10.0
        self.slept: list[float] = []

    def now(self) -> float:
        return self.cpu

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


def pacer(max_wait: float = 0.004) -> tuple[LoopPacer, FakeReactor, Clocks]:
    reactor, clocks = FakeReactor(), Clocks()
    p = LoopPacer(reactor, max_wait, cpu=clocks.now, sleep=clocks.sleep)
    assert p.install()
    return p, reactor, clocks


# the settings ----------------------------------------------------------------------


def test_default_and_file_values() -> None:
    """(Its bad values are checked with the other [performance] settings':
    tests/test_collector.py.)"""
    assert Performance().coalesce_wait == 0.004
    assert checked("[performance]\ncoalesce_wait = 0.01\n").performance.coalesce_wait == 0.01
    assert checked("[performance]\ncoalesce_wait = 0\n").performance.coalesce_wait == 0


# the wait --------------------------------------------------------------------------


def test_an_idle_reactor_polls_at_once() -> None:
    p, reactor, clocks = pacer()
    p.do_iteration(None)
    clocks.cpu += FLOOR / 2  # handled a message: tens of microseconds
    p.do_iteration(1.5)
    assert clocks.slept == [] and reactor.polls == [None, 1.5] and p.waits == 0


def test_a_busy_iteration_is_followed_by_a_wait_as_long_as_its_work() -> None:
    p, reactor, clocks = pacer(max_wait=0.004)
    p.do_iteration(None)
    clocks.cpu += 0.0015  # 1.5 ms of work since the last poll
    p.do_iteration(None)
    assert clocks.slept == [pytest.approx(0.0015)] and reactor.polls == [None, None]
    clocks.cpu += 0.009  # more than the setting: the setting
    p.do_iteration(2.0)
    assert clocks.slept[1] == pytest.approx(0.004)
    assert reactor.polls[2] == pytest.approx(2.0 - 0.004)  # the timed call stays on time
    assert p.waits == 2 and p.waited == pytest.approx(0.0055)


def test_never_past_the_next_timed_call() -> None:
    p, reactor, clocks = pacer(max_wait=0.004)
    p.do_iteration(None)
    clocks.cpu += 0.003
    p.do_iteration(0.001)  # a timed call due in 1 ms
    assert clocks.slept == [pytest.approx(0.001)] and reactor.polls[1] == 0.0
    clocks.cpu += 0.003
    p.do_iteration(0)  # stopping, or a call due now: no wait
    assert len(clocks.slept) == 1 and reactor.polls[2] == 0


def test_the_work_is_counted_from_the_last_poll() -> None:
    """The wait counts the CPU used since the poll before, not since start-up: two
    light iterations in a row do not add up to a wait."""
    p, _reactor, clocks = pacer()
    for _ in range(10):
        clocks.cpu += FLOOR * 0.9
        p.do_iteration(None)
    assert clocks.slept == []


def test_off_and_uninstalled_leave_the_reactor_as_it_was() -> None:
    reactor = FakeReactor()
    assert not LoopPacer(reactor, 0).install()  # coalesce_wait = 0
    assert "doIteration" not in reactor.__dict__
    p = LoopPacer(reactor, 0.004)
    assert p.install() and not p.install()  # (once)
    assert reactor.doIteration == p.do_iteration
    p.uninstall()
    assert "doIteration" not in reactor.__dict__  # the class's own again
    reactor.doIteration(0.5)
    assert reactor.polls == [0.5]
    assert not LoopPacer(object(), 0.004).install()  # a reactor with no doIteration


def test_a_wrapper_installed_before_ours_is_put_back() -> None:
    reactor = FakeReactor()
    theirs = reactor.doIteration = lambda timeout: reactor.polls.append(-1)  # type: ignore[method-assign]
    p = LoopPacer(reactor, 0.004)
    assert p.install()
    p.do_iteration(0.5)
    assert reactor.polls == [-1]  # ours called theirs
    p.uninstall()
    assert reactor.doIteration is theirs


def test_uninstalled_but_still_called_it_polls_as_the_reactor_does() -> None:
    """A wrapper installed after ours keeps calling ours once we are uninstalled:
    then ours is the reactor's own poll, with no wait."""
    reactor = FakeReactor()
    p = LoopPacer(reactor, 0.004)
    p.install()
    p.uninstall()
    p.do_iteration(0.25)
    assert reactor.polls == [0.25] and p.waits == 0


def test_a_replacement_installed_after_ours_is_kept() -> None:
    reactor = FakeReactor()
    p = LoopPacer(reactor, 0.004)
    p.install()
    theirs = reactor.doIteration = lambda timeout: None  # type: ignore[method-assign]
    p.uninstall()
    assert reactor.doIteration is theirs


# the real reactor ------------------------------------------------------------------


class Counting(protocol.Protocol):
    def __init__(self, got: list[bytes]) -> None:
        self.got = got

    def dataReceived(self, data: bytes) -> None:
        self.got.append(data)


@pytest_twisted.inlineCallbacks
def test_on_the_running_reactor_bytes_arrive_timers_run_and_waits_happen() -> Any:
    """Over loopback TCP with the pacer on the real reactor: while its iterations
    are busy (a timed call burns 3 ms of CPU every 10 ms, so the pacer waits after
    each), 40 small writes from a client thread, one every 0.5 ms, all arrive in
    order; a timed call still runs (its bound, never past the next timed call, is
    checked exactly with fake clocks above; here only a loaded machine's slack);
    once uninstalled, the reactor is as before.  (That reads then gather several
    writes is a matter of timing: bench/paced.py measures it.)"""
    got: list[bytes] = []
    factory = protocol.Factory.forProtocol(lambda: Counting(got))
    port = _reactor.listenTCP(0, factory, interface="127.0.0.1")
    p = LoopPacer(_reactor, 0.004)
    assert p.install()
    busy = True

    def burn() -> None:
        end = time.thread_time() + 0.003
        while time.thread_time() < end:
            pass
        if busy:  # (in 10 ms: a call due at once would leave no room for a wait)
            _reactor.callLater(0.01, burn)

    def client() -> None:
        with socket.create_connection(("127.0.0.1", port.getHost().port)) as s:
            for i in range(40):
                s.sendall(b"%03d;" % i)
                time.sleep(0.0005)
            time.sleep(0.2)

    try:
        burn()
        t = threading.Thread(target=client, daemon=True)
        t.start()
        due = time.monotonic() + 0.05
        fired: defer.Deferred[float] = defer.Deferred()
        _reactor.callLater(0.05, lambda: fired.callback(time.monotonic()))
        at = yield fired
        assert at - due < 0.004 + 0.5  # one wait at most, plus a loaded machine's slack
        deadline = time.monotonic() + 30
        while b"".join(got).count(b";") < 40 and time.monotonic() < deadline:
            d: defer.Deferred[None] = defer.Deferred()
            _reactor.callLater(0.01, d.callback, None)
            yield d
        assert b"".join(got) == b"".join(b"%03d;" % i for i in range(40))
        assert p.waits > 0
    finally:
        busy = False
        p.uninstall()
        yield port.stopListening()
    assert "doIteration" not in _reactor.__dict__


# who applies it --------------------------------------------------------------------


def test_twistd_chatrealm_adds_it_and_build_does_not_unless_asked(tmp_path: Any) -> None:
    opts = options("--data-dir", str(tmp_path / "data"), "--listen", "tcp:0:interface=127.0.0.1")
    top, _realm = tap.build(opts.realm_config, _reactor)
    assert not [s for s in top if isinstance(s, LoopPacerService)]
    pacers = [s for s in tap.makeService(opts) if isinstance(s, LoopPacerService)]
    assert len(pacers) == 1 and pacers[0].pacer.max_wait == 0.004
    assert "doIteration" not in _reactor.__dict__  # nothing until the service starts


def test_the_service_installs_and_puts_back() -> None:
    reactor = FakeReactor()
    service = LoopPacerService(Performance(coalesce_wait=0.002), reactor)
    service.startService()
    assert reactor.doIteration == service.pacer.do_iteration
    service.stopService()
    assert "doIteration" not in reactor.__dict__
    off = LoopPacerService(Performance(coalesce_wait=0), reactor)
    off.startService()
    assert "doIteration" not in reactor.__dict__
    off.stopService()
