"""Template ROIs, EPI-to-MNI affine registration and masks pulled into native space."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from scipy import ndimage

from boldstream.analysis.registration import (
    epi_like_template,
    map_to_native,
    native_rois,
    register_to_template,
)
from boldstream.analysis.rois import SEARCH_CENTRES_MNI, SEED_MNI, sphere_mask, template_rois
from boldstream.analysis.template import load_template
from boldstream.errors import AnalysisError
from boldstream.simulator.phantom import HeadPose, epi_grid, make_phantom_run, rigid_matrix

F64 = npt.NDArray[np.float64]
CENTRES = [SEED_MNI, *SEARCH_CENTRES_MNI.values()]


def _errors(mni2native_est: F64, mni2native_true: F64) -> list[float]:
    out = []
    for c in CENTRES:
        p = np.array([*c, 1.0])
        out.append(float(np.linalg.norm((mni2native_est @ p)[:3] - (mni2native_true @ p)[:3])))
    return out


def test_template_rois_follow_the_spec_coordinates() -> None:
    rois = template_rois()
    tpl = load_template()
    voxel_mm3 = 8.0
    # a 10 mm sphere holds ~4.19 cm^3; masked to brain it can only shrink a little
    seed_cm3 = rois.seed.sum() * voxel_mm3 / 1000.0
    assert 3.0 < seed_cm3 < 4.5
    assert not (rois.search & ~tpl.brain_mask).any()
    assert not (rois.wm & rois.csf).any()
    inv = np.linalg.inv(rois.vox2mni)
    for centre in SEARCH_CENTRES_MNI.values():
        ijk = np.rint(inv @ np.array([*centre, 1.0]))[:3].astype(int)
        assert rois.search[tuple(ijk)]
    # only the left hemisphere (MNI x < 0) is searched
    xs = (rois.vox2mni @ np.vstack([np.argwhere(rois.search).T, np.ones(rois.search.sum())]))[0]
    assert xs.max() < 0
    # same inputs, same masks (data, not drawings)
    np.testing.assert_array_equal(template_rois().search, rois.search)
    with pytest.raises(AnalysisError):
        sphere_mask((4, 4, 4), np.eye(4), (0, 0, 0), 0.0)


@pytest.mark.parametrize("orientation", ["axial", "oblique"])
@pytest.mark.parametrize(
    "pose",
    [HeadPose(), HeadPose(rotation_deg=(12.0, -6.0, 8.0), translation_mm=(8.0, -15.0, 10.0))],
    ids=["default-pose", "large-pose"],
)
def test_phantom_mean_epi_registers_within_2_mm(orientation: str, pose: HeadPose) -> None:
    run = make_phantom_run(n_volumes=10, motion="none", head_pose=pose, orientation=orientation)  # type: ignore[arg-type]
    mean = np.mean([run.volume(t) for t in range(10)], axis=0)
    reg = register_to_template(mean, run.vox2ras, n_volumes=10)
    truth = np.asarray(run.truth["head_pose"]["mni2scanner"])
    assert max(_errors(reg.mni2native, truth)) < 2.0
    assert reg.dice > 0.9 and reg.correlation > 0.9 and reg.n_volumes == 10


def test_known_affine_with_scaling_and_other_contrast_is_recovered() -> None:
    """A 12-dof offset (rotation, shear, +-8 % scaling, 3 cm shift) and a flatter
    GM/WM contrast than the synthetic template's, with Rician noise."""
    tpl = load_template()
    image = 1200.0 * tpl.csf + 900.0 * tpl.gm + 780.0 * tpl.wm
    shape = (64, 64, 36)
    vox2ras = epi_grid(shape, (3.0, 3.0, 3.5), orientation="oblique")
    scale = np.diag([1.08, 0.95, 1.04, 1.0])
    scale[0, 1] = 0.03
    mni2native = rigid_matrix([12.0, -25.0, -20.0, 0.15, -0.08, 0.1], [0, 0, 0]) @ scale
    ijk = np.vstack([np.indices(shape).reshape(3, -1), np.ones(int(np.prod(shape)))])
    vox = (np.linalg.inv(tpl.vox2mni) @ np.linalg.inv(mni2native) @ vox2ras @ ijk)[:3]
    vol = ndimage.map_coordinates(image, vox, order=1).reshape(shape)
    rng = np.random.default_rng(0)
    vol = np.hypot(vol + 20 * rng.standard_normal(shape), 20 * rng.standard_normal(shape))
    reg = register_to_template(vol, vox2ras)
    assert max(_errors(reg.mni2native, mni2native)) < 2.0
    assert reg.converged


def test_converged_reports_the_finest_level(monkeypatch: pytest.MonkeyPatch) -> None:
    """A coarse level that converges does not make up for a fine one that did not."""
    import boldstream.analysis.registration as registration

    run = make_phantom_run(n_volumes=2, motion="none")
    mean = np.mean([run.volume(t) for t in range(2)], axis=0)
    steps = iter([0.0])  # the first step of the coarsest level ends it; none after
    monkeypatch.setattr(registration, "_step_mm", lambda dm, dt: next(steps, 1e9))
    reg = register_to_template(mean, run.vox2ras, max_iter=3)
    assert not reg.converged


def test_masks_pulled_to_native_land_on_the_planted_regions() -> None:
    run = make_phantom_run(n_volumes=10, motion="none", orientation="oblique")
    mean = np.mean([run.volume(t) for t in range(10)], axis=0)
    reg = register_to_template(mean, run.vox2ras)
    rois = native_rois(template_rois(), reg, mean, run.vox2ras)
    counts = rois.counts()
    assert all(n > 0 for n in counts.values()), counts
    seed_ijk = np.argwhere(rois.seed).mean(axis=0)
    seed_ras = run.vox2ras[:3, :3] @ seed_ijk + run.vox2ras[:3, 3]
    truth = np.asarray(run.truth["network"]["seed"]["scanner_ras_mm"])
    assert np.linalg.norm(seed_ras - truth) < 2.5  # 3 mm voxels, sphere clipped by brain
    planted = np.asarray(run.truth["network"]["target"]["voxel_ijk"])
    assert rois.search[tuple(np.rint(planted).astype(int))]
    # nearest neighbour keeps masks binary and a mask of ones maps to the overlap
    ones = map_to_native(
        np.ones(load_template().shape, dtype=bool),
        template_rois().vox2mni,
        reg.native2mni,
        mean.shape,
        run.vox2ras,
    )
    assert ones.dtype == bool and ones.any()
    assert epi_like_template().max() > 0


def test_registration_refuses_an_empty_image() -> None:
    with pytest.raises(AnalysisError):
        register_to_template(np.zeros((20, 20, 20), dtype=np.float32), np.eye(4))
    with pytest.raises(AnalysisError):
        register_to_template(np.zeros((20, 20), dtype=np.float32), np.eye(4))
