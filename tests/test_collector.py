"""``[performance]``: the garbage collector and thread switch interval settings
``twistd chatrealm`` applies (chatproto.collector), their checks, and that nothing else
applies them."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet import reactor as _reactor

from chatproto import config, tap
from chatproto.collector import CollectorService
from chatproto.config import Config, ConfigError, Performance
from tests.test_tap import FAST_AUTH, config_file, options


@pytest.fixture(autouse=True)
def collector_state() -> Iterator[tuple[int, ...]]:
    """The process's thresholds and frozen objects are as they were after each test,
    whatever it did (other tests share this process)."""
    thresholds = gc.get_threshold()
    frozen = gc.get_freeze_count()
    interval = sys.getswitchinterval()
    yield thresholds
    if gc.get_freeze_count() and not frozen:
        gc.unfreeze()
    gc.set_threshold(*thresholds)
    sys.setswitchinterval(interval)


class FakeRealm:
    """A realm whose start-up finishes when the test says so."""

    def __init__(self) -> None:
        self.waiters: list[defer.Deferred[None]] = []

    def when_started(self) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self.waiters.append(d)
        return d

    def started(self) -> None:
        waiters, self.waiters = self.waiters, []
        for d in waiters:
            d.callback(None)


def checked(text: str) -> Config:
    cfg = config.from_dict(config.tomllib.loads(text))
    cfg.check()
    return cfg


# the settings ----------------------------------------------------------------------


def test_defaults_and_file_values() -> None:
    assert Performance() == Performance(
        gc_thresholds=[20000, 10, 10], gc_freeze=True, switch_interval=0.0005
    )
    cfg = checked(
        "[performance]\ngc_thresholds = [5000, 20, 30]\ngc_freeze = false\n"
        "switch_interval = 0.002\n"
    )
    assert cfg.performance == Performance(
        gc_thresholds=[5000, 20, 30], gc_freeze=False, switch_interval=0.002
    )
    assert checked("[performance]\ngc_thresholds = []\n").performance.gc_thresholds == []
    assert checked("[performance]\nswitch_interval = 0\n").performance.switch_interval == 0
    assert checked("[performance]\nswitch_interval = 0.1\n").performance.switch_interval == 0.1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gc_thresholds = 700", "performance.gc_thresholds must be a list of integers"),
        ("gc_thresholds = [700, 10, '10']", "must be a list of integers"),
        ("gc_thresholds = [700, 10, 1.5]", "must be a list of integers"),
        ("gc_thresholds = [700, true, 10]", "must be a list of integers"),
        ("gc_thresholds = [700, 10]", "must be three integers [gen0, gen1, gen2]"),
        ("gc_thresholds = [700, 10, 10, 10]", "must be three integers"),
        ("gc_thresholds = [0, 10, 10]", "gc_thresholds[0] must be between 1 and 1000000, not 0"),
        ("gc_thresholds = [0, 10, 10]", "0 would stop collecting cycles"),
        ("gc_thresholds = [-5, 10, 10]", "gc_thresholds[0] must be between 1 and 1000000"),
        ("gc_thresholds = [2000000, 10, 10]", "gc_thresholds[0] must be between"),
        ("gc_thresholds = [700, 0, 10]", "gc_thresholds[1] must be between 1 and 1000, not 0"),
        ("gc_thresholds = [700, 10, 1001]", "gc_thresholds[2] must be between 1 and 1000"),
        ("gc_freeze = 1", "performance.gc_freeze must be bool"),
        ("switch_interval = '1ms'", "performance.switch_interval must be float"),
        ("switch_interval = true", "performance.switch_interval must be float"),
        (
            "switch_interval = 0.00001",
            "switch_interval must be 0 (Python's own) or between 5e-05 and 0.1 seconds, not 1e-05",
        ),
        ("switch_interval = -0.001", "switch_interval must be 0 (Python's own) or between"),
        ("switch_interval = 5", "between 5e-05 and 0.1 seconds, not 5"),
        ("switch_interval = nan", "switch_interval must be a finite number, not nan"),
        ("switch_interval = inf", "switch_interval must be a finite number"),
        (
            "coalesce_wait = 0.0001",
            "performance.coalesce_wait must be 0 (poll again at once) or between 0.0005 "
            "and 0.05 seconds, not 0.0001",
        ),
        ("coalesce_wait = -0.004", "coalesce_wait must be 0 (poll again at once) or between"),
        ("coalesce_wait = 1", "between 0.0005 and 0.05 seconds, not 1"),
        ("coalesce_wait = '4ms'", "performance.coalesce_wait must be float"),
        ("coalesce_wait = nan", "coalesce_wait must be a finite number, not nan"),
        ("gc_frozen = true", "unknown key performance.gc_frozen"),
    ],
)
def test_bad_values_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        checked(f"[performance]\n{text}\n")
    assert message in str(info.value)


def test_bad_values_are_twistd_usage_errors(tmp_path: Any) -> None:
    from twisted.python import usage

    path = config_file(tmp_path, "[performance]\ngc_thresholds = [0, 10, 10]\n")
    with pytest.raises(usage.UsageError, match=r"^configuration: performance\.gc_thresholds"):
        options("--config", path)


# the service -----------------------------------------------------------------------


def test_sets_the_thresholds_and_puts_them_back(collector_state: tuple[int, ...]) -> None:
    service = CollectorService(Performance(gc_thresholds=[12345, 7, 8], gc_freeze=False))
    service.startService()
    assert gc.get_threshold() == (12345, 7, 8)
    assert service.replaced == collector_state
    service.stopService()
    assert gc.get_threshold() == collector_state


def test_sets_the_switch_interval_and_puts_it_back() -> None:
    sys.setswitchinterval(0.004)  # what the process had
    service = CollectorService(Performance(gc_freeze=False, switch_interval=0.0007))
    service.startService()
    assert sys.getswitchinterval() == pytest.approx(0.0007)
    assert service.replaced_interval == pytest.approx(0.004)
    service.stopService()
    assert sys.getswitchinterval() == pytest.approx(0.004)
    assert service.replaced_interval is None


def test_python_own_switch_interval_is_left_alone() -> None:
    sys.setswitchinterval(0.003)
    service = CollectorService(Performance(gc_freeze=False, switch_interval=0))
    service.startService()
    assert sys.getswitchinterval() == pytest.approx(0.003)
    service.stopService()
    assert sys.getswitchinterval() == pytest.approx(0.003)


def test_switch_interval_changed_by_someone_else_is_not_undone() -> None:
    service = CollectorService(Performance(gc_freeze=False, switch_interval=0.0007))
    service.startService()
    sys.setswitchinterval(0.009)
    service.stopService()
    assert sys.getswitchinterval() == pytest.approx(0.009)


def test_python_own_thresholds_are_left_alone() -> None:
    gc.set_threshold(4321, 9, 9)  # what an embedder might have set
    service = CollectorService(Performance(gc_thresholds=[], gc_freeze=False))
    service.startService()
    assert gc.get_threshold() == (4321, 9, 9)
    service.stopService()
    assert gc.get_threshold() == (4321, 9, 9)


def test_thresholds_changed_by_someone_else_are_not_undone() -> None:
    service = CollectorService(Performance(gc_thresholds=[12345, 7, 8], gc_freeze=False))
    service.startService()
    gc.set_threshold(999, 5, 5)
    service.stopService()
    assert gc.get_threshold() == (999, 5, 5)


def test_no_freeze_unless_asked() -> None:
    before = gc.get_freeze_count()
    realm = FakeRealm()
    service = CollectorService(Performance(gc_freeze=False), realm)
    service.startService()
    assert realm.waiters == []  # does not even wait
    assert gc.get_freeze_count() == before and service.frozen == 0
    service.stopService()


def test_freezes_once_the_realm_has_started_and_unfreezes_at_stop() -> None:
    assert gc.get_freeze_count() == 0
    realm = FakeRealm()
    service = CollectorService(Performance(gc_thresholds=[], gc_freeze=True), realm)
    service.startService()
    assert gc.get_freeze_count() == 0  # the realm's state is not loaded yet
    alive = [object()]  # made before the freeze: frozen
    realm.started()
    assert service.frozen > 1000 and gc.get_freeze_count() > 1000
    assert not any(o is alive for o in gc.get_objects())  # the permanent generation
    service.stopService()
    assert gc.get_freeze_count() == 0 and service.frozen == 0
    assert any(o is alive for o in gc.get_objects())


def test_cycles_made_after_the_freeze_are_still_collected() -> None:
    """Raised thresholds and a frozen start-up: a cycle is collected all the same."""
    import weakref

    service = CollectorService(Performance(gc_thresholds=[20000, 10, 10], gc_freeze=True))
    service.startService()
    try:

        class Node:
            pass

        a, b = Node(), Node()
        a.other, b.other = b, a  # type: ignore[attr-defined]
        gone = weakref.ref(a)
        del a, b
        assert gone() is not None  # a cycle: reference counting alone keeps it
        for _ in range(30000):  # net allocations past the first threshold
            gc_food = [[] for _ in range(1)]
            gc_food.append(gc_food)
        assert gone() is None
    finally:
        service.stopService()


def test_no_freeze_when_stopped_before_the_realm_started() -> None:
    realm = FakeRealm()
    service = CollectorService(Performance(gc_thresholds=[], gc_freeze=True), realm)
    service.startService()
    service.stopService()
    realm.started()
    assert gc.get_freeze_count() == 0 and service.frozen == 0


# who applies it --------------------------------------------------------------------


def test_build_leaves_the_collector_alone_unless_asked(
    tmp_path: Any, collector_state: tuple[int, ...]
) -> None:
    """An embedding application's ``tap.build`` changes nothing process-wide;
    ``twistd chatrealm`` (makeService) adds the service, last."""
    opts = options("--data-dir", str(tmp_path / "data"), "--listen", "tcp:0:interface=127.0.0.1")
    interval = sys.getswitchinterval()
    top, _realm = tap.build(opts.realm_config, _reactor)
    assert not [s for s in top if isinstance(s, CollectorService)]
    assert gc.get_threshold() == collector_state
    assert sys.getswitchinterval() == interval
    services = list(tap.makeService(opts))
    assert isinstance(services[-1], CollectorService)
    assert services[-1].settings is opts.realm_config.performance
    assert gc.get_threshold() == collector_state  # nothing until the service starts


@pytest_twisted.inlineCallbacks
def test_twistd_realm_starts_with_the_configured_collector(tmp_path: Any) -> Any:
    """A real ``twistd -n chatrealm``: the thresholds of its config, and its start-up
    frozen once the realm has started."""
    from tests.processes import Spawner, twistd_argv

    path = config_file(
        tmp_path,
        FAST_AUTH
        + "[performance]\ngc_thresholds = [15000, 11, 12]\ngc_freeze = true\n"
        + "switch_interval = 0.0008\ncoalesce_wait = 0.006\n",
    )
    spawn = Spawner(str(tmp_path))
    try:
        proc = spawn(
            [
                *twistd_argv(),
                "-n",
                "--pidfile=",
                "chatrealm",
                "--config",
                path,
                "--data-dir",
                str(tmp_path / "data"),
                "--listen",
                "tcp:0:interface=127.0.0.1",
            ]
        )
        yield proc.wait_for(r"garbage collector: thresholds \(15000, 11, 12\)")
        yield proc.wait_for(r"thread switch interval: 0\.0008 s\n")
        yield proc.wait_for(r"event loop: waits up to 0\.006 s after busy iterations")
        m = yield proc.wait_for(r"garbage collector: (\d+) objects of the started realm frozen")
        assert int(m.group(1)) > 10000
        yield proc.wait_for(r"realm localhost started")
        proc.kill("TERM")
        code = yield proc.ended
        assert "Traceback" not in proc.output, proc.output
        assert code in (0, -15), proc.output
    finally:
        yield spawn.close()
