"""The phantom's inputs: seeds, bad arguments, and runs read from a NIfTI file.

What the phantom plants (motion, network) is checked in test_phantom_truth.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as _nibabel
import numpy as np
import pytest

from boldstream.config.settings import AssemblySettings
from boldstream.receiver.assembly import Assembler
from boldstream.receiver.decode import decode_instance
from boldstream.receiver.volume import Volume
from boldstream.simulator.encode import SeriesSpec, encode_volume, quantise
from boldstream.simulator.phantom import (
    SimulatorError,
    make_phantom_run,
    rigid_matrix,
    run_from_nifti,
)

nib: Any = _nibabel

SMALL: dict[str, Any] = {"n_volumes": 3, "shape": (16, 14, 6), "voxel_mm": 5.0}


def test_a_seed_gives_the_same_run_and_another_seed_does_not() -> None:
    a = make_phantom_run(motion="heavy", seed=7, **SMALL)
    b = make_phantom_run(motion="heavy", seed=7, **SMALL)
    c = make_phantom_run(motion="heavy", seed=8, **SMALL)
    assert np.array_equal(a.data, b.data)
    assert a.truth == b.truth
    assert not np.array_equal(a.data, c.data)
    assert a.truth["motion"]["parameters"] != c.truth["motion"]["parameters"]
    # Volumes are generated on demand in any order, always the same.
    assert np.array_equal(a.volume(2), a.data[..., 2])


def test_truth_positions_agree_with_the_grid() -> None:
    run = make_phantom_run(orientation="oblique", seed=0, **SMALL)
    for region in ("seed", "target"):
        where = run.truth["network"][region]
        ijk = np.array([*where["voxel_ijk"], 1.0])
        assert np.allclose((run.vox2ras @ ijk)[:3], where["scanner_ras_mm"], atol=1e-3)
        lps = where["scanner_lps_mm"]
        assert np.allclose(lps, np.array(where["scanner_ras_mm"]) * [-1, -1, 1])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"n_volumes": 0}, "n_volumes must be at least 1"),
        ({"tr_s": 0.0}, "tr_s must be positive"),
        ({"tr_s": float("nan")}, "tr_s must be positive"),
        ({"network_strength": 1.2}, r"network_strength must be in \[0, 1\]"),
        ({"network_strength": -0.1}, r"network_strength must be in \[0, 1\]"),
        ({"motion": "wild"}, "motion must be one of"),
        ({"orientation": "sagittal"}, "orientation must be 'axial' or 'oblique'"),
        ({"voxel_mm": 0.0}, "voxel_mm must be positive"),
        ({"voxel_mm": (3.0, -3.0, 3.0)}, "voxel_mm must be positive"),
        ({"shape": (16, 0, 6)}, "shape must be three positive"),
        ({"shape": (16, 16)}, "shape must be three positive"),
        ({"vox2ras": np.zeros((4, 4))}, "vox2ras must be a finite, invertible 4x4"),
        ({"vox2ras": np.eye(3)}, "vox2ras must be a finite, invertible 4x4"),
        ({"thermal_sigma": -1.0}, "thermal_sigma must be zero or positive"),
        ({"region_radius_mm": 0.0}, "region_radius_mm must be positive"),
    ],
)
def test_bad_arguments_raise_simulator_error(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(SimulatorError, match=message) as caught:
        make_phantom_run(**{**SMALL, **arguments})
    assert isinstance(caught.value, ValueError)


def _nifti(tmp_path: Path, *, zooms_t: float | None, unit: str = "sec") -> tuple[Path, Any]:
    rng = np.random.default_rng(0)
    data = rng.uniform(0, 3000, size=(12, 10, 5, 4)).astype(np.float32)
    # Stored left-to-right flipped (LAS, as many converters write), oblique.
    vox2ras = rigid_matrix([20.0, -30.0, 10.0, 0.2, -0.1, 0.05], [0, 0, 0])
    vox2ras[:, :3] = vox2ras[:, :3] @ np.diag([-3.0, 2.9, 3.9])
    img = nib.Nifti1Image(data, vox2ras)
    if zooms_t is not None:
        img.header.set_zooms((*img.header.get_zooms()[:3], zooms_t))
        img.header.set_xyzt_units("mm", unit)
    path = tmp_path / "bold.nii.gz"
    nib.save(img, path)
    return path, nib.load(path)


@pytest.mark.parametrize(("zooms_t", "unit"), [(1.5, "sec"), (1500.0, "msec")])
def test_run_from_nifti_reproduces_data_affine_and_tr(
    tmp_path: Path, zooms_t: float, unit: str
) -> None:
    path, img = _nifti(tmp_path, zooms_t=zooms_t, unit=unit)
    run = run_from_nifti(path)
    assert run.tr_s == pytest.approx(1.5)
    assert run.n_volumes == 4 and run.shape == (12, 10, 5)
    assert np.array_equal(run.vox2ras, img.affine)
    assert np.array_equal(run.data, np.asarray(img.get_fdata(), dtype=np.float32))
    assert run.truth["source"] == str(path)
    assert run_from_nifti(path, tr_s=0.8).tr_s == 0.8


def test_a_nifti_run_goes_through_the_encoders_unchanged(tmp_path: Path) -> None:
    path, img = _nifti(tmp_path, zooms_t=2.0)
    run = run_from_nifti(path)
    spec = SeriesSpec(tr_s=run.tr_s, n_volumes=run.n_volumes)
    settings = AssemblySettings()
    assembler = Assembler(settings)
    volumes: list[Volume] = []
    for t in range(run.n_volumes):
        for ds in encode_volume(run.volume(t), run.vox2ras, spec, t, encoding="mosaic"):
            for event in assembler.add(decode_instance(ds, assembly=settings), received=0.0):
                assert isinstance(event, Volume)
                volumes.append(event)
    assert [v.index for v in volumes] == list(range(run.n_volumes))
    for volume in volumes:
        ours = nib.as_closest_canonical(nib.Nifti1Image(volume.data, volume.vox2ras))
        source = quantise(img.dataobj[..., volume.index]).astype(np.float32)
        want = nib.as_closest_canonical(nib.Nifti1Image(source, img.affine))
        assert np.abs(ours.affine - want.affine).max() < 1e-3
        assert np.array_equal(ours.get_fdata(), want.get_fdata())


def test_a_sheared_grid_is_refused_by_the_encoders() -> None:
    run = make_phantom_run(seed=0, **SMALL)
    sheared = run.vox2ras.copy()
    sheared[:3, 1] += 0.3 * sheared[:3, 0]
    spec = SeriesSpec(tr_s=run.tr_s, n_volumes=run.n_volumes)
    for encoding in ("mosaic", "slice", "enhanced"):
        with pytest.raises(SimulatorError, match="not perpendicular"):
            encode_volume(run.volume(0), sheared, spec, 0, encoding=encoding)


def test_run_from_nifti_refuses_what_it_cannot_play(tmp_path: Path) -> None:
    path, _ = _nifti(tmp_path, zooms_t=0.0)
    with pytest.raises(SimulatorError, match="states no repetition time; pass tr_s"):
        run_from_nifti(path)
    flat = tmp_path / "t1.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), flat)
    with pytest.raises(SimulatorError, match="not a 4D image"):
        run_from_nifti(flat, tr_s=2.0)
    text = tmp_path / "notes.nii"
    text.write_text("not an image\n")
    with pytest.raises(SimulatorError, match="not a readable NIfTI"):
        run_from_nifti(text, tr_s=2.0)
