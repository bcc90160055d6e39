"""Slice geometry: from DICOM orientation and positions to a RAS+ ``vox2ras``.

DICOM describes every slice in the LPS+ patient frame; the rest of boldstream
works in RAS+. The conversion (a sign flip of x and y) happens here and
nowhere else, so an affine that leaves the receiver is always RAS+.

Array axes follow the contract in :mod:`boldstream.receiver.volume`: axis 0
runs along a DICOM row (column index, direction ``IOP[:3]``), axis 1 down a
column (row index, direction ``IOP[3:]``), axis 2 along increasing position on
the slice normal. A 2D slice as stored (``pixel_array[row, col]``) therefore
enters the volume transposed.

The slice axis is taken from the positions themselves (first to last over
``n - 1``), not from SliceThickness or the normal: that is what handles slice
gaps and stacks with a tilt (gantry tilt, shear). The price is that the
positions must be evenly spaced along one line, which is checked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from boldstream.errors import DicomInputError

__all__ = [
    "LPS_TO_RAS",
    "lps_to_ras",
    "order_by_normal",
    "orientation_frame",
    "ras_to_lps",
    "slice_affine",
    "slice_normal",
]

FloatArray = npt.NDArray[np.float64]

#: diag(-1, -1, 1, 1): LPS+ <-> RAS+ (its own inverse).
LPS_TO_RAS: FloatArray = np.diag([-1.0, -1.0, 1.0, 1.0])
LPS_TO_RAS.setflags(write=False)

#: How far the two IOP vectors may be from unit length and orthogonal.
#: DICOM stores them as decimal strings of at most 16 characters; scanners
#: write 6-14 significant digits, so 1e-3 rejects only broken headers.
_IOP_TOLERANCE = 1e-3
#: Allowed deviation of a slice position from the evenly spaced line, as a
#: fraction of the slice spacing, plus an absolute floor in mm for rounding
#: of the decimal strings.
_SPACING_REL_TOLERANCE = 0.01
_SPACING_ABS_TOLERANCE_MM = 1e-3


def lps_to_ras(affine_lps: npt.ArrayLike) -> FloatArray:
    """A 4x4 affine into LPS+ mm turned into one into RAS+ mm."""
    out: FloatArray = LPS_TO_RAS @ np.asarray(affine_lps, dtype=np.float64)
    return out


def ras_to_lps(affine_ras: npt.ArrayLike) -> FloatArray:
    """The inverse of :func:`lps_to_ras` (the same flip)."""
    out: FloatArray = LPS_TO_RAS @ np.asarray(affine_ras, dtype=np.float64)
    return out


def orientation_frame(iop: Sequence[float] | npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    """Row and column direction cosines (LPS) from ImageOrientationPatient.

    Returns ``(row_dir, col_dir)``: ``row_dir`` is the direction of increasing
    column index (along a row), ``col_dir`` of increasing row index. Raises
    :class:`DicomInputError` when the six numbers are not two orthonormal
    vectors, because every later step silently produces a wrong affine then.
    """
    values = np.asarray(iop, dtype=np.float64).ravel()
    # Six numbers, checked in Python floats: numpy's per-call overhead on
    # 3-vectors is most of this function's time, and it runs for every instance.
    r = values.tolist()
    if len(r) != 6 or not all(map(math.isfinite, r)):
        raise DicomInputError(f"ImageOrientationPatient must be 6 finite numbers, got {r}")
    norms = (math.sqrt(r[0] * r[0] + r[1] * r[1] + r[2] * r[2]),
             math.sqrt(r[3] * r[3] + r[4] * r[4] + r[5] * r[5]))  # fmt: skip
    dot = r[0] * r[3] + r[1] * r[4] + r[2] * r[5]
    if abs(norms[0] - 1) > _IOP_TOLERANCE or abs(norms[1] - 1) > _IOP_TOLERANCE:
        raise DicomInputError(
            f"ImageOrientationPatient vectors are not unit length (lengths {norms[0]:.4f}, "
            f"{norms[1]:.4f}): the image orientation in this header is broken"
        )
    if abs(dot) > _IOP_TOLERANCE:
        raise DicomInputError(
            f"ImageOrientationPatient row and column directions are not perpendicular "
            f"(cosine {dot:.4f}): the image orientation in this header is broken"
        )
    return values[:3] / norms[0], values[3:] / norms[1]


def slice_normal(iop: Sequence[float] | npt.ArrayLike) -> FloatArray:
    """The unit normal ``row_dir x col_dir`` (LPS) of a slice orientation."""
    row_dir, col_dir = orientation_frame(iop)
    normal = np.cross(row_dir, col_dir)
    out: FloatArray = normal / np.linalg.norm(normal)
    return out


def order_by_normal(positions: npt.ArrayLike, normal: npt.ArrayLike) -> npt.NDArray[np.intp]:
    """Indices that sort slice positions by their projection on the normal.

    Arrival order and InstanceNumber say nothing reliable about where a slice
    is; the projection of ImagePositionPatient on the normal does. The sort is
    stable so that equal projections (duplicates) keep their given order.
    """
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    proj = pos @ np.asarray(normal, dtype=np.float64)
    order: npt.NDArray[np.intp] = np.argsort(proj, kind="stable")
    return order


def slice_affine(
    iop: Sequence[float] | npt.ArrayLike,
    pixel_spacing: Sequence[float] | npt.ArrayLike,
    positions: npt.ArrayLike,
    *,
    normal: npt.ArrayLike | None = None,
    slice_spacing: float | None = None,
) -> FloatArray:
    """The 4x4 ``vox2ras`` (RAS+, mm) of a stack of parallel slices.

    ``iop`` is ImageOrientationPatient, ``pixel_spacing`` is PixelSpacing
    (row spacing, column spacing), ``positions`` the ImagePositionPatient of
    every slice (LPS, shape ``(n, 3)``) already in increasing order along
    ``normal`` (default ``row_dir x col_dir``). The slice axis is
    ``(positions[-1] - positions[0]) / (n - 1)``; for a single slice it is the
    normal times ``slice_spacing`` (SpacingBetweenSlices or SliceThickness;
    1 mm when unknown, as nibabel and dcm2niix do).

    Raises :class:`DicomInputError` when the positions are not in order, two
    coincide, or they are not evenly spaced along one line (a missing slice,
    a localizer with several stacks, mixed series).
    """
    row_dir, col_dir = orientation_frame(iop)
    spacing = np.asarray(pixel_spacing, dtype=np.float64).ravel()
    if spacing.shape != (2,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise DicomInputError(f"PixelSpacing must be two positive numbers, got {spacing.tolist()}")
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    n = pos.shape[0]
    if n == 0:
        raise DicomInputError("no slice positions: cannot build the volume geometry")
    if not np.all(np.isfinite(pos)):
        raise DicomInputError("ImagePositionPatient holds a non-finite number")
    unit_normal = (
        np.cross(row_dir, col_dir) if normal is None else np.asarray(normal, dtype=np.float64)
    )
    if n == 1:
        step = unit_normal * (slice_spacing if slice_spacing and slice_spacing > 0 else 1.0)
    else:
        step = _check_even_spacing(pos, unit_normal)

    affine = np.eye(4)
    affine[:3, 0] = row_dir * spacing[1]
    affine[:3, 1] = col_dir * spacing[0]
    affine[:3, 2] = step
    affine[:3, 3] = pos[0]
    return lps_to_ras(affine)


def _check_even_spacing(pos: FloatArray, normal: FloatArray) -> FloatArray:
    """The slice step vector, after checking the stack is one even line."""
    n = pos.shape[0]
    proj = pos @ normal
    gaps = np.diff(proj)
    if np.any(gaps <= 0):
        k = int(np.argmax(gaps <= 0))
        if abs(gaps[k]) < _SPACING_ABS_TOLERANCE_MM:
            raise DicomInputError(
                f"two slices of one volume are at the same position ({proj[k]:.3f} mm along "
                "the normal): mixed echoes, phases or series in one volume?"
            )
        raise DicomInputError("slice positions are not ordered along the slice normal")
    step = (pos[-1] - pos[0]) / (n - 1)
    step_len = float(np.linalg.norm(step))
    if abs(float(step @ normal)) < 0.5 * step_len:
        raise DicomInputError(
            "the slices are not stacked along their normal (tilt over 60 degrees): not one volume"
        )
    expected = pos[0] + np.arange(n)[:, None] * step
    residual = np.linalg.norm(pos - expected, axis=1)
    tolerance = _SPACING_REL_TOLERANCE * step_len + _SPACING_ABS_TOLERANCE_MM
    worst = int(np.argmax(residual))
    if residual[worst] > tolerance:
        raise DicomInputError(
            f"slice spacing is not even: slice {worst} of {n} is {residual[worst]:.2f} mm "
            f"off the line of a {step_len:.2f} mm stack (gaps from {gaps.min():.2f} to "
            f"{gaps.max():.2f} mm along the normal): a slice is missing or the volume "
            "mixes several stacks"
        )
    out: FloatArray = step
    return out
