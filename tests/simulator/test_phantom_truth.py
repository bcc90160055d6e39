"""The phantom's truth matches what it generated: motion parameters and planted network."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from boldstream.simulator.phantom import (
    MotionSpec,
    PhantomRun,
    make_phantom_run,
    rigid_matrix,
    run_from_nifti,
)

SHAPE = (48, 48, 30)
VOXEL = 3.5


def _region_mean(run: PhantomRun, data: np.ndarray, key: str, radius_mm: float = 6.0) -> np.ndarray:
    centre = np.array(run.truth["network"][key]["voxel_ijk"])
    grid = np.indices(run.shape).reshape(3, -1).T
    inside = np.sqrt((((grid - centre) * VOXEL) ** 2).sum(axis=1)) < radius_mm
    assert inside.sum() > 5
    flat: np.ndarray = data.reshape(-1, data.shape[-1])[inside].mean(axis=0)
    return flat


@pytest.mark.parametrize(("strength", "lo", "hi"), [(0.8, -1.0, -0.3), (0.0, -0.15, 1.0)])
def test_planted_anticorrelation(strength: float, lo: float, hi: float) -> None:
    run = make_phantom_run(
        n_volumes=150, tr_s=2.0, shape=SHAPE, voxel_mm=VOXEL, network_strength=strength, seed=11
    )
    data = run.data
    seed = _region_mean(run, data, "seed")
    target = _region_mean(run, data, "target")
    r = float(np.corrcoef(seed, target)[0, 1])
    assert lo < r < hi, r
    assert run.truth["network"]["expected_correlation"] == -strength
    # The target lies in the left (RAS x < 0), anterior, superior head.
    ras = run.truth["network"]["target"]["scanner_ras_mm"]
    assert ras[0] < -20 and ras[1] > 10 and ras[2] > 10


def test_contrast_and_tsnr() -> None:
    run = make_phantom_run(n_volumes=60, tr_s=2.0, shape=SHAPE, voxel_mm=VOXEL, seed=2)
    data = run.data
    mean, std = data.mean(axis=-1), data.std(axis=-1)
    # Background ~ Rician noise floor; the brain far above it.
    corner = mean[:4, :4, :4]
    assert float(corner.mean()) < 40
    tsnr = mean / np.maximum(std, 1e-6)
    grey = (mean > 900) & (mean < 1150)
    assert 40 < float(np.median(tsnr[grey])) < 110
    assert float(mean.max()) > 1200  # CSF is the brightest tissue


def test_motion_truth_matches_what_was_applied() -> None:
    spec = MotionSpec(drift_mm=1.0, drift_deg=1.0, jerks_per_min=4.0, jerk_mm=2.0, jerk_deg=2.0)
    common = {
        "n_volumes": 40,
        "tr_s": 2.0,
        "shape": SHAPE,
        "voxel_mm": VOXEL,
        "orientation": "oblique",
        "thermal_sigma": 0.0,
        "seed": 4,
    }
    moving = make_phantom_run(motion=spec, **common)  # type: ignore[arg-type]
    still = make_phantom_run(motion="none", **common)  # type: ignore[arg-type]
    motion = moving.truth["motion"]
    params = np.array(motion["parameters"])
    assert params.shape == (40, 6)
    assert motion["columns"] == ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
    np.testing.assert_array_equal(params[0], 0.0)
    assert np.abs(params[:, :3]).max() <= 3.0 + 1e-9
    assert np.abs(params[:, 3:]).max() <= math.radians(3.0) + 1e-9
    t = int(np.argmax(np.abs(params).sum(axis=1)))
    assert np.abs(params[t, :3]).max() > 0.3
    centre = np.array(motion["centre_ras_mm"])
    np.testing.assert_allclose(centre, (moving.vox2ras @ np.array([23.5, 23.5, 14.5, 1.0]))[:3])

    def realign(params_t: np.ndarray) -> np.ndarray:
        """Sample the moved volume at M_t(x) for every grid point x (volume 0's frame)."""
        grid = np.indices(SHAPE).reshape(3, -1)
        homog = np.vstack([grid, np.ones(grid.shape[1])])
        where = np.linalg.inv(moving.vox2ras) @ rigid_matrix(params_t, centre) @ moving.vox2ras
        coords = (where @ homog)[:3]
        out: np.ndarray = ndimage.map_coordinates(moving.volume(t), coords, order=1).reshape(SHAPE)
        return out

    reference = still.volume(t)
    brain = ndimage.binary_erosion(reference > 500, iterations=3)

    def error(params_t: np.ndarray) -> float:
        return float(np.abs(realign(params_t) - reference)[brain].mean())

    right = error(params[t])
    unmoved = float(np.abs(moving.volume(t) - reference)[brain].mean())
    assert right < 0.5 * unmoved, (right, unmoved)
    assert right < 0.5 * error(-params[t])
    # The stated parameters are the best fit: any 0.5 mm / 0.5 degree nudge is worse
    # (catches a wrong axis, sign, centre or rotation order).
    for axis in range(6):
        for sign in (-1.0, 1.0):
            nudged = params[t].copy()
            nudged[axis] += sign * (0.5 if axis < 3 else math.radians(0.5))
            assert right < error(nudged), (axis, sign)


def test_volumes_are_lazy_and_deterministic(tmp_path: Path) -> None:
    run = make_phantom_run(n_volumes=5, tr_s=0.8, shape=(30, 30, 20), voxel_mm=2.4, seed=9)
    first = [v.copy() for v in run]
    assert len(first) == 5 and first[0].dtype == np.float32 and first[0].shape == (30, 30, 20)
    np.testing.assert_array_equal(run.volume(3), first[3])
    assert not np.array_equal(first[3], first[4])
    truth_path = run.write_truth(tmp_path / "truth.json")
    truth = json.loads(truth_path.read_text())
    assert truth["network"]["seed"]["mni_mm"] == [6.0, 16.0, -10.0]
    np.testing.assert_allclose(truth["vox2ras"], run.vox2ras)
    # A 4D NIfTI plays back as a run with the same data and grid.
    nib.save(nib.Nifti1Image(run.data, run.vox2ras), tmp_path / "run.nii.gz")
    replay = run_from_nifti(tmp_path / "run.nii.gz", tr_s=0.8)
    assert replay.n_volumes == 5 and replay.tr_s == 0.8
    np.testing.assert_allclose(replay.vox2ras, run.vox2ras, atol=1e-5)
    np.testing.assert_allclose(replay.volume(2), first[2], rtol=1e-6)
