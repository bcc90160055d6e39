"""The encoders read back by three independent readers.

Each encoding (Siemens mosaic, one file per slice, Enhanced MR per volume and
per series), axial and oblique, must come back as the phantom's quantised
volume on the phantom's grid through our decoder + assembler, through
Debian's dcm2niix, and (mosaic) through nibabel's DICOM wrapper. Comparisons
with dcm2niix bring both sides to the closest canonical orientation, so they
do not depend on either tool's choice of axis order or flips.
"""

from __future__ import annotations

import json
import subprocess
import warnings
from pathlib import Path
from typing import Any

import nibabel as _nibabel
import numpy as np
import pydicom
import pytest
from peers import require_tool

from boldstream.config.settings import AssemblySettings
from boldstream.receiver.assembly import Assembler
from boldstream.receiver.decode import decode_instance, dicom_time_to_seconds
from boldstream.receiver.volume import Volume
from boldstream.simulator.encode import (
    ENCODINGS,
    SeriesSpec,
    encode_series_enhanced,
    encode_volume,
    quantise,
    slice_times,
)
from boldstream.simulator.phantom import PhantomRun, make_phantom_run

with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # "DICOM readers are highly experimental"
    from nibabel.nicom import csareader as _csareader
    from nibabel.nicom import dicomwrappers as _dicomwrappers

nib: Any = _nibabel
csareader: Any = _csareader
dicomwrappers: Any = _dicomwrappers

pytestmark = pytest.mark.timeout(60)

N_VOLUMES = 3
#: Anisotropic voxels and an odd slice count (a 3x3 mosaic with two empty tiles).
SHAPE = (20, 18, 7)
VOXEL_MM = (3.0, 3.5, 4.0)
ORIENTATIONS = ("axial", "oblique")


@pytest.fixture(scope="module", params=ORIENTATIONS)
def run(request: pytest.FixtureRequest) -> PhantomRun:
    return make_phantom_run(
        n_volumes=N_VOLUMES,
        shape=SHAPE,
        voxel_mm=VOXEL_MM,
        orientation=request.param,
        motion="mild",
        seed=0,
    )


AFFINE_TOLERANCE_MM = 1e-3


def assemble(datasets: list[pydicom.Dataset]) -> list[Volume]:
    """Our decoder and assembler over in-memory instances; volumes by index."""
    settings = AssemblySettings()
    assembler = Assembler(settings)
    volumes = []
    for ds in datasets:
        for event in assembler.add(decode_instance(ds, assembly=settings), received=0.0):
            assert isinstance(event, Volume), event
            volumes.append(event)
    return sorted(volumes, key=lambda v: v.index)


def dcm2niix(folder: Path, out: Path, *, sidecar: bool = False) -> list[Path]:
    """Debian's dcm2niix over ``folder``; its NIfTI files by instance number."""
    out.mkdir()
    result = subprocess.run(
        [
            *(require_tool("dcm2niix"), "-z", "n", "-b", "y" if sidecar else "n"),
            *("-f", "%s_%r", "-o", str(out), str(folder)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return sorted(out.glob("*.nii"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))


def canonical(data: Any, vox2ras: Any) -> tuple[Any, Any]:
    """(data, affine) in the closest canonical (RAS) orientation."""
    img = nib.as_closest_canonical(
        nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.asarray(vox2ras, dtype=np.float64))
    )
    return img.get_fdata(), img.affine


def encode_all(run: PhantomRun, encoding: str, spec: SeriesSpec) -> list[pydicom.Dataset]:
    if encoding == "enhanced-series":
        return [encode_series_enhanced(run.iter_volumes(), run.vox2ras, spec)]
    return [
        ds
        for t in range(run.n_volumes)
        for ds in encode_volume(run.volume(t), run.vox2ras, spec, t, encoding=encoding)  # type: ignore[arg-type]
    ]


def write(datasets: list[pydicom.Dataset], folder: Path) -> Path:
    folder.mkdir()
    for n, ds in enumerate(datasets):
        ds.save_as(folder / f"{n:05d}.dcm", enforce_file_format=True)
    return folder


def test_instance_counts_and_sop_classes(run: PhantomRun) -> None:
    spec = SeriesSpec(tr_s=run.tr_s, n_volumes=run.n_volumes)
    n_k = run.shape[2]
    counts = {e: len(encode_all(run, e, spec)) for e in ENCODINGS}
    assert counts == {
        "mosaic": N_VOLUMES,
        "slice": N_VOLUMES * n_k,
        "enhanced": N_VOLUMES,
        "enhanced-series": 1,
    }
    (series,) = encode_all(run, "enhanced-series", spec)
    assert int(series.NumberOfFrames) == N_VOLUMES * n_k
    for ds in encode_all(run, "mosaic", spec):
        assert ds.SeriesInstanceUID == spec.series_uid
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_our_receiver_reads_back_the_phantom(run: PhantomRun, encoding: str) -> None:
    spec = SeriesSpec(tr_s=run.tr_s, n_volumes=run.n_volumes)
    volumes = assemble(encode_all(run, encoding, spec))
    assert [v.index for v in volumes] == list(range(N_VOLUMES))
    for volume in volumes:
        expected = quantise(run.volume(volume.index))
        assert volume.shape == run.shape
        assert np.array_equal(volume.data, expected), f"volume {volume.index}"
        assert np.abs(volume.vox2ras - run.vox2ras).max() < AFFINE_TOLERANCE_MM
        assert volume.series.series_uid == spec.series_uid
        assert volume.series.tr_s == pytest.approx(run.tr_s)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_dcm2niix_reads_back_the_phantom(run: PhantomRun, encoding: str, tmp_path: Path) -> None:
    spec = SeriesSpec(tr_s=run.tr_s, n_volumes=run.n_volumes)
    folder = write(encode_all(run, encoding, spec), tmp_path / "in")
    niftis = dcm2niix(folder, tmp_path / "out")
    # dcm2niix writes one NIfTI per instance for per-volume Enhanced MR.
    expected_files = N_VOLUMES if encoding == "enhanced" else 1
    assert len(niftis) == expected_files, [p.name for p in niftis]
    for t in range(N_VOLUMES):
        img: Any = nib.load(niftis[t] if expected_files > 1 else niftis[0])
        theirs = np.asanyarray(img.dataobj)
        if theirs.ndim == 4:
            theirs = theirs[..., 0 if expected_files > 1 else t]
        slope, inter = img.header.get_slope_inter()
        theirs = theirs * (1.0 if slope is None else slope) + (inter or 0.0)
        want_data, want_affine = canonical(quantise(run.volume(t)), run.vox2ras)
        got_data, got_affine = canonical(theirs, img.affine)
        assert got_data.shape == want_data.shape
        assert np.abs(got_affine - want_affine).max() < AFFINE_TOLERANCE_MM, (
            got_affine,
            want_affine,
        )
        assert np.array_equal(got_data, want_data), f"volume {t}"


def test_nibabel_reads_the_mosaic_geometry(run: PhantomRun) -> None:
    spec = SeriesSpec(tr_s=run.tr_s, n_volumes=run.n_volumes)
    ds = encode_all(run, "mosaic", spec)[1]
    wrapper = dicomwrappers.wrapper_from_data(ds)
    assert wrapper.is_mosaic
    # nibabel's axes are (row, column, slice) = our (j, i, k), and its affine
    # maps them to DICOM LPS.
    swap = np.eye(4)[:, [1, 0, 2, 3]]
    expected = np.diag([-1.0, -1.0, 1.0, 1.0]) @ run.vox2ras @ swap
    assert wrapper.image_shape == (SHAPE[1], SHAPE[0], SHAPE[2])
    assert np.abs(wrapper.affine - expected).max() < AFFINE_TOLERANCE_MM
    normal = expected[:3, 2] / VOXEL_MM[2]
    assert np.abs(np.asarray(wrapper.slice_normal) - normal).max() < 1e-5
    csa = csareader.get_csa_header(ds)
    assert np.abs(np.asarray(csareader.get_slice_normal(csa)) - normal).max() < 1e-9
    assert csareader.get_n_mosaic(csa) == SHAPE[2]
    data = wrapper.get_data()
    assert np.array_equal(data, quantise(run.volume(1)).transpose(1, 0, 2))


@pytest.mark.parametrize("order", ["interleaved", "ascending"])
def test_slice_timing_follows_slice_times(order: str, tmp_path: Path) -> None:
    run = make_phantom_run(n_volumes=2, shape=SHAPE, voxel_mm=VOXEL_MM, seed=0)
    spec = SeriesSpec(tr_s=run.tr_s, n_volumes=run.n_volumes, slice_order=order)  # type: ignore[arg-type]
    want = slice_times(SHAPE[2], run.tr_s, order)
    ranks = np.argsort(np.argsort(want))
    if order == "ascending":
        assert list(ranks) == list(range(SHAPE[2]))
    else:  # even positions first, then odd
        assert list(np.argsort(want)) == [0, 2, 4, 6, 1, 3, 5]
    assert np.allclose(np.diff(np.sort(want)), run.tr_s / SHAPE[2])

    # Mosaic: the CSA's MosaicRefAcqTimes (ms), and dcm2niix's SliceTiming from it.
    mosaics = encode_all(run, "mosaic", spec)
    for ds in mosaics:
        times = csareader.get_csa_header(ds)["tags"]["MosaicRefAcqTimes"]["items"]
        assert np.allclose(np.asarray(times) / 1000.0, want, atol=1e-9)
    assert assemble(mosaics)[0].series.slice_timing == pytest.approx(tuple(want), abs=1e-9)
    dcm2niix(write(mosaics, tmp_path / "in"), tmp_path / "out", sidecar=True)
    (sidecar,) = (tmp_path / "out").glob("*.json")
    assert np.allclose(json.loads(sidecar.read_text())["SliceTiming"], want, atol=1e-5)

    # One file per slice: AcquisitionTime = volume start + slice time.
    slices = encode_all(run, "slice", spec)
    normal = np.cross(*np.asarray(slices[0].ImageOrientationPatient, float).reshape(2, 3))
    for t in range(run.n_volumes):
        in_volume = [ds for ds in slices if int(ds.AcquisitionNumber) == t + 1]
        in_volume.sort(key=lambda ds: float(np.asarray(ds.ImagePositionPatient, float) @ normal))
        got = np.array([dicom_time_to_seconds(ds.AcquisitionTime) for ds in in_volume])
        start = spec.start_time_s + t * spec.tr_s
        assert np.allclose(got - start, want, atol=2e-6), (t, got - start)
    # ... which the receiver turns into the series' slice timing.
    assert assemble(slices)[0].series.slice_timing == pytest.approx(tuple(want), abs=2e-6)

    # Enhanced MR: per-frame FrameAcquisitionDateTime, as our decoder reads it.
    (series,) = encode_all(run, "enhanced-series", spec)
    assert assemble([series])[0].series.slice_timing == pytest.approx(tuple(want), abs=2e-6)
