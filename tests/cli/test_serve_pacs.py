"""serve, end to end: scanner (storescu) -> target -> PACS (DCMTK storescp)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pydicom
import pytest
from peers import require_tool
from serve_process import ServeProcess

from boldstream.simulator.phantom import make_phantom_run
from boldstream.simulator.send import SendOptions, write_run

pytestmark = pytest.mark.timeout(240)

N, TR = 40, 2.0


def test_serve_sends_the_target_map_to_the_pacs_at_series_end(
    tmp_path: Path, storescp: tuple[int, Path]
) -> None:
    port, received = storescp
    run = make_phantom_run(n_volumes=N, tr_s=TR, shape=(64, 64, 36), voxel_mm=3.0)
    files = write_run(run, tmp_path / "dicom", SendOptions(encoding="mosaic"))
    server = ServeProcess(
        tmp_path / "spool",
        extra=[
            "--set", f"outputs.dir={json.dumps(str(tmp_path / 'derivatives'))}",
            "--set", "pacs.host='127.0.0.1'",
            "--set", f"pacs.port={port}",
            "--set", "pacs.called_ae='TESTPACS'",
            "--set", "target.every_s=20",
        ],
    )  # fmt: skip
    try:
        sent = subprocess.run(
            [require_tool("storescu"), "-aec", "BOLDSTREAM", "127.0.0.1", str(server.port),
             *map(str, files)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        assert server.wait_for(
            lambda logs: sum(e.get("event") == "volume published" for e in logs) >= N, timeout=120
        )
    finally:
        assert server.terminate(timeout=120) == 0  # the series ends at shutdown: PACS send
    instances = [pydicom.dcmread(p) for p in sorted(received.glob("*.dcm"))]
    assert instances, "nothing reached the PACS"
    descriptions = {str(ds.SeriesDescription) for ds in instances}
    assert any("boldstream" in d for d in descriptions), descriptions
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert {str(ds.StudyInstanceUID) for ds in instances} == {str(source.StudyInstanceUID)}
    assert all(str(ds.PatientID) == str(source.PatientID) for ds in instances)
    assert all("DERIVED" in ds.ImageType for ds in instances)
