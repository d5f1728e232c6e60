"""A realm stopped while it is still starting (twistd told to stop at once, a test
that gives up) stops cleanly: the start stops where it is, nothing it had not started
is started after the stop, and no error is logged for it."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.logger import globalLogPublisher

from tests.conftest import fast_config, make_realm


@pytest_twisted.inlineCallbacks
def test_a_realm_stopped_while_starting_logs_no_error(tmp_path: Any) -> Any:
    failures: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        realm = make_realm(fast_config(tmp_path))
        outcome: list[Any] = []
        realm.startService().addBoth(outcome.append)
        yield realm.stopService()
        assert outcome == [None]  # the start's own result, still the starter's
        assert not realm.files._cleanup.running  # nothing started after the stop
    finally:
        globalLogPublisher.removeObserver(observe)
    assert failures == [], [e.get("log_failure") or e for e in failures]
