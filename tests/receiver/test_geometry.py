"""Slice geometry: LPS->RAS once, affine from positions, ordering by the normal."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from boldstream.errors import DicomInputError
from boldstream.receiver.geometry import (
    LPS_TO_RAS,
    lps_to_ras,
    order_by_normal,
    ras_to_lps,
    slice_affine,
    slice_normal,
)

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _oblique_iop(seed: int) -> np.ndarray:
    rot = Rotation.random(random_state=seed).as_matrix()
    return np.concatenate([rot[:, 0], rot[:, 1]])


def _stack(iop: np.ndarray, origin: np.ndarray, n: int, step: float) -> np.ndarray:
    normal = np.cross(iop[:3], iop[3:])
    return origin + np.arange(n)[:, None] * normal * step


def test_lps_ras_flip_is_its_own_inverse() -> None:
    affine = np.arange(16.0).reshape(4, 4)
    assert np.array_equal(ras_to_lps(lps_to_ras(affine)), affine)
    assert np.array_equal(lps_to_ras(np.eye(4)), np.diag([-1.0, -1.0, 1.0, 1.0]))
    assert not LPS_TO_RAS.flags.writeable


def test_axial_affine_known_answer() -> None:
    # PixelSpacing is (row spacing, column spacing): axis 0 (along a row)
    # moves by the column spacing.
    positions = np.array([[-100.0, -120.0, 10.0], [-100.0, -120.0, 14.0]])
    affine = slice_affine(AXIAL, (2.0, 3.0), positions)
    expected = np.array(
        [
            [-3.0, 0.0, 0.0, 100.0],
            [0.0, -2.0, 0.0, 120.0],
            [0.0, 0.0, 4.0, 10.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    assert np.allclose(affine, expected)


@pytest.mark.parametrize("seed", range(5))
def test_every_voxel_lands_on_its_dicom_position(seed: int) -> None:
    rng = np.random.default_rng(seed)
    iop = _oblique_iop(seed)
    spacing = rng.uniform(0.5, 4.0, size=2)
    origin = rng.uniform(-150, 150, size=3)
    positions = _stack(iop, origin, 7, float(rng.uniform(1.0, 6.0)))
    affine = slice_affine(iop, spacing, positions)
    # DICOM: pixel (row r, column c) of slice k is at
    # IPP_k + c * col_spacing * row_dir + r * row_spacing * col_dir (LPS).
    for r, c, k in [(0, 0, 0), (5, 3, 2), (9, 11, 6)]:
        lps = positions[k] + c * spacing[1] * iop[:3] + r * spacing[0] * iop[3:]
        ras = affine @ np.array([c, r, k, 1.0])
        assert np.allclose(ras[:3], lps * [-1, -1, 1], atol=1e-9)


def test_gap_between_slices_comes_from_positions() -> None:
    positions = _stack(np.array(AXIAL), np.zeros(3), 5, 4.5)  # 3 mm slices, 1.5 mm gap
    affine = slice_affine(AXIAL, (3.0, 3.0), positions, slice_spacing=3.0)
    assert np.isclose(affine[2, 2], 4.5)


def test_tilted_stack_keeps_its_shear() -> None:
    iop = np.array(AXIAL)
    positions = np.zeros(3) + np.arange(6)[:, None] * np.array([0.0, 0.8, 3.0])
    affine = slice_affine(iop, (2.0, 2.0), positions)
    assert np.allclose(affine[:3, 2], [0.0, -0.8, 3.0])


def test_single_slice_uses_the_spacing_hint_along_the_normal() -> None:
    iop = _oblique_iop(3)
    affine = slice_affine(iop, (1.0, 1.0), np.zeros((1, 3)), slice_spacing=2.5)
    normal = slice_normal(iop)
    assert np.allclose(affine[:3, 2], 2.5 * normal * [-1, -1, 1])
    assert np.allclose(slice_affine(iop, (1.0, 1.0), np.zeros((1, 3)))[:3, 2], normal * [-1, -1, 1])


def test_order_by_normal_ignores_arrival_order() -> None:
    iop = _oblique_iop(7)
    positions = _stack(iop, np.array([10.0, -20.0, 30.0]), 9, 2.0)
    shuffled = np.random.default_rng(1).permutation(9)
    order = order_by_normal(positions[shuffled], slice_normal(iop))
    assert np.array_equal(shuffled[order], np.arange(9))


def test_uneven_spacing_is_refused() -> None:
    positions = _stack(np.array(AXIAL), np.zeros(3), 6, 3.0)
    missing = np.delete(positions, 2, axis=0)
    with pytest.raises(DicomInputError, match="not even"):
        slice_affine(AXIAL, (3.0, 3.0), missing)


def test_coinciding_and_unordered_positions_are_refused() -> None:
    positions = _stack(np.array(AXIAL), np.zeros(3), 4, 3.0)
    with pytest.raises(DicomInputError, match="same position"):
        slice_affine(AXIAL, (3.0, 3.0), positions[[0, 1, 1, 2]])
    with pytest.raises(DicomInputError, match="not ordered"):
        slice_affine(AXIAL, (3.0, 3.0), positions[::-1])


def test_stack_not_along_its_normal_is_refused() -> None:
    positions = np.arange(4)[:, None] * np.array([3.0, 0.0, 0.1])
    with pytest.raises(DicomInputError, match="not stacked"):
        slice_affine(AXIAL, (3.0, 3.0), positions)


@pytest.mark.parametrize(
    "iop",
    [(1, 0, 0, 0, 0.5, 0), (1, 0, 0, 1, 0, 0), (1, 0, 0, 0, 1), (1, 0, 0, 0, float("nan"), 1)],
)
def test_broken_orientation_is_refused(iop: tuple[float, ...]) -> None:
    with pytest.raises(DicomInputError, match="ImageOrientationPatient"):
        slice_affine(iop, (1.0, 1.0), np.zeros((1, 3)))


def test_bad_pixel_spacing_is_refused() -> None:
    with pytest.raises(DicomInputError, match="PixelSpacing"):
        slice_affine(AXIAL, (0.0, 1.0), np.zeros((1, 3)))
