"""Subprocesses for tests (twistd realms, example programs): output collected and
matched, a bounded lifetime, the exit code as a Deferred."""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from twisted.internet import defer, error, protocol
from twisted.internet import reactor as _reactor

#: Upper bound for any subprocess to live, and for any awaited output.
TIMEOUT = 30.0


def twistd_argv() -> list[str]:
    """Run the twistd of this interpreter's environment (the plugin is installed there)."""
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(script):
        return [sys.executable, script]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "PYTHONPATH", "HOME")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Proc(protocol.ProcessProtocol):
    """A subprocess whose output can be waited on; killed after TIMEOUT whatever happens."""

    def __init__(self, lifetime: float = TIMEOUT) -> None:
        #: Seconds the process may live (it is killed then, whatever happens).
        self.lifetime = lifetime
        self.output = ""
        self.ended: defer.Deferred[int] = defer.Deferred()
        self.running = False
        self._waiters: list[tuple[re.Pattern[str], defer.Deferred[re.Match[str]]]] = []
        self._deadline: Any = None

    def connectionMade(self) -> None:
        self.running = True
        self.transport.closeStdin()
        self._deadline = _reactor.callLater(self.lifetime, self.kill)

    def _received(self, data: bytes) -> None:
        self.output += data.decode("utf-8", "replace")
        self._check()

    outReceived = errReceived = _received

    def _check(self) -> None:
        for item in list(self._waiters):
            m = item[0].search(self.output)
            if m:
                self._waiters.remove(item)
                item[1].callback(m)

    def wait_for(self, pattern: str) -> defer.Deferred[re.Match[str]]:
        """Fires with the first match of ``pattern`` in the output (within TIMEOUT)."""
        d: defer.Deferred[re.Match[str]] = defer.Deferred()
        self._waiters.append((re.compile(pattern), d))
        self._check()

        def failed(f: Any) -> Any:
            raise AssertionError(f"no {pattern!r} in the output:\n{self.output}")

        return d.addTimeout(TIMEOUT, _reactor).addErrback(failed)

    def kill(self, sig: str = "KILL") -> None:
        if self.running:
            try:
                self.transport.signalProcess(sig)
            except error.ProcessExitedAlready:
                pass

    def processEnded(self, reason: Any) -> None:
        self.running = False
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        for _, d in self._waiters:
            d.errback(RuntimeError("process ended"))
        self._waiters = []
        code = reason.value.exitCode
        self.ended.callback(code if code is not None else -(reason.value.signal or 1))


class Spawner:
    """Starts subprocesses in ``cwd`` and kills them all at :meth:`close` (a fixture's
    teardown), waiting for each to end."""

    def __init__(self, cwd: str, lifetime: float = TIMEOUT) -> None:
        self.cwd = cwd
        self.lifetime = lifetime
        self.procs: list[Proc] = []

    def __call__(self, argv: list[str], **extra_env: str) -> Proc:
        proc = Proc(self.lifetime)
        _reactor.spawnProcess(proc, argv[0], argv, env=env(**extra_env), path=self.cwd)
        self.procs.append(proc)
        return proc

    def close(self) -> defer.Deferred[Any]:
        for proc in self.procs:
            proc.kill()
        return defer.gatherResults([proc.ended for proc in self.procs])
