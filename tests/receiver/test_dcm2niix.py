"""Our (data, vox2ras) against Debian's dcm2niix on the same files.

Both sides are brought to the closest canonical (RAS) orientation with
nibabel, so the comparison does not depend on either tool's choice of axis
order or flips: what must agree is which voxel holds which value and where
it is in scanner space.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import ModuleType

import nibabel as nib
import numpy as np
import pydicom
import pytest
from peers import require_tool

from boldstream.config.settings import AssemblySettings
from boldstream.receiver.assembly import Assembler
from boldstream.receiver.decode import decode_instance
from boldstream.receiver.volume import Volume

SETTINGS = AssemblySettings()
AFFINE_TOLERANCE_MM = 1e-3


def _dcm2niix(folder: Path, out: Path) -> list[Path]:
    out.mkdir()
    result = subprocess.run(
        [
            require_tool("dcm2niix"),
            "-z",
            "n",
            "-b",
            "n",
            "-f",
            "%s_%r",
            "-o",
            str(out),
            str(folder),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return sorted(out.glob("*.nii"))


def _assemble(datasets: list[pydicom.Dataset], settings: AssemblySettings) -> list[Volume]:
    assembler = Assembler(settings)
    volumes = []
    for ds in datasets:
        for event in assembler.add(decode_instance(ds, assembly=settings), received=0.0):
            assert isinstance(event, Volume)
            volumes.append(event)
    return sorted(volumes, key=lambda v: v.index)


def _assert_same(volume: Volume, nifti: Path, frame: int | None = None) -> None:
    ours = nib.as_closest_canonical(nib.Nifti1Image(volume.data, volume.vox2ras))
    theirs_img = nib.load(nifti)
    theirs_data = np.asanyarray(theirs_img.dataobj)
    if frame is not None:
        theirs_data = theirs_data[..., frame]
    elif theirs_data.ndim == 4:
        assert theirs_data.shape[3] == 1
        theirs_data = theirs_data[..., 0]
    slope, inter = theirs_img.header.get_slope_inter()
    scaled = theirs_data * (slope if slope is not None else 1.0) + (inter or 0.0)
    theirs = nib.as_closest_canonical(nib.Nifti1Image(scaled, theirs_img.affine))
    assert ours.shape == theirs.shape
    assert np.abs(ours.affine - theirs.affine).max() < AFFINE_TOLERANCE_MM
    assert np.array_equal(ours.get_fdata(), theirs.get_fdata())


def _write(datasets: list[pydicom.Dataset], folder: Path) -> Path:
    folder.mkdir()
    for n, ds in enumerate(datasets):
        ds.save_as(folder / f"{n:05d}.dcm", enforce_file_format=True)
    return folder


@pytest.mark.parametrize(
    "sample",
    [
        "heudiconv:axasc35.dcm",
        "heudiconv:b0dwiForFmap/b0dwi_for_fmap+00001.dcm",
        "heudiconv:b0dwiForFmap/b0dwi_for_fmap+00003.dcm",
        "nibabel:siemens_dwi_1000.dcm.gz",
        "nibabel:philips_mprage.dcm.gz",
    ],
)
def test_real_samples_match_dcm2niix(
    sample: str, heudiconv_data: Path, nibabel_data: Path, builders: ModuleType, tmp_path: Path
) -> None:
    source, name = sample.split(":")
    path = (heudiconv_data if source == "heudiconv" else nibabel_data) / name
    ds = builders.read_sample(path)
    folder = _write([ds], tmp_path / "in")
    (volume,) = _assemble([ds], SETTINGS)
    (nifti,) = _dcm2niix(folder, tmp_path / "out")
    _assert_same(volume, nifti)


def test_xa_enhanced_stack_matches_dcm2niix(
    xa_path: Path, builders: ModuleType, tmp_path: Path
) -> None:
    ds = builders.xa_as_stack(pydicom.dcmread(xa_path))
    folder = _write([ds], tmp_path / "in")
    (volume,) = _assemble([ds], SETTINGS)
    (nifti,) = _dcm2niix(folder, tmp_path / "out")
    _assert_same(volume, nifti)


@pytest.mark.parametrize(
    "iop",
    [
        (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        # ~10 degrees about two axes: a typical AC-PC angulated oblique.
        (0.98480775, 0.0, -0.17364818, 0.03015369, 0.98480775, 0.17101007),
    ],
    ids=["axial", "oblique"],
)
def test_per_slice_series_matches_dcm2niix(
    iop: tuple[float, ...], builders: ModuleType, tmp_path: Path
) -> None:
    volumes, _ = builders.build_series(
        3, 8, iop=iop, rows=14, cols=11, images_in_acquisition=8, manufacturer="GE MEDICAL SYSTEMS"
    )
    # Arrival order shuffled: the result must not depend on it.
    datasets = [ds for vol in volumes for ds in vol]
    order = np.random.default_rng(2).permutation(len(datasets))
    ours = _assemble([datasets[i] for i in order], SETTINGS)
    assert [v.index for v in ours] == [0, 1, 2]
    niftis = _dcm2niix(_write(datasets, tmp_path / "in"), tmp_path / "out")
    assert len(niftis) == 1
    for t, volume in enumerate(ours):
        _assert_same(volume, niftis[0], frame=t)
