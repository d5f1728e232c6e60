"""The web client end to end: two headless Chromium sessions on a real web listener.

The realm and its web listener run in this process (127.0.0.1, port 0); node runs
``tests/e2e/web_e2e.mjs``, which drives Debian's ``chromium`` with Playwright's
``playwright-core`` (``executablePath`` set: no browser is downloaded).  Alice and bob
log in through the page, exchange a DM (whose text is markup: it must show as text) and
group messages, bob's connection is cut and resumes without loss or duplicates, a
reload pages the conversation back from history, and a file alice sends is downloaded
by bob byte for byte (when the realm has files).  Screenshots go to
``tmp/artifacts/web-e2e/`` (not committed).

``playwright-core`` is installed with npm into ``.cache/e2e-node`` (or
``$CHATPROTO_E2E_NODE``) when missing; ``.ci/run`` installs it and chromium up front.
Without node, npm or chromium the test is skipped, except under CI=true.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol
from twisted.internet import reactor as _reactor
from twisted.protocols.policies import WrappingFactory

from chatproto.web import WebSite
from tests.conftest import fast_config, make_realm

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "e2e" / "web_e2e.mjs"
RESTART_SCRIPT = ROOT / "tests" / "e2e" / "web_restart.mjs"
ARTIFACTS = ROOT / "tmp" / "artifacts" / "web-e2e"
PLAYWRIGHT_VERSION = "1.65.1"
CHROMIUM = os.environ.get("CHATPROTO_CHROMIUM", "/usr/bin/chromium")
PASSWORD = "correct horse battery"
#: Bound for the whole browser run (it takes ~15 s on two busy cores).
DEADLINE = 120.0


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required under CI (.ci/run installs it)")
    pytest.skip(f"{what} not available")


def playwright_core() -> Path:
    """The playwright-core package directory, installed with npm if missing."""
    prefix = Path(os.environ.get("CHATPROTO_E2E_NODE", ROOT / ".cache" / "e2e-node"))
    package = prefix / "node_modules" / "playwright-core"
    if (package / "package.json").exists():
        return package
    npm = shutil.which("npm")
    if npm is None:
        _missing("npm")
    prefix.mkdir(parents=True, exist_ok=True)
    # one install at a time: pytest -n's workers each come here on a fresh checkout,
    # and two npm installs into one prefix break each other (MODULE_NOT_FOUND)
    with open(prefix / ".install-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (package / "package.json").exists():  # another worker installed it
            return package
        proc = subprocess.run(
            [
                npm,
                "install",
                "--prefix",
                str(prefix),
                "--no-audit",
                "--no-fund",
                "--silent",
                f"playwright-core@{PLAYWRIGHT_VERSION}",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
    if proc.returncode != 0:
        _missing(f"playwright-core (npm install failed: {proc.stderr.strip()[-500:]})")
    return package


class Driver(protocol.ProcessProtocol):
    """The node process: its output, its exit code, and its "DROP <user>" requests."""

    def __init__(self, on_drop: Any, on_line: Any = None) -> None:
        self.output = ""
        self._line = ""
        self.ended: defer.Deferred[int] = defer.Deferred()
        self._on_drop = on_drop
        self._on_line = on_line
        self._deadline: Any = None

    def connectionMade(self) -> None:
        self.transport.closeStdin()
        self._deadline = _reactor.callLater(DEADLINE, self._kill)

    def outReceived(self, data: bytes) -> None:
        text = data.decode("utf-8", "replace")
        self.output += text
        self._line += text
        *lines, self._line = self._line.split("\n")
        for line in lines:
            if line.startswith("DROP "):
                self._on_drop(line[5:].strip())
            elif self._on_line is not None:
                self._on_line(line.strip())

    def errReceived(self, data: bytes) -> None:
        self.output += data.decode("utf-8", "replace")

    def _kill(self) -> None:
        self.output += f"\n[killed after {DEADLINE} s]"
        try:
            self.transport.signalProcess("KILL")
        except Exception:
            pass

    def processEnded(self, reason: Any) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self.ended.callback(reason.value.exitCode)


@pytest.fixture
def tools() -> tuple[str, Path]:
    node = shutil.which("node")
    if node is None:
        _missing("node")
    if not os.access(CHROMIUM, os.X_OK):
        _missing(CHROMIUM)
    return node, playwright_core()  # type: ignore[return-value]


@defer.inlineCallbacks
def run_script(
    site: Any,
    port: Any,
    tools: tuple[str, Path],
    script: Path,
    tmp_path: Path,
    drop: Any = None,
    **env_extra: str,
) -> Any:
    """Run the Chromium script ``script`` (node + playwright-core) against the web
    listener ``port`` of ``site``; fires with its exit code once it ended, the
    connections closed and the port stopped (its output is printed).  ``drop(user)``:
    what the script's "drop" requests do (a network failure from the server side)."""
    node, package = tools
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "BASE_URL": f"http://127.0.0.1:{port.getHost().port}",
        "ARTIFACTS": str(ARTIFACTS),
        "PLAYWRIGHT": str(package),
        "CHROMIUM": CHROMIUM,
        "PASSWORD": PASSWORD,
        **env_extra,
    }
    driver = Driver(drop if drop is not None else (lambda user: None))
    _reactor.spawnProcess(driver, node, [node, str(script)], env=env, path=str(ROOT))
    try:
        code = yield driver.ended
    finally:
        for proto in list(site.ws.sessions.connections):
            proto.transport.abortConnection()
        yield port.stopListening()
    print(driver.output)
    return code, driver.output


@defer.inlineCallbacks
def run_on_realm(
    realm: Any, tools: tuple[str, Path], script: Path, tmp_path: Path, finished: str
) -> Any:
    """Serve ``realm``'s web site on a port of its own and run the Chromium ``script``
    against it (:func:`run_script`); fails unless it exits 0 having printed ``finished``."""
    site = WebSite(realm)
    port = _reactor.listenTCP(0, site, interface="127.0.0.1")
    code, output = yield run_script(site, port, tools, script, tmp_path)
    assert code == 0, output
    assert finished in output


@pytest_twisted.inlineCallbacks
def test_two_browsers_chat_resume_and_files(realm: Any, tools: Any, tmp_path: Path) -> Any:
    site = WebSite(realm)
    port = _reactor.listenTCP(0, site, interface="127.0.0.1")
    for name in ("alice", "bob", "carol"):
        yield realm.create_user(name, PASSWORD)
    for i in range(1, 61):  # for history paging (the page asks 50 at a time)
        yield realm.post("carol", "bob", f"note {i}")

    def drop(user: str) -> None:  # a network failure, from the server side
        for proto in list(site.ws.sessions.connections):
            if proto.session is not None and proto.session.user_id == user:
                proto.transport.abortConnection()

    extra = {}
    # the file part runs once the web site serves /files (on top of realm.files)
    if getattr(realm, "files", None) is not None and b"files" in site.resource.children:
        data = os.urandom(3 * 1024 * 1024 + 12345)
        (tmp_path / "holiday photo.bin").write_bytes(data)
        extra["UPLOAD"] = str(tmp_path / "holiday photo.bin")
    code, output = yield run_script(site, port, tools, SCRIPT, tmp_path, drop, **extra)
    assert code == 0, output
    assert "e2e finished" in output
    assert (ARTIFACTS / "04-bob-resumed.png").exists()


@pytest_twisted.inlineCallbacks
def test_a_restarted_realm_keeps_the_browser_logged_in(tools: Any, tmp_path: Path) -> Any:
    """Issue 18: browser logins are kept in the store.  Two Chromium profiles of alice
    are logged in; the realm is stopped and a new one started on the same store and
    port; both reconnect by their cookie, a reload is still logged in, and "Log out
    everywhere" in one logs the other out."""
    node, package = tools
    config = fast_config(tmp_path)
    state: dict[str, Any] = {"realm": make_realm(config)}
    yield state["realm"].startService()
    for name in ("alice", "bob"):
        yield state["realm"].create_user(name, PASSWORD)
    # connections tracked: a restart closes them all (else the browser's keep-alive
    # HTTP connections would go on talking to the stopped realm's site)
    state["port"] = _reactor.listenTCP(
        0, WrappingFactory(WebSite(state["realm"])), interface="127.0.0.1"
    )
    number = state["port"].getHost().port
    restarted: defer.Deferred[None] = defer.Deferred()

    @defer.inlineCallbacks
    def restart() -> Any:
        yield state["port"].stopListening()
        yield state["realm"].stopService()  # sessions are told shutting_down
        for proto in list(state["port"].factory.protocols):
            proto.transport.abortConnection()
        state["realm"] = make_realm(config)
        yield state["realm"].startService()
        state["port"] = _reactor.listenTCP(
            number, WrappingFactory(WebSite(state["realm"])), interface="127.0.0.1"
        )
        restarted.callback(None)

    def on_line(line: str) -> None:
        if line == "RESTART":
            restart().addErrback(restarted.errback)

    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "BASE_URL": f"http://127.0.0.1:{number}",
        "ARTIFACTS": str(ARTIFACTS),
        "PLAYWRIGHT": str(package),
        "CHROMIUM": CHROMIUM,
        "PASSWORD": PASSWORD,
    }
    driver = Driver(lambda user: None, on_line)
    _reactor.spawnProcess(driver, node, [node, str(RESTART_SCRIPT)], env=env, path=str(ROOT))
    try:
        code = yield driver.ended
    finally:
        for proto in list(state["port"].factory.protocols):
            proto.transport.abortConnection()
        yield state["port"].stopListening()
        if state["realm"].running:
            yield state["realm"].stopService()
    print(driver.output)
    assert restarted.called, driver.output
    assert code == 0, driver.output
    assert "e2e restart finished" in driver.output
    assert (ARTIFACTS / "restart-02-phone-logged-out.png").exists()
