"""``boldstream serve`` as a process with its outputs: the dashboard and the files.

DCMTK's storescu plays the scanner, sending a simulated run written by
:func:`boldstream.simulator.send.write_run`. The dashboard answers on its
printed URL; after SIGTERM the BIDS files are finished and hold the numbers
the pipeline published, and match what ``boldstream replay`` writes from the
same DICOM files.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from peers import require_tool
from serve_process import ServeProcess

from boldstream.simulator.phantom import make_phantom_run
from boldstream.simulator.send import SendOptions, write_run

pytestmark = pytest.mark.timeout(180)

N, TR = 16, 1.0


def _get(url: str) -> tuple[int, Any]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.status, json.loads(reply.read())


def _read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _num(text: str) -> float | None:
    return None if text == "n/a" else float(text)


def _published(logs: list[dict[str, Any]]) -> int:
    return sum(e.get("event") == "volume published" for e in logs)


def test_serve_runs_the_dashboard_and_writes_finished_bids_files(tmp_path: Path) -> None:
    run = make_phantom_run(n_volumes=N, tr_s=TR, shape=(32, 32, 18), voxel_mm=6.0, motion="mild")
    dicom = tmp_path / "dicom"
    files = write_run(run, dicom, SendOptions(encoding="mosaic"))
    out = tmp_path / "derivatives"
    server = ServeProcess(
        tmp_path / "spool", extra=["--set", f"outputs.dir={json.dumps(str(out))}"]
    )
    try:
        assert server.dashboard_url is not None
        assert server.dashboard_url.startswith("http://127.0.0.1:")
        assert _get(server.dashboard_url + "healthz") == (200, {"status": "ok"})
        sent = subprocess.run(
            [
                require_tool("storescu"),
                "-aet",
                "SCANNER",
                "-aec",
                "BOLDSTREAM",
                "127.0.0.1",
                str(server.port),
                *map(str, files),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sent.returncode == 0, sent.stderr
        assert server.wait_for(lambda logs: _published(logs) >= N, timeout=90)
        # The dashboard hears the results over its own subscription, a moment
        # after the hub logs them: poll its snapshot (bounded).
        deadline = time.monotonic() + 30
        while True:
            status, snapshot = _get(server.dashboard_url + "api/snapshot")
            assert status == 200
            (series,) = snapshot["series"]
            if len(series["qc"]["index"]) >= N or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert series["qc"]["index"] == list(range(N))
        assert series["receiver"]["received"] == N
        # Ops: the pipeline's stages, their lag and restarts, on the same /metrics.
        with urllib.request.urlopen(server.dashboard_url + "metrics", timeout=10) as reply:
            exposition = reply.read().decode()
        # (a stage too busy to answer its 0.5 s probe is reported down, with no lag)
        up = re.search(r'boldstream_pipeline_stage_up\{stage="motion"\} ([01])', exposition)
        assert up is not None, exposition
        assert 'boldstream_pipeline_stage_restarts_total{stage="qc"} 0' in exposition
        if up.group(1) == "1":
            assert 'boldstream_pipeline_stage_lag_seconds{stage="motion"}' in exposition
        assert "boldstream_dashboard_volumes_received_total" in exposition
        # Written while the scan goes: the partial BOLD series and the confounds rows.
        (func,) = out.glob("sub-*/func")
        assert list(func.glob("*_desc-preproc_bold.nii")) != []
    finally:
        code = server.terminate()
    assert code == 0

    (tsv,) = func.glob("*_desc-confounds_timeseries.tsv")
    prefix = tsv.name.removesuffix("_desc-confounds_timeseries.tsv")
    assert prefix.startswith(f"{func.parent.name}_task-rest")
    rows = _read_tsv(tsv)
    assert len(rows) == N
    qc, motion = series["qc"], series["motion"]
    for i, row in enumerate(rows):
        for column, key in (
            ("framewise_displacement", "fd_mm"),
            ("dvars", "dvars"),
            ("std_dvars", "std_dvars"),
        ):
            assert _num(row[column]) == qc[key][i], (i, column)
        for name in ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"):
            assert _num(row[name]) == motion[name][i], (i, name)
    outliers = [i for i, flag in enumerate(qc["outlier"]) if flag]
    flags = sorted(c for c in rows[0] if c.startswith("motion_outlier"))
    assert [next(i for i, r in enumerate(rows) if r[c] == "1") for c in flags] == outliers

    # Finished: gzipped BOLD with every volume, its sidecar, the tSNR map.
    assert not (func / f"{prefix}_desc-preproc_bold.nii").exists()
    bold = nib.load(func / f"{prefix}_desc-preproc_bold.nii.gz")
    assert bold.shape == (32, 32, 18, N)
    sidecar = json.loads((func / f"{prefix}_desc-preproc_bold.json").read_text())
    assert sidecar["RepetitionTime"] == TR
    assert sidecar["NumberOfVolumes"] == N
    assert (func / f"{prefix}_desc-tsnr_boldmap.nii.gz").exists()
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert server.events("series files finished")

    # The same files as an offline replay of the same DICOM files.
    again = tmp_path / "replayed"
    label = func.parent.name.removeprefix("sub-")
    replayed = subprocess.run(
        [
            sys.executable,
            "-m",
            "boldstream",
            "replay",
            str(dicom),
            "--out",
            str(again),
            "--subject",
            label,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert replayed.returncode == 0, replayed.stderr
    other = again / func.relative_to(out)
    assert (other / tsv.name).read_text() == tsv.read_text()
    np.testing.assert_array_equal(
        np.asarray(nib.load(other / f"{prefix}_desc-preproc_bold.nii.gz").dataobj),
        np.asarray(bold.dataobj),
    )


def test_serve_without_dashboard_prints_no_dashboard_line(tmp_path: Path) -> None:
    server = ServeProcess(tmp_path / "spool", extra=["--set", "dashboard.enabled=false"])
    try:
        assert server.dashboard_url is None
        assert server.wait_for(lambda logs: any(e.get("event") == "outputs started" for e in logs))
        (started,) = server.events("outputs started")
        assert started["dashboard"] is None
        assert started["files"] == str(tmp_path / "derivatives")
        assert started["pacs"] is None
    finally:
        assert server.terminate() == 0
