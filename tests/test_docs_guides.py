"""The guides in docs/ must match the code.

- the configuration reference of docs/operator-guide.md documents exactly the keys of
  :func:`chatproto.config.known_keys`, each with the default of ``config.Config()``;
- the log messages listed in the operator guide are the ones the code emits;
- every ```python block of the guides compiles, and the ones that need no network run
  (the loopback example of the testing guide runs under pytest in a subprocess);
- the API reference builds with pydoctor without a single warning.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from chatproto import config
from chatproto.config import tomllib

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
GUIDES = ("operator-guide.md", "embedding-guide.md", "testing-guide.md", "README.md")


def _text(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def _python_blocks(name: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", _text(name), re.S | re.M)


# the configuration reference --------------------------------------------------------


def _config_rows() -> dict[str, tuple[str, str]]:
    """key -> (type, default) from the reference table of the operator guide."""
    doc = _text("operator-guide.md")
    m = re.search(r"^## Configuration reference\s*$(.*?)(?=^## |\Z)", doc, re.M | re.S)
    assert m, "operator-guide.md has no '## Configuration reference' section"
    rows: dict[str, tuple[str, str]] = {}
    for key, type_, default in re.findall(
        r"^\| `([a-z_]+\.[a-z0-9_]+)` \| ([^|]+?) \| `([^`]*)` \|", m.group(1), re.M
    ):
        assert key not in rows, f"{key} is documented twice"
        rows[key] = (type_, default)
    return rows


def _default(key: str) -> Any:
    section, name = key.split(".", 1)
    cfg = config.Config()
    if section == "realm":
        return getattr(cfg, config._REALM_KEYS[name])
    return getattr(getattr(cfg, section), name)


_TYPES = {
    "string": str,
    "integer": int,
    "float": float,
    "boolean": bool,
    "list of strings": list,
    "list of integers": list,
    "array of tables": list,
}


def test_config_reference_documents_exactly_the_known_keys() -> None:
    documented = set(_config_rows())
    known = config.known_keys()
    assert not documented - known, f"documented but unknown: {sorted(documented - known)}"
    assert not known - documented, f"known but undocumented: {sorted(known - documented)}"


@pytest.mark.parametrize("key", sorted(config.known_keys()))
def test_config_reference_default_and_type(key: str) -> None:
    rows = _config_rows()
    if key not in rows:
        pytest.fail(f"{key} is not documented in docs/operator-guide.md")
    type_, default_text = rows[key]
    documented = tomllib.loads(f"v = {default_text}")["v"]
    actual = _default(key)
    assert documented == actual and type(documented) is type(actual), (
        f"{key}: documented default {default_text}, the code's is {actual!r}"
    )
    assert _TYPES[type_] is type(actual), f"{key}: documented type {type_!r}"


def test_config_reference_defaults_load_as_a_config_file() -> None:
    """The documented defaults, written as a TOML file, give the default config."""
    lines: dict[str, list[str]] = {}
    for key, (_type, default) in _config_rows().items():
        section, name = key.split(".", 1)
        lines.setdefault(section, []).append(f"{name} = {default}")
    toml = "\n".join(f"[{s}]\n" + "\n".join(body) for s, body in lines.items())
    loaded = config.from_dict(tomllib.loads(toml))
    loaded.check()
    defaults = config.Config()
    defaults.check()
    assert loaded == defaults


# the log messages -------------------------------------------------------------------


def _emitted_messages() -> set[str]:
    """The format strings of log.info/failure/error calls in the realm's server code."""
    messages = set()
    for path in (ROOT / "chatproto").rglob("*.py"):
        if path.name in ("client.py", "cli.py"):  # the client side logs to the embedder
            continue
        source = path.read_text(encoding="utf-8")
        for m in re.finditer(r"log\.(?:info|failure|error|warn)\(\s*\"([^\"]+)\"", source):
            messages.add(m.group(1))
    return messages


def _as_documented(message: str) -> str:
    """``"login {user} device {device}"`` -> ``"login <user> device <device>"``."""
    return re.sub(r"\{(\w+)(?:!r)?\}", r"<\1>", message)


def test_every_log_message_is_documented() -> None:
    doc = _text("operator-guide.md")
    logs = re.search(r"^## Logs\s*$(.*?)(?=^## |\Z)", doc, re.M | re.S)
    assert logs
    documented = " ".join(re.findall(r"`([^`]+)`", logs.group(1)))
    missing = []
    for message in sorted(_emitted_messages()):
        # compare the constant words: placeholders may be named differently
        words = [w for w in re.split(r"<[^>]*>", _as_documented(message)) if w.strip()]
        if not all(w.strip() in documented for w in words):
            missing.append(message)
    assert not missing, f"log messages missing from the operator guide: {missing}"


# code examples ----------------------------------------------------------------------


@pytest.mark.parametrize("name", GUIDES)
def test_python_blocks_compile(name: str) -> None:
    for i, block in enumerate(_python_blocks(name)):
        compile(block, f"docs/{name}[{i}]", "exec")


def _run(block: str, **replace: str) -> dict[str, Any]:
    for old, new in replace.items():
        block = block.replace(old, new)
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    exec(compile(block, "<docs example>", "exec"), namespace)
    return namespace


def test_testing_guide_string_transport_example_runs() -> None:
    _run(_python_blocks("testing-guide.md")[0])


def test_testing_guide_synchronous_example_passes() -> None:
    import unittest

    ns = _run(_python_blocks("testing-guide.md")[1])
    suite = unittest.defaultTestLoader.loadTestsFromTestCase(ns["HelpdeskTests"])
    result = unittest.TestResult()
    suite.run(result)
    assert result.testsRun == 2
    assert result.wasSuccessful(), result.failures + result.errors


def test_testing_guide_loopback_example_passes(tmp_path: Path) -> None:
    block = _python_blocks("testing-guide.md")[2]
    test_file = tmp_path / "test_loopback_example.py"
    test_file.write_text(block, encoding="utf-8")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:xdist",
            "-p",
            "no:cacheprovider",
            str(test_file),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_embedding_guide_client_service_example_builds() -> None:
    ns = _run(_python_blocks("embedding-guide.md")[1])
    assert ns["chat"].parent is ns["app"]
    assert not ns["app"].running


def test_embedding_guide_hosting_examples_build(tmp_path: Path) -> None:
    from chatproto.ops.service import Operations
    from chatproto.realm import RealmService
    from chatproto.tap import ListenerService

    blocks = _python_blocks("embedding-guide.md")
    for block in blocks[2:4]:
        ns = _run(block, **{"/var/lib/myapp/chat": str(tmp_path / "chat")})
        top = ns.get("chat_services", ns.get("top"))
        children = list(top)
        assert isinstance(children[0], RealmService)
        # tap.build adds the process's Operations (readiness, metrics); by hand, none
        built = [Operations] if "chat_services" in ns else []
        assert [type(c) for c in children[1:]] == [*built, ListenerService]
        assert not top.running


def test_embedding_guide_extension_example_answers() -> None:
    from chatproto.testing import make_test_realm

    ns = _run(_python_blocks("embedding-guide.md")[4])
    realm = make_test_realm()
    try:
        for name in ("helpdesk", "alice"):
            realm.create_user(name, "password1")
        seen: list[Any] = []
        realm.observers.append(seen.append)
        ns["setup"](realm)
        realm.post("alice", "helpdesk", "help!")
        realm.post("alice", "helpdesk", "still there?")
        assert [(e.sender, e.recipient) for e in seen] == [
            ("alice@localhost", "helpdesk@localhost"),
            ("helpdesk@localhost", "alice@localhost"),
        ] * 2
    finally:
        realm.stopService()


# the API reference ------------------------------------------------------------------


def test_docs_index_names_the_api_command() -> None:
    index = _text("README.md")
    for name in GUIDES[:3]:
        assert f"({name})" in index, name
    assert API_COMMAND in index


#: The one command documented in docs/README.md (output under build/, not committed).
API_COMMAND = (
    "pydoctor --project-name chatproto --docformat=restructuredtext "
    "--html-output build/api chatproto"
)


def test_api_reference_builds_without_warnings(tmp_path: Path) -> None:
    try:
        import pydoctor  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("pydoctor is not installed (pip install -e '.[dev]')")
    args = API_COMMAND.split()[1:]
    args[args.index("build/api")] = str(tmp_path / "api")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pydoctor.driver import main; sys.exit(main())",
            "-q",
            "-W",
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0 and not output, output
    assert (tmp_path / "api" / "chatproto.realm.service.RealmService.html").exists()
