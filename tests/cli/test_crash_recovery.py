"""SIGKILL of ``boldstream serve`` mid-series loses nothing that was acknowledged."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from peers import require_tool
from serve_process import ServeProcess

from boldstream.simulator.phantom import make_phantom_run
from boldstream.simulator.send import SendOptions, write_run

pytestmark = pytest.mark.timeout(180)

N_VOLUMES, N_SLICES = 8, 16


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _assembled(server: ServeProcess) -> list[int]:
    return sorted(int(e["volume"]) for e in server.events("volume assembled"))


def test_sigkill_mid_series_then_restart_assembles_every_acknowledged_instance(
    tmp_path: Path,
) -> None:
    run = make_phantom_run(n_volumes=N_VOLUMES, tr_s=1.0, shape=(24, 24, N_SLICES), voxel_mm=8.0)
    files = write_run(run, tmp_path / "dicom", SendOptions(encoding="slice"))
    assert len(files) == N_VOLUMES * N_SLICES
    spool = tmp_path / "spool"
    storescu = [require_tool("storescu"), "-v", "-aet", "SCANNER", "-aec", "BOLDSTREAM"]

    server = ServeProcess(spool)
    # A first batch arrives completely, then the second batch is cut off by SIGKILL.
    half = len(files) // 2
    first = subprocess.run(
        [*storescu, "127.0.0.1", str(server.port), *map(str, files[:half])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert first.returncode == 0, first.stderr
    sender = subprocess.Popen(
        [*storescu, "127.0.0.1", str(server.port), *map(str, files[half:])],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 30
    while len(list(spool.rglob("*.dcm"))) < half + 10 and time.monotonic() < deadline:
        time.sleep(0.002)
    server.proc.kill()  # SIGKILL: no clean-up of any kind
    server.kill()
    # Its ingest process does not outlive it (nor hold the spool for the next one).
    (started,) = server.events("ingest process started")
    deadline = time.monotonic() + 10
    while _running(int(started["pid"])):
        assert time.monotonic() < deadline, "the ingest process outlived the service"
        time.sleep(0.05)
    out, _ = sender.communicate(timeout=60)

    # What the scanner was told: every "Sending file" followed by a success response.
    acknowledged = [Path(p) for p in map(str, files[:half])]
    current: str | None = None
    for line in out.splitlines():
        if m := re.search(r"Sending file: (\S+)", line):
            current = m.group(1)
        elif "Received Store Response (Success)" in line and current:
            acknowledged.append(Path(current))
            current = None
    assert half < len(acknowledged) < len(files), "the kill should land mid-series"
    for path in acknowledged:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        stored = spool / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        assert stored.exists(), f"acknowledged {path.name} is not in the spool"

    # Restart on the same spool: everything acknowledged is assembled again.
    server = ServeProcess(spool)
    try:
        complete = {int(p.stem) // N_SLICES for p in acknowledged}
        complete = {
            v
            for v in complete
            if all(Path(files[v * N_SLICES + k]) in set(acknowledged) for k in range(N_SLICES))
        }
        assert server.wait_for(lambda _: set(_assembled(server)) >= complete, timeout=60)
        # The scanner resends what it was not told was stored; the series completes once.
        rest = [p for p in files if p not in set(acknowledged)]
        again = subprocess.run(
            [*storescu, "127.0.0.1", str(server.port), *map(str, rest)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert again.returncode == 0, again.stdout + again.stderr
        assert server.wait_for(lambda _: len(_assembled(server)) >= N_VOLUMES, timeout=60)
        assert _assembled(server) == list(range(N_VOLUMES))
    finally:
        assert server.terminate() == 0
