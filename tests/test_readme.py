"""The README and the docs, run as a newcomer would run them.

- :func:`test_readme_shell_blocks_run_in_order`: every ```sh block of README.md, in
  order, in one shell (as if every terminal were the same one: a command must carry
  its own password), in a copy of the repository with a virtual environment made by
  the README's own first line.  Commands that stay open (``twistd -n``, ``listen``)
  run in the background and are waited for; every other command must exit 0; at the
  end the background ones must still be running, and what they printed is checked.
- :func:`test_documented_twistd_commands_start`: every ``twistd`` command that the
  README, docs/, examples/README.md and the comments of the example configs show
  starts a realm (or the example application) that logs it is up, and stops cleanly
  on SIGTERM.

Both use the README's fixed ports, so each shell runs in a private network namespace
(``unshare --net --map-root-user``, loopback only): tests running in parallel, or
other checkouts on the same machine, never meet on a port.  Only ``pip install``
lines run outside it (they need the package index), before the rest.

What the runner does not run, and why, is :data:`NOT_RUN`; ``FILE_ID``, the README's
placeholder for the id that ``listen`` prints, is taken from that output, as a
reader would.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer

from tests.processes import Spawner

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

#: README commands the runner skips, each with the reason.
NOT_RUN = {
    "pytest -n auto": "the test suite itself",
    "ruff check chatproto && mypy chatproto": "CI's own first steps (.ci/run)",
    "python bench/run.py --quick": "a benchmark (bench/), minutes of CPU",
    "chatproto tui": "full screen: tests/test_tui_tmux.py drives it in tmux",
}
#: Commands that stay open, and the output that says they are ready.
BACKGROUND = (
    (re.compile(r"^twistd -n\b"), r"realm \S+ started"),
    (re.compile(r"\bchatproto\b.* listen$"), r"listening as "),
)


def _netns_prefix() -> list[str]:
    """``unshare`` into a new network namespace with only loopback up, or skip."""
    probe = ["unshare", "--net", "--map-root-user", "ip", "link", "set", "lo", "up"]
    try:
        ok = subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        if os.environ.get("CI"):
            pytest.fail("unshare --net --map-root-user does not work here")
        pytest.skip("needs unshare --net --map-root-user (a private loopback)")
    return ["unshare", "--net", "--map-root-user"]


def _strip_comment(line: str) -> str:
    """``line`` without a trailing shell comment (a ``#`` after blank, outside quotes)."""
    quote = ""
    for i, c in enumerate(line):
        if quote:
            if c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
    return line.rstrip()


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced code block of a Markdown text, in order."""
    blocks, lang, body = [], None, []
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            if lang is None:
                lang, body = line[3:].strip(), []
            else:
                blocks.append((lang, "".join(body)))
                lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def shell_commands(text: str) -> list[str]:
    """The commands of the ```sh blocks of ``text``, in order, continuation lines
    joined and comments removed."""
    out = []
    for lang, block in code_blocks(text):
        if lang != "sh":
            continue
        block = re.sub(r"\s*\\\n\s*", " ", block)
        for line in block.splitlines():
            command = _strip_comment(line.strip())
            if command:
                out.append(command)
    return out


def _skipped(command: str) -> bool:
    return any(command == c or command.startswith(c + " ") for c in NOT_RUN)


def _copy_checkout(dest: Path) -> None:
    """The files of this checkout (tracked and untracked, not ignored): a fresh clone
    with the working tree's changes."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
        names = [n for n in listed.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    for name in names:
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def _clean_env(home: Path) -> dict[str, str]:
    """A newcomer's environment: no virtualenv active, a home of their own."""
    venv = os.environ.get("VIRTUAL_ENV")
    path = [
        p
        for p in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)
        if not venv or not p.startswith(venv)
    ]
    return {
        "PATH": os.pathsep.join(path),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
    }


_PRELUDE = r"""
fail() { echo "README-RUN-FAILED: $*" >&2; exit 1; }
wait_for() {  # FILE REGEX COMMAND: wait (30 s at most) for REGEX in FILE
    for _ in $(seq 300); do
        grep -Eq "$2" "$1" 2>/dev/null && return 0
        kill -0 "$3" 2>/dev/null || { cat "$1" >&2; fail "ended early: $4"; }
        sleep 0.1
    done
    cat "$1" >&2; fail "not ready in 30 s: $4"
}
pids=()
stop_all() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait; }
trap stop_all EXIT
ip link set lo up
"""


def build_script(commands: list[str]) -> tuple[str, str]:
    """(setup, run): the ``pip install`` lines, to run with the package index, and
    a script of the rest, for the private network namespace."""
    setup, run = ["set -e"], [_PRELUDE]
    background = 0
    for command in commands:
        if _skipped(command):
            continue
        if "pip install" in command:
            setup.append(f"printf '$ %s\\n' {shlex.quote(command)}")
            setup.append(command)
            if ". .venv/bin/activate" in command:  # what the line leaves behind
                run.append(". .venv/bin/activate")
            continue
        shown = shlex.quote(command)
        if "FILE_ID" in command:  # the id listen printed: the last word of a file line
            run.append(
                "FILE_ID=$(grep -ho 'chatproto download [0-9a-f]*' bg-*.log | tail -n 1 "
                "| cut -d' ' -f3)"
            )
            command = command.replace("FILE_ID", '"$FILE_ID"')
        for pattern, ready in BACKGROUND:
            if pattern.search(command):
                background += 1
                log = f"bg-{background}.log"
                run.append(f"printf '$ %s &\\n' {shown}")
                run.append(f"{command} > {log} 2>&1 &")
                run.append("pids+=($!)")
                run.append(f"wait_for {log} {shlex.quote(ready)} $! {shown}")
                break
        else:
            run.append(f"printf '$ %s\\n' {shown}")
            run.append(f'{command} || fail "exit status $? from: "{shown}')
    run.append('for p in "${pids[@]}"; do kill -0 "$p" || fail "a background command died"; done')
    run.append("echo README-RUN-OK")
    return "\n".join(setup) + "\n", "\n".join(run) + "\n"


def test_shell_commands_parsing() -> None:
    text = (
        "x\n```sh\na --b \\\n   c  # note\nd 'e # f'   # g\n```\n"
        "```python\nnot = 'shell'\n```\n```sh\n\n# only a comment\nh\n```\n"
    )
    assert shell_commands(text) == ["a --b c", "d 'e # f'", "h"]


def test_every_not_run_command_is_in_the_readme() -> None:
    """The runner skips only what the README shows (nothing stale to hide behind)."""
    commands = shell_commands(README.read_text(encoding="utf-8"))
    for command in NOT_RUN:
        assert any(c == command or c.startswith(command + " ") for c in commands), command


@pytest.mark.slow
def test_readme_shell_blocks_run_in_order(tmp_path: Path) -> None:
    netns = _netns_prefix()
    repo, home = tmp_path / "chatproto", tmp_path / "home"
    repo.mkdir()
    home.mkdir()
    _copy_checkout(repo)
    commands = shell_commands(README.read_text(encoding="utf-8"))
    setup, run = build_script(commands)
    env = _clean_env(home)
    done = subprocess.run(
        ["bash", "-c", setup], cwd=repo, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"the README's install failed:\n{done.stdout}\n{done.stderr}"
    (repo / "readme-run.sh").write_text(run, encoding="utf-8")
    done = subprocess.run(
        [*netns, "bash", "readme-run.sh"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    transcript = done.stdout + done.stderr
    assert done.returncode == 0 and "README-RUN-OK" in done.stdout, transcript

    logs = {p.name: p.read_text(encoding="utf-8") for p in sorted(repo.glob("bg-*.log"))}
    listens = [text for text in logs.values() if "listening as bob@" in text]
    assert len(listens) == 2, logs  # bob on the first realm, then on b.example
    first, federated = listens
    assert "alice@localhost: hello bob" in first, first
    assert "#dev@localhost alice@localhost: welcome, bob" in first, first
    assert re.search(r"\[file README\.md \([\d.]+ KiB\), chatproto download [0-9a-f]+\]", first)
    assert "alice@a.example: hi from a" in federated, federated
    downloaded = home / "Downloads" / "README.md"
    assert downloaded.read_bytes() == (repo / "README.md").read_bytes()
    # chatrealmctl took carol's passwords from the environment, never from a prompt
    assert "GetPassWarning" not in transcript and "Warning: Password input" not in transcript


# every twistd command the docs show -------------------------------------------------

#: Where the docs' twistd commands are, and the files that hold them.
DOC_FILES = (
    "README.md",
    "docs/operator-guide.md",
    "docs/embedding-guide.md",
    "docs/testing-guide.md",
    "docs/irc.md",
    "docs/README.md",
    "examples/README.md",
    "config/realm.example.toml",
    "config/federation-a.toml",
    "config/federation-b.toml",
    "examples/hooks.toml",
)
#: Absolute paths in the docs and where the test puts them (under its temp dir).
MOVED = ("/run/chatrealm", "/var/log/chatrealm", "/etc/chatrealm")


def documented_twistd_commands() -> Iterator[tuple[str, str]]:
    """(file, command) for each distinct twistd command line in :data:`DOC_FILES`:
    lines of code blocks and of config comments, and inline code that runs one
    (``twistd -n ...``; a bare ``twistd chatrealm`` names the plugin)."""
    seen = set()
    for name in DOC_FILES:
        text = re.sub(r"\\\n[\s#]*", " ", (ROOT / name).read_text(encoding="utf-8"))
        found = []
        if name.endswith(".toml"):
            found += re.findall(r"^#\s*(?:then:|Use:)?\s*((?:\w+=\S+ )*twistd .*)$", text, re.M)
        else:
            for lang, block in code_blocks(text):
                if lang not in ("", "sh"):
                    continue
                found += re.findall(r"^((?:\w+=\S+ )*twistd .*)$", block, re.M)
            found += [
                m
                for m in re.findall(r"`((?:\w+=\S+ )*twistd [^`]*)`", text)
                if re.search(r"twistd -n|--pidfile", m)
            ]
        for command in found:
            command = " ".join(_strip_comment(command).split())
            if command not in seen:
                seen.add(command)
                yield name, command


def _prepare(cwd: Path, command: str) -> str:
    """Lay out in ``cwd`` what ``command`` expects to find, as the docs describe;
    returns the command with :data:`MOVED` paths under ``cwd``."""
    for name in ("config", "examples"):
        shutil.copytree(ROOT / name, cwd / name)
    for path in MOVED:
        (cwd / path.lstrip("/")).mkdir(parents=True)
        command = command.replace(path, str(cwd / path.lstrip("/")))
    shutil.copy(ROOT / "config" / "realm.example.toml", cwd / "etc/chatrealm/realm.toml")
    shutil.copy(ROOT / "config" / "realm.example.toml", cwd / "realm.toml")  # README's cp
    ctl = [os.path.join(os.path.dirname(sys.executable), "chatrealmctl")]
    if "federation-" in command:
        for realm in "ab":
            config = f"config/federation-{realm}.toml"
            subprocess.run(
                [*ctl, "--config", config, "gen-certs", "--dir", "certs"],
                cwd=cwd,
                check=True,
                capture_output=True,
            )
    if "ssl:" in command:
        subprocess.run([*ctl, "gen-certs"], cwd=cwd, check=True, capture_output=True)
        tls = cwd / "chatrealm-data" / "tls"
        shutil.copy(tls / "localhost.key", cwd / "key.pem")  # the guide's generic names
        shutil.copy(tls / "localhost.pem", cwd / "cert.pem")
    return command


def _commands() -> list[tuple[str, str]]:
    return list(documented_twistd_commands())


def test_the_docs_show_the_twistd_commands_expected() -> None:
    commands = [c for _, c in _commands()]
    assert "twistd -n chatrealm" in commands
    assert "twistd -n --pidfile= -y examples/embedded.tac" in commands
    assert any(c.startswith("twistd --pidfile /run/chatrealm/") for c in commands)
    assert sum("federation-" in c for c in commands) == 2
    assert len(commands) >= 12, commands


@pytest.mark.parametrize(("doc", "command"), _commands())
@pytest_twisted.inlineCallbacks
def test_documented_twistd_commands_start(tmp_path: Path, doc: str, command: str) -> Any:
    netns = _netns_prefix()
    command = _prepare(tmp_path, command)
    bindir = os.path.dirname(sys.executable)  # this environment's twistd, chatrealmctl
    spawner = Spawner(str(tmp_path))
    daemon = not re.search(r"\btwistd (-\w*n|--nodaemon)\b", command)
    # exec: the signals of the test reach twistd itself (env: a VAR=value prefix)
    script = f"ip link set lo up && {'' if daemon else 'exec env '}{command}"
    path = f"{bindir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"
    proc = spawner([*netns, "bash", "-c", script], PATH=path)
    pidfile: Path | None = None
    try:
        if daemon:  # twistd forks, writes its pid file and logs to its log file
            code = yield proc.ended
            assert code == 0, proc.output
            m = re.search(r"--pidfile[ =](\S+)", command)
            log = re.search(r"--logfile[ =](\S+)", command)
            assert m and log, command
            pidfile, logfile = Path(m.group(1)), Path(log.group(1))
            yield _poll(pidfile.exists, _read, logfile)
            yield _poll(lambda: "realm localhost started" in _read(logfile), _read, logfile)
            os.kill(int(pidfile.read_text()), 15)
            yield _poll(lambda: "Server Shut Down" in _read(logfile), _read, logfile)
            assert "Traceback" not in _read(logfile), _read(logfile)
        else:
            yield proc.wait_for(r"realm \S+ started")
            proc.kill("TERM")
            code = yield proc.ended
            # twistd ends a SIGTERM shutdown by dying of the signal again (after its
            # clean stop), so its parent sees how it was stopped
            assert code in (0, -15), proc.output
            assert "Server Shut Down" in proc.output, proc.output
            assert "Traceback" not in proc.output, proc.output
    finally:
        if pidfile is not None and pidfile.exists():  # a daemon the test did not stop
            try:
                os.kill(int(pidfile.read_text()), 9)
            except (ValueError, OSError):
                pass
        yield spawner.close()


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""


@defer.inlineCallbacks
def _poll(predicate: Any, show: Any, arg: Any) -> Any:
    from twisted.internet import reactor, task

    for _ in range(300):
        if predicate():
            return
        yield task.deferLater(reactor, 0.1, lambda: None)
    raise AssertionError(f"timed out; log:\n{show(arg)}")
