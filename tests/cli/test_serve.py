"""``boldstream serve`` as a real process, with DCMTK's storescu as the scanner."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from peers import require_tool
from serve_process import ServeProcess

from boldstream.cli import COMMANDS

pytestmark = pytest.mark.timeout(120)


def _storescu(port: int, *files: Path) -> subprocess.CompletedProcess[str]:
    cmd = [
        require_tool("storescu"),
        "-aet",
        "SCANNER",
        "-aec",
        "BOLDSTREAM",
        "127.0.0.1",
        str(port),
    ]
    return subprocess.run([*cmd, *map(str, files)], capture_output=True, text=True, timeout=60)


def test_serve_assembles_mosaics_sent_by_storescu_and_stops_cleanly(
    tmp_path: Path, heudiconv_data: Path
) -> None:
    server = ServeProcess(tmp_path / "spool", extra=["--set", "selector.exclude_image_types=[]"])
    try:
        files = [
            heudiconv_data / "axasc35.dcm",
            *sorted((heudiconv_data / "b0dwiForFmap").glob("*.dcm")),
        ]
        out = _storescu(server.port, *files)
        assert out.returncode == 0, out.stderr
        assert server.wait_for(
            lambda logs: sum(e.get("event") == "volume assembled" for e in logs) >= 4
        )
        shapes = sorted(tuple(e["shape"]) for e in server.events("volume assembled"))
        assert shapes == [(64, 64, 35), (150, 152, 81), (150, 152, 81), (150, 152, 81)]
        assert all(e["assembly_ms"] < 1000 for e in server.events("volume assembled"))
    finally:
        code = server.terminate()
    assert code == 0
    assert server.events("storage SCP stopped")[0]["accepted"] == 4


def test_bad_setting_exits_2_with_one_readable_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "boldstream",
            "serve",
            "--spool",
            str(tmp_path),
            "--set",
            "receiver.prot=1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert (
        out.stderr.strip() == "boldstream serve: invalid settings: receiver.prot: unknown setting"
    )


def test_port_in_use_exits_1(tmp_path: Path) -> None:
    first = ServeProcess(tmp_path / "a")
    try:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "boldstream",
                "serve",
                "--port",
                str(first.port),
                "--spool",
                str(tmp_path / "b"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 1
        assert f"cannot listen on 127.0.0.1:{first.port}" in out.stderr.splitlines()[-1]
    finally:
        first.terminate()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "boldstream", command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0
    assert "usage: boldstream " + command in out.stdout
