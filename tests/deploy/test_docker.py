"""docker/ is kept correct by reading; what it runs is tested here, outside docker."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from boldstream.config import load_settings
from boldstream.receiver.scp import StorageSCP
from boldstream.receiver.spool import Spool
from boldstream.sinks.dashboard.app import Dashboard

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()


def _healthcheck_argv() -> list[str]:
    match = re.search(r"HEALTHCHECK[^\n]*\\\n\s*CMD (\[.*\])", DOCKERFILE)
    assert match, "HEALTHCHECK CMD not found"
    argv: list[str] = json.loads(match.group(1))
    return argv


def test_every_copied_folder_exists_and_is_a_package_dir() -> None:
    copied = re.findall(r"^COPY (\S+) ", DOCKERFILE, flags=re.M)
    for item in copied:
        assert (ROOT / item).exists(), f"Dockerfile copies {item}, which does not exist"
    pyproject = (ROOT / "pyproject.toml").read_text()
    for folder in ("receiver", "stream", "analysis", "sinks", "config"):
        assert folder in copied and f'"{folder}"' in pyproject


def test_healthcheck_command_succeeds_against_a_live_service_and_fails_without(
    tmp_path: Path,
) -> None:
    """The image's HEALTHCHECK, run as the image runs it: settings from the
    environment, the listener bound to all interfaces, the dashboard on."""
    argv = _healthcheck_argv()
    assert argv == ["boldstream", "health"]
    command = [sys.executable, "-m", "boldstream", *argv[1:]]
    settings = load_settings(
        overrides=[{"receiver": {"port": 0, "bind": "0.0.0.0", "spool_dir": str(tmp_path)}}],
        environ={},
    )
    scp = StorageSCP(settings.receiver, Spool(tmp_path), lambda item: None)
    dashboard = Dashboard("tcp://127.0.0.1:9", port=0)
    scp.start()
    dashboard.start()
    env = {
        **os.environ,
        "BOLDSTREAM_RECEIVER__BIND": "0.0.0.0",
        "BOLDSTREAM_RECEIVER__PORT": str(scp.port),
        "BOLDSTREAM_DASHBOARD__PORT": str(dashboard.port),
    }
    try:
        ok = subprocess.run(command, env=env, timeout=60, capture_output=True, text=True)
        assert ok.returncode == 0, ok.stderr
    finally:
        scp.stop()
        dashboard.stop()
    down = subprocess.run(command, env=env, timeout=60, capture_output=True, text=True)
    assert down.returncode == 1
    assert "DICOM listener" in down.stderr and "dashboard" in down.stderr
