"""``boldstream replay``: a phantom run saved as NIfTI, and real DICOM mosaics.

Replay writes through the files sink serve uses (BIDS derivatives layout).
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import structlog
from pipeline_support import phantom, phantom_arrays

from boldstream.analysis import MotionCorrector, QCAccumulator, foreground_mask
from boldstream.cli import main as cli_main
from boldstream.sinks.bids import BASE_COLUMNS as COLUMNS

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """replay configures logging onto the (captured) stderr; undo it afterwards."""
    yield
    structlog.reset_defaults()


N = 40


def _save_run(path: Path, n: int = N) -> Path:
    run = phantom(n)
    data = np.stack(phantom_arrays(n), axis=-1)
    img = nib.Nifti1Image(data, run.vox2ras)
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = run.tr_s
    nib.save(img, path)
    return path


def _read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _num(text: str) -> float | None:
    return None if text == "n/a" else float(text)


def test_replay_writes_confounds_matching_direct_analysis(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nifti = _save_run(tmp_path / "sub-07_bold.nii.gz")
    out = tmp_path / "out"
    assert cli_main(["replay", str(nifti), "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"replayed {N} volumes of sub-07_bold.nii.gz in ")
    assert "x real time at TR 2 s" in line
    func = out / "sub-07" / "func"
    tsv = func / "sub-07_task-rest_desc-confounds_timeseries.tsv"
    assert line.endswith(f"wrote {tsv}")
    assert json.loads((out / "dataset_description.json").read_text())["DatasetType"] == (
        "derivative"
    )
    rows = _read_tsv(tsv)
    assert len(rows) == N
    assert list(rows[0])[: len(COLUMNS)] == list(COLUMNS)
    assert rows[0]["framewise_displacement"] == rows[0]["dvars"] == "n/a"

    vols = phantom_arrays(N)
    vox2ras = phantom(N).vox2ras
    corrector = MotionCorrector(vols[0], vox2ras)
    acc = QCAccumulator(foreground_mask(vols[0]), tr_s=2.0)
    outliers = []
    bold = nib.load(func / "sub-07_task-rest_desc-preproc_bold.nii.gz")
    assert bold.shape == (*vols[0].shape, N)
    np.testing.assert_allclose(bold.affine, vox2ras, atol=1e-5)
    corrected = np.asarray(bold.dataobj)
    for i, vol in enumerate(vols):
        est = corrector.register(vol)
        np.testing.assert_allclose(corrected[..., i], est.corrected, rtol=1e-5, atol=1e-3)
        frame = acc.update(est.corrected, est.params, usable=not est.flagged)
        got = [float(rows[i][c]) for c in COLUMNS[:6]]
        np.testing.assert_allclose(got, est.params, rtol=1e-8, atol=1e-12)
        for column, want in (
            ("framewise_displacement", frame.fd_mm),
            ("dvars", frame.dvars),
            ("std_dvars", frame.std_dvars),
            ("global_signal", frame.global_signal),
        ):
            value = _num(rows[i][column])
            assert (value is None) == (want is None), (i, column)
            if want is not None:
                assert value == pytest.approx(want, rel=1e-8), (i, column)
        if frame.outlier or est.flagged:
            outliers.append(i)
    flags = sorted(c for c in rows[0] if c.startswith("motion_outlier"))
    assert len(flags) == len(outliers)
    for column, index in zip(flags, outliers, strict=True):
        assert [r[column] for r in rows] == ["1" if i == index else "0" for i in range(N)]

    sidecar = json.loads((func / "sub-07_task-rest_desc-confounds_timeseries.json").read_text())
    assert sidecar["trans_x"]["Units"] == "mm"
    assert sidecar["rot_z"]["Units"] == "rad"
    assert sidecar["framewise_displacement"]["Units"] == "mm"
    assert set(rows[0]) <= set(sidecar)
    bold_sidecar = json.loads((func / "sub-07_task-rest_desc-preproc_bold.json").read_text())
    assert bold_sidecar["RepetitionTime"] == 2.0
    assert bold_sidecar["NumberOfVolumes"] == N
    assert (func / "sub-07_task-rest_desc-tsnr_boldmap.nii.gz").exists()
    assert not (func / "sub-07_task-rest_desc-preproc_bold.nii").exists()


def test_dummy_scans_are_na_and_flagged_as_non_steady_state(tmp_path: Path) -> None:
    nifti = _save_run(tmp_path / "run.nii", n=12)
    out = tmp_path / "out"
    code = cli_main(
        [
            "replay",
            str(nifti),
            "--out",
            str(out),
            "--subject",
            "x1",
            "--set",
            "motion.dummy_scans=2",
        ]
    )
    assert code == 0
    rows = _read_tsv(out / "sub-x1" / "func" / "sub-x1_task-rest_desc-confounds_timeseries.tsv")
    assert len(rows) == 12
    assert all(rows[i][c] == "n/a" for i in (0, 1) for c in COLUMNS)
    assert [r["non_steady_state_outlier00"] for r in rows][:3] == ["1", "0", "0"]
    assert [r["non_steady_state_outlier01"] for r in rows][:3] == ["0", "1", "0"]
    # The reference is volume 2: no motion, and the first FD of the analysed part is n/a.
    assert float(rows[2]["trans_x"]) == pytest.approx(0.0, abs=1e-3)
    assert rows[2]["framewise_displacement"] == "n/a"
    assert rows[3]["framewise_displacement"] != "n/a"


def test_replay_of_a_dicom_folder(
    tmp_path: Path, heudiconv_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "dicom"
    folder.mkdir()
    for f in sorted((heudiconv_data / "b0dwiForFmap").glob("*.dcm")):
        shutil.copy(f, folder / f.name)
    (folder / "README").write_text("not DICOM\n")
    out = tmp_path / "out"
    assert (
        cli_main(
            ["replay", str(folder), "--out", str(out), "--set", "selector.exclude_image_types=[]"]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("replayed 3 volumes of dicom")
    (tsv,) = (out / "sub-01" / "func").glob("sub-01_task-rest*_desc-confounds_timeseries.tsv")
    rows = _read_tsv(tsv)
    assert len(rows) == 3
    assert rows[0]["framewise_displacement"] == "n/a"
    assert all(_num(r["trans_x"]) is not None for r in rows)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "absent.nii.gz", "no such file or folder"),
        (lambda p: (p / "notes.txt").write_text("x") and p / "notes.txt", "not a .nii/.nii.gz"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "no DICOM image"),
    ],
)
def test_a_bad_path_exits_2_with_one_readable_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: object, message: str
) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    assert cli_main(["replay", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("boldstream replay: ") and message in err[0]
