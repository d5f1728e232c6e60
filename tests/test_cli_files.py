"""``chatproto send-file`` / ``download`` against a real realm, and the progress bar."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest_twisted

from chatproto import cli, display
from tests.test_cli import _register, run_cli, server  # noqa: F401  (fixture)


@pytest_twisted.inlineCallbacks
def test_send_file_then_download(server: str, tmp_path: Path) -> Any:  # noqa: F811
    yield _register(server, "alice", "bob")
    src = tmp_path / "report.pdf"
    data = os.urandom(200_000)
    src.write_bytes(data)
    out, err, code = yield run_cli(server, "alice", "send-file", "bob", str(src), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["file"] and result["pos"] > 0

    out, err, code = yield run_cli(server, "bob", "history", "alice")
    assert code == 0, err
    assert f"[file report.pdf (195.3 KiB), chatproto download {result['file']}]" in out

    dest = tmp_path / "in"
    dest.mkdir()
    out, err, code = yield run_cli(server, "bob", "download", result["file"], str(dest))
    assert code == 0, err
    assert (dest / "report.pdf").read_bytes() == data
    assert out.startswith(f"{dest / 'report.pdf'}: 195.3 KiB, sha256 ")
    (dest / "report.pdf").write_bytes(b"mine")  # an existing file is not replaced...
    out, err, code = yield run_cli(server, "bob", "download", result["file"], str(dest))
    assert code == 1 and "report.pdf exists: give another PATH, or --force" in err
    assert (dest / "report.pdf").read_bytes() == b"mine"
    out, err, code = yield run_cli(  # ...unless asked to
        server, "bob", "download", result["file"], str(dest), "--force"
    )
    assert code == 0, err
    assert (dest / "report.pdf").read_bytes() == data

    out, err, code = yield run_cli(server, "bob", "download", "nosuchfileidatallhere")
    assert code == 1 and err.startswith("chatproto: no_such_file: ")
    (tmp_path / "big").write_bytes(b"x")
    out, err, code = yield run_cli(server, "alice", "send-file", "nobody", str(tmp_path / "big"))
    assert code == 1 and "no_such_user" in err
    out, err, code = yield run_cli(server, "alice", "send-file", "bob", str(tmp_path / "none"))
    assert code == 1 and "not a file" in err


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar() -> None:
    now = [0.0]
    tty = _Tty()
    bar = cli.ProgressBar("f.bin", tty, clock=lambda: now[0])
    bar(0, 4 * 1024 * 1024)
    now[0] = 1.0
    bar(2 * 1024 * 1024, 4 * 1024 * 1024)
    now[0] = 1.05  # too soon: not redrawn
    bar(3 * 1024 * 1024, 4 * 1024 * 1024)
    now[0] = 2.0
    bar(4 * 1024 * 1024, 4 * 1024 * 1024)
    bar.finish()
    frames = tty.getvalue().split("\r")[1:]
    assert len(frames) == 3
    assert frames[1].startswith("f.bin [###############...............]  50.0%  2.0 MiB/4.0 MiB")
    assert "2.0 MiB/s" in frames[1]
    assert frames[2].startswith("f.bin [" + "#" * 30 + "] 100.0%  4.0 MiB/4.0 MiB")
    assert tty.getvalue().endswith("\n")
    quiet = io.StringIO()  # not a terminal: nothing drawn
    cli.ProgressBar("x", quiet)(1, 2)
    assert quiet.getvalue() == ""


def test_human_size() -> None:
    assert [display.human_size(n) for n in (0, 1023, 1536, 5 * 1024**3)] == [
        "0 B",
        "1023 B",
        "1.5 KiB",
        "5.0 GiB",
    ]
