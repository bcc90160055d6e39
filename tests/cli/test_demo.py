"""README's main command: ``boldstream demo``, a simulated scanner sending a run
to a live boldstream (receiver, pipeline, dashboard) in one process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)


def test_demo_sends_a_phantom_run_and_every_volume_is_analysed(tmp_path: Path) -> None:
    n = 12
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "boldstream",
            "demo",
            "--volumes",
            str(n),
            "--pace",
            "fast",
            "--matrix",
            "40x40x24",
            "--voxel",
            "4.5",
            "--spool",
            str(tmp_path / "spool"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "boldstream listening on 127.0.0.1:" in out
    assert "dashboard on http://127.0.0.1:" in out
    volumes = [line for line in out.splitlines() if line.startswith("vol ")]
    assert sorted(int(line.split()[1]) for line in volumes) == list(range(n)), out
    assert "MISSING" not in out
    assert f"{n} of {n} volumes analysed, 0 missing" in out
    # what the scanner sent is in the spool, durably
    assert len(list((tmp_path / "spool").rglob("*.dcm"))) == n
