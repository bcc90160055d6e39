"""``boldstream simulate`` as a real process: help, writing a folder, sending."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from simulator.sim_support import LiveReceiver

pytestmark = pytest.mark.timeout(90)

SMALL = ["--volumes", "2", "--matrix", "16x16x8", "--voxel", "8", "--pace", "fast"]


def simulate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "boldstream", "simulate", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveReceiver]:
    receiver = LiveReceiver(tmp_path / "spool")
    try:
        yield receiver
    finally:
        receiver.stop()


def test_help_names_the_options() -> None:
    out = simulate("--help")
    assert out.returncode == 0, out.stderr
    for option in ("--write-dir", "--encoding", "--pace", "--network-strength", "--motion"):
        assert option in out.stdout
    assert "mosaic" in out.stdout and "enhanced-series" in out.stdout


def test_write_dir_writes_instances_and_truth(tmp_path: Path) -> None:
    folder = tmp_path / "dicom"
    out = simulate(*SMALL, "--encoding", "slice", "--write-dir", str(folder))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "wrote 16 instances (2 volumes)" in out.stdout
    files = sorted(folder.glob("*.dcm"))
    assert len(files) == 16
    first = pydicom.dcmread(files[0])
    assert (first.Rows, first.Columns) == (16, 16)
    truth = json.loads((folder / "truth.json").read_text())
    assert truth["series_uid"] == first.SeriesInstanceUID
    assert truth["shape"] == [16, 16, 8] and truth["n_volumes"] == 2


def test_sends_to_a_receiver(live: LiveReceiver, tmp_path: Path) -> None:
    truth_path = tmp_path / "truth.json"
    out = simulate(*SMALL, "--port", str(live.port), "--truth", str(truth_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "sent 2 instances (2 volumes)" in out.stdout
    volumes = live.wait_volumes(2)
    truth = json.loads(truth_path.read_text())
    assert {v.series.series_uid for v in volumes.values()} == {truth["series_uid"]}
    assert all(v.shape == (16, 16, 8) for v in volumes.values())


def test_refused_association_exits_with_a_readable_line(tmp_path: Path) -> None:
    live = LiveReceiver(tmp_path / "spool", receiver={"allowed_calling_aets": ["CONSOLE"]})
    try:
        out = simulate(*SMALL, "--port", str(live.port))
    finally:
        live.stop()
    assert out.returncode != 0
    assert "cannot associate" in out.stderr
    assert "Traceback" not in out.stderr, out.stderr
